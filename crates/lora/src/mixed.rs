//! Mixed-adapter batches: rows that name different adapters share one base product (Punica's BGMV idea).
//!
//! For rows x_i (n, in), each with its own adapter a(i) or none, a layer computes
//!
//! ```text
//! y_i = act(x_i·W0ᵀ + b + s_a(i) · (x_i·A_a(i)ᵀ)·B_a(i)ᵀ)
//! ```
//!
//! The base product `X·W0ᵀ` runs once for the whole batch (`lora_kernels::matmul_into`); then each
//! group of rows gets the delta of its adapter, r·(in + out) multiply-adds per row (a few percent of the
//! row's base product) in one call (`lora_kernels::add_delta`). A [`PackedAdapter`] stores A as (r, in) and
//! B transposed, (r, out), so the delta reads contiguous rows, and computes each row alone: a row's
//! delta is the same whatever else is in the batch. The base product's kernel is chosen by shape,
//! including the batch's size, so a row's output in a batch differs from its output alone by f32
//! rounding only.

use std::ops::Range;

use candle_core::{DType, Tensor};

use crate::adapter::AdapterFiles;
use crate::config::LoraConfig;
use crate::error::{LoraError, Result};
use lora_kernels::{add_delta, matmul_bf16_into, matmul_into, Activation, Bf16Matrix, DeltaRef, MatRef};

use crate::fused::Held;
use crate::model::LoraModel;

/// Where one layer's delta lies in its adapter's [`PackedAdapter::data`].
#[derive(Debug, Clone)]
struct PackedDelta {
    a: Range<usize>,  // A, (r, in)
    bt: Range<usize>, // Bᵀ, (r, out)
    r: usize,
    scale: f32,
}

/// An adapter laid out for mixed batches of one [`LoraModel`]: per layer (in the model's order), the
/// delta or nothing. Immutable once built; share it with `Arc`.
#[derive(Debug, Clone)]
pub struct PackedAdapter {
    /// Every layer's A then Bᵀ, in the model's order of layers: one allocation, read front to back by a
    /// forward pass, so that the hardware prefetcher runs ahead from one layer's delta into the next's.
    data: Vec<f32>,
    layers: Vec<Option<PackedDelta>>,
    config: LoraConfig,
    params: usize,
}

impl PackedAdapter {
    /// The adapter's configuration (`target_modules` = the layers it adapts).
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }
    /// Trainable parameters held (Σ r·(in + out)).
    pub fn num_params(&self) -> usize {
        self.params
    }
    /// Whether layer `i` (in the model's order) has a delta.
    pub fn adapts(&self, i: usize) -> bool {
        self.layers.get(i).is_some_and(Option::is_some)
    }
}

/// The base's weights laid out for mixed batches: each layer's weight in bf16 where every value of it is a
/// bf16 number (a checkpoint stored in bf16, loaded into f32), else nothing (that layer reads its f32 weight).
/// The products read half the bytes and give the same bits (`lora_kernels::matmul_bf16_into`).
///
/// A snapshot of the weights when it was packed: pack again after changing them (merging an adapter into the
/// base, training it). Immutable once built; share it with `Arc`.
#[derive(Debug, Clone, Default)]
pub struct PackedBase {
    layers: Vec<Option<Bf16Matrix>>,
}

impl PackedBase {
    /// Layers held in bf16.
    pub fn bf16_layers(&self) -> usize {
        self.layers.iter().flatten().count()
    }
    /// Bytes held (the bf16 weights).
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(Bf16Matrix::bytes).sum()
    }
}

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
    let adapter = g.adapter?;
    let d = adapter.layers.get(index)?.as_ref()?;
    Some(DeltaRef { a: &adapter.data[d.a.clone()], bt: &adapter.data[d.bt.clone()], rank: d.r, scale: d.scale })
}

pub(crate) fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl LoraModel {
    /// Lays out validated adapter files for [`LoraModel::forward_mixed`], after the same checks as
    /// [`LoraModel::insert_adapter_files`] (modules, shapes, targets). The model is not changed.
    pub fn pack_adapter(&self, files: &AdapterFiles) -> Result<PackedAdapter> {
        self.check_adapter_files(files)?;
        let c = &files.config;
        let copies = !files.copies.is_empty();
        if let Some((m, _)) = self.layers().find(|(m, l)| l.is_embedding() && files.tensors.contains_key(*m)) {
            return Err(LoraError::config(
                "target_modules",
                m,
                "embedding adapters are not served in mixed-adapter batches yet: merge the adapter",
            ));
        }
        for (on, key) in [
            (c.use_dora, "use_dora"),
            (c.lora_bias, "lora_bias"),
            (c.init.rewrites_base(), "init_lora_weights"),
            (copies, "modules_to_save / bias"),
        ] {
            if on {
                return Err(LoraError::config(
                    key,
                    if key == "init_lora_weights" { c.init.peft_value().to_string() } else { "true".into() },
                    "is not served in mixed-adapter batches yet: merge the adapter, or save PiSSA/OLoRA converted to plain LoRA",
                ));
            }
        }
        let (mut data, mut layers) = (Vec::new(), Vec::new());
        for (name, _) in self.layers() {
            let Some((a, b)) = files.tensors.get(name) else {
                layers.push(None);
                continue;
            };
            let mut append = |t: &Tensor| -> Result<Range<usize>> {
                let start = data.len();
                data.extend(values(&t.contiguous()?)?);
                Ok(start..data.len())
            };
            let (a_at, bt_at) = (append(a)?, append(&b.t()?)?);
            layers.push(Some(PackedDelta { a: a_at, bt: bt_at, r: a.dims()[0], scale: files.config.scale_for(name) as f32 }));
        }
        let config = LoraConfig { target_modules: files.tensors.keys().cloned().collect(), ..files.config.clone() };
        Ok(PackedAdapter { data, layers, config, params: files.num_params() })
    }

    /// The weights of the layers whose every value is a bf16 number, in bf16, for
    /// [`LoraModel::forward_mixed`] (see [`PackedBase`]). The model is not changed.
    pub fn pack_base(&self) -> Result<PackedBase> {
        let mut layers = Vec::new();
        for (_, l) in self.layers() {
            layers.push(if l.is_embedding() {
                None
            } else {
                let (out, inp) = l.weight().dims2()?;
                Bf16Matrix::pack(&values(l.weight().as_tensor())?, out, inp)
            });
        }
        Ok(PackedBase { layers })
    }

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
            for row in y.chunks_exact_mut(out) {
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
    use crate::fused::test_util::{flat, rand_vec, t2};
    use crate::linear::{Adapter, LoraLinear};
    use candle_core::Device;
    use std::collections::{BTreeMap, HashMap};
    use std::path::PathBuf;

    const IN: usize = 37;
    const OUT: usize = 29;

    fn model() -> LoraModel {
        let mut m = LoraModel::new();
        let w = t2(rand_vec(OUT * IN, 1), (OUT, IN));
        m.push("fc", LoraLinear::new(w, Some(Tensor::from_vec(rand_vec(OUT, 2), OUT, &Device::Cpu).unwrap())).unwrap()).unwrap();
        m
    }

    fn files(r: usize, alpha: f64, seed: u64) -> AdapterFiles {
        let a = t2(rand_vec(r * IN, seed), (r, IN));
        let b = t2(rand_vec(OUT * r, seed + 1), (OUT, r));
        let config = LoraConfig { r, alpha, target_modules: crate::Targets::Names(vec!["fc".into()]), ..LoraConfig::default() };
        AdapterFiles {
            dir: PathBuf::from("mem"),
            config,
            base_model_name_or_path: None,
            tensors: BTreeMap::from([("fc".to_string(), (a, b))]),
            magnitudes: BTreeMap::new(),
            lora_biases: BTreeMap::new(),
            copies: BTreeMap::new(),
            base_weights: BTreeMap::new(),
            metadata: HashMap::new(),
            dtypes: Vec::new(),
            bytes: (0, 0),
        }
    }

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

    #[test]
    fn a_base_packed_in_bf16_gives_the_bits_of_its_f32_weights_and_only_when_they_are_bf16() {
        // A layer whose weight values are bf16 numbers, in a batch of few rows (the dot-product kernel)
        // and of many (the widened fallback), with and without adapters.
        let mut m = LoraModel::new();
        let bf16 = |n: usize, seed: u64| -> Vec<f32> {
            rand_vec(n, seed).into_iter().map(|v| f32::from_bits(v.to_bits() & 0xFFFF_0000)).collect()
        };
        m.push("fc", LoraLinear::new(t2(bf16(OUT * IN, 3), (OUT, IN)), None).unwrap()).unwrap();
        // A wider layer: 40 rows of it take the tiled kernel, which reads the layer's f32 weight.
        m.push("wide", LoraLinear::new(t2(bf16(70 * IN, 4), (70, IN)), None).unwrap()).unwrap();
        let packed = m.pack_base().unwrap();
        assert_eq!((packed.bf16_layers(), packed.bytes()), (2, (OUT + 70) * IN.div_ceil(32) * 64));
        let p = m.pack_adapter(&files(3, 6.0, 80)).unwrap();
        for rows in [3, 40] {
            let x = t2(rand_vec(rows * IN, 90 + rows as u64), (rows, IN));
            for adapter in [None, Some(&p)] {
                let groups = [RowGroup { rows, adapter }];
                let f32_path = flat(&m.forward_mixed(0, &x, &groups, Activation::Relu, None).unwrap());
                let bf16_path = flat(&m.forward_mixed(0, &x, &groups, Activation::Relu, Some(&packed)).unwrap());
                assert!(f32_path.iter().zip(&bf16_path).all(|(a, b)| a.to_bits() == b.to_bits()), "{rows} rows");
            }
            let groups = [RowGroup { rows, adapter: None }];
            let f32_path = flat(&m.forward_mixed(1, &x, &groups, Activation::Identity, None).unwrap());
            let bf16_path = flat(&m.forward_mixed(1, &x, &groups, Activation::Identity, Some(&packed)).unwrap());
            assert!(f32_path.iter().zip(&bf16_path).all(|(a, b)| a.to_bits() == b.to_bits()), "wide layer, {rows} rows");
        }
        // Weights with full f32 mantissas stay f32; a packing of another shape is refused by name.
        assert_eq!(model().pack_base().unwrap().bf16_layers(), 0);
        let mut other = LoraModel::new();
        other.push("fc", LoraLinear::new(t2(vec![0.5; 2 * IN], (2, IN)), None).unwrap()).unwrap();
        let wrong = other.pack_base().unwrap();
        let x = t2(rand_vec(2 * IN, 1), (2, IN));
        let e = m.forward_mixed(0, &x, &[RowGroup { rows: 2, adapter: None }], Activation::Identity, Some(&wrong)).unwrap_err().to_string();
        assert!(e.contains("base") && e.contains("another model"), "{e}");
    }
}
