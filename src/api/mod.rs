//! The OpenAI-compatible HTTP API (axum). Handlers turn OpenAI JSON into `ValidRequest`s for
//! the engine and engine events back into OpenAI responses and SSE chunks; the engine never sees
//! OpenAI types.

pub mod access;
mod auth;
mod chat;
mod completions;
pub mod error;
mod generation;
mod logprobs;
mod misc;
mod sampling;
mod structured;
pub mod types;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokenizers::Tokenizer;

use crate::engine::{EngineHandle, EngineLimits};
use crate::metrics::Metrics;
use crate::model::GenerationDefaults;
use crate::template::ChatTemplate;
pub use auth::check_origins;
use error::ApiError;

/// Operator settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Names the model answers to; the first is reported by /v1/models.
    pub served_model_names: Vec<String>,
    pub api_keys: Vec<String>,
    /// Allowed CORS origins ("*" for any); empty: no CORS headers.
    pub cors_allowed_origins: Vec<String>,
    pub max_request_body_bytes: usize,
    /// Sequences admitted at once, running and queued (a request counts prompts × n); beyond
    /// them a request gets 503 with Retry-After before any template or tokenizer work.
    pub max_admitted_sequences: usize,
    /// Accept a `chat_template` sent in a request.
    pub trust_request_chat_template: bool,
    /// Replaces the model's chat template.
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// Bound on rendering a chat template and tokenizing one request: past it the request gets
    /// 503 and its preprocessing stops at its next stage.
    pub preprocess_timeout: Duration,
    /// What one request may carry.
    pub limits: RequestLimits,
    /// A request still running this long after it arrived is ended (408; an error event on a
    /// stream) and its sequences aborted. None: no deadline (work is bounded by max_tokens).
    pub request_timeout: Option<Duration>,
    /// Log each generation request's prompt (`--log-requests`); off, no prompt or completion
    /// text is ever logged.
    pub log_requests: bool,
}

/// What one request may carry: everything the engine walks per token or per sequence is
/// bounded before the request is admitted (each a `ember serve` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Prompts in one /v1/completions request.
    pub max_prompts: usize,
    /// Sequences one request starts: prompts × n.
    pub max_sequences: usize,
    /// Stop strings, and bytes in each.
    pub max_stop_strings: usize,
    pub max_stop_string_bytes: usize,
    /// Entries of `stop_token_ids`.
    pub max_stop_token_ids: usize,
    /// Entries of `logit_bias`.
    pub max_logit_bias: usize,
    /// Bytes of a rendered chat prompt (the template's output).
    pub max_prompt_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_prompts: 64,
            max_sequences: 128,
            max_stop_strings: 16,
            max_stop_string_bytes: 256,
            max_stop_token_ids: 64,
            max_logit_bias: 1024,
            max_prompt_bytes: 16 << 20,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            served_model_names: vec!["ember".into()],
            api_keys: Vec::new(),
            cors_allowed_origins: Vec::new(),
            max_request_body_bytes: 8 << 20,
            max_admitted_sequences: 4096,
            trust_request_chat_template: false,
            chat_template: None,
            preprocess_timeout: Duration::from_secs(10),
            limits: RequestLimits::default(),
            request_timeout: None,
            log_requests: false,
        }
    }
}

/// What handlers need of the loaded model, set once loading is done.
pub struct ModelContext {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<Arc<ChatTemplate>>,
    pub defaults: GenerationDefaults,
    pub limits: EngineLimits,
    /// The tokenizer has Qwen3's `<think>`/`</think>`: chat output is split into reasoning.
    pub has_reasoning_markup: bool,
    /// Structured output's compiler for this tokenizer.
    pub grammars: Arc<structured::Grammars>,
}

impl ModelContext {
    pub fn new(
        engine: EngineHandle,
        tokenizer: Arc<Tokenizer>,
        template: Option<Arc<ChatTemplate>>,
        defaults: GenerationDefaults,
    ) -> Self {
        let has = |t: &str| tokenizer.token_to_id(t).is_some();
        let has_reasoning_markup =
            has(crate::parsers::THINK_START) && has(crate::parsers::THINK_END);
        let grammars = Arc::new(structured::Grammars::new(
            tokenizer.clone(),
            engine.limits().vocab_size,
            engine.eos_token_ids().to_vec(),
        ));
        // The token trie is built beside the first requests, not in front of them.
        let warm = grammars.clone();
        let _ = std::thread::Builder::new()
            .name("ember-grammar-init".into())
            .spawn(move || warm.warm());
        Self {
            grammars,
            limits: engine.limits(),
            engine,
            tokenizer,
            template,
            defaults,
            has_reasoning_markup,
        }
    }
}

pub struct Shared {
    pub config: ApiConfig,
    model: OnceLock<ModelContext>,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    pub metrics: Metrics,
    created: u64,
}

/// The handlers' state: cheap to clone.
#[derive(Clone)]
pub struct AppState(pub Arc<Shared>);

impl AppState {
    pub fn new(config: ApiConfig) -> Self {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self(Arc::new(Shared {
            config,
            model: OnceLock::new(),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            metrics: Metrics::new(),
            created,
        }))
    }

    /// The model is loaded: /health turns 200 and requests are served.
    pub fn set_ready(&self, model: ModelContext) {
        if self.0.model.set(model).is_err() {
            tracing::warn!("the model was already set");
        }
    }

    /// Shutting down: /health turns 503 and new requests are refused.
    pub fn start_draining(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::SeqCst)
    }

    /// Generation requests being served.
    pub fn num_in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::SeqCst)
    }

    fn model(&self) -> Result<&ModelContext, ApiError> {
        if self.is_draining() {
            return Err(ApiError::unavailable("The server is shutting down."));
        }
        let model = self
            .0
            .model
            .get()
            .ok_or_else(|| ApiError::unavailable("The model is loading."))?;
        if !model.engine.is_running() {
            return Err(ApiError::unavailable("The engine has stopped."));
        }
        Ok(model)
    }

    /// The engine's limits (context, KV blocks), once the model is loaded.
    pub fn engine_limits(&self) -> Option<EngineLimits> {
        self.0.model.get().map(|m| m.engine.limits())
    }

    /// The model was loaded and its engine has since stopped: the process should exit.
    pub fn engine_failed(&self) -> bool {
        self.0.model.get().is_some_and(|m| !m.engine.is_running())
    }

    /// Checks `model` against the served names (absent means the default).
    fn check_model(&self, model: Option<&str>) -> Result<String, ApiError> {
        let names = &self.0.config.served_model_names;
        match model {
            None => Ok(names.first().cloned().unwrap_or_default()),
            Some(m) if names.iter().any(|n| n == m) => Ok(m.to_string()),
            Some(m) => Err(ApiError::model_not_found(m)),
        }
    }

    /// Admits a generation request as one sequence, or refuses it when the server is at
    /// capacity; `InFlight::claim` counts the rest of its sequences once they are known.
    fn admit(&self) -> Result<InFlight, ApiError> {
        let mut guard = InFlight {
            shared: self.0.clone(),
            sequences: 0,
        };
        guard.claim(1)?;
        Ok(guard)
    }
}

/// One admitted request, holding its sequences' places; dropping it frees them.
pub struct InFlight {
    shared: Arc<Shared>,
    sequences: usize,
}

impl InFlight {
    /// Holds places for `sequences` in all (prompts × n), before any template or tokenizer
    /// work: 503 with Retry-After when they are not free now, 400 when they never could be.
    pub fn claim(&mut self, sequences: usize) -> Result<(), ApiError> {
        let extra = sequences.saturating_sub(self.sequences);
        if extra == 0 {
            return Ok(());
        }
        let max = self.shared.config.max_admitted_sequences;
        // Never admissible: a 400 rather than a 503 to retry forever (a one-sequence request
        // on a server that admits none is a full queue, as before).
        if sequences > max.max(1) {
            return Err(ApiError::invalid(
                "n",
                format!(
                    "{sequences} sequences (prompts × n); the server admits at most {max} at once"
                ),
            ));
        }
        let prev = self.shared.in_flight.fetch_add(extra, Ordering::SeqCst);
        if prev.saturating_add(extra) > max {
            self.shared.in_flight.fetch_sub(extra, Ordering::SeqCst);
            return Err(ApiError::overloaded());
        }
        self.sequences = sequences;
        Ok(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared
            .in_flight
            .fetch_sub(self.sequences, Ordering::SeqCst);
    }
}

pub fn router(state: AppState) -> Router {
    let limit = state.0.config.max_request_body_bytes;
    let protected = Router::new()
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/completions", post(completions::handle))
        .route("/v1/models", get(misc::list_models))
        .route("/v1/models/{*id}", get(misc::get_model))
        .route("/tokenize", post(misc::tokenize))
        .route("/detokenize", post(misc::detokenize))
        .route("/version", get(misc::version))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ));
    let router = Router::new()
        .route("/health", get(misc::health))
        .route("/metrics", get(misc::metrics))
        .merge(protected)
        .fallback(misc::not_found)
        .method_not_allowed_fallback(misc::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state.clone());
    let router = match auth::cors_layer(&state.0.config.cors_allowed_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    // Outermost: every response gets its request id and its access line.
    router.layer(axum::middleware::from_fn(access::layer))
}
