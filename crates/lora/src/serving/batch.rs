//! One layer of a mixed-adapter batch ([`LoraModel::forward_mixed`]): rows in [`RowGroup`]s, each group with
//! its own adapter (or none), for x (n, in):
//!
//! ```text
//! y = X·W0ᵀ + b                      once for the whole batch (from the bf16 weight where the layer holds one)
//! y_i += s_g·(x_i·A_gᵀ)·B_gᵀ         each row of group g with g's adapter, row by row (add_delta)
//! y = act(y)
//! ```

use candle_core::{DType, Tensor};
use lora_kernels::{add_delta, matmul_bf16_into, matmul_into, Activation, DeltaRef, MatRef};

use super::PackedAdapter;
use crate::bridge::Held;
use crate::error::{LoraError, Result};
use crate::linear::Base;
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
    /// adapters do not); nothing is recorded for gradients. A weight held in bf16
    /// ([`LoraModel::hold_base_in_bf16`]) is read as bf16: the bits of its f32 values, from half the bytes.
    pub fn forward_mixed(&self, index: usize, x: &Tensor, groups: &[RowGroup<'_>], act: Activation) -> Result<Tensor> {
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
        let hx = Held::new(&x);
        let xs = hx.slice()?;
        let mut y = vec![0f32; n * out];
        match layer.base() {
            // The same bits as the f32 product below, from half the weight's bytes.
            Base::Bf16(m) => matmul_bf16_into(&mut y, MatRef::row_major(xs, n, inp)?, m, None, 1.0, false)?,
            Base::F32(w) => {
                let w = w.as_detached_tensor();
                let hw = Held::new(&w);
                matmul_into(&mut y, MatRef::row_major(xs, n, inp)?, hw.mat()?.t(), 1.0, false)?
            }
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
        let got = flat(&m.forward_mixed(0, &x, &groups, Activation::Relu).unwrap());
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
            )
            .unwrap(),
        );
        let base = flat(&m.forward_mixed(0, &x, &[RowGroup { rows: 3, adapter: None }], Activation::Identity).unwrap());
        let alone = flat(&m.forward_mixed(0, &x, &[RowGroup { rows: 3, adapter: Some(&p[1]) }], Activation::Identity).unwrap());
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
        let e = m.forward_mixed(0, &x, &[RowGroup { rows: 3, adapter: None }], Activation::Identity).unwrap_err().to_string();
        assert!(e.contains("batch"), "{e}");
    }

    #[test]
    fn a_base_held_in_bf16_gives_the_bits_of_its_f32_weights_and_only_bf16_values_are_held_so() {
        // Layers whose weight values are bf16 numbers, in a batch of few rows (the dot-product kernel) and of
        // many (the tiles, on widened blocks), with and without adapters.
        let bf16 = |n: usize, seed: u64| -> Vec<f32> {
            rand_vec(n, seed).into_iter().map(|v| f32::from_bits(v.to_bits() & 0xFFFF_0000)).collect()
        };
        let build = || {
            let mut m = LoraModel::new();
            m.push("fc", crate::LoraLinear::new(t2(bf16(OUT * IN, 3), (OUT, IN)), None).unwrap()).unwrap();
            m.push("wide", crate::LoraLinear::new(t2(bf16(70 * IN, 4), (70, IN)), None).unwrap()).unwrap();
            m.freeze_base(crate::Bias::None);
            m
        };
        let (f32_model, mut bf16_model) = (build(), build());
        assert_eq!(bf16_model.hold_base_in_bf16().unwrap(), 2);
        assert!(bf16_model.layers().all(|(_, l)| l.weight_bf16().is_some() && l.weight_var().is_none()));
        let p = f32_model.pack_adapter(&files(3, 6.0, 80)).unwrap();
        for rows in [3, 40] {
            let x = t2(rand_vec(rows * IN, 90 + rows as u64), (rows, IN));
            for adapter in [None, Some(&p)] {
                let groups = [RowGroup { rows, adapter }];
                let a = flat(&f32_model.forward_mixed(0, &x, &groups, Activation::Relu).unwrap());
                let b = flat(&bf16_model.forward_mixed(0, &x, &groups, Activation::Relu).unwrap());
                assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()), "{rows} rows");
            }
            let groups = [RowGroup { rows, adapter: None }];
            let a = flat(&f32_model.forward_mixed(1, &x, &groups, Activation::Identity).unwrap());
            let b = flat(&bf16_model.forward_mixed(1, &x, &groups, Activation::Identity).unwrap());
            assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()), "wide layer, {rows} rows");
        }
        // Weights with full f32 mantissas stay f32, as do weights that train.
        let mut full = model();
        full.freeze_base(crate::Bias::None);
        assert_eq!(full.hold_base_in_bf16().unwrap(), 0);
        let mut training = build();
        training.unfreeze_base().unwrap();
        assert_eq!(training.hold_base_in_bf16().unwrap(), 0);
        // Widened back, the weights are the same values, bit for bit.
        let before: Vec<u32> = flat(&f32_model.layer("wide").unwrap().weight().unwrap()).iter().map(|v| v.to_bits()).collect();
        bf16_model.widen_base().unwrap();
        let after: Vec<u32> =
            flat(bf16_model.layer("wide").unwrap().weight_var().unwrap().as_tensor()).iter().map(|v| v.to_bits()).collect();
        assert_eq!(before, after);
    }
}
