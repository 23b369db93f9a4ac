mod common;

use candle_core::{DType, Device, Tensor};
use common::max_abs;
use ember_kernels::{linear, linear_ref};

#[test]
fn matches_candle_matmul() {
    for (m, n, k) in [(1, 5, 3), (3, 70, 37), (9, 33, 64), (130, 96, 200)] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let diff = max_abs(&(linear(&x, &w).unwrap() - linear_ref(&x, &w).unwrap()).unwrap());
        assert!(diff < 1e-4, "f32 {m}x{n}x{k}: {diff}");
        // bf16: both round the f32 result once; allow one bf16 ulp of the largest value.
        let (xb, wb) = (
            x.to_dtype(DType::BF16).unwrap(),
            w.to_dtype(DType::BF16).unwrap(),
        );
        let ours = linear(&xb, &wb).unwrap();
        assert_eq!(ours.dtype(), DType::BF16);
        let reference = linear_ref(
            &xb.to_dtype(DType::F32).unwrap(),
            &wb.to_dtype(DType::F32).unwrap(),
        )
        .unwrap();
        let diff = max_abs(&(ours.to_dtype(DType::F32).unwrap() - &reference).unwrap());
        assert!(
            diff <= max_abs(&reference) / 128.0,
            "bf16 {m}x{n}x{k}: {diff}"
        );
    }
}

/// A row's result is bit-identical whatever else is in the batch.
#[test]
fn rows_do_not_depend_on_the_batch() {
    let (n, k) = (77, 301);
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    let batch = Tensor::randn(0f32, 1.0, (37, k), &Device::Cpu).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let (w, batch) = (w.to_dtype(dtype).unwrap(), batch.to_dtype(dtype).unwrap());
        let all = linear(&batch, &w)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, row) in all.iter().enumerate() {
            let alone = linear(&batch.narrow(0, i, 1).unwrap(), &w).unwrap();
            let alone = alone
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(&alone[0], row, "{dtype:?} row {i}");
            let window = linear(
                &batch
                    .narrow(
                        0,
                        i.saturating_sub(2),
                        (i + 3).min(37) - i.saturating_sub(2),
                    )
                    .unwrap(),
                &w,
            )
            .unwrap();
            let window = window
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(
                &window[i - i.saturating_sub(2)],
                row,
                "{dtype:?} row {i} in a window"
            );
        }
    }
}
