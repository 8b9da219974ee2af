//! The CPU kernels of lora-rs, behind a narrow safe interface: f32 matrix products on strided views and a
//! LoRA linear layer's forward and backward built on them. Knows nothing of tensors, autograd or files.
//!
//! ```text
//! matmul_into:     C (m×n) = [C +] β·A·B          A: MatRef (m×k), B: MatRef (k×n), any strides
//! linear_forward:  y = act(x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ)
//! linear_backward: dx, dW, db, dA, dB — only those asked for
//! add_delta:       y_i += s·(x_i·Aᵀ)·Bᵀ, row by row (a mixed batch's groups)
//! matmul_bf16_into: C = [C +] β·A·Wᵀ with W held in bf16 (Bf16Matrix), the bits of the f32 product
//! read_bandwidth:   bytes/s the machine reads now (the ceiling of a decode step)
//! ```
//!
//! Products with one small dimension (a batch) run on our own kernels (`sgemm`: one source on `pulp`,
//! compiled for AVX-512, AVX2 + FMA and NEON, chosen at run time and capped by `LORA_KERNELS`), the rest on
//! the `gemm` crate. The crate's `unsafe` code is in the SIMD kernels (`sgemm`, `delta` and the helpers in
//! `isa`) plus the one call into the `gemm` crate's raw-pointer API (`matmul`), each block with its safety
//! argument beside it (`unsafe_op_in_unsafe_fn` is denied, so an `unsafe fn`'s body states its own): views
//! and slices are checked on construction or entry (sizes in checked arithmetic, so a stride-0 view with a
//! huge row count cannot wrap a length), and the kernels can only be reached with a run-time proof that the
//! CPU has their instructions, so no safe call can read or write out of bounds or run an instruction the
//! CPU lacks.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod bandwidth;
mod bf16;
mod delta;
mod error;
mod isa;
mod level;
mod linear;
mod mat;
mod matmul;
mod sgemm;
pub mod vector;

pub use bandwidth::read_bandwidth;
pub use bf16::Bf16Matrix;
pub use delta::{add_delta, DeltaRef};
pub use error::{Result, ShapeError};
pub use level::{simd, Simd};
pub use linear::{linear_backward, linear_forward, output_grad, Activation, AdapterRef, LinearGrads, LinearRef, WeightRef};
pub use mat::MatRef;
pub use matmul::{matmul_bf16_into, matmul_bf16_plain_into, matmul_into, serial, threads};
