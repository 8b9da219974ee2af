//! Data-parallel training's communication: N processes (ranks) each take a share of every batch, and
//! their gradients are summed before each optimizer step, so every rank applies the same update to the
//! same weights and the run trains the model one process would with the whole batch.
//!
//! ```text
//! global batch B ─► rank r takes rows shard(B, r, N) ─► forward, backward (loss divided by B, not by
//!                   its own rows) ─► Bundle [gradients | loss] ─► all_reduce_sum (rank order) ─► Adam
//! ```
//!
//! - [`Communicator`] — the one small interface (rank, size, all-reduce sum, broadcast, barrier, abort);
//!   [`Single`] (one process, always built), [`Threads`] (ranks as threads: tests), and, behind the `mpi`
//!   feature, `Mpi` (Open MPI through the `mpi` crate). NCCL would be one more implementation.
//! - [`Group`] — the handle the trainers hold: the communicator, this rank's rows ([`shard`]), the
//!   all-reduces' cost ([`Stats`]), and [`Group::agree`] (every rank starts from the same model and data).
//! - [`Bundle`] — one step's gradients and loss in one buffer, one all-reduce per step.
//! - [`World`] — joins an `mpirun` when one started the process, else one process, as before.
//!
//! Every sum is taken in rank order, `((x_0 + x_1) + x_2) + …`, the same bits on every rank and for every
//! transport: a run is reproducible for a rank count, and every rank keeps identical weights.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod bundle;
mod communicator;
mod error;
mod group;
#[cfg(feature = "mpi")]
mod mpi;
mod threads;
mod world;

pub use bundle::Bundle;
pub use communicator::{shard, Communicator, Single};
pub use error::{DistError, Result};
pub use group::{Group, Stats};
#[cfg(feature = "mpi")]
pub use mpi::Mpi;
pub use threads::Threads;
pub use world::{launched, World, MPI_BUILT};
