//! A GGUF file as the whole model: the tokenizer rebuilt from its metadata against
//! tokenizer.json and llama.cpp's own tokenization, chat over HTTP, and load errors.

mod http;

use std::path::PathBuf;

use ember::device::DeviceSpec;
use ember::model::{LoadOptions, LoadedModel};
use serde::Deserialize;
use serde_json::json;
use tokenizers::Tokenizer;

use http::{api_config, engine_config, TestServer, MODEL};

fn gguf(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

fn load(path: &std::path::Path, options: &LoadOptions) -> anyhow::Result<LoadedModel> {
    LoadedModel::load_with(path.to_str().unwrap(), None, DeviceSpec::Cpu, None, options)
}

#[derive(Deserialize)]
struct Tokenized {
    text: String,
    ids: Vec<u32>,
}

#[test]
fn the_rebuilt_tokenizer_is_tokenizer_json_s_and_llama_cpp_s() {
    let loaded = load(&gguf("qwen2-f32.gguf"), &LoadOptions::default()).unwrap();
    let original = Tokenizer::from_file(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/tokenizer.json"),
    )
    .unwrap();
    // llama.cpp's tokenization of the corpus with the same file (make_gguf_fixtures.py).
    let corpus: Vec<Tokenized> =
        serde_json::from_str(&std::fs::read_to_string(gguf("tokenizer.json")).unwrap()).unwrap();
    assert!(corpus.len() >= 8);
    for t in &corpus {
        let ours = loaded.tokenizer.encode(t.text.as_str(), false).unwrap();
        let json = original.encode(t.text.as_str(), false).unwrap();
        assert_eq!(
            ours.get_ids(),
            json.get_ids(),
            "tokenizer.json on {:?}",
            t.text
        );
        assert_eq!(
            ours.get_ids(),
            t.ids.as_slice(),
            "llama.cpp on {:?}",
            t.text
        );
        let back = loaded.tokenizer.decode(ours.get_ids(), false).unwrap();
        assert_eq!(back, t.text);
    }
    // Special and markup tokens keep their ids and kinds.
    for (text, special) in [
        ("<|im_end|>", true),
        ("<tool_call>", false),
        ("<think>", false),
    ] {
        let id = original.token_to_id(text).unwrap();
        assert_eq!(loaded.tokenizer.token_to_id(text), Some(id));
        let skipped = loaded.tokenizer.decode(&[id], true).unwrap();
        assert_eq!(skipped.is_empty(), special, "{text}");
    }
    assert!(loaded
        .eos_token_ids
        .contains(&original.token_to_id("<|im_end|>").unwrap()));
    assert!(
        loaded.template.is_some(),
        "the chat template comes from the file"
    );
}

#[test]
fn a_tokenizer_directory_overrides_the_file_s() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2");
    let options = LoadOptions {
        tokenizer: Some(dir),
        ..LoadOptions::default()
    };
    let loaded = load(&gguf("qwen2-q8_0.gguf"), &options).unwrap();
    assert!(loaded.template.is_some());
    assert_eq!(loaded.tokenizer.token_to_id("<|im_end|>"), Some(502));
}

#[test]
fn chat_over_http_on_a_gguf_file() {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello, world! How are you today?"}],
        "max_tokens": 6,
        "temperature": 0,
    });
    let gguf = TestServer::start("../gguf/qwen2-q8_0.gguf", api_config(), engine_config());
    let (status, reply) = gguf.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["choices"][0]["message"]["content"].is_string(),
        "{reply}"
    );
    assert_eq!(reply["usage"]["completion_tokens"], 6, "{reply}");
    drop(gguf);
    // The same template and tokenizer as the checkpoint it was converted from.
    let hf = TestServer::start("qwen2", api_config(), engine_config());
    let (status, hf_reply) = hf.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{hf_reply}");
    assert_eq!(
        reply["usage"]["prompt_tokens"],
        hf_reply["usage"]["prompt_tokens"]
    );
}

#[test]
fn bad_files_are_clear_errors() {
    let dir = std::env::temp_dir();
    let not_gguf = dir.join(format!("ember-not-gguf-{}.bin", std::process::id()));
    std::fs::write(&not_gguf, b"{\"hello\": 1}").unwrap();
    let err = format!(
        "{:#}",
        load(&not_gguf, &LoadOptions::default()).err().unwrap()
    );
    assert!(err.contains("not a GGUF file"), "{err}");
    let whole = std::fs::read(gguf("qwen2-q8_0.gguf")).unwrap();
    let cut = dir.join(format!("ember-cut-gguf-{}.gguf", std::process::id()));
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let err = format!("{:#}", load(&cut, &LoadOptions::default()).err().unwrap());
    assert!(err.contains("truncated"), "{err}");
    let _ = std::fs::remove_file(not_gguf);
    let _ = std::fs::remove_file(cut);
}

/// `--quantization` through the binary: the startup log says what was quantized to which type
/// (64-wide fixture rows are not whole 256-blocks: q4_K falls back to q5_0, the untied lm_head
/// to q8_0); a type Ember does not quantize to, and a GGUF file, are clear errors.
#[test]
fn quantization_at_load_through_the_binary() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2-untied");
    let run = |model: &str, ty: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
            .args(["generate", "--model", model, "--quantization", ty])
            .args([
                "--prompt",
                "Hello",
                "--max-tokens",
                "4",
                "--temperature",
                "0",
            ])
            .env("RUST_LOG", "ember=info")
            .output()
            .unwrap()
    };
    let out = run(dir.to_str().unwrap(), "q4_k");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("quantized at load to q4_K:"), "{log}");
    assert!(log.contains("matrices to q5_0"), "{log}");
    assert!(log.contains("matrices to q8_0"), "{log}");
    assert!(log.contains("lm_head.weight"), "{log}");
    let out = run(dir.to_str().unwrap(), "q4_1");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown quantization"));
    let out = run(gguf("qwen2-q8_0.gguf").to_str().unwrap(), "q8_0");
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("GGUF file"), "{log}");
}
