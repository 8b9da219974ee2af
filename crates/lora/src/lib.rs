//! lora-rs core: LoRA layers, named adapters and their files, on candle.
//!
//! A LoRA layer keeps a frozen base linear `y = x·W0ᵀ + b` (W0: (out, in)) and adds, for each active
//! adapter, a rank-r update computed in factorised form:
//!
//! ```text
//! y = x·W0ᵀ + b + s · (dropout(x)·Aᵀ)·Bᵀ,   A: (r, in), B: (out, r),   s = alpha / r  (or alpha / √r, rsLoRA)
//! ```
//!
//! so that the effective weight is `W0 + s·B·A` without ever forming it during training. This crate knows
//! nothing of MNIST, command lines or servers: it holds layers ([`LoraLinear`]), a set of named layers that
//! share adapter names ([`LoraModel`]), configuration ([`LoraConfig`]) and the errors ([`LoraError`]).
#![deny(missing_docs)]

pub mod adapter;
mod combine;
mod config;
mod decompose;
mod error;
mod fused;
pub mod io;
mod linear;
pub mod matching;
mod merge;
mod mixed;
mod model;
mod peft_config;

pub use adapter::{adapter_from_bytes, read_adapter, AdapterFiles, LoadOptions, SaveOptions};
pub use combine::MajoritySign;
pub use config::{Bias, Init, LoraConfig, Scaling};
pub use error::{LoraError, Result};
pub use fused::Held;
pub use linear::{Adapter, AdapterSpec, Backend, LoraLinear};
/// The kernels the fused path runs on (re-exported: their activation and instruction-set level are part of
/// this crate's API).
pub use lora_kernels::{simd, Activation, Simd};
pub use matching::{Exclude, Pattern, Targets};
pub use merge::{BaseSnapshot, Combination, CombineOptions};
pub use mixed::{PackedAdapter, PackedBase, RowGroup};
pub use model::LoraModel;
