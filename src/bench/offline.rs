//! `ember bench offline`: engine throughput without HTTP. For each concurrency C, submits C
//! requests of random prompt tokens at once (fixed input and output lengths, EOS ignored) and
//! reports output tokens per second over the whole batch, plus time to first token.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use ember_kernels::profile::{self, OpClass};

use crate::engine::{EngineEvent, EngineHandle, RequestStream, SamplingParams, ValidRequest};

#[derive(Debug, Clone, PartialEq)]
pub struct OfflineResult {
    pub concurrency: usize,
    pub input_len: usize,
    pub output_len: usize,
    pub elapsed: Duration,
    pub output_tokens: usize,
    pub mean_ttft: Duration,
}

impl OfflineResult {
    pub fn output_tokens_per_s(&self) -> f64 {
        self.output_tokens as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn wait(stream: RequestStream, start: Instant) -> Result<(usize, Duration)> {
    wait_then(stream, start, || {})
}

/// Reads a request's events to the end: (tokens, time to the first); `on_first` runs when the
/// first token arrives.
fn wait_then(
    mut stream: RequestStream,
    start: Instant,
    on_first: impl FnOnce(),
) -> Result<(usize, Duration)> {
    let (mut tokens, mut ttft) = (0, None);
    let mut on_first = Some(on_first);
    loop {
        match stream
            .blocking_recv()
            .ok_or_else(|| anyhow!("the engine stopped"))?
        {
            EngineEvent::Token { .. } => {
                tokens += 1;
                if let Some(f) = on_first.take() {
                    f();
                }
                ttft.get_or_insert_with(|| start.elapsed());
            }
            EngineEvent::Finished { .. } => return Ok((tokens, ttft.unwrap_or_default())),
            _ => {}
        }
    }
}

/// `len` random ids from the bulk of a vocabulary of `vocab`: no shared prefixes, and no special
/// tokens (past the first 1000 ids, below 100k; the middle half of a vocabulary too small for
/// that, as the tiny test models' are).
fn random_prompt(rng: &mut StdRng, vocab: u32, len: usize) -> Vec<u32> {
    let hi = vocab.clamp(1, 100_000);
    let lo = 1000.min(hi / 4);
    (0..len).map(|_| rng.random_range(lo..hi)).collect()
}

/// Runs one batch of `concurrency` requests.
pub fn run_offline(
    handle: &EngineHandle,
    concurrency: usize,
    input_len: usize,
    output_len: usize,
    seed: u64,
) -> Result<OfflineResult> {
    let vocab = handle.limits().vocab_size as u32;
    let mut rng = StdRng::seed_from_u64(seed);
    let requests: Vec<ValidRequest> = (0..concurrency)
        .map(|_| {
            let prompt = random_prompt(&mut rng, vocab, input_len);
            let mut r = ValidRequest::greedy(prompt, output_len);
            r.ignore_eos = true;
            r.sampling = SamplingParams::greedy();
            r
        })
        .collect();
    let start = Instant::now();
    let streams = requests
        .into_iter()
        .map(|r| handle.submit(r).map_err(|e| anyhow!("{e}")))
        .collect::<Result<Vec<_>>>()?;
    // One reader per stream, so each first token is timed when it arrives.
    let results: Vec<Result<(usize, Duration)>> = std::thread::scope(|scope| {
        let readers: Vec<_> = streams
            .into_iter()
            .map(|s| scope.spawn(move || wait(s, start)))
            .collect();
        readers
            .into_iter()
            .map(|r| {
                r.join()
                    .unwrap_or_else(|_| Err(anyhow!("a reader thread panicked")))
            })
            .collect()
    });
    let mut output_tokens = 0;
    let mut ttft_total = Duration::ZERO;
    for r in results {
        let (tokens, ttft) = r?;
        output_tokens += tokens;
        ttft_total += ttft;
    }
    Ok(OfflineResult {
        concurrency,
        input_len,
        output_len,
        elapsed: start.elapsed(),
        output_tokens,
        mean_ttft: ttft_total / concurrency.max(1) as u32,
    })
}

/// Time per token by op class.
pub type OpProfile = Vec<(OpClass, Duration)>;

/// Batch-1 speed: prompt tokens per second of a prefill, and decode tokens per second.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyResult {
    /// (prompt length, prefill tokens/s)
    pub prefill: Vec<(usize, f64)>,
    pub decode_tokens: usize,
    pub decode_tokens_per_s: f64,
    /// Where the decode steps' time went, per op class, per token (what no class claims is
    /// the rest of the step: the engine, candle's small ops, copies).
    pub decode_profile: OpProfile,
    /// (context length, decode tokens/s after a prompt of that length, its op profile per
    /// token)
    pub long_context: Vec<(usize, f64, OpProfile)>,
}

/// One request at a time: each prefill length with max_tokens 1 (time to the first token),
/// then `output_len` tokens after a 16-token prompt (decode rate after the first token, with
/// the op profile), then `output_len` tokens after a prompt of each `context_lens`, in
/// `rounds` interleaved rounds.
pub fn run_latency(
    handle: &EngineHandle,
    prefill_lens: &[usize],
    context_lens: &[usize],
    rounds: usize,
    output_len: usize,
    seed: u64,
) -> Result<LatencyResult> {
    let vocab = handle.limits().vocab_size as u32;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut prompt = |len: usize| -> Vec<u32> {
        (0..len)
            .map(|_| rng.random_range(1000..vocab.min(100_000)))
            .collect()
    };
    // (tokens, time to first token, total); the profile counts from the first token on.
    let one = |prompt: Vec<u32>, max_tokens: usize| -> Result<(usize, Duration, Duration)> {
        let mut r = ValidRequest::greedy(prompt, max_tokens);
        r.ignore_eos = true;
        let start = Instant::now();
        let stream = handle.submit(r).map_err(|e| anyhow!("{e}"))?;
        let (tokens, ttft) = wait_then(stream, start, profile::reset)?;
        Ok((tokens, ttft, start.elapsed()))
    };
    let decode_rate = |(tokens, ttft, total): (usize, Duration, Duration)| {
        tokens.saturating_sub(1) as f64 / (total - ttft).as_secs_f64().max(1e-9)
    };
    // A warm-up request so that first-call costs do not count.
    one(prompt(16), 2)?;
    let mut prefill = Vec::new();
    for &len in prefill_lens {
        let (_, ttft, _) = one(prompt(len), 1)?;
        prefill.push((len, len as f64 / ttft.as_secs_f64().max(1e-9)));
    }
    // Decode runs count op time from their first token on (`one` resets the counters then).
    let profiled = |prompt: Vec<u32>| -> Result<((usize, Duration, Duration), OpProfile)> {
        profile::set_enabled(true);
        let run = one(prompt, output_len.max(2));
        profile::set_enabled(false);
        let run = run?;
        let steps = run.0.saturating_sub(1).max(1) as u32;
        let per_token = profile::snapshot()
            .into_iter()
            .map(|(class, total)| (class, total / steps))
            .collect();
        Ok((run, per_token))
    };
    let (decode, decode_profile) = profiled(prompt(16))?;
    // Long contexts in interleaved rounds (each context once per round, the same prompt every
    // round, so later rounds reuse its cached prefix): the machine's bandwidth drifts by tens
    // of percent within minutes, and interleaving gives every context the same share of it.
    // Each context's rate is all its decode tokens over all its decode time.
    let prompts: Vec<Vec<u32>> = context_lens.iter().map(|&len| prompt(len)).collect();
    let mut sums = vec![(0usize, Duration::ZERO, OpProfile::new()); context_lens.len()];
    for _ in 0..rounds.max(1) {
        for (p, sum) in prompts.iter().zip(sums.iter_mut()) {
            let ((tokens, ttft, total), per_token) = profiled(p.clone())?;
            let steps = tokens.saturating_sub(1);
            sum.0 += steps;
            sum.1 += total - ttft;
            for (class, t) in per_token {
                let t = t * steps as u32;
                match sum.2.iter_mut().find(|(c, _)| *c == class) {
                    Some((_, acc)) => *acc += t,
                    None => sum.2.push((class, t)),
                }
            }
        }
    }
    let long_context = context_lens
        .iter()
        .zip(sums)
        .map(|(&len, (steps, time, profile))| {
            let rate = steps as f64 / time.as_secs_f64().max(1e-9);
            let per_token = profile
                .into_iter()
                .map(|(class, t)| (class, t / steps.max(1) as u32))
                .collect();
            (len, rate, per_token)
        })
        .collect();
    Ok(LatencyResult {
        prefill,
        decode_tokens: decode.0,
        decode_tokens_per_s: decode_rate(decode),
        decode_profile,
        long_context,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_fit_any_vocabulary() {
        let mut rng = StdRng::seed_from_u64(1);
        for vocab in [1, 2, 500, 151_936] {
            let p = random_prompt(&mut rng, vocab, 64);
            assert_eq!(p.len(), 64);
            assert!(p.iter().all(|&t| t < vocab), "vocab {vocab}");
        }
        let p = random_prompt(&mut rng, 151_936, 256);
        assert!(p.iter().all(|&t| (1000..100_000).contains(&t)));
    }
}
