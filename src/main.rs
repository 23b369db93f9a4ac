use std::io::Write;

use anyhow::{bail, Result};
use ember::api::{ApiConfig, AppState, RequestLimits};
use ember::bench::{run_latency, run_offline};
use ember::cli::{
    BenchCommand, Cli, Command, EngineArgs, GenerateArgs, LogFormat, ModelArgs, OfflineArgs,
    ServeArgs,
};
use ember::device::{parse_dtype, DeviceSpec};
use ember::engine::sampler::SamplingParams;
use ember::engine::{EngineConfig, EngineHandle, KvCacheBudget};
use ember::model::{LoadOptions, LoadedModel};
use ember::template::{ChatTemplate, RenderOptions};

/// Levels of `ember serve` unless RUST_LOG says otherwise: Ember's own lines (start-up, access
/// lines) at info, its libraries' at warn. Other commands print their results themselves and
/// log warnings only.
const SERVE_LOG_FILTER: &str = "warn,ember=info,ember_models=info,ember_kernels=info";
const DEFAULT_LOG_FILTER: &str = "warn";
/// Lines that are logged whatever RUST_LOG says: the address tools wait for.
const ALWAYS_LOGGED: &str = "ember::listen=info";

fn init_logging(format: LogFormat, default_filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let filter = match ALWAYS_LOGGED.parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        // Colour codes only for a person at a terminal, never into a file or a collector.
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn main() {
    let cli = parse_cli();
    let format = cli.log_format;
    let default_filter = match cli.command {
        Command::Serve(_) => SERVE_LOG_FILTER,
        _ => DEFAULT_LOG_FILTER,
    };
    init_logging(format, default_filter);
    if let Some(warning) = ember_kernels::cpu_isa_warning() {
        tracing::warn!("{warning}");
    }
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Generate(args) => generate(args),
        Command::Bench(BenchCommand::Offline(args)) => bench_offline(args),
        Command::Bench(BenchCommand::Serve(args)) => ember::bench::sweep::bench_serve(&args),
        Command::Bench(BenchCommand::Memory(args)) => {
            let mut threads = args.threads.clone();
            if threads.is_empty() {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                threads = vec![1, cores];
                threads.dedup();
            }
            println!("threads,read_gb_per_s");
            for t in threads {
                let gbs = ember::bench::memory::read_bandwidth(args.mib << 20, t, args.reps);
                println!("{t},{gbs:.1}");
            }
            Ok(())
        }
    };
    if let Err(e) = result {
        match format {
            // A log collector gets the last word as a JSON line too.
            LogFormat::Json => tracing::error!("{e:#}"),
            LogFormat::Text => eprintln!("error: {e:#}"),
        }
        std::process::exit(1);
    }
}

/// The command line, with `--version` naming the CPU kernel path this machine runs.
fn parse_cli() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let version = format!(
        "{} (cpu kernels: {}; this cpu supports {}; EMBER_CPU_ISA forces another)",
        env!("CARGO_PKG_VERSION"),
        ember_kernels::cpu_isa(),
        ember_kernels::supported_isas()
            .iter()
            .map(|i| i.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let version: &'static str = Box::leak(version.into_boxed_str());
    let matches = Cli::command().version(version).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn generate(args: GenerateArgs) -> Result<()> {
    if let Some(t) = args.temperature {
        if !(t >= 0.0 && t.is_finite()) {
            bail!("--temperature must be a finite number >= 0, got {t}");
        }
    }
    if let Some(p) = args.top_p {
        if !(p > 0.0 && p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {p}");
        }
    }
    let (loaded, _) = load(&args.model)?;
    let prompt = if args.chat {
        let Some(template) = &loaded.template else {
            bail!("--chat: the model has no chat template in tokenizer_config.json");
        };
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(serde_json::json!({"role": "system", "content": system}));
        }
        messages.push(serde_json::json!({"role": "user", "content": args.prompt}));
        let opts = RenderOptions {
            add_generation_prompt: true,
            tools: None,
            enable_thinking: args.enable_thinking,
            max_bytes: None, // the operator's own prompt
        };
        template.render(&serde_json::Value::Array(messages), &opts)?
    } else {
        args.prompt.clone()
    };
    let ids = loaded.encode(&prompt)?;
    let d = &loaded.defaults;
    let params = SamplingParams {
        temperature: args.temperature.or(d.temperature).unwrap_or(1.0),
        top_p: args.top_p.or(d.top_p).unwrap_or(1.0),
        top_k: args.top_k.or(d.top_k).unwrap_or(0),
        seed: args.seed,
        ..SamplingParams::default()
    };
    let mut stdout = std::io::stdout().lock();
    let stats = loaded.generate(&ids, &params, args.max_tokens, args.ignore_eos, |text| {
        // A closed stdout (e.g. piped into `head`) must not abort generation with a panic.
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
    })?;
    let _ = writeln!(stdout);
    eprintln!(
        "prompt: {} tokens, {:.1} tok/s | decode: {} tokens, {:.2} tok/s",
        stats.prompt_tokens,
        stats.prompt_tokens_per_s(),
        stats.generated_tokens,
        stats.decode_tokens_per_s()
    );
    Ok(())
}

/// The decode profile on stderr: milliseconds per token by op class, and the rest of the step.
fn print_profile(r: &ember::bench::LatencyResult, isa: ember_kernels::Isa) {
    let step = 1e3 / r.decode_tokens_per_s.max(1e-9);
    eprintln!(
        "decode step profile (batch 1, 16-token prompt, cpu kernels {isa}): {step:.2} ms/token"
    );
    let mut claimed = 0.0;
    for (class, per_token) in &r.decode_profile {
        let ms = per_token.as_secs_f64() * 1e3;
        claimed += ms;
        eprintln!(
            "  {:<10} {ms:>8.2} ms {:>5.1} %",
            class.name(),
            100.0 * ms / step
        );
    }
    let other = (step - claimed).max(0.0);
    eprintln!(
        "  {:<10} {other:>8.2} ms {:>5.1} %",
        "other",
        100.0 * other / step
    );
    for (len, rate, per_token) in &r.long_context {
        let step = 1e3 / rate.max(1e-9);
        let classes: Vec<String> = per_token
            .iter()
            .filter(|(_, t)| !t.is_zero())
            .map(|(c, t)| format!("{} {:.2}", c.name(), t.as_secs_f64() * 1e3))
            .collect();
        eprintln!(
            "decode after {len} tokens: {step:.2} ms/token ({} ms)",
            classes.join(", ")
        );
    }
}

/// Parses --device and --dtype and loads the model they name.
fn load(args: &ModelArgs) -> Result<(LoadedModel, DeviceSpec)> {
    let device: DeviceSpec = args.device.parse()?;
    let dtype = args.dtype.as_deref().map(parse_dtype).transpose()?;
    let options = LoadOptions {
        tokenizer: args.tokenizer.clone(),
        quantization: args.quantization,
    };
    let loaded = LoadedModel::load_with(
        &args.model,
        args.revision.as_deref(),
        device,
        dtype,
        &options,
    )?;
    tracing::info!(
        model = %args.model,
        revision = args.revision.as_deref(),
        dtype = ?loaded.model.dtype(),
        "model loaded"
    );
    Ok((loaded, device))
}

fn engine_config(args: &EngineArgs, device: DeviceSpec) -> EngineConfig {
    EngineConfig {
        kv_cache: match (args.kv_cache_mib, args.gpu_memory_utilization, device) {
            (Some(mib), _, _) => KvCacheBudget::Bytes(mib << 20),
            (None, Some(f), _) => KvCacheBudget::FractionOfFree(f),
            (None, None, DeviceSpec::Cuda(_)) => KvCacheBudget::FractionOfFree(0.9),
            (None, None, DeviceSpec::Cpu) => KvCacheBudget::Bytes(2 << 30),
        },
        max_num_batched_tokens: args.max_num_batched_tokens.map_or(
            match device {
                DeviceSpec::Cuda(_) => 2048,
                DeviceSpec::Cpu => 512,
            },
            |n| n.get(),
        ),
        max_num_seqs: args.max_num_seqs.get(),
        enable_prefix_caching: !args.no_prefix_caching,
        kv_cache_dtype: args.kv_cache_dtype.0,
        ..EngineConfig::default()
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let device: DeviceSpec = args.model.device.parse()?;
    let engine = engine_config(&args.engine, device);
    let chat_template = match &args.chat_template {
        Some(arg) => {
            let source = match std::fs::read_to_string(arg) {
                Ok(text) => text,
                Err(_) if arg.contains("{%") || arg.contains("{{") => arg.clone(),
                Err(e) => bail!("--chat-template {arg}: {e}"),
            };
            Some(std::sync::Arc::new(ChatTemplate::new(source, None, None)?))
        }
        None => None,
    };
    let served_model_names = if args.served_model_name.is_empty() {
        vec![args.model.model.clone()]
    } else {
        args.served_model_name.clone()
    };
    ember::api::check_origins(&args.allowed_origins).map_err(anyhow::Error::msg)?;
    let api = ApiConfig {
        served_model_names,
        api_keys: args
            .api_key
            .iter()
            .filter(|k| !k.is_empty())
            .cloned()
            .collect(),
        cors_allowed_origins: args.allowed_origins.clone(),
        max_request_body_bytes: args.max_request_bytes,
        max_admitted_sequences: args
            .engine
            .max_num_seqs
            .get()
            .saturating_add(args.max_queued_sequences),
        trust_request_chat_template: args.trust_request_chat_template,
        chat_template,
        limits: RequestLimits {
            max_prompts: args.max_prompts_per_request,
            max_sequences: args.max_sequences_per_request,
            max_stop_strings: args.max_stop_strings,
            max_stop_string_bytes: args.max_stop_string_bytes,
            max_stop_token_ids: args.max_stop_token_ids,
            max_logit_bias: args.max_logit_bias,
            max_prompt_bytes: args.max_prompt_bytes,
        },
        preprocess_timeout: std::time::Duration::from_secs(args.preprocess_timeout.max(1)),
        request_timeout: (args.request_timeout > 0)
            .then(|| std::time::Duration::from_secs(args.request_timeout)),
        log_requests: args.log_requests,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .map_err(|e| anyhow::anyhow!("binding {}:{}: {e}", args.host, args.port))?;
        // Tools read the address from this line (`--port 0`); it is logged whatever RUST_LOG says.
        let address = format!("http://{}", listener.local_addr()?);
        tracing::info!(target: "ember::listen", %address, "listening on {address}");
        let model_args = args.model;
        let load = move || {
            let (loaded, _) = load(&model_args)?;
            ember::server::start_engine(loaded, &engine)
        };
        ember::server::serve(
            listener,
            AppState::new(api),
            load,
            ember::server::shutdown_signal(),
            std::time::Duration::from_secs(args.shutdown_timeout),
        )
        .await
    })
}

fn bench_offline(args: OfflineArgs) -> Result<()> {
    let (loaded, device) = load(&args.model)?;
    let cfg = engine_config(&args.engine, device);
    let (handle, _thread) = EngineHandle::spawn(loaded, &cfg)?;
    let limits = handle.limits();
    eprintln!(
        "KV cache: {} blocks of {} tokens ({} tokens)",
        limits.num_blocks, limits.block_size, limits.max_cache_tokens
    );
    if args.latency {
        let r = run_latency(
            &handle,
            &args.prefill_lens,
            &args.context_lens,
            args.context_rounds,
            args.output_len,
            args.seed,
        )?;
        println!("mode,prompt_len,tokens,tok_per_s");
        for (len, rate) in &r.prefill {
            println!("prefill,{len},{len},{rate:.2}");
        }
        println!("decode,16,{},{:.2}", r.decode_tokens, r.decode_tokens_per_s);
        for (len, rate, _) in &r.long_context {
            println!(
                "decode,{len},{},{rate:.2}",
                args.output_len.max(2) * args.context_rounds.max(1)
            );
        }
        print_profile(&r, ember_kernels::cpu_isa());
        return Ok(());
    }
    println!("concurrency,input_len,output_len,seconds,output_tokens,output_tok_per_s,mean_ttft_s");
    for &c in &args.concurrency {
        let r = run_offline(&handle, c, args.input_len, args.output_len, args.seed)?;
        println!(
            "{},{},{},{:.2},{},{:.2},{:.3}",
            r.concurrency,
            r.input_len,
            r.output_len,
            r.elapsed.as_secs_f64(),
            r.output_tokens,
            r.output_tokens_per_s(),
            r.mean_ttft.as_secs_f64()
        );
    }
    Ok(())
}
