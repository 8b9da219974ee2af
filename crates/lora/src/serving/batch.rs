//! One layer of a mixed-adapter batch ([`LoraModel::forward_mixed`]): rows in [`RowGroup`]s, each group with
//! its own adapter (or none), for x (n, in):
//!
//! ```text
//! y = X·W0ᵀ + b                      once for the whole batch (bf16 weight where the PackedBase holds it)
//! y_i += s_g·(x_i·A_gᵀ)·B_gᵀ         each row of group g with g's adapter, row by row (add_delta)
//! y = act(y)
//! ```

use candle_core::{DType, Tensor};
use lora_kernels::{add_delta, matmul_bf16_into, matmul_into, Activation, DeltaRef, MatRef};

use super::{PackedAdapter, PackedBase};
use crate::bridge::Held;
use crate::error::{LoraError, Result};
use crate::model::LoraModel;

/// A run of consecutive rows of a batch that share an adapter (`None`: the base alone).
#[derive(Debug, Clone, Copy)]
pub struct RowGroup<'a> {
    /// How many rows.
    pub rows: usize,
    /// Their adapter.
    pub adapter: Option<&'a PackedAdapter>,
}

/// The delta of layer `index` that group `g`'s adapter holds.
fn delta_at<'a>(g: &RowGroup<'a>, index: usize) -> Option<DeltaRef<'a>> {
    g.adapter?.delta(index)
}

impl LoraModel {
    /// Layer `index`'s output for a batch whose rows come in `groups`, each group with its own adapter:
    /// x (n, in) → (n, out), n = Σ rows. Only the adapters in `groups` apply (the layer's own active
    /// adapters do not); nothing is recorded for gradients. With `base` (this model's
    /// [`LoraModel::pack_base`]), the layers it holds in bf16 read that copy: the same bits, half the bytes.
    pub fn forward_mixed(
        &self,
        index: usize,
        x: &Tensor,
        groups: &[RowGroup<'_>],
        act: Activation,
        base: Option<&PackedBase>,
    ) -> Result<Tensor> {
        let layer = self.layer_at(index).ok_or_else(|| LoraError::config("layer", index, "no layer at this position"))?;
        let (inp, out) = (layer.in_features(), layer.out_features());
        let (n, cols) = x.dims2()?;
        let total: usize = groups.iter().map(|g| g.rows).sum();
        if cols != inp || total != n {
            return Err(LoraError::config(
                "batch",
                format!("({n}, {cols})"),
                format!("expected ({total}, {inp}): the groups' rows and the layer's inputs"),
            ));
        }
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let w = layer.weight().as_detached_tensor().to_dtype(DType::F32)?;
        let (hx, hw) = (Held::new(&x), Held::new(&w));
        let xs = hx.slice()?;
        let mut y = vec![0f32; n * out];
        match base.and_then(|b| b.layers.get(index)).and_then(Option::as_ref) {
            Some(p) if (p.rows(), p.cols()) != (out, inp) => {
                return Err(LoraError::config("base", format!("({}, {})", p.rows(), p.cols()), "was packed for another model"));
            }
            // The same bits as the f32 product below, from half the weight's bytes (the f32 weight for
            // the shapes the bf16 kernel does not take: many rows, a long prompt).
            Some(p) => matmul_bf16_into(&mut y, MatRef::row_major(xs, n, inp)?, p, Some(hw.mat()?), 1.0, false)?,
            None => matmul_into(&mut y, MatRef::row_major(xs, n, inp)?, hw.mat()?.t(), 1.0, false)?,
        }
        if let Some(b) = layer.bias() {
            let b = b.as_tensor().to_dtype(DType::F32)?;
            let hb = Held::new(&b);
            let b = hb.slice()?;
            for row in y.chunks_exact_mut(out.max(1)) {
                for (v, bv) in row.iter_mut().zip(b) {
                    *v += *bv;
                }
            }
        }
        let mut row = 0;
        // Each adapter is one allocation read front to back over a forward pass, which the hardware
        // prefetcher follows: explicit prefetches of the next group's operands measured no faster
        // (`benches/mixed.rs`, 16 adapters: 766 vs 775 µs, medians of five alternating runs).
        for g in groups {
            if let Some(delta) = delta_at(g, index) {
                if delta.a.len() != delta.rank * inp || delta.bt.len() != delta.rank * out {
                    let shape = format!("({}, {})", delta.a.len() / delta.rank, delta.bt.len() / delta.rank);
                    return Err(LoraError::config("adapter", shape, "was packed for another model"));
                }
                let rows = row..row + g.rows;
                // y += s·(x·Aᵀ)·Bᵀ row by row: one call, and a row's delta the same in any batch.
                add_delta(&xs[rows.start * inp..rows.end * inp], &mut y[rows.start * out..rows.end * out], g.rows, delta)?;
            }
            row += g.rows;
        }
        if act == Activation::Relu {
            for v in &mut y {
                *v = v.max(0.0);
            }
        }
        Ok(Tensor::from_vec(y, (n, out), x.device())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::testing::{flat, rand_vec, t2};
    use crate::linear::Adapter;
    use crate::serving::testing::{files, model, IN, OUT};

    #[test]
    fn each_row_of_a_mixed_batch_gets_its_own_adapters_output() {
        let m = model();
        let adapters = [files(3, 5.0, 10), files(5, 2.0, 20)];
        let packed: Vec<PackedAdapter> = adapters.iter().map(|f| m.pack_adapter(f).unwrap()).collect();
        // Rows: 2 with adapter 0, 1 with none, 3 with adapter 1.
        let groups = [
            RowGroup { rows: 2, adapter: Some(&packed[0]) },
            RowGroup { rows: 1, adapter: None },
            RowGroup { rows: 3, adapter: Some(&packed[1]) },
        ];
        let x = t2(rand_vec(6 * IN, 30), (6, IN));
        let got = flat(&m.forward_mixed(0, &x, &groups, Activation::Relu, None).unwrap());
        // The reference: each adapter inserted into a copy of the layer and run through candle's ops.
        let mut reference = model();
        for (i, f) in adapters.iter().enumerate() {
            let (a, b) = &f.tensors["fc"];
            let ad = Adapter::from_tensors(a, b, f.config.alpha, f.config.scale_for("fc"), 0.0).unwrap();
            reference.layer_mut("fc").unwrap().insert_adapter(&format!("a{i}"), ad).unwrap();
        }
        let mut want = Vec::new();
        for (rows, active) in [(0..2, Some("a0")), (2..3, None), (3..6, Some("a1"))] {
            let l = reference.layer_mut("fc").unwrap();
            l.set_active(&active.into_iter().collect::<Vec<_>>()).unwrap();
            l.set_backend(crate::Backend::Reference);
            let xr = x.narrow(0, rows.start, rows.len()).unwrap();
            want.extend(flat(&l.forward_act_t(&xr, false, Activation::Relu).unwrap()));
        }
        // Sums of 37 + r terms of size ≲ 1 in another order than candle's: f32 rounding ≈ 40·6e-8; 1e-5 is
        // far above that and far below any wrong term (≈ 0.1).
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "row {} col {}: {g} vs {w}", i / OUT, i % OUT);
        }
    }

    #[test]
    fn a_rows_delta_does_not_depend_on_the_rest_of_the_batch() {
        let m = model();
        let p = [m.pack_adapter(&files(4, 8.0, 40)).unwrap(), m.pack_adapter(&files(2, 1.0, 50)).unwrap()];
        let x = t2(rand_vec(3 * IN, 60), (3, IN));
        let mixed = flat(
            &m.forward_mixed(
                0,
                &x,
                &[RowGroup { rows: 1, adapter: Some(&p[0]) }, RowGroup { rows: 2, adapter: Some(&p[1]) }],
                Activation::Identity,
                None,
            )
            .unwrap(),
        );
        let base = flat(&m.forward_mixed(0, &x, &[RowGroup { rows: 3, adapter: None }], Activation::Identity, None).unwrap());
        let alone = flat(&m.forward_mixed(0, &x, &[RowGroup { rows: 3, adapter: Some(&p[1]) }], Activation::Identity, None).unwrap());
        // Same batch, same base product: rows 1 and 2 are bit-identical to the batch where every row has
        // adapter 1, and row 0 differs from the base.
        assert_eq!(&mixed[OUT..], &alone[OUT..]);
        assert_ne!(&mixed[..OUT], &base[..OUT]);
    }

    #[test]
    fn an_adapter_for_another_shape_or_a_wrong_batch_is_refused_by_name() {
        let m = model();
        let mut f = files(2, 2.0, 70);
        let (a, _) = f.tensors["fc"].clone();
        f.tensors.insert("fc".into(), (a, t2(rand_vec(5 * 2, 1), (5, 2))));
        let e = m.pack_adapter(&f).unwrap_err().to_string();
        assert!(e.contains("lora_B") && e.contains("[5, 2]"), "{e}");
        let x = t2(rand_vec(2 * IN, 1), (2, IN));
        let e = m.forward_mixed(0, &x, &[RowGroup { rows: 3, adapter: None }], Activation::Identity, None).unwrap_err().to_string();
        assert!(e.contains("batch"), "{e}");
    }
}
