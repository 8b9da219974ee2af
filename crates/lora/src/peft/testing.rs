//! Helpers of the PEFT module's tests.

use candle_core::{Device, Tensor};

use crate::linear::LoraLinear;
use crate::model::LoraModel;

/// Two layers, (5, 7) and (3, 5), random weights, no bias.
pub fn model() -> LoraModel {
    let mut m = LoraModel::new();
    for (n, i, o) in [("linear1", 7, 5), ("linear2", 5, 3)] {
        let w = Tensor::randn(0f32, 1.0, (o, i), &Device::Cpu).unwrap();
        m.push(n, LoraLinear::new(w, None).unwrap()).unwrap();
    }
    m
}

/// The bits of every value of `t`.
pub fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}
