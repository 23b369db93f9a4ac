//! Clients nobody here wrote, against a live `ember serve` on the tiny Qwen3 fixture: LangChain
//! (langchain-openai) and LiteLLM (tests/clients/ecosystem_suite.py), the official OpenAI Node
//! SDK (tests/clients/node/suite.mjs), and guidellm's default streaming benchmark (its results
//! read from its JSON report). Each checks behaviour, not just the absence of an exception.
//!
//! The tools come from `scripts/client-venv.sh` (.client-venv, .guidellm-venv, `npm ci` in
//! tests/clients/node), all pinned. A test whose tool is missing says so and skips, unless
//! EMBER_REQUIRE_CLIENT_SUITE is set (CI sets it), in which case it fails.

mod http;

use std::path::PathBuf;
use std::process::Command;

use http::{api_config, client_tool, engine_config, run_suite, TestServer, MODEL};
use serde_json::Value as Json;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn langchain_and_litellm() {
    let python = root().join(".client-venv/bin/python");
    if !client_tool(&python, "Python with langchain-openai and litellm") {
        return;
    }
    run_suite(
        Command::new(&python)
            .arg(root().join("tests/clients/ecosystem_suite.py"))
            .arg("--ember")
            .arg(env!("CARGO_BIN_EXE_ember"))
            .env("HF_HUB_OFFLINE", "1"),
        "the LangChain / LiteLLM suite",
    );
}

#[test]
fn official_openai_node_sdk() {
    let dir = root().join("tests/clients/node");
    if !client_tool(&dir.join("node_modules/openai"), "openai Node SDK") {
        return;
    }
    run_suite(
        Command::new(std::env::var_os("EMBER_NODE").unwrap_or_else(|| "node".into()))
            .arg(dir.join("suite.mjs"))
            .arg("--ember")
            .arg(env!("CARGO_BIN_EXE_ember")),
        "the Node SDK suite",
    );
}

/// guidellm's default mode streams chat completions with vLLM's `continuous_usage_stats`: every
/// request must succeed and the report must carry TTFT and inter-token latency.
#[test]
fn guidellm_default_streaming_run() {
    let guidellm = root().join(".guidellm-venv/bin/guidellm");
    if !client_tool(&guidellm, "guidellm") {
        return;
    }
    let server = TestServer::start("qwen3", api_config(), engine_config());
    let report = std::env::temp_dir().join(format!("ember-guidellm-{}.json", std::process::id()));
    let requests = 6;
    let output_tokens = 8;
    run_suite(
        Command::new(&guidellm)
            .arg("run")
            .arg("--backend")
            .arg(format!(
                "kind=openai_http,target={},model={MODEL}",
                server.base
            ))
            .args(["--profile", "kind=concurrent,streams=2"])
            .arg("--constraint")
            .arg(format!("kind=max_requests,count={requests}"))
            .arg("--data")
            .arg(format!(
                "kind=synthetic_text,prompt_tokens=32,output_tokens={output_tokens}"
            ))
            .arg("--tokenizer")
            .arg(format!(
                "kind=huggingface_auto,model={}",
                root().join("tests/fixtures/models/qwen3").display()
            ))
            .arg("--output")
            .arg(format!("kind=json,path={}", report.display()))
            .arg("--disable-console-interactive")
            .env("HF_HUB_OFFLINE", "1")
            .env("GUIDELLM__LOGGING__DISABLED", "true"),
        "guidellm",
    );
    let text = std::fs::read_to_string(&report).expect("guidellm's JSON report");
    let _ = std::fs::remove_file(&report);
    let json: Json = serde_json::from_str(&text).expect("JSON");
    let metrics = &json["benchmarks"][0]["metrics"];
    let totals = &metrics["request_totals"];
    assert_eq!(totals["successful"], requests, "{totals}");
    assert_eq!(totals["errored"], 0, "{totals}");
    let mean = |name: &str| metrics[name]["successful"]["mean"].as_f64().unwrap_or(0.0);
    assert!(mean("time_to_first_token_ms") > 0.0, "TTFT reported");
    assert!(mean("inter_token_latency_ms") > 0.0, "ITL reported");
    assert_eq!(mean("output_token_count"), output_tokens as f64);
}
