//! Adam with decoupled weight decay, fused into one pass over each parameter and run in place:
//!
//! ```text
//! g ← c·g  (c: the clipping factor, 1 without clipping)
//! m ← β1·m + (1−β1)·g     v ← β2·v + (1−β2)·g²     θ ← θ·(1 − lr·λ) − lr · (m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + ε)
//! ```
//!
//! The f32 operations are those `candle_nn::AdamW` performs, in the same order, so one step gives the same
//! numbers (with c = 1 and λ = 0 the extra factors multiply by exactly 1.0, so plain Adam keeps its bits);
//! it reads θ, g, m, v once and writes θ, m, v once instead of ≈14 tensor ops with a buffer each, and
//! splits large parameters across the rayon threads.

use std::sync::Mutex;

use candle_core::{CpuStorage, InplaceOp1, Layout};
use rayon::prelude::*;

/// A parameter's Adam moments.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    /// First moment m.
    pub m: Vec<f32>,
    /// Second moment v.
    pub v: Vec<f32>,
}

impl Moments {
    /// Zero moments for `n` values (Adam's start).
    pub fn zeros(n: usize) -> Moments {
        Moments { m: vec![0.0; n], v: vec![0.0; n] }
    }
}

/// Adam's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to √v̂.
    pub eps: f64,
    /// Decoupled weight decay λ (0: Adam).
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    /// PyTorch's defaults: lr 1e-3, β 0.9 / 0.999, ε 1e-8, no weight decay.
    fn default() -> Self {
        AdamConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// The constants of step t (1-based), cast to f32 as candle casts them. Public so that every device's Adam
/// (the CPU kernel here, the CUDA kernel in `lora-cuda`) takes the same numbers; build them with
/// [`AdamStep::new`] and its `with_…` methods.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    /// β1.
    pub b1: f32,
    /// 1 − β1.
    pub one_minus_b1: f32,
    /// β2.
    pub b2: f32,
    /// 1 − β2.
    pub one_minus_b2: f32,
    /// 1 / (1 − β1ᵗ).
    pub scale_m: f32,
    /// 1 / (1 − β2ᵗ).
    pub scale_v: f32,
    /// ε.
    pub eps: f32,
    /// The learning rate.
    pub lr: f32,
    /// 1 − lr·λ (1.0 without decay).
    pub decay: f32,
    /// The clipping factor c applied to g (1.0 without clipping).
    pub grad_scale: f32,
}

impl AdamStep {
    /// The constants for step `t` (≥ 1), with weight decay.
    pub fn new(cfg: &AdamConfig, t: usize) -> Self {
        let t = t.max(1) as i32;
        AdamStep {
            b1: cfg.beta1 as f32,
            one_minus_b1: (1.0 - cfg.beta1) as f32,
            b2: cfg.beta2 as f32,
            one_minus_b2: (1.0 - cfg.beta2) as f32,
            scale_m: (1.0 / (1.0 - cfg.beta1.powi(t))) as f32,
            scale_v: (1.0 / (1.0 - cfg.beta2.powi(t))) as f32,
            eps: cfg.eps as f32,
            lr: cfg.lr as f32,
            decay: (1.0 - cfg.lr * cfg.weight_decay) as f32,
            grad_scale: 1.0,
        }
    }

    /// The same step at `scale` times the learning rate (LoRA+); the decay stays that of the base rate
    /// times `scale` too (`1 − scale·lr·λ`), as a parameter group with its own learning rate has it.
    pub fn with_lr_scale(self, scale: f64, cfg: &AdamConfig) -> Self {
        AdamStep { lr: (cfg.lr * scale) as f32, decay: (1.0 - cfg.lr * scale * cfg.weight_decay) as f32, ..self }
    }

    /// The same step without weight decay (PyTorch's convention for vectors: biases, norms).
    pub fn without_decay(self) -> Self {
        AdamStep { decay: 1.0, ..self }
    }

    /// The same step with every gradient value multiplied by `c` first (global-norm clipping).
    pub fn with_grad_scale(self, c: f32) -> Self {
        AdamStep { grad_scale: c, ..self }
    }
}

/// Below this many values a parameter is updated on the calling thread.
pub(crate) const PARALLEL_MIN: usize = 1 << 15;

fn kernel(theta: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamStep) {
    #[cfg(target_arch = "x86_64")]
    if lora_kernels::simd() == lora_kernels::Simd::Avx512 {
        // SAFETY: the CPU has AVX-512 F (`lora_kernels::simd` detected it; a LORA_KERNELS cap only lowers the level).
        return unsafe { kernel_avx512(theta, g, m, v, c) };
    }
    #[cfg(target_arch = "x86_64")]
    if lora_kernels::simd() == lora_kernels::Simd::Avx2 {
        // SAFETY: the CPU has AVX2 and FMA (`lora_kernels::simd` detected them; a cap only lowers the level).
        return unsafe { kernel_avx2(theta, g, m, v, c) };
    }
    kernel_body(theta, g, m, v, c)
}

/// [`kernel_body`] compiled for AVX2, 8 lanes (the same bits, as for [`kernel_avx512`]); without it a CPU
/// without AVX-512 ran Adam in 4-lane SSE2 code, measured 22 % of a training step on the AVX2 path.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2(theta: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamStep) {
    kernel_body(theta, g, m, v, c)
}

/// [`kernel_body`] compiled for AVX-512: the same operations (IEEE sqrt and division are exact at any
/// vector width, and Rust never contracts a·b + c into an FMA), so the same bits, in 16-lane vectors.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512(theta: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamStep) {
    kernel_body(theta, g, m, v, c)
}

#[inline(always)]
fn kernel_body(theta: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamStep) {
    for (((t, &g), m), v) in theta.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * c.grad_scale;
        let nm = *m * c.b1 + g * c.one_minus_b1;
        let nv = *v * c.b2 + (g * g) * c.one_minus_b2;
        let adjusted = (nm * c.scale_m) / ((nv * c.scale_v).sqrt() + c.eps);
        *t = *t * c.decay - adjusted * c.lr;
        *m = nm;
        *v = nv;
    }
}

fn check(theta: &[f32], g: &[f32], m: &[f32], v: &[f32]) -> candle_core::Result<()> {
    let n = theta.len();
    if g.len() != n || m.len() != n || v.len() != n {
        candle_core::bail!("Adam: parameter of {n} values, gradient {}, moments {} / {}", g.len(), m.len(), v.len())
    }
    Ok(())
}

/// One Adam step over slices of equal length (θ, m, v updated in place), large parameters split across
/// the rayon threads (the result does not depend on the split). Slices of different lengths are an error,
/// not a silently shorter update; nothing is written then.
pub fn adam_update(theta: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamStep) -> candle_core::Result<()> {
    check(theta, g, m, v)?;
    let n = theta.len();
    let threads = rayon::current_num_threads();
    if n < PARALLEL_MIN || threads < 2 {
        kernel(theta, g, m, v, c);
        return Ok(());
    }
    // A few chunks per thread, each a multiple of 16 values (whole cache lines, whole SIMD vectors).
    let chunk = n.div_ceil(threads * 4).next_multiple_of(16);
    theta
        .par_chunks_mut(chunk)
        .zip(g.par_chunks(chunk))
        .zip(m.par_chunks_mut(chunk))
        .zip(v.par_chunks_mut(chunk))
        .for_each(|(((t, g), m), v)| kernel(t, g, m, v, c));
    Ok(())
}

/// [`adam_update`] on the calling thread only (for callers that split the work themselves).
pub fn adam_update_serial(theta: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamStep) -> candle_core::Result<()> {
    check(theta, g, m, v)?;
    kernel(theta, g, m, v, c);
    Ok(())
}

/// [`adam_update`] as a candle in-place op on the parameter's own storage (no copy of θ).
pub struct AdamOp<'a> {
    /// The gradient, as many values as the parameter.
    pub grad: &'a [f32],
    /// The moments m and v (locked while the op runs).
    pub moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
    /// This step's constants.
    pub step: AdamStep,
}

impl InplaceOp1 for AdamOp<'_> {
    fn name(&self) -> &'static str {
        "fused-adam"
    }
    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let n = layout.shape().elem_count();
        if !layout.is_contiguous() || self.grad.len() != n {
            candle_core::bail!(
                "fused Adam: parameter of {n} values (contiguous: {}) vs gradient of {}",
                layout.is_contiguous(),
                self.grad.len()
            )
        }
        let CpuStorage::F32(values) = storage else { candle_core::bail!("fused Adam: parameters must be f32") };
        let theta = &mut values[layout.start_offset()..layout.start_offset() + n];
        let mut guard = self.moments.lock().map_err(|_| candle_core::Error::Msg("fused Adam: moments lock poisoned".into()))?;
        let (m, v) = &mut *guard;
        adam_update(theta, self.grad, m, v, self.step)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut g = StdRng::seed_from_u64(seed);
        (0..n).map(|_| g.random::<f32>() * 2.0 - 1.0).collect()
    }

    #[test]
    fn every_compiled_width_of_the_kernel_gives_the_same_bits() {
        let n = 1000 + 7; // a ragged tail for every vector width
        let cfg = AdamConfig { lr: 3e-3, weight_decay: 0.1, ..AdamConfig::default() };
        let c = AdamStep::new(&cfg, 3).with_grad_scale(0.75);
        let g = rand_vec(n, 7);
        type Update<'a> = &'a dyn Fn(&mut [f32], &[f32], &mut [f32], &mut [f32]);
        let run = |f: Update| {
            let (mut t, mut m, mut v) = (rand_vec(n, 8), rand_vec(n, 9), rand_vec(n, 10).iter().map(|x| x.abs()).collect::<Vec<_>>());
            f(&mut t, &g, &mut m, &mut v);
            (t, m, v)
        };
        let base = run(&|t, g, m, v| kernel_body(t, g, m, v, c));
        #[cfg(target_arch = "x86_64")]
        {
            let mut ran = 0;
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                assert_eq!(base, run(&|t, g, m, v| unsafe { kernel_avx2(t, g, m, v, c) }), "AVX2");
                ran += 1;
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512 F (checked just above).
                assert_eq!(base, run(&|t, g, m, v| unsafe { kernel_avx512(t, g, m, v, c) }), "AVX-512");
                ran += 1;
            }
            if ran < 2 {
                println!("this CPU lacks AVX2 or AVX-512: {ran} of the 2 wide kernels compared");
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        println!("not x86-64: one compiled width only, nothing to compare");
        assert_ne!(base.0, rand_vec(n, 8), "nothing moved");
    }

    #[test]
    fn mismatched_lengths_are_an_error_and_nothing_is_written() {
        let c = AdamStep::new(&AdamConfig::default(), 1);
        let (mut theta, mut m, mut v) = (vec![1f32; 4], vec![0f32; 4], vec![0f32; 4]);
        let e = adam_update(&mut theta, &[0.5; 3], &mut m, &mut v, c).unwrap_err().to_string();
        assert!(e.contains("parameter of 4 values, gradient 3"), "{e}");
        assert_eq!(theta, vec![1f32; 4]);
        assert!(adam_update(&mut theta, &[0.5; 4], &mut m[..2], &mut v, c).is_err());
        assert!(adam_update_serial(&mut theta, &[0.5; 4], &mut m, &mut v[..3], c).is_err());
        assert_eq!(theta, vec![1f32; 4]);
        adam_update(&mut theta, &[0.5; 4], &mut m, &mut v, c).unwrap();
        assert!(theta.iter().all(|&t| t < 1.0));
    }

    #[test]
    fn the_kernel_matches_candle_adamw_with_and_without_weight_decay_over_several_steps() {
        // Large enough (> PARALLEL_MIN) that the update is split across threads.
        let n = 3 * PARALLEL_MIN + 5;
        for wd in [0.0, 0.1] {
            let init = rand_vec(n, 1);
            let cfg = AdamConfig { lr: 3e-3, weight_decay: wd, ..AdamConfig::default() };
            let theirs = Var::from_tensor(&Tensor::from_vec(init.clone(), n, &Device::Cpu).unwrap()).unwrap();
            let p = ParamsAdamW { lr: cfg.lr, beta1: cfg.beta1, beta2: cfg.beta2, eps: cfg.eps, weight_decay: wd };
            let mut adamw = AdamW::new(vec![theirs.clone()], p).unwrap();
            let (mut ours, mut mo) = (init.clone(), Moments::zeros(n));
            for step in 0..6 {
                // loss = Σ c ⊙ θ², a new c each step: gradients 2·c·θ that change sign and size.
                let c = rand_vec(n, 100 + step);
                let g: Vec<f32> = ours.iter().zip(&c).map(|(t, c)| 2.0 * c * t).collect();
                adam_update(&mut ours, &g, &mut mo.m, &mut mo.v, AdamStep::new(&cfg, step as usize + 1)).unwrap();
                let ct = Tensor::from_vec(c, n, &Device::Cpu).unwrap();
                adamw.backward_step(&(theirs.as_tensor().sqr().unwrap() * &ct).unwrap().sum_all().unwrap()).unwrap();
            }
            let b = theirs.to_vec1::<f32>().unwrap();
            // The kernel performs candle's f32 operations in candle's order; candle's gradient 2·c·θ is
            // formed as (c·θ)·2 or θ·(2c) in another order, so at most an ulp or two of θ (|θ| ≤ 1).
            let worst = ours.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= 3e-7, "weight decay {wd}: max |ours − AdamW| = {worst}");
            assert_ne!(ours, init, "nothing moved");
        }
    }

    #[test]
    fn no_decay_and_no_clipping_multiply_by_exactly_one() {
        // Plain Adam's bits must not change because the kernel also handles decay and clipping.
        let cfg = AdamConfig { lr: 3e-3, ..AdamConfig::default() };
        let c = AdamStep::new(&cfg, 2);
        let (g, mut t, mut m, mut v) = (rand_vec(64, 1), rand_vec(64, 2), rand_vec(64, 3), rand_vec(64, 4));
        v.iter_mut().for_each(|x| *x = x.abs());
        let (t0, m0, v0) = (t.clone(), m.clone(), v.clone());
        adam_update(&mut t, &g, &mut m, &mut v, c).unwrap();
        for i in 0..64 {
            let nm = m0[i] * 0.9 + g[i] * (1.0 - 0.9f64) as f32;
            let nv = v0[i] * 0.999 + (g[i] * g[i]) * (1.0 - 0.999f64) as f32;
            let adj = (nm * c.scale_m) / ((nv * c.scale_v).sqrt() + 1e-8);
            assert_eq!(t[i].to_bits(), (t0[i] - adj * 3e-3f64 as f32).to_bits(), "value {i}");
        }
    }
}
