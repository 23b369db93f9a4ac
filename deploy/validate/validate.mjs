// Offline validation of Ember's Kubernetes manifests (tests/deploy.rs runs it; CI installs the
// pinned packages with `npm ci` in this folder):
//   node deploy/validate/validate.mjs deploy/k8s/*.yaml [--dockerfile deploy/Dockerfile ...]
// 1. Every document against its schema: core Kubernetes kinds with kubernetes-models, Gateway
//    API kinds with @kubernetes-models/gateway-api, InferencePool with inferencepool-v1.schema.json.
//    A kind with no schema here is an error, so nothing goes unchecked.
// 2. What must agree for Ember: the grace period above --shutdown-timeout, probes on /health at
//    the port ember serves, Service, InferencePool and HTTPRoute pointing at what exists, the
//    Dockerfiles' EXPOSE at that port.
// Prints one line per problem and exits 1 when there is any.

import { readFileSync } from "node:fs";
import { basename } from "node:path";
import Ajv from "ajv";
import { parseAllDocuments } from "yaml";
import { Deployment } from "kubernetes-models/apps/v1/Deployment";
import { StatefulSet } from "kubernetes-models/apps/v1/StatefulSet";
import { Service } from "kubernetes-models/v1/Service";
import { PersistentVolumeClaim } from "kubernetes-models/v1/PersistentVolumeClaim";
import { Secret } from "kubernetes-models/v1/Secret";
import { ConfigMap } from "kubernetes-models/v1/ConfigMap";
import { HTTPRoute } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/HTTPRoute";
import { Gateway } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/Gateway";

const here = new URL(".", import.meta.url);
const poolSchema = JSON.parse(readFileSync(new URL("inferencepool-v1.schema.json", here)));
const validatePool = new Ajv({ allErrors: true, strict: false }).compile(poolSchema);

const models = {
  "apps/v1/Deployment": Deployment,
  "apps/v1/StatefulSet": StatefulSet,
  "v1/Service": Service,
  "v1/PersistentVolumeClaim": PersistentVolumeClaim,
  "v1/Secret": Secret,
  "v1/ConfigMap": ConfigMap,
  "gateway.networking.k8s.io/v1/HTTPRoute": HTTPRoute,
  "gateway.networking.k8s.io/v1/Gateway": Gateway,
};

const problems = [];
const docs = [];
const dockerfiles = [];
const args = process.argv.slice(2);
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--dockerfile") {
    dockerfiles.push(args[++i]);
    continue;
  }
  const file = args[i];
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    if (doc.errors.length) {
      problems.push(`${file}: YAML: ${doc.errors.map((e) => e.message).join("; ")}`);
      continue;
    }
    const obj = doc.toJS();
    if (obj) docs.push({ file: basename(file), obj });
  }
}
if (docs.length === 0) problems.push("no manifests given");

// 1. Schemas.
for (const { file, obj } of docs) {
  const key = `${obj.apiVersion}/${obj.kind}`;
  const where = `${file}: ${obj.kind} ${obj.metadata?.name ?? "?"}`;
  if (key === "inference.networking.k8s.io/v1/InferencePool") {
    if (!validatePool(obj)) {
      for (const e of validatePool.errors) problems.push(`${where}: ${e.instancePath || "/"} ${e.message}`);
    }
    continue;
  }
  const Model = models[key];
  if (!Model) {
    problems.push(`${where}: no schema for ${key}`);
    continue;
  }
  try {
    new Model(obj).validate();
  } catch (e) {
    problems.push(`${where}: ${e.message}`);
  }
}

// 2. What must agree.
const flag = (argv, name) => {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : undefined;
};
const of = (kind) => docs.filter((d) => d.obj.kind === kind).map((d) => d.obj);
const servePorts = new Set();
const podLabels = [];
for (const w of [...of("Deployment"), ...of("StatefulSet")]) {
  const pod = w.spec?.template;
  podLabels.push(pod?.metadata?.labels ?? {});
  for (const c of pod?.spec?.containers ?? []) {
    const argv = (c.args ?? []).map(String);
    if (argv[0] !== "serve") continue;
    const where = `${w.kind} ${w.metadata.name}: container ${c.name}`;
    const port = Number(flag(argv, "--port") ?? 8000);
    servePorts.add(port);
    const shutdown = Number(flag(argv, "--shutdown-timeout") ?? 30);
    const grace = pod.spec.terminationGracePeriodSeconds ?? 30;
    if (!(grace > shutdown)) {
      problems.push(`${where}: terminationGracePeriodSeconds ${grace} must exceed --shutdown-timeout ${shutdown}`);
    }
    if ((flag(argv, "--host") ?? "127.0.0.1") !== "0.0.0.0") {
      problems.push(`${where}: --host 0.0.0.0 is needed to be reachable from outside the pod`);
    }
    const named = Object.fromEntries((c.ports ?? []).map((p) => [p.name, p.containerPort]));
    if (!(c.ports ?? []).some((p) => p.containerPort === port)) {
      problems.push(`${where}: no containerPort ${port} (ember serve --port)`);
    }
    for (const probe of ["readinessProbe", "livenessProbe"]) {
      const get = c[probe]?.httpGet;
      if (!get) {
        problems.push(`${where}: no ${probe}`);
        continue;
      }
      const probePort = typeof get.port === "string" ? named[get.port] : get.port;
      if (get.path !== "/health" || probePort !== port) {
        problems.push(`${where}: ${probe} must GET /health on port ${port}`);
      }
    }
  }
}
const selects = (selector) =>
  podLabels.some((labels) => Object.entries(selector ?? {}).every(([k, v]) => labels[k] === v));
for (const s of of("Service")) {
  if (!selects(s.spec?.selector)) problems.push(`Service ${s.metadata.name}: its selector matches no pod template`);
}
const pools = new Set();
for (const p of of("InferencePool")) {
  pools.add(p.metadata.name);
  if (!selects(p.spec?.selector?.matchLabels)) {
    problems.push(`InferencePool ${p.metadata.name}: its selector matches no pod template`);
  }
  for (const t of p.spec?.targetPorts ?? []) {
    if (!servePorts.has(t.number)) problems.push(`InferencePool ${p.metadata.name}: targetPort ${t.number} is not ember serve's port`);
  }
}
for (const r of of("HTTPRoute")) {
  for (const rule of r.spec?.rules ?? []) {
    for (const b of rule.backendRefs ?? []) {
      if (b.kind === "InferencePool" && !pools.has(b.name)) {
        problems.push(`HTTPRoute ${r.metadata.name}: backend InferencePool ${b.name} is not defined`);
      }
    }
  }
}
for (const file of dockerfiles) {
  const text = readFileSync(file, "utf8");
  const exposed = [...text.matchAll(/^EXPOSE\s+(\d+)/gm)].map((m) => Number(m[1]));
  if (exposed.length === 0) problems.push(`${file}: no EXPOSE`);
  for (const port of exposed) {
    if (servePorts.size && !servePorts.has(port)) problems.push(`${file}: EXPOSE ${port} is not ember serve's port`);
  }
  if (!/^FROM .* AS build$/m.test(text) || !/^COPY --from=build /m.test(text)) {
    problems.push(`${file}: not a multi-stage build (a build stage, a runtime stage copying from it)`);
  }
  if (!/^USER (?!0\b|root\b)\S+/m.test(text)) problems.push(`${file}: the runtime stage must not run as root`);
}

if (problems.length) {
  for (const p of problems) console.log(p);
  process.exit(1);
}
console.log(`ok: ${docs.length} manifests, ${dockerfiles.length} Dockerfiles`);
