//! The kernels as safe functions on a [`Backend`]: each checks every buffer's length against the shape it
//! is given (in checked arithmetic), builds the [`Launch`] (grid, block, arguments in the kernel's order)
//! and runs it. The one place that knows each kernel's signature and launch geometry; `check` and the GPU
//! path call these, on the GPU and on the CPU emulation alike.
//!
//! Shapes are row-major; "rows" are tokens (batch × sequence). Types: bf16 as `u16` bits, f32, ids `u32`.

use std::marker::PhantomData;

use crate::adam::AdamConsts;
use crate::backend::{Backend, DeviceVec, Elem};
use crate::error::CudaError;
use crate::launch::{Arg, Launch};

type Result<T> = std::result::Result<T, CudaError>;

/// Threads per block of the element-wise and per-row kernels.
const BLOCK: u32 = 256;
/// Threads per block of the attention kernels (`ATTN_BLOCK` in attention.cu).
pub const ATTN_BLOCK: u32 = 64;
/// Head sizes the attention kernels are compiled for.
pub const ATTN_HEAD_DIMS: [usize; 3] = [32, 64, 128];
/// Most blocks of a grid-stride loop.
const MAX_GRID: u64 = 1 << 20;
/// Most blocks in y and z.
const MAX_GRID_YZ: usize = 65_535;

fn to_u32(op: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| CudaError::shape(op, format!("{what} = {v} is over u32")))
}

fn product(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| CudaError::shape(op, format!("{dims:?} overflows")))
}

fn need<B: Backend, T: Elem>(op: &'static str, what: &str, v: &DeviceVec<B, T>, len: usize) -> Result<()> {
    if v.len() != len {
        return Err(CudaError::shape(op, format!("{what} holds {} values, the shape needs {len}", v.len())));
    }
    Ok(())
}

fn grid_stride(n: usize) -> u32 {
    ((n as u64).div_ceil(BLOCK as u64)).clamp(1, MAX_GRID) as u32
}

fn ptr<B: Backend, T: Elem>(b: &B, v: &DeviceVec<B, T>) -> Arg {
    Arg::Ptr(v.address(b))
}

/// Runs a launch whose buffers the caller has checked.
fn run<B: Backend>(b: &B, mut l: Launch) -> Result<()> {
    // SAFETY: every caller in this module passes addresses of live `DeviceVec`s of `b` whose lengths it
    // checked against the shape arguments, and each kernel accesses only what that shape covers (see the
    // kernel's comment; indices the kernels cannot bound — ids, positions, targets — are checked there).
    unsafe { b.launch(&mut l) }
}

/// bf16 → f32, element by element.
pub fn cast_bf16_to_f32<B: Backend>(b: &B, x: &DeviceVec<B, u16>, y: &mut DeviceVec<B, f32>) -> Result<()> {
    need("cast_bf16_to_f32", "y", y, x.len())?;
    let l = Launch {
        kernel: "cast_bf16_to_f32",
        grid: [grid_stride(x.len()), 1, 1],
        block: [BLOCK, 1, 1],
        args: vec![ptr(b, x), ptr(b, y), Arg::U64(x.len() as u64)],
    };
    run(b, l)
}

/// f32 → bf16 (round to nearest even), element by element.
pub fn cast_f32_to_bf16<B: Backend>(b: &B, x: &DeviceVec<B, f32>, y: &mut DeviceVec<B, u16>) -> Result<()> {
    need("cast_f32_to_bf16", "y", y, x.len())?;
    let l = Launch {
        kernel: "cast_f32_to_bf16",
        grid: [grid_stride(x.len()), 1, 1],
        block: [BLOCK, 1, 1],
        args: vec![ptr(b, x), ptr(b, y), Arg::U64(x.len() as u64)],
    };
    run(b, l)
}

/// out (rows, hidden) f32 = table[ids] with table (vocab, hidden) bf16; rows = ids.len(). An id ≥ vocab
/// gives a row of NaN.
pub fn embedding<B: Backend>(
    b: &B,
    ids: &DeviceVec<B, u32>,
    table: &DeviceVec<B, u16>,
    out: &mut DeviceVec<B, f32>,
    vocab: usize,
    hidden: usize,
) -> Result<()> {
    const OP: &str = "embedding";
    need(OP, "table", table, product(OP, &[vocab, hidden])?)?;
    need(OP, "out", out, product(OP, &[ids.len(), hidden])?)?;
    if ids.is_empty() {
        return Ok(());
    }
    let args = vec![
        ptr(b, ids),
        ptr(b, table),
        ptr(b, out),
        Arg::U32(to_u32(OP, "rows", ids.len())?),
        Arg::U32(to_u32(OP, "hidden", hidden)?),
        Arg::U32(to_u32(OP, "vocab", vocab)?),
    ];
    run(b, Launch { kernel: "embedding_bf16", grid: [to_u32(OP, "rows", ids.len())?, 1, 1], block: [BLOCK, 1, 1], args })
}

/// RMSNorm forward: y (rows, h) bf16 = w ∘ (x · rstd), rstd (rows) = 1/√(mean(x²) + eps); x f32, w bf16.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_fwd<B: Backend>(
    b: &B,
    x: &DeviceVec<B, f32>,
    w: &DeviceVec<B, u16>,
    y: &mut DeviceVec<B, u16>,
    rstd: &mut DeviceVec<B, f32>,
    rows: usize,
    h: usize,
    eps: f32,
) -> Result<()> {
    const OP: &str = "rmsnorm_fwd";
    let n = product(OP, &[rows, h])?;
    need(OP, "x", x, n)?;
    need(OP, "y", y, n)?;
    need(OP, "w", w, h)?;
    need(OP, "rstd", rstd, rows)?;
    if rows == 0 {
        return Ok(());
    }
    let (r, hh) = (to_u32(OP, "rows", rows)?, to_u32(OP, "h", h)?);
    let args = vec![ptr(b, x), ptr(b, w), ptr(b, y), ptr(b, rstd), Arg::U32(r), Arg::U32(hh), Arg::F32(eps)];
    run(b, Launch { kernel: "rmsnorm_fwd", grid: [r, 1, 1], block: [BLOCK, 1, 1], args })
}

/// The weight gradient of an RMSNorm, and whether it is added to what `dw` holds.
pub struct NormWeightGrad<'a, B: Backend> {
    /// dw (h) f32.
    pub dw: &'a mut DeviceVec<B, f32>,
    /// Add to dw instead of overwriting it.
    pub accumulate: bool,
}

/// RMSNorm backward: dx (rows, h) f32 (written, or added when `accumulate_dx`), and dw when asked, from x,
/// w, the forward's rstd and dy (the gradient of y).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd<B: Backend>(
    b: &B,
    x: &DeviceVec<B, f32>,
    w: &DeviceVec<B, u16>,
    rstd: &DeviceVec<B, f32>,
    dy: &DeviceVec<B, f32>,
    dx: &mut DeviceVec<B, f32>,
    accumulate_dx: bool,
    dw: Option<NormWeightGrad<'_, B>>,
    rows: usize,
    h: usize,
) -> Result<()> {
    const OP: &str = "rmsnorm_bwd";
    let n = product(OP, &[rows, h])?;
    need(OP, "x", x, n)?;
    need(OP, "dy", dy, n)?;
    need(OP, "dx", dx, n)?;
    need(OP, "w", w, h)?;
    need(OP, "rstd", rstd, rows)?;
    if let Some(g) = &dw {
        need(OP, "dw", g.dw, h)?;
    }
    if rows == 0 {
        return Ok(());
    }
    let (r, hh) = (to_u32(OP, "rows", rows)?, to_u32(OP, "h", h)?);
    let args = vec![ptr(b, x), ptr(b, w), ptr(b, rstd), ptr(b, dy), ptr(b, dx), Arg::U32(r), Arg::U32(hh), Arg::U32(accumulate_dx as u32)];
    run(b, Launch { kernel: "rmsnorm_bwd_dx", grid: [r, 1, 1], block: [BLOCK, 1, 1], args })?;
    let Some(g) = dw else { return Ok(()) };
    // Chunks of rows (each thread sums its column over a chunk), then one sum over the chunks.
    let per_chunk = rows.div_ceil(MAX_GRID_YZ).max(64);
    let chunks = rows.div_ceil(per_chunk);
    let partial = DeviceVec::<B, f32>::zeros(b, product(OP, &[chunks, h])?)?;
    let gx = hh.div_ceil(BLOCK);
    let args = vec![
        ptr(b, x),
        ptr(b, rstd),
        ptr(b, dy),
        ptr(b, &partial),
        Arg::U32(r),
        Arg::U32(hh),
        Arg::U32(to_u32(OP, "rows per chunk", per_chunk)?),
    ];
    run(b, Launch { kernel: "rmsnorm_dw_partial", grid: [gx, chunks as u32, 1], block: [BLOCK, 1, 1], args })?;
    let args = vec![ptr(b, &partial), ptr(b, g.dw), Arg::U32(chunks as u32), Arg::U32(hh), Arg::U32(g.accumulate as u32)];
    run(b, Launch { kernel: "sum_chunks", grid: [gx, 1, 1], block: [BLOCK, 1, 1], args })
}

/// Which way RoPE turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeDirection {
    /// The forward rotation.
    Forward,
    /// Its inverse (the backward of the forward).
    Backward,
}

/// RoPE tables: cos and sin (max_pos, head_dim/2) f32.
pub struct RopeTables<'a, B: Backend> {
    /// cos(p·θ_i).
    pub cos: &'a DeviceVec<B, f32>,
    /// sin(p·θ_i).
    pub sin: &'a DeviceVec<B, f32>,
    /// Positions the tables cover.
    pub max_pos: usize,
}

/// RoPE in place on x (rows, heads, head_dim) f32, row r at position pos[r] (a position ≥ max_pos gives NaN).
pub fn rope<B: Backend>(
    b: &B,
    x: &mut DeviceVec<B, f32>,
    pos: &DeviceVec<B, u32>,
    tables: &RopeTables<'_, B>,
    heads: usize,
    head_dim: usize,
    dir: RopeDirection,
) -> Result<()> {
    const OP: &str = "rope";
    if !head_dim.is_multiple_of(2) || head_dim == 0 {
        return Err(CudaError::shape(OP, format!("head_dim {head_dim} must be even and positive")));
    }
    let rows = pos.len();
    need(OP, "x", x, product(OP, &[rows, heads, head_dim])?)?;
    need(OP, "cos", tables.cos, product(OP, &[tables.max_pos, head_dim / 2])?)?;
    need(OP, "sin", tables.sin, product(OP, &[tables.max_pos, head_dim / 2])?)?;
    let pairs = product(OP, &[rows, heads, head_dim / 2])?;
    if pairs == 0 {
        return Ok(());
    }
    let grid = (pairs as u64).div_ceil(BLOCK as u64);
    let grid = u32::try_from(grid).map_err(|_| CudaError::shape(OP, format!("{pairs} pairs need too many blocks")))?;
    let kernel = if dir == RopeDirection::Forward { "rope_fwd" } else { "rope_bwd" };
    let args = vec![
        ptr(b, x),
        ptr(b, pos),
        ptr(b, tables.cos),
        ptr(b, tables.sin),
        Arg::U32(to_u32(OP, "rows", rows)?),
        Arg::U32(to_u32(OP, "heads", heads)?),
        Arg::U32(to_u32(OP, "head_dim", head_dim)?),
        Arg::U32(to_u32(OP, "max_pos", tables.max_pos)?),
    ];
    run(b, Launch { kernel, grid: [grid, 1, 1], block: [BLOCK, 1, 1], args })
}

/// SwiGLU forward: h = silu(g) ∘ u as bf16; g, u f32 of one length.
pub fn swiglu_fwd<B: Backend>(b: &B, g: &DeviceVec<B, f32>, u: &DeviceVec<B, f32>, h: &mut DeviceVec<B, u16>) -> Result<()> {
    need("swiglu_fwd", "u", u, g.len())?;
    need("swiglu_fwd", "h", h, g.len())?;
    let args = vec![ptr(b, g), ptr(b, u), ptr(b, h), Arg::U64(g.len() as u64)];
    run(b, Launch { kernel: "swiglu_fwd", grid: [grid_stride(g.len()), 1, 1], block: [BLOCK, 1, 1], args })
}

/// SwiGLU backward: dg, du from g, u and dh.
pub fn swiglu_bwd<B: Backend>(
    b: &B,
    g: &DeviceVec<B, f32>,
    u: &DeviceVec<B, f32>,
    dh: &DeviceVec<B, f32>,
    dg: &mut DeviceVec<B, f32>,
    du: &mut DeviceVec<B, f32>,
) -> Result<()> {
    for (what, v) in [("u", u), ("dh", dh)] {
        need("swiglu_bwd", what, v, g.len())?;
    }
    need("swiglu_bwd", "dg", dg, g.len())?;
    need("swiglu_bwd", "du", du, g.len())?;
    let args = vec![ptr(b, g), ptr(b, u), ptr(b, dh), ptr(b, dg), ptr(b, du), Arg::U64(g.len() as u64)];
    run(b, Launch { kernel: "swiglu_bwd", grid: [grid_stride(g.len()), 1, 1], block: [BLOCK, 1, 1], args })
}

/// The shape of a causal grouped-query attention: q (batch, tq, heads, head_dim), k and v (batch, tk,
/// kv_heads, head_dim); query i sits at position i + tk − tq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AttnShape {
    /// Sequences.
    pub batch: usize,
    /// Queries per sequence.
    pub tq: usize,
    /// Keys per sequence (≥ tq).
    pub tk: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (dividing heads).
    pub kv_heads: usize,
    /// Features per head (32, 64 or 128).
    pub head_dim: usize,
}

impl AttnShape {
    fn validate(&self, op: &'static str) -> Result<()> {
        let s = self;
        if s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) {
            return Err(CudaError::shape(op, format!("{} heads are not a multiple of {} key/value heads", s.heads, s.kv_heads)));
        }
        if s.tk < s.tq {
            return Err(CudaError::shape(op, format!("{} keys for {} queries (keys must be at least the queries)", s.tk, s.tq)));
        }
        if !ATTN_HEAD_DIMS.contains(&s.head_dim) {
            return Err(CudaError::shape(op, format!("head_dim {} (the kernels are compiled for {ATTN_HEAD_DIMS:?})", s.head_dim)));
        }
        if s.heads > MAX_GRID_YZ || s.batch > MAX_GRID_YZ {
            return Err(CudaError::shape(op, format!("{} heads × {} sequences exceed the grid", s.heads, s.batch)));
        }
        to_u32(op, "tk", s.tk)?;
        Ok(())
    }
    fn q_len(&self, op: &'static str) -> Result<usize> {
        product(op, &[self.batch, self.tq, self.heads, self.head_dim])
    }
    fn kv_len(&self, op: &'static str) -> Result<usize> {
        product(op, &[self.batch, self.tk, self.kv_heads, self.head_dim])
    }
    fn lse_len(&self, op: &'static str) -> Result<usize> {
        product(op, &[self.batch, self.heads, self.tq])
    }
    fn scale(&self) -> f32 {
        (1.0 / (self.head_dim as f64).sqrt()) as f32
    }
    fn dims(&self) -> Vec<Arg> {
        vec![
            Arg::U32(self.tq as u32),
            Arg::U32(self.tk as u32),
            Arg::U32(self.heads as u32),
            Arg::U32(self.kv_heads as u32),
            Arg::F32(self.scale()),
        ]
    }
}

/// Attention forward: o (like q) and lse (batch, heads, tq), softmax scale 1/√head_dim.
pub fn attention_fwd<B: Backend>(
    b: &B,
    s: &AttnShape,
    q: &DeviceVec<B, f32>,
    k: &DeviceVec<B, f32>,
    v: &DeviceVec<B, f32>,
    o: &mut DeviceVec<B, f32>,
    lse: &mut DeviceVec<B, f32>,
) -> Result<()> {
    const OP: &str = "attention_fwd";
    s.validate(OP)?;
    need(OP, "q", q, s.q_len(OP)?)?;
    need(OP, "o", o, s.q_len(OP)?)?;
    need(OP, "k", k, s.kv_len(OP)?)?;
    need(OP, "v", v, s.kv_len(OP)?)?;
    need(OP, "lse", lse, s.lse_len(OP)?)?;
    if s.q_len(OP)? == 0 {
        return Ok(());
    }
    let kernel = match s.head_dim {
        32 => "attn_fwd_hd32",
        64 => "attn_fwd_hd64",
        _ => "attn_fwd_hd128",
    };
    let mut args = vec![ptr(b, q), ptr(b, k), ptr(b, v), ptr(b, o), ptr(b, lse)];
    args.extend(s.dims());
    let grid = [(s.tq as u32).div_ceil(ATTN_BLOCK), s.heads as u32, s.batch as u32];
    run(b, Launch { kernel, grid, block: [ATTN_BLOCK, 1, 1], args })
}

/// Attention backward: dq, dk, dv from q, k, v, the forward's o and lse, and dout (the gradient of o).
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<B: Backend>(
    b: &B,
    s: &AttnShape,
    q: &DeviceVec<B, f32>,
    k: &DeviceVec<B, f32>,
    v: &DeviceVec<B, f32>,
    o: &DeviceVec<B, f32>,
    lse: &DeviceVec<B, f32>,
    dout: &DeviceVec<B, f32>,
    dq: &mut DeviceVec<B, f32>,
    dk: &mut DeviceVec<B, f32>,
    dv: &mut DeviceVec<B, f32>,
) -> Result<()> {
    const OP: &str = "attention_bwd";
    s.validate(OP)?;
    let (ql, kl) = (s.q_len(OP)?, s.kv_len(OP)?);
    for (what, t) in [("q", q), ("o", o), ("dout", dout)] {
        need(OP, what, t, ql)?;
    }
    need(OP, "dq", dq, ql)?;
    need(OP, "k", k, kl)?;
    need(OP, "v", v, kl)?;
    need(OP, "dk", dk, kl)?;
    need(OP, "dv", dv, kl)?;
    need(OP, "lse", lse, s.lse_len(OP)?)?;
    if ql == 0 || kl == 0 {
        return Ok(());
    }
    let dsum = DeviceVec::<B, f32>::zeros(b, s.lse_len(OP)?)?;
    let rows_heads = product(OP, &[s.batch, s.tq, s.heads])?;
    let grid = u32::try_from((rows_heads as u64).div_ceil(BLOCK as u64)).map_err(|_| CudaError::shape(OP, "too many rows"))?;
    let args = vec![
        ptr(b, o),
        ptr(b, dout),
        ptr(b, &dsum),
        Arg::U32(s.batch as u32),
        Arg::U32(s.tq as u32),
        Arg::U32(s.heads as u32),
        Arg::U32(s.head_dim as u32),
    ];
    run(b, Launch { kernel: "attn_bwd_dot", grid: [grid, 1, 1], block: [BLOCK, 1, 1], args })?;
    let (kdq, kdkv) = match s.head_dim {
        32 => ("attn_bwd_dq_hd32", "attn_bwd_dkv_hd32"),
        64 => ("attn_bwd_dq_hd64", "attn_bwd_dkv_hd64"),
        _ => ("attn_bwd_dq_hd128", "attn_bwd_dkv_hd128"),
    };
    let mut args = vec![ptr(b, q), ptr(b, k), ptr(b, v), ptr(b, dout), ptr(b, lse), ptr(b, &dsum), ptr(b, dq)];
    args.extend(s.dims());
    let grid = [(s.tq as u32).div_ceil(ATTN_BLOCK), s.heads as u32, s.batch as u32];
    run(b, Launch { kernel: kdq, grid, block: [ATTN_BLOCK, 1, 1], args })?;
    let mut args = vec![ptr(b, q), ptr(b, k), ptr(b, v), ptr(b, dout), ptr(b, lse), ptr(b, &dsum), ptr(b, dk), ptr(b, dv)];
    args.extend(s.dims());
    let grid = [(s.tk as u32).div_ceil(ATTN_BLOCK), s.kv_heads as u32, s.batch as u32];
    run(b, Launch { kernel: kdkv, grid, block: [ATTN_BLOCK, 1, 1], args })
}

/// The target of a row that does not count (transformers' ignore index): lora-optim's.
pub const IGNORE: u32 = lora_optim::IGNORE;

/// Cross-entropy per row of logits (rows, vocab) against targets (rows; [`IGNORE`] for none): loss (rows)
/// = logsumexp − z[target] (0 for ignored rows; NaN for a target ≥ vocab). When `grad_scale` is given, the
/// logits are replaced by their gradient, grad_scale · (softmax − onehot) (pass dloss / kept rows for a mean).
pub fn cross_entropy<B: Backend>(
    b: &B,
    logits: &mut DeviceVec<B, f32>,
    targets: &DeviceVec<B, u32>,
    loss: &mut DeviceVec<B, f32>,
    vocab: usize,
    grad_scale: Option<f32>,
) -> Result<()> {
    const OP: &str = "cross_entropy";
    let rows = targets.len();
    need(OP, "logits", logits, product(OP, &[rows, vocab])?)?;
    need(OP, "loss", loss, rows)?;
    if rows == 0 {
        return Ok(());
    }
    let z = ptr(b, logits);
    let dz = if grad_scale.is_some() { z } else { Arg::Ptr(0) };
    let args = vec![
        z,
        ptr(b, targets),
        ptr(b, loss),
        dz,
        Arg::U32(to_u32(OP, "rows", rows)?),
        Arg::U32(to_u32(OP, "vocab", vocab)?),
        Arg::U32(IGNORE),
        Arg::F32(grad_scale.unwrap_or(0.0)),
    ];
    run(b, Launch { kernel: "cross_entropy", grid: [to_u32(OP, "rows", rows)?, 1, 1], block: [BLOCK, 1, 1], args })
}

/// One Adam step in place over θ, m, v (f32, one length) with gradient g: lora-optim's arithmetic.
pub fn adam_step<B: Backend>(
    b: &B,
    theta: &mut DeviceVec<B, f32>,
    g: &DeviceVec<B, f32>,
    m: &mut DeviceVec<B, f32>,
    v: &mut DeviceVec<B, f32>,
    c: &AdamConsts,
) -> Result<()> {
    const OP: &str = "adam_step";
    let n = theta.len();
    need(OP, "g", g, n)?;
    need(OP, "m", m, n)?;
    need(OP, "v", v, n)?;
    let args = vec![
        ptr(b, theta),
        ptr(b, g),
        ptr(b, m),
        ptr(b, v),
        Arg::U64(n as u64),
        Arg::F32(c.b1),
        Arg::F32(c.one_minus_b1),
        Arg::F32(c.b2),
        Arg::F32(c.one_minus_b2),
        Arg::F32(c.scale_m),
        Arg::F32(c.scale_v),
        Arg::F32(c.eps),
        Arg::F32(c.lr),
        Arg::F32(c.decay),
        Arg::F32(c.grad_scale),
    ];
    run(b, Launch { kernel: "adam_step", grid: [grid_stride(n), 1, 1], block: [BLOCK, 1, 1], args })
}

/// One adapter of a mixed batch: A (rank, in) and B (out, rank) f32, and its scale.
pub struct LoraAdapterRef<'a, B: Backend> {
    /// A.
    pub a: &'a DeviceVec<B, f32>,
    /// B.
    pub b: &'a DeviceVec<B, f32>,
    /// Its rank.
    pub rank: usize,
    /// s (alpha / r, or alpha / √r).
    pub scale: f32,
}

/// A batch's rows grouped into segments, each with its adapter (or none), ready for [`lora_shrink`] and
/// [`lora_expand`]: the segment table and the adapters' addresses on the device. Borrows the adapters, so
/// they outlive it.
pub struct LoraBatch<'a, B: Backend> {
    seg_starts: DeviceVec<B, u32>,
    seg_adapter: DeviceVec<B, i32>,
    a_ptrs: DeviceVec<B, u64>,
    b_ptrs: DeviceVec<B, u64>,
    ranks: DeviceVec<B, u32>,
    scales: DeviceVec<B, f32>,
    nseg: usize,
    rows: usize,
    rmax: usize,
    in_dim: usize,
    out_dim: usize,
    _adapters: PhantomData<&'a ()>,
}

impl<'a, B: Backend> LoraBatch<'a, B> {
    /// Segments are (rows, adapter index into `adapters` or None), in row order.
    pub fn new(
        b: &B,
        adapters: &[LoraAdapterRef<'a, B>],
        segments: &[(usize, Option<usize>)],
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Self> {
        const OP: &str = "lora batch";
        for (i, a) in adapters.iter().enumerate() {
            if a.rank == 0 {
                return Err(CudaError::shape(OP, format!("adapter {i} has rank 0")));
            }
            need(OP, "A", a.a, product(OP, &[a.rank, in_dim])?)?;
            need(OP, "B", a.b, product(OP, &[out_dim, a.rank])?)?;
        }
        let mut starts = vec![0u32];
        let mut which = Vec::with_capacity(segments.len());
        let mut rows = 0usize;
        for (s, &(n, a)) in segments.iter().enumerate() {
            if let Some(a) = a {
                if a >= adapters.len() {
                    return Err(CudaError::shape(OP, format!("segment {s} names adapter {a} of {}", adapters.len())));
                }
            }
            rows = rows.checked_add(n).ok_or_else(|| CudaError::shape(OP, "row count overflows"))?;
            starts.push(to_u32(OP, "rows", rows)?);
            which.push(a.map_or(-1, |a| a as i32));
        }
        let rmax = adapters.iter().map(|a| a.rank).max().unwrap_or(0).max(1);
        let up64 = |v: Vec<u64>| DeviceVec::upload(b, &v);
        Ok(LoraBatch {
            seg_starts: DeviceVec::upload(b, &starts)?,
            seg_adapter: DeviceVec::upload(b, &which)?,
            a_ptrs: up64(adapters.iter().map(|a| a.a.address(b)).collect())?,
            b_ptrs: up64(adapters.iter().map(|a| a.b.address(b)).collect())?,
            ranks: DeviceVec::upload(b, &adapters.iter().map(|a| a.rank as u32).collect::<Vec<_>>())?,
            scales: DeviceVec::upload(b, &adapters.iter().map(|a| a.scale).collect::<Vec<_>>())?,
            nseg: segments.len(),
            rows,
            rmax,
            in_dim,
            out_dim,
            _adapters: PhantomData,
        })
    }

    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The widest rank: `tmp`'s row length.
    pub fn rmax(&self) -> usize {
        self.rmax
    }
}

/// LoRA shrink: tmp (rows, rmax) f32 = x (rows, in) bf16 · A_aᵀ for each row's adapter a (0 past its rank;
/// rows without an adapter: 0).
pub fn lora_shrink<B: Backend>(b: &B, x: &DeviceVec<B, u16>, batch: &LoraBatch<'_, B>, tmp: &mut DeviceVec<B, f32>) -> Result<()> {
    const OP: &str = "lora_shrink";
    need(OP, "x", x, product(OP, &[batch.rows, batch.in_dim])?)?;
    need(OP, "tmp", tmp, product(OP, &[batch.rows, batch.rmax])?)?;
    if batch.rows == 0 {
        return Ok(());
    }
    let args = vec![
        ptr(b, x),
        ptr(b, &batch.seg_starts),
        ptr(b, &batch.seg_adapter),
        Arg::U32(batch.nseg as u32),
        ptr(b, &batch.a_ptrs),
        ptr(b, &batch.ranks),
        ptr(b, tmp),
        Arg::U32(batch.rows as u32),
        Arg::U32(to_u32(OP, "in", batch.in_dim)?),
        Arg::U32(batch.rmax as u32),
    ];
    run(b, Launch { kernel: "lora_shrink", grid: [batch.rows as u32, 1, 1], block: [BLOCK, 1, 1], args })
}

/// LoRA expand: y (rows, out) f32 += s_a · tmp[:, :rank] · B_aᵀ for each row's adapter (rows without one
/// are left as they are).
pub fn lora_expand<B: Backend>(b: &B, tmp: &DeviceVec<B, f32>, batch: &LoraBatch<'_, B>, y: &mut DeviceVec<B, f32>) -> Result<()> {
    const OP: &str = "lora_expand";
    need(OP, "tmp", tmp, product(OP, &[batch.rows, batch.rmax])?)?;
    need(OP, "y", y, product(OP, &[batch.rows, batch.out_dim])?)?;
    if batch.rows == 0 || batch.out_dim == 0 {
        return Ok(());
    }
    if batch.rows > MAX_GRID_YZ {
        return Err(CudaError::shape(OP, format!("{} rows exceed the grid's {MAX_GRID_YZ}", batch.rows)));
    }
    let out = to_u32(OP, "out", batch.out_dim)?;
    let args = vec![
        ptr(b, tmp),
        ptr(b, &batch.seg_starts),
        ptr(b, &batch.seg_adapter),
        Arg::U32(batch.nseg as u32),
        ptr(b, &batch.b_ptrs),
        ptr(b, &batch.ranks),
        ptr(b, &batch.scales),
        ptr(b, y),
        Arg::U32(batch.rows as u32),
        Arg::U32(out),
        Arg::U32(batch.rmax as u32),
    ];
    run(b, Launch { kernel: "lora_expand", grid: [out.div_ceil(BLOCK), batch.rows as u32, 1], block: [BLOCK, 1, 1], args })
}
