//! Per-sequence sampling: logit processors (logit_bias, min_tokens, repetition / presence /
//! frequency penalties), then greedy or temperature sampling with top-k, top-p and min-p, from
//! a per-sequence seeded RNG so that a seeded request gets the same tokens whatever else runs
//! in its batch. Log-probabilities are those of the model's raw distribution.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use llguidance::toktrie::SimpleVob;

use super::grammar::apply_mask;
use super::request::TokenLogprob;

/// Validated sampling parameters of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus filtering.
    pub top_p: f32,
    /// 0 disables top-k filtering.
    pub top_k: usize,
    /// 0 disables min-p filtering.
    pub min_p: f32,
    /// 1.0 disables it; divides positive and multiplies negative logits of seen tokens.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
    /// How many most likely alternatives to report per token (0..=20), when logprobs are wanted.
    pub top_logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            top_logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// The sampled token with its log-probability and, when asked for, the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Occurrences of each generated token (frequency/presence penalties).
    output_counts: HashMap<u32, u32>,
    /// Tokens of the prompt and output (repetition penalty).
    seen: std::collections::HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let seen = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            Default::default()
        };
        Self {
            params,
            rng,
            output_counts: HashMap::new(),
            seen,
        }
    }

    /// Picks the next token from one row of logits. `banned` tokens (EOS and stop ids while
    /// below min_tokens) cannot be picked.
    pub fn sample(&mut self, logits: &[f32], banned: &[u32]) -> SampledToken {
        self.sample_or_force(logits, banned, None, None)
    }

    /// As `sample`, but only tokens `allowed` (a grammar's mask) may be picked, and `forced`
    /// (a test hook's scripted token) is taken instead of drawing one; its log-probability is
    /// still the model's.
    pub fn sample_or_force(
        &mut self,
        logits: &[f32],
        banned: &[u32],
        allowed: Option<&SimpleVob>,
        forced: Option<u32>,
    ) -> SampledToken {
        let token = match forced {
            Some(token) => token,
            // No processor would change a logit: pick from them as they are, without a
            // vocabulary-sized copy (every greedy or plain-sampling decode step).
            None if allowed.is_none() && self.processes_nothing(banned) => self.pick(logits),
            // Greedy under a grammar: the best allowed token, read through the mask's bits
            // (most words are empty), without a vocabulary-sized copy.
            None if self.params.temperature < SAMPLING_EPS && self.processes_nothing(banned) => {
                match allowed {
                    Some(mask) => argmax_allowed(logits, mask),
                    None => argmax(logits),
                }
            }
            None => {
                let mut logits = logits.to_vec();
                self.process(&mut logits, banned);
                // The mask last, before temperature and the filters: nothing it refuses can
                // come back.
                if let Some(mask) = allowed {
                    apply_mask(mask, &mut logits);
                }
                self.pick(&logits)
            }
        };
        self.record(token);
        let (logprob, top_logprobs) = match self.params.top_logprobs {
            Some(k) => {
                let lp = token_logprob(logits, token, k);
                (lp.logprob, lp.top)
            }
            None => (f32::NAN, Vec::new()),
        };
        SampledToken {
            token,
            logprob,
            top_logprobs,
        }
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature < SAMPLING_EPS {
            argmax(logits)
        } else {
            self.sample_random(logits)
        }
    }

    /// Whether [`Self::process`] would leave every logit as it is.
    fn processes_nothing(&self, banned: &[u32]) -> bool {
        let p = &self.params;
        banned.is_empty()
            && p.logit_bias.is_empty()
            && (p.repetition_penalty == 1.0 || self.seen.is_empty())
            && ((p.presence_penalty == 0.0 && p.frequency_penalty == 0.0)
                || self.output_counts.is_empty())
    }

    fn process(&self, logits: &mut [f32], banned: &[u32]) {
        let p = &self.params;
        for &(token, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(token as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &count) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * count as f32 + p.presence_penalty;
                }
            }
        }
        for &t in banned {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    fn record(&mut self, token: u32) {
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            *self.output_counts.entry(token).or_insert(0) += 1;
        }
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weight = |l: f32| ((l - max) * inv_t).exp();
        if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
            // Plain temperature sampling: one pass over the vocabulary, no sort.
            let total: f32 = logits.iter().map(|&l| weight(l)).sum();
            let mut r = self.rng.random::<f32>() * total;
            let mut last = 0;
            for (i, &l) in logits.iter().enumerate() {
                let w = weight(l);
                if w > 0.0 {
                    last = i;
                    if r < w {
                        return i as u32;
                    }
                    r -= w;
                }
            }
            return last as u32;
        }
        // (token, weight), highest first; ties by token id.
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, weight(l)))
            .filter(|&(_, w)| w > 0.0)
            .collect();
        let by_weight = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < candidates.len() {
            candidates.select_nth_unstable_by(p.top_k - 1, by_weight);
            candidates.truncate(p.top_k);
        }
        candidates.sort_unstable_by(by_weight);
        if p.min_p > 0.0 {
            // Relative to the most likely token (weights are exp(l - max)/T, so its weight is 1).
            let threshold = p.min_p * candidates.first().map_or(0.0, |c| c.1);
            candidates.retain(|c| c.1 >= threshold);
        }
        if p.top_p < 1.0 {
            let total: f32 = candidates.iter().map(|c| c.1).sum();
            let mut cumulative = 0.0;
            let mut keep = candidates.len();
            for (i, c) in candidates.iter().enumerate() {
                cumulative += c.1 / total;
                if cumulative >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            candidates.truncate(keep);
        }
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(token, w) in &candidates {
            if r < w {
                return token;
            }
            r -= w;
        }
        candidates.last().map_or(0, |c| c.0)
    }
}

/// Temperatures below this sample greedily (as vLLM): dividing by a temperature near zero
/// overflows the weights to infinity and NaN.
pub const SAMPLING_EPS: f32 = 1e-5;

/// The seed of completion `index` of a request seeded with `seed`: completion 0 keeps the seed,
/// the others get a mixed one, so that no (seed, index) pair repeats another request's
/// completion 0 the way `seed + index` made (s, 1) equal (s + 1, 0).
pub fn completion_seed(seed: u64, index: usize) -> u64 {
    if index == 0 {
        return seed;
    }
    // SplitMix64's finalizer over the seed and the index.
    let mut z = seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Index of the largest logit; the lowest index wins ties (as torch.argmax). NaNs are never
/// the largest; 0 when there is none. Two branch-free passes the compiler vectorizes: a
/// vocabulary of 152k is read twice in ~0.03 ms, where one branchy pass took ~0.1 ms of every
/// decode step.
pub fn argmax(logits: &[f32]) -> u32 {
    let max = logits
        .iter()
        .fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

/// As [`argmax`] over the tokens `mask` allows (lowest index on ties, NaN never); [`argmax`]
/// of all when it allows none.
pub fn argmax_allowed(logits: &[f32], mask: &SimpleVob) -> u32 {
    let mut best: Option<(u32, f32)> = None;
    for (w, &bits) in mask.as_slice().iter().enumerate() {
        let mut bits = bits;
        while bits != 0 {
            let token = w * 32 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if let Some(&l) = logits.get(token) {
                if best.is_none_or(|(_, b)| l > b) && !l.is_nan() {
                    best = Some((token as u32, l));
                }
            }
        }
    }
    best.map_or_else(|| argmax(logits), |(token, _)| token)
}

pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let log_z = log_normalizer(logits);
    logits.iter().map(|&l| l - log_z).collect()
}

/// log Σ exp(logits), the log-softmax's normalizer (the sum in f64).
fn log_normalizer(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// `token`'s log-probability and the `k` most likely (token, logprob) under `logits`, exactly
/// as [`log_softmax`] and [`top_k_of`] give them, without a vocabulary-sized allocation.
pub fn token_logprob(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let log_z = log_normalizer(logits);
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &l) in logits.iter().enumerate() {
            let c = (i as u32, l - log_z);
            // Ids only grow: a tie with the worst kept entry ranks after it.
            if top.len() == k && top.last().is_some_and(|w| by_logprob(&c, w).is_ge()) {
                continue;
            }
            let at = top.partition_point(|t| by_logprob(t, &c).is_lt());
            top.insert(at, c);
            top.truncate(k);
        }
    }
    TokenLogprob {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| l - log_z),
        top,
    }
}

/// Highest log-probability first; ties by token id.
fn by_logprob(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The `k` most likely (token, logprob), highest first; ties by token id (the reference for
/// [`token_logprob`]).
pub fn top_k_of(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    if k > 0 && k < all.len() {
        all.select_nth_unstable_by(k - 1, by_logprob);
    }
    all.truncate(k);
    all.sort_unstable_by(by_logprob);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_logprob_equals_the_full_log_softmax_and_top_k() {
        let mut rng = StdRng::seed_from_u64(7);
        // Coarse values: many exact ties, which rank by token id.
        let logits: Vec<f32> = (0..5000)
            .map(|_| (rng.random_range(0..40) as f32) * 0.25 - 5.0)
            .collect();
        let full = log_softmax(&logits);
        for k in [0, 1, 5, 20] {
            for token in [0u32, 17, 4999] {
                let lp = token_logprob(&logits, token, k);
                assert_eq!(lp.logprob, full[token as usize]);
                assert_eq!(lp.top, top_k_of(&full, k), "k {k}");
            }
        }
    }

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params, &[])
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]).token, 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        for params in [
            SamplingParams {
                temperature: 0.8,
                seed: Some(7),
                ..Default::default()
            },
            SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
                top_k: 20,
                min_p: 0.05,
                seed: Some(7),
                ..Default::default()
            },
        ] {
            let run = || {
                let mut s = sampler(params.clone());
                (0..20)
                    .map(|_| s.sample(&logits, &[]).token)
                    .collect::<Vec<_>>()
            };
            assert_eq!(run(), run());
        }
    }

    #[test]
    fn top_k_top_p_and_min_p_keep_the_right_candidates() {
        let logits = [1.0, 5.0, 2.0, 4.9];
        let seen = |params: SamplingParams| {
            let mut s = sampler(params);
            (0..300)
                .map(|_| s.sample(&logits, &[]).token)
                .collect::<std::collections::BTreeSet<u32>>()
        };
        let base = SamplingParams {
            temperature: 1.0,
            seed: Some(1),
            ..Default::default()
        };
        assert_eq!(
            seen(SamplingParams {
                top_k: 1,
                ..base.clone()
            }),
            [1].into()
        );
        // p(1) ~ 0.50, p(3) ~ 0.45: top_p 0.6 keeps exactly those two.
        assert_eq!(
            seen(SamplingParams {
                top_p: 0.6,
                ..base.clone()
            }),
            [1, 3].into()
        );
        // min_p 0.5: tokens at least half as likely as the best: 1 and 3.
        assert_eq!(
            seen(SamplingParams {
                min_p: 0.5,
                ..base.clone()
            }),
            [1, 3].into()
        );
        assert_eq!(seen(base), [0, 1, 2, 3].into());
    }

    #[test]
    fn penalties_and_bias_change_the_greedy_choice() {
        // Frequency penalty: after picking 0 twice its logit drops below 1's.
        let mut s = sampler(SamplingParams {
            frequency_penalty: 0.6,
            ..SamplingParams::greedy()
        });
        let logits = [2.0, 1.0];
        let picks: Vec<u32> = (0..3).map(|_| s.sample(&logits, &[]).token).collect();
        assert_eq!(picks, vec![0, 0, 1]);
        // Presence penalty applies once per seen token, however often: 1.5 vs 1.2 after both.
        let mut s = sampler(SamplingParams {
            presence_penalty: 0.5,
            ..SamplingParams::greedy()
        });
        let picks: Vec<u32> = (0..3).map(|_| s.sample(&[2.0, 1.7], &[]).token).collect();
        assert_eq!(picks, vec![0, 1, 0]);
        // Repetition penalty counts the prompt too: 2.0/2 = 1.0 < 1.5.
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..SamplingParams::greedy()
            },
            &[0],
        );
        assert_eq!(s.sample(&[2.0, 1.5], &[]).token, 1);
        // Negative logits are multiplied: -1 * 2 = -2 < -1.5.
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..SamplingParams::greedy()
            },
            &[0],
        );
        assert_eq!(s.sample(&[-1.0, -1.5], &[]).token, 1);
        let mut s = sampler(SamplingParams {
            logit_bias: vec![(1, 5.0)],
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&[2.0, 1.0], &[]).token, 1);
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&[2.0, 1.0], &[0]).token, 1, "banned");
    }

    #[test]
    fn logprobs_are_of_the_raw_distribution() {
        let mut s = sampler(SamplingParams {
            top_logprobs: Some(2),
            temperature: 0.0,
            logit_bias: vec![(2, 10.0)],
            ..Default::default()
        });
        let logits = [0.0f32, (2.0f32).ln(), 0.0];
        let out = s.sample(&logits, &[]);
        assert_eq!(out.token, 2);
        // softmax([0, ln2, 0]) = [0.25, 0.5, 0.25]
        assert!((out.logprob - 0.25f32.ln()).abs() < 1e-6);
        assert_eq!(out.top_logprobs[0].0, 1);
        assert!((out.top_logprobs[0].1 - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(out.top_logprobs[1].0, 0, "ties go to the lower id");
    }

    #[test]
    fn a_forced_token_keeps_the_models_logprob() {
        let mut s = sampler(SamplingParams {
            top_logprobs: Some(1),
            ..SamplingParams::greedy()
        });
        let logits = [0.0f32, (2.0f32).ln(), 0.0];
        let out = s.sample_or_force(&logits, &[], None, Some(0));
        assert_eq!(out.token, 0);
        assert!((out.logprob - 0.25f32.ln()).abs() < 1e-6);
        assert_eq!(out.top_logprobs[0].0, 1);
    }

    #[test]
    fn a_mask_limits_the_choice_greedy_or_sampled() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 100) as f32).collect();
        let mut mask = SimpleVob::alloc(100);
        for t in [5u32, 40, 63, 99] {
            mask.allow_token(t);
        }
        // The best allowed token, as argmax over the masked copy would find it.
        let mut masked = logits.clone();
        apply_mask(&mask, &mut masked);
        let expected = argmax(&masked);
        assert!([5, 40, 63, 99].contains(&expected));
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(
            s.sample_or_force(&logits, &[], Some(&mask), None).token,
            expected
        );
        assert_eq!(argmax_allowed(&logits, &mask), expected);
        // Processed (a bias) and sampled: still only allowed tokens.
        for params in [
            SamplingParams {
                logit_bias: vec![(7, 50.0)],
                ..SamplingParams::greedy()
            },
            SamplingParams {
                temperature: 1.0,
                seed: Some(3),
                ..Default::default()
            },
        ] {
            let mut s = sampler(params);
            for _ in 0..50 {
                let t = s.sample_or_force(&logits, &[], Some(&mask), None).token;
                assert!(mask.is_allowed(t), "token {t} is outside the mask");
            }
        }
    }

    #[test]
    fn a_temperature_near_zero_is_greedy() {
        // 1/T overflows for T below ~3e-39; T = 1e-6 still makes the weights NaN-prone.
        for t in [1e-39f32, f32::MIN_POSITIVE, 1e-6] {
            let mut s = sampler(SamplingParams {
                temperature: t,
                seed: Some(1),
                ..Default::default()
            });
            assert_eq!(s.sample(&[0.1, -2.0, 3.0, 1.0], &[]).token, 2, "T = {t}");
        }
    }

    #[test]
    fn completion_seeds_do_not_alias_neighbouring_seeds() {
        assert_eq!(completion_seed(7, 0), 7);
        for s in [0u64, 1, 7, u64::MAX] {
            for i in 1..8usize {
                let seed = completion_seed(s, i);
                assert_ne!(seed, s.wrapping_add(i as u64), "seed {s} index {i}");
                // Another request's completion 0 with seed s + i would collide under seed + i.
                assert_ne!(seed, completion_seed(s.wrapping_add(i as u64), 0));
                assert_ne!(seed, completion_seed(s, i + 1));
            }
        }
    }
}
