//! With feature `cuda`, compiles every `src/cuda/*.cu` to PTX with nvcc (NVCC or `nvcc` on
//! PATH). PTX for `compute_$CUDA_COMPUTE_CAP` (default 80) is JIT-compiled by the driver for
//! newer GPUs too. Without the feature nothing here runs, so CPU builds never need CUDA.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cuda");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".to_string());
    let mut sources: Vec<PathBuf> = std::fs::read_dir("src/cuda")
        .expect("kernels/src/cuda exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for src in sources {
        let stem = src.file_stem().expect("a .cu file has a stem");
        let ptx = out_dir.join(stem).with_extension("ptx");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "--use_fast_math"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("could not run {nvcc} (set NVCC or PATH): {e}"));
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}
