//! The reference forward of a [`LoraLinear`]: plain candle tensor ops and candle's autograd, every state
//! of the layer (any number of active adapters, dropout, DoRA, LoRA bias, PiSSA/OLoRA, copies). The fused
//! path (`fused.rs`) is tested against it, and takes over only where it computes the same function.
//!
//! For x (batch, in), with W, b the layer's tensors (or the active adapter's copies):
//!
//! ```text
//! y = x·Wᵀ + b + Σ_k s_k·(drop(x)·A_kᵀ)·B_kᵀ                                      plain LoRA
//!     + s_k·b_B                                                                    LoRA bias
//!     − s_k·(x·A0ᵀ)·B0ᵀ                                                            PiSSA / OLoRA
//! DoRA:  y += (f − 1)⊙(drop(x)·Wᵀ) + f⊙s·(drop(x)·Aᵀ)·Bᵀ,  f = m / ‖W + s·B·A‖_row (a constant)
//! ```
//!
//! Dropout keeps each input of an adapter with probability 1 − p and scales it by 1/(1 − p) while
//! training; its generator is the layer's, reseeded with [`LoraLinear::seed_dropout`]. A data-parallel rank
//! holding rows `first..first + n` of a global batch of `total` rows reseeds with
//! [`LoraLinear::seed_dropout_rows`]: each mask skips the other rows' draws, so its rows get the values the
//! one process's mask gives them.

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::LoraLinear;
use crate::error::{LoraError, Result};

/// The layer's dropout generator, and the rows of the global batch its masks are for.
#[derive(Debug)]
pub(super) struct DropoutRng {
    rng: StdRng,
    /// (first row, rows of the global batch) of a rank's share; `None`: the whole batch.
    rows: Option<(usize, usize)>,
}

impl DropoutRng {
    pub(super) fn new(seed: u64) -> Self {
        DropoutRng { rng: StdRng::seed_from_u64(seed), rows: None }
    }
}

impl LoraLinear {
    /// Seeds the generator used for adapter dropout.
    pub fn seed_dropout(&self, seed: u64) {
        if let Ok(mut g) = self.rng.lock() {
            *g = DropoutRng::new(seed);
        }
    }

    /// Seeds the generator for a forward over input rows `first..` of a global batch of `total` rows, of
    /// which other ranks hold the rest: each mask draws (and drops) the values of the rows before `first`
    /// and after this input's, so these rows get the mask values of [`LoraLinear::seed_dropout`] over the
    /// whole batch. With `first = 0` and `total` = the input's rows it is [`LoraLinear::seed_dropout`].
    pub fn seed_dropout_rows(&self, seed: u64, first: usize, total: usize) {
        if let Ok(mut g) = self.rng.lock() {
            *g = DropoutRng { rng: StdRng::seed_from_u64(seed), rows: Some((first, total)) };
        }
    }

    /// The plain-candle forward (tensor ops and candle's autograd): the reference for the fused path.
    pub fn forward_reference_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.embedding {
            return Err(LoraError::State("an embedding layer reads token ids: use embed_t".into()));
        }
        let dims = x.dims().to_vec();
        let inp = *dims.last().ok_or_else(|| LoraError::State("input is a scalar".into()))?;
        if inp != self.in_features() {
            return Err(LoraError::Shape { tensor: "input".into(), expected: vec![self.in_features()], found: dims });
        }
        let x2 = x.reshape(((), inp))?; // (batch, in)
        let (ow, ob) = self.active_override().unwrap_or((None, None));
        let w = match ow {
            Some(w) => w.as_tensor().clone(),
            None => self.weight_param()?,
        };
        let xw = x2.matmul(&w.t()?)?; // (batch, out)
        let mut y = xw.clone();
        match (ob, &self.bias) {
            (Some(b), _) => y = y.broadcast_add(b.as_tensor())?,
            (None, Some(b)) => y = y.broadcast_add(&Self::param(b, self.bias_trainable))?,
            (None, None) => {}
        }
        if !self.disabled {
            for name in self.active.iter().filter(|n| !self.merged.contains(n)) {
                let Some(ad) = self.adapters.get(name) else { continue };
                let dropped = train && ad.dropout > 0.0;
                let xin = if dropped { self.dropout(&x2, ad.dropout)? } else { x2.clone() };
                let xa = xin.matmul(&ad.a.as_tensor().t()?)?; // (batch, r)
                let d = xa.matmul(&ad.b.as_tensor().t()?)?; // (batch, out)
                if let Some(f) = ad.dora_factor(&self.weight()?)? {
                    // (f − 1)⊙(drop(x)·W0ᵀ) + f⊙s·delta, as PEFT's DoraLinearLayer.
                    let base = if dropped { xin.matmul(&w.t()?)? } else { xw.clone() };
                    y = (y + base.broadcast_mul(&(&f - 1.0)?)? + d.broadcast_mul(&(f * ad.scale)?)?)?;
                    continue;
                }
                y = (y + (d * ad.scale)?)?;
                if let Some(lb) = &ad.lora_bias {
                    y = y.broadcast_add(&(lb.as_tensor() * ad.scale)?)?;
                }
                if let Some((a0, b0)) = &ad.initial {
                    // The residual base W0 − s·B0·A0, on the undropped input as PEFT's rewritten base layer.
                    y = (y - (x2.matmul(&a0.t()?)?.matmul(&b0.t()?)? * ad.scale)?)?;
                }
            }
        }
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().unwrap_or(&mut 0) = self.out_features();
        Ok(y.reshape(out_dims)?)
    }

    fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        let n = x.elem_count();
        let keep = 1.0 / (1.0 - p) as f32;
        let mask: Vec<f32> = {
            let mut g = self.rng.lock().map_err(|_| LoraError::State("dropout generator poisoned".into()))?;
            // x is (rows, in): the rows before this rank's and after them are drawn and dropped.
            let width = x.dims().last().copied().unwrap_or(1).max(1);
            let (before, after) = match g.rows {
                Some((first, total)) => (first * width, total.saturating_sub(first + n / width) * width),
                None => (0, 0),
            };
            for _ in 0..before {
                g.rng.random::<f64>();
            }
            let mask = (0..n).map(|_| if g.rng.random::<f64>() < p { 0.0 } else { keep }).collect();
            for _ in 0..after {
                g.rng.random::<f64>();
            }
            mask
        };
        Ok((x * Tensor::from_vec(mask, x.shape(), x.device())?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::testing::{dora_layer, rand_vec, t2 as t};
    use candle_core::{DType, Device};

    #[test]
    fn ranks_draw_the_dropout_mask_values_one_process_draws_for_their_rows() {
        // A mask is the dropout of ones: two masks in a row (two adapters, or two steps without reseeding),
        // over 6 rows of 5 as one process draws them, and as ranks holding rows 0..2 and 2..6 draw theirs.
        let l = LoraLinear::new(Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap(), None).unwrap();
        let ones = |rows: usize| Tensor::ones((rows, 5), DType::F32, &Device::Cpu).unwrap();
        let masks = |rows: usize| -> Vec<Vec<f32>> {
            (0..2).map(|_| l.dropout(&ones(rows), 0.5).unwrap().flatten_all().unwrap().to_vec1().unwrap()).collect()
        };
        l.seed_dropout(7);
        let whole = masks(6);
        assert!(whole[0].contains(&0.0) && whole[0].contains(&2.0), "{:?}", whole[0]);
        for (first, rows) in [(0, 2), (2, 4)] {
            l.seed_dropout_rows(7, first, 6);
            let part = masks(rows);
            for k in 0..2 {
                assert_eq!(part[k], whole[k][first * 5..(first + rows) * 5], "mask {k}, rows {first}..{}", first + rows);
            }
            // Reseeding as one process would give the rank other values (this is what the skipping fixes).
            l.seed_dropout(7);
            if first > 0 {
                assert_ne!(masks(rows)[0], whole[0][first * 5..(first + rows) * 5]);
            }
        }
    }

    #[test]
    fn dora_forward_matches_an_f64_reference_of_the_rescaled_weight() {
        let (n, inp, out, r) = (4, 7, 5, 2);
        let l = dora_layer(inp, out, r, 51);
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (w, b, bias) = (v(&l.weight().unwrap()), v(l.adapter("x").unwrap().b().as_tensor()), v(l.bias().unwrap().as_tensor()));
        let (a, m, s) = (
            v(l.adapter("x").unwrap().a().as_tensor()),
            v(l.adapter("x").unwrap().magnitude().unwrap().as_tensor()),
            l.adapter("x").unwrap().scale(),
        );
        let x = rand_vec(n * inp, 52);
        let y = v(&l.forward(&t(x.clone(), (n, inp))).unwrap());
        // W' = m ⊙ (W + sBA) / ‖W + sBA‖_row, y = x·W'ᵀ + b, all in f64.
        for o in 0..out {
            let row: Vec<f64> = (0..inp)
                .map(|j| w[o * inp + j] as f64 + s * (0..r).map(|k| b[o * r + k] as f64 * a[k * inp + j] as f64).sum::<f64>())
                .collect();
            let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
            for i in 0..n {
                let want = m[o] as f64 / norm * (0..inp).map(|j| x[i * inp + j] as f64 * row[j]).sum::<f64>() + bias[o] as f64;
                // f32 sums of 7 terms ≲ 3 and one division: < 1e-5.
                assert!((y[i * out + o] as f64 - want).abs() < 1e-5, "y[{i}, {o}] = {} vs {want}", y[i * out + o]);
            }
        }
    }

    #[test]
    fn dora_gradients_of_a_b_and_the_magnitude_match_finite_differences_with_the_norm_held_constant() {
        let (n, inp, out, r) = (3, 5, 4, 2);
        let l = dora_layer(inp, out, r, 61);
        let x = t(rand_vec(n * inp, 62), (n, inp));
        let c = t(rand_vec(n * out, 63), (n, out));
        let y = l.forward(&x).unwrap();
        let grads = ((y.sqr().unwrap() * &c).unwrap().sum_all().unwrap() / 2.0).unwrap().backward().unwrap();
        let ad = l.adapter("x").unwrap();
        // PEFT (and the paper, §4.3) treat ‖W + sBA‖ as a constant: the finite differences hold it at its
        // value for the unperturbed A, B by computing the loss through a fixed f.
        let norm = ad.dora_norm(&l.weight().unwrap()).unwrap();
        let loss = |a: &Tensor, b: &Tensor, m: &Tensor| -> f64 {
            let f = (m / &norm).unwrap().to_dtype(DType::F64).unwrap();
            let w = (l.weight().unwrap() + (b.matmul(a).unwrap() * ad.scale()).unwrap()).unwrap().to_dtype(DType::F64).unwrap();
            let w = w.broadcast_mul(&f.unsqueeze(1).unwrap()).unwrap();
            let y = x
                .to_dtype(DType::F64)
                .unwrap()
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&l.bias().unwrap().as_tensor().to_dtype(DType::F64).unwrap())
                .unwrap();
            (y.sqr().unwrap() * c.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() / 2.0
        };
        let vars = [ad.a().as_tensor().clone(), ad.b().as_tensor().clone(), ad.magnitude().unwrap().as_tensor().clone()];
        for which in 0..3 {
            let g = grads.get(&vars[which]).expect("every DoRA tensor gets a gradient").flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let v0 = vars[which].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in 0..v0.len() {
                let h = 1e-2f32;
                let at = |d: f32| -> f64 {
                    let mut v = v0.clone();
                    v[i] += d;
                    let p = Tensor::from_vec(v, vars[which].shape(), &Device::Cpu).unwrap();
                    let mut args = vars.clone();
                    args[which] = p;
                    loss(&args[0], &args[1], &args[2])
                };
                let fd = (at(h) - at(-h)) / (2.0 * h as f64);
                // As the plain LoRA test: central differences with h = 1e-2, truncation O(h²).
                assert!((fd - g[i] as f64).abs() < 2e-3 + 2e-3 * fd.abs(), "tensor {which} [{i}]: fd {fd} vs autograd {}", g[i]);
            }
        }
    }
}
