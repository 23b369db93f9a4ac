//! The official OpenAI Python SDK (pinned in tests/clients/requirements.txt) against a live
//! `ember serve` on the tiny Qwen3 fixture: tests/clients/openai_suite.py.
//!
//! The suite needs a Python with the SDK: EMBER_CLIENT_PYTHON, else .client-venv/bin/python
//! (made by `scripts/client-venv.sh`). Without one the test says so and skips, unless
//! EMBER_REQUIRE_CLIENT_SUITE is set (CI sets it), in which case it fails.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn official_openai_python_sdk_against_ember_serve() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("EMBER_CLIENT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".client-venv/bin/python"));
    if !python.exists() {
        assert!(
            std::env::var_os("EMBER_REQUIRE_CLIENT_SUITE").is_none(),
            "EMBER_REQUIRE_CLIENT_SUITE is set but {} does not exist",
            python.display()
        );
        eprintln!(
            "skipped: no Python with the openai SDK at {} (run scripts/client-venv.sh)",
            python.display()
        );
        return;
    }
    let status = Command::new(&python)
        .arg(root.join("tests/clients/openai_suite.py"))
        .arg("--ember")
        .arg(env!("CARGO_BIN_EXE_ember"))
        .status()
        .expect("running the client suite");
    assert!(status.success(), "the OpenAI SDK suite failed: {status}");
}
