//! Ember: an inference server for the Qwen model family.

pub mod template;
