//! The machine's memory read bandwidth now: the ceiling of a product that streams its weight once (a decode
//! step at batch 1 reads every weight once per token, so its tokens/s ≤ bandwidth ÷ weight bytes).
//!
//! ```text
//! bandwidth = bytes ÷ min over passes of (time to sum `bytes` of f32 on the products' threads)
//! ```

use std::time::Instant;

use rayon::prelude::*;

/// Bytes per second read by summing `bytes` of f32 (rounded down to whole values) split over the threads
/// the products use ([`crate::threads`]): best of three passes after one untimed pass. The buffer is
/// allocated and written first, so no pass faults pages in.
pub fn read_bandwidth(bytes: usize) -> f64 {
    let data = vec![1f32; (bytes / 4).max(8)];
    let parts = crate::threads().max(1);
    let per = data.len().div_ceil(parts);
    let mut best = f64::INFINITY;
    for pass in 0..4 {
        let t = Instant::now();
        let s: f32 = data
            .par_chunks(per)
            .map(|c| {
                // Eight sums side by side: the loop vectorises and is bound by memory, not by the adds.
                let mut acc = [0f32; 8];
                for block in c.chunks_exact(8) {
                    for (a, v) in acc.iter_mut().zip(block) {
                        *a += v;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(s);
        if pass > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    (data.len() * 4) as f64 / best
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bandwidth_is_a_positive_finite_rate() {
        // 64 MiB: beyond any cache here; the figure itself depends on the machine.
        let b = super::read_bandwidth(64 << 20);
        assert!(b.is_finite() && b > 1e8, "{b} bytes/s");
    }
}
