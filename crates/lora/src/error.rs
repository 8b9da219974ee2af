//! The library's error type: every variant names the adapter, tensor, field or file at fault.

/// Result with [`LoraError`].
pub type Result<T> = std::result::Result<T, LoraError>;

/// What can go wrong in lora-rs.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A kernel was handed operands that do not fit (a bug of the caller, named by shapes).
    #[error(transparent)]
    Kernel(#[from] lora_kernels::ShapeError),
    /// A configuration field holds a value that cannot be used.
    #[error("invalid config: {field} = {value}: {why}")]
    Config {
        /// The field, e.g. `r` or `rank_pattern.linear3`.
        field: String,
        /// The offending value, as written.
        value: String,
        /// Why it is refused.
        why: String,
    },
    /// No adapter of that name is loaded.
    #[error("no adapter named {0:?} (loaded: {1})")]
    UnknownAdapter(String, String),
    /// An adapter of that name is already loaded.
    #[error("an adapter named {0:?} is already loaded")]
    DuplicateAdapter(String),
    /// A module named in a config or file does not exist in the model.
    #[error("unknown module {module:?} (the model has: {known})")]
    UnknownModule {
        /// The name asked for.
        module: String,
        /// The modules that exist.
        known: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor {tensor}: shape {found:?}, expected {expected:?}")]
    Shape {
        /// The tensor's name.
        tensor: String,
        /// The shape required.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
    /// A tensor holds NaN or infinity where finite values are required.
    #[error("tensor {tensor}: holds a non-finite value (NaN or infinity)")]
    NonFinite {
        /// The tensor's name.
        tensor: String,
    },
    /// A file could not be read or written, or its content is unusable; names the file and field/tensor.
    #[error(transparent)]
    File(#[from] crate::io::FileError),
    /// An adapter was trained on a different base model.
    #[error("{path}: adapter was trained on a different base model (base SHA-256 {expected}, loaded base {found}); loading it anyway must be forced")]
    BaseMismatch {
        /// The adapter file.
        path: String,
        /// The fingerprint recorded in the adapter.
        expected: String,
        /// The fingerprint of the loaded base.
        found: String,
    },
    /// The operation is not possible in the layer's current state.
    #[error("{0}")]
    State(String),
}

impl LoraError {
    pub(crate) fn config(field: impl Into<String>, value: impl std::fmt::Display, why: impl Into<String>) -> Self {
        LoraError::Config { field: field.into(), value: value.to_string(), why: why.into() }
    }
}
