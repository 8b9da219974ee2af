//! Merging adapters into the base, taking them back out, and combining adapters into new ones.
//!
//! Merge: `W ← W + s·B·A`; unmerge: `W ← W − s·B·A` (exact up to one rounding per element each way;
//! [`BaseSnapshot`] restores bit-exactly). Combinations follow PEFT's `add_weighted_adapter`:
//!
//! - `Cat`: `A = [A_1; …; A_n]` (Σr_i, in), `B = [w_1 s_1 B_1, …, w_n s_n B_n]` (out, Σr_i), scale 1, so
//!   `B·A = Σ w_i s_i B_i A_i` exactly as mathematics (the weighted sum of the adapters' updates).
//! - `Linear` (equal ranks): `A = Σ √w_i · s_i · A_i`, `B = Σ √w_i · B_i`, scale 1. Not the sum of the
//!   updates (cross terms `B_i A_j` appear); it is what PEFT computes, for adapters trained from one init.

use candle_core::Tensor;

use crate::config::{LoraConfig, Scaling};
use crate::error::{LoraError, Result};
use crate::linear::Adapter;
use crate::model::LoraModel;

/// How [`LoraModel::combine_adapters`] builds the new adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    /// Concatenate ranks: exact weighted sum of updates.
    Cat,
    /// Weighted sum of A's and of B's (equal ranks only).
    Linear,
}

/// Exact copies of every base weight and bias, for a bit-exact restore after merges.
#[derive(Debug, Clone)]
pub struct BaseSnapshot {
    tensors: Vec<(String, Tensor, Option<Tensor>)>,
}

impl LoraModel {
    /// Copies every layer's weight and bias as stored now.
    pub fn snapshot_base(&self) -> Result<BaseSnapshot> {
        let mut tensors = Vec::new();
        for (n, l) in self.layers() {
            tensors.push((n.to_string(), l.weight().as_tensor().copy()?, l.bias().map(|b| b.as_tensor().copy()).transpose()?));
        }
        Ok(BaseSnapshot { tensors })
    }

    /// Writes a snapshot back (bit-exact) and forgets every merge.
    pub fn restore_base(&mut self, snap: &BaseSnapshot) -> Result<()> {
        for (n, w, b) in &snap.tensors {
            self.layer_mut(n)?.restore_base(w, b.as_ref())?;
        }
        Ok(())
    }

    /// Creates adapter `new_name` from weighted existing adapters (see the module docs).
    pub fn combine_adapters(&mut self, adapters: &[(&str, f64)], combination: Combination, new_name: &str) -> Result<()> {
        if adapters.is_empty() {
            return Err(LoraError::config("adapters", "[]", "name at least one adapter to combine"));
        }
        if self.adapter_names().iter().any(|n| n == new_name) {
            return Err(LoraError::DuplicateAdapter(new_name.to_string()));
        }
        for (name, w) in adapters {
            self.check_adapter(name)?;
            if !w.is_finite() || (combination == Combination::Linear && *w < 0.0) {
                return Err(LoraError::config(format!("weight of {name}"), w, "must be a finite number (non-negative for linear)"));
            }
        }
        let mut built: Vec<(String, Adapter)> = Vec::new();
        for (module, layer) in self.layers() {
            let present: Vec<(&Adapter, f64)> = adapters.iter().filter_map(|(n, w)| layer.adapter(n).ok().map(|a| (a, *w))).collect();
            if present.is_empty() {
                continue;
            }
            let (a, b) = match combination {
                Combination::Cat => {
                    let a_parts: Vec<Tensor> = present.iter().map(|(ad, _)| ad.a().as_tensor().clone()).collect();
                    let b_parts: Vec<Tensor> =
                        present.iter().map(|(ad, w)| ad.b().as_tensor() * (w * ad.scale())).collect::<candle_core::Result<_>>()?;
                    (Tensor::cat(&a_parts, 0)?, Tensor::cat(&b_parts, 1)?) // (Σr, in), (out, Σr)
                }
                Combination::Linear => {
                    let r = present[0].0.rank();
                    if let Some((bad, _)) = present.iter().find(|(ad, _)| ad.rank() != r) {
                        return Err(LoraError::config(
                            format!("{module} ranks"),
                            format!("{} vs {r}", bad.rank()),
                            "linear combination needs equal ranks; use cat",
                        ));
                    }
                    let mut a = (present[0].0.a().as_tensor() * 0.0)?;
                    let mut b = (present[0].0.b().as_tensor() * 0.0)?;
                    for (ad, w) in &present {
                        a = (a + (ad.a().as_tensor() * (w.sqrt() * ad.scale()))?)?;
                        b = (b + (ad.b().as_tensor() * w.sqrt())?)?;
                    }
                    (a, b)
                }
            };
            let r = a.dims()[0];
            built.push((module.to_string(), Adapter::from_tensors(&a, &b, r as f64, 1.0, 0.0)?));
        }
        let mut config = LoraConfig { scaling: Scaling::Standard, ..LoraConfig::default() };
        config.r = built.first().map_or(1, |(_, a)| a.rank());
        config.alpha = config.r as f64;
        config.target_modules = built.iter().map(|(m, _)| m.clone()).collect();
        for (module, ad) in &built {
            if ad.rank() != config.r {
                // Pattern keys are regular expressions: a module's own name, escaped, matches only it.
                config.rank_pattern.insert(regex::escape(module), ad.rank());
                config.alpha_pattern.insert(regex::escape(module), ad.rank() as f64);
            }
        }
        for (module, ad) in built {
            self.layer_mut(&module)?.insert_adapter(new_name, ad)?;
        }
        self.set_adapter_config(new_name, config);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::LoraLinear;
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn model_with(adapters: &[(&str, usize, f64)]) -> LoraModel {
        let mut m = LoraModel::new();
        let mut g = StdRng::seed_from_u64(3);
        for (n, i, o) in [("l1", 9, 6), ("l2", 6, 4)] {
            let w = Tensor::randn(0f32, 1.0, (o, i), &Device::Cpu).unwrap();
            m.push(n, LoraLinear::new(w, Some(Tensor::randn(0f32, 1.0, o, &Device::Cpu).unwrap())).unwrap()).unwrap();
        }
        for (name, r, alpha) in adapters {
            m.add_adapter(name, &LoraConfig::new(*r, *alpha), &mut g).unwrap();
            for (_, l) in m.layers() {
                let b = l.adapter(name).unwrap().b();
                b.set(&Tensor::randn(0f32, 1.0, b.shape(), &Device::Cpu).unwrap()).unwrap();
            }
        }
        m
    }

    fn out(m: &LoraModel, x: &Tensor) -> Vec<f32> {
        let h = m.layer("l1").unwrap().forward(x).unwrap().relu().unwrap();
        m.layer("l2").unwrap().forward(&h).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn cat_combination_equals_the_weighted_sum_of_updates() {
        let mut m = model_with(&[("a", 2, 3.0), ("b", 3, 1.0)]);
        m.combine_adapters(&[("a", 0.7), ("b", -1.5)], Combination::Cat, "ab").unwrap();
        for (_, l) in m.layers() {
            let want = ((l.adapter("a").unwrap().delta_weight().unwrap() * 0.7).unwrap()
                + (l.adapter("b").unwrap().delta_weight().unwrap() * -1.5).unwrap())
            .unwrap();
            let got = l.adapter("ab").unwrap().delta_weight().unwrap();
            assert_eq!(l.adapter("ab").unwrap().rank(), 5);
            let d = (want - got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            // Products of N(0,1)-sized entries summed over 5 ranks, different association: ≤ a few f32 ulps of ~10.
            assert!(d < 1e-5, "{d}");
        }
        assert_eq!(m.peft_config("ab").unwrap().r, 5);
    }

    #[test]
    fn linear_combination_of_one_adapter_with_weight_one_reproduces_it() {
        let mut m = model_with(&[("a", 2, 5.0)]);
        m.combine_adapters(&[("a", 1.0)], Combination::Linear, "lin").unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 9), &Device::Cpu).unwrap();
        m.set_active(&["a"]).unwrap();
        let ya = out(&m, &x);
        m.set_active(&["lin"]).unwrap();
        let yl = out(&m, &x);
        // A scaled by s instead of the output: one extra rounding per product, relative ~1e-7 of |y| ≲ 100.
        assert!(ya.iter().zip(&yl).all(|(p, q)| (p - q).abs() < 1e-4));
        let e = m.combine_adapters(&[("a", 1.0), ("lin", -1.0)], Combination::Linear, "z").unwrap_err().to_string();
        assert!(e.contains("weight of lin = -1"), "{e}");
    }

    #[test]
    fn snapshot_restore_is_bit_exact_after_merge_and_unmerge() {
        let mut m = model_with(&[("a", 2, 3.0)]);
        let snap = m.snapshot_base().unwrap();
        let bits = |m: &LoraModel| -> Vec<u32> {
            m.base_state().unwrap().iter().flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).map(f32::to_bits).collect()
        };
        let before = bits(&m);
        m.merge("a", true).unwrap();
        assert_ne!(bits(&m), before);
        m.unmerge("a").unwrap();
        m.merge("a", true).unwrap();
        m.restore_base(&snap).unwrap();
        assert_eq!(bits(&m), before);
        assert!(m.layers().all(|(_, l)| l.merged().is_empty()));
    }
}
