//! The mean cross-entropy `L = (1/B) Σ_i (log Σ_c e^{z_ic} − z_{i,y_i})` of a batch, with the closed-form
//! gradient `∂L/∂z = (softmax(z) − onehot(y)) / B`: lora-rs' one cross-entropy op
//! ([`lora_optim::cross_entropy`]), fed the labels tensor's values.

use candle_core::Tensor;

use crate::error::Result;

/// Mean cross-entropy of `logits` (B, C) f32 against `labels` (B) class indices, as one fused op; a scalar.
/// A label outside the classes is an error naming it.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let labels: Vec<u32> = labels.to_dtype(candle_core::DType::U32)?.to_vec1()?;
    Ok(lora_optim::cross_entropy(logits, &labels)?)
}

/// These examples' share of the mean cross-entropy of a global batch of `total` examples that other ranks
/// hold the rest of (their losses summed, divided by `total`).
pub fn cross_entropy_over(logits: &Tensor, labels: &Tensor, total: usize) -> Result<Tensor> {
    let labels: Vec<u32> = labels.to_dtype(candle_core::DType::U32)?.to_vec1()?;
    Ok(lora_optim::cross_entropy_over(logits, &labels, total)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn a_label_out_of_range_is_an_error_not_a_panic() {
        let z = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = Tensor::from_vec(vec![0u32, 3], 2, &Device::Cpu).unwrap();
        let e = cross_entropy(&z, &y).unwrap_err().to_string();
        assert!(e.contains("target 3") && e.contains("(3)"), "{e}");
    }
}
