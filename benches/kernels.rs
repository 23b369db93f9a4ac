//! Fused kernels against their plain-candle references, at Qwen2.5-0.5B's widths (hidden 896,
//! intermediate 4864): one decode token, a decode step of 16 sequences and a 128-token prefill
//! chunk. `linear` runs on every instruction-set path this CPU supports (weights packed once,
//! as models do); its throughput is reported in weight bytes per second at one row (so it reads
//! against the memory bandwidth) and in FLOP/s above.
//! Run: cargo bench --bench kernels

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ember_kernels::{
    linear_packed_with_isa, linear_ref, on_pool, paged_attention_with_isa, rms_norm, rms_norm_ref,
    silu_and_mul, silu_and_mul_ref, supported_isas, KvLayout, PackedWeight, PagedSeq,
};

fn randn(shape: (usize, usize), dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("random input")
}

fn linear_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("linear");
    group.sample_size(20);
    // gate_up (9728 x 896) and down (896 x 4864) of Qwen2.5-0.5B.
    for (n, k) in [(9728usize, 896usize), (896, 4864)] {
        for dtype in [DType::BF16, DType::F32] {
            let w = randn((n, k), dtype);
            let packed = PackedWeight::new(&w).expect("pack");
            for m in [1usize, 16, 128] {
                let x = randn((m, k), dtype);
                let bytes = (n * k * dtype.size_in_bytes()) as u64;
                group.throughput(if m == 1 {
                    Throughput::Bytes(bytes)
                } else {
                    Throughput::Elements((2 * m * n * k) as u64)
                });
                for isa in supported_isas() {
                    let id = format!("{dtype:?}/{n}x{k}/m{m}/{isa}");
                    group.bench_with_input(BenchmarkId::new("ember", &id), &x, |b, x| {
                        b.iter(|| linear_packed_with_isa(x, &packed, None, isa).expect("linear"))
                    });
                }
                if dtype == DType::F32 {
                    let id = format!("{dtype:?}/{n}x{k}/m{m}");
                    group.bench_with_input(BenchmarkId::new("candle", &id), &x, |b, x| {
                        b.iter(|| linear_ref(x, &w).expect("matmul"))
                    });
                }
            }
        }
    }
    group.finish();
}

fn rms_norm_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("rms_norm");
    for dtype in [DType::F32, DType::BF16] {
        let w = randn((1, 896), dtype).flatten_all().expect("weight");
        for rows in [1usize, 128] {
            let x = randn((rows, 896), dtype);
            let id = format!("{dtype:?}/{rows}");
            group.bench_with_input(BenchmarkId::new("fused", &id), &x, |b, x| {
                b.iter(|| rms_norm(x, &w, 1e-6).expect("fused"))
            });
            group.bench_with_input(BenchmarkId::new("reference", &id), &x, |b, x| {
                b.iter(|| rms_norm_ref(x, &w, 1e-6).expect("reference"))
            });
        }
    }
    group.finish();
}

fn silu_and_mul_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("silu_and_mul");
    for dtype in [DType::F32, DType::BF16] {
        for rows in [1usize, 128] {
            let x = randn((rows, 2 * 4864), dtype);
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

/// One batch-1 decode step's attention at Qwen2.5-0.5B's shape (14 query heads, 2 kv heads,
/// head dim 64, bf16 cache, blocks of 16): all 24 layers inside one `on_pool`, as the model
/// runs them. Throughput is the step's K/V bytes per second. Successive iterations read the
/// caches of different sequences, 512 MiB in all, so that the K/V rows come from memory as in
/// a real step (where the weights streamed between layers evict them) and not from a large
/// last-level cache.
fn paged_attention_bench(c: &mut Criterion) {
    const LAYERS: usize = 24;
    let (heads, kv_heads, d, bs) = (14usize, 2usize, 64usize, 16usize);
    let mut group = c.benchmark_group("paged_attention");
    group.sample_size(10);
    for ctx in [128usize, 1024, 4096] {
        let blocks = ctx.div_ceil(bs);
        let row = kv_heads * d;
        // One cache pair per layer holding `seqs` sequences; sequence i's blocks are
        // i, i + seqs, i + 2·seqs, ... (not adjacent, as in a serving cache).
        let seqs = ((512 << 20) / (LAYERS * 2 * ctx * row * 2)).max(1);
        let caches: Vec<(Tensor, Tensor)> = (0..LAYERS)
            .map(|_| {
                (
                    randn((seqs * blocks * bs, row), DType::BF16),
                    randn((seqs * blocks * bs, row), DType::BF16),
                )
            })
            .collect();
        let tables: Vec<Vec<u32>> = (0..seqs)
            .map(|i| (0..blocks).map(|b| (b * seqs + i) as u32).collect())
            .collect();
        let q = Tensor::randn(0f32, 1.0, (1, heads, d), &Device::Cpu).expect("q");
        // Keys as the model's CPU cache keeps them.
        let keys = KvLayout::Columns { block_size: bs };
        group.throughput(Throughput::Bytes((LAYERS * 2 * ctx * row * 2) as u64));
        for isa in supported_isas() {
            let id = format!("decode/ctx{ctx}/{isa}");
            let mut next = 0;
            group.bench_function(BenchmarkId::new("ember", &id), |b| {
                b.iter(|| {
                    next = (next + 1) % seqs;
                    let seq = [PagedSeq {
                        start_pos: ctx - 1,
                        num_tokens: 1,
                        block_table: &tables[next],
                    }];
                    on_pool(|| {
                        for (k, v) in &caches {
                            paged_attention_with_isa(
                                &q, k, v, &seq, bs, keys, kv_heads, 0.125, isa,
                            )
                            .expect("attention");
                        }
                    })
                })
            });
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    linear_bench,
    rms_norm_bench,
    silu_and_mul_bench,
    paged_attention_bench
);
criterion_main!(benches);
