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
//! nothing of MNIST, command lines or servers. It does three jobs, each behind its own module boundary:
//!
//! - the LoRA math, at the top: one layer ([`LoraLinear`], `linear/`: the adapter, its copies of the
//!   layer, initialisation, merge, the fused and reference forwards), named layers managed together
//!   ([`LoraModel`]), the configuration ([`LoraConfig`]), combinations of adapters ([`Combination`]) and
//!   exact restores ([`BaseSnapshot`]);
//! - PEFT interop ([`peft`]): adapter directories both ways and PEFT's module-matching rules;
//! - serving ([`serving`]): adapters and the base packed for mixed-adapter batches.
//!
//! Beside them: [`bridge`] (candle tensors seen as the kernels' views, for every fused op of the
//! workspace), [`io`] (files) and the errors ([`LoraError`]). Every public item is also re-exported here,
//! flat.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod bridge;
mod combine;
mod config;
mod decompose;
mod error;
pub mod io;
mod linear;
mod model;
pub mod peft;
pub mod serving;
mod snapshot;

/// The PEFT adapter files' items at their former path (`lora::peft` holds them).
pub mod adapter {
    pub use crate::peft::files::*;
    pub use crate::peft::{parse_peft_config, peft_config_json, LoadOptions, SaveOptions};
}
pub use peft::matching;

pub use bridge::Held;
pub use combine::{Combination, CombineOptions, MajoritySign};
pub use config::{Bias, Init, LoraConfig, Scaling};
pub use error::{LoraError, Result};
pub use linear::{Adapter, AdapterSpec, Backend, LoraLinear};
/// The kernels the fused path runs on (re-exported: their activation and instruction-set level are part of
/// this crate's API).
pub use lora_kernels::{simd, Activation, Simd};
pub use model::LoraModel;
pub use peft::matching::{Exclude, Pattern, Targets};
pub use peft::{adapter_from_bytes, read_adapter, AdapterFiles, LoadOptions, SaveOptions};
pub use serving::{PackedAdapter, RowGroup};
pub use snapshot::BaseSnapshot;
