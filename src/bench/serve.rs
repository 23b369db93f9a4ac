//! `ember bench serve`: a load generator for any OpenAI-compatible server (Ember, llama-server,
//! vLLM, ...), like `vllm bench serve`. Streams every request and times its chunks; closed-loop
//! concurrency or open-loop Poisson arrivals; one run per concurrency or rate of a sweep.

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value as Json};

use super::dataset::BenchPrompt;
use super::stats::RequestRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Self::Completions => "/v1/completions",
            Self::Chat => "/v1/chat/completions",
        }
    }
}

/// How requests are sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub base_url: String,
    pub endpoint: Endpoint,
    pub model: String,
    pub api_key: Option<String>,
    /// Ask for exactly max_tokens (`ignore_eos`, and `min_tokens` where supported).
    pub ignore_eos: bool,
    pub temperature: f32,
    pub timeout: Duration,
    /// Structured output: request i asks for JSON matching schema i mod len (`response_format`).
    pub json_schemas: Vec<Json>,
}

/// How many requests are in flight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Closed loop: this many clients, each sending its next request when the last finishes.
    Concurrency(usize),
    /// Open loop: Poisson arrivals at this many requests per second (infinite: all at once),
    /// optionally capped in flight.
    Rate {
        per_second: f64,
        max_concurrency: Option<usize>,
    },
}

impl Target {
    /// The body of request `index` (which picks its schema).
    fn body(&self, index: usize, prompt: &BenchPrompt) -> Json {
        let mut body = match self.endpoint {
            Endpoint::Completions => json!({"prompt": prompt.text}),
            Endpoint::Chat => json!({"messages": [{"role": "user", "content": prompt.text}]}),
        };
        body["model"] = json!(self.model);
        body["max_tokens"] = json!(prompt.max_tokens);
        body["temperature"] = json!(self.temperature);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        if self.ignore_eos {
            body["ignore_eos"] = json!(true);
            body["min_tokens"] = json!(prompt.max_tokens);
        }
        if !self.json_schemas.is_empty() {
            let schema = &self.json_schemas[index % self.json_schemas.len()];
            body["response_format"] = json!({"type": "json_schema",
                "json_schema": {"name": "bench", "schema": schema}});
        }
        body
    }

    /// Sends one streaming request and times it; with `cancel_after`, hangs up once that many
    /// output chunks have come (0: as soon as the response starts).
    pub fn send(
        &self,
        agent: &ureq::Agent,
        index: usize,
        prompt: &BenchPrompt,
        cancel_after: Option<usize>,
    ) -> RequestRecord {
        let failed = |error: String| RequestRecord {
            ok: false,
            error: Some(error),
            ..RequestRecord::default()
        };
        let url = format!(
            "{}{}",
            self.base_url.trim_end_matches('/'),
            self.endpoint.path()
        );
        let mut request = agent.post(&url).set("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        let start = Instant::now();
        let response = match request.send_string(&self.body(index, prompt).to_string()) {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let body = r.into_string().unwrap_or_default();
                return failed(format!(
                    "HTTP {code}: {}",
                    body.chars().take(200).collect::<String>()
                ));
            }
            Err(e) => return failed(e.to_string()),
        };
        let mut chunks = 0;
        let mut ttft = None;
        let mut last = start;
        let mut itl = Vec::new();
        let mut usage: Option<(usize, usize)> = None;
        let cancelled = RequestRecord {
            cancelled: true,
            ..RequestRecord::default()
        };
        if cancel_after == Some(0) {
            return cancelled; // dropping the response closes the connection
        }
        for line in BufReader::new(response.into_reader()).lines() {
            let line = match line {
                Ok(l) => l,
                Err(e) => return failed(format!("reading the stream: {e}")),
            };
            let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                continue;
            };
            if data == "[DONE]" {
                break;
            }
            let Ok(chunk) = serde_json::from_str::<Json>(data) else {
                return failed(format!("not JSON: {data}"));
            };
            if let Some(err) = chunk.get("error") {
                return failed(format!("error event: {err}"));
            }
            if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
                let get = |k: &str| u.get(k).and_then(Json::as_u64).unwrap_or(0) as usize;
                usage = Some((get("prompt_tokens"), get("completion_tokens")));
            }
            if has_output(&chunk) {
                let now = Instant::now();
                match ttft {
                    None => ttft = Some((now - start).as_secs_f64()),
                    Some(_) => itl.push((now - last).as_secs_f64()),
                }
                last = now;
                chunks += 1;
                if cancel_after == Some(chunks) {
                    return cancelled;
                }
            }
        }
        let Some(ttft) = ttft else {
            return failed("no output".into());
        };
        let (prompt_tokens, output_tokens) = match usage {
            Some((p, o)) if o > 0 => (if p > 0 { p } else { prompt.num_tokens }, o),
            _ => (prompt.num_tokens, chunks),
        };
        RequestRecord {
            ok: true,
            cancelled: false,
            error: None,
            prompt_tokens,
            output_tokens,
            ttft,
            itl,
            e2e: start.elapsed().as_secs_f64(),
        }
    }
}

/// Whether a chunk carries generated text (completions `text`, chat `content` or reasoning).
fn has_output(chunk: &Json) -> bool {
    let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) else {
        return false;
    };
    let non_empty = |v: Option<&Json>| v.and_then(Json::as_str).is_some_and(|s| !s.is_empty());
    let delta = choice.get("delta");
    non_empty(choice.get("text"))
        || non_empty(delta.and_then(|d| d.get("content")))
        || non_empty(delta.and_then(|d| d.get("reasoning_content")))
        || non_empty(delta.and_then(|d| d.get("reasoning")))
        || delta
            .and_then(|d| d.get("tool_calls"))
            .is_some_and(|t| t.is_array())
}

/// A counting semaphore for the open loop's cap.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn acquire(&self) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
    }

    fn release(&self) {
        *self.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.freed.notify_one();
    }
}

/// Which requests hang up, and when (see [`Target::send`]): a `fraction` of them, half before
/// their first token and half after 1-8 chunks, drawn from `seed`.
pub fn cancellations(count: usize, fraction: f64, seed: u64) -> Vec<Option<usize>> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xca9c_e11e);
    (0..count)
        .map(|_| {
            let cancel = rng.random_bool(fraction.clamp(0.0, 1.0));
            let early = rng.random_bool(0.5);
            let chunks = rng.random_range(1..=8);
            cancel.then_some(if early { 0 } else { chunks })
        })
        .collect()
}

/// Sends every prompt under `load`, request i hanging up as `cancel[i]` says; returns the
/// records (in prompt order) and the duration.
pub fn run(
    target: &Target,
    prompts: &[BenchPrompt],
    load: Load,
    (seed, cancel): (u64, &[Option<usize>]),
    progress: &ProgressBar,
) -> (Vec<RequestRecord>, Duration) {
    let cancel_of = |i: usize| cancel.get(i).copied().flatten();
    let agent = ureq::AgentBuilder::new()
        .timeout_read(target.timeout)
        .timeout_connect(Duration::from_secs(10))
        .max_idle_connections_per_host(1024)
        .build();
    let records: Mutex<Vec<Option<RequestRecord>>> = Mutex::new(vec![None; prompts.len()]);
    let record = |i: usize, r: RequestRecord| {
        if let Ok(mut all) = records.lock() {
            all[i] = Some(r);
        }
        progress.inc(1);
    };
    let start = Instant::now();
    match load {
        Load::Concurrency(clients) => {
            let next = AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..clients.max(1) {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(prompt) = prompts.get(i) else {
                            break;
                        };
                        record(i, target.send(&agent, i, prompt, cancel_of(i)));
                    });
                }
            });
        }
        Load::Rate {
            per_second,
            max_concurrency,
        } => {
            let slots = Slots {
                free: Mutex::new(max_concurrency.unwrap_or(usize::MAX)),
                freed: Condvar::new(),
            };
            let mut rng = StdRng::seed_from_u64(seed);
            std::thread::scope(|s| {
                let mut due = Instant::now();
                for (i, prompt) in prompts.iter().enumerate() {
                    if per_second.is_finite() && per_second > 0.0 {
                        // Exponential gaps: a Poisson process of the given rate.
                        let u: f64 = rng.random_range(f64::EPSILON..1.0);
                        due += Duration::from_secs_f64(-u.ln() / per_second);
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    }
                    slots.acquire();
                    let (slots, agent, record, cancel_of) = (&slots, &agent, &record, &cancel_of);
                    s.spawn(move || {
                        record(i, target.send(agent, i, prompt, cancel_of(i)));
                        slots.release();
                    });
                }
            });
        }
    }
    let elapsed = start.elapsed();
    let records = records
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.unwrap_or_default())
        .collect();
    (records, elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_chunks() {
        assert!(has_output(&json!({"choices": [{"text": "a"}]})));
        assert!(has_output(
            &json!({"choices": [{"delta": {"content": "a"}}]})
        ));
        assert!(has_output(
            &json!({"choices": [{"delta": {"reasoning_content": "a"}}]})
        ));
        assert!(!has_output(
            &json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
        ));
        assert!(!has_output(&json!({"choices": [], "usage": {}})));
    }

    #[test]
    fn request_bodies() {
        let target = Target {
            base_url: "http://x".into(),
            endpoint: Endpoint::Chat,
            model: "m".into(),
            api_key: None,
            ignore_eos: true,
            temperature: 0.0,
            timeout: Duration::from_secs(1),
            json_schemas: vec![json!({"enum": ["a"]}), json!({"type": "boolean"})],
        };
        let prompt = BenchPrompt {
            text: "hi".into(),
            num_tokens: 1,
            max_tokens: 7,
        };
        let body = target.body(1, &prompt);
        assert_eq!(body["messages"][0]["content"], "hi");
        assert_eq!(body["max_tokens"], 7);
        assert_eq!(body["min_tokens"], 7);
        assert_eq!(body["ignore_eos"], true);
        assert_eq!(body["stream"], true);
        assert_eq!(
            body["response_format"]["json_schema"]["schema"]["type"], "boolean",
            "prompt 1 takes the second schema"
        );
    }
}
