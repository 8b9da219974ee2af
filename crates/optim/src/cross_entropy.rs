//! Mean cross-entropy of logits z (N, V) against targets as one op, rows whose target is [`IGNORE`] left
//! out (transformers' `ignore_index`), over the K kept rows:
//!
//! ```text
//! loss = (1/K)·Σ_kept (log Σ_j e^(z_ij) − z_i,t_i)       (max-subtracted for range)
//! dz_ij = dloss·(softmax(z_i)_j − [j = t_i])/K  for kept rows, 0 for the others
//! ```
//!
//! Nothing is stored for the backward: each row's softmax is recomputed from z. The per-row losses are
//! summed in f64.
//!
//! In data-parallel training each rank holds some rows of a global batch of K kept rows; it divides by the
//! global K, not its own count ([`cross_entropy_over`]), so its gradient is its rows' share of the global
//! mean's, the ranks' gradients add up to it, and each row's dz has the bits one process gives it. The one cross-entropy of lora-rs: the language models' next-token loss (rows = tokens,
//! V = the vocabulary) and the MNIST network's (rows = images, V = 10 classes) both run it.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use lora::bridge::{cpu_slice, with_slice};
use lora_kernels::multiversion;
use lora_kernels::vector::{exp, for_each, max, sum_zip};

type CResult<T> = candle_core::Result<T>;

/// The target of a row that does not count.
pub const IGNORE: u32 = u32::MAX;

/// Rows per parallel block.
const BLOCK: usize = 64;

/// The mean cross-entropy (a scalar tensor) of `logits` (N, V) against `targets` (N values, each < V or
/// [`IGNORE`]): the op's candle entry point (differentiable in the logits).
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> CResult<Tensor> {
    let kept = targets.iter().filter(|&&t| t != IGNORE).count();
    if kept == 0 {
        candle_core::bail!("cross_entropy: every row is ignored, the mean is undefined")
    }
    cross_entropy_over(logits, targets, kept)
}

/// These rows' share of the mean cross-entropy over `total` kept rows of a global batch that other ranks
/// hold the rest of: `(1/total)·Σ_kept (log Σ_j e^(z_ij) − z_i,t_i)` (a scalar tensor), with the gradient
/// `(softmax − onehot)/total` per kept row. With `total` = these rows' kept count it is [`cross_entropy`].
pub fn cross_entropy_over(logits: &Tensor, targets: &[u32], total: usize) -> CResult<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("cross_entropy: {} targets for {n} rows of logits", targets.len())
    }
    if let Some(t) = targets.iter().find(|&&t| t != IGNORE && t as usize >= v) {
        candle_core::bail!("cross_entropy: target {t} is outside the vocabulary ({v})")
    }
    let kept = targets.iter().filter(|&&t| t != IGNORE).count();
    if total == 0 || total < kept {
        candle_core::bail!("cross_entropy: a mean over {total} rows cannot hold these {kept} kept rows")
    }
    let op = CrossEntropy { targets: Arc::new(targets.to_vec()), kept: total };
    let logits = logits.contiguous()?;
    if logits.track_op() {
        logits.apply_op1(op)
    } else {
        logits.apply_op1_no_bwd(&op)
    }
}

#[derive(Clone)]
struct CrossEntropy {
    targets: Arc<Vec<u32>>,
    kept: usize,
}

multiversion! {
    /// (max, Σ e^(z − max)) of one row.
    fn row_stats(z: &[f32]) -> (f32, f32) {
        let m = max(z);
        (m, sum_zip(z, z, |x, _| exp(x - m)))
    }
}

multiversion! {
    /// dz = c·(e^(z − max)/s − onehot(t)).
    fn row_grad(z: &[f32], m: f32, s: f32, t: usize, c: f32, dz: &mut [f32]) {
        let inv = c / s;
        for (d, &x) in dz.iter_mut().zip(z) {
            *d = exp(x - m) * inv;
        }
        dz[t] -= c;
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let z: &[f32] = cpu_slice(s, l).map_err(|e| candle_core::Error::msg(format!("{}: {e}", self.name())))?;
        let v = match l.dims() {
            [n, v] if *n == self.targets.len() => *v,
            d => candle_core::bail!("cross_entropy: logits {d:?} for {} targets", self.targets.len()),
        };
        let mut partial = vec![0f64; self.targets.len().div_ceil(BLOCK)];
        let jobs = z.chunks(BLOCK * v).zip(self.targets.chunks(BLOCK)).zip(partial.iter_mut()).collect();
        for_each(jobs, z.len(), |_, ((zb, tb), acc)| {
            for (row, &t) in zb.chunks_exact(v).zip(tb) {
                if t != IGNORE {
                    let (m, s) = row_stats(row);
                    *acc += (m + s.ln()) as f64 - row[t as usize] as f64;
                }
            }
        });
        let total: f64 = partial.iter().sum();
        Ok((CpuStorage::F32(vec![(total / self.kept as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let (_, v) = logits.dims2()?;
        let c = grad.flatten_all()?.to_vec1::<f32>()?.first().copied().unwrap_or(0.0) / self.kept as f32;
        with_slice(logits, |z| {
            let mut dz = vec![0f32; z.len()];
            let jobs = dz.chunks_mut(BLOCK * v).zip(z.chunks(BLOCK * v)).zip(self.targets.chunks(BLOCK)).collect();
            for_each(jobs, z.len(), |_, ((db, zb), tb)| {
                for ((drow, row), &t) in db.chunks_exact_mut(v).zip(zb.chunks_exact(v)).zip(tb) {
                    if t != IGNORE {
                        let (m, s) = row_stats(row);
                        row_grad(row, m, s, t as usize, c, drow);
                    }
                }
            });
            Ok(Some(Tensor::from_vec(dz, logits.dims(), &candle_core::Device::Cpu)?))
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn rand_var(n: usize, v: usize, seed: u64, scale: f32) -> Var {
        let mut g = StdRng::seed_from_u64(seed);
        let z: Vec<f32> = (0..n * v).map(|_| (g.random::<f32>() * 2.0 - 1.0) * scale).collect();
        Var::from_tensor(&Tensor::from_vec(z, (n, v), &Device::Cpu).unwrap()).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// f64 reference: (mean loss over kept rows, dz for dloss = c).
    fn reference(z: &[f32], v: usize, targets: &[u32], c: f64) -> (f64, Vec<f64>) {
        let kept = targets.iter().filter(|&&t| t != IGNORE).count() as f64;
        let (mut loss, mut dz) = (0f64, vec![0f64; z.len()]);
        for ((row, d), &t) in z.chunks(v).zip(dz.chunks_mut(v)).zip(targets) {
            if t == IGNORE {
                continue;
            }
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
            let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
            loss += m + s.ln() - row[t as usize] as f64;
            for (j, (dj, &x)) in d.iter_mut().zip(row).enumerate() {
                *dj = c / kept * ((x as f64 - m).exp() / s - if j == t as usize { 1.0 } else { 0.0 });
            }
        }
        (loss / kept, dz)
    }

    #[test]
    fn the_loss_and_its_gradient_match_an_f64_reference_with_ignored_rows() {
        // 150 rows (three parallel blocks, the last ragged) over 37 classes, logits up to ±8; every fifth row ignored.
        let (n, v) = (150, 37);
        let z = rand_var(n, v, 10, 8.0);
        let targets: Vec<u32> = (0..n as u32).map(|i| if i % 5 == 4 { IGNORE } else { (i * 7 + 3) % v as u32 }).collect();
        let loss = cross_entropy(z.as_tensor(), &targets).unwrap();
        let g = (&loss * 1.7).unwrap().backward().unwrap();
        let (want, dz) = reference(&flat(z.as_tensor()), v, &targets, 1.7);
        // A mean of 120 log-sum-exps of 37 f32 terms (exp within 2 ulp, sums in f32 per row, f64 across rows):
        // ≲ 1e-6 relative; each gradient entry is one softmax value times 1.7/120: a few ulp of 0.014.
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-6 * want.abs(), "{got} vs {want}");
        let gz = flat(g.get(z.as_tensor()).unwrap());
        for (i, (a, b)) in gz.iter().zip(&dz).enumerate() {
            assert!((*a as f64 - b).abs() < 1e-8, "dz[{i}]: {a} vs {b}");
        }
        assert!(gz[4 * v..5 * v].iter().all(|&d| d == 0.0), "an ignored row gets no gradient");
    }

    #[test]
    fn it_agrees_with_candle_nn_on_a_classifier_batch() {
        // The MNIST network's shape: 64 images, 10 classes.
        let z = rand_var(64, 10, 3, 5.0);
        let y: Vec<u32> = (0..64).map(|i| (i * 3 % 10) as u32).collect();
        let ours = cross_entropy(z.as_tensor(), &y).unwrap();
        let theirs = candle_nn::loss::cross_entropy(z.as_tensor(), &Tensor::new(y.as_slice(), &Device::Cpu).unwrap()).unwrap();
        let (a, b) = (ours.to_scalar::<f32>().unwrap(), theirs.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 1e-5 * b.abs(), "{a} vs {b}");
        let ga = flat(ours.backward().unwrap().get(z.as_tensor()).unwrap());
        let gb = flat(theirs.backward().unwrap().get(z.as_tensor()).unwrap());
        for (x, y) in ga.iter().zip(&gb) {
            assert!((x - y).abs() < 1e-7, "{x} vs {y}"); // entries ≤ 1/64; a few ulp
        }
    }

    #[test]
    fn shares_over_the_global_count_add_up_to_the_whole_batch_and_each_row_keeps_its_bits() {
        // 90 rows split 40 / 50 (as two ranks hold them), every seventh ignored: each share divides by the
        // global kept count, so the rows' gradients are bit for bit the whole batch's, and the two losses add
        // to the whole's up to the f32 rounding of each share (a few ulp of a loss ≈ 3).
        let (n, v) = (90, 23);
        let z = rand_var(n, v, 12, 4.0);
        let targets: Vec<u32> = (0..n as u32).map(|i| if i % 7 == 6 { IGNORE } else { (i * 5 + 1) % v as u32 }).collect();
        let kept = targets.iter().filter(|&&t| t != IGNORE).count();
        let whole = cross_entropy(z.as_tensor(), &targets).unwrap();
        let gw = flat(whole.backward().unwrap().get(z.as_tensor()).unwrap());
        let mut sum = 0f32;
        for (rows, off) in [(40, 0), (50, 40)] {
            let part = Var::from_tensor(&z.as_tensor().narrow(0, off, rows).unwrap()).unwrap();
            let l = cross_entropy_over(part.as_tensor(), &targets[off..off + rows], kept).unwrap();
            sum += l.to_scalar::<f32>().unwrap();
            let g = flat(l.backward().unwrap().get(part.as_tensor()).unwrap());
            let want = &gw[off * v..(off + rows) * v];
            assert!(g.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "rows {off}..{}: gradients differ", off + rows);
        }
        let w = whole.to_scalar::<f32>().unwrap();
        assert!((sum - w).abs() <= 4.0 * f32::EPSILON * w.abs(), "{sum} vs {w}");
        let e = cross_entropy_over(z.as_tensor(), &targets, 3).unwrap_err().to_string();
        assert!(e.contains("a mean over 3 rows cannot hold these"), "{e}");
    }

    #[test]
    fn bad_targets_are_errors_naming_them_not_panics() {
        let z = rand_var(3, 5, 11, 3.0);
        assert!(cross_entropy(z.as_tensor(), &[IGNORE; 3]).unwrap_err().to_string().contains("every row is ignored"));
        assert!(cross_entropy(z.as_tensor(), &[0, 5, 1]).unwrap_err().to_string().contains("target 5"));
        assert!(cross_entropy(z.as_tensor(), &[0, 1]).unwrap_err().to_string().contains("2 targets for 3 rows"));
    }
}
