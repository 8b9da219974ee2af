//! [`Bundle`]: everything one training step sums across ranks, packed into one buffer so that a step
//! costs one all-reduce: each parameter's gradient (with a count of the ranks that had one) and a few
//! scalars (the loss).
//!
//! ```text
//! values = [ c_0, g_0[0..n_0] | c_1, g_1[0..n_1] | … | s_0, s_1, … ]
//!          c_i = 1 on a rank whose backward reached parameter i, else 0 (and g_i = 0)
//! after the sum: c_i = ranks that had a gradient (0: none did: the parameter is left alone, as one
//! process leaves a parameter without a gradient); g_i = Σ over ranks; s_j = Σ over ranks
//! ```
//!
//! Counts are small integers, exact in f32. Each rank's gradient is already its rows' share of the global
//! mean (its loss is divided by the global count, not its own), so the sum is the global mean's gradient
//! and nothing is divided afterwards.

use crate::error::{DistError, Result};
use crate::group::Group;

/// Gradients and scalars of one step, summed across ranks in one call (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Bundle {
    values: Vec<f32>,
    /// (offset of the count, length) of each gradient.
    grads: Vec<(usize, usize)>,
    /// Offset of each scalar.
    scalars: Vec<usize>,
}

impl Bundle {
    /// An empty bundle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a gradient of `len` values: `Some(g)` from this rank's backward (`g.len()` must be `len`), or
    /// `None` when this rank has none (zeros). Returns its index for [`Bundle::grad`].
    pub fn push_grad(&mut self, grad: Option<&[f32]>, len: usize) -> Result<usize> {
        let at = self.values.len();
        match grad {
            Some(g) if g.len() == len => {
                self.values.push(1.0);
                self.values.extend_from_slice(g);
            }
            Some(g) => {
                return Err(DistError::Invalid { call: "push_grad", why: format!("{} values for a parameter of {len}", g.len()) });
            }
            None => {
                self.values.push(0.0);
                self.values.resize(at + 1 + len, 0.0);
            }
        }
        self.grads.push((at, len));
        Ok(self.grads.len() - 1)
    }

    /// Adds a scalar; returns its index for [`Bundle::scalar`].
    pub fn push_scalar(&mut self, v: f32) -> usize {
        self.scalars.push(self.values.len());
        self.values.push(v);
        self.scalars.len() - 1
    }

    /// Sums every value across the group's ranks (one all-reduce; nothing with one process).
    pub fn all_reduce(&mut self, group: &Group) -> Result<()> {
        if group.is_distributed() {
            group.all_reduce_sum(&mut self.values)?;
        }
        Ok(())
    }

    /// Gradient `i`: `None` when no rank had one.
    pub fn grad(&self, i: usize) -> Option<&[f32]> {
        let &(at, len) = self.grads.get(i)?;
        (self.values[at] != 0.0).then(|| &self.values[at + 1..at + 1 + len])
    }

    /// Ranks that had gradient `i`.
    pub fn grad_ranks(&self, i: usize) -> usize {
        self.grads.get(i).map_or(0, |&(at, _)| self.values[at] as usize)
    }

    /// Gradients pushed.
    pub fn grads(&self) -> usize {
        self.grads.len()
    }

    /// Scalar `i` (0.0 when there is no such scalar).
    pub fn scalar(&self, i: usize) -> f32 {
        self.scalars.get(i).map_or(0.0, |&at| self.values[at])
    }

    /// Values in the buffer (what one all-reduce sends).
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Threads;

    #[test]
    fn gradients_and_scalars_are_summed_and_a_gradient_no_rank_had_stays_absent() {
        let got = Threads::run(3, |g| {
            let r = g.rank() as f32;
            let mut b = Bundle::new();
            // Rank 2's batch share is empty: it has no gradient for the first parameter.
            let first = [r, 2.0 * r];
            let a = b.push_grad((g.rank() < 2).then_some(&first[..]), 2).unwrap();
            let never = b.push_grad(None, 3).unwrap();
            let loss = b.push_scalar(0.5 + r);
            b.all_reduce(&g).unwrap();
            (b.grad(a).map(<[f32]>::to_vec), b.grad_ranks(a), b.grad(never).is_none(), b.scalar(loss), b.len())
        });
        for (grad, ranks, none, loss, len) in got {
            assert_eq!(grad, Some(vec![1.0, 2.0]));
            assert_eq!(ranks, 2);
            assert!(none);
            assert_eq!(loss, 4.5);
            assert_eq!(len, 1 + 2 + 1 + 3 + 1);
        }
        let e = Bundle::new().push_grad(Some(&[1.0]), 2).unwrap_err().to_string();
        assert!(e.contains("1 values for a parameter of 2"), "{e}");
    }
}
