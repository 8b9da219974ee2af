//! One checkpoint file for every training run, and the policy of when to write it.
//!
//! A checkpoint is one safetensors file, written atomically: the tensors the run needs to rebuild its model
//! (named by the run: the LM stores its trainable tensors, the MNIST network its whole state), Adam's
//! moments (`adam_m/<param>`, `adam_v/<param>`), and in the metadata key `lora_rs.checkpoint` a JSON
//! [`State`]: the kind of run, steps done, Adam's step count, every step's loss and time, and the run's
//! settings, which a resume must match key by key. Resuming restores the exact optimizer state, and each
//! trainer replays its data order from (seed, step), so a resumed run ends with the same bits.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::adam::Moments;
use crate::error::{OptimError, Result};

/// Safetensors metadata key holding a checkpoint's [`State`].
pub const META: &str = "lora_rs.checkpoint";

/// When a training job writes checkpoints, where, and where a resumed one starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpointing {
    /// Write a checkpoint every this many steps (`None`: never).
    pub every: Option<usize>,
    /// The checkpoint file.
    pub path: PathBuf,
    /// Resume from this checkpoint file (written by an earlier run of the same job).
    pub resume: Option<PathBuf>,
}

impl Checkpointing {
    /// No periodic checkpoints and a fresh start; the file would be [`default_path`]`(out)`.
    pub fn beside(out: &Path) -> Self {
        Checkpointing { every: None, path: default_path(out), resume: None }
    }

    /// Checks the policy before a run starts: `every` ≥ 1, and a checkpoint to resume from exists.
    pub fn validate(&self) -> Result<()> {
        if self.every == Some(0) {
            return Err(OptimError::invalid("checkpoint_every", 0, "must be at least 1"));
        }
        if let Some(p) = self.resume.as_deref().filter(|p| !p.is_file()) {
            return Err(OptimError::file(p, "no such checkpoint file to resume from"));
        }
        Ok(())
    }

    /// Whether a checkpoint is due after `step` of `steps` (never after the last: the run's outputs follow).
    pub fn due(&self, step: usize, steps: usize) -> bool {
        self.every.is_some_and(|n| step.is_multiple_of(n) && step < steps)
    }

    /// Removes the checkpoint file of a finished run, if there is one.
    pub fn remove(&self) -> Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(lora::io::FileError::Io { path: self.path.clone(), error: e }.into()),
            _ => Ok(()),
        }
    }
}

/// The default checkpoint file of an output path: `OUT.ckpt.safetensors` beside it.
pub fn default_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".ckpt.safetensors");
    PathBuf::from(s)
}

/// Where a run stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The kind of run (`lm-pretrain`, `mnist-finetune`, …): a checkpoint resumes only its own kind.
    pub kind: String,
    /// Steps done.
    pub step: usize,
    /// Adam's step count (t of the bias corrections).
    pub adam_steps: u64,
    /// The loss of every step done.
    pub losses: Vec<f64>,
    /// Seconds since the run started at the end of every step done.
    pub seconds: Vec<f64>,
    /// The run's settings (a JSON object); a resume must give the same value for every key.
    pub settings: Value,
}

/// A checkpoint in memory.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The position.
    pub state: State,
    /// The tensors the run rebuilds its model from, by the run's own names.
    pub tensors: Vec<(String, Tensor)>,
    /// Adam's moments by parameter name.
    pub moments: BTreeMap<String, Moments>,
}

impl Checkpoint {
    /// The tensor `name`, or an error naming it and the file.
    pub fn tensor(&self, name: &str, path: &Path) -> Result<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or_else(|| OptimError::file(path, format!("missing tensor {name}")))
    }
}

/// Writes `ck` to `path` atomically.
pub fn save(path: &Path, ck: &Checkpoint) -> Result<()> {
    if ck.state.losses.len() != ck.state.step || ck.state.seconds.len() != ck.state.step {
        return Err(OptimError::invalid("checkpoint", ck.state.step, "needs one loss and one time per step"));
    }
    let mut tensors = ck.tensors.clone();
    for (name, mo) in &ck.moments {
        tensors.push((format!("adam_m/{name}"), Tensor::from_slice(&mo.m, mo.m.len(), &Device::Cpu)?));
        tensors.push((format!("adam_v/{name}"), Tensor::from_slice(&mo.v, mo.v.len(), &Device::Cpu)?));
    }
    let state = serde_json::to_string(&ck.state).map_err(|e| OptimError::file(path, e.to_string()))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string()), (META.to_string(), state)]);
    lora::io::save_safetensors(path, &tensors, &meta)?;
    tracing::info!(step = ck.state.step, path = %path.display(), "checkpoint saved");
    Ok(())
}

/// Reads a checkpoint of run kind `kind` whose settings equal `settings` (every key of `settings` must hold
/// the same value in the file; the error names the first that does not).
pub fn load(path: &Path, kind: &str, settings: &Value) -> Result<Checkpoint> {
    let f = lora::io::TensorFile::load(path, &Device::Cpu)?;
    let state: State = f
        .metadata
        .get(META)
        .ok_or_else(|| OptimError::file(path, format!("not a lora-rs checkpoint (no {META} metadata)")))
        .and_then(|s| serde_json::from_str(s).map_err(|e| OptimError::file(path, format!("{META}: {e}"))))?;
    if state.kind != kind {
        return Err(OptimError::file(path, format!("a {} checkpoint, not a {kind} checkpoint", state.kind)));
    }
    if let Some(now) = settings.as_object() {
        for (k, v) in now {
            let saved = state.settings.get(k).unwrap_or(&Value::Null);
            if saved != v {
                return Err(OptimError::file(
                    path,
                    format!("saved with {k} = {saved}, but this run has {k} = {v}; resume with the same settings"),
                ));
            }
        }
    }
    if state.losses.len() != state.step || state.seconds.len() != state.step {
        return Err(OptimError::file(
            path,
            format!("{} losses and {} times for {} steps", state.losses.len(), state.seconds.len(), state.step),
        ));
    }
    let mut tensors = Vec::new();
    // Each parameter's (m, v), as found.
    type Halves = (Option<Vec<f32>>, Option<Vec<f32>>);
    let mut halves: BTreeMap<String, Halves> = BTreeMap::new();
    for (name, t) in f.tensors {
        if let Some(p) = name.strip_prefix("adam_m/") {
            halves.entry(p.to_string()).or_default().0 = Some(t.flatten_all()?.to_vec1::<f32>()?);
        } else if let Some(p) = name.strip_prefix("adam_v/") {
            halves.entry(p.to_string()).or_default().1 = Some(t.flatten_all()?.to_vec1::<f32>()?);
        } else {
            tensors.push((name, t));
        }
    }
    let mut moments = BTreeMap::new();
    for (name, (m, v)) in halves {
        match (m, v) {
            (Some(m), Some(v)) if m.len() == v.len() => {
                moments.insert(name, Moments { m, v });
            }
            (Some(_), Some(_)) => return Err(OptimError::file(path, format!("adam_m/{name} and adam_v/{name} differ in length"))),
            (None, _) => return Err(OptimError::file(path, format!("missing tensor adam_m/{name}"))),
            (_, None) => return Err(OptimError::file(path, format!("missing tensor adam_v/{name}"))),
        }
    }
    Ok(Checkpoint { state, tensors, moments })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sample() -> Checkpoint {
        let t = Tensor::new(&[[1.5f32, -2.0], [0.25, 3.0]], &Device::Cpu).unwrap();
        Checkpoint {
            state: State {
                kind: "lm-finetune".into(),
                step: 2,
                adam_steps: 2,
                losses: vec![1.5, 1.25],
                seconds: vec![0.1, 0.2],
                settings: json!({"rank": 2, "lr": 0.001}),
            },
            tensors: vec![("layer.lora_A.weight".into(), t)],
            moments: BTreeMap::from([("layer.lora_A.weight".to_string(), Moments { m: vec![0.5, 0.25, 0.0, -1.0], v: vec![1.0; 4] })]),
        }
    }

    #[test]
    fn a_checkpoint_reads_back_as_written_and_refuses_another_kind_or_other_settings_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.ckpt.safetensors");
        let ck = sample();
        save(&path, &ck).unwrap();
        let back = load(&path, "lm-finetune", &json!({"rank": 2, "lr": 0.001})).unwrap();
        assert_eq!(back.state, ck.state);
        assert_eq!(back.moments, ck.moments);
        let t = back.tensor("layer.lora_A.weight", &path).unwrap();
        assert_eq!(t.to_vec2::<f32>().unwrap(), ck.tensors[0].1.to_vec2::<f32>().unwrap());
        assert!(back.tensor("nope", &path).unwrap_err().to_string().contains("missing tensor nope"));
        let e = load(&path, "lm-finetune", &json!({"rank": 4})).unwrap_err().to_string();
        assert!(e.contains("rank = 2") && e.contains("rank = 4") && e.contains("run.ckpt.safetensors"), "{e}");
        let e = load(&path, "mnist-finetune", &json!({})).unwrap_err().to_string();
        assert!(e.contains("a lm-finetune checkpoint, not a mnist-finetune checkpoint"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_a_checkpoint_or_lacks_a_moment_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        lora::io::save_safetensors(&path, &[("w".into(), t.clone())], &HashMap::new()).unwrap();
        let e = load(&path, "lm-pretrain", &json!({})).unwrap_err().to_string();
        assert!(e.contains("not a lora-rs checkpoint") && e.contains("model.safetensors"), "{e}");
        let mut ck = sample();
        save(&path, &ck).unwrap();
        // Drop one half of a moment pair by rewriting the file without it.
        let f = lora::io::TensorFile::load(&path, &Device::Cpu).unwrap();
        let kept: Vec<_> = f.tensors.into_iter().filter(|(n, _)| !n.starts_with("adam_v/")).collect();
        lora::io::save_safetensors(&path, &kept, &f.metadata).unwrap();
        let e = load(&path, "lm-finetune", &json!({})).unwrap_err().to_string();
        assert!(e.contains("missing tensor adam_v/layer.lora_A.weight"), "{e}");
        ck.state.losses.pop();
        assert!(save(&path, &ck).is_err(), "a state with fewer losses than steps is not written");
    }

    #[test]
    fn the_policy_is_checked_before_a_run_and_is_due_only_between_steps() {
        let c = Checkpointing { every: Some(3), ..Checkpointing::beside(Path::new("runs/out")) };
        assert_eq!(c.path, Path::new("runs/out.ckpt.safetensors"));
        assert_eq!((1..=9).filter(|&s| c.due(s, 9)).collect::<Vec<_>>(), [3, 6], "never after the last step");
        assert!(Checkpointing { every: Some(0), ..c.clone() }.validate().unwrap_err().to_string().contains("checkpoint_every = 0"));
        let e = Checkpointing { resume: Some("nope.safetensors".into()), ..c.clone() }.validate().unwrap_err().to_string();
        assert!(e.contains("nope.safetensors") && e.contains("no such checkpoint"), "{e}");
        c.validate().unwrap();
        c.remove().unwrap(); // nothing to remove is fine
    }
}
