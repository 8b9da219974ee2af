//! One Adam step over ExpensiveNet's largest weight (2000 × 1000): the fused in-place kernel vs
//! `candle_nn::AdamW` (weight_decay 0).
//!
//!     cargo bench -p lora-train --bench optimizer

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use criterion::{criterion_group, criterion_main, Criterion};
use lora_train::fused::{adam_update, AdamConfig, AdamStep};

fn bench(c: &mut Criterion) {
    let n = 2000 * 1000;
    let dev = Device::Cpu;
    let g = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
    let mut group = c.benchmark_group("adam_step_2M");

    let gv = g.to_vec1::<f32>().unwrap();
    let (mut theta, mut m, mut v) = (vec![0.1f32; n], vec![0f32; n], vec![0f32; n]);
    let cfg = AdamConfig::default();
    let mut t = 0;
    group.bench_function("fused", |b| {
        b.iter(|| {
            t += 1;
            adam_update(&mut theta, &gv, &mut m, &mut v, AdamStep::new(&cfg, t)).unwrap();
        })
    });

    let var = Var::from_tensor(&Tensor::full(0.1f32, n, &dev).unwrap()).unwrap();
    let mut opt = AdamW::new(vec![var.clone()], ParamsAdamW { weight_decay: 0.0, ..ParamsAdamW::default() }).unwrap();
    let grads = (var.as_tensor() * &g).unwrap().sum_all().unwrap().backward().unwrap(); // ∂/∂θ = g
    group.bench_function("candle_adamw", |b| b.iter(|| opt.step(&grads).unwrap()));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
