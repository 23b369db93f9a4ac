//! One sparse MoE layer in the Qwen3-30B-A3B shape (128 experts, 8 active per token, hidden
//! 2048, expert width 768), bf16 weights packed as at load, at 1 and 16 tokens. Only the
//! selected experts' weights are read: at 1 token 8 experts (~38 MB), at 16 tokens up to 128.
//! Run: cargo bench -p ember-models --bench moe

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ember_models::layers::SparseMoe;
use ember_models::ModelConfig;

const CONFIG: &str = r#"{
  "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false, "decoder_sparse_step": 1,
  "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144,
  "max_position_embeddings": 40960, "mlp_only_layers": [], "model_type": "qwen3_moe",
  "moe_intermediate_size": 768, "norm_topk_prob": true, "num_attention_heads": 32,
  "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
  "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
  "tie_word_embeddings": false, "vocab_size": 151936}"#;

fn uniform(shape: (usize, usize)) -> Tensor {
    Tensor::rand(-0.05f32, 0.05, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::BF16))
        .expect("random weights")
}

fn moe_layer(c: &mut Criterion) {
    let cfg = ModelConfig::from_json(CONFIG).expect("config");
    let moe = cfg.moe.clone().expect("moe config");
    let (h, e) = (cfg.hidden_size, moe.moe_intermediate_size);
    let mut tensors = HashMap::new();
    tensors.insert("gate.weight".to_string(), uniform((moe.num_experts, h)));
    for x in 0..moe.num_experts {
        for (name, shape) in [
            ("gate_proj", (e, h)),
            ("up_proj", (e, h)),
            ("down_proj", (h, e)),
        ] {
            tensors.insert(format!("experts.{x}.{name}.weight"), uniform(shape));
        }
    }
    let vb = VarBuilder::from_tensors(tensors, DType::BF16, &Device::Cpu);
    let layer = SparseMoe::load(&cfg, &moe, vb.into()).expect("layer");
    let mut group = c.benchmark_group("moe_qwen3_30b_a3b");
    group.sample_size(20);
    for tokens in [1usize, 16] {
        let x = Tensor::randn(0f32, 1.0, (tokens, h), &Device::Cpu).expect("input");
        group.bench_with_input(BenchmarkId::new("tokens", tokens), &x, |b, x| {
            b.iter(|| layer.forward(x).expect("forward"))
        });
    }
    group.finish();
}

criterion_group!(benches, moe_layer);
criterion_main!(benches);
