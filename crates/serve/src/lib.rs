//! lora-serve: one base model in memory, many LoRA adapters chosen per request, over HTTP.
//!
//! ```text
//! TCP ── net (a client that stops reading is dropped) ── routes: auth ─► admission (503 past the limit)
//!   │                                                        │
//!   │        Registry (name → adapter files in DIR; content-keyed, LRU-capped packs; one load per name)
//!   │                                                        │
//!   ├─ /v1/completions, /v1/chat/completions (messages through the chat template)
//!   │                  ─► LmEngine worker: continuous batching, one mixed batch per step
//!   └─ /v1/predict ─────► ClassifierEngine worker: windowed batches of images
//!                          each: base products once per batch, each row's own LoRA delta;
//!                          supervised: a panicking step fails its requests only
//! ```
//!
//! The routes follow the OpenAI shape that vLLM and LoRAX serve (`/v1/completions`, `/v1/chat/completions`, `/v1/models`,
//! `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`), so existing clients work; `/v1/predict` serves
//! classifiers; `/health` and `/metrics` (Prometheus) watch it. The crate knows nothing of command lines
//! or data sets: the `lora serve` command builds [`ServeOptions`] (a classifier's normalisation and sample
//! images included) and calls [`Server::open`] and [`serve`]. The load generator is `lora-loadtest`.
#![deny(missing_docs)]

mod admission;
mod chat;
pub mod classifier;
mod error;
pub mod lm;
pub mod metrics;
mod net;
pub mod registry;
mod routes;
mod server;
pub mod worker;

#[cfg(test)]
mod testing;

pub use classifier::Normalization;
pub use error::{ApiError, Result, ServeError};
pub use net::{serve, Stopped};
pub use registry::{AdapterInfo, Registry};
pub use server::{Access, ClassifierInputs, Limits, ModelKind, ServeOptions, Server, Timeouts};
pub use worker::{WorkerHealth, WorkerState};
