//! Flags of `lora lm …`: language models (Llama architecture, Hugging Face files).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::cli::ReportArgs;

/// Language models: a Llama-architecture decoder with LoRA on its projections.
#[derive(Debug, Args)]
pub struct LmArgs {
    #[command(subcommand)]
    pub command: LmCommand,
}

#[derive(Debug, Subcommand)]
pub enum LmCommand {
    /// The whole story on code: pre-train a small byte-level base (mostly Python), fine-tune a SQL and a
    /// JavaScript adapter and a chat adapter (docstring → function conversations) on it, compare validation
    /// losses on one loaded base, and sample from each.
    Demo(LmDemoArgs),
    /// Pre-train a byte-level Llama from scratch and save it as a Hugging Face model directory.
    Pretrain(LmPretrainArgs),
    /// Fine-tune a LoRA adapter on a frozen base and write it as a PEFT adapter directory.
    Finetune(LmFinetuneArgs),
    /// Validation loss (nats per token, bits per byte) of a model and its adapters, one column each.
    Eval(LmEvalArgs),
    /// Generate text from prompts, with one adapter or none.
    Generate(LmGenerateArgs),
    /// Time the workloads of the PyTorch peer (scripts/pytorch_lm_workloads.py) and print its keys.
    Bench(LmBenchArgs),
}

/// Training loop settings.
#[derive(Debug, Clone, Args)]
pub struct LmTrainArgs {
    /// Sequences per step.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Tokens per sequence (at most the model's context).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(2..))]
    pub seq_len: u32,
    /// Warm-up steps (linear), before the cosine decay.
    #[arg(long, value_name = "N")]
    pub warmup: Option<u32>,
    /// Gradient clipping: the global gradient norm is scaled down to at most this.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub clip: f64,
    /// Seed for initialisation, data draws and dropout: the same seed and thread count give the same run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct LmPretrainArgs {
    /// The model directory to write (config.json + model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Training data as FILE or FILE:WEIGHT (repeatable): JSONL(.gz) with a "text" field (rows with
    /// "split": "validation" are held out) or plain text. Default: the shipped code corpora, weighted
    /// towards Python (python 0.8, sql 0.1, js 0.1).
    #[arg(long, value_name = "FILE[:WEIGHT]", value_parser = parse_weighted)]
    pub data: Vec<(PathBuf, f64)>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..))]
    pub steps: u32,
    /// Peak learning rate (AdamW, weight decay 0.1 on matrices).
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// The dtype the weights are written in: f32 (as trained) or bf16 (rounded to nearest, as most Hugging
    /// Face checkpoints are stored; half the bytes, and `lora serve` reads them from half the memory).
    #[arg(long, value_enum, default_value_t = SaveDtype::F32)]
    pub dtype: SaveDtype,
    #[command(flatten)]
    pub train: LmTrainArgs,
    #[command(flatten)]
    pub shape: LmShapeArgs,
    #[command(flatten)]
    pub checkpoint: crate::cli::CheckpointArgs,
    /// Also write a JSON summary here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub report: ReportArgs,
}

/// The dtype a model's weights are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaveDtype {
    /// 32-bit floats.
    F32,
    /// bfloat16.
    Bf16,
}

impl From<SaveDtype> for lora_lm::hf::WeightDtype {
    fn from(d: SaveDtype) -> Self {
        match d {
            SaveDtype::F32 => lora_lm::hf::WeightDtype::F32,
            SaveDtype::Bf16 => lora_lm::hf::WeightDtype::Bf16,
        }
    }
}

/// The architecture of a new model.
#[derive(Debug, Clone, Args)]
pub struct LmShapeArgs {
    /// Hidden size.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub hidden: u32,
    /// MLP width.
    #[arg(long, default_value_t = 768, value_parser = clap::value_parser!(u32).range(1..))]
    pub intermediate: u32,
    /// Decoder layers.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub layers: u32,
    /// Query heads.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub heads: u32,
    /// Key/value heads (must divide --heads).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub kv_heads: u32,
    /// Context length (max_position_embeddings).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(2..))]
    pub context: u32,
}

/// The LoRA adapter to train.
#[derive(Debug, Clone, Args)]
pub struct LmLoraArgs {
    /// LoRA rank r.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub rank: u32,
    /// LoRA alpha: the update B·A is scaled by alpha / r (alpha / sqrt(r) with --rslora).
    #[arg(long, default_value_t = 16.0, allow_negative_numbers = true)]
    pub alpha: f64,
    /// Dropout probability on the adapter's input during training.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub dropout: f64,
    /// Modules to adapt, comma-separated (names or dotted suffixes: q_proj,k_proj,…,lm_head), or all-linear
    /// (every projection, not lm_head), matched as PEFT matches them.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")]
    pub target_modules: Vec<String>,
    /// Adapt the modules whose whole name matches this regular expression instead (PEFT's string form of
    /// target_modules), e.g. '.*layers\.[0-1]\..*_proj'.
    #[arg(long, value_name = "REGEX")]
    pub target_regex: Option<String>,
    /// Never adapt these modules (names or dotted suffixes), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub exclude_modules: Vec<String>,
    /// Adapt only these layer indexes (with names in --target-modules), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub layers_to_transform: Vec<usize>,
    /// Rank-stabilised scaling alpha/sqrt(r) (rsLoRA).
    #[arg(long)]
    pub rslora: bool,
    #[command(flatten)]
    pub variant: crate::cli::VariantArgs,
}

/// How instruction data (JSONL rows with "messages", or "prompt" and "completion") is read.
#[derive(Debug, Clone, Args)]
pub struct ChatDataArgs {
    /// The chat template (a Jinja file) that renders conversations (default: the model's own, from
    /// tokenizer_config.json or chat_template.jinja; byte-level models: ChatML with plain-text markers).
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// Where the loss is taken on instruction data: completions (prompt/completion rows' completions,
    /// conversations' assistant turns) or all (every token) [default: completions].
    #[arg(long, value_enum, value_name = "WHERE")]
    pub loss_on: Option<LossOnArg>,
}

/// Where the loss is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LossOnArg {
    /// Completions and assistant turns.
    Completions,
    /// Every token.
    All,
}

impl From<LossOnArg> for lora_lm::instruct::LossOn {
    fn from(l: LossOnArg) -> Self {
        match l {
            LossOnArg::Completions => lora_lm::instruct::LossOn::Completions,
            LossOnArg::All => lora_lm::instruct::LossOn::All,
        }
    }
}

#[derive(Debug, Args)]
pub struct LmFinetuneArgs {
    /// The base model directory (never modified).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// What to adapt to: a corpus (JSONL(.gz) with a "text" field, or plain text: windows of its rows joined), or
    /// instruction data in TRL's formats (JSONL rows with "messages", or "prompt" and "completion", as strings or
    /// as lists of messages: one example per row, the loss on completions and assistant turns).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    #[command(flatten)]
    pub chat: ChatDataArgs,
    /// Pack instruction examples into one stream and train on windows of it (which may span two examples),
    /// instead of one example per row.
    #[arg(long)]
    pub packing: bool,
    /// The adapter directory to write (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub lora: LmLoraArgs,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub steps: u32,
    /// Peak learning rate (AdamW, no weight decay).
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// LoRA+: B learns at this multiple of --lr (as PEFT's create_loraplus_optimizer; its paper uses 16).
    #[arg(long, value_name = "RATIO", allow_negative_numbers = true)]
    pub loraplus_lr_ratio: Option<f64>,
    #[command(flatten)]
    pub train: LmTrainArgs,
    #[command(flatten)]
    pub checkpoint: crate::cli::CheckpointArgs,
    /// Also write a JSON summary here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub report: ReportArgs,
}

#[derive(Debug, Args)]
pub struct LmEvalArgs {
    /// The model directory.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// An adapter to score on the same loaded base, as NAME=DIR (repeatable); each gets a column.
    #[arg(long, value_name = "NAME=DIR", value_parser = crate::cli::parse_named_adapter)]
    pub adapter: Vec<(String, PathBuf)>,
    /// Files to score (repeatable): JSONL(.gz) — its "validation" rows (all rows if none has a split) —
    /// or plain text. Instruction data (rows with "messages", or "prompt" and "completion") is scored on its
    /// completions and assistant turns, each row one window.
    #[arg(long, value_name = "FILE", required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    #[command(flatten)]
    pub chat: ChatDataArgs,
    /// Window length in tokens (default: the model's context).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..))]
    pub context: Option<u32>,
    /// Score at most this many tokens per file (default: all).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(2..))]
    pub max_tokens: Option<u64>,
    /// Windows per forward pass (default: as many as make 1,024 tokens, at least one: the activations of a
    /// forward grow with its tokens, and more tokens a forward gain little speed).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: Option<u32>,
    /// Load adapters even if they were trained on a different base model.
    #[arg(long)]
    pub force: bool,
    /// Also write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write every window's per-token losses (nats) as JSON here (for scripts/hf_lm_parity.py --ours).
    #[arg(long, value_name = "FILE")]
    pub token_losses: Option<PathBuf>,
    #[command(flatten)]
    pub report: ReportArgs,
}

#[derive(Debug, Args)]
pub struct LmGenerateArgs {
    /// The model directory.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A PEFT adapter directory to generate with (default: the base alone).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// A prompt (repeatable: several prompts run as one batch).
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// New tokens per prompt at most.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: u32,
    /// Sampling temperature; 0 picks the most likely token every time (greedy).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Sample only among the K most likely tokens.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to P.
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Load the adapter even if it was trained on a different base model.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct LmBenchArgs {
    /// The model shape, as the peer names it: tiny (the demo's 3.28M byte-level Llama, batch 16 × 256),
    /// small (SmolLM-135M's body with a 256-byte vocabulary, 106M parameters, batch 4 × 256), 1b (Llama-3.2-1B's
    /// body, 974M parameters, tied embeddings, batch 1 × 256; no full step: its AdamW state would not fit).
    #[arg(long, value_enum, default_value_t = BenchShape::Tiny)]
    pub shape: BenchShape,
    /// Threads for matrix products (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: Option<u32>,
    /// Timed steps per training workload (the median is reported).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub steps: u32,
    /// Fewer repetitions everywhere, for smoke tests (numbers are then rough).
    #[arg(long)]
    pub quick: bool,
    /// Seed for initialisation and the random token batches.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The frozen base of the LoRA step, evaluation and generation: f32, or bf16 (every base value rounded
    /// to bf16, as a bf16 checkpoint holds it, and the matrices held in bf16). The full step trains f32.
    #[arg(long, value_enum, default_value_t = BenchDtype::F32)]
    pub dtype: BenchDtype,
    /// Also write the JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// The frozen base's dtype in `lora lm bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchDtype {
    /// f32 values, held in f32.
    F32,
    /// bf16 values, held in bf16.
    Bf16,
}

/// A benchmark model shape (`lora lm bench --shape`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchShape {
    /// The demo's byte-level Llama (3,279,104 parameters), batch 16 × 256.
    Tiny,
    /// SmolLM-135M's body (hidden 576, MLP 1536, 30 layers, 9 / 3 heads), vocabulary 256, batch 4 × 256.
    Small,
    /// Llama-3.2-1B's body (hidden 2048, MLP 8192, 16 layers, 32 / 8 heads, tied), vocabulary 256, batch 1 × 256.
    #[value(name = "1b")]
    OneB,
}

#[derive(Debug, Args)]
pub struct LmDemoArgs {
    /// Output directory: base/, adapters/sql/, adapters/js/, adapters/chat/ and report.json.
    #[arg(long, default_value = "runs/lm-demo", value_name = "DIR")]
    pub out: PathBuf,
    /// Where to write the JSON report (default: OUT/report.json).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Pre-training steps (batches of 16 × 256 bytes).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub pretrain_steps: u32,
    /// Fine-tuning steps per adapter.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub finetune_steps: u32,
    /// Validation tokens scored per corpus (each corpus holds ~750k–885k).
    #[arg(long, default_value_t = 32768, value_parser = clap::value_parser!(u64).range(2..))]
    pub eval_tokens: u64,
    /// Bytes generated per sample.
    #[arg(long, default_value_t = 96, value_parser = clap::value_parser!(u32).range(1..))]
    pub sample_tokens: u32,
    /// Directory holding sql.jsonl.gz, js.jsonl.gz and python.jsonl.gz.
    #[arg(long, default_value = "data/code", value_name = "DIR")]
    pub data: PathBuf,
    /// Instruction data for the chat adapter (conversations in TRL's messages format) [default:
    /// chat/python-docstrings.jsonl.gz beside the --data directory, i.e. data/chat/…].
    #[arg(long, value_name = "FILE")]
    pub chat_data: Option<PathBuf>,
    /// Seed for everything.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub report: ReportArgs,
}

fn parse_weighted(s: &str) -> Result<(PathBuf, f64), String> {
    if let Some((f, w)) = s.rsplit_once(':') {
        if let Ok(w) = w.parse::<f64>() {
            if !(w.is_finite() && w > 0.0) {
                return Err(format!("{s:?}: weight {w} must be a positive number"));
            }
            return Ok((PathBuf::from(f), w));
        }
    }
    Ok((PathBuf::from(s), 1.0))
}
