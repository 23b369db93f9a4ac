//! A loaded model: weights, tokenizer, chat template, stop ids and sampling defaults. Below the
//! engine and the HTTP layer, which both take it; `ember generate` adds a single-sequence loop
//! on top (`crate::generate`).

mod tokenizer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::DType;
use ember_kernels::GgmlType;
use ember_models::gguf::MetaValue;
use ember_models::{
    eos_token_ids, load_gguf_model, load_model_quantized, resolve, GgufFile, QuantizedMatrix,
    QwenModel,
};
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

/// What the checkpoint alone does not settle.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// A directory with tokenizer.json (and tokenizer_config.json for the chat template) to
    /// use instead of the checkpoint's.
    pub tokenizer: Option<PathBuf>,
    /// Quantize a safetensors checkpoint's matrices to this type at load (CPU).
    pub quantization: Option<GgmlType>,
}

/// The startup log of in-situ quantization: per type, how many matrices and their bytes before
/// and after; which matrices took a fallback type.
fn log_quantization(requested: GgmlType, report: &[QuantizedMatrix]) {
    let mut by_type: std::collections::BTreeMap<&str, (usize, usize, usize)> = Default::default();
    for m in report {
        let e = by_type.entry(m.ty.name()).or_default();
        *e = (e.0 + 1, e.1 + m.bytes_before, e.2 + m.bytes_after);
    }
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    for (ty, (count, before, after)) in &by_type {
        tracing::info!(
            "quantized at load: {count} matrices to {ty}, {:.1} MiB -> {:.1} MiB",
            mib(*before),
            mib(*after)
        );
    }
    let others: Vec<&str> = report
        .iter()
        .filter(|m| m.ty != requested)
        .map(|m| m.name.as_str())
        .collect();
    if !others.is_empty() {
        tracing::info!(
            "not {requested} (llama.cpp's rules: the output matrix; rows that are not whole \
             {requested} blocks): {}",
            others.join(", ")
        );
    }
    let (before, after) = report
        .iter()
        .fold((0, 0), |(b, a), m| (b + m.bytes_before, a + m.bytes_after));
    tracing::info!(
        "quantized at load to {requested}: {} matrices, {:.1} MiB -> {:.1} MiB",
        report.len(),
        mib(before),
        mib(after)
    );
}

/// Loads the weights on this thread while `tokenizer` runs on another (it is independent of
/// them), logging how long each took.
fn beside_the_tokenizer<T: Send>(
    dtype: DType,
    tokenizer: impl FnOnce() -> Result<T> + Send,
    weights: impl FnOnce() -> Result<QwenModel>,
) -> Result<(QwenModel, T)> {
    std::thread::scope(|s| {
        let tokenizer = s.spawn(|| {
            let start = Instant::now();
            let out = tokenizer();
            tracing::info!(seconds = start.elapsed().as_secs_f32(), "tokenizer loaded");
            out
        });
        let start = Instant::now();
        let model = weights()?;
        tracing::info!(
            seconds = start.elapsed().as_secs_f32(),
            ?dtype,
            "weights loaded"
        );
        let tokenizer = tokenizer
            .join()
            .map_err(|_| anyhow!("loading the tokenizer panicked"))??;
        Ok((model, tokenizer))
    })
}

/// The tokenizer (and chat template, if any) of a tokenizer directory.
fn tokenizer_dir(dir: &Path) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    let file = dir.join("tokenizer.json");
    let tokenizer =
        Tokenizer::from_file(&file).map_err(|e| anyhow!("loading {}: {e}", file.display()))?;
    let config = dir.join("tokenizer_config.json");
    let template = if config.is_file() {
        match ChatTemplate::from_tokenizer_config(&config) {
            Ok(t) => Some(t),
            Err(TemplateError::Missing(_)) => None,
            Err(e) => bail!("{}: {e}", config.display()),
        }
    } else {
        None
    };
    Ok((tokenizer, template))
}

impl LoadedModel {
    /// `model`: a GGUF file, a directory in Hugging Face layout, or a Hub model id.
    pub fn load(
        model: &str,
        revision: Option<&str>,
        device: DeviceSpec,
        dtype: Option<DType>,
    ) -> Result<Self> {
        Self::load_with(model, revision, device, dtype, &LoadOptions::default())
    }

    pub fn load_with(
        model: &str,
        revision: Option<&str>,
        device: DeviceSpec,
        dtype: Option<DType>,
        options: &LoadOptions,
    ) -> Result<Self> {
        if Path::new(model).is_file() {
            if let Some(ty) = options.quantization {
                bail!(
                    "--quantization {ty} quantizes a safetensors checkpoint at load; {model} is a \
                     GGUF file, already in its own types"
                );
            }
            return Self::load_gguf(Path::new(model), device, dtype, options);
        }
        let mut files = resolve(model, revision)?;
        if let Some(dir) = &options.tokenizer {
            files.tokenizer = dir.join("tokenizer.json");
            files.tokenizer_config =
                Some(dir.join("tokenizer_config.json")).filter(|p| p.is_file());
        }
        let dtype = dtype.unwrap_or_else(|| device.default_dtype());
        let dev = device.open()?;
        // The tokenizer (a ~10 MB JSON to parse, ~0.45 s) loads beside the weights.
        let (model, tokenizer) = beside_the_tokenizer(
            dtype,
            || {
                Tokenizer::from_file(&files.tokenizer)
                    .map_err(|e| anyhow!("loading {}: {e}", files.tokenizer.display()))
            },
            || {
                let (model, quantized) =
                    load_model_quantized(&files, dtype, &dev, options.quantization).with_context(
                        || format!("loading weights from {}", files.root.display()),
                    )?;
                if let Some(ty) = options.quantization {
                    log_quantization(ty, &quantized);
                }
                Ok(model)
            },
        )?;
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

    /// A single GGUF file: config, weights, tokenizer (unless `options` names one), chat
    /// template and end-of-generation ids all come from it.
    fn load_gguf(
        path: &Path,
        device: DeviceSpec,
        dtype: Option<DType>,
        options: &LoadOptions,
    ) -> Result<Self> {
        let start = Instant::now();
        let gguf = Arc::new(GgufFile::open(path)?);
        tracing::info!(
            seconds = start.elapsed().as_secs_f32(),
            tensors = gguf.tensors.len(),
            "GGUF metadata read"
        );
        let dtype = dtype.unwrap_or_else(|| device.default_dtype());
        let dev = device.open()?;
        let (model, (tokenizer, dir_template)) = beside_the_tokenizer(
            dtype,
            || match &options.tokenizer {
                Some(dir) => tokenizer_dir(dir),
                None => Ok((tokenizer::from_gguf_vocab(&gguf.vocab()?)?, None)),
            },
            || {
                load_gguf_model(&gguf, dtype, &dev)
                    .with_context(|| format!("loading weights from {}", path.display()))
            },
        )?;
        let token_text = |key: &str| {
            let id = gguf.get(key).and_then(MetaValue::as_u64)?;
            tokenizer.id_to_token(u32::try_from(id).ok()?)
        };
        let template = match (dir_template, gguf.chat_template()) {
            (Some(t), _) => Some(Arc::new(t)),
            (None, Some(source)) => Some(Arc::new(
                ChatTemplate::new(
                    source.to_string(),
                    token_text("tokenizer.ggml.bos_token_id"),
                    token_text("tokenizer.ggml.eos_token_id"),
                )
                .map_err(|e| anyhow!("{}: tokenizer.chat_template: {e}", path.display()))?,
            )),
            (None, None) => None,
        };
        let eos_token_ids = gguf.eos_token_ids();
        let sampling = |key: &str| gguf.get(key).and_then(MetaValue::as_f64);
        Ok(Self {
            model,
            tokenizer: Arc::new(tokenizer),
            template,
            eos_token_ids,
            defaults: GenerationDefaults {
                temperature: sampling("general.sampling.temp").map(|v| v as f32),
                top_p: sampling("general.sampling.top_p").map(|v| v as f32),
                top_k: sampling("general.sampling.top_k").map(|v| v as usize),
            },
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
