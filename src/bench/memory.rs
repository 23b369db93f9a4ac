//! `ember bench memory`: the machine's read bandwidth, the ceiling of batch-1 decode (every
//! weight is read once per token).

use std::time::Instant;

/// Best read bandwidth in GB/s of `threads` threads summing disjoint parts of a `bytes` buffer,
/// over `reps` passes (the buffer is much larger than the caches).
pub fn read_bandwidth(bytes: usize, threads: usize, reps: usize) -> f64 {
    let words = (bytes / 8).max(threads.max(1) * 8);
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads.max(1));
    let mut best = 0.0f64;
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let parts: Vec<_> = buf
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        // Sixteen independent lanes: the compiler turns this into vector adds,
                        // so the loop is bound by loads, not by the adds.
                        let mut acc = [0u64; 16];
                        for block in part.chunks_exact(16) {
                            for i in 0..16 {
                                acc[i] = acc[i].wrapping_add(block[i]);
                            }
                        }
                        acc.iter().fold(0u64, |x, &y| x.wrapping_add(y))
                    })
                })
                .collect();
            parts
                .into_iter()
                .map(|p| p.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best = best.max((words * 8) as f64 / secs / 1e9);
    }
    best
}
