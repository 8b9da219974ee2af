//! `AdamConsts`: the f32 constants of one Adam step as the `adam_step` kernel takes them, computed as
//! lora-optim's `AdamStep` computes them (in f64, then cast), so the GPU step gives lora-optim's bits.

use lora_optim::AdamConfig;

/// One step's constants (t ≥ 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConsts {
    /// β1.
    pub b1: f32,
    /// 1 − β1.
    pub one_minus_b1: f32,
    /// β2.
    pub b2: f32,
    /// 1 − β2.
    pub one_minus_b2: f32,
    /// 1 / (1 − β1ᵗ).
    pub scale_m: f32,
    /// 1 / (1 − β2ᵗ).
    pub scale_v: f32,
    /// ε.
    pub eps: f32,
    /// The learning rate.
    pub lr: f32,
    /// 1 − lr·λ (1.0 without decay).
    pub decay: f32,
    /// The clipping factor applied to g (1.0 without clipping).
    pub grad_scale: f32,
}

impl AdamConsts {
    /// The constants of step `t` (1-based; 0 counts as 1), with weight decay: `lora_optim::AdamStep::new`.
    pub fn new(cfg: &AdamConfig, t: usize) -> AdamConsts {
        let t = t.max(1) as i32;
        AdamConsts {
            b1: cfg.beta1 as f32,
            one_minus_b1: (1.0 - cfg.beta1) as f32,
            b2: cfg.beta2 as f32,
            one_minus_b2: (1.0 - cfg.beta2) as f32,
            scale_m: (1.0 / (1.0 - cfg.beta1.powi(t))) as f32,
            scale_v: (1.0 / (1.0 - cfg.beta2.powi(t))) as f32,
            eps: cfg.eps as f32,
            lr: cfg.lr as f32,
            decay: (1.0 - cfg.lr * cfg.weight_decay) as f32,
            grad_scale: 1.0,
        }
    }

    /// At `scale` times the learning rate (LoRA+): `AdamStep::with_lr_scale`.
    pub fn with_lr_scale(self, scale: f64, cfg: &AdamConfig) -> AdamConsts {
        AdamConsts { lr: (cfg.lr * scale) as f32, decay: (1.0 - cfg.lr * scale * cfg.weight_decay) as f32, ..self }
    }

    /// Without weight decay: `AdamStep::without_decay`.
    pub fn without_decay(self) -> AdamConsts {
        AdamConsts { decay: 1.0, ..self }
    }

    /// With every gradient value multiplied by `c` first: `AdamStep::with_grad_scale`.
    pub fn with_grad_scale(self, c: f32) -> AdamConsts {
        AdamConsts { grad_scale: c, ..self }
    }
}
