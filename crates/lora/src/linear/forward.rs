//! The forward of a [`LoraLinear`], x (…, in) → (…, out):
//!
//! ```text
//! y = act(x·Wᵀ + b + Σ_k s_k·(drop(x)·A_kᵀ)·B_kᵀ)          act ∈ {identity, ReLU}
//! ```
//!
//! as one fused custom op on `lora-kernels` (`fused.rs`) where the layer's [`Backend`] and state allow it,
//! else through the reference path of plain candle ops (`reference.rs`); both compute the same function.

use candle_core::Tensor;
use lora_kernels::Activation;

use super::{fused, LoraLinear};
use crate::error::Result;

/// Which implementation a [`LoraLinear`] uses for its forward and backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// One fused custom op per layer on the CPU where the layer's state allows it (f32 input, at most one
    /// active unmerged adapter, no dropout while training, base either frozen or trained without
    /// adapters); otherwise the reference path. The default.
    #[default]
    Fused,
    /// Plain candle tensor ops and candle's autograd: the reference the fused ops are tested against.
    Reference,
}

impl LoraLinear {
    /// Which implementation forward and backward use (default [`Backend::Fused`]).
    pub fn backend(&self) -> Backend {
        self.backend
    }
    /// Chooses the implementation of forward and backward; both give the same function.
    pub fn set_backend(&mut self, backend: Backend) {
        self.backend = backend;
    }

    /// Inference forward: x (…, in) → (…, out), no dropout.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }

    /// Forward with dropout on the adapter input when `train` is true: x (…, in) → (…, out).
    /// Runs as one fused op where [`LoraLinear::backend`] and the layer's state allow (see
    /// [`Backend::Fused`]), else as [`LoraLinear::forward_reference_t`].
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act_t(x, train, Activation::Identity)
    }

    /// `act(forward_t(x, train))` for x (…, in) → (…, out), as one fused op when the backend and the
    /// layer's state allow it, else through the reference path.
    pub fn forward_act_t(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() >= 2 && dims.last() == Some(&self.in_features()) {
            let x2 = if dims.len() == 2 { x.clone() } else { x.reshape(((), self.in_features()))? };
            if let Some(y) = fused::try_forward(self, &x2, train, act)? {
                let mut out_dims = dims.to_vec();
                *out_dims.last_mut().unwrap_or(&mut 0) = self.out_features();
                return Ok(if dims.len() == 2 { y } else { y.reshape(out_dims)? });
            }
        }
        let y = self.forward_reference_t(x, train)?;
        Ok(match act {
            Activation::Identity => y,
            Activation::Relu => y.relu()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::testing::{flat, layer_with_adapter, rand_vec, reference, t2 as t};
    use candle_core::{DType, Device};

    #[test]
    fn forward_matches_an_independent_loop_reference_with_alpha_not_equal_to_rank() {
        let (n, inp, out, r, alpha) = (5, 13, 7, 3, 5.0);
        let (l, p) = layer_with_adapter(inp, out, r, alpha, 1);
        let x = rand_vec(n * inp, 99);
        let y = l.forward(&t(x.clone(), (n, inp))).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = reference(&x, &p[0], &p[1], &p[2], &p[3], alpha / r as f64, n, inp, out, r);
        // f32 dot products of length ≤ 13 with |terms| ≤ 1: rounding error well under 1e-5.
        for (g, w) in y.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn only_the_delta_is_scaled_not_the_base_output() {
        // y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ with the adapter on and s = alpha/r far from 1 (3.5, then 0.25), on both
        // paths: a layer that scaled its base output too (s·(x·Wᵀ + b), as candle-lora does) would be off by
        // |s − 1|·|x·Wᵀ + b| ≈ 1, one that left the delta unscaled by |s − 1|·|delta| (checked to be ≥ 0.1).
        let (n, inp, out, r) = (3, 6, 5, 2);
        let x = rand_vec(n * inp, 5);
        for backend in [Backend::Fused, Backend::Reference] {
            for alpha in [7.0, 0.5] {
                let (mut l, p) = layer_with_adapter(inp, out, r, alpha, 3);
                l.freeze_base(); // what the fused op serves: a frozen base with one adapter
                l.set_backend(backend);
                let xt = t(x.clone(), (n, inp));
                assert_eq!(fused::plan(&l, &xt, false).unwrap().is_some(), backend == Backend::Fused, "{backend:?} takes its own path");
                let y = flat(&l.forward(&xt).unwrap());
                let s = alpha / r as f64;
                let want = reference(&x, &p[0], &p[1], &p[2], &p[3], s, n, inp, out, r);
                let unscaled = reference(&x, &p[0], &p[1], &p[2], &p[3], 1.0, n, inp, out, r);
                let most = want.iter().zip(&unscaled).fold(0f64, |m, (w, u)| m.max((w - u).abs()));
                assert!(most >= 0.1, "the delta's share ({most}) is too small to see a wrong scale");
                // f32 sums of ≤ 6 terms of size ≤ 1, then one product with s ≤ 3.5: rounding well under 1e-5.
                for (i, (g, w)) in y.iter().zip(&want).enumerate() {
                    assert!((*g as f64 - w).abs() < 1e-5, "{backend:?}, alpha {alpha}, y[{i}] = {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn with_its_adapters_disabled_a_layer_gives_the_bases_output_bit_for_bit() {
        let (n, inp, out, r) = (4, 9, 6, 3);
        let x = t(rand_vec(n * inp, 7), (n, inp));
        for backend in [Backend::Fused, Backend::Reference] {
            let (mut l, p) = layer_with_adapter(inp, out, r, 5.0, 8);
            l.set_backend(backend);
            let mut base =
                LoraLinear::new(t(p[0].clone(), (out, inp)), Some(Tensor::from_vec(p[1].clone(), out, &Device::Cpu).unwrap())).unwrap();
            base.set_backend(backend);
            let with = flat(&l.forward(&x).unwrap());
            l.set_disabled(true).unwrap();
            let off = flat(&l.forward(&x).unwrap());
            assert_ne!(with, off, "{backend:?}: the adapter changes the output while on");
            assert_eq!(off, flat(&base.forward(&x).unwrap()), "{backend:?}");
        }
    }

    #[test]
    fn gradients_of_a_and_b_match_finite_differences() {
        let (n, inp, out, r, alpha) = (3, 6, 4, 2, 3.0);
        let (mut l, _) = layer_with_adapter(inp, out, r, alpha, 11);
        l.freeze_base();
        let x = t(rand_vec(n * inp, 12), (n, inp));
        let c = t(rand_vec(n * out, 13), (n, out)); // loss = Σ c ⊙ y² / 2: non-linear in A and B
        let loss = |l: &LoraLinear| -> f64 {
            let y = l.forward(&x).unwrap().to_dtype(DType::F64).unwrap();
            (y.sqr().unwrap() * c.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() / 2.0
        };
        let y = l.forward(&x).unwrap();
        let grads = ((y.sqr().unwrap() * &c).unwrap().sum_all().unwrap() / 2.0).unwrap().backward().unwrap();
        assert!(grads.get(l.weight_var().unwrap().as_tensor()).is_none(), "frozen W0 got a gradient");
        let ad = l.adapter("x").unwrap();
        for var in [ad.a().clone(), ad.b().clone()] {
            let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let v0 = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in 0..v0.len() {
                // Central differences in f32 weights with h = 1e-2: truncation O(h²) ≈ 1e-4 times the third
                // derivative, plus f32 rounding of the loss ≈ 1e-6/h; 2e-3 relative + 2e-3 absolute covers both.
                let h = 1e-2f32;
                let mut v = v0.clone();
                v[i] += h;
                var.set(&Tensor::from_vec(v.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                let lp = loss(&l);
                v[i] -= 2.0 * h;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                let lm = loss(&l);
                var.set(&Tensor::from_vec(v0.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                let fd = (lp - lm) / (2.0 * h as f64);
                assert!((fd - g[i] as f64).abs() < 2e-3 + 2e-3 * fd.abs(), "param {i}: fd {fd} vs autograd {}", g[i]);
            }
        }
    }
}
