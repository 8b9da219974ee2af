//! The crate's error type: every variant names the setting, tensor or file at fault.

/// Result with [`OptimError`].
pub type Result<T> = std::result::Result<T, OptimError>;

/// What can go wrong in an optimizer step or with a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written, or its content is unusable.
    #[error(transparent)]
    File(#[from] lora::io::FileError),
    /// A setting, parameter or value that cannot be used.
    #[error("{field} = {value}: {why}")]
    Invalid {
        /// The setting or parameter, e.g. `lr` or a tensor's name.
        field: String,
        /// The value given.
        value: String,
        /// Why it is refused.
        why: String,
    },
}

impl OptimError {
    /// An [`OptimError::Invalid`] naming a setting and its value.
    pub fn invalid(field: impl Into<String>, value: impl std::fmt::Display, why: impl Into<String>) -> Self {
        OptimError::Invalid { field: field.into(), value: value.to_string(), why: why.into() }
    }
    /// An [`OptimError::File`] saying what is wrong with `path`.
    pub fn file(path: &std::path::Path, why: impl Into<String>) -> Self {
        OptimError::File(lora::io::FileError::invalid(path, why))
    }
}
