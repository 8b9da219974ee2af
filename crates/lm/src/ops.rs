//! The differentiable building blocks of the decoder, exactly as transformers' `modeling_llama` computes
//! them, from candle tensor ops that all have a backward (candle 0.11's fast `rms_norm`, `rope` and
//! `softmax_last_dim` have none: inside a training graph they silently stop gradients).
//!
//! ```text
//! RMSNorm(x) = w ⊙ x · 1/√(mean(x²) + ε)                                  x (…, H), w (H)
//! RoPE:      x·cos + rotate_half(x)·sin,  rotate_half([x₁, x₂]) = [−x₂, x₁]  (halves of d)
//!            cos, sin at position p, feature j: angle p·θ^(−2(j mod d/2)/d)
//! attention: softmax(q·kᵀ/√d + mask)·v, K/V head ⌊h·n_kv/n_h⌋ serving query head h
//!            (or another scale κ, soft-capped scores c·tanh(κ·q·kᵀ/c), a sliding-window mask)
//! SwiGLU:    down(silu(gate(x)) ⊙ up(x)),  silu(z) = z·σ(z)   (GeGLU: candle's tanh `gelu` for silu)
//! ```
//!
//! Partial rotary (Phi-3): RoPE rotates the first r features of each head as above (halves of r) and passes
//! the rest through.

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;
use crate::fused::RopeTables;

/// The additive mask value for blocked attention entries (transformers uses the dtype's minimum too).
pub const MASKED: f32 = f32::MIN;

/// RMSNorm over the last dimension: x (…, H), w (H) → (…, H).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // (…, 1)
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// Rotary position tables (the fused path's [`RopeTables`], the same f32 values) as tensors.
#[derive(Debug, Clone)]
pub struct Rope {
    tables: std::sync::Arc<RopeTables>,
}

impl Rope {
    /// Tables for positions `0..max_positions`, head width `d`, base `theta`, computed in f32 as
    /// transformers does (`inv_freq = 1 / θ^(2i/d)`, angle = position · inv_freq, duplicated halves).
    pub fn new(theta: f64, d: usize, max_positions: usize, _device: &Device) -> Result<Self> {
        Ok(Rope { tables: std::sync::Arc::new(RopeTables::new(theta, d, max_positions)) })
    }

    /// The number of positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.tables.max_positions()
    }

    /// (cos, sin) for `positions` (rows, T) as tensors of shape (rows, 1, T, r), ready to broadcast over heads.
    pub fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (rows, t) = positions.dims2()?;
        let p = positions.flatten_all()?.to_vec1::<u32>()?;
        let per_row: Vec<&RopeTables> = vec![&self.tables; rows];
        rope_cos_sin(&per_row, &p, t, positions.device())
    }
}

/// (cos, sin) of shape (rows, 1, T, r) (duplicated halves) for `positions` (rows·T), row b's from `tables[b]`.
pub fn rope_cos_sin(tables: &[&RopeTables], positions: &[u32], t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let rows = tables.len();
    let r = tables.first().map_or(0, |x| 2 * x.half());
    let mut cos = Vec::with_capacity(rows * t * r);
    let mut sin = Vec::with_capacity(rows * t * r);
    for (b, tab) in tables.iter().enumerate() {
        for &p in &positions[b * t..(b + 1) * t] {
            let (c, s) = tab.row(p as usize);
            for _ in 0..2 {
                cos.extend_from_slice(c);
                sin.extend_from_slice(s);
            }
        }
    }
    Ok((Tensor::from_vec(cos, (rows, 1, t, r), device)?, Tensor::from_vec(sin, (rows, 1, t, r), device)?))
}

/// Applies RoPE to x (B, heads, T, d) with tables (B or 1, 1, T, r): the first r features of each head
/// rotate (r = d unless the rotary factor is partial), the rest pass through.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let r = cos.dim(D::Minus1)?;
    if r < d {
        let rotated = apply_rope(&x.narrow(D::Minus1, 0, r)?, cos, sin)?;
        return Ok(Tensor::cat(&[&rotated, &x.narrow(D::Minus1, r, d - r)?], D::Minus1)?);
    }
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}

/// Softmax over the last dimension, built from ops with a backward (max-subtracted for range).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Grouped-query attention: q (B, n_h, Tq, d), k and v (B, n_kv, Tk, d), `mask` additive of shape
/// (B or 1, 1, 1, Tq, Tk) → (B, n_h, Tq, d). The query heads of one K/V head are stacked along the rows
/// of a single product instead of copying K and V n_h / n_kv times.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    attention_with(q, k, v, mask, 1.0 / (d as f64).sqrt(), None)
}

/// [`attention`] with the score scale κ and soft-capping c: scores c·tanh(κ·q·kᵀ/c) (as transformers'
/// Gemma 2: scaled, divided, tanh, multiplied, then masked).
pub fn attention_with(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64, softcap: Option<f64>) -> Result<Tensor> {
    let (b, nh, tq, d) = q.dims4()?;
    let (_, nkv, tk, _) = k.dims4()?;
    let g = nh / nkv;
    let q = q.contiguous()?.reshape((b, nkv, g * tq, d))?;
    let mut scores = (q.matmul(&k.contiguous()?.t()?)? * scale)?; // (B, n_kv, g·Tq, Tk)
    if let Some(c) = softcap {
        scores = ((scores / c)?.tanh()? * c)?;
    }
    let scores = scores.reshape((b, nkv, g, tq, tk))?.broadcast_add(mask)?;
    let p = softmax_last(&scores)?.reshape((b, nkv, g * tq, tk))?;
    Ok(p.matmul(&v.contiguous()?)?.reshape((b, nh, tq, d))?)
}

/// The additive mask (rows, 1, 1, Tq, Tk) for queries at cache slots `offset..offset+Tq` over keys at slots
/// `0..Tk`: a key is visible when it is not in the future and not padding (`pad[row]` leading slots are
/// padding; a padding query sees itself, so no row of the softmax is empty). One row when no row is padded.
pub fn causal_mask(tq: usize, tk: usize, offset: usize, pad: &[usize], device: &Device) -> Result<Tensor> {
    causal_mask_window(tq, tk, offset, pad, None, device)
}

/// [`causal_mask`] with a sliding window: a query also sees no key `window` or more slots before it
/// (transformers' `sliding_window_overlay`: key > query − window).
pub fn causal_mask_window(tq: usize, tk: usize, offset: usize, pad: &[usize], window: Option<usize>, device: &Device) -> Result<Tensor> {
    let rows: Vec<usize> = if pad.iter().all(|&p| p == 0) { vec![0] } else { pad.to_vec() };
    let mut m = Vec::with_capacity(rows.len() * tq * tk);
    for &p in &rows {
        for i in 0..tq {
            let qi = offset + i;
            for j in 0..tk {
                let in_window = window.is_none_or(|w| j + w > qi);
                let visible = j <= qi && ((j >= p && in_window) || j == qi);
                m.push(if visible { 0.0 } else { MASKED });
            }
        }
    }
    Ok(Tensor::from_vec(m, (rows.len(), 1, 1, tq, tk), device)?)
}

/// Mean cross-entropy (nats) of predicting `targets` (N) from `logits` (N, V), differentiable.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last(logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?; // (N, 1)
    Ok(picked.mean_all()?.neg()?)
}

/// log softmax over the last dimension, differentiable.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let diff = x.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(diff.broadcast_sub(&lse)?)
}

/// Per-token negative log-likelihoods (nats) of `targets` (N) under `logits` (N, V), in f64 for summing.
pub fn token_nll(logits: &Tensor, targets: &[u32]) -> Result<Vec<f64>> {
    let (n, v) = logits.dims2()?;
    let l = logits.to_dtype(DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    Ok((0..n)
        .map(|i| {
            let row = &l[i * v..(i + 1) * v];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let lse = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
            lse - row[targets[i] as usize] as f64
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut g = StdRng::seed_from_u64(seed);
        (0..n).map(|_| g.random::<f32>() * 2.0 - 1.0).collect()
    }
    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }
    /// |got − want| ≤ tol·(1 + |want|) element-wise.
    fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((*g as f64 - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: {g} vs f64 {w}");
        }
    }

    // Tolerances: each output is a short f32 computation (sums of ≤ 32 terms, one sqrt/exp) of values of
    // size ≤ 1, so f32 rounding stays within ~1e-6 relative; 1e-5 is tight enough that any wrong term
    // (a sign, a swapped half, a wrong head) fails by orders of magnitude.

    #[test]
    fn rms_norm_matches_an_f64_computation() {
        let (n, h, eps) = (5, 24, 1e-5);
        let x = rand_vec(n * h, 1);
        let w = rand_vec(h, 2);
        let got = flat(
            &rms_norm(
                &Tensor::from_vec(x.clone(), (n, h), &Device::Cpu).unwrap(),
                &Tensor::from_vec(w.clone(), h, &Device::Cpu).unwrap(),
                eps,
            )
            .unwrap(),
        );
        let mut want = Vec::new();
        for r in 0..n {
            let row = &x[r * h..(r + 1) * h];
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / h as f64;
            want.extend(row.iter().zip(&w).map(|(&v, &wi)| wi as f64 * v as f64 / (ms + eps).sqrt()));
        }
        close(&got, &want, 1e-5, "rms_norm");
    }

    #[test]
    fn rope_rotates_each_pair_by_position_times_frequency() {
        let (b, heads, t, d, theta) = (2, 3, 7, 8, 500.0f64);
        let x = rand_vec(b * heads * t * d, 3);
        let rope = Rope::new(theta, d, 16, &Device::Cpu).unwrap();
        // Row 0 at positions 0..t, row 1 at 5..5+t.
        let pos: Vec<u32> = (0..t as u32).chain(5..5 + t as u32).collect();
        let (cos, sin) = rope.tables(&Tensor::from_vec(pos.clone(), (b, t), &Device::Cpu).unwrap()).unwrap();
        let xt = Tensor::from_vec(x.clone(), (b, heads, t, d), &Device::Cpu).unwrap();
        let got = flat(&apply_rope(&xt, &cos, &sin).unwrap());
        let mut want = vec![0f64; x.len()];
        for bi in 0..b {
            for hh in 0..heads {
                for ti in 0..t {
                    let p = pos[bi * t + ti] as f64;
                    let base = ((bi * heads + hh) * t + ti) * d;
                    for j in 0..d / 2 {
                        let a = p * theta.powf(-2.0 * j as f64 / d as f64);
                        let (x1, x2) = (x[base + j] as f64, x[base + j + d / 2] as f64);
                        want[base + j] = x1 * a.cos() - x2 * a.sin();
                        want[base + j + d / 2] = x2 * a.cos() + x1 * a.sin();
                    }
                }
            }
        }
        // Angles up to 11 rad computed in f32 as transformers does: |Δangle| ≲ 11·6e-8, so 1e-5 holds.
        close(&got, &want, 1e-5, "rope");
    }

    #[test]
    fn grouped_causal_attention_matches_an_f64_computation_with_padding() {
        let (b, nh, nkv, t, d) = (2, 4, 2, 5, 6);
        let q = rand_vec(b * nh * t * d, 4);
        let k = rand_vec(b * nkv * t * d, 5);
        let v = rand_vec(b * nkv * t * d, 6);
        let pad = [0usize, 2];
        let dev = Device::Cpu;
        let mask = causal_mask(t, t, 0, &pad, &dev).unwrap();
        let got = attention(
            &Tensor::from_vec(q.clone(), (b, nh, t, d), &dev).unwrap(),
            &Tensor::from_vec(k.clone(), (b, nkv, t, d), &dev).unwrap(),
            &Tensor::from_vec(v.clone(), (b, nkv, t, d), &dev).unwrap(),
            &mask,
        )
        .unwrap();
        let got = flat(&got);
        let mut want = vec![0f64; b * nh * t * d];
        for bi in 0..b {
            for h in 0..nh {
                let kh = h / (nh / nkv);
                for i in 0..t {
                    let vis: Vec<usize> = (0..=i).filter(|&j| j >= pad[bi] || j == i).collect();
                    let qv = &q[((bi * nh + h) * t + i) * d..][..d];
                    let s: Vec<f64> = vis
                        .iter()
                        .map(|&j| {
                            let kv = &k[((bi * nkv + kh) * t + j) * d..][..d];
                            qv.iter().zip(kv).map(|(a, c)| *a as f64 * *c as f64).sum::<f64>() / (d as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for (w, &j) in s.iter().zip(&vis) {
                        let p = (w - m).exp() / z;
                        for c in 0..d {
                            want[((bi * nh + h) * t + i) * d + c] += p * v[((bi * nkv + kh) * t + j) * d + c] as f64;
                        }
                    }
                }
            }
        }
        close(&got, &want, 1e-5, "attention");
    }

    #[test]
    fn cross_entropy_equals_the_mean_of_per_token_losses() {
        let (n, v) = (6, 11);
        let logits = Tensor::from_vec(rand_vec(n * v, 7).iter().map(|x| x * 4.0).collect::<Vec<_>>(), (n, v), &Device::Cpu).unwrap();
        let targets: Vec<u32> = vec![0, 3, 10, 5, 5, 1];
        let ce = cross_entropy(&logits, &Tensor::new(targets.as_slice(), &Device::Cpu).unwrap()).unwrap().to_scalar::<f32>().unwrap();
        let per = token_nll(&logits, &targets).unwrap();
        let mean = per.iter().sum::<f64>() / n as f64;
        assert!((ce as f64 - mean).abs() < 1e-5 * mean, "{ce} vs {mean}");
    }
}
