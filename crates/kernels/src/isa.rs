//! The instruction sets the kernels are compiled for, and the few SIMD helpers every kernel shares: a
//! token that proves the CPU has an instruction set ([`Isa`]), masked loads and stores of a ragged edge,
//! a prefetch hint, and the AVX-512 state clean-up after a kernel.

use pulp::WithSimd;

use crate::level::{simd, Simd};

/// The instruction set the kernels run on, holding `pulp`'s proof that this CPU has it: a value exists only
/// where `try_new` found every feature at run time, so no product can reach code compiled for
/// instructions the CPU lacks.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Isa {
    /// x86-64-v4: AVX-512 F, BW, CD, DQ and VL with AVX2 and FMA; 16 lanes.
    #[cfg(target_arch = "x86_64")]
    V4(pulp::x86::V4),
    /// x86-64-v3: AVX2 and FMA (with BMI and friends); 8 lanes.
    #[cfg(target_arch = "x86_64")]
    V3(pulp::x86::V3),
    /// AArch64 NEON (Advanced SIMD); 4 lanes.
    #[cfg(target_arch = "aarch64")]
    Neon(pulp::aarch64::Neon),
}

impl Isa {
    /// The kernels' instruction set for `level`, if this CPU has it (`None` for the portable level).
    pub(crate) fn at(level: Simd) -> Option<Isa> {
        match level {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => pulp::x86::V4::try_new().map(Isa::V4),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => pulp::x86::V3::try_new().map(Isa::V3),
            #[cfg(target_arch = "aarch64")]
            Simd::Neon => pulp::aarch64::Neon::try_new().map(Isa::Neon),
            _ => None,
        }
    }

    /// Every kernel instruction set this CPU runs (whatever `LORA_KERNELS` allows), for tests that check
    /// each; says which it cannot (shown by `cargo test -- --nocapture`): those are checked on the machines
    /// that have them (`.ci/run` runs the NEON path under qemu).
    #[cfg(test)]
    pub(crate) fn every_available() -> Vec<Isa> {
        let mut run = Vec::new();
        for level in [Simd::Avx512, Simd::Avx2, Simd::Neon] {
            match Isa::at(level) {
                Some(isa) => run.push(isa),
                None => println!("this CPU has no {level:?}: those kernels cannot run here"),
            }
        }
        run
    }

    /// The instruction set of [`simd`]'s level (detected once, capped by `LORA_KERNELS`).
    pub(crate) fn current() -> Option<Isa> {
        static CURRENT: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
        *CURRENT.get_or_init(|| Isa::at(simd()))
    }

    /// Runs `op` compiled for this instruction set.
    #[inline]
    pub(crate) fn vectorize<Op: WithSimd>(self, op: Op) -> Op::Output {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::V4(s) => pulp::Simd::vectorize(s, op),
            #[cfg(target_arch = "x86_64")]
            Isa::V3(s) => pulp::Simd::vectorize(s, op),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon(s) => pulp::Simd::vectorize(s, op),
        }
    }

    /// Called by each thread when it has run its share of a product: see [`clean_upper_state`].
    pub(crate) fn finish(self) {
        #[cfg(target_arch = "x86_64")]
        if let Isa::V4(_) = self {
            // SAFETY: the V4 token proves the CPU has AVX-512 F.
            unsafe { clean_upper_state() };
        }
    }
}

/// Brings a 64-byte line into L1 ahead of use (x86-64; elsewhere nothing). A hint: it never faults.
#[inline(always)]
pub(crate) fn prefetch_line(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing into registers, writes nothing and never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The first `n` lanes (n ≤ L), for the masked loads and stores of a ragged edge. Rebuilt from the bare
/// lane mask: `pulp`'s own `MemMask` carries jump-table trampolines (inline assembly) for its loads and
/// stores, opaque to the compiler, which then spilled the kernels' accumulators around every masked access
/// (measured: the AVX2 tiles ran at a third of their speed); the bare mask takes the native masked
/// instructions (`vmaskmovps`, AVX-512's `k` masks; lane by lane on NEON).
#[inline(always)]
pub(crate) fn first_lanes<S: pulp::Simd>(simd: S, n: usize) -> pulp::MemMask<S::m32s> {
    pulp::MemMask::new(simd.mask_between_m32s(0, n as u32).mask())
}

/// Loads L values at `p`, or only the lanes of `mask` when `masked` (the others zero). A plain function,
/// not a closure: a closure would not inherit the target features of the `vectorize` context it runs in,
/// and the intrinsics inside it would become calls.
///
/// # Safety
/// The L values at `p` (the masked lanes only, when `masked`) must be readable.
#[inline(always)]
pub(crate) unsafe fn load<S: pulp::Simd>(simd: S, p: *const f32, masked: bool, mask: pulp::MemMask<S::m32s>) -> S::f32s {
    // SAFETY: every operation below stays within what this function's `# Safety` contract (above)
    // makes the caller guarantee.
    unsafe {
        if masked {
            simd.mask_load_ptr_f32s(mask, p)
        } else {
            p.cast::<S::f32s>().read_unaligned()
        }
    }
}

/// Stores `v` at `p`, only the lanes of `mask` when `masked`.
///
/// # Safety
/// The L values at `p` (the masked lanes only, when `masked`) must be writable.
#[inline(always)]
pub(crate) unsafe fn store<S: pulp::Simd>(simd: S, p: *mut f32, v: S::f32s, masked: bool, mask: pulp::MemMask<S::m32s>) {
    // SAFETY: every operation below stays within what this function's `# Safety` contract (above)
    // makes the caller guarantee.
    unsafe {
        if masked {
            simd.mask_store_ptr_f32s(mask, p, v)
        } else {
            p.cast::<S::f32s>().write_unaligned(v)
        }
    }
}

/// Zeroes zmm16–31 and the upper halves of zmm0–15. The kernel's 28 live vectors need the registers
/// zmm16–31, which `vzeroupper` (emitted by the compiler on return) does not clear; while they hold
/// non-zero values, every legacy-SSE instruction this thread runs later (the default x86-64 code of the
/// rest of the program) pays a state-transition penalty: measured here, the SSE Adam pass that follows the
/// backward ran 3–5× slower until this was added.
///
/// # Safety
/// The CPU must have AVX-512 F (the instructions fault otherwise).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn clean_upper_state() {
    // SAFETY: the caller guarantees AVX-512 F; the block writes only the registers it declares as clobbered.
    unsafe {
        std::arch::asm!(
            "vpxord zmm16, zmm16, zmm16", "vpxord zmm17, zmm17, zmm17", "vpxord zmm18, zmm18, zmm18",
            "vpxord zmm19, zmm19, zmm19", "vpxord zmm20, zmm20, zmm20", "vpxord zmm21, zmm21, zmm21",
            "vpxord zmm22, zmm22, zmm22", "vpxord zmm23, zmm23, zmm23", "vpxord zmm24, zmm24, zmm24",
            "vpxord zmm25, zmm25, zmm25", "vpxord zmm26, zmm26, zmm26", "vpxord zmm27, zmm27, zmm27",
            "vpxord zmm28, zmm28, zmm28", "vpxord zmm29, zmm29, zmm29", "vpxord zmm30, zmm30, zmm30",
            "vpxord zmm31, zmm31, zmm31", "vzeroupper",
            out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _, out("zmm20") _, out("zmm21") _,
            out("zmm22") _, out("zmm23") _, out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
            out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            options(nomem, nostack, preserves_flags),
        );
    }
}
