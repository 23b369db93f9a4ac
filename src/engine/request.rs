//! What the engine accepts and what it sends back. The engine never sees OpenAI types.

use super::grammar::ValidConstraint;
use super::sampler::SamplingParams;

/// A request that passed validation (the API layer builds it from OpenAI JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// No EOS or stop token before this many tokens.
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<u32>,
    pub stop: Vec<String>,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
    /// Independent completions sharing the prompt.
    pub n: usize,
    /// Log-probabilities of the prompt tokens, with this many alternatives each.
    pub prompt_logprobs: Option<usize>,
    /// Structured output: the grammar the output must match.
    pub constraint: Option<ValidConstraint>,
}

impl ValidRequest {
    /// A greedy request with defaults, for tests and tools.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::greedy(),
            max_tokens,
            min_tokens: 0,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            n: 1,
            prompt_logprobs: None,
            constraint: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// max_tokens reached.
    Length,
    /// The engine could not run the sequence (details in the log).
    Error,
}

/// Log-probability of a token and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// Prompt log-probabilities (the first prompt token has none), before any token.
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// One generated token of completion `index`, with the text it completes (possibly empty).
    Token {
        index: usize,
        token: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// Text of completion `index` held back for stop-string matching, released at its end.
    Text { index: usize, text: String },
    /// Completion `index` is done.
    Finished {
        index: usize,
        reason: FinishReason,
        /// The stop string or token that ended it, if any.
        stop_reason: Option<StopReason>,
        num_prompt_tokens: usize,
        num_generated_tokens: usize,
        /// Prompt tokens served from the prefix cache.
        num_cached_tokens: usize,
        /// From arrival at the engine to the first time the sequence was scheduled.
        queue_time: std::time::Duration,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Token(u32),
    Text(String),
}
