//! LoRA linear forward + backward, fused op vs the plain-candle reference, at ExpensiveNet's largest
//! layer (batch 64, 1000 → 2000, rank 1, base frozen, input tracked so dx is computed too).
//!
//!     cargo bench -p lora --bench lora_linear

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use lora::{Activation, Adapter, Backend, LoraLinear};

fn layer(backend: Backend) -> LoraLinear {
    let dev = Device::Cpu;
    let (inp, out, r) = (1000, 2000, 1);
    let w = Tensor::randn(0f32, 0.03, (out, inp), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.03, out, &dev).unwrap();
    let mut l = LoraLinear::new(w, Some(b)).unwrap();
    let a = Tensor::randn(0f32, 1.0, (r, inp), &dev).unwrap();
    let bb = Tensor::randn(0f32, 0.01, (out, r), &dev).unwrap();
    l.insert_adapter("a", Adapter::from_tensors(&a, &bb, 1.0, 1.0, 0.0).unwrap()).unwrap();
    l.set_active(&["a"]).unwrap();
    l.freeze_base();
    l.set_backend(backend);
    l
}

fn bench(c: &mut Criterion) {
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (64, 1000), &Device::Cpu).unwrap()).unwrap();
    let mut g = c.benchmark_group("lora_linear_fwd_bwd_64x1000x2000_r1");
    for (name, backend) in [("fused", Backend::Fused), ("reference", Backend::Reference)] {
        let l = layer(backend);
        g.bench_function(name, |bch| {
            bch.iter(|| {
                let y = l.forward_act_t(x.as_tensor(), true, Activation::Relu).unwrap();
                y.sum_all().unwrap().backward().unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
