//! Property-based fuzzing (proptest) of what untrusted input reaches: request parsing and
//! validation over HTTP, chat-template rendering, the reasoning and tool-call stream parsers,
//! and the detokenizer with its stop-string matcher.
//!
//! `cargo test --release --test fuzz` runs a short batch of each (CI); `scripts/fuzz.sh` runs
//! each target for a bounded time (`FUZZ_SECONDS`). Failing cases are kept, as proptest seeds,
//! in `tests/fuzz-corpus/<target>.txt` and replayed first on every run.

mod http;

use std::time::{Duration, Instant};

use ember::engine::detokenizer::{Detokenizer, TokenBytes};
use ember::parsers::{
    ReasoningParser, ToolCallParser, THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START,
};
use ember::template::{ChatTemplate, RenderOptions};
use http::{api_config, engine_config, fixture_dir, get, TestServer, MODEL};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

/// Runs `test` on cases of `strategy`: one batch, or batches until `FUZZ_SECONDS` have passed.
fn fuzz<S: Strategy>(
    target: &'static str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let seconds: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let cases: u32 = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48);
    let config = Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(Box::leak(
            format!("tests/fuzz-corpus/{target}.txt").into_boxed_str(),
        )))),
        ..Config::default()
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut total = 0u64;
    loop {
        let mut runner = TestRunner::new(config.clone());
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("{target}: {e}");
        }
        total += u64::from(cases);
        if Instant::now() >= deadline {
            break;
        }
    }
    eprintln!("fuzz {target}: {total} cases");
}

/// Any JSON value, a few levels deep, with strings that look like what requests carry.
fn any_json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::from),
        any::<i64>().prop_map(Json::from),
        (-1e3f64..1e3).prop_map(Json::from),
        prop_oneof![
            Just(f64::MAX),
            Just(f64::MIN_POSITIVE),
            Just(-0.0),
            Just(1e300)
        ]
        .prop_map(Json::from),
        ".{0,12}".prop_map(Json::from),
        prop_oneof![
            Just("<|im_start|>"),
            Just("<|im_end|>"),
            Just("<think>"),
            Just("\u{0}"),
            Just("\u{202e}"),
            Just("{{ 7*7 }}"),
            Just("user"),
            Just("tiny"),
        ]
        .prop_map(Json::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Json::from),
            prop::collection::btree_map(".{0,6}", inner, 0..4)
                .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

const PARAMS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stop",
    "stop_token_ids",
    "seed",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "echo",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "tools",
    "tool_choice",
    "response_format",
    "chat_template",
    "chat_template_kwargs",
    "skip_special_tokens",
    "user",
    "suffix",
];

/// A request body: mostly well-formed around the fuzzed parameters, so that validation (not
/// only the first type check) is reached.
fn request_body() -> impl Strategy<Value = (bool, Json)> {
    let messages = prop_oneof![
        Just(json!([{"role": "user", "content": "Hello"}])),
        any_json(),
        prop::collection::vec(
            (
                prop_oneof![
                    Just("user"),
                    Just("system"),
                    Just("assistant"),
                    Just("tool")
                ],
                any_json()
            ),
            0..3
        )
        .prop_map(|m| Json::from(
            m.into_iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect::<Vec<_>>()
        )),
    ];
    let params = prop::collection::vec((prop::sample::select(PARAMS), any_json()), 0..5);
    (any::<bool>(), messages, params).prop_map(|(chat, messages, params)| {
        let mut body = if chat {
            json!({"model": MODEL, "messages": messages, "max_tokens": 2})
        } else {
            json!({"model": MODEL, "prompt": "Hello", "max_tokens": 2})
        };
        for (k, v) in params {
            body[k] = v;
        }
        // Bounded work per case: a valid request generates a few tokens, not a long answer.
        if body["max_tokens"].as_u64().is_some_and(|t| t > 8) {
            body["max_tokens"] = json!(8);
        }
        if body["n"].as_u64().is_some_and(|n| n > 4) {
            body["n"] = json!(4);
        }
        body.as_object_mut()
            .map(|o| o.remove("max_completion_tokens"));
        (chat, body)
    })
}

#[test]
fn request_parsing_and_validation() {
    let s = TestServer::start("qwen3", api_config(), engine_config());
    fuzz("request_parsing", request_body(), |(chat, body)| {
        let route = if chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let (status, _, answer) = http::post_raw(&s.url(route), body.to_string().as_bytes());
        prop_assert!(
            status == 200 || (400..500).contains(&status),
            "{status} for {body}: {answer}"
        );
        if status != 200 && !answer.is_null() {
            prop_assert!(answer["error"]["message"].is_string(), "{answer}");
            prop_assert!(answer["error"]["type"].is_string(), "{answer}");
        }
        prop_assert_eq!(get(&s.url("/health")).0, 200);
        Ok(())
    });
}

#[test]
fn chat_template_rendering() {
    let template =
        ChatTemplate::from_tokenizer_config(&fixture_dir("qwen3").join("tokenizer_config.json"))
            .unwrap();
    let strategy = (
        prop::collection::vec(
            (
                prop_oneof![
                    Just("user".to_string()),
                    Just("system".to_string()),
                    Just("assistant".to_string()),
                    Just("tool".to_string()),
                    ".{0,8}"
                ],
                any_json(),
                prop::option::of(any_json()),
            ),
            0..5,
        ),
        prop::option::of(any_json()),
        prop::option::of(any::<bool>()),
    );
    fuzz("chat_template", strategy, |(messages, tools, thinking)| {
        let messages: Vec<Json> = messages
            .into_iter()
            .map(|(role, content, calls)| {
                let mut m = json!({"role": role, "content": content});
                if let Some(calls) = calls {
                    m["tool_calls"] = calls;
                }
                m
            })
            .collect();
        let opts = RenderOptions {
            add_generation_prompt: true,
            tools,
            enable_thinking: thinking,
            max_bytes: Some(1 << 20),
        };
        // Any outcome but a panic; a render within its budget.
        if let Ok(text) = template.render(&Json::from(messages), &opts) {
            prop_assert!(text.len() <= 1 << 20);
        }
        Ok(())
    });
}

/// Model output as the parsers see it: text, markers and JSON bodies, cut into chunks.
fn output_text() -> impl Strategy<Value = (Vec<String>, Vec<usize>)> {
    let piece = prop_oneof![
        ".{0,6}",
        Just(THINK_START.to_string()),
        Just(THINK_END.to_string()),
        Just(TOOL_CALL_START.to_string()),
        Just(TOOL_CALL_END.to_string()),
        Just("\n".to_string()),
        Just(" ".to_string()),
        Just("<".to_string()),
        Just("</".to_string()),
        Just("{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}".to_string()),
        Just("{\"name\": \"f\", \"arguments\": {}}".to_string()),
        Just("{\"name\": \"g".to_string()),
    ];
    (
        prop::collection::vec(piece, 0..12),
        prop::collection::vec(1usize..8, 0..40),
    )
}

/// `text` cut at character boundaries into pieces of the given lengths (the rest last).
fn chunks(text: &str, cuts: &[usize]) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut at = 0;
    for &n in cuts {
        if at >= chars.len() {
            break;
        }
        let end = (at + n).min(chars.len());
        out.push(chars[at..end].iter().collect());
        at = end;
    }
    out.push(chars[at..].iter().collect());
    out
}

#[test]
fn reasoning_parser_does_not_depend_on_chunking() {
    fuzz(
        "reasoning_parser",
        (output_text(), any::<bool>()),
        |((pieces, cuts), opened)| {
            let text = pieces.concat();
            let run = |parts: &[String]| {
                let mut p = ReasoningParser::new(opened);
                let (mut reasoning, mut content) = (String::new(), String::new());
                for part in parts {
                    let d = p.push(part);
                    reasoning += &d.reasoning;
                    content += &d.content;
                }
                let d = p.finish();
                (reasoning + &d.reasoning, content + &d.content)
            };
            let whole = run(std::slice::from_ref(&text));
            prop_assert_eq!(&run(&chunks(&text, &cuts)), &whole, "{:?}", text);
            Ok(())
        },
    );
}

#[test]
fn tool_call_parser_does_not_depend_on_chunking() {
    fuzz("tool_call_parser", output_text(), |(pieces, cuts)| {
        let text = pieces.concat();
        // (content, calls by index: name and arguments)
        let run = |parts: &[String]| {
            let mut p = ToolCallParser::new();
            let mut content = String::new();
            let mut calls: Vec<(String, String)> = Vec::new();
            let mut take = |parse: ember::parsers::ToolParse| {
                content += &parse.content;
                for c in parse.calls {
                    if calls.len() <= c.index {
                        calls.resize(c.index + 1, Default::default());
                    }
                    calls[c.index].0 += c.name.as_deref().unwrap_or("");
                    calls[c.index].1 += &c.arguments;
                }
            };
            for part in parts {
                take(p.push(part));
            }
            take(p.finish());
            (content, calls)
        };
        let whole = run(std::slice::from_ref(&text));
        let chunked = run(&chunks(&text, &cuts));
        // A call announced early (its name seen while streaming) stands even if its JSON then
        // breaks, where the whole text, never announced, stays content: compare where every
        // block parsed (the whole text's content keeps no unparsed block).
        let broken = whole.0.contains(TOOL_CALL_START);
        if !broken {
            prop_assert_eq!(&chunked, &whole, "{:?}", text);
        }
        Ok(())
    });
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(fixture_dir("qwen3").join("tokenizer.json")).unwrap()
}

#[test]
fn detokenizer_and_stop_strings() {
    let tokenizer = tokenizer();
    let vocab = tokenizer.get_vocab_size(true) as u32;
    // As the engine runs it: byte-exact from the token table (a Qwen tokenizer is byte-level).
    let table = std::sync::Arc::new(TokenBytes::new(&tokenizer).expect("byte-level"));
    let strategy = (
        ".{0,40}",
        prop::collection::vec(0..vocab, 0..24),
        prop::collection::vec(".{1,4}", 0..3),
        any::<bool>(),
    );
    fuzz(
        "detokenizer",
        strategy,
        |(text, random_ids, stops, include_stop)| {
            // Text the tokenizer made: the pieces add up to its decode, cut at the first stop.
            let ids = tokenizer
                .encode(text.as_str(), false)
                .unwrap()
                .get_ids()
                .to_vec();
            let full = tokenizer.decode(&ids, true).unwrap();
            let mut d = Detokenizer::new(true, stops.clone(), include_stop).exact(table.clone());
            let mut out = String::new();
            let mut stopped = None;
            for &id in &ids {
                let delta = d.push(&tokenizer, id);
                out += &delta.text;
                if delta.stopped_by.is_some() {
                    stopped = delta.stopped_by;
                    break;
                }
            }
            if stopped.is_none() {
                let delta = d.finish(&tokenizer);
                out += &delta.text;
                stopped = delta.stopped_by;
            }
            // The text arrives token by token (what a detokenizer without stops has handed out
            // after each token, which must add up to the full decode): a stop counts once it is
            // whole in what has arrived (a short stop inside a longer one can end the text
            // first), and among those whole at the same token the earliest, then the longest,
            // wins.
            let mut plain = Detokenizer::new(true, vec![], false).exact(table.clone());
            let mut arrived = vec![String::new()];
            for &id in &ids {
                let piece = plain.push(&tokenizer, id).text;
                arrived.push(arrived[arrived.len() - 1].clone() + &piece);
            }
            let piece = plain.finish(&tokenizer).text;
            arrived.push(arrived[arrived.len() - 1].clone() + &piece);
            prop_assert_eq!(&arrived[arrived.len() - 1], &full);
            let first = arrived.iter().find_map(|seen| {
                stops
                    .iter()
                    .filter_map(|s| seen.find(s.as_str()).map(|at| (at, s)))
                    .min_by_key(|&(at, s)| (at, std::cmp::Reverse(s.len())))
            });
            match first {
                Some((at, first_stop)) => {
                    prop_assert_eq!(stopped.as_deref(), Some(first_stop.as_str()));
                    let stop = stopped.clone().unwrap_or_default();
                    let expected = if include_stop {
                        &full[..at + stop.len()]
                    } else {
                        &full[..at]
                    };
                    prop_assert_eq!(out.as_str(), expected, "{:?} {:?}", full, stops);
                }
                None => {
                    prop_assert!(stopped.is_none());
                    prop_assert_eq!(&out, &full);
                }
            }
            // Arbitrary ids (broken UTF-8, special tokens): byte-exact, the pieces are the full
            // decode; the window-decoding fallback (other tokenizers) does not panic and stays
            // bounded.
            let mut d = Detokenizer::new(false, vec![], false).exact(table.clone());
            let mut out = String::new();
            for &id in &random_ids {
                out += &d.push(&tokenizer, id).text;
            }
            out += &d.finish(&tokenizer).text;
            prop_assert_eq!(&out, &tokenizer.decode(&random_ids, false).unwrap());
            let mut d = Detokenizer::new(false, stops, include_stop);
            let mut total = 0;
            for &id in &random_ids {
                total += d.push(&tokenizer, id).text.len();
            }
            total += d.finish(&tokenizer).text.len();
            let bound = tokenizer.decode(&random_ids, false).unwrap().len() + 3 * random_ids.len();
            prop_assert!(total <= bound, "{total} > {bound}");
            Ok(())
        },
    );
}
