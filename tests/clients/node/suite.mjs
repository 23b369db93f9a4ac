// The official OpenAI Node SDK (pinned in package.json) against a live `ember serve` on the
// tiny Qwen3 fixture. Run by tests/client_ecosystem.rs after `npm ci` here:
//   node tests/clients/node/suite.mjs --ember target/release/ember
// Starts the server on a free port, runs the checks, stops it with SIGTERM (it must exit 0),
// and exits non-zero if any check failed.

import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import OpenAI from "openai";

const root = fileURLToPath(new URL("../../..", import.meta.url));
const ember = process.argv[process.argv.indexOf("--ember") + 1];
const MODEL = "tiny";
const KEY = "node-key";

function start() {
  const proc = spawn(ember, ["serve", "--model", `${root}/tests/fixtures/models/qwen3`, "--port", "0",
    "--served-model-name", MODEL, "--api-key", KEY, "--kv-cache-mib", "16"], { stdio: ["ignore", "ignore", "pipe"] });
  return new Promise((resolve, reject) => {
    const lines = createInterface({ input: proc.stderr });
    let base = null;
    lines.on("line", (line) => {
      const m = !base && line.match(/listening on (http:\/\/\S+)/);
      if (m) {
        base = m[1];
        resolve({ proc, base });
      }
    });
    proc.on("exit", (code) => reject(new Error(`ember exited early with ${code}`)));
  });
}

async function ready(base) {
  for (let i = 0; i < 1200; i++) {
    try {
      if ((await fetch(`${base}/health`)).status === 200) return;
    } catch {}
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error("ember did not become ready");
}

function check(cond, what) {
  if (!cond) throw new Error(what);
}

async function expectError(promise, cls, status, code) {
  try {
    await promise;
  } catch (e) {
    check(e instanceof cls, `expected ${cls.name}, got ${e?.constructor?.name}: ${e?.message}`);
    check(e.status === status, `status ${e.status}, expected ${status}`);
    if (code) check(e.code === code, `code ${e.code}, expected ${code}`);
    return e;
  }
  throw new Error(`expected ${cls.name}, got success`);
}

const checks = {
  async chatWholeAndStreamed(c) {
    const body = { model: MODEL, messages: [{ role: "user", content: "Tell me about cats" }], max_tokens: 8, temperature: 0 };
    const whole = await c.chat.completions.create(body);
    const content = whole.choices[0].message.content;
    check(typeof content === "string" && content.length > 0, `content ${JSON.stringify(content)}`);
    check(whole.usage.completion_tokens > 0 && whole.usage.completion_tokens <= 8, JSON.stringify(whole.usage));
    const stream = await c.chat.completions.create({ ...body, stream: true, stream_options: { include_usage: true } });
    let text = "";
    const usages = [];
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta?.content ?? "";
      usages.push(chunk.usage);
    }
    check(text === content, `streamed ${JSON.stringify(text)} != ${JSON.stringify(content)}`);
    const last = usages.pop();
    check(last && last.completion_tokens === whole.usage.completion_tokens, `final usage ${JSON.stringify(last)}`);
    check(usages.every((u) => u === null), "usage is null on every chunk but the last");
  },
  async legacyCompletions(c) {
    const r = await c.completions.create({ model: MODEL, prompt: "Once upon a time", max_tokens: 5, temperature: 0 });
    check(typeof r.choices[0].text === "string" && r.usage.completion_tokens <= 5, JSON.stringify(r));
  },
  async errorClasses(c, base) {
    const msg = [{ role: "user", content: "hi" }];
    await expectError(new OpenAI({ baseURL: `${base}/v1`, apiKey: "wrong", maxRetries: 0 })
      .chat.completions.create({ model: MODEL, messages: msg }), OpenAI.AuthenticationError, 401);
    await expectError(c.chat.completions.create({ model: "nope", messages: msg }), OpenAI.NotFoundError, 404, "model_not_found");
    const e = await expectError(c.chat.completions.create({ model: MODEL, messages: msg, max_tokens: 100000 }),
      OpenAI.BadRequestError, 400, "context_length_exceeded");
    check(e.param === "max_tokens" && /maximum context length is \d+ tokens/.test(e.message), e.message);
    await expectError(c.chat.completions.create({ model: MODEL, messages: msg, temperature: -1 }), OpenAI.BadRequestError, 400);
  },
  async abortMidStream(c) {
    const controller = new AbortController();
    const stream = await c.chat.completions.create(
      { model: MODEL, messages: [{ role: "user", content: "Count to a thousand" }], max_tokens: 400, ignore_eos: true, stream: true },
      { signal: controller.signal });
    let n = 0;
    try {
      for await (const _ of stream) {
        if (++n === 3) controller.abort();
      }
    } catch (e) {
      check(e instanceof OpenAI.APIUserAbortError || e.name === "AbortError", `abort: ${e?.constructor?.name}`);
    }
    const after = await c.chat.completions.create({ model: MODEL, messages: [{ role: "user", content: "hi" }], max_tokens: 2 });
    check(after.choices.length === 1, "the server answers after an aborted stream");
  },
};

const { proc, base } = await start();
let failed = 0;
try {
  await ready(base);
  const c = new OpenAI({ baseURL: `${base}/v1`, apiKey: KEY, maxRetries: 0, timeout: 120000 });
  for (const [name, fn] of Object.entries(checks)) {
    try {
      await fn(c, base);
      console.log(`ok   ${name}`);
    } catch (e) {
      failed++;
      console.log(`FAIL ${name}: ${e.stack ?? e}`);
    }
  }
} finally {
  const exited = new Promise((r) => proc.on("exit", r));
  proc.kill("SIGTERM");
  const code = await exited;
  if (code !== 0) {
    failed++;
    console.log(`FAIL ember exited with ${code} after SIGTERM`);
  }
}
process.exit(failed ? 1 : 0);
