//! How a new adapter starts ([`LoraLinear::add_adapter`], [`crate::Init`]): PEFT's initialisations of A and
//! B (B = 0 for all but `init_lora_weights = false`, so a new adapter changes no output), PiSSA's and
//! OLoRA's starting factors from the weight, DoRA's magnitude from its row norms.
//!
//! ```text
//! Normal / gaussian:  A ~ N(0, 1) / N(0, 1/r),  B = 0
//! Kaiming (true):     A ~ U(±1/√in),            B = 0
//! Random (false):     A ~ U(±1/√in),            B ~ U(±1/√r)
//! PiSSA:  W = U·S·Vᵀ,  A = √(S_r/s)·V_rᵀ,  B = U_r·√(S_r/s)      (s·B·A = U_r·S_r·V_rᵀ)
//! OLoRA:  W = Q·R,     A = R[:r],          B = Q[:, :r]
//! DoRA:   m = ‖W + s·B·A‖_row
//! ```

use candle_core::Tensor;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use super::{Adapter, AdapterSpec, LoraLinear};
use crate::config::Init;
use crate::decompose::{qr, svd, Dense};
use crate::error::{LoraError, Result};

impl LoraLinear {
    /// Adds a new adapter started as `spec.init` says (see [`Init`]), drawing from `rng`. Every
    /// initialisation but [`Init::Random`] leaves the layer's output unchanged.
    pub fn add_adapter<R: Rng + ?Sized>(&mut self, name: &str, spec: AdapterSpec, rng: &mut R) -> Result<()> {
        let rank = spec.rank;
        if rank == 0 {
            return Err(LoraError::config("r", rank, "rank must be at least 1"));
        }
        let (out, inp) = (self.out_features(), self.in_features());
        let dev = candle_core::Device::Cpu;
        let uniform = |n: usize, bound: f64, rng: &mut R| -> Vec<f32> {
            (0..n).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect()
        };
        let normal = |n: usize, std: f32, rng: &mut R| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let z: f32 = StandardNormal.sample(rng);
                    std * z
                })
                .collect()
        };
        let zeros = |n: usize| vec![0f32; n];
        if self.embedding && (spec.use_dora || spec.lora_bias || spec.init.rewrites_base()) {
            return Err(LoraError::config(
                "target_modules",
                name,
                "an embedding layer takes plain LoRA only (no DoRA, LoRA bias, PiSSA or OLoRA in lora-rs)",
            ));
        }
        let (a, b, initial) = match spec.init {
            // PEFT's embedding adapters: A = 0 and B ~ N(0, 1), or both N(0, 1) uninitialised (false).
            _ if self.embedding && spec.init == Init::Random => (normal(rank * inp, 1.0, rng), normal(out * rank, 1.0, rng), false),
            _ if self.embedding => (zeros(rank * inp), normal(out * rank, 1.0, rng), false),
            Init::Normal => (normal(rank * inp, 1.0, rng), zeros(out * rank), false),
            Init::PeftGaussian => (normal(rank * inp, 1.0 / rank as f32, rng), zeros(out * rank), false),
            Init::Kaiming => (uniform(rank * inp, 1.0 / (inp as f64).sqrt(), rng), zeros(out * rank), false),
            Init::Random => {
                (uniform(rank * inp, 1.0 / (inp as f64).sqrt(), rng), uniform(out * rank, 1.0 / (rank as f64).sqrt(), rng), false)
            }
            Init::Pissa { .. } | Init::Olora => {
                let (a, b) = self.factor_init(spec)?;
                (a, b, true)
            }
        };
        let (a, b) = (Tensor::from_vec(a, (rank, inp), &dev)?, Tensor::from_vec(b, (out, rank), &dev)?);
        let mut ad = Adapter::from_tensors(&a, &b, spec.alpha, spec.scale, spec.dropout)?;
        if initial {
            ad = ad.with_initial(&a, &b)?;
        }
        if spec.lora_bias {
            let v = if spec.init == Init::Random { uniform(out, 1.0 / (rank as f64).sqrt(), rng) } else { zeros(out) };
            ad = ad.with_lora_bias(&Tensor::from_vec(v, out, &dev)?)?;
        }
        if spec.use_dora {
            if !self.merged.is_empty() {
                return Err(LoraError::State(format!(
                    "cannot add DoRA adapter {name:?} while {:?} are merged: unmerge first",
                    self.merged
                )));
            }
            let norm = ad.dora_norm(&self.weight()?)?;
            ad = ad.with_magnitude(&norm)?;
        }
        self.insert_adapter(name, ad)
    }

    /// PiSSA's or OLoRA's starting factors (A0 (r, in), B0 (out, r)) for `spec` from the weight as stored now.
    pub fn initial_factors(&self, spec: AdapterSpec) -> Result<(Tensor, Tensor)> {
        let (a, b) = self.factor_init(spec)?;
        let dev = &candle_core::Device::Cpu;
        Ok((Tensor::from_vec(a, (spec.rank, self.in_features()), dev)?, Tensor::from_vec(b, (self.out_features(), spec.rank), dev)?))
    }

    fn factor_init(&self, spec: AdapterSpec) -> Result<(Vec<f32>, Vec<f32>)> {
        let (out, inp, r) = (self.out_features(), self.in_features(), spec.rank);
        if r > out.min(inp) {
            return Err(LoraError::config("r", r, format!("{:?} needs r ≤ min(out, in) = {}", spec.init, out.min(inp))));
        }
        let w = Dense::from_f32(&self.weight()?.flatten_all()?.to_vec1::<f32>()?, out, inp);
        let mut a = Vec::with_capacity(r * inp);
        let mut b = vec![0f32; out * r];
        match spec.init {
            Init::Olora => {
                let (q, rr) = qr(&w);
                a.extend(rr.data[..r * inp].iter().map(|&v| v as f32));
                for i in 0..out {
                    for k in 0..r {
                        b[i * r + k] = q.data[i * q.cols + k] as f32;
                    }
                }
            }
            _ => {
                // W = U·S·Vᵀ; S_r ← S_r / s; A = √S_r·V_rᵀ, B = U_r·√S_r, so s·B·A = U_r·S_r·V_rᵀ.
                let (u, sv, vt) = svd(&w, r);
                let root: Vec<f64> = sv.iter().map(|x| (x / spec.scale).sqrt()).collect();
                for (row, &rk) in vt.data.chunks_exact(inp).zip(&root) {
                    a.extend(row.iter().map(|&v| (v * rk) as f32));
                }
                for i in 0..out {
                    for k in 0..r {
                        b[i * r + k] = (u.data[i * r + k] * root[k]) as f32;
                    }
                }
            }
        }
        Ok((a, b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::testing::{rand_vec, t2 as t};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn zero_b_leaves_outputs_bit_identical() {
        let w = rand_vec(6 * 9, 7);
        let mut l = LoraLinear::new(t(w, (6, 9)), None).unwrap();
        let x = t(rand_vec(4 * 9, 8), (4, 9));
        let before = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        l.add_adapter("n", AdapterSpec::new(3, 2.0, 2.0 / 3.0), &mut StdRng::seed_from_u64(1)).unwrap();
        l.set_active(&["n"]).unwrap();
        let after = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(before, after); // y + s·0 adds exact zeros
        assert!(l.adapter("n").unwrap().a().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().any(|v| *v != 0.0));
    }

    #[test]
    fn kaiming_and_random_initialisations_draw_from_pytorchs_nn_linear_bounds() {
        // PEFT's true: A ~ U(±1/√in) (kaiming_uniform_ with a = √5), B = 0; false: nn.Linear's own init,
        // B ~ U(±1/√r) too. torch's generator cannot be reproduced: check support and variance instead.
        let (inp, out, r) = (400, 300, 8);
        let mut l = LoraLinear::new(t(vec![0.0; out * inp], (out, inp)), None).unwrap();
        let mut g = StdRng::seed_from_u64(3);
        l.add_adapter("k", AdapterSpec { init: Init::Kaiming, ..AdapterSpec::new(r, 1.0, 1.0) }, &mut g).unwrap();
        l.add_adapter("f", AdapterSpec { init: Init::Random, ..AdapterSpec::new(r, 1.0, 1.0) }, &mut g).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let check = |x: Vec<f32>, fan_in: usize, what: &str| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            assert!(x.iter().all(|&a| (a as f64).abs() <= bound), "{what}: outside ±1/√{fan_in}");
            let var = x.iter().map(|&a| (a as f64).powi(2)).sum::<f64>() / x.len() as f64;
            // U(±b) has variance b²/3; with n ≥ 2400 draws its estimate's relative error is ≈ √(0.8/n) ≤ 2%:
            // 8% is 4σ.
            let want = bound * bound / 3.0;
            assert!((var - want).abs() < 0.08 * want, "{what}: variance {var} vs {want}");
        };
        check(v(l.adapter("k").unwrap().a().as_tensor()), inp, "true: A");
        assert!(v(l.adapter("k").unwrap().b().as_tensor()).iter().all(|b| *b == 0.0));
        check(v(l.adapter("f").unwrap().a().as_tensor()), inp, "false: A");
        check(v(l.adapter("f").unwrap().b().as_tensor()), r, "false: B");
    }
}
