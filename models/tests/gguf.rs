//! GGUF checkpoints against llama.cpp on the same files (tests/fixtures/gguf, made by
//! make_gguf_fixtures.py with llama-cpp-python 0.3.36): dequantization bit for bit against the
//! `gguf` package, the config read from metadata, logits against llama.cpp's, and clear errors
//! for truncated, corrupt or unsupported files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use ember_models::gguf::GgufFile;
use ember_models::{
    load_gguf_model, resolve, Batch, ContiguousKvCache, LogitsRows, ModelConfig, ModelError,
};
use serde::Deserialize;

mod common;
use common::{position_diffs, EXACT, FLIP};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/gguf")
        .join(name)
}

fn open(name: &str) -> Arc<GgufFile> {
    Arc::new(GgufFile::open(&fixture(name)).unwrap())
}

#[test]
fn dequantization_is_the_gguf_package_s_bit_for_bit() {
    let file = open("dequant.gguf");
    let names = [
        "q4_0", "q5_0", "q8_0", "q4_K", "q5_K", "q6_K", "f16", "bf16",
    ];
    for name in names {
        let t = file.tensor(name).unwrap();
        assert_eq!(t.ty.name(), name, "the fixture stores {name} as {name}");
        let expected = file.tensor(&format!("{name}.expected")).unwrap();
        let n: usize = expected.dims.iter().product();
        let mut want = vec![0f32; n];
        ember_kernels::dequantize(expected.ty, expected.data, &mut want).unwrap();
        let mut got = vec![0f32; n];
        ember_kernels::dequantize(t.ty, t.data, &mut got).unwrap();
        assert_eq!(t.dims, expected.dims, "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name} element {i}: {g} vs {w}");
        }
    }
}

#[test]
fn config_from_metadata_is_the_checkpoint_s() {
    for name in ["qwen2", "qwen3"] {
        let files = resolve(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/models")
                .join(name)
                .to_str()
                .unwrap(),
            None,
        )
        .unwrap();
        let hf = ModelConfig::from_file(&files.config).unwrap();
        let gguf = open(&format!("{name}-f32.gguf")).model_config().unwrap();
        // The GGUF's end-of-generation list also names <|endoftext|>, as llama.cpp's does.
        assert!(hf
            .eos_token_ids
            .iter()
            .all(|id| gguf.eos_token_ids.contains(id)));
        // GGUF stores the epsilon as f32.
        assert_eq!(gguf.rms_norm_eps as f32, hf.rms_norm_eps as f32);
        let same = ModelConfig {
            eos_token_ids: hf.eos_token_ids.clone(),
            rms_norm_eps: hf.rms_norm_eps,
            ..gguf
        };
        assert_eq!(same, hf, "{name}");
    }
    let moe = open("qwen2moe-q8_0.gguf").model_config().unwrap();
    let m = moe.moe.expect("qwen2moe is sparse");
    assert_eq!((m.num_experts, m.num_experts_per_tok), (4, 2));
    assert_eq!(m.shared_expert_intermediate_size, Some(64));
    assert!(!m.norm_topk_prob && m.mlp_only_layers.is_empty() && !moe.tie_word_embeddings);
    assert!(
        open("qwen3moe-q8_0.gguf")
            .model_config()
            .unwrap()
            .moe
            .unwrap()
            .norm_topk_prob
    );
}

#[derive(Deserialize)]
struct Golden {
    prompt_ids: Vec<Vec<u32>>,
    greedy: Vec<Vec<u32>>,
    greedy_margin: Vec<Vec<f32>>,
}

struct Compared {
    /// Largest |Ember - llama.cpp| over every logit of every prompt.
    max_diff: f32,
    /// Prompt positions whose largest |difference| exceeds [`EXACT`], of `num_positions`.
    num_off: usize,
    num_positions: usize,
    /// Largest |logit| of llama.cpp's.
    max_logit: f32,
}

/// Runs every prompt of `<name>.gguf` through Ember (f32 activations) and compares with
/// llama.cpp's logits at every position; then greedy-decodes and checks each token whose
/// llama.cpp margin exceeds `margin`, stopping at the first step below it (after that the two
/// may legitimately diverge).
fn compare_with_llama_cpp(name: &str, margin: f32) -> Compared {
    let gguf = open(&format!("{name}.gguf"));
    let model = load_gguf_model(&gguf, DType::F32, &Device::Cpu).unwrap();
    let golden: Golden =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{name}.json"))).unwrap())
            .unwrap();
    let logits: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixture(&format!("{name}.logits.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let layers = model.config().num_hidden_layers;
    let mut out = Compared {
        max_diff: 0.0,
        num_off: 0,
        num_positions: 0,
        max_logit: 0.0,
    };
    for (i, ids) in golden.prompt_ids.iter().enumerate() {
        let mut cache = ContiguousKvCache::new(layers);
        let run = |cache: &mut ContiguousKvCache, start: usize, ids: &[u32], rows| {
            let batch = Batch::new(
                &[(0, start, ids)],
                rows,
                model.max_positions(),
                model.device(),
            )
            .unwrap();
            model.forward(&batch, cache).unwrap()
        };
        let ours = run(&mut cache, 0, ids, LogitsRows::All);
        let theirs = &logits[&format!("prompt{i}")];
        let diff: f32 = (&ours - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        let top: f32 = theirs
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        out.max_diff = out.max_diff.max(diff);
        for d in position_diffs(&ours, theirs, ids.len()) {
            out.num_off += usize::from(d > EXACT);
            out.num_positions += 1;
        }
        out.max_logit = out.max_logit.max(top);
        // Greedy, token by token, while llama.cpp's choice is clear.
        let mut last = ours.get(ids.len() - 1).unwrap();
        for (step, (&want, &m)) in golden.greedy[i]
            .iter()
            .zip(&golden.greedy_margin[i])
            .enumerate()
        {
            if m <= margin {
                break;
            }
            let got = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            assert_eq!(
                got, want,
                "{name} prompt {i} greedy step {step} (margin {m})"
            );
            last = run(
                &mut cache,
                ids.len() + step,
                &[want],
                LogitsRows::LastPerSeq,
            )
            .get(0)
            .unwrap();
        }
    }
    out
}

/// The largest |difference| between llama.cpp's logits on two files of the same weights.
fn reference_distance(a: &str, b: &str) -> f32 {
    let load = |n: &str| {
        candle_core::safetensors::load(fixture(&format!("{n}.logits.safetensors")), &Device::Cpu)
            .unwrap()
    };
    let (a, b) = (load(a), load(b));
    a.iter()
        .map(|(k, t)| {
            (t - &b[k])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

#[test]
fn float_ggufs_match_llama_cpp() {
    // f32 weights, f32 KV cache on both sides: the same arithmetic up to summation order, as
    // Ember's f32 logits are within 1e-4 of transformers' (parity.rs).
    for name in ["qwen2-f32", "qwen3-f32", "qwen2moe-f32", "qwen3moe-f32"] {
        let c = compare_with_llama_cpp(name, 2e-4);
        assert!(c.max_diff <= 1e-4, "{name}: max |diff| {}", c.max_diff);
    }
    // f16 and bf16 weights: llama.cpp rounds each matmul's activations to the weights' type
    // (Ember widens the weights and keeps f32 activations), so the reference is only as exact
    // as its own distance from its f32 run of the same weights; Ember must be within that.
    for name in ["qwen2-f16", "qwen2-bf16"] {
        let own = reference_distance(name, "qwen2-f32");
        let c = compare_with_llama_cpp(name, own);
        assert!(
            c.max_diff <= own,
            "{name}: max |diff| {} > the reference's own {own}",
            c.max_diff
        );
    }
}

/// Quantized files: Ember quantizes each matmul's activations exactly as ggml does (Q8_0 for
/// q4_0/q5_0/q8_0 weights, Q8_K for the k-quants; the same scales and rounding) and computes
/// the same integer dot products, so the logits agree with llama.cpp's up to f32 summation order
/// (on the AVX2 path most files agree bit for bit). The exception: an activation whose f32 value
/// differs from llama.cpp's in the last bit (summation order upstream: llama.cpp's repacked
/// q4_K kernel sums in another order) and lies on a rounding boundary of the 8-bit quantization
/// moves by one step; that position and the later ones attending to it then differ by up to
/// ~0.1 (measured on the fixtures, AVX2 and portable paths: at most 10 of a file's 40 positions,
/// 0.104 at most, logits up to ±5.8). So: no position beyond `FLIP`, at least half of them
/// within `EXACT`, and greedy tokens equal wherever llama.cpp's margin exceeds `FLIP`.
#[test]
fn quantized_ggufs_match_llama_cpp() {
    for name in [
        "qwen2-q8_0",
        "qwen3-q8_0",
        "qwen2moe-q8_0",
        "qwen3moe-q8_0",
        "qwen2-q4_0",
        "qwen2-q5_0",
        "qwen2-k-q8_0",
        "qwen2-k-q4_k_m",
        "qwen2-k-q5_k_m",
    ] {
        let c = compare_with_llama_cpp(name, FLIP);
        eprintln!(
            "{name}: {} of {} positions beyond {EXACT}, max |diff| {} (max |logit| {})",
            c.num_off, c.num_positions, c.max_diff, c.max_logit
        );
        assert!(c.max_diff <= FLIP, "{name}");
        assert!(c.num_off * 2 <= c.num_positions, "{name}");
    }
}

// ------------------------------------------------------------------ malformed files

/// A minimal GGUF writer for crafted files.
struct Builder {
    kv: Vec<u8>,
    num_kv: u64,
    infos: Vec<u8>,
    num_tensors: u64,
    data: Vec<u8>,
}

impl Builder {
    fn new() -> Self {
        Self {
            kv: Vec::new(),
            num_kv: 0,
            infos: Vec::new(),
            num_tensors: 0,
            data: Vec::new(),
        }
    }

    fn string(buf: &mut Vec<u8>, s: &str) {
        buf.extend((s.len() as u64).to_le_bytes());
        buf.extend(s.as_bytes());
    }

    /// A metadata pair: the key, the GGUF value type, the value's bytes.
    fn kv(mut self, key: &str, value_type: u32, value: &[u8]) -> Self {
        Self::string(&mut self.kv, key);
        self.kv.extend(value_type.to_le_bytes());
        self.kv.extend(value);
        self.num_kv += 1;
        self
    }

    fn kv_str(self, key: &str, value: &str) -> Self {
        let mut bytes = Vec::new();
        Self::string(&mut bytes, value);
        self.kv(key, 8, &bytes)
    }

    fn kv_u32(self, key: &str, value: u32) -> Self {
        self.kv(key, 4, &value.to_le_bytes())
    }

    fn kv_f32(self, key: &str, value: f32) -> Self {
        self.kv(key, 6, &value.to_le_bytes())
    }

    /// A tensor of ggml type `ty` and `dims` (innermost first) with `bytes` of data.
    fn tensor(mut self, name: &str, ty: u32, dims: &[u64], bytes: usize) -> Self {
        Self::string(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        self.data
            .extend(std::iter::repeat_n(0u8, bytes.next_multiple_of(32)));
        self.num_tensors += 1;
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.num_tensors.to_le_bytes());
        out.extend(self.num_kv.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.infos);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(&self.data);
        out
    }
}

fn write_temp(tag: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("ember-gguf-{tag}-{}.gguf", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn open_err(tag: &str, bytes: &[u8]) -> String {
    let path = write_temp(tag, bytes);
    let result = GgufFile::open(&path);
    let _ = std::fs::remove_file(&path);
    match result {
        Ok(_) => panic!("{tag}: opened"),
        Err(e) => e.to_string(),
    }
}

fn valid() -> Builder {
    Builder::new()
        .kv_str("general.architecture", "qwen2")
        .kv_u32("qwen2.embedding_length", 32)
        .tensor("token_embd.weight", 8, &[32, 4], 4 * 34)
}

#[test]
fn truncated_files_are_errors_at_every_cut() {
    let whole = std::fs::read(fixture("qwen2-q8_0.gguf")).unwrap();
    let path = write_temp("whole", &whole);
    assert!(GgufFile::open(&path).is_ok());
    let _ = std::fs::remove_file(&path);
    // Every cut inside the header and metadata, then a sample through the tensor data.
    let cuts: Vec<usize> = (0..4096.min(whole.len()))
        .step_by(7)
        .chain((4096..whole.len()).step_by(whole.len() / 50))
        .collect();
    let crafted = valid().bytes();
    for cut in cuts {
        let err = open_err("cut", &whole[..cut]);
        assert!(
            err.contains("truncated") || err.contains("magic") || err.contains("more than"),
            "cut at {cut}: {err}"
        );
    }
    // (The last 24 bytes are padding after the tensor's 136.)
    for cut in 0..crafted.len() - 24 {
        open_err("crafted-cut", &crafted[..cut]);
    }
}

#[test]
fn corrupt_headers_are_named() {
    let mut bytes = valid().bytes();
    bytes[0] = b'X';
    assert!(open_err("magic", &bytes).contains("not a GGUF file"));
    let mut bytes = valid().bytes();
    bytes[4] = 1;
    assert!(open_err("version", &bytes).contains("version 1"));
    // A string length far past the end of the file: refused before allocating.
    let mut bytes = valid().bytes();
    bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(
        open_err("len", &bytes).contains("more than"),
        "{}",
        open_err("len", &bytes)
    );
    // A tensor count no file could hold.
    let mut bytes = valid().bytes();
    bytes[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(open_err("count", &bytes).contains("tensor count"));
    // A tensor whose data lies past the end.
    let b = valid();
    let mut bytes = b.bytes();
    bytes.truncate(bytes.len() - 64);
    assert!(open_err("data", &bytes).contains("truncated: tensor \"token_embd.weight\""));
    // Rows that are not whole blocks, zero and absurd dimensions.
    let bad_rows = Builder::new().tensor("t", 8, &[33, 2], 128).bytes();
    assert!(open_err("rows", &bad_rows).contains("not whole q8_0 blocks"));
    let zero = Builder::new().tensor("t", 0, &[0, 2], 0).bytes();
    assert!(open_err("zero", &zero).contains("dimension of 0"));
    let huge = Builder::new().tensor("t", 0, &[u64::MAX / 2, 4], 0).bytes();
    open_err("huge", &huge);
    let five = Builder::new().tensor("t", 0, &[1, 1, 1, 1, 1], 4).bytes();
    assert!(open_err("dims", &five).contains("5 dimensions"));
    // An unknown metadata value type.
    let mut bytes = Builder::new().kv_u32("k", 1).bytes();
    let at = 24 + 8 + 1;
    bytes[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    assert!(open_err("vtype", &bytes).contains("unknown metadata value type 77"));
}

#[test]
fn unsupported_types_and_architectures_are_refused_by_name() {
    // iq2_xs (17): parsed, refused when used.
    let path = write_temp(
        "iq",
        &valid()
            .kv_u32("qwen2.block_count", 1)
            .tensor("blk.0.attn_q.weight", 17, &[256, 4], 0)
            .bytes(),
    );
    let file = GgufFile::open(&path).unwrap();
    let err = file.tensor("blk.0.attn_q.weight").unwrap_err().to_string();
    assert!(err.contains("iq2_xs"), "{err}");
    assert!(file
        .tensor("nope")
        .unwrap_err()
        .to_string()
        .contains("no tensor \"nope\""));
    let _ = std::fs::remove_file(&path);

    let path = write_temp(
        "arch",
        &Builder::new()
            .kv_str("general.architecture", "llama")
            .bytes(),
    );
    let err = GgufFile::open(&path).unwrap().model_config().unwrap_err();
    assert!(matches!(err, ModelError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("\"llama\""), "{err}");
    let _ = std::fs::remove_file(&path);

    // Metadata of the wrong type, and missing keys, name the key.
    let path = write_temp(
        "meta",
        &valid()
            .kv_u32("qwen2.attention.head_count", 2)
            .kv_f32("qwen2.block_count", 2.5)
            .bytes(),
    );
    let err = GgufFile::open(&path)
        .unwrap()
        .model_config()
        .unwrap_err()
        .to_string();
    assert!(err.contains("qwen2.block_count is a float32"), "{err}");
    let _ = std::fs::remove_file(&path);
    let path = write_temp("missing", &valid().bytes());
    let err = GgufFile::open(&path)
        .unwrap()
        .model_config()
        .unwrap_err()
        .to_string();
    assert!(err.contains("no qwen2.attention.head_count"), "{err}");
    let _ = std::fs::remove_file(&path);
}

/// Loading a model from a file whose tensors disagree with its metadata is an error naming the
/// tensor, not a panic.
#[test]
fn tensors_that_disagree_with_metadata_are_errors() {
    let src = open("qwen2-f32.gguf");
    let _ = src;
    let path: &Path = &fixture("qwen2-f32.gguf");
    let bytes = std::fs::read(path).unwrap();
    // Claim a wider model than the tensors hold: patch embedding_length's value.
    let key = b"qwen2.embedding_length";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the key is in the file")
        + key.len()
        + 4;
    let mut patched = bytes.clone();
    patched[at..at + 4].copy_from_slice(&128u32.to_le_bytes());
    let tmp = write_temp("disagree", &patched);
    let file = Arc::new(GgufFile::open(&tmp).unwrap());
    let err = load_gguf_model(&file, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("token_embd.weight"), "{err}");
    let _ = std::fs::remove_file(&tmp);
}

/// The whole suite again on every other CPU path this machine runs (`EMBER_CPU_ISA`).
#[test]
fn every_cpu_isa_path() {
    match ember_kernels::rerun_tests_on_other_isas("every_cpu_isa_path") {
        Ok(paths) => eprintln!("also passed with EMBER_CPU_ISA = {paths:?}"),
        Err(failure) => panic!("{failure}"),
    }
}
