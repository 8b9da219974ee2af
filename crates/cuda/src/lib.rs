//! lora-rs on NVIDIA GPUs: the groundwork of the GPU path.
//!
//! - [`DeviceSpec`] (`cpu`, `cuda`, `cuda:N`) and [`Gpu::open`], which probes the driver, NVRTC, cuBLAS and
//!   cuBLASLt libraries in that order and fails with a [`CudaError`] naming what is missing — never a panic.
//! - The kernels, CUDA C sources in `src/kernels/` ([`sources`]), compiled at run time by NVRTC for the
//!   device's architecture ([`compile`]), and launched through safe, shape-checked functions ([`ops`]) on a
//!   [`Backend`]: the GPU, or (in this crate's tests) the same sources compiled as C++ for the CPU.
//! - [`LtGemm`]: bf16 products in cuBLASLt with f32 accumulation, row-major conventions ([`GemmShape`]).
//! - [`reference`] (f64 CPU references) and [`check`] (every kernel on random inputs against them, the
//!   tolerance of each output stated): run on the CPU emulation by the tests, on the GPU by `lora gpu check`.
//!
//! Precision of the LM path this serves: bf16 base weights and matrix inputs, f32 residual stream, LoRA
//! weights, gradients and Adam moments.
#![deny(missing_docs)]

mod adam;
mod backend;
pub mod check;
pub mod compile;
mod device;
mod error;
mod gemm;
mod gpu;
mod launch;
pub mod ops;
mod probe;
pub mod reference;
pub mod sources;
mod timing;

pub use adam::AdamConsts;
pub use backend::{Backend, DeviceVec, Elem};
pub use device::{DeviceSpec, DeviceSpecError};
pub use error::{CudaError, CudaVersion};
pub use gemm::{check_gemm, plan_gemm, run_call_on_cpu, GemmShape, LtCall, LtGemm, OutType};
pub use gpu::{DeviceInfo, Gpu, LoadedFile, MIN_DRIVER};
pub use launch::{Arg, Launch};
pub use probe::{looked_for, probe_libraries, probe_libraries_with, Library};
pub use timing::{lm_gemm_shapes, time_gemms, time_kernels, GemmTiming, KernelTiming};
