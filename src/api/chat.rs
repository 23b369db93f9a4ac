//! POST /v1/chat/completions: messages through the chat template, output split into reasoning,
//! content and tool calls, answered whole or as SSE chunks.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value as Json};

use crate::engine::{EngineEvent, FinishReason, StopReason, TokenLogprob};
use crate::parsers::{ReasoningParser, ToolCallDelta, ToolCallParser, TOOL_CALL_START};
use crate::template::{ChatTemplate, RenderOptions};

use super::error::ApiError;
use super::generation::{
    blocking, body_bytes, finish_reason_str, new_id, sse, stop_reason_json, unix_now, ChunkWriter,
    Submission, Usage,
};
use super::logprobs::TokenNames;
use super::sampling::{self, OutputOptions};
use super::types::{
    parse_with_common, ChatMessage, ChatRequest, MessageContent, ToolDefinition, CHAT_FIELDS,
    COMMON_FIELDS,
};
use super::{AppState, ModelContext};

/// `chat_template_kwargs` a request may set.
const ALLOWED_TEMPLATE_KWARGS: &[&str] = &["enable_thinking"];

/// How the output is searched for tool calls.
#[derive(Debug, Clone, PartialEq)]
enum ToolMode {
    /// No tools, or tool_choice "none": the output is all content.
    Off,
    Auto,
    /// tool_choice "required": the prompt opens a call, the model picks the function.
    Required,
    /// A named function: the prompt opens a call to it.
    Named(String),
}

impl ToolMode {
    /// Text appended to the prompt to open a call (the model continues inside it).
    fn prefill(&self) -> Option<String> {
        match self {
            Self::Required => Some("\n{\"name\": \"".to_string()),
            Self::Named(name) => Some(format!(
                "\n{{\"name\": {}, \"arguments\": ",
                Json::String(name.clone())
            )),
            Self::Off | Self::Auto => None,
        }
    }
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
            tools: match (&self.tool_mode, self.tool_mode.prefill()) {
                (ToolMode::Off, _) => None,
                (_, Some(body)) => Some(ToolCallParser::inside_call(&body)),
                (_, None) => Some(ToolCallParser::new()),
            },
            parallel: self.parallel_tool_calls,
            num_calls: 0,
        }
    }
}

/// One completion's output, split as it streams.
struct ChoiceParser {
    reasoning: Option<ReasoningParser>,
    tools: Option<ToolCallParser>,
    parallel: bool,
    num_calls: usize,
}

#[derive(Debug, Default)]
struct ChoiceDelta {
    reasoning: String,
    content: String,
    tool_calls: Vec<ToolCallDelta>,
}

impl ChoiceDelta {
    fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.tool_calls.is_empty()
    }
}

impl ChoiceParser {
    fn push(&mut self, text: &str) -> ChoiceDelta {
        let (reasoning, content) = match &mut self.reasoning {
            Some(r) => {
                let d = r.push(text);
                (d.reasoning, d.content)
            }
            None => (String::new(), text.to_string()),
        };
        self.route(reasoning, content, false)
    }

    fn finish(&mut self) -> ChoiceDelta {
        let (reasoning, content) = match &mut self.reasoning {
            Some(r) => {
                let d = r.finish();
                (d.reasoning, d.content)
            }
            None => (String::new(), String::new()),
        };
        self.route(reasoning, content, true)
    }

    fn route(&mut self, reasoning: String, content: String, at_end: bool) -> ChoiceDelta {
        let mut delta = ChoiceDelta {
            reasoning,
            ..ChoiceDelta::default()
        };
        match &mut self.tools {
            Some(tools) => {
                let mut parsed = tools.push(&content);
                if at_end {
                    let tail = tools.finish();
                    parsed.content += &tail.content;
                    parsed.calls.extend(tail.calls);
                }
                delta.content = parsed.content;
                // Without parallel calls only the first call stands.
                delta.tool_calls = parsed
                    .calls
                    .into_iter()
                    .filter(|c| self.parallel || c.index == 0)
                    .collect();
                self.num_calls = tools
                    .num_calls()
                    .min(if self.parallel { usize::MAX } else { 1 });
            }
            None => delta.content = content,
        }
        delta
    }

    fn finish_reason(&self, reason: FinishReason) -> &'static str {
        if reason == FinishReason::Stop && self.num_calls > 0 {
            "tool_calls"
        } else {
            finish_reason_str(reason)
        }
    }
}

fn tool_call_json(c: &ToolCallDelta) -> Json {
    let mut function = Map::new();
    if let Some(name) = &c.name {
        function.insert("name".into(), json!(name));
    }
    function.insert("arguments".into(), json!(c.arguments));
    let mut call = Map::new();
    call.insert("index".into(), json!(c.index));
    if let Some(id) = &c.id {
        call.insert("id".into(), json!(id));
        call.insert("type".into(), json!("function"));
    }
    call.insert("function".into(), Json::Object(function));
    Json::Object(call)
}

pub async fn handle(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body = body_bytes(&state, body)?;
    let ctx = state.model()?;
    // Admitted (or refused with 503) before any template or tokenizer work.
    let admitted = state.admit()?;
    let known: Vec<&str> = COMMON_FIELDS.iter().chain(CHAT_FIELDS).copied().collect();
    let req: ChatRequest = parse_with_common(&body, &known)?;
    let model = state.check_model(req.common.model.as_deref())?;
    check_response_format(req.response_format.as_ref())?;
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
    let tool_mode = tool_mode(&req)?;
    let template = pick_template(&state, ctx, req.chat_template.as_deref())?;
    let enable_thinking = template_kwargs(req.chat_template_kwargs.as_ref())?;
    let messages = messages_json(&req.messages)?;
    let render = RenderOptions {
        add_generation_prompt: true,
        tools: tools_json(req.tools.as_deref()),
        enable_thinking,
        max_bytes: Some(state.0.config.limits.max_prompt_bytes),
    };
    let prefill = tool_mode.prefill();
    let tokenizer = ctx.tokenizer.clone();
    let (prompt_opens_think, ids) = blocking(&state, move |deadline| {
        let mut text = template
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
        let opens_think =
            ReasoningParser::prompt_opens_block(generation_prompt(&text, &conversation));
        if let Some(body) = prefill {
            text.push_str(TOOL_CALL_START);
            text.push_str(&body);
        }
        let ids = tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))?
            .get_ids()
            .to_vec();
        Ok((opens_think, ids))
    })
    .await?;
    request.prompt = ids;
    let limit = ctx.limits.max_model_len.min(ctx.limits.max_cache_tokens);
    sampling::fill_max_tokens(&mut request, limit, "messages")?;
    let plan = ChatPlan {
        options,
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
        reasoning: ctx.has_reasoning_markup,
        prompt_opens_think,
        tool_mode,
        logprobs,
    };
    let n = request.n;
    let submission = Submission::submit(&state, ctx, vec![request], arrived, admitted)?;
    let names = ctx.tokenizer.clone();
    if plan.options.stream {
        let writer = ChatChunks {
            id: new_id("chatcmpl"),
            created: unix_now(),
            choices: (0..n).map(|_| StreamChoice::new(plan.parser())).collect(),
            plan,
            tokenizer: names,
            usage: Usage::default(),
        };
        Ok(sse(submission, writer))
    } else {
        collect(submission, plan, n, &names).await
    }
}

fn check_response_format(format: Option<&Json>) -> Result<(), ApiError> {
    let Some(format) = format else {
        return Ok(());
    };
    match format.get("type").and_then(Json::as_str) {
        Some("text") => Ok(()),
        Some(kind @ ("json_object" | "json_schema")) => Err(ApiError::unsupported(
            "response_format",
            &format!("type '{kind}' is not supported yet (structured output is not implemented); use 'text'."),
        )),
        _ => Err(ApiError::invalid(
            "response_format",
            "'response_format.type' must be 'text', 'json_object' or 'json_schema'",
        )),
    }
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

fn pick_template(
    state: &AppState,
    ctx: &ModelContext,
    requested: Option<&str>,
) -> Result<Arc<ChatTemplate>, ApiError> {
    if let Some(source) = requested {
        if !state.0.config.trust_request_chat_template {
            return Err(ApiError::unsupported(
                "chat_template",
                "is refused: this server does not accept chat templates in requests (--trust-request-chat-template).",
            ));
        }
        return ChatTemplate::new(source.to_string(), None, None)
            .map(Arc::new)
            .map_err(|e| ApiError::invalid("chat_template", e.to_string()));
    }
    state
        .0
        .config
        .chat_template
        .clone()
        .or_else(|| ctx.template.clone())
        .ok_or_else(|| {
            ApiError::invalid(
                "messages",
                "The model has no chat template; start the server with --chat-template.",
            )
        })
}

/// What the template appended for `add_generation_prompt`: the rendered prompt past the
/// conversation rendered without it; where a template renders no difference (it ignores the
/// flag), the text from the last ChatML turn start, else all of it.
fn generation_prompt<'a>(prompt: &'a str, conversation: &str) -> &'a str {
    match prompt.strip_prefix(conversation) {
        Some(suffix) if !conversation.is_empty() && !suffix.is_empty() => suffix,
        _ => prompt
            .rfind("<|im_start|>")
            .map_or(prompt, |i| &prompt[i..]),
    }
}

/// Tool definitions as the chat template receives them.
pub(super) fn tools_json(tools: Option<&[ToolDefinition]>) -> Option<Json> {
    tools.map(|tools| {
        json!(tools
            .iter()
            .map(|t| json!({"type": t.kind, "function": t.function}))
            .collect::<Vec<_>>())
    })
}

pub(super) fn template_kwargs(
    kwargs: Option<&Map<String, Json>>,
) -> Result<Option<bool>, ApiError> {
    let mut enable_thinking = None;
    for (key, value) in kwargs.into_iter().flatten() {
        let param = format!("chat_template_kwargs.{key}");
        if !ALLOWED_TEMPLATE_KWARGS.contains(&key.as_str()) {
            return Err(ApiError::unsupported(
                param,
                &format!(
                    "is not allowed; allowed: {}",
                    ALLOWED_TEMPLATE_KWARGS.join(", ")
                ),
            ));
        }
        enable_thinking = Some(
            value
                .as_bool()
                .ok_or_else(|| ApiError::invalid(param, "must be true or false"))?,
        );
    }
    Ok(enable_thinking)
}

/// The messages as the template sees them: content as one string, roles checked.
pub fn messages_json(messages: &[ChatMessage]) -> Result<Json, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "'messages' must not be empty",
        ));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            r @ ("user" | "assistant" | "tool") => r,
            _ => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    "unknown role; expected system, developer, user, assistant or tool",
                ))
            }
        };
        if let Some((key, _)) = m.extra.iter().find(|(_, v)| !v.is_null()) {
            return Err(ApiError::unsupported(
                format!("messages[{i}].{key}"),
                "is not supported by this server.",
            ));
        }
        let content = match &m.content {
            None => Json::Null,
            Some(MessageContent::Text(s)) => json!(s),
            Some(MessageContent::Parts(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => texts.push(t.as_str()),
                        ("text", None) => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content[{j}].text"),
                                "a text part needs 'text'",
                            ))
                        }
                        (kind, _) => {
                            return Err(ApiError::unsupported(
                                format!("messages[{i}].content[{j}].type"),
                                &format!("'{kind}' is not supported: this model reads text only."),
                            ))
                        }
                    }
                }
                json!(texts.join("\n"))
            }
        };
        if role != "assistant" && content.is_null() {
            return Err(ApiError::invalid(
                format!("messages[{i}].content"),
                "'content' is required for this role",
            ));
        }
        let mut msg = Map::new();
        msg.insert("role".into(), json!(role));
        msg.insert("content".into(), content);
        if let Some(name) = &m.name {
            msg.insert("name".into(), json!(name));
        }
        if let Some(calls) = &m.tool_calls {
            msg.insert("tool_calls".into(), json!(calls));
        }
        if let Some(id) = &m.tool_call_id {
            msg.insert("tool_call_id".into(), json!(id));
        }
        if let Some(r) = &m.reasoning_content {
            msg.insert("reasoning_content".into(), json!(r));
        }
        out.push(Json::Object(msg));
    }
    Ok(Json::Array(out))
}

/// The non-streaming answer: all events, then one response.
async fn collect(
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
    Ok(axum::Json(json!({
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": unix_now(),
        "model": plan.options.model,
        "choices": choices,
        "usage": usage.json(),
    }))
    .into_response())
}

/// Whole tool calls from their deltas.
fn merge_calls(deltas: &[ToolCallDelta]) -> Vec<Json> {
    let mut calls: Vec<Json> = Vec::new();
    for d in deltas {
        if let (Some(id), Some(name)) = (&d.id, &d.name) {
            calls.push(json!({
                "id": id,
                "type": "function",
                "function": {"name": name, "arguments": d.arguments},
            }));
        } else if let Some(call) = calls.last_mut() {
            if let Some(Json::String(args)) = call.pointer_mut("/function/arguments") {
                args.push_str(&d.arguments);
            }
        }
    }
    calls
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

struct ChatChunks {
    id: String,
    created: u64,
    plan: ChatPlan,
    choices: Vec<StreamChoice>,
    tokenizer: Arc<tokenizers::Tokenizer>,
    usage: Usage,
}

impl ChatChunks {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(tool_mode: ToolMode, reasoning: bool, parallel: bool) -> ChatPlan {
        ChatPlan {
            options: OutputOptions {
                model: "m".into(),
                stream: false,
                include_usage: false,
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
    fn named_tool_choice_continues_the_opened_call() {
        let p = plan(ToolMode::Named("get_weather".into()), false, true);
        let (d, reason) = run(&p, "{\"city\": \"Rome\"}}\n</tool_call>");
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
