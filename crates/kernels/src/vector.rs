//! Element-wise and reduction helpers the fused ops of every crate share, written as plain loops over
//! slices that vectorise, and [`multiversion!`](crate::multiversion) to compile such a loop for AVX-512,
//! AVX2 + FMA and the baseline and pick one at run time:
//!
//! ```text
//! exp(x)            e^x by range reduction and a degree-6 polynomial (≤ 2 ulp), branch-free so loops of it vectorise
//! sum_zip(a, b, f)  Σ f(aᵢ, bᵢ) in 16 partial sums (a single running f32 sum cannot be vectorised)
//! dot, sum, max     the same reductions
//! for_each          items on the rayon threads when the work pays for the hand-off, else in order here
//! ```

/// Defines `fn $name(args)` that runs its body compiled for AVX-512 or AVX2 + FMA when the CPU has them
/// (detected at run time), else for the build's baseline, so plain loops over slices vectorise at the
/// widest width the machine offers without building for one CPU.
#[macro_export]
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                /// # Safety
                /// The CPU must have AVX-512 F, BW, DQ and VL, AVX2 and FMA.
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                /// # Safety
                /// The CPU must have AVX2 and FMA.
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                match $crate::vector::simd_level() {
                    // SAFETY: `simd_level` found every feature `wide` is compiled for on this CPU.
                    2 => return unsafe { wide($($arg),*) },
                    // SAFETY: `simd_level` found AVX2 and FMA on this CPU.
                    1 => return unsafe { avx2($($arg),*) },
                    _ => {}
                }
            }
            body($($arg),*)
        }
    };
}

/// 2: AVX-512 (F, BW, DQ, VL) with AVX2 and FMA; 1: AVX2 and FMA; 0: neither (or not x86-64); as
/// [`crate::simd`] detects it, capped by `LORA_KERNELS`.
#[doc(hidden)] // read by `multiversion!`
pub fn simd_level() -> u8 {
    match crate::simd() {
        crate::Simd::Avx512 => 2,
        crate::Simd::Avx2 => 1,
        crate::Simd::Neon | crate::Simd::Portable => 0,
    }
}

/// e^x in f32 without a library call, so loops of it vectorise: x = n·ln 2 + r with |r| ≤ ln2/2, e^r by
/// Cephes' degree-6 polynomial, 2ⁿ by building the exponent bits. Within 2 ulp of e^x for x in
/// [−87.3, 88.7]; 0 below (where e^x is subnormal or 0), +∞ above.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to an integer in the low mantissa bits (round to nearest even).
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.7);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    // n ∈ [−126, 128]: the low bits of t hold n (two's complement over the magic's bits).
    let ni = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    // 2ⁿ as (2^(n/2))², each factor a normal float, so n = 128 gives ∞ and n = −126 stays exact.
    let h = ni >> 1;
    let a = f32::from_bits(((h + 127) as u32) << 23);
    let b = f32::from_bits(((ni - h + 127) as u32) << 23);
    let y = e * a * b;
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else {
        y
    }
}

/// Lanes of the reductions below: independent partial sums the compiler keeps in vector registers (a
/// single running f32 sum cannot be vectorised without reassociating it).
const LANES: usize = 16;

/// Σ f(a_i, b_i) over two slices of one length, in [`LANES`] partial sums added at the end.
#[inline(always)]
pub fn sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += f(x[l], y[l]);
        }
    }
    for (l, (x, y)) in ar.iter().zip(br).enumerate() {
        acc[l] += f(*x, *y);
    }
    acc.iter().sum()
}

/// Σ a_i·b_i.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    sum_zip(a, b, |x, y| x * y)
}

/// Σ a_i.
#[inline(always)]
pub fn sum(a: &[f32]) -> f32 {
    sum_zip(a, a, |x, _| x)
}

/// max a_i (−∞ for an empty slice; NaN-free inputs assumed for the order of comparisons).
#[inline(always)]
pub fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder();
    for x in chunks {
        for l in 0..LANES {
            acc[l] = if x[l] > acc[l] { x[l] } else { acc[l] };
        }
    }
    for (l, x) in rest.iter().enumerate() {
        acc[l] = if *x > acc[l] { *x } else { acc[l] };
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Values below which an op runs on the calling thread: handing work to the rayon pool from outside it
/// costs a wake-up and a sleep of another thread (tens of µs), more than such small work (a generation
/// step's few tokens).
pub const SERIAL_MAX: usize = 1 << 15;

/// Runs `f(i, item)` for every item, on the rayon threads when `work` (values touched) is large enough to
/// pay for the hand-off, else in order on this thread.
pub fn for_each<T: Send>(items: Vec<T>, work: usize, f: impl Fn(usize, T) + Sync + Send) {
    use rayon::prelude::*;
    if work <= SERIAL_MAX || items.len() <= 1 {
        items.into_iter().enumerate().for_each(|(i, t)| f(i, t));
    } else {
        items.into_par_iter().enumerate().for_each(|(i, t)| f(i, t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vector_exp_is_within_two_ulp_of_the_library_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.001_3;
        }
        // 2 ulp of f32 is 2·2⁻²³ ≈ 2.4e-7 relative.
        assert!(worst < 2.4e-7, "worst relative error {worst:e}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(100.0).is_infinite());
    }
}
