//! The real Qwen3 chat template rendered by Ember, byte for byte against transformers'
//! `apply_chat_template` (golden renders from tests/fixtures/make_fixtures.py).

use std::path::PathBuf;

use ember::template::{ChatTemplate, RenderOptions};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
struct Case {
    name: String,
    messages: Value,
    kwargs: serde_json::Map<String, Value>,
    rendered: String,
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_template")
}

#[test]
fn qwen3_template_renders_like_transformers() {
    let dir = fixtures();
    let template = ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json")).unwrap();
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden_renders.json")).unwrap())
            .unwrap();
    assert!(
        cases.len() >= 12,
        "expected at least 12 golden renders, found {}",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let opts = RenderOptions {
            add_generation_prompt: case
                .kwargs
                .get("add_generation_prompt")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            tools: case.kwargs.get("tools").cloned(),
            enable_thinking: case.kwargs.get("enable_thinking").and_then(Value::as_bool),
            max_bytes: None,
        };
        match template.render(&case.messages, &opts) {
            Ok(out) if out == case.rendered => {}
            Ok(out) => failures.push(format!(
                "{}:\n--- expected\n{:?}\n--- got\n{:?}",
                case.name, case.rendered, out
            )),
            Err(e) => failures.push(format!("{}: {e}", case.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} renders differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}
