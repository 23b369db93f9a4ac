//! `ember generate` on the tiny fixtures: greedy output equals transformers' golden
//! continuations, through the library and through the binary's stdout.

use std::path::PathBuf;
use std::process::Command;

use ember::device::DeviceSpec;
use ember::engine::sampler::SamplingParams;
use ember::model::LoadedModel;
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    prompts: Vec<String>,
    prompt_ids: Vec<Vec<u32>>,
    greedy: Vec<Vec<u32>>,
}

fn fixture(name: &str) -> (PathBuf, Golden) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name);
    let golden =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    (dir, golden)
}

#[test]
fn greedy_generation_matches_transformers_for_every_architecture() {
    for name in [
        "qwen2",
        "qwen2-untied",
        "qwen3",
        "qwen3-yarn",
        "qwen3-moe",
        "qwen2-moe",
    ] {
        let (dir, golden) = fixture(name);
        let loaded = LoadedModel::load(dir.to_str().unwrap(), None, DeviceSpec::Cpu, None).unwrap();
        for (i, prompt) in golden.prompts.iter().enumerate() {
            let ids = loaded.encode(prompt).unwrap();
            assert_eq!(
                ids, golden.prompt_ids[i],
                "{name}: tokenization of prompt {i}"
            );
            let stats = loaded
                .generate(&ids, &SamplingParams::greedy(), 32, true, |_| {})
                .unwrap();
            assert_eq!(
                stats.tokens, golden.greedy[i],
                "{name}: greedy continuation of prompt {i}"
            );
        }
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let (dir, golden) = fixture("qwen3");
    let loaded = LoadedModel::load(dir.to_str().unwrap(), None, DeviceSpec::Cpu, None).unwrap();
    let params = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 50,
        seed: Some(42),
        ..Default::default()
    };
    let run = || {
        loaded
            .generate(&golden.prompt_ids[0], &params, 24, true, |_| {})
            .unwrap()
            .tokens
    };
    let first = run();
    assert_eq!(first, run());
    assert_ne!(
        first,
        golden.greedy[0][..24].to_vec(),
        "sampling at temperature 0.9 should leave the greedy path"
    );
}

#[test]
fn generate_cli_prints_only_the_generated_text() {
    let (dir, golden) = fixture("qwen2");
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            &golden.prompts[1],
        ])
        .args(["--temperature", "0", "--max-tokens", "32", "--ignore-eos"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let expected = tokenizer.decode(&golden.greedy[1], true).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{expected}\n")
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("prompt:") && stderr.contains("decode: 32 tokens"),
        "{stderr}"
    );
}

#[test]
fn generate_cli_reports_bad_input_without_panicking() {
    let (dir, _) = fixture("qwen2");
    for bad in [
        vec!["--device", "tpu"],
        vec!["--dtype", "int3"],
        vec!["--temperature=-1"],
        vec!["--max-tokens", "100000"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ember"))
            .args([
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--prompt",
                "hi",
            ])
            .args(&bad)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && !stderr.contains("panicked"),
            "{bad:?}: {stderr}"
        );
    }
}
