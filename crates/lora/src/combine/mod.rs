//! Combining adapters into a new one ([`LoraModel::combine_adapters_with`]): what PEFT 0.21's
//! `add_weighted_adapter` computes, per layer, for adapters i with weights w_i and scales s_i (the new
//! adapter has alpha = r, so its scale is 1):
//!
//! - `Cat`: `A = [w_1 s_1 A_1; …; w_n s_n A_n]` (Σr_i, in), `B = [B_1, …, B_n]` (out, Σr_i): exactly the
//!   weighted sum of the updates, `B·A = Σ w_i s_i B_i A_i`.
//! - `Linear`, `Ties`, `DareLinear`, `DareTies`, `MagnitudePrune` (equal ranks): the merge of
//!   [`crate::combine`] applied to the A's with weights `sign(w_i s_i)·√|w_i s_i|` and to the B's with
//!   weights `√|w_i s_i|`. Not the sum of the updates (cross terms `B_i A_j` appear); it is what PEFT
//!   computes, meant for adapters trained from one initialisation.
//! - `Svd`, `TiesSvd`, `DareLinearSvd`, `DareTiesSvd`, `MagnitudePruneSvd`: the same merges of the full
//!   updates `ΔW_i = s_i B_i A_i` with weights w_i, then the top `svd_rank` singular triplets of the
//!   result: `B = U·S`, `A = Vᵀ` (optionally clamped to ±the `svd_clamp` quantile of their entries).

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::config::{LoraConfig, Scaling};
use crate::decompose::{svd, Dense};
use crate::error::{LoraError, Result};
use task_merge::{check_density, merge_tasks, quantile, TaskMerge};

mod task_merge;

use crate::bridge::values as flat;
use crate::linear::Adapter;
use crate::model::LoraModel;
pub use task_merge::MajoritySign;

/// How [`LoraModel::combine_adapters`] builds the new adapter (PEFT's `combination_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    /// Concatenate ranks: exact weighted sum of updates.
    Cat,
    /// Weighted sum of A's and of B's (equal ranks only).
    Linear,
    /// SVD of the weighted sum of updates.
    Svd,
    /// TIES on the A's and on the B's.
    Ties,
    /// TIES on the updates, then SVD.
    TiesSvd,
    /// DARE (random drop, rescale) then a weighted sum, on the A's and on the B's.
    DareLinear,
    /// DARE on the updates, then SVD.
    DareLinearSvd,
    /// DARE then TIES, on the A's and on the B's.
    DareTies,
    /// DARE then TIES on the updates, then SVD.
    DareTiesSvd,
    /// Magnitude pruning then a weighted sum, on the A's and on the B's.
    MagnitudePrune,
    /// Magnitude pruning of the updates, then SVD.
    MagnitudePruneSvd,
}

impl Combination {
    /// Every combination with PEFT's name for it.
    pub const ALL: [(Combination, &'static str); 11] = [
        (Combination::Cat, "cat"),
        (Combination::Linear, "linear"),
        (Combination::Svd, "svd"),
        (Combination::Ties, "ties"),
        (Combination::TiesSvd, "ties_svd"),
        (Combination::DareLinear, "dare_linear"),
        (Combination::DareLinearSvd, "dare_linear_svd"),
        (Combination::DareTies, "dare_ties"),
        (Combination::DareTiesSvd, "dare_ties_svd"),
        (Combination::MagnitudePrune, "magnitude_prune"),
        (Combination::MagnitudePruneSvd, "magnitude_prune_svd"),
    ];

    /// PEFT's `combination_type` name.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(c, _)| *c == self).map_or("?", |(_, n)| n)
    }

    /// The combination PEFT calls `name`.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(c, _)| *c).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
            LoraError::config("combination_type", name, format!("must be one of {}", names.join(", ")))
        })
    }

    /// The merge it applies (to A's and B's, or to the updates for the SVD kinds).
    fn task_merge(self) -> Option<TaskMerge> {
        use Combination::*;
        match self {
            Cat => None,
            Linear | Svd => Some(TaskMerge::Linear),
            Ties | TiesSvd => Some(TaskMerge::Ties),
            DareLinear | DareLinearSvd => Some(TaskMerge::DareLinear),
            DareTies | DareTiesSvd => Some(TaskMerge::DareTies),
            MagnitudePrune | MagnitudePruneSvd => Some(TaskMerge::MagnitudePrune),
        }
    }

    fn is_svd(self) -> bool {
        self.name().ends_with("svd")
    }
}

/// The settings of the pruning and SVD combinations (PEFT's `add_weighted_adapter` arguments).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CombineOptions {
    /// Fraction of values kept by TIES, DARE and magnitude pruning (≥ 1 keeps all).
    pub density: f64,
    /// TIES' majority sign rule.
    pub majority_sign: MajoritySign,
    /// Rank of the SVD combinations (default: the largest rank among the adapters).
    pub svd_rank: Option<usize>,
    /// Clamp the SVD factors to ± this quantile of their entries (in (0, 1]).
    pub svd_clamp: Option<f64>,
    /// Seed of DARE's random masks (PEFT draws them from torch's global generator; lora-rs from its own,
    /// so a seed reproduces lora-rs' result, not PEFT's).
    pub seed: u64,
}

impl Default for CombineOptions {
    fn default() -> Self {
        CombineOptions { density: 1.0, majority_sign: MajoritySign::Total, svd_rank: None, svd_clamp: None, seed: 0 }
    }
}

impl LoraModel {
    /// Creates adapter `new_name` from weighted existing adapters (see the module docs), with default
    /// [`CombineOptions`].
    pub fn combine_adapters(&mut self, adapters: &[(&str, f64)], combination: Combination, new_name: &str) -> Result<()> {
        self.combine_adapters_with(adapters, combination, &CombineOptions::default(), new_name)
    }

    /// Creates adapter `new_name` from weighted existing adapters (see the module docs). One adapter is
    /// always combined as `Linear`, as PEFT does.
    pub fn combine_adapters_with(
        &mut self,
        adapters: &[(&str, f64)],
        combination: Combination,
        opts: &CombineOptions,
        new_name: &str,
    ) -> Result<()> {
        if adapters.is_empty() {
            return Err(LoraError::config("adapters", "[]", "name at least one adapter to combine"));
        }
        if self.adapter_names().iter().any(|n| n == new_name) {
            return Err(LoraError::DuplicateAdapter(new_name.to_string()));
        }
        check_density(opts.density)?;
        if let Some(q) = opts.svd_clamp.filter(|q| !(*q > 0.0 && *q <= 1.0)) {
            return Err(LoraError::config("svd_clamp", q, "must be in (0, 1]"));
        }
        if opts.svd_rank == Some(0) {
            return Err(LoraError::config("svd_rank", 0, "must be at least 1"));
        }
        let combination = if adapters.len() == 1 { Combination::Linear } else { combination };
        for (name, w) in adapters {
            self.check_adapter(name)?;
            if !w.is_finite() {
                return Err(LoraError::config(format!("weight of {name}"), w, "must be a finite number"));
            }
            for (module, layer) in self.layers() {
                if layer.adapter(name).is_ok_and(|ad| !ad.is_plain()) {
                    return Err(LoraError::config(
                        format!("adapter {name}"),
                        module,
                        "uses DoRA, a LoRA bias or PiSSA/OLoRA there: only plain LoRA adapters can be combined (save PiSSA/OLoRA converted first)",
                    ));
                }
            }
        }
        let max_rank =
            self.layers().flat_map(|(_, l)| adapters.iter().filter_map(|(n, _)| l.adapter(n).ok().map(Adapter::rank))).max().unwrap_or(1);
        let svd_rank = opts.svd_rank.unwrap_or(max_rank);
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let mut built: Vec<(String, Adapter)> = Vec::new();
        for (module, layer) in self.layers() {
            let present: Vec<(&Adapter, f64)> = adapters.iter().filter_map(|(n, w)| layer.adapter(n).ok().map(|a| (a, *w))).collect();
            if present.is_empty() {
                continue;
            }
            let (a, b) = match combination.task_merge() {
                None => {
                    let a_parts: Vec<Tensor> =
                        present.iter().map(|(ad, w)| ad.a().as_tensor() * (w * ad.scale())).collect::<candle_core::Result<_>>()?;
                    let b_parts: Vec<Tensor> = present.iter().map(|(ad, _)| ad.b().as_tensor().clone()).collect();
                    (Tensor::cat(&a_parts, 0)?, Tensor::cat(&b_parts, 1)?) // (Σr, in), (out, Σr)
                }
                Some(kind) if combination.is_svd() => {
                    let (out, inp) = (layer.out_features(), layer.in_features());
                    let deltas: Vec<Vec<f32>> = present.iter().map(|(ad, _)| flat(&ad.delta_weight()?)).collect::<Result<_>>()?;
                    let weights: Vec<f64> = present.iter().map(|(_, w)| *w).collect();
                    let merged = merge_tasks(kind, &deltas, &weights, opts.density, opts.majority_sign, &mut rng);
                    let (u, s, vt) = svd(&Dense::from_f32(&merged, out, inp), svd_rank);
                    let k = s.len();
                    let mut bv: Vec<f32> = (0..out * k).map(|i| (u.data[i] * s[i % k]) as f32).collect(); // U·S
                    let mut av: Vec<f32> = vt.data.iter().map(|&v| v as f32).collect(); // Vᵀ
                    if let Some(q) = opts.svd_clamp {
                        let all: Vec<f32> = bv.iter().chain(&av).copied().collect();
                        let hi = quantile(&all, q);
                        for v in bv.iter_mut().chain(av.iter_mut()) {
                            *v = v.clamp(-hi, hi);
                        }
                    }
                    let dev = &candle_core::Device::Cpu;
                    (Tensor::from_vec(av, (k, inp), dev)?, Tensor::from_vec(bv, (out, k), dev)?)
                }
                Some(kind) => {
                    let r = present[0].0.rank();
                    if let Some((bad, _)) = present.iter().find(|(ad, _)| ad.rank() != r) {
                        return Err(LoraError::config(
                            format!("{module} ranks"),
                            format!("{} vs {r}", bad.rank()),
                            format!("{} needs equal ranks; use cat or an svd combination", combination.name()),
                        ));
                    }
                    let ws: Vec<f64> = present.iter().map(|(ad, w)| w * ad.scale()).collect();
                    let wa: Vec<f64> = ws.iter().map(|w| w.signum() * w.abs().sqrt()).collect();
                    let wb: Vec<f64> = ws.iter().map(|w| w.abs().sqrt()).collect();
                    let ta: Vec<Vec<f32>> = present.iter().map(|(ad, _)| flat(ad.a().as_tensor())).collect::<Result<_>>()?;
                    let tb: Vec<Vec<f32>> = present.iter().map(|(ad, _)| flat(ad.b().as_tensor())).collect::<Result<_>>()?;
                    let a = merge_tasks(kind, &ta, &wa, opts.density, opts.majority_sign, &mut rng);
                    let b = merge_tasks(kind, &tb, &wb, opts.density, opts.majority_sign, &mut rng);
                    let dev = &candle_core::Device::Cpu;
                    (Tensor::from_vec(a, (r, layer.in_features()), dev)?, Tensor::from_vec(b, (layer.out_features(), r), dev)?)
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
pub(crate) mod tests {
    use super::*;
    use crate::linear::LoraLinear;
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// Layers l1 (6, 9) and l2 (4, 6) with random weights and biases, and the given adapters (name, r,
    /// alpha) on both with random A and B.
    pub(crate) fn model_with(adapters: &[(&str, usize, f64)]) -> LoraModel {
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
        let e = m.combine_adapters(&[("a", f64::NAN), ("lin", -1.0)], Combination::Linear, "z").unwrap_err().to_string();
        assert!(e.contains("weight of a = NaN"), "{e}");
    }
}
