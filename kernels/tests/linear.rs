mod common;

use candle_core::{DType, Device, Tensor};
use common::max_abs;
use ember_kernels::{cpu_isa, linear, linear_ref, linear_with_isa, supported_isas};

fn randn(shape: (usize, usize)) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).expect("random tensor")
}

fn to_f32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32).expect("to f32")
}

/// Every path this CPU can run, every weight dtype, against candle's f32 matmul on the same
/// (rounded) inputs. Shapes cover k tails (not a multiple of 8, 16 or 32), m tails (1-3 rows
/// beyond a block of 4) and n tails.
#[test]
fn every_path_matches_candle_matmul() {
    for isa in supported_isas() {
        for (m, n, k) in [
            (1, 5, 3),
            (3, 70, 37),
            (9, 33, 64),
            (2, 41, 100),
            (130, 96, 200),
        ] {
            let (x, w) = (randn((m, k)), randn((n, k)));
            let b = randn((1, n)).flatten_all().expect("bias");
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let (x, w, b) = (
                    x.to_dtype(dtype).unwrap(),
                    w.to_dtype(dtype).unwrap(),
                    b.to_dtype(dtype).unwrap(),
                );
                let ours = linear_with_isa(&x, &w, Some(&b), isa).unwrap();
                assert_eq!(ours.dtype(), dtype);
                let reference = linear_ref(&to_f32(&x), &to_f32(&w))
                    .unwrap()
                    .broadcast_add(&to_f32(&b))
                    .unwrap();
                let diff = max_abs(&(to_f32(&ours) - &reference).unwrap());
                // f32: summation order only. bf16/f16: one rounding of the result.
                let tol = match dtype {
                    DType::F32 => 1e-4,
                    DType::BF16 => max_abs(&reference) / 128.0,
                    _ => max_abs(&reference) / 1024.0,
                };
                assert!(diff <= tol, "{isa} {dtype:?} {m}x{n}x{k}: {diff} > {tol}");
            }
        }
    }
}

#[test]
fn default_path_and_bias_entry_points_agree() {
    let (x, w) = (randn((5, 48)), randn((19, 48)));
    let b = randn((1, 19)).flatten_all().unwrap();
    let plain = linear(&x, &w).unwrap();
    let with_bias = linear_with_isa(&x, &w, Some(&b), cpu_isa()).unwrap();
    let diff = max_abs(&((plain.broadcast_add(&b).unwrap()) - with_bias).unwrap());
    assert!(diff < 1e-5, "{diff}");
}

/// A row's result is bit-identical whatever else is in the batch, on every path.
#[test]
fn rows_do_not_depend_on_the_batch() {
    let (n, k) = (77, 301);
    let w = randn((n, k));
    let batch = randn((37, k));
    for isa in supported_isas() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (w, batch) = (w.to_dtype(dtype).unwrap(), batch.to_dtype(dtype).unwrap());
            let run = |x: &Tensor| -> Vec<Vec<f32>> {
                to_f32(&linear_with_isa(x, &w, None, isa).unwrap())
                    .to_vec2::<f32>()
                    .unwrap()
            };
            let all = run(&batch);
            for (i, row) in all.iter().enumerate() {
                let alone = run(&batch.narrow(0, i, 1).unwrap());
                assert_eq!(&alone[0], row, "{isa} {dtype:?} row {i}");
                let lo = i.saturating_sub(2);
                let window = run(&batch.narrow(0, lo, (i + 3).min(37) - lo).unwrap());
                assert_eq!(&window[i - lo], row, "{isa} {dtype:?} row {i} in a window");
            }
        }
    }
}
