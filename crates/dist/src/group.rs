//! [`Group`]: the handle training code holds, a shared [`Communicator`] with what its all-reduces cost
//! (calls, values, seconds: the figures of docs/distributed.md), the rows of a batch that are this rank's,
//! and [`Group::agree`], the check that every rank starts from the same thing.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::communicator::{shard, Communicator, Single};
use crate::error::{DistError, Result};

/// The ranks of a run, as this rank sees them. Cheap to clone (clones share the communicator and its
/// figures); the default is one process alone ([`Single`]).
#[derive(Clone)]
pub struct Group {
    comm: Arc<dyn Communicator>,
    stats: Arc<Mutex<Stats>>,
}

/// What a group's all-reduces have cost so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// All-reduce calls.
    pub calls: usize,
    /// f32 values summed, over all calls (each call counts its buffer's length once).
    pub values: usize,
    /// Seconds spent in the all-reduces proper (every rank already there).
    pub seconds: f64,
    /// Seconds spent before them waiting for the slowest rank to arrive (a barrier: its own latency included).
    pub wait_seconds: f64,
}

impl Default for Group {
    fn default() -> Self {
        Group::single()
    }
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group(rank {} of {}, {})", self.rank(), self.size(), self.comm.transport())
    }
}

impl Group {
    /// One process alone.
    pub fn single() -> Group {
        Group::new(Single)
    }

    /// A group over `comm`.
    pub fn new(comm: impl Communicator + 'static) -> Group {
        Group { comm: Arc::new(comm), stats: Arc::default() }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    /// Ranks in the run.
    pub fn size(&self) -> usize {
        self.comm.size()
    }
    /// Whether this is rank 0, the one that prints and writes.
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }
    /// Whether more than one process trains.
    pub fn is_distributed(&self) -> bool {
        self.size() > 1
    }
    /// The transport (`single`, `threads`, `mpi`).
    pub fn transport(&self) -> &'static str {
        self.comm.transport()
    }
    /// The rows of a global batch of `n` that are this rank's (see [`shard`]).
    pub fn shard(&self, n: usize) -> std::ops::Range<usize> {
        shard(n, self.rank(), self.size())
    }

    /// [`Communicator::all_reduce_sum`], timed into [`Group::stats`]. With several ranks a barrier comes
    /// first, so that the time waiting for the slowest rank (a straggler, an unequal share) is told apart
    /// from the time the sum itself takes; it costs one barrier's latency per call.
    pub fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let t = Instant::now();
        if self.is_distributed() {
            self.comm.barrier()?;
        }
        let arrived = t.elapsed().as_secs_f64();
        let r = self.comm.all_reduce_sum(buf);
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.calls += 1;
        s.values += buf.len();
        s.wait_seconds += arrived;
        s.seconds += t.elapsed().as_secs_f64() - arrived;
        r
    }
    /// [`Communicator::broadcast`].
    pub fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.comm.broadcast(buf, root)
    }
    /// [`Communicator::barrier`].
    pub fn barrier(&self) -> Result<()> {
        self.comm.barrier()
    }
    /// [`Communicator::abort`]: ends every rank with status `code` (print why first).
    pub fn abort(&self, code: i32) -> ! {
        self.comm.abort(code)
    }
    /// What the all-reduces cost so far.
    pub fn stats(&self) -> Stats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that every rank holds the same `value` (a fingerprint of its model, data and settings):
    /// rank 0's is sent to all, and every rank learns which ranks differ, so all of them fail together
    /// with [`DistError::Disagree`] naming those ranks and `what`. Nothing is sent with one process.
    pub fn agree(&self, what: &str, value: &[u8]) -> Result<()> {
        if !self.is_distributed() {
            return Ok(());
        }
        let mut len = (value.len() as u64).to_le_bytes();
        self.broadcast(&mut len, 0)?;
        let root_len = u64::from_le_bytes(len) as usize;
        let mut root = vec![0u8; root_len];
        if self.is_root() {
            root.copy_from_slice(value);
        }
        self.broadcast(&mut root, 0)?;
        let mut differs = vec![0f32; self.size()];
        differs[self.rank()] = f32::from(u8::from(root != value));
        self.comm.all_reduce_sum(&mut differs)?;
        let ranks: Vec<usize> = differs.iter().enumerate().filter(|(_, &d)| d != 0.0).map(|(r, _)| r).collect();
        if ranks.is_empty() {
            Ok(())
        } else {
            Err(DistError::Disagree { what: what.to_string(), ranks, size: self.size() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Threads;

    #[test]
    fn ranks_that_start_from_something_else_are_named_on_every_rank() {
        let errs = Threads::run(4, |g| {
            let mine = if g.rank() % 2 == 1 { "other model".as_bytes() } else { "the model".as_bytes() };
            g.agree("the base model", mine).map_err(|e| e.to_string())
        });
        for e in &errs {
            let e = e.as_ref().unwrap_err();
            assert!(e.contains("ranks disagree on the base model: ranks 1, 3 differ from rank 0 (4 ranks)"), "{e}");
        }
        let ok = Threads::run(3, |g| g.agree("data", b"same").is_ok());
        assert!(ok.iter().all(|&o| o));
        assert!(Group::single().agree("anything", b"x").is_ok());
    }

    #[test]
    fn all_reduces_are_counted_and_timed() {
        let stats = Threads::run(2, |g| {
            g.all_reduce_sum(&mut [1.0; 10]).unwrap();
            g.all_reduce_sum(&mut [1.0; 5]).unwrap();
            g.stats()
        });
        for s in stats {
            assert_eq!((s.calls, s.values), (2, 15));
            assert!(s.seconds >= 0.0 && s.wait_seconds >= 0.0);
        }
        assert_eq!(format!("{:?}", Group::single()), "Group(rank 0 of 1, single)");
    }
}
