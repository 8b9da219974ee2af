//! The PEFT interop job: lora-rs adapters as Hugging Face PEFT files, both ways, and PEFT's rules for which
//! modules an adapter adapts.
//!
//! ```text
//! adapter dir ── read_adapter ──► AdapterFiles ── LoraModel::insert_adapter_files ──► adapter in the model
//!   adapter_config.json   (config.rs: parse_peft_config / peft_config_json)     (load.rs: checks, fingerprint)
//!   adapter_model.safetensors (files.rs: tensor names, ranks, dtypes)
//! adapter in the model ── LoraModel::save_adapter (save.rs) ──► adapter dir PEFT loads
//! module names ── matching.rs: Targets, Exclude, layer indexes, Pattern (rank/alpha per module)
//! ```
//!
//! The LoRA math knows nothing of these files; the serving job reads them through [`AdapterFiles`].

pub mod config;
pub mod files;
mod load;
pub mod matching;
mod save;
#[cfg(test)]
mod testing;

pub use config::{parse_peft_config, peft_config_json};
pub use files::{adapter_from_bytes, read_adapter, AdapterFiles, CONFIG_FILE, META_BASE_SHA256, PEFT_PREFIX, WEIGHTS_FILE};
pub use load::LoadOptions;
pub use save::SaveOptions;
