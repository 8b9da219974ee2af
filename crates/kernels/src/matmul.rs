//! `C = [C +] β·A·B` for f32 matrices read through their strides: our SIMD kernels (`sgemm`) where they
//! apply and [`simd`] allows, else the `gemm` crate (the product candle's CPU matmul makes). Also the two
//! helpers of callers that run many products: [`serial`] (keep a thread's products unsplit) and [`prefetch`].

use crate::bf16::Bf16Matrix;
use crate::error::{bail, Result};
use crate::mat::MatRef;
use crate::sgemm;

thread_local! {
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every product it makes on this thread unsplit: for callers that already spread work over
/// the cores at a coarser grain (evaluation batches side by side, blocks of a weight gradient), where
/// splitting each product again would only add hand-offs.
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            SERIAL.set(self.0);
        }
    }
    let _reset = Reset(SERIAL.replace(true));
    f()
}

/// The number of threads the kernels split a product over: those of the rayon pool they run on (the global
/// pool takes `RAYON_NUM_THREADS` when it is a positive number, else the machine's available parallelism,
/// read when the pool starts). Asked on every product, so it must be cheap: reading the environment and the
/// CPU affinity each time cost up to 23 µs a call here.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// `dst (m×n, row-major) = [dst +] beta·lhs·rhs` with lhs (m×k) and rhs (k×n) read through their strides.
/// With `accumulate == false` and `beta == 1` this is exactly the call candle's CPU matmul makes.
pub fn matmul_into(dst: &mut [f32], lhs: MatRef<'_>, rhs: MatRef<'_>, beta: f32, accumulate: bool) -> Result<()> {
    matmul_with(Kernel::Auto, dst, lhs, rhs, beta, accumulate)
}

/// `dst (m×n, row-major) = [dst +] beta·lhs·Wᵀ` for a bf16 weight W (n × k): the same bits as
/// [`matmul_into`] with the f32 values of W (`lhs·Wᵀ` read through a transposed view), from half the weight
/// bytes. Few rows (a decode step) run on our dot-product kernel reading the bf16 words; more rows make
/// [`matmul_into`]'s own call on `wide`, W's f32 values (n × k) where the caller holds them, else on blocks
/// of W's rows widened to f32 one at a time ([`BLOCK_VALUES`] values), each block's outputs computed by the
/// very chains the whole product uses (see [`blocks`]): a 128k-row output embedding is never widened whole.
pub fn matmul_bf16_into(
    dst: &mut [f32],
    lhs: MatRef<'_>,
    w: &Bf16Matrix,
    wide: Option<MatRef<'_>>,
    beta: f32,
    accumulate: bool,
) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, w.rows());
    // Checked: a stride-0 lhs may have any number of rows, and an m·n that wrapped could equal dst.len().
    if w.cols() != k || m.checked_mul(n) != Some(dst.len()) {
        bail!("matmul_bf16_into: ({m}x{k})·({}x{n})ᵀ into {} values", w.cols(), dst.len())
    }
    if let Some(v) = wide.filter(|v| (v.rows, v.cols) != (n, k)) {
        bail!("matmul_bf16_into: the f32 weight is {}x{}, the bf16 one {n}x{k}", v.rows, v.cols)
    }
    let threads = if SERIAL.get() { 1 } else { threads() };
    // W's f32 values read as Wᵀ: a (k × n) view with unit row stride.
    let wt = sgemm::Layout { rows: k, cols: n, rs: 1, cs: k };
    let plan = sgemm::plan_for(&lhs, wt);
    if let (true, Some(isa), Some(sgemm::Plan::Dots)) = (m > 0 && n > 0 && k > 0, crate::isa::Isa::current(), plan) {
        sgemm::dots_bf16(isa, dst, lhs, w, beta, accumulate, threads);
        return Ok(());
    }
    if let Some(v) = wide {
        return matmul_into(dst, lhs, v.t(), beta, accumulate);
    }
    // The tiles (Transposed plan, or k = 1) keep their chains per output column: cut W into row blocks.
    // The gemm crate (the remaining small shapes) blocks by its own rules, so it gets W whole.
    let cut = plan.is_some();
    blocks(
        dst,
        m,
        n,
        k,
        cut,
        beta,
        accumulate,
        |j0, j1, buf| w.rows_into(j0, j1, buf),
        |d, block, beta, acc| matmul_into(d, lhs, MatRef::row_major(block, block.len() / k.max(1), k)?.t(), beta, acc),
    )
}

/// `dst (m×n, row-major) = [dst +] beta·lhs·W` for a bf16 weight W (k × n): the same bits as [`matmul_into`]
/// with W's f32 values read row-major (the input gradient `g·W` of a linear layer whose frozen weight is
/// held in bf16), on blocks of W's columns widened to f32 one at a time, each computed by the chains of the
/// whole product ([`blocks`]).
pub fn matmul_bf16_plain_into(dst: &mut [f32], lhs: MatRef<'_>, w: &Bf16Matrix, beta: f32, accumulate: bool) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, w.cols());
    if w.rows() != k || m.checked_mul(n) != Some(dst.len()) {
        bail!("matmul_bf16_plain_into: ({m}x{k})·({}x{n}) into {} values", w.rows(), dst.len())
    }
    let plan = sgemm::plan_for(&lhs, sgemm::Layout { rows: k, cols: n, rs: n, cs: 1 });
    let cut = plan.is_some();
    blocks(
        dst,
        m,
        n,
        k,
        cut,
        beta,
        accumulate,
        |c0, c1, buf| w.cols_block_into(c0, c1, buf),
        |d, block, beta, acc| matmul_into(d, lhs, MatRef::row_major(block, k, block.len() / k.max(1))?, beta, acc),
    )
}

/// Values of W widened at a time by the bf16 products: 8 MiB of f32. Smaller blocks cost more than they save
/// (each block repacks the activations: the forward of a 1B model's LoRA step measured 6.6 s with 2 MiB blocks,
/// 5.2 s with 8 MiB; `PROFILE_SHAPE=1b PROFILE_DTYPE=bf16 profile_step lora 3`). This crate's own tests use
/// 2 MiB so that their products are cut into several blocks; the bits do not depend on the size (see
/// [`blocks`]).
#[cfg(not(test))]
const BLOCK_VALUES: usize = 1 << 21;
#[cfg(test)]
const BLOCK_VALUES: usize = 1 << 19;

/// Runs `C (m×n) = [C +] β·lhs·B` one block of C's columns at a time: `widen(j0, j1, buf)` writes the f32
/// values of B's columns j0..j1 (in the layout `product` reads), `product(d, buf, β, acc)` computes that
/// block into `d` (m × (j1 − j0), row-major), which is `dst` itself when one block covers it.
///
/// Why each block gives the bits of the whole product (for `cut` = the product runs on our tiles): every
/// output element of the tiles is one chain of fused multiply-adds over k that no column count changes,
/// except through three shape rules — the plan (the Transposed tiles need ≥ 64 columns, the sparse loop ≥ 64,
/// the Direct tiles ≥ 16), the split of k into blocks of 512 (taken when k > 512 and k · columns > 2¹⁶, with
/// columns = n, or m where Aᵀ is packed) and whether Aᵀ is packed (m ≤ columns). Blocks are at least 128
/// columns wide (the last one takes the remainder), so a block takes the plan of the whole, and wherever k
/// exceeds 512 both the whole and every block split k (k · 128 > 2¹⁶), whichever operand each packs.
#[allow(clippy::too_many_arguments)]
fn blocks(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    cut: bool,
    beta: f32,
    accumulate: bool,
    widen: impl Fn(usize, usize, &mut [f32]),
    product: impl Fn(&mut [f32], &[f32], f32, bool) -> Result<()>,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    let width = if cut { (BLOCK_VALUES / k / 64 * 64).max(128) } else { n };
    // Whole blocks of `width` columns, the last one taking the remainder (so no block is narrower).
    let count = n / width;
    // The widened block and the block's outputs live in this thread's buffers, reused from call to call
    // (fresh pages for them on every product cost ~8 % of a LoRA step in zeroing); taken out for the call,
    // so a nested call on this thread allocates its own.
    let (mut buf, mut out) = (WIDE.with(|b| b.take()), WIDE_OUT.with(|b| b.take()));
    let result = (|| {
        if count <= 1 {
            let buf = sized(&mut buf, k * n);
            widen(0, n, buf);
            return product(dst, buf, beta, accumulate);
        }
        let widest = n - (count - 1) * width;
        let (buf, out) = (sized(&mut buf, k * widest), sized(&mut out, m * widest));
        each_block(dst, (m, n, k), (width, count), buf, out, beta, accumulate, &widen, &product)
    })();
    // Kept for the next call unless unusually large (a whole weight of the gemm crate's shapes).
    if buf.len() <= 4 * BLOCK_VALUES {
        WIDE.with(|b| b.replace(buf));
    }
    if out.len() <= 8 * BLOCK_VALUES {
        WIDE_OUT.with(|b| b.replace(out));
    }
    result
}

thread_local! {
    /// [`blocks`]' widened block of W, reused.
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// [`blocks`]' block of outputs, reused.
    static WIDE_OUT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The first `len` values of `v`, grown as needed (their contents are overwritten by the caller).
fn sized(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// The loop of [`blocks`] over `count` blocks of `width` columns (the last taking the remainder).
#[allow(clippy::too_many_arguments)]
fn each_block(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    (width, count): (usize, usize),
    buf: &mut [f32],
    out: &mut [f32],
    beta: f32,
    accumulate: bool,
    widen: &impl Fn(usize, usize, &mut [f32]),
    product: &impl Fn(&mut [f32], &[f32], f32, bool) -> Result<()>,
) -> Result<()> {
    for b in 0..count {
        let (j0, j1) = (b * width, if b + 1 == count { n } else { (b + 1) * width });
        let w = j1 - j0;
        let (buf, out) = (&mut buf[..k * w], &mut out[..m * w]);
        widen(j0, j1, buf);
        if accumulate {
            for (o, row) in out.chunks_exact_mut(w).zip(dst.chunks_exact(n)) {
                o.copy_from_slice(&row[j0..j1]);
            }
        }
        product(out, buf, beta, accumulate)?;
        for (o, row) in out.chunks_exact(w).zip(dst.chunks_exact_mut(n)) {
            row[j0..j1].copy_from_slice(o);
        }
    }
    Ok(())
}

/// Which code computes a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// Our kernel ([`sgemm`]) where it applies and [`simd`] allows, else the `gemm` crate.
    Auto,
    /// Always the `gemm` crate (the portable path; tests compare the two).
    #[cfg_attr(not(test), allow(dead_code))]
    GemmCrate,
}

fn matmul_with(kernel: Kernel, dst: &mut [f32], lhs: MatRef<'_>, rhs: MatRef<'_>, beta: f32, accumulate: bool) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    // Checked: a stride-0 view may have any number of rows, and an m·n that wrapped could equal dst.len().
    if rhs.rows != k || m.checked_mul(n) != Some(dst.len()) {
        bail!("matmul_into: ({m}x{k})·({}x{n}) into {} values", rhs.rows, dst.len())
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    let threads = if SERIAL.get() { 1 } else { threads() };
    if let (Kernel::Auto, Some(isa), Some(plan)) = (kernel, crate::isa::Isa::current(), sgemm::plan(&lhs, &rhs)) {
        sgemm::matmul(isa, dst, lhs, rhs, beta, accumulate, plan, threads);
        return Ok(());
    }
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the views were bounds-checked on construction (every element (i, j) lies inside its slice),
    // dst holds exactly m·n values written with row stride n, and dst does not alias lhs or rhs (it is a
    // unique &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
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

    /// |got − want| ≤ tol·(1 + max|want|) element-wise.
    fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = 1.0 + want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * scale, "{what}[{i}]: ours {g} vs gemm crate {w}");
        }
    }

    #[test]
    fn our_kernels_and_the_gemm_crate_agree_on_every_operand_layout() {
        // (m, k, n) with lhs and rhs each row-major or read through a transpose: every plan of `sgemm`
        // and its fallback, against the gemm crate (the portable path).
        for (i, (m, k, n)) in [(64, 100, 200), (64, 300, 10), (200, 64, 90), (5, 7, 3)].into_iter().enumerate() {
            let a = rand_vec(m * k, 70 + i as u64);
            let b = rand_vec(k * n, 80 + i as u64);
            for (lt, rt) in [(false, false), (false, true), (true, false), (true, true)] {
                let lhs = if lt { MatRef::row_major(&a, k, m).unwrap().t() } else { MatRef::row_major(&a, m, k).unwrap() };
                let rhs = if rt { MatRef::row_major(&b, n, k).unwrap().t() } else { MatRef::row_major(&b, k, n).unwrap() };
                let (mut ours, mut theirs) = (vec![0f32; m * n], vec![0f32; m * n]);
                matmul_with(Kernel::Auto, &mut ours, lhs, rhs, 0.5, false).unwrap();
                matmul_with(Kernel::GemmCrate, &mut theirs, lhs, rhs, 0.5, false).unwrap();
                // Sums of ≤ 300 products of size ≤ 1 in different orders: ≲ 300·6e-8 ≈ 2e-5 of the largest.
                assert_close(&ours, &theirs, 3e-5, &format!("({m}, {k}, {n}) transposed ({lt}, {rt})"));
            }
        }
    }

    #[test]
    fn matmul_into_reads_transposed_views_without_copies() {
        let a = rand_vec(3 * 4, 60); // (3, 4)
        let b = rand_vec(5 * 4, 61); // (5, 4), used as (4, 5) through its transpose
        let mut d = vec![0f32; 15];
        matmul_into(&mut d, MatRef::row_major(&a, 3, 4).unwrap(), MatRef::row_major(&b, 5, 4).unwrap().t(), 1.0, false).unwrap();
        for i in 0..3 {
            for j in 0..5 {
                let want: f32 = (0..4).map(|k| a[i * 4 + k] * b[j * 4 + k]).sum();
                assert!((d[i * 5 + j] - want).abs() < 1e-6);
            }
        }
        assert!(MatRef::new(&a, 3, 4, 4, 2).is_err(), "a view past the end of its slice must be refused");
    }

    #[test]
    fn a_product_whose_size_wraps_around_is_refused_not_written_out_of_bounds() {
        // A stride-0 view repeats one row, so 2⁶² rows fit in 4 values; with n = 4 columns, m·n = 2⁶⁴ wraps
        // to 0 in release arithmetic and equalled an empty dst's length: the product then wrote 2⁶⁴ values.
        let v = [0.5f32; 16];
        let tall = MatRef::new(&v, 1 << 62, 4, 0, 1).unwrap();
        let e = matmul_into(&mut [], tall, MatRef::row_major(&v, 4, 4).unwrap(), 1.0, false).unwrap_err();
        assert!(e.to_string().contains("into 0 values"), "{e}");
        let w = Bf16Matrix::pack(&v, 4, 4).unwrap();
        let e = matmul_bf16_into(&mut [], tall, &w, None, 1.0, false).unwrap_err();
        assert!(e.to_string().contains("into 0 values"), "{e}");
    }

    #[test]
    fn views_whose_bounds_would_wrap_around_are_refused() {
        let a = [0f32; 8];
        // (2 − 1)·usize::MAX + (2 − 1)·2 wraps to 1 in unchecked release arithmetic: it must not pass.
        assert!(MatRef::new(&a, 2, 2, usize::MAX, 2).is_err());
        assert!(MatRef::new(&a, usize::MAX, 2, 1 << 63, 1).is_err());
        // rows·cols wrapping to the slice's length.
        assert!(MatRef::row_major(&a, 1 << 62, 4 + 1).is_err());
        assert!(MatRef::row_major(&a, (1usize << 63) + 4, 2).is_err());
        assert!(MatRef::new(&a, 2, 4, 4, 1).is_ok());
    }

    #[test]
    fn matmul_bf16_into_gives_the_bits_of_matmul_into_for_every_shape() {
        // Every plan the f32 product could take (few rows: dot products; many: the tiles or the gemm crate),
        // with a ragged k; the weight's values are bf16 numbers, so both read the same values.
        for (i, (m, k, n)) in [(1, 256, 768), (8, 33, 70), (15, 768, 256), (16, 256, 70), (40, 100, 130), (3, 5, 2)].into_iter().enumerate()
        {
            let x = rand_vec(m * k, 110 + i as u64);
            let w: Vec<f32> = rand_vec(n * k, 120 + i as u64).into_iter().map(|v| f32::from_bits(v.to_bits() & 0xFFFF_0000)).collect();
            let packed = Bf16Matrix::pack(&w, n, k).unwrap();
            let xv = MatRef::row_major(&x, m, k).unwrap();
            for accumulate in [false, true] {
                let init = rand_vec(m * n, 130);
                let mut want = init.clone();
                matmul_into(&mut want, xv, MatRef::row_major(&w, n, k).unwrap().t(), 0.5, accumulate).unwrap();
                // Widened for the call, or the caller's f32 copy: the same bits either way.
                for wide in [None, Some(MatRef::row_major(&w, n, k).unwrap())] {
                    let mut got = init.clone();
                    matmul_bf16_into(&mut got, xv, &packed, wide, 0.5, accumulate).unwrap();
                    assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "({m}, {k}, {n}) accumulate {accumulate}");
                }
            }
        }
        let packed = Bf16Matrix::pack(&[0.0; 6], 2, 3).unwrap();
        let e = matmul_bf16_into(&mut [0.0; 4], MatRef::row_major(&[0.0; 8], 2, 4).unwrap(), &packed, None, 1.0, false).unwrap_err();
        assert!(e.to_string().contains("(2x4)·(3x2)ᵀ"), "{e}");
        let other = MatRef::row_major(&[0.0; 6], 3, 2).unwrap();
        let e = matmul_bf16_into(&mut [0.0; 4], MatRef::row_major(&[0.0; 6], 2, 3).unwrap(), &packed, Some(other), 1.0, false).unwrap_err();
        assert!(e.to_string().contains("f32 weight is 3x2"), "{e}");
    }
    /// Values rounded to bf16 numbers (their low 16 bits cleared), some of them exact zeros.
    fn bf16_vec(n: usize, zeros: f64, seed: u64) -> Vec<f32> {
        let mut g = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| if g.random::<f64>() < zeros { 0.0 } else { f32::from_bits((g.random::<f32>() * 2.0 - 1.0).to_bits() & 0xFFFF_0000) })
            .collect()
    }

    #[test]
    fn bf16_weights_widened_in_blocks_give_the_bits_of_the_whole_f32_product() {
        // (m, k, n, zeros of lhs): products wide enough to be cut into blocks (n above the block width for
        // that k, k on both sides of 512, where the tiles split k), with m below and above the block width
        // (Aᵀ packed, or B copied row-major), a mostly-zero lhs (the sparse loop, as a ReLU's gradient), and
        // small shapes left whole (the tiles, or the gemm crate).
        let cases = [
            (20, 600, 1800, 0.0),
            (1000, 520, 2000, 0.0),
            (2100, 600, 1900, 0.0),
            (40, 300, 4000, 0.0),
            (70, 530, 1750, 0.8),
            (5, 40, 30, 0.0),
            (3, 10, 7, 0.0),
            (17, 1, 300, 0.0),
        ];
        for (i, (m, k, n, zeros)) in cases.into_iter().enumerate() {
            let x = bf16_vec(m * k, zeros, 200 + i as u64);
            for (beta, accumulate) in [(1.0, false), (0.5, true)] {
                let init = rand_vec(m * n, 230 + i as u64);
                // lhs·Wᵀ, W (n × k).
                let w = bf16_vec(n * k, 0.0, 210 + i as u64);
                let packed = Bf16Matrix::pack(&w, n, k).unwrap();
                let xv = MatRef::row_major(&x, m, k).unwrap();
                let (mut want, mut got) = (init.clone(), init.clone());
                matmul_into(&mut want, xv, MatRef::row_major(&w, n, k).unwrap().t(), beta, accumulate).unwrap();
                matmul_bf16_into(&mut got, xv, &packed, None, beta, accumulate).unwrap();
                let same = want.iter().zip(&got).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
                assert_eq!(
                    same,
                    want.len(),
                    "x·Wᵀ ({m}, {k}, {n}) accumulate {accumulate}: {} of {} differ",
                    want.len() - same,
                    want.len()
                );
                // lhs·W, W (k × n).
                let w = bf16_vec(k * n, 0.0, 220 + i as u64);
                let packed = Bf16Matrix::pack(&w, k, n).unwrap();
                let (mut want, mut got) = (init.clone(), init.clone());
                matmul_into(&mut want, xv, MatRef::row_major(&w, k, n).unwrap(), beta, accumulate).unwrap();
                matmul_bf16_plain_into(&mut got, xv, &packed, beta, accumulate).unwrap();
                let same = want.iter().zip(&got).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
                assert_eq!(same, want.len(), "x·W ({m}, {k}, {n}) accumulate {accumulate}: {} of {} differ", want.len() - same, want.len());
            }
        }
        let packed = Bf16Matrix::pack(&[0.0; 6], 2, 3).unwrap();
        let e = matmul_bf16_plain_into(&mut [0.0; 4], MatRef::row_major(&[0.0; 8], 2, 4).unwrap(), &packed, 1.0, false).unwrap_err();
        assert!(e.to_string().contains("(2x4)·(2x3)"), "{e}");
    }

    #[test]
    fn bf16_matrices_read_from_bit_patterns_equal_those_packed_from_values() {
        let (rows, cols) = (5, 37);
        let w = bf16_vec(rows * cols, 0.1, 240);
        let bits: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        let packed = Bf16Matrix::pack(&w, rows, cols).unwrap();
        assert_eq!(Bf16Matrix::from_bits(&bits, rows, cols).as_ref(), Some(&packed));
        let mut piecewise = Bf16Matrix::zeros(rows, cols).unwrap();
        assert!(piecewise.write_rows(3, &bits[3 * cols..]) && piecewise.write_rows(0, &bits[..3 * cols]));
        assert_eq!(piecewise, packed);
        assert!(!piecewise.write_rows(4, &bits[..2 * cols]), "rows past the end");
        assert!(!piecewise.write_rows(0, &bits[..cols + 1]), "not whole rows");
        assert!(Bf16Matrix::from_bits(&bits[1..], rows, cols).is_none());
        let mut row = vec![0f32; cols];
        packed.row_into(2, &mut row);
        assert_eq!(row, w[2 * cols..3 * cols]);
    }
}
