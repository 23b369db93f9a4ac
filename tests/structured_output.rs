//! Structured output over HTTP on the tiny random-weight fixtures: whatever the weights say,
//! a constrained completion that ends with `stop` matches its regex, choice, schema or tool.
//! The grammars are bounded (finite lengths, enums), so every completion must end with `stop`
//! well within `max_tokens`. The JSON-schema corpus runs in the Python client suite
//! (tests/clients/structured_suite.py, with `jsonschema`, the last test here); the others need
//! no Python.

mod http;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ember::api::ApiConfig;
use ember::template::ChatTemplate;

use http::{api_config, engine_config, post, stream, TestServer, MODEL};
use serde_json::{json, Value as Json};

/// Token ids of the fixtures' `<think>` and `<tool_call>` (tests/fixtures/make_fixtures.py).
const THINK: u32 = 507;
const THINK_END: u32 = 508;
const TOOL_CALL: u32 = 503;

/// ChatML that writes only the tools' names: the fixtures' context is 512 tokens of a
/// 500-token vocabulary, too small for Qwen's tool preamble.
const SHORT_TOOLS_TEMPLATE: &str = "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t.function.name }} {% endfor %}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n";

fn server() -> TestServer {
    let template = ChatTemplate::new(SHORT_TOOLS_TEMPLATE.to_string(), None, None).unwrap();
    TestServer::start(
        "qwen3",
        ApiConfig {
            chat_template: Some(Arc::new(template)),
            ..api_config()
        },
        engine_config(),
    )
}

fn chat(extra: Json) -> Json {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Classify the incident."}],
        "max_tokens": 200,
        "temperature": 1.0,
        "seed": 7,
        "n": 6,
        // No think block: the grammar starts at the first token.
        "logit_bias": {THINK.to_string(): -100},
    });
    if let (Json::Object(b), Json::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    body
}

fn choices(r: &Json) -> &Vec<Json> {
    r["choices"].as_array().expect("choices")
}

#[test]
fn regex_and_choice_outputs_match_fully() {
    let s = server();
    let rx = r"[a-z]{2,6}( [a-z]{2,6}){0,3}\.";
    let full = regex::Regex::new(&format!("^(?:{rx})$")).unwrap();
    let (status, r) = s.post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "Dispatch note:", "max_tokens": 120, "n": 8,
                "temperature": 1.0, "seed": 3, "structured_outputs": {"regex": rx}}),
    );
    assert_eq!(status, 200, "{r}");
    for c in choices(&r) {
        assert_eq!(c["finish_reason"], "stop", "{c}");
        let text = c["text"].as_str().unwrap();
        assert!(full.is_match(text), "{text:?} does not match {rx}");
    }
    let classes = [
        "collision",
        "congestion",
        "roadworks",
        "breakdown",
        "weather hazard",
    ];
    let (status, r) = s.post(
        "/v1/chat/completions",
        &chat(json!({"structured_outputs": {"choice": classes}})),
    );
    assert_eq!(status, 200, "{r}");
    for c in choices(&r) {
        assert_eq!(c["finish_reason"], "stop", "{c}");
        let text = c["message"]["content"].as_str().unwrap();
        assert!(classes.contains(&text), "{text:?} is not a choice");
    }
}

const ETA_SCHEMA: &str = r#"{
    "type": "object",
    "properties": {
        "vehicle_id": {"type": "string", "pattern": "^V[0-9]{3}$"},
        "eta_minutes": {"type": "integer", "minimum": 0, "maximum": 600},
        "status": {"enum": ["en_route", "arrived", "delayed"]}
    },
    "required": ["vehicle_id", "eta_minutes"],
    "additionalProperties": false
}"#;

/// Checks one value against ETA_SCHEMA by hand (no validator crate for one schema).
fn assert_eta(v: &Json) {
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"));
    let id = o["vehicle_id"].as_str().unwrap();
    assert!(
        regex::Regex::new("^V[0-9]{3}$").unwrap().is_match(id),
        "{v}"
    );
    let eta = o["eta_minutes"].as_i64().unwrap_or_else(|| panic!("{v}"));
    assert!((0..=600).contains(&eta), "{v}");
    if let Some(s) = o.get("status") {
        assert!(
            ["en_route", "arrived", "delayed"].contains(&s.as_str().unwrap()),
            "{v}"
        );
    }
    assert!(
        o.keys()
            .all(|k| ["vehicle_id", "eta_minutes", "status"].contains(&k.as_str())),
        "{v}"
    );
}

/// Two small tools.
fn tools() -> Json {
    json!([
        {"type": "function", "function": {"name": "eta", "parameters": {
            "type": "object",
            "properties": {"v": {"type": "string", "pattern": "^V[0-9]{3}$"},
                           "m": {"type": "integer", "minimum": 0, "maximum": 600}},
            "required": ["v", "m"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "cls", "parameters": {
            "type": "object",
            "properties": {"c": {"enum": ["crash", "jam", "works"]}},
            "required": ["c"], "additionalProperties": false}}}
    ])
}

fn assert_call(call: &Json, only: Option<&str>) {
    let name = call["function"]["name"].as_str().unwrap();
    let args: Json = serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("arguments are not JSON ({e}): {call}"));
    if let Some(only) = only {
        assert_eq!(name, only);
    }
    let o = args.as_object().unwrap_or_else(|| panic!("{args}"));
    match name {
        "eta" => {
            let v = o["v"].as_str().unwrap();
            assert!(
                regex::Regex::new("^V[0-9]{3}$").unwrap().is_match(v),
                "{args}"
            );
            assert!((0..=600).contains(&o["m"].as_i64().unwrap()), "{args}");
            assert_eq!(o.len(), 2, "{args}");
        }
        "cls" => {
            assert!(
                ["crash", "jam", "works"].contains(&o["c"].as_str().unwrap()),
                "{args}"
            );
            assert_eq!(o.len(), 1, "{args}");
        }
        other => panic!("unknown function {other}"),
    }
}

#[test]
fn json_schema_response_format_whole_and_streamed() {
    let s = server();
    let format = json!({"type": "json_schema", "json_schema": {"name": "eta", "strict": true,
        "schema": serde_json::from_str::<Json>(ETA_SCHEMA).unwrap()}});
    let (status, r) = s.post(
        "/v1/chat/completions",
        &chat(json!({"response_format": format})),
    );
    assert_eq!(status, 200, "{r}");
    for c in choices(&r) {
        assert_eq!(c["finish_reason"], "stop", "{c}");
        let text = c["message"]["content"].as_str().unwrap();
        assert_eta(&serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}")));
    }
    // Streamed: the deltas add up to a valid object, with the same tokens as the whole answer.
    let body = chat(json!({"response_format": format, "n": 1, "stream": true}));
    let chunks = stream(&s.url("/v1/chat/completions"), &body);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eta(&serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}")));
    let (_, whole) = s.post(
        "/v1/chat/completions",
        &chat(json!({"response_format": format, "n": 1})),
    );
    assert_eq!(whole["choices"][0]["message"]["content"], text.as_str());
}

#[test]
fn tool_choice_required_and_named_calls_match_their_schemas() {
    let s = server();
    for (choice, only) in [
        (json!("required"), None),
        (
            json!({"type": "function", "function": {"name": "eta"}}),
            Some("eta"),
        ),
        (
            json!({"type": "function", "function": {"name": "cls"}}),
            Some("cls"),
        ),
    ] {
        let (status, r) = s.post(
            "/v1/chat/completions",
            &chat(json!({"tools": tools(), "tool_choice": choice, "parallel_tool_calls": false})),
        );
        assert_eq!(status, 200, "{r}");
        for c in choices(&r) {
            assert_eq!(c["finish_reason"], "tool_calls", "{c}");
            let calls = c["message"]["tool_calls"].as_array().unwrap();
            assert_eq!(calls.len(), 1, "{c}");
            assert_call(&calls[0], only);
        }
    }
}

#[test]
fn strict_tools_under_auto_constrain_the_calls_the_model_opens() {
    let s = server();
    let mut tools = tools();
    for t in tools.as_array_mut().unwrap() {
        t["function"]["strict"] = json!(true);
    }
    // The bias makes the model open a call at once (and again after each); every call it
    // closes must match its tool's schema.
    let (status, r) = s.post(
        "/v1/chat/completions",
        &chat(json!({"tools": tools, "max_tokens": 300,
                     "logit_bias": {THINK.to_string(): -100, TOOL_CALL.to_string(): 100}})),
    );
    assert_eq!(status, 200, "{r}");
    let mut calls = 0;
    for c in choices(&r) {
        let mut made: Vec<&Json> = c["message"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();
        if c["finish_reason"] == "length" {
            made.pop(); // the call max_tokens cut
        }
        for call in made {
            assert_call(call, None);
            calls += 1;
        }
    }
    assert!(calls >= 6, "every completion opens at least one call: {r}");
}

#[test]
fn the_grammar_starts_after_the_think_block() {
    let s = server();
    // The bias opens and at once closes a think block; then the grammar holds.
    let (status, r) = s.post(
        "/v1/chat/completions",
        &chat(json!({"structured_outputs": {"choice": ["yes", "no"]},
                     "logit_bias": {THINK.to_string(): 100, THINK_END.to_string(): 100}})),
    );
    assert_eq!(status, 200, "{r}");
    for c in choices(&r) {
        assert_eq!(c["finish_reason"], "stop", "{c}");
        let text = c["message"]["content"].as_str().unwrap().trim();
        assert!(["yes", "no"].contains(&text), "{c}");
    }
}

#[test]
fn constrained_and_free_requests_share_batches_and_stay_batch_invariant() {
    let s = server();
    let body = json!({"model": MODEL, "prompt": "Incident:", "max_tokens": 300, "n": 1,
        "temperature": 1.0, "seed": 11,
        "response_format": {"type": "json_schema", "json_schema": {"name": "eta",
            "schema": serde_json::from_str::<Json>(ETA_SCHEMA).unwrap()}}});
    let (_, alone) = s.post("/v1/completions", &body);
    let url = s.url("/v1/completions");
    let busy: Vec<_> = (0..6)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                post(
                    &url,
                    &json!({"model": MODEL, "prompt": format!("free {i}"),
                    "max_tokens": 40, "ignore_eos": true}),
                    None,
                )
            })
        })
        .collect();
    let (_, shared) = s.post("/v1/completions", &body);
    for b in busy {
        assert_eq!(b.join().unwrap().0, 200);
    }
    assert_eq!(alone["choices"][0]["text"], shared["choices"][0]["text"]);
    assert_eq!(alone["choices"][0]["finish_reason"], "stop");
}

#[test]
fn bad_and_hostile_grammars_get_a_400_in_bounded_time_and_the_server_keeps_serving() {
    let s = server();
    let within = |what: &str, started: Instant| {
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "{what} took {took:?}");
    };
    // Refused: each names its parameter.
    let huge_enum: Vec<String> = (0..40_000).map(|i| format!("v{i:06}")).collect();
    let mut too_deep = json!({"type": "string"});
    for _ in 0..70 {
        too_deep = json!({"type": "object", "properties": {"a": too_deep}});
    }
    let cases = [
        (
            "structured_outputs.regex",
            json!({"structured_outputs": {"regex": "[unclosed"}}),
        ),
        (
            "structured_outputs.regex",
            json!({"structured_outputs": {"regex": "(a)\\1"}}),
        ),
        (
            "structured_outputs.grammar",
            json!({"structured_outputs": {"grammar": "start: nope"}}),
        ),
        (
            "structured_outputs.choice",
            json!({"structured_outputs": {"choice": []}}),
        ),
        (
            "response_format.json_schema.schema",
            json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}),
        ),
        (
            "response_format.json_schema.schema",
            json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}}),
        ),
        // Past the size bound: refused before compiling.
        (
            "response_format.json_schema.schema",
            json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": {"enum": huge_enum}}}}),
        ),
        (
            "structured_outputs",
            json!({"structured_outputs": {"regex": "a", "choice": ["a"]}}),
        ),
        (
            "structured_outputs.regex",
            json!({"response_format": {"type": "json_object"},
            "structured_outputs": {"regex": "a"}}),
        ),
    ];
    for (param, extra) in cases {
        let started = Instant::now();
        let (status, r) = s.post("/v1/chat/completions", &chat(extra));
        assert_eq!(status, 400, "{param}: {r}");
        assert_eq!(r["error"]["param"], param, "{r}");
        within(param, started);
    }
    // Past JSON's nesting bound: refused with the body.
    let started = Instant::now();
    let (status, r) = s.post(
        "/v1/chat/completions",
        &chat(json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "deep", "schema": too_deep}}})),
    );
    assert_eq!(status, 400, "{r}");
    within("deep nesting", started);
    // Heavy but valid (a DFA that would blow up, nested bounded repeats, 20k choices, left
    // recursion): answered either way in bounded time.
    let many: Vec<String> = (0..20_000).map(|i| format!("v{i:06}")).collect();
    for so in [
        json!({"regex": "(a|b)*a(a|b){24}"}),
        json!({"regex": "((a|b){1,40}c){1,40}"}),
        json!({"choice": many}),
        json!({"grammar": "start: a\na: a \"x\" | \"y\"\n"}),
    ] {
        let started = Instant::now();
        let (status, r) = s.post(
            "/v1/chat/completions",
            &chat(json!({"n": 2, "max_tokens": 40, "structured_outputs": so})),
        );
        assert!(status == 200 || status == 400, "{so}: {r}");
        within(
            &so.to_string().chars().take(40).collect::<String>(),
            started,
        );
    }
    let (status, r) = s.post(
        "/v1/chat/completions",
        &chat(json!({"n": 1, "max_tokens": 4})),
    );
    assert_eq!(status, 200, "still serving: {r}");
}

/// The schema corpus (tests/clients/schema_corpus.json, validated with Python's `jsonschema`),
/// the OpenAI SDK's `chat.completions.parse` and LangChain's `with_structured_output`:
/// tests/clients/structured_suite.py against the `ember` binary.
#[test]
fn schema_corpus_sdk_parse_and_langchain_structured_output() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".client-venv/bin/python");
    if !http::client_tool(
        &python,
        "Python with openai, langchain-openai and jsonschema",
    ) {
        return;
    }
    http::run_suite(
        std::process::Command::new(&python)
            .arg(root.join("tests/clients/structured_suite.py"))
            .arg("--ember")
            .arg(env!("CARGO_BIN_EXE_ember")),
        "the structured-output suite",
    );
}
