//! Ember: an inference server for the Qwen model family.

pub mod api;
pub mod bench;
pub mod cli;
pub mod device;
pub mod engine;
pub mod generate;
pub mod metrics;
pub mod model;
pub mod parsers;
pub mod server;
pub mod template;
