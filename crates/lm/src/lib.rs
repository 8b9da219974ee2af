//! lora-rs language models: a Llama-architecture decoder whose projections are [`lora::LoraLinear`]
//! layers, so LoRA adapters train, switch, merge and load exactly as in `lora`'s other models.
//!
//! ```text
//! config.json + model.safetensors ──► hf::load_model ──► Llama { embedding, norms, LoraModel of projections }
//!                                                          │
//!   data::read_corpus (JSONL/text) ──► TokenStream ──► train::Trainer (AdamW, warm-up + cosine, clipping)
//!                                  └─► eval_windows ──► eval::score (nats/token, bits/byte)
//!   prompts ──► tokenizer ──► generate::generate (KV cache, greedy / temperature / top-k / top-p)
//! ```
//!
//! Files are Hugging Face's: a model directory loads with transformers' `LlamaForCausalLM`, adapters
//! with PEFT's `PeftModel` (module names as transformers names them).
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod chat;
mod config;
pub mod data;
mod error;
pub mod eval;
pub mod family;
pub mod fused;
pub mod generate;
pub mod hf;
pub mod instruct;
pub mod jobs;
pub mod mixed;
mod model;
pub mod ops;
mod rope_cache;
pub mod rope_scaling;
/// The optimizer, schedule and checkpoint file every lora-rs trainer shares (re-exported).
pub use lora_optim as optim;
mod tokenizer;
pub mod train;

pub use config::{LlamaConfig, ModelConfig, TokenizerKind};
pub use error::{LmError, Result};
pub use family::{Activation, Family, LayerType, FAMILIES};
pub use model::{expected_shapes, module_name, KvCache, Llama, EMBED, LM_HEAD, PROJECTIONS};
pub use rope_scaling::RopeScaling;
pub use tokenizer::{Span, StreamDecoder, Tokenizer};
