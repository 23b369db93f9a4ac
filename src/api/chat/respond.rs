//! The answer: whole (all events collected) or SSE chunks.

use std::sync::Arc;

use axum::response::Response;
use serde_json::{json, Map, Value as Json};

use crate::engine::{EngineEvent, FinishReason, StopReason, TokenLogprob};

use crate::api::error::ApiError;
use crate::api::generation::{
    new_id, stop_reason_json, unix_now, whole_response, ChunkWriter, Submission, Usage,
};
use crate::api::logprobs::TokenNames;

use super::output::{merge_calls, tool_call_json, ChoiceParser};
use super::ChatPlan;

/// The non-streaming answer: all events, then one response.
pub(super) async fn collect(
    mut submission: Submission,
    plan: ChatPlan,
    n: usize,
    tokenizer: &tokenizers::Tokenizer,
) -> Result<Response, ApiError> {
    struct Done {
        text: String,
        logprobs: Vec<TokenLogprob>,
        finished: Option<(FinishReason, Option<StopReason>)>,
    }
    let mut outs: Vec<Done> = (0..n)
        .map(|_| Done {
            text: String::new(),
            logprobs: Vec::new(),
            finished: None,
        })
        .collect();
    let mut usage = Usage::default();
    while let Some((_, event)) = submission.next().await? {
        usage.add(&event);
        match event {
            EngineEvent::Token {
                index,
                text,
                logprob,
                ..
            } => {
                if let Some(out) = outs.get_mut(index) {
                    out.text.push_str(&text);
                    out.logprobs.extend(logprob);
                }
            }
            EngineEvent::Text { index, text } => {
                if let Some(out) = outs.get_mut(index) {
                    out.text.push_str(&text);
                }
            }
            EngineEvent::Finished {
                index,
                reason,
                stop_reason,
                ..
            } => {
                if let Some(out) = outs.get_mut(index) {
                    out.finished = Some((reason, stop_reason));
                }
            }
            EngineEvent::PromptLogprobs(_) => {}
        }
    }
    let names = TokenNames {
        tokenizer,
        as_ids: plan.options.return_tokens_as_token_ids,
    };
    let mut choices = Vec::with_capacity(n);
    for (index, out) in outs.into_iter().enumerate() {
        let (reason, stop_reason) = out
            .finished
            .ok_or_else(|| ApiError::internal("a completion ended without finishing"))?;
        let mut parser = plan.parser();
        let mut all = parser.push(&out.text);
        let tail = parser.finish();
        all.reasoning += &tail.reasoning;
        all.content += &tail.content;
        all.tool_calls.extend(tail.tool_calls);
        let mut message = Map::new();
        message.insert("role".into(), json!("assistant"));
        let calls = merge_calls(&all.tool_calls);
        let content = if all.content.is_empty() && !calls.is_empty() {
            Json::Null
        } else {
            json!(all.content)
        };
        message.insert("content".into(), content);
        if !all.reasoning.is_empty() {
            message.insert("reasoning_content".into(), json!(all.reasoning));
        }
        if !calls.is_empty() {
            message.insert("tool_calls".into(), Json::Array(calls));
        }
        let logprobs = if plan.logprobs {
            json!({"content": out.logprobs.iter().map(|lp| names.chat(lp)).collect::<Vec<_>>()})
        } else {
            Json::Null
        };
        choices.push(json!({
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": parser.finish_reason(reason),
            "stop_reason": stop_reason_json(&stop_reason),
        }));
    }
    Ok(whole_response(
        ("chatcmpl", "chat.completion"),
        &plan.options.model,
        choices,
        &usage,
    ))
}

struct StreamChoice {
    parser: ChoiceParser,
    role_sent: bool,
    /// Logprobs of tokens whose text is not out yet.
    logprobs: Vec<Json>,
}

impl StreamChoice {
    fn new(parser: ChoiceParser) -> Self {
        Self {
            parser,
            role_sent: false,
            logprobs: Vec::new(),
        }
    }
}

pub(super) struct ChatChunks {
    id: String,
    created: u64,
    plan: ChatPlan,
    choices: Vec<StreamChoice>,
    tokenizer: Arc<tokenizers::Tokenizer>,
    usage: Usage,
}

impl ChatChunks {
    pub(super) fn new(plan: ChatPlan, n: usize, tokenizer: Arc<tokenizers::Tokenizer>) -> Self {
        Self {
            id: new_id("chatcmpl"),
            created: unix_now(),
            choices: (0..n).map(|_| StreamChoice::new(plan.parser())).collect(),
            plan,
            tokenizer,
            usage: Usage::default(),
        }
    }

    fn chunk(&self, choice: Json) -> Json {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.plan.options.model,
            "choices": [choice],
        })
    }

    /// Chunks for new text of completion `index` (the role first, once).
    fn on_text(
        &mut self,
        index: usize,
        text: &str,
        logprob: Option<TokenLogprob>,
        finish: Option<(FinishReason, Option<StopReason>)>,
    ) -> Vec<Json> {
        let names = TokenNames {
            tokenizer: &self.tokenizer,
            as_ids: self.plan.options.return_tokens_as_token_ids,
        };
        let Some(choice) = self.choices.get_mut(index) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut pieces = Vec::new();
        if !choice.role_sent {
            choice.role_sent = true;
            pieces.push(json!({
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": null,
            }));
        }
        if let Some(lp) = &logprob {
            choice.logprobs.push(names.chat(lp));
        }
        let mut delta = choice.parser.push(text);
        if finish.is_some() {
            let tail = choice.parser.finish();
            delta.reasoning += &tail.reasoning;
            delta.content += &tail.content;
            delta.tool_calls.extend(tail.tool_calls);
        }
        if !delta.is_empty() || finish.is_some() {
            let mut d = Map::new();
            if !delta.reasoning.is_empty() {
                d.insert("reasoning_content".into(), json!(delta.reasoning));
            }
            if !delta.content.is_empty() {
                d.insert("content".into(), json!(delta.content));
            }
            if !delta.tool_calls.is_empty() {
                let calls: Vec<Json> = delta.tool_calls.iter().map(tool_call_json).collect();
                d.insert("tool_calls".into(), Json::Array(calls));
            }
            let logprobs = if self.plan.logprobs && !choice.logprobs.is_empty() {
                json!({"content": std::mem::take(&mut choice.logprobs)})
            } else {
                Json::Null
            };
            let mut piece = json!({
                "index": index,
                "delta": d,
                "logprobs": logprobs,
                "finish_reason": null,
            });
            if let Some((reason, stop)) = &finish {
                piece["finish_reason"] = json!(choice.parser.finish_reason(*reason));
                piece["stop_reason"] = stop_reason_json(stop);
            }
            pieces.push(piece);
        }
        for piece in pieces {
            out.push(self.chunk(piece));
        }
        out
    }
}

impl ChunkWriter for ChatChunks {
    fn on_event(&mut self, _prompt: usize, event: EngineEvent) -> Vec<Json> {
        self.usage.add(&event);
        match event {
            EngineEvent::Token {
                index,
                text,
                logprob,
                ..
            } => self.on_text(index, &text, logprob, None),
            EngineEvent::Text { index, text } => self.on_text(index, &text, None, None),
            EngineEvent::Finished {
                index,
                reason,
                stop_reason,
                ..
            } => self.on_text(index, "", None, Some((reason, stop_reason))),
            EngineEvent::PromptLogprobs(_) => Vec::new(),
        }
    }

    fn on_end(&mut self) -> Vec<Json> {
        if !self.plan.options.include_usage {
            return Vec::new();
        }
        vec![json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.plan.options.model,
            "choices": [],
            "usage": self.usage.json(),
        })]
    }
}
