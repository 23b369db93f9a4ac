//! Command-line interface.

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ember",
    version,
    about = "High-performance inference server for Qwen models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as text or as one JSON object per line (for log collectors). Colour only
    /// when stderr is a terminal. RUST_LOG sets the levels (default: info for Ember, warn for
    /// its libraries).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "EMBER_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Generate text for one prompt and print it to stdout (timings go to stderr).
    Generate(GenerateArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Engine throughput without HTTP: C requests at once, for each C given (or, with
    /// --latency, batch-1 prefill and decode speed).
    Offline(OfflineArgs),
    /// Load-test an OpenAI-compatible server (Ember, llama-server, vLLM, ...).
    Serve(ServeBenchArgs),
    /// The machine's memory read bandwidth (the batch-1 decode ceiling).
    Memory(MemoryArgs),
}

#[derive(Debug, Args)]
pub struct MemoryArgs {
    /// Buffer size in MiB (far beyond the caches).
    #[arg(long, default_value_t = 1024)]
    pub mib: usize,
    /// Reading threads, comma separated (default: 1 and all cores).
    #[arg(long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchEndpoint {
    /// /v1/completions
    Completions,
    /// /v1/chat/completions
    Chat,
}

#[derive(Debug, Args)]
pub struct ServeBenchArgs {
    /// The server's base URL (without /v1).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// The model name to send.
    #[arg(long)]
    pub model: String,
    #[arg(long, value_enum, default_value = "completions")]
    pub endpoint: BenchEndpoint,
    /// Sent as `Authorization: Bearer`.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests per run.
    #[arg(long, default_value_t = 100)]
    pub num_prompts: usize,
    /// Closed-loop clients, comma separated: one run each (ignored with --request-rate).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub concurrency: Vec<usize>,
    /// Open loop: Poisson arrivals at these requests/s, comma separated ("inf": all at once).
    #[arg(long, value_delimiter = ',')]
    pub request_rate: Vec<f64>,
    /// With --request-rate: at most this many requests in flight.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Prompt tokens of synthetic prompts (needs --tokenizer).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// max_tokens of each request (a dataset line may set its own).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// JSONL prompts instead of synthetic ones: {"prompt": "...", "output_len": N} per line.
    #[arg(long)]
    pub dataset: Option<std::path::PathBuf>,
    /// tokenizer.json, or a model directory holding one (synthetic prompts, token counts).
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Ask for exactly max_tokens tokens (ignore_eos, min_tokens).
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Structured output: every request asks for JSON matching this schema (a file holding
    /// one schema, or a list of {"name", "schema"} used in turn, as
    /// tests/clients/schema_corpus.json), through `response_format`.
    #[arg(long)]
    pub json_schema: Option<std::path::PathBuf>,
    /// Latency targets for goodput, in ms: e.g. "ttft:500,tpot:50,e2el:5000".
    #[arg(long)]
    pub goodput: Option<String>,
    /// Requests sent (and not counted) before each run.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Writes the configuration and every run's results as JSON.
    #[arg(long)]
    pub result_json: Option<std::path::PathBuf>,
    /// Writes an SVG chart of throughput and TTFT against concurrency (or rate).
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Per-request read timeout in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// This fraction of requests hang up early, as clients that give up do: half before their
    /// first token, half after a few chunks. Counted as cancelled, not failed, and left out of
    /// the latency figures (for soak tests).
    #[arg(long, default_value_t = 0.0)]
    pub cancel_fraction: f64,
}

#[derive(Debug, Args)]
pub struct EngineArgs {
    /// KV-cache budget in MiB (default on CPU: 2048).
    #[arg(long, conflicts_with = "gpu_memory_utilization")]
    pub kv_cache_mib: Option<usize>,
    /// On CUDA: the fraction of device memory, free after loading the model, that the KV cache
    /// takes (default on CUDA: 0.9).
    #[arg(long)]
    pub gpu_memory_utilization: Option<f64>,
    /// Token budget of one engine step (default: 512 on CPU, 2048 on CUDA). On CPU a prefill
    /// step is compute-bound and no faster per token when larger, so a smaller one lets the
    /// first prompts of a burst start decoding sooner (lower TTFT at the same throughput).
    #[arg(long)]
    pub max_num_batched_tokens: Option<std::num::NonZeroUsize>,
    /// Sequences running at once.
    #[arg(long, default_value = "256")]
    pub max_num_seqs: std::num::NonZeroUsize,
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// KV-cache element type: auto (the model's dtype), bf16, f16 or f32. bf16/f16 halve the
    /// cache of an f32 model.
    #[arg(long, default_value = "auto", value_parser = parse_kv_cache_dtype)]
    pub kv_cache_dtype: KvCacheDtype,
}

/// `--kv-cache-dtype`: `None` for auto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheDtype(pub Option<candle_core::DType>);

fn parse_kv_cache_dtype(s: &str) -> Result<KvCacheDtype, String> {
    match s {
        "auto" => Ok(KvCacheDtype(None)),
        other => crate::device::parse_dtype(other)
            .map(|d| KvCacheDtype(Some(d)))
            .map_err(|e| e.to_string()),
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Names the model answers to in requests (default: the --model argument).
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// API keys accepted as `Authorization: Bearer <key>` (repeatable; also EMBER_API_KEY).
    #[arg(long, env = "EMBER_API_KEY", hide_env_values = true)]
    pub api_key: Vec<String>,
    /// CORS origins allowed, comma separated ("*" for any; default: no CORS).
    #[arg(long, value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// A chat template (a file, or the template text) replacing the model's.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Accept `chat_template` in requests (lets clients run their own Jinja on the server).
    #[arg(long)]
    pub trust_request_chat_template: bool,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_request_bytes: usize,
    /// Prompts one /v1/completions request may carry.
    #[arg(long, default_value_t = 64)]
    pub max_prompts_per_request: usize,
    /// Sequences one request may start (prompts × n).
    #[arg(long, default_value_t = 128)]
    pub max_sequences_per_request: usize,
    /// Stop strings one request may give.
    #[arg(long, default_value_t = 16)]
    pub max_stop_strings: usize,
    /// Bytes in one stop string.
    #[arg(long, default_value_t = 256)]
    pub max_stop_string_bytes: usize,
    /// Entries of stop_token_ids one request may give.
    #[arg(long, default_value_t = 64)]
    pub max_stop_token_ids: usize,
    /// Entries of logit_bias one request may give.
    #[arg(long, default_value_t = 1024)]
    pub max_logit_bias: usize,
    /// Bytes a rendered chat prompt may have (the chat template's output).
    #[arg(long, default_value_t = 16 << 20)]
    pub max_prompt_bytes: usize,
    /// Seconds one request's chat-template rendering and tokenization may take (503 beyond).
    #[arg(long, default_value_t = 10)]
    pub preprocess_timeout: u64,
    /// Seconds a request may run from its arrival before it is stopped (408, or an error event
    /// on a stream) and its sequences freed; 0: no deadline.
    #[arg(long, default_value_t = 0)]
    pub request_timeout: u64,
    /// Sequences (prompts × n of each request) that may wait beyond --max-num-seqs before new
    /// requests get 503 with Retry-After.
    #[arg(long, alias = "max-queued-requests", default_value_t = 1024)]
    pub max_queued_sequences: usize,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Log each generation request's prompt text (with its request id). Off by default: the
    /// access lines carry counts and timings, never text.
    #[arg(long)]
    pub log_requests: bool,
}

#[derive(Debug, Args)]
pub struct OfflineArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Concurrencies to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub concurrency: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Batch-1 latency instead: prefill tok/s at each --prefill-lens, then decode tok/s over
    /// --output-len tokens.
    #[arg(long)]
    pub latency: bool,
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    pub prefill_lens: Vec<usize>,
    /// With --latency: decode tok/s after a prompt of each of these lengths (long context).
    #[arg(long, value_delimiter = ',')]
    pub context_lens: Vec<usize>,
    /// With --context-lens: interleaved rounds over the contexts (each context's rate is its
    /// tokens over its time, summed over the rounds), so that drift in the machine's speed
    /// falls on every context alike.
    #[arg(long, default_value_t = 3)]
    pub context_rounds: usize,
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A GGUF file, a local directory in Hugging Face layout, or a Hub model id (org/name).
    #[arg(long)]
    pub model: String,
    /// A directory with tokenizer.json (and tokenizer_config.json for the chat template) to use
    /// instead of the checkpoint's (a GGUF file's tokenizer is rebuilt from its metadata).
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    pub revision: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Quantize a safetensors checkpoint's matrices at load, as llama-quantize would (CPU):
    /// q8_0, q4_0, q5_0, q4_k, q5_k or q6_k. The lm_head (or the embedding table tied to it)
    /// gets q6_k (q8_0 for q8_0, or where rows are not whole 256-blocks); k-quants fall back to
    /// q5_0/q8_0 for rows that are not; norms stay as they are.
    #[arg(long, value_parser = parse_quantization)]
    pub quantization: Option<ember_kernels::GgmlType>,
}

/// `--quantization`.
fn parse_quantization(s: &str) -> Result<ember_kernels::GgmlType, String> {
    ember_kernels::GgmlType::parse_quantized(s).ok_or_else(|| {
        format!("unknown quantization {s:?}: expected q8_0, q4_0, q5_0, q4_k, q5_k or q6_k")
    })
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// With --chat: a system message.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// With --chat: Qwen3's enable_thinking (default: the template's default).
    #[arg(long, requires = "chat")]
    pub enable_thinking: Option<bool>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 is greedy (default: generation_config.json's, else 1.0).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling (default: generation_config.json's, else 1.0).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Top-k sampling, 0 = off (default: generation_config.json's, else 0).
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens (for fixed-length benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
}
