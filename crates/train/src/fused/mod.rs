//! The fused training path: a parameter store that owns each trainable tensor's gradient buffer and Adam
//! state, fused layers that write their weight gradients straight into that store, a fused cross-entropy,
//! and a fused, multi-threaded, in-place Adam.
//!
//! ```text
//! batch ─► BufferedLinear+ReLU ─► … ─► fused cross-entropy ─► loss.backward()
//!              │ (dW, db into the store's buffers;         │ (LoRA A, B and anything else: candle's
//!              │  candle's autograd never sees them)       │  gradient store)
//!              └──────────────► ParamStore::step: in-place Adam over every parameter's storage
//! ```
//!
//! The reference path (candle's autograd and `candle_nn::AdamW`) stays selectable with
//! [`lora::Backend::Reference`]; the tests hold the two to the same numbers.

mod adam;
mod linear;
mod loss;
mod store;
mod trainer;

pub use linear::BufferedLinear;
pub use lora_optim::{adam_update, AdamConfig, AdamStep, Moments};
pub use loss::cross_entropy;
pub use store::{GradBuffer, OptimState, ParamStore, UpdateInBackward};
pub use trainer::Trainer;

/// A kernel's result as candle's (the custom ops answer in candle's errors).
fn k<T>(r: lora_kernels::Result<T>) -> candle_core::Result<T> {
    r.map_err(candle_core::Error::wrap)
}
