//! Prometheus metrics (prometheus-client, OpenMetrics text). Engine counters and gauges are
//! read from the engine's own `EngineStats` at scrape time; latency histograms are observed by
//! the HTTP layer as events arrive.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::engine::EngineStats;

pub struct Metrics {
    registry: Registry,
    engine: std::sync::Arc<EngineCollector>,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ember");
        let seconds = |start, factor, n| Histogram::new(exponential_buckets(start, factor, n));
        let ttft = seconds(0.001, 2.0, 18);
        let itl = seconds(0.001, 2.0, 16);
        let e2e = seconds(0.01, 2.0, 18);
        let queue = seconds(0.001, 2.0, 18);
        registry.register(
            "time_to_first_token_seconds",
            "Time from a request's arrival to its first token",
            ttft.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Time between consecutive tokens of a completion",
            itl.clone(),
        );
        registry.register(
            "e2e_request_latency_seconds",
            "Time from a request's arrival to its last token",
            e2e.clone(),
        );
        registry.register(
            "request_queue_time_seconds",
            "Time a request waited before it was first scheduled",
            queue.clone(),
        );
        let engine = std::sync::Arc::new(EngineCollector::default());
        registry.register_collector(Box::new(engine.clone()));
        Self {
            registry,
            engine,
            ttft,
            itl,
            e2e,
            queue,
        }
    }

    /// The OpenMetrics text for a scrape, with the engine's current counters.
    pub fn encode(&self, stats: EngineStats) -> Result<String, std::fmt::Error> {
        if let Ok(mut snapshot) = self.engine.stats.lock() {
            *snapshot = stats;
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    pub fn observe_queue_time(&self, d: Duration) {
        self.queue.observe(d.as_secs_f64());
    }
}

/// Times one request's completions: TTFT at the first token, ITL between tokens of a completion,
/// end-to-end at the last completion's end.
#[derive(Debug)]
pub struct RequestTimer {
    arrived: Instant,
    first_token: bool,
    /// Last token time of each completion, by prompt and choice index (each prompt of a
    /// `/v1/completions` request numbers its completions from 0).
    last: Vec<Vec<Option<Instant>>>,
}

impl RequestTimer {
    pub fn new(arrived: Instant) -> Self {
        Self {
            arrived,
            first_token: false,
            last: Vec::new(),
        }
    }

    pub fn on_token(&mut self, metrics: &Metrics, prompt: usize, index: usize) {
        let now = Instant::now();
        if !self.first_token {
            self.first_token = true;
            metrics.ttft.observe((now - self.arrived).as_secs_f64());
        }
        if self.last.len() <= prompt {
            self.last.resize(prompt + 1, Vec::new());
        }
        let last = &mut self.last[prompt];
        if last.len() <= index {
            last.resize(index + 1, None);
        }
        if let Some(prev) = last[index].replace(now) {
            metrics.itl.observe((now - prev).as_secs_f64());
        }
    }

    /// The whole request is done.
    pub fn on_done(&self, metrics: &Metrics) {
        metrics.e2e.observe(self.arrived.elapsed().as_secs_f64());
    }
}

#[derive(Debug, Default)]
struct EngineCollector {
    stats: Mutex<EngineStats>,
}

fn counter<N: EncodeCounterValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = match self.stats.lock() {
            Ok(s) => s.clone(),
            Err(_) => return Ok(()),
        };
        let e = &mut encoder;
        gauge(
            e,
            "num_requests_running",
            "Sequences in the running batch",
            s.num_running as f64,
        )?;
        gauge(
            e,
            "num_requests_waiting",
            "Sequences waiting to be scheduled",
            s.num_waiting as f64,
        )?;
        let usage = if s.num_blocks == 0 {
            0.0
        } else {
            1.0 - s.num_free_blocks as f64 / s.num_blocks as f64
        };
        gauge(
            e,
            "kv_cache_usage_ratio",
            "Fraction of KV-cache blocks in use (1 = full)",
            usage,
        )?;
        counter(
            e,
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            s.prefix_cache_queried_tokens,
        )?;
        counter(
            e,
            "prefix_cache_hits",
            "Prompt tokens found in the prefix cache",
            s.prefix_cache_hit_tokens,
        )?;
        counter(
            e,
            "prompt_tokens",
            "Prompt tokens processed",
            s.num_prompt_tokens,
        )?;
        counter(
            e,
            "generation_tokens",
            "Tokens generated",
            s.num_generated_tokens,
        )?;
        counter(
            e,
            "num_preemptions",
            "Sequences preempted to free KV-cache blocks",
            s.num_preemptions,
        )?;
        counter(
            e,
            "structured_output_masks",
            "Grammar masks computed for structured output",
            s.num_grammar_masks,
        )?;
        counter(
            e,
            "structured_output_mask_seconds",
            "Time computing grammar masks (on a worker thread, beside the forward pass)",
            s.grammar_mask_seconds,
        )?;
        counter(
            e,
            "structured_output_wait_seconds",
            "Time the engine waited for grammar masks after the forward pass",
            s.grammar_wait_seconds,
        )?;
        // The KV cache's shape as labels of a constant 1, in vLLM's form (`cache_config_info`,
        // `num_gpu_blocks` whatever the device): what an inference gateway's endpoint picker
        // reads as its cache-info metric (docs/OPERATIONS.md).
        let info = ConstGauge::new(1i64);
        let mut family = e.encode_descriptor(
            "cache_config_info",
            "KV-cache configuration (value 1; the configuration is in the labels)",
            None,
            info.metric_type(),
        )?;
        let (block_size, blocks) = (s.block_size.to_string(), s.num_blocks.to_string());
        let labels = [
            ("block_size", block_size.as_str()),
            ("num_gpu_blocks", blocks.as_str()),
            (
                "enable_prefix_caching",
                if s.prefix_caching { "True" } else { "False" },
            ),
        ];
        info.encode(family.encode_family(&labels)?)?;
        let finished = ConstCounter::new(0u64);
        let mut family = e.encode_descriptor(
            "request_success",
            "Completions finished, by finish reason",
            None,
            finished.metric_type(),
        )?;
        for (reason, n) in [
            ("stop", s.num_finished_stop),
            ("length", s.num_finished_length),
            ("error", s.num_finished_error),
            ("abort", s.num_aborted),
        ] {
            let labels = [("finished_reason", reason)];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
