//! Loading a model with its tokenizer and template, and single-sequence generation for
//! `ember generate`. (The batching engine of the engine issue replaces the loop here for serving.)

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use candle_core::DType;
use ember_models::{
    eos_token_ids, load_model, resolve, Batch, LogitsRows, PagedKvCache, QwenModel,
};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::device::DeviceSpec;
use crate::engine::detokenizer::Detokenizer;
use crate::engine::sampler::{Sampler, SamplingParams};
use crate::template::ChatTemplate;

/// Sampling defaults a checkpoint ships in generation_config.json.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
}

pub struct LoadedModel {
    pub model: QwenModel,
    /// Shared with the HTTP layer, which tokenizes and renders off the engine thread.
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<Arc<ChatTemplate>>,
    pub eos_token_ids: Vec<u32>,
    pub defaults: GenerationDefaults,
}

fn read_defaults(path: Option<&Path>) -> GenerationDefaults {
    path.and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

impl LoadedModel {
    pub fn load(
        model: &str,
        revision: Option<&str>,
        device: DeviceSpec,
        dtype: Option<DType>,
    ) -> Result<Self> {
        let files = resolve(model, revision)?;
        let dtype = dtype.unwrap_or_else(|| device.default_dtype());
        let dev = device.open()?;
        // The tokenizer (a ~10 MB JSON to parse, ~0.45 s) loads beside the weights.
        let (model, tokenizer) = std::thread::scope(|s| -> Result<_> {
            let tokenizer = s.spawn(|| {
                Tokenizer::from_file(&files.tokenizer)
                    .map_err(|e| anyhow!("loading {}: {e}", files.tokenizer.display()))
            });
            let model = load_model(&files, dtype, &dev)
                .with_context(|| format!("loading weights from {}", files.root.display()))?;
            let tokenizer = tokenizer
                .join()
                .map_err(|_| anyhow!("loading the tokenizer panicked"))??;
            Ok((model, tokenizer))
        })?;
        let template = match &files.tokenizer_config {
            Some(path) => ChatTemplate::from_tokenizer_config(path).ok().map(Arc::new),
            None => None,
        };
        let eos_token_ids = eos_token_ids(&files, model.config())?;
        Ok(Self {
            model,
            tokenizer: Arc::new(tokenizer),
            template,
            eos_token_ids,
            defaults: read_defaults(files.generation_config.as_deref()),
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing the prompt: {e}"))?
            .get_ids()
            .to_vec())
    }

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
