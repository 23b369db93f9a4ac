//! Token sampling: greedy, temperature, top-k and top-p with a seeded RNG. (The engine issue
//! extends this into the full per-request sampler.)

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus filtering.
    pub top_p: f32,
    /// 0 disables top-k filtering.
    pub top_k: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // (token, probability) sorted by probability, highest first; ties by token id.
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp()))
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            probs.truncate(self.params.top_k);
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p.1 / total;
                if cumulative >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(token, p) in &probs {
            if r < p {
                return token;
            }
            r -= p;
        }
        probs.last().map_or(0, |p| p.0)
    }
}

/// Index of the largest logit; the lowest index wins ties (as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 20,
            seed: Some(7),
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(params);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_nucleus() {
        let logits = [1.0, 5.0, 2.0, 4.9];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 1,
            seed: Some(1),
            ..Default::default()
        });
        assert!((0..50).all(|_| s.sample(&logits) == 1));
        // p(1) ~ 0.50, p(3) ~ 0.45: top_p 0.6 keeps exactly those two.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.6,
            seed: Some(2),
            ..Default::default()
        });
        let seen: std::collections::BTreeSet<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 3]);
    }
}
