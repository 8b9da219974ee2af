//! Which SIMD instructions the kernels use: detected once at run time, capped by `LORA_KERNELS`.

/// The widest instructions the kernels of lora-rs use (ours; the `gemm` crate dispatches on its own), in
/// the order a `LORA_KERNELS` cap compares them (a cap of `avx2` or `avx512` leaves an ARM CPU at `Neon`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    /// No SIMD kernels of ours: products go to the `gemm` crate, other loops are compiled for the build's
    /// baseline (SSE2 on x86-64, NEON on aarch64). The path of x86-64 CPUs without AVX2 and FMA.
    Portable,
    /// AArch64 Advanced SIMD: the kernels' 4-lane path.
    Neon,
    /// AVX2 and FMA (x86-64-v3): the kernels' 8-lane path.
    Avx2,
    /// AVX-512 F, BW, CD, DQ and VL with AVX2 and FMA (x86-64-v4): the kernels' 16-lane path.
    Avx512,
}

/// What this CPU offers, capped by the `LORA_KERNELS` environment variable (`portable`, `avx2`, `avx512` or
/// `auto`, the default), read once: so that the paths other CPUs take run, and are tested and measured, on
/// this one. A cap can only lower the level, never claim what the CPU lacks; an unknown value is ignored
/// (with a warning).
pub fn simd() -> Simd {
    static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = detect_simd();
        let cap = match std::env::var("LORA_KERNELS").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Simd::Avx512,
            Ok("portable") => Simd::Portable,
            Ok("avx2") => Simd::Avx2,
            Ok("avx512") => Simd::Avx512,
            Ok(other) => {
                tracing::warn!(value = other, "LORA_KERNELS: expected portable, avx2, avx512 or auto; using auto");
                Simd::Avx512
            }
        };
        let level = detected.min(cap);
        tracing::debug!(?detected, ?level, "kernel instruction set");
        level
    })
}

/// The widest level this CPU has, as `pulp` detects the features of each (so that `sgemm`'s tokens
/// exist at every level this returns).
fn detect_simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if pulp::x86::V4::try_new().is_some() {
            Simd::Avx512
        } else if pulp::x86::V3::try_new().is_some() {
            Simd::Avx2
        } else {
            Simd::Portable
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if pulp::aarch64::Neon::try_new().is_some() {
            Simd::Neon
        } else {
            Simd::Portable
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Simd::Portable
    }
}
