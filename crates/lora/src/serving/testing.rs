//! Helpers of the serving module's tests: a one-layer model and adapter files for it, in memory.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{Device, Tensor};

use crate::config::LoraConfig;
use crate::linear::testing::{rand_vec, t2};
use crate::linear::LoraLinear;
use crate::model::LoraModel;
use crate::peft::AdapterFiles;

/// The layer's inputs.
pub const IN: usize = 37;
/// The layer's outputs.
pub const OUT: usize = 29;

/// One layer "fc" (OUT, IN) with a bias, random values.
pub fn model() -> LoraModel {
    let mut m = LoraModel::new();
    let w = t2(rand_vec(OUT * IN, 1), (OUT, IN));
    m.push("fc", LoraLinear::new(w, Some(Tensor::from_vec(rand_vec(OUT, 2), OUT, &Device::Cpu).unwrap())).unwrap()).unwrap();
    m
}

/// Adapter files of rank r for "fc", random A and B.
pub fn files(r: usize, alpha: f64, seed: u64) -> AdapterFiles {
    let a = t2(rand_vec(r * IN, seed), (r, IN));
    let b = t2(rand_vec(OUT * r, seed + 1), (OUT, r));
    let config = LoraConfig { r, alpha, target_modules: crate::Targets::Names(vec!["fc".into()]), ..LoraConfig::default() };
    AdapterFiles {
        dir: PathBuf::from("mem"),
        config,
        base_model_name_or_path: None,
        tensors: BTreeMap::from([("fc".to_string(), (a, b))]),
        magnitudes: BTreeMap::new(),
        lora_biases: BTreeMap::new(),
        copies: BTreeMap::new(),
        base_weights: BTreeMap::new(),
        metadata: HashMap::new(),
        dtypes: Vec::new(),
        bytes: (0, 0),
    }
}
