//! CPU references for every kernel, written from the math (not from the kernels): plain loops in f64 over
//! the same inputs (bf16 inputs read as the exact values they hold). `check` compares the kernels with
//! these on the CPU emulation (tests) and on the GPU (`lora gpu check`).

/// The f32 value of bf16 bits (exact).
pub fn bf16_value(bits: u16) -> f64 {
    half::bf16::from_bits(bits).to_f64()
}

/// f32 → bf16 bits, round to nearest even (the `half` crate's conversion).
pub fn to_bf16(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// RMSNorm forward: (y (rows, h), rstd (rows)).
pub fn rmsnorm_fwd(x: &[f32], w: &[u16], rows: usize, h: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; rows * h];
    let mut rstd = vec![0.0; rows];
    for r in 0..rows {
        let xr = &x[r * h..(r + 1) * h];
        let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / h as f64;
        let rs = 1.0 / (ms + eps).sqrt();
        rstd[r] = rs;
        for c in 0..h {
            y[r * h + c] = bf16_value(w[c]) * (xr[c] as f64 * rs);
        }
    }
    (y, rstd)
}

/// RMSNorm backward from first principles: with y_c = w_c x_c rstd and rstd = (mean(x²) + eps)^(-1/2),
/// dx_k = Σ_c dy_c w_c (δ_ck rstd + x_c ∂rstd/∂x_k), ∂rstd/∂x_k = −rstd³ x_k / h; dw_c = Σ_rows dy_c x_c rstd.
/// Returns (dx, dw).
pub fn rmsnorm_bwd(x: &[f32], w: &[u16], dy: &[f32], rows: usize, h: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let mut dx = vec![0.0; rows * h];
    let mut dw = vec![0.0; h];
    for r in 0..rows {
        let xr: Vec<f64> = x[r * h..(r + 1) * h].iter().map(|&v| v as f64).collect();
        let dyr: Vec<f64> = dy[r * h..(r + 1) * h].iter().map(|&v| v as f64).collect();
        let rs = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / h as f64 + eps).sqrt();
        let s: f64 = (0..h).map(|c| dyr[c] * bf16_value(w[c]) * xr[c]).sum();
        for k in 0..h {
            dx[r * h + k] = dyr[k] * bf16_value(w[k]) * rs - s * rs.powi(3) * xr[k] / h as f64;
        }
        for c in 0..h {
            dw[c] += dyr[c] * xr[c] * rs;
        }
    }
    (dx, dw)
}

/// RoPE (rotate_half pairs) with angle p·θ_i from the tables, `sign` +1 forward, −1 backward.
#[allow(clippy::too_many_arguments)]
pub fn rope(x: &[f32], pos: &[u32], cos: &[f32], sin: &[f32], heads: usize, hd: usize, sign: f64) -> Vec<f64> {
    let half = hd / 2;
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for (r, &p) in pos.iter().enumerate() {
        for h in 0..heads {
            let base = (r * heads + h) * hd;
            for i in 0..half {
                let (c, s) = (cos[p as usize * half + i] as f64, sign * sin[p as usize * half + i] as f64);
                let (a, b) = (x[base + i] as f64, x[base + i + half] as f64);
                out[base + i] = a * c - b * s;
                out[base + i + half] = b * c + a * s;
            }
        }
    }
    out
}

/// The RoPE tables for positions 0..max_pos: cos, sin (max_pos, hd/2) f32 of p·θ^(−2i/hd).
pub fn rope_tables(max_pos: usize, hd: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = hd / 2;
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for i in 0..half {
            let a = p as f64 * theta.powf(-2.0 * i as f64 / hd as f64);
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

fn sigmoid(g: f64) -> f64 {
    1.0 / (1.0 + (-g).exp())
}

/// SwiGLU forward: silu(g)·u.
pub fn swiglu_fwd(g: &[f32], u: &[f32]) -> Vec<f64> {
    g.iter().zip(u).map(|(&g, &u)| g as f64 * sigmoid(g as f64) * u as f64).collect()
}

/// SwiGLU backward: (dg, du), dg = dh·u·σ(g)(1 + g(1 − σ(g))), du = dh·silu(g).
pub fn swiglu_bwd(g: &[f32], u: &[f32], dh: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let mut dg = Vec::with_capacity(g.len());
    let mut du = Vec::with_capacity(g.len());
    for i in 0..g.len() {
        let (gi, ui, d) = (g[i] as f64, u[i] as f64, dh[i] as f64);
        let s = sigmoid(gi);
        dg.push(d * ui * s * (1.0 + gi * (1.0 - s)));
        du.push(d * gi * s);
    }
    (dg, du)
}

/// A causal GQA shape for the references: (batch, tq, tk, heads, kv_heads, head_dim).
#[derive(Debug, Clone, Copy)]
pub struct Attn {
    /// Sequences.
    pub batch: usize,
    /// Queries.
    pub tq: usize,
    /// Keys.
    pub tk: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head size.
    pub hd: usize,
}

impl Attn {
    fn qi(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.tq + i) * self.heads + h) * self.hd
    }
    fn kj(&self, b: usize, j: usize, kvh: usize) -> usize {
        ((b * self.tk + j) * self.kv_heads + kvh) * self.hd
    }
    /// The probabilities of query i over keys 0..tk (0 past the causal limit), for (b, h).
    fn probs(&self, q: &[f32], k: &[f32], b: usize, h: usize, i: usize) -> (Vec<f64>, f64) {
        let kvh = h / (self.heads / self.kv_heads);
        let scale = 1.0 / (self.hd as f64).sqrt();
        let last = i + self.tk - self.tq;
        let s: Vec<f64> = (0..=last)
            .map(|j| (0..self.hd).map(|d| q[self.qi(b, i, h) + d] as f64 * k[self.kj(b, j, kvh) + d] as f64).sum::<f64>() * scale)
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
        let mut p: Vec<f64> = s.iter().map(|v| (v - m).exp() / z).collect();
        p.resize(self.tk, 0.0);
        (p, m + z.ln())
    }
}

/// Attention forward: (o like q, lse (batch, heads, tq)).
pub fn attention_fwd(s: &Attn, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let mut o = vec![0.0; q.len()];
    let mut lse = vec![0.0; s.batch * s.heads * s.tq];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let kvh = h / (s.heads / s.kv_heads);
            for i in 0..s.tq {
                let (p, l) = s.probs(q, k, b, h, i);
                lse[(b * s.heads + h) * s.tq + i] = l;
                for (j, pj) in p.iter().enumerate() {
                    for d in 0..s.hd {
                        o[s.qi(b, i, h) + d] += pj * v[s.kj(b, j, kvh) + d] as f64;
                    }
                }
            }
        }
    }
    (o, lse)
}

/// Attention backward by the softmax's Jacobian, written out per (b, h): with P the probabilities,
/// dP = dO·Vᵀ, dS_ij = P_ij (dP_ij − Σ_l P_il dP_il), dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO
/// (key/value heads summed over the query heads that read them). Returns (dq, dk, dv).
pub fn attention_bwd(s: &Attn, q: &[f32], k: &[f32], v: &[f32], dout: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let scale = 1.0 / (s.hd as f64).sqrt();
    let mut dq = vec![0.0; q.len()];
    let mut dk = vec![0.0; k.len()];
    let mut dv = vec![0.0; v.len()];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let kvh = h / (s.heads / s.kv_heads);
            for i in 0..s.tq {
                let (p, _) = s.probs(q, k, b, h, i);
                let dp: Vec<f64> =
                    (0..s.tk).map(|j| (0..s.hd).map(|d| dout[s.qi(b, i, h) + d] as f64 * v[s.kj(b, j, kvh) + d] as f64).sum()).collect();
                let pdp: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in 0..s.tk {
                    let ds = p[j] * (dp[j] - pdp);
                    for d in 0..s.hd {
                        dq[s.qi(b, i, h) + d] += scale * ds * k[s.kj(b, j, kvh) + d] as f64;
                        dk[s.kj(b, j, kvh) + d] += scale * ds * q[s.qi(b, i, h) + d] as f64;
                        dv[s.kj(b, j, kvh) + d] += p[j] * dout[s.qi(b, i, h) + d] as f64;
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

/// Cross-entropy per row and the gradient grad_scale·(softmax − onehot); ignored rows (target
/// `ops::IGNORE`) 0. Returns (loss, dz).
pub fn cross_entropy(z: &[f32], targets: &[u32], vocab: usize, grad_scale: f64) -> (Vec<f64>, Vec<f64>) {
    let mut loss = vec![0.0; targets.len()];
    let mut dz = vec![0.0; z.len()];
    for (r, &t) in targets.iter().enumerate() {
        if t == crate::ops::IGNORE {
            continue;
        }
        let zr: Vec<f64> = z[r * vocab..(r + 1) * vocab].iter().map(|&v| v as f64).collect();
        let m = zr.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + zr.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        loss[r] = lse - zr[t as usize];
        for j in 0..vocab {
            dz[r * vocab + j] = grad_scale * ((zr[j] - lse).exp() - if j == t as usize { 1.0 } else { 0.0 });
        }
    }
    (loss, dz)
}

/// One adapter for the LoRA reference: A (rank, in), B (out, rank), scale.
pub struct LoraRef<'a> {
    /// A.
    pub a: &'a [f32],
    /// B.
    pub b: &'a [f32],
    /// Rank.
    pub rank: usize,
    /// Scale.
    pub scale: f64,
}

/// The LoRA delta of a mixed batch: for each row with adapter a, s_a·(x·A_aᵀ)·B_aᵀ; (tmp (rows, rmax)
/// with tmp = x·A_aᵀ, delta (rows, out)).
pub fn lora_delta(
    x: &[u16],
    adapters: &[LoraRef<'_>],
    segments: &[(usize, Option<usize>)],
    in_dim: usize,
    out_dim: usize,
) -> (Vec<f64>, Vec<f64>) {
    let rows: usize = segments.iter().map(|s| s.0).sum();
    let rmax = adapters.iter().map(|a| a.rank).max().unwrap_or(0).max(1);
    let mut tmp = vec![0.0; rows * rmax];
    let mut delta = vec![0.0; rows * out_dim];
    let mut r = 0;
    for &(n, a) in segments {
        for _ in 0..n {
            if let Some(a) = a {
                let ad = &adapters[a];
                for j in 0..ad.rank {
                    tmp[r * rmax + j] = (0..in_dim).map(|c| bf16_value(x[r * in_dim + c]) * ad.a[j * in_dim + c] as f64).sum();
                }
                for o in 0..out_dim {
                    delta[r * out_dim + o] = ad.scale * (0..ad.rank).map(|j| tmp[r * rmax + j] * ad.b[o * ad.rank + j] as f64).sum::<f64>();
                }
            }
            r += 1;
        }
    }
    (tmp, delta)
}

/// C (m, n) = op(A)·op(B), row-major, op(A) (m, k), op(B) (k, n): A stored (m, k) or, transposed, (k, m);
/// B stored (k, n) or, transposed, (n, k). Inputs as f64.
pub fn gemm(a: &[f64], b: &[f64], m: usize, n: usize, k: usize, a_trans: bool, b_trans: bool) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for p in 0..k {
                let av = if a_trans { a[p * m + i] } else { a[i * k + p] };
                let bv = if b_trans { b[j * k + p] } else { b[p * n + j] };
                s += av * bv;
            }
            c[i * n + j] = s;
        }
    }
    c
}
