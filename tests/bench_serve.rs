//! `ember bench serve` against a live Ember on the tiny fixture: the load generator's records
//! agree with what the server did, in closed and open loop, for both endpoints; the CLI writes
//! its table, JSON and chart.

mod http;

use std::time::Duration;

use ember::bench::dataset::synthetic;
use ember::bench::serve::{run, Endpoint, Load, Target};
use ember::bench::stats::{Slo, Summary};
use http::{api_config, engine_config, fixture_dir, TestServer, MODEL};
use indicatif::ProgressBar;
use tokenizers::Tokenizer;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(fixture_dir("qwen3").join("tokenizer.json")).unwrap()
}

fn target(s: &TestServer, endpoint: Endpoint) -> Target {
    Target {
        base_url: s.base.clone(),
        endpoint,
        model: MODEL.into(),
        api_key: None,
        ignore_eos: true,
        temperature: 0.0,
        timeout: Duration::from_secs(60),
        json_schemas: Vec::new(),
    }
}

#[test]
fn records_match_what_the_server_did() {
    let s = TestServer::start("qwen3", api_config(), engine_config());
    let prompts = synthetic(&tokenizer(), 8, 32, 16, 7).unwrap();
    for p in &prompts {
        assert!((28..=36).contains(&p.num_tokens), "{} tokens", p.num_tokens);
    }
    let loads = [
        Load::Concurrency(4),
        Load::Rate {
            per_second: f64::INFINITY,
            max_concurrency: Some(2),
        },
        Load::Rate {
            per_second: 50.0,
            max_concurrency: None,
        },
    ];
    for endpoint in [Endpoint::Completions, Endpoint::Chat] {
        for load in loads {
            let bar = ProgressBar::hidden();
            let (records, elapsed) = run(&target(&s, endpoint), &prompts, load, (1, &[]), &bar);
            assert_eq!(bar.position(), 8);
            for r in &records {
                assert!(r.ok, "{:?}", r.error);
                assert_eq!(r.output_tokens, 16, "usage from the server");
                assert!(r.ttft > 0.0 && r.e2e >= r.ttft);
                assert!(!r.itl.is_empty() && r.itl.len() <= 15);
            }
            if endpoint == Endpoint::Completions {
                for (r, p) in records.iter().zip(&prompts) {
                    assert_eq!(
                        r.prompt_tokens, p.num_tokens,
                        "same tokenizer as the server"
                    );
                }
            }
            let summary = Summary::of(&records, elapsed.as_secs_f64(), &Slo::default());
            assert_eq!((summary.completed, summary.failed), (8, 0));
            assert_eq!(summary.total_output_tokens, 128);
        }
    }
    // A wrong model name fails every request, with the server's message.
    let mut bad = target(&s, Endpoint::Completions);
    bad.model = "nope".into();
    let (records, _) = run(
        &bad,
        &prompts[..2],
        Load::Concurrency(1),
        (1, &[]),
        &ProgressBar::hidden(),
    );
    assert!(records.iter().all(|r| !r.ok));
    assert!(records[0].error.as_deref().unwrap().contains("404"));
}

/// Clients that hang up (before their first token and mid-stream) are counted as cancelled,
/// not failed; the server aborts them and frees their blocks, and the rest complete.
#[test]
fn cancelled_requests_are_counted_and_aborted() {
    let s = TestServer::start("qwen3", api_config(), engine_config());
    let prompts = synthetic(&tokenizer(), 24, 32, 200, 3).unwrap();
    let cancel = ember::bench::serve::cancellations(prompts.len(), 0.5, 9);
    let expected = cancel.iter().filter(|c| c.is_some()).count();
    assert!(expected > 0 && expected < prompts.len());
    assert!(cancel.contains(&Some(0)) && cancel.iter().any(|c| c.is_some_and(|k| k > 0)));
    let (records, elapsed) = run(
        &target(&s, Endpoint::Completions),
        &prompts,
        Load::Concurrency(8),
        (1, &cancel),
        &ProgressBar::hidden(),
    );
    let summary = Summary::of(&records, elapsed.as_secs_f64(), &Slo::default());
    assert_eq!(summary.cancelled, expected);
    assert_eq!(
        summary.failed,
        0,
        "{:?}",
        records.iter().find_map(|r| r.error.clone())
    );
    assert_eq!(summary.completed, prompts.len() - expected);
    assert_eq!(summary.total_output_tokens, 200 * summary.completed);
    let abort = "ember_request_success_total{finished_reason=\"abort\"}";
    assert!(http::eventually(10, || s.metric(abort) >= 1.0));
    assert!(http::eventually(10, || s
        .metric("ember_kv_cache_usage_ratio")
        == 0.0));
}

#[test]
fn the_cli_writes_a_table_json_and_chart() {
    let s = TestServer::start("qwen3", api_config(), engine_config());
    let dir = std::env::temp_dir().join(format!("ember-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg) = (dir.join("result.json"), dir.join("chart.svg"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["bench", "serve", "--base-url", &s.base, "--model", MODEL])
        .args([
            "--num-prompts",
            "6",
            "--concurrency",
            "1,3",
            "--input-len",
            "24",
        ])
        .args([
            "--output-len",
            "8",
            "--ignore-eos",
            "--goodput",
            "ttft:60000",
        ])
        .arg("--tokenizer")
        .arg(fixture_dir("qwen3"))
        .arg("--result-json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("ttft_p50"), "{table}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (run, c) in runs.iter().zip([1.0, 3.0]) {
        assert_eq!(run["load"], "concurrency");
        assert_eq!(run["value"], c);
        assert_eq!(run["completed"], 6);
        assert_eq!(run["total_output_tokens"], 48);
        // Every request meets a 60 s TTFT target.
        let goodput = run["goodput"].as_f64().unwrap();
        assert!((goodput - run["request_throughput"].as_f64().unwrap()).abs() < 1e-9);
    }
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.contains("<svg") && chart.contains("TTFT p99"));
    let _ = std::fs::remove_dir_all(&dir);
}
