//! Every kernel, compiled as C++ for the CPU (lora-cuda-emu: blocks run one after another, each block's
//! threads as real threads with real barriers, shared memory and warp shuffles), run through the same safe
//! `ops` functions and the same `check` cases as `lora gpu check` runs on the GPU, against the f64
//! references with the tolerances `check` states. What this cannot show: the GPU's own math library
//! (expf, logf within 2 ulp there, 1 here), its scheduling, and speed.

use std::ffi::c_void;

use lora_cuda::check::{Comparison, KernelCheck};
use lora_cuda::{Backend, CudaError, Launch};

/// Host memory as a backend; launches go to the emulation.
struct Emu;

// SAFETY: a buffer is a boxed slice of u64 (8-byte aligned) whose address is valid for its length while
// it lives; `launch` passes the arguments as given to the emulation, which runs the named kernel on them.
unsafe impl Backend for Emu {
    type Buffer = Box<[u64]>;
    fn name(&self) -> String {
        "cpu emulation".into()
    }
    fn alloc_zeroed(&self, bytes: usize) -> Result<Box<[u64]>, CudaError> {
        Ok(vec![0u64; bytes.div_ceil(8).max(1)].into_boxed_slice())
    }
    fn upload(&self, bytes: &[u8]) -> Result<Box<[u64]>, CudaError> {
        let mut b = self.alloc_zeroed(bytes.len())?;
        bytemuck_copy(&mut b, bytes);
        Ok(b)
    }
    fn download(&self, buffer: &Box<[u64]>, out: &mut [u8]) -> Result<(), CudaError> {
        let src: Vec<u8> = buffer.iter().flat_map(|w| w.to_ne_bytes()).collect();
        if out.len() > src.len() {
            return Err(CudaError::Backend(format!("{} bytes asked of {}", out.len(), src.len())));
        }
        out.copy_from_slice(&src[..out.len()]);
        Ok(())
    }
    fn address(&self, buffer: &Box<[u64]>) -> u64 {
        buffer.as_ptr() as u64
    }
    fn byte_len(&self, buffer: &Box<[u64]>) -> usize {
        buffer.len() * 8
    }
    unsafe fn launch(&self, launch: &mut Launch) -> Result<(), CudaError> {
        let mut params: Vec<*mut c_void> = launch.params();
        // SAFETY: the caller's contract: pointer arguments address live buffers of this backend that are
        // large enough; params holds one pointer per kernel argument (built by lora-cuda's ops).
        unsafe { lora_cuda_emu::launch(launch.kernel, launch.grid, launch.block, &mut params) }
            .map_err(|e| CudaError::Backend(e.to_string()))
    }
    fn synchronize(&self) -> Result<(), CudaError> {
        Ok(())
    }
}

fn bytemuck_copy(dst: &mut [u64], src: &[u8]) {
    for (i, chunk) in src.chunks(8).enumerate() {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        dst[i] = u64::from_ne_bytes(w);
    }
}

/// Runs one check on the emulation, prints its comparisons, and fails on any that did not pass. Says by
/// name that it skipped where the emulation is not built (a cross build).
fn run(test: &str, check: KernelCheck) {
    if !lora_cuda_emu::AVAILABLE {
        eprintln!("skipped {test}: the CPU emulation of the CUDA kernels is not built for this target");
        return;
    }
    let comparisons: Vec<Comparison> = check.run(&Emu, 42).unwrap_or_else(|e| panic!("{}: {e}", check.name()));
    for c in &comparisons {
        println!("{c}");
    }
    assert!(!comparisons.is_empty());
    let failed: Vec<_> = comparisons.iter().filter(|c| !c.passed).collect();
    assert!(failed.is_empty(), "{} failed: {failed:#?}", check.name());
}

#[test]
fn bf16_casts_round_to_nearest_even_and_back_exactly_on_the_cpu_emulation() {
    run("bf16_casts_round_to_nearest_even_and_back_exactly_on_the_cpu_emulation", KernelCheck::Cast);
}

#[test]
fn the_embedding_gathers_rows_exactly_and_an_id_past_the_vocabulary_gives_nan_on_the_cpu_emulation() {
    run("the_embedding_gathers_rows_exactly_and_an_id_past_the_vocabulary_gives_nan_on_the_cpu_emulation", KernelCheck::Embedding);
}

#[test]
fn rmsnorm_forward_and_backward_match_the_f64_reference_on_the_cpu_emulation() {
    run("rmsnorm_forward_and_backward_match_the_f64_reference_on_the_cpu_emulation", KernelCheck::RmsNorm);
}

#[test]
fn rope_forward_backward_and_their_composition_match_the_reference_on_the_cpu_emulation() {
    run("rope_forward_backward_and_their_composition_match_the_reference_on_the_cpu_emulation", KernelCheck::Rope);
}

#[test]
fn swiglu_forward_and_backward_match_the_f64_reference_on_the_cpu_emulation() {
    run("swiglu_forward_and_backward_match_the_f64_reference_on_the_cpu_emulation", KernelCheck::SwiGlu);
}

#[test]
fn causal_gqa_attention_head_dim_32_forward_and_backward_match_the_f64_reference_on_the_cpu_emulation() {
    run("causal_gqa_attention_head_dim_32_forward_and_backward_match_the_f64_reference_on_the_cpu_emulation", KernelCheck::Attention32);
}

#[test]
fn causal_gqa_attention_head_dim_64_forward_and_backward_match_the_f64_reference_on_the_cpu_emulation() {
    run("causal_gqa_attention_head_dim_64_forward_and_backward_match_the_f64_reference_on_the_cpu_emulation", KernelCheck::Attention64);
}

#[test]
fn causal_gqa_attention_head_dim_128_forward_and_backward_match_the_f64_reference_on_the_cpu_emulation() {
    run("causal_gqa_attention_head_dim_128_forward_and_backward_match_the_f64_reference_on_the_cpu_emulation", KernelCheck::Attention128);
}

#[test]
fn cross_entropy_loss_and_gradient_with_ignored_and_bad_targets_match_the_reference_on_the_cpu_emulation() {
    run("cross_entropy_loss_and_gradient_with_ignored_and_bad_targets_match_the_reference_on_the_cpu_emulation", KernelCheck::CrossEntropy);
}

#[test]
fn adam_gives_lora_optims_bits_on_the_cpu_emulation() {
    run("adam_gives_lora_optims_bits_on_the_cpu_emulation", KernelCheck::Adam);
}

#[test]
fn lora_shrink_and_expand_over_a_mixed_batch_of_ranks_match_the_reference_on_the_cpu_emulation() {
    run("lora_shrink_and_expand_over_a_mixed_batch_of_ranks_match_the_reference_on_the_cpu_emulation", KernelCheck::Lora);
}

#[test]
fn every_check_is_a_test_here_and_every_kernel_is_in_the_emulation() {
    // The tests above cover KernelCheck::ALL (a new check needs its test).
    assert_eq!(KernelCheck::ALL.len(), 11);
    if !lora_cuda_emu::AVAILABLE {
        eprintln!(
            "skipped every_check_is_a_test_here_and_every_kernel_is_in_the_emulation: the CPU emulation is not built for this target"
        );
        return;
    }
    let mut emu = lora_cuda_emu::kernel_names();
    emu.sort();
    let mut ours: Vec<String> = lora_cuda::sources::all_entries().map(String::from).collect();
    ours.sort();
    assert_eq!(emu, ours);
}

#[test]
fn a_buffer_shorter_than_the_shape_is_an_error_naming_the_buffer_not_a_launch() {
    use lora_cuda::{ops, DeviceVec};
    let x = DeviceVec::<Emu, f32>::upload(&Emu, &[0.0; 10]).unwrap();
    let w = DeviceVec::<Emu, u16>::upload(&Emu, &[0; 5]).unwrap();
    let mut y = DeviceVec::<Emu, u16>::zeros(&Emu, 10).unwrap();
    let mut rstd = DeviceVec::<Emu, f32>::zeros(&Emu, 1).unwrap(); // 2 rows need 2
    let e = ops::rmsnorm_fwd(&Emu, &x, &w, &mut y, &mut rstd, 2, 5, 1e-5).unwrap_err().to_string();
    assert!(e.contains("rmsnorm_fwd") && e.contains("rstd holds 1 values, the shape needs 2"), "{e}");
}
