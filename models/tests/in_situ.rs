//! In-situ quantization (`--quantization`) against llama.cpp's quantizer: the fixture GGUFs of
//! tests/fixtures/gguf were quantized by llama.cpp (`llama_model_quantize`, make_gguf_fixtures.py)
//! from f32 files of the same weights, so Ember quantizing those f32 weights must give the very
//! same bytes, and a checkpoint quantized at load must then match llama.cpp's logits on the
//! quantized file.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ember_kernels::{GgmlType, QuantWeight};
use ember_models::gguf::{GgufFile, TensorView};
use ember_models::{
    load_model_quantized, resolve, Batch, ContiguousKvCache, LogitsRows, QuantizedMatrix,
};

mod common;
use common::{position_diffs, EXACT, FLIP};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn open(name: &str) -> GgufFile {
    GgufFile::open(&root().join("gguf").join(name)).unwrap()
}

/// Ember's quantization of `source` (an f32 tensor) to the type of `theirs` (llama.cpp's of the
/// same values): asserts the bytes are equal, block by block.
fn assert_same_blocks(what: &str, source: &TensorView, theirs: &TensorView) {
    assert_eq!(source.ty, GgmlType::F32, "{what}: the source is f32");
    let values: Vec<f32> = source
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let k = theirs.dims[0];
    let ours = QuantWeight::quantize(theirs.ty, &values, values.len() / k, k).unwrap();
    let block = theirs.ty.block_bytes();
    let ours = ours.gguf_bytes();
    let differing: Vec<usize> = ours
        .chunks(block)
        .zip(theirs.data.chunks(block))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(ours.len(), theirs.data.len(), "{what}");
    assert!(
        differing.is_empty(),
        "{what} ({}): blocks {differing:?} of {} differ from llama.cpp's",
        theirs.ty,
        theirs.data.len() / block
    );
}

/// Every quantized tensor of `quantized`, quantized by Ember from the same tensor of
/// `source` (f32): the number of tensors compared, per type.
fn compare_bytes(source: &str, quantized: &str) -> HashMap<GgmlType, usize> {
    let (src, q) = (open(source), open(quantized));
    let mut compared = HashMap::new();
    for name in q.tensors.keys() {
        let t = q.tensor(name).unwrap();
        if !t.ty.is_quantized() {
            continue;
        }
        assert_same_blocks(
            &format!("{quantized}: {name}"),
            &src.tensor(name).unwrap(),
            &t,
        );
        *compared.entry(t.ty).or_default() += 1;
    }
    compared
}

/// quantizer.gguf (make_quantizer_fixture.py): rows of many kinds of distribution quantized by
/// ggml_quantize_chunk into every type `--quantization` offers, the k-quants' searches over
/// scales and mins included.
#[test]
fn every_type_is_quantized_as_ggml_does() {
    let file = open("quantizer.gguf");
    let source = file.tensor("source").unwrap();
    for name in ["q8_0", "q4_0", "q5_0", "q4_K", "q5_K", "q6_K"] {
        let theirs = file.tensor(name).unwrap();
        assert_eq!(theirs.ty.name(), name);
        assert_same_blocks(&format!("quantizer.gguf: {name}"), &source, &theirs);
    }
}

#[test]
fn ember_quantizes_as_llama_quantize_does() {
    for (source, quantized) in [
        ("qwen2-f32.gguf", "qwen2-q8_0.gguf"),
        ("qwen2-f32.gguf", "qwen2-q4_0.gguf"),
        ("qwen2-f32.gguf", "qwen2-q5_0.gguf"),
        ("qwen3-f32.gguf", "qwen3-q8_0.gguf"),
        ("qwen2moe-f32.gguf", "qwen2moe-q8_0.gguf"),
        ("qwen3moe-f32.gguf", "qwen3moe-q8_0.gguf"),
    ] {
        let compared = compare_bytes(source, quantized);
        eprintln!("{quantized}: bit for bit: {compared:?}");
        assert!(!compared.is_empty(), "{quantized}: nothing quantized");
    }
}

/// The qwen2 fixture checkpoint (safetensors, f32) quantized at load.
fn quantized_qwen2(ty: GgmlType) -> (ember_models::QwenModel, Vec<QuantizedMatrix>) {
    let files = resolve(root().join("models/qwen2").to_str().unwrap(), None).unwrap();
    load_model_quantized(&files, DType::F32, &Device::Cpu, Some(ty)).unwrap()
}

#[test]
fn types_follow_llama_cpp_s_rules() {
    // 64-wide rows: not whole 256-blocks, so the k-quants fall back (q4_K to q5_0, q6_K to
    // q8_0) and the output matrix (the tied embedding table) is q8_0.
    for (asked, projections) in [
        (GgmlType::Q8_0, GgmlType::Q8_0),
        (GgmlType::Q4_0, GgmlType::Q4_0),
        (GgmlType::Q5_0, GgmlType::Q5_0),
        (GgmlType::Q4K, GgmlType::Q5_0),
        (GgmlType::Q5K, GgmlType::Q5_0),
        (GgmlType::Q6K, GgmlType::Q8_0),
    ] {
        let (model, report) = quantized_qwen2(asked);
        let cfg = model.config().clone();
        // q, k, v, o, gate, up, down per layer, and the embedding table.
        assert_eq!(report.len(), 7 * cfg.num_hidden_layers + 1, "{asked}");
        for m in &report {
            let want = if m.name == "model.embed_tokens.weight" {
                GgmlType::Q8_0
            } else {
                projections
            };
            assert_eq!(m.ty, want, "{asked}: {}", m.name);
            assert!(m.bytes_after < m.bytes_before, "{asked}: {}", m.name);
            assert_eq!(m.bytes_before % 4, 0, "f32 in the checkpoint");
            let elements = m.bytes_before / 4;
            let k = if m.name.contains("down_proj") || m.name.contains("o_proj") {
                // o_proj reads heads × head_dim, down_proj the intermediate size.
                if m.name.contains("down_proj") {
                    cfg.intermediate_size
                } else {
                    cfg.num_attention_heads * cfg.head_dim
                }
            } else {
                cfg.hidden_size
            };
            assert_eq!(
                Some(m.bytes_after),
                m.ty.row_bytes(k).map(|r| r * (elements / k)),
                "{asked}: {}",
                m.name
            );
        }
    }
}

/// The checkpoint quantized at load to q8_0, q4_0 and q5_0 is the fixture GGUF llama.cpp made
/// of those types, byte for byte (above), so its logits must match llama.cpp's on that file as
/// closely as Ember's GGUF loader does: no position beyond `FLIP`, at least half within
/// `EXACT`.
#[test]
fn a_checkpoint_quantized_at_load_matches_llama_cpp_on_its_gguf() {
    for (ty, file) in [
        (GgmlType::Q8_0, "qwen2-q8_0"),
        (GgmlType::Q4_0, "qwen2-q4_0"),
        (GgmlType::Q5_0, "qwen2-q5_0"),
    ] {
        let (model, _) = quantized_qwen2(ty);
        let golden: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root().join(format!("gguf/{file}.json"))).unwrap(),
        )
        .unwrap();
        let logits: HashMap<String, Tensor> = candle_core::safetensors::load(
            root().join(format!("gguf/{file}.logits.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let prompts: Vec<Vec<u32>> = serde_json::from_value(golden["prompt_ids"].clone()).unwrap();
        let (mut off, mut positions, mut worst) = (0, 0, 0f32);
        for (i, ids) in prompts.iter().enumerate() {
            let mut cache = ContiguousKvCache::new(model.config().num_hidden_layers);
            let batch = Batch::new(
                &[(0, 0, ids.as_slice())],
                LogitsRows::All,
                model.max_positions(),
                model.device(),
            )
            .unwrap();
            let ours = model.forward(&batch, &mut cache).unwrap();
            let theirs = &logits[&format!("prompt{i}")];
            for d in position_diffs(&ours, theirs, ids.len()) {
                off += usize::from(d > EXACT);
                positions += 1;
                worst = worst.max(d);
            }
        }
        eprintln!("{ty}: {off} of {positions} positions beyond {EXACT}, max |diff| {worst}");
        assert!(worst <= FLIP, "{ty}: max |diff| {worst}");
        assert!(off * 2 <= positions, "{ty}: {off} of {positions}");
    }
}

#[test]
fn types_ember_does_not_compute_with_are_refused() {
    let files = resolve(root().join("models/qwen2").to_str().unwrap(), None).unwrap();
    let err = load_model_quantized(&files, DType::F32, &Device::Cpu, Some(GgmlType::Q4_1))
        .expect_err("q4_1 is not a type Ember quantizes to");
    assert!(err.to_string().contains("q4_1"), "{err}");
    assert_eq!(GgmlType::parse_quantized("Q4_K"), Some(GgmlType::Q4K));
    assert_eq!(GgmlType::parse_quantized("q4_1"), None);
    assert_eq!(GgmlType::parse_quantized("f16"), None);
}
