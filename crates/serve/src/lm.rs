//! The language-model engine: continuous batching of completions over one base with per-sequence
//! adapters.
//!
//! One worker thread owns the running batch. Each step it admits waiting sequences (up to the maximum
//! batch), runs every running sequence's new tokens as one mixed batch ([`Llama::forward_mixed`]: a new
//! sequence feeds its whole prompt, a running one its last token), picks each sequence's next token and
//! sends the text it completes to that sequence's client. Finished sequences leave; sequences whose
//! client went away are dropped before the next step. When nothing runs, the first request waits a short
//! window for others so that requests arriving together start together. A base whose weights are bf16
//! numbers is held in bf16 ([`Llama::hold_base_in_bf16`], at start): the same tokens from half the memory
//! and half the memory traffic.
//!
//! Text is the continuation decoded after the prompt ([`Tokenizer::decode_continuation`], as `lora lm
//! generate` prints it). With stop strings, text that could still become a stop string is held back
//! until it cannot; the completion ends before the first stop string. A tokenizer may change text it
//! decoded before (its clean-up joins a space to what follows), so a piece is cut from the first character
//! boundary at or after what was sent, never inside a character ([`next_piece`]).
//!
//! The worker is supervised ([`crate::worker`]): a panic in a step fails that step's sequences with a
//! 500 and the worker takes the next jobs. Every job carries a deadline (`--request-timeout`); a sequence
//! past it, waiting or running, ends with a timeout.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lora_lm::generate::Sampling;
use lora_lm::mixed::Sequence;
use lora_lm::{KvCache, Llama, Tokenizer};
use rand::rngs::StdRng;
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::{Metrics, ModelLabel};
use crate::registry::ServedAdapter;
use crate::worker::{panic_message, AliveGuard, Supervisor, WorkerHealth};

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

/// Why a request failed in a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The model failed or its step panicked: a 500.
    Internal,
    /// The request ran past its deadline (`--request-timeout`): a 504.
    Timeout,
}

/// A failed request: what kind of failure, and the message the client sees.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The kind (decides the HTTP status).
    pub kind: FailureKind,
    /// What went wrong.
    pub message: String,
}

impl Failure {
    /// An internal failure.
    pub fn internal(message: impl Into<String>) -> Self {
        Failure { kind: FailureKind::Internal, message: message.into() }
    }
    /// The deadline passed.
    pub fn timeout(message: impl Into<String>) -> Self {
        Failure { kind: FailureKind::Timeout, message: message.into() }
    }
}

/// What a completion's client receives, tagged with the prompt's index in its request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// More text.
    Text(usize, String),
    /// The end: why, and how many tokens were generated.
    Done(usize, FinishReason, usize),
    /// The request failed.
    Failed(usize, Failure),
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
    /// Tokens that end the completion (the model's end tokens; for a chat, also its template's end token).
    pub stop_ids: Arc<[u32]>,
    /// The adapter, held for the whole completion (`None`: the base).
    pub adapter: Option<Arc<ServedAdapter>>,
    /// The model name (for metrics).
    pub model: String,
    /// Where the events go.
    pub events: UnboundedSender<Event>,
    /// When the request must have finished; past it the sequence ends with a timeout.
    pub deadline: Instant,
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
    health: Arc<WorkerHealth>,
}

impl LmEngine {
    /// Starts the worker thread. A step running longer than `stuck_after` reports the worker stuck.
    pub fn start(
        model: Arc<Llama>,
        tokenizer: Arc<Tokenizer>,
        settings: BatchSettings,
        metrics: Arc<Metrics>,
        stuck_after: Duration,
    ) -> crate::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let health = WorkerHealth::new(metrics.worker_up.clone(), metrics.worker_panics.clone(), stuck_after);
        let h = health.clone();
        std::thread::Builder::new()
            .name("lora-lm-batcher".into())
            .spawn(move || Worker { model, tokenizer, settings, metrics }.run(rx, h))?;
        Ok(LmEngine { tx, health })
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

/// The sequences the worker holds between turns (kept outside a turn, so a panic loses none of them).
#[derive(Default)]
struct Queues {
    waiting: VecDeque<Job>,
    running: Vec<Running>,
}

struct Worker {
    model: Arc<Llama>,
    tokenizer: Arc<Tokenizer>,
    settings: BatchSettings,
    metrics: Arc<Metrics>,
}

fn timed_out(job: &Job) {
    let _ = job.events.send(Event::Failed(
        job.index,
        Failure::timeout("the completion ran past the server's request timeout (--request-timeout) and was stopped"),
    ));
}

impl Worker {
    /// Turns until every handle is gone; a turn that panics fails its running sequences, and the next
    /// turn starts (after the supervisor's backoff).
    fn run(self, rx: Receiver<Job>, health: Arc<WorkerHealth>) {
        let _alive = AliveGuard(health.clone());
        let mut supervisor = Supervisor::new(health.clone());
        let mut q = Queues::default();
        loop {
            match std::panic::catch_unwind(AssertUnwindSafe(|| self.turn(&rx, &mut q, &health))) {
                Ok(Some(stepped)) => {
                    if stepped {
                        supervisor.step_ok();
                    }
                }
                Ok(None) => return,
                Err(p) => {
                    let message = panic_message(&*p);
                    supervisor.panicked("lm", &message);
                    for r in q.running.drain(..) {
                        let _ = r.job.events.send(Event::Failed(
                            r.job.index,
                            Failure::internal(format!(
                                "the model worker panicked in the step that ran this request ({message}); the request is lost, the worker goes on"
                            )),
                        ));
                    }
                    #[cfg(test)]
                    if message == crate::worker::fault::KILL_MESSAGE {
                        std::panic::resume_unwind(p);
                    }
                    supervisor.back_off();
                }
            }
        }
    }

    /// Takes new jobs, drops the finished, the abandoned and the late, and runs one step. `None` when the
    /// channel is closed and nothing is left; else whether a step ran.
    fn turn(&self, rx: &Receiver<Job>, q: &mut Queues, health: &WorkerHealth) -> Option<bool> {
        if q.running.is_empty() && q.waiting.is_empty() {
            q.waiting.push_back(rx.recv().ok()?);
            let deadline = Instant::now() + self.settings.window;
            while q.waiting.len() < self.settings.max_batch {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(j) => q.waiting.push_back(j),
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        while let Ok(j) = rx.try_recv() {
            q.waiting.push_back(j);
        }
        let now = Instant::now();
        q.waiting.retain(|j| {
            let late = now >= j.deadline;
            if late {
                timed_out(j);
            }
            !late && !j.events.is_closed()
        });
        while q.running.len() < self.settings.max_batch {
            let Some(job) = q.waiting.pop_front() else { break };
            let rng = job.sampling.rng(job.index);
            let feed = job.prompt.clone();
            q.running.push(Running { cache: self.model.sequence_cache(), feed, tokens: Vec::new(), sent: 0, rng, job });
        }
        q.running.retain(|r| {
            let late = now >= r.job.deadline;
            if late {
                timed_out(&r.job);
            }
            !late && !r.job.events.is_closed()
        });
        if q.running.is_empty() {
            return Some(false);
        }
        // Sequences of one adapter side by side share their delta products (the order changes no result).
        q.running.sort_by(|a, b| adapter_key(a).cmp(&adapter_key(b)));
        let _step = health.step();
        self.step(&mut q.running);
        Some(true)
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
            self.model.forward_mixed(&mut seqs)
        };
        #[cfg(test)]
        for r in running.iter() {
            if crate::worker::fault::asks(&r.job.prompt, crate::worker::fault::HANG_STEP) {
                std::thread::sleep(Duration::from_millis(1500));
            }
            if crate::worker::fault::asks(&r.job.prompt, crate::worker::fault::PANIC_STEP) {
                panic!("test hook: a panic in this step");
            }
            if crate::worker::fault::asks(&r.job.prompt, crate::worker::fault::KILL_WORKER) {
                panic!("{}", crate::worker::fault::KILL_MESSAGE);
            }
        }
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                for r in running.drain(..) {
                    let _ = r.job.events.send(Event::Failed(r.job.index, Failure::internal(format!("the model failed: {e}"))));
                }
                return;
            }
        };
        let ctx = self.model.config().max_position_embeddings;
        let mut done = vec![false; running.len()];
        for (i, r) in running.iter_mut().enumerate() {
            let id = r.job.sampling.pick(&logits[i * vocab..(i + 1) * vocab], &mut r.rng);
            let eos = r.job.stop_ids.contains(&id);
            let finish = if eos {
                Some(FinishReason::Stop)
            } else {
                r.tokens.push(id);
                self.metrics.tokens.get_or_create(&ModelLabel { model: self.metrics.models.label(&r.job.model) }).inc();
                match self.emit(r) {
                    Ok(true) => Some(FinishReason::Stop),
                    Ok(false) if r.tokens.len() >= r.job.max_tokens || r.cache.len() >= ctx => Some(FinishReason::Length),
                    Ok(false) => None,
                    Err(e) => {
                        let _ = r.job.events.send(Event::Failed(r.job.index, Failure::internal(e)));
                        done[i] = true;
                        continue;
                    }
                }
            };
            match finish {
                Some(f) => {
                    if f == FinishReason::Length || eos {
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
        let p = next_piece(&text, r.sent, &r.job.stop);
        if let Some(range) = p.send {
            let _ = r.job.events.send(Event::Text(r.job.index, text[range].to_string()));
        }
        r.sent = p.sent;
        Ok(p.stop)
    }

    /// Sends whatever text is still held back (the completion ended without a stop string).
    fn flush(&self, r: &mut Running) {
        if let Ok(text) = self.tokenizer.decode_continuation(&r.job.prompt, &r.tokens) {
            let from = ceil_boundary(&text, r.sent);
            if text.len() > from {
                let _ = r.job.events.send(Event::Text(r.job.index, text[from..].to_string()));
            }
            r.sent = text.len().max(r.sent);
        }
    }
}

/// The first character boundary of `text` at or after byte `i` (its length when past the end).
fn ceil_boundary(text: &str, i: usize) -> usize {
    let mut i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// The last character boundary of `text` at or before byte `i`.
fn floor_boundary(text: &str, i: usize) -> usize {
    let mut i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// What to send of a continuation decoded so far.
#[derive(Debug, PartialEq)]
pub struct Piece {
    /// The bytes of `text` to send now, if any (always on character boundaries).
    pub send: Option<std::ops::Range<usize>>,
    /// Bytes of the continuation sent after this.
    pub sent: usize,
    /// Whether a stop string was reached (the completion ends, its text cut before it).
    pub stop: bool,
}

/// The piece of `text` (the continuation decoded so far) to send after the `sent` bytes already sent,
/// with stop strings `stops`: up to the first stop string when one appears (and then stop); else up to
/// what can no longer become a stop string or a cut character (a trailing U+FFFD). `text` may differ
/// from the text sent before (a tokenizer's clean-up can change earlier characters): pieces start at the
/// first character boundary at or after `sent`, so a piece is never cut inside a character.
pub fn next_piece(text: &str, sent: usize, stops: &[String]) -> Piece {
    let from = ceil_boundary(text, sent);
    if let Some(end) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
        return Piece { send: (end > from).then_some(from..end), sent: end.max(sent), stop: true };
    }
    // Hold back a cut character and anything that could still grow into a stop string.
    let hold = stops.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
    let safe = floor_boundary(text, text.trim_end_matches('\u{FFFD}').len().saturating_sub(hold));
    if safe > from {
        Piece { send: Some(from..safe), sent: safe, stop: false }
    } else {
        Piece { send: None, sent, stop: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn a_piece_is_what_follows_the_sent_bytes_up_to_a_cut_character() {
        assert_eq!(next_piece("abc", 1, &[]), Piece { send: Some(1..3), sent: 3, stop: false });
        // A trailing U+FFFD (a character cut by the token boundary) waits for the rest of its bytes.
        assert_eq!(next_piece("ab\u{FFFD}", 0, &[]), Piece { send: Some(0..2), sent: 2, stop: false });
        assert_eq!(next_piece("ab\u{FFFD}", 2, &[]), Piece { send: None, sent: 2, stop: false });
    }

    #[test]
    fn text_that_could_still_become_a_stop_string_is_held_back_and_the_stop_string_ends_it() {
        let s = stops(&["END"]);
        assert_eq!(next_piece("abcEN", 0, &s), Piece { send: Some(0..3), sent: 3, stop: false });
        assert_eq!(next_piece("abcENDx", 3, &s), Piece { send: None, sent: 3, stop: true });
        assert_eq!(next_piece("abcxENDx", 3, &s), Piece { send: Some(3..4), sent: 4, stop: true });
    }

    #[test]
    fn a_text_changed_before_what_was_sent_is_never_cut_inside_a_character() {
        // Sent 1 byte of an earlier text; the text decoded now has a two-byte "é" there (a tokenizer's
        // clean-up moved it). Slicing from byte 1 panicked here, and with it the whole worker.
        let p = next_piece("éa", 1, &[]);
        assert_eq!(p, Piece { send: Some(2..3), sent: 3, stop: false });
        let p = next_piece("éEND", 1, &stops(&["END"]));
        assert_eq!(p, Piece { send: None, sent: 2, stop: true });
        // Held back for a stop string: never below a character boundary either.
        let p = next_piece("aé", 0, &stops(&["xy"]));
        assert_eq!(p, Piece { send: Some(0..1), sent: 1, stop: false });
        for sent in 0..=6 {
            for text in ["", "é", "aéb", "∑∑", "é\u{FFFD}"] {
                for st in [stops(&[]), stops(&["b"]), stops(&["∑x"])] {
                    let p = next_piece(text, sent, &st);
                    if let Some(r) = &p.send {
                        assert!(text.get(r.clone()).is_some(), "{text:?} from {sent}: {r:?} cuts a character");
                    }
                }
            }
        }
    }
}
