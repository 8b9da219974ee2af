//! [`LoraModel`]: the named linear layers of a network, managed together.
//!
//! An adapter name spans layers: adding adapter `"digit9"` with a config creates an (A, B) pair in every
//! targeted layer; activating it activates it in each layer that holds it. The model does not know how its
//! layers are wired (the network owning it does); it knows names, adapters and parameters.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{Tensor, Var};
use lora_kernels::Bf16Matrix;
use rand::Rng;

use crate::config::{Bias, LoraConfig};
use crate::error::{LoraError, Result};
use crate::linear::{Base, LoraLinear, WeightKey};

/// Named [`LoraLinear`] layers, in order, with model-wide adapter operations.
#[derive(Debug, Default)]
pub struct LoraModel {
    layers: Vec<(String, LoraLinear)>,
    /// Each layer's position in `layers`, by name.
    positions: HashMap<String, usize>,
    /// Each adapter's configuration, `target_modules` resolved to the layers that hold it.
    configs: BTreeMap<String, LoraConfig>,
    /// The output layer, left out by `"all-linear"`.
    output: Option<String>,
}

impl LoraModel {
    /// An empty model.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a layer; names must be unique.
    pub fn push(&mut self, name: &str, layer: LoraLinear) -> Result<()> {
        if self.positions.contains_key(name) {
            return Err(LoraError::config("module", name, "a module of that name already exists"));
        }
        self.positions.insert(name.to_string(), self.layers.len());
        self.layers.push((name.to_string(), layer));
        Ok(())
    }

    fn unknown_module(&self, name: &str) -> LoraError {
        LoraError::UnknownModule { module: name.to_string(), known: self.layer_names().collect::<Vec<_>>().join(", ") }
    }

    /// The layer called `name`.
    pub fn layer(&self, name: &str) -> Result<&LoraLinear> {
        Ok(&self.layers[self.position(name)?].1)
    }
    /// The layer called `name`, mutably.
    pub fn layer_mut(&mut self, name: &str) -> Result<&mut LoraLinear> {
        let i = self.position(name)?;
        Ok(&mut self.layers[i].1)
    }
    /// The position (in push order) of the layer called `name`: what [`LoraModel::layer_at`],
    /// [`LoraModel::forward_mixed`] and a [`crate::PackedAdapter`]'s layers are indexed by.
    pub fn position(&self, name: &str) -> Result<usize> {
        self.positions.get(name).copied().ok_or_else(|| self.unknown_module(name))
    }
    /// The layer at position `i` (in push order).
    pub fn layer_at(&self, i: usize) -> Option<&LoraLinear> {
        self.layers.get(i).map(|(_, l)| l)
    }
    /// Layer names in order.
    pub fn layer_names(&self) -> impl Iterator<Item = &str> {
        self.layers.iter().map(|(n, _)| n.as_str())
    }
    /// `(name, layer)` pairs in order.
    pub fn layers(&self) -> impl Iterator<Item = (&str, &LoraLinear)> {
        self.layers.iter().map(|(n, l)| (n.as_str(), l))
    }
    /// `(name, layer)` pairs in order, mutably.
    pub fn layers_mut(&mut self) -> impl Iterator<Item = (&str, &mut LoraLinear)> {
        self.layers.iter_mut().map(|(n, l)| (n.as_str(), l))
    }

    /// Marks layer `name` as the model's output layer, which `"all-linear"` leaves out (as PEFT does for a
    /// transformers model's output embedding).
    pub fn set_output_layer(&mut self, name: &str) -> Result<()> {
        self.layer(name)?;
        self.output = Some(name.to_string());
        Ok(())
    }

    /// Names of the layers `config` adapts, by PEFT's rules ([`crate::peft::matching`]). A listed name that
    /// matches no layer, and a config that adapts nothing, are errors.
    pub fn targeted(&self, config: &LoraConfig) -> Result<Vec<String>> {
        config.validate()?;
        for t in config.target_modules.names() {
            if !self.layer_names().any(|n| n == t || n.ends_with(&format!(".{t}"))) {
                return Err(self.unknown_module(t));
            }
        }
        let out: Vec<String> = self
            .layer_names()
            .filter(|n| {
                // "all-linear": linear layers only, and not a transformers model's output embedding.
                !(config.target_modules == crate::Targets::AllLinear
                    && (self.output.as_deref() == Some(*n) || self.layer(n).is_ok_and(LoraLinear::is_embedding)))
            })
            .filter(|n| config.targets(n))
            .map(String::from)
            .collect();
        if out.is_empty() {
            return Err(LoraError::config(
                "target_modules",
                config.target_modules.to_string(),
                format!("adapts no module of this model (it has {})", self.layer_names().collect::<Vec<_>>().join(", ")),
            ));
        }
        Ok(out)
    }

    /// Adds adapter `name` to every layer `config` targets, started as `config.init` says (drawing from
    /// `rng`): the model's outputs are unchanged until the adapter trains, except with [`crate::Init::Random`].
    /// Does not activate it. On error no layer keeps the adapter.
    pub fn add_adapter<R: Rng + ?Sized>(&mut self, name: &str, config: &LoraConfig, rng: &mut R) -> Result<()> {
        config.validate()?;
        if self.adapter_names().iter().any(|n| n == name) {
            return Err(LoraError::DuplicateAdapter(name.to_string()));
        }
        let targets = self.targeted(config)?;
        let saved: Vec<String> = self.layer_names().filter(|m| config.saves(m)).map(String::from).collect();
        if let Some(m) = saved.iter().find(|m| targets.contains(m)) {
            return Err(LoraError::config("modules_to_save", m, "is also a LoRA target: a layer is either adapted or trained in full"));
        }
        if let Some(m) = config.modules_to_save.iter().find(|m| !self.layer_names().any(|l| l.ends_with(m.as_str()))) {
            let have = self.layer_names().collect::<Vec<_>>().join(", ");
            return Err(LoraError::config("modules_to_save", m, format!("names no module of this model (it has {have})")));
        }
        if let Err(e) = self.add_adapter_parts(name, config, &targets, &saved, rng) {
            for (_, l) in &mut self.layers {
                if l.has_adapter(name) {
                    l.remove_adapter(name)?;
                }
            }
            return Err(e);
        }
        self.configs.insert(name.to_string(), LoraConfig { target_modules: crate::Targets::Names(targets), ..config.clone() });
        Ok(())
    }

    fn add_adapter_parts<R: Rng + ?Sized>(
        &mut self,
        name: &str,
        config: &LoraConfig,
        targets: &[String],
        saved: &[String],
        rng: &mut R,
    ) -> Result<()> {
        for module in targets {
            self.layer_mut(module)?.add_adapter(name, config.spec_for(module), rng)?;
        }
        for (module, l) in &mut self.layers {
            // PEFT's trained biases (every bias, or those of adapted layers) and full copies, as copies of the
            // base tensors that the adapter owns: the base itself never trains.
            let full = saved.contains(module);
            let bias =
                l.bias().is_some() && (full || config.bias == Bias::All || (config.bias == Bias::LoraOnly && targets.contains(module)));
            if full || bias {
                let w = if full { Some(l.weight()?) } else { None };
                let b = if bias { l.bias().map(|b| b.as_tensor().clone()) } else { None };
                l.insert_override(name, w.as_ref(), b.as_ref())?;
            }
        }
        Ok(())
    }

    /// Removes adapter `name` from every layer holding it.
    pub fn remove_adapter(&mut self, name: &str) -> Result<()> {
        self.check_adapter(name)?;
        for (_, l) in self.layers.iter_mut().filter(|(_, l)| l.has_adapter(name)) {
            l.remove_adapter(name)?;
        }
        self.configs.remove(name);
        Ok(())
    }

    /// The configuration adapter `name` was created or loaded with (`target_modules` = the layers holding it).
    pub fn adapter_config(&self, name: &str) -> Result<&LoraConfig> {
        self.check_adapter(name)?;
        self.configs.get(name).ok_or_else(|| LoraError::State(format!("adapter {name:?} has no recorded config")))
    }

    /// Records the config of an adapter inserted layer by layer (file loading, combination).
    pub(crate) fn set_adapter_config(&mut self, name: &str, config: LoraConfig) {
        self.configs.insert(name.to_string(), config);
    }

    /// Every adapter name held by any layer, sorted and unique.
    pub fn adapter_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.layers.iter().flat_map(|(_, l)| l.adapter_names().map(String::from)).collect();
        v.sort();
        v.dedup();
        v
    }

    pub(crate) fn check_adapter(&self, name: &str) -> Result<()> {
        if self.layers.iter().any(|(_, l)| l.has_adapter(name)) {
            Ok(())
        } else {
            let known = self.adapter_names();
            Err(LoraError::UnknownAdapter(name.to_string(), if known.is_empty() { "none".into() } else { known.join(", ") }))
        }
    }

    /// Activates exactly `names` (each layer activates those it holds). Copies no weight: microseconds.
    pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            self.check_adapter(n)?;
        }
        for (_, l) in &mut self.layers {
            let here: Vec<&str> = names.iter().copied().filter(|n| l.has_adapter(n)).collect();
            l.set_active(&here)?;
        }
        Ok(())
    }

    /// The active adapter names (union over layers, in activation order of the first layer holding them).
    pub fn active(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for (_, l) in &self.layers {
            for a in l.active() {
                if !v.contains(a) {
                    v.push(a.clone());
                }
            }
        }
        v
    }

    /// Switches all adapters off (`true`) or on in every layer.
    pub fn set_disabled(&mut self, disabled: bool) -> Result<()> {
        for (_, l) in &mut self.layers {
            l.set_disabled(disabled)?;
        }
        Ok(())
    }

    /// Runs `f` with every adapter switched off, then restores each layer's previous state (also on error).
    pub fn with_adapters_disabled<T>(&mut self, f: impl FnOnce(&Self) -> T) -> Result<T> {
        let before: Vec<bool> = self.layers.iter().map(|(_, l)| l.is_disabled()).collect();
        self.set_disabled(true)?;
        let out = f(self);
        for ((_, l), was) in self.layers.iter_mut().zip(before) {
            l.set_disabled(was)?;
        }
        Ok(out)
    }

    /// Freezes every base weight and bias, then unfreezes biases as `bias` asks.
    pub fn freeze_base(&mut self, bias: Bias) {
        for (_, l) in &mut self.layers {
            let lora = l.adapter_names().next().is_some();
            let train_bias = match bias {
                Bias::None => false,
                Bias::All => true,
                Bias::LoraOnly => lora,
            };
            l.freeze_base();
            l.set_bias_trainable(train_bias);
        }
    }

    /// Makes every base weight and bias trainable (pre-training / full fine-tuning); weights held in bf16
    /// are widened to f32 first ([`LoraModel::widen_base`]).
    pub fn unfreeze_base(&mut self) -> Result<()> {
        self.widen_base()?;
        for (_, l) in &mut self.layers {
            l.set_base_trainable(true, true)?;
        }
        Ok(())
    }

    /// Holds every frozen f32 base weight whose values are all bf16 numbers in bf16 instead (half the bytes;
    /// every product gives the same bits): a checkpoint stored in bf16 and read into f32, or a model whose
    /// weights were rounded to bf16. Layers that share a weight keep sharing it. Weights that train, hold
    /// merged adapters or have other values stay f32. Returns how many weights it packed.
    pub fn hold_base_in_bf16(&mut self) -> Result<usize> {
        let mut done: HashMap<WeightKey, Option<Arc<Bf16Matrix>>> = HashMap::new();
        let mut packed = 0;
        for (_, l) in &mut self.layers {
            let Some(var) = l.weight_var() else { continue };
            if l.base_trainable().0 || !l.merged().is_empty() {
                continue;
            }
            let key = l.weight_key();
            if let std::collections::hash_map::Entry::Vacant(e) = done.entry(key) {
                let [rows, cols] = l.weight_dims();
                let m = Bf16Matrix::pack(&crate::bridge::values(var.as_tensor())?, rows, cols).map(Arc::new);
                packed += usize::from(m.is_some());
                e.insert(m);
            }
            if let Some(Some(m)) = done.get(&key) {
                l.replace_weight(Base::Bf16(m.clone()));
            }
        }
        // Layers that share one weight (a tied output embedding) widen it together, never alone.
        let mut holders: HashMap<WeightKey, usize> = HashMap::new();
        for (_, l) in &self.layers {
            *holders.entry(l.weight_key()).or_default() += 1;
        }
        for (_, l) in &mut self.layers {
            if holders[&l.weight_key()] > 1 {
                l.mark_tied();
            }
        }
        Ok(packed)
    }

    /// Widens every base weight held in bf16 to an f32 variable (exact), once per shared weight: layers that
    /// shared a bf16 weight share the f32 variable.
    pub fn widen_base(&mut self) -> Result<()> {
        let mut done: HashMap<WeightKey, Var> = HashMap::new();
        for (_, l) in &mut self.layers {
            if l.weight_bf16().is_none() {
                continue;
            }
            let key = l.weight_key();
            let var = match done.get(&key) {
                Some(v) => v.clone(),
                None => {
                    let v = Var::from_tensor(&l.weight()?)?;
                    done.insert(key, v.clone());
                    v
                }
            };
            l.replace_weight(Base::F32(var));
        }
        Ok(())
    }

    /// Every trainable tensor, layer by layer.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.layers.iter().flat_map(|(_, l)| l.trainable_vars()).collect()
    }

    /// Deep copies of the base tensors as they are stored now, named like PyTorch's state_dict
    /// (`<layer>.weight`, `<layer>.bias`).
    pub fn base_state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v = Vec::new();
        for (n, l) in &self.layers {
            v.push((format!("{n}.weight"), l.weight()?.copy()?));
            if let Some(b) = l.bias() {
                v.push((format!("{n}.bias"), b.as_tensor().copy()?));
            }
        }
        Ok(v)
    }

    /// Total base parameters (weights and biases).
    pub fn num_base_params(&self) -> usize {
        self.layers.iter().map(|(_, l)| l.num_base_params()).sum()
    }

    /// Parameters of adapter `name` across layers.
    pub fn num_adapter_params(&self, name: &str) -> usize {
        self.layers.iter().map(|(_, l)| l.num_adapter_params(name)).sum()
    }

    /// Merges adapter `name` into each layer holding it (see [`LoraLinear::merge`]); on error, layers
    /// merged so far are unmerged again so the model is left as it was.
    pub fn merge(&mut self, name: &str, safe: bool) -> Result<()> {
        self.check_adapter(name)?;
        let mut done = Vec::new();
        for (i, (_, l)) in self.layers.iter_mut().enumerate() {
            if !l.has_adapter(name) {
                continue;
            }
            if let Err(e) = l.merge(name, safe) {
                for &j in &done {
                    let (_, lj): &mut (String, LoraLinear) = &mut self.layers[j];
                    lj.unmerge(name)?;
                }
                return Err(e);
            }
            done.push(i);
        }
        Ok(())
    }

    /// Unmerges adapter `name` from each layer where it is merged.
    pub fn unmerge(&mut self, name: &str) -> Result<()> {
        self.check_adapter(name)?;
        for (_, l) in &mut self.layers {
            if l.merged().iter().any(|m| m == name) {
                l.unmerge(name)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn model() -> LoraModel {
        let mut m = LoraModel::new();
        let dev = Device::Cpu;
        for (n, i, o) in [("linear1", 6, 5), ("linear2", 5, 4)] {
            let w = Tensor::randn(0f32, 1.0, (o, i), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, o, &dev).unwrap();
            m.push(n, LoraLinear::new(w, Some(b)).unwrap()).unwrap();
        }
        m
    }

    #[test]
    fn layers_are_found_by_name_at_the_position_they_were_pushed() {
        let mut m = model();
        assert_eq!((m.position("linear1").unwrap(), m.position("linear2").unwrap()), (0, 1));
        assert!(std::ptr::eq(m.layer("linear2").unwrap(), m.layer_at(1).unwrap()));
        let e = m.position("linear3").unwrap_err().to_string();
        assert!(e.contains("linear3") && e.contains("linear1, linear2"), "{e}");
        let e = m.push("linear1", LoraLinear::new(Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(), None).unwrap()).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        assert_eq!(m.layer_names().count(), 2);
    }

    #[test]
    fn adding_an_adapter_targets_the_named_modules_with_their_ranks() {
        let mut m = model();
        let mut c = LoraConfig::new(2, 4.0);
        c.rank_pattern.insert("linear2", 3);
        m.add_adapter("a", &c, &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(m.layer("linear1").unwrap().adapter("a").unwrap().rank(), 2);
        assert_eq!(m.layer("linear2").unwrap().adapter("a").unwrap().rank(), 3);
        assert_eq!(m.num_adapter_params("a"), 2 * (6 + 5) + 3 * (5 + 4));
        c.target_modules = crate::Targets::Names(vec!["linear9".into()]);
        let e = m.add_adapter("b", &c, &mut StdRng::seed_from_u64(0)).unwrap_err().to_string();
        assert!(e.contains("linear9") && e.contains("linear1, linear2"), "{e}");
    }

    #[test]
    fn freezing_leaves_only_active_adapter_tensors_trainable() {
        let mut m = model();
        m.add_adapter("a", &LoraConfig::default(), &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(m.trainable_vars().len(), 4); // weights and biases; "a" is not active
        m.set_active(&["a"]).unwrap();
        m.freeze_base(Bias::None);
        let vars = m.trainable_vars();
        assert_eq!(vars.len(), 4);
        assert!(vars.iter().all(|v| v.dims()[0] == 1 || v.dims()[1] == 1));
        m.freeze_base(Bias::All);
        assert_eq!(m.trainable_vars().len(), 6);
    }

    #[test]
    fn with_adapters_disabled_restores_the_previous_state() {
        let mut m = model();
        m.add_adapter("a", &LoraConfig::default(), &mut StdRng::seed_from_u64(0)).unwrap();
        m.set_active(&["a"]).unwrap();
        let seen = m.with_adapters_disabled(|m| m.layer("linear1").unwrap().is_disabled()).unwrap();
        assert!(seen);
        assert!(!m.layer("linear1").unwrap().is_disabled());
        assert!(m.set_active(&["zzz"]).unwrap_err().to_string().contains("zzz"));
    }

    #[test]
    fn failed_safe_merge_rolls_back_earlier_layers() {
        let mut m = model();
        m.add_adapter("a", &LoraConfig::default(), &mut StdRng::seed_from_u64(0)).unwrap();
        let l2 = m.layer("linear2").unwrap().adapter("a").unwrap();
        l2.b().set(&Tensor::full(f32::NAN, (4, 1), &Device::Cpu).unwrap()).unwrap();
        let l1 = m.layer("linear1").unwrap().adapter("a").unwrap();
        l1.b().set(&Tensor::ones((5, 1), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let before = m.base_state().unwrap();
        assert!(m.merge("a", true).is_err());
        let after = m.base_state().unwrap();
        assert!(m.layers().all(|(_, l)| l.merged().is_empty()));
        for ((_, a), (_, b)) in before.iter().zip(&after) {
            let (a, b) = (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            // linear1 was merged then unmerged: within 2 ulp of |W|+|ΔW| (≤ ~10 for N(0,1) entries).
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 2.0 * f32::EPSILON * (x.abs() + 10.0)));
        }
    }
}
