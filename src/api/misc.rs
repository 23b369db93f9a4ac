//! The small routes: health, metrics, models, version, tokenize, detokenize, and the fallbacks.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value as Json};

use super::chat::{messages_json, template_kwargs, tools_json};
use super::error::ApiError;
use super::generation::{blocking, body_bytes};
use super::types::{parse_body, DetokenizeRequest, TokenizeRequest};
use super::AppState;
use crate::template::RenderOptions;

/// 200 when the model is loaded and the server is not shutting down, else 503.
pub async fn health(State(state): State<AppState>) -> Response {
    match state.model() {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    // The engine's last published counters: a scrape never waits for the engine thread.
    let stats = state
        .0
        .model
        .get()
        .map(|m| m.engine.stats_snapshot())
        .unwrap_or_default();
    match state.0.metrics.encode(stats) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::internal(format!("encoding metrics: {e}")).into_response(),
    }
}

fn model_card(state: &AppState, name: &str) -> Json {
    let mut card = json!({
        "id": name,
        "object": "model",
        "created": state.0.created,
        "owned_by": "ember",
        "root": name,
        "parent": null,
    });
    if let Some(m) = state.0.model.get() {
        card["max_model_len"] = json!(m.limits.max_model_len);
    }
    card
}

pub async fn list_models(State(state): State<AppState>) -> Response {
    let data: Vec<Json> = state
        .0
        .config
        .served_model_names
        .iter()
        .map(|n| model_card(&state, n))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

pub async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.check_model(Some(&id)) {
        Ok(name) => axum::Json(model_card(&state, &name)).into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn version() -> Response {
    axum::Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

/// vLLM's /tokenize: a prompt, or chat messages through the template.
pub async fn tokenize(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<Json>, ApiError> {
    let body = body_bytes(&state, body)?;
    let ctx = state.model()?;
    let req: TokenizeRequest = parse_body(
        &body,
        &[
            "model",
            "prompt",
            "messages",
            "add_special_tokens",
            "add_generation_prompt",
            "tools",
            "chat_template_kwargs",
        ],
    )?;
    state.check_model(req.model.as_deref())?;
    let tokenizer = ctx.tokenizer.clone();
    let text_and_special = match (req.prompt, req.messages) {
        (Some(prompt), None) => (prompt, req.add_special_tokens.unwrap_or(true)),
        (None, Some(messages)) => {
            let template = state
                .0
                .config
                .chat_template
                .clone()
                .or_else(|| ctx.template.clone())
                .ok_or_else(|| ApiError::invalid("messages", "The model has no chat template."))?;
            let messages = messages_json(&messages)?;
            let opts = RenderOptions {
                add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
                tools: tools_json(req.tools.as_deref()),
                enable_thinking: template_kwargs(req.chat_template_kwargs.as_ref())?,
                max_bytes: Some(state.0.config.limits.max_prompt_bytes),
            };
            let text = blocking(&state, move |_| {
                template
                    .render(&messages, &opts)
                    .map_err(|e| ApiError::invalid("messages", e.to_string()))
            })
            .await?;
            (text, req.add_special_tokens.unwrap_or(false))
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give exactly one of 'prompt' and 'messages'",
            ))
        }
    };
    let (text, special) = text_and_special;
    let tokens = blocking(&state, move |_| {
        tokenizer
            .encode(text.as_str(), special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))
    })
    .await?;
    Ok(axum::Json(json!({
        "count": tokens.len(),
        "max_model_len": ctx.limits.max_model_len,
        "tokens": tokens,
    })))
}

pub async fn detokenize(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<Json>, ApiError> {
    let body = body_bytes(&state, body)?;
    let ctx = state.model()?;
    let req: DetokenizeRequest = parse_body(&body, &["model", "tokens"])?;
    state.check_model(req.model.as_deref())?;
    let vocab = ctx.tokenizer.get_vocab_size(true) as u32;
    if let Some(bad) = req.tokens.iter().find(|&&t| t >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token id {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    let tokenizer = ctx.tokenizer.clone();
    let text = blocking(&state, move |_| {
        tokenizer
            .decode(&req.tokens, false)
            .map_err(|e| ApiError::internal(format!("detokenizing: {e}")))
    })
    .await?;
    Ok(axum::Json(json!({"prompt": text})))
}

pub async fn not_found(uri: Uri) -> Response {
    ApiError::route_not_found(uri.path()).into_response()
}

pub async fn method_not_allowed() -> Response {
    ApiError::method_not_allowed().into_response()
}
