//! Faults around the server: broken model files at startup, clients that abort at any moment,
//! more long prompts than the KV cache holds, and SIGTERM with streams in flight.

mod http;

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember::device::DeviceSpec;
use ember::engine::{EngineConfig, EngineEvent, EngineHandle, KvCacheBudget, ValidRequest};
use ember::model::LoadedModel;
use ember_models::PagedKvCache;
use http::{api_config, eventually, fixture_dir, get, open_stream, TestServer, MODEL};
use serde_json::{json, Value as Json};

fn qwen3() -> LoadedModel {
    LoadedModel::load(
        fixture_dir("qwen3").to_str().unwrap(),
        None,
        DeviceSpec::Cpu,
        None,
    )
    .unwrap()
}

/// A fresh copy of a fixture's directory, to break.
fn copy_fixture(name: &str, tag: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("ember-faults-{}-{name}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture_dir(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn truncate(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
}

/// `ember generate` on a model directory: (exit code, stderr).
fn generate(dir: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "hi",
        ])
        .args(["--max-tokens", "2"])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Engine sizes of zero are refused by the command line (exit code 2, the flag named), never
/// a panic inside the engine's start.
#[test]
fn zero_engine_sizes_are_refused_at_the_command_line() {
    for flag in ["--max-num-seqs", "--max-num-batched-tokens"] {
        let out = Command::new(env!("CARGO_BIN_EXE_ember"))
            .args(["serve", "--model", fixture_dir("qwen3").to_str().unwrap()])
            .args(["--port", "0", flag, "0"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(
            stderr.contains(flag) && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}

/// Each broken file stops the start with exit code 1 and one error line that names the file,
/// never a panic.
#[test]
fn broken_model_files_fail_at_startup_naming_the_file() {
    type Break = fn(&Path);
    let cases: Vec<(&str, &str, &str, Break)> = vec![
        ("qwen2", "no-weights", "model.safetensors", |d| {
            std::fs::remove_file(d.join("model.safetensors")).unwrap()
        }),
        ("qwen2", "short-weights", "model.safetensors", |d| {
            truncate(&d.join("model.safetensors"))
        }),
        ("qwen2", "garbage-weights", "model.safetensors", |d| {
            std::fs::write(
                d.join("model.safetensors"),
                b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk",
            )
            .unwrap()
        }),
        ("qwen2", "bad-header", "model.safetensors", |d| {
            let path = d.join("model.safetensors");
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[8..16].copy_from_slice(b"{\"x\": [}");
            std::fs::write(path, bytes).unwrap()
        }),
        (
            "qwen3",
            "missing-shard",
            "model-00007-of-00013.safetensors",
            |d| std::fs::remove_file(d.join("model-00007-of-00013.safetensors")).unwrap(),
        ),
        (
            "qwen3",
            "short-index",
            "model.safetensors.index.json",
            |d| truncate(&d.join("model.safetensors.index.json")),
        ),
        ("qwen2", "no-config", "config.json", |d| {
            std::fs::remove_file(d.join("config.json")).unwrap()
        }),
        ("qwen2", "short-config", "config.json", |d| {
            truncate(&d.join("config.json"))
        }),
        ("qwen2", "typed-config", "config.json", |d| {
            let path = d.join("config.json");
            let text = std::fs::read_to_string(&path).unwrap();
            let mut config: Json = serde_json::from_str(&text).unwrap();
            config["hidden_size"] = json!("large");
            std::fs::write(path, config.to_string()).unwrap()
        }),
        ("qwen2", "no-tokenizer", "tokenizer.json", |d| {
            std::fs::remove_file(d.join("tokenizer.json")).unwrap()
        }),
        ("qwen2", "short-tokenizer", "tokenizer.json", |d| {
            truncate(&d.join("tokenizer.json"))
        }),
        (
            "qwen2",
            "short-tokenizer-config",
            "tokenizer_config.json",
            |d| truncate(&d.join("tokenizer_config.json")),
        ),
    ];
    let mut failures = Vec::new();
    for (fixture, tag, file, damage) in cases {
        let dir = copy_fixture(fixture, tag);
        damage(&dir);
        let (code, stderr) = generate(&dir);
        let ok = code == Some(1)
            && stderr.contains("error: ")
            && !stderr.contains("panicked")
            && stderr.contains(file);
        if !ok {
            failures.push(format!("{tag}: exit {code:?}: {stderr}"));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Clients that drop their streams at every point of a request's life (queued, prefilling,
/// mid-decode, after the last token, with forked completions): every block comes back and
/// nothing stays running or waiting.
#[test]
fn aborts_at_any_moment_leave_nothing_behind() {
    let loaded = qwen3();
    let cfg = EngineConfig {
        kv_cache: KvCacheBudget::Bytes(8 << 20),
        max_num_seqs: 4,
        ..EngineConfig::default()
    };
    let (handle, _thread) = EngineHandle::spawn(loaded, &cfg).unwrap();
    let mut streams = Vec::new();
    for i in 0..48u32 {
        let mut r = ValidRequest::greedy(
            (0..5 + i % 40).map(|t| 10 + (t * 7 + i) % 400).collect(),
            12,
        );
        r.ignore_eos = true;
        r.n = 1 + (i % 3) as usize;
        let mut stream = handle.submit(r).unwrap();
        // Read a few events (none for some: they are dropped while queued), then hang up;
        // every fourth is read to its end first.
        let reads = if i % 4 == 3 {
            usize::MAX
        } else {
            (i % 6) as usize
        };
        let mut finished = 0;
        for _ in 0..reads {
            match stream.blocking_recv() {
                Some(EngineEvent::Finished { .. }) => {
                    finished += 1;
                    if finished == 1 + (i % 3) as usize {
                        break;
                    }
                }
                Some(_) => {}
                None => panic!("request {i}: the stream ended without finishing"),
            }
        }
        streams.push(stream);
        if streams.len() > 3 {
            // Drop an older one while newer ones queue.
            drop(streams.remove((i % 3) as usize));
        }
    }
    drop(streams);
    let settled = || {
        handle.stats().is_some_and(|s| {
            s.num_running == 0 && s.num_waiting == 0 && s.num_free_blocks == s.num_blocks
        })
    };
    assert!(eventually(10, settled), "{:?}", handle.stats());
    // And the engine still serves.
    let mut r = ValidRequest::greedy(vec![5, 6, 7], 3);
    r.ignore_eos = true;
    let mut stream = handle.submit(r).unwrap();
    let mut tokens = 0;
    while let Some(e) = stream.blocking_recv() {
        match e {
            EngineEvent::Token { .. } => tokens += 1,
            EngineEvent::Finished { .. } => break,
            _ => {}
        }
    }
    assert_eq!(tokens, 3);
}

/// Sixteen long prompts needing several times the KV cache at once: each completes (through
/// preemption) with all its tokens, none is lost, and one that could never fit is refused up
/// front.
#[test]
fn twice_the_kv_capacity_completes_or_is_refused_cleanly() {
    let loaded = qwen3();
    // 32 blocks of 16 tokens: 512 tokens of cache.
    let block = PagedKvCache::bytes_per_block(loaded.model.config(), 16, loaded.model.dtype());
    let engine = EngineConfig {
        kv_cache: KvCacheBudget::Bytes(32 * block),
        max_num_seqs: 16,
        ..EngineConfig::default()
    };
    let s = TestServer::start("qwen3", api_config(), engine);
    // 16 × (160-token prompt + 90 tokens): 16 blocks each, 8 times the cache in all; started
    // together, the running ones outgrow the cache as they decode.
    let start = std::sync::Arc::new(std::sync::Barrier::new(16));
    let threads: Vec<_> = (0..16u32)
        .map(|i| {
            let url = s.url("/v1/completions");
            let start = start.clone();
            let prompt: Vec<u32> = (0..160).map(|t| 10 + (t * 13 + i * 31) % 400).collect();
            std::thread::spawn(move || {
                let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 90,
                    "ignore_eos": true, "temperature": 0});
                start.wait();
                http::post(&url, &body, None)
            })
        })
        .collect();
    for t in threads {
        let (status, r) = t.join().unwrap();
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["usage"]["completion_tokens"], 90, "{r}");
        assert_eq!(r["choices"][0]["finish_reason"], "length", "{r}");
    }
    assert!(
        s.metric("ember_num_preemptions_total") > 0.0,
        "the cache was oversubscribed"
    );
    // A prompt + max_tokens beyond the whole cache is refused before it queues.
    let long: Vec<u32> = (0..400).map(|t| 10 + t % 400).collect();
    let (status, r) = s.post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": long, "max_tokens": 200}),
    );
    assert_eq!(status, 400, "{r}");
    assert!(eventually(5, || s.metric("ember_kv_cache_usage_ratio") == 0.0));
}

/// A real `ember serve` process: SIGTERM while a stream runs lets it finish, refuses new work,
/// and exits 0.
#[test]
fn sigterm_with_streams_in_flight_drains_and_exits_zero() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["serve", "--model", fixture_dir("qwen3").to_str().unwrap()])
        .args(["--served-model-name", MODEL, "--port", &port.to_string()])
        .args(["--kv-cache-mib", "16", "--shutdown-timeout", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        eventually(60, || get(&format!("{base}/health")).0 == 200),
        "the server did not come up"
    );
    // Four streams of 8 × 480 tokens: running when the signal comes.
    let body = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 480, "ignore_eos": true,
        "n": 8, "stream": true});
    let mut readers: Vec<_> = (0..4)
        .map(|_| open_stream(&format!("{base}/v1/completions"), &body))
        .collect();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Draining: /health says so, and no new work is taken.
    assert!(eventually(10, || get(&format!("{base}/health")).0 == 503));
    let (status, _) = http::post(
        &format!("{base}/v1/completions"),
        &json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2}),
        None,
    );
    assert_eq!(status, 503, "the streams still run, so it drains");
    // Every stream runs to its end.
    for reader in &mut readers {
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert_eq!(
            rest.matches("\"finish_reason\":\"length\"").count(),
            8,
            "{rest}"
        );
        assert!(rest.trim_end().ends_with("data: [DONE]"));
    }
    let start = Instant::now();
    let code = loop {
        if let Some(code) = child.try_wait().unwrap() {
            break code;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "it did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    if let Some(stderr) = child.stderr.take() {
        let _ = BufReader::new(stderr).read_to_string(&mut log);
    }
    assert_eq!(code.code(), Some(0), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}
