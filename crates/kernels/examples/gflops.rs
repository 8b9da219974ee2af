//! GFLOP/s of `matmul_into` (y = x·Wᵀ) on this machine, now: the ceiling the benchmarks' dense products run
//! against (docs/benchmarks.md). Two products at once on two threads (does the second core add a full core?),
//! the language model's shapes (batch 16 × 256 rows) on every thread and on one, and the MNIST network's
//! shapes (64 rows) on one thread with one W reused (in cache) against W cycling through copies larger than
//! the last-level cache.
//!
//!   RAYON_NUM_THREADS=2 cargo run --release -p lora-kernels --example gflops
use lora_kernels::{matmul_into, serial, MatRef};
use std::time::Instant;

fn run(m: usize, k: usize, n: usize, copies: usize, reps: usize) -> f64 {
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3).collect();
    let ws: Vec<Vec<f32>> = (0..copies).map(|c| (0..n * k).map(|i| (((i + c) * 13 % 97) as f32 - 48.0) * 1e-3).collect()).collect();
    let mut y = vec![0f32; m * n];
    let lhs = MatRef::row_major(&x, m, k).unwrap();
    serial(|| {
        for w in &ws {
            matmul_into(&mut y, lhs, MatRef::row_major(w, n, k).unwrap().t(), 1.0, false).unwrap();
        }
        let t = Instant::now();
        for r in 0..reps {
            let w = &ws[r % copies];
            matmul_into(&mut y, lhs, MatRef::row_major(w, n, k).unwrap().t(), 1.0, false).unwrap();
        }
        2.0 * (m * k * n * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
    })
}

fn main() {
    let t = Instant::now();
    let g = std::thread::scope(|s| {
        let h: Vec<_> = (0..2).map(|_| s.spawn(|| run(64, 1000, 2000, 1, 400))).collect();
        h.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    println!("two threads at once, 64x1000x2000 reused: {:.1} + {:.1} GFLOP/s ({:.2} s)", g[0], g[1], t.elapsed().as_secs_f64());
    let t = Instant::now();
    let one = run(64, 1000, 2000, 1, 400);
    println!("one thread alone: {one:.1} GFLOP/s ({:.2} s)", t.elapsed().as_secs_f64());
    for (m, k, n) in [(4096, 256, 768), (4096, 768, 256), (4096, 256, 256)] {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 13 % 97) as f32 - 48.0) * 1e-3).collect();
        let mut y = vec![0f32; m * n];
        let lhs = MatRef::row_major(&x, m, k).unwrap();
        let go = |y: &mut Vec<f32>| matmul_into(y, lhs, MatRef::row_major(&w, n, k).unwrap().t(), 1.0, false).unwrap();
        go(&mut y);
        let t = Instant::now();
        for _ in 0..20 {
            go(&mut y);
        }
        let two = 2.0 * (m * k * n * 20) as f64 / t.elapsed().as_secs_f64() / 1e9;
        let t = Instant::now();
        serial(|| {
            for _ in 0..20 {
                go(&mut y);
            }
        });
        let one = 2.0 * (m * k * n * 20) as f64 / t.elapsed().as_secs_f64() / 1e9;
        println!("LM {m}x{k}x{n}: all threads {two:.1} GFLOP/s, one thread {one:.1}");
    }
    for (m, k, n) in [(64, 256, 256), (64, 784, 1000), (64, 1000, 2000), (64, 2000, 10)] {
        let mb = (n * k * 4) as f64 / 1e6;
        let copies = ((96.0 / mb).ceil() as usize).max(2);
        println!(
            "{m}x{k}x{n} (W {mb:.1} MB): reused {:.1} GFLOP/s, {copies} copies ({:.0} MB) {:.1} GFLOP/s",
            run(m, k, n, 1, 200),
            copies as f64 * mb,
            run(m, k, n, copies, 200)
        );
    }
}
