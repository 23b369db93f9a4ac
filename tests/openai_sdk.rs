//! The official OpenAI Python SDK (pinned in tests/clients/requirements.txt) against a live
//! `ember serve` on the tiny Qwen3 fixture: tests/clients/openai_suite.py.
//!
//! The suite needs a Python with the SDK: EMBER_CLIENT_PYTHON, else .client-venv/bin/python
//! (made by `scripts/client-venv.sh`). Without one the test says so and skips, unless
//! EMBER_REQUIRE_CLIENT_SUITE is set (CI sets it), in which case it fails.
//!
//! The suite starts the `ember` binary itself; the server whose completions are forced to hold
//! reasoning and a tool call runs here, in process, because that hook
//! (`EngineConfig::debug_forced_output`) is not a flag of the release binary.

mod http;

use std::path::PathBuf;
use std::process::Command;

use ember::api::ApiConfig;
use ember::engine::EngineConfig;
use http::{api_config, client_tool, engine_config, TestServer};

/// What the forced server answers: the suite checks it comes back as reasoning, content and a
/// tool call.
const FORCED: &str = "<think>Need the weather.</think>\n\nLet me check.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";

#[test]
fn official_openai_python_sdk_against_ember_serve() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("EMBER_CLIENT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".client-venv/bin/python"));
    if !client_tool(
        &python,
        "Python with the openai SDK (scripts/client-venv.sh)",
    ) {
        return;
    }
    let forced = TestServer::start(
        "qwen3",
        ApiConfig {
            api_keys: vec!["suite-key".into()],
            ..api_config()
        },
        EngineConfig {
            debug_forced_output: Some(FORCED.into()),
            ..engine_config()
        },
    );
    let status = Command::new(&python)
        .arg(root.join("tests/clients/openai_suite.py"))
        .arg("--ember")
        .arg(env!("CARGO_BIN_EXE_ember"))
        .arg("--forced-base")
        .arg(&forced.base)
        .status()
        .expect("running the client suite");
    assert!(status.success(), "the OpenAI SDK suite failed: {status}");
}
