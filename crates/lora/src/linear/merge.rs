//! Merging an adapter into the layer's weight (zero-overhead inference), taking it back out, and the exact
//! restore. The only code that writes the base weight.
//!
//! ```text
//! merge:    W ← W + s·B·A            b ← b + s·b_B (LoRA bias)        copies: the slots get the adapter's
//! DoRA:     W ← f ⊙ (W + s·B·A),  f = m / ‖W + s·B·A‖_row (kept for the unmerge)
//! unmerge:  W ← W / f − s·B·A        b ← b − s·b_B                    copies: the slots get the base back
//! restore_base(W0, b0): W ← W0, b ← b0, bit for bit, every merge forgotten
//! ```
//!
//! Unmerging is exact up to one rounding per element each way (|error| ≤ ulp(|W| + |s·B·A|)); where bits
//! matter, [`LoraLinear::restore_base`] writes saved copies back ([`crate::BaseSnapshot`] for a model).

use candle_core::{DType, Tensor};

use super::LoraLinear;
use crate::error::{LoraError, Result};

impl LoraLinear {
    /// The weight the layer applies now: W + Σ s·B·A over active, unmerged adapters (W alone when disabled).
    /// Shape (out, in). For proofs and export; training never forms it.
    pub fn effective_weight(&self) -> Result<Tensor> {
        let mut w = match self.active_override() {
            Some((Some(w), _)) => w.as_tensor().copy()?,
            _ => self.weight()?.copy()?,
        };
        let base = self.weight()?;
        if !self.disabled {
            for name in self.active.iter().filter(|n| !self.merged.contains(n)) {
                let ad = self.adapter(name)?;
                let f = ad.dora_factor(&base)?;
                w = (w + self.stored(ad.delta_weight()?)?)?;
                if let Some(f) = f {
                    w = w.broadcast_mul(&f.unsqueeze(1)?)?;
                }
            }
        }
        Ok(w)
    }

    /// Folds adapter `name` into the weight: W ← W + s·B·A (DoRA: W ← f ⊙ (W + s·B·A); a LoRA bias goes
    /// into the bias, b ← b + s·b_B). With `safe`, the new tensors are checked for NaN/Inf before they are
    /// written, and the layer is left unchanged on error.
    pub fn merge(&mut self, name: &str, safe: bool) -> Result<()> {
        if self.merged.iter().any(|m| m == name) {
            return Err(LoraError::State(format!("adapter {name:?} is already merged")));
        }
        if let Some(m) = self.merged.iter().find(|m| self.overrides.contains_key(*m)) {
            return Err(LoraError::State(format!(
                "cannot merge {name:?} on top of {m:?}, whose copy of this layer is merged: unmerge it first"
            )));
        }
        if !self.has_adapter(name) {
            return Err(self.unknown(name));
        }
        let copies = self.overrides.contains_key(name);
        if copies {
            // The adapter's copies of this layer's tensors: merging puts them in the layer's slots (the base
            // tensors they displace kept aside, exactly); the LoRA pair, if any, then merges on top.
            if !self.merged.is_empty() {
                return Err(LoraError::State(format!("cannot merge adapter {name:?} while {:?} are merged: unmerge first", self.merged)));
            }
            let ov = &self.overrides[name];
            if safe && !ov.vars().map(|v| all_finite(v.as_tensor())).collect::<Result<Vec<_>>>()?.into_iter().all(|ok| ok) {
                return Err(LoraError::NonFinite { tensor: format!("layer copy of {name}") });
            }
            self.swap_in_copies(name)?;
        }
        if self.adapters.contains_key(name) {
            if let Err(e) = self.merge_pair(name, safe) {
                self.put_back_displaced()?;
                return Err(e);
            }
        }
        self.merged.push(name.to_string());
        Ok(())
    }

    fn merge_pair(&mut self, name: &str, safe: bool) -> Result<()> {
        let w = self.writable_weight("merging an adapter")?.as_tensor().clone();
        let ad = self.adapter(name)?;
        let mut new = (&w + self.stored(ad.delta_weight()?)?)?;
        let mut norm = None;
        if ad.magnitude.is_some() {
            if self.merged.iter().any(|m| m != name) {
                return Err(LoraError::State(format!(
                    "cannot merge DoRA adapter {name:?} while {:?} are merged: unmerge first",
                    self.merged
                )));
            }
            let n = ad.dora_norm(&w)?;
            let f =
                ad.magnitude.as_ref().map(|m| m.as_tensor() / &n).transpose()?.ok_or_else(|| LoraError::State("no magnitude".into()))?;
            new = new.broadcast_mul(&f.unsqueeze(1)?)?;
            norm = Some(n);
        }
        let new_bias = match (&ad.lora_bias, &self.bias) {
            (None, _) => None,
            (Some(lb), Some(b)) => Some((b.as_tensor() + (lb.as_tensor() * ad.scale)?)?),
            (Some(_), None) => {
                return Err(LoraError::State(format!(
                    "cannot merge adapter {name:?}: it has a LoRA bias and the layer has no bias (as in PEFT)"
                )))
            }
        };
        if safe && (!all_finite(&new)? || !new_bias.as_ref().map_or(Ok(true), all_finite)?) {
            return Err(LoraError::NonFinite { tensor: format!("weight merged with {name}") });
        }
        self.writable_weight("merging an adapter")?.set(&new)?;
        if let (Some(nb), Some(b)) = (new_bias, &self.bias) {
            b.set(&nb)?;
        }
        if let Some(n) = norm {
            self.dora_norms.insert(name.to_string(), n);
        }
        Ok(())
    }

    /// Takes a merged adapter back out: W ← W − s·B·A (DoRA: W ← W / f − s·B·A with the merge's norm; a
    /// LoRA bias: b ← b − s·b_B). Exact up to float rounding of one add and one subtract per element
    /// (|error| ≤ ulp(|W| + |s·B·A|)); use a saved copy of W0 where bits matter.
    pub fn unmerge(&mut self, name: &str) -> Result<()> {
        let pos = self.merged.iter().position(|m| m == name).ok_or_else(|| LoraError::State(format!("adapter {name:?} is not merged")))?;
        if !self.adapters.contains_key(name) {
            self.put_back_displaced()?;
            self.merged.remove(pos);
            return Ok(());
        }
        let mut w = self.writable_weight("unmerging an adapter")?.as_tensor().clone();
        let ad = self.adapter(name)?;
        if let (Some(m), Some(n)) = (&ad.magnitude, self.dora_norms.get(name)) {
            w = w.broadcast_div(&(m.as_tensor() / n)?.unsqueeze(1)?)?;
        }
        let new = (w - self.stored(ad.delta_weight()?)?)?;
        let new_bias = match (&ad.lora_bias, &self.bias) {
            (Some(lb), Some(b)) => Some((b.as_tensor() - (lb.as_tensor() * ad.scale)?)?),
            _ => None,
        };
        self.writable_weight("unmerging an adapter")?.set(&new)?;
        if let (Some(nb), Some(b)) = (new_bias, &self.bias) {
            b.set(&nb)?;
        }
        self.dora_norms.remove(name);
        // The slots its copies held get the base's exact tensors back (the subtraction above is then moot).
        self.put_back_displaced()?;
        self.merged.remove(pos);
        Ok(())
    }

    /// Writes `w` (out, in) as the stored weight: into the f32 variable, or — for a weight held in bf16 — nothing
    /// when `w` holds exactly its values, else the weight is widened to f32 and written.
    fn set_base_weight(&mut self, w: &Tensor) -> Result<()> {
        if let Some(m) = self.weight_bf16() {
            let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if lora_kernels::Bf16Matrix::pack(&values, m.rows(), m.cols()).as_ref() == Some(&**m) {
                return Ok(());
            }
        }
        self.writable_weight("restoring the base")?.set(w)?;
        Ok(())
    }

    /// [`LoraLinear::restore_base`] with a bf16 weight: the layer holds `weight` itself again.
    pub(crate) fn restore_base_bf16(&mut self, weight: &std::sync::Arc<lora_kernels::Bf16Matrix>, bias: Option<&Tensor>) -> Result<()> {
        let dims = [weight.rows(), weight.cols()];
        if dims != self.weight_dims() {
            return Err(LoraError::Shape { tensor: "weight".into(), expected: self.weight_dims().to_vec(), found: dims.to_vec() });
        }
        self.put_back_displaced()?;
        self.replace_weight(super::Base::Bf16(weight.clone()));
        if let (Some(b), Some(src)) = (&self.bias, bias) {
            b.set(src)?;
        }
        self.merged.clear();
        self.dora_norms.clear();
        Ok(())
    }

    /// Replaces the stored weight (and bias) with exact copies, forgetting merges: the exact-restore path.
    /// Adapters keep everything they hold, their own copies of this layer's tensors (trained biases,
    /// `modules_to_save`) included.
    pub fn restore_base(&mut self, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        if weight.dims() != self.weight_dims() {
            return Err(LoraError::Shape { tensor: "weight".into(), expected: self.weight_dims().to_vec(), found: weight.dims().to_vec() });
        }
        if let (Some(b), Some(own)) = (bias, &self.bias) {
            if b.dims() != own.dims() {
                return Err(LoraError::Shape { tensor: "bias".into(), expected: own.dims().to_vec(), found: b.dims().to_vec() });
            }
        }
        // A merged adapter's copies sit in the slots and the base aside: the base back first (so that a bias
        // not given here is the base's too), then the given tensors.
        self.put_back_displaced()?;
        self.set_base_weight(weight)?;
        if let (Some(b), Some(src)) = (&self.bias, bias) {
            b.set(src)?;
        }
        self.merged.clear();
        self.dora_norms.clear();
        Ok(())
    }
}

/// True when every element of `t` is finite.
fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().all(|x| x.is_finite()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::testing::{dora_layer, flat, layer_with_adapter, rand_vec, t2 as t};
    use crate::linear::Adapter;
    use candle_core::Device;

    fn bits(t: &Tensor) -> Vec<u32> {
        flat(t).iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn restore_base_keeps_an_adapters_own_copies_of_the_layer_bit_for_bit() {
        // PEFT's trained bias (bias = "all" / "lora_only") beside a LoRA pair, and a modules_to_save copy
        // alone: each merged, then the base restored from saved copies. The adapters come back whole: the
        // same copies and the same outputs, bit for bit.
        let (inp, out) = (7, 5);
        let x = t(rand_vec(3 * inp, 40), (3, inp));
        let (mut l, _) = layer_with_adapter(inp, out, 2, 3.0, 41);
        l.freeze_base();
        let trained = Tensor::from_vec(rand_vec(out, 142), out, &Device::Cpu).unwrap();
        l.insert_override("x", None, Some(&trained)).unwrap();
        let (wcopy, bcopy) = (t(rand_vec(out * inp, 43), (out, inp)), Tensor::from_vec(rand_vec(out, 44), out, &Device::Cpu).unwrap());
        l.insert_override("full", Some(&wcopy), Some(&bcopy)).unwrap();
        let (w0, b0) = (l.weight().unwrap().copy().unwrap(), l.bias().unwrap().as_tensor().copy().unwrap());
        for (name, want_w, want_b) in [("x", None, &trained), ("full", Some(&wcopy), &bcopy)] {
            l.set_active(&[name]).unwrap();
            let before = bits(&l.forward(&x).unwrap());
            l.merge(name, true).unwrap();
            assert_ne!(bits(l.bias().unwrap().as_tensor()), bits(&b0), "{name}: merging put the adapter's bias in the layer");
            l.restore_base(&w0, Some(&b0)).unwrap();
            assert_eq!((bits(&l.weight().unwrap()), bits(l.bias().unwrap().as_tensor())), (bits(&w0), bits(&b0)), "{name}: base");
            let (w, b) = l.override_of(name).unwrap();
            assert_eq!(bits(b.unwrap().as_tensor()), bits(want_b), "{name}: the adapter's own bias");
            assert_eq!(w.map(|w| bits(w.as_tensor())), want_w.map(bits), "{name}: the adapter's own weight");
            assert_eq!(bits(&l.forward(&x).unwrap()), before, "{name}: the adapter's outputs");
        }
    }

    #[test]
    fn merging_and_unmerging_leaves_an_adapters_own_copies_and_the_base_bit_for_bit() {
        // A LoRA pair with the adapter's own weight and bias: merged, its copy is the layer's weight plus
        // s·B·A; unmerged, the copy must not be that sum minus s·B·A (rounded), but the copy itself.
        let (inp, out) = (9, 6);
        let (mut l, _) = layer_with_adapter(inp, out, 3, 5.0, 51);
        let (wcopy, bcopy) = (t(rand_vec(out * inp, 52), (out, inp)), Tensor::from_vec(rand_vec(out, 53), out, &Device::Cpu).unwrap());
        l.insert_override("x", Some(&wcopy), Some(&bcopy)).unwrap();
        let (w0, b0) = (bits(&l.weight().unwrap()), bits(l.bias().unwrap().as_tensor()));
        l.merge("x", true).unwrap();
        l.unmerge("x").unwrap();
        let (w, b) = l.override_of("x").unwrap();
        assert_eq!((bits(w.unwrap().as_tensor()), bits(b.unwrap().as_tensor())), (bits(&wcopy), bits(&bcopy)), "the copies");
        assert_eq!((bits(&l.weight().unwrap()), bits(l.bias().unwrap().as_tensor())), (w0, b0), "the base");
    }

    #[test]
    fn dora_merge_gives_the_unmerged_outputs_and_unmerge_restores_the_weight() {
        let mut l = dora_layer(30, 20, 4, 71);
        let x = t(rand_vec(6 * 30, 72), (6, 30));
        let y0 = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w0 = l.weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        l.merge("x", true).unwrap();
        let y1 = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Sums of 30 terms in another association, one extra rounding of f: 1e-4 as the plain test.
        assert!(y0.iter().zip(&y1).all(|(a, b)| (a - b).abs() < 1e-4));
        l.unmerge("x").unwrap();
        let w2 = l.weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // W·f/f − ΔW + ΔW: four roundings of values ≲ 10.
        assert!(w0.iter().zip(&w2).all(|(a, b)| (a - b).abs() < 1e-5), "unmerge did not restore W");
    }

    #[test]
    fn effective_weight_is_w0_plus_scaled_ba() {
        let (l, p) = layer_with_adapter(5, 4, 2, 3.0, 21);
        let w = l.effective_weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for o in 0..4 {
            for j in 0..5 {
                let ba: f64 = (0..2).map(|k| p[3][o * 2 + k] as f64 * p[2][k * 5 + j] as f64).sum();
                let want = p[0][o * 5 + j] as f64 + 1.5 * ba;
                assert!((w[o * 5 + j] as f64 - want).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn unmerged_output_equals_merged_output() {
        let (mut l, _) = layer_with_adapter(30, 20, 4, 8.0, 31);
        let x = t(rand_vec(6 * 30, 32), (6, 30));
        let y0 = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w0 = l.weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        l.merge("x", true).unwrap();
        let y1 = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Same sums in a different association: |y| ≲ 30 terms of size ≤ 8, f32 eps 1.2e-7 → 1e-4 is generous.
        for (a, b) in y0.iter().zip(&y1) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        assert!(l.set_disabled(true).is_err());
        l.unmerge("x").unwrap();
        let w2 = l.weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // One add and one subtract of the same delta: error ≤ 2 ulp of the larger magnitude (|W0|+|ΔW| ≤ 1 + 8).
        for (a, b) in w0.iter().zip(&w2) {
            assert!((a - b).abs() <= 2.0 * f32::EPSILON * 9.0);
        }
    }

    #[test]
    fn safe_merge_refuses_non_finite_weights_and_leaves_the_layer_unchanged() {
        let w = vec![1.0f32; 4];
        let mut l = LoraLinear::new(t(w, (2, 2)), None).unwrap();
        let ad = Adapter::from_tensors(&t(vec![f32::INFINITY, 0.0], (1, 2)), &t(vec![1.0, 1.0], (2, 1)), 1.0, 1.0, 0.0).unwrap();
        l.insert_adapter("bad", ad).unwrap();
        let e = l.merge("bad", true).unwrap_err().to_string();
        assert!(e.contains("non-finite") && e.contains("bad"), "{e}");
        assert_eq!(l.weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![1.0; 4]);
        assert!(l.merged().is_empty());
    }
}
