//! One access line per HTTP request, written when its response ends: request id, method, route,
//! status, token counts, finish reasons (or `abort` when the client left first), time to the
//! first token and duration. The request id is the client's `X-Request-Id` when it sends a
//! usable one, else a fresh one; either way the response echoes it.
//!
//! Generation handlers fill an [`AccessRecord`] (a request extension) as events arrive; the
//! line is written when the response body ends or is dropped, so a stream's line comes after
//! its last chunk. Probes and scrapes (`/health`, `/metrics`) log at debug, everything else at
//! info. No prompt or completion text is ever written here.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body as _, Frame, SizeHint};

use crate::engine::FinishReason;

use super::generation::{finish_reason_str, new_id};

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client request id kept; a longer or non-printable one is replaced.
const MAX_REQUEST_ID: usize = 128;

/// The request id, as a request extension for handlers that want to name it.
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);

/// What a generation request did, filled in by its handler and read by its access line.
#[derive(Debug, Clone, Default)]
pub struct AccessRecord(Arc<Mutex<Record>>);

#[derive(Debug, Default)]
struct Record {
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
    /// Finish reasons seen, in order, each once.
    finish: Vec<&'static str>,
    ttft: Option<Duration>,
    error: Option<String>,
}

impl AccessRecord {
    fn with<R>(&self, f: impl FnOnce(&mut Record) -> R) -> R {
        // A poisoned lock only means another thread panicked mid-update; the counts stay usable.
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// The request's prompts entered the engine: their tokens, all prompts together.
    pub fn on_submit(&self, prompt_tokens: usize) {
        self.with(|r| r.prompt_tokens = prompt_tokens);
    }

    /// The counts so far, as a `usage` object (vLLM's `continuous_usage_stats` chunks).
    pub fn usage_so_far(&self) -> serde_json::Value {
        self.with(|r| {
            serde_json::json!({
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens,
            })
        })
    }

    /// A generated token; the first one sets the time to first token.
    pub fn on_token(&self, arrived: Instant) {
        self.with(|r| {
            r.completion_tokens += 1;
            r.ttft.get_or_insert_with(|| arrived.elapsed());
        });
    }

    /// A finished completion; cached prompt tokens counted once per prompt (its first
    /// completion).
    pub fn on_finished(&self, index: usize, reason: FinishReason, cached_tokens: usize) {
        self.with(|r| {
            if index == 0 {
                r.cached_tokens += cached_tokens;
            }
            let reason = finish_reason_str(reason);
            if !r.finish.contains(&reason) {
                r.finish.push(reason);
            }
        });
    }

    /// A failure after the response began (a stream's error event).
    pub fn on_error(&self, message: &str) {
        self.with(|r| {
            r.error.get_or_insert_with(|| message.to_string());
        });
    }
}

/// The message of an error response, as a response extension for its access line.
#[derive(Debug, Clone)]
pub struct ErrorNote(pub String);

/// A usable client request id: 1 to 128 visible ASCII characters.
fn client_request_id(value: &HeaderValue) -> Option<&str> {
    let s = value.to_str().ok()?;
    let visible = s.bytes().all(|b| b.is_ascii_graphic());
    (!s.is_empty() && s.len() <= MAX_REQUEST_ID && visible).then_some(s)
}

/// The middleware: request id in, echoed out, and the access line when the body ends.
pub async fn layer(mut request: Request, next: Next) -> Response {
    let start = Instant::now();
    let id: Arc<str> = match request
        .headers()
        .get(&REQUEST_ID)
        .and_then(client_request_id)
    {
        Some(id) => id.into(),
        None => new_id("req").into(),
    };
    let record = AccessRecord::default();
    request.extensions_mut().insert(RequestId(id.clone()));
    request.extensions_mut().insert(record.clone());
    let method = request.method().clone();
    let route = request.uri().path().to_string();
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID.clone(), value);
    }
    let line = AccessLine {
        id,
        method,
        route,
        status: response.status().as_u16(),
        start,
        record,
        error: response
            .extensions()
            .get::<ErrorNote>()
            .map(|e| e.0.clone()),
    };
    response.map(|body| {
        Body::new(LoggedBody {
            inner: body,
            line: Some(line),
        })
    })
}

struct AccessLine {
    id: Arc<str>,
    method: Method,
    route: String,
    status: u16,
    start: Instant,
    record: AccessRecord,
    error: Option<String>,
}

impl AccessLine {
    fn write(self, aborted: bool) {
        let quiet = matches!(self.route.as_str(), "/health" | "/metrics");
        // Milliseconds to the hundredth.
        let ms = |d: Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
        let duration_ms = ms(self.start.elapsed());
        self.record.with(|r| {
            let finish = if aborted {
                "abort".to_string()
            } else if r.finish.is_empty() {
                "-".to_string()
            } else {
                r.finish.join(",")
            };
            let ttft_ms = r.ttft.map(ms);
            let error = self.error.as_deref().or(r.error.as_deref());
            macro_rules! line {
                ($level:expr) => {
                    tracing::event!(
                        target: "ember::access",
                        $level,
                        request_id = %self.id,
                        method = %self.method,
                        route = %self.route,
                        status = self.status,
                        prompt_tokens = r.prompt_tokens,
                        cached_tokens = r.cached_tokens,
                        completion_tokens = r.completion_tokens,
                        finish = %finish,
                        ttft_ms,
                        duration_ms,
                        error,
                        "request"
                    )
                };
            }
            if quiet {
                line!(tracing::Level::DEBUG)
            } else {
                line!(tracing::Level::INFO)
            }
        });
    }
}

/// A response body that writes its access line when it ends, or when it is dropped before
/// its end (the client went away: `abort`).
struct LoggedBody {
    inner: Body,
    line: Option<AccessLine>,
}

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            if let Some(line) = self.line.take() {
                line.write(false);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(line) = self.line.take() {
            // A whole body is not always polled to its end: done once nothing is left.
            let aborted = !self.inner.is_end_stream();
            line.write(aborted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_kept_only_when_usable() {
        let ok = HeaderValue::from_static("trace-42/abc");
        assert_eq!(client_request_id(&ok), Some("trace-42/abc"));
        for bad in ["", "has space", &"x".repeat(MAX_REQUEST_ID + 1)] {
            let value = HeaderValue::from_str(bad).expect("header value");
            assert_eq!(client_request_id(&value), None, "{bad:?}");
        }
    }
}
