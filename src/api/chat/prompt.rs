//! The prompt side of a chat request: messages checked and shaped for the template, the
//! template picked, and what the template appended for the generation prompt.

use std::sync::Arc;

use serde_json::{json, Map, Value as Json};

use crate::template::ChatTemplate;

use crate::api::error::ApiError;
use crate::api::types::{ChatMessage, MessageContent, ToolDefinition};
use crate::api::{AppState, ModelContext};

/// `chat_template_kwargs` a request may set.
const ALLOWED_TEMPLATE_KWARGS: &[&str] = &["enable_thinking"];

pub(super) fn pick_template(
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
pub(super) fn generation_prompt<'a>(prompt: &'a str, conversation: &str) -> &'a str {
    match prompt.strip_prefix(conversation) {
        Some(suffix) if !conversation.is_empty() && !suffix.is_empty() => suffix,
        _ => prompt
            .rfind("<|im_start|>")
            .map_or(prompt, |i| &prompt[i..]),
    }
}

/// Tool definitions as the chat template receives them.
pub(in crate::api) fn tools_json(tools: Option<&[ToolDefinition]>) -> Option<Json> {
    tools.map(|tools| {
        json!(tools
            .iter()
            .map(|t| json!({"type": t.kind, "function": t.function}))
            .collect::<Vec<_>>())
    })
}

pub(in crate::api) fn template_kwargs(
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
pub(crate) fn messages_json(messages: &[ChatMessage]) -> Result<Json, ApiError> {
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
