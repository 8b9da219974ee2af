//! [`Communicator`]: what data-parallel training needs from the processes it runs on, and [`Single`], the
//! one process of an ordinary run.
//!
//! ```text
//! rank r of n ranks:  all_reduce_sum(x_r)  →  every rank holds  Σ = (…((x_0 + x_1) + x_2) + …) + x_(n−1)
//!                     broadcast(buf, root) →  every rank holds root's bytes
//! ```
//!
//! The sum is taken element by element in rank order, the same bits on every rank whatever the transport
//! chose to do underneath: a run is reproducible for a rank count, and every rank applies the same update.
//! NCCL (the GPU path, through cudarc's bindings) would be one more implementation of this trait.

use crate::error::{DistError, Result};

/// The processes of one data-parallel run.
pub trait Communicator: Send + Sync {
    /// This process's rank, 0 ≤ rank < size.
    fn rank(&self) -> usize;
    /// Ranks in the run.
    fn size(&self) -> usize;
    /// Replaces `buf` on every rank by the element-wise sum over the ranks, taken in rank order
    /// (`((x_0 + x_1) + x_2) + …`), the same bits on every rank. Every rank passes a buffer of the same length.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Copies `root`'s `buf` into every rank's `buf` (the same length on every rank).
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the run with exit status `code` (the caller prints why first).
    fn abort(&self, code: i32) -> !;
    /// The transport, for messages (`single`, `threads`, `mpi`).
    fn transport(&self) -> &'static str;
}

/// One process alone: rank 0 of 1; every collective call returns at once and changes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, 1)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn transport(&self) -> &'static str {
        "single"
    }
}

/// A root outside the ranks is an error naming it.
pub(crate) fn check_root(root: usize, size: usize) -> Result<()> {
    if root < size {
        Ok(())
    } else {
        Err(DistError::Invalid { call: "broadcast", why: format!("root {root} is not a rank of {size}") })
    }
}

/// The rows of a global batch of `n` that rank `rank` of `size` takes: consecutive blocks in rank order,
/// the first `n mod size` ranks one row more (a rank gets none when `n < size`). The blocks cover `0..n`
/// once, so the ranks together see exactly the one process's batch.
pub fn shard(n: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let size = size.max(1);
    let (q, r) = (n / size, n % size);
    let start = rank * q + rank.min(r);
    let len = q + usize::from(rank < r);
    start.min(n)..(start + len).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_once_in_rank_order_and_differ_by_at_most_one_row() {
        for n in 0..40 {
            for size in 1..9 {
                let parts: Vec<_> = (0..size).map(|r| shard(n, r, size)).collect();
                let mut next = 0;
                for p in &parts {
                    assert_eq!(p.start, next, "n {n}, size {size}: {parts:?}");
                    next = p.end;
                }
                assert_eq!(next, n, "n {n}, size {size}: {parts:?}");
                let (lo, hi) = (parts.iter().map(|p| p.len()).min().unwrap(), parts.iter().map(|p| p.len()).max().unwrap());
                assert!(hi - lo <= 1, "n {n}, size {size}: {parts:?}");
            }
        }
        assert_eq!(shard(10, 0, 3), 0..4);
        assert_eq!(shard(10, 2, 3), 7..10);
        assert_eq!(shard(1, 1, 2), 1..1, "a rank past the rows gets none");
    }

    #[test]
    fn one_process_changes_nothing_and_refuses_a_root_that_is_no_rank() {
        let mut x = [1.5f32, -2.0];
        Single.all_reduce_sum(&mut x).unwrap();
        assert_eq!(x, [1.5, -2.0]);
        let mut b = [7u8; 3];
        Single.broadcast(&mut b, 0).unwrap();
        assert_eq!(b, [7; 3]);
        let e = Single.broadcast(&mut b, 1).unwrap_err().to_string();
        assert!(e.contains("root 1 is not a rank of 1"), "{e}");
    }
}
