//! A loaded model: weights, tokenizer, chat template, stop ids and sampling defaults. Below the
//! engine and the HTTP layer, which both take it; `ember generate` adds a single-sequence loop
//! on top (`crate::generate`).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::DType;
use ember_models::{eos_token_ids, load_model, resolve, QwenModel};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::device::DeviceSpec;
use crate::template::{ChatTemplate, TemplateError};

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

/// Sampling defaults from generation_config.json: a file that is not JSON is an error naming
/// it; fields of unexpected types are ignored with a warning (the defaults stay Ember's).
fn read_defaults(path: Option<&Path>) -> Result<GenerationDefaults> {
    let Some(path) = path else {
        return Ok(GenerationDefaults::default());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(serde_json::from_value(json).unwrap_or_else(|e| {
        tracing::warn!("{}: sampling defaults ignored: {e}", path.display());
        GenerationDefaults::default()
    }))
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
                let start = Instant::now();
                let t = Tokenizer::from_file(&files.tokenizer)
                    .map_err(|e| anyhow!("loading {}: {e}", files.tokenizer.display()));
                tracing::info!(seconds = start.elapsed().as_secs_f32(), "tokenizer loaded");
                t
            });
            let start = Instant::now();
            let model = load_model(&files, dtype, &dev)
                .with_context(|| format!("loading weights from {}", files.root.display()))?;
            tracing::info!(
                seconds = start.elapsed().as_secs_f32(),
                ?dtype,
                "weights loaded"
            );
            let tokenizer = tokenizer
                .join()
                .map_err(|_| anyhow!("loading the tokenizer panicked"))??;
            Ok((model, tokenizer))
        })?;
        // No chat template (a base model) is fine; a broken file or template is an error.
        let template = match &files.tokenizer_config {
            Some(path) => match ChatTemplate::from_tokenizer_config(path) {
                Ok(t) => Some(Arc::new(t)),
                Err(TemplateError::Missing(_)) => None,
                Err(e) => bail!("{}: {e}", path.display()),
            },
            None => None,
        };
        let eos_token_ids = eos_token_ids(&files, model.config())?;
        Ok(Self {
            model,
            tokenizer: Arc::new(tokenizer),
            template,
            eos_token_ids,
            defaults: read_defaults(files.generation_config.as_deref())?,
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
}
