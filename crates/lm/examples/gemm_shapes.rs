//! GFLOP/s of `lora_kernels::matmul_into` on the LM's product shapes.
use std::time::Instant;

use lora_kernels::{matmul_into, MatRef};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One timed product writing into its output buffer.
type Case<'a> = Box<dyn Fn(&mut Vec<f32>) -> lora_kernels::Result<()> + 'a>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n = 4096;
    for (inp, out) in [(256, 768), (768, 256), (256, 256), (256, 128)] {
        let x: Vec<f32> = (0..n * inp).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
        let w: Vec<f32> = (0..out * inp).map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5).collect();
        let g: Vec<f32> = (0..n * out).map(|i| ((i * 31) % 1000) as f32 * 1e-3 - 0.5).collect();
        let flop = 2.0 * (n * inp * out) as f64;
        let cases: Vec<(&str, Case)> = vec![
            (
                "fwd x·Wᵀ",
                Box::new(|d: &mut Vec<f32>| {
                    d.resize(n * out, 0.0);
                    matmul_into(d, MatRef::row_major(&x, n, inp)?, MatRef::row_major(&w, out, inp)?.t(), 1.0, false)
                }),
            ),
            (
                "dx g·W",
                Box::new(|d: &mut Vec<f32>| {
                    d.resize(n * inp, 0.0);
                    matmul_into(d, MatRef::row_major(&g, n, out)?, MatRef::row_major(&w, out, inp)?, 1.0, false)
                }),
            ),
            (
                "x·Aᵀ (r 8)",
                Box::new(|d: &mut Vec<f32>| {
                    d.resize(n * 8, 0.0);
                    matmul_into(d, MatRef::row_major(&x, n, inp)?, MatRef::row_major(&w[..8 * inp], 8, inp)?.t(), 1.0, false)
                }),
            ),
            (
                "xa·Bᵀ (r 8)",
                Box::new(|d: &mut Vec<f32>| {
                    d.resize(n * out, 0.0);
                    matmul_into(d, MatRef::row_major(&g[..n * 8], n, 8)?, MatRef::row_major(&w[..out * 8], out, 8)?.t(), 1.0, false)
                }),
            ),
            (
                "dW gᵀ·x",
                Box::new(|d: &mut Vec<f32>| {
                    d.resize(out * inp, 0.0);
                    matmul_into(d, MatRef::row_major(&g, n, out)?.t(), MatRef::row_major(&x, n, inp)?, 1.0, false)
                }),
            ),
        ];
        {
            let dev = candle_core::Device::Cpu;
            let xt = candle_core::Tensor::from_slice(&x, (n, inp), &dev)?;
            let wt = candle_core::Tensor::from_slice(&w, (out, inp), &dev)?;
            let gt = candle_core::Tensor::from_slice(&g, (n, out), &dev)?;
            let wtt = wt.t()?.contiguous()?;
            for (name, f) in [
                ("candle x·Wᵀ (strided)", Box::new(|| xt.matmul(&wt.t()?)) as Box<dyn Fn() -> candle_core::Result<candle_core::Tensor>>),
                ("candle x·(Wᵀ contiguous)", Box::new(|| xt.matmul(&wtt))),
                ("candle g·W", Box::new(|| gt.matmul(&wt))),
                ("candle gᵀ·x", Box::new(|| gt.t()?.matmul(&xt))),
            ] {
                f()?;
                let s = Instant::now();
                for _ in 0..10 {
                    f()?;
                }
                let t = s.elapsed().as_secs_f64() / 10.0;
                println!("({n}, {inp}) -> {out} {name}: {:.2} ms, {:.1} GFLOP/s", t * 1e3, flop / t * 1e-9);
            }
        }
        for (name, f) in &cases {
            let mut d = Vec::new();
            f(&mut d)?;
            let reps = 10;
            let s = Instant::now();
            for _ in 0..reps {
                f(&mut d)?;
            }
            let t = s.elapsed().as_secs_f64() / reps as f64;
            println!("({n}, {inp}) -> {out} {name}: {:.2} ms, {:.1} GFLOP/s", t * 1e3, flop / t * 1e-9);
        }
    }
    Ok(())
}
