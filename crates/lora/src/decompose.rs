//! Matrix factorisations for the initialisations and combinations that start from a weight's structure
//! (PiSSA, OLoRA, the `svd` combinations), in f64 through `nalgebra`.
//!
//! - SVD: `M = U·diag(S)·Vᵀ` (m, n), singular values sorted descending; [`svd`] returns the top k triplets.
//! - QR: `M = Q·R` (Householder), Q (m, min(m, n)) with orthonormal columns, R (min(m, n), n) upper
//!   triangular. Signs of a column of Q and the matching row of R may differ from LAPACK's; products
//!   `Q[:, :r]·R[:r]` do not depend on them.

use nalgebra::DMatrix;

/// A dense row-major f64 matrix: `data[i·cols + j]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Dense {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Dense {
    pub fn from_f32(data: &[f32], rows: usize, cols: usize) -> Self {
        Dense { rows, cols, data: data.iter().map(|&v| v as f64).collect() }
    }
    fn to_na(&self) -> DMatrix<f64> {
        DMatrix::from_row_slice(self.rows, self.cols, &self.data)
    }
    fn from_na(m: &DMatrix<f64>) -> Self {
        let (rows, cols) = m.shape();
        let mut data = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            for j in 0..cols {
                data.push(m[(i, j)]);
            }
        }
        Dense { rows, cols, data }
    }
}

/// The top `k` singular triplets of `m`: (U (rows, k), S (k), Vᵀ (k, cols)), S descending.
/// `k` is capped at min(rows, cols).
pub(crate) fn svd(m: &Dense, k: usize) -> (Dense, Vec<f64>, Dense) {
    let k = k.min(m.rows.min(m.cols));
    let s = nalgebra::linalg::SVD::new(m.to_na(), true, true);
    let (u, vt) = (s.u.unwrap_or_else(|| DMatrix::zeros(m.rows, 0)), s.v_t.unwrap_or_else(|| DMatrix::zeros(0, m.cols)));
    let mut order: Vec<usize> = (0..s.singular_values.len()).collect();
    order.sort_by(|&a, &b| s.singular_values[b].total_cmp(&s.singular_values[a]));
    let order = &order[..k];
    let uk = DMatrix::from_fn(m.rows, k, |i, j| u[(i, order[j])]);
    let vtk = DMatrix::from_fn(k, m.cols, |i, j| vt[(order[i], j)]);
    (Dense::from_na(&uk), order.iter().map(|&i| s.singular_values[i]).collect(), Dense::from_na(&vtk))
}

/// The QR factorisation of `m`: (Q (rows, p), R (p, cols)), p = min(rows, cols).
pub(crate) fn qr(m: &Dense) -> (Dense, Dense) {
    let qr = nalgebra::linalg::QR::new(m.to_na());
    (Dense::from_na(&qr.q()), Dense::from_na(&qr.r()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matmul(a: &Dense, b: &Dense) -> Dense {
        let mut data = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for k in 0..a.cols {
                for j in 0..b.cols {
                    data[i * b.cols + j] += a.data[i * a.cols + k] * b.data[k * b.cols + j];
                }
            }
        }
        Dense { rows: a.rows, cols: b.cols, data }
    }

    fn sample(rows: usize, cols: usize) -> Dense {
        // A fixed, irregular matrix with distinct singular values.
        let data = (0..rows * cols).map(|i| ((i * 7919 % 101) as f64 / 50.0 - 1.0) + if i % (cols + 1) == 0 { 3.0 } else { 0.0 }).collect();
        Dense { rows, cols, data }
    }

    #[test]
    fn full_svd_and_qr_reconstruct_the_matrix_and_singular_values_descend() {
        for (r, c) in [(7, 5), (5, 7)] {
            let m = sample(r, c);
            let (u, s, vt) = svd(&m, 99);
            assert!(s.windows(2).all(|w| w[0] >= w[1]), "{s:?}");
            let us = Dense { rows: u.rows, cols: u.cols, data: (0..u.data.len()).map(|i| u.data[i] * s[i % u.cols]).collect() };
            let back = matmul(&us, &vt);
            // f64 Householder/Golub–Kahan: backward error ~ 1e-15 × ‖M‖ (‖M‖ < 10 here).
            assert!(back.data.iter().zip(&m.data).all(|(a, b)| (a - b).abs() < 1e-12));
            let (q, rr) = qr(&m);
            assert_eq!((q.cols, rr.rows), (r.min(c), r.min(c)));
            let back = matmul(&q, &rr);
            assert!(back.data.iter().zip(&m.data).all(|(a, b)| (a - b).abs() < 1e-12));
        }
    }
}
