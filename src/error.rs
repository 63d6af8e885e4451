//! Library error type. Every variant that concerns user input names the file involved so the CLI
//! can print one clear line.

use std::path::PathBuf;

/// Errors raised by the distillery library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {msg}")]
    Io { path: PathBuf, msg: String },

    #[error("{path}: not a model folder or hub id: {msg}")]
    ModelNotFound { path: PathBuf, msg: String },

    #[error("{path}: invalid config: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error("{path}: unsupported model_type {model_type:?} (supported: {supported})")]
    UnsupportedModel {
        path: PathBuf,
        model_type: String,
        supported: String,
    },

    #[error("{path}: cannot read safetensors: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    #[error("{path}: missing tensor {name:?}")]
    MissingTensor { path: PathBuf, name: String },

    #[error("{path}: tensor {name:?} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error("{path}: cannot read image: {msg}")]
    Image { path: PathBuf, msg: String },

    #[error("{path}: {msg}")]
    BadInput { path: PathBuf, msg: String },

    #[error("hub: {0}")]
    Hub(String),

    #[error("invalid argument: {0}")]
    Invalid(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        Error::Io {
            path: path.into(),
            msg: e.to_string(),
        }
    }
}
