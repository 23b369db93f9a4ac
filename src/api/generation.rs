//! What chat and completions share once a request is valid: preprocessing off the async
//! runtime, submission of one engine request per prompt, the merged event stream with its
//! metrics, usage, and the SSE response.

use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use rand::distr::{Alphanumeric, SampleString};
use serde_json::{json, Value as Json};

use crate::engine::{EngineEvent, FinishReason, StopReason, ValidRequest};
use crate::metrics::RequestTimer;

use super::access::AccessRecord;
use super::error::ApiError;
use super::types::{parse_with_common, WithCommon, COMMON_FIELDS};
use super::{AppState, InFlight, ModelContext};

/// Interval of SSE keep-alive comments while a stream has nothing to send.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// What every generation route does first: the body within its limit, the loaded model, a
/// place among the admitted sequences (503 before any template or tokenizer work), the body
/// parsed with the common and the route's own fields, and the model name checked.
pub fn begin<'a, T: WithCommon>(
    state: &'a AppState,
    body: Result<Bytes, BytesRejection>,
    route_fields: &[&str],
    model_of: impl FnOnce(&T) -> Option<&str>,
) -> Result<(T, &'a ModelContext, InFlight, String), ApiError> {
    let body = body_bytes(state, body)?;
    let ctx = state.model()?;
    let admitted = state.admit()?;
    let known: Vec<&str> = COMMON_FIELDS.iter().chain(route_fields).copied().collect();
    let req: T = parse_with_common(&body, &known)?;
    let model = state.check_model(model_of(&req))?;
    Ok((req, ctx, admitted, model))
}

/// The body, or 413 in the OpenAI envelope when it is over the limit.
pub fn body_bytes(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(state.0.config.max_request_body_bytes)
        } else {
            ApiError::bad_body(e.body_text())
        }
    })
}

/// When a request's preprocessing must have finished. A blocking thread cannot be cancelled:
/// the work checks its deadline between stages (renders, tokenizations), so that work whose
/// request has already been answered 503 stops at its next stage instead of running on.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

impl Deadline {
    pub fn check(&self) -> Result<(), ApiError> {
        if Instant::now() >= self.0 {
            return Err(ApiError::unavailable("Preparing the prompt took too long."));
        }
        Ok(())
    }
}

/// Runs CPU work (templates, tokenization) off the async runtime, bounded in time
/// (`preprocess_timeout`).
pub async fn blocking<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(Deadline) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    bounded(state.0.config.preprocess_timeout, work).await
}

/// The threads that render templates and tokenize: a fixed few, not tokio's blocking pool.
/// The tokenizer keeps a word cache per thread (up to 10,000 words each), so hundreds of
/// short-lived blocking threads held hundreds of caches: resident memory grew with every
/// request under load (~7 KB per request in a 10-minute soak). A fixed pool also bounds how
/// much preprocessing runs at once; a request waiting for a thread waits within its deadline.
fn preprocessing_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ember-preprocess-{i}"))
            .build()
            .map_err(|e| tracing::error!("no preprocessing threads: {e}"))
            .ok()
    })
    .as_ref()
}

async fn bounded<T: Send + 'static>(
    timeout: Duration,
    work: impl FnOnce(Deadline) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let deadline = Deadline(Instant::now() + timeout);
    let pool = preprocessing_pool()
        .ok_or_else(|| ApiError::internal("the preprocessing threads could not start"))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    pool.spawn(move || {
        // A panic must not take the pool thread (rayon aborts the process on one).
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(deadline)));
        let _ = tx.send(result);
    });
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(Ok(result))) => result,
        Ok(Ok(Err(_))) => Err(ApiError::internal("preprocessing panicked")),
        Ok(Err(_)) => Err(ApiError::internal("preprocessing task was dropped")),
        // The server's own bound, not the request's fault: 503, and the client may retry.
        Err(_) => Err(ApiError::unavailable(format!(
            "Preparing the prompt took longer than {} s.",
            timeout.as_secs_f32()
        ))),
    }
}

/// A whole (non-streaming) answer in OpenAI's shape: `(id prefix, object)` name the route.
pub fn whole_response(
    (id_prefix, object): (&str, &str),
    model: &str,
    choices: Vec<Json>,
    usage: &Usage,
) -> Response {
    axum::Json(json!({
        "id": new_id(id_prefix),
        "object": object,
        "created": unix_now(),
        "model": model,
        "choices": choices,
        "usage": usage.json(),
    }))
    .into_response()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        Alphanumeric.sample_string(&mut rand::rng(), 24)
    )
}

pub fn finish_reason_str(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Error => "error",
    }
}

/// vLLM's `stop_reason`: the stop token id or string that ended a completion.
pub fn stop_reason_json(stop: &Option<StopReason>) -> Json {
    match stop {
        Some(StopReason::Token(t)) => json!(t),
        Some(StopReason::Text(s)) => json!(s),
        None => Json::Null,
    }
}

/// Token counts of a request, reported as `usage`.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

impl Usage {
    /// Counts a finished completion; prompt tokens once per prompt (its first completion).
    pub fn add(&mut self, event: &EngineEvent) {
        if let EngineEvent::Finished {
            index,
            num_prompt_tokens,
            num_generated_tokens,
            num_cached_tokens,
            ..
        } = event
        {
            self.completion_tokens += num_generated_tokens;
            if *index == 0 {
                self.prompt_tokens += num_prompt_tokens;
                self.cached_tokens += num_cached_tokens;
            }
        }
    }

    pub fn json(&self) -> Json {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }
}

/// The engine requests of one HTTP request (one per prompt), their merged events tagged with the
/// prompt's position, and the request's timing. Dropping it cancels everything not finished.
pub struct Submission {
    events: SelectAll<BoxStream<'static, (usize, EngineEvent)>>,
    /// Completions not yet finished: the engine's streams ending before this is zero means
    /// the engine stopped under them, an error and not the end of the answer.
    unfinished: usize,
    timer: RequestTimer,
    /// When the request must be done (`--request-timeout`), and that limit.
    deadline: Option<(tokio::time::Instant, Duration)>,
    state: AppState,
    access: AccessRecord,
    arrived: Instant,
    _admitted: InFlight,
}

impl Submission {
    pub fn submit(
        state: &AppState,
        ctx: &ModelContext,
        requests: Vec<ValidRequest>,
        arrived: Instant,
        admitted: InFlight,
        access: AccessRecord,
    ) -> Result<Self, ApiError> {
        let unfinished = requests.iter().map(|r| r.n).sum();
        access.on_submit(requests.iter().map(|r| r.prompt.len()).sum());
        let mut streams = Vec::with_capacity(requests.len());
        for (i, request) in requests.into_iter().enumerate() {
            let rx = ctx.engine.submit(request)?;
            let tagged = stream::unfold(rx, move |mut rx| async move {
                rx.recv().await.map(|event| ((i, event), rx))
            });
            streams.push(tagged.boxed());
        }
        Ok(Self {
            events: stream::select_all(streams),
            unfinished,
            timer: RequestTimer::new(arrived),
            deadline: state
                .0
                .config
                .request_timeout
                .map(|t| (tokio::time::Instant::from_std(arrived + t), t)),
            state: state.clone(),
            access,
            arrived,
            _admitted: admitted,
        })
    }

    /// The next event of any prompt; None when all completions are done. A completion the
    /// engine could not run is an error (details are in the engine's log).
    pub async fn next(&mut self) -> Result<Option<(usize, EngineEvent)>, ApiError> {
        let next = self.next_event().await;
        if let Err(e) = &next {
            self.access.on_error(&e.message);
        }
        next
    }

    async fn next_event(&mut self) -> Result<Option<(usize, EngineEvent)>, ApiError> {
        let next = match self.deadline {
            // Checked before waiting too: a busy stream always has an event ready, and a ready
            // future wins over an expired timer.
            Some((at, limit)) if tokio::time::Instant::now() >= at => {
                return Err(ApiError::request_timeout(limit))
            }
            Some((at, limit)) => match tokio::time::timeout_at(at, self.events.next()).await {
                Ok(next) => next,
                // Dropping the submission (the caller returns this error) aborts its sequences.
                Err(_) => return Err(ApiError::request_timeout(limit)),
            },
            None => self.events.next().await,
        };
        let metrics = &self.state.0.metrics;
        match next {
            Some((prompt, event)) => {
                match &event {
                    EngineEvent::Token { index, .. } => {
                        self.access.on_token(self.arrived);
                        self.timer.on_token(metrics, prompt, *index)
                    }
                    EngineEvent::Finished {
                        reason: FinishReason::Error,
                        ..
                    } => return Err(ApiError::internal("the engine failed a completion")),
                    EngineEvent::Finished {
                        index,
                        reason,
                        queue_time,
                        num_cached_tokens,
                        ..
                    } => {
                        self.access.on_finished(*index, *reason, *num_cached_tokens);
                        self.unfinished = self.unfinished.saturating_sub(1);
                        metrics.observe_queue_time(*queue_time)
                    }
                    _ => {}
                }
                Ok(Some((prompt, event)))
            }
            None if self.unfinished > 0 => Err(ApiError::internal(
                "the engine stopped before the completion finished",
            )),
            None => {
                self.timer.on_done(metrics);
                Ok(None)
            }
        }
    }
}

/// Turns engine events into OpenAI chunks for one streaming route.
pub trait ChunkWriter: Send + 'static {
    /// Chunks for one event (possibly none).
    fn on_event(&mut self, prompt: usize, event: EngineEvent) -> Vec<Json>;
    /// Chunks after the last event (the usage chunk).
    fn on_end(&mut self) -> Vec<Json>;
}

fn data(json: &Json) -> Event {
    Event::default().data(json.to_string())
}

/// What the chunks before the final usage chunk say of usage (`stream_options`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkUsage {
    /// No `usage` field (include_usage unset).
    Omitted,
    /// `"usage": null`, as OpenAI sends with include_usage.
    Null,
    /// The counts so far (vLLM's continuous_usage_stats): the request's prompt tokens and the
    /// tokens generated up to this chunk.
    Running,
}

impl ChunkUsage {
    pub fn of(options: &super::sampling::OutputOptions) -> Self {
        match (options.include_usage, options.continuous_usage) {
            (false, _) => Self::Omitted,
            (true, false) => Self::Null,
            (true, true) => Self::Running,
        }
    }
}

/// The SSE response: chunks as `data:` events, keep-alive comments, then `data: [DONE]`.
/// When the client goes away the body is dropped, and with it the submission.
pub fn sse<W: ChunkWriter>(submission: Submission, writer: W, usage: ChunkUsage) -> Response {
    enum Phase<W> {
        Running(Submission, W),
        Done,
    }
    let events = stream::unfold(
        Phase::Running(submission, writer),
        move |phase| async move {
            let Phase::Running(mut sub, mut writer) = phase else {
                return None;
            };
            let step: Vec<Event> = match sub.next().await {
                Ok(Some((prompt, event))) => {
                    let mut chunks = writer.on_event(prompt, event);
                    let field = match usage {
                        ChunkUsage::Omitted => None,
                        ChunkUsage::Null => Some(Json::Null),
                        // Counted by the submission as the events passed (its access record).
                        ChunkUsage::Running => Some(sub.access.usage_so_far()),
                    };
                    if let Some(field) = field {
                        for chunk in &mut chunks {
                            if let Some(obj) = chunk.as_object_mut() {
                                obj.insert("usage".into(), field.clone());
                            }
                        }
                    }
                    let events = chunks.iter().map(data).collect();
                    return Some((events, Phase::Running(sub, writer)));
                }
                // An error after the stream began is an event in the envelope, then the end.
                Err(e) => vec![data(&e.body()), Event::default().data("[DONE]")],
                Ok(None) => {
                    let mut events: Vec<Event> = writer.on_end().iter().map(data).collect();
                    events.push(Event::default().data("[DONE]"));
                    events
                }
            };
            Some((step, Phase::Done))
        },
    )
    .flat_map(|events| stream::iter(events.into_iter().map(Ok::<Event, Infallible>)));
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Work past its deadline is answered 503 at once, and stops at its next stage.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timed_out_work_stops_at_its_next_stage() {
        let second_stage_ran = Arc::new(AtomicBool::new(false));
        let ran = second_stage_ran.clone();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let result = bounded(Duration::from_millis(100), move |deadline| {
            std::thread::sleep(Duration::from_millis(400)); // a slow first stage
            let checked = deadline.check();
            if checked.is_ok() {
                ran.store(true, Ordering::SeqCst);
            }
            let _ = done_tx.send(());
            checked
        })
        .await;
        let err = result.expect_err("past its deadline");
        assert_eq!(err.status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the work ended");
        assert!(!second_stage_ran.load(Ordering::SeqCst));
        // Within its deadline, the work runs whole.
        let ok = bounded(Duration::from_secs(5), |deadline| {
            deadline.check().map(|_| 7)
        })
        .await;
        assert_eq!(ok.ok(), Some(7));
    }
}
