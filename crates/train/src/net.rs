//! ExpensiveNet: `x (B, 784) → linear1 → ReLU → linear2 → ReLU → linear3 → logits (B, 10)`.
//!
//! Initialisation follows PyTorch's `nn.Linear` defaults: weight ~ U(−k, k) (kaiming-uniform with
//! a = √5 reduces to this) and bias ~ U(−k, k), with k = 1/√in_features; drawn from a seeded generator.

use candle_core::{Device, Tensor};
use lora::{Activation, Backend, LoraLinear, LoraModel};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Result, TrainError};

/// The seed's deliberately oversized MLP, with LoRA-capable layers `linear1..linear3`.
#[derive(Debug)]
pub struct ExpensiveNet {
    /// The three layers, named as PyTorch's state_dict names them.
    pub model: LoraModel,
}

/// The names of the layers, in forward order.
pub const LAYERS: [&str; 3] = ["linear1", "linear2", "linear3"];

impl ExpensiveNet {
    /// A freshly initialised network `inputs → hidden1 → hidden2 → classes`.
    pub fn new(inputs: usize, hidden1: usize, hidden2: usize, classes: usize, seed: u64, device: &Device) -> Result<Self> {
        for (name, v) in [("inputs", inputs), ("hidden1", hidden1), ("hidden2", hidden2), ("classes", classes)] {
            if v == 0 {
                return Err(TrainError::setting(name, v, "layer sizes must be at least 1"));
            }
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut model = LoraModel::new();
        for (name, (i, o)) in LAYERS.iter().zip([(inputs, hidden1), (hidden1, hidden2), (hidden2, classes)]) {
            let k = 1.0 / (i as f32).sqrt();
            let mut uniform = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-k..k)).collect() };
            let w = Tensor::from_vec(uniform(o * i), (o, i), device)?;
            let b = Tensor::from_vec(uniform(o), o, device)?;
            model.push(name, LoraLinear::new(w, Some(b))?)?;
        }
        Ok(ExpensiveNet { model })
    }

    /// A network from named tensors (`linear1.weight` (h1, in), `linear1.bias` (h1), …); sizes come from
    /// the shapes, which must chain. `source` names the origin in errors.
    pub fn from_tensors(get: impl Fn(&str) -> Option<Tensor>, source: &str) -> Result<Self> {
        let err = |why: String| TrainError::Model { path: source.to_string(), why };
        let mut model = LoraModel::new();
        let mut prev: Option<usize> = None;
        for name in LAYERS {
            let w = get(&format!("{name}.weight")).ok_or_else(|| err(format!("missing tensor {name}.weight")))?;
            let b = get(&format!("{name}.bias")).ok_or_else(|| err(format!("missing tensor {name}.bias")))?;
            let (o, i) = w.dims2().map_err(|_| err(format!("tensor {name}.weight has shape {:?}, expected 2 dimensions", w.dims())))?;
            if let Some(p) = prev {
                if p != i {
                    return Err(err(format!("tensor {name}.weight has {i} inputs but the previous layer has {p} outputs")));
                }
            }
            if b.dims() != [o] {
                return Err(err(format!("tensor {name}.bias has shape {:?}, expected [{o}]", b.dims())));
            }
            prev = Some(o);
            model.push(name, LoraLinear::new(w, Some(b))?)?;
        }
        Ok(ExpensiveNet { model })
    }

    /// A network from a safetensors file written by `lora pretrain` (PyTorch state_dict names); any other
    /// tensor in the file is refused by name.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let f = lora::io::TensorFile::load(path, &Device::Cpu).map_err(|e| TrainError::Lora(lora::LoraError::File(e)))?;
        let known: Vec<String> = LAYERS.iter().flat_map(|l| [format!("{l}.weight"), format!("{l}.bias")]).collect();
        if let Some((extra, _)) = f.tensors.iter().find(|(n, _)| !known.contains(n)) {
            return Err(TrainError::Model {
                path: path.display().to_string(),
                why: format!("unexpected tensor {extra} (an ExpensiveNet file holds {})", known.join(", ")),
            });
        }
        Self::from_tensors(|n| f.get(n).cloned(), &path.display().to_string())
    }

    /// Writes the base tensors (PyTorch state_dict names, `{"format": "pt"}`) to `path` atomically, the file
    /// [`ExpensiveNet::load`] reads; returns its size in bytes.
    pub fn save(&self, path: &std::path::Path) -> Result<u64> {
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let file = |e| TrainError::Lora(lora::LoraError::File(e));
        lora::io::save_safetensors(path, &self.model.base_state()?, &meta).map_err(file)?;
        std::fs::metadata(path).map(|m| m.len()).map_err(|e| file(lora::io::FileError::Io { path: path.to_path_buf(), error: e }))
    }

    /// Logits for x: (B, inputs) → (B, classes). `train` enables adapter dropout.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.model.layer("linear1")?.forward_act_t(x, train, Activation::Relu)?; // (B, h1)
        let h = self.model.layer("linear2")?.forward_act_t(&h, train, Activation::Relu)?; // (B, h2)
        Ok(self.model.layer("linear3")?.forward_t(&h, train)?) // (B, classes)
    }

    /// Sets the implementation (fused ops or plain candle) of every layer, and so of [`crate::train`].
    pub fn set_backend(&mut self, backend: Backend) {
        for (_, l) in self.model.layers_mut() {
            l.set_backend(backend);
        }
    }
    /// The implementation the layers use (that of `linear1`; [`ExpensiveNet::set_backend`] sets all).
    pub fn backend(&self) -> Backend {
        self.model.layer_at(0).map_or(Backend::default(), |l| l.backend())
    }

    /// Inference logits: (B, inputs) → (B, classes).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }

    /// Runs `f` with every adapter switched off, then restores each layer's previous state.
    pub fn with_adapters_disabled<T>(&mut self, f: impl FnOnce(&ExpensiveNet) -> T) -> Result<T> {
        let before: Vec<bool> = self.model.layers().map(|(_, l)| l.is_disabled()).collect();
        self.model.set_disabled(true)?;
        let out = f(self);
        for ((_, l), was) in self.model.layers_mut().zip(before) {
            l.set_disabled(was)?;
        }
        Ok(out)
    }

    /// (inputs, hidden1, hidden2, classes).
    pub fn sizes(&self) -> Result<[usize; 4]> {
        let l = |n| self.model.layer(n);
        Ok([l("linear1")?.in_features(), l("linear1")?.out_features(), l("linear2")?.out_features(), l("linear3")?.out_features()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_sizes_have_the_seeds_parameter_count() {
        let n = ExpensiveNet::new(784, 1000, 2000, 10, 0, &Device::Cpu).unwrap();
        assert_eq!(n.model.num_base_params(), 2_807_010);
    }

    #[test]
    fn init_is_uniform_within_one_over_sqrt_fan_in_and_seeded() {
        let a = ExpensiveNet::new(50, 20, 10, 3, 7, &Device::Cpu).unwrap();
        let b = ExpensiveNet::new(50, 20, 10, 3, 7, &Device::Cpu).unwrap();
        let w = |n: &ExpensiveNet| n.model.layer("linear1").unwrap().weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(w(&a), w(&b));
        let k = 1.0 / 50f32.sqrt();
        let v = w(&a);
        assert!(v.iter().all(|x| x.abs() <= k));
        // 1000 draws from U(-k, k): the max is within a few percent of k.
        assert!(v.iter().cloned().fold(0f32, f32::max) > 0.95 * k);
    }

    #[test]
    fn from_tensors_rejects_shapes_that_do_not_chain() {
        let dev = Device::Cpu;
        let get = |n: &str| -> Option<Tensor> {
            let s: Vec<usize> = match n {
                "linear1.weight" => vec![4, 6],
                "linear1.bias" => vec![4],
                "linear2.weight" => vec![3, 5],
                "linear2.bias" => vec![3],
                "linear3.weight" => vec![2, 3],
                _ => vec![2],
            };
            Some(Tensor::zeros(s, candle_core::DType::F32, &dev).unwrap())
        };
        let e = ExpensiveNet::from_tensors(get, "m.safetensors").unwrap_err().to_string();
        assert!(e.contains("m.safetensors") && e.contains("linear2.weight has 5 inputs"), "{e}");
    }
}
