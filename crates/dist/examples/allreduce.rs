//! The all-reduce's cost against its size: run as ranks of an MPI launcher, it times `Group::all_reduce_sum`
//! (lora-dist's rank-order sum: MPI_Alltoallv, the sum, MPI_Allgatherv) on buffers from 16 Ki to 3.28 M f32
//! and prints one line per size on rank 0: the median of 50 calls after 5 warm-up calls, beside MPI's own
//! `MPI_Allreduce` on the same buffer (whose order of summation is the library's).
//!
//! ```text
//! cargo build --release -p lora-dist --features mpi --example allreduce
//! mpirun --allow-run-as-root --oversubscribe --mca btl self,vader -np 2 target/release/examples/allreduce
//! ```
//!
//! docs/distributed.md reads its scaling estimate from these lines.

fn main() {
    #[cfg(feature = "mpi")]
    run();
    #[cfg(not(feature = "mpi"))]
    eprintln!("build with --features mpi and run under mpirun (see the file's docs)");
}

#[cfg(feature = "mpi")]
fn run() {
    let world = lora_dist::World::init().expect("joining MPI");
    let g = world.group();
    // 16 Ki; the demo LM's rank-8 adapters (155,648); 1 Mi; the demo LM's 3.28 M parameters.
    for n in [16_384usize, 155_648, 1 << 20, 3_280_000] {
        let mut buf = vec![1.0f32 + g.rank() as f32; n];
        let mut times = Vec::new();
        for i in 0..55 {
            // The group's figures tell the sum proper from the wait for the other ranks (a barrier first).
            let before = g.stats().seconds;
            g.all_reduce_sum(&mut buf).unwrap();
            if i >= 5 {
                times.push(g.stats().seconds - before);
            }
        }
        times.sort_by(f64::total_cmp);
        // MPI's own MPI_Allreduce on the same buffer, for comparison (its order of summation is the library's).
        let mut theirs = Vec::new();
        {
            use mpi::collective::SystemOperation;
            use mpi::traits::*;
            let w = mpi::topology::SimpleCommunicator::world();
            let mut out = vec![0f32; n];
            for i in 0..55 {
                w.barrier();
                let t = std::time::Instant::now();
                w.all_reduce_into(&buf[..], &mut out[..], SystemOperation::sum());
                if i >= 5 {
                    theirs.push(t.elapsed().as_secs_f64());
                }
            }
        }
        theirs.sort_by(f64::total_cmp);
        if g.is_root() {
            let (ours, mpi) = (times[times.len() / 2], theirs[theirs.len() / 2]);
            println!(
                "{n:>9} f32 ({:>5.2} MB), {} ranks: lora-dist all-reduce {:.3} ms ({:.2} GB/s of buffer); MPI_Allreduce {:.3} ms",
                n as f64 * 4.0 / 1e6,
                g.size(),
                ours * 1e3,
                n as f64 * 4.0 / ours / 1e9,
                mpi * 1e3
            );
        }
    }
}
