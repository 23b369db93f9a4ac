//! Statistics of a load run, defined as `vllm bench serve` defines them: TTFT (request sent to
//! first token), TPOT per request ((E2E - TTFT) / (output tokens - 1)), ITL (every gap between
//! consecutive token-carrying chunks), E2E latency; mean and percentiles with linear
//! interpolation (numpy's default); goodput = requests per second meeting every latency target.

use serde::Serialize;

/// What one request measured, in seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestRecord {
    pub ok: bool,
    /// The client hung up on purpose (`--cancel-fraction`): neither ok nor failed.
    pub cancelled: bool,
    pub error: Option<String>,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub ttft: f64,
    /// Gaps between consecutive chunks that carried output.
    pub itl: Vec<f64>,
    pub e2e: f64,
}

impl RequestRecord {
    /// Time per output token after the first; None with fewer than two tokens.
    pub fn tpot(&self) -> Option<f64> {
        (self.output_tokens > 1).then(|| (self.e2e - self.ttft) / (self.output_tokens - 1) as f64)
    }
}

/// The q-th percentile (0..=100) of sorted values, interpolating linearly between ranks.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let rank = q.clamp(0.0, 100.0) / 100.0 * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

/// Mean and percentiles, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Distribution {
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

impl Distribution {
    /// From values in seconds.
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut sorted: Vec<f64> = values.iter().map(|v| v * 1000.0).collect();
        sorted.sort_by(f64::total_cmp);
        Self {
            mean_ms: sorted.iter().sum::<f64>() / sorted.len() as f64,
            p50_ms: percentile(&sorted, 50.0),
            p90_ms: percentile(&sorted, 90.0),
            p99_ms: percentile(&sorted, 99.0),
        }
    }
}

/// Latency targets for goodput, in milliseconds; a request is good when it meets every one set.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2el_ms: Option<f64>,
}

impl Slo {
    pub fn is_set(&self) -> bool {
        self.ttft_ms.is_some() || self.tpot_ms.is_some() || self.e2el_ms.is_some()
    }

    /// Parses "ttft:500,tpot:50,e2el:2000" (milliseconds).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut slo = Self::default();
        for part in text.split(',').filter(|p| !p.trim().is_empty()) {
            let (key, value) = part
                .split_once(':')
                .ok_or_else(|| format!("goodput target {part:?} is not name:milliseconds"))?;
            let ms: f64 = value
                .trim()
                .parse()
                .map_err(|_| format!("goodput target {part:?}: {value:?} is not a number"))?;
            match key.trim() {
                "ttft" => slo.ttft_ms = Some(ms),
                "tpot" => slo.tpot_ms = Some(ms),
                "e2el" => slo.e2el_ms = Some(ms),
                other => {
                    return Err(format!(
                        "unknown goodput target {other:?} (ttft, tpot, e2el)"
                    ))
                }
            }
        }
        Ok(slo)
    }

    fn met_by(&self, r: &RequestRecord) -> bool {
        let within = |limit: Option<f64>, secs: Option<f64>| match (limit, secs) {
            (Some(ms), Some(s)) => s * 1000.0 <= ms,
            _ => true,
        };
        r.ok && within(self.ttft_ms, Some(r.ttft))
            && within(self.tpot_ms, r.tpot())
            && within(self.e2el_ms, Some(r.e2e))
    }
}

/// The summary of one run (one concurrency or request rate).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub completed: usize,
    pub failed: usize,
    pub cancelled: usize,
    pub duration_s: f64,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub input_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    /// Requests per second meeting every latency target (None without targets).
    pub goodput: Option<f64>,
    pub ttft: Distribution,
    pub tpot: Distribution,
    pub itl: Distribution,
    pub e2el: Distribution,
}

impl Summary {
    pub fn of(records: &[RequestRecord], duration_s: f64, slo: &Slo) -> Self {
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok).collect();
        let duration = duration_s.max(1e-9);
        let input: usize = ok.iter().map(|r| r.prompt_tokens).sum();
        let output: usize = ok.iter().map(|r| r.output_tokens).sum();
        let ttfts: Vec<f64> = ok.iter().map(|r| r.ttft).collect();
        let tpots: Vec<f64> = ok.iter().filter_map(|r| r.tpot()).collect();
        let itls: Vec<f64> = ok.iter().flat_map(|r| r.itl.iter().copied()).collect();
        let e2es: Vec<f64> = ok.iter().map(|r| r.e2e).collect();
        Self {
            completed: ok.len(),
            failed: records.iter().filter(|r| !r.ok && !r.cancelled).count(),
            cancelled: records.iter().filter(|r| r.cancelled).count(),
            duration_s,
            total_input_tokens: input,
            total_output_tokens: output,
            request_throughput: ok.len() as f64 / duration,
            input_throughput: input as f64 / duration,
            output_throughput: output as f64 / duration,
            total_token_throughput: (input + output) as f64 / duration,
            goodput: slo
                .is_set()
                .then(|| ok.iter().filter(|r| slo.met_by(r)).count() as f64 / duration),
            ttft: Distribution::of(&ttfts),
            tpot: Distribution::of(&tpots),
            itl: Distribution::of(&itls),
            e2el: Distribution::of(&e2es),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        // numpy.percentile([1, 2, 3, 4], [50, 90, 99]) = [2.5, 3.7, 3.97]
        let v = [1.0, 2.0, 3.0, 4.0];
        assert!(close(percentile(&v, 50.0), 2.5));
        assert!(close(percentile(&v, 90.0), 3.7));
        assert!(close(percentile(&v, 99.0), 3.97));
        assert!(close(percentile(&v, 0.0), 1.0));
        assert!(close(percentile(&v, 100.0), 4.0));
        assert!(close(percentile(&[7.0], 99.0), 7.0));
        assert!(close(percentile(&[], 50.0), 0.0));
        // numpy.percentile(range(1, 101), 99) = 99.01
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!(close(percentile(&hundred, 99.0), 99.01));
        assert!(close(percentile(&hundred, 90.0), 90.1));
    }

    fn record(ttft: f64, e2e: f64, output_tokens: usize, itl: &[f64]) -> RequestRecord {
        RequestRecord {
            ok: true,
            prompt_tokens: 10,
            output_tokens,
            ttft,
            e2e,
            itl: itl.to_vec(),
            error: None,
            cancelled: false,
        }
    }

    #[test]
    fn summary_of_known_requests() {
        let records = vec![
            // TPOT (1.1 - 0.1) / 4 = 0.25
            record(0.1, 1.1, 5, &[0.2, 0.3, 0.2, 0.3]),
            // TPOT (0.5 - 0.3) / 1 = 0.2
            record(0.3, 0.5, 2, &[0.2]),
            // one token: no TPOT
            record(0.2, 0.2, 1, &[]),
            RequestRecord {
                ok: false,
                error: Some("HTTP 500".into()),
                ..RequestRecord::default()
            },
        ];
        let s = Summary::of(&records, 2.0, &Slo::default());
        assert_eq!((s.completed, s.failed), (3, 1));
        assert_eq!(s.total_input_tokens, 30);
        assert_eq!(s.total_output_tokens, 8);
        assert!(close(s.request_throughput, 1.5));
        assert!(close(s.output_throughput, 4.0));
        assert!(close(s.total_token_throughput, 19.0));
        assert!(close(s.ttft.mean_ms, 200.0));
        assert!(close(s.ttft.p50_ms, 200.0));
        assert!(close(s.tpot.mean_ms, 225.0));
        // ITL over all gaps: [0.2, 0.2, 0.2, 0.3, 0.3] -> mean 240 ms, median 200 ms
        assert!(close(s.itl.mean_ms, 240.0));
        assert!(close(s.itl.p50_ms, 200.0));
        assert!(close(s.e2el.p90_ms, 980.0)); // sorted [200, 500, 1100]: rank 1.8
        assert_eq!(s.goodput, None);
    }

    #[test]
    fn goodput_counts_requests_meeting_every_target() {
        let records = vec![
            record(0.1, 1.1, 5, &[]), // TPOT 250 ms
            record(0.3, 0.5, 2, &[]), // TPOT 200 ms
            record(0.2, 0.2, 1, &[]), // no TPOT: only TTFT and E2E apply
        ];
        let slo = Slo::parse("ttft:250,tpot:220").unwrap();
        // The first fails TPOT, the second fails TTFT, the third passes.
        let s = Summary::of(&records, 2.0, &slo);
        assert!(close(s.goodput.unwrap(), 0.5));
        let slo = Slo::parse("e2el:600").unwrap();
        assert!(close(
            Summary::of(&records, 1.0, &slo).goodput.unwrap(),
            2.0
        ));
        assert!(Slo::parse("ttft=5").is_err());
        assert!(Slo::parse("latency:5").is_err());
    }
}
