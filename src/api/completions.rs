//! POST /v1/completions: one or more prompts (text or token ids), echo, and legacy logprobs
//! covering the prompt when echoed (what lm-evaluation-harness reads for log-likelihoods).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

use crate::engine::{ConstraintStart, EngineEvent, FinishReason, StopReason, TokenLogprob};

use super::access::{AccessRecord, RequestId};
use super::error::ApiError;
use super::generation::{
    begin, blocking, finish_reason_str, new_id, sse, stop_reason_json, unix_now, whole_response,
    ChunkUsage, ChunkWriter, Deadline, Submission, Usage,
};
use super::logprobs::{LegacyLogprobs, TokenNames};
use super::sampling::{self, OutputOptions};
use super::structured;
use super::types::{CompletionRequest, PromptField, COMPLETION_FIELDS};
use super::AppState;

/// OpenAI's limit on `logprobs` for completions.
pub const MAX_LEGACY_LOGPROBS: i64 = 5;
/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: usize = 16;

/// A prompt with its text (for echo and text offsets).
struct Prompt {
    ids: Vec<u32>,
    text: String,
}

struct Plan {
    options: OutputOptions,
    echo: bool,
    logprobs: bool,
    n: usize,
    prompts: Vec<Prompt>,
}

pub async fn handle(
    State(state): State<AppState>,
    Extension(access): Extension<AccessRecord>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let (req, ctx, mut admitted, model) =
        begin(&state, body, COMPLETION_FIELDS, |r: &CompletionRequest| {
            r.common.model.as_deref()
        })?;
    let logprobs = match req.logprobs {
        Some(k) if (0..=MAX_LEGACY_LOGPROBS).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("'logprobs' must be between 0 and {MAX_LEGACY_LOGPROBS}, got {k}"),
            ))
        }
        None => None,
    };
    let limits = state.0.config.limits;
    let (template, options) = sampling::build(
        &req.common,
        &limits,
        model,
        req.common.max_tokens,
        Some(DEFAULT_MAX_TOKENS),
        logprobs,
        &ctx.defaults,
    )?;
    if let Some(best_of) = req.best_of {
        if best_of != template.n as i64 {
            return Err(ApiError::unsupported(
                "best_of",
                "other than equal to 'n' is not supported.",
            ));
        }
    }
    let echo = req.echo.unwrap_or(false);
    // Bounded before any tokenization: one body of many one-token prompts, each forked n
    // times, must not become thousands of sequences.
    let num_prompts = req.prompt.len();
    if num_prompts > limits.max_prompts {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "{num_prompts} prompts; at most {} are allowed per request",
                limits.max_prompts
            ),
        ));
    }
    if num_prompts.saturating_mul(template.n) > limits.max_sequences {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{num_prompts} prompts × n = {} sequences; at most {} are allowed per request",
                num_prompts.saturating_mul(template.n),
                limits.max_sequences
            ),
        ));
    }
    admitted.claim(num_prompts * template.n)?;
    let grammar = structured::one_of([
        structured::from_response_format(req.response_format.as_ref())?,
        structured::from_structured_outputs(req.structured_outputs.as_ref())?,
    ])?;
    let grammars = ctx.grammars.clone();
    let tokenizer = ctx.tokenizer.clone();
    let prompt_field = req.prompt;
    let (prompts, constraint) = blocking(&state, move |deadline| {
        let prompts = prompts_of(prompt_field, &tokenizer, deadline)?;
        deadline.check()?;
        // A completion has no chat turn: the grammar applies from the first token.
        let start = ConstraintStart::Now { think: None };
        let constraint = grammar.map(|g| g.compile(&grammars, start)).transpose()?;
        Ok((prompts, constraint))
    })
    .await?;
    if state.0.config.log_requests {
        for (i, p) in prompts.iter().enumerate() {
            tracing::info!(target: "ember::requests", request_id = %request_id, index = i, prompt = %p.text, "completion prompt");
        }
    }
    let limit = ctx.limits.max_model_len.min(ctx.limits.max_cache_tokens);
    let mut requests = Vec::with_capacity(prompts.len());
    for p in &prompts {
        let mut r = template.clone();
        r.prompt = p.ids.clone();
        r.constraint = constraint.clone();
        if echo {
            r.prompt_logprobs = logprobs;
        }
        sampling::fill_max_tokens(&mut r, limit, "prompt")?;
        requests.push(r);
    }
    let plan = Plan {
        options,
        echo,
        logprobs: logprobs.is_some(),
        n: template.n,
        prompts,
    };
    let submission = Submission::submit(&state, ctx, requests, arrived, admitted, access)?;
    let tokenizer = ctx.tokenizer.clone();
    if plan.options.stream {
        let usage = ChunkUsage::of(&plan.options);
        let writer = CompletionChunks::new(plan, tokenizer);
        Ok(sse(submission, writer, usage))
    } else {
        collect(submission, plan, &tokenizer).await
    }
}

fn prompts_of(
    field: PromptField,
    tokenizer: &Tokenizer,
    deadline: Deadline,
) -> Result<Vec<Prompt>, ApiError> {
    let encode = |text: String| -> Result<Prompt, ApiError> {
        deadline.check()?;
        let ids = tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))?
            .get_ids()
            .to_vec();
        Ok(Prompt { ids, text })
    };
    let decode = |ids: Vec<u32>| -> Result<Prompt, ApiError> {
        deadline.check()?;
        let vocab = tokenizer.get_vocab_size(true) as u32;
        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
            return Err(ApiError::invalid(
                "prompt",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        let text = tokenizer
            .decode(&ids, false)
            .map_err(|e| ApiError::internal(format!("detokenizing: {e}")))?;
        Ok(Prompt { ids, text })
    };
    let prompts = match field {
        PromptField::Text(t) => vec![encode(t)?],
        PromptField::Texts(ts) => ts.into_iter().map(encode).collect::<Result<_, _>>()?,
        PromptField::Tokens(ids) => vec![decode(ids)?],
        PromptField::TokenLists(lists) => {
            lists.into_iter().map(decode).collect::<Result<_, _>>()?
        }
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "'prompt' must not be empty"));
    }
    if let Some(i) = prompts.iter().position(|p| p.ids.is_empty()) {
        return Err(ApiError::invalid("prompt", format!("prompt {i} is empty")));
    }
    Ok(prompts)
}

/// One completion as it accumulates.
struct Choice {
    text: String,
    logprobs: LegacyLogprobs,
    finished: Option<(FinishReason, Option<StopReason>)>,
    /// Echo and prompt logprobs are sent before the first token (streaming).
    started: bool,
}

impl Choice {
    fn new(prompt: &Prompt, echo: bool) -> Self {
        let offset = if echo { 0 } else { prompt.text.chars().count() };
        Self {
            text: String::new(),
            logprobs: LegacyLogprobs::starting_at(offset),
            finished: None,
            started: false,
        }
    }

    /// The echoed prompt (text and, when asked for, its logprobs), once.
    fn start(
        &mut self,
        plan: &Plan,
        prompt: &Prompt,
        prompt_logprobs: Option<&[Option<TokenLogprob>]>,
        names: &TokenNames,
    ) {
        if self.started {
            return;
        }
        self.started = true;
        if !plan.echo {
            return;
        }
        self.text.push_str(&prompt.text);
        if plan.logprobs {
            for (j, &token) in prompt.ids.iter().enumerate() {
                let lp = prompt_logprobs
                    .and_then(|lps| lps.get(j))
                    .and_then(Option::as_ref);
                self.logprobs.push(names, token, lp);
            }
        }
    }
}

/// Choice `index` of prompt `p` is `p * n + index` in the response.
fn choice_index(plan: &Plan, prompt: usize, index: usize) -> usize {
    prompt * plan.n + index
}

async fn collect(
    mut submission: Submission,
    plan: Plan,
    tokenizer: &Tokenizer,
) -> Result<Response, ApiError> {
    let names = TokenNames {
        tokenizer,
        as_ids: plan.options.return_tokens_as_token_ids,
    };
    let mut choices: Vec<Choice> = plan
        .prompts
        .iter()
        .flat_map(|p| (0..plan.n).map(move |_| Choice::new(p, plan.echo)))
        .collect();
    let mut prompt_logprobs: Vec<Option<Vec<Option<TokenLogprob>>>> =
        vec![None; plan.prompts.len()];
    let mut usage = Usage::default();
    while let Some((p, event)) = submission.next().await? {
        usage.add(&event);
        match event {
            EngineEvent::PromptLogprobs(lps) => prompt_logprobs[p] = Some(lps),
            EngineEvent::Token {
                index,
                token,
                text,
                logprob,
            } => {
                let i = choice_index(&plan, p, index);
                let c = &mut choices[i];
                c.start(
                    &plan,
                    &plan.prompts[p],
                    prompt_logprobs[p].as_deref(),
                    &names,
                );
                c.text.push_str(&text);
                if plan.logprobs {
                    c.logprobs.push(&names, token, logprob.as_ref());
                }
            }
            EngineEvent::Text { index, text } => {
                choices[choice_index(&plan, p, index)].text.push_str(&text);
            }
            EngineEvent::Finished {
                index,
                reason,
                stop_reason,
                ..
            } => {
                choices[choice_index(&plan, p, index)].finished = Some((reason, stop_reason));
            }
        }
    }
    let mut out = Vec::with_capacity(choices.len());
    for (i, mut c) in choices.into_iter().enumerate() {
        let (reason, stop) = c
            .finished
            .ok_or_else(|| ApiError::internal("a completion ended without finishing"))?;
        out.push(json!({
            "index": i,
            "text": c.text,
            "logprobs": if plan.logprobs { c.logprobs.take() } else { Json::Null },
            "finish_reason": finish_reason_str(reason),
            "stop_reason": stop_reason_json(&stop),
        }));
    }
    Ok(whole_response(
        ("cmpl", "text_completion"),
        &plan.options.model,
        out,
        &usage,
    ))
}

struct CompletionChunks {
    id: String,
    created: u64,
    choices: Vec<Choice>,
    prompt_logprobs: Vec<Option<Vec<Option<TokenLogprob>>>>,
    plan: Plan,
    tokenizer: Arc<Tokenizer>,
    usage: Usage,
}

impl CompletionChunks {
    fn new(plan: Plan, tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            id: new_id("cmpl"),
            created: unix_now(),
            choices: plan
                .prompts
                .iter()
                .flat_map(|p| (0..plan.n).map(|_| Choice::new(p, plan.echo)))
                .collect(),
            prompt_logprobs: vec![None; plan.prompts.len()],
            plan,
            tokenizer,
            usage: Usage::default(),
        }
    }

    fn chunk(&mut self, i: usize, finish: Option<(FinishReason, Option<StopReason>)>) -> Json {
        let c = &mut self.choices[i];
        let logprobs = if self.plan.logprobs && !c.logprobs.is_empty() {
            c.logprobs.take()
        } else {
            Json::Null
        };
        let mut choice = json!({
            "index": i,
            "text": std::mem::take(&mut c.text),
            "logprobs": logprobs,
            "finish_reason": null,
        });
        if let Some((reason, stop)) = finish {
            choice["finish_reason"] = json!(finish_reason_str(reason));
            choice["stop_reason"] = stop_reason_json(&stop);
        }
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.plan.options.model,
            "choices": [choice],
        })
    }
}

impl ChunkWriter for CompletionChunks {
    fn on_event(&mut self, p: usize, event: EngineEvent) -> Vec<Json> {
        self.usage.add(&event);
        let names = TokenNames {
            tokenizer: &self.tokenizer,
            as_ids: self.plan.options.return_tokens_as_token_ids,
        };
        let i = match &event {
            EngineEvent::PromptLogprobs(_) => 0,
            EngineEvent::Token { index, .. }
            | EngineEvent::Text { index, .. }
            | EngineEvent::Finished { index, .. } => choice_index(&self.plan, p, *index),
        };
        let prompt_lps = self.prompt_logprobs[p].as_deref();
        match event {
            EngineEvent::PromptLogprobs(lps) => {
                self.prompt_logprobs[p] = Some(lps);
                return Vec::new();
            }
            EngineEvent::Token {
                token,
                text,
                logprob,
                ..
            } => {
                let c = &mut self.choices[i];
                c.start(&self.plan, &self.plan.prompts[p], prompt_lps, &names);
                c.text.push_str(&text);
                if self.plan.logprobs {
                    c.logprobs.push(&names, token, logprob.as_ref());
                }
            }
            EngineEvent::Text { text, .. } => self.choices[i].text.push_str(&text),
            EngineEvent::Finished {
                reason,
                stop_reason,
                ..
            } => {
                return vec![self.chunk(i, Some((reason, stop_reason)))];
            }
        }
        let c = &self.choices[i];
        if c.text.is_empty() && c.logprobs.is_empty() {
            return Vec::new();
        }
        vec![self.chunk(i, None)]
    }

    fn on_end(&mut self) -> Vec<Json> {
        if !self.plan.options.include_usage {
            return Vec::new();
        }
        vec![json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.plan.options.model,
            "choices": [],
            "usage": self.usage.json(),
        })]
    }
}
