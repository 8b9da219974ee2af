//! Errors of the training crate.

/// Result with [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;

/// What can go wrong while building, training or evaluating a model.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// From the LoRA layers.
    #[error(transparent)]
    Lora(#[from] lora::LoraError),
    /// An optimizer step or checkpoint file failed.
    #[error(transparent)]
    Optim(#[from] lora_optim::OptimError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A setting is out of range; names the setting and value.
    #[error("invalid setting {name} = {value}: {why}")]
    Setting {
        /// Setting name, e.g. `batch_size`.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it is refused.
        why: String,
    },
    /// The loss became NaN or infinite.
    #[error("training diverged at step {step}: loss is {loss}")]
    Diverged {
        /// The global step (1-based).
        step: usize,
        /// The loss value.
        loss: f32,
    },
    /// A model file is unusable.
    #[error("{path}: {why}")]
    Model {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

impl TrainError {
    pub(crate) fn setting(name: &'static str, value: impl std::fmt::Display, why: &str) -> Self {
        TrainError::Setting { name, value: value.to_string(), why: why.to_string() }
    }
}
