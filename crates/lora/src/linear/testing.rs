//! Helpers of the crate's unit tests: deterministic random values and tensors, a layer with one adapter,
//! a DoRA layer, and an f64 reference of the LoRA forward that shares no code with candle or the kernels.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Adapter, Backend, LoraLinear};

/// Deterministic values in [-1, 1), never exactly zero in practice (each test its own generator).
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

/// Plain triple loops in f64: an independent reference that shares no code with candle.
#[allow(clippy::too_many_arguments)]
pub fn reference(x: &[f32], w: &[f32], b: &[f32], a: &[f32], bb: &[f32], s: f64, n: usize, inp: usize, out: usize, r: usize) -> Vec<f64> {
    let mut y = vec![0f64; n * out];
    for i in 0..n {
        let mut xa = vec![0f64; r];
        for k in 0..r {
            xa[k] = (0..inp).map(|j| x[i * inp + j] as f64 * a[k * inp + j] as f64).sum();
        }
        for o in 0..out {
            let base: f64 = (0..inp).map(|j| x[i * inp + j] as f64 * w[o * inp + j] as f64).sum::<f64>() + b[o] as f64;
            let delta: f64 = (0..r).map(|k| xa[k] * bb[o * r + k] as f64).sum();
            y[i * out + o] = base + s * delta;
        }
    }
    y
}

/// A layer (n_out, n_in) with a bias and adapter "x" of rank r active (scale alpha/r, B non-zero); returns
/// the layer and its values [W, b, A, B].
pub fn layer_with_adapter(n_in: usize, n_out: usize, r: usize, alpha: f64, seed: u64) -> (LoraLinear, Vec<Vec<f32>>) {
    let w = rand_vec(n_out * n_in, seed);
    let b = rand_vec(n_out, seed + 1);
    let a = rand_vec(r * n_in, seed + 2);
    let bb = rand_vec(n_out * r, seed + 3);
    let mut l = LoraLinear::new(t2(w.clone(), (n_out, n_in)), Some(Tensor::from_vec(b.clone(), n_out, &Device::Cpu).unwrap())).unwrap();
    let ad = Adapter::from_tensors(&t2(a.clone(), (r, n_in)), &t2(bb.clone(), (n_out, r)), alpha, alpha / r as f64, 0.0).unwrap();
    l.insert_adapter("x", ad).unwrap();
    l.set_active(&["x"]).unwrap();
    (l, vec![w, b, a, bb])
}

/// A DoRA layer: W, b, A, B random; m = 1 + |u| so f = m/‖W + sBA‖ is far from 1.
pub fn dora_layer(inp: usize, out: usize, r: usize, seed: u64) -> LoraLinear {
    let (mut l, _) = layer_with_adapter(inp, out, r, 3.0, seed);
    let ad = l.remove_adapter("x").unwrap().unwrap();
    let m: Vec<f32> = rand_vec(out, seed + 9).iter().map(|u| 1.0 + u.abs()).collect();
    let ad = Adapter::from_tensors(ad.a().as_tensor(), ad.b().as_tensor(), 3.0, ad.scale(), 0.0)
        .unwrap()
        .with_magnitude(&Tensor::from_vec(m, out, &Device::Cpu).unwrap())
        .unwrap();
    l.insert_adapter("x", ad).unwrap();
    l.set_active(&["x"]).unwrap();
    l.freeze_base();
    l.set_backend(Backend::Reference);
    l
}
