//! A LoRA delta added to a few rows in one pass, the shape of a serving batch's groups (one decode token
//! per sequence, each sequence with its own adapter). For rows x_i of x (n, in) and y_i of y (n, out),
//! A (r, in) and Bᵀ (r, out) stored row-major, scale s:
//!
//! ```text
//! t   = A·x_i                  r dot products, L lanes apart, then the lanes summed
//! d   = Σ_j t_j · Bᵀ_j         one fused multiply-add chain per output, j = 0, 1, …, r−1
//! y_i = y_i + d·s              a product, then a sum (the fused layer's `y + (d * s)`)
//! ```
//!
//! Two generic products would cost two plans, two dispatches and a scratch matrix for what is, on one row,
//! r·(in + out) multiply-adds (about 4,000 for the LM demo's projections); this is one call per group.
//! Each row is computed alone and in the same order whatever n is, so a row's delta does not depend on the
//! rest of the batch. The dot products' rounding depends on the lane count L (their lanes are summed
//! last), so results differ across instruction sets by f32 rounding.

use pulp::WithSimd;

use crate::error::{bail, Result};
use crate::isa::{first_lanes, load, store, Isa};

/// One adapter's delta for one layer, as [`add_delta`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct DeltaRef<'a> {
    /// A, (r, in) row-major.
    pub a: &'a [f32],
    /// Bᵀ, (r, out) row-major.
    pub bt: &'a [f32],
    /// The rank r (rows of A and of Bᵀ).
    pub rank: usize,
    /// The factor s.
    pub scale: f32,
}

/// `y_i += s·(x_i·Aᵀ)·Bᵀ` for the `n` rows of x (n, in) and y (n, out), in = A's columns, out = Bᵀ's.
pub fn add_delta(x: &[f32], y: &mut [f32], n: usize, d: DeltaRef<'_>) -> Result<()> {
    add_delta_on(Isa::current(), x, y, n, d)
}

/// [`add_delta`] on `isa` (`None`: the portable loop), so that tests run every instruction set the CPU has.
fn add_delta_on(isa: Option<Isa>, x: &[f32], y: &mut [f32], n: usize, d: DeltaRef<'_>) -> Result<()> {
    let r = d.rank;
    if r == 0 || !d.a.len().is_multiple_of(r) || !d.bt.len().is_multiple_of(r) {
        bail!("add_delta: A ({} values) and Bᵀ ({} values) are not {r} rows each", d.a.len(), d.bt.len())
    }
    let (inp, out) = (d.a.len() / r, d.bt.len() / r);
    if Some(x.len()) != n.checked_mul(inp) || Some(y.len()) != n.checked_mul(out) {
        bail!("add_delta: x ({} values) and y ({}) are not {n} rows of {inp} and {out}", x.len(), y.len())
    }
    if n == 0 || inp == 0 || out == 0 {
        return Ok(());
    }
    let mut t = vec![0f32; r];
    match isa {
        Some(isa) => {
            // Every pointer the rows read or write lies inside x, y, A or Bᵀ: their lengths were checked
            // above against n, r, in and out.
            isa.vectorize(Rows {
                x: x.as_ptr(),
                y: y.as_mut_ptr(),
                n,
                inp,
                out,
                a: d.a.as_ptr(),
                bt: d.bt.as_ptr(),
                r,
                scale: d.scale,
                t: t.as_mut_ptr(),
            });
            isa.finish();
        }
        None => portable(x, y, n, d, &mut t),
    }
    Ok(())
}

/// [`add_delta`] without SIMD kernels of ours: the same sums in the build's baseline instructions (the
/// dot products in plain order, so their rounding differs from the kernels').
fn portable(x: &[f32], y: &mut [f32], n: usize, d: DeltaRef<'_>, t: &mut [f32]) {
    let (r, out) = (d.rank, d.bt.len() / d.rank);
    let inp = d.a.len() / r;
    let mut acc = vec![0f32; out];
    for i in 0..n {
        let xi = &x[i * inp..(i + 1) * inp];
        for (tj, aj) in t.iter_mut().zip(d.a.chunks_exact(inp)) {
            *tj = xi.iter().zip(aj).map(|(a, b)| a * b).sum();
        }
        acc.fill(0.0);
        for (tj, bj) in t.iter().zip(d.bt.chunks_exact(out)) {
            for (o, b) in acc.iter_mut().zip(bj) {
                *o += tj * b;
            }
        }
        for (yo, o) in y[i * out..(i + 1) * out].iter_mut().zip(&acc) {
            *yo += o * d.scale;
        }
    }
}

/// The rows of [`add_delta`], built only there from length-checked slices: x (n, in), y (n, out), A (r, in),
/// Bᵀ (r, out) and the scratch t (r) are valid for the reads and writes below.
struct Rows {
    x: *const f32,
    y: *mut f32,
    n: usize,
    inp: usize,
    out: usize,
    a: *const f32,
    bt: *const f32,
    r: usize,
    scale: f32,
    t: *mut f32,
}

/// Rows of A per block of dot products (J accumulators, x loaded once for J rows of A).
const J: usize = 4;
/// Vectors of outputs per block of the second product (V accumulators, t_j broadcast once for V vectors).
const V: usize = 4;

impl WithSimd for Rows {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let t = &self;
        for i in 0..t.n {
            // SAFETY: row i < n of x and y, the r rows of A and Bᵀ and the r values of t are valid (see
            // `Rows`); every block below stays inside them.
            unsafe {
                let x = t.x.add(i * t.inp);
                let mut j = 0;
                while j + J <= t.r {
                    dots::<S, J>(simd, t, x, j);
                    j += J;
                }
                match t.r - j {
                    3 => dots::<S, 3>(simd, t, x, j),
                    2 => dots::<S, 2>(simd, t, x, j),
                    1 => dots::<S, 1>(simd, t, x, j),
                    _ => {}
                }
                let y = t.y.add(i * t.out);
                let lanes = S::F32_LANES;
                let mut c = 0;
                while c + V * lanes <= t.out {
                    axpys::<S, V>(simd, t, y, c, V * lanes);
                    c += V * lanes;
                }
                while c < t.out {
                    let w = (t.out - c).min(lanes);
                    axpys::<S, 1>(simd, t, y, c, w);
                    c += w;
                }
            }
        }
    }
}

/// `t[j0 + q] = Σ_k x[k]·A[j0 + q][k]` for q < Q: L lanes of k at a time (the tail masked), then one
/// horizontal sum each.
///
/// # Safety
/// `x` points at a row of `t.inp` values; rows j0..j0+Q of A and values j0..j0+Q of t are valid.
#[inline(always)]
unsafe fn dots<S: pulp::Simd, const Q: usize>(simd: S, t: &Rows, x: *const f32, j0: usize) {
    // SAFETY: every operation below stays within what this function's `# Safety` contract (above)
    // makes the caller guarantee.
    unsafe {
        let lanes = S::F32_LANES;
        let a = t.a.add(j0 * t.inp);
        let mut acc = [simd.splat_f32s(0.0); Q];
        let full = first_lanes(simd, lanes);
        let whole = t.inp - t.inp % lanes;
        let mut k = 0;
        while k < whole {
            let xv = load(simd, x.add(k), false, full);
            for (q, s) in acc.iter_mut().enumerate() {
                *s = simd.mul_add_f32s(xv, load(simd, a.add(q * t.inp + k), false, full), *s);
            }
            k += lanes;
        }
        if k < t.inp {
            let m = first_lanes(simd, t.inp - k);
            let xv = load(simd, x.add(k), true, m);
            for (q, s) in acc.iter_mut().enumerate() {
                *s = simd.mul_add_f32s(xv, load(simd, a.add(q * t.inp + k), true, m), *s);
            }
        }
        for (q, s) in acc.iter().enumerate() {
            *t.t.add(j0 + q) = simd.reduce_sum_f32s(*s);
        }
    }
}

/// `y[c..c+w] += s·Σ_j t_j·Bᵀ[j][c..c+w]` for `w` ≤ W·L columns (W vectors, the last masked when `w` is
/// short of W·L; used with W = 1 for ragged ends).
///
/// # Safety
/// `y` points at a row of `t.out` values, `c + w ≤ t.out`, and t holds r values.
#[inline(always)]
unsafe fn axpys<S: pulp::Simd, const W: usize>(simd: S, t: &Rows, y: *mut f32, c: usize, w: usize) {
    // SAFETY: every operation below stays within what this function's `# Safety` contract (above)
    // makes the caller guarantee.
    unsafe {
        let lanes = S::F32_LANES;
        debug_assert!(w > (W - 1) * lanes && w <= W * lanes, "axpys: {w} columns in {W} vectors of {lanes}");
        let masked = w < W * lanes;
        let mask = first_lanes(simd, w - (W - 1) * lanes);
        let full = first_lanes(simd, lanes);
        let mut acc = [simd.splat_f32s(0.0); W];
        for j in 0..t.r {
            let tj = simd.splat_f32s(*t.t.add(j));
            let b = t.bt.add(j * t.out + c);
            for (v, s) in acc.iter_mut().enumerate() {
                let last = masked && v == W - 1;
                *s = simd.mul_add_f32s(tj, load(simd, b.add(v * lanes), last, if last { mask } else { full }), *s);
            }
        }
        let scale = simd.splat_f32s(t.scale);
        for (v, s) in acc.iter().enumerate() {
            let last = masked && v == W - 1;
            let m = if last { mask } else { full };
            let p = y.add(c + v * lanes);
            store(simd, p, simd.add_f32s(load(simd, p, last, m), simd.mul_f32s(*s, scale)), last, m);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut g = StdRng::seed_from_u64(seed);
        (0..n).map(|_| g.random::<f32>() * 2.0 - 1.0).collect()
    }

    /// (n, in, out, r): one decode row on the LM's shapes, ragged widths for every lane count (16, 8, 4),
    /// ranks that leave 1, 2 and 3 rows of A after the blocks of four, and several rows.
    const SHAPES: [(usize, usize, usize, usize); 6] =
        [(1, 256, 768, 8), (3, 37, 29, 5), (2, 300, 70, 1), (5, 17, 131, 7), (1, 3, 2, 6), (4, 64, 64, 16)];

    #[allow(clippy::too_many_arguments)]
    fn check(
        what: &str,
        x: &[f32],
        y0: &[f32],
        got: &[f32],
        (n, inp, out, r): (usize, usize, usize, usize),
        a: &[f32],
        bt: &[f32],
        s: f32,
    ) {
        for i in 0..n {
            let t: Vec<(f64, f64)> = (0..r)
                .map(|j| (0..inp).map(|k| x[i * inp + k] as f64 * a[j * inp + k] as f64).fold((0.0, 0.0), |(v, m), p| (v + p, m + p.abs())))
                .collect();
            for c in 0..out {
                let e = f32::EPSILON as f64;
                let b = |j: usize| bt[j * out + c] as f64;
                let d: f64 = t.iter().enumerate().map(|(j, (tj, _))| tj * b(j)).sum();
                let want = y0[i * out + c] as f64 + s as f64 * d;
                // Each t_j is off by ≤ in·ε·Σ_k|x·a| (any order of summation, ε = 2⁻²⁴ per rounding), which
                // B multiplies; the chain over j adds ≤ r·ε·Σ_j|t_j·b_j|; scaling and the add a few ε of the
                // result. Twice that bounds every order and lane count; a wrong or missing term is ≈ 0.1.
                let from_t: f64 = t.iter().enumerate().map(|(j, (_, m))| inp as f64 * e * m * b(j).abs()).sum();
                let from_chain: f64 = t.iter().enumerate().map(|(j, (tj, _))| r as f64 * e * (tj * b(j)).abs()).sum();
                let tol = 2.0 * s.abs() as f64 * (from_t + from_chain) + 4.0 * e * (want.abs() + 1.0);
                let g = got[i * out + c] as f64;
                assert!((g - want).abs() <= tol, "{what} {:?}: y[{i}][{c}] = {g}, want {want} ± {tol}", (n, inp, out, r));
            }
        }
    }

    /// Every instruction set this CPU has, and the portable loop (None).
    fn paths() -> Vec<Option<Isa>> {
        std::iter::once(None).chain(Isa::every_available().into_iter().map(Some)).collect()
    }

    #[test]
    fn the_delta_on_every_instruction_set_matches_an_f64_reference_within_f32_rounding() {
        for (si, &(n, inp, out, r)) in SHAPES.iter().enumerate() {
            let s = si as u64 * 10;
            let (x, a, bt, y0) = (rand_vec(n * inp, s + 1), rand_vec(r * inp, s + 2), rand_vec(r * out, s + 3), rand_vec(n * out, s + 4));
            for isa in paths() {
                let mut y = y0.clone();
                add_delta_on(isa, &x, &mut y, n, DeltaRef { a: &a, bt: &bt, rank: r, scale: 1.75 }).unwrap();
                check(&format!("{isa:?}"), &x, &y0, &y, (n, inp, out, r), &a, &bt, 1.75);
            }
            let mut y = y0.clone();
            add_delta(&x, &mut y, n, DeltaRef { a: &a, bt: &bt, rank: r, scale: 1.75 }).unwrap();
            check("add_delta", &x, &y0, &y, (n, inp, out, r), &a, &bt, 1.75);
        }
    }

    #[test]
    fn a_rows_delta_is_the_same_alone_and_among_other_rows() {
        let (n, inp, out, r) = (6, 45, 77, 3);
        let (x, a, bt, y0) = (rand_vec(n * inp, 1), rand_vec(r * inp, 2), rand_vec(r * out, 3), rand_vec(n * out, 4));
        let d = DeltaRef { a: &a, bt: &bt, rank: r, scale: 0.5 };
        for isa in paths() {
            let mut all = y0.clone();
            add_delta_on(isa, &x, &mut all, n, d).unwrap();
            for i in 0..n {
                let mut one = y0[i * out..(i + 1) * out].to_vec();
                add_delta_on(isa, &x[i * inp..(i + 1) * inp], &mut one, 1, d).unwrap();
                assert_eq!(one, all[i * out..(i + 1) * out], "{isa:?}: row {i}");
            }
        }
    }

    #[test]
    fn operands_that_do_not_fit_are_refused_naming_their_sizes() {
        let (a, bt) = (vec![0f32; 6], vec![0f32; 4]);
        let d = DeltaRef { a: &a, bt: &bt, rank: 2, scale: 1.0 };
        let e = add_delta(&[0.0; 3], &mut [0.0; 3], 1, d).unwrap_err().to_string();
        assert!(e.contains("y (3)") && e.contains("rows of 3 and 2"), "{e}");
        let e = add_delta(&[0.0; 3], &mut [0.0; 2], 1, DeltaRef { rank: 4, ..d }).unwrap_err().to_string();
        assert!(e.contains("not 4 rows"), "{e}");
        assert!(add_delta(&[0.0; 3], &mut [0.0; 2], 1, DeltaRef { rank: 0, ..d }).is_err());
        assert!(add_delta(&[], &mut [], 0, d).is_ok());
    }
}
