//! The language-model engine: continuous batching of completions over one base with per-sequence
//! adapters.
//!
//! One worker thread owns the running batch. Each step it admits waiting sequences (up to the maximum
//! batch), runs every running sequence's new tokens as one mixed batch ([`Llama::forward_mixed`]: a new
//! sequence feeds its whole prompt, a running one its last token), picks each sequence's next token and
//! sends the text it completes to that sequence's client. Finished sequences leave; sequences whose
//! client went away are dropped before the next step. When nothing runs, the first request waits a short
//! window for others so that requests arriving together start together. The base's bf16 weights (a
//! checkpoint stored in bf16) are read from a bf16 copy packed once at start ([`Llama::pack_base`]): the
//! same tokens from half the memory traffic.
//!
//! Text is the continuation decoded after the prompt ([`Tokenizer::decode_continuation`], as `lora lm
//! generate` prints it). With stop strings, text that could still become a stop string is held back
//! until it cannot; the completion ends before the first stop string.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lora::PackedBase;
use lora_lm::generate::Sampling;
use lora_lm::mixed::Sequence;
use lora_lm::{KvCache, Llama, Tokenizer};
use rand::rngs::StdRng;
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::{Metrics, ModelLabel};
use crate::registry::ServedAdapter;

/// Why a completion ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` (or the model's context).
    Length,
}

impl FinishReason {
    /// `"stop"` or `"length"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a completion's client receives, tagged with the prompt's index in its request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// More text.
    Text(usize, String),
    /// The end: why, and how many tokens were generated.
    Done(usize, FinishReason, usize),
    /// The model failed (an internal error).
    Failed(usize, String),
}

/// One prompt to complete.
#[derive(Debug)]
pub struct Job {
    /// Index of the prompt in its request (its choice index and its generator's row).
    pub index: usize,
    /// Prompt tokens (checked: 1 ≤ len, len + max_tokens ≤ context).
    pub prompt: Vec<u32>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// How tokens are picked.
    pub sampling: Sampling,
    /// Stop strings.
    pub stop: Vec<String>,
    /// The adapter, held for the whole completion (`None`: the base).
    pub adapter: Option<Arc<ServedAdapter>>,
    /// The model name (for metrics).
    pub model: String,
    /// Where the events go.
    pub events: UnboundedSender<Event>,
}

/// Batching settings.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Most sequences in one step.
    pub max_batch: usize,
    /// How long the first request of an idle engine waits for others.
    pub window: Duration,
}

/// A handle on the worker: submit jobs; the worker stops when every handle is dropped.
#[derive(Debug, Clone)]
pub struct LmEngine {
    tx: Sender<Job>,
}

impl LmEngine {
    /// Starts the worker thread. `base` is `model`'s [`Llama::pack_base`]: the weights it holds in bf16
    /// are read from there.
    pub fn start(model: Arc<Llama>, base: PackedBase, tokenizer: Arc<Tokenizer>, settings: BatchSettings, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("lora-lm-batcher".into())
            .spawn(move || Worker { model, base, tokenizer, settings, metrics }.run(rx))
            .ok();
        LmEngine { tx }
    }

    /// Queues a job; false when the worker has stopped.
    pub fn submit(&self, job: Job) -> bool {
        self.tx.send(job).is_ok()
    }
}

struct Running {
    job: Job,
    cache: KvCache,
    feed: Vec<u32>,
    tokens: Vec<u32>,
    sent: usize, // bytes of the continuation sent
    rng: StdRng,
}

/// The fingerprint of a running sequence's adapter (`None`: the base), its batching order.
fn adapter_key(r: &Running) -> Option<&str> {
    r.job.adapter.as_ref().map(|a| a.fingerprint.as_str())
}

struct Worker {
    model: Arc<Llama>,
    base: PackedBase,
    tokenizer: Arc<Tokenizer>,
    settings: BatchSettings,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn run(self, rx: Receiver<Job>) {
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let mut running: Vec<Running> = Vec::new();
        loop {
            if running.is_empty() && waiting.is_empty() {
                match rx.recv() {
                    Ok(j) => waiting.push_back(j),
                    Err(_) => return,
                }
                let deadline = Instant::now() + self.settings.window;
                while waiting.len() < self.settings.max_batch {
                    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(j) => waiting.push_back(j),
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
            while let Ok(j) = rx.try_recv() {
                waiting.push_back(j);
            }
            while running.len() < self.settings.max_batch {
                let Some(job) = waiting.pop_front() else { break };
                if job.events.is_closed() {
                    continue;
                }
                let rng = job.sampling.rng(job.index);
                let feed = job.prompt.clone();
                running.push(Running { cache: self.model.sequence_cache(), feed, tokens: Vec::new(), sent: 0, rng, job });
            }
            running.retain(|r| !r.job.events.is_closed());
            if running.is_empty() {
                continue;
            }
            // Sequences of one adapter side by side share their delta products (the order changes no result).
            running.sort_by(|a, b| adapter_key(a).cmp(&adapter_key(b)));
            self.step(&mut running);
        }
    }

    /// One forward pass for every running sequence, then one token each.
    fn step(&self, running: &mut Vec<Running>) {
        let vocab = self.model.config().vocab_size;
        self.metrics.batch_size.observe(running.len() as f64);
        let result = {
            let mut seqs: Vec<Sequence<'_>> = running
                .iter_mut()
                .map(|r| Sequence { tokens: &r.feed, cache: &mut r.cache, adapter: r.job.adapter.as_deref().map(|a| &a.packed) })
                .collect();
            self.model.forward_mixed(&mut seqs, Some(&self.base))
        };
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                for r in running.drain(..) {
                    let _ = r.job.events.send(Event::Failed(r.job.index, format!("the model failed: {e}")));
                }
                return;
            }
        };
        let eos = &self.model.config().eos_token_ids;
        let ctx = self.model.config().max_position_embeddings;
        let mut done = vec![false; running.len()];
        for (i, r) in running.iter_mut().enumerate() {
            let id = r.job.sampling.pick(&logits[i * vocab..(i + 1) * vocab], &mut r.rng);
            let finish = if eos.contains(&id) {
                Some(FinishReason::Stop)
            } else {
                r.tokens.push(id);
                self.metrics.tokens.get_or_create(&ModelLabel { model: r.job.model.clone() }).inc();
                match self.emit(r) {
                    Ok(true) => Some(FinishReason::Stop),
                    Ok(false) if r.tokens.len() >= r.job.max_tokens || r.cache.len() >= ctx => Some(FinishReason::Length),
                    Ok(false) => None,
                    Err(e) => {
                        let _ = r.job.events.send(Event::Failed(r.job.index, e));
                        done[i] = true;
                        continue;
                    }
                }
            };
            match finish {
                Some(f) => {
                    if f == FinishReason::Length || eos.contains(&id) {
                        self.flush(r);
                    }
                    let _ = r.job.events.send(Event::Done(r.job.index, f, r.tokens.len()));
                    done[i] = true;
                }
                None => r.feed = vec![id],
            }
        }
        let mut i = 0;
        running.retain(|_| {
            i += 1;
            !done[i - 1]
        });
    }

    /// Sends the text the new token completes; true when a stop string was reached (its text is cut there).
    fn emit(&self, r: &mut Running) -> Result<bool, String> {
        let text = self.tokenizer.decode_continuation(&r.job.prompt, &r.tokens).map_err(|e| e.to_string())?;
        if let Some(end) = r.job.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            if end > r.sent {
                let _ = r.job.events.send(Event::Text(r.job.index, text[r.sent..end].to_string()));
            }
            r.sent = end.max(r.sent);
            return Ok(true);
        }
        // Hold back a cut character and anything that could still grow into a stop string.
        let mut safe = text.trim_end_matches('\u{FFFD}').len();
        let hold = r.job.stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
        safe = safe.saturating_sub(hold).max(r.sent);
        while !text.is_char_boundary(safe) {
            safe -= 1;
        }
        if safe > r.sent {
            let _ = r.job.events.send(Event::Text(r.job.index, text[r.sent..safe].to_string()));
            r.sent = safe;
        }
        Ok(false)
    }

    /// Sends whatever text is still held back (the completion ended without a stop string).
    fn flush(&self, r: &mut Running) {
        if let Ok(text) = self.tokenizer.decode_continuation(&r.job.prompt, &r.tokens) {
            if text.len() > r.sent && text.is_char_boundary(r.sent) {
                let _ = r.job.events.send(Event::Text(r.job.index, text[r.sent..].to_string()));
                r.sent = text.len();
            }
        }
    }
}
