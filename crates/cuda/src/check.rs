//! Every kernel on random inputs against the f64 references of [`crate::reference`], each output with its
//! stated tolerance: the checks `lora gpu check` runs on the GPU and the tests run on the CPU emulation.
//!
//! A value passes when |got − want| ≤ abs + rel·|want| (a NaN never passes unless NaN is wanted). The
//! tolerances, with u = 2⁻²⁴ (f32's unit roundoff):
//! - bf16 outputs: the f32 result rounded to bf16 is within half a bf16 ulp of it, at most 2⁻⁸·|v|, plus
//!   the f32 error before rounding: rel = 2⁻⁸ + 1e-5.
//! - f32 sums of n products (norms, dot products, softmax denominators): γ_n·Σ|terms| with γ_n ≈ n·u; the
//!   shapes here have n ≤ 1,000 (8e-5·Σ|terms| at worst, far less for the tree reductions the kernels use),
//!   so abs is a small multiple of the output's largest magnitude (stated per output).
//! - exp/log: the GPU's expf/logf are within 2 ulp, the CPU emulation's (glibc) within 1.
//! - Adam: lora-optim's exact bits (no tolerance): the same IEEE operations in the same order.
//! - casts and the embedding: exact.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::adam::AdamConsts;
use crate::backend::{Backend, DeviceVec};
use crate::error::CudaError;
use crate::ops::{self, AttnShape, LoraAdapterRef, LoraBatch, NormWeightGrad, RopeDirection, RopeTables, IGNORE};
use crate::reference::{self as rf, bf16_value, to_bf16};

type Result<T> = std::result::Result<T, CudaError>;

/// A tolerance: |got − want| ≤ abs + rel·|want|.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Tol {
    /// Absolute part.
    pub abs: f64,
    /// Relative part.
    pub rel: f64,
}

impl Tol {
    /// Exact.
    pub const EXACT: Tol = Tol { abs: 0.0, rel: 0.0 };
    /// A bf16 output (see the module's comment).
    pub const BF16: Tol = Tol { abs: 1e-6, rel: 1.0 / 256.0 + 1e-5 };

    /// `k` times the largest magnitude in `want` (sums with cancellation), plus `rel`.
    pub fn scaled(want: &[f64], k: f64, rel: f64) -> Tol {
        Tol { abs: k * want.iter().fold(0.0f64, |m, v| m.max(v.abs())), rel }
    }
}

/// One output of one kernel compared with its reference.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Comparison {
    /// The kernel (or kernels) run.
    pub kernel: &'static str,
    /// The output compared.
    pub output: &'static str,
    /// Values compared.
    pub elements: usize,
    /// The largest |got − want|.
    pub max_abs_err: f64,
    /// The largest |got − want| / (abs + rel·|want|): at most 1 passes (0/0 counts as 0).
    pub worst_vs_tolerance: f64,
    /// The tolerance.
    pub tolerance: Tol,
    /// Whether every value is within it.
    pub passed: bool,
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:<16} {:<10} {:>7} values, max |err| {:.3e}, worst {:.3} of the tolerance (abs {:.1e} + rel {:.1e})",
            if self.passed { "ok  " } else { "FAIL" },
            self.kernel,
            self.output,
            self.elements,
            self.max_abs_err,
            self.worst_vs_tolerance,
            self.tolerance.abs,
            self.tolerance.rel
        )
    }
}

/// Compares `got` with `want` (the same length). A NaN or an infinity in `want` must be matched exactly.
pub fn compare(kernel: &'static str, output: &'static str, got: &[f64], want: &[f64], tol: Tol) -> Comparison {
    let mut max_abs_err = 0.0f64;
    let mut worst = 0.0f64;
    let mut passed = got.len() == want.len();
    for (&g, &w) in got.iter().zip(want) {
        if w.is_nan() || w.is_infinite() {
            // Wanted exactly: NaN for NaN, the same infinity for an infinity.
            let same = if w.is_nan() { g.is_nan() } else { g == w };
            if !same {
                passed = false;
                worst = f64::INFINITY;
                max_abs_err = f64::INFINITY;
            }
            continue;
        }
        let err = (g - w).abs();
        let err = if err.is_nan() { f64::INFINITY } else { err };
        let allowed = tol.abs + tol.rel * w.abs();
        let ratio = if err == 0.0 {
            0.0
        } else if allowed == 0.0 {
            f64::INFINITY
        } else {
            err / allowed
        };
        max_abs_err = max_abs_err.max(err);
        worst = worst.max(ratio);
        if err > allowed {
            passed = false;
        }
    }
    Comparison { kernel, output, elements: want.len(), max_abs_err, worst_vs_tolerance: worst, tolerance: tol, passed }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comparison_fails_on_an_error_past_the_tolerance_a_stray_nan_or_infinity_and_a_length_mismatch() {
        let t = Tol { abs: 0.1, rel: 0.0 };
        assert!(compare("k", "o", &[1.0, 2.05], &[1.0, 2.0], t).passed);
        assert!(!compare("k", "o", &[1.0, 2.2], &[1.0, 2.0], t).passed);
        assert!(!compare("k", "o", &[f64::NAN], &[1.0], t).passed);
        assert!(!compare("k", "o", &[1.0], &[f64::NAN], t).passed);
        assert!(compare("k", "o", &[f64::NAN, f64::INFINITY], &[f64::NAN, f64::INFINITY], t).passed);
        assert!(!compare("k", "o", &[f64::NEG_INFINITY], &[f64::INFINITY], t).passed);
        assert!(!compare("k", "o", &[f64::INFINITY], &[1e300], t).passed);
        assert!(!compare("k", "o", &[1.0], &[1.0, 2.0], t).passed);
        let c = compare("k", "o", &[1.0, 2.05], &[1.0, 2.0], t);
        assert!((c.worst_vs_tolerance - 0.5).abs() < 1e-9 && (c.max_abs_err - 0.05).abs() < 1e-9, "{c:?}");
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn bf16s(v: &[u16]) -> Vec<f64> {
    v.iter().map(|&x| bf16_value(x)).collect()
}

fn uniform(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn bf16_uniform(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<u16> {
    (0..n).map(|_| to_bf16(rng.random_range(lo..hi))).collect()
}

/// A group of checks: one kernel or a forward/backward pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum KernelCheck {
    /// bf16 ↔ f32 casts.
    Cast,
    /// The embedding gather.
    Embedding,
    /// RMSNorm forward and backward (dx, dw).
    RmsNorm,
    /// RoPE forward, backward, and backward ∘ forward = identity.
    Rope,
    /// SwiGLU forward and backward.
    SwiGlu,
    /// Attention forward and backward, head size 32.
    Attention32,
    /// … head size 64.
    Attention64,
    /// … head size 128.
    Attention128,
    /// Cross-entropy loss and gradient, ignore index, a bad target.
    CrossEntropy,
    /// Adam against lora-optim's bits.
    Adam,
    /// LoRA shrink and expand over a mixed batch.
    Lora,
}

impl KernelCheck {
    /// Every check.
    pub const ALL: [KernelCheck; 11] = [
        KernelCheck::Cast,
        KernelCheck::Embedding,
        KernelCheck::RmsNorm,
        KernelCheck::Rope,
        KernelCheck::SwiGlu,
        KernelCheck::Attention32,
        KernelCheck::Attention64,
        KernelCheck::Attention128,
        KernelCheck::CrossEntropy,
        KernelCheck::Adam,
        KernelCheck::Lora,
    ];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            KernelCheck::Cast => "cast",
            KernelCheck::Embedding => "embedding",
            KernelCheck::RmsNorm => "rmsnorm",
            KernelCheck::Rope => "rope",
            KernelCheck::SwiGlu => "swiglu",
            KernelCheck::Attention32 => "attention_hd32",
            KernelCheck::Attention64 => "attention_hd64",
            KernelCheck::Attention128 => "attention_hd128",
            KernelCheck::CrossEntropy => "cross_entropy",
            KernelCheck::Adam => "adam",
            KernelCheck::Lora => "lora",
        }
    }

    /// Runs the check on `b` with inputs drawn from `seed`.
    pub fn run<B: Backend>(self, b: &B, seed: u64) -> Result<Vec<Comparison>> {
        let mut rng = StdRng::seed_from_u64(seed ^ (self as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        match self {
            KernelCheck::Cast => cast(b, &mut rng),
            KernelCheck::Embedding => embedding(b, &mut rng),
            KernelCheck::RmsNorm => rmsnorm(b, &mut rng),
            KernelCheck::Rope => rope(b, &mut rng),
            KernelCheck::SwiGlu => swiglu(b, &mut rng),
            KernelCheck::Attention32 => attention(b, &mut rng, 32),
            KernelCheck::Attention64 => attention(b, &mut rng, 64),
            KernelCheck::Attention128 => attention(b, &mut rng, 128),
            KernelCheck::CrossEntropy => cross_entropy(b, &mut rng),
            KernelCheck::Adam => adam(b, &mut rng),
            KernelCheck::Lora => lora(b, &mut rng),
        }
    }
}

/// The outcome of one check group: its comparisons, or the error that stopped it.
#[derive(Debug, serde::Serialize)]
pub struct CheckOutcome {
    /// The check.
    pub check: &'static str,
    /// Its comparisons (empty when it failed to run).
    pub comparisons: Vec<Comparison>,
    /// Why it did not run.
    pub error: Option<String>,
    /// Every comparison passed and nothing failed.
    pub passed: bool,
}

/// Runs every check on `b`; a check that errors is recorded and the others still run.
pub fn run_all<B: Backend>(b: &B, seed: u64) -> Vec<CheckOutcome> {
    KernelCheck::ALL
        .iter()
        .map(|&c| match c.run(b, seed) {
            Ok(comparisons) => {
                let passed = !comparisons.is_empty() && comparisons.iter().all(|x| x.passed);
                CheckOutcome { check: c.name(), comparisons, error: None, passed }
            }
            Err(e) => CheckOutcome { check: c.name(), comparisons: Vec::new(), error: Some(e.to_string()), passed: false },
        })
        .collect()
}

fn cast<B: Backend>(b: &B, rng: &mut StdRng) -> Result<Vec<Comparison>> {
    // Random values, and the cases rounding must get right: ties to even either way, the largest finite
    // values (rounding to infinity), infinities, NaN, signed zero, subnormals.
    let mut x = uniform(rng, 1003, -3.0, 3.0);
    x.extend([
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        -(1.0 + 1.0 / 256.0),
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -0.0,
        1e-40,
        -3e-39,
    ]);
    let dx = DeviceVec::upload(b, &x)?;
    let mut dy = DeviceVec::<B, u16>::zeros(b, x.len())?;
    ops::cast_f32_to_bf16(b, &dx, &mut dy)?;
    let got = dy.download(b)?;
    let want: Vec<f64> = x.iter().map(|&v| bf16_value(to_bf16(v))).collect();
    let c1 = compare("cast_f32_to_bf16", "y", &bf16s(&got), &want, Tol::EXACT);
    let mut back = DeviceVec::<B, f32>::zeros(b, x.len())?;
    ops::cast_bf16_to_f32(b, &dy, &mut back)?;
    let c2 = compare("cast_bf16_to_f32", "y", &f64s(&back.download(b)?), &bf16s(&got), Tol::EXACT);
    Ok(vec![c1, c2])
}

fn embedding<B: Backend>(b: &B, rng: &mut StdRng) -> Result<Vec<Comparison>> {
    let (vocab, hidden, rows) = (50, 300, 17);
    let table = bf16_uniform(rng, vocab * hidden, -1.0, 1.0);
    let mut ids: Vec<u32> = (0..rows).map(|_| rng.random_range(0..vocab as u32)).collect();
    ids[5] = vocab as u32; // out of the vocabulary: a row of NaN, not a read past the table
    let mut out = DeviceVec::<B, f32>::zeros(b, rows * hidden)?;
    ops::embedding(b, &DeviceVec::upload(b, &ids)?, &DeviceVec::upload(b, &table)?, &mut out, vocab, hidden)?;
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&id| (0..hidden).map(move |c| (id, c)))
        .map(|(id, c)| if (id as usize) < vocab { bf16_value(table[id as usize * hidden + c]) } else { f64::NAN })
        .collect();
    Ok(vec![compare("embedding_bf16", "out", &f64s(&out.download(b)?), &want, Tol::EXACT)])
}

fn rmsnorm<B: Backend>(b: &B, rng: &mut StdRng) -> Result<Vec<Comparison>> {
    let (rows, h, eps) = (7, 300, 1e-5f32);
    let x = uniform(rng, rows * h, -2.0, 2.0);
    let w = bf16_uniform(rng, h, 0.5, 1.5);
    let dy = uniform(rng, rows * h, -1.0, 1.0);
    let prior = uniform(rng, rows * h, -1.0, 1.0); // dx is accumulated onto this
    let (dxv, dwv) = (DeviceVec::upload(b, &x)?, DeviceVec::upload(b, &w)?);
    let mut y = DeviceVec::<B, u16>::zeros(b, rows * h)?;
    let mut rstd = DeviceVec::<B, f32>::zeros(b, rows)?;
    ops::rmsnorm_fwd(b, &dxv, &dwv, &mut y, &mut rstd, rows, h, eps)?;
    let (y_ref, rstd_ref) = rf::rmsnorm_fwd(&x, &w, rows, h, eps as f64);
    let mut dx = DeviceVec::upload(b, &prior)?;
    let mut dw = DeviceVec::<B, f32>::zeros(b, h)?;
    ops::rmsnorm_bwd(
        b,
        &dxv,
        &dwv,
        &rstd,
        &DeviceVec::upload(b, &dy)?,
        &mut dx,
        true,
        Some(NormWeightGrad { dw: &mut dw, accumulate: false }),
        rows,
        h,
    )?;
    let (dx_ref, dw_ref) = rf::rmsnorm_bwd(&x, &w, &dy, rows, h, eps as f64);
    let dx_want: Vec<f64> = dx_ref.iter().zip(&prior).map(|(d, &p)| d + p as f64).collect();
    Ok(vec![
        compare("rmsnorm_fwd", "y", &bf16s(&y.download(b)?), &y_ref, Tol::BF16),
        // rstd: a sum of 300 squares and a square root: ≤ 300u relative.
        compare("rmsnorm_fwd", "rstd", &f64s(&rstd.download(b)?), &rstd_ref, Tol { abs: 0.0, rel: 2e-5 }),
        compare("rmsnorm_bwd_dx", "dx (+=)", &f64s(&dx.download(b)?), &dx_want, Tol::scaled(&dx_want, 2e-5, 1e-5)),
        compare("rmsnorm_dw", "dw", &f64s(&dw.download(b)?), &dw_ref, Tol::scaled(&dw_ref, 2e-5, 1e-5)),
    ])
}

fn rope<B: Backend>(b: &B, rng: &mut StdRng) -> Result<Vec<Comparison>> {
    let (rows, heads, hd, max_pos) = (9, 3, 64, 40);
    let (cos, sin) = rf::rope_tables(max_pos, hd, 10000.0);
    let x = uniform(rng, rows * heads * hd, -2.0, 2.0);
    let mut pos: Vec<u32> = (0..rows).map(|_| rng.random_range(0..max_pos as u32)).collect();
    pos[rows - 1] = max_pos as u32; // past the tables: NaN, not a read out of bounds
    let (cv, sv, pv) = (DeviceVec::upload(b, &cos)?, DeviceVec::upload(b, &sin)?, DeviceVec::upload(b, &pos)?);
    let tables = RopeTables { cos: &cv, sin: &sv, max_pos };
    let mut dx = DeviceVec::upload(b, &x)?;
    ops::rope(b, &mut dx, &pv, &tables, heads, hd, RopeDirection::Forward)?;
    let fwd = dx.download(b)?;
    let nan_last = |mut v: Vec<f64>| {
        let n = v.len();
        v[n - heads * hd..].iter_mut().for_each(|x| *x = f64::NAN);
        v
    };
    let mut safe_pos = pos.clone();
    safe_pos[rows - 1] = 0;
    let fwd_ref = nan_last(rf::rope(&x, &safe_pos, &cos, &sin, heads, hd, 1.0));
    let mut dg = DeviceVec::upload(b, &x)?;
    ops::rope(b, &mut dg, &pv, &tables, heads, hd, RopeDirection::Backward)?;
    let bwd_ref = nan_last(rf::rope(&x, &safe_pos, &cos, &sin, heads, hd, -1.0));
    ops::rope(b, &mut dx, &pv, &tables, heads, hd, RopeDirection::Backward)?;
    // a·c − b·s: three roundings of terms ≤ 2 in magnitude.
    let tol = Tol { abs: 16.0 * f32::EPSILON as f64, rel: 0.0 };
    Ok(vec![
        compare("rope_fwd", "x", &f64s(&fwd), &fwd_ref, tol),
        compare("rope_bwd", "dx", &f64s(&dg.download(b)?), &bwd_ref, tol),
        // The rotation and its inverse (cos² + sin² = 1 only to f32's rounding of the tables).
        compare("rope_bwd∘fwd", "x", &f64s(&dx.download(b)?), &nan_last(f64s(&x)), Tol { abs: 64.0 * f32::EPSILON as f64, rel: 0.0 }),
    ])
}

fn swiglu<B: Backend>(b: &B, rng: &mut StdRng) -> Result<Vec<Comparison>> {
    let n = 1005;
    let (g, u, dh) = (uniform(rng, n, -6.0, 6.0), uniform(rng, n, -2.0, 2.0), uniform(rng, n, -1.0, 1.0));
    let (gv, uv) = (DeviceVec::upload(b, &g)?, DeviceVec::upload(b, &u)?);
    let mut h = DeviceVec::<B, u16>::zeros(b, n)?;
    ops::swiglu_fwd(b, &gv, &uv, &mut h)?;
    let (mut dg, mut du) = (DeviceVec::<B, f32>::zeros(b, n)?, DeviceVec::<B, f32>::zeros(b, n)?);
    ops::swiglu_bwd(b, &gv, &uv, &DeviceVec::upload(b, &dh)?, &mut dg, &mut du)?;
    let (dg_ref, du_ref) = rf::swiglu_bwd(&g, &u, &dh);
    // A few roundings and expf (≤ 2 ulp): 1e-5 relative, with abs for values near 0.
    let tol = Tol { abs: 1e-6, rel: 1e-5 };
    Ok(vec![
        compare("swiglu_fwd", "h", &bf16s(&h.download(b)?), &rf::swiglu_fwd(&g, &u), Tol::BF16),
        compare("swiglu_bwd", "dg", &f64s(&dg.download(b)?), &dg_ref, tol),
        compare("swiglu_bwd", "du", &f64s(&du.download(b)?), &du_ref, tol),
    ])
}

fn attention<B: Backend>(b: &B, rng: &mut StdRng, hd: usize) -> Result<Vec<Comparison>> {
    let mut out = Vec::new();
    // Training (tq = tk, ragged against the 64-query blocks and 32-key tiles), and decoding after a cache.
    for (batch, tq, tk) in [(2, 70, 70), (1, 3, 40)] {
        let s = AttnShape { batch, tq, tk, heads: 4, kv_heads: 2, head_dim: hd };
        let r = rf::Attn { batch, tq, tk, heads: 4, kv_heads: 2, hd };
        let ql = batch * tq * 4 * hd;
        let kl = batch * tk * 2 * hd;
        let (q, k, v, dout) =
            (uniform(rng, ql, -1.5, 1.5), uniform(rng, kl, -1.5, 1.5), uniform(rng, kl, -1.0, 1.0), uniform(rng, ql, -1.0, 1.0));
        let (qv, kv, vv) = (DeviceVec::upload(b, &q)?, DeviceVec::upload(b, &k)?, DeviceVec::upload(b, &v)?);
        let mut o = DeviceVec::<B, f32>::zeros(b, ql)?;
        let mut lse = DeviceVec::<B, f32>::zeros(b, batch * 4 * tq)?;
        ops::attention_fwd(b, &s, &qv, &kv, &vv, &mut o, &mut lse)?;
        let (o_ref, lse_ref) = rf::attention_fwd(&r, &q, &k, &v);
        // o: softmax-weighted sums of ≤ 70 values ≤ 1 with f32 exp and rescaling: 2e-5 of the largest.
        out.push(compare("attn_fwd", "o", &f64s(&o.download(b)?), &o_ref, Tol::scaled(&o_ref, 2e-5, 1e-5)));
        out.push(compare("attn_fwd", "lse", &f64s(&lse.download(b)?), &lse_ref, Tol { abs: 1e-5, rel: 1e-6 }));
        let (mut dq, mut dk, mut dv) =
            (DeviceVec::<B, f32>::zeros(b, ql)?, DeviceVec::<B, f32>::zeros(b, kl)?, DeviceVec::<B, f32>::zeros(b, kl)?);
        ops::attention_bwd(b, &s, &qv, &kv, &vv, &o, &lse, &DeviceVec::upload(b, &dout)?, &mut dq, &mut dk, &mut dv)?;
        let (dq_ref, dk_ref, dv_ref) = rf::attention_bwd(&r, &q, &k, &v, &dout);
        // Sums over ≤ 2·70 probabilities times differences (cancellation): 1e-4 of the largest.
        out.push(compare("attn_bwd", "dq", &f64s(&dq.download(b)?), &dq_ref, Tol::scaled(&dq_ref, 1e-4, 1e-4)));
        out.push(compare("attn_bwd", "dk", &f64s(&dk.download(b)?), &dk_ref, Tol::scaled(&dk_ref, 1e-4, 1e-4)));
        out.push(compare("attn_bwd", "dv", &f64s(&dv.download(b)?), &dv_ref, Tol::scaled(&dv_ref, 1e-4, 1e-4)));
    }
    Ok(out)
}

fn cross_entropy<B: Backend>(b: &B, rng: &mut StdRng) -> Result<Vec<Comparison>> {
    let (rows, vocab) = (6, 1000);
    let z = uniform(rng, rows * vocab, -8.0, 8.0);
    let mut t: Vec<u32> = (0..rows).map(|_| rng.random_range(0..vocab as u32)).collect();
    t[2] = IGNORE;
    t[4] = vocab as u32; // outside the vocabulary: NaN, not a read past the row
    let kept = t.iter().filter(|&&x| x != IGNORE).count();
    let scale = 1.0 / kept as f32;
    let mut zv = DeviceVec::upload(b, &z)?;
    let mut loss = DeviceVec::<B, f32>::zeros(b, rows)?;
    ops::cross_entropy(b, &mut zv, &DeviceVec::upload(b, &t)?, &mut loss, vocab, Some(scale))?;
    let mut safe = t.clone();
    safe[4] = 0;
    let (mut loss_ref, mut dz_ref) = rf::cross_entropy(&z, &safe, vocab, scale as f64);
    loss_ref[4] = f64::NAN;
    dz_ref[4 * vocab..5 * vocab].iter_mut().for_each(|x| *x = f64::NAN);
    Ok(vec![
        // logsumexp of 1,000 values: a sum of 1,000 exps (relative ≤ ~10u after the tree) and a log.
        compare("cross_entropy", "loss", &f64s(&loss.download(b)?), &loss_ref, Tol { abs: 1e-5, rel: 1e-5 }),
        compare("cross_entropy", "dlogits", &f64s(&zv.download(b)?), &dz_ref, Tol { abs: 1e-6 * scale as f64, rel: 1e-5 }),
    ])
}

fn adam<B: Backend>(b: &B, rng: &mut StdRng) -> Result<Vec<Comparison>> {
    use lora_optim::{adam_update_serial, AdamConfig, AdamStep};
    let n = 1007;
    let cfg = AdamConfig { lr: 3e-3, weight_decay: 0.1, ..AdamConfig::default() };
    let variants: [(&'static str, AdamConsts, AdamStep); 3] = [
        ("θ (decay, clip)", AdamConsts::new(&cfg, 3).with_grad_scale(0.75), AdamStep::new(&cfg, 3).with_grad_scale(0.75)),
        ("θ (LoRA+ ×16)", AdamConsts::new(&cfg, 1).with_lr_scale(16.0, &cfg), AdamStep::new(&cfg, 1).with_lr_scale(16.0, &cfg)),
        ("θ (no decay)", AdamConsts::new(&cfg, 1000).without_decay(), AdamStep::new(&cfg, 1000).without_decay()),
    ];
    let mut out = Vec::new();
    for (name, consts, step) in variants {
        let theta = uniform(rng, n, -1.0, 1.0);
        let g = uniform(rng, n, -1.0, 1.0);
        let m = uniform(rng, n, -0.1, 0.1);
        let v: Vec<f32> = uniform(rng, n, 0.0, 0.01);
        let (mut tv, mut mv, mut vv) = (DeviceVec::upload(b, &theta)?, DeviceVec::upload(b, &m)?, DeviceVec::upload(b, &v)?);
        ops::adam_step(b, &mut tv, &DeviceVec::upload(b, &g)?, &mut mv, &mut vv, &consts)?;
        let (mut t_ref, mut m_ref, mut v_ref) = (theta.clone(), m.clone(), v.clone());
        adam_update_serial(&mut t_ref, &g, &mut m_ref, &mut v_ref, step).map_err(|e| CudaError::Backend(e.to_string()))?;
        // Bits: compare the bit patterns as numbers, so any difference is an error.
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits() as f64).collect::<Vec<_>>();
        out.push(compare("adam_step", name, &bits(&tv.download(b)?), &bits(&t_ref), Tol::EXACT));
        out.push(compare(
            "adam_step",
            "m, v",
            &[bits(&mv.download(b)?), bits(&vv.download(b)?)].concat(),
            &[bits(&m_ref), bits(&v_ref)].concat(),
            Tol::EXACT,
        ));
    }
    Ok(out)
}

fn lora<B: Backend>(b: &B, rng: &mut StdRng) -> Result<Vec<Comparison>> {
    let (in_dim, out_dim) = (300, 200);
    let ranks = [8usize, 16, 3];
    let host: Vec<(Vec<f32>, Vec<f32>)> =
        ranks.iter().map(|&r| (uniform(rng, r * in_dim, -0.5, 0.5), uniform(rng, out_dim * r, -0.5, 0.5))).collect();
    let scales = [2.0f32, 0.5, 4.0];
    // Rows with adapters 0, none, 2, (an empty segment of) 1, 1: mixed, ragged, ranks differing.
    let segments = [(3, Some(0)), (2, None), (4, Some(2)), (0, Some(1)), (5, Some(1))];
    let rows: usize = segments.iter().map(|s| s.0).sum();
    let x = bf16_uniform(rng, rows * in_dim, -1.0, 1.0);
    let y0 = uniform(rng, rows * out_dim, -1.0, 1.0);
    let dev: Vec<(DeviceVec<B, f32>, DeviceVec<B, f32>)> =
        host.iter().map(|(a, bb)| Ok((DeviceVec::upload(b, a)?, DeviceVec::upload(b, bb)?))).collect::<Result<_>>()?;
    let refs: Vec<LoraAdapterRef<'_, B>> =
        dev.iter().zip(ranks).zip(scales).map(|(((a, bb), rank), scale)| LoraAdapterRef { a, b: bb, rank, scale }).collect();
    let batch = LoraBatch::new(b, &refs, &segments, in_dim, out_dim)?;
    let mut tmp = DeviceVec::<B, f32>::zeros(b, rows * batch.rmax())?;
    ops::lora_shrink(b, &DeviceVec::upload(b, &x)?, &batch, &mut tmp)?;
    let mut y = DeviceVec::upload(b, &y0)?;
    ops::lora_expand(b, &tmp, &batch, &mut y)?;
    let hr: Vec<rf::LoraRef<'_>> =
        host.iter().zip(ranks).zip(scales).map(|(((a, bb), rank), s)| rf::LoraRef { a, b: bb, rank, scale: s as f64 }).collect();
    let (tmp_ref, delta) = rf::lora_delta(&x, &hr, &segments, in_dim, out_dim);
    let y_ref: Vec<f64> = y0.iter().zip(&delta).map(|(&a, d)| a as f64 + d).collect();
    // Dot products of 300 (shrink) and ≤ 16 (expand) terms: 2e-5 of the largest value.
    Ok(vec![
        compare("lora_shrink", "x·Aᵀ", &f64s(&tmp.download(b)?), &tmp_ref, Tol::scaled(&tmp_ref, 2e-5, 1e-5)),
        compare("lora_expand", "y + s·t·Bᵀ", &f64s(&y.download(b)?), &y_ref, Tol::scaled(&y_ref, 2e-5, 1e-5)),
    ])
}
