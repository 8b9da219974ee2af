//! `Launch`: one kernel launch described as data — the kernel's name, grid and block, and its arguments in
//! order — built by the safe functions of `ops` and run by a `Backend` (the GPU through cuLaunchKernel, the
//! CPU emulation through the same array-of-pointers convention).

use std::ffi::c_void;

/// One kernel argument, as the kernel declares it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A pointer (a device address; on the CPU emulation a host address).
    Ptr(u64),
    /// `unsigned int`.
    U32(u32),
    /// `int`.
    I32(i32),
    /// `unsigned long long`.
    U64(u64),
    /// `float`.
    F32(f32),
}

/// A kernel launch.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// The kernel's name (an entry of `sources::FILES`).
    pub kernel: &'static str,
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// The arguments, in the kernel's order.
    pub args: Vec<Arg>,
}

impl Launch {
    /// The argument pointers cuLaunchKernel takes: one per argument, to its value (valid while `self` is
    /// borrowed mutably and not moved).
    pub fn params(&mut self) -> Vec<*mut c_void> {
        self.args
            .iter_mut()
            .map(|a| match a {
                Arg::Ptr(v) | Arg::U64(v) => v as *mut u64 as *mut c_void,
                Arg::U32(v) => v as *mut u32 as *mut c_void,
                Arg::I32(v) => v as *mut i32 as *mut c_void,
                Arg::F32(v) => v as *mut f32 as *mut c_void,
            })
            .collect()
    }
}
