//! `ember bench serve` end to end: prompts, one run per concurrency (or rate) with a progress
//! bar, a table on stdout, a JSON file and an SVG chart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokenizers::Tokenizer;

use super::dataset::{self, BenchPrompt};
use super::plot::{write_svg, SweepPoint};
use super::serve::{cancellations, run, Endpoint, Load, Target};
use super::stats::{Slo, Summary};
use crate::cli::{BenchEndpoint, ServeBenchArgs};

#[derive(Debug, Serialize)]
struct RunReport {
    /// "concurrency" or "request_rate".
    load: &'static str,
    value: f64,
    #[serde(flatten)]
    summary: Summary,
    errors: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    base_url: &'a str,
    model: &'a str,
    endpoint: &'a str,
    num_prompts: usize,
    input_len: Option<usize>,
    output_len: usize,
    dataset: Option<String>,
    ignore_eos: bool,
    /// The `--json-schema` file, when requests asked for structured output.
    json_schema: Option<String>,
    goodput_targets: Slo,
    runs: Vec<RunReport>,
}

fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let file: PathBuf = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    Tokenizer::from_file(&file).map_err(|e| anyhow!("loading {}: {e}", file.display()))
}

fn prompts(args: &ServeBenchArgs, count: usize, seed: u64) -> Result<Vec<BenchPrompt>> {
    let tokenizer = args.tokenizer.as_deref().map(load_tokenizer).transpose()?;
    match (&args.dataset, &tokenizer) {
        (Some(path), t) => dataset::jsonl(path, t.as_ref(), count, args.output_len),
        (None, Some(t)) => dataset::synthetic(t, count, args.input_len, args.output_len, seed),
        (None, None) => bail!("synthetic prompts need --tokenizer (or give --dataset)"),
    }
}

fn print_header() {
    println!(
        "{:>8} {:>5} {:>4} {:>8} {:>7} {:>9} {:>9} | {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8} | {:>7}",
        "load", "ok", "fail", "dur_s", "req/s", "out_tok/s", "tot_tok/s",
        "ttft_avg", "ttft_p50", "ttft_p99", "tpot_avg", "tpot_p99", "itl_p50", "itl_p99",
        "e2e_p50", "e2e_p99", "goodput"
    );
}

fn print_row(label: &str, s: &Summary) {
    println!(
        "{:>8} {:>5} {:>4} {:>8.2} {:>7.2} {:>9.2} {:>9.2} | {:>8.1} {:>8.1} {:>8.1} | {:>8.1} {:>8.1} | {:>8.1} {:>8.1} | {:>8.1} {:>8.1} | {:>7}",
        label, s.completed, s.failed, s.duration_s, s.request_throughput, s.output_throughput,
        s.total_token_throughput, s.ttft.mean_ms, s.ttft.p50_ms, s.ttft.p99_ms, s.tpot.mean_ms,
        s.tpot.p99_ms, s.itl.p50_ms, s.itl.p99_ms, s.e2el.p50_ms, s.e2el.p99_ms,
        s.goodput.map_or("-".to_string(), |g| format!("{g:.2}"))
    );
}

pub fn bench_serve(args: &ServeBenchArgs) -> Result<()> {
    let slo = match &args.goodput {
        Some(text) => Slo::parse(text).map_err(|e| anyhow!("--goodput: {e}"))?,
        None => Slo::default(),
    };
    let target = Target {
        base_url: args.base_url.clone(),
        endpoint: match args.endpoint {
            BenchEndpoint::Completions => Endpoint::Completions,
            BenchEndpoint::Chat => Endpoint::Chat,
        },
        model: args.model.clone(),
        api_key: args.api_key.clone(),
        ignore_eos: args.ignore_eos,
        temperature: args.temperature,
        timeout: Duration::from_secs(args.timeout),
        json_schemas: match &args.json_schema {
            Some(path) => json_schemas(path)?,
            None => Vec::new(),
        },
    };
    let loads: Vec<(Load, &'static str, f64)> = if args.request_rate.is_empty() {
        args.concurrency
            .iter()
            .map(|&c| (Load::Concurrency(c), "concurrency", c as f64))
            .collect()
    } else {
        args.request_rate
            .iter()
            .map(|&r| {
                let load = Load::Rate {
                    per_second: r,
                    max_concurrency: args.max_concurrency,
                };
                (load, "request_rate", r)
            })
            .collect()
    };
    if !(0.0..=1.0).contains(&args.cancel_fraction) {
        bail!("--cancel-fraction must be between 0 and 1");
    }
    if loads.is_empty() || args.num_prompts == 0 {
        bail!("nothing to run: give --num-prompts and --concurrency or --request-rate");
    }
    // Each run gets prompts of its own, so that no run finds an earlier one's prompts in the
    // server's prefix cache (a dataset file repeats, as given).
    let per_run = args.num_prompts + args.warmup;
    let all = prompts(args, per_run * loads.len(), args.seed)?;
    let mean_input =
        all.iter().map(|p| p.num_tokens).sum::<usize>() as f64 / all.len().max(1) as f64;
    eprintln!(
        "{} {} requests per run, ~{mean_input:.0} prompt tokens each, max_tokens {}",
        target.base_url, args.num_prompts, args.output_len
    );
    let bar = ProgressBar::new(all.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests [{elapsed}<{eta}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut runs = Vec::new();
    let mut rows = Vec::new();
    for (i, &(load, kind, value)) in loads.iter().enumerate() {
        bar.set_message(format!("{kind} {value}"));
        let (warmup, measured) = all[i * per_run..(i + 1) * per_run].split_at(args.warmup);
        if !warmup.is_empty() {
            run(&target, warmup, load, (args.seed, &[]), &bar);
        }
        let seed = args.seed + i as u64;
        let cancel = cancellations(measured.len(), args.cancel_fraction, seed);
        let (records, elapsed) = run(&target, measured, load, (seed, &cancel), &bar);
        let summary = Summary::of(&records, elapsed.as_secs_f64(), &slo);
        let mut errors: Vec<String> = records.iter().filter_map(|r| r.error.clone()).collect();
        errors.dedup();
        rows.push((format!("{value}"), summary.clone()));
        runs.push(RunReport {
            load: kind,
            value,
            summary,
            errors,
        });
    }
    bar.finish_and_clear();
    println!(
        "{} ({}), times in ms",
        loads.first().map_or("", |l| l.1),
        args.model
    );
    print_header();
    for (label, summary) in &rows {
        print_row(label, summary);
    }
    for r in &runs {
        if r.summary.cancelled > 0 {
            eprintln!(
                "{} {}: {} cancelled by the client (--cancel-fraction)",
                r.load, r.value, r.summary.cancelled
            );
        }
        if let Some(first) = r.errors.first() {
            eprintln!(
                "{} {}: {} failed, e.g. {first}",
                r.load, r.value, r.summary.failed
            );
        }
    }
    if let Some(path) = &args.plot {
        let points: Vec<SweepPoint> = runs
            .iter()
            .map(|r| SweepPoint {
                load: r.value,
                output_throughput: r.summary.output_throughput,
                ttft_p50_ms: r.summary.ttft.p50_ms,
                ttft_p99_ms: r.summary.ttft.p99_ms,
            })
            .collect();
        let title = format!("{} at {}", args.model, args.base_url);
        let label = runs.first().map_or("load", |r| r.load);
        write_svg(path, &title, label, &points)?;
        eprintln!("chart: {}", path.display());
    }
    if let Some(path) = &args.result_json {
        let report = Report {
            base_url: &args.base_url,
            model: &args.model,
            endpoint: target.endpoint.path(),
            num_prompts: args.num_prompts,
            input_len: args.dataset.is_none().then_some(args.input_len),
            output_len: args.output_len,
            dataset: args.dataset.as_ref().map(|p| p.display().to_string()),
            ignore_eos: args.ignore_eos,
            json_schema: args.json_schema.as_ref().map(|p| p.display().to_string()),
            goodput_targets: slo,
            runs,
        };
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("results: {}", path.display());
    }
    Ok(())
}

/// The schemas of `--json-schema`: one schema, or a list of {"name", "schema"}.
fn json_schemas(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("--json-schema: {} is not JSON", path.display()))?;
    Ok(match value {
        serde_json::Value::Array(entries) => entries
            .into_iter()
            .map(|e| e.get("schema").cloned().unwrap_or(e))
            .collect(),
        schema => vec![schema],
    })
}
