//! deploy/: the Kubernetes manifests and the InferencePool example validate against their
//! schemas offline, and agree with what `ember serve` needs (deploy/validate/validate.mjs);
//! broken copies of them are refused, so the check can fail.
//!
//! Needs Node and the validator's pinned packages (`npm ci` in deploy/validate; .ci/run does
//! it). Without them the test says so and skips, unless EMBER_REQUIRE_CLIENT_SUITE is set (CI),
//! in which case it fails.

mod http;

use std::path::{Path, PathBuf};
use std::process::Command;

use http::client_tool;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// (exit ok, output) of the validator on `manifests` and the two Dockerfiles.
fn validate(manifests: &[PathBuf]) -> (bool, String) {
    let deploy = root().join("deploy");
    let out = Command::new(std::env::var_os("EMBER_NODE").unwrap_or_else(|| "node".into()))
        .arg(deploy.join("validate/validate.mjs"))
        .args(manifests)
        .arg("--dockerfile")
        .arg(deploy.join("Dockerfile"))
        .arg("--dockerfile")
        .arg(deploy.join("Dockerfile.cuda"))
        .output()
        .expect("node runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn available() -> bool {
    let packages = root().join("deploy/validate/node_modules/kubernetes-models");
    if !client_tool(
        &packages,
        "deploy validator packages (`npm ci` in deploy/validate)",
    ) {
        return false;
    }
    let node_runs = Command::new(std::env::var_os("EMBER_NODE").unwrap_or_else(|| "node".into()))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        node_runs,
        "the validator's packages are installed but node does not run"
    );
    true
}

/// `file` from deploy/k8s with `from` replaced by `to`, written under a temporary directory.
fn broken(dir: &Path, file: &str, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(root().join("deploy/k8s").join(file)).unwrap();
    assert!(text.contains(from), "{file} contains {from:?}");
    let path = dir.join(file);
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    path
}

#[test]
fn manifests_validate_and_broken_ones_do_not() {
    if !available() {
        return;
    }
    let k8s = root().join("deploy/k8s");
    let real = [k8s.join("ember.yaml"), k8s.join("inference-gateway.yaml")];
    let (ok, out) = validate(&real);
    assert!(ok, "the manifests validate:\n{out}");

    let dir = std::env::temp_dir().join(format!("ember-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        // A schema error in a core kind.
        (
            "ember.yaml",
            "containerPort: 8000",
            "containerPort: eight-thousand",
            "containerPort must be integer",
        ),
        // What ember serve needs: the grace period must outlast the drain.
        (
            "ember.yaml",
            "terminationGracePeriodSeconds: 45",
            "terminationGracePeriodSeconds: 20",
            "must exceed --shutdown-timeout 30",
        ),
        // An unknown field and a missing one in the InferencePool.
        (
            "inference-gateway.yaml",
            "targetPorts:",
            "targetPortz:",
            "must have required property 'targetPorts'",
        ),
        // The route must point at the pool that exists.
        (
            "inference-gateway.yaml",
            "          name: ember\n",
            "          name: emberr\n",
            "backend InferencePool emberr is not defined",
        ),
    ];
    for (file, from, to, expected) in cases {
        let bad = broken(&dir, file, from, to);
        let other = if file == "ember.yaml" {
            k8s.join("inference-gateway.yaml")
        } else {
            k8s.join("ember.yaml")
        };
        let (ok, out) = validate(&[bad, other]);
        assert!(!ok, "{file} with {to:?} is refused:\n{out}");
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
