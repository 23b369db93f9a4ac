//! The worker pool every CPU kernel runs on (rayon's global pool).

/// Runs `f` on one of the pool's worker threads and returns its result.
///
/// Every kernel splits its work with rayon. Called from a thread outside the pool (the
/// engine's), each kernel call hands its work to the pool and sleeps until it is done: two
/// thread wake-ups per op, ~170 ops in a decode step (measured ~80 µs per call on the 2-vCPU
/// VM, most of a short-context attention call). Inside `on_pool` the caller is a worker: it
/// takes its share of each op's work and the other workers are still spinning between ops.
/// Wrap a whole forward pass, not each op.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    // `scope` runs its body on a worker thread of the global pool.
    rayon::scope(|_| f())
}
