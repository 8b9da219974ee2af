//! Evaluation: accuracy = correct / N, wrong count per true class, and the confusion matrix
//! `C[t][p]` = number of examples of class t predicted as p.

use candle_core::{DType, Tensor};
use lora::Backend;
use rayon::prelude::*;

use crate::data::Dataset;
use crate::error::Result;
use crate::net::ExpensiveNet;

/// The result of running a model over a data set.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Fraction of examples classified correctly.
    pub accuracy: f64,
    /// For each true class, how many examples were misclassified.
    pub wrong: Vec<usize>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
    /// All logits, row-major (N × classes), for exact comparisons between runs.
    pub logits: Vec<f32>,
}

/// Runs `net` over `data` in batches of `batch_size` (no gradients).
pub fn evaluate(net: &ExpensiveNet, data: &Dataset, batch_size: usize) -> Result<Evaluation> {
    let n = data.len();
    let classes = net.sizes()?[3];
    let labels = data.label_vec()?;
    if let Some(bad) = labels.iter().find(|&&t| t as usize >= classes) {
        return Err(crate::error::TrainError::setting(
            "label",
            bad,
            &format!("the model has only {classes} outputs (classes 0 to {})", classes - 1),
        ));
    }
    let bs = batch_size.max(1);
    // Batches are independent: on the fused backend they run side by side on the rayon threads, each
    // batch's products unsplit on its thread, and are put back in order, so the logits are those of a
    // sequential pass. The reference backend runs them in turn (candle splits each product itself).
    let starts: Vec<usize> = (0..n).step_by(bs).collect();
    let one = |start: usize| -> Result<(Vec<u32>, Vec<f32>)> {
        lora_kernels::serial(|| {
            let (x, _) = data.range(start, bs.min(n - start))?;
            let out: Tensor = net.forward(&x)?.detach(); // (len, classes)
            Ok((out.argmax(1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?, out.flatten_all()?.to_vec1::<f32>()?))
        })
    };
    let batches = match net.backend() {
        Backend::Fused => starts.par_iter().map(|&s| one(s)).collect::<Result<Vec<_>>>()?,
        Backend::Reference => starts.iter().map(|&s| one(s)).collect::<Result<Vec<_>>>()?,
    };
    let mut logits = Vec::with_capacity(n * classes);
    let mut preds = Vec::with_capacity(n);
    for (p, l) in batches {
        preds.extend(p);
        logits.extend(l);
    }
    let mut confusion = vec![vec![0usize; classes]; classes];
    for (&t, &p) in labels.iter().zip(&preds) {
        confusion[t as usize][p as usize] += 1;
    }
    let wrong: Vec<usize> = (0..classes).map(|t| confusion[t].iter().sum::<usize>() - confusion[t][t]).collect();
    let correct = n - wrong.iter().sum::<usize>();
    Ok(Evaluation { accuracy: correct as f64 / n.max(1) as f64, wrong, confusion, logits })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn a_label_beyond_the_model_s_outputs_is_an_error_naming_it_not_a_panic() {
        let net = ExpensiveNet::new(4, 6, 5, 3, 1, &Device::Cpu).unwrap();
        let data = Dataset::new(vec![0.5; 8], &[0, 7], 4, &Device::Cpu).unwrap();
        let e = evaluate(&net, &data, 2).unwrap_err().to_string();
        assert!(e.contains("label = 7") && e.contains("only 3 outputs"), "{e}");
        let ok = Dataset::new(vec![0.5; 8], &[0, 2], 4, &Device::Cpu).unwrap();
        assert_eq!(evaluate(&net, &ok, 2).unwrap().wrong.len(), 3);
    }
}
