//! [`Threads`]: the ranks of a run as threads of one process, sharing memory. The same collective calls
//! and the same rank-order sums as MPI, so data-parallel training is tested by the ordinary `cargo test`
//! (N ranks against one process, resuming with another rank count) without an MPI installation; a library
//! user can also train on N model copies side by side with it.
//!
//! ```text
//! each rank deposits its part ─► the last to arrive combines them (rank-order sum, or the root's bytes)
//!                             ─► every rank copies the result out
//! ```
//!
//! A rank whose handle is dropped (its thread returned or panicked) has left: a collective call that waits
//! for it, or starts after it left, fails on every other rank with [`DistError::RankGone`] instead of
//! waiting forever.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::communicator::{check_root, Communicator};
use crate::error::{DistError, Result};
use crate::group::Group;

/// One rank of an in-process group (see the module docs).
#[derive(Debug)]
pub struct Threads {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    size: usize,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Collective calls completed.
    generation: u64,
    /// Each rank's part of the call under way (`None`: not arrived yet).
    parts: Vec<Option<Part>>,
    /// The result of the last completed call.
    result: Option<std::result::Result<Part, String>>,
    /// The first rank that left.
    gone: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Sum(Vec<f32>),
    Bytes { root: usize, bytes: Vec<u8> },
    Barrier,
}

impl Threads {
    /// The `size` ranks of a new group, rank 0 first: hand one to each thread.
    pub fn group(size: usize) -> Vec<Threads> {
        let size = size.max(1);
        let state = State { parts: vec![None; size], ..State::default() };
        let shared = Arc::new(Shared { size, state: Mutex::new(state), changed: Condvar::new() });
        (0..size).map(|rank| Threads { rank, shared: shared.clone() }).collect()
    }

    /// Runs `f` on `size` threads, one per rank, each with its [`Group`]; returns each rank's result in
    /// rank order. A panicking rank's panic is raised again here once every thread has ended.
    pub fn run<T: Send>(size: usize, f: impl Fn(Group) -> T + Sync) -> Vec<T> {
        let ranks = Self::group(size);
        let f = &f;
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks.into_iter().map(|r| s.spawn(move || f(Group::new(r)))).collect();
            let joined: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
            joined.into_iter().map(|r| r.unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deposits this rank's part and waits for the call's result.
    fn collective(&self, part: Part) -> Result<Part> {
        let size = self.shared.size;
        let mut st = self.lock();
        if let Some(rank) = st.gone {
            return Err(DistError::RankGone { rank, size });
        }
        let generation = st.generation;
        st.parts[self.rank] = Some(part);
        if st.parts.iter().all(Option::is_some) {
            let parts: Vec<Part> = st.parts.iter_mut().filter_map(Option::take).collect();
            st.result = Some(combine(parts, size));
            st.generation += 1;
            self.shared.changed.notify_all();
        } else {
            while st.generation == generation {
                if let Some(rank) = st.gone {
                    return Err(DistError::RankGone { rank, size });
                }
                st = self.shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        match st.result.clone() {
            Some(Ok(p)) => Ok(p),
            Some(Err(why)) => Err(DistError::Invalid { call: "collective", why }),
            None => Err(DistError::Invalid { call: "collective", why: "no result".into() }),
        }
    }
}

/// The result of one collective call from every rank's part (in rank order).
fn combine(parts: Vec<Part>, size: usize) -> std::result::Result<Part, String> {
    match &parts[0] {
        Part::Sum(first) => {
            let mut sum = first.clone();
            for (r, p) in parts.iter().enumerate().skip(1) {
                match p {
                    Part::Sum(x) if x.len() == sum.len() => sum.iter_mut().zip(x).for_each(|(s, v)| *s += v),
                    Part::Sum(x) => return Err(format!("all_reduce_sum: rank 0 gave {} values, rank {r} {}", sum.len(), x.len())),
                    _ => return Err(format!("rank 0 called all_reduce_sum, rank {r} another collective")),
                }
            }
            Ok(Part::Sum(sum))
        }
        Part::Bytes { root, .. } => {
            let root = *root;
            check_root(root, size).map_err(|e| e.to_string())?;
            let len = match &parts[root] {
                Part::Bytes { bytes, .. } => bytes.len(),
                _ => return Err(format!("rank 0 called broadcast, rank {root} another collective")),
            };
            for (r, p) in parts.iter().enumerate() {
                match p {
                    Part::Bytes { root: q, bytes } if *q == root && bytes.len() == len => {}
                    Part::Bytes { root: q, bytes } => {
                        return Err(format!(
                            "broadcast: rank {root} sends {len} bytes from root {root}, rank {r} expects {} from root {q}",
                            bytes.len()
                        ))
                    }
                    _ => return Err(format!("rank 0 called broadcast, rank {r} another collective")),
                }
            }
            Ok(parts.into_iter().nth(root).expect("checked above"))
        }
        Part::Barrier => match parts.iter().position(|p| *p != Part::Barrier) {
            Some(r) => Err(format!("rank 0 called barrier, rank {r} another collective")),
            None => Ok(Part::Barrier),
        },
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        let mut st = self.lock();
        st.gone.get_or_insert(self.rank);
        self.shared.changed.notify_all();
    }
}

impl Communicator for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        match self.collective(Part::Sum(buf.to_vec()))? {
            Part::Sum(sum) => {
                buf.copy_from_slice(&sum);
                Ok(())
            }
            _ => Err(DistError::Invalid { call: "all_reduce_sum", why: "another collective answered".into() }),
        }
    }
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, self.shared.size)?;
        match self.collective(Part::Bytes { root, bytes: buf.to_vec() })? {
            Part::Bytes { bytes, .. } => {
                buf.copy_from_slice(&bytes);
                Ok(())
            }
            _ => Err(DistError::Invalid { call: "broadcast", why: "another collective answered".into() }),
        }
    }
    fn barrier(&self) -> Result<()> {
        self.collective(Part::Barrier).map(|_| ())
    }
    fn abort(&self, code: i32) -> ! {
        panic!("rank {} of {} aborted the group with status {code}", self.rank, self.shared.size)
    }
    fn transport(&self) -> &'static str {
        "threads"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_gets_the_rank_order_sum_bit_for_bit() {
        // Values whose sum depends on the order in f32: 1e8 + 1 − 1e8 is 0 left to right, 1 in another order.
        let parts = [vec![1e8f32, 0.5], vec![1.0, 0.25], vec![-1e8, 0.125]];
        let got = Threads::run(3, |g| {
            let mut x = parts[g.rank()].clone();
            g.all_reduce_sum(&mut x).unwrap();
            x
        });
        let want = [(1e8f32 + 1.0) + -1e8, (0.5f32 + 0.25) + 0.125];
        for x in &got {
            assert_eq!(x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn broadcast_copies_the_roots_bytes_and_mismatched_calls_fail_on_every_rank() {
        let got = Threads::run(3, |g| {
            let mut b = [g.rank() as u8; 4];
            g.broadcast(&mut b, 2).unwrap();
            g.barrier().unwrap();
            b
        });
        assert!(got.iter().all(|b| *b == [2; 4]), "{got:?}");
        let errs = Threads::run(2, |g| {
            let mut x = vec![1.0f32; 2 + g.rank()];
            g.all_reduce_sum(&mut x).unwrap_err().to_string()
        });
        assert!(errs.iter().all(|e| e.contains("rank 0 gave 2 values, rank 1 3")), "{errs:?}");
    }

    #[test]
    fn a_rank_that_leaves_fails_the_others_calls_instead_of_hanging() {
        let errs = Threads::run(3, |g| {
            if g.rank() == 1 {
                return String::new(); // leaves without calling
            }
            let mut x = [1.0f32];
            g.all_reduce_sum(&mut x).unwrap_err().to_string()
        });
        assert_eq!(errs[1], "");
        for e in [&errs[0], &errs[2]] {
            assert!(e.contains("rank 1 of 3 left the group"), "{e}");
        }
    }
}
