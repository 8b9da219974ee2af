//! Rotary position embedding as one op, on x of shape (B, T, heads, d) with the position of every
//! (row, slot) held by the op. With the halves x = [x₁, x₂] (d/2 each) and the angles a_j = p·θ^(−2j/d):
//!
//! ```text
//! y₁ = x₁·cos a − x₂·sin a        y₂ = x₂·cos a + x₁·sin a       (transformers' rotate_half convention)
//! dx₁ = dy₁·cos a + dy₂·sin a     dx₂ = dy₂·cos a − dy₁·sin a    (the inverse rotation of the gradient)
//! ```
//!
//! The cos/sin tables are constants shared by every op of a model ([`RopeTables`], also the reference path's
//! values), one or several per op (a sequence's table depends on its length under dynamic and long RoPE);
//! with a partial rotary factor only the first r features of each head of width d rotate (halves of r), the
//! others pass through unchanged (and so does their gradient).

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
        let inv: Vec<f32> = (0..d / 2).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / d as f32)).collect();
        Self::from_frequencies(&inv, 1.0, max_positions)
    }

    /// Tables of `attention_factor`·cos and ·sin of p·f for the inverse frequencies `inv` (a scaled RoPE's,
    /// [`crate::rope_scaling`]), in f32 as transformers computes them (`emb.cos() * attention_scaling`).
    pub fn from_frequencies(inv: &[f32], attention_factor: f64, max_positions: usize) -> Self {
        let half = inv.len();
        let af = attention_factor as f32;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in inv {
                let a = p as f32 * f;
                cos.push(a.cos() * af);
                sin.push(a.sin() * af);
            }
        }
        RopeTables { cos, sin, half }
    }

    /// Half the rotary width (the number of frequencies).
    pub fn half(&self) -> usize {
        self.half
    }

    /// cos and sin of position `p` (r/2 values each).
    pub fn row(&self, p: usize) -> (&[f32], &[f32]) {
        (&self.cos[p * self.half..(p + 1) * self.half], &self.sin[p * self.half..(p + 1) * self.half])
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
    tables: Arc<Vec<Arc<RopeTables>>>,
    which: Arc<Vec<u32>>, // the table of each slot (empty: the first for all)
    positions: Arc<Vec<u32>>,
    d: usize, // head width (≥ the rotary width)
}

impl RopeOp {
    /// An op for these positions rotating whole heads; every position must be inside the tables.
    pub fn new(tables: Arc<RopeTables>, positions: Vec<u32>) -> CResult<Self> {
        let d = 2 * tables.half;
        Self::with_tables(vec![tables], Vec::new(), positions, d)
    }

    /// An op whose slot i is at `positions[i]` in `tables[which[i]]` (`which` empty: the first table), for
    /// heads of width `d` of which the tables' rotary width r rotates.
    pub fn with_tables(tables: Vec<Arc<RopeTables>>, which: Vec<u32>, positions: Vec<u32>, d: usize) -> CResult<Self> {
        let Some(first) = tables.first() else { candle_core::bail!("rope: no tables") };
        if tables.iter().any(|t| t.half != first.half) || 2 * first.half > d {
            candle_core::bail!("rope: tables of rotary width {} for heads of {d}", 2 * first.half)
        }
        if !which.is_empty() && which.len() != positions.len() {
            candle_core::bail!("rope: {} table choices for {} positions", which.len(), positions.len())
        }
        for (i, &p) in positions.iter().enumerate() {
            let t = which.get(i).copied().unwrap_or(0) as usize;
            let max = tables.get(t).map_or(0, |t| t.max_positions());
            if p as usize >= max {
                candle_core::bail!("rope: position {p} is outside the tables ({max} positions)")
            }
        }
        Ok(RopeOp { tables: Arc::new(tables), which: Arc::new(which), positions: Arc::new(positions), d })
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
        let (slots, d) = (self.positions.len(), self.d);
        let n: usize = dims.iter().product();
        if slots == 0 || d == 0 || !n.is_multiple_of(slots * d) {
            candle_core::bail!("rope: input {dims:?} is not {slots} slots of heads × {d} values")
        }
        Ok((n / (slots * d), d))
    }

    /// Rotates each (row, slot) block of `heads·d` values by its position; `sign` −1 is the inverse.
    fn rotate(&self, x: &[f32], heads: usize, d: usize, sign: f32) -> Vec<f32> {
        let half = self.tables[0].half;
        let mut y = vec![0f32; x.len()];
        let per = heads * d;
        if per == 0 {
            return y;
        }
        let n = x.len();
        for_each(y.chunks_mut(per * 16).zip(x.chunks(per * 16)).collect(), n, |ci, (yc, xc)| {
            for (si, (ys, xs)) in yc.chunks_exact_mut(per).zip(xc.chunks_exact(per)).enumerate() {
                let slot = ci * 16 + si;
                let p = self.positions[slot] as usize;
                let t = &self.tables[self.which.get(slot).copied().unwrap_or(0) as usize];
                let cos = &t.cos[p * half..(p + 1) * half];
                let sin = &t.sin[p * half..(p + 1) * half];
                rotate_slot(xs, ys, cos, sin, sign, d);
            }
        });
        y
    }
}

multiversion! {
    /// One slot's heads (width `d`): y₁ = x₁·c − s·x₂·σ, y₂ = x₂·c + s·x₁·σ with σ = `sign` over the first
    /// 2·|cos| features, the rest copied.
    fn rotate_slot(x: &[f32], y: &mut [f32], cos: &[f32], sin: &[f32], sign: f32, d: usize) {
        let half = cos.len();
        for (xh, yh) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let (xr, xp) = xh.split_at(2 * half);
            let (yr, yp) = yh.split_at_mut(2 * half);
            yp.copy_from_slice(xp);
            let (x1, x2) = xr.split_at(half);
            let (y1, y2) = yr.split_at_mut(half);
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
    fn partial_rotary_with_per_row_tables_matches_the_reference() {
        // Heads of 10 of which 6 rotate; row 0 from one table, row 1 from another (scaled: factor 0.7).
        let (b, t, heads, d) = (2, 5, 3, 10);
        let inv: Vec<f32> = (0..3).map(|i| 1.0 / 500f32.powf(2.0 * i as f32 / 6.0)).collect();
        let t0 = Arc::new(RopeTables::from_frequencies(&inv, 1.0, 16));
        let t1 = Arc::new(RopeTables::from_frequencies(&inv.iter().map(|f| f / 3.0).collect::<Vec<_>>(), 0.7, 16));
        let positions: Vec<u32> = (0..t as u32).chain(9..9 + t as u32).collect();
        let which: Vec<u32> = [0u32; 5].into_iter().chain([1u32; 5]).collect();
        let op = RopeOp::with_tables(vec![t0.clone(), t1.clone()], which, positions.clone(), d).unwrap();
        let x = rand_var(&[b, t, heads, d], 15, 1.0);
        let y = op.apply(x.as_tensor()).unwrap();
        let c = weights_like(&y, 16);
        let gf = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let (cos, sin) = crate::ops::rope_cos_sin(&[&t0, &t1], &positions, t, &Device::Cpu).unwrap();
        let yr = crate::ops::apply_rope(&x.as_tensor().transpose(1, 2).unwrap(), &cos, &sin).unwrap().transpose(1, 2).unwrap();
        let gr = (&yr * &c).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(&flat(&y), &flat(&yr), 1e-6, "y");
        assert_close(&flat(gf.get(x.as_tensor()).unwrap()), &flat(gr.get(x.as_tensor()).unwrap()), 1e-6, "dx");
        // The last 4 features of every head pass through untouched.
        let (xv, yv) = (flat(x.as_tensor()), flat(&y));
        for h in 0..b * t * heads {
            assert_eq!(&xv[h * d + 6..(h + 1) * d], &yv[h * d + 6..(h + 1) * d]);
        }
    }

    #[test]
    fn positions_outside_the_tables_are_refused() {
        let tables = Arc::new(RopeTables::new(10_000.0, 4, 8));
        assert!(RopeOp::new(tables, vec![0, 8]).unwrap_err().to_string().contains("position 8"));
    }
}
