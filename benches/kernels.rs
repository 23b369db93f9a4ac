//! Fused kernels against their plain-candle references, at Qwen2.5-0.5B's MLP width
//! (intermediate 4864): one decode token and a 128-token prefill chunk.
//! Run: cargo bench --bench kernels

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ember_kernels::{silu_and_mul, silu_and_mul_ref};

fn silu_and_mul_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("silu_and_mul");
    for dtype in [DType::F32, DType::BF16] {
        for rows in [1usize, 128] {
            let x = Tensor::randn(0f32, 1.0, (rows, 2 * 4864), &Device::Cpu)
                .and_then(|t| t.to_dtype(dtype))
                .expect("random input");
            let id = format!("{dtype:?}/{rows}");
            group.bench_with_input(BenchmarkId::new("fused", &id), &x, |b, x| {
                b.iter(|| silu_and_mul(x).expect("fused"))
            });
            group.bench_with_input(BenchmarkId::new("reference", &id), &x, |b, x| {
                b.iter(|| silu_and_mul_ref(x).expect("reference"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, silu_and_mul_bench);
criterion_main!(benches);
