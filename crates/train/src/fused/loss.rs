//! Mean cross-entropy `L = (1/B) Σ_i (log Σ_c e^{z_ic} − z_{i,y_i})` as one op, with the closed-form
//! gradient `∂L/∂z = (softmax(z) − onehot(y)) / B`.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use lora::bridge::{cpu_slice, Held};

use crate::error::Result;

struct CrossEntropy;

fn rows<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], usize, usize)> {
    match l.dims() {
        [b, c] if l.is_contiguous() => Ok((cpu_slice(s, l)?, *b, *c)),
        d => candle_core::bail!("cross_entropy: logits must be a contiguous (batch, classes) tensor, got {d:?}"),
    }
}

fn labels<'a>(s: &'a CpuStorage, l: &Layout, b: usize, c: usize) -> candle_core::Result<&'a [u32]> {
    if !l.is_contiguous() || l.dims() != [b] {
        candle_core::bail!("cross_entropy: labels must be a contiguous ({b}) u32 tensor, got {:?}", l.dims())
    }
    let y: &[u32] = cpu_slice(s, l)?;
    if let Some(bad) = y.iter().find(|&&v| v as usize >= c) {
        candle_core::bail!("cross_entropy: label {bad} is not below the {c} classes")
    }
    Ok(y)
}

/// (max, log Σ e^{z−max}) of one row.
fn row_lse(z: &[f32]) -> (f32, f32) {
    let m = z.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    (m, z.iter().map(|&v| (v - m).exp()).sum::<f32>().ln())
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (z, b, c) = rows(s1, l1)?;
        let y = labels(s2, l2, b, c)?;
        let mut sum = 0f64;
        for (row, &t) in z.chunks_exact(c).zip(y) {
            let (m, lse) = row_lse(row);
            sum += (m + lse - row[t as usize]) as f64;
        }
        Ok((CpuStorage::F32(vec![(sum / b.max(1) as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, target: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_scalar::<f32>()?;
        let logits = logits.contiguous()?;
        let hz = Held::new(&logits);
        let (b, c) = logits.dims2()?;
        let z = hz.slice()?;
        let (ts, tl) = target.storage_and_layout();
        let y = match &*ts {
            candle_core::Storage::Cpu(s) => labels(s, tl, b, c)?,
            _ => candle_core::bail!("cross_entropy runs on the CPU only"),
        };
        let k = g / b.max(1) as f32;
        let mut d = vec![0f32; b * c];
        for ((row, out), &t) in z.chunks_exact(c).zip(d.chunks_exact_mut(c)).zip(y) {
            let (m, lse) = row_lse(row);
            for (o, &v) in out.iter_mut().zip(row) {
                *o = (v - m - lse).exp() * k;
            }
            out[t as usize] -= k;
        }
        Ok((Some(Tensor::from_vec(d, (b, c), logits.device())?), None))
    }
}

/// Mean cross-entropy of `logits` (B, C) f32 against `labels` (B) u32, as one fused op; a scalar.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logits = logits.contiguous()?;
    let labels = labels.to_dtype(candle_core::DType::U32)?.contiguous()?;
    Ok(logits.apply_op2(&labels, CrossEntropy)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn fused_cross_entropy_and_its_gradient_match_candle() {
        let (b, c) = (9, 7);
        let z: Vec<f32> = (0..b * c).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7).collect();
        let y: Vec<u32> = (0..b as u32).map(|i| (i * 5) % c as u32).collect();
        let y = Tensor::from_vec(y, b, &Device::Cpu).unwrap();
        let zv = Var::from_tensor(&Tensor::from_vec(z, (b, c), &Device::Cpu).unwrap()).unwrap();
        let ours = cross_entropy(zv.as_tensor(), &y).unwrap();
        let theirs = candle_nn::loss::cross_entropy(zv.as_tensor(), &y).unwrap();
        let (lo, lt) = (ours.to_scalar::<f32>().unwrap(), theirs.to_scalar::<f32>().unwrap());
        // Log-sum-exp of 7 terms in f32 summed differently: agreement to a few ulp of the loss (≈ 5).
        assert!((lo - lt).abs() < 1e-5, "{lo} vs {lt}");
        let go = ours.backward().unwrap().get(zv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gt = theirs.backward().unwrap().get(zv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Gradients are (softmax − onehot)/9, |·| ≤ 0.12; exp rounding differs by a few ulp.
        for (a, t) in go.iter().zip(&gt) {
            assert!((a - t).abs() < 1e-6, "{a} vs {t}");
        }
    }

    #[test]
    fn a_label_out_of_range_is_an_error_not_a_panic() {
        let z = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = Tensor::from_vec(vec![0u32, 3], 2, &Device::Cpu).unwrap();
        let e = cross_entropy(&z, &y).unwrap_err().to_string();
        assert!(e.contains("label 3"), "{e}");
    }
}
