mod common;

use candle_core::{Device, Tensor};
use common::max_abs;
use ember_kernels::{causal_attention, causal_attention_ref};

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
