//! [`World`]: how a process learns whether it is one rank of many. Started by an MPI launcher (`mpirun` or
//! `mpiexec` of Open MPI, MPICH or Intel MPI; `srun --mpi=pmi2`), with the `mpi` feature, it joins MPI's world; otherwise it is one process
//! alone, exactly as a run without any of this. A process that a launcher started as one of several ranks
//! but that was built without the feature refuses to run (every rank would train alone and write the same
//! files), naming the feature.

#[cfg(not(feature = "mpi"))]
use crate::error::DistError;
use crate::error::Result;
use crate::group::Group;

/// The environment variables launchers set: (variable holding the rank count, variable holding the rank).
const LAUNCHERS: [(&str, &str); 2] = [
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"), // Open MPI's mpirun
    ("PMI_SIZE", "PMI_RANK"),                         // MPICH's Hydra, Intel MPI, srun --mpi=pmi2
];

/// Where a launcher put this process: (rank, ranks, the variable that said so), or `None` when no launcher
/// started it. `get` reads an environment variable (the tests pass their own).
pub fn launched(get: impl Fn(&str) -> Option<String>) -> Option<(usize, usize, &'static str)> {
    LAUNCHERS.iter().find_map(|&(size, rank)| {
        let n = get(size)?.trim().parse::<usize>().ok()?;
        let r = get(rank).and_then(|r| r.trim().parse::<usize>().ok()).unwrap_or(0);
        Some((r, n, size))
    })
}

/// The process's place in a run: owns MPI while it runs (dropping it finalises MPI, so keep it until the
/// program ends) and hands out its [`Group`].
pub struct World {
    group: Group,
    #[cfg(feature = "mpi")]
    _universe: Option<::mpi::environment::Universe>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World").field("group", &self.group).finish()
    }
}

impl World {
    /// Joins the launcher's run when there is one (see the module docs), else one process alone.
    pub fn init() -> Result<World> {
        Self::join(|k: &str| std::env::var(k).ok())
    }

    /// [`World::init`] with the environment read through `env`.
    fn join(env: impl Fn(&str) -> Option<String>) -> Result<World> {
        match launched(env) {
            #[cfg(feature = "mpi")]
            Some(_) => {
                let (comm, universe) = crate::mpi::Mpi::init()?;
                tracing::info!(rank = comm_rank(&comm), "joined MPI");
                Ok(World { group: Group::new(comm), _universe: Some(universe) })
            }
            #[cfg(not(feature = "mpi"))]
            Some((rank, size, var)) if size > 1 => Err(DistError::Launch(format!(
                "started by an MPI launcher as rank {rank} of {size} ({var}={size}), but this lora was built without MPI: \
                 build it with `cargo build --release --features mpi`"
            ))),
            _ => Ok(World::single()),
        }
    }

    /// One process alone.
    pub fn single() -> World {
        World {
            group: Group::single(),
            #[cfg(feature = "mpi")]
            _universe: None,
        }
    }

    /// This process's group.
    pub fn group(&self) -> &Group {
        &self.group
    }
}

#[cfg(feature = "mpi")]
fn comm_rank(c: &crate::mpi::Mpi) -> usize {
    crate::Communicator::rank(c)
}

/// Whether this build can join an MPI run (the `mpi` feature).
pub const MPI_BUILT: bool = cfg!(feature = "mpi");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launcher_is_recognised_by_its_variables_and_none_means_one_process() {
        let vars =
            |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        assert_eq!(launched(vars(&[("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_RANK", "3")])), Some((3, 4, "OMPI_COMM_WORLD_SIZE")));
        assert_eq!(launched(vars(&[("PMI_SIZE", "2"), ("PMI_RANK", "1")])), Some((1, 2, "PMI_SIZE")));
        assert_eq!(launched(vars(&[("HOME", "/root")])), None);
        assert_eq!(launched(vars(&[("PMI_SIZE", "many")])), None, "a value that is no number is no launcher");
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn without_the_mpi_feature_one_of_several_ranks_refuses_to_run_and_a_single_rank_runs_alone() {
        let env = |size: &'static str| move |k: &str| (k == "OMPI_COMM_WORLD_SIZE").then(|| size.to_string());
        let e = World::join(env("2")).unwrap_err().to_string();
        assert!(e.contains("rank 0 of 2") && e.contains("--features mpi"), "{e}");
        let w = World::join(env("1")).unwrap();
        assert_eq!((w.group().rank(), w.group().size()), (0, 1));
        assert_eq!(World::join(|_: &str| None).unwrap().group().size(), 1);
    }
}
