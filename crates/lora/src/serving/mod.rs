//! Mixed-adapter batches: rows that name different adapters share one base product (Punica's BGMV idea).
//!
//! For rows x_i (n, in), each with its own adapter a(i) or none, a layer computes
//!
//! ```text
//! y_i = act(x_i·W0ᵀ + b + s_a(i) · (x_i·A_a(i)ᵀ)·B_a(i)ᵀ)
//! ```
//!
//! The base product `X·W0ᵀ` runs once for the whole batch (`lora_kernels::matmul_into`); then each
//! group of rows gets the delta of its adapter, r·(in + out) multiply-adds per row (a few percent of the
//! row's base product) in one call (`lora_kernels::add_delta`). A [`PackedAdapter`] stores A as (r, in) and
//! B transposed, (r, out), so the delta reads contiguous rows, and computes each row alone: a row's
//! delta is the same whatever else is in the batch. The base product's kernel is chosen by shape,
//! including the batch's size, so a row's output in a batch differs from its output alone by f32
//! rounding only.
//!
//! ```text
//! AdapterFiles ── LoraModel::pack_adapter ──► PackedAdapter (packed_adapter.rs)  one per adapter, Arc-shared
//! x, [RowGroup] ─ LoraModel::forward_mixed ─► y             (batch.rs)           one layer of a mixed batch
//! ```
//!
//! The serving job: the LoRA math's layers read here, never changed; the adapters come from the PEFT job's
//! [`crate::AdapterFiles`].

mod batch;
mod packed_adapter;
#[cfg(test)]
mod testing;

pub use batch::RowGroup;
pub use packed_adapter::PackedAdapter;
