//! Loading from a local directory and from a directory laid out like the Hugging Face Hub cache
//! (models--org--name/{refs,snapshots}), offline; and a clear, quick error when the Hub is
//! unreachable.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use ember_models::{eos_token_ids, load_model, resolve, resolve_with, HubOptions};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-loader-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn options(cache_dir: &Path, offline: bool, endpoint: &str) -> HubOptions {
    HubOptions {
        cache_dir: cache_dir.to_path_buf(),
        endpoint: endpoint.to_string(),
        offline,
        token: None,
        progress: false,
        timeout: Duration::from_secs(5),
    }
}

/// Copies a fixture into `cache/models--org--name/snapshots/<commit>/` with `refs/main`.
fn make_hub_cache(cache: &Path, repo: &str, fixture_name: &str) -> PathBuf {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    for entry in std::fs::read_dir(fixture(fixture_name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, snapshot.join(path.file_name().unwrap())).unwrap();
    }
    snapshot
}

#[test]
fn local_sharded_checkpoint_lists_every_shard_once() {
    let files = resolve(fixture("qwen3").to_str().unwrap(), None).unwrap();
    assert_eq!(files.weights.len(), 13);
    let mut names: Vec<_> = files
        .weights
        .iter()
        .map(|p| p.file_name().unwrap().to_owned())
        .collect();
    names.dedup();
    assert_eq!(names.len(), 13);
    assert!(files.tokenizer_config.is_some() && files.generation_config.is_some());
    let model = load_model(&files, DType::F32, &Device::Cpu).unwrap();
    // generation_config.json lists two ids; config.json has one.
    assert_eq!(eos_token_ids(&files, model.config()).unwrap().len(), 2);
    assert_eq!(model.config().eos_token_ids.len(), 1);
}

#[test]
fn offline_hub_cache_layout_resolves_and_loads() {
    let cache = scratch("hub");
    let snapshot = make_hub_cache(&cache, "tiny-org/qwen3-tiny", "qwen3");
    let files = resolve_with(
        "tiny-org/qwen3-tiny",
        None,
        &options(&cache, true, "http://127.0.0.1:9"),
    )
    .unwrap();
    assert_eq!(files.config, snapshot.join("config.json"));
    assert!(files.weights.iter().all(|w| w.starts_with(&snapshot)));
    assert_eq!(files.weights.len(), 13);
    load_model(&files, DType::F32, &Device::Cpu).unwrap();
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn offline_without_the_model_in_cache_says_so() {
    let cache = scratch("empty");
    let err = resolve_with(
        "tiny-org/absent",
        None,
        &options(&cache, true, "http://127.0.0.1:9"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("tiny-org/absent"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn unreachable_hub_fails_fast_with_a_clear_error() {
    let cache = scratch("unreachable");
    // Bind and drop a listener: nothing serves that port, so the connection is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start = Instant::now();
    let err = resolve_with(
        "tiny-org/qwen3-tiny",
        None,
        &options(&cache, false, &format!("http://127.0.0.1:{port}")),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("cannot reach") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn a_hung_hub_times_out() {
    let cache = scratch("hung");
    // A listener that accepts but never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut opts = options(&cache, false, &format!("http://127.0.0.1:{port}"));
    opts.timeout = Duration::from_millis(500);
    let start = Instant::now();
    let err = resolve_with("tiny-org/qwen3-tiny", None, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot reach"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(listener);
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn unsupported_architecture_is_rejected_at_load() {
    let dir = scratch("llama");
    for entry in std::fs::read_dir(fixture("qwen2")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let config = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"qwen2\"", "\"llama\"");
    std::fs::write(dir.join("config.json"), config).unwrap();
    let files = resolve(dir.to_str().unwrap(), None).unwrap();
    let err = load_model(&files, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("llama") && err.contains("not supported"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
