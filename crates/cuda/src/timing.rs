//! Timings on the GPU for `lora gpu check`: cuBLASLt bf16 products at the shapes of a 1B-parameter Llama
//! step (and 8192³, the card's bf16 matrix rate: the figure the goals are relative to), and each
//! kernel at that model's sizes. CUDA events around each repetition; one warm-up, the median of `reps`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::adam::AdamConsts;
use crate::backend::{Backend, DeviceVec};
use crate::error::CudaError;
use crate::gemm::{GemmShape, LtGemm, OutType};
use crate::gpu::Gpu;
use crate::ops::{self, AttnShape, LoraAdapterRef, LoraBatch, RopeDirection, RopeTables};
use crate::reference::{rope_tables, to_bf16};

type Result<T> = std::result::Result<T, CudaError>;

/// One product's timing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GemmTiming {
    /// What it is in the model.
    pub name: &'static str,
    /// The shape.
    pub shape: GemmShape,
    /// The output type.
    pub out: OutType,
    /// Median milliseconds.
    pub ms: f64,
    /// 2·m·n·k / time, TFLOP/s.
    pub tflops: f64,
    /// Repetitions timed.
    pub reps: usize,
}

/// One kernel's timing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelTiming {
    /// The kernel and its shape.
    pub name: String,
    /// Median milliseconds.
    pub ms: f64,
    /// Bytes the kernel must read and write at least, over the time, GB/s (memory-bound kernels).
    pub gb_per_s: Option<f64>,
    /// Useful floating-point operations over the time, TFLOP/s (attention).
    pub tflops: Option<f64>,
}

/// Median ms of `reps` runs of `f` (after one warm-up), timed with events on the GPU's stream.
fn time<F: FnMut() -> Result<()>>(gpu: &Gpu, reps: usize, mut f: F) -> Result<f64> {
    use cudarc::driver::sys::CUevent_flags;
    f()?;
    gpu.synchronize()?;
    let ctx = gpu.context();
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        let a = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| CudaError::driver("cuEventCreate", e))?;
        let b = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| CudaError::driver("cuEventCreate", e))?;
        a.record(gpu.stream()).map_err(|e| CudaError::driver("cuEventRecord", e))?;
        f()?;
        b.record(gpu.stream()).map_err(|e| CudaError::driver("cuEventRecord", e))?;
        b.synchronize().map_err(|e| CudaError::driver("cuEventSynchronize", e))?;
        ms.push(a.elapsed_ms(&b).map_err(|e| CudaError::driver("cuEventElapsedTime", e))? as f64);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

fn random_bf16(gpu: &Gpu, rng: &mut StdRng, n: usize) -> Result<DeviceVec<Gpu, u16>> {
    let v: Vec<u16> = (0..n).map(|_| to_bf16(rng.random_range(-1.0f32..1.0))).collect();
    DeviceVec::upload(gpu, &v)
}

fn random_f32(gpu: &Gpu, rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Result<DeviceVec<Gpu, f32>> {
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    DeviceVec::upload(gpu, &v)
}

/// The products of one training step of a TinyLlama-1.1B-shaped model (hidden 2048, MLP 5632, 32 query /
/// 4 key-value heads of 64, vocabulary 32000) on 8 × 1024 tokens, forward and the input-gradient products,
/// plus the 8192³ square; random bf16 inputs (zeros run faster and would flatter the figure).
pub fn lm_gemm_shapes() -> Vec<(&'static str, GemmShape, OutType)> {
    let rows = 8 * 1024;
    vec![
        (
            "square 8192^3 (the card's bf16 rate)",
            GemmShape { m: 8192, n: 8192, k: 8192, a_trans: false, b_trans: true, batch: 1 },
            OutType::Bf16,
        ),
        ("q_proj/o_proj fwd 8192x2048x2048", GemmShape::linear(rows, 2048, 2048), OutType::F32),
        ("k_proj/v_proj fwd 8192x256x2048", GemmShape::linear(rows, 256, 2048), OutType::F32),
        ("gate/up_proj fwd 8192x5632x2048", GemmShape::linear(rows, 5632, 2048), OutType::F32),
        ("down_proj fwd 8192x2048x5632", GemmShape::linear(rows, 2048, 5632), OutType::F32),
        ("lm_head fwd 8192x32000x2048", GemmShape::linear(rows, 32000, 2048), OutType::F32),
        (
            "down_proj dX = dY.W 8192x5632x2048",
            GemmShape { m: rows, n: 5632, k: 2048, a_trans: false, b_trans: false, batch: 1 },
            OutType::Bf16,
        ),
        ("LoRA x.A^T r16 8192x16x2048", GemmShape::linear(rows, 16, 2048), OutType::F32),
    ]
}

/// Times each product of `shapes` (median of `reps`).
pub fn time_gemms(gpu: &Gpu, lt: &LtGemm, shapes: &[(&'static str, GemmShape, OutType)], reps: usize) -> Vec<Result<GemmTiming>> {
    let mut rng = StdRng::seed_from_u64(1);
    shapes
        .iter()
        .map(|&(name, shape, out)| {
            let a = random_bf16(gpu, &mut rng, shape.m * shape.k * shape.batch)?;
            let b = random_bf16(gpu, &mut rng, shape.k * shape.n * shape.batch)?;
            let c_len = shape.m * shape.n * shape.batch;
            let ms = match out {
                OutType::F32 => {
                    let mut c = DeviceVec::<Gpu, f32>::zeros(gpu, c_len)?;
                    time(gpu, reps, || lt.matmul_f32(gpu, &shape, &a, &b, &mut c, 1.0, 0.0))?
                }
                OutType::Bf16 => {
                    let mut c = DeviceVec::<Gpu, u16>::zeros(gpu, c_len)?;
                    time(gpu, reps, || lt.matmul_bf16(gpu, &shape, &a, &b, &mut c, 1.0, 0.0))?
                }
            };
            Ok(GemmTiming { name, shape, out, ms, tflops: shape.flops() / (ms * 1e-3) / 1e12, reps })
        })
        .collect()
}

/// Times every kernel at the 1B model's sizes (8 × 1024 tokens), median of `reps`; each kernel's error
/// is its own entry.
pub fn time_kernels(gpu: &Gpu, reps: usize) -> Vec<Result<KernelTiming>> {
    let mut rng = StdRng::seed_from_u64(2);
    let (rows, hidden, inter, vocab) = (8 * 1024usize, 2048usize, 5632usize, 32000usize);
    let mut out = Vec::new();
    let gbs = |bytes: f64, ms: f64| Some(bytes / (ms * 1e-3) / 1e9);
    // RMSNorm forward: read x f32, write y bf16.
    out.push((|| {
        let x = random_f32(gpu, &mut rng, rows * hidden, -2.0, 2.0)?;
        let w = random_bf16(gpu, &mut rng, hidden)?;
        let mut y = DeviceVec::<Gpu, u16>::zeros(gpu, rows * hidden)?;
        let mut rstd = DeviceVec::<Gpu, f32>::zeros(gpu, rows)?;
        let ms = time(gpu, reps, || ops::rmsnorm_fwd(gpu, &x, &w, &mut y, &mut rstd, rows, hidden, 1e-5))?;
        Ok(KernelTiming { name: format!("rmsnorm_fwd {rows}x{hidden}"), ms, gb_per_s: gbs((rows * hidden * 6) as f64, ms), tflops: None })
    })());
    // SwiGLU forward: read g, u f32, write h bf16.
    out.push((|| {
        let n = rows * inter;
        let (g, u) = (random_f32(gpu, &mut rng, n, -4.0, 4.0)?, random_f32(gpu, &mut rng, n, -2.0, 2.0)?);
        let mut h = DeviceVec::<Gpu, u16>::zeros(gpu, n)?;
        let ms = time(gpu, reps, || ops::swiglu_fwd(gpu, &g, &u, &mut h))?;
        Ok(KernelTiming { name: format!("swiglu_fwd {rows}x{inter}"), ms, gb_per_s: gbs((n * 10) as f64, ms), tflops: None })
    })());
    // RoPE on q in place: read and write f32.
    out.push((|| {
        let (heads, hd) = (32, 64);
        let (cos, sin) = rope_tables(1024, hd, 10000.0);
        let (cv, sv) = (DeviceVec::upload(gpu, &cos)?, DeviceVec::upload(gpu, &sin)?);
        let pos: Vec<u32> = (0..rows as u32).map(|r| r % 1024).collect();
        let pv = DeviceVec::upload(gpu, &pos)?;
        let mut x = random_f32(gpu, &mut rng, rows * heads * hd, -1.0, 1.0)?;
        let t = RopeTables { cos: &cv, sin: &sv, max_pos: 1024 };
        let ms = time(gpu, reps, || ops::rope(gpu, &mut x, &pv, &t, heads, hd, RopeDirection::Forward))?;
        Ok(KernelTiming {
            name: format!("rope_fwd {rows}x{heads}x{hd}"),
            ms,
            gb_per_s: gbs((rows * heads * hd * 8) as f64, ms),
            tflops: None,
        })
    })());
    // Cross-entropy over the vocabulary, gradient in place: read and write the logits.
    out.push((|| {
        let mut z = random_f32(gpu, &mut rng, rows * vocab, -4.0, 4.0)?;
        let t: Vec<u32> = (0..rows).map(|_| rng.random_range(0..vocab as u32)).collect();
        let tv = DeviceVec::upload(gpu, &t)?;
        let mut loss = DeviceVec::<Gpu, f32>::zeros(gpu, rows)?;
        let ms = time(gpu, reps, || ops::cross_entropy(gpu, &mut z, &tv, &mut loss, vocab, Some(1.0 / rows as f32)))?;
        Ok(KernelTiming {
            name: format!("cross_entropy {rows}x{vocab} (+dlogits in place)"),
            ms,
            gb_per_s: gbs((rows * vocab * 8) as f64, ms),
            tflops: None,
        })
    })());
    // Attention forward and backward, 8 × 1024, 32/4 heads of 64.
    let s = AttnShape { batch: 8, tq: 1024, tk: 1024, heads: 32, kv_heads: 4, head_dim: 64 };
    // Causal: half of the 4·B·H·T²·d products of forward (2 for scores, 2 for P·V); backward 2.5× that.
    let fwd_flops = 4.0 * 8.0 * 32.0 * 1024.0 * 1024.0 * 64.0 / 2.0;
    out.push((|| {
        let ql = 8 * 1024 * 32 * 64;
        let kl = 8 * 1024 * 4 * 64;
        let (q, k, v) = (
            random_f32(gpu, &mut rng, ql, -1.0, 1.0)?,
            random_f32(gpu, &mut rng, kl, -1.0, 1.0)?,
            random_f32(gpu, &mut rng, kl, -1.0, 1.0)?,
        );
        let mut o = DeviceVec::<Gpu, f32>::zeros(gpu, ql)?;
        let mut lse = DeviceVec::<Gpu, f32>::zeros(gpu, 8 * 32 * 1024)?;
        let ms = time(gpu, reps, || ops::attention_fwd(gpu, &s, &q, &k, &v, &mut o, &mut lse))?;
        Ok(KernelTiming {
            name: "attention_fwd B8 T1024 H32/4 d64".into(),
            ms,
            gb_per_s: None,
            tflops: Some(fwd_flops / (ms * 1e-3) / 1e12),
        })
    })());
    out.push((|| {
        let ql = 8 * 1024 * 32 * 64;
        let kl = 8 * 1024 * 4 * 64;
        let (q, k, v) = (
            random_f32(gpu, &mut rng, ql, -1.0, 1.0)?,
            random_f32(gpu, &mut rng, kl, -1.0, 1.0)?,
            random_f32(gpu, &mut rng, kl, -1.0, 1.0)?,
        );
        let mut o = DeviceVec::<Gpu, f32>::zeros(gpu, ql)?;
        let mut lse = DeviceVec::<Gpu, f32>::zeros(gpu, 8 * 32 * 1024)?;
        ops::attention_fwd(gpu, &s, &q, &k, &v, &mut o, &mut lse)?;
        let dout = random_f32(gpu, &mut rng, ql, -1.0, 1.0)?;
        let (mut dq, mut dk, mut dv) =
            (DeviceVec::<Gpu, f32>::zeros(gpu, ql)?, DeviceVec::<Gpu, f32>::zeros(gpu, kl)?, DeviceVec::<Gpu, f32>::zeros(gpu, kl)?);
        let ms = time(gpu, reps, || ops::attention_bwd(gpu, &s, &q, &k, &v, &o, &lse, &dout, &mut dq, &mut dk, &mut dv))?;
        Ok(KernelTiming {
            name: "attention_bwd B8 T1024 H32/4 d64".into(),
            ms,
            gb_per_s: None,
            tflops: Some(2.5 * fwd_flops / (ms * 1e-3) / 1e12),
        })
    })());
    // Adam over the 1B model's LoRA (r 16 on q, k, v, o, gate, up, down of 22 layers): 12.6M values.
    out.push((|| {
        let n = 22 * 16 * (2048 + 2048 + 2048 + 256 + 2048 + 256 + 2048 + 2048 + 2048 + 5632 + 2048 + 5632 + 5632 + 2048);
        let (mut t, g) = (random_f32(gpu, &mut rng, n, -1.0, 1.0)?, random_f32(gpu, &mut rng, n, -1.0, 1.0)?);
        let (mut m, mut v) = (DeviceVec::<Gpu, f32>::zeros(gpu, n)?, DeviceVec::<Gpu, f32>::zeros(gpu, n)?);
        let c = AdamConsts::new(&lora_optim::AdamConfig::default(), 1);
        let ms = time(gpu, reps, || ops::adam_step(gpu, &mut t, &g, &mut m, &mut v, &c))?;
        Ok(KernelTiming { name: format!("adam_step {n} values"), ms, gb_per_s: gbs((n * 28) as f64, ms), tflops: None })
    })());
    // LoRA shrink + expand, one layer (2048 → 2048), r 16: one adapter, and 16 adapters of 512 rows each.
    for adapters in [1usize, 16] {
        out.push((|| {
            let (inp, outd, r) = (2048usize, 2048usize, 16usize);
            let x = random_bf16(gpu, &mut rng, rows * inp)?;
            let w: Vec<(DeviceVec<Gpu, f32>, DeviceVec<Gpu, f32>)> = (0..adapters)
                .map(|_| Ok((random_f32(gpu, &mut rng, r * inp, -0.1, 0.1)?, random_f32(gpu, &mut rng, outd * r, -0.1, 0.1)?)))
                .collect::<Result<_>>()?;
            let refs: Vec<LoraAdapterRef<'_, Gpu>> = w.iter().map(|(a, b)| LoraAdapterRef { a, b, rank: r, scale: 2.0 }).collect();
            let segs: Vec<(usize, Option<usize>)> = (0..adapters).map(|i| (rows / adapters, Some(i))).collect();
            let batch = LoraBatch::new(gpu, &refs, &segs, inp, outd)?;
            let mut tmp = DeviceVec::<Gpu, f32>::zeros(gpu, rows * r)?;
            let mut y = DeviceVec::<Gpu, f32>::zeros(gpu, rows * outd)?;
            let ms = time(gpu, reps, || {
                ops::lora_shrink(gpu, &x, &batch, &mut tmp)?;
                ops::lora_expand(gpu, &tmp, &batch, &mut y)
            })?;
            Ok(KernelTiming {
                name: format!("lora_shrink+expand {rows}x{inp}->{outd} r{r}, {adapters} adapter(s)"),
                ms,
                gb_per_s: gbs((rows * (inp * 2 + outd * 8)) as f64, ms),
                tflops: None,
            })
        })());
    }
    out
}
