//! The model layer's error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("missing file {path}: {reason}")]
    MissingFile { path: PathBuf, reason: String },
    #[error("could not read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not parse {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("GGUF: {0}")]
    Gguf(String),
    #[error("Hugging Face Hub: {0}")]
    Hub(String),
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
