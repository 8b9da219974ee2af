//! Supervision of the batching workers: a panic in one step fails only the requests of that step, and the
//! worker goes on; [`WorkerHealth`] tells `/health` whether a worker runs, is restarting or is dead.
//!
//! ```text
//! worker thread:  ┌─► catch_unwind(one turn: take jobs, run one step) ──ok──┐
//!                 │          │ panic                                        │
//!                 │          ▼                                              │
//!                 │   fail that step's requests (500, the panic's message)  │
//!                 │   k-th panic in a row: Restarting for backoff(k)        │
//!                 └─────────────────────────────────────────────────────────┘
//! thread exit (channel closed, or a panic the loop could not catch) ──► Dead
//! one step running longer than the request timeout ──────────────────► Stuck (until it ends)
//! ```
//!
//! A step's state (the running sequences and their KV caches) is thrown away after a panic; the model and
//! the packed base are read-only while serving, so nothing shared is left half-changed. Consecutive panics
//! back off — 0, 10, 20, 40 … ms, at most 1 s — so a poison request cannot spin the worker at full speed;
//! while it waits the worker reports `restarting` and `/health` answers 503. A step that runs longer than
//! the request timeout has outlived every request in it: the worker reports `stuck` until it returns.

use std::any::Any;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;

/// What a worker is doing, as `/health` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Taking and running requests.
    Running,
    /// Backing off after panics in consecutive steps; requests wait in the queue.
    Restarting,
    /// One step has run longer than the request timeout: every request in it is past its deadline.
    Stuck,
    /// The thread has ended: no request can be served.
    Dead,
}

/// A worker's state and how many of its steps panicked, shared by the worker and the routes.
#[derive(Debug)]
pub struct WorkerHealth {
    state: AtomicU8,
    /// When the step running now started, in ms after `epoch` + 1 (0: no step running).
    busy_since: AtomicU64,
    epoch: Instant,
    stuck_after: Duration,
    panics: AtomicU64,
    last_panic: Mutex<Option<String>>,
    up: Gauge,
    panic_counter: Counter,
}

impl WorkerHealth {
    /// A running worker's health, mirrored in the `up` gauge (1 running, 0 otherwise) and `panics` counter;
    /// a step running longer than `stuck_after` makes it [`WorkerState::Stuck`].
    pub fn new(up: Gauge, panics: Counter, stuck_after: Duration) -> Arc<Self> {
        up.set(1);
        Arc::new(WorkerHealth {
            state: AtomicU8::new(0),
            busy_since: AtomicU64::new(0),
            epoch: Instant::now(),
            stuck_after,
            panics: AtomicU64::new(0),
            last_panic: Mutex::new(None),
            up,
            panic_counter: panics,
        })
    }

    /// The state now.
    pub fn state(&self) -> WorkerState {
        let s = match self.state.load(Ordering::Acquire) {
            0 => WorkerState::Running,
            1 => WorkerState::Restarting,
            _ => WorkerState::Dead,
        };
        if s == WorkerState::Running && self.step_age().is_some_and(|age| age > self.stuck_after) {
            return WorkerState::Stuck;
        }
        s
    }

    /// How long the step running now has run (`None`: none runs).
    pub fn step_age(&self) -> Option<Duration> {
        match self.busy_since.load(Ordering::Acquire) {
            0 => None,
            t => Some(self.epoch.elapsed().saturating_sub(Duration::from_millis(t - 1))),
        }
    }

    /// Marks a step as running from now until the guard is dropped (however the step ends).
    pub(crate) fn step(&self) -> StepGuard<'_> {
        self.busy_since.store(self.epoch.elapsed().as_millis() as u64 + 1, Ordering::Release);
        StepGuard(self)
    }

    /// Sets the stored state (`Stuck` is not stored: [`WorkerHealth::state`] derives it from the step's age).
    fn set(&self, s: WorkerState) {
        self.state.store(
            match s {
                WorkerState::Running | WorkerState::Stuck => 0,
                WorkerState::Restarting => 1,
                WorkerState::Dead => 2,
            },
            Ordering::Release,
        );
        self.up.set(i64::from(s == WorkerState::Running));
    }

    /// Steps that panicked since the start.
    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }

    /// The last panic's message.
    pub fn last_panic(&self) -> Option<String> {
        self.last_panic.lock().ok().and_then(|m| m.clone())
    }
}

/// A step under way; see [`WorkerHealth::step`].
pub(crate) struct StepGuard<'a>(&'a WorkerHealth);

impl Drop for StepGuard<'_> {
    fn drop(&mut self) {
        self.0.busy_since.store(0, Ordering::Release);
    }
}

/// Marks the worker dead when its thread ends, however it ends (returning or unwinding).
pub(crate) struct AliveGuard(pub Arc<WorkerHealth>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.set(WorkerState::Dead);
        if std::thread::panicking() {
            tracing::error!("a batching worker thread died; /health reports it and requests get 503");
        }
    }
}

/// How long to wait before the next turn after the `k`-th panic in a row (k ≥ 1): none after the first,
/// then 10 ms doubling, at most 1 s.
pub fn backoff(k: u32) -> Duration {
    if k <= 1 {
        Duration::ZERO
    } else {
        Duration::from_millis(10u64.saturating_mul(1u64 << (k - 2).min(20))).min(Duration::from_secs(1))
    }
}

/// Counts panics in a row and applies [`backoff`].
pub(crate) struct Supervisor {
    health: Arc<WorkerHealth>,
    in_a_row: u32,
}

impl Supervisor {
    pub fn new(health: Arc<WorkerHealth>) -> Self {
        Supervisor { health, in_a_row: 0 }
    }

    /// A step finished without panicking.
    pub fn step_ok(&mut self) {
        self.in_a_row = 0;
    }

    /// A turn panicked with `message`: count it and log it (before its requests are failed, so that a
    /// client told of the panic finds it counted).
    pub fn panicked(&mut self, worker: &str, message: &str) {
        self.in_a_row = self.in_a_row.saturating_add(1);
        self.health.panics.fetch_add(1, Ordering::Relaxed);
        self.health.panic_counter.inc();
        if let Ok(mut m) = self.health.last_panic.lock() {
            *m = Some(message.to_string());
        }
        tracing::error!(
            worker,
            panic = message,
            in_a_row = self.in_a_row,
            "a batching step panicked; its requests fail, the worker goes on"
        );
    }

    /// After a panic's requests have failed: waits [`backoff`] (reporting `restarting` meanwhile).
    pub fn back_off(&mut self) {
        let wait = backoff(self.in_a_row);
        if !wait.is_zero() {
            self.health.set(WorkerState::Restarting);
            std::thread::sleep(wait);
        }
        self.health.set(WorkerState::Running);
    }
}

/// The message a panic carried (`panic!("…")` gives a `&str` or a `String`).
pub fn panic_message(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Test-only fault injection. In test builds a request can ask a worker to panic; the hook does not exist
/// in any other build (`cfg(test)`), so no user of a `lora serve` binary can reach it.
#[cfg(test)]
pub(crate) mod fault {
    /// A prompt containing this panics the step that runs it.
    pub const PANIC_STEP: &str = "<test-hook: panic in this step>";
    /// A prompt containing this panics the worker beyond its supervisor: the thread dies.
    pub const KILL_WORKER: &str = "<test-hook: kill the worker>";
    /// A prompt containing this makes the step that runs it sleep for 1.5 s.
    pub const HANG_STEP: &str = "<test-hook: hang in this step>";
    /// The panic message of [`KILL_WORKER`], which the supervisor lets through.
    pub const KILL_MESSAGE: &str = "test hook: the worker thread dies";

    /// Whether the byte-level token ids `ids` contain `marker`.
    pub fn asks(ids: &[u32], marker: &str) -> bool {
        let m: Vec<u32> = marker.bytes().map(u32::from).collect();
        ids.windows(m.len()).any(|w| w == m.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_none_after_one_panic_then_doubles_from_10_ms_up_to_1_s() {
        let ms: Vec<u128> = (1..=10).map(|k| backoff(k).as_millis()).collect();
        assert_eq!(ms, [0, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(backoff(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn a_thread_that_ends_by_panicking_leaves_its_worker_dead_and_its_up_gauge_at_zero() {
        let (up, panics) = (Gauge::default(), Counter::default());
        let h = WorkerHealth::new(up.clone(), panics, Duration::from_secs(60));
        assert_eq!((h.state(), up.get()), (WorkerState::Running, 1));
        let h2 = h.clone();
        let joined = std::thread::spawn(move || {
            let _alive = AliveGuard(h2);
            panic!("boom");
        })
        .join();
        assert!(joined.is_err());
        assert_eq!((h.state(), up.get()), (WorkerState::Dead, 0));
    }

    #[test]
    fn the_supervisor_counts_panics_keeps_the_last_message_and_runs_again() {
        let (up, panics) = (Gauge::default(), Counter::default());
        let h = WorkerHealth::new(up.clone(), panics.clone(), Duration::from_secs(60));
        let mut s = Supervisor::new(h.clone());
        s.panicked("test", "first");
        s.back_off();
        s.panicked("test", "second");
        assert_eq!(h.panics(), 2, "counted before the back-off");
        s.back_off(); // waits 10 ms, restarting meanwhile
        s.step_ok();
        assert_eq!((h.panics(), panics.get(), h.last_panic().as_deref()), (2, 2, Some("second")));
        assert_eq!((h.state(), up.get()), (WorkerState::Running, 1));
        assert_eq!(s.in_a_row, 0);
    }

    #[test]
    fn a_step_running_longer_than_the_limit_is_stuck_until_it_ends() {
        let h = WorkerHealth::new(Gauge::default(), Counter::default(), Duration::from_millis(50));
        assert_eq!((h.state(), h.step_age()), (WorkerState::Running, None));
        {
            let _step = h.step();
            assert_eq!(h.state(), WorkerState::Running);
            std::thread::sleep(Duration::from_millis(80));
            assert_eq!(h.state(), WorkerState::Stuck);
        }
        assert_eq!((h.state(), h.step_age()), (WorkerState::Running, None));
    }

    #[test]
    fn panic_messages_are_read_from_str_and_string_payloads() {
        let a = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        let b = std::panic::catch_unwind(|| panic!("formatted {}", 7)).unwrap_err();
        let c = std::panic::catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert_eq!(
            (panic_message(&*a), panic_message(&*b), panic_message(&*c)),
            ("plain".into(), "formatted 7".into(), "a panic without a message".into())
        );
    }
}
