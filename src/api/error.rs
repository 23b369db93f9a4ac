//! One error type for the HTTP API, mapped to the OpenAI error envelope in one place:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value as Json};

use crate::engine::SubmitError;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for the Retry-After header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 with OpenAI's `context_length_exceeded` code: LiteLLM (`ContextWindowExceededError`)
    /// and langchain-openai recognise it to trim a conversation and retry.
    ///
    /// The message ends with the code in parentheses: OpenAI's Python SDK 3.x puts only the
    /// message into the exception's text, and langchain-openai recognises a context overflow
    /// (its `ContextOverflowError`) by finding `context_length_exceeded` in that text.
    pub fn context_length_exceeded(param: impl Into<String>, message: impl Into<String>) -> Self {
        let message = format!("{} (context_length_exceeded)", message.into());
        Self {
            code: Some("context_length_exceeded"),
            ..Self::invalid(param, message)
        }
    }

    /// 400 for a bad value, naming the parameter.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            code: Some("invalid_value"),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                message.into(),
            )
        }
    }

    /// 400 for a parameter Ember does not implement.
    pub fn unsupported(param: impl Into<String>, why: &str) -> Self {
        let param = param.into();
        Self {
            code: Some("unsupported_parameter"),
            ..Self::invalid(
                param.clone(),
                format!("Unsupported parameter: '{param}' {why}"),
            )
        }
    }

    /// 400 for a body that is not the JSON the route expects.
    pub fn bad_body(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message.into(),
        )
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{model}` does not exist."),
            )
        }
    }

    pub fn route_not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown route: {path}"),
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "Method not allowed for this route.",
        )
    }

    pub fn unauthorized() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "Incorrect or missing API key. Send it as `Authorization: Bearer <key>`.",
            )
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body is larger than the server's limit of {limit} bytes."),
        )
    }

    /// 503 with Retry-After: the queue is full.
    pub fn overloaded() -> Self {
        Self {
            code: Some("server_overloaded"),
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "The server is at capacity: too many requests are queued. Retry later.",
            )
        }
    }

    /// 408: the request ran past the server's deadline (`--request-timeout`).
    pub fn request_timeout(after: std::time::Duration) -> Self {
        Self {
            code: Some("request_timeout"),
            ..Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout_error",
                format!(
                    "The request ran longer than the server's limit of {} s and was stopped.",
                    after.as_secs_f32()
                ),
            )
        }
    }

    /// 503: loading the model, or shutting down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        }
    }

    /// 500: a real fault. The details go to the log, not to the client.
    pub fn internal(details: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {details}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "The server had an error while processing the request.",
        )
    }

    /// The envelope, also sent as an SSE event when a stream fails after it began.
    pub fn body(&self) -> Json {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        response
            .extensions_mut()
            .insert(super::access::ErrorNote(self.message.clone()));
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Invalid { field, message } => Self::invalid(field, message),
            SubmitError::ContextLength { field, message } => {
                Self::context_length_exceeded(field, message)
            }
            SubmitError::Stopped => Self::unavailable("The engine has stopped."),
        }
    }
}
