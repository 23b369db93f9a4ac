//! Parameters shared by chat and completions, validated once into the engine's types
//! (GUIDE.md §3: parse, don't validate). Every error names its parameter.

use crate::engine::sampler::SamplingParams;
use crate::engine::{ValidRequest, MAX_TOP_LOGPROBS};
use crate::model::GenerationDefaults;

use super::error::ApiError;
use super::types::CommonParams;
use super::RequestLimits;

/// Most completions one request may ask for.
pub const MAX_N: usize = 128;

/// What the common parameters decide besides the engine request.
#[derive(Debug, Clone)]
pub struct OutputOptions {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// With include_usage: the usage so far on every chunk, not `null` (vLLM's
    /// `continuous_usage_stats`).
    pub continuous_usage: bool,
    pub return_tokens_as_token_ids: bool,
}

fn finite(param: &str, v: f32) -> Result<f32, ApiError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(ApiError::invalid(
            param,
            format!("'{param}' must be a finite number"),
        ))
    }
}

fn in_range(param: &str, v: f32, lo: f32, hi: f32) -> Result<f32, ApiError> {
    if finite(param, v)? >= lo && v <= hi {
        Ok(v)
    } else {
        Err(ApiError::invalid(
            param,
            format!("'{param}' must be between {lo} and {hi}, got {v}"),
        ))
    }
}

fn count(param: &str, v: i64, min: i64) -> Result<usize, ApiError> {
    if v >= min {
        usize::try_from(v).map_err(|_| ApiError::invalid(param, format!("'{param}' is too large")))
    } else {
        Err(ApiError::invalid(
            param,
            format!("'{param}' must be at least {min}, got {v}"),
        ))
    }
}

/// Builds the engine request (with an empty prompt, filled in by the caller) and output options.
/// `max_tokens`: the value the route received (chat also accepts max_completion_tokens).
pub fn build(
    p: &CommonParams,
    limits: &RequestLimits,
    model: String,
    max_tokens: Option<i64>,
    default_max_tokens: Option<usize>,
    top_logprobs: Option<usize>,
    defaults: &GenerationDefaults,
) -> Result<(ValidRequest, OutputOptions), ApiError> {
    let stream = p.stream.unwrap_or(false);
    if p.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "'stream_options' is only allowed when 'stream' is true",
        ));
    }
    let temperature = match p.temperature.or(defaults.temperature) {
        Some(t) => in_range("temperature", t, 0.0, f32::MAX)?,
        None => 1.0,
    };
    let top_p = match p.top_p.or(defaults.top_p) {
        Some(v) if finite("top_p", v)? > 0.0 && v <= 1.0 => v,
        Some(v) => {
            return Err(ApiError::invalid(
                "top_p",
                format!("'top_p' must be in (0, 1], got {v}"),
            ))
        }
        None => 1.0,
    };
    let top_k = match p.top_k {
        Some(k) if k == -1 || k == 0 => 0,
        Some(k) => count("top_k", k, 1)?,
        None => defaults.top_k.unwrap_or(0),
    };
    let min_p = match p.min_p {
        Some(v) => in_range("min_p", v, 0.0, 1.0)?,
        None => 0.0,
    };
    let repetition_penalty = match p.repetition_penalty {
        Some(v) if finite("repetition_penalty", v)? > 0.0 => v,
        Some(v) => {
            return Err(ApiError::invalid(
                "repetition_penalty",
                format!("'repetition_penalty' must be > 0, got {v}"),
            ))
        }
        None => 1.0,
    };
    let presence_penalty = match p.presence_penalty {
        Some(v) => in_range("presence_penalty", v, -2.0, 2.0)?,
        None => 0.0,
    };
    let frequency_penalty = match p.frequency_penalty {
        Some(v) => in_range("frequency_penalty", v, -2.0, 2.0)?,
        None => 0.0,
    };
    let entries = p.logit_bias.as_ref().map_or(0, |b| b.len());
    if entries > limits.max_logit_bias {
        return Err(ApiError::invalid(
            "logit_bias",
            format!(
                "'logit_bias' has {entries} entries; at most {} are allowed",
                limits.max_logit_bias
            ),
        ));
    }
    let mut logit_bias = Vec::new();
    for (key, &bias) in p.logit_bias.iter().flatten() {
        let token: u32 = key
            .parse()
            .map_err(|_| ApiError::invalid("logit_bias", "'logit_bias' keys must be token ids"))?;
        logit_bias.push((token, in_range("logit_bias", bias, -100.0, 100.0)?));
    }
    logit_bias.sort_by_key(|&(t, _)| t);
    let n = match p.n {
        Some(n) => count("n", n, 1)?,
        None => 1,
    };
    let max_n = MAX_N.min(limits.max_sequences);
    if n > max_n {
        return Err(ApiError::invalid(
            "n",
            format!("'n' must be at most {max_n}"),
        ));
    }
    let max_tokens = match max_tokens {
        Some(m) => count("max_tokens", m, 1)?,
        // Filled in from the context length once the prompt is known.
        None => default_max_tokens.unwrap_or(0),
    };
    let min_tokens = match p.min_tokens {
        Some(m) => count("min_tokens", m, 0)?,
        None => 0,
    };
    if top_logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
        return Err(ApiError::invalid(
            "top_logprobs",
            format!("at most {MAX_TOP_LOGPROBS}"),
        ));
    }
    let stop = p.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    if stop.len() > limits.max_stop_strings {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "{} stop strings; at most {} are allowed",
                stop.len(),
                limits.max_stop_strings
            ),
        ));
    }
    if stop.iter().any(|s| s.len() > limits.max_stop_string_bytes) {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "a stop string is longer than {} bytes",
                limits.max_stop_string_bytes
            ),
        ));
    }
    let stop_token_ids = p.stop_token_ids.clone().unwrap_or_default();
    if stop_token_ids.len() > limits.max_stop_token_ids {
        return Err(ApiError::invalid(
            "stop_token_ids",
            format!(
                "{} stop token ids; at most {} are allowed",
                stop_token_ids.len(),
                limits.max_stop_token_ids
            ),
        ));
    }
    let request = ValidRequest {
        prompt: Vec::new(),
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            // Any 64-bit integer is a seed; negative ones keep their bits.
            seed: p.seed.map(|s| s as u64),
            top_logprobs,
        },
        max_tokens,
        min_tokens,
        ignore_eos: p.ignore_eos.unwrap_or(false),
        stop_token_ids,
        stop,
        include_stop_str_in_output: p.include_stop_str_in_output.unwrap_or(false),
        skip_special_tokens: p.skip_special_tokens.unwrap_or(true),
        n,
        prompt_logprobs: None,
        constraint: None,
    };
    let options = OutputOptions {
        model,
        stream,
        include_usage: p
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        // As in vLLM: only together with include_usage.
        continuous_usage: p.stream_options.as_ref().is_some_and(|o| {
            o.include_usage.unwrap_or(false) && o.continuous_usage_stats.unwrap_or(false)
        }),
        return_tokens_as_token_ids: p.return_tokens_as_token_ids.unwrap_or(false),
    };
    Ok((request, options))
}

/// Without max_tokens a completion may run to the end of the context (as in vLLM).
pub fn fill_max_tokens(
    request: &mut ValidRequest,
    max_model_len: usize,
    prompt_param: &str,
) -> Result<(), ApiError> {
    let prompt_len = request.prompt.len();
    if prompt_len >= max_model_len {
        return Err(ApiError::context_length_exceeded(
            prompt_param,
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, your prompt is {prompt_len} tokens, which leaves no room for the completion. Please reduce the length of the prompt."
            ),
        ));
    }
    if request.max_tokens == 0 {
        request.max_tokens = max_model_len - prompt_len;
    }
    Ok(())
}
