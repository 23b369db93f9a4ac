//! The HTTP API over a real socket on the tiny fixtures: every route, streaming and not,
//! greedy output equal to transformers', tools and reasoning (through the forced-output test
//! hook), each error status, auth, disconnects, metrics and graceful shutdown.

mod http;

use std::io::{Read, Write};
use std::time::Duration;

use ember::api::ApiConfig;
use ember::engine::{EngineConfig, EngineHandle, ValidRequest};
use ember::model::LoadedModel;
use http::{
    api_config, engine_config, eventually, fixture_dir, get, get_json, open_stream, post, post_raw,
    stream, TestServer, MODEL,
};
use serde::Deserialize;
use serde_json::{json, Value as Json};

#[derive(Deserialize)]
struct Golden {
    prompt_ids: Vec<Vec<u32>>,
    greedy: Vec<Vec<u32>>,
}

fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(fixture_dir(name).join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The qwen3 fixture loaded directly (f32, CPU), as the reference the server is compared to.
fn qwen3() -> LoadedModel {
    let dir = fixture_dir("qwen3");
    LoadedModel::load(
        dir.to_str().unwrap(),
        None,
        ember::device::DeviceSpec::Cpu,
        None,
    )
    .unwrap()
}

fn server() -> TestServer {
    TestServer::start("qwen3", api_config(), engine_config())
}

fn chat(content: &str) -> Json {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0})
}

/// `"token_id:N"` strings back to ids.
fn ids_of(tokens: &Json) -> Vec<u32> {
    tokens
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t.as_str()
                .and_then(|s| s.strip_prefix("token_id:"))
                .and_then(|s| s.parse().ok())
                .unwrap()
        })
        .collect()
}

#[test]
fn small_routes() {
    let s = server();
    assert_eq!(get(&s.url("/health")).0, 200);
    let (status, models) = get_json(&s.url("/v1/models"), None);
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["max_model_len"], 512);
    let (status, card) = get_json(&s.url("/v1/models/tiny"), None);
    assert_eq!((status, card["id"].as_str()), (200, Some(MODEL)));
    let (status, err) = get_json(&s.url("/v1/models/other/model"), None);
    assert_eq!(status, 404);
    assert_eq!(err["error"]["code"], "model_not_found");
    let (status, version) = get_json(&s.url("/version"), None);
    assert_eq!(status, 200);
    assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));
    // tokenize / detokenize round trip, with the fixture's own tokenizer as the reference.
    let loaded = qwen3();
    let text = "The capital of France is";
    let (status, tok) = s.post("/tokenize", &json!({"prompt": text}));
    assert_eq!(status, 200);
    let expected = loaded.encode(text).unwrap();
    let tokens: Vec<u32> = serde_json::from_value(tok["tokens"].clone()).unwrap();
    assert_eq!(tokens, expected);
    assert_eq!(tok["count"], expected.len());
    let (status, detok) = s.post("/detokenize", &json!({"tokens": tokens}));
    assert_eq!((status, detok["prompt"].as_str()), (200, Some(text)));
    let (status, tok) = s.post(
        "/tokenize",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 200);
    assert!(tok["count"].as_u64().unwrap() > 3);
    let (status, err) = s.post("/detokenize", &json!({"tokens": [100000]}));
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (400, Some("tokens"))
    );
    // Unknown routes and methods answer in the envelope.
    let (status, err) = get_json(&s.url("/v2/nothing"), None);
    assert_eq!(status, 404);
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v2/nothing"));
    let (status, err) = get_json(&s.url("/v1/chat/completions"), None);
    assert_eq!(status, 405);
    assert!(err["error"]["message"].is_string());
}

#[test]
fn greedy_through_http_equals_the_engine_and_transformers() {
    let s = server();
    let golden = golden("qwen3");
    let loaded = qwen3();
    let tokenizer = loaded.tokenizer.clone();
    let (engine, _thread) = EngineHandle::spawn(loaded, &engine_config()).unwrap();
    for (prompt, expected) in golden.prompt_ids.iter().zip(&golden.greedy).take(6) {
        let body = json!({
            "model": MODEL, "prompt": prompt, "max_tokens": expected.len(), "temperature": 0,
            "ignore_eos": true, "logprobs": 0, "return_tokens_as_token_ids": true,
        });
        let (status, r) = s.post("/v1/completions", &body);
        assert_eq!(status, 200, "{r}");
        let choice = &r["choices"][0];
        assert_eq!(
            &ids_of(&choice["logprobs"]["tokens"]),
            expected,
            "vs transformers"
        );
        let text = tokenizer.decode(expected, true).unwrap();
        assert_eq!(choice["text"].as_str(), Some(text.as_str()));
        assert_eq!(choice["finish_reason"], "length");
        assert_eq!(r["usage"]["prompt_tokens"], prompt.len());
        assert_eq!(r["usage"]["completion_tokens"], expected.len());
        // The engine without HTTP.
        let mut request = ValidRequest::greedy(prompt.clone(), expected.len());
        request.ignore_eos = true;
        let mut rx = engine.submit(request).unwrap();
        let mut tokens = Vec::new();
        while let Some(event) = rx.blocking_recv() {
            if let ember::engine::EngineEvent::Token { token, .. } = event {
                tokens.push(token);
            }
        }
        assert_eq!(&tokens, expected, "engine vs transformers");
        // Streamed, the same text arrives in pieces.
        let mut body = body;
        body["stream"] = json!(true);
        let chunks = stream(&s.url("/v1/completions"), &body);
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(streamed, text);
    }
}

#[test]
fn echo_logprobs_match_transformers() {
    let s = server();
    let golden = golden("qwen3");
    let logits = candle_core::safetensors::load(
        fixture_dir("qwen3").join("golden.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for (i, prompt) in golden.prompt_ids.iter().enumerate().take(4) {
        let body = json!({
            "model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0,
            "echo": true, "logprobs": 2, "return_tokens_as_token_ids": true,
        });
        let (status, r) = s.post("/v1/completions", &body);
        assert_eq!(status, 200, "{r}");
        let lp = &r["choices"][0]["logprobs"];
        let tokens = ids_of(&lp["tokens"]);
        assert_eq!(tokens.len(), prompt.len() + 1);
        assert_eq!(&tokens[..prompt.len()], prompt.as_slice());
        assert!(
            lp["token_logprobs"][0].is_null(),
            "nothing predicts the first token"
        );
        assert!(lp["top_logprobs"][0].is_null());
        let rows = logits[&format!("logits.{i}")].to_vec2::<f32>().unwrap();
        for p in 1..prompt.len() {
            let reference = ember::engine::sampler::log_softmax(&rows[p - 1]);
            let got = lp["token_logprobs"][p].as_f64().unwrap() as f32;
            let want = reference[prompt[p] as usize];
            assert!(
                (got - want).abs() < 1e-4,
                "prompt {i} pos {p}: {got} vs {want}"
            );
            let top = lp["top_logprobs"][p].as_object().unwrap();
            assert!(top.contains_key(&format!("token_id:{}", prompt[p])));
            assert!(top.len() >= 2 && top.len() <= 3);
        }
        let offsets: Vec<u64> = serde_json::from_value(lp["text_offset"].clone()).unwrap();
        assert_eq!(offsets[0], 0);
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    }
}

#[test]
fn completions_prompt_shapes_and_n() {
    let s = server();
    let (status, r) = s.post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": ["Paris", "The capital"], "max_tokens": 3, "n": 2, "temperature": 0.8, "seed": 5}),
    );
    assert_eq!(status, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    assert_eq!(r["usage"]["completion_tokens"], 12);
    // Token-id lists, and the default max_tokens of 16.
    let (status, r) = s.post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": [[278, 350], [289]], "ignore_eos": true, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 32);
    // Echo without logprobs: the prompt text starts the completion.
    let (_, r) = s.post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 2, "echo": true}),
    );
    assert!(r["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("The capital of France is"));
}

#[test]
fn chat_streamed_equals_whole_and_chunks_are_shaped_like_openai() {
    let s = server();
    let mut body = chat("Hello, who are you?");
    body["max_tokens"] = json!(12);
    let (status, whole) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    let message = &whole["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    let content = message["content"].as_str().unwrap().to_string();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = stream(&s.url("/v1/chat/completions"), &body);
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let chunks = &chunks[..chunks.len() - 1];
    // Role first; no chunk with empty choices before the usage chunk at the end.
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    let (usage_chunk, choice_chunks) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    // (The second request's prompt is partly served from the prefix cache.)
    for key in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage_chunk["usage"][key], whole["usage"][key]);
    }
    assert!(choice_chunks
        .iter()
        .all(|c| c["choices"].as_array().unwrap().len() == 1));
    let streamed: String = choice_chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, content);
    let last = choice_chunks.last().unwrap();
    assert_eq!(
        last["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    assert!(choice_chunks[..choice_chunks.len() - 1]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
    // As OpenAI sends it with include_usage: "usage": null on every chunk but the last.
    assert!(choice_chunks
        .iter()
        .all(|c| c.as_object().unwrap().get("usage") == Some(&Json::Null)));
    // Without include_usage there is no usage chunk, and no usage field.
    body["stream_options"] = Json::Null;
    let chunks = stream(&s.url("/v1/chat/completions"), &body);
    assert!(chunks[..chunks.len() - 1].iter().all(|c| !c["choices"]
        .as_array()
        .unwrap()
        .is_empty()
        && c.get("usage").is_none()));
}

/// vLLM's `continuous_usage_stats` (guidellm's default streaming request): every chunk carries
/// the usage so far, ending at the whole answer's counts, on chat and on completions.
#[test]
fn continuous_usage_stats_count_as_the_stream_goes() {
    let s = server();
    for (route, mut body) in [
        ("/v1/chat/completions", chat("Count with me")),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "Count with me"}),
        ),
    ] {
        body["max_tokens"] = json!(9);
        body["ignore_eos"] = json!(true);
        let (status, whole) = s.post(route, &body);
        assert_eq!(status, 200, "{whole}");
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true, "continuous_usage_stats": true});
        let chunks = stream(&s.url(route), &body);
        let (usage_chunk, choice_chunks) = chunks[..chunks.len() - 1].split_last().unwrap();
        assert_eq!(usage_chunk["usage"]["completion_tokens"], 9);
        let mut last = 0;
        for c in choice_chunks {
            let u = &c["usage"];
            assert_eq!(
                u["prompt_tokens"], whole["usage"]["prompt_tokens"],
                "{route}: {c}"
            );
            let done = u["completion_tokens"].as_u64().unwrap();
            assert!(done >= last, "{route}: counts only grow");
            assert_eq!(
                u["total_tokens"],
                u["prompt_tokens"].as_u64().unwrap() + done
            );
            last = done;
        }
        assert_eq!(last, 9, "{route}: the last chunk counts every token");
        // Without include_usage the flag alone adds nothing (as in vLLM).
        body["stream_options"] = json!({"continuous_usage_stats": true});
        let chunks = stream(&s.url(route), &body);
        assert!(chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c.get("usage").is_none()));
    }
}

#[test]
fn chat_parameters_n_seed_logprobs_and_content_parts() {
    let s = server();
    let body = json!({
        "model": MODEL, "max_tokens": 6, "n": 2, "temperature": 1.0, "seed": 1234,
        "top_p": 0.9, "top_k": 50, "min_p": 0.01, "presence_penalty": 0.5, "frequency_penalty": 0.5,
        "repetition_penalty": 1.1, "logit_bias": {"42": 1.0}, "user": "u1",
        "logprobs": true, "top_logprobs": 3, "max_completion_tokens": 5,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        ],
    });
    let (status, a) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{a}");
    let (_, b) = s.post("/v1/chat/completions", &body);
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    for i in 0..2 {
        assert_eq!(
            a["choices"][i]["message"], b["choices"][i]["message"],
            "seeded: reproducible"
        );
        let lps = a["choices"][i]["logprobs"]["content"].as_array().unwrap();
        assert_eq!(lps.len(), 5, "max_completion_tokens wins over max_tokens");
        for lp in lps {
            assert_eq!(lp["top_logprobs"].as_array().unwrap().len(), 3);
            assert!(lp["logprob"].as_f64().unwrap() <= 0.0);
            assert!(lp["bytes"].is_array());
        }
    }
    assert_eq!(a["usage"]["completion_tokens"], 10);
}

const FORCED: &str = "<think>Need the weather.</think>\n\nLet me check.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";

fn tools() -> Json {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
}

fn forced_server(text: &str, api: ApiConfig) -> TestServer {
    TestServer::start(
        "qwen3",
        api,
        EngineConfig {
            debug_forced_output: Some(text.into()),
            ..engine_config()
        },
    )
}

#[test]
fn tool_calls_and_reasoning() {
    let s = forced_server(FORCED, api_config());
    let mut body = chat("Weather in Paris?");
    body["max_tokens"] = json!(100);
    body["tools"] = tools();
    let (status, r) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{r}");
    let choice = &r["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let m = &choice["message"];
    assert_eq!(m["reasoning_content"], "Need the weather.");
    assert_eq!(m["content"], "Let me check.");
    let call = &m["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Json = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));

    // Streamed: reasoning deltas, content deltas, and tool-call deltas with index on each.
    body["stream"] = json!(true);
    let chunks = stream(&s.url("/v1/chat/completions"), &body);
    let deltas: Vec<&Json> = chunks
        .iter()
        .filter(|c| c.is_object())
        .map(|c| &c["choices"][0]["delta"])
        .collect();
    let reasoning: String = deltas
        .iter()
        .filter_map(|d| d["reasoning_content"].as_str())
        .collect();
    let content: String = deltas
        .iter()
        .filter_map(|d| d["content"].as_str())
        .collect();
    assert_eq!(reasoning, "Need the weather.");
    assert_eq!(content, "Let me check.");
    let calls: Vec<&Json> = deltas
        .iter()
        .filter_map(|d| d["tool_calls"].as_array())
        .flatten()
        .collect();
    assert!(!calls.is_empty());
    assert!(calls.iter().all(|c| c["index"] == 0));
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert!(calls[0]["id"].is_string() && calls[0]["type"] == "function");
    let args: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Json>(&args).unwrap(),
        json!({"city": "Paris"})
    );
    let last = chunks.iter().rev().find(|c| c.is_object()).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");

    // tool_choice none: the call stays text.
    body["stream"] = json!(false);
    body["tool_choice"] = json!("none");
    let (_, r) = s.post("/v1/chat/completions", &body);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert!(r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("<tool_call>"));

    // enable_thinking false reaches the template (an empty think block in the prompt).
    let mut plain = chat("Weather in Paris?");
    let (_, on) = s.post("/v1/chat/completions", &plain);
    plain["chat_template_kwargs"] = json!({"enable_thinking": false});
    let (status, off) = s.post("/v1/chat/completions", &plain);
    assert_eq!(status, 200, "{off}");
    let tokens = |r: &Json| r["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        tokens(&off) > tokens(&on),
        "the template added <think></think>"
    );
}

#[test]
fn reasoning_when_the_template_opened_the_think_block() {
    let api = ApiConfig {
        trust_request_chat_template: true,
        ..api_config()
    };
    let s = forced_server("Plan first.</think>\n\nThe answer.", api);
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n<think>\n";
    let mut body = chat("Question?");
    body["max_tokens"] = json!(60);
    body["chat_template"] = json!(template);
    let (status, r) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{r}");
    let m = &r["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "Plan first.");
    assert_eq!(m["content"], "The answer.");
}

#[test]
fn error_statuses() {
    let s = server();
    let url = s.url("/v1/chat/completions");
    let cases = [
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -1}),
            400,
            Some("temperature"),
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
            400,
            Some("temperature"),
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "frobnicate": true}),
            400,
            Some("frobnicate"),
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            400,
            Some("response_format.json_schema.schema"),
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"}),
            400,
            Some("chat_template"),
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"tokenize": true}}),
            400,
            Some("chat_template_kwargs.tokenize"),
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            400,
            Some("tool_choice"),
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            400,
            Some("messages[0].content[0].type"),
        ),
        (
            json!({"model": MODEL, "messages": []}),
            400,
            Some("messages"),
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}),
            400,
            Some("n"),
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
            400,
            Some("top_logprobs"),
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}),
            400,
            Some("stream_options"),
        ),
        (
            json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}),
            404,
            Some("model"),
        ),
    ];
    for (body, status, param) in cases {
        let (got, err) = post(&url, &body, None);
        assert_eq!(got, status, "{body} -> {err}");
        assert_eq!(err["error"]["param"].as_str(), param, "{body} -> {err}");
        assert!(err["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(err["error"]["type"].is_string());
    }
    // Context length, OpenAI's way (code and wording that LiteLLM and langchain-openai match
    // to trim a conversation): prompt + max_tokens over it, and a prompt alone over it, on both
    // routes.
    let long = "word ".repeat(3000);
    let overflows = [
        (
            url.clone(),
            json!({"model": MODEL, "messages": [{"role": "user", "content": "word ".repeat(100)}], "max_tokens": 400}),
            "max_tokens",
        ),
        (url.clone(), cases_context(), "messages"),
        (
            url.clone(),
            json!({"model": MODEL, "messages": [{"role": "user", "content": long}]}),
            "messages",
        ),
        (
            s.url("/v1/completions"),
            json!({"model": MODEL, "prompt": long}),
            "prompt",
        ),
    ];
    for (route, body, param) in overflows {
        let (status, err) = post(&route, &body, None);
        assert_eq!(status, 400, "{err}");
        assert_eq!(err["error"]["code"], "context_length_exceeded", "{err}");
        assert_eq!(err["error"]["param"], param, "{err}");
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("This model's maximum context length is "),
            "{err}"
        );
    }
    // Completions: logprobs above 5, suffix, an empty prompt, a token outside the vocabulary.
    for (body, param) in [
        (
            json!({"model": MODEL, "prompt": "x", "logprobs": 6}),
            "logprobs",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "suffix": "y"}),
            "suffix",
        ),
        (json!({"model": MODEL, "prompt": ""}), "prompt"),
        (json!({"model": MODEL, "prompt": [99999]}), "prompt"),
        (json!({"model": MODEL, "prompt": [1.5]}), "prompt"),
    ] {
        let (got, err) = s.post("/v1/completions", &body);
        assert_eq!(
            (got, err["error"]["param"].as_str()),
            (400, Some(param)),
            "{body}"
        );
    }
    // Not JSON at all.
    let (status, _, err) = post_raw(&url, b"{not json");
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().contains("JSON"));
}

fn cases_context() -> Json {
    let long = "word ".repeat(400);
    json!({"model": MODEL, "messages": [{"role": "user", "content": long}], "max_tokens": 400})
}

#[test]
fn oversized_bodies_get_413_and_a_full_queue_503() {
    let api = ApiConfig {
        max_request_body_bytes: 4096,
        ..api_config()
    };
    let s = TestServer::start("qwen3", api, engine_config());
    let big = json!({"model": MODEL, "prompt": "x".repeat(10_000)}).to_string();
    let (status, _, err) = post_raw(&s.url("/v1/completions"), big.as_bytes());
    assert_eq!(status, 413, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("4096"));
    drop(s);
    let full = ApiConfig {
        max_admitted_sequences: 0,
        ..api_config()
    };
    let s = TestServer::start("qwen3", full, engine_config());
    let body = chat("x").to_string();
    let (status, retry, err) = post_raw(&s.url("/v1/chat/completions"), body.as_bytes());
    assert_eq!(status, 503, "{err}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(err["error"]["code"], "server_overloaded");
}

#[test]
fn api_keys() {
    let api = ApiConfig {
        api_keys: vec!["k-1".into(), "k-2".into()],
        ..api_config()
    };
    let s = TestServer::start("qwen3", api, engine_config());
    let url = s.url("/v1/chat/completions");
    let (status, err) = post(&url, &chat("x"), None);
    assert_eq!(status, 401);
    assert_eq!(err["error"]["code"], "invalid_api_key");
    assert_eq!(post(&url, &chat("x"), Some("wrong")).0, 401);
    assert_eq!(post(&url, &chat("x"), Some("k-2")).0, 200);
    assert_eq!(get_json(&s.url("/v1/models"), None).0, 401);
    assert_eq!(get_json(&s.url("/v1/models"), Some("k-1")).0, 200);
    // Probes and scrapes need no key.
    assert_eq!(get(&s.url("/health")).0, 200);
    assert_eq!(get(&s.url("/metrics")).0, 200);
}

#[test]
fn cors_when_configured() {
    let api = ApiConfig {
        cors_allowed_origins: vec!["https://app.example".into()],
        ..api_config()
    };
    let s = TestServer::start("qwen3", api, engine_config());
    let r = ureq::request("OPTIONS", &s.url("/v1/chat/completions"))
        .set("Origin", "https://app.example")
        .set("Access-Control-Request-Method", "POST")
        .call()
        .unwrap();
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
}

#[test]
fn disconnects_abort_and_free_blocks() {
    let s = server();
    let abort = "ember_request_success_total{finished_reason=\"abort\"}";
    let long = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 480, "ignore_eos": true, "n": 8, "stream": true});
    // Streaming: read the first chunk, then hang up.
    let reader = open_stream(&s.url("/v1/completions"), &long);
    // /metrics shows the engine as of its last loop turn: the first chunk may come before it.
    assert!(eventually(10, || s.metric("ember_num_requests_running") > 0.0));
    drop(reader);
    assert!(
        eventually(10, || s.metric(abort) == 8.0),
        "the 8 completions were aborted"
    );
    assert!(eventually(10, || s.metric("ember_kv_cache_usage_ratio") == 0.0));
    assert_eq!(
        s.metric("ember_request_success_total{finished_reason=\"length\"}"),
        0.0
    );
    // Not streaming: the client closes its socket while the request runs.
    let mut body = long.clone();
    body["stream"] = json!(false);
    let text = body.to_string();
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut socket = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        socket,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )
    .unwrap();
    assert!(eventually(10, || s.metric("ember_num_requests_running") > 0.0));
    drop(socket);
    assert!(eventually(10, || s.metric(abort) == 16.0));
    assert!(eventually(10, || s.metric("ember_kv_cache_usage_ratio") == 0.0));
    // Others are not disturbed: a request afterwards completes.
    assert_eq!(s.post("/v1/chat/completions", &chat("x")).0, 200);
}

#[test]
fn metrics_count_tokens_requests_and_latencies() {
    let s = server();
    let (_, r) = s.post("/v1/chat/completions", &chat("Hello"));
    let prompt = r["usage"]["prompt_tokens"].as_f64().unwrap();
    let generated = r["usage"]["completion_tokens"].as_f64().unwrap();
    let reason = r["choices"][0]["finish_reason"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, text) = get(&s.url("/metrics"));
    for name in [
        "ember_num_requests_running",
        "ember_num_requests_waiting",
        "ember_kv_cache_usage_ratio",
        "ember_prefix_cache_queries_total",
        "ember_prefix_cache_hits_total",
        "ember_num_preemptions_total",
        "ember_time_to_first_token_seconds_bucket",
        "ember_inter_token_latency_seconds_bucket",
        "ember_e2e_request_latency_seconds_bucket",
        "ember_request_queue_time_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    assert_eq!(s.metric("ember_prompt_tokens_total"), prompt);
    assert_eq!(s.metric("ember_generation_tokens_total"), generated);
    assert_eq!(
        s.metric(&format!(
            "ember_request_success_total{{finished_reason=\"{reason}\"}}"
        )),
        1.0
    );
    assert_eq!(s.metric("ember_time_to_first_token_seconds_count"), 1.0);
    assert_eq!(
        s.metric("ember_inter_token_latency_seconds_count"),
        generated - 1.0
    );
    assert_eq!(s.metric("ember_e2e_request_latency_seconds_count"), 1.0);
    assert_eq!(s.metric("ember_request_queue_time_seconds_count"), 1.0);
    // A scrape right after a response always counts it (the engine publishes its counters
    // before it tells the client the request ended).
    let (mut prompt, mut generated) = (prompt, generated);
    for i in 0..20 {
        let (_, r) = s.post("/v1/chat/completions", &chat(&format!("Hello {i}")));
        prompt += r["usage"]["prompt_tokens"].as_f64().unwrap();
        generated += r["usage"]["completion_tokens"].as_f64().unwrap();
        assert_eq!(s.metric("ember_prompt_tokens_total"), prompt);
        assert_eq!(s.metric("ember_generation_tokens_total"), generated);
    }
}

#[test]
fn graceful_shutdown_finishes_in_flight_requests() {
    let mut s = TestServer::start_with(
        "qwen3",
        api_config(),
        engine_config(),
        Duration::from_secs(30),
    );
    let long = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 480, "ignore_eos": true, "n": 8, "stream": true});
    let mut reader = open_stream(&s.url("/v1/completions"), &long);
    let thread = s.shutdown();
    // Draining: health turns 503 and new requests are refused.
    assert!(eventually(5, || get(&s.url("/health")).0 == 503));
    assert_eq!(s.post("/v1/chat/completions", &chat("x")).0, 503);
    // The in-flight stream runs to its end.
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("\"finish_reason\":\"length\""));
    assert!(rest.trim_end().ends_with("data: [DONE]"));
    assert!(thread.join().unwrap().is_ok(), "exits cleanly");
}

#[test]
fn a_queued_request_that_disconnects_is_aborted() {
    // One sequence at a time: the second request waits behind the first's four completions.
    let s = TestServer::start(
        "qwen3",
        api_config(),
        EngineConfig {
            max_num_seqs: 1,
            ..engine_config()
        },
    );
    let running = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 480, "ignore_eos": true, "n": 4, "stream": true});
    let reader = open_stream(&s.url("/v1/completions"), &running);
    let queued = json!({"model": MODEL, "prompt": "Paris", "max_tokens": 8}).to_string();
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut socket = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        socket,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{queued}",
        queued.len()
    )
    .unwrap();
    // Waiting: the three other completions of the first request and this one.
    assert!(eventually(10, || s.metric("ember_num_requests_waiting") >= 4.0));
    drop(socket);
    let abort = "ember_request_success_total{finished_reason=\"abort\"}";
    assert!(eventually(10, || s.metric(abort) == 1.0));
    assert!(
        s.metric("ember_num_requests_waiting") >= 1.0,
        "the first request still runs"
    );
    drop(reader);
    assert!(eventually(10, || s.metric(abort) == 5.0));
    assert!(eventually(10, || s.metric("ember_kv_cache_usage_ratio") == 0.0));
}

#[test]
fn health_is_503_while_the_model_loads() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = ember::api::AppState::new(api_config());
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let load = move || {
                let _ = gate.recv();
                let loaded = LoadedModel::load(
                    fixture_dir("qwen3").to_str().unwrap(),
                    None,
                    ember::device::DeviceSpec::Cpu,
                    None,
                )?;
                ember::server::start_engine(loaded, &engine_config())
            };
            let shutdown = async move {
                let _ = stopped.await;
            };
            ember::server::serve(listener, state, load, shutdown, Duration::from_secs(5)).await
        })
    });
    assert!(eventually(10, || get(&format!("{base}/health")).0 == 503));
    let (status, err) = post(&format!("{base}/v1/chat/completions"), &chat("x"), None);
    assert_eq!(status, 503);
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("loading"));
    release.send(()).unwrap();
    assert!(eventually(30, || get(&format!("{base}/health")).0 == 200));
    assert_eq!(
        post(&format!("{base}/v1/chat/completions"), &chat("x"), None).0,
        200
    );
    stop.send(()).unwrap();
    assert!(thread.join().unwrap().is_ok());
}

/// The endpoint-picker flags docs/OPERATIONS.md gives for an inference gateway name metrics
/// that `/metrics` serves as gauges: the queue, the running batch, the KV-cache fraction (0 to
/// 1) and the cache-config info with vLLM's labels.
#[test]
fn gateway_metric_mapping_in_the_docs_is_served() {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/OPERATIONS.md"),
    )
    .unwrap();
    let names: Vec<(String, String)> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("--")?.split_once('='))
        .filter(|(flag, name)| flag.ends_with("-metric") && !name.is_empty())
        .map(|(flag, name)| (flag.to_string(), name.trim().to_string()))
        .collect();
    let flags: Vec<&str> = names.iter().map(|(f, _)| f.as_str()).collect();
    for flag in [
        "total-queued-requests-metric",
        "total-running-requests-metric",
        "kv-cache-usage-percentage-metric",
        "cache-info-metric",
    ] {
        assert!(flags.contains(&flag), "docs/OPERATIONS.md maps --{flag}");
    }
    let s = server();
    let (status, _) = s.post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "Hello", "max_tokens": 2}),
    );
    assert_eq!(status, 200);
    let (_, text) = get(&s.url("/metrics"));
    for (flag, name) in &names {
        assert!(
            text.lines().any(|l| l == format!("# TYPE {name} gauge")),
            "--{flag}={name}: no gauge {name} in:\n{text}"
        );
        let sample = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
            .unwrap_or_else(|| panic!("--{flag}={name}: no sample in:\n{text}"));
        let value: f64 = sample.rsplit(' ').next().unwrap().parse().unwrap();
        match flag.as_str() {
            "kv-cache-usage-percentage-metric" => assert!((0.0..=1.0).contains(&value)),
            "cache-info-metric" => {
                assert_eq!(value, 1.0);
                let limits = s.state.engine_limits().expect("a loaded model");
                assert!(sample.contains(&format!("block_size=\"{}\"", limits.block_size)));
                assert!(sample.contains(&format!("num_gpu_blocks=\"{}\"", limits.num_blocks)));
            }
            _ => assert!(value >= 0.0),
        }
    }
}

/// What mainstream tools send by default is accepted (not refused as unknown or invalid):
/// guidellm (streaming, `stop: null`, `ignore_eos`, continuous usage), aiperf (chat with
/// `max_completion_tokens`, `stream: false` spelled out), Open WebUI (its last message as a text
/// part marked `cache_control: ephemeral`, usage asked for), `vllm bench serve`
/// (completions with `repetition_penalty`, `logprobs: null`; chat with
/// `max_completion_tokens`), lm-evaluation-harness `local-completions` (loglikelihood: `echo`,
/// `logprobs: 1`, `max_tokens: 1`, `seed`) and `local-chat-completions`.
#[test]
fn bodies_mainstream_tools_send_are_accepted() {
    let s = server();
    let msgs = json!([{"role": "user", "content": "Hello"}]);
    let cases = [
        (
            "guidellm chat",
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": msgs, "max_tokens": 4, "stop": null, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true, "continuous_usage_stats": true}}),
        ),
        (
            "guidellm completions",
            "/v1/completions",
            json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stop": null, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true, "continuous_usage_stats": true}}),
        ),
        (
            "vllm bench serve completions",
            "/v1/completions",
            json!({"model": MODEL, "prompt": "Hello", "temperature": 0.0, "repetition_penalty": 1.0, "max_tokens": 4, "logprobs": null, "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true}),
        ),
        (
            "vllm bench serve chat",
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": msgs, "temperature": 0.0, "max_completion_tokens": 4, "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true}),
        ),
        (
            "lm-eval loglikelihood",
            "/v1/completions",
            json!({"model": MODEL, "prompt": ["Hello world", "Goodbye"], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true}),
        ),
        (
            "lm-eval generate",
            "/v1/completions",
            json!({"model": MODEL, "prompt": ["Hello"], "temperature": 0, "max_tokens": 4, "stop": ["\n\n"], "seed": 1234}),
        ),
        (
            "lm-eval chat",
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": msgs, "temperature": 0, "max_tokens": 4, "stop": ["<|im_end|>"], "seed": 1234}),
        ),
    ];
    for (tool, route, body) in cases {
        if body["stream"] == json!(true) {
            let chunks = stream(&s.url(route), &body);
            assert_eq!(chunks.last().unwrap(), "[DONE]", "{tool}");
            assert!(chunks.len() > 2, "{tool}: {chunks:?}");
        } else {
            let (status, out) = s.post(route, &body);
            assert_eq!(status, 200, "{tool}: {out}");
        }
    }
}
