//! Which instruction set the CPU kernels use, chosen once at run time so that one binary runs on
//! every x86-64 machine. `EMBER_CPU_ISA=scalar|avx2|avx512|avx512bf16` forces another supported
//! path (tests use it to exercise every path the machine can run); a path the CPU lacks is never
//! chosen.

use std::sync::OnceLock;

/// A CPU kernel path, from the most portable to the fastest. Each level includes the ones
/// below it; a CPU supports a prefix of this list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust, vectorized only as far as the compiler's baseline allows.
    Scalar,
    /// AVX2 + FMA + F16C: 8-lane f32 FMAs; bf16 and f16 weights widened in registers.
    Avx2,
    /// AVX-512 F/BW/VL: 16-lane f32 FMAs; masked tails; the quantized dot products take VNNI's
    /// `vpdpbusd` where the CPU has it.
    Avx512,
    /// AVX-512 BF16: bf16 × bf16 dot products in hardware (`vdpbf16ps`).
    Avx512Bf16,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
        }
    }

    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        self <= detect()
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The best path this CPU supports.
pub fn detect() -> Isa {
    static BEST: OnceLock<Isa> = OnceLock::new();
    *BEST.get_or_init(detect_uncached)
}

#[cfg(target_arch = "x86_64")]
fn detect_uncached() -> Isa {
    use std::arch::is_x86_feature_detected as has;
    let avx2 = has!("avx2") && has!("fma") && has!("f16c");
    let avx512 = avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl");
    match (avx2, avx512, avx512 && has!("avx512bf16")) {
        (_, _, true) => Isa::Avx512Bf16,
        (_, true, _) => Isa::Avx512,
        (true, _, _) => Isa::Avx2,
        _ => Isa::Scalar,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_uncached() -> Isa {
    Isa::Scalar
}

/// The path every kernel uses in this process: the fastest supported one (see [`preferred`]),
/// or the one named by `EMBER_CPU_ISA`.
pub fn cpu_isa() -> Isa {
    selection().0
}

/// A sentence for the startup log when `EMBER_CPU_ISA` could not be honoured as written.
pub fn cpu_isa_warning() -> Option<&'static str> {
    selection().1.as_deref()
}

/// Every path this CPU can run, lowest first.
pub fn supported_isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
}

/// The path used unless `EMBER_CPU_ISA` says otherwise: the best supported one, except that
/// AVX-512 BF16 is used only where `vdpbf16ps` outruns plain f32 FMAs. It does on AMD Zen 4
/// (one 512-bit dot product per cycle, twice the FMA's products); on the Intel Xeon of
/// 2026-12-02 it retires one every two cycles, half the products of two FMA ports, and the
/// AVX-512 path measured faster in prefill (docs/BENCHMARKS.md). Timing a few ms at start-up
/// decides, with a wide margin so that noise cannot flip it.
pub fn preferred() -> Isa {
    static PREFERRED: OnceLock<Isa> = OnceLock::new();
    *PREFERRED.get_or_init(|| match detect() {
        Isa::Avx512Bf16 if !bf16_dot_is_faster() => Isa::Avx512,
        best => best,
    })
}

#[cfg(target_arch = "x86_64")]
fn bf16_dot_is_faster() -> bool {
    use std::arch::x86_64::*;
    use std::time::Instant;
    const STEPS: usize = 16_384;

    /// # Safety
    /// The CPU must support AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dots(x: __m512i) -> f32 {
        // SAFETY: the feature is enabled; __m512i and __m512bh are both 64-byte vectors.
        let xb = unsafe { std::mem::transmute::<__m512i, __m512bh>(x) };
        let mut acc = [_mm512_setzero_ps(); 16];
        for _ in 0..STEPS {
            for a in acc.iter_mut() {
                *a = _mm512_dpbf16_ps(*a, xb, xb);
            }
        }
        acc.iter().fold(0.0, |s, a| s + _mm512_reduce_add_ps(*a))
    }

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    unsafe fn fmas(x: __m512) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 16];
        for _ in 0..STEPS {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, x, x);
            }
        }
        acc.iter().fold(0.0, |s, a| s + _mm512_reduce_add_ps(*a))
    }

    let time = |f: &dyn Fn() -> f32| {
        let start = Instant::now();
        std::hint::black_box(f());
        start.elapsed().as_secs_f64()
    };
    // SAFETY (both calls): detect() found AVX-512 BF16, which implies AVX-512F.
    let dot = || unsafe { dots(std::hint::black_box(_mm512_set1_epi16(0x3f80))) };
    let fma = || unsafe { fmas(std::hint::black_box(_mm512_set1_ps(0.5))) };
    // Fastest of several alternating trials (the first ones warm both units up): a trial the
    // scheduler interrupts (start-up loads the tokenizer and packs weights beside this) only
    // lengthens its own time and cannot flip the choice.
    let (mut dot_s, mut fma_s) = (f64::MAX, f64::MAX);
    for _ in 0..6 {
        dot_s = dot_s.min(time(&dot));
        fma_s = fma_s.min(time(&fma));
    }
    // Products per second: a dot step does 32, an FMA 16.
    let dot_rate = 32.0 / dot_s.max(1e-9);
    let fma_rate = 16.0 / fma_s.max(1e-9);
    dot_rate > 1.3 * fma_rate
}

#[cfg(not(target_arch = "x86_64"))]
fn bf16_dot_is_faster() -> bool {
    false
}

fn selection() -> &'static (Isa, Option<String>) {
    static SELECTED: OnceLock<(Isa, Option<String>)> = OnceLock::new();
    SELECTED.get_or_init(|| {
        let best = detect();
        match std::env::var("EMBER_CPU_ISA") {
            Err(_) => (preferred(), None),
            Ok(v) if v.trim().is_empty() => (preferred(), None),
            Ok(v) => match Isa::parse(&v) {
                Some(isa) if isa <= best => (isa, None),
                Some(isa) => (
                    preferred(),
                    Some(format!(
                        "EMBER_CPU_ISA={isa} is not supported by this CPU; using {}",
                        preferred()
                    )),
                ),
                None => (
                    preferred(),
                    Some(format!(
                        "EMBER_CPU_ISA={v:?} is not one of scalar, avx2, avx512, avx512bf16; using {}",
                        preferred()
                    )),
                ),
            },
        }
    })
}

/// Test support: reruns the running test binary once for every other path this CPU supports,
/// with `EMBER_CPU_ISA` set (and `skip_test`, the caller, skipped), so a whole
/// suite runs on every path. Returns the paths that passed, or what failed. Inside such a rerun
/// (`EMBER_CPU_ISA` already set) it does nothing.
pub fn rerun_tests_on_other_isas(skip_test: &str) -> Result<Vec<Isa>, String> {
    if std::env::var_os("EMBER_CPU_ISA").is_some() {
        return Ok(Vec::new());
    }
    let exe = std::env::current_exe().map_err(|e| format!("current test binary: {e}"))?;
    let mut passed = Vec::new();
    for isa in supported_isas().into_iter().filter(|&i| i != cpu_isa()) {
        let out = std::process::Command::new(&exe)
            .args(["--skip", skip_test, "--test-threads", "2"])
            .env("EMBER_CPU_ISA", isa.name())
            .output()
            .map_err(|e| format!("rerunning {} on {isa}: {e}", exe.display()))?;
        if !out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "EMBER_CPU_ISA={isa}: {}\n{}\n{}",
                out.status,
                tail.join("\n"),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        passed.push(isa);
    }
    Ok(passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_levels_are_ordered() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert_eq!(Isa::parse(" AVX2 "), Some(Isa::Avx2));
        assert_eq!(Isa::parse("sse"), None);
        assert!(Isa::Scalar < Isa::Avx2 && Isa::Avx512 < Isa::Avx512Bf16);
        assert!(Isa::Scalar.is_supported());
        let supported = supported_isas();
        assert_eq!(supported.last().copied(), Some(detect()));
        assert!(cpu_isa() <= detect() && preferred() <= detect());
    }
}
