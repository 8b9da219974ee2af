//! Rotary position embedding as one op, on x of shape (B, T, heads, d) with the position of every
//! (row, slot) held by the op. With the halves x = [x₁, x₂] (d/2 each) and the angles a_j = p·θ^(−2j/d):
//!
//! ```text
//! y₁ = x₁·cos a − x₂·sin a        y₂ = x₂·cos a + x₁·sin a       (transformers' rotate_half convention)
//! dx₁ = dy₁·cos a + dy₂·sin a     dx₂ = dy₂·cos a − dy₁·sin a    (the inverse rotation of the gradient)
//! ```
//!
//! The cos/sin tables are constants shared by every op of a model ([`RopeTables`], the same f32 values
//! as [`crate::ops::Rope`]'s).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::{cpu_slice, for_each, multiversion, tensor, with_values, CResult};

/// cos and sin of position·frequency for positions `0..max_positions` and the d/2 frequencies,
/// row-major (positions, d/2).
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RopeTables {
    /// Tables computed as transformers computes them in f32 (`inv_freq = 1 / θ^(2i/d)`, angle = p·inv_freq).
    pub fn new(theta: f64, d: usize, max_positions: usize) -> Self {
        let half = d / 2;
        let inv: Vec<f32> = (0..half).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / d as f32)).collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        RopeTables { cos, sin, half }
    }
    /// The number of positions covered.
    pub fn max_positions(&self) -> usize {
        self.cos.len().checked_div(self.half).unwrap_or(0)
    }
}

/// RoPE over x, (B, T, heads, d) in memory (e.g. a projection's (B·T, heads·d) output), at `positions`
/// (B·T, row-major): the op, applied by [`RopeOp::apply`].
#[derive(Debug, Clone)]
pub struct RopeOp {
    tables: Arc<RopeTables>,
    positions: Arc<Vec<u32>>,
}

impl RopeOp {
    /// An op for these positions; every position must be inside the tables.
    pub fn new(tables: Arc<RopeTables>, positions: Vec<u32>) -> CResult<Self> {
        let max = tables.max_positions();
        if let Some(p) = positions.iter().find(|&&p| p as usize >= max) {
            candle_core::bail!("rope: position {p} is outside the tables ({max} positions)")
        }
        Ok(RopeOp { tables, positions: Arc::new(positions) })
    }

    /// y = RoPE(x) for x of any shape that is (B, T, heads, d) in memory, B·T = the number of positions
    /// (differentiable in x).
    pub fn apply(&self, x: &Tensor) -> CResult<Tensor> {
        let x = x.contiguous()?;
        if x.track_op() {
            x.apply_op1(self.clone())
        } else {
            x.apply_op1_no_bwd(self)
        }
    }

    /// (heads, d) of an input of `dims`: (B, T, …) in memory with every slot's `heads·d` values together.
    fn check(&self, dims: &[usize]) -> CResult<(usize, usize)> {
        let (slots, d) = (self.positions.len(), 2 * self.tables.half);
        let n: usize = dims.iter().product();
        if slots == 0 || d == 0 || !n.is_multiple_of(slots * d) {
            candle_core::bail!("rope: input {dims:?} is not {slots} slots of heads × {d} values")
        }
        Ok((n / (slots * d), d))
    }

    /// Rotates each (row, slot) block of `heads·d` values by its position; `sign` −1 is the inverse.
    fn rotate(&self, x: &[f32], heads: usize, d: usize, sign: f32) -> Vec<f32> {
        let half = d / 2;
        let mut y = vec![0f32; x.len()];
        let per = heads * d;
        if per == 0 {
            return y;
        }
        let n = x.len();
        for_each(y.chunks_mut(per * 16).zip(x.chunks(per * 16)).collect(), n, |ci, (yc, xc)| {
            for (si, (ys, xs)) in yc.chunks_exact_mut(per).zip(xc.chunks_exact(per)).enumerate() {
                let p = self.positions[ci * 16 + si] as usize;
                let cos = &self.tables.cos[p * half..(p + 1) * half];
                let sin = &self.tables.sin[p * half..(p + 1) * half];
                rotate_slot(xs, ys, cos, sin, sign);
            }
        });
        y
    }
}

multiversion! {
    /// One slot's heads: y₁ = x₁·c − s·x₂·σ, y₂ = x₂·c + s·x₁·σ with σ = `sign`.
    fn rotate_slot(x: &[f32], y: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
        let half = cos.len();
        for (xh, yh) in x.chunks_exact(2 * half).zip(y.chunks_exact_mut(2 * half)) {
            let (x1, x2) = xh.split_at(half);
            let (y1, y2) = yh.split_at_mut(half);
            for j in 0..half {
                let s = sin[j] * sign;
                y1[j] = x1[j] * cos[j] + (-x2[j]) * s;
                y2[j] = x2[j] * cos[j] + x1[j] * s;
            }
        }
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "lm-fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (heads, d) = self.check(l.dims())?;
        let x = cpu_slice(self.name(), s, l)?;
        Ok((CpuStorage::F32(self.rotate(x, heads, d, 1.0)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let (heads, d) = self.check(x.dims())?;
        with_values(self.name(), grad, |g| Ok(Some(tensor(self.rotate(g, heads, d, -1.0), x.dims())?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::*;
    use candle_core::Device;

    #[test]
    fn fused_rope_and_its_gradient_match_the_reference() {
        // Odd sizes: 3 rows × 5 slots × 3 heads, d = 10; rows at offsets 0, 7 and a padded row.
        let (b, t, heads, d, theta) = (3, 5, 3, 10, 500.0);
        let positions: Vec<u32> = (0..t as u32).chain(7..7 + t as u32).chain([0, 0, 0, 1, 2]).collect();
        let x = rand_var(&[b, t, heads, d], 5, 1.0);
        let tables = Arc::new(RopeTables::new(theta, d, 16));
        let op = RopeOp::new(tables, positions.clone()).unwrap();
        let y = op.apply(x.as_tensor()).unwrap();
        let c = weights_like(&y, 6);
        let gf = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        // The reference works on (B, heads, T, d) with tables (B, 1, T, d).
        let rope = crate::ops::Rope::new(theta, d, 16, &Device::Cpu).unwrap();
        let (cos, sin) = rope.tables(&Tensor::from_vec(positions, (b, t), &Device::Cpu).unwrap()).unwrap();
        let yr = crate::ops::apply_rope(&x.as_tensor().transpose(1, 2).unwrap(), &cos, &sin).unwrap().transpose(1, 2).unwrap();
        let gr = (&yr * &c).unwrap().sum_all().unwrap().backward().unwrap();
        // One product-and-add per value from the same f32 tables: the same rounding up to the order of the
        // two products (≲ 1 ulp of values ≤ 1.4); 1e-6 catches a swapped half or a wrong sign at once.
        assert_close(&flat(&y), &flat(&yr), 1e-6, "y");
        assert_close(&flat(gf.get(x.as_tensor()).unwrap()), &flat(gr.get(x.as_tensor()).unwrap()), 1e-6, "dx");
    }

    #[test]
    fn positions_outside_the_tables_are_refused() {
        let tables = Arc::new(RopeTables::new(10_000.0, 4, 8));
        assert!(RopeOp::new(tables, vec![0, 8]).unwrap_err().to_string().contains("position 8"));
    }
}
