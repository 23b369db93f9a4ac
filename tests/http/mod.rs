//! An in-process `ember serve` on a tiny fixture, on 127.0.0.1 port 0, and a small blocking
//! HTTP client for it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::DType;
use ember::api::{ApiConfig, AppState};
use ember::device::DeviceSpec;
use ember::engine::{EngineConfig, KvCacheBudget};
use ember::model::LoadedModel;
use serde_json::Value as Json;

pub const MODEL: &str = "tiny";

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

pub fn api_config() -> ApiConfig {
    ApiConfig {
        served_model_names: vec![MODEL.into()],
        ..ApiConfig::default()
    }
}

pub fn engine_config() -> EngineConfig {
    EngineConfig {
        kv_cache: KvCacheBudget::Bytes(16 << 20),
        max_num_seqs: 64,
        ..EngineConfig::default()
    }
}

pub struct TestServer {
    pub base: String,
    pub state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub fn start(fixture: &str, api: ApiConfig, engine: EngineConfig) -> Self {
        Self::start_with(fixture, api, engine, Duration::from_secs(5))
    }

    pub fn start_with(
        fixture: &str,
        api: ApiConfig,
        engine: EngineConfig,
        shutdown_timeout: Duration,
    ) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = AppState::new(api);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let dir = fixture_dir(fixture);
        let served = state.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let load = move || {
                    let loaded = LoadedModel::load(
                        dir.to_str().unwrap_or_default(),
                        None,
                        DeviceSpec::Cpu,
                        Some(DType::F32),
                    )?;
                    ember::server::start_engine(loaded, &engine)
                };
                let shutdown = async move {
                    let _ = stopped.await;
                };
                ember::server::serve(listener, served, load, shutdown, shutdown_timeout).await
            })
        });
        let server = Self {
            base,
            state,
            stop: Some(stop),
            thread: Some(thread),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while get(&server.url("/health")).0 != 200 {
            assert!(Instant::now() < deadline, "the server did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn post(&self, path: &str, body: &Json) -> (u16, Json) {
        post(&self.url(path), body, None)
    }

    /// Whether the server has ended by itself.
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| t.is_finished())
    }

    /// Starts SIGTERM-like shutdown; returns the server thread's handle.
    pub fn shutdown(&mut self) -> std::thread::JoinHandle<anyhow::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.thread.take().expect("shut down twice")
    }

    /// The value of a metric line that starts with `prefix` (name and labels).
    pub fn metric(&self, prefix: &str) -> f64 {
        let (_, text) = get(&self.url("/metrics"));
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {prefix} in:\n{text}"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

fn read(result: Result<ureq::Response, ureq::Error>) -> (u16, ureq::Response) {
    match result {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(code, r)) => (code, r),
        Err(e) => panic!("transport error: {e}"),
    }
}

/// GET: (status, body text).
pub fn get(url: &str) -> (u16, String) {
    match agent().get(url).call() {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// GET with a bearer token: (status, JSON body).
pub fn get_json(url: &str, key: Option<&str>) -> (u16, Json) {
    let mut req = agent().get(url);
    if let Some(key) = key {
        req = req.set("Authorization", &format!("Bearer {key}"));
    }
    let (status, r) = read(req.call());
    (status, r.into_json().unwrap_or(Json::Null))
}

/// POST JSON: (status, JSON body).
pub fn post(url: &str, body: &Json, key: Option<&str>) -> (u16, Json) {
    let mut req = agent().post(url);
    if let Some(key) = key {
        req = req.set("Authorization", &format!("Bearer {key}"));
    }
    let (status, r) = read(req.send_json(body.clone()));
    (status, r.into_json().unwrap_or(Json::Null))
}

/// POST raw bytes: (status, headers of interest, JSON body).
pub fn post_raw(url: &str, body: &[u8]) -> (u16, Option<String>, Json) {
    let (status, r) = read(
        agent()
            .post(url)
            .set("Content-Type", "application/json")
            .send_bytes(body),
    );
    let retry = r.header("Retry-After").map(String::from);
    (status, retry, r.into_json().unwrap_or(Json::Null))
}

/// A streaming POST: the `data:` payloads in order (`[DONE]` included as a string).
pub fn stream(url: &str, body: &Json) -> Vec<Json> {
    let (status, r) = read(agent().post(url).send_json(body.clone()));
    assert_eq!(status, 200, "streaming request failed");
    assert_eq!(
        r.header("Content-Type"),
        Some("text/event-stream"),
        "SSE content type"
    );
    let mut out = Vec::new();
    for line in BufReader::new(r.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            if data == "[DONE]" {
                out.push(Json::String("[DONE]".into()));
            } else {
                out.push(serde_json::from_str(data).unwrap());
            }
        }
    }
    out
}

/// Opens a streaming request and returns its reader after the first `data:` line.
pub fn open_stream(url: &str, body: &Json) -> Box<dyn BufRead + Send> {
    let (status, r) = read(agent().post(url).send_json(body.clone()));
    assert_eq!(status, 200);
    let mut reader: Box<dyn BufRead + Send> = Box::new(BufReader::new(r.into_reader()));
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    reader
}

/// Polls `check` until it holds or `secs` pass.
pub fn eventually(secs: u64, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}

/// Whether the client tool a suite needs is installed at `path` (scripts/client-venv.sh, or
/// `npm ci` for deploy/validate). If not, the test says so and skips, unless
/// EMBER_REQUIRE_CLIENT_SUITE is set (CI sets it), in which case it fails.
pub fn client_tool(path: &Path, what: &str) -> bool {
    if path.exists() {
        return true;
    }
    assert!(
        std::env::var_os("EMBER_REQUIRE_CLIENT_SUITE").is_none(),
        "EMBER_REQUIRE_CLIENT_SUITE is set but {} ({what}) does not exist",
        path.display()
    );
    eprintln!("skipped: no {what} at {}", path.display());
    false
}

/// Runs a client suite's command; fails with its output unless it exits 0.
pub fn run_suite(cmd: &mut std::process::Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed:\n{text}");
    eprintln!("{text}");
}
