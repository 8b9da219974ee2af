//! Models and training loops for lora-rs: ExpensiveNet, Adam, cross-entropy training and evaluation.
//!
//! Training minimises the mean cross-entropy `L = −(1/B) Σ_i log softmax(f(x_i))_{y_i}` over shuffled
//! mini-batches with Adam (`m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//! `θ ← θ − lr·m̂/(√v̂ + ε)` with bias-corrected m̂, v̂). Nothing here knows where the data came from: a
//! data set is a (N, features) f32 tensor and N labels.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod checkpoint;
mod data;
mod error;
mod eval;
pub mod fused;
pub mod jobs;
mod net;
mod train;

pub use data::Dataset;
pub use error::{Result, TrainError};
pub use eval::{evaluate, Evaluation};
pub use fused::{OptimState, Trainer};
pub use jobs::{finetune, pretrain, Event, FinetuneJob, Finetuned, PretrainJob};
pub use lora_dist::Group;
pub use lora_optim::checkpoint::Checkpointing;
pub use net::ExpensiveNet;
pub use train::{train, train_with, Checkpoint, SaveEvery, StepInfo, TrainConfig, TrainStats};
