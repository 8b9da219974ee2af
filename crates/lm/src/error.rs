//! The crate's error type: every variant names the file, key, tensor or value at fault.

use std::path::{Path, PathBuf};

/// Result with [`LmError`].
pub type Result<T> = std::result::Result<T, LmError>;

/// What can go wrong with a language model, its files, data or generation.
#[derive(Debug, thiserror::Error)]
pub enum LmError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A LoRA layer, adapter or adapter file operation failed.
    #[error(transparent)]
    Lora(#[from] lora::LoraError),
    /// An optimizer step or checkpoint failed.
    #[error(transparent)]
    Optim(#[from] lora_optim::OptimError),
    /// A file could not be read or written, or its content is unusable.
    #[error(transparent)]
    File(#[from] lora::io::FileError),
    /// A setting or argument holds a value that cannot be used.
    #[error("{field} = {value}: {why}")]
    Invalid {
        /// The setting, e.g. `temperature` or `batch_size`.
        field: String,
        /// The value given.
        value: String,
        /// Why it is refused.
        why: String,
    },
}

impl LmError {
    /// An [`LmError::File`] saying what is wrong with `path`.
    pub fn file(path: &Path, why: impl Into<String>) -> Self {
        LmError::File(lora::io::FileError::invalid(path, why))
    }
    /// An [`LmError::File`] for an I/O error on `path`.
    pub fn io(path: &Path, error: std::io::Error) -> Self {
        LmError::File(lora::io::FileError::Io { path: PathBuf::from(path), error })
    }
    /// An [`LmError::Invalid`] naming a setting and its value.
    pub fn invalid(field: impl Into<String>, value: impl std::fmt::Display, why: impl Into<String>) -> Self {
        LmError::Invalid { field: field.into(), value: value.to_string(), why: why.into() }
    }
}
