//! The engine (GUIDE.md §1): one OS thread owns the scheduler, block manager, model and KV
//! cache. Everything else reaches it through an [`EngineHandle`], a cloneable channel front.
//! Dropping a request's event stream cancels it: the engine aborts it at its next step and
//! frees its blocks.

pub mod block_manager;
mod core;
pub mod detokenizer;
pub mod grammar;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod stats;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use candle_core::DType;
use ember_models::PagedKvCache;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

pub use block_manager::{BlockHash, BlockId, BlockManager, BlockTable, PrefixCacheStats};
pub use grammar::{ConstraintStart, GrammarCompiler, GrammarError, GrammarSpec, ValidConstraint};
pub use request::{EngineEvent, FinishReason, StopReason, TokenLogprob, ValidRequest};
pub use sampler::SamplingParams;
pub use scheduler::{ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput};
pub use sequence::{SeqId, Sequence};
pub use stats::EngineStats;

use self::core::{Command, Engine, TestHooks};
use crate::model::LoadedModel;

/// Most alternatives per token that logprobs may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How much memory the KV cache gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCacheBudget {
    /// Bytes for keys and values of every layer.
    Bytes(usize),
    /// A fraction of the device memory free once the model is loaded (CUDA only).
    FractionOfFree(f64),
}

impl KvCacheBudget {
    fn bytes(self, device: &candle_core::Device) -> anyhow::Result<usize> {
        match self {
            Self::Bytes(b) => Ok(b),
            Self::FractionOfFree(f) => {
                if !(f > 0.0 && f <= 1.0) {
                    anyhow::bail!("the KV-cache memory fraction must be in (0, 1], got {f}");
                }
                let (free, _total) = crate::device::memory_info(device)
                    .ok_or_else(|| anyhow::anyhow!("a KV-cache fraction of free memory needs a CUDA device; give a size instead"))?;
                Ok((free as f64 * f) as usize)
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Tokens per KV-cache block.
    pub block_size: usize,
    pub kv_cache: KvCacheBudget,
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub enable_prefix_caching: bool,
    /// KV-cache element type; `None` is the model's dtype.
    pub kv_cache_dtype: Option<DType>,
    /// Test hook: every completion is this text's tokens, then EOS, whatever the model says
    /// (log-probabilities stay the model's). Lets tests over tiny random models exercise
    /// tool-call and reasoning parsing. Library callers only (the CLI has no flag for it).
    pub debug_forced_output: Option<String>,
    /// Test hook: a failure to inject (library callers only; no CLI flag sets it).
    pub fault: Option<Fault>,
}

/// Failures the engine can be told to inject, so tests can prove that one failed sequence
/// fails only its request and that a dead engine fails loudly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The engine thread panics at the start of this step (counting from 1).
    PanicAtStep(u64),
    /// A sequence whose prompt holds this token fails when its first token is sampled.
    FailSequenceWithToken(u32),
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_cache: KvCacheBudget::Bytes(2 << 30),
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            enable_prefix_caching: true,
            kv_cache_dtype: None,
            debug_forced_output: None,
            fault: None,
        }
    }
}

/// What a request may ask for, known to the handle so it can refuse at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    /// Prompt plus generated tokens of one sequence (the model's context).
    pub max_model_len: usize,
    /// Tokens the whole KV cache holds.
    pub max_cache_tokens: usize,
    pub vocab_size: usize,
    pub num_blocks: usize,
    pub block_size: usize,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The prompt and the completion do not fit the context (OpenAI's
    /// `context_length_exceeded`, which clients match to trim a conversation and retry).
    #[error("{field}: {message}")]
    ContextLength {
        field: &'static str,
        message: String,
    },
    #[error("the engine has stopped")]
    Stopped,
}

fn invalid(field: &'static str, message: impl Into<String>) -> SubmitError {
    SubmitError::Invalid {
        field,
        message: message.into(),
    }
}

/// A request's events, in order; dropping it cancels the request.
pub type RequestStream = UnboundedReceiver<EngineEvent>;

#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    limits: EngineLimits,
    eos_token_ids: Arc<[u32]>,
    running: Arc<AtomicBool>,
    published: Arc<Mutex<EngineStats>>,
}

/// Lowered when the engine thread ends, by returning or by panicking (the unwind drops it).
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
        if std::thread::panicking() {
            tracing::error!(
                "the engine thread panicked: every request in flight fails, /health turns 503"
            );
        }
    }
}

impl EngineHandle {
    /// Sizes the KV cache, starts the engine thread and returns its handle.
    pub fn spawn(
        loaded: LoadedModel,
        cfg: &EngineConfig,
    ) -> anyhow::Result<(Self, std::thread::JoinHandle<()>)> {
        let model = loaded.model;
        let mcfg = model.config().clone();
        let dtype: DType = cfg.kv_cache_dtype.unwrap_or(model.dtype());
        let per_block = PagedKvCache::bytes_per_block(&mcfg, cfg.block_size, dtype);
        let budget = cfg.kv_cache.bytes(model.device())?;
        let num_blocks = budget / per_block.max(1);
        if num_blocks == 0 {
            anyhow::bail!(
                "the KV-cache budget of {budget} bytes holds no block ({per_block} bytes each)"
            );
        }
        let start = std::time::Instant::now();
        let cache = PagedKvCache::new(&mcfg, num_blocks, cfg.block_size, dtype, model.device())?;
        let limits = EngineLimits {
            max_model_len: model.max_positions(),
            max_cache_tokens: num_blocks * cfg.block_size,
            vocab_size: mcfg.vocab_size,
            num_blocks,
            block_size: cfg.block_size,
        };
        tracing::info!(
            num_blocks,
            block_size = cfg.block_size,
            max_cache_tokens = limits.max_cache_tokens,
            ?dtype,
            cpu_kernels = %ember_kernels::cpu_isa(),
            seconds = start.elapsed().as_secs_f32(),
            "KV cache allocated"
        );
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_batched_tokens: cfg.max_num_batched_tokens,
                max_num_seqs: cfg.max_num_seqs,
                enable_prefix_caching: cfg.enable_prefix_caching,
            },
            BlockManager::new(num_blocks, cfg.block_size),
        );
        let published = Arc::new(Mutex::new(EngineStats::default()));
        let forced_output = match &cfg.debug_forced_output {
            Some(text) => {
                tracing::warn!("test hook: every completion is forced to {text:?}");
                let ids = loaded
                    .tokenizer
                    .encode(text.as_str(), false)
                    .map_err(|e| anyhow::anyhow!("tokenizing the forced output: {e}"))?;
                Some(ids.get_ids().to_vec())
            }
            None => None,
        };
        let eos_token_ids: Arc<[u32]> = loaded.eos_token_ids.clone().into();
        let engine = Engine::new(
            model,
            cache,
            scheduler,
            loaded.tokenizer,
            loaded.eos_token_ids,
            TestHooks {
                forced_output,
                fault: cfg.fault,
            },
            published.clone(),
        );
        let (tx, rx) = mpsc::channel();
        let running = Arc::new(AtomicBool::new(true));
        let flag = Running(running.clone());
        let thread = std::thread::Builder::new()
            .name("ember-engine".into())
            .spawn(move || {
                let _running = flag;
                engine.run(rx)
            })?;
        Ok((
            Self {
                commands: tx,
                limits,
                eos_token_ids,
                running,
                published,
            },
            thread,
        ))
    }

    /// False once the engine thread has ended (it ends early only by failing).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    pub fn limits(&self) -> EngineLimits {
        self.limits
    }

    /// The tokens that end a sequence (unless a request ignores EOS).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Checks a request against the engine's limits, then queues it.
    pub fn submit(&self, request: ValidRequest) -> Result<RequestStream, SubmitError> {
        self.check(&request)?;
        let (events, stream) = unbounded_channel();
        self.commands
            .send(Command::Submit {
                request: Arc::new(request),
                events,
            })
            .map_err(|_| SubmitError::Stopped)?;
        Ok(stream)
    }

    fn check(&self, r: &ValidRequest) -> Result<(), SubmitError> {
        let l = &self.limits;
        if r.prompt.is_empty() {
            return Err(invalid("prompt", "the prompt is empty"));
        }
        if let Some(&bad) = r.prompt.iter().find(|&&t| t as usize >= l.vocab_size) {
            return Err(invalid(
                "prompt",
                format!(
                    "token id {bad} is outside the vocabulary of {}",
                    l.vocab_size
                ),
            ));
        }
        if r.max_tokens == 0 {
            return Err(invalid("max_tokens", "must be at least 1"));
        }
        if r.min_tokens > r.max_tokens {
            return Err(invalid(
                "min_tokens",
                format!(
                    "{} is more than max_tokens ({})",
                    r.min_tokens, r.max_tokens
                ),
            ));
        }
        let total = r.prompt.len().saturating_add(r.max_tokens);
        let context = l.max_model_len.min(l.max_cache_tokens);
        if total > context {
            let limit = if context < l.max_model_len {
                " (the KV cache holds fewer tokens than the model's context length)"
            } else {
                ""
            };
            return Err(SubmitError::ContextLength {
                field: "max_tokens",
                message: format!(
                    "This model's maximum context length is {context} tokens{limit}. However, you requested {total} tokens ({} in the prompt, {} in the completion). Please reduce the length of the prompt or of the completion.",
                    r.prompt.len(),
                    r.max_tokens,
                ),
            });
        }
        if r.n == 0 {
            return Err(invalid("n", "must be at least 1"));
        }
        for (field, k) in [
            ("top_logprobs", r.sampling.top_logprobs),
            ("prompt_logprobs", r.prompt_logprobs),
        ] {
            if k.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
                return Err(invalid(field, format!("at most {MAX_TOP_LOGPROBS}")));
            }
        }
        if let Some(&(bad, _)) = r
            .sampling
            .logit_bias
            .iter()
            .find(|(t, _)| *t as usize >= l.vocab_size)
        {
            return Err(invalid(
                "logit_bias",
                format!("token id {bad} is outside the vocabulary"),
            ));
        }
        Ok(())
    }

    /// The counters as the engine left them at the end of its last loop turn: no round trip,
    /// so a scrape never waits for a step.
    pub fn stats_snapshot(&self) -> EngineStats {
        self.published.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The engine's counters, or None when it has stopped (a round trip: answered between
    /// steps).
    pub fn stats(&self) -> Option<EngineStats> {
        let (tx, rx) = mpsc::channel();
        self.commands.send(Command::Stats(tx)).ok()?;
        rx.recv().ok()
    }
}
