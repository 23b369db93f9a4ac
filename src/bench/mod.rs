//! Benchmarks: `ember bench offline` (the engine without HTTP) and `ember bench serve` (a load
//! generator for any OpenAI-compatible server).

pub mod dataset;
pub mod memory;
pub mod offline;
pub mod plot;
pub mod serve;
pub mod stats;
pub mod sweep;

pub use offline::{run_latency, run_offline, LatencyResult, OfflineResult};
