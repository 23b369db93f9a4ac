use std::io::Write;

use anyhow::{bail, Result};
use clap::Parser;
use ember::bench::run_offline;
use ember::cli::{BenchCommand, Cli, Command, GenerateArgs, ModelArgs, OfflineArgs};
use ember::device::{parse_dtype, DeviceSpec};
use ember::engine::sampler::SamplingParams;
use ember::engine::{EngineConfig, EngineHandle, KvCacheBudget};
use ember::generate::LoadedModel;
use ember::template::RenderOptions;

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Bench(BenchCommand::Offline(args)) => bench_offline(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
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

/// Parses --device and --dtype and loads the model they name.
fn load(args: &ModelArgs) -> Result<(LoadedModel, DeviceSpec)> {
    let device: DeviceSpec = args.device.parse()?;
    let dtype = args.dtype.as_deref().map(parse_dtype).transpose()?;
    let loaded = LoadedModel::load(&args.model, args.revision.as_deref(), device, dtype)?;
    Ok((loaded, device))
}

fn bench_offline(args: OfflineArgs) -> Result<()> {
    let (loaded, device) = load(&args.model)?;
    let cfg = EngineConfig {
        kv_cache: match (
            args.engine.kv_cache_mib,
            args.engine.gpu_memory_utilization,
            device,
        ) {
            (Some(mib), _, _) => KvCacheBudget::Bytes(mib << 20),
            (None, Some(f), _) => KvCacheBudget::FractionOfFree(f),
            (None, None, DeviceSpec::Cuda(_)) => KvCacheBudget::FractionOfFree(0.9),
            (None, None, DeviceSpec::Cpu) => KvCacheBudget::Bytes(2 << 30),
        },
        max_num_batched_tokens: args.engine.max_num_batched_tokens,
        max_num_seqs: args.engine.max_num_seqs,
        enable_prefix_caching: !args.engine.no_prefix_caching,
        ..EngineConfig::default()
    };
    let (handle, _thread) = EngineHandle::spawn(loaded, &cfg)?;
    let limits = handle.limits();
    eprintln!(
        "KV cache: {} blocks of {} tokens ({} tokens)",
        limits.num_blocks, limits.block_size, limits.max_cache_tokens
    );
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
