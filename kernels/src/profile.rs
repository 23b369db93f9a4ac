//! Where a forward pass spends its time, by op class: wall time of each hot op on the thread that
//! calls it, summed into process-wide counters. Off unless [`set_enabled`] is called (then one
//! relaxed atomic load per op), so serving pays nothing. `ember bench offline --latency` turns it
//! on around a decode run and prints the split.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What an op counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    /// `linear`: every projection and the lm_head.
    Matmul,
    /// KV writes and attention over the cache.
    Attention,
    /// RMSNorm.
    Norm,
    /// Rotary embeddings.
    Rope,
    /// SiLU(gate)·up and the MoE routing.
    Activation,
    /// Logit processing and sampling.
    Sampling,
}

impl OpClass {
    pub const ALL: [OpClass; 6] = [
        OpClass::Matmul,
        OpClass::Attention,
        OpClass::Norm,
        OpClass::Rope,
        OpClass::Activation,
        OpClass::Sampling,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpClass::Matmul => "matmul",
            OpClass::Attention => "attention",
            OpClass::Norm => "norm",
            OpClass::Rope => "rope",
            OpClass::Activation => "activation",
            OpClass::Sampling => "sampling",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Starts or stops counting.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Zeroes every counter.
pub fn reset() {
    for n in &NANOS {
        n.store(0, Ordering::Relaxed);
    }
}

/// Time counted per class since the last [`reset`].
pub fn snapshot() -> Vec<(OpClass, Duration)> {
    OpClass::ALL
        .iter()
        .zip(&NANOS)
        .map(|(&c, n)| (c, Duration::from_nanos(n.load(Ordering::Relaxed))))
        .collect()
}

/// Counts the time until it is dropped against its class.
#[must_use]
pub struct Timer {
    class: OpClass,
    start: Option<Instant>,
}

/// Times the enclosing scope as `class` when profiling is on.
pub fn timer(class: OpClass) -> Timer {
    let start = ENABLED.load(Ordering::Relaxed).then(Instant::now);
    Timer { class, start }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some(start) = self.start {
            let nanos = start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
            NANOS[self.class as usize].fetch_add(nanos, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_while_enabled() {
        reset();
        drop(timer(OpClass::Rope));
        let rope = |s: &[(OpClass, Duration)]| s[OpClass::Rope as usize].1;
        assert_eq!(rope(&snapshot()), Duration::ZERO);
        set_enabled(true);
        {
            let _t = timer(OpClass::Rope);
            std::thread::sleep(Duration::from_millis(2));
        }
        set_enabled(false);
        assert!(rope(&snapshot()) >= Duration::from_millis(2));
        assert_eq!(snapshot()[OpClass::Matmul as usize].0, OpClass::Matmul);
    }
}
