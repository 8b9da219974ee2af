//! bf16 matrix products in cuBLASLt, f32 accumulation, f32 or bf16 output, in row-major terms.
//!
//! The convention (every matrix row-major, as the rest of lora-rs): C (m × n) = α·op(A)·op(B) + β·C with
//! op(A) (m × k) and op(B) (k × n); `a_trans` means A is stored (k × m), `b_trans` that B is stored
//! (n × k) — a linear layer's Y = X·Wᵀ with W (out, in) is m = rows, n = out, k = in, `b_trans`.
//!
//! cuBLASLt is column-major, and a row-major (r × c) matrix is a column-major (c × r) one, so the product
//! is computed as Cᵀ = op(B)ᵀ·op(A)ᵀ: cuBLASLt's "A" is our B and its "B" our A, M = n, N = m, K = k, each
//! transposed exactly when ours is, leading dimensions the stored row lengths. [`plan_gemm`] is that
//! mapping as data (tested on the CPU against a row-major reference through a column-major executor);
//! [`LtGemm`] runs it.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::backend::{Backend, DeviceVec, Elem};
use crate::error::CudaError;
use crate::gpu::Gpu;

/// A row-major product (see the module's comment); `batch` products at dense strides (m·k, k·n, m·n).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GemmShape {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// A stored (k × m).
    pub a_trans: bool,
    /// B stored (n × k).
    pub b_trans: bool,
    /// Products (≥ 1).
    pub batch: usize,
}

impl GemmShape {
    /// Y (rows × out) = X (rows × in) · Wᵀ, W (out × in): a linear layer.
    pub fn linear(rows: usize, out: usize, inp: usize) -> GemmShape {
        GemmShape { m: rows, n: out, k: inp, a_trans: false, b_trans: true, batch: 1 }
    }

    /// Floating-point operations (2·m·n·k per product).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64 * self.batch as f64
    }

    fn lens(&self) -> Option<(usize, usize, usize)> {
        let b = self.batch;
        Some((
            self.m.checked_mul(self.k)?.checked_mul(b)?,
            self.k.checked_mul(self.n)?.checked_mul(b)?,
            self.m.checked_mul(self.n)?.checked_mul(b)?,
        ))
    }
}

/// The column-major cuBLASLt call of a [`GemmShape`]: D (m × n) = op(A)·op(B) with A our B's storage and
/// B our A's (each `rows × cols` as stored, column-major, leading dimension `ld`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LtCall {
    /// cuBLASLt's M (our n).
    pub m: u64,
    /// cuBLASLt's N (our m).
    pub n: u64,
    /// K.
    pub k: u64,
    /// op(A) = Aᵀ.
    pub transa: bool,
    /// op(B) = Bᵀ.
    pub transb: bool,
    /// A as stored: rows, columns, leading dimension.
    pub a: (u64, u64, i64),
    /// B as stored.
    pub b: (u64, u64, i64),
    /// C/D (m × n), ld.
    pub c: (u64, u64, i64),
    /// Batch strides of A, B, C (elements).
    pub strides: (i64, i64, i64),
    /// Products.
    pub batch: i32,
}

/// The cuBLASLt call computing `s` (see the module's comment).
pub fn plan_gemm(s: &GemmShape) -> Result<LtCall, CudaError> {
    let bad = |d: String| CudaError::shape("gemm", d);
    if s.m == 0 || s.n == 0 || s.k == 0 || s.batch == 0 {
        return Err(bad(format!("empty product {s:?}")));
    }
    s.lens().ok_or_else(|| bad(format!("{s:?} overflows")))?;
    let (m, n, k) = (s.n as u64, s.m as u64, s.k as u64);
    let a = if s.b_trans { (k, m, s.k as i64) } else { (m, k, s.n as i64) };
    let b = if s.a_trans { (n, k, s.m as i64) } else { (k, n, s.k as i64) };
    let batch = i32::try_from(s.batch).map_err(|_| bad(format!("{} products", s.batch)))?;
    Ok(LtCall {
        m,
        n,
        k,
        transa: s.b_trans,
        transb: s.a_trans,
        a,
        b,
        c: (m, n, s.n as i64),
        strides: ((s.k * s.n) as i64, (s.m * s.k) as i64, (s.m * s.n) as i64),
        batch,
    })
}

/// The output type of a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum OutType {
    /// f32.
    F32,
    /// bf16.
    Bf16,
}

/// A cuBLASLt handle and its workspace on a [`Gpu`]'s stream.
pub struct LtGemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
}

/// cuBLASLt's recommended workspace on Hopper.
const WORKSPACE: usize = 32 << 20;

impl LtGemm {
    /// A handle for `gpu`.
    pub fn new(gpu: &Gpu) -> Result<LtGemm, CudaError> {
        let handle = lt::create_handle().map_err(|e| CudaError::cublas("cublasLtCreate", e))?;
        let workspace = gpu.alloc_zeroed(WORKSPACE)?;
        Ok(LtGemm { handle, workspace, stream: gpu.stream().clone() })
    }

    /// C (f32) = α·op(A)·op(B) + β·C, A and B bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_f32(
        &self,
        gpu: &Gpu,
        s: &GemmShape,
        a: &DeviceVec<Gpu, u16>,
        b: &DeviceVec<Gpu, u16>,
        c: &mut DeviceVec<Gpu, f32>,
        alpha: f32,
        beta: f32,
    ) -> Result<(), CudaError> {
        self.matmul(gpu, s, a, b, c, OutType::F32, alpha, beta)
    }

    /// C (bf16) = α·op(A)·op(B) + β·C, A and B bf16, accumulated in f32 and rounded once.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_bf16(
        &self,
        gpu: &Gpu,
        s: &GemmShape,
        a: &DeviceVec<Gpu, u16>,
        b: &DeviceVec<Gpu, u16>,
        c: &mut DeviceVec<Gpu, u16>,
        alpha: f32,
        beta: f32,
    ) -> Result<(), CudaError> {
        self.matmul(gpu, s, a, b, c, OutType::Bf16, alpha, beta)
    }

    #[allow(clippy::too_many_arguments)]
    fn matmul<T: Elem>(
        &self,
        gpu: &Gpu,
        s: &GemmShape,
        a: &DeviceVec<Gpu, u16>,
        b: &DeviceVec<Gpu, u16>,
        c: &mut DeviceVec<Gpu, T>,
        out: OutType,
        alpha: f32,
        beta: f32,
    ) -> Result<(), CudaError> {
        let call = plan_gemm(s)?;
        let (la, lb, lc) = s.lens().ok_or_else(|| CudaError::shape("gemm", "overflow"))?;
        for (what, have, want) in [("A", a.len(), la), ("B", b.len(), lb), ("C", c.len(), lc)] {
            if have != want {
                return Err(CudaError::shape("gemm", format!("{what} holds {have} values, {s:?} needs {want}")));
            }
        }
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let ctype = if out == OutType::F32 { sys::cudaDataType_t::CUDA_R_32F } else { bf16 };
        // Our B's storage is cuBLASLt's A, ours A its B.
        let la_ = Layout::new(bf16, call.a, call.batch, call.strides.0)?;
        let lb_ = Layout::new(bf16, call.b, call.batch, call.strides.1)?;
        let lc_ = Layout::new(ctype, call.c, call.batch, call.strides.2)?;
        let desc = Desc::new(call.transa, call.transb)?;
        let pref = Pref::new(WORKSPACE)?;
        // SAFETY: the handle, descriptors and layouts are live (owned here); the heuristic only reads them.
        let heur = unsafe { lt::get_matmul_algo_heuristic(self.handle, desc.0, la_.0, lb_.0, lc_.0, lc_.0, pref.0) }
            .map_err(|e| CudaError::cublas("cublasLtMatmulAlgoGetHeuristic", e))?;
        let (pa, pb, pc) = (b.address(gpu), a.address(gpu), c.address(gpu));
        let (ws, _sync) = self.workspace.device_ptr(&self.stream);
        // SAFETY: A, B, C are this Gpu's buffers whose lengths match the layouts (checked above: each
        // layout covers exactly batch × rows × cols values at its strides), the workspace is WORKSPACE
        // bytes, α and β are f32 (the scale type) living across the call, and the call is on the stream
        // every other access to these buffers is ordered on.
        unsafe {
            lt::matmul(
                self.handle,
                desc.0,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                pa as *const c_void,
                la_.0,
                pb as *const c_void,
                lb_.0,
                pc as *const c_void,
                lc_.0,
                pc as *mut c_void,
                lc_.0,
                &heur.algo,
                ws as *mut c_void,
                WORKSPACE,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| CudaError::cublas("cublasLtMatmul", e))
    }
}

impl Drop for LtGemm {
    fn drop(&mut self) {
        // SAFETY: the handle was created by cublasLtCreate and is destroyed once; a failure cannot be reported.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

struct Layout(sys::cublasLtMatrixLayout_t);

impl Layout {
    fn new(t: sys::cudaDataType, (rows, cols, ld): (u64, u64, i64), batch: i32, stride: i64) -> Result<Layout, CudaError> {
        let l = Layout(lt::create_matrix_layout(t, rows, cols, ld).map_err(|e| CudaError::cublas("cublasLtMatrixLayoutCreate", e))?);
        if batch > 1 {
            // SAFETY: the layout is live; each attribute is written from a value of the type cuBLASLt reads (int32, int64).
            unsafe {
                lt::set_matrix_layout_attribute(
                    l.0,
                    sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                    &batch as *const i32 as *const c_void,
                    4,
                )
                .map_err(|e| CudaError::cublas("cublasLtMatrixLayoutSetAttribute (batch count)", e))?;
                lt::set_matrix_layout_attribute(
                    l.0,
                    sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    &stride as *const i64 as *const c_void,
                    8,
                )
                .map_err(|e| CudaError::cublas("cublasLtMatrixLayoutSetAttribute (batch stride)", e))?;
            }
        }
        Ok(l)
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatrixLayoutCreate, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

struct Desc(sys::cublasLtMatmulDesc_t);

impl Desc {
    fn new(transa: bool, transb: bool) -> Result<Desc, CudaError> {
        let d = Desc(
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(|e| CudaError::cublas("cublasLtMatmulDescCreate", e))?,
        );
        for (attr, t) in [
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, transa),
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, transb),
        ] {
            let op: i32 = t as i32; // CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
                                    // SAFETY: the descriptor is live; the transpose attributes are int32 (cublasOperation_t).
            unsafe { lt::set_matmul_desc_attribute(d.0, attr, &op as *const i32 as *const c_void, 4) }
                .map_err(|e| CudaError::cublas("cublasLtMatmulDescSetAttribute (transpose)", e))?;
        }
        Ok(d)
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulDescCreate, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

struct Pref(sys::cublasLtMatmulPreference_t);

impl Pref {
    fn new(workspace: usize) -> Result<Pref, CudaError> {
        let p = Pref(lt::create_matmul_pref().map_err(|e| CudaError::cublas("cublasLtMatmulPreferenceCreate", e))?);
        let bytes = workspace as u64;
        // SAFETY: the preference is live; the workspace limit is a uint64.
        unsafe {
            lt::set_matmul_pref_attribute(
                p.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &bytes as *const u64 as *const c_void,
                8,
            )
        }
        .map_err(|e| CudaError::cublas("cublasLtMatmulPreferenceSetAttribute (workspace)", e))?;
        Ok(p)
    }
}

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulPreferenceCreate, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// Runs an [`LtCall`] on the CPU as cuBLASLt would (column-major, f64): the executor the plan's tests use.
pub fn run_call_on_cpu(call: &LtCall, a: &[f64], b: &[f64]) -> Vec<f64> {
    let (m, n, k) = (call.m as usize, call.n as usize, call.k as usize);
    let mut d = vec![0.0; m * n * call.batch as usize];
    for bi in 0..call.batch as usize {
        let (oa, ob, oc) = (bi * call.strides.0 as usize, bi * call.strides.1 as usize, bi * call.strides.2 as usize);
        for j in 0..n {
            for i in 0..m {
                let mut s = 0.0;
                for p in 0..k {
                    let av = if call.transa { a[oa + p + i * call.a.2 as usize] } else { a[oa + i + p * call.a.2 as usize] };
                    let bv = if call.transb { b[ob + j + p * call.b.2 as usize] } else { b[ob + p + j * call.b.2 as usize] };
                    s += av * bv;
                }
                d[oc + i + j * call.c.2 as usize] = s;
            }
        }
    }
    d
}

/// cuBLASLt's products against [`crate::reference::gemm`] on small random shapes: every transpose, a
/// batch, f32 and bf16 outputs, and β = 1 (accumulation). Tolerance: f32 accumulation of k products is
/// within γ_k·Σ|a·b| ≈ k·u·Σ|a·b| (u = 2⁻²⁴), taken with a factor 2 over the largest Σ|a·b|; a bf16 output
/// adds half a bf16 ulp (2⁻⁸ relative).
pub fn check_gemm(gpu: &Gpu, lt: &LtGemm, seed: u64) -> Result<Vec<crate::check::Comparison>, CudaError> {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use crate::check::{compare, Tol};
    use crate::reference::{bf16_value, gemm, to_bf16};
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for &(m, n, k, batch) in &[(37, 45, 300, 1), (64, 128, 256, 3), (5, 1000, 77, 1)] {
        for (a_trans, b_trans) in [(false, true), (false, false), (true, false), (true, true)] {
            let s = GemmShape { m, n, k, a_trans, b_trans, batch };
            let a: Vec<u16> = (0..m * k * batch).map(|_| to_bf16(rng.random_range(-1.0..1.0))).collect();
            let b: Vec<u16> = (0..k * n * batch).map(|_| to_bf16(rng.random_range(-1.0..1.0))).collect();
            let c0: Vec<f32> = (0..m * n * batch).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (af, bf): (Vec<f64>, Vec<f64>) = (a.iter().map(|&v| bf16_value(v)).collect(), b.iter().map(|&v| bf16_value(v)).collect());
            let per = |x: &[f64], i: usize, len: usize| x[i * len..(i + 1) * len].to_vec();
            let mut want = Vec::new();
            let mut mag = 0.0f64;
            for i in 0..batch {
                want.extend(gemm(&per(&af, i, m * k), &per(&bf, i, k * n), m, n, k, a_trans, b_trans));
                let abs = |x: Vec<f64>| x.iter().map(|v| v.abs()).collect::<Vec<_>>();
                mag =
                    gemm(&abs(per(&af, i, m * k)), &abs(per(&bf, i, k * n)), m, n, k, a_trans, b_trans).iter().fold(mag, |x, &y| x.max(y));
            }
            let abs = 2.0 * k as f64 * f32::EPSILON as f64 / 2.0 * mag;
            let (da, db) = (DeviceVec::upload(gpu, &a)?, DeviceVec::upload(gpu, &b)?);
            let name = match (a_trans, b_trans) {
                (false, true) => "C = A.B^T",
                (false, false) => "C = A.B",
                (true, false) => "C = A^T.B",
                (true, true) => "C = A^T.B^T",
            };
            // f32 out, accumulating onto C (β = 1).
            let mut c = DeviceVec::upload(gpu, &c0)?;
            lt.matmul_f32(gpu, &s, &da, &db, &mut c, 1.0, 1.0)?;
            let want_acc: Vec<f64> = want.iter().zip(&c0).map(|(w, &c)| w + c as f64).collect();
            let got: Vec<f64> = c.download(gpu)?.iter().map(|&v| v as f64).collect();
            out.push(compare("cublasLt bf16->f32 (+C)", name, &got, &want_acc, Tol { abs, rel: 1e-6 }));
            let mut cb = DeviceVec::<Gpu, u16>::zeros(gpu, m * n * batch)?;
            lt.matmul_bf16(gpu, &s, &da, &db, &mut cb, 1.0, 0.0)?;
            let got: Vec<f64> = cb.download(gpu)?.iter().map(|&v| bf16_value(v)).collect();
            out.push(compare("cublasLt bf16->bf16", name, &got, &want, Tol { abs: abs + Tol::BF16.abs, rel: Tol::BF16.rel }));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::reference;

    #[test]
    fn the_column_major_plan_computes_the_row_major_product_for_every_transpose_and_batch() {
        let mut rng = StdRng::seed_from_u64(5);
        for &(m, n, k) in &[(3, 5, 7), (8, 1, 4), (1, 9, 2), (6, 6, 1)] {
            for a_trans in [false, true] {
                for b_trans in [false, true] {
                    for batch in [1, 3] {
                        let s = GemmShape { m, n, k, a_trans, b_trans, batch };
                        let a: Vec<f64> = (0..m * k * batch).map(|_| rng.random_range(-1.0..1.0)).collect();
                        let b: Vec<f64> = (0..k * n * batch).map(|_| rng.random_range(-1.0..1.0)).collect();
                        let call = plan_gemm(&s).unwrap();
                        // cuBLASLt's A is our B and its B our A.
                        let got = run_call_on_cpu(&call, &b, &a);
                        let want: Vec<f64> = (0..batch)
                            .flat_map(|i| {
                                reference::gemm(&a[i * m * k..(i + 1) * m * k], &b[i * k * n..(i + 1) * k * n], m, n, k, a_trans, b_trans)
                            })
                            .collect();
                        assert_eq!(got, want, "{s:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_linear_layer_is_x_times_w_transposed_and_an_empty_product_is_refused() {
        let s = GemmShape::linear(8192, 2048, 5632);
        assert_eq!((s.m, s.n, s.k, s.a_trans, s.b_trans), (8192, 2048, 5632, false, true));
        assert_eq!(s.flops(), 2.0 * 8192.0 * 2048.0 * 5632.0);
        let call = plan_gemm(&s).unwrap();
        // W (out × in) row-major is column-major (in × out): cuBLASLt's A, transposed, ld = in.
        assert_eq!(
            (call.transa, call.a, call.transb, call.b, call.c),
            (true, (5632, 2048, 5632), false, (5632, 8192, 5632), (2048, 8192, 2048))
        );
        let e = plan_gemm(&GemmShape { k: 0, ..s }).unwrap_err().to_string();
        assert!(e.contains("empty product"), "{e}");
    }
}
