//! lora-serve: one base model in memory, many LoRA adapters chosen per request, over HTTP.
//!
//! ```text
//! HTTP (axum) ── routes ──► Registry (name → adapter files in DIR; content-keyed, LRU-capped packs)
//!                   │
//!                   ├─ /v1/completions ─► LmEngine worker: continuous batching, one mixed batch per step
//!                   └─ /v1/predict ─────► ClassifierEngine worker: windowed batches of images
//!                                          each: base products once per batch, each row's own LoRA delta
//! ```
//!
//! The routes follow the OpenAI shape that vLLM and LoRAX serve (`/v1/completions`, `/v1/models`,
//! `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`), so existing clients work; `/v1/predict` serves
//! classifiers; `/health` and `/metrics` (Prometheus) watch it. [`loadtest`] drives a server from many
//! clients. The crate knows nothing of command lines: the `lora serve` and `lora loadtest` commands
//! call [`Server::open`], [`serve`] and [`loadtest::run`].
#![deny(missing_docs)]

pub mod classifier;
mod error;
pub mod lm;
pub mod loadtest;
pub mod metrics;
pub mod registry;
mod routes;
mod server;

pub use error::{ApiError, Result, ServeError};
pub use registry::{AdapterInfo, Registry};
pub use server::{serve, Limits, ModelKind, ServeOptions, Server};
