//! lora-cuda's kernels (`../src/kernels/*.cu`) compiled as C++ for the CPU, for lora-cuda's tests: a launch
//! runs the blocks one after another and each block's threads as real threads, with a barrier for
//! `__syncthreads` and per-warp barriers for shuffles (`shim.h`), so the kernels run as written — shared
//! memory, barriers, warp reductions and all — and their results can be compared with references. The
//! arithmetic is the kernel's in f32; only the math library differs from the GPU's (`expf`, `logf` within
//! an ulp or two of each other), and no `a·b + c` is fused into an FMA on either side where the kernel asks
//! so (`__fmul_rn`, `__fadd_rn`).
//!
//! Built only for the host's own target (see build.rs); elsewhere [`AVAILABLE`] is false and [`launch`] says so.
#![deny(missing_docs)]

use std::ffi::c_void;
#[cfg(lora_cuda_emu)]
use std::ffi::{c_char, c_int, c_uint, CStr, CString};

/// Whether the emulation was compiled into this build.
pub const AVAILABLE: bool = cfg!(lora_cuda_emu);

/// Why a launch did not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmuError {
    /// This build has no emulation (a cross build).
    Unavailable,
    /// No kernel of that name.
    UnknownKernel(String),
    /// A block of 0 or more than 1024 threads.
    BadBlock([u32; 3]),
}

impl std::fmt::Display for EmuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EmuError::Unavailable => write!(f, "the CPU emulation of the CUDA kernels is not built for this target"),
            EmuError::UnknownKernel(n) => write!(f, "the CPU emulation has no kernel named {n:?}"),
            EmuError::BadBlock(b) => write!(f, "a block of {b:?} threads (1 to 1024)"),
        }
    }
}

impl std::error::Error for EmuError {}

#[cfg(lora_cuda_emu)]
extern "C" {
    fn lora_emu_launch(name: *const c_char, grid: *const c_uint, block: *const c_uint, params: *mut *mut c_void) -> c_int;
    fn lora_emu_kernel_count() -> c_uint;
    fn lora_emu_kernel_name(i: c_uint) -> *const c_char;
}

/// The names of the kernels the emulation holds.
pub fn kernel_names() -> Vec<String> {
    #[cfg(lora_cuda_emu)]
    {
        // SAFETY: the two functions only read the emulation's constant table; a name is a NUL-terminated
        // string that lives as long as the table (the whole program), copied here at once.
        unsafe {
            (0..lora_emu_kernel_count())
                .filter_map(|i| {
                    let p = lora_emu_kernel_name(i);
                    (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
                })
                .collect()
        }
    }
    #[cfg(not(lora_cuda_emu))]
    Vec::new()
}

/// Runs kernel `name` on the CPU over `grid` blocks of `block` threads, with `params` in cuLaunchKernel's
/// convention: one pointer per kernel argument, to a value of that argument's type. Launches run one at a
/// time (a lock), each until all its threads are done.
///
/// # Safety
/// `params` must hold exactly one pointer per argument of the kernel, each to a live value of that
/// argument's C type (pointer arguments: host addresses valid for every access the kernel makes with the
/// other arguments as its shape).
pub unsafe fn launch(name: &str, grid: [u32; 3], block: [u32; 3], params: &mut [*mut c_void]) -> Result<(), EmuError> {
    let _ = (grid, &params);
    let threads = block.iter().map(|&b| b as u64).product::<u64>();
    if threads == 0 || threads > 1024 {
        return Err(EmuError::BadBlock(block));
    }
    #[cfg(lora_cuda_emu)]
    {
        let c = CString::new(name).map_err(|_| EmuError::UnknownKernel(name.to_string()))?;
        // SAFETY: the name is NUL-terminated, grid and block are 3 values each, and params is the caller's
        // promise (this function's contract).
        let rc = unsafe { lora_emu_launch(c.as_ptr(), grid.as_ptr(), block.as_ptr(), params.as_mut_ptr()) };
        match rc {
            0 => Ok(()),
            -2 => Err(EmuError::BadBlock(block)),
            _ => Err(EmuError::UnknownKernel(name.to_string())),
        }
    }
    #[cfg(not(lora_cuda_emu))]
    {
        let _ = name;
        Err(EmuError::Unavailable)
    }
}
