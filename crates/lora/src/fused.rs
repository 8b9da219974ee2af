//! Fused CPU kernels for [`LoraLinear`]: one candle custom op per layer instead of a chain of tensor ops.
//!
//! The forward computes, for x (n, in), W0 (out, in), bias b (out), A (r, in), B (out, r), scale s:
//!
//! ```text
//! y = act(x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ)          act ∈ {identity, ReLU}
//! ```
//!
//! with the matrix products of [`matmul_into`]: our SIMD kernels (AVX-512, AVX2 or NEON) for the skinny
//! shapes of batch training (`sgemm`: no copy of the weight, transposed operands read through their
//! strides, sparse ReLU-masked gradients compressed to their non-zeros), else the `gemm` crate candle's
//! CPU matmul uses.
//! The outputs match [`Backend::Reference`] to f32 rounding (the sums run in another order), and they do
//! not depend on the number of threads.
//!
//! The backward computes only what the graph needs, with g = ∂L/∂y (masked by y > 0 for ReLU):
//!
//! ```text
//! dA = s·(g·B)ᵀ·x      dB = s·gᵀ·(x·Aᵀ)      dx = g·W0 + s·(g·B)·A      dW0 = gᵀ·x      db = Σ_rows g
//! ```
//!
//! A frozen W0 and bias are constants held by the op (no gradient is ever formed for them), and dx is
//! skipped when x does not depend on any variable (the first layer's input).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, StorageRef, Tensor};

use crate::error::Result;
use crate::linear::LoraLinear;

mod sgemm;

type CResult<T> = candle_core::Result<T>;

/// Which implementation a [`LoraLinear`] uses for its forward and backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// One fused custom op per layer on the CPU where the layer's state allows it (f32, at most one
    /// active unmerged adapter, no dropout while training, base either frozen or trained without
    /// adapters); otherwise the reference path. The default.
    #[default]
    Fused,
    /// Plain candle tensor ops and candle's autograd: the reference the fused ops are tested against.
    Reference,
}

/// The activation applied after the linear map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// y = x·Wᵀ + b + delta.
    Identity,
    /// y = max(0, x·Wᵀ + b + delta).
    Relu,
}

/// A read-only, strided f32 matrix view: element (i, j) is `data[i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A view of `rows × cols` elements with row stride `rs` and column stride `cs`; every element must
    /// lie inside `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> CResult<Self> {
        // Checked arithmetic: a wrapped bound would let a view reach outside `data` in the kernels.
        let last = (rows.max(1) - 1).checked_mul(rs).zip((cols.max(1) - 1).checked_mul(cs)).and_then(|(a, b)| a.checked_add(b));
        if rows > 0 && cols > 0 && last.is_none_or(|last| last >= data.len()) {
            candle_core::bail!("matrix view {rows}x{cols} (strides {rs}, {cs}) does not fit in {} values", data.len())
        }
        Ok(MatRef { data, rows, cols, rs, cs })
    }
    /// A contiguous row-major view.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> CResult<Self> {
        if rows.checked_mul(cols) != Some(data.len()) {
            // Not rows·cols in the message: it may overflow.
            candle_core::bail!("row-major matrix {rows}x{cols} does not fit its {} values", data.len())
        }
        Self::new(data, rows, cols, cols, 1)
    }
    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
    /// Rows `r0..r1` of the view (no copy).
    pub fn row_range(self, r0: usize, r1: usize) -> CResult<Self> {
        if r0 > r1 || r1 > self.rows {
            candle_core::bail!("rows {r0}..{r1} of a {}-row matrix view", self.rows)
        }
        if r0 == r1 {
            return Ok(MatRef { data: &self.data[..0], rows: 0, ..self });
        }
        Ok(MatRef { data: &self.data[r0 * self.rs..], rows: r1 - r0, ..self })
    }
    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
    fn is_row_major(&self) -> bool {
        self.cs == 1 && (self.rs == self.cols || self.rows <= 1)
    }
    /// The values as one row-major slice when the view is contiguous.
    fn contiguous(&self) -> Option<&'a [f32]> {
        self.is_row_major().then(|| &self.data[..self.rows * self.cols])
    }
    fn get(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

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

/// Asks the CPU to bring `data` into its level-2 cache ahead of use (x86-64; elsewhere nothing): for many
/// small operands read one after another (a mixed batch's adapters), whose misses would otherwise each
/// wait on memory in turn.
pub fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16) {
        // SAFETY: a prefetch is a hint: it never faults, reads nothing into registers and writes nothing;
        // the address is that of a live slice element.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// The widest instructions the kernels of lora-rs use (ours; the `gemm` crate dispatches on its own), in
/// the order a `LORA_KERNELS` cap compares them (a cap of `avx2` or `avx512` leaves an ARM CPU at `Neon`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    /// No SIMD kernels of ours: products go to the `gemm` crate, other loops are compiled for the build's
    /// baseline (SSE2 on x86-64, NEON on aarch64). The path of x86-64 CPUs without AVX2 and FMA.
    Portable,
    /// AArch64 Advanced SIMD: the kernels' 4-lane path.
    Neon,
    /// AVX2 and FMA (x86-64-v3): the kernels' 8-lane path.
    Avx2,
    /// AVX-512 F, BW, CD, DQ and VL with AVX2 and FMA (x86-64-v4): the kernels' 16-lane path.
    Avx512,
}

/// What this CPU offers, capped by the `LORA_KERNELS` environment variable (`portable`, `avx2`, `avx512` or
/// `auto`, the default), read once: so that the paths other CPUs take run, and are tested and measured, on
/// this one. A cap can only lower the level, never claim what the CPU lacks; an unknown value is ignored
/// (with a warning).
pub fn simd() -> Simd {
    static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = detect_simd();
        let cap = match std::env::var("LORA_KERNELS").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Simd::Avx512,
            Ok("portable") => Simd::Portable,
            Ok("avx2") => Simd::Avx2,
            Ok("avx512") => Simd::Avx512,
            Ok(other) => {
                tracing::warn!(value = other, "LORA_KERNELS: expected portable, avx2, avx512 or auto; using auto");
                Simd::Avx512
            }
        };
        let level = detected.min(cap);
        tracing::debug!(?detected, ?level, "kernel instruction set");
        level
    })
}

/// The widest level this CPU has, as `pulp` detects the features of each (so that [`sgemm`]'s tokens
/// exist at every level this returns).
fn detect_simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if pulp::x86::V4::try_new().is_some() {
            Simd::Avx512
        } else if pulp::x86::V3::try_new().is_some() {
            Simd::Avx2
        } else {
            Simd::Portable
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if pulp::aarch64::Neon::try_new().is_some() {
            Simd::Neon
        } else {
            Simd::Portable
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Simd::Portable
    }
}

/// The number of threads the kernels use: candle's (`RAYON_NUM_THREADS`, else the machine's cores).
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// `dst (m×n, row-major) = [dst +] beta·lhs·rhs` with lhs (m×k) and rhs (k×n) read through their strides.
/// With `accumulate == false` and `beta == 1` this is exactly the call candle's CPU matmul makes.
pub fn matmul_into(dst: &mut [f32], lhs: MatRef<'_>, rhs: MatRef<'_>, beta: f32, accumulate: bool) -> CResult<()> {
    matmul_with(Kernel::Auto, dst, lhs, rhs, beta, accumulate)
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

fn matmul_with(kernel: Kernel, dst: &mut [f32], lhs: MatRef<'_>, rhs: MatRef<'_>, beta: f32, accumulate: bool) -> CResult<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k || dst.len() != m * n {
        candle_core::bail!("matmul_into: ({m}x{k})·({}x{n}) into {} values", rhs.rows, dst.len())
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
    if let (Kernel::Auto, Some(isa), Some(plan)) = (kernel, sgemm::Isa::current(), sgemm::plan(&lhs, &rhs)) {
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

/// One adapter's tensors as a kernel reads them.
#[derive(Debug, Clone, Copy)]
pub struct AdapterRef<'a> {
    /// A, (r, in).
    pub a: MatRef<'a>,
    /// B, (out, r).
    pub b: MatRef<'a>,
    /// The factor s on `(x·Aᵀ)·Bᵀ`.
    pub scale: f32,
}

/// A linear layer's tensors as a kernel reads them.
#[derive(Debug, Clone, Copy)]
pub struct LinearRef<'a> {
    /// W, (out, in).
    pub weight: MatRef<'a>,
    /// b, (out), contiguous.
    pub bias: Option<&'a [f32]>,
    /// The active adapter, if any.
    pub adapter: Option<AdapterRef<'a>>,
}

impl LinearRef<'_> {
    fn check(&self, x: &MatRef<'_>) -> CResult<(usize, usize, usize)> {
        let (n, inp, out) = (x.rows, x.cols, self.weight.rows);
        if self.weight.cols != inp || self.bias.is_some_and(|b| b.len() != out) {
            candle_core::bail!("fused linear: input ({n}, {inp}) does not fit weight ({out}, {})", self.weight.cols)
        }
        if let Some(ad) = &self.adapter {
            if ad.a.cols != inp || ad.b.rows != out || ad.b.cols != ad.a.rows {
                candle_core::bail!("fused linear: adapter A ({}, {}) / B ({}, {}) do not fit", ad.a.rows, ad.a.cols, ad.b.rows, ad.b.cols)
            }
        }
        Ok((n, inp, out))
    }
}

/// `y = act(x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ)`, y (n, out) row-major, fully overwritten.
pub fn linear_forward(x: MatRef<'_>, p: &LinearRef<'_>, act: Activation, y: &mut [f32]) -> CResult<()> {
    let (n, _, out) = p.check(&x)?;
    matmul_into(y, x, p.weight.t(), 1.0, false)?;
    if let Some(b) = p.bias {
        for row in y.chunks_exact_mut(out) {
            for (v, bv) in row.iter_mut().zip(b) {
                *v += *bv;
            }
        }
    }
    if let Some(ad) = &p.adapter {
        let r = ad.a.rows;
        let mut xa = vec![0f32; n * r];
        matmul_into(&mut xa, x, ad.a.t(), 1.0, false)?; // (n, r)
        let mut d = vec![0f32; n * out];
        matmul_into(&mut d, MatRef::row_major(&xa, n, r)?, ad.b.t(), 1.0, false)?; // (n, out)
        for (v, dv) in y.iter_mut().zip(&d) {
            *v += *dv * ad.scale; // the reference's `y + (d * s)`, same rounding
        }
    }
    if act == Activation::Relu {
        for v in y.iter_mut() {
            *v = v.max(0.0);
        }
    }
    Ok(())
}

/// Where [`linear_backward`] writes; `None` skips that gradient entirely. Each buffer is overwritten,
/// or added to when `accumulate` is set.
#[derive(Debug, Default)]
pub struct LinearGrads<'a> {
    /// ∂L/∂x, (n, in).
    pub dx: Option<&'a mut [f32]>,
    /// ∂L/∂W, (out, in).
    pub dw: Option<&'a mut [f32]>,
    /// ∂L/∂b, (out).
    pub db: Option<&'a mut [f32]>,
    /// ∂L/∂A, (r, in).
    pub da: Option<&'a mut [f32]>,
    /// ∂L/∂B, (out, r).
    pub dlora_b: Option<&'a mut [f32]>,
    /// Add to the buffers instead of overwriting them.
    pub accumulate: bool,
}

/// The gradient at the pre-activation, `g' = g ⊙ [y > 0]` for ReLU (`g` itself for the identity), as one
/// contiguous (n, out) buffer: borrowed when `g` already is one and nothing is masked.
pub fn output_grad<'g>(act: Activation, y: Option<&[f32]>, g: MatRef<'g>) -> CResult<std::borrow::Cow<'g, [f32]>> {
    let (n, out) = (g.rows, g.cols);
    if let (Activation::Identity, Some(s)) = (act, g.contiguous()) {
        return Ok(std::borrow::Cow::Borrowed(s));
    }
    let mask = match act {
        Activation::Relu => match y {
            Some(y) if y.len() == n * out => Some(y),
            _ => candle_core::bail!("fused linear backward: ReLU needs the forward output ({n}x{out} values)"),
        },
        Activation::Identity => None,
    };
    let mut v = vec![0f32; n * out];
    match (g.contiguous(), mask) {
        // The common case, as straight slices the compiler vectorises: g' = g where y > 0, else 0.
        (Some(gs), Some(m)) => {
            for ((d, &gv), &yv) in v.iter_mut().zip(gs).zip(m) {
                *d = if yv > 0.0 { gv } else { 0.0 };
            }
        }
        _ => {
            for (i, row) in v.chunks_exact_mut(out).enumerate() {
                for (j, d) in row.iter_mut().enumerate() {
                    let keep = mask.is_none_or(|m| m[i * out + j] > 0.0);
                    *d = if keep { g.get(i, j) } else { 0.0 };
                }
            }
        }
    }
    Ok(std::borrow::Cow::Owned(v))
}

/// The gradients of [`linear_forward`] given `g = ∂L/∂y` (n, out); `y` (the forward's output) is needed
/// for the ReLU mask.
pub fn linear_backward(
    x: MatRef<'_>,
    p: &LinearRef<'_>,
    act: Activation,
    y: Option<&[f32]>,
    g: MatRef<'_>,
    grads: LinearGrads<'_>,
) -> CResult<()> {
    let (n, inp, out) = p.check(&x)?;
    if g.rows != n || g.cols != out {
        candle_core::bail!("fused linear backward: gradient ({}, {}), expected ({n}, {out})", g.rows, g.cols)
    }
    let gc = output_grad(act, y, g)?;
    let gc: &[f32] = &gc;
    let gm = MatRef::row_major(gc, n, out)?;
    let LinearGrads { dx, dw, db, da, dlora_b, accumulate: acc } = grads;
    if let Some(db) = &db {
        if db.len() != out {
            candle_core::bail!("fused linear backward: bias gradient buffer has {} values, expected {out}", db.len())
        }
    }
    if let Some(dx) = &dx {
        if dx.len() != n * inp {
            candle_core::bail!("fused linear backward: input gradient buffer has {} values, expected {}", dx.len(), n * inp)
        }
    }
    // The adapter's small products first: g·B feeds both dA and dx.
    let mut gb = Vec::new();
    if let Some(ad) = &p.adapter {
        let r = ad.a.rows;
        if da.is_some() || dx.is_some() {
            gb = vec![0f32; n * r];
            matmul_into(&mut gb, gm, ad.b, 1.0, false)?; // (n, out)·(out, r)
        }
        if let Some(da) = da {
            matmul_into(da, MatRef::row_major(&gb, n, r)?.t(), x, ad.scale, acc)?;
            // s·(r, n)·(n, in)
        }
        if let Some(dlb) = dlora_b {
            let mut xa = vec![0f32; n * r];
            matmul_into(&mut xa, x, ad.a.t(), 1.0, false)?; // (n, r)
            matmul_into(dlb, gm.t(), MatRef::row_major(&xa, n, r)?, ad.scale, acc)?;
            // s·(out, n)·(n, r)
        }
    }
    let weight_grads = || -> CResult<()> {
        if let Some(dw) = dw {
            matmul_into(dw, gm.t(), x, 1.0, acc)?; // (out, n)·(n, in)
        }
        if let Some(db) = db {
            if !acc {
                db.fill(0.0);
            }
            for row in gc.chunks_exact(out) {
                for (d, v) in db.iter_mut().zip(row) {
                    *d += *v;
                }
            }
        }
        Ok(())
    };
    let input_grad = || -> CResult<()> {
        if let Some(dx) = dx {
            matmul_into(dx, gm, p.weight, 1.0, acc)?; // (n, out)·(out, in)
            if let Some(ad) = &p.adapter {
                matmul_into(dx, MatRef::row_major(&gb, n, ad.a.rows)?, ad.a, ad.scale, true)?;
                // + s·(n, r)·(r, in)
            }
        }
        Ok(())
    };
    // dW and dx could run side by side, one per core, unsplit: measured no faster here than splitting
    // each across the cores in turn (the two compete for memory bandwidth), so they run in turn.
    weight_grads()?;
    input_grad()
}

/// A read lock on a tensor's storage, to view it as a matrix or vector.
pub struct Held<'a> {
    storage: StorageRef<'a>,
    layout: &'a Layout,
}

impl<'a> Held<'a> {
    /// Locks `t`'s storage for reading.
    pub fn new(t: &'a Tensor) -> Self {
        let (storage, layout) = t.storage_and_layout();
        Held { storage, layout }
    }
    fn data(&self) -> CResult<&[f32]> {
        match &*self.storage {
            Storage::Cpu(c) => Ok(&c.as_slice::<f32>()?[self.layout.start_offset()..]),
            _ => candle_core::bail!("fused LoRA kernels run on the CPU only"),
        }
    }
    /// A 2-D tensor as a strided matrix.
    pub fn mat(&self) -> CResult<MatRef<'_>> {
        layout_mat(self.data()?, self.layout)
    }
    /// A contiguous tensor as a slice.
    pub fn slice(&self) -> CResult<&[f32]> {
        if !self.layout.is_contiguous() {
            candle_core::bail!("fused LoRA kernels need a contiguous vector")
        }
        Ok(&self.data()?[..self.layout.shape().elem_count()])
    }
}

fn layout_mat<'a>(data: &'a [f32], l: &Layout) -> CResult<MatRef<'a>> {
    match (l.dims(), l.stride()) {
        ([r, c], [rs, cs]) => MatRef::new(data, *r, *c, *rs, *cs),
        (d, _) => candle_core::bail!("fused LoRA kernels need 2-D tensors, got shape {d:?}"),
    }
}

fn cpu_mat<'a>(s: &'a CpuStorage, l: &Layout) -> CResult<MatRef<'a>> {
    layout_mat(&s.as_slice::<f32>()?[l.start_offset()..], l)
}

fn out_tensor(v: Vec<f32>, shape: (usize, usize)) -> CResult<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

/// The op of a layer whose base is frozen: W0 and bias are constants held by the op; the arguments are
/// x alone (no adapter, [`CustomOp1`]) or (x, A, B) ([`CustomOp3`]).
struct FrozenBaseOp {
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f32,
    act: Activation,
}

impl FrozenBaseOp {
    fn run<R>(&self, a: Option<MatRef<'_>>, b: Option<MatRef<'_>>, f: impl FnOnce(&LinearRef<'_>) -> CResult<R>) -> CResult<R> {
        let w = Held::new(&self.weight);
        let bias = self.bias.as_ref().map(Held::new);
        let adapter = match (a, b) {
            (Some(a), Some(b)) => Some(AdapterRef { a, b, scale: self.scale }),
            _ => None,
        };
        let p = LinearRef { weight: w.mat()?, bias: bias.as_ref().map(|h| h.slice()).transpose()?, adapter };
        f(&p)
    }

    fn forward(&self, x: MatRef<'_>, a: Option<MatRef<'_>>, b: Option<MatRef<'_>>) -> CResult<(CpuStorage, Shape)> {
        self.run(a, b, |p| {
            let mut y = vec![0f32; x.rows * p.weight.rows];
            linear_forward(x, p, self.act, &mut y)?;
            Ok((CpuStorage::F32(y), Shape::from((x.rows, p.weight.rows))))
        })
    }

    /// Returns (dx, dA, dB), each only when its tensor is tracked.
    fn backward(&self, x: &Tensor, ab: Option<(&Tensor, &Tensor)>, res: &Tensor, grad: &Tensor) -> CResult<[Option<Tensor>; 3]> {
        let (hx, hy, hg) = (Held::new(x), Held::new(res), Held::new(grad));
        let (ha, hb) = match ab {
            Some((a, b)) => (Some(Held::new(a)), Some(Held::new(b))),
            None => (None, None),
        };
        let xm = hx.mat()?;
        let mats = (ha.as_ref().map(|h| h.mat()).transpose()?, hb.as_ref().map(|h| h.mat()).transpose()?);
        self.run(mats.0, mats.1, |p| {
            let (n, inp, out) = (xm.rows, xm.cols, p.weight.rows);
            let r = p.adapter.map_or(0, |ad| ad.a.rows);
            let want_a = ab.is_some_and(|(a, _)| a.track_op());
            let want_b = ab.is_some_and(|(_, b)| b.track_op());
            let mut dx = x.track_op().then(|| vec![0f32; n * inp]);
            let mut da = want_a.then(|| vec![0f32; r * inp]);
            let mut dlb = want_b.then(|| vec![0f32; out * r]);
            let grads = LinearGrads { dx: dx.as_deref_mut(), da: da.as_deref_mut(), dlora_b: dlb.as_deref_mut(), ..LinearGrads::default() };
            let y = if self.act == Activation::Relu { Some(hy.slice()?) } else { None };
            linear_backward(xm, p, self.act, y, hg.mat()?, grads)?;
            Ok([
                dx.map(|v| out_tensor(v, (n, inp))).transpose()?,
                da.map(|v| out_tensor(v, (r, inp))).transpose()?,
                dlb.map(|v| out_tensor(v, (out, r))).transpose()?,
            ])
        })
    }
}

impl CustomOp1 for FrozenBaseOp {
    fn name(&self) -> &'static str {
        "lora-fused-frozen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        self.forward(cpu_mat(s, l)?, None, None)
    }
    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let [dx, _, _] = self.backward(x, None, res, &grad.contiguous()?)?;
        Ok(dx)
    }
}

impl CustomOp3 for FrozenBaseOp {
    fn name(&self) -> &'static str {
        "lora-fused-linear"
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
        self.forward(cpu_mat(s1, l1)?, Some(cpu_mat(s2, l2)?), Some(cpu_mat(s3, l3)?))
    }
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, da, db] = self.backward(x, Some((a, b)), res, &grad.contiguous()?)?;
        Ok((dx, da, db))
    }
}

/// The op of a layer whose base trains and which has no active adapter: arguments (x, W, b) or (x, W).
struct TrainableBaseOp {
    act: Activation,
}

impl TrainableBaseOp {
    fn forward(&self, x: MatRef<'_>, w: MatRef<'_>, bias: Option<&[f32]>) -> CResult<(CpuStorage, Shape)> {
        let p = LinearRef { weight: w, bias, adapter: None };
        let mut y = vec![0f32; x.rows * w.rows];
        linear_forward(x, &p, self.act, &mut y)?;
        Ok((CpuStorage::F32(y), Shape::from((x.rows, w.rows))))
    }

    fn backward(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, res: &Tensor, grad: &Tensor) -> CResult<[Option<Tensor>; 3]> {
        let (hx, hw, hy, hg) = (Held::new(x), Held::new(w), Held::new(res), Held::new(grad));
        let hb = bias.map(Held::new);
        let p = LinearRef { weight: hw.mat()?, bias: hb.as_ref().map(|h| h.slice()).transpose()?, adapter: None };
        let xm = hx.mat()?;
        let (n, inp, out) = (xm.rows, xm.cols, p.weight.rows);
        let mut dx = x.track_op().then(|| vec![0f32; n * inp]);
        let mut dw = w.track_op().then(|| vec![0f32; out * inp]);
        let mut db = bias.filter(|b| b.track_op()).map(|_| vec![0f32; out]);
        let grads = LinearGrads { dx: dx.as_deref_mut(), dw: dw.as_deref_mut(), db: db.as_deref_mut(), ..LinearGrads::default() };
        let y = if self.act == Activation::Relu { Some(hy.slice()?) } else { None };
        linear_backward(xm, &p, self.act, y, hg.mat()?, grads)?;
        Ok([
            dx.map(|v| out_tensor(v, (n, inp))).transpose()?,
            dw.map(|v| out_tensor(v, (out, inp))).transpose()?,
            db.map(|v| Tensor::from_vec(v, out, &candle_core::Device::Cpu)).transpose()?,
        ])
    }
}

impl CustomOp2 for TrainableBaseOp {
    fn name(&self) -> &'static str {
        "lora-fused-base-linear"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        self.forward(cpu_mat(s1, l1)?, cpu_mat(s2, l2)?, None)
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, _] = self.backward(x, w, None, res, &grad.contiguous()?)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for TrainableBaseOp {
    fn name(&self) -> &'static str {
        "lora-fused-base-linear-bias"
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
        let b = &s3.as_slice::<f32>()?[l3.start_offset()..];
        if !l3.is_contiguous() || l3.dims().len() != 1 {
            candle_core::bail!("fused linear: the bias must be a contiguous vector")
        }
        self.forward(cpu_mat(s1, l1)?, cpu_mat(s2, l2)?, Some(&b[..l3.dims()[0]]))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, db] = self.backward(x, w, Some(b), res, &grad.contiguous()?)?;
        Ok((dx, dw, db))
    }
}

/// The fused forward of `layer` on x (n, in) when its backend and state allow one; `None` otherwise
/// (the caller then takes the reference path).
pub(crate) fn try_forward(layer: &LoraLinear, x: &Tensor, train: bool, act: Activation) -> Result<Option<Tensor>> {
    if layer.backend() != Backend::Fused || !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() != 2 {
        return Ok(None);
    }
    if layer.weight().dtype() != DType::F32 {
        return Ok(None);
    }
    if layer.active_override().is_some() || layer.is_embedding() {
        return Ok(None);
    }
    let mut adapters = Vec::new();
    if !layer.is_disabled() {
        for name in layer.active().iter().filter(|n| !layer.merged().contains(n)) {
            adapters.push(layer.adapter(name)?);
        }
    }
    if adapters.len() > 1 || adapters.iter().any(|ad| (train && ad.dropout() > 0.0) || ad.lora_bias().is_some() || ad.initial().is_some()) {
        return Ok(None);
    }
    let (w_train, b_train) = layer.base_trainable();
    let b_train = b_train && layer.bias().is_some();
    if let (false, false, Some(ad)) = (w_train, b_train, adapters.first().filter(|ad| ad.magnitude().is_some())) {
        // DoRA: z = x·W0ᵀ + s·(x·Aᵀ)·Bᵀ in the fused op (no bias), then y = act(f ⊙ z + b) in candle's graph,
        // so the magnitude's gradient Σ_rows g⊙z/‖·‖ comes from candle's product rule.
        let f = ad.dora_factor(layer.weight().as_tensor())?.ok_or_else(|| crate::LoraError::State("no magnitude".into()))?;
        let op =
            FrozenBaseOp { weight: layer.weight().as_detached_tensor(), bias: None, scale: ad.scale() as f32, act: Activation::Identity };
        let z = x.apply_op3(ad.a().as_tensor(), ad.b().as_tensor(), op)?;
        let mut y = z.broadcast_mul(&f)?;
        if let Some(b) = layer.bias() {
            y = y.broadcast_add(&b.as_detached_tensor())?;
        }
        return Ok(Some(if act == Activation::Relu { y.relu()? } else { y }));
    }
    if !w_train && !b_train {
        let op = FrozenBaseOp {
            weight: layer.weight().as_detached_tensor(),
            bias: layer.bias().map(|b| b.as_detached_tensor()),
            scale: adapters.first().map_or(0.0, |ad| ad.scale() as f32),
            act,
        };
        let y = match adapters.first() {
            Some(ad) => x.apply_op3(ad.a().as_tensor(), ad.b().as_tensor(), op)?,
            None if x.track_op() => x.apply_op1(op)?,
            None => x.apply_op1_no_bwd(&op)?,
        };
        return Ok(Some(y));
    }
    if w_train && adapters.is_empty() && (b_train || layer.bias().is_none()) {
        let op = TrainableBaseOp { act };
        let y = match layer.bias() {
            Some(b) => x.apply_op3(layer.weight().as_tensor(), b.as_tensor(), op)?,
            None => x.apply_op2(layer.weight().as_tensor(), op)?,
        };
        return Ok(Some(y));
    }
    Ok(None)
}

impl LoraLinear {
    /// `act(forward_t(x, train))` for x (…, in) → (…, out), as one fused op when the backend and the
    /// layer's state allow it, else through the reference path.
    pub fn forward_act_t(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() >= 2 && dims.last() == Some(&self.in_features()) {
            let x2 = if dims.len() == 2 { x.clone() } else { x.reshape(((), self.in_features()))? };
            if let Some(y) = try_forward(self, &x2, train, act)? {
                let mut out_dims = dims.to_vec();
                *out_dims.last_mut().unwrap_or(&mut 0) = self.out_features();
                return Ok(if dims.len() == 2 { y } else { y.reshape(out_dims)? });
            }
        }
        let y = self.forward_reference_t(x, train)?;
        Ok(match act {
            Activation::Identity => y,
            Activation::Relu => y.relu()?,
        })
    }
}

/// Helpers for the crate's unit tests: deterministic random values and tensors.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Device, Tensor};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Deterministic values in [-1, 1), never exactly zero in practice.
    pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut g = StdRng::seed_from_u64(seed);
        (0..n).map(|_| g.random::<f32>() * 2.0 - 1.0).collect()
    }

    /// A (rows, cols) tensor of `v`.
    pub fn t2(v: Vec<f32>, shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Every value of `t`, flat.
    pub fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::{flat, rand_vec, t2};
    use super::*;
    use crate::linear::Adapter;
    use candle_core::{Device, Var};

    /// A layer (out, in) with bias and one active adapter of rank r, alpha ≠ r, and a non-zero B.
    fn layer(inp: usize, out: usize, r: usize, alpha: f64, frozen: bool, backend: Backend) -> LoraLinear {
        let mut l =
            LoraLinear::new(t2(rand_vec(out * inp, 1), (out, inp)), Some(Tensor::from_vec(rand_vec(out, 2), out, &Device::Cpu).unwrap()))
                .unwrap();
        if frozen {
            let ad = Adapter::from_tensors(
                &t2(rand_vec(r * inp, 3), (r, inp)),
                &t2(rand_vec(out * r, 4), (out, r)),
                alpha,
                alpha / r as f64,
                0.0,
            )
            .unwrap();
            l.insert_adapter("a", ad).unwrap();
            l.set_active(&["a"]).unwrap();
            l.freeze_base();
        }
        l.set_backend(backend);
        l
    }

    /// |got − want| ≤ tol·(1 + max|want|) element-wise.
    fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = 1.0 + want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * scale, "{what}[{i}]: fused {g} vs reference {w}");
        }
    }

    /// Loss Σ c ⊙ act(y)²/2 (non-linear, so every gradient is a non-trivial function of the inputs).
    fn loss(y: &Tensor, c: &Tensor) -> Tensor {
        ((y.sqr().unwrap() * c).unwrap().sum_all().unwrap() / 2.0).unwrap()
    }

    #[test]
    fn fused_forward_matches_the_reference_forward() {
        let (n, inp, out, r, alpha) = (9, 37, 23, 3, 5.0);
        let x = t2(rand_vec(n * inp, 10), (n, inp));
        for frozen in [true, false] {
            let f = layer(inp, out, r, alpha, frozen, Backend::Fused);
            let rf = layer(inp, out, r, alpha, frozen, Backend::Reference);
            // Our kernels sum x·Wᵀ in another order than candle's gemm: f32 rounding of sums of 37 terms of
            // size ≲ 1, ≈ 37·6e-8; 1e-5 of the largest value is a safe bound that any wrong term breaks.
            assert_close(&flat(&f.forward(&x).unwrap()), &flat(&rf.forward(&x).unwrap()), 1e-5, &format!("identity, frozen = {frozen}"));
            let yf = f.forward_act_t(&x, false, Activation::Relu).unwrap();
            let yr = rf.forward_act_t(&x, false, Activation::Relu).unwrap();
            assert_close(&flat(&yf), &flat(&yr), 1e-5, &format!("relu, frozen = {frozen}"));
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
    fn fused_lora_backward_matches_candle_autograd() {
        let (n, inp, out, r, alpha) = (7, 33, 19, 2, 3.0);
        let xv = Var::from_tensor(&t2(rand_vec(n * inp, 20), (n, inp))).unwrap(); // tracked: dx is wanted
        let c = t2(rand_vec(n * out, 21), (n, out));
        let mut results = Vec::new();
        for backend in [Backend::Fused, Backend::Reference] {
            let l = layer(inp, out, r, alpha, true, backend);
            for act in [Activation::Identity, Activation::Relu] {
                let g = loss(&l.forward_act_t(xv.as_tensor(), true, act).unwrap(), &c).backward().unwrap();
                assert!(
                    g.get(l.weight().as_tensor()).is_none() && g.get(l.bias().unwrap().as_tensor()).is_none(),
                    "frozen base got a gradient"
                );
                let ad = l.adapter("a").unwrap();
                let grad = |t: &Tensor| flat(g.get(t).expect("missing gradient"));
                results.push((backend, act, grad(xv.as_tensor()), grad(ad.a().as_tensor()), grad(ad.b().as_tensor())));
            }
        }
        let (fused, reference) = results.split_at(2);
        for (f, r) in fused.iter().zip(reference) {
            // Same sums in a different order (gemm blocking, s applied before or after a sum): f32 rounding of
            // sums of ≤ 33 terms of size ≲ 10, ≈ 33·6e-8 relative; 1e-5 of the largest value is a safe bound.
            assert_close(&f.2, &r.2, 1e-5, &format!("dx {:?}", f.1));
            assert_close(&f.3, &r.3, 1e-5, &format!("dA {:?}", f.1));
            assert_close(&f.4, &r.4, 1e-5, &format!("dB {:?}", f.1));
        }
    }

    #[test]
    fn fused_dora_matches_the_reference_in_outputs_and_every_gradient() {
        let (n, inp, out, r, alpha) = (6, 29, 17, 3, 4.0);
        let xv = Var::from_tensor(&t2(rand_vec(n * inp, 30), (n, inp))).unwrap();
        let c = t2(rand_vec(n * out, 31), (n, out));
        let mut results = Vec::new();
        for backend in [Backend::Fused, Backend::Reference] {
            let mut l = layer(inp, out, r, alpha, true, backend);
            let ad = l.remove_adapter("a").unwrap().unwrap();
            // A magnitude away from the row norms, so f ≠ 1 and every term of the DoRA output counts.
            let m = Tensor::from_vec(rand_vec(out, 32).iter().map(|v| 3.0 + v).collect::<Vec<_>>(), out, &Device::Cpu).unwrap();
            let ad =
                Adapter::from_tensors(ad.a().as_tensor(), ad.b().as_tensor(), alpha, ad.scale(), 0.0).unwrap().with_magnitude(&m).unwrap();
            l.insert_adapter("a", ad).unwrap();
            l.set_active(&["a"]).unwrap();
            for act in [Activation::Identity, Activation::Relu] {
                let y = l.forward_act_t(xv.as_tensor(), true, act).unwrap();
                let g = loss(&y, &c).backward().unwrap();
                let ad = l.adapter("a").unwrap();
                let grad = |t: &Tensor| flat(g.get(t).expect("missing gradient"));
                let mag = grad(ad.magnitude().unwrap().as_tensor());
                results.push((act, flat(&y), grad(xv.as_tensor()), grad(ad.a().as_tensor()), grad(ad.b().as_tensor()), mag));
            }
        }
        let (fused, reference) = results.split_at(2);
        for (f, r) in fused.iter().zip(reference) {
            // As the plain LoRA test: sums of ≤ 29 terms in other orders, then one product with f.
            assert_close(&f.1, &r.1, 1e-5, &format!("y {:?}", f.0));
            assert_close(&f.2, &r.2, 1e-5, &format!("dx {:?}", f.0));
            assert_close(&f.3, &r.3, 1e-5, &format!("dA {:?}", f.0));
            assert_close(&f.4, &r.4, 1e-5, &format!("dB {:?}", f.0));
            assert_close(&f.5, &r.5, 1e-5, &format!("dm {:?}", f.0));
        }
    }

    #[test]
    fn fused_trainable_base_gradients_match_candle_autograd() {
        let (n, inp, out) = (6, 29, 17);
        let xv = Var::from_tensor(&t2(rand_vec(n * inp, 30), (n, inp))).unwrap();
        let c = t2(rand_vec(n * out, 31), (n, out));
        let mut results = Vec::new();
        for backend in [Backend::Fused, Backend::Reference] {
            let l = layer(inp, out, 1, 1.0, false, backend);
            let g = loss(&l.forward_act_t(xv.as_tensor(), true, Activation::Relu).unwrap(), &c).backward().unwrap();
            let grad = |t: &Tensor| flat(g.get(t).expect("missing gradient"));
            results.push([grad(xv.as_tensor()), grad(l.weight().as_tensor()), grad(l.bias().unwrap().as_tensor())]);
        }
        // As above: reordered f32 sums of ≤ 29 terms; 1e-5 relative to the largest value.
        for (i, what) in ["dx", "dW", "db"].iter().enumerate() {
            assert_close(&results[0][i], &results[1][i], 1e-5, what);
        }
    }

    #[test]
    fn the_first_layers_input_gets_no_gradient_and_a_frozen_base_none() {
        let l = layer(11, 5, 2, 4.0, true, Backend::Fused);
        let x = t2(rand_vec(3 * 11, 40), (3, 11)); // a plain tensor: nothing upstream to train
        let y = l.forward(&x).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        assert!(g.get(l.weight().as_tensor()).is_none());
        assert!(g.get(l.adapter("a").unwrap().a().as_tensor()).is_some());
    }

    #[test]
    fn layers_the_fused_op_cannot_serve_fall_back_to_the_reference_path() {
        // Two active adapters: no fused op; the output still equals the reference's.
        let (inp, out) = (8, 6);
        let mk = |backend| {
            let mut l = layer(inp, out, 2, 2.0, true, backend);
            let ad = Adapter::from_tensors(&t2(rand_vec(inp, 50), (1, inp)), &t2(rand_vec(out, 51), (out, 1)), 1.0, 1.0, 0.0).unwrap();
            l.insert_adapter("b", ad).unwrap();
            l.set_active(&["a", "b"]).unwrap();
            l
        };
        let x = t2(rand_vec(4 * inp, 52), (4, inp));
        assert_eq!(flat(&mk(Backend::Fused).forward(&x).unwrap()), flat(&mk(Backend::Reference).forward(&x).unwrap()));
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
}
