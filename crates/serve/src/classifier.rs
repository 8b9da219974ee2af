//! The classifier engine: batched predictions of an MNIST network over one base with per-request
//! adapters.
//!
//! One worker thread collects the requests that arrive within a short window (up to a maximum number of
//! images), runs all their images as one mixed batch through the three layers (each base product once,
//! each request's rows with its own adapter's delta: [`lora::LoraModel::forward_mixed`]) and answers
//! each request with its rows' softmax probabilities. Pixels p ∈ [0, 255] are normalised as for training,
//! `(p/255 − mean)/std` with the training set's mean and standard deviation.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use lora::{Activation, RowGroup};
use lora_train::ExpensiveNet;
use tokio::sync::oneshot;

use crate::lm::BatchSettings;
use crate::metrics::Metrics;
use crate::registry::ServedAdapter;

/// One request's images.
#[derive(Debug)]
pub struct Job {
    /// Normalised pixels, (n, inputs) row-major.
    pub pixels: Vec<f32>,
    /// The adapter, held until the answer (`None`: the base).
    pub adapter: Option<Arc<ServedAdapter>>,
    /// Where the probabilities (n, classes) go.
    pub reply: oneshot::Sender<Result<Vec<f32>, String>>,
}

/// A handle on the worker; it stops when every handle is dropped.
#[derive(Debug, Clone)]
pub struct ClassifierEngine {
    tx: Sender<Job>,
    inputs: usize,
    classes: usize,
    mean: f32,
    std: f32,
}

impl ClassifierEngine {
    /// Starts the worker for `net` (no adapters of its own), normalising with `mean` and `std`.
    /// `settings.max_batch` counts images.
    pub fn start(net: Arc<ExpensiveNet>, mean: f64, std: f64, settings: BatchSettings, metrics: Arc<Metrics>) -> crate::Result<Self> {
        let [inputs, _, _, classes] = net.sizes()?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new().name("lora-classifier-batcher".into()).spawn(move || run(&net, settings, &metrics, rx))?;
        Ok(ClassifierEngine { tx, inputs, classes, mean: mean as f32, std: std as f32 })
    }

    /// Pixels per image.
    pub fn inputs(&self) -> usize {
        self.inputs
    }
    /// Classes per prediction.
    pub fn classes(&self) -> usize {
        self.classes
    }
    /// `(p/255 − mean)/std`, as `mnist::normalize` computes it for u8 pixels.
    pub fn normalize(&self, p: f32) -> f32 {
        (p / 255.0 - self.mean) / self.std
    }
    /// Queues a job; false when the worker has stopped.
    pub fn submit(&self, job: Job) -> bool {
        self.tx.send(job).is_ok()
    }
}

fn run(net: &ExpensiveNet, settings: BatchSettings, metrics: &Metrics, rx: Receiver<Job>) {
    let Ok([inputs, ..]) = net.sizes() else { return };
    loop {
        let Ok(first) = rx.recv() else { return };
        let mut jobs = vec![first];
        let mut images = jobs[0].pixels.len() / inputs;
        let deadline = Instant::now() + settings.window;
        while images < settings.max_batch {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(j) => {
                    images += j.pixels.len() / inputs;
                    jobs.push(j);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        metrics.batch_size.observe(images as f64);
        match forward(net, &jobs, inputs) {
            Ok(probs) => {
                let mut at = 0;
                let classes = probs.len() / jobs.iter().map(|j| j.pixels.len() / inputs).sum::<usize>().max(1);
                for j in jobs {
                    let n = j.pixels.len() / inputs * classes;
                    let _ = j.reply.send(Ok(probs[at..at + n].to_vec()));
                    at += n;
                }
            }
            Err(e) => {
                for j in jobs {
                    let _ = j.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Softmax probabilities of every job's images, in order.
fn forward(net: &ExpensiveNet, jobs: &[Job], inputs: usize) -> Result<Vec<f32>, String> {
    let rows: usize = jobs.iter().map(|j| j.pixels.len() / inputs).sum();
    let mut x = Vec::with_capacity(rows * inputs);
    for j in jobs {
        x.extend_from_slice(&j.pixels);
    }
    let groups: Vec<RowGroup<'_>> =
        jobs.iter().map(|j| RowGroup { rows: j.pixels.len() / inputs, adapter: j.adapter.as_deref().map(|a| &a.packed) }).collect();
    let run = || -> lora::Result<Vec<f32>> {
        let mut h = Tensor::from_vec(x, (rows, inputs), &Device::Cpu)?;
        for (i, act) in [Activation::Relu, Activation::Relu, Activation::Identity].into_iter().enumerate() {
            h = net.model.forward_mixed(i, &h, &groups, act, None)?;
        }
        Ok(h.flatten_all()?.to_vec1::<f32>()?)
    };
    let mut logits = run().map_err(|e| format!("the model failed: {e}"))?;
    let classes = logits.len() / rows.max(1);
    for row in logits.chunks_exact_mut(classes.max(1)) {
        softmax(row);
    }
    Ok(logits)
}

/// In place, in f64 (then rounded to f32).
fn softmax(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
    let z: f64 = e.iter().sum();
    for (r, e) in row.iter_mut().zip(e) {
        *r = (e / z) as f32;
    }
}
