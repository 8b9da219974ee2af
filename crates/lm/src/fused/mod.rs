//! Fused CPU f32 kernels for the decoder, each a candle custom op with its own backward, so one op replaces
//! a chain of broadcast tensor ops and their big intermediates:
//!
//! ```text
//! rms_norm     y = w ⊙ x / √(mean(x²) + ε)                          (x, w) → y;  dx, dw
//! rope         y = x·cos + rotate_half(x)·sin, tables held by the op   x → y;       dx (inverse rotation)
//! attention    softmax(q·kᵀ/√d + causal/padding mask)·v, grouped KV    (q, k, v) → o; dq, dk, dv
//! swiglu       y = silu(g) ⊙ u                                          (g, u) → y;  dg, du
//! cross_entropy mean over kept rows of logsumexp(z) − z[target]       z → loss;    dz
//! ```
//!
//! They compute what [`crate::ops`] computes (the reference, whose candle ops have a generic autograd),
//! to f32 rounding: sums run in another order, and `exp` is a polynomial evaluated in vector registers
//! ([`exp`], within 2 ulp of the correctly rounded value). Each op checks its inputs (f32, contiguous, CPU)
//! and refuses anything else with an error; [`crate::Llama`] only takes the fused path where they hold.

pub mod attention;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;

pub use attention::{attention, AttentionOpts, AttentionShape};
/// The one cross-entropy of lora-rs (`lora_optim`), re-exported where the decoder's fused ops are.
pub use lora_optim::cross_entropy;
pub use rms_norm::rms_norm;
pub use rope::{RopeOp, RopeTables};
pub use swiglu::{gated, swiglu};

use candle_core::{CpuStorage, Layout, Tensor};

type CResult<T> = candle_core::Result<T>;

pub(crate) use lora_kernels::multiversion;
pub use lora_kernels::vector::exp;
pub(crate) use lora_kernels::vector::{dot, for_each, max, sum};

/// A contiguous f32 view of a custom op's CPU input (`lora::bridge`), or an error naming the op.
pub(crate) fn cpu_slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> CResult<&'a [f32]> {
    lora::bridge::cpu_slice(s, l).map_err(|e| candle_core::Error::msg(format!("{op}: {e}")))
}

/// Runs `f` on the values of a contiguous f32 CPU tensor (made contiguous first when it is not).
pub(crate) fn with_values<R>(op: &str, t: &Tensor, f: impl FnOnce(&[f32]) -> CResult<R>) -> CResult<R> {
    let t = t.contiguous()?;
    let held = lora::Held::new(&t);
    f(held.slice().map_err(|e| candle_core::Error::msg(format!("{op}: {e}")))?)
}

/// A new f32 CPU tensor of `shape` holding `v`.
pub(crate) fn tensor(v: Vec<f32>, shape: &[usize]) -> CResult<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

/// Whether the fused kernels can take `t`: an f32 tensor on the CPU.
pub fn supports(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

#[cfg(test)]
pub(crate) mod testing {
    //! Shared helpers of the fused ops' tests.
    use candle_core::{Device, Tensor, Var};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Values uniform in [−scale, scale), never exactly zero in practice.
    pub fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut g = StdRng::seed_from_u64(seed);
        (0..n).map(|_| (g.random::<f32>() * 2.0 - 1.0) * scale).collect()
    }
    /// A variable of `shape` with random values.
    pub fn rand_var(shape: &[usize], seed: u64, scale: f32) -> Var {
        let n = shape.iter().product();
        Var::from_tensor(&Tensor::from_vec(rand_vec(n, seed, scale), shape, &Device::Cpu).unwrap()).unwrap()
    }
    /// The values of a tensor.
    pub fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }
    /// |got − want| ≤ tol·(1 + max|want|) element-wise, and the reference is not all zeros.
    pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{what}: the reference is all zeros, the comparison would prove nothing");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * (1.0 + scale), "{what}[{i}]: fused {g} vs reference {w} (max |reference| {scale})");
        }
    }
    /// A random weighting of an output, so Σ c ⊙ y has a gradient with no structure to hide errors behind.
    pub fn weights_like(t: &Tensor, seed: u64) -> Tensor {
        Tensor::from_vec(rand_vec(t.elem_count(), seed, 1.0), t.shape(), &Device::Cpu).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::{Llama, LlamaConfig, PROJECTIONS};
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// A small model of odd sizes (vocabulary 29, hidden 20, MLP 36, 2 layers, 4 query heads of width 6
    /// on 2 K/V heads), weights 10× transformers' initial scale so attention is far from uniform, and
    /// random norm weights.
    fn small_model() -> Llama {
        let config = LlamaConfig {
            vocab_size: 29,
            hidden_size: 20,
            intermediate_size: 36,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 6,
            max_position_embeddings: 32,
            initializer_range: 0.2,
            tokenizer: crate::TokenizerKind::File,
            ..LlamaConfig::byte_default()
        };
        let model = Llama::random(&config, 5).unwrap();
        for (i, (name, v)) in model.trainable_vars().iter().enumerate() {
            if name.ends_with("norm.weight") {
                let w: Vec<f32> = rand_vec(v.elem_count(), 100 + i as u64, 0.5).iter().map(|x| 1.0 + x).collect();
                v.set(&Tensor::from_vec(w, v.shape(), &Device::Cpu).unwrap()).unwrap();
            }
        }
        model
    }

    /// Loss and the gradient of every trainable tensor (by name) of one batch, fused or reference.
    fn loss_and_grads(model: &mut Llama, fused: bool, ids: &[u32], rows: usize, len: usize) -> (f32, Vec<(String, Vec<f32>)>) {
        model.set_fused(fused);
        let loss = crate::train::batch_loss(model, ids, rows, len, true).unwrap();
        let g = loss.backward().unwrap();
        let grads = model
            .trainable_vars()
            .into_iter()
            .map(|(name, v)| {
                let gv = g.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient (fused = {fused})"));
                (name, flat(gv))
            })
            .collect();
        (loss.to_scalar::<f32>().unwrap(), grads)
    }

    /// Fused and reference agree on logits, loss and every trainable tensor's gradient, and every gradient
    /// is non-zero.
    fn assert_model_agrees(model: &mut Llama, what: &str) {
        let (rows, len) = (3, 13);
        let ids: Vec<u32> = (0..(rows * len) as u32).map(|i| (i * 11 + 7) % 29).collect();
        let t = Tensor::from_vec(ids.clone(), (rows, len), &Device::Cpu).unwrap();
        model.set_fused(true);
        let lf = flat(&model.forward(&t, None, false).unwrap());
        model.set_fused(false);
        let lr = flat(&model.forward(&t, None, false).unwrap());
        // Logits of size ≲ 3 after two layers of f32 sums of ≤ 36 terms in other orders: ≲ 1e-6 apart.
        assert_close(&lf, &lr, 1e-5, &format!("{what}: logits"));
        let (loss_f, gf) = loss_and_grads(model, true, &ids, rows, len);
        let (loss_r, gr) = loss_and_grads(model, false, &ids, rows, len);
        assert!((loss_f - loss_r).abs() < 1e-5 * loss_r.abs(), "{what}: loss {loss_f} vs {loss_r}");
        assert_eq!(gf.len(), gr.len());
        for ((name, f), (_, r)) in gf.iter().zip(&gr) {
            assert!(f.iter().any(|&x| x != 0.0), "{what}: {name} has an all-zero gradient");
            // Gradients pass back through both layers: chains of f32 sums of ≤ 39 terms, each rounded in
            // another order; 1e-4 of the largest entry of each tensor's gradient is ~100× that rounding and
            // still fails for any wrong term (a missing mask, a wrong head, a dropped residual).
            assert_close(f, r, 1e-4, &format!("{what}: gradient of {name}"));
        }
    }

    #[test]
    fn the_fused_model_matches_the_reference_in_logits_and_every_gradient_when_pre_training() {
        let mut model = small_model();
        assert_model_agrees(&mut model, "pre-training");
    }

    #[test]
    fn the_fused_model_matches_the_reference_with_a_lora_adapter_and_the_base_frozen() {
        let mut model = small_model();
        let cfg = lora::LoraConfig { target_modules: PROJECTIONS.iter().map(|s| s.to_string()).collect(), ..lora::LoraConfig::new(3, 5.0) };
        model.lora_mut().add_adapter("a", &cfg, &mut StdRng::seed_from_u64(9)).unwrap();
        model.lora_mut().set_active(&["a"]).unwrap();
        model.freeze_base();
        // B starts at zero (so dA would be zero too): give it values, so every path of the adapter counts.
        for (i, (name, v)) in model.trainable_vars().iter().enumerate() {
            assert!(name.contains(".lora_"), "{name} trains with the base frozen");
            if name.contains(".lora_B.") {
                v.set(&Tensor::from_vec(rand_vec(v.elem_count(), 200 + i as u64, 0.3), v.shape(), &Device::Cpu).unwrap()).unwrap();
            }
        }
        assert_model_agrees(&mut model, "LoRA");
    }

    #[test]
    fn dora_and_a_trained_lm_head_copy_get_every_gradient_and_the_fused_model_agrees() {
        let mut model = small_model();
        let cfg = lora::LoraConfig {
            target_modules: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
            use_dora: true,
            init: lora::Init::Random, // B ≠ 0 from the start, so every path counts
            modules_to_save: vec!["lm_head".into()],
            ..lora::LoraConfig::new(2, 3.0)
        };
        model.lora_mut().add_adapter("d", &cfg, &mut StdRng::seed_from_u64(4)).unwrap();
        model.lora_mut().set_active(&["d"]).unwrap();
        model.freeze_base();
        let names: Vec<String> = model.trainable_vars().into_iter().map(|(n, _)| n).collect();
        assert!(names.iter().any(|n| n.ends_with("lora_magnitude_vector.d")), "{names:?}");
        assert!(names.iter().any(|n| n == "lm_head.weight.d"), "{names:?}");
        assert_model_agrees(&mut model, "DoRA + modules_to_save");
    }

    #[test]
    fn a_cached_padded_forward_matches_the_reference_step_by_step() {
        let mut model = small_model();
        let pad = vec![0, 3];
        let prompt: Vec<u32> = vec![1, 2, 3, 4, 5, 0, 0, 0, 6, 7];
        let mut logits = [Vec::new(), Vec::new()];
        for (fi, fused) in [true, false].into_iter().enumerate() {
            model.set_fused(fused);
            let mut cache = crate::KvCache::new(model.config(), pad.clone());
            let t = Tensor::from_vec(prompt.clone(), (2, 5), &Device::Cpu).unwrap();
            logits[fi].extend(flat(&model.forward(&t, Some(&mut cache), false).unwrap()));
            // 20 single-token steps: the cache grows past its first capacity (16 slots).
            for step in 0..20u32 {
                let t = Tensor::from_vec(vec![step % 29, (step * 5) % 29], (2, 1), &Device::Cpu).unwrap();
                logits[fi].extend(flat(&model.forward(&t, Some(&mut cache), false).unwrap()));
            }
            assert_eq!(cache.len(), 25);
        }
        // As for the uncached logits: f32 sums in other orders, ≲ 1e-6 apart.
        assert_close(&logits[0], &logits[1], 1e-5, "cached logits");
    }
}
