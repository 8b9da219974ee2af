//! MNIST checkpoints in lora-rs' one checkpoint file ([`lora_optim::checkpoint`]): the model's tensors
//! (`model.<layer>.weight|bias`), every tensor of the adapter being trained (`adapter.<layer>.lora_A.weight`,
//! `.lora_B.weight`, `.lora_magnitude_vector`, …, named as in PEFT files), Adam's moments and, in the
//! metadata, the position (step, losses, timings), Adam's step count and the run's settings, which a
//! resume must match. The run kind is `mnist-<phase>` (`mnist-pretrain`, `mnist-finetune`).

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use lora_optim::checkpoint::{self as file, State};
use serde_json::Value;

use crate::error::Result;
use crate::fused::OptimState;
use crate::net::ExpensiveNet;
use crate::train::Checkpoint;

fn kind(phase: &str) -> String {
    format!("mnist-{phase}")
}

/// Writes a checkpoint of `net` (base, plus `adapter`'s tensors when given) at `ck`'s position to `path`.
pub fn save(path: &Path, phase: &str, net: &ExpensiveNet, adapter: Option<&str>, settings: &Value, ck: &Checkpoint) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = net.model.base_state()?.into_iter().map(|(n, t)| (format!("model.{n}"), t)).collect();
    if let Some(name) = adapter {
        for (module, l) in net.model.layers() {
            for (which, var) in l.adapter_vars(name) {
                tensors.push((format!("adapter.{module}.{which}"), var.as_tensor().copy()?));
            }
        }
    }
    let state = State {
        kind: kind(phase),
        step: ck.global_step,
        adam_steps: ck.optim.t as u64,
        losses: ck.losses.iter().map(|&l| l as f64).collect(),
        seconds: ck.step_seconds.clone(),
        settings: settings.clone(),
    };
    Ok(file::save(path, &file::Checkpoint { state, tensors, moments: ck.optim.moments.clone() })?)
}

/// A checkpoint read back.
#[derive(Debug)]
pub struct Loaded {
    /// The file it came from.
    pub path: PathBuf,
    /// The model's and the adapter's tensors by name.
    pub file: file::Checkpoint,
    /// The position and the optimizer state.
    pub checkpoint: Checkpoint,
}

impl Loaded {
    /// The tensor `prefix.name`, if present.
    pub fn tensor(&self, prefix: &str, name: &str) -> Option<Tensor> {
        let key = format!("{prefix}.{name}");
        self.file.tensors.iter().find(|(n, _)| *n == key).map(|(_, t)| t.clone())
    }
    /// The network stored in the checkpoint.
    pub fn net(&self) -> Result<ExpensiveNet> {
        ExpensiveNet::from_tensors(|n| self.tensor("model", n), &self.path.display().to_string())
    }
}

/// Reads a `phase` checkpoint from `path` and checks that its settings equal `settings`, key by key.
pub fn load(path: &Path, phase: &str, settings: &Value) -> Result<Loaded> {
    let f = file::load(path, &kind(phase), settings)?;
    // Losses were f32 when written: the f64 in the file holds them exactly.
    let checkpoint = Checkpoint {
        global_step: f.state.step,
        losses: f.state.losses.iter().map(|&l| l as f32).collect(),
        step_seconds: f.state.seconds.clone(),
        optim: OptimState { t: f.state.adam_steps as usize, moments: f.moments.clone() },
    };
    Ok(Loaded { path: path.to_path_buf(), file: f, checkpoint })
}

/// The default checkpoint file of an output path: `OUT.ckpt.safetensors` beside it.
pub fn default_path(out: &Path) -> PathBuf {
    file::default_path(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use lora::LoraConfig;
    use rand::SeedableRng;
    use serde_json::json;

    #[test]
    fn a_checkpoint_reads_back_as_written_and_refuses_other_settings_by_name() {
        let mut net = ExpensiveNet::new(12, 8, 6, 10, 3, &Device::Cpu).unwrap();
        let c = LoraConfig { use_dora: true, init: lora::Init::Kaiming, ..LoraConfig::new(2, 4.0) };
        net.model.add_adapter("a", &c, &mut rand::rngs::StdRng::seed_from_u64(1)).unwrap();
        let ck = Checkpoint {
            global_step: 2,
            losses: vec![1.5, 1.25],
            step_seconds: vec![0.1, 0.2],
            optim: OptimState {
                t: 2,
                moments: [("linear1.0".to_string(), lora_optim::Moments { m: vec![0.5; 3], v: vec![0.25; 3] })].into(),
            },
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.ckpt.safetensors");
        let settings = json!({"rank": 2, "digit": 3});
        save(&path, "finetune", &net, Some("a"), &settings, &ck).unwrap();
        let back = load(&path, "finetune", &settings).unwrap();
        assert_eq!(back.checkpoint, ck);
        // Every adapter tensor is stored, DoRA's magnitude included.
        let mag = net.model.layer("linear2").unwrap().adapter("a").unwrap().magnitude().unwrap().as_tensor().to_vec1::<f32>().unwrap();
        let stored = back.tensor("adapter", "linear2.lora_magnitude_vector").unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(mag, stored);
        assert_eq!(back.net().unwrap().sizes().unwrap(), net.sizes().unwrap());
        let e = load(&path, "finetune", &json!({"rank": 4, "digit": 3})).unwrap_err().to_string();
        assert!(e.contains("rank = 2") && e.contains("rank = 4") && e.contains("run.ckpt.safetensors"), "{e}");
        let e = load(&path, "pretrain", &settings).unwrap_err().to_string();
        assert!(e.contains("not a mnist-pretrain checkpoint"), "{e}");
    }
}
