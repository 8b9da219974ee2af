//! What several of lora-lm's test files share.

use lora_lm::LlamaConfig;

/// A tiny byte-level Llama (hidden 24, 2 layers, 4 query heads on 2 K/V heads, context 32): fast enough to
/// train for dozens of steps in a test.
pub fn tiny() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 24,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 6,
        max_position_embeddings: 32,
        ..LlamaConfig::byte_default()
    }
}
