//! Task-arithmetic merges of stacked tensors, as PEFT's `peft.utils.merge_utils` computes them, for
//! [`crate::LoraModel::combine_adapters`]. Each function takes n same-shaped task tensors t_i (flattened)
//! and weights w_i and returns one tensor:
//!
//! ```text
//! task arithmetic   Σ_i w_i·t_i
//! magnitude_prune   Σ_i w_i·keep_k(t_i)            keep_k: the k = ⌊density·len⌋ largest |values|
//! dare_linear       Σ_i w_i·drop_p(t_i)/density     drop_p: each value kept with probability density
//! ties              Σ_i w_i·t'_i·[sign t'_i = σ] / max(1, #{i: sign t'_i = σ}),  t'_i = keep_k(t_i)
//! dare_ties         ties with t'_i = drop_p(t_i)/density
//! ```
//!
//! where σ, per element, is the majority sign: the sign of Σ_i t'_i ("total") or of Σ_i sign t'_i
//! ("frequency"), ties going to +; zeros never count. A density ≥ 1 prunes nothing (PEFT's rule).

use rand::rngs::StdRng;
use rand::Rng;

use crate::error::{LoraError, Result};

/// How TIES picks each element's majority sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySign {
    /// The sign of the sum of the (pruned) values.
    #[default]
    Total,
    /// The sign most (pruned) values have.
    Frequency,
}

/// Which merge [`merge_tasks`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskMerge {
    Linear,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
}

/// Keeps the `⌊density·len⌋` values of largest magnitude (the earlier index first among equal magnitudes).
fn prune_magnitude(t: &[f32], density: f64) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let k = (density * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|&a, &b| t[b].abs().total_cmp(&t[a].abs()).then(a.cmp(&b)));
    let mut out = vec![0f32; t.len()];
    for &i in &order[..k] {
        out[i] = t[i];
    }
    out
}

/// Keeps each value with probability `density` and divides the kept ones by it.
fn prune_random(t: &[f32], density: f64, rng: &mut StdRng) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    t.iter().map(|&v| if rng.random::<f64>() < density { v / density as f32 } else { 0.0 }).collect()
}

fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Merges `tasks` (each of the same length) with `weights` (see the module docs). `rng` draws DARE's masks.
pub(crate) fn merge_tasks(
    kind: TaskMerge,
    tasks: &[Vec<f32>],
    weights: &[f64],
    density: f64,
    majority: MajoritySign,
    rng: &mut StdRng,
) -> Vec<f32> {
    let pruned: Vec<Vec<f32>> = match kind {
        TaskMerge::Linear => tasks.to_vec(),
        TaskMerge::Ties | TaskMerge::MagnitudePrune => tasks.iter().map(|t| prune_magnitude(t, density)).collect(),
        TaskMerge::DareLinear | TaskMerge::DareTies => tasks.iter().map(|t| prune_random(t, density, rng)).collect(),
    };
    let n = tasks.first().map_or(0, Vec::len);
    let mut out = vec![0f32; n];
    for (j, o) in out.iter_mut().enumerate() {
        match kind {
            TaskMerge::Linear | TaskMerge::DareLinear | TaskMerge::MagnitudePrune => {
                *o = pruned.iter().zip(weights).map(|(t, &w)| t[j] * w as f32).sum();
            }
            TaskMerge::Ties | TaskMerge::DareTies => {
                let m: f32 = match majority {
                    MajoritySign::Total => pruned.iter().map(|t| t[j]).sum(),
                    MajoritySign::Frequency => pruned.iter().map(|t| sign(t[j])).sum(),
                };
                let maj = if m >= 0.0 { 1.0 } else { -1.0 };
                let (mut sum, mut count) = (0f32, 0f32);
                for (t, &w) in pruned.iter().zip(weights) {
                    if sign(t[j]) == maj {
                        sum += t[j] * w as f32;
                        count += 1.0;
                    }
                }
                *o = sum / count.max(1.0);
            }
        }
    }
    out
}

/// Checks `density` (PEFT's rule: ≥ 0; ≥ 1 prunes nothing; 0 keeps nothing).
pub(crate) fn check_density(density: f64) -> Result<()> {
    if !(density.is_finite() && density >= 0.0) {
        return Err(LoraError::config("density", density, "must be a number ≥ 0 (1 or more prunes nothing)"));
    }
    Ok(())
}

/// PyTorch's `torch.quantile` (linear interpolation between the two nearest ranks) of `values` at `q`.
pub(crate) fn quantile(values: &[f32], q: f64) -> f32 {
    let mut v: Vec<f32> = values.to_vec();
    v.sort_by(f32::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let frac = (pos - lo as f64) as f32;
    v[lo] + (v[hi] - v[lo]) * frac
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(1)
    }

    #[test]
    fn ties_keeps_the_top_values_and_averages_those_with_the_majority_sign() {
        // Two tasks; density 0.5 keeps the 2 largest |values| of each.
        let t = vec![vec![3.0, -1.0, 0.5, -2.0], vec![-4.0, 2.0, 0.1, 1.0]];
        // keep: t0 → [3, 0, 0, −2]; t1 → [−4, 2, 0, 0]. Total sums: [−1, 2, 0, −2] → σ = [−, +, +, −].
        let got = merge_tasks(TaskMerge::Ties, &t, &[1.0, 0.5], 0.5, MajoritySign::Total, &mut rng());
        // j0: only t1 (−4·0.5) agrees; j1: t1 (2·0.5); j2: none (0/1); j3: t0 (−2·1).
        assert_eq!(got, vec![-2.0, 1.0, 0.0, -2.0]);
        // Frequency at j0: signs + and −, sum 0 → σ = +, so t0's 3 wins.
        let got = merge_tasks(TaskMerge::Ties, &t, &[1.0, 0.5], 0.5, MajoritySign::Frequency, &mut rng());
        assert_eq!(got[0], 3.0);
    }

    #[test]
    fn magnitude_prune_and_dare_at_full_density_are_the_weighted_sum() {
        let t = vec![vec![1.0, -2.0, 3.0], vec![0.5, 0.25, -1.0]];
        let sum = merge_tasks(TaskMerge::Linear, &t, &[2.0, -1.0], 1.0, MajoritySign::Total, &mut rng());
        assert_eq!(sum, vec![1.5, -4.25, 7.0]);
        for kind in [TaskMerge::MagnitudePrune, TaskMerge::DareLinear] {
            assert_eq!(merge_tasks(kind, &t, &[2.0, -1.0], 1.0, MajoritySign::Total, &mut rng()), sum);
        }
        let pruned = merge_tasks(TaskMerge::MagnitudePrune, &t, &[1.0, 1.0], 0.34, MajoritySign::Total, &mut rng());
        assert_eq!(pruned, vec![0.0, 0.0, 2.0]); // ⌊0.34·3⌋ = 1 value each: 3 and −1
    }

    #[test]
    fn dare_keeps_about_density_of_the_values_rescaled_and_is_reproducible_by_seed() {
        let t = vec![(0..20_000).map(|i| 1.0 + (i % 7) as f32).collect::<Vec<_>>()];
        let a = merge_tasks(TaskMerge::DareLinear, &t, &[1.0], 0.3, MajoritySign::Total, &mut StdRng::seed_from_u64(9));
        let b = merge_tasks(TaskMerge::DareLinear, &t, &[1.0], 0.3, MajoritySign::Total, &mut StdRng::seed_from_u64(9));
        assert_eq!(a, b);
        let kept = a.iter().filter(|v| **v != 0.0).count() as f64 / a.len() as f64;
        // Binomial(20000, 0.3): standard deviation of the fraction √(0.21/20000) ≈ 0.0032; 5σ = 0.016.
        assert!((kept - 0.3).abs() < 0.016, "kept {kept}");
        assert!(a.iter().zip(&t[0]).all(|(d, v)| *d == 0.0 || *d == v / 0.3f32));
    }

    #[test]
    fn quantile_interpolates_as_torch() {
        assert_eq!(quantile(&[4.0, 1.0, 3.0, 2.0], 0.5), 2.5);
        assert!((quantile(&[1.0, 2.0, 3.0], 0.9) - 2.8).abs() < 1e-6);
    }
}
