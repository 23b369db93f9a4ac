mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs, max_abs_diff};
use ember_kernels::{silu_and_mul, silu_and_mul_ref};

fn devices() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    match Device::new_cuda(0) {
        Ok(d) => devices.push(d),
        Err(_) => eprintln!("no CUDA device: silu_and_mul checked on CPU only"),
    }
    devices
}

#[test]
fn fused_matches_reference_for_each_dtype() {
    for device in devices() {
        let x = Tensor::randn(0f32, 3.0, (7, 2 * 45), &device).unwrap();
        // Both compute in f32 and round once, so they differ by at most one unit in the last place.
        for (dtype, rel_tol) in [
            (DType::F32, 1e-6),
            (DType::BF16, 1.0 / 128.0),
            (DType::F16, 1.0 / 1024.0),
        ] {
            let x = x.to_dtype(dtype).unwrap();
            let fused = silu_and_mul(&x).unwrap();
            let reference = silu_and_mul_ref(&x).unwrap();
            assert_eq!(fused.dims(), &[7, 45]);
            assert_eq!(fused.dtype(), dtype);
            let diff = max_abs_diff(&fused, &reference);
            let scale = max_abs(&reference);
            let tol = rel_tol * scale;
            assert!(diff <= tol, "{device:?} {dtype:?}: max abs diff {diff}");
        }
    }
}

#[test]
fn matches_the_definition_on_known_values() {
    // gate = [0, 1, -2], up = [5, 2, 3]: silu(0)=0, silu(1)=0.7310586, silu(-2)=-0.23840584
    let x = Tensor::new(&[[0f32, 1.0, -2.0, 5.0, 2.0, 3.0]], &Device::Cpu).unwrap();
    let y = silu_and_mul(&x).unwrap().to_vec2::<f32>().unwrap();
    let expected = [0.0, 2.0 * 0.731_058_6, 3.0 * -0.238_405_84];
    for (a, b) in y[0].iter().zip(expected) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}

#[test]
fn rejects_odd_width() {
    let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
    assert!(silu_and_mul(&x).is_err());
}
