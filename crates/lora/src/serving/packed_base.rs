//! [`PackedBase`]: the base's weights laid out for mixed batches, each layer's weight in bf16 where every value
//! of it is a bf16 number (half the bytes, the same bits: `lora_kernels::matmul_bf16_into`).

use lora_kernels::Bf16Matrix;

use crate::bridge::values;
use crate::error::Result;
use crate::model::LoraModel;

/// The base's weights laid out for mixed batches: each layer's weight in bf16 where every value of it is a
/// bf16 number (a checkpoint stored in bf16, loaded into f32), else nothing (that layer reads its f32 weight).
/// The products read half the bytes and give the same bits (`lora_kernels::matmul_bf16_into`).
///
/// A snapshot of the weights when it was packed: pack again after changing them (merging an adapter into the
/// base, training it). Immutable once built; share it with `Arc`.
#[derive(Debug, Clone, Default)]
pub struct PackedBase {
    pub(super) layers: Vec<Option<Bf16Matrix>>,
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

impl LoraModel {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::testing::{flat, rand_vec, t2};
    use crate::linear::LoraLinear;
    use crate::serving::testing::{files, model, IN, OUT};
    use crate::serving::RowGroup;
    use lora_kernels::Activation;

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
