//! Causal grouped-query attention as one op, flash-attention style: the forward keeps only each query's
//! softmax statistic (its log-sum-exp), and the backward recomputes the probabilities from it.
//!
//! For a batch row b with `pad` leading padding slots, queries at cache slots qᵢ = offset + i and keys at
//! slots j, query head h reading K/V head ⌊h·n_kv/n_h⌋ (the mask of [`crate::ops::causal_mask`]):
//!
//! ```text
//! visible(i, j) ⇔ lo_i ≤ j ≤ qᵢ,  lo_i = min(pad, qᵢ)        (a padding query sees itself only)
//!                with a sliding window W: lo_i = max(min(pad, qᵢ), qᵢ − W + 1)
//! s_ij = c·tanh(κ·(q_i·k_j)/c) with soft-capping c, else κ·(q_i·k_j)   (κ = 1/√d unless given)
//! L_i = log Σ_visible e^(s_ij),  p_ij = e^(s_ij − L_i),  o_i = Σ_j p_ij·v_j
//! backward, with dO = ∂loss/∂o and D_i = dO_i·o_i:
//!   dp_ij = dO_i·v_j,   ds_ij = p_ij·(dp_ij − D_i)
//!   dq_i = Σ_j ds'_ij·k_j,   dk_j = Σ_(heads, i) ds'_ij·q_i,   dv_j = Σ_(heads, i) p_ij·dO_i
//!   with ds' = ds·κ (no cap) or ds·κ·(1 − tanh²(κ·q_i·k_j/c)) (soft-capping)
//! ```
//!
//! Layouts are the projections' own, so no transpose is ever materialised: q and dq (B·T_q, n_h·d), k, v,
//! dk, dv (B·T_k, n_kv·d), i.e. (B, T, heads, d) in memory. The work is split over (batch row, K/V head) pairs on the rayon
//! threads; each pair's query heads run in blocks of [`BLOCK`] queries over the keys that block can see
//! (a causal block skips the keys after its last query), with the products of
//! [`lora_kernels::matmul_into`] on strided views.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use lora_kernels::{matmul_into, serial, MatRef, Result as KResult};
use rayon::prelude::*;

use super::{cpu_slice, dot, exp, max, multiversion, sum, tensor, with_values, CResult};

/// Queries per block.
const BLOCK: usize = 64;
/// Below this many multiply-adds of q·kᵀ (≈ 50 µs of work) the pairs run in turn on the calling thread.
const PARALLEL_MIN: usize = 1 << 20;

/// What a layer's attention computes besides causal grouped-query attention: its scale, its sliding window,
/// its soft-capping.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AttentionOpts {
    /// The score scale κ (`None`: 1/√d).
    pub scale: Option<f32>,
    /// Each query sees at most this many keys: itself and the `window − 1` before it.
    pub window: Option<usize>,
    /// Scores become c·tanh(s/c).
    pub softcap: Option<f32>,
}

/// The sizes of one attention call.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionShape {
    /// Batch rows B.
    pub batch: usize,
    /// Queries per row T_q.
    pub tq: usize,
    /// Keys per row T_k (≥ offset + T_q).
    pub tk: usize,
    /// Query heads n_h.
    pub heads: usize,
    /// Key/value heads n_kv (dividing n_h).
    pub kv_heads: usize,
    /// Head width d.
    pub d: usize,
    /// Cache slot of the first query.
    pub offset: usize,
    /// Leading padding slots of each batch row (B values).
    pub pad: Vec<usize>,
    /// Scale, window, soft-capping.
    pub opts: AttentionOpts,
}

impl AttentionShape {
    fn check(&self) -> CResult<()> {
        let s = self;
        if s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) {
            candle_core::bail!("attention: {} query heads cannot share {} K/V heads", s.heads, s.kv_heads)
        }
        if s.pad.len() != s.batch {
            candle_core::bail!("attention: {} padding counts for {} rows", s.pad.len(), s.batch)
        }
        if s.offset + s.tq > s.tk {
            candle_core::bail!("attention: queries at slots {}..{} but only {} keys", s.offset, s.offset + s.tq, s.tk)
        }
        if s.opts.window == Some(0) || s.opts.softcap.is_some_and(|c| c.is_nan() || c <= 0.0) {
            candle_core::bail!("attention: window {:?} and soft-capping {:?} must be positive", s.opts.window, s.opts.softcap)
        }
        Ok(())
    }
    fn scale(&self) -> f32 {
        self.opts.scale.unwrap_or((1.0 / (self.d as f64).sqrt()) as f32)
    }
    /// The soft-capping c, 0 for none.
    fn cap(&self) -> f32 {
        self.opts.softcap.unwrap_or(0.0)
    }
    /// The visible keys lo..=hi of query i of row b (lo never decreases with i, so a block's first query
    /// has the block's lowest key).
    fn range(&self, b: usize, i: usize) -> (usize, usize) {
        let qi = self.offset + i;
        let lo = self.pad[b].min(qi);
        match self.opts.window {
            Some(w) => (lo.max((qi + 1).saturating_sub(w)), qi),
            None => (lo, qi),
        }
    }
    fn parallel(&self) -> bool {
        self.batch * self.heads * self.tq * self.tk * self.d >= PARALLEL_MIN
    }
}

/// Runs `f(b, kv_head)` for every pair, in parallel when the work is large, results in pair order.
fn per_pair<R: Send>(s: &AttentionShape, f: impl Fn(usize, usize) -> KResult<R> + Sync) -> CResult<Vec<R>> {
    let pairs = s.batch * s.kv_heads;
    let run = |p: usize| serial(|| f(p / s.kv_heads, p % s.kv_heads));
    let out: KResult<Vec<R>> = if s.parallel() { (0..pairs).into_par_iter().map(run).collect() } else { (0..pairs).map(run).collect() };
    out.map_err(candle_core::Error::wrap)
}

/// K or V of one (row, K/V head): `tk` rows of d values, row stride n_kv·d, rows `slots` apart per batch.
fn kv_view<'a>(x: &'a [f32], s: &AttentionShape, slots: usize, b: usize, kh: usize) -> KResult<MatRef<'a>> {
    let start = (b * slots * s.kv_heads + kh) * s.d;
    MatRef::new(&x[start..], s.tk, s.d, s.kv_heads * s.d, 1)
}

/// Q (or dO, o) of one (row, head): (T_q, d), row stride n_h·d.
fn q_view<'a>(x: &'a [f32], s: &AttentionShape, b: usize, h: usize) -> KResult<MatRef<'a>> {
    let start = (b * s.tq * s.heads + h) * s.d;
    MatRef::new(&x[start..], s.tq, s.d, s.heads * s.d, 1)
}

multiversion! {
    /// One row of scores → probabilities in place over `lo..=hi` (zero elsewhere); returns log Σ e^s.
    /// `cap` > 0 soft-caps the scaled scores.
    fn softmax_row(row: &mut [f32], lo: usize, hi: usize, scale: f32, cap: f32) -> f32 {
        let (head, rest) = row.split_at_mut(lo);
        let (vis, tail) = rest.split_at_mut(hi + 1 - lo);
        head.fill(0.0);
        tail.fill(0.0);
        for x in vis.iter_mut() {
            *x *= scale;
        }
        if cap > 0.0 {
            for x in vis.iter_mut() {
                *x = (*x / cap).tanh() * cap;
            }
        }
        let m = max(vis);
        for x in vis.iter_mut() {
            *x = exp(*x - m);
        }
        let total = sum(vis);
        for x in vis.iter_mut() {
            *x /= total;
        }
        m + total.ln()
    }
}

multiversion! {
    /// Recomputes one row of probabilities from the scores and L, then turns it into ds (with respect to
    /// the raw q·k: scaled by κ, and through the cap when `cap` > 0) given dp; `p` keeps the probabilities.
    #[allow(clippy::too_many_arguments)]
    fn grad_row(s: &mut [f32], dp: &mut [f32], lo: usize, hi: usize, scale: f32, lse: f32, dd: f32, cap: f32) {
        s[..lo].fill(0.0);
        s[hi + 1..].fill(0.0);
        dp[..lo].fill(0.0);
        dp[hi + 1..].fill(0.0);
        if cap > 0.0 {
            for (p, g) in s[lo..=hi].iter_mut().zip(&mut dp[lo..=hi]) {
                let t = (*p * scale / cap).tanh();
                *p = exp(t * cap - lse);
                *g = *p * (*g - dd) * scale * (1.0 - t * t);
            }
            return;
        }
        for (p, g) in s[lo..=hi].iter_mut().zip(&mut dp[lo..=hi]) {
            *p = exp(*p * scale - lse);
            *g = *p * (*g - dd) * scale;
        }
    }
}

/// Query blocks of at most this many rows take [`scores_row`] and [`mix_row`] instead of products.
const SMALL_ROWS: usize = 4;

multiversion! {
    /// s_j = q·k_j for the keys in `k`, one every `stride` values (d = q's length each).
    fn scores_row(q: &[f32], k: &[f32], stride: usize, s: &mut [f32]) {
        let d = q.len();
        for (j, x) in s.iter_mut().enumerate() {
            *x = dot(q, &k[j * stride..j * stride + d]);
        }
    }
}

multiversion! {
    /// o = Σ_j p_j·v_j for the values in `v`, one every `stride` values (d = o's length each).
    fn mix_row(p: &[f32], v: &[f32], stride: usize, o: &mut [f32]) {
        let d = o.len();
        o.fill(0.0);
        for (j, &pj) in p.iter().enumerate() {
            if pj != 0.0 {
                for (x, y) in o.iter_mut().zip(&v[j * stride..j * stride + d]) {
                    *x += pj * y;
                }
            }
        }
    }
}

/// The forward of one (row, K/V head): outputs (group heads, T_q, d) and L (group heads, T_q).
fn forward_pair(s: &AttentionShape, q: &[f32], k: &[f32], v: &[f32], slots: usize, b: usize, kh: usize) -> KResult<(Vec<f32>, Vec<f32>)> {
    let (g, d, scale) = (s.heads / s.kv_heads, s.d, s.scale());
    let (kall, vall) = (kv_view(k, s, slots, b, kh)?, kv_view(v, s, slots, b, kh)?);
    let mut out = vec![0f32; g * s.tq * d];
    let mut lse = vec![0f32; g * s.tq];
    let mut sbuf = Vec::new();
    for r in 0..g {
        let qall = q_view(q, s, b, kh * g + r)?;
        for i0 in (0..s.tq).step_by(BLOCK) {
            let i1 = (i0 + BLOCK).min(s.tq);
            let (lo, _) = s.range(b, i0);
            let hi = s.offset + i1 - 1;
            let nk = hi + 1 - lo;
            let rows = i1 - i0;
            sbuf.resize(rows * nk, 0.0);
            if rows <= SMALL_ROWS {
                // A generation step's query or few: plain loops beat setting up two products.
                let stride = s.kv_heads * d;
                let kv0 = ((b * slots + lo) * s.kv_heads + kh) * d;
                let kv_len = (nk - 1) * stride + d;
                for (ri, row) in sbuf.chunks_exact_mut(nk).enumerate() {
                    let i = i0 + ri;
                    let qrow = &q[((b * s.tq + i) * s.heads + kh * g + r) * d..][..d];
                    scores_row(qrow, &k[kv0..kv0 + kv_len], stride, row);
                    let (a, z) = s.range(b, i);
                    lse[r * s.tq + i] = softmax_row(row, a - lo, z - lo, scale, s.cap());
                    mix_row(row, &v[kv0..kv0 + kv_len], stride, &mut out[(r * s.tq + i) * d..][..d]);
                }
                continue;
            }
            let kw = kall.row_range(lo, hi + 1)?;
            matmul_into(&mut sbuf, qall.row_range(i0, i1)?, kw.t(), 1.0, false)?;
            for (ri, row) in sbuf.chunks_exact_mut(nk).enumerate() {
                let (a, z) = s.range(b, i0 + ri);
                lse[r * s.tq + i0 + ri] = softmax_row(row, a - lo, z - lo, scale, s.cap());
            }
            let dst = &mut out[(r * s.tq + i0) * d..(r * s.tq + i1) * d];
            matmul_into(dst, MatRef::row_major(&sbuf, rows, nk)?, vall.row_range(lo, hi + 1)?, 1.0, false)?;
        }
    }
    Ok((out, lse))
}

/// Gradients of one (row, K/V head): dq (group heads, T_q, d), dk and dv (T_k, d).
#[allow(clippy::too_many_arguments)]
fn backward_pair(
    s: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    dout: &[f32],
    lse: &[f32],
    b: usize,
    kh: usize,
) -> KResult<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (g, d, scale) = (s.heads / s.kv_heads, s.d, s.scale());
    let (kall, vall) = (kv_view(k, s, s.tk, b, kh)?, kv_view(v, s, s.tk, b, kh)?);
    let mut dq = vec![0f32; g * s.tq * d];
    let mut dk = vec![0f32; s.tk * d];
    let mut dv = vec![0f32; s.tk * d];
    let (mut sbuf, mut dpbuf) = (Vec::new(), Vec::new());
    for r in 0..g {
        let h = kh * g + r;
        let (qall, gall) = (q_view(q, s, b, h)?, q_view(dout, s, b, h)?);
        for i0 in (0..s.tq).step_by(BLOCK) {
            let i1 = (i0 + BLOCK).min(s.tq);
            let (lo, _) = s.range(b, i0);
            let hi = s.offset + i1 - 1;
            let (nk, rows) = (hi + 1 - lo, i1 - i0);
            sbuf.resize(rows * nk, 0.0);
            dpbuf.resize(rows * nk, 0.0);
            let (kw, vw) = (kall.row_range(lo, hi + 1)?, vall.row_range(lo, hi + 1)?);
            let (qb, gb) = (qall.row_range(i0, i1)?, gall.row_range(i0, i1)?);
            matmul_into(&mut sbuf, qb, kw.t(), 1.0, false)?;
            matmul_into(&mut dpbuf, gb, vw.t(), 1.0, false)?;
            for ri in 0..rows {
                let i = i0 + ri;
                let (a, z) = s.range(b, i);
                let orow = &o[((b * s.tq + i) * s.heads + h) * d..][..d];
                let grow = &dout[((b * s.tq + i) * s.heads + h) * d..][..d];
                let dd = dot(orow, grow);
                grad_row(
                    &mut sbuf[ri * nk..(ri + 1) * nk],
                    &mut dpbuf[ri * nk..(ri + 1) * nk],
                    a - lo,
                    z - lo,
                    scale,
                    lse[r * s.tq + i],
                    dd,
                    s.cap(),
                );
            }
            let (pm, dsm) = (MatRef::row_major(&sbuf, rows, nk)?, MatRef::row_major(&dpbuf, rows, nk)?);
            matmul_into(&mut dq[(r * s.tq + i0) * d..(r * s.tq + i1) * d], dsm, kw, 1.0, false)?;
            matmul_into(&mut dk[lo * d..(hi + 1) * d], dsm.t(), qb, 1.0, true)?;
            matmul_into(&mut dv[lo * d..(hi + 1) * d], pm.t(), gb, 1.0, true)?;
        }
    }
    Ok((dq, dk, dv))
}

/// Attention over slices: q (B, T_q, n_h, d), k and v (B, `slots`, n_kv, d) of which the first T_k slots
/// of each row are read. Returns o (B, T_q, n_h, d) and L (B, n_h, T_q). For inference callers that keep
/// their own key/value buffers (a KV cache with room to grow); [`attention`] is the differentiable op.
pub fn attention_forward(q: &[f32], k: &[f32], v: &[f32], slots: usize, s: &AttentionShape) -> CResult<(Vec<f32>, Vec<f32>)> {
    s.check()?;
    let (qn, kn) = (s.batch * s.tq * s.heads * s.d, s.batch * slots * s.kv_heads * s.d);
    if slots < s.tk || q.len() != qn || k.len() < kn || v.len() < kn {
        candle_core::bail!("attention: buffers of {}, {}, {} values do not fit {s:?} with {slots} slots", q.len(), k.len(), v.len())
    }
    let parts = per_pair(s, |b, kh| forward_pair(s, q, k, v, slots, b, kh))?;
    let g = s.heads / s.kv_heads;
    let mut out = vec![0f32; qn];
    let mut lse = vec![0f32; s.batch * s.heads * s.tq];
    for (p, (o, l)) in parts.iter().enumerate() {
        let (b, kh) = (p / s.kv_heads, p % s.kv_heads);
        for r in 0..g {
            let h = kh * g + r;
            for i in 0..s.tq {
                out[((b * s.tq + i) * s.heads + h) * s.d..][..s.d].copy_from_slice(&o[(r * s.tq + i) * s.d..][..s.d]);
            }
            lse[(b * s.heads + h) * s.tq..][..s.tq].copy_from_slice(&l[r * s.tq..][..s.tq]);
        }
    }
    Ok((out, lse))
}

/// Causal grouped-query attention on the projections' outputs: q (B·T_q, n_h·d), k and v (B·T_k, n_kv·d)
/// → (B·T_q, n_h·d), with B = `pad.len()`, queries at cache slots `offset..offset + T_q` and `pad[b]`
/// leading padding slots in row b (differentiable in q, k and v). Taking the 2-D outputs as they are
/// keeps reshapes out of the graph (each would cost a copy of its gradient in the backward). `opts`: scale,
/// sliding window, soft-capping.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    offset: usize,
    pad: &[usize],
    opts: AttentionOpts,
) -> CResult<Tensor> {
    let b = pad.len();
    let ((nq, wq), (nk, wk)) = (q.dims2()?, k.dims2()?);
    if b == 0 || heads == 0 || kv_heads == 0 || nq % b != 0 || nk % b != 0 || wq % heads != 0 || v.dims() != k.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} are not (B·T, heads·d) for B = {b}, {heads}/{kv_heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let d = wq / heads;
    if wk != kv_heads * d {
        candle_core::bail!("attention: k {:?} is not (B·T, {kv_heads}·{d})", k.dims())
    }
    let shape = AttentionShape { batch: b, tq: nq / b, tk: nk / b, heads, kv_heads, d, offset, pad: pad.to_vec(), opts };
    shape.check()?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let track = q.track_op() || k.track_op() || v.track_op();
    let op = Attention { shape, lse: Arc::new(Mutex::new(None)), keep: track };
    if track {
        q.apply_op3(&k, &v, op)
    } else {
        q.apply_op3_no_bwd(&k, &v, &op)
    }
}

struct Attention {
    shape: AttentionShape,
    /// L of the forward, kept for the backward when a gradient may be asked for.
    lse: Arc<Mutex<Option<Vec<f32>>>>,
    keep: bool,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "lm-fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (q, k, v) = (cpu_slice(self.name(), s1, l1)?, cpu_slice(self.name(), s2, l2)?, cpu_slice(self.name(), s3, l3)?);
        let (out, lse) = attention_forward(q, k, v, self.shape.tk, &self.shape)?;
        if self.keep {
            if let Ok(mut slot) = self.lse.lock() {
                *slot = Some(lse);
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = &self.shape;
        let stored = self.lse.lock().ok().and_then(|mut l| l.take());
        with_values(self.name(), q, |qs| {
            with_values(self.name(), k, |ks| {
                with_values(self.name(), v, |vs| {
                    with_values(self.name(), res, |os| {
                        with_values(self.name(), grad, |gs| {
                            let lse = match stored {
                                Some(l) => l,
                                None => attention_forward(qs, ks, vs, s.tk, s)?.1,
                            };
                            let parts = per_pair(s, |b, kh| {
                                let h0 = kh * (s.heads / s.kv_heads);
                                let l = &lse[(b * s.heads + h0) * s.tq..];
                                backward_pair(s, qs, ks, vs, os, gs, l, b, kh)
                            })?;
                            let g = s.heads / s.kv_heads;
                            let d = s.d;
                            let mut dq = vec![0f32; qs.len()];
                            let mut dk = vec![0f32; ks.len()];
                            let mut dv = vec![0f32; vs.len()];
                            for (p, (pq, pk, pv)) in parts.iter().enumerate() {
                                let (b, kh) = (p / s.kv_heads, p % s.kv_heads);
                                for r in 0..g {
                                    let h = kh * g + r;
                                    for i in 0..s.tq {
                                        dq[((b * s.tq + i) * s.heads + h) * d..][..d].copy_from_slice(&pq[(r * s.tq + i) * d..][..d]);
                                    }
                                }
                                for j in 0..s.tk {
                                    let at = ((b * s.tk + j) * s.kv_heads + kh) * d;
                                    dk[at..at + d].copy_from_slice(&pk[j * d..(j + 1) * d]);
                                    dv[at..at + d].copy_from_slice(&pv[j * d..(j + 1) * d]);
                                }
                            }
                            let out = |want: bool, v: Vec<f32>, t: &Tensor| if want { tensor(v, t.dims()).map(Some) } else { Ok(None) };
                            Ok((out(q.track_op(), dq, q)?, out(k.track_op(), dk, k)?, out(v.track_op(), dv, v)?))
                        })
                    })
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::*;
    use crate::ops::causal_mask_window;
    use candle_core::{Device, Var};

    /// Fused vs reference output and dq, dk, dv for one configuration.
    #[allow(clippy::too_many_arguments)]
    fn compare(b: usize, tq: usize, offset: usize, heads: usize, kv_heads: usize, d: usize, pad: &[usize], seed: u64) {
        compare_with(b, tq, offset, heads, kv_heads, d, pad, seed, AttentionOpts::default());
    }

    #[allow(clippy::too_many_arguments)]
    fn compare_with(
        b: usize,
        tq: usize,
        offset: usize,
        heads: usize,
        kv_heads: usize,
        d: usize,
        pad: &[usize],
        seed: u64,
        opts: AttentionOpts,
    ) {
        let tk = offset + tq;
        // The fused op takes (B·T, heads·d); the reference (B, heads, T, d).
        let q = rand_var(&[b * tq, heads * d], seed, 2.0);
        let k = rand_var(&[b * tk, kv_heads * d], seed + 1, 2.0);
        let v = rand_var(&[b * tk, kv_heads * d], seed + 2, 1.0);
        let c = Tensor::from_vec(rand_vec(b * tq * heads * d, seed + 3, 1.0), (b * tq, heads * d), &Device::Cpu).unwrap();
        let grads = |o: &Tensor, vars: [&Var; 3]| {
            let g = (o * &c).unwrap().sum_all().unwrap().backward().unwrap();
            vars.map(|x| flat(g.get(x.as_tensor()).unwrap()))
        };
        let of = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, kv_heads, offset, pad, opts).unwrap();
        let gf = grads(&of, [&q, &k, &v]);
        let mask = causal_mask_window(tq, tk, offset, pad, opts.window, &Device::Cpu).unwrap();
        let t = |x: &Var, t: usize, h: usize| x.as_tensor().reshape((b, t, h, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let scale = opts.scale.map_or(1.0 / (d as f64).sqrt(), |s| s as f64);
        let cap = opts.softcap.map(|c| c as f64);
        let or = crate::ops::attention_with(&t(&q, tq, heads), &t(&k, tk, kv_heads), &t(&v, tk, kv_heads), &mask, scale, cap).unwrap();
        let or = or.transpose(1, 2).unwrap().reshape((b * tq, heads * d)).unwrap();
        let gr = grads(&or, [&q, &k, &v]);
        // Sums of ≤ 40 products (d = 7, ≤ 40 keys) of values ≤ 2 in f32 in another order, and a softmax whose
        // exp is ours: ≲ 40·6e-8 relative to the largest value; 2e-5 of it fails on any wrong mask entry,
        // scale or head mapping by orders of magnitude.
        let what = format!("b {b} tq {tq} offset {offset} heads {heads}/{kv_heads} pad {pad:?} {opts:?}");
        assert_close(&flat(&of), &flat(&or), 2e-5, &format!("o, {what}"));
        for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
            assert_close(&gf[i], &gr[i], 2e-5, &format!("{name}, {what}"));
        }
    }

    #[test]
    fn fused_attention_and_its_gradients_match_the_reference_with_padding() {
        // 3 rows, one unpadded, one with 2 and one with 9 padding slots (more than a query block's worth of
        // queries below 9 see themselves only); 6 query heads on 2 K/V heads, d = 7; 70 queries span two
        // query blocks of 64.
        compare(3, 70, 0, 6, 2, 7, &[0, 2, 9], 20);
    }

    #[test]
    fn fused_attention_matches_the_reference_with_a_cache_offset() {
        // Queries continue 11 cached slots (keys 0..16), rows padded 0 and 4 (padding inside the cache);
        // then a single new query per row, as in generation.
        compare(2, 5, 11, 4, 4, 9, &[0, 4], 30);
        compare(2, 1, 23, 3, 1, 5, &[3, 0], 40);
    }

    #[test]
    fn fused_attention_with_a_window_soft_capping_and_a_scale_matches_the_reference() {
        // Window 5 over 70 queries (blocks start past keys they cannot see), rows padded 0, 2 and 9 (padding
        // longer than the window); a cap of 3 on scores of size ~6 (tanh far from linear) and another scale.
        let opts = AttentionOpts { scale: Some(0.29), window: Some(5), softcap: Some(3.0) };
        compare_with(3, 70, 0, 6, 2, 7, &[0, 2, 9], 50, opts);
        // With a cache offset, and each alone.
        compare_with(2, 5, 11, 4, 2, 9, &[0, 4], 60, AttentionOpts { window: Some(3), ..AttentionOpts::default() });
        compare_with(2, 1, 23, 3, 1, 5, &[3, 0], 70, AttentionOpts { softcap: Some(2.0), ..AttentionOpts::default() });
    }

    #[test]
    fn mismatched_shapes_are_refused_by_name() {
        let q = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let k = Tensor::zeros((4, 24), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = attention(&q, &k, &k, 4, 3, 0, &[0], AttentionOpts::default()).unwrap_err().to_string();
        assert!(e.contains("4 query heads cannot share 3 K/V heads"), "{e}");
        let k = Tensor::zeros((4, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(attention(&q, &k, &k, 4, 2, 1, &[0], AttentionOpts::default()).unwrap_err().to_string().contains("only 4 keys"));
        assert!(
            attention(&q, &k, &k, 4, 2, 0, &[0, 0, 0], AttentionOpts::default()).is_err(),
            "4 rows are not 3 batch rows of equal length"
        );
    }
}
