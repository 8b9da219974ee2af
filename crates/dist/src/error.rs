//! The crate's error type: every variant names the rank, the setting or the launcher at fault.

/// Result with [`DistError`].
pub type Result<T> = std::result::Result<T, DistError>;

/// What can go wrong between ranks.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A rank left the group (its thread ended or failed) while the others waited for it.
    #[error("rank {rank} of {size} left the group before this collective call")]
    RankGone {
        /// The rank that left.
        rank: usize,
        /// Ranks in the group.
        size: usize,
    },
    /// Ranks disagree on something that must be the same on every rank (their data, model or settings).
    #[error("ranks disagree on {what}: rank{} {} differ{} from rank 0 ({size} ranks)", plural(ranks), list(ranks), verb(ranks))]
    Disagree {
        /// What differs.
        what: String,
        /// The ranks whose value is not rank 0's.
        ranks: Vec<usize>,
        /// Ranks in the group.
        size: usize,
    },
    /// A call that cannot be made (a buffer of another length than the other ranks', a root that is no rank).
    #[error("{call}: {why}")]
    Invalid {
        /// The call.
        call: &'static str,
        /// Why.
        why: String,
    },
    /// The process was started by an MPI launcher but cannot take part (built without MPI, MPI failed to start).
    #[error("{0}")]
    Launch(String),
}

fn plural(r: &[usize]) -> &'static str {
    if r.len() > 1 {
        "s"
    } else {
        ""
    }
}

fn verb(r: &[usize]) -> &'static str {
    if r.len() > 1 {
        ""
    } else {
        "s"
    }
}

fn list(r: &[usize]) -> String {
    r.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
}
