//! Ember: an inference server for the Qwen model family.

pub mod bench;
pub mod cli;
pub mod device;
pub mod engine;
pub mod generate;
pub mod template;
