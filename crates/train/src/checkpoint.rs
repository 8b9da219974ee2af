//! Checkpoint files: one safetensors file per run (`DIR/checkpoint.safetensors`, written atomically)
//! holding the model's tensors (`model.<layer>.weight|bias`), every tensor of the adapter being trained
//! (`adapter.<layer>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`, …, named as in PEFT
//! files), Adam's moments (`optim.m.<param>`, `optim.v.<param>`) and, in the metadata, the position
//! (step, losses, timings), Adam's step count and the run's settings, which a resume must match.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lora::io::{save_safetensors, TensorFile};
use serde_json::{json, Value};

use crate::error::{Result, TrainError};
use crate::fused::OptimState;
use crate::net::ExpensiveNet;
use crate::train::Checkpoint;

/// File name of a checkpoint inside its directory.
pub const FILE: &str = "checkpoint.safetensors";
const META: &str = "lora_rs.checkpoint";

/// Writes a checkpoint of `net` (base, plus `adapter`'s tensors when given) at `ck`'s position.
pub fn save(dir: &Path, phase: &str, net: &ExpensiveNet, adapter: Option<&str>, settings: &Value, ck: &Checkpoint) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = net.model.base_state()?.into_iter().map(|(n, t)| (format!("model.{n}"), t)).collect();
    if let Some(name) = adapter {
        for (module, l) in net.model.layers() {
            for (which, var) in l.adapter_vars(name) {
                tensors.push((format!("adapter.{module}.{which}"), var.as_tensor().copy()?));
            }
        }
    }
    let mut names = Vec::new();
    for (name, m, v) in &ck.optim.params {
        tensors.push((format!("optim.m.{name}"), Tensor::from_slice(m, m.len(), &Device::Cpu)?));
        tensors.push((format!("optim.v.{name}"), Tensor::from_slice(v, v.len(), &Device::Cpu)?));
        names.push(name.clone());
    }
    let meta = json!({"phase": phase, "global_step": ck.global_step, "adam_t": ck.optim.t, "optim_params": names,
        "losses": ck.losses, "step_seconds": ck.step_seconds, "settings": settings});
    let meta = HashMap::from([("format".to_string(), "pt".to_string()), (META.to_string(), meta.to_string())]);
    save_safetensors(&dir.join(FILE), &tensors, &meta).map_err(lora::LoraError::from)?;
    Ok(())
}

/// A checkpoint read back.
#[derive(Debug)]
pub struct Loaded {
    /// The file: the model's and the adapter's tensors by name.
    pub file: TensorFile,
    /// The position and the optimizer state.
    pub checkpoint: Checkpoint,
}

impl Loaded {
    /// The tensor `prefix.name`, if present.
    pub fn tensor(&self, prefix: &str, name: &str) -> Option<Tensor> {
        self.file.get(&format!("{prefix}.{name}")).cloned()
    }
    /// The network stored in the checkpoint.
    pub fn net(&self) -> Result<ExpensiveNet> {
        ExpensiveNet::from_tensors(|n| self.tensor("model", n), &self.file.path.display().to_string())
    }
}

/// Reads `dir/checkpoint.safetensors`, checks it is a `phase` checkpoint whose settings equal `settings`.
pub fn load(dir: &Path, phase: &str, settings: &Value) -> Result<Loaded> {
    let path: PathBuf = dir.join(FILE);
    let file = TensorFile::load(&path, &Device::Cpu).map_err(lora::LoraError::from)?;
    let bad = |why: String| TrainError::Model { path: path.display().to_string(), why };
    let meta: Value =
        serde_json::from_str(file.metadata.get(META).ok_or_else(|| bad(format!("no {META} metadata: not a lora-rs checkpoint")))?)
            .map_err(|e| bad(format!("{META} metadata: {e}")))?;
    if meta["phase"] != phase {
        return Err(bad(format!("a {} checkpoint, not a {phase} checkpoint", meta["phase"])));
    }
    if let (Some(saved), Some(now)) = (meta["settings"].as_object(), settings.as_object()) {
        for (k, v) in now {
            if saved.get(k) != Some(v) {
                return Err(bad(format!(
                    "saved with {k} = {}, but this run has {k} = {v}; resume with the same settings",
                    saved.get(k).unwrap_or(&Value::Null)
                )));
            }
        }
    }
    let num = |k: &str| meta[k].as_u64().map(|n| n as usize).ok_or_else(|| bad(format!("metadata field {k} missing")));
    let global_step = num("global_step")?;
    let t = num("adam_t")?;
    let losses: Vec<f32> = serde_json::from_value(meta["losses"].clone()).map_err(|e| bad(format!("losses: {e}")))?;
    let step_seconds: Vec<f64> = serde_json::from_value(meta["step_seconds"].clone()).map_err(|e| bad(format!("step_seconds: {e}")))?;
    let names: Vec<String> = serde_json::from_value(meta["optim_params"].clone()).map_err(|e| bad(format!("optim_params: {e}")))?;
    if losses.len() != global_step || step_seconds.len() != global_step {
        return Err(bad(format!("{} losses for {global_step} steps", losses.len())));
    }
    let mut params = Vec::new();
    for n in names {
        let get = |k: &str| -> Result<Vec<f32>> {
            let t = file.get(&format!("optim.{k}.{n}")).ok_or_else(|| bad(format!("missing tensor optim.{k}.{n}")))?;
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        params.push((n.clone(), get("m")?, get("v")?));
    }
    let checkpoint = Checkpoint { global_step, losses, step_seconds, optim: OptimState { t, params } };
    Ok(Loaded { file, checkpoint })
}

/// The default checkpoint directory for an output path: `OUT.ckpt` beside it.
pub fn default_dir(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".ckpt");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lora::LoraConfig;
    use rand::SeedableRng;

    #[test]
    fn a_checkpoint_reads_back_as_written_and_refuses_other_settings_by_name() {
        let mut net = ExpensiveNet::new(12, 8, 6, 10, 3, &Device::Cpu).unwrap();
        let c = LoraConfig { use_dora: true, init: lora::Init::Kaiming, ..LoraConfig::new(2, 4.0) };
        net.model.add_adapter("a", &c, &mut rand::rngs::StdRng::seed_from_u64(1)).unwrap();
        let ck = Checkpoint {
            global_step: 2,
            losses: vec![1.5, 1.25],
            step_seconds: vec![0.1, 0.2],
            optim: OptimState { t: 2, params: vec![("linear1.0".into(), vec![0.5; 3], vec![0.25; 3])] },
        };
        let dir = tempfile::tempdir().unwrap();
        let settings = json!({"rank": 2, "digit": 3});
        save(dir.path(), "finetune", &net, Some("a"), &settings, &ck).unwrap();
        let back = load(dir.path(), "finetune", &settings).unwrap();
        assert_eq!(back.checkpoint, ck);
        // Every adapter tensor is stored, DoRA's magnitude included.
        let mag = net.model.layer("linear2").unwrap().adapter("a").unwrap().magnitude().unwrap().as_tensor().to_vec1::<f32>().unwrap();
        let stored = back.tensor("adapter", "linear2.lora_magnitude_vector").unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(mag, stored);
        assert_eq!(back.net().unwrap().sizes().unwrap(), net.sizes().unwrap());
        let e = load(dir.path(), "finetune", &json!({"rank": 4, "digit": 3})).unwrap_err().to_string();
        assert!(e.contains("rank = 2") && e.contains("rank = 4") && e.contains("checkpoint.safetensors"), "{e}");
        let e = load(dir.path(), "pretrain", &settings).unwrap_err().to_string();
        assert!(e.contains("not a pretrain checkpoint"), "{e}");
    }
}
