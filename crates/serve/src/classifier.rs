//! The classifier engine: batched predictions of an image classifier (ExpensiveNet, e.g. MNIST's) over one
//! base with per-request adapters.
//!
//! One worker thread collects the requests that arrive within a short window (up to a maximum number of
//! images), runs all their images as one mixed batch through the network's layers — found by name,
//! `linear1 → ReLU → linear2 → ReLU → linear3` — (each base product once, each request's rows with its own
//! adapter's delta: [`lora::LoraModel::forward_mixed`]) and answers each request with its rows' softmax
//! probabilities. Pixels p ∈ [0, 255] are normalised as for training, `(p/255 − mean)/std`, with the
//! [`Normalization`] the caller gives (the training set's mean and standard deviation).
//!
//! The worker is supervised ([`crate::worker`]): a panic in a batch fails that batch's requests with a 500
//! and the worker takes the next. A request past its deadline when its batch forms gets a timeout.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use lora::{Activation, RowGroup};
use lora_train::ExpensiveNet;
use tokio::sync::oneshot;

use crate::error::ServeError;
use crate::lm::{BatchSettings, Failure};
use crate::metrics::Metrics;
use crate::registry::ServedAdapter;
use crate::worker::{panic_message, AliveGuard, Supervisor, WorkerHealth};

/// The layers a prediction runs through, by name, with the activation after each.
const LAYERS: [(&str, Activation); 3] = [("linear1", Activation::Relu), ("linear2", Activation::Relu), ("linear3", Activation::Identity)];

/// How raw pixels become the network's inputs: `(p/255 − mean)/std`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    /// Mean of the training pixels scaled to [0, 1].
    pub mean: f64,
    /// Their standard deviation.
    pub std: f64,
}

/// One request's images.
#[derive(Debug)]
pub struct Job {
    /// Normalised pixels, (n, inputs) row-major.
    pub pixels: Vec<f32>,
    /// The adapter, held until the answer (`None`: the base).
    pub adapter: Option<Arc<ServedAdapter>>,
    /// Where the probabilities (n, classes) go.
    pub reply: oneshot::Sender<Result<Vec<f32>, Failure>>,
    /// When the request must have been answered.
    pub deadline: Instant,
}

/// A handle on the worker; it stops when every handle is dropped.
#[derive(Debug, Clone)]
pub struct ClassifierEngine {
    tx: Sender<Job>,
    inputs: usize,
    classes: usize,
    norm: Normalization,
    health: Arc<WorkerHealth>,
}

impl ClassifierEngine {
    /// Starts the worker for `net` (no adapters of its own), normalising with `norm`.
    /// `settings.max_batch` counts images.
    /// A batch running longer than `stuck_after` reports the worker stuck.
    pub fn start(
        net: Arc<ExpensiveNet>,
        norm: Normalization,
        settings: BatchSettings,
        metrics: Arc<Metrics>,
        stuck_after: std::time::Duration,
    ) -> crate::Result<Self> {
        if !(norm.std.is_finite() && norm.std > 0.0 && norm.mean.is_finite()) {
            return Err(ServeError::setting(
                "normalization",
                format!("mean {} std {}", norm.mean, norm.std),
                "std must be > 0, both finite",
            ));
        }
        let mut layers = Vec::with_capacity(LAYERS.len());
        for (name, act) in LAYERS {
            let i = net.model.layer_names().position(|n| n == name).ok_or_else(|| {
                ServeError::setting(
                    "model",
                    name,
                    format!("the classifier has no layer {name:?} (it has {:?})", net.model.layer_names().collect::<Vec<_>>()),
                )
            })?;
            layers.push((i, act));
        }
        let [inputs, _, _, classes] = net.sizes()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let health = WorkerHealth::new(metrics.worker_up.clone(), metrics.worker_panics.clone(), stuck_after);
        let h = health.clone();
        std::thread::Builder::new()
            .name("lora-classifier-batcher".into())
            .spawn(move || Worker { net, layers, inputs, settings, metrics }.run(rx, h))?;
        Ok(ClassifierEngine { tx, inputs, classes, norm, health })
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
        (p / 255.0 - self.norm.mean as f32) / self.norm.std as f32
    }
    /// Queues a job; false when the worker has stopped.
    pub fn submit(&self, job: Job) -> bool {
        self.tx.send(job).is_ok()
    }
    /// The worker's health.
    pub fn health(&self) -> &Arc<WorkerHealth> {
        &self.health
    }
}

struct Worker {
    net: Arc<ExpensiveNet>,
    layers: Vec<(usize, Activation)>,
    inputs: usize,
    settings: BatchSettings,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn run(self, rx: Receiver<Job>, health: Arc<WorkerHealth>) {
        let _alive = AliveGuard(health.clone());
        let mut supervisor = Supervisor::new(health.clone());
        let mut batch: Vec<Job> = Vec::new();
        loop {
            match std::panic::catch_unwind(AssertUnwindSafe(|| self.turn(&rx, &mut batch, &health))) {
                Ok(true) => supervisor.step_ok(),
                Ok(false) => return,
                Err(p) => {
                    let message = panic_message(&*p);
                    supervisor.panicked("classifier", &message);
                    for j in batch.drain(..) {
                        let _ = j.reply.send(Err(Failure::internal(format!(
                            "the classifier worker panicked in the batch that ran this request ({message}); the worker goes on"
                        ))));
                    }
                    supervisor.back_off();
                }
            }
        }
    }

    /// Collects one batch into `batch` and answers it; false when the channel is closed.
    fn turn(&self, rx: &Receiver<Job>, batch: &mut Vec<Job>, health: &WorkerHealth) -> bool {
        let Ok(first) = rx.recv() else { return false };
        batch.push(first);
        let mut images = batch[0].pixels.len() / self.inputs;
        let deadline = Instant::now() + self.settings.window;
        while images < self.settings.max_batch {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(j) => {
                    images += j.pixels.len() / self.inputs;
                    batch.push(j);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let now = Instant::now();
        batch.retain(|j| !j.reply.is_closed());
        let (late, jobs): (Vec<Job>, Vec<Job>) = std::mem::take(batch).into_iter().partition(|j| now >= j.deadline);
        for j in late {
            let _ = j.reply.send(Err(Failure::timeout("the prediction waited past the server's request timeout (--request-timeout)")));
        }
        *batch = jobs;
        if batch.is_empty() {
            return true;
        }
        self.metrics.batch_size.observe(batch.iter().map(|j| j.pixels.len() / self.inputs).sum::<usize>() as f64);
        let _step = health.step();
        #[cfg(test)]
        if batch.iter().any(|j| j.pixels.first().is_some_and(|p| *p == f32::MAX)) {
            panic!("test hook: a panic in this batch");
        }
        match self.forward(batch) {
            Ok(probs) => {
                let classes = probs.len() / batch.iter().map(|j| j.pixels.len() / self.inputs).sum::<usize>().max(1);
                let mut at = 0;
                for j in batch.drain(..) {
                    let n = j.pixels.len() / self.inputs * classes;
                    let _ = j.reply.send(Ok(probs[at..at + n].to_vec()));
                    at += n;
                }
            }
            Err(e) => {
                for j in batch.drain(..) {
                    let _ = j.reply.send(Err(Failure::internal(e.clone())));
                }
            }
        }
        true
    }

    /// Softmax probabilities of every job's images, in order.
    fn forward(&self, jobs: &[Job]) -> Result<Vec<f32>, String> {
        let inputs = self.inputs;
        let rows: usize = jobs.iter().map(|j| j.pixels.len() / inputs).sum();
        let mut x = Vec::with_capacity(rows * inputs);
        for j in jobs {
            x.extend_from_slice(&j.pixels);
        }
        let groups: Vec<RowGroup<'_>> =
            jobs.iter().map(|j| RowGroup { rows: j.pixels.len() / inputs, adapter: j.adapter.as_deref().map(|a| &a.packed) }).collect();
        let run = || -> lora::Result<Vec<f32>> {
            let mut h = Tensor::from_vec(x, (rows, inputs), &Device::Cpu)?;
            for &(layer, act) in &self.layers {
                h = self.net.model.forward_mixed(layer, &h, &groups, act)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn engine(net: ExpensiveNet) -> ClassifierEngine {
        let settings = BatchSettings { max_batch: 64, window: Duration::from_millis(1) };
        ClassifierEngine::start(
            Arc::new(net),
            Normalization { mean: 0.1, std: 0.3 },
            settings,
            Arc::new(Metrics::default()),
            Duration::from_secs(60),
        )
        .unwrap()
    }

    fn ask(e: &ClassifierEngine, pixels: Vec<f32>) -> oneshot::Receiver<Result<Vec<f32>, Failure>> {
        let (tx, rx) = oneshot::channel();
        assert!(e.submit(Job { pixels, adapter: None, reply: tx, deadline: Instant::now() + Duration::from_secs(60) }));
        rx
    }

    #[test]
    fn the_engine_runs_the_layers_by_name_as_the_networks_own_forward_does() {
        let net = ExpensiveNet::new(12, 8, 6, 4, 3, &Device::Cpu).unwrap();
        let x: Vec<f32> = (0..3 * 12).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
        let want = net.forward(&Tensor::from_vec(x.clone(), (3, 12), &Device::Cpu).unwrap()).unwrap().to_vec2::<f32>().unwrap();
        let e = engine(net);
        let got = ask(&e, x).blocking_recv().unwrap().unwrap();
        for (row, logits) in got.chunks(4).zip(&want) {
            let mut p = logits.clone();
            softmax(&mut p);
            for (a, b) in row.iter().zip(&p) {
                // The same kernels on the same rows: equal to f32 rounding of the base product's order.
                assert!((a - b).abs() <= 1e-6, "{row:?} vs {p:?}");
            }
        }
    }

    #[test]
    fn a_panic_in_a_batch_fails_that_batchs_requests_and_the_next_batch_is_answered() {
        let e = engine(ExpensiveNet::new(12, 8, 6, 4, 3, &Device::Cpu).unwrap());
        let mut poison = vec![0.0f32; 12];
        poison[0] = f32::MAX; // the test hook
        let failed = ask(&e, poison).blocking_recv().unwrap().unwrap_err();
        assert_eq!(failed.kind, crate::lm::FailureKind::Internal);
        assert!(failed.message.contains("panicked") && failed.message.contains("test hook"), "{failed:?}");
        let ok = ask(&e, vec![0.5; 12]).blocking_recv().unwrap().unwrap();
        assert_eq!(ok.len(), 4);
        assert_eq!((e.health().panics(), e.health().state()), (1, crate::worker::WorkerState::Running));
    }

    #[test]
    fn a_request_past_its_deadline_gets_a_timeout_not_an_answer() {
        let e = engine(ExpensiveNet::new(12, 8, 6, 4, 3, &Device::Cpu).unwrap());
        let (tx, rx) = oneshot::channel();
        assert!(e.submit(Job { pixels: vec![0.0; 12], adapter: None, reply: tx, deadline: Instant::now() }));
        let f = rx.blocking_recv().unwrap().unwrap_err();
        assert_eq!(f.kind, crate::lm::FailureKind::Timeout, "{f:?}");
    }
}
