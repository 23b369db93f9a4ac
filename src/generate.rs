//! Single-sequence generation for `ember generate` (the batching engine serves everything
//! else).

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use ember_models::{Batch, LogitsRows, PagedKvCache};

use crate::engine::detokenizer::{Detokenizer, TokenBytes};
use crate::engine::sampler::{Sampler, SamplingParams};
use crate::model::LoadedModel;

impl LoadedModel {
    /// Generates up to `max_tokens` tokens after `prompt`, calling `on_text` with each new
    /// piece of text as soon as it is complete UTF-8 (possibly empty).
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        max_tokens: usize,
        ignore_eos: bool,
        mut on_text: impl FnMut(&str),
    ) -> Result<GenerationStats> {
        if prompt.is_empty() {
            return Err(anyhow!("the prompt is empty"));
        }
        let max_positions = self.model.max_positions();
        if prompt.len() + max_tokens > max_positions {
            return Err(anyhow!(
                "prompt ({} tokens) plus max tokens ({max_tokens}) exceeds the model's context of {max_positions}",
                prompt.len()
            ));
        }
        // One sequence: a paged cache just large enough, its blocks in order.
        const BLOCK: usize = 16;
        let num_blocks = (prompt.len() + max_tokens).div_ceil(BLOCK);
        let mut cache = PagedKvCache::new(
            self.model.config(),
            num_blocks,
            BLOCK,
            self.model.dtype(),
            self.model.device(),
        )?;
        let table: Vec<u32> = (0..num_blocks as u32).collect();
        let mut sampler = Sampler::new(params.clone(), prompt);
        let mut generated: Vec<u32> = Vec::with_capacity(max_tokens);
        let mut detok = Detokenizer::new(true, Vec::new(), false);
        if let Some(table) = TokenBytes::new(&self.tokenizer) {
            detok = detok.exact(std::sync::Arc::new(table));
        }
        let start = Instant::now();
        let mut prompt_time = Duration::ZERO;
        let mut next_input: Vec<u32> = prompt.to_vec();
        let mut position = 0;
        while generated.len() < max_tokens {
            let batch = Batch::new(
                &[(0, position, &next_input)],
                LogitsRows::LastPerSeq,
                max_positions,
                self.model.device(),
            )?;
            cache.prepare(&batch, &[&table])?;
            let logits = self
                .model
                .forward(&batch, &mut cache)?
                .squeeze(0)?
                .to_vec1::<f32>()?;
            if generated.is_empty() {
                prompt_time = start.elapsed();
            }
            position += next_input.len();
            let token = sampler.sample(&logits, &[]).token;
            if !ignore_eos && self.eos_token_ids.contains(&token) {
                break;
            }
            generated.push(token);
            on_text(&detok.push(&self.tokenizer, token).text);
            next_input = vec![token];
        }
        on_text(&detok.finish(&self.tokenizer).text);
        Ok(GenerationStats {
            prompt_tokens: prompt.len(),
            generated_tokens: generated.len(),
            prompt_time,
            decode_time: start.elapsed().saturating_sub(prompt_time),
            tokens: generated,
        })
    }
}

#[derive(Debug, Clone)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Until the first token's logits.
    pub prompt_time: Duration,
    /// From the first token to the end.
    pub decode_time: Duration,
    pub tokens: Vec<u32>,
}

impl GenerationStats {
    pub fn prompt_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }

    /// Tokens after the first, over the time after the first.
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}
