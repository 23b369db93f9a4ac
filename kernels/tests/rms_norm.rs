mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs, max_abs_diff};
use ember_kernels::{add_rms_norm, add_rms_norm_ref, rms_norm};

const EPS: f64 = 1e-6;

/// Each dtype with the tolerance of one rounding to it, relative to the largest value.
const DTYPES: [(DType, f32); 3] = [
    (DType::F32, 1e-5),
    (DType::BF16, 1.0 / 64.0),
    (DType::F16, 1.0 / 512.0),
];

fn inputs(device: &Device, d: usize) -> (Tensor, Tensor, Tensor) {
    let x = Tensor::randn(0f32, 2.0, (5, d), device).unwrap();
    let h = Tensor::randn(0f32, 1.0, (5, d), device).unwrap();
    let w = Tensor::randn(1f32, 0.3, d, device).unwrap();
    (x, h, w)
}

fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    let f = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    f(a).iter()
        .zip(f(b))
        .all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn the_fused_add_is_the_add_then_the_norm_bit_for_bit_on_cpu() {
    // 896 as in Qwen2.5-0.5B; 45 leaves a tail after the 16-lane sums.
    for d in [896, 45] {
        let (x, h, w) = inputs(&Device::Cpu, d);
        for (dtype, tol) in DTYPES {
            let (x, h, w) = (
                x.to_dtype(dtype).unwrap(),
                h.to_dtype(dtype).unwrap(),
                w.to_dtype(dtype).unwrap(),
            );
            let (sum, normed) = add_rms_norm(&x, &h, &w, EPS).unwrap();
            assert_eq!((sum.dims(), sum.dtype()), (x.dims(), dtype));
            assert_eq!(normed.dims(), x.dims());
            let plain_sum = (&x + &h).unwrap();
            assert!(same_bits(&sum, &plain_sum), "{dtype:?} d {d}: the sum");
            let plain = rms_norm(&plain_sum, &w, EPS).unwrap();
            assert!(same_bits(&normed, &plain), "{dtype:?} d {d}: the norm");
            // And within a rounding of the plain-candle reference.
            let (_, reference) = add_rms_norm_ref(&x, &h, &w, EPS).unwrap();
            let diff = max_abs_diff(&normed, &reference);
            assert!(diff <= tol * max_abs(&reference), "{dtype:?} d {d}: {diff}");
        }
    }
}

#[test]
fn mismatched_shapes_are_errors() {
    let (x, _, w) = inputs(&Device::Cpu, 8);
    let h = Tensor::zeros((5, 7), DType::F32, &Device::Cpu).unwrap();
    assert!(add_rms_norm(&x, &h, &w, EPS).is_err());
    let w7 = Tensor::ones(7, DType::F32, &Device::Cpu).unwrap();
    assert!(rms_norm(&x, &w7, EPS).is_err());
}

#[test]
fn cuda_kernels_match_the_cpu() {
    let Ok(gpu) = Device::new_cuda(0) else {
        eprintln!("no CUDA device: the rms_norm kernels are checked on CPU only");
        return;
    };
    // 4096 as in Qwen3-8B (more than one element per thread), 45 (fewer threads than a warp).
    for d in [4096, 896, 45] {
        let (x, h, w) = inputs(&Device::Cpu, d);
        for (dtype, tol) in DTYPES {
            let cpu: Vec<Tensor> = [&x, &h, &w]
                .iter()
                .map(|t| t.to_dtype(dtype).unwrap())
                .collect();
            let dev: Vec<Tensor> = cpu.iter().map(|t| t.to_device(&gpu).unwrap()).collect();
            let want = rms_norm(&cpu[0], &cpu[2], EPS).unwrap();
            let got = rms_norm(&dev[0], &dev[2], EPS)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
            let scale = max_abs(&want);
            assert!(
                max_abs_diff(&got, &want) <= tol * scale,
                "rms_norm {dtype:?} d {d}"
            );
            let (want_sum, want) = add_rms_norm(&cpu[0], &cpu[1], &cpu[2], EPS).unwrap();
            let (sum, got) = add_rms_norm(&dev[0], &dev[1], &dev[2], EPS).unwrap();
            let sum = sum.to_device(&Device::Cpu).unwrap();
            let got = got.to_device(&Device::Cpu).unwrap();
            assert!(
                same_bits(&sum, &want_sum),
                "add_rms_norm {dtype:?} d {d}: the sum"
            );
            assert!(
                max_abs_diff(&got, &want) <= tol * scale.max(max_abs(&want)),
                "add_rms_norm {dtype:?} d {d}"
            );
        }
    }
}
