//! An f32 matrix product for the skinny shapes of batch training, without packing the big operand: one
//! kernel source for AVX-512, AVX2 + FMA and NEON, written once against `pulp`'s SIMD abstraction and
//! compiled for each instruction set (chosen at run time, capped by `LORA_KERNELS`).
//!
//! Every product of a training step has one small dimension, the batch (64):
//!
//! ```text
//! forward   Y  (64, out) = X (64, in) · Wᵀ         computed as Yᵀ = W · Xᵀ    (W streamed row by row)
//! backward  dX (64, in)  = G (64, out) · W           W read row by row
//!           dW (out, in) = Gᵀ (out, 64) · X           X read row by row
//! ```
//!
//! The work is cut into tiles `C[i0..i0+MR, j0..j0+NR] (+)= β · Σ_k a_k ⊗ b_k` with MR = 6 rows and NR = 64
//! columns. The microkernel holds a 6 × (L·V) block of C in registers (L lanes per vector): per step k it
//! broadcasts six scalars of A (any strides) and loads V vectors of a contiguous row of B, 6·V fused
//! multiply-adds. AVX-512 (L = 16, 32 registers) covers a whole tile at once with V = 4 (24 accumulators);
//! AVX2 (L = 8, 16 registers) and NEON (L = 4, 32 registers) run a tile as four 16-column blocks (12 and
//! 24 accumulators), the last vector of a ragged edge masked. B must have contiguous rows; when it does not
//! but its columns are contiguous (B = Wᵀ), the product is computed transposed, `Cᵀ = Bᵀ·Aᵀ`, and only the
//! small operand Aᵀ (k × 64 per panel) is packed. General-purpose GEMMs pack both operands on every call,
//! which for a 64-row product costs as much memory traffic as the arithmetic; here the big operand (a
//! weight matrix) is read once, in place.
//!
//! Two more shapes of product have their own loops: few output columns (the 10-class layer, x·Aᵀ of an
//! adapter) as L-lane dot products ([`Plan::Dots`]), and a mostly-zero A in the direct case, which is the
//! rule in the backward pass: the gradient at a ReLU is zero wherever the unit was off (75–88 % of the
//! entries of a trained ExpensiveNet's hidden layers). Such an A is compressed to its non-zeros and only
//! those rows of B are read (`sparse_direct`), in blocks of 64 steps of k. The dot products also read a
//! weight held in bf16 ([`Bf16Matrix`], `dots_bf16`): the same tiles in the same order, each load of B one
//! vector of words and a shift or mask, so the same bits as on the weight's f32 values.
//!
//! Each output element of the tiles and of the sparse loop is one fused multiply-add chain over k in
//! increasing order (in the sparse case, one per block of 64 steps, added to C in order), then scaled by β
//! and added to C when accumulating: the same operations whatever the vector width, so these plans give
//! the same bits on every instruction set. (The dot products sum L lanes apart and then across, so their
//! rounding depends on L.) The split across threads never cuts a chain, so results do not depend on the
//! number of threads; they differ from other GEMMs (which block k differently) by f32 rounding only.
//! Skipping exact zeros changes no sum of finite terms.

use pulp::WithSimd;

use crate::bf16::Bf16Matrix;
use crate::isa::{first_lanes, load, prefetch_line, store, Isa};
use crate::mat::MatRef;

/// Rows of A per tile.
const MR: usize = 6;
/// Columns of B per tile (and per panel of packed Aᵀ).
const NR: usize = 64;
/// B operands up to this many values (256 KiB, a quarter of L2) are swept once per row tile.
const ROW_ORDER_MAX_B: usize = 1 << 16;
/// Steps of k per block when k is long and B large (a 64-column panel of KC rows is 128 KiB, in L2).
const KC: usize = 512;
/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 20;

/// How the kernel reads a product: which operand is streamed (A, broadcast) and which is loaded as rows (B).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    /// `C = A·B` with B's rows contiguous.
    Direct,
    /// `Cᵀ = Bᵀ·Aᵀ`, B's columns contiguous; Aᵀ is packed in panels of 64 columns.
    Transposed,
    /// Few output columns (fewer than 64: the last layer, x·Aᵀ of an adapter): each element a dot
    /// product of a contiguous row of A with a contiguous column of B, L lanes at a time.
    Dots,
}

/// The plan for `lhs·rhs`, or `None` where the kernel does not pay (tiny products, narrow outputs) or
/// does not apply (neither rows nor columns of rhs contiguous).
pub(super) fn plan(lhs: &MatRef<'_>, rhs: &MatRef<'_>) -> Option<Plan> {
    plan_for(lhs, Layout { rows: rhs.rows, cols: rhs.cols, rs: rhs.rs, cs: rhs.cs })
}

/// The shape and strides of a product's right operand: all [`plan`] looks at.
pub(super) struct Layout {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) rs: usize,
    pub(super) cs: usize,
}

/// [`plan`] for a right operand laid out as `rhs`.
pub(super) fn plan_for(lhs: &MatRef<'_>, rhs: Layout) -> Option<Plan> {
    let (m, n) = (lhs.rows, rhs.cols);
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

/// `dst (m×n, row-major) = [dst +] beta·lhs·rhs` on `threads` threads, as planned by [`plan`], in `isa`'s
/// instructions. The caller has checked the shapes (`lhs.cols == rhs.rows`, `dst.len() == m·n`, m, n, k > 0).
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(isa: Isa, dst: &mut [f32], lhs: MatRef<'_>, rhs: MatRef<'_>, beta: f32, accumulate: bool, plan: Plan, threads: usize) {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    assert!(rhs.rows == k && dst.len() == m * n, "sgemm::matmul: ({m}x{k})·({}x{n}) into {} values", rhs.rows, dst.len());
    if m == 0 || n == 0 || k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    if plan == Plan::Dots {
        return dots(isa, dst, lhs, rhs, beta, accumulate, threads);
    }
    if plan == Plan::Direct && k >= 32 && n >= 64 {
        if let Some(csr) = Csr::build(&lhs) {
            return sparse_direct(isa, dst, &csr, rhs, beta, accumulate, threads);
        }
    }
    let mut pack = Vec::new();
    // C = A·B read row by row, B's rows contiguous: B itself (Direct) or a row-major copy of it
    // (Transposed with many rows, a whole batch of tokens times Wᵀ: copying B (k·n values) is cheaper than
    // packing Aᵀ (m·k values), and the direct loop then writes C in row order).
    let direct = |b: *const f32, b_ks: usize| Job {
        rows: m,
        cols: n,
        k,
        a: lhs.data.as_ptr(),
        a_rs: lhs.rs as isize,
        a_ks: lhs.cs as isize,
        b,
        b_ks: b_ks as isize,
        b_panel: NR as isize,
        c_rs: n as isize,
        c_cs: 1,
        beta,
        accumulate,
    };
    let job = match plan {
        Plan::Dots => unreachable!("handled above"),
        Plan::Direct => direct(rhs.data.as_ptr(), rhs.rs),
        Plan::Transposed if m > n => {
            pack = PACK.with(|p| p.take());
            pack_rows(&rhs, &mut pack);
            direct(pack.as_ptr(), n)
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
        // SAFETY: every A/B element the tiles read lies inside the bounds-checked views or the pack buffer,
        // and the tiles of different parts are disjoint blocks of dst (which the &mut borrow makes ours
        // alone for the call).
        unsafe { job.run(isa, c, r, cl) };
        isa.finish();
    };
    in_parts(parts, run);
    if plan == Plan::Transposed {
        PACK.with(|p| p.replace(pack));
    }
}

/// Runs `run(0)`, …, `run(parts − 1)`: part 0 on this thread (a rayon worker or not), the others on the
/// rayon threads.
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

thread_local! {
    /// The pack buffer, reused across calls on this thread (taken out during a call, so a nested call on
    /// the same thread, e.g. a rayon job run while waiting, allocates its own instead of sharing it).
    static PACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Copies B (k × n, any strides) into `pack` as a row-major k × n matrix, in 16 × 16 blocks so that
/// both the reads and the writes stay within a few cache lines at a time.
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

#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: hands disjoint tiles of one output buffer to the threads of a rayon scope.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// One product as the tile loop sees it: C (rows × cols) = A (rows × k) · B (k × cols), with element
/// (i, j) of C at `c + i·c_rs + j·c_cs`, A's (i, kk) at `a + i·a_rs + kk·a_ks`, and B's row kk of panel p
/// (columns p·NR …) at `b + p·b_panel + kk·b_ks` (b_panel = NR: B itself; k·NR: the pack buffer).
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
unsafe impl Sync for Job {}

impl Job {
    /// Runs the tiles `row_tiles × col_tiles` (half-open tile index ranges).
    ///
    /// # Safety
    /// The job's pointers must be valid for every element it describes.
    unsafe fn run(&self, isa: Isa, c: Out, (r0, r1): (usize, usize), (c0, c1): (usize, usize)) {
        // SAFETY: every operation below stays within what this function's `# Safety` contract (above)
        // makes the caller guarantee.
        unsafe {
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
                    part.run_block(isa, c, (r0, r1), (c0, c1));
                }
            } else {
                self.run_block(isa, c, (r0, r1), (c0, c1));
            }
        }
    }

    /// [`Job::run`] for a k short enough to run in one pass.
    ///
    /// # Safety
    /// As for [`Job::run`].
    unsafe fn run_block(&self, isa: Isa, c: Out, (r0, r1): (usize, usize), (c0, c1): (usize, usize)) {
        // SAFETY: every operation below stays within what this function's `# Safety` contract (above)
        // makes the caller guarantee.
        unsafe {
            // Loop order: when B is small (dW = Gᵀ·X: B = X, 64 rows) sweep it once per row tile and write C
            // row block by row block, in address order; when B is large (dX = G·W: B = W) keep one 64-column
            // panel of it in L2 and run every row tile over it before the next.
            if self.k * self.cols <= ROW_ORDER_MAX_B {
                for ip in r0..r1 {
                    for jp in c0..c1 {
                        self.tile(isa, c, ip, jp, None);
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
                        self.tile(isa, c, ip, jp, next);
                    }
                }
            }
        }
    }

    /// Runs tile (ip, jp), prefetching `n` rows of B (64 values each, row stride b_ks) from `next`.
    ///
    /// # Safety
    /// As for [`Job::run`].
    #[inline]
    unsafe fn tile(&self, isa: Isa, c: Out, ip: usize, jp: usize, next: Option<(*const f32, usize)>) {
        // SAFETY: every operation below stays within what this function's `# Safety` contract (above)
        // makes the caller guarantee.
        unsafe {
            let (pf, pf_n) = next.unwrap_or((std::ptr::null(), 0));
            let j0 = jp * NR;
            let i0 = ip * MR;
            let t = Tile {
                rows: (self.rows - i0).min(MR),
                cols: (self.cols - j0).min(NR),
                k: self.k,
                a: self.a.offset(i0 as isize * self.a_rs),
                a_rs: self.a_rs,
                a_ks: self.a_ks,
                b: self.b.offset(jp as isize * self.b_panel),
                b_ks: self.b_ks,
                c: c.0.offset(i0 as isize * self.c_rs + j0 as isize * self.c_cs),
                c_rs: self.c_rs,
                c_cs: self.c_cs,
                beta: self.beta,
                accumulate: self.accumulate,
                pf,
                pf_n,
            };
            isa.vectorize(t);
        }
    }
}

/// One tile of a [`Job`]: C (rows × cols, at most MR × NR) `(+)= β·A·B`, with the layout of [`Job`].
/// Built only by [`Job::tile`], whose caller guarantees every pointer valid for the elements it describes.
struct Tile {
    rows: usize,
    cols: usize,
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_ks: isize,
    b: *const f32,
    b_ks: isize,
    c: *mut f32,
    c_rs: isize,
    c_cs: isize,
    beta: f32,
    accumulate: bool,
    /// Rows of B to prefetch (64 values each, stride b_ks) for the next panel, one per step of k.
    pf: *const f32,
    pf_n: usize,
}

/// Steps of k per pass when a tile runs as several register blocks (AVX2, NEON): each block's partial sums
/// go back to the tile's buffer between passes, so the ≤ 6 rows of A a pass broadcasts (6 KiB) are read from
/// memory by the first block and from L1 by the others. (Storing and reloading a partial sum is exact: the
/// chains are those of a single pass.)
const KB: usize = 256;

impl WithSimd for Tile {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let lanes = S::F32_LANES;
        // Columns per register block: the whole tile with 16 lanes (4 × 16), else 16 (AVX2: 2 × 8 of 16
        // registers; NEON: 4 × 4 of 32).
        let block = if lanes >= 16 { NR } else { 16 };
        let kb = if block == NR { self.k } else { KB };
        // The tile's partial sums Σ_k a_k ⊗ b_k, (rows, cols): every value `write_tile` reads is written by the
        // first pass (whole vectors, up to the column count rounded up to L), so nothing is zeroed first
        // (measured: zeroing 1.5 KiB doubled the cost of the 1-row, 8-step products of a mixed batch).
        let mut sums = [[std::mem::MaybeUninit::<f32>::uninit(); NR]; MR];
        for k0 in (0..self.k).step_by(kb.max(1)) {
            let k1 = (k0 + kb).min(self.k);
            for j in (0..self.cols).step_by(block) {
                let w = (self.cols - j).min(block);
                let nv = w.div_ceil(lanes);
                let pass = Pass { j, w, k0, k1 };
                macro_rules! go {
                    ($($r:literal),*) => {
                        match (self.rows, nv) {
                            $(($r, 4) => tile::<S, $r, 4>(simd, &self, pass, &mut sums),
                              ($r, 3) => tile::<S, $r, 3>(simd, &self, pass, &mut sums),
                              ($r, 2) => tile::<S, $r, 2>(simd, &self, pass, &mut sums),
                              ($r, _) => tile::<S, $r, 1>(simd, &self, pass, &mut sums),)*
                            _ => unreachable!("tiles have 1..=MR rows"),
                        }
                    };
                }
                // SAFETY: the tile's pointers are valid (see `Tile`); columns j..j+w and steps k0..k1 lie
                // inside it.
                unsafe { go!(6, 5, 4, 3, 2, 1) }
            }
        }
        // SAFETY: as above.
        unsafe { write_tile(simd, &self, &sums) }
    }
}

/// A tile's partial sums, written by [`tile`] before [`write_tile`] reads them.
type Sums = [[std::mem::MaybeUninit<f32>; NR]; MR];

/// One pass of the microkernel over a tile: columns `j..j+w`, steps `k0..k1`.
#[derive(Clone, Copy)]
struct Pass {
    j: usize,
    w: usize,
    k0: usize,
    k1: usize,
}

/// The microkernel: columns `j..j+w` of a tile (`w` in `L·(V−1)+1 ..= L·V`, the last vector masked when
/// short), steps `k0..k1`: `sums += Σ_k a_k ⊗ b_k` with the R × L·V block in registers (started from zero
/// on the first pass, from `sums` on later ones).
///
/// # Safety
/// `t` must describe valid memory (masked-off lanes are never touched).
#[inline(always)]
unsafe fn tile<S: pulp::Simd, const R: usize, const V: usize>(simd: S, t: &Tile, p: Pass, sums: &mut Sums) {
    // SAFETY: every operation below stays within what this function's `# Safety` contract (above)
    // makes the caller guarantee.
    unsafe {
        let lanes = S::F32_LANES;
        let Pass { j, w, k0, k1 } = p;
        let zero = simd.splat_f32s(0.0);
        let last = w - lanes * (V - 1); // lanes of the last vector inside the tile
        let full = last == lanes;
        let mask = first_lanes(simd, last);
        let mut acc = [[zero; V]; R]; // (R, L·V)
        if k0 > 0 {
            for (row, sum) in acc.iter_mut().zip(sums.iter()) {
                for (v, x) in row.iter_mut().enumerate() {
                    // Written by the previous pass over these columns.
                    *x = sum.as_ptr().add(j + lanes * v).cast::<S::f32s>().read_unaligned();
                }
            }
        }
        let (mut a, mut b) = (t.a.offset(k0 as isize * t.a_ks), t.b.offset(k0 as isize * t.b_ks).add(j));
        // The next panel's rows are fetched by the first column block only, one row per step of k.
        let pf_end = if j == 0 { t.pf_n.min(k1) } else { 0 };
        let mut pf = t.pf.wrapping_offset(k0 as isize * t.b_ks);
        for kk in k0..k1 {
            if kk < pf_end {
                for line in 0..4 {
                    // The address may lie past B's end: wrapping arithmetic (a prefetch never faults).
                    prefetch_line(pf.wrapping_add(16 * line));
                }
                pf = pf.wrapping_offset(t.b_ks);
            }
            let mut bv = [zero; V]; // columns j.. of row kk of B
            for (v, x) in bv.iter_mut().enumerate() {
                *x = load(simd, b.add(lanes * v), v + 1 == V && !full, mask);
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let s = simd.splat_f32s(*a.offset(i as isize * t.a_rs)); // A[i, kk]
                for (x, y) in row.iter_mut().zip(&bv) {
                    *x = simd.mul_add_f32s(s, *y, *x);
                }
            }
            // Loop-carried: after the last step they point one stride past the data (never read), so wrapping
            // arithmetic, which may leave the allocation, instead of `offset`, which may not.
            a = a.wrapping_offset(t.a_ks);
            b = b.wrapping_offset(t.b_ks);
        }
        // The buffer is NR wide: whole vectors fit past the tile's last column (those lanes are never written out).
        for (row, sum) in acc.iter().zip(sums.iter_mut()) {
            for (v, x) in row.iter().enumerate() {
                sum.as_mut_ptr().add(j + lanes * v).cast::<S::f32s>().write_unaligned(*x);
            }
        }
    }
}

/// Writes a tile's sums out: `C = [C +] β·sums`.
///
/// # Safety
/// `t` must describe valid memory, and every pass of the tile have run (so that the sums it reads, columns
/// up to `cols` rounded up to L, are written).
#[inline(always)]
unsafe fn write_tile<S: pulp::Simd>(simd: S, t: &Tile, sums: &Sums) {
    // SAFETY: every operation below stays within what this function's `# Safety` contract (above)
    // makes the caller guarantee.
    unsafe {
        let lanes = S::F32_LANES;
        let beta = simd.splat_f32s(t.beta);
        if t.c_cs == 1 {
            for (i, sum) in sums.iter().enumerate().take(t.rows) {
                let out = t.c.offset(i as isize * t.c_rs);
                for j in (0..t.cols).step_by(lanes) {
                    let n = (t.cols - j).min(lanes);
                    let (masked, mask) = (n < lanes, first_lanes(simd, n));
                    let p = out.add(j);
                    let mut r = simd.mul_f32s(sum.as_ptr().add(j).cast::<S::f32s>().read_unaligned(), beta);
                    if t.accumulate {
                        r = simd.add_f32s(load(simd, p, masked, mask), r);
                    }
                    store(simd, p, r, masked, mask);
                }
            }
        } else {
            // Transposed output: column by column (contiguous along i when c_rs = 1).
            for j in 0..t.cols {
                let out = t.c.offset(j as isize * t.c_cs);
                for (i, sum) in sums.iter().enumerate().take(t.rows) {
                    let p = out.offset(i as isize * t.c_rs);
                    let r = sum[j].assume_init() * t.beta;
                    *p = if t.accumulate { *p + r } else { r };
                }
            }
        }
    }
}

/// Rows × columns of a dot tile: 4 × 4 (16 accumulators) where 32 vector registers are available
/// (AVX-512, NEON), 3 × 4 (12) on AVX2's 16. (4 × 6, the shape of the hand-written AVX-512 kernel this
/// replaced, measured 2.2× slower here: its 24 accumulators of `pulp`'s vector structs were kept in memory.)
fn dot_shape(isa: Isa) -> (usize, usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::V3(_) => (3, 4),
        #[allow(unreachable_patterns)]
        _ => (4, 4),
    }
}

/// [`Plan::Dots`]: `C (m×n) = [C +] β·A·B` with A's rows and B's columns contiguous, in tiles of a few rows ×
/// a few columns ([`dot_shape`]), split by rows across threads (by columns when there are few rows).
fn dots(isa: Isa, dst: &mut [f32], lhs: MatRef<'_>, rhs: MatRef<'_>, beta: f32, accumulate: bool, threads: usize) {
    // Column j of B starts at data[j·cs] and holds k values (the view's bounds check covers them all).
    let cols = |j0: usize| F32Cols { b: rhs.data[j0 * rhs.cs..].as_ptr(), cs: rhs.cs };
    dots_on(isa, dst, lhs, rhs.cols, cols, beta, accumulate, threads)
}

/// [`Plan::Dots`] with B = Wᵀ for a bf16 `w`: `C (m×n) = [C +] β·A·Wᵀ`, n = w's rows. The same tiles, in the
/// same order, as [`dots`] on the f32 values of W, so the same bits.
pub(super) fn dots_bf16(isa: Isa, dst: &mut [f32], lhs: MatRef<'_>, w: &Bf16Matrix, beta: f32, accumulate: bool, threads: usize) {
    assert!(lhs.cols == w.cols() && dst.len() == lhs.rows * w.rows(), "sgemm::dots_bf16: shapes");
    // Row j of W starts at words[j·stride] and holds stride words (k values and the zero padding).
    let cols = |j0: usize| Bf16Rows { b: w.words()[j0 * w.stride()..].as_ptr(), stride: w.stride() };
    dots_on(isa, dst, lhs, w.rows(), cols, beta, accumulate, threads)
}

/// The tile loop of [`dots`] and [`dots_bf16`]: `cols(j0)` is where column j0 of B starts.
#[allow(clippy::too_many_arguments)]
fn dots_on<B: DotCols>(
    isa: Isa,
    dst: &mut [f32],
    lhs: MatRef<'_>,
    n: usize,
    cols: impl Fn(usize) -> B + Sync,
    beta: f32,
    accumulate: bool,
    threads: usize,
) {
    let (m, k) = (lhs.rows, lhs.cols);
    let (dot_rows, dot_cols) = dot_shape(isa);
    let tiles = m.div_ceil(dot_rows);
    let col_tiles = n.div_ceil(dot_cols);
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
            let (i0, j0) = (it * dot_rows, jt * dot_cols);
            // The tile reads rows i0.. of A and columns j0.. of B inside their bounds-checked views (the
            // slices check the starts), and writes its own block of C (disjoint across parts).
            isa.vectorize(DotTile {
                rows: (m - i0).min(dot_rows),
                cols: (n - j0).min(dot_cols),
                k,
                a: lhs.data[i0 * lhs.rs..].as_ptr(),
                a_rs: lhs.rs,
                b: cols(j0),
                c: c.0,
                c_off: i0 * n + j0,
                ldc: n,
                beta,
                accumulate,
            })
        };
        if split_cols || small_a {
            // Column blocks outer: the few columns of B a block reads stay in L1 for every row tile, and B
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
        isa.finish();
    };
    in_parts(parts, run);
}

/// Where a dot tile reads its columns of B: lanes kk.. of column j.
trait DotCols: Copy {
    /// L values of column j from step kk on; with `masked`, only the lanes of `mask` (the others zero).
    ///
    /// # Safety
    /// Column j must be one the tile was built for, and kk < k (the tile's steps).
    unsafe fn load<S: pulp::Simd>(self, simd: S, j: usize, kk: usize, masked: bool, mask: pulp::MemMask<S::m32s>) -> S::f32s;
}

/// f32 columns of B, `cs` values apart, each k contiguous values.
#[derive(Clone, Copy)]
struct F32Cols {
    b: *const f32,
    cs: usize,
}

impl DotCols for F32Cols {
    #[inline(always)]
    unsafe fn load<S: pulp::Simd>(self, simd: S, j: usize, kk: usize, masked: bool, mask: pulp::MemMask<S::m32s>) -> S::f32s {
        // SAFETY: every operation below stays within what this function's `# Safety` contract (above)
        // makes the caller guarantee.
        unsafe { load(simd, self.b.add(j * self.cs + kk), masked, mask) }
    }
}

/// The rows of a [`Bf16Matrix`] as B's columns: `stride` words apart, each word two bf16 values (see
/// [`Bf16Matrix`] for which).
#[derive(Clone, Copy)]
struct Bf16Rows {
    b: *const u32,
    stride: usize,
}

impl DotCols for Bf16Rows {
    #[inline(always)]
    unsafe fn load<S: pulp::Simd>(self, simd: S, j: usize, kk: usize, _masked: bool, _mask: pulp::MemMask<S::m32s>) -> S::f32s {
        // SAFETY: every operation below stays within what this function's `# Safety` contract (above)
        // makes the caller guarantee.
        unsafe {
            // Values 32p + i (i < 16) are the low halves of words 16p + i, values 32p + 16 + i their high halves.
            // L ≤ 16 divides 16 and kk is a multiple of L, so the L words lie in one block of 16. Beyond k the
            // words are zero (the padding), which is what the f32 path's masked load gives.
            let (block, within) = (kk / 32, kk % 32);
            let words = self.b.add(j * self.stride + block * 16 + within % 16).cast::<S::u32s>().read_unaligned();
            let bits = if within < 16 {
                simd.wrapping_dyn_shl_u32s(words, simd.splat_u32s(16))
            } else {
                simd.and_u32s(words, simd.splat_u32s(0xFFFF_0000))
            };
            simd.transmute_f32s_u32s(bits)
        }
    }
}

/// One tile of [`dots`]: `C[i][j] (+)= β·Σ_k A[i][k]·B[k][j]` for `rows × cols` elements. Built only by
/// [`dots_on`], from bounds-checked views: rows `0..rows` of A and columns `0..cols` of B (k values
/// each) and the tile of C are valid.
struct DotTile<B> {
    rows: usize,
    cols: usize,
    k: usize,
    a: *const f32,
    a_rs: usize,
    b: B,
    c: *mut f32,
    c_off: usize,
    ldc: usize,
    beta: f32,
    accumulate: bool,
}

impl<B: DotCols> WithSimd for DotTile<B> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        macro_rules! go {
            ($($r:literal),*) => {
                match (self.rows, self.cols) {
                    $(($r, 6) => dot_tile::<S, B, $r, 6>(simd, &self), ($r, 5) => dot_tile::<S, B, $r, 5>(simd, &self),
                      ($r, 4) => dot_tile::<S, B, $r, 4>(simd, &self), ($r, 3) => dot_tile::<S, B, $r, 3>(simd, &self),
                      ($r, 2) => dot_tile::<S, B, $r, 2>(simd, &self), ($r, _) => dot_tile::<S, B, $r, 1>(simd, &self),)*
                    _ => unreachable!("dot tiles have 1..=4 rows"),
                }
            };
        }
        // SAFETY: the tile's pointers are valid (see `DotTile`).
        unsafe { go!(4, 3, 2, 1) }
    }
}

/// `C[i][j] (+)= β·Σ_k A[i][k]·B[k][j]` for an `R × N` tile: L lanes of k at a time (the tail masked), then
/// one horizontal sum per element.
///
/// # Safety
/// As described at [`DotTile`].
#[inline(always)]
unsafe fn dot_tile<S: pulp::Simd, B: DotCols, const R: usize, const N: usize>(simd: S, t: &DotTile<B>) {
    // SAFETY: every operation below stays within what this function's `# Safety` contract (above)
    // makes the caller guarantee.
    unsafe {
        let lanes = S::F32_LANES;
        let zero = simd.splat_f32s(0.0);
        // The whole loop in this one function, the accumulators never passed to or returned from another:
        // either way they were kept in memory (written back on every step; measured, a decode step of the LM
        // ran 1.8× as long).
        let mut acc = [[zero; N]; R]; // (R, N), L partial sums each
                                      // One step: lanes kk.. of every row of A and column of B into the accumulators; whole steps
                                      // unmasked, then the short last one (if any) masked, so that no step tests which it is.
        macro_rules! step {
            ($kk:expr, $masked:expr, $mask:expr) => {{
                let mut av = [zero; R];
                for (i, x) in av.iter_mut().enumerate() {
                    *x = load(simd, t.a.add(i * t.a_rs + $kk), $masked, $mask);
                }
                // One column of B at a time (R + 1 vectors live beside the accumulators).
                for j in 0..N {
                    let bv = t.b.load(simd, j, $kk, $masked, $mask);
                    for (row, a) in acc.iter_mut().zip(&av) {
                        row[j] = simd.mul_add_f32s(*a, bv, row[j]);
                    }
                }
            }};
        }
        let whole = t.k - t.k % lanes;
        let full = first_lanes(simd, lanes);
        let mut kk = 0;
        while kk < whole {
            step!(kk, false, full);
            kk += lanes;
        }
        if kk < t.k {
            step!(kk, true, first_lanes(simd, t.k - kk));
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, x) in row.iter().enumerate() {
                let p = t.c.add(t.c_off + i * t.ldc + j);
                let v = t.beta * simd.reduce_sum_f32s(*x);
                *p = if t.accumulate { *p + v } else { v };
            }
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
/// Columns of C per pass of [`sparse_direct`] (16 vectors of 16 lanes; AVX2 and NEON run it in blocks).
const SPARSE_COLS: usize = 256;
/// Rows of B per block of [`sparse_direct`]: a block of 64 rows of a 1000-column B is 250 KiB, kept in L2
/// while every row of C that needs it passes over it.
const SPARSE_BLOCK: usize = 64;

/// A's non-zeros row by row (compressed sparse rows), built only when A is sparse enough.
struct Csr {
    rows: usize,
    /// Row i's entries are `idx[start[i]..start[i + 1]]` (ascending k) with values `val[…]`.
    start: Vec<usize>,
    idx: Vec<u32>,
    val: Vec<f32>,
}

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
fn sparse_direct(isa: Isa, dst: &mut [f32], csr: &Csr, b: MatRef<'_>, beta: f32, accumulate: bool, threads: usize) {
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
                    // The indices are rows of B (< k), the columns j0..j0+w lie inside B's rows (cs = 1)
                    // and inside row i of C, which only this part writes.
                    isa.vectorize(SparseTile {
                        idx: &csr.idx[lo..hi],
                        val: &csr.val[lo..hi],
                        b: b.data[j0..].as_ptr(),
                        b_ks: b.rs,
                        cols: (n - j0).min(SPARSE_COLS),
                        c: c.0,
                        c_off: i * n + j0,
                        beta,
                    });
                }
            }
        }
        isa.finish();
    };
    in_parts(parts, run);
}

/// `C[i, j0..j0+cols] += β·Σ_t val[t]·B[idx[t], j0..]`. Built only by [`sparse_direct`]: every `idx` is a
/// row of B, and the columns lie inside B and C.
struct SparseTile<'a> {
    idx: &'a [u32],
    val: &'a [f32],
    b: *const f32,
    b_ks: usize,
    cols: usize,
    c: *mut f32,
    c_off: usize,
    beta: f32,
}

impl WithSimd for SparseTile<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let lanes = S::F32_LANES;
        // Columns per register block: 16 vectors (16 of AVX-512's and NEON's 32 registers), 8 on AVX2.
        let block = lanes * if lanes == 8 { 8 } else { 16 };
        for j in (0..self.cols).step_by(block) {
            let w = (self.cols - j).min(block);
            macro_rules! go {
                ($($v:literal),*) => {
                    match w.div_ceil(lanes) {
                        $($v => sparse_tile::<S, $v>(simd, &self, j, w),)*
                        _ => unreachable!("1..=16 vectors"),
                    }
                };
            }
            // SAFETY: the tile's indices and columns are valid (see `SparseTile`).
            unsafe { go!(16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1) }
        }
    }
}

/// Columns `j..j+w` of a [`SparseTile`] (`w` in `L·(V−1)+1 ..= L·V`, the last vector masked when short).
///
/// # Safety
/// As described at [`SparseTile`].
#[inline(always)]
unsafe fn sparse_tile<S: pulp::Simd, const V: usize>(simd: S, t: &SparseTile<'_>, j: usize, w: usize) {
    // SAFETY: every operation below stays within what this function's `# Safety` contract (above)
    // makes the caller guarantee.
    unsafe {
        let lanes = S::F32_LANES;
        let last = w - lanes * (V - 1);
        let full = last == lanes;
        let mask = first_lanes(simd, last);
        let mut acc = [simd.splat_f32s(0.0); V];
        for (&kk, &a) in t.idx.iter().zip(t.val) {
            let s = simd.splat_f32s(a);
            let row = t.b.add(kk as usize * t.b_ks + j);
            for (v, x) in acc.iter_mut().enumerate() {
                *x = simd.mul_add_f32s(s, load(simd, row.add(lanes * v), v + 1 == V && !full, mask), *x);
            }
        }
        let beta = simd.splat_f32s(t.beta);
        let out = t.c.add(t.c_off + j);
        for (v, x) in acc.iter().enumerate() {
            let p = out.add(lanes * v);
            let masked = v + 1 == V && !full;
            let r = simd.add_f32s(load(simd, p, masked, mask), simd.mul_f32s(*x, beta));
            store(simd, p, r, masked, mask);
        }
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

    /// An f64 reference product checked against `got` = [C +] β·A·B within f32 rounding.
    #[allow(clippy::too_many_arguments)]
    fn check(ci: usize, what: &str, case: &Case, av: MatRef<'_>, bv: MatRef<'_>, init: &[f32], got: &[f32], beta: f32, accumulate: bool) {
        for i in 0..case.m {
            for j in 0..case.n {
                let terms = (0..case.k).map(|kk| av.get(i, kk) as f64 * bv.get(kk, j) as f64);
                let (sum, abs): (f64, f64) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                let want = beta as f64 * sum + if accumulate { init[i * case.n + j] as f64 } else { 0.0 };
                // A sum of k f32 products carries at most ≈ k·ε of the sum of their magnitudes (ε = 2⁻²⁴
                // per rounding); scaling and the final add a few ε more. 2·k·ε·Σ|a·b| + 4ε·|C| bounds every
                // order of summation while catching any wrong or missing term.
                let tol =
                    2.0 * case.k as f64 * f32::EPSILON as f64 * abs * beta.abs() as f64 + 4.0 * f32::EPSILON as f64 * (want.abs() + 1.0);
                let g = got[i * case.n + j] as f64;
                assert!((g - want).abs() <= tol, "case {ci} {what} ({beta}, {accumulate}) C[{i}][{j}] = {g}, want {want} ± {tol}");
            }
        }
    }

    #[test]
    fn every_plan_on_every_instruction_set_matches_an_f64_reference_within_f32_rounding() {
        let isas = Isa::every_available();
        for (ci, case) in cases().iter().enumerate() {
            let a = rand_vec(case.m * case.k, case.a_zeros, 10 + ci as u64);
            let b = rand_vec(case.k * case.n, 0.0, 20 + ci as u64);
            let (av, bv) = views(case, &a, &b);
            assert_eq!(plan(&av, &bv), case.want, "case {ci}: plan");
            for (beta, accumulate) in [(1.0f32, false), (-0.75, true)] {
                let init = rand_vec(case.m * case.n, 0.0, 30 + ci as u64);
                // The entry point (whatever this CPU and LORA_KERNELS choose), then each instruction set.
                let mut got = init.clone();
                crate::matmul_into(&mut got, av, bv, beta, accumulate).unwrap();
                check(ci, "matmul_into", case, av, bv, &init, &got, beta, accumulate);
                for &isa in &isas {
                    let Some(p) = case.want else { continue };
                    let mut got = init.clone();
                    matmul(isa, &mut got, av, bv, beta, accumulate, p, 1);
                    check(ci, &format!("{isa:?}"), case, av, bv, &init, &got, beta, accumulate);
                }
            }
        }
    }

    /// Big enough (≥ PARALLEL_MIN multiply-adds) that every plan splits.
    fn big_cases() -> [Case; 4] {
        [
            Case { m: 64, n: 1000, k: 200, a_transposed: false, b_transposed: false, a_zeros: 0.0, want: Some(Plan::Direct) },
            Case { m: 500, n: 300, k: 64, a_transposed: true, b_transposed: false, a_zeros: 0.75, want: Some(Plan::Direct) },
            Case { m: 64, n: 700, k: 300, a_transposed: false, b_transposed: true, a_zeros: 0.0, want: Some(Plan::Transposed) },
            Case { m: 256, n: 10, k: 800, a_transposed: false, b_transposed: true, a_zeros: 0.0, want: Some(Plan::Dots) },
        ]
    }

    #[test]
    fn results_do_not_depend_on_the_number_of_threads() {
        for isa in Isa::every_available() {
            for (ci, case) in big_cases().iter().enumerate() {
                let a = rand_vec(case.m * case.k, case.a_zeros, 40 + ci as u64);
                let b = rand_vec(case.k * case.n, 0.0, 50 + ci as u64);
                let (av, bv) = views(case, &a, &b);
                let p = case.want.expect("every shape here has a plan");
                assert_eq!(plan(&av, &bv), Some(p), "case {ci}: plan");
                let run = |threads| {
                    let mut c = vec![0f32; case.m * case.n];
                    matmul(isa, &mut c, av, bv, 1.0, false, p, threads);
                    c
                };
                let one = run(1);
                assert_eq!(one, run(2), "{isa:?} case {ci}: 1 vs 2 threads");
                assert_eq!(one, run(3), "{isa:?} case {ci}: 1 vs 3 threads");
            }
        }
    }

    #[test]
    fn the_tiles_and_the_sparse_loop_give_the_same_bits_on_every_instruction_set() {
        let isas = Isa::every_available();
        if isas.len() < 2 {
            println!("one instruction set on this CPU ({isas:?}): nothing to compare it with");
            return;
        }
        // Every plan but Dots (whose lanes are summed across at the end, so its rounding follows the width),
        // with ragged edges, a sparse A and a long k (blocked by KC).
        let mut shapes: Vec<Case> = cases().into_iter().filter(|c| c.want.is_some_and(|p| p != Plan::Dots)).collect();
        shapes.extend(big_cases().into_iter().filter(|c| c.want != Some(Plan::Dots)));
        shapes.push(Case { m: 13, n: 700, k: 1100, a_transposed: false, b_transposed: false, a_zeros: 0.0, want: Some(Plan::Direct) });
        for (ci, case) in shapes.iter().enumerate() {
            let a = rand_vec(case.m * case.k, case.a_zeros, 90 + ci as u64);
            let b = rand_vec(case.k * case.n, 0.0, 95 + ci as u64);
            let (av, bv) = views(case, &a, &b);
            let p = plan(&av, &bv).expect("planned");
            let init = rand_vec(case.m * case.n, 0.0, 99);
            let run = |isa| {
                let mut c = init.clone();
                matmul(isa, &mut c, av, bv, -0.5, true, p, 2);
                c
            };
            let first = run(isas[0]);
            for &isa in &isas[1..] {
                let other = run(isa);
                let same = first.iter().zip(&other).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "case {ci} ({p:?}): {:?} and {isa:?} differ", isas[0]);
            }
        }
    }

    #[test]
    fn a_sparse_a_gives_the_bits_of_the_dense_tiles() {
        // k ≤ 64: one block, so the sparse path sums each element's non-zero terms in the dense chain's
        // order; skipping the zero terms (exact +0 or −0 contributions) cannot change a finite sum.
        let (m, n, k) = (50, 90, 64);
        let a = rand_vec(m * k, 0.8, 60);
        let b = rand_vec(k * n, 0.0, 61);
        let (av, bv) = (MatRef::row_major(&a, m, k).unwrap(), MatRef::row_major(&b, k, n).unwrap());
        let csr = Csr::build(&av).expect("80 % zeros is sparse");
        assert!(Csr::build(&MatRef::row_major(&b, k, n).unwrap()).is_none(), "a dense A must take the dense tiles");
        for isa in Isa::every_available() {
            let mut sparse = vec![0f32; m * n];
            sparse_direct(isa, &mut sparse, &csr, bv, 0.5, false, 1);
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
            // SAFETY: the job describes the two vectors and `dense` exactly.
            unsafe { job.run(isa, Out(dense.as_mut_ptr()), (0, m.div_ceil(MR)), (0, n.div_ceil(NR))) };
            isa.finish();
            assert_eq!(sparse, dense, "{isa:?}");
        }
    }

    /// W's values rounded down to bf16 numbers (their low 16 bits cleared).
    fn bf16_values(n: usize, seed: u64) -> Vec<f32> {
        rand_vec(n, 0.0, seed).into_iter().map(|v| f32::from_bits(v.to_bits() & 0xFFFF_0000)).collect()
    }

    #[test]
    fn a_bf16_weight_gives_the_bits_of_its_f32_values_on_every_instruction_set() {
        // Few rows (the dot-product plan) with k ragged around the 32-value blocks and the lane counts,
        // outputs ragged around the tile widths; one, two and four threads.
        for isa in Isa::every_available() {
            for (ci, &(m, k, n)) in
                [(1, 16, 4), (3, 17, 7), (5, 33, 5), (8, 40, 64), (4, 100, 9), (7, 256, 70), (15, 768, 33), (2, 31, 1)].iter().enumerate()
            {
                let x = rand_vec(m * k, 0.0, 90 + ci as u64);
                let w = bf16_values(n * k, 95 + ci as u64);
                let packed = Bf16Matrix::pack(&w, n, k).unwrap();
                let (xv, wt) = (MatRef::row_major(&x, m, k).unwrap(), MatRef::row_major(&w, n, k).unwrap().t());
                assert_eq!(plan(&xv, &wt), Some(Plan::Dots), "case {ci}");
                for (beta, accumulate) in [(1.0f32, false), (-0.75, true)] {
                    for threads in [1, 2, 4] {
                        let init = rand_vec(m * n, 0.0, 99);
                        let (mut want, mut got) = (init.clone(), init.clone());
                        matmul(isa, &mut want, xv, wt, beta, accumulate, Plan::Dots, threads);
                        dots_bf16(isa, &mut got, xv, &packed, beta, accumulate, threads);
                        let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{isa:?} case {ci} ({m}, {k}, {n}) threads {threads}: {got:?} vs {want:?}");
                    }
                }
            }
        }
    }
}
