//! POST /v1/chat/completions: messages through the chat template, output split into reasoning,
//! content and tool calls, answered whole or as SSE chunks.
//!
//! `mod.rs` turns a request into a plan and submits it; `prompt` checks the messages and picks
//! and feeds the template; `output` splits one completion's text into reasoning, content and
//! tool calls; `respond` answers whole or as SSE chunks.

mod output;
mod prompt;
mod respond;

pub(in crate::api) use prompt::{messages_json, template_kwargs, tools_json};

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use serde_json::Value as Json;

use crate::engine::ConstraintStart;
use crate::parsers::{ReasoningParser, ToolCallParser};
use crate::template::RenderOptions;

use super::access::{AccessRecord, RequestId};
use super::error::ApiError;
use super::generation::{begin, blocking, sse, ChunkUsage, Submission};
use super::sampling::{self, OutputOptions};
use super::structured::{self, GrammarRequest};
use super::types::{ChatRequest, CHAT_FIELDS};
use super::AppState;
use output::ChoiceParser;
use prompt::{generation_prompt, pick_template};
use respond::{collect, ChatChunks};

/// How the output is searched for tool calls.
#[derive(Debug, Clone, PartialEq)]
enum ToolMode {
    /// No tools, or tool_choice "none": the output is all content.
    Off,
    Auto,
    /// tool_choice "required": a grammar makes the output calls, to any of the tools.
    Required,
    /// A named function: a grammar makes the output calls to it.
    Named(String),
}

/// Everything decided about a chat request before it reaches the engine.
struct ChatPlan {
    options: OutputOptions,
    tool_mode: ToolMode,
    parallel_tool_calls: bool,
    /// Split `<think>` blocks into reasoning_content.
    reasoning: bool,
    /// The prompt ends inside an open think block.
    prompt_opens_think: bool,
    logprobs: bool,
}

impl ChatPlan {
    fn parser(&self) -> ChoiceParser {
        ChoiceParser {
            reasoning: self
                .reasoning
                .then(|| ReasoningParser::new(self.prompt_opens_think)),
            tools: (self.tool_mode != ToolMode::Off).then(ToolCallParser::new),
            parallel: self.parallel_tool_calls,
            num_calls: 0,
        }
    }
}

pub async fn handle(
    State(state): State<AppState>,
    Extension(access): Extension<AccessRecord>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let (req, ctx, mut admitted, model) = begin(&state, body, CHAT_FIELDS, |r: &ChatRequest| {
        r.common.model.as_deref()
    })?;
    let logprobs = req.logprobs.unwrap_or(false);
    let top_logprobs = match (logprobs, req.top_logprobs) {
        (true, k) => Some(k.unwrap_or(0)),
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "'top_logprobs' needs 'logprobs' set to true",
            ))
        }
        (false, None) => None,
    };
    let top_logprobs = top_logprobs
        .map(|k| {
            usize::try_from(k)
                .map_err(|_| ApiError::invalid("top_logprobs", "'top_logprobs' must be >= 0"))
        })
        .transpose()?;
    let max_tokens = req.max_completion_tokens.or(req.common.max_tokens);
    let (mut request, options) = sampling::build(
        &req.common,
        &state.0.config.limits,
        model,
        max_tokens,
        None,
        top_logprobs,
        &ctx.defaults,
    )?;
    admitted.claim(request.n)?;
    let tool_mode = tool_mode(&req)?;
    let parallel_tool_calls = req.parallel_tool_calls.unwrap_or(true);
    let (grammar, each_call) = constraint_of(&req, &tool_mode, parallel_tool_calls, ctx)?;
    let grammars = ctx.grammars.clone();
    let reasoning = ctx.has_reasoning_markup;
    let template = pick_template(&state, ctx, req.chat_template.as_deref())?;
    let enable_thinking = template_kwargs(req.chat_template_kwargs.as_ref())?;
    let messages = messages_json(&req.messages)?;
    let render = RenderOptions {
        add_generation_prompt: true,
        tools: tools_json(req.tools.as_deref()),
        enable_thinking,
        max_bytes: Some(state.0.config.limits.max_prompt_bytes),
    };
    let tokenizer = ctx.tokenizer.clone();
    let log_prompt = state.0.config.log_requests;
    let (prompt_opens_think, ids, logged, constraint) = blocking(&state, move |deadline| {
        let text = template
            .render(&messages, &render)
            .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        deadline.check()?;
        // Only the generation prompt decides whether the answer starts inside a think block:
        // a `<think>` a user wrote into a message must not turn the answer into reasoning.
        let conversation = template
            .render(
                &messages,
                &RenderOptions {
                    add_generation_prompt: false,
                    ..render.clone()
                },
            )
            .unwrap_or_default();
        deadline.check()?;
        let generation = generation_prompt(&text, &conversation);
        let opens_think = ReasoningParser::prompt_opens_block(generation);
        // A template that closed the think block (enable_thinking false) leaves none to open.
        let may_think = reasoning && !generation.contains(crate::parsers::THINK_END);
        let ids = tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))?
            .get_ids()
            .to_vec();
        deadline.check()?;
        let start = match each_call {
            Some(token) => ConstraintStart::EachAfter(token),
            None => structured::chat_start(&tokenizer, may_think, opens_think),
        };
        let constraint = grammar.map(|g| g.compile(&grammars, start)).transpose()?;
        Ok((opens_think, ids, log_prompt.then_some(text), constraint))
    })
    .await?;
    if let Some(text) = logged {
        tracing::info!(target: "ember::requests", request_id = %request_id, prompt = %text, "chat prompt");
    }
    request.prompt = ids;
    request.constraint = constraint;
    let limit = ctx.limits.max_model_len.min(ctx.limits.max_cache_tokens);
    sampling::fill_max_tokens(&mut request, limit, "messages")?;
    let plan = ChatPlan {
        options,
        parallel_tool_calls,
        reasoning: ctx.has_reasoning_markup,
        prompt_opens_think,
        tool_mode,
        logprobs,
    };
    let n = request.n;
    let submission = Submission::submit(&state, ctx, vec![request], arrived, admitted, access)?;
    let names = ctx.tokenizer.clone();
    if plan.options.stream {
        let usage = ChunkUsage::of(&plan.options);
        Ok(sse(submission, ChatChunks::new(plan, n, names), usage))
    } else {
        collect(submission, plan, n, &names).await
    }
}

/// The grammar the request's output must match, from `response_format`,
/// `structured_outputs` or `tool_choice`; with the token after which it applies each time,
/// for strict tools under tool_choice "auto".
fn constraint_of(
    req: &ChatRequest,
    tool_mode: &ToolMode,
    parallel: bool,
    ctx: &crate::api::ModelContext,
) -> Result<(Option<GrammarRequest>, Option<u32>), ApiError> {
    let tools = req.tools.as_deref().unwrap_or_default();
    let (calls, each_call) = match tool_mode {
        ToolMode::Off => (None, None),
        ToolMode::Required => (Some(structured::forced_calls(tools, None, parallel)), None),
        ToolMode::Named(name) => (
            Some(structured::forced_calls(tools, Some(name), parallel)),
            None,
        ),
        ToolMode::Auto => match structured::strict_calls(tools) {
            Some(g) => (Some(g), Some(structured::tool_call_token(&ctx.tokenizer)?)),
            None => (None, None),
        },
    };
    let grammar = structured::one_of([
        structured::from_response_format(req.response_format.as_ref())?,
        structured::from_structured_outputs(req.structured_outputs.as_ref())?,
        calls,
    ])?;
    // With strict calls `one_of` refused any other grammar: `each_call` goes with theirs.
    Ok((grammar, each_call))
}

fn tool_mode(req: &ChatRequest) -> Result<ToolMode, ApiError> {
    let tools = req.tools.as_deref().unwrap_or_default();
    if let Some(bad) = tools.iter().position(|t| t.kind != "function") {
        return Err(ApiError::invalid(
            format!("tools[{bad}].type"),
            "only tools of type 'function' are supported",
        ));
    }
    let choice = req.tool_choice.as_ref();
    let mode = match choice {
        None if tools.is_empty() => ToolMode::Off,
        None => ToolMode::Auto,
        Some(Json::String(s)) => match s.as_str() {
            "none" => ToolMode::Off,
            "auto" => ToolMode::Auto,
            "required" => ToolMode::Required,
            _ => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "'tool_choice' must be 'none', 'auto', 'required' or a named function",
                ))
            }
        },
        Some(named) => {
            let name = named
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Json::as_str)
                .filter(|_| named.get("type").and_then(Json::as_str) == Some("function"))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "tool_choice",
                        "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            ToolMode::Named(name.to_string())
        }
    };
    if mode != ToolMode::Off && tools.is_empty() {
        return Err(ApiError::invalid(
            "tool_choice",
            "'tool_choice' needs 'tools'",
        ));
    }
    if let ToolMode::Named(name) = &mode {
        if !tools.iter().any(|t| &t.function.name == name) {
            return Err(ApiError::invalid(
                "tool_choice",
                "the function 'tool_choice' names is not among 'tools'",
            ));
        }
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::output::{merge_calls, ChoiceDelta};
    use super::*;
    use crate::api::types::ChatMessage;
    use crate::engine::FinishReason;

    fn plan(tool_mode: ToolMode, reasoning: bool, parallel: bool) -> ChatPlan {
        ChatPlan {
            options: OutputOptions {
                model: "m".into(),
                stream: false,
                include_usage: false,
                continuous_usage: false,
                return_tokens_as_token_ids: false,
            },
            tool_mode,
            parallel_tool_calls: parallel,
            reasoning,
            prompt_opens_think: false,
            logprobs: false,
        }
    }

    const OUTPUT: &str = "<think>need weather</think>\n\nChecking.<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call><tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";

    fn run(plan: &ChatPlan, text: &str) -> (ChoiceDelta, &'static str) {
        let mut p = plan.parser();
        let mut d = p.push(text);
        let tail = p.finish();
        d.reasoning += &tail.reasoning;
        d.content += &tail.content;
        d.tool_calls.extend(tail.tool_calls);
        (d, p.finish_reason(FinishReason::Stop))
    }

    #[test]
    fn reasoning_then_tools() {
        let (d, reason) = run(&plan(ToolMode::Auto, true, true), OUTPUT);
        assert_eq!(d.reasoning, "need weather");
        assert_eq!(d.content, "Checking.");
        assert_eq!(merge_calls(&d.tool_calls).len(), 2);
        assert_eq!(reason, "tool_calls");
        let (d, reason) = run(&plan(ToolMode::Auto, true, false), OUTPUT);
        assert_eq!(
            merge_calls(&d.tool_calls).len(),
            1,
            "parallel_tool_calls false"
        );
        assert_eq!(reason, "tool_calls");
        // tool_choice none: everything after the think block is content.
        let (d, reason) = run(&plan(ToolMode::Off, true, true), OUTPUT);
        assert!(d.content.starts_with("Checking.<tool_call>"));
        assert_eq!(reason, "stop");
    }

    #[test]
    fn named_tool_choice_output_is_a_call() {
        let p = plan(ToolMode::Named("get_weather".into()), false, true);
        let (d, reason) = run(
            &p,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>",
        );
        let calls = merge_calls(&d.tool_calls);
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(calls[0]["function"]["arguments"], r#"{"city":"Rome"}"#);
        assert_eq!(reason, "tool_calls");
    }

    #[test]
    fn messages_are_checked() {
        let parse = |v: Json| -> Result<Json, ApiError> {
            let msgs: Vec<ChatMessage> = serde_json::from_value(v).unwrap();
            messages_json(&msgs)
        };
        let ok = parse(json!([
            {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null, "refusal": null, "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "x", "content": "42"}
        ]))
        .unwrap();
        assert_eq!(ok[0]["role"], "system");
        assert_eq!(ok[0]["content"], "a\nb");
        let e = parse(json!([{"role": "wizard", "content": "x"}])).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e =
            parse(json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]))
                .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));
        let e = parse(json!([{"role": "user", "content": "x", "audio": {"id": "a"}}])).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].audio"));
        assert!(parse(json!([])).is_err());
    }
}
