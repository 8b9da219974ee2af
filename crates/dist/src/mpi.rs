//! [`Mpi`]: the ranks of an `mpirun` (Open MPI, MPICH or any MPI the `mpi` crate builds against), over
//! whatever network MPI was told to use.
//!
//! The all-reduce moves data with MPI and adds with us, so the order of the sum is ours, not the
//! library's algorithm's (a tree, a ring, …, chosen by message size and rank count):
//!
//! ```text
//! buf split into n chunks c_0 … c_(n−1) (shard: consecutive, sizes differ by ≤ 1)
//! 1. all-to-all:  rank j receives chunk c_j of every rank            (MPI_Alltoallv)
//! 2. each rank j: s_j = ((c_j of rank 0 + c_j of rank 1) + …)        (rank order, here)
//! 3. all-gather:  every rank receives every s_j into its buf          (MPI_Allgatherv)
//! ```
//!
//! Each rank sends and receives 2·(n−1)/n of the buffer, what a ring all-reduce moves, and every value
//! is the rank-order sum, the same bits on every rank and on [`crate::Threads`].
//!
//! MPI is initialised with `MPI_THREAD_SERIALIZED`: the training loop makes its calls from whichever
//! rayon worker runs the step, one call at a time (the calls also take a lock).

use std::sync::Mutex;

use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::Communicator as _;
use mpi::traits::*;
use mpi::{Count, Threading};

use crate::communicator::{check_root, shard, Communicator};
use crate::error::{DistError, Result};

/// A rank of the MPI world (`MPI_COMM_WORLD`).
#[derive(Debug)]
pub struct Mpi {
    rank: usize,
    size: usize,
    /// Serialises the calls (MPI_THREAD_SERIALIZED) and holds the all-reduce's receive buffer, reused
    /// from call to call (a fresh one would be faulted in page by page every step).
    lock: Mutex<Vec<f32>>,
}

impl Mpi {
    /// Initialises MPI; the returned [`Universe`] finalises it when dropped (keep it until the end).
    pub fn init() -> Result<(Mpi, Universe)> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| DistError::Launch("MPI was already initialised in this process".into()))?;
        if level < Threading::Serialized {
            return Err(DistError::Launch(format!(
                "this MPI library offers thread level {level:?}; lora needs Serialized (calls from several threads, one at a time)"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok((Mpi { rank, size, lock: Mutex::new(Vec::new()) }, universe))
    }

    fn world(&self) -> (std::sync::MutexGuard<'_, Vec<f32>>, SimpleCommunicator) {
        (self.lock.lock().unwrap_or_else(|e| e.into_inner()), SimpleCommunicator::world())
    }
}

/// MPI's counts are C ints: a buffer past 2³¹ − 1 values is refused, not truncated.
fn count(n: usize) -> Result<Count> {
    Count::try_from(n).map_err(|_| DistError::Invalid { call: "all_reduce_sum", why: format!("{n} values is past MPI's count limit") })
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let (n, size) = (buf.len(), self.size);
        if size == 1 {
            return Ok(());
        }
        let chunks: Vec<_> = (0..size).map(|j| shard(n, j, size)).collect();
        let counts = chunks.iter().map(|c| count(c.len())).collect::<Result<Vec<_>>>()?;
        let displs = chunks.iter().map(|c| count(c.start)).collect::<Result<Vec<_>>>()?;
        let m = chunks[self.rank].len();
        let (recv_counts, recv_displs): (Vec<Count>, Vec<Count>) =
            (vec![count(m)?; size], (0..size).map(|i| count(i * m)).collect::<Result<_>>()?);
        let (mut recv, world) = self.world();
        recv.resize(m * size, 0.0);
        {
            let send = Partition::new(&buf[..], &counts[..], &displs[..]);
            let mut into = PartitionMut::new(&mut recv[..], &recv_counts[..], &recv_displs[..]);
            world.all_to_all_varcount_into(&send, &mut into);
        }
        // Rank order: s = ((x_0 + x_1) + x_2) + …, element by element.
        let (first, rest) = recv.split_at_mut(m);
        for part in rest.chunks_exact(m.max(1)).take(size - 1) {
            first.iter_mut().zip(part).for_each(|(s, x)| *s += x);
        }
        let mut into = PartitionMut::new(buf, &counts[..], &displs[..]);
        world.all_gather_varcount_into(&first[..], &mut into);
        Ok(())
    }
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, self.size)?;
        let (_held, world) = self.world();
        world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        let (_held, world) = self.world();
        world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        // No lock: another thread may hold it inside a call that waits for a rank that will never come.
        SimpleCommunicator::world().abort(code)
    }
    fn transport(&self) -> &'static str {
        "mpi"
    }
}
