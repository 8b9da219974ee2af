//! The JSON report written by `lora demo` (and parts of it by the other commands).

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct DataStats {
    pub train: usize,
    pub test: usize,
    pub mean: f64,
    pub std: f64,
}

#[derive(Debug, Serialize, Clone)]
pub struct LayerParams {
    pub name: String,
    pub weight: Vec<usize>,
    pub bias: Vec<usize>,
    #[serde(rename = "lora_A")]
    pub lora_a: Vec<usize>,
    #[serde(rename = "lora_B")]
    pub lora_b: Vec<usize>,
}

#[derive(Debug, Serialize)]
pub struct Params {
    pub base: usize,
    pub lora: usize,
    pub percent: f64,
    pub layers: Vec<LayerParams>,
}

#[derive(Debug, Serialize)]
pub struct Pretrain {
    pub epochs: usize,
    pub batch_size: usize,
    pub steps: usize,
    pub seconds: f64,
    pub final_avg_loss: f32,
    pub accuracy: f64,
    pub wrong: Vec<usize>,
}

#[derive(Debug, Serialize)]
pub struct Finetune {
    pub digit: u8,
    pub digit_train_images: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub rank: usize,
    pub alpha: f64,
    pub scale: f64,
    pub trainable_params: usize,
    pub seconds: f64,
    pub final_avg_loss: f32,
}

#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub accuracy: f64,
    pub wrong: Vec<usize>,
}

#[derive(Debug, Serialize)]
pub struct Proof {
    /// Every base weight and bias bit-for-bit equal to its copy taken before fine-tuning.
    pub base_bits_equal: bool,
    /// Effective weight with LoRA on equals W0 + scale·B·A exactly, per layer.
    pub effective_weight_exact: bool,
    /// Largest |effective − (W0 + scale·B·A)| against an f64 reference, per layer.
    pub effective_weight_max_abs_err_f64: Vec<f64>,
    /// With LoRA off, every test logit bit-for-bit equal to the pre-trained network's.
    pub lora_off_logits_identical: bool,
}

#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub data: DataStats,
    pub params: Params,
    pub pretrain: Pretrain,
    pub finetune: Finetune,
    pub base_unchanged: bool,
    pub proof: Proof,
    pub lora_on: EvalReport,
    pub lora_off: EvalReport,
    pub seed: u64,
    pub files: Files,
}

#[derive(Debug, Serialize)]
pub struct Files {
    pub base: String,
    pub base_bytes: u64,
    pub adapter: String,
    pub adapter_bytes: u64,
}
