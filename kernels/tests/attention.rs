mod common;

use candle_core::{DType, Device, Tensor};
use common::max_abs;
use ember_kernels::{
    causal_attention, causal_attention_ref, paged_attention, paged_attention_ref,
    paged_attention_with_isa, supported_isas, KvLayout, PagedSeq,
};

fn qkv(n: usize, ctx: usize, h: usize, kv: usize, d: usize) -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    (
        Tensor::randn(0f32, 1.0, (n, h, d), &dev).unwrap(),
        Tensor::randn(0f32, 1.0, (ctx, kv, d), &dev).unwrap(),
        Tensor::randn(0f32, 1.0, (ctx, kv, d), &dev).unwrap(),
    )
}

#[test]
fn matches_the_reference() {
    for (n, start, h, kv, d) in [
        (1, 0, 2, 1, 16),
        (5, 0, 4, 2, 16),
        (3, 9, 4, 2, 32),
        (1, 40, 14, 2, 64),
        (7, 2, 6, 6, 20),
    ] {
        let (q, k, v) = qkv(n, start + n, h, kv, d);
        let scale = 1.0 / (d as f32).sqrt();
        let ours = causal_attention(&q, &k, &v, start, scale).unwrap();
        let reference = causal_attention_ref(&q, &k, &v, start, scale).unwrap();
        assert_eq!(ours.dims(), &[n, h * d]);
        let diff = max_abs(&(ours - reference).unwrap());
        assert!(
            diff < 1e-5,
            "n={n} start={start} h={h} kv={kv} d={d}: {diff}"
        );
    }
}

/// Query i's output is bit-identical whether computed alone or with other queries (chunked
/// prefill, prefix-cache hits).
#[test]
fn queries_do_not_depend_on_each_other() {
    let (n, h, kv, d) = (9, 4, 2, 32);
    let (q, k, v) = qkv(n, n, h, kv, d);
    let scale = 0.17;
    let all = causal_attention(&q, &k, &v, 0, scale)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (i, expected) in all.iter().enumerate() {
        let one = causal_attention(
            &q.narrow(0, i, 1).unwrap(),
            &k.narrow(0, 0, i + 1).unwrap(),
            &v.narrow(0, 0, i + 1).unwrap(),
            i,
            scale,
        )
        .unwrap();
        assert_eq!(&one.to_vec2::<f32>().unwrap()[0], expected, "query {i}");
    }
}

/// A paged cache of `blocks` blocks filled with random keys and values, and each sequence's
/// block table: blocks handed out in a scrambled order so that tables are not contiguous.
fn paged_cache(
    blocks: usize,
    bs: usize,
    kv: usize,
    d: usize,
    lens: &[usize],
) -> (Tensor, Tensor, Vec<Vec<u32>>) {
    let dev = Device::Cpu;
    let k = Tensor::randn(0f32, 1.0, (blocks * bs, kv * d), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (blocks * bs, kv * d), &dev).unwrap();
    let mut free: Vec<u32> = (0..blocks as u32)
        .map(|b| (b * 7 + 3) % blocks as u32)
        .collect();
    let tables = lens
        .iter()
        .map(|&len| free.drain(..len.div_ceil(bs)).collect())
        .collect();
    (k, v, tables)
}

/// A row-layout cache (slots, width) in [`KvLayout::Columns`]: each block of `bs` slots
/// transposed.
fn to_columns(cache: &Tensor, bs: usize) -> Tensor {
    let (slots, width) = cache.dims2().unwrap();
    cache
        .reshape((slots / bs, bs, width))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((slots, width))
        .unwrap()
}

/// Both key layouts of a row-layout key cache.
fn layouts(k: &Tensor, bs: usize) -> [(Tensor, KvLayout); 2] {
    [
        (k.clone(), KvLayout::Rows),
        (to_columns(k, bs), KvLayout::Columns { block_size: bs }),
    ]
}

#[test]
fn paged_matches_the_reference_on_every_path() {
    let (bs, h, kv, d) = (4, 6, 2, 20);
    // (start_pos, num_tokens): a prefill from 0, a chunk after a prefix, two decodes.
    let shape = [(0usize, 5usize), (6, 3), (10, 1), (0, 1)];
    let lens: Vec<usize> = shape.iter().map(|(s, n)| s + n).collect();
    let (k, v, tables) = paged_cache(16, bs, kv, d, &lens);
    let seqs: Vec<PagedSeq> = shape
        .iter()
        .zip(&tables)
        .map(|(&(start_pos, num_tokens), t)| PagedSeq {
            start_pos,
            num_tokens,
            block_table: t,
        })
        .collect();
    let tokens: usize = shape.iter().map(|s| s.1).sum();
    let q = Tensor::randn(0f32, 1.0, (tokens, h, d), &Device::Cpu).unwrap();
    let scale = 1.0 / (d as f32).sqrt();
    for cache_dtype in [DType::F32, DType::BF16, DType::F16] {
        let (k, v) = (
            k.to_dtype(cache_dtype).unwrap(),
            v.to_dtype(cache_dtype).unwrap(),
        );
        let reference =
            paged_attention_ref(&q, &k, &v, &seqs, bs, KvLayout::Rows, kv, scale).unwrap();
        for (keys, layout) in layouts(&k, bs) {
            // The reference reads the column layout too.
            let theirs = paged_attention_ref(&q, &keys, &v, &seqs, bs, layout, kv, scale).unwrap();
            assert!(
                max_abs(&(theirs - &reference).unwrap()) < 1e-6,
                "{layout:?} reference"
            );
            for isa in supported_isas() {
                let ours =
                    paged_attention_with_isa(&q, &keys, &v, &seqs, bs, layout, kv, scale, isa)
                        .unwrap();
                assert_eq!(ours.dims(), &[tokens, h * d]);
                let diff = max_abs(&(ours - &reference).unwrap());
                assert!(
                    diff < 1e-5,
                    "{isa} {layout:?} cache {cache_dtype:?}: {diff}"
                );
            }
        }
    }
    // A table that does not cover the positions is an error, not a panic.
    let short = [PagedSeq {
        start_pos: 8,
        num_tokens: 1,
        block_table: &tables[0][..1],
    }];
    let q1 = q.narrow(0, 0, 1).unwrap();
    assert!(paged_attention(&q1, &k, &v, &short, bs, KvLayout::Rows, kv, scale).is_err());
    let outside = [PagedSeq {
        start_pos: 0,
        num_tokens: 1,
        block_table: &[99],
    }];
    assert!(paged_attention(&q1, &k, &v, &outside, bs, KvLayout::Rows, kv, scale).is_err());
    // Columns of another block size than the cache's.
    let seq = [PagedSeq {
        start_pos: 0,
        num_tokens: 1,
        block_table: &tables[0],
    }];
    let other = KvLayout::Columns { block_size: 2 * bs };
    assert!(paged_attention(&q1, &k, &v, &seq, bs, other, kv, scale).is_err());
}

/// A sequence's outputs are bit-identical alone, in a batch, and however its queries are
/// chunked, on every path and cache dtype.
#[test]
fn paged_rows_do_not_depend_on_the_batch_or_chunking() {
    let (bs, h, kv, d) = (4, 8, 2, 64);
    let (k, v, tables) = paged_cache(24, bs, kv, d, &[21, 9]);
    let q = Tensor::randn(0f32, 1.0, (21, h, d), &Device::Cpu).unwrap();
    let other_q = Tensor::randn(0f32, 1.0, (9, h, d), &Device::Cpu).unwrap();
    let scale = 0.125;
    for isa in supported_isas() {
        for dtype in [DType::F32, DType::BF16] {
            let (k, v) = (k.to_dtype(dtype).unwrap(), v.to_dtype(dtype).unwrap());
            let (q, other_q) = (q.to_dtype(dtype).unwrap(), other_q.to_dtype(dtype).unwrap());
            for (keys, layout) in layouts(&k, bs) {
                let run = |q: &Tensor, seqs: &[PagedSeq]| -> Vec<Vec<f32>> {
                    paged_attention_with_isa(q, &keys, &v, seqs, bs, layout, kv, scale, isa)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .to_vec2::<f32>()
                        .unwrap()
                };
                let seq = |start_pos, num_tokens| PagedSeq {
                    start_pos,
                    num_tokens,
                    block_table: &tables[0],
                };
                let whole = run(&q, &[seq(0, 21)]);
                // Chunked: 0..8, 8..20, then a decode of 20.
                let mut chunked = run(&q.narrow(0, 0, 8).unwrap(), &[seq(0, 8)]);
                chunked.extend(run(&q.narrow(0, 8, 12).unwrap(), &[seq(8, 12)]));
                chunked.extend(run(&q.narrow(0, 20, 1).unwrap(), &[seq(20, 1)]));
                assert_eq!(
                    whole, chunked,
                    "{isa} {dtype:?} {layout:?}: chunking changed the result"
                );
                // In a batch after another sequence's prefill.
                let batch_q = Tensor::cat(&[&other_q, &q.narrow(0, 20, 1).unwrap()], 0).unwrap();
                let other = PagedSeq {
                    start_pos: 0,
                    num_tokens: 9,
                    block_table: &tables[1],
                };
                let batched = run(&batch_q, &[other, seq(20, 1)]);
                assert_eq!(
                    batched[9], whole[20],
                    "{isa} {dtype:?} {layout:?}: the batch changed the result"
                );
            }
        }
    }
}

/// Contexts of several 256-key partitions, for every class of query heads per kv head (the
/// AVX-512 path packs groups of 1, 2, ≤4, ≤8, ≤16 and falls back above) and head dims of 64,
/// 128 and neither: against the reference, on every path, for a lone long decode (partitions
/// run in parallel) and a batch of them (each item runs its partitions in turn).
#[test]
fn paged_long_contexts_match_the_reference() {
    let bs = 16;
    for (h, kv, d) in [
        (14, 2, 64),
        (2, 2, 64),
        (4, 2, 128),
        (6, 2, 64),
        (16, 2, 64),
        (16, 1, 128),
        (20, 1, 64),
        (6, 2, 40),
    ] {
        let lens = [700usize, 300, 257, 513];
        let (k, v, tables) =
            paged_cache(lens.iter().map(|l| l.div_ceil(bs)).sum(), bs, kv, d, &lens);
        let (k, v) = (
            k.to_dtype(DType::BF16).unwrap(),
            v.to_dtype(DType::BF16).unwrap(),
        );
        let scale = 1.0 / (d as f32).sqrt();
        // One decode, then a batch: four decodes and the last 3 tokens of a prefill chunk.
        let one = [PagedSeq {
            start_pos: lens[0] - 1,
            num_tokens: 1,
            block_table: &tables[0],
        }];
        let mut many: Vec<PagedSeq> = lens
            .iter()
            .zip(&tables)
            .map(|(&len, t)| PagedSeq {
                start_pos: len - 1,
                num_tokens: 1,
                block_table: t,
            })
            .collect();
        many[3] = PagedSeq {
            start_pos: lens[3] - 3,
            num_tokens: 3,
            block_table: &tables[3],
        };
        for seqs in [&one[..], &many[..]] {
            let tokens: usize = seqs.iter().map(|s| s.num_tokens).sum();
            let q = Tensor::randn(0f32, 1.0, (tokens, h, d), &Device::Cpu).unwrap();
            let reference =
                paged_attention_ref(&q, &k, &v, seqs, bs, KvLayout::Rows, kv, scale).unwrap();
            for (keys, layout) in layouts(&k, bs) {
                for isa in supported_isas() {
                    let ours =
                        paged_attention_with_isa(&q, &keys, &v, seqs, bs, layout, kv, scale, isa)
                            .unwrap();
                    let diff = max_abs(&(ours - &reference).unwrap());
                    assert!(
                        diff < 1e-4,
                        "{isa} {layout:?} h={h} kv={kv} d={d} {} seqs: {diff}",
                        seqs.len()
                    );
                }
            }
        }
    }
}

/// A long sequence's rows are bit-identical whether it decodes alone (its partitions spread
/// over threads) or beside many other sequences (each item's partitions in turn), and however
/// its prompt was chunked across a partition boundary.
#[test]
fn paged_long_rows_do_not_depend_on_the_batch() {
    let (bs, h, kv, d) = (16, 14, 2, 64);
    let lens = [600usize, 40, 40, 40, 40, 40, 40, 40, 40];
    let (k, v, tables) = paged_cache(lens.iter().map(|l| l.div_ceil(bs)).sum(), bs, kv, d, &lens);
    let q = Tensor::randn(0f32, 1.0, (600, h, d), &Device::Cpu).unwrap();
    let scale = 0.125;
    for ((keys, layout), isa) in layouts(&k, bs).into_iter().flat_map(|l| {
        supported_isas()
            .into_iter()
            .map(move |isa| (l.clone(), isa))
    }) {
        let run = |q: &Tensor, seqs: &[PagedSeq]| -> Vec<Vec<f32>> {
            paged_attention_with_isa(q, &keys, &v, seqs, bs, layout, kv, scale, isa)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        let seq = |i: usize, start_pos, num_tokens| PagedSeq {
            start_pos,
            num_tokens,
            block_table: &tables[i],
        };
        let whole = run(&q, &[seq(0, 0, 600)]);
        // Chunks 0..250, 250..520 (across the cut at 256 and 512), then decodes.
        let mut chunked = run(&q.narrow(0, 0, 250).unwrap(), &[seq(0, 0, 250)]);
        chunked.extend(run(&q.narrow(0, 250, 270).unwrap(), &[seq(0, 250, 270)]));
        for p in 520..600 {
            chunked.extend(run(&q.narrow(0, p, 1).unwrap(), &[seq(0, p, 1)]));
        }
        assert_eq!(
            whole, chunked,
            "{isa} {layout:?}: chunking changed the result"
        );
        // The last decode beside eight others (enough items that none is split).
        let others = Tensor::randn(0f32, 1.0, (8, h, d), &Device::Cpu).unwrap();
        let batch_q = Tensor::cat(&[&others, &q.narrow(0, 599, 1).unwrap()], 0).unwrap();
        let mut seqs: Vec<PagedSeq> = (1..9).map(|i| seq(i, 39, 1)).collect();
        seqs.push(seq(0, 599, 1));
        let batched = run(&batch_q, &seqs);
        assert_eq!(
            batched[8], whole[599],
            "{isa}: the batch changed the result"
        );
    }
}
