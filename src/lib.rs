//! Ember: an inference server for the Qwen model family.

pub mod cli;
pub mod device;
pub mod generate;
pub mod sampling;
pub mod template;
