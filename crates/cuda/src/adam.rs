//! `AdamConsts`: the f32 constants of one Adam step as the `adam_step` kernel takes them, computed as
//! lora-optim's `AdamStep` computes them (in f64, then cast), so the GPU step gives lora-optim's bits.

/// lora-optim's [`lora_optim::AdamStep`]: the kernel takes exactly its constants (one definition).
pub use lora_optim::AdamStep as AdamConsts;
