//! Command-line flags (clap derive). Help texts are written for someone new to LoRA.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// lora-rs: pre-train a small MNIST network, then fine-tune it cheaply with LoRA
/// (Low-Rank Adaptation): the base weights stay frozen and only two thin matrices A and B per layer train.
#[derive(Debug, Parser)]
#[command(name = "lora", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The whole tutorial in one go: load MNIST, pre-train, evaluate, count parameters, attach LoRA,
    /// fine-tune on the worst digit, prove the base is untouched, compare LoRA on and off.
    Demo(DemoArgs),
    /// Pre-train ExpensiveNet on MNIST and save it as a safetensors file (PyTorch state_dict names).
    Pretrain(PretrainArgs),
    /// Evaluate a saved model on the MNIST test set: accuracy and wrong answers per digit.
    Eval(EvalArgs),
    /// Count parameters per layer, with and without LoRA, without training anything.
    Params(ParamsArgs),
    /// Time the workloads of the PyTorch peer script (pre-train epoch, full and LoRA steps, eval, peak
    /// memory) and print them as one JSON object.
    Bench(BenchArgs),
    /// Fine-tune a LoRA adapter on one digit on top of a saved model and write it as a PEFT adapter
    /// directory (adapter_config.json + adapter_model.safetensors).
    Finetune(FinetuneArgs),
    /// Fold one or more adapters into a model's weights and save the merged model (zero-overhead inference).
    Merge(MergeArgs),
    /// Show what a model file or adapter directory holds: tensors, shapes, dtypes, config, size, parameters.
    Inspect(InspectArgs),
    /// Measure LoRA's storage and switching costs: adapter vs checkpoint bytes, switch and load times,
    /// trainable parameters and optimizer memory.
    BenchAdapters(BenchAdaptersArgs),
    /// Draw the network as a Graphviz DOT graph (layers, shapes, parameter counts, the LoRA branches);
    /// also SVG and PNG when Graphviz's `dot` is installed.
    Graph(GraphArgs),
    /// Language models: pre-train, fine-tune, evaluate, generate and benchmark a Llama-architecture
    /// decoder with LoRA adapters, reading and writing Hugging Face files.
    Lm(crate::lm_cli::LmArgs),
    /// Serve one base model with many LoRA adapters over HTTP (OpenAI-compatible completions for a
    /// language model, predictions for an MNIST model): adapters chosen per request, mixed in one batch,
    /// loaded and unloaded while requests run.
    Serve(ServeArgs),
    /// Drive a `lora serve` on this machine with N clients for S seconds and report throughput and latency.
    Loadtest(LoadtestArgs),
    /// NVIDIA GPUs: what the device and its CUDA libraries are (info), and every CUDA kernel checked
    /// against its CPU reference, with the bf16 matrix rate of the card (check).
    Gpu(crate::cmd::gpu::GpuArgs),
}

/// `lora serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The base: an LM model directory (config.json + safetensors) or an MNIST model file.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// The folder holding adapter folders: every sub-folder holding a PEFT adapter (adapter_config.json)
    /// is served under its folder name, and /v1/load_lora_adapter loads from inside it only.
    #[arg(long, value_name = "DIR")]
    pub adapters: Option<PathBuf>,
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// The base's name in requests' "model" (default: the model path's file name).
    #[arg(long)]
    pub name: Option<String>,
    /// A chat template (Jinja file) for /v1/chat/completions, in place of the model's own (tokenizer_config.json's
    /// chat_template or chat_template.jinja; byte-level models without one use ChatML with plain-text markers).
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Most adapters held in memory; the least recently used beyond it go back to disk (read again on use).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_loaded_adapters: u32,
    /// Most rows per batched forward pass: sequences for a language model, images for a classifier.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch: Option<u32>,
    /// How long an idle batcher waits for more requests after the first, milliseconds.
    #[arg(long, default_value_t = 2)]
    pub batch_window_ms: u64,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Most images per prediction request.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_images: u32,
    /// Most prompts per completion request.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_prompts: u32,
    /// Largest max_tokens a completion may ask for.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: u32,
    /// Most completions and predictions in the server at once (queued or running); one more gets a 503
    /// with Retry-After at once.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,
    /// A completion or prediction not finished this many seconds after it arrived is stopped (504).
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
    pub request_timeout: f64,
    /// A connection whose client has read nothing for this many seconds while the server has data for it
    /// is dropped.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub write_timeout: f64,
    /// A stream with nothing to send for this many seconds sends a keep-alive comment.
    #[arg(long, default_value_t = 15.0, value_name = "SECONDS")]
    pub keep_alive: f64,
    /// On Ctrl-C or SIGTERM, requests in flight get this many seconds to finish; then the server exits.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub shutdown_timeout: f64,
    /// Require `Authorization: Bearer KEY` on every /v1 route (default: the LORA_API_KEY environment
    /// variable, if set). /, /health and /metrics stay open.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Serve /v1/load_lora_adapter and /v1/unload_lora_adapter (off by default: anyone who can reach the
    /// server could otherwise change what it serves).
    #[arg(long)]
    pub allow_adapter_updates: bool,
    /// Threads for the model's kernels (default: every core).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: Option<u32>,
}

/// `lora loadtest`.
#[derive(Debug, Args)]
pub struct LoadtestArgs {
    /// The server (a loopback address: this command only drives servers on this machine).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Length of the run, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub seconds: f64,
    /// Models to address in turn, comma-separated (the base's name or adapters' names).
    #[arg(long, value_delimiter = ',', required = true)]
    pub models: Vec<String>,
    /// Completions: max_tokens per request (greedy).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Completions: the prompt.
    #[arg(long, default_value = "SELECT ")]
    pub prompt: String,
    /// Predictions: images per request.
    #[arg(long, default_value_t = 16)]
    pub images: usize,
    /// Meanwhile keep reloading the named adapters in place and loading and unloading a copy (the server
    /// must run with --allow-adapter-updates).
    #[arg(long)]
    pub churn: bool,
    /// The server's API key, sent as `Authorization: Bearer KEY` (default: the LORA_API_KEY environment
    /// variable, if set).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Also write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Pictures and the HTML page.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// Write charts (PNG and SVG), loss metrics (CSV and JSON lines), the network (DOT) and a
    /// self-contained report.html into this directory.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
}

/// Where the data is.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Directory holding the four MNIST IDX files (raw or .gz), e.g. train-images-idx3-ubyte.gz.
    #[arg(long, default_value = "data/mnist", value_name = "DIR")]
    pub data: PathBuf,
}

/// Checkpoints of a training run (`lora pretrain`, `finetune`, `lm pretrain`, `lm finetune`): one file.
#[derive(Debug, Clone, Args)]
pub struct CheckpointArgs {
    /// Save the trained tensors, optimizer state and position every N steps to the checkpoint file, so a
    /// killed run can continue with --resume; a finished run removes it.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub checkpoint_every: Option<u32>,
    /// The checkpoint file (default: the --resume file, else the output path with .ckpt.safetensors appended).
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<PathBuf>,
    /// Continue the run whose checkpoint is this file (the other flags must match the saved run).
    #[arg(long, value_name = "FILE")]
    pub resume: Option<PathBuf>,
}

impl CheckpointArgs {
    /// The checkpoint policy of a run writing `out`.
    pub fn policy(&self, out: &std::path::Path) -> lora_optim::checkpoint::Checkpointing {
        let default = lora_optim::checkpoint::Checkpointing::beside(out);
        lora_optim::checkpoint::Checkpointing {
            every: self.checkpoint_every.map(|n| n as usize),
            // A resumed run goes on writing to the file it resumed from, unless told otherwise.
            path: self.checkpoint.clone().or_else(|| self.resume.clone()).unwrap_or(default.path),
            resume: self.resume.clone(),
        }
    }
}

/// Checkpoints of `lora demo`, which runs two phases: a folder holding one checkpoint file per phase.
#[derive(Debug, Clone, Args)]
pub struct DemoCheckpointArgs {
    /// Save each phase every N steps (pretrain.ckpt.safetensors, finetune.ckpt.safetensors in
    /// --checkpoint-dir), so a killed demo can continue with --resume.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub checkpoint_every: Option<u32>,
    /// The checkpoint folder (default: OUT/checkpoint).
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue the demo whose checkpoint folder is DIR (the other flags must match the saved run).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
}

/// Network shape.
#[derive(Debug, Clone, Args)]
pub struct NetArgs {
    /// Units in the first hidden layer.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub hidden1: u32,
    /// Units in the second hidden layer.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    pub hidden2: u32,
}

/// LoRA shape.
#[derive(Debug, Clone, Args)]
pub struct LoraArgs {
    /// LoRA rank r: A is (r, in), B is (out, r). Higher r trains more parameters.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub rank: u32,
    /// LoRA alpha: the update B·A is scaled by alpha / r.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub alpha: f64,
}

/// How a new adapter starts (PEFT's init_lora_weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InitArg {
    /// A ~ N(0, 1), B = 0: the seed tutorial's choice.
    Normal,
    /// A ~ N(0, 1/r²), B = 0 (PEFT's "gaussian").
    Gaussian,
    /// A Kaiming-uniform, B = 0 (PEFT's default, init_lora_weights=true).
    Kaiming,
    /// A and B as nn.Linear initialises them (PEFT's init_lora_weights=false): the adapter acts from step 0.
    Random,
    /// PiSSA: A and B from the top-r singular triplets of the base weight, which the adapter subtracts.
    Pissa,
    /// OLoRA: A and B from the QR factorisation of the base weight, which the adapter subtracts.
    Olora,
}

impl InitArg {
    /// The library's initialisation.
    pub fn init(self) -> lora::Init {
        match self {
            InitArg::Normal => lora::Init::Normal,
            InitArg::Gaussian => lora::Init::PeftGaussian,
            InitArg::Kaiming => lora::Init::Kaiming,
            InitArg::Random => lora::Init::Random,
            InitArg::Pissa => lora::Init::Pissa { niter: None },
            InitArg::Olora => lora::Init::Olora,
        }
    }
}

/// Which biases train (PEFT's bias).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BiasArg {
    /// No bias trains.
    None,
    /// Every bias trains (as the adapter's own copies; the base stays unchanged).
    All,
    /// The biases of the adapted layers train.
    LoraOnly,
}

/// PEFT's LoRA variants, for the fine-tuning commands.
#[derive(Debug, Clone, Args)]
pub struct VariantArgs {
    /// Which biases train, as the adapter's own copies saved in the adapter (PEFT's bias).
    #[arg(long, value_enum, default_value = "none")]
    pub bias: BiasArg,
    /// Layers trained in full, as the adapter's own copies saved in it (PEFT's modules_to_save),
    /// comma-separated, e.g. linear3 or lm_head; they must not be LoRA targets.
    #[arg(long, value_delimiter = ',')]
    pub modules_to_save: Vec<String>,
    /// DoRA (PEFT's use_dora): also train a magnitude per output row of each adapted weight.
    #[arg(long)]
    pub use_dora: bool,
    /// How A and B start (PEFT's init_lora_weights); default: normal for MNIST, gaussian for language models.
    #[arg(long, value_enum)]
    pub init: Option<InitArg>,
    /// Give B a trained bias (PEFT's lora_bias; needs --init kaiming or random, as in PEFT).
    #[arg(long)]
    pub lora_bias: bool,
    /// Write a PiSSA/OLoRA adapter as the plain LoRA of rank 2r with the same update on the unchanged base
    /// (PEFT's path_initial_model_for_weight_conversion); without it, PEFT's own PiSSA/OLoRA form.
    #[arg(long)]
    pub convert_to_lora: bool,
}

impl VariantArgs {
    /// `config` with these variants applied (`default_init` when --init is not given).
    pub fn apply(&self, config: lora::LoraConfig, default_init: lora::Init) -> lora::LoraConfig {
        lora::LoraConfig {
            use_dora: self.use_dora,
            lora_bias: self.lora_bias,
            init: self.init.map_or(default_init, InitArg::init),
            bias: match self.bias {
                BiasArg::None => lora::Bias::None,
                BiasArg::All => lora::Bias::All,
                BiasArg::LoraOnly => lora::Bias::LoraOnly,
            },
            modules_to_save: self.modules_to_save.iter().map(|s| s.trim().to_string()).collect(),
            ..config
        }
    }
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub net: NetArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Pre-training epochs (passes over the 60,000 training images, batch 64).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub epochs: u32,
    /// Digit (0-9) to fine-tune on; default: the digit the pre-trained model gets wrong most often.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..10))]
    pub digit: Option<u8>,
    /// Fine-tuning steps (batches of --batch-size images of the chosen digit).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub steps: u32,
    /// Fine-tuning batch size.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Pre-training batch size.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub pretrain_batch_size: u32,
    /// Seed for initialisation, shuffling and LoRA's A: the same seed gives the same numbers.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory: base.safetensors and report.json go here.
    #[arg(long, default_value = "runs/demo", value_name = "DIR")]
    pub out: PathBuf,
    /// Where to write the JSON report (default: OUT/report.json).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub report: ReportArgs,
    #[command(flatten)]
    pub checkpoint: DemoCheckpointArgs,
}

#[derive(Debug, Args)]
pub struct PretrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub net: NetArgs,
    /// Where to save the trained model (safetensors).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Passes over the training set.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub epochs: u32,
    /// Images per training step.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Seed for initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write a JSON summary here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub report: ReportArgs,
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// The model to evaluate (a safetensors file written by `lora pretrain` or `lora demo`).
    #[arg(long, value_name = "FILE")]
    pub model: PathBuf,
    /// An adapter to evaluate on the same loaded model, as NAME=DIR (repeatable); each gets a column.
    #[arg(long, value_name = "NAME=DIR", value_parser = parse_named_adapter)]
    pub adapter: Vec<(String, PathBuf)>,
    /// Load adapters even if they were trained on a different base model.
    #[arg(long)]
    pub force: bool,
    /// Also write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub report: ReportArgs,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Threads for matrix products and the optimizer (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: Option<u32>,
    /// Also write the JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Time the plain-candle reference path instead of the fused one.
    #[arg(long)]
    pub reference: bool,
    /// Timed steps per step benchmark (the median is reported).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub steps: u32,
    /// Untimed warm-up steps before them.
    #[arg(long, default_value_t = 10)]
    pub warmup: u32,
    /// Seed for initialisation, shuffling and LoRA's A.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct ParamsArgs {
    #[command(flatten)]
    pub net: NetArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Count the layers of this saved model instead of a fresh ExpensiveNet of --hidden1/--hidden2.
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Also write the counts as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

pub fn parse_named_adapter(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((n, d)) if !n.is_empty() && !d.is_empty() => Ok((n.to_string(), PathBuf::from(d))),
        _ => Err(format!("{s:?}: expected NAME=DIR, e.g. digit9=runs/demo/adapter")),
    }
}

fn parse_weighted_adapter(s: &str) -> Result<(PathBuf, f64), String> {
    if let Some((d, w)) = s.rsplit_once(':') {
        if let Ok(w) = w.parse::<f64>() {
            if !w.is_finite() {
                return Err(format!("{s:?}: weight {w} is not a finite number"));
            }
            return Ok((PathBuf::from(d), w));
        }
    }
    Ok((PathBuf::from(s), 1.0))
}

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// The base model to adapt (safetensors, e.g. runs/demo/base.safetensors). It is never modified.
    #[arg(long, value_name = "FILE")]
    pub model: PathBuf,
    /// The adapter directory to write (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Digit (0-9) to fine-tune on; default: the digit the model gets wrong most often.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..10))]
    pub digit: Option<u8>,
    /// Training steps.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub steps: u32,
    /// Images per step.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Use rank-stabilised scaling alpha/sqrt(r) (rsLoRA) instead of alpha/r.
    #[arg(long)]
    pub rslora: bool,
    /// LoRA+: B learns at this multiple of --lr (as PEFT's create_loraplus_optimizer; its paper uses 16).
    #[arg(long, value_name = "RATIO", allow_negative_numbers = true)]
    pub loraplus_lr_ratio: Option<f64>,
    /// Dropout probability on the adapter's input during training.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Layers to adapt, comma-separated (names or dotted suffixes, as PEFT's target_modules).
    #[arg(long, value_delimiter = ',', default_value = "linear1,linear2,linear3")]
    pub target_modules: Vec<String>,
    #[command(flatten)]
    pub variant: VariantArgs,
    /// Seed for A's initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write a JSON summary (before/after wrong counts) here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub report: ReportArgs,
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base model: an MNIST safetensors file, or a language-model directory (config.json +
    /// model.safetensors; --out is then a model directory too).
    #[arg(long, value_name = "FILE|DIR")]
    pub model: PathBuf,
    /// An adapter directory to fold in, optionally weighted as DIR:WEIGHT (repeatable; default weight 1).
    #[arg(long, value_name = "DIR[:WEIGHT]", value_parser = parse_weighted_adapter, required = true)]
    pub adapter: Vec<(PathBuf, f64)>,
    /// Where to write the merged model (safetensors, same tensor names as the base).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Merge adapters even if they were trained on a different base model.
    #[arg(long)]
    pub force: bool,
    /// How several adapters (or one weighted adapter) combine, as PEFT's add_weighted_adapter: cat (exactly the
    /// weighted sum of the updates), linear, svd, ties, ties_svd, dare_linear, dare_linear_svd, dare_ties,
    /// dare_ties_svd, magnitude_prune, magnitude_prune_svd.
    #[arg(long, default_value = "cat", value_parser = parse_combination)]
    pub combination: lora::Combination,
    /// Fraction of values TIES, DARE and magnitude pruning keep (needed by those combinations; 1 keeps all).
    #[arg(long, allow_negative_numbers = true)]
    pub density: Option<f64>,
    /// TIES' majority sign: total (sign of the sum) or frequency (most common sign).
    #[arg(long, default_value = "total", value_parser = parse_majority_sign)]
    pub majority_sign: lora::MajoritySign,
    /// Rank of the svd combinations (default: the largest rank among the adapters).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub svd_rank: Option<u32>,
    /// Clamp the svd factors to ± this quantile of their entries, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub svd_clamp: Option<f64>,
    /// Seed of DARE's random masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the combined adapter here, as a PEFT adapter directory.
    #[arg(long, value_name = "DIR")]
    pub adapter_out: Option<PathBuf>,
}

fn parse_combination(s: &str) -> Result<lora::Combination, String> {
    lora::Combination::from_name(s).map_err(|e| e.to_string())
}

fn parse_majority_sign(s: &str) -> Result<lora::MajoritySign, String> {
    match s {
        "total" => Ok(lora::MajoritySign::Total),
        "frequency" => Ok(lora::MajoritySign::Frequency),
        _ => Err(format!("majority sign {s:?}: must be total or frequency")),
    }
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A model .safetensors file, a language-model directory (config.json + weights), or an adapter
    /// directory (or its adapter_model.safetensors).
    pub path: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchAdaptersArgs {
    /// Base model; default: a freshly initialised ExpensiveNet (same shapes, same file sizes).
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Rank of the generated adapters.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub rank: u32,
    /// Number of adapters loaded on the one base.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..1000))]
    pub adapters: u32,
    /// Repetitions of each timed operation (the median is reported).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(5..))]
    pub repeat: u32,
    /// Also write the figures as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    #[command(flatten)]
    pub net: NetArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Draw the plain network, without LoRA branches (what pre-training trains).
    #[arg(long)]
    pub no_lora: bool,
    /// Take the layer sizes from this saved model instead of --hidden1/--hidden2.
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Where to write the DOT file; FILE.svg and FILE.png go beside it when `dot` is installed.
    #[arg(long, default_value = "runs/network.dot", value_name = "FILE.dot")]
    pub out: PathBuf,
}
