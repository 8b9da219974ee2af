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

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::{cpu_slice, exp, for_each, max, multiversion, sum_zip, tensor, with_values, CResult};

/// The target of a row that does not count.
pub const IGNORE: u32 = u32::MAX;

/// Rows per parallel block.
const BLOCK: usize = 64;

/// The mean cross-entropy (a scalar tensor) of `logits` (N, V) against `targets` (N values, each < V or
/// [`IGNORE`]): the op's candle entry point (differentiable in the logits).
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> CResult<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("cross_entropy: {} targets for {n} rows of logits", targets.len())
    }
    if let Some(t) = targets.iter().find(|&&t| t != IGNORE && t as usize >= v) {
        candle_core::bail!("cross_entropy: target {t} is outside the vocabulary ({v})")
    }
    let kept = targets.iter().filter(|&&t| t != IGNORE).count();
    if kept == 0 {
        candle_core::bail!("cross_entropy: every row is ignored, the mean is undefined")
    }
    let op = CrossEntropy { targets: Arc::new(targets.to_vec()), kept };
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
        "lm-fused-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let z = cpu_slice(self.name(), s, l)?;
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
        with_values(self.name(), logits, |z| {
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
            Ok(Some(tensor(dz, logits.dims())?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::*;
    use candle_core::Device;

    #[test]
    fn fused_cross_entropy_and_its_gradient_match_the_reference() {
        // 150 rows (three parallel blocks, the last ragged) over a vocabulary of 37, logits up to ±8.
        let (n, v) = (150, 37);
        let z = rand_var(&[n, v], 10, 8.0);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % v as u32).collect();
        let lf = cross_entropy(z.as_tensor(), &targets).unwrap();
        let gf = (&lf * 1.7).unwrap().backward().unwrap();
        let lr = crate::ops::cross_entropy(z.as_tensor(), &Tensor::new(targets.as_slice(), &Device::Cpu).unwrap()).unwrap();
        let gr = (&lr * 1.7).unwrap().backward().unwrap();
        // The loss is a mean of 150 logsumexps of 37 terms: f32 rounding ≲ 1e-6 relative (ours sums in f64,
        // the reference in f32). The gradient is one softmax value per entry: a few ulp.
        assert_close(&flat(&lf), &flat(&lr), 1e-5, "loss");
        assert_close(&flat(gf.get(z.as_tensor()).unwrap()), &flat(gr.get(z.as_tensor()).unwrap()), 1e-6, "dz");
    }

    #[test]
    fn ignored_rows_count_for_nothing() {
        // The loss over rows 0 and 2 with row 1 ignored equals the reference over rows 0 and 2 alone.
        let z = rand_var(&[3, 5], 11, 3.0);
        let lf = cross_entropy(z.as_tensor(), &[1, IGNORE, 4]).unwrap();
        let g = lf.backward().unwrap();
        let kept = Tensor::cat(&[z.as_tensor().narrow(0, 0, 1).unwrap(), z.as_tensor().narrow(0, 2, 1).unwrap()], 0).unwrap();
        let lr = crate::ops::cross_entropy(&kept, &Tensor::new(&[1u32, 4], &Device::Cpu).unwrap()).unwrap();
        assert_close(&flat(&lf), &flat(&lr), 1e-6, "loss");
        assert!(flat(g.get(z.as_tensor()).unwrap())[5..10].iter().all(|&d| d == 0.0));
        assert!(cross_entropy(z.as_tensor(), &[IGNORE; 3]).is_err());
        assert!(cross_entropy(z.as_tensor(), &[0, 5, 1]).unwrap_err().to_string().contains("target 5"));
    }
}
