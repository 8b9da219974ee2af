//! Adam without weight decay, fused into one pass over each parameter and run in place:
//!
//! ```text
//! m ← β1·m + (1−β1)·g     v ← β2·v + (1−β2)·g²     θ ← θ − lr · (m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + ε)
//! ```
//!
//! The f32 operations are those `candle_nn::AdamW` (weight_decay 0) performs, in the same order, so one
//! step gives the same numbers; it reads θ, g, m, v once and writes θ, m, v once instead of ≈14 tensor ops
//! with a buffer each, and splits large parameters across the rayon threads.

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
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// The constants of step t (1-based), cast to f32 as candle casts them.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    b1: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    scale_m: f32,
    scale_v: f32,
    eps: f32,
    lr: f32,
}

impl AdamStep {
    /// The same step at `scale` times the learning rate (LoRA+).
    pub fn with_lr_scale(self, scale: f32) -> Self {
        AdamStep { lr: self.lr * scale, ..self }
    }

    /// The constants for step `t` (≥ 1).
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
        }
    }
}

/// Below this many values a parameter is updated on the calling thread.
const PARALLEL_MIN: usize = 1 << 15;

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
        let nm = *m * c.b1 + g * c.one_minus_b1;
        let nv = *v * c.b2 + (g * g) * c.one_minus_b2;
        let adjusted = (nm * c.scale_m) / ((nv * c.scale_v).sqrt() + c.eps);
        *t -= adjusted * c.lr;
        *m = nm;
        *v = nv;
    }
}

/// One Adam step over slices of equal length (θ, m, v updated in place). Slices of different lengths are
/// an error, not a silently shorter update; nothing is written then.
pub fn adam_update(theta: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamStep) -> candle_core::Result<()> {
    let n = theta.len();
    if g.len() != n || m.len() != n || v.len() != n {
        candle_core::bail!("Adam: parameter of {n} values, gradient {}, moments {} / {}", g.len(), m.len(), v.len())
    }
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

/// [`adam_update`] as a candle in-place op on the parameter's own storage.
pub(crate) struct AdamOp<'a> {
    pub grad: &'a [f32],
    pub moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
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
        if m.len() != n || v.len() != n {
            candle_core::bail!("fused Adam: moments hold {} / {} values, parameter {n}", m.len(), v.len())
        }
        adam_update(theta, self.grad, m, v, self.step)
    }
}

/// Rows of W per block of [`WeightAdamOp`]: 48 × 1000 values (192 KiB) stay in L2 between the product
/// that writes them and the Adam pass that reads them.
const BLOCK_ROWS: usize = 48;

/// Adam on a weight W (out, in) whose gradient `dW = gᵀ·x` (g: (n, out), the pre-activation gradient;
/// x: (n, in), the layer input) is formed block by block of rows, each block used at once: the gradient
/// never reaches memory (for a 2000 × 1000 weight that saves writing and reading back 8 MB a step).
/// The blocks run on the rayon threads; each value is computed exactly as by a whole-matrix product (the
/// kernels sum over the batch in the same order whatever the split), so the update is bit-for-bit that
/// of writing dW to a buffer and stepping afterwards.
pub(crate) struct WeightAdamOp<'a> {
    pub g: lora_kernels::MatRef<'a>,
    pub x: lora_kernels::MatRef<'a>,
    pub moments: Mutex<&'a mut Moments>,
    pub step: AdamStep,
}

thread_local! {
    /// One block of dW, reused across steps on each thread.
    static BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl InplaceOp1 for WeightAdamOp<'_> {
    fn name(&self) -> &'static str {
        "fused-weight-adam"
    }
    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (out, inp) = (self.g.cols(), self.x.cols());
        let n = layout.shape().elem_count();
        if !layout.is_contiguous() || n != out * inp || self.g.rows() != self.x.rows() {
            candle_core::bail!(
                "fused weight Adam: weight of {n} values vs gradient ({}, {out}) and input ({}, {inp})",
                self.g.rows(),
                self.x.rows()
            )
        }
        let CpuStorage::F32(values) = storage else { candle_core::bail!("fused weight Adam: parameters must be f32") };
        let theta = &mut values[layout.start_offset()..layout.start_offset() + n];
        let mut guard = self.moments.lock().map_err(|_| candle_core::Error::Msg("fused weight Adam: moments lock poisoned".into()))?;
        let Moments { m, v } = &mut **guard;
        if m.len() != n || v.len() != n {
            candle_core::bail!("fused weight Adam: moments hold {} / {} values, weight {n}", m.len(), v.len())
        }
        let gt = self.g.t(); // (out, n)
        let chunk = BLOCK_ROWS * inp;
        theta.par_chunks_mut(chunk).zip(m.par_chunks_mut(chunk)).zip(v.par_chunks_mut(chunk)).enumerate().try_for_each(
            |(i, ((t, m), v))| {
                let (r0, r1) = (i * BLOCK_ROWS, i * BLOCK_ROWS + t.len() / inp);
                let mut block = BLOCK.with(|b| b.take());
                block.resize(t.len(), 0.0);
                // dW[r0..r1] = gᵀ[r0..r1]·x, (r1 − r0, in); on this thread (the blocks are the split).
                let r = super::k(lora_kernels::serial(|| lora_kernels::matmul_into(&mut block, gt.row_range(r0, r1)?, self.x, 1.0, false)));
                if r.is_ok() {
                    kernel(t, &block, m, v, self.step);
                }
                BLOCK.with(|b| b.replace(block));
                r
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::super::store::ParamStore;
    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut g = StdRng::seed_from_u64(seed);
        (0..n).map(|_| g.random::<f32>() * 2.0 - 1.0).collect()
    }

    #[test]
    fn every_compiled_width_of_the_kernel_gives_the_same_bits() {
        let n = 1000 + 7; // a ragged tail for every vector width
        let c = AdamStep::new(&AdamConfig { lr: 3e-3, ..AdamConfig::default() }, 3);
        let g = rand_vec(n, 7);
        type Kernel<'a> = dyn Fn(&mut [f32], &[f32], &mut [f32], &mut [f32]) + 'a;
        let run = |f: &Kernel<'_>| {
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
        adam_update(&mut theta, &[0.5; 4], &mut m, &mut v, c).unwrap();
        assert!(theta.iter().all(|&t| t < 1.0));
    }

    #[test]
    fn fused_adam_matches_candle_adamw_without_weight_decay_over_several_steps() {
        // Large enough (> PARALLEL_MIN) that the update is split across threads.
        let n = 3 * PARALLEL_MIN + 5;
        let init = Tensor::from_vec(rand_vec(n, 1), n, &Device::Cpu).unwrap();
        let (ours, theirs) = (Var::from_tensor(&init.copy().unwrap()).unwrap(), Var::from_tensor(&init.copy().unwrap()).unwrap());
        let cfg = AdamConfig { lr: 3e-3, ..AdamConfig::default() };
        let mut store = ParamStore::new(cfg);
        store.add_autograd("p", ours.clone()).unwrap();
        let p = ParamsAdamW { lr: cfg.lr, beta1: cfg.beta1, beta2: cfg.beta2, eps: cfg.eps, weight_decay: 0.0 };
        let mut adamw = AdamW::new(vec![theirs.clone()], p).unwrap();
        for step in 0..6 {
            // loss = Σ c ⊙ θ², a new c each step: gradients 2·c·θ that change sign and size.
            let c = Tensor::from_vec(rand_vec(n, 100 + step), n, &Device::Cpu).unwrap();
            let loss = |v: &Var| (v.as_tensor().sqr().unwrap() * &c).unwrap().sum_all().unwrap();
            store.step(&loss(&ours).backward().unwrap()).unwrap();
            adamw.backward_step(&loss(&theirs)).unwrap();
        }
        let (a, b) = (ours.to_vec1::<f32>().unwrap(), theirs.to_vec1::<f32>().unwrap());
        // The kernel performs candle's f32 operations in candle's order, so the values agree to the last
        // bit in practice; 1e-7 absolute (under one ulp at |θ| ≈ 1) leaves room for nothing else.
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-7, "max |fused − AdamW| = {worst}");
        assert_ne!(a, init.to_vec1::<f32>().unwrap(), "nothing moved");
    }

    #[test]
    fn a_buffered_gradient_is_applied_once_and_skipped_when_not_written() {
        let v = Var::from_tensor(&Tensor::from_vec(vec![1.0f32, -2.0, 3.0], 3, &Device::Cpu).unwrap()).unwrap();
        let mut store = ParamStore::new(AdamConfig::default());
        let buf = store.add_buffered("w", v.clone()).unwrap();
        let none = Tensor::new(0f32, &Device::Cpu).unwrap().backward().unwrap(); // an empty gradient store
        store.step(&none).unwrap(); // nothing written: unchanged, as AdamW leaves a parameter without gradient
        assert_eq!(v.to_vec1::<f32>().unwrap(), vec![1.0, -2.0, 3.0]);
        buf.write(|g, acc| {
            assert!(!acc);
            g.copy_from_slice(&[1.0, -1.0, 0.0]);
            Ok(())
        })
        .unwrap();
        store.step(&none).unwrap();
        // Step t = 2 (the skipped step counts, as in AdamW): m = 0.1·g, v = 0.001·g², so the move is
        // lr·(0.1/(1−0.9²)) / √(0.001/(1−0.999²)) per unit sign of g; a zero gradient does not move.
        let mv = 1e-3 * (0.1 / (1.0 - 0.81)) / (0.001f64 / (1.0 - 0.999f64.powi(2))).sqrt();
        let got = v.to_vec1::<f32>().unwrap();
        let want = [1.0 - mv as f32, -2.0 + mv as f32, 3.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        assert!(buf.values().is_none(), "the step consumed the gradient");
    }
}
