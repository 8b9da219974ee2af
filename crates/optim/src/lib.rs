//! What every lora-rs training loop shares, so that each idea exists once: the optimizer (Adam and AdamW
//! as one in-place kernel, LoRA+ groups, global gradient-norm clipping), the learning-rate schedule, and
//! the checkpoint file that lets any run stop and resume bit for bit; and the loss they minimise, the mean
//! cross-entropy of logits against targets ([`cross_entropy`]).
//!
//! ```text
//! m ← β₁m + (1−β₁)g,   v ← β₂v + (1−β₂)g²,   θ ← θ·(1 − lr·λ) − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)
//! ```
//!
//! (`candle_nn::AdamW`'s f32 operations in its order; λ = 0 is exactly Adam.) `lora-train` (the MNIST
//! network, whose fused layers apply Adam during the backward pass) and `lora-lm` (the language models)
//! both step through [`adam_update`].
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod adam;
mod adamw;
pub mod checkpoint;
pub mod cross_entropy;
mod error;
mod schedule;

pub use adam::{adam_update, adam_update_serial, AdamConfig, AdamOp, AdamStep, Moments};
pub use adamw::{AdamW, Reduced};
pub use cross_entropy::{cross_entropy, cross_entropy_over, IGNORE};
pub use error::{OptimError, Result};
pub use schedule::Schedule;
