//! The operator's view of `ember serve` (the binary, its stderr a file): one access line per
//! request for a success, a 4xx and a client that leaves mid-stream, in text and in JSON; the
//! request id echoed (the client's, or a generated one); no colour codes off a terminal; the
//! start-up lines name what was loaded; no prompt text without `--log-requests`.

mod http;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use http::{eventually, fixture_dir};
use serde_json::{json, Value as Json};

/// A word of the prompt that must never reach the log unless asked for.
const SECRET: &str = "zebra";

struct Server {
    child: Child,
    base: String,
    log: std::path::PathBuf,
}

impl Server {
    fn start(format: &str, extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = std::env::temp_dir().join(format!(
            "ember-logs-{format}-{}-{port}.log",
            std::process::id()
        ));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_ember"))
            .args(["serve", "--model"])
            .arg(fixture_dir("qwen3"))
            .args(["--served-model-name", "m", "--port", &port.to_string()])
            .args(["--kv-cache-mib", "16", "--log-format", format])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("ember serve starts");
        let base = format!("http://127.0.0.1:{port}");
        let up = eventually(60, || {
            ureq::get(&format!("{base}/health"))
                .call()
                .is_ok_and(|r| r.status() == 200)
        });
        assert!(up, "ember serve became ready");
        Self { child, base, log }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A completion, a 400 and an abandoned stream; returns the 400's generated request id.
    fn traffic(&self) -> String {
        let ok = ureq::post(&format!("{}/v1/completions", self.base))
            .set("X-Request-Id", "client-ok-1")
            .send_json(json!({"model": "m", "prompt": format!("Hello {SECRET}"), "max_tokens": 4, "ignore_eos": true}))
            .expect("completion");
        assert_eq!(ok.header("x-request-id"), Some("client-ok-1"));
        let bad = ureq::post(&format!("{}/v1/completions", self.base))
            .send_json(json!({"model": "m", "prompt": "Hi", "max_tokens": -1}));
        let bad_id = match bad {
            Err(ureq::Error::Status(400, r)) => r
                .header("x-request-id")
                .expect("a generated request id")
                .to_string(),
            other => panic!("expected a 400, got {other:?}"),
        };
        assert!(bad_id.starts_with("req-"), "{bad_id}");
        let stream = ureq::post(&format!("{}/v1/chat/completions", self.base))
            .set("X-Request-Id", "client-gone-2")
            .send_json(json!({
                "model": "m", "stream": true, "max_tokens": 400, "ignore_eos": true,
                "messages": [{"role": "user", "content": format!("Tell a story about a {SECRET}")}],
            }))
            .expect("stream");
        let mut reader = BufReader::new(stream.into_reader());
        let mut line = String::new();
        while !line.starts_with("data: ") {
            line.clear();
            reader.read_line(&mut line).expect("a chunk");
        }
        drop(reader); // the client leaves mid-stream
        bad_id
    }

    /// Waits for `n` access lines (info level: probes log at debug and never count).
    fn wait_for_access_lines(&self, n: usize, is_access: impl Fn(&str) -> bool) -> String {
        let done = eventually(20, || {
            self.text().lines().filter(|l| is_access(l)).count() >= n
        });
        let text = self.text();
        assert!(done, "{n} access lines expected in:\n{text}");
        text
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

#[test]
fn text_access_lines_for_success_error_and_abort() {
    let server = Server::start("text", &[]);
    let bad_id = server.traffic();
    let text = server.wait_for_access_lines(3, |l| l.contains("ember::access"));
    assert!(!text.contains('\u{1b}'), "no ANSI codes in a file:\n{text}");
    assert!(
        !text.contains(SECRET),
        "no prompt text without --log-requests:\n{text}"
    );
    let line = |id: &str| {
        text.lines()
            .find(|l| l.contains("ember::access") && l.contains(id))
            .unwrap_or_else(|| panic!("an access line for {id} in:\n{text}"))
            .to_string()
    };
    let ok = line("client-ok-1");
    for field in [
        "route=/v1/completions",
        "status=200",
        "completion_tokens=4",
        "finish=length",
        "ttft_ms=",
        "duration_ms=",
    ] {
        assert!(ok.contains(field), "{field} in {ok}");
    }
    let bad = line(&bad_id);
    assert!(
        bad.contains("status=400") && bad.contains("max_tokens"),
        "{bad}"
    );
    let gone = line("client-gone-2");
    assert!(
        gone.contains("status=200") && gone.contains("finish=abort"),
        "{gone}"
    );
    // Start-up names what was loaded and how the engine runs.
    for what in [
        "model loaded",
        "engine started",
        "kv_cache_tokens=",
        "max_num_seqs=",
    ] {
        assert!(text.contains(what), "{what} at start-up:\n{text}");
    }
    assert!(
        text.contains("kernels"),
        "the CPU kernel path at start-up:\n{text}"
    );
}

#[test]
fn json_access_lines_parse_and_carry_the_fields() {
    let server = Server::start("json", &["--log-requests"]);
    let bad_id = server.traffic();
    let is_access =
        |l: &str| serde_json::from_str::<Json>(l).is_ok_and(|j| j["target"] == "ember::access");
    let text = server.wait_for_access_lines(3, is_access);
    let lines: Vec<Json> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let access = |id: &str| {
        lines
            .iter()
            .find(|j| j["target"] == "ember::access" && j["request_id"] == id)
            .unwrap_or_else(|| panic!("an access line for {id} in:\n{text}"))
            .clone()
    };
    let ok = access("client-ok-1");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["completion_tokens"], 4);
    assert_eq!(ok["finish"], "length");
    assert!(ok["prompt_tokens"].as_u64().is_some_and(|n| n > 0), "{ok}");
    assert!(ok["ttft_ms"].as_f64().is_some() && ok["duration_ms"].as_f64().is_some());
    assert_eq!(access(&bad_id)["status"], 400);
    assert_eq!(access("client-gone-2")["finish"], "abort");
    // --log-requests: the prompt, under the same request id.
    assert!(
        lines.iter().any(|j| j["target"] == "ember::requests"
            && j["request_id"] == "client-ok-1"
            && j["prompt"].as_str().is_some_and(|p| p.contains(SECRET))),
        "the prompt logged with --log-requests:\n{text}"
    );
    // Everything was JSON (the parse above) and carried no colour codes.
    assert!(!text.contains('\u{1b}'));
}
