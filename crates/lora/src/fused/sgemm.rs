#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the AVX-512 kernels and their constants exist on x86-64 only
//! An AVX-512 f32 matrix product for the skinny shapes of batch training, without packing the big operand.
//!
//! Every product of a training step has one small dimension, the batch (64):
//!
//! ```text
//! forward   Y  (64, out) = X (64, in) · Wᵀ         computed as Yᵀ = W · Xᵀ    (W streamed row by row)
//! backward  dX (64, in)  = G (64, out) · W           W read row by row
//!           dW (out, in) = Gᵀ (out, 64) · X           X read row by row
//! ```
//!
//! The microkernel computes a tile `C[i0..i0+MR, j0..j0+NR] (+)= β · Σ_k a_k ⊗ b_k` with MR = 6 rows and
//! NR = 64 columns (four 16-lane vectors, the last one masked at the edge): per step k it broadcasts six
//! scalars of A (any strides) and loads 64 contiguous values of B, 24 fused multiply-adds into 24
//! registers. B must have contiguous rows; when it does not but its columns are contiguous (B = Wᵀ), the
//! product is computed transposed, `Cᵀ = Bᵀ·Aᵀ`, and only the small operand Aᵀ (k × 64 per panel) is
//! packed. General-purpose GEMMs pack both operands on every call, which for a 64-row product costs as much
//! memory traffic as the arithmetic; here the big operand (a weight matrix) is read once, in place.
//!
//! Two more shapes of product have their own loops: few output columns (the 10-class layer, x·Aᵀ of an
//! adapter) as 16-lane dot products ([`Plan::Dots`]), and a mostly-zero A in the direct case, which is the
//! rule in the backward pass: the gradient at a ReLU is zero wherever the unit was off (75–88 % of the
//! entries of a trained ExpensiveNet's hidden layers). Such an A is compressed to its non-zeros and only
//! those rows of B are read (`sparse_direct`), in blocks of 64 steps of k.
//!
//! Each output element is one fused multiply-add chain over k in increasing order (in the sparse case,
//! one per block of 64 steps, added to C in order), then scaled by β and added to C when accumulating.
//! The split across threads never cuts a chain, so results do not depend on the number of threads; they
//! differ from other GEMMs (which block k differently) by f32 rounding only. Skipping exact zeros changes
//! no sum of finite terms.

use super::MatRef;

/// Rows of A per tile.
const MR: usize = 6;
/// Columns of B per tile (four 16-lane vectors).
const NR: usize = 64;
/// B operands up to this many values (256 KiB, a quarter of L2) are swept once per row tile.
const ROW_ORDER_MAX_B: usize = 1 << 16;
/// Steps of k per block when k is long and B large (a 64-column panel of KC rows is 128 KiB, in L2).
const KC: usize = 512;
/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 20;

/// The mask of the lanes of the last 16-lane vector of a row of `w` values (all 16 when w is a multiple).
fn lane_mask(w: usize) -> u16 {
    match w % 16 {
        0 => u16::MAX,
        r => (1u16 << r) - 1,
    }
}

/// Whether the kernel runs: AVX-512 on this CPU and not capped by `LORA_KERNELS` ([`super::simd`]).
pub(super) fn available() -> bool {
    super::simd() == super::Simd::Avx512
}

/// How the kernel reads a product: which operand is streamed (A, broadcast) and which is loaded as rows (B).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    /// `C = A·B` with B's rows contiguous.
    Direct,
    /// `Cᵀ = Bᵀ·Aᵀ`, B's columns contiguous; Aᵀ is packed in panels of 64 columns.
    Transposed,
    /// Few output columns (fewer than 64: the last layer, x·Aᵀ of an adapter): each element a dot
    /// product of a contiguous row of A with a contiguous column of B, 16 lanes at a time.
    Dots,
}

/// The plan for `lhs·rhs`, or `None` where the kernel does not pay (tiny products, narrow outputs) or
/// does not apply (neither rows nor columns of rhs contiguous, no AVX-512).
pub(super) fn plan(lhs: &MatRef<'_>, rhs: &MatRef<'_>) -> Option<Plan> {
    let (m, n) = (lhs.rows, rhs.cols);
    if !available() {
        return None;
    }
    if (rhs.cs == 1 || rhs.cols == 1) && n >= 16 {
        Some(Plan::Direct)
    } else if (rhs.rs == 1 || rhs.rows == 1) && n >= NR && m >= 16 {
        // Packing Aᵀ (m·k values) pays only when it is reused across ≥ 64 output columns.
        Some(Plan::Transposed)
    } else if (rhs.rs == 1 || rhs.rows == 1) && (lhs.cs == 1 || lhs.cols == 1) && lhs.cols >= 16 {
        Some(Plan::Dots)
    } else {
        None
    }
}

/// `dst (m×n, row-major) = [dst +] beta·lhs·rhs` on `threads` threads, as planned by [`plan`].
/// The caller has checked the shapes (`lhs.cols == rhs.rows`, `dst.len() == m·n`, m, n, k > 0).
pub(super) fn matmul(dst: &mut [f32], lhs: MatRef<'_>, rhs: MatRef<'_>, beta: f32, accumulate: bool, plan: Plan, threads: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
        // The soundness of every `unsafe` below: the CPU runs AVX-512 F. `plan` offers plans only then (and
        // only when LORA_KERNELS allows); checked here too (a cached flag), so no plan reaches the kernels on
        // a CPU without it.
        assert!(std::arch::is_x86_feature_detected!("avx512f"), "sgemm::matmul needs AVX-512 F: plans come from plan()");
        debug_assert!(rhs.rows == k && dst.len() == m * n);
        if plan == Plan::Dots {
            return dots(dst, lhs, rhs, beta, accumulate, threads);
        }
        if plan == Plan::Direct && k >= 32 && n >= 64 {
            if let Some(csr) = Csr::build(&lhs) {
                return sparse_direct(dst, &csr, rhs, beta, accumulate, threads);
            }
        }
        let mut pack = Vec::new();
        let job = match plan {
            Plan::Dots => unreachable!("handled above"),
            Plan::Direct => Job {
                rows: m,
                cols: n,
                k,
                a: lhs.data.as_ptr(),
                a_rs: lhs.rs as isize,
                a_ks: lhs.cs as isize,
                b: rhs.data.as_ptr(),
                b_ks: rhs.rs as isize,
                b_panel: NR as isize,
                c_rs: n as isize,
                c_cs: 1,
                beta,
                accumulate,
            },
            // Many rows (a whole batch of tokens times Wᵀ): copying B into contiguous rows (k·n values)
            // is cheaper than packing Aᵀ (m·k values), and the direct loop then writes C in row order.
            Plan::Transposed if m > n => {
                pack = PACK.with(|p| p.take());
                pack_rows(&rhs, &mut pack);
                Job {
                    rows: m,
                    cols: n,
                    k,
                    a: lhs.data.as_ptr(),
                    a_rs: lhs.rs as isize,
                    a_ks: lhs.cs as isize,
                    b: pack.as_ptr(),
                    b_ks: n as isize,
                    b_panel: NR as isize,
                    c_rs: n as isize,
                    c_cs: 1,
                    beta,
                    accumulate,
                }
            }
            Plan::Transposed => {
                pack = PACK.with(|p| p.take());
                pack_transposed(&lhs, &mut pack);
                Job {
                    rows: n,
                    cols: m,
                    k,
                    a: rhs.data.as_ptr(),
                    a_rs: rhs.cs as isize,
                    a_ks: rhs.rs as isize,
                    b: pack.as_ptr(),
                    b_ks: NR as isize,
                    b_panel: (k * NR) as isize,
                    c_rs: 1,
                    c_cs: n as isize,
                    beta,
                    accumulate,
                }
            }
        };
        let c = Out(dst.as_mut_ptr());
        let (row_tiles, col_tiles) = (job.rows.div_ceil(MR), job.cols.div_ceil(NR));
        let parts = if threads <= 1 || m.saturating_mul(n).saturating_mul(k) < PARALLEL_MIN { 1 } else { threads };
        // Split the dimension with more tiles; each part owns whole tiles, so no element is shared.
        let split_rows = row_tiles >= col_tiles;
        let tiles = if split_rows { row_tiles } else { col_tiles };
        let parts = parts.min(tiles);
        let run = |p: usize| {
            let (lo, hi) = (tiles * p / parts, tiles * (p + 1) / parts);
            let (r, cl) = if split_rows { ((lo, hi), (0, col_tiles)) } else { ((0, row_tiles), (lo, hi)) };
            // SAFETY: AVX-512 F is available (plan), every A/B element the tiles read lies inside the
            // bounds-checked views or the pack buffer, and the tiles of different parts are disjoint blocks
            // of dst (which the &mut borrow makes ours alone for the call).
            unsafe { job.run(c, r, cl) }
        };
        in_parts(parts, run);
        if plan == Plan::Transposed {
            PACK.with(|p| p.replace(pack));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dst, lhs, rhs, beta, accumulate, plan, threads);
        unreachable!("sgemm::plan never plans without AVX-512")
    }
}

/// Runs `run(0)`, …, `run(parts − 1)`: part 0 on this thread (a rayon worker or not), the others on the
/// rayon threads.
#[cfg(target_arch = "x86_64")]
fn in_parts(parts: usize, run: impl Fn(usize) + Sync) {
    if parts <= 1 {
        return run(0);
    }
    rayon::in_place_scope(|s| {
        for p in 1..parts {
            let run = &run;
            s.spawn(move |_| run(p));
        }
        run(0);
    });
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The pack buffer, reused across calls on this thread (taken out during a call, so a nested call on
    /// the same thread, e.g. a rayon job run while waiting, allocates its own instead of sharing it).
    static PACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Copies B (k × n, any strides) into `pack` as a row-major k × n matrix, in 16 × 16 blocks so that
/// both the reads and the writes stay within a few cache lines at a time.
#[cfg(target_arch = "x86_64")]
fn pack_rows(b: &MatRef<'_>, pack: &mut Vec<f32>) {
    const T: usize = 16;
    let (k, n) = (b.rows, b.cols);
    if pack.len() < k * n {
        pack.resize(k * n, 0.0);
    }
    for j0 in (0..n).step_by(T) {
        for k0 in (0..k).step_by(T) {
            for j in j0..(j0 + T).min(n) {
                for kk in k0..(k0 + T).min(k) {
                    pack[kk * n + j] = b.data[kk * b.rs + j * b.cs];
                }
            }
        }
    }
}

/// Packs Aᵀ (k × m) in panels of NR columns: `pack[p·k·NR + kk·NR + jj] = A[p·NR + jj, kk]`; the unused
/// columns of the last panel are left as they are (the kernel's masked loads never read them).
#[cfg(target_arch = "x86_64")]
fn pack_transposed(a: &MatRef<'_>, pack: &mut Vec<f32>) {
    let (m, k) = (a.rows, a.cols);
    let need = m.div_ceil(NR) * k * NR;
    if pack.len() < need {
        pack.resize(need, 0.0);
    }
    for (p, panel) in pack[..need].chunks_exact_mut(k * NR).enumerate() {
        let j0 = p * NR;
        let w = (m - j0).min(NR);
        // kk outer: each destination row is written contiguously; the ≤ 64 source rows stay in L1.
        for (kk, dst) in panel.chunks_exact_mut(NR).enumerate() {
            for (jj, d) in dst[..w].iter_mut().enumerate() {
                *d = a.data[(j0 + jj) * a.rs + kk * a.cs];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: hands disjoint tiles of one output buffer to the threads of a rayon scope.
#[cfg(target_arch = "x86_64")]
unsafe impl Send for Out {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for Out {}

/// One product as the tile loop sees it: C (rows × cols) = A (rows × k) · B (k × cols), with element
/// (i, j) of C at `c + i·c_rs + j·c_cs`, A's (i, kk) at `a + i·a_rs + kk·a_ks`, and B's row kk of panel p
/// (columns p·NR …) at `b + p·b_panel + kk·b_ks` (b_panel = NR: B itself; k·NR: the pack buffer).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Job {
    rows: usize,
    cols: usize,
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_ks: isize,
    b: *const f32,
    b_ks: isize,
    b_panel: isize,
    c_rs: isize,
    c_cs: isize,
    beta: f32,
    accumulate: bool,
}

// SAFETY: the pointers are only read (a, b) through shared views that outlive the scope.
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for Job {}

#[cfg(target_arch = "x86_64")]
impl Job {
    /// Runs the tiles `row_tiles × col_tiles` (half-open tile index ranges).
    ///
    /// # Safety
    /// AVX-512 F must be available, and the job's pointers valid for every element it describes.
    unsafe fn run(&self, c: Out, (r0, r1): (usize, usize), (c0, c1): (usize, usize)) {
        // A long k (dW = Gᵀ·X over a batch of thousands of tokens) with a large B: a 64-column panel of all
        // k rows would not stay in L2, so k is cut into blocks of KC steps, each block's products added to
        // C in turn (every element still sums its terms in increasing k, in the same blocks whatever the
        // thread count).
        if self.k > KC && self.k * self.cols > ROW_ORDER_MAX_B {
            for k0 in (0..self.k).step_by(KC) {
                let part = Job {
                    k: KC.min(self.k - k0),
                    a: self.a.offset(k0 as isize * self.a_ks),
                    b: self.b.offset(k0 as isize * self.b_ks),
                    accumulate: self.accumulate || k0 > 0,
                    ..*self
                };
                part.run_block(c, (r0, r1), (c0, c1));
            }
        } else {
            self.run_block(c, (r0, r1), (c0, c1));
        }
        // SAFETY: the CPU has AVX-512 F: `matmul`, the way in from outside this file, asserts it (tests check it).
        unsafe { clean_upper_state() };
    }

    /// [`Job::run`] for a k short enough to run in one pass.
    ///
    /// # Safety
    /// As for [`Job::run`].
    unsafe fn run_block(&self, c: Out, (r0, r1): (usize, usize), (c0, c1): (usize, usize)) {
        // Loop order: when B is small (dW = Gᵀ·X: B = X, 64 rows) sweep it once per row tile and write C
        // row block by row block, in address order; when B is large (dX = G·W: B = W) keep one 64-column
        // panel of it in L2 and run every row tile over it before the next.
        if self.k * self.cols <= ROW_ORDER_MAX_B {
            for ip in r0..r1 {
                for jp in c0..c1 {
                    self.tile(c, ip, jp);
                }
            }
        } else {
            // Each panel is read from memory by its first row tile, which alone would stall on it; so each
            // tile also prefetches its share of the next panel while it computes.
            let tiles = (r1 - r0).max(1);
            let share = self.k.div_ceil(tiles);
            for jp in c0..c1 {
                for ip in r0..r1 {
                    let next = (jp + 1 < c1).then(|| {
                        let k0 = ((ip - r0) * share).min(self.k);
                        let n = share.min(self.k - k0);
                        // A prefetch target (k0 may equal k): wrapping arithmetic, never dereferenced.
                        (self.b.wrapping_offset((jp + 1) as isize * self.b_panel + k0 as isize * self.b_ks), n)
                    });
                    self.tile_pf(c, ip, jp, next);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Job {
    /// Runs tile (ip, jp).
    ///
    /// # Safety
    /// As for [`Job::run`].
    #[inline]
    unsafe fn tile(&self, c: Out, ip: usize, jp: usize) {
        self.tile_pf(c, ip, jp, None)
    }

    /// Runs tile (ip, jp), prefetching `n` rows of B (64 values each, row stride b_ks) from `next`.
    ///
    /// # Safety
    /// As for [`Job::run`].
    #[inline]
    unsafe fn tile_pf(&self, c: Out, ip: usize, jp: usize, next: Option<(*const f32, usize)>) {
        let (pf, pf_n) = next.unwrap_or((std::ptr::null(), 0));
        let j0 = jp * NR;
        let w = (self.cols - j0).min(NR);
        let nv = w.div_ceil(16);
        let mask = lane_mask(w);
        let i0 = ip * MR;
        let mr = (self.rows - i0).min(MR);
        let t = Tile {
            k: self.k,
            a: self.a.offset(i0 as isize * self.a_rs),
            a_rs: self.a_rs,
            a_ks: self.a_ks,
            b: self.b.offset(jp as isize * self.b_panel),
            b_ks: self.b_ks,
            mask,
            c: c.0.offset(i0 as isize * self.c_rs + j0 as isize * self.c_cs),
            c_rs: self.c_rs,
            c_cs: self.c_cs,
            beta: self.beta,
            accumulate: self.accumulate,
            pf,
            pf_n,
        };
        macro_rules! go {
            ($($mr:literal),*) => {
                match (mr, nv) {
                    $(($mr, 4) => tile::<$mr, 4>(&t), ($mr, 3) => tile::<$mr, 3>(&t),
                      ($mr, 2) => tile::<$mr, 2>(&t), ($mr, _) => tile::<$mr, 1>(&t),)*
                    _ => unreachable!("tiles have 1..=MR rows"),
                }
            };
        }
        go!(6, 5, 4, 3, 2, 1);
    }
}

#[cfg(target_arch = "x86_64")]
struct Tile {
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_ks: isize,
    b: *const f32,
    b_ks: isize,
    /// Lanes of the last B vector inside the matrix.
    mask: u16,
    c: *mut f32,
    c_rs: isize,
    c_cs: isize,
    beta: f32,
    accumulate: bool,
    /// Rows of B to prefetch (64 values each, stride b_ks) for the next panel, one per step of k.
    pf: *const f32,
    pf_n: usize,
}

/// The microkernel: a `R × 16·V` tile (last vector masked), `C (+)= β·Σ_k a_k ⊗ b_k`.
///
/// # Safety
/// AVX-512 F must be available; `t` must describe valid memory (masked-off lanes are never touched).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const V: usize>(t: &Tile) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); V]; R]; // (R, 16·V)
    let (mut a, mut b) = (t.a, t.b);
    let mut pf = t.pf;
    for kk in 0..t.k {
        if kk < t.pf_n {
            for line in 0..4 {
                // A prefetch never faults, but the address may lie past B's end: wrapping arithmetic.
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(16 * line) as *const i8);
            }
            pf = pf.wrapping_offset(t.b_ks);
        }
        let mut bv = [_mm512_setzero_ps(); V]; // row kk of B: 16·V values
        for (v, x) in bv.iter_mut().enumerate() {
            *x = if v + 1 == V { _mm512_maskz_loadu_ps(t.mask, b.add(16 * v)) } else { _mm512_loadu_ps(b.add(16 * v)) };
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let s = _mm512_set1_ps(*a.offset(i as isize * t.a_rs)); // A[i, kk]
            for (x, y) in row.iter_mut().zip(&bv) {
                *x = _mm512_fmadd_ps(s, *y, *x);
            }
        }
        // Loop-carried: after the last step they point one stride past the data (never read), so wrapping
        // arithmetic, which may leave the allocation, instead of `offset`, which may not.
        a = a.wrapping_offset(t.a_ks);
        b = b.wrapping_offset(t.b_ks);
    }
    let beta = _mm512_set1_ps(t.beta);
    if t.c_cs == 1 {
        for (i, row) in acc.iter().enumerate() {
            let out = t.c.offset(i as isize * t.c_rs);
            for (v, x) in row.iter().enumerate() {
                let m = if v + 1 == V { t.mask } else { u16::MAX };
                let mut r = _mm512_mul_ps(*x, beta);
                if t.accumulate {
                    r = _mm512_add_ps(_mm512_maskz_loadu_ps(m, out.add(16 * v)), r);
                }
                _mm512_mask_storeu_ps(out.add(16 * v), m, r);
            }
        }
    } else {
        // Transposed output: through a small buffer, then column by column (contiguous along i when c_rs = 1).
        let mut buf = [[0f32; NR]; R];
        for (row, x) in buf.iter_mut().zip(&acc) {
            for (v, y) in x.iter().enumerate() {
                _mm512_storeu_ps(row.as_mut_ptr().add(16 * v), _mm512_mul_ps(*y, beta));
            }
        }
        let cols = 16 * (V - 1) + t.mask.count_ones() as usize;
        for j in 0..cols {
            let out = t.c.offset(j as isize * t.c_cs);
            for (i, row) in buf.iter().enumerate() {
                let p = out.offset(i as isize * t.c_rs);
                *p = if t.accumulate { *p + row[j] } else { row[j] };
            }
        }
    }
}

/// Zeroes zmm16–31 and the upper halves of zmm0–15. The kernel's 28 live vectors need the registers
/// zmm16–31, which `vzeroupper` (emitted by the compiler on return) does not clear; while they hold
/// non-zero values, every legacy-SSE instruction this thread runs later (the default x86-64 code of the
/// rest of the program) pays a state-transition penalty: measured here, the SSE Adam pass that follows the
/// backward ran 3–5× slower until this was added.
///
/// # Safety
/// The CPU must have AVX-512 F (the instructions fault otherwise).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn clean_upper_state() {
    // SAFETY: the caller guarantees AVX-512 F; the block writes only the registers it declares as clobbered.
    unsafe {
        std::arch::asm!(
            "vpxord zmm16, zmm16, zmm16", "vpxord zmm17, zmm17, zmm17", "vpxord zmm18, zmm18, zmm18",
            "vpxord zmm19, zmm19, zmm19", "vpxord zmm20, zmm20, zmm20", "vpxord zmm21, zmm21, zmm21",
            "vpxord zmm22, zmm22, zmm22", "vpxord zmm23, zmm23, zmm23", "vpxord zmm24, zmm24, zmm24",
            "vpxord zmm25, zmm25, zmm25", "vpxord zmm26, zmm26, zmm26", "vpxord zmm27, zmm27, zmm27",
            "vpxord zmm28, zmm28, zmm28", "vpxord zmm29, zmm29, zmm29", "vpxord zmm30, zmm30, zmm30",
            "vpxord zmm31, zmm31, zmm31", "vzeroupper",
            out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _, out("zmm20") _, out("zmm21") _,
            out("zmm22") _, out("zmm23") _, out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
            out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            options(nomem, nostack, preserves_flags),
        );
    }
}

/// Rows of A per [`dot_tile`].
const DOT_ROWS: usize = 4;
/// Columns of C per [`dot_tile`] (4 × 6 = 24 accumulators).
const DOT_COLS: usize = 6;

/// [`Plan::Dots`]: `C (m×n) = [C +] β·A·B` with A's rows and B's columns contiguous, in tiles of 4 rows ×
/// up to 6 columns, split by rows across threads (by columns when there are few rows).
#[cfg(target_arch = "x86_64")]
fn dots(dst: &mut [f32], lhs: MatRef<'_>, rhs: MatRef<'_>, beta: f32, accumulate: bool, threads: usize) {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    let tiles = m.div_ceil(DOT_ROWS);
    let col_tiles = n.div_ceil(DOT_COLS);
    // Few rows (a generation step's handful of tokens against a weight): split the columns, so each part
    // reads its own share of B once; otherwise split the rows.
    let split_cols = tiles < 2 * threads;
    // Split by columns, the parts share no operand traffic (each reads its own columns of B), so smaller
    // products pay for the hand-off.
    let min = if split_cols { PARALLEL_MIN / 4 } else { PARALLEL_MIN };
    let parts = if threads <= 1 || m.saturating_mul(n).saturating_mul(k) < min {
        1
    } else {
        threads.min(if split_cols { col_tiles } else { tiles })
    };
    // A few rows (a part of a serving batch, ≤ 32 KiB of A) against a large B: read B once, not once per
    // row tile. The tiles are the same either way; only their order changes (results are identical).
    let small_a = m * k <= 1 << 13;
    let c = Out(dst.as_mut_ptr());
    let run = |p: usize| {
        let c = &c; // the whole wrapper (Sync), not its raw pointer field
        let ((r0, r1), (c0, c1)) = if split_cols {
            ((0, tiles), (col_tiles * p / parts, col_tiles * (p + 1) / parts))
        } else {
            ((tiles * p / parts, tiles * (p + 1) / parts), (0, col_tiles))
        };
        let tile = |it: usize, jt: usize| {
            let (i0, j0) = (it * DOT_ROWS, jt * DOT_COLS);
            let (rows, cols) = ((m - i0).min(DOT_ROWS), (n - j0).min(DOT_COLS));
            let t = DotTile {
                k,
                a: lhs.data[i0 * lhs.rs..].as_ptr(),
                a_rs: lhs.rs,
                b: rhs.data[j0 * rhs.cs..].as_ptr(),
                b_cs: rhs.cs,
                c: c.0,
                c_off: i0 * n + j0,
                ldc: n,
                beta,
                accumulate,
            };
            macro_rules! go {
                ($($r:literal),*) => {
                    match (rows, cols) {
                        $(($r, 6) => dot_tile::<$r, 6>(&t), ($r, 5) => dot_tile::<$r, 5>(&t),
                          ($r, 4) => dot_tile::<$r, 4>(&t), ($r, 3) => dot_tile::<$r, 3>(&t),
                          ($r, 2) => dot_tile::<$r, 2>(&t), ($r, _) => dot_tile::<$r, 1>(&t),)*
                        _ => unreachable!("dot tiles have 1..=4 rows"),
                    }
                };
            }
            // SAFETY: AVX-512 F is available (plan); the tile reads rows i0.. of A and columns j0.. of B
            // inside their bounds-checked views, and writes its own block of C (disjoint across parts).
            unsafe { go!(4, 3, 2, 1) }
        };
        if split_cols || small_a {
            // Column blocks outer: the ≤ 6 columns of B a block reads stay in L1 for every row tile, and B
            // is read once (A, small, stays in cache).
            for jt in c0..c1 {
                for it in r0..r1 {
                    tile(it, jt);
                }
            }
        } else {
            // Row tiles outer: each row tile of A is read once, against all of (a narrow) B.
            for it in r0..r1 {
                for jt in c0..c1 {
                    tile(it, jt);
                }
            }
        }
        // SAFETY: the CPU has AVX-512 F: `matmul`, the way in from outside this file, asserts it (tests check it).
        unsafe { clean_upper_state() };
    };
    in_parts(parts, run);
}

#[cfg(target_arch = "x86_64")]
struct DotTile {
    k: usize,
    a: *const f32,
    a_rs: usize,
    b: *const f32,
    b_cs: usize,
    c: *mut f32,
    c_off: usize,
    ldc: usize,
    beta: f32,
    accumulate: bool,
}

/// `C[i][j] (+)= β·Σ_k A[i][k]·B[k][j]` for an `R × N` tile: 16 lanes of k at a time (the tail masked),
/// then one horizontal sum per element.
///
/// # Safety
/// AVX-512 F must be available; rows `0..R` of A and columns `0..N` of B (k values each, contiguous)
/// and the tile of C must be valid.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_tile<const R: usize, const N: usize>(t: &DotTile) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); N]; R]; // (R, N), 16 partial sums each
    let mut kk = 0;
    while kk < t.k {
        let left = t.k - kk;
        let mask = lane_mask(left.min(16));
        let mut av = [_mm512_setzero_ps(); R];
        for (i, x) in av.iter_mut().enumerate() {
            *x = _mm512_maskz_loadu_ps(mask, t.a.add(i * t.a_rs + kk));
        }
        for j in 0..N {
            let bv = _mm512_maskz_loadu_ps(mask, t.b.add(j * t.b_cs + kk));
            for (row, x) in acc.iter_mut().zip(&av) {
                row[j] = _mm512_fmadd_ps(*x, bv, row[j]);
            }
        }
        kk += 16;
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, x) in row.iter().enumerate() {
            let p = t.c.add(t.c_off + i * t.ldc + j);
            let v = t.beta * _mm512_reduce_add_ps(*x);
            *p = if t.accumulate { *p + v } else { v };
        }
    }
}

/// Largest fraction of non-zeros in A for which [`sparse_direct`] is used: at 50 % it does half the
/// multiply-adds of the dense tiles with twice their loads per multiply-add, about even.
const SPARSE_MAX_DENSITY: f64 = 0.5;
/// Lines of A (in memory order) [`Csr::build`] looks at before counting all of A…
const SPARSE_PROBE_LINES: usize = 16;
/// …and gives up on A when more than this fraction of them is non-zero (a ReLU gradient of a trained
/// layer has 75–88 % zeros; a gradient that flows through no ReLU has none).
const SPARSE_PROBE_DENSITY: f64 = 0.9;
/// Columns of C per pass of [`sparse_tile`] (16 vectors of 16).
const SPARSE_COLS: usize = 256;
/// Rows of B per block of [`sparse_direct`]: a block of 64 rows of a 1000-column B is 250 KiB, kept in L2
/// while every row of C that needs it passes over it.
const SPARSE_BLOCK: usize = 64;

/// A's non-zeros row by row (compressed sparse rows), built only when A is sparse enough.
#[cfg(target_arch = "x86_64")]
struct Csr {
    rows: usize,
    /// Row i's entries are `idx[start[i]..start[i + 1]]` (ascending k) with values `val[…]`.
    start: Vec<usize>,
    idx: Vec<u32>,
    val: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
impl Csr {
    /// A's non-zeros, or `None` if more than [`SPARSE_MAX_DENSITY`] of its entries are non-zero. Reads A
    /// in memory order (by rows or by columns, whichever is contiguous).
    fn build(a: &MatRef<'_>) -> Option<Csr> {
        let (m, k) = (a.rows, a.cols);
        let by_rows = a.cs == 1 || a.rs != 1;
        let at = |i: usize, kk: usize| a.data[i * a.rs + kk * a.cs];
        // A quick look first: when the first lines in memory order are nearly all non-zero, A is a dense
        // gradient (no ReLU before it), and counting the rest would cost a pass over all of A for nothing.
        let (outer, inner) = if by_rows { (m, k) } else { (k, m) };
        let probe = outer.min(SPARSE_PROBE_LINES);
        let probe_nnz: usize =
            (0..probe).map(|o| (0..inner).filter(|&x| if by_rows { at(o, x) != 0.0 } else { at(x, o) != 0.0 }).count()).sum();
        if outer > probe && probe_nnz as f64 > SPARSE_PROBE_DENSITY * (probe * inner) as f64 {
            return None;
        }
        let mut count = vec![0usize; m + 1];
        let mut nnz = 0usize;
        if by_rows {
            for (i, c) in count[1..].iter_mut().enumerate() {
                *c = (0..k).filter(|&kk| at(i, kk) != 0.0).count();
                nnz += *c;
            }
        } else {
            for kk in 0..k {
                for (i, c) in count[1..].iter_mut().enumerate() {
                    *c += usize::from(at(i, kk) != 0.0);
                }
            }
            nnz = count.iter().sum();
        }
        if nnz as f64 > SPARSE_MAX_DENSITY * (m * k) as f64 {
            return None;
        }
        for i in 0..m {
            count[i + 1] += count[i];
        }
        let start = count;
        let mut fill = start.clone();
        let (mut idx, mut val) = (vec![0u32; nnz], vec![0f32; nnz]);
        let mut put = |i: usize, kk: usize| {
            let v = at(i, kk);
            if v != 0.0 {
                idx[fill[i]] = kk as u32;
                val[fill[i]] = v;
                fill[i] += 1;
            }
        };
        if by_rows {
            for i in 0..m {
                for kk in 0..k {
                    put(i, kk);
                }
            }
        } else {
            for kk in 0..k {
                for i in 0..m {
                    put(i, kk);
                }
            }
        }
        Some(Csr { rows: m, start, idx, val })
    }
}

/// [`Plan::Direct`] with a sparse A: `C (m×n) = [C +] β·A·B` from A's non-zeros only, in blocks of
/// [`SPARSE_BLOCK`] rows of B; rows of C split across threads. Skipping exact zeros changes no sum of
/// finite terms (only a NaN or infinity in B facing a zero of A would have shown in the dense product).
#[cfg(target_arch = "x86_64")]
fn sparse_direct(dst: &mut [f32], csr: &Csr, b: MatRef<'_>, beta: f32, accumulate: bool, threads: usize) {
    let (m, n, k) = (csr.rows, b.cols, b.rows);
    if !accumulate {
        dst.fill(0.0);
    }
    let nnz = csr.idx.len();
    let parts = if threads <= 1 || nnz.saturating_mul(n) < PARALLEL_MIN { 1 } else { threads.min(m) };
    let c = Out(dst.as_mut_ptr());
    let run = |p: usize| {
        let c = &c;
        let (r0, r1) = (m * p / parts, m * (p + 1) / parts);
        let mut cursor: Vec<usize> = csr.start[r0..r1].to_vec();
        for k1 in (SPARSE_BLOCK..k + SPARSE_BLOCK).step_by(SPARSE_BLOCK) {
            let k1 = k1.min(k) as u32;
            for (i, cur) in (r0..r1).zip(cursor.iter_mut()) {
                let lo = *cur;
                let mut hi = lo;
                let end = csr.start[i + 1];
                while hi < end && csr.idx[hi] < k1 {
                    hi += 1;
                }
                *cur = hi;
                if hi == lo {
                    continue;
                }
                for j0 in (0..n).step_by(SPARSE_COLS) {
                    let w = (n - j0).min(SPARSE_COLS);
                    let nv = w.div_ceil(16);
                    let mask = lane_mask(w);
                    let t = SparseTile {
                        idx: &csr.idx[lo..hi],
                        val: &csr.val[lo..hi],
                        b: b.data[j0..].as_ptr(),
                        b_ks: b.rs,
                        mask,
                        c: c.0,
                        c_off: i * n + j0,
                        beta,
                    };
                    macro_rules! go {
                        ($($v:literal),*) => {
                            match nv {
                                $($v => sparse_tile::<$v>(&t),)*
                                _ => unreachable!("1..=16 vectors"),
                            }
                        };
                    }
                    // SAFETY: AVX-512 F is available (plan); the indices are rows of B (< k), the columns
                    // j0..j0+w lie inside B's rows (cs = 1) and inside row i of C, which only this part
                    // writes.
                    unsafe { go!(16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1) }
                }
            }
        }
        // SAFETY: the CPU has AVX-512 F: `matmul`, the way in from outside this file, asserts it (tests check it).
        unsafe { clean_upper_state() };
    };
    in_parts(parts, run);
}

#[cfg(target_arch = "x86_64")]
struct SparseTile<'a> {
    idx: &'a [u32],
    val: &'a [f32],
    b: *const f32,
    b_ks: usize,
    mask: u16,
    c: *mut f32,
    c_off: usize,
    beta: f32,
}

/// `C[i, j0..j0+16V] += β·Σ_t val[t]·B[idx[t], j0..]` (last vector masked).
///
/// # Safety
/// AVX-512 F must be available; every `idx` a valid row of B, the columns inside B and C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sparse_tile<const V: usize>(t: &SparseTile<'_>) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); V];
    for (&kk, &a) in t.idx.iter().zip(t.val) {
        let s = _mm512_set1_ps(a);
        let row = t.b.add(kk as usize * t.b_ks);
        for (v, x) in acc.iter_mut().enumerate() {
            let bv = if v + 1 == V { _mm512_maskz_loadu_ps(t.mask, row.add(16 * v)) } else { _mm512_loadu_ps(row.add(16 * v)) };
            *x = _mm512_fmadd_ps(s, bv, *x);
        }
    }
    let beta = _mm512_set1_ps(t.beta);
    let out = t.c.add(t.c_off);
    for (v, x) in acc.iter().enumerate() {
        let m = if v + 1 == V { t.mask } else { u16::MAX };
        let r = _mm512_add_ps(_mm512_maskz_loadu_ps(m, out.add(16 * v)), _mm512_mul_ps(*x, beta));
        _mm512_mask_storeu_ps(out.add(16 * v), m, r);
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Random values in [-1, 1), a fraction `zeros` of them exactly 0.
    fn rand_vec(n: usize, zeros: f64, seed: u64) -> Vec<f32> {
        let mut g = StdRng::seed_from_u64(seed);
        (0..n).map(|_| if g.random::<f64>() < zeros { 0.0 } else { g.random::<f32>() * 2.0 - 1.0 }).collect()
    }

    /// One product to try: A (m×k) row-major or transposed storage, B (k×n) row-major or stored as Bᵀ.
    struct Case {
        m: usize,
        n: usize,
        k: usize,
        a_transposed: bool,
        b_transposed: bool,
        a_zeros: f64,
        want: Option<Plan>,
    }

    fn views<'a>(c: &Case, a: &'a [f32], b: &'a [f32]) -> (MatRef<'a>, MatRef<'a>) {
        let a = if c.a_transposed { MatRef::row_major(a, c.k, c.m).unwrap().t() } else { MatRef::row_major(a, c.m, c.k).unwrap() };
        let b = if c.b_transposed { MatRef::row_major(b, c.n, c.k).unwrap().t() } else { MatRef::row_major(b, c.k, c.n).unwrap() };
        (a, b)
    }

    fn cases() -> Vec<Case> {
        let c = |m, n, k, a_transposed, b_transposed, a_zeros, want| Case { m, n, k, a_transposed, b_transposed, a_zeros, want };
        vec![
            // Direct, dense: dX = G·W shapes with ragged edges (m % 6, n % 64, n % 16 ≠ 0).
            c(37, 150, 45, false, false, 0.0, Some(Plan::Direct)),
            // Direct, sparse A (the ReLU-masked gradient), A read through its transpose (dW = Gᵀ·X).
            c(131, 77, 64, true, false, 0.8, Some(Plan::Direct)),
            c(29, 300, 140, false, false, 0.7, Some(Plan::Direct)),
            // Transposed: Y = X·Wᵀ, W stored (out, in).
            c(70, 133, 51, false, true, 0.0, Some(Plan::Transposed)),
            // Dots: few outputs (the 10-class layer, x·Aᵀ of an adapter).
            c(23, 10, 203, false, true, 0.0, Some(Plan::Dots)),
            c(5, 1, 33, false, true, 0.0, Some(Plan::Dots)),
            // Neither: narrow output with B read row-wise, left to the gemm crate.
            c(8, 3, 9, false, false, 0.0, None),
        ]
    }

    /// Whether this CPU can run the kernels at all (whatever LORA_KERNELS allows `plan` to choose). When it
    /// cannot, the test saying so prints it (shown by `cargo test -- --nocapture`) and checks nothing.
    fn cpu_has_avx512() -> bool {
        #[cfg(target_arch = "x86_64")]
        let has = std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        if !has {
            println!("this CPU has no AVX-512: the AVX-512 kernels cannot run here, nothing to check");
        }
        has
    }

    #[test]
    fn every_plan_matches_an_f64_reference_within_f32_rounding() {
        for (ci, case) in cases().iter().enumerate() {
            let a = rand_vec(case.m * case.k, case.a_zeros, 10 + ci as u64);
            let b = rand_vec(case.k * case.n, 0.0, 20 + ci as u64);
            let (av, bv) = views(case, &a, &b);
            if available() {
                assert_eq!(plan(&av, &bv), case.want, "case {ci}: plan");
            }
            for (beta, accumulate) in [(1.0f32, false), (-0.75, true)] {
                let init = rand_vec(case.m * case.n, 0.0, 30 + ci as u64);
                let mut got = init.clone();
                super::super::matmul_into(&mut got, av, bv, beta, accumulate).unwrap();
                for i in 0..case.m {
                    for j in 0..case.n {
                        let terms = (0..case.k).map(|kk| av.get(i, kk) as f64 * bv.get(kk, j) as f64);
                        let (sum, abs): (f64, f64) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                        let want = beta as f64 * sum + if accumulate { init[i * case.n + j] as f64 } else { 0.0 };
                        // A sum of k f32 products carries at most ≈ k·ε of the sum of their magnitudes
                        // (ε = 2⁻²⁴ per rounding); scaling and the final add a few ε more. 2·k·ε·Σ|a·b| + 4ε·|C|
                        // bounds every order of summation while catching any wrong or missing term.
                        let tol = 2.0 * case.k as f64 * f32::EPSILON as f64 * abs * beta.abs() as f64
                            + 4.0 * f32::EPSILON as f64 * (want.abs() + 1.0);
                        let g = got[i * case.n + j] as f64;
                        assert!((g - want).abs() <= tol, "case {ci} ({beta}, {accumulate}) C[{i}][{j}] = {g}, want {want} ± {tol}");
                    }
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_number_of_threads() {
        if !cpu_has_avx512() {
            return;
        }
        // Big enough (≥ PARALLEL_MIN multiply-adds) that every plan splits.
        let shapes = [
            Case { m: 64, n: 1000, k: 200, a_transposed: false, b_transposed: false, a_zeros: 0.0, want: Some(Plan::Direct) },
            Case { m: 500, n: 300, k: 64, a_transposed: true, b_transposed: false, a_zeros: 0.75, want: Some(Plan::Direct) },
            Case { m: 64, n: 700, k: 300, a_transposed: false, b_transposed: true, a_zeros: 0.0, want: Some(Plan::Transposed) },
            Case { m: 256, n: 10, k: 800, a_transposed: false, b_transposed: true, a_zeros: 0.0, want: Some(Plan::Dots) },
        ];
        for (ci, case) in shapes.iter().enumerate() {
            let a = rand_vec(case.m * case.k, case.a_zeros, 40 + ci as u64);
            let b = rand_vec(case.k * case.n, 0.0, 50 + ci as u64);
            let (av, bv) = views(case, &a, &b);
            // The kernels run whenever the CPU has AVX-512; `plan` offers them only when LORA_KERNELS allows.
            let p = case.want.expect("every shape here has a plan");
            assert_eq!(plan(&av, &bv), if available() { Some(p) } else { None }, "case {ci}: plan");
            let run = |threads| {
                let mut c = vec![0f32; case.m * case.n];
                matmul(&mut c, av, bv, 1.0, false, p, threads);
                c
            };
            let one = run(1);
            assert_eq!(one, run(2), "case {ci}: 1 vs 2 threads");
            assert_eq!(one, run(3), "case {ci}: 1 vs 3 threads");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_sparse_a_gives_the_bits_of_the_dense_tiles() {
        if !cpu_has_avx512() {
            return;
        }
        // k ≤ 64: one block, so the sparse path sums each element's non-zero terms in the dense chain's
        // order; skipping the zero terms (exact +0 or −0 contributions) cannot change a finite sum.
        let (m, n, k) = (50, 90, 64);
        let a = rand_vec(m * k, 0.8, 60);
        let b = rand_vec(k * n, 0.0, 61);
        let (av, bv) = (MatRef::row_major(&a, m, k).unwrap(), MatRef::row_major(&b, k, n).unwrap());
        let csr = Csr::build(&av).expect("80 % zeros is sparse");
        let mut sparse = vec![0f32; m * n];
        sparse_direct(&mut sparse, &csr, bv, 0.5, false, 1);
        let mut dense = vec![0f32; m * n];
        let job = Job {
            rows: m,
            cols: n,
            k,
            a: av.data.as_ptr(),
            a_rs: k as isize,
            a_ks: 1,
            b: bv.data.as_ptr(),
            b_ks: n as isize,
            b_panel: NR as isize,
            c_rs: n as isize,
            c_cs: 1,
            beta: 0.5,
            accumulate: false,
        };
        // SAFETY: the CPU's AVX-512 F checked above; the job describes the two vectors and `dense` exactly.
        unsafe { job.run(Out(dense.as_mut_ptr()), (0, m.div_ceil(MR)), (0, n.div_ceil(NR))) };
        assert_eq!(sparse, dense);
        assert!(Csr::build(&MatRef::row_major(&b, k, n).unwrap()).is_none(), "a dense A must take the dense tiles");
    }
}
