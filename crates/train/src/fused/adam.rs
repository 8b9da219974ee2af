//! Adam applied during the backward pass: [`WeightAdamOp`] forms a weight's gradient block by block and
//! steps each block at once with `lora_optim`'s Adam kernel (the one Adam of lora-rs, see
//! [`lora_optim::adam_update`]), so the gradient never reaches memory.

use std::sync::Mutex;

use candle_core::{CpuStorage, InplaceOp1, Layout};
use lora_optim::{AdamStep, Moments};
use rayon::prelude::*;

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
                let r = r.and_then(|()| lora_optim::adam_update_serial(t, &block, m, v, self.step));
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

    use lora_optim::AdamConfig;

    use super::super::store::ParamStore;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut g = StdRng::seed_from_u64(seed);
        (0..n).map(|_| g.random::<f32>() * 2.0 - 1.0).collect()
    }

    #[test]
    fn fused_adam_matches_candle_adamw_without_weight_decay_over_several_steps() {
        // Large enough (> PARALLEL_MIN) that the update is split across threads.
        let n = 3 * (1 << 15) + 5;
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
