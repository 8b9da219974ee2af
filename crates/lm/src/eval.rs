//! Scoring text: mean next-token loss in nats per token and bits per byte,
//!
//! ```text
//! loss = Σ nll / N_predicted,     bits_per_byte = Σ nll / ln 2 / Σ bytes(predicted tokens)
//! ```
//!
//! over the windows of [`crate::data::eval_windows`] (each window predicts every token after its first), or
//! over the tokens a window marks as scored (instruction examples: their completions and assistant turns).
//! Windows of equal length run as one batch; the output layer then runs on at most [`HEAD_ROWS`] rows at a
//! time, so the logits held at once are at most HEAD_ROWS × V values whatever the batch (a 128k vocabulary's
//! logits for a batch of 16 × 256 tokens would be 2 GB).

use candle_core::{Device, Tensor};

use crate::data::Window;
use crate::error::{LmError, Result};
use crate::model::Llama;
use crate::ops::token_nll;

/// Rows of hidden states the output layer scores at a time.
pub const HEAD_ROWS: usize = 256;

/// The score of a model on some windows.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Score {
    /// Mean loss, nats per predicted token.
    pub loss: f64,
    /// Bits per byte of the predicted tokens' text.
    pub bits_per_byte: f64,
    /// Predicted tokens.
    pub tokens: usize,
    /// Bytes those tokens cover.
    pub bytes: u64,
}

/// Scores `windows` with the model as it is (its active adapters), `batch` windows at a time. With
/// `per_token`, also returns every window's per-token losses (nats).
pub fn score(model: &Llama, windows: &[Window], batch: usize, per_token: bool) -> Result<(Score, Option<Vec<Vec<f64>>>)> {
    if batch == 0 {
        return Err(LmError::invalid("batch", 0, "must be at least 1"));
    }
    let mut nats = 0f64;
    let mut tokens = 0usize;
    let mut bytes = 0u64;
    let mut all = per_token.then(Vec::new);
    let mut i = 0;
    while i < windows.len() {
        let len = windows[i].ids.len();
        let mut j = i;
        while j < windows.len() && j - i < batch && windows[j].ids.len() == len {
            j += 1;
        }
        let group = &windows[i..j];
        let ids: Vec<u32> = group.iter().flat_map(|w| w.ids.iter().copied()).collect();
        let t = Tensor::from_vec(ids, (group.len(), len), &Device::Cpu)?;
        let h = model.hidden_rows(&t, None, false)?; // (rows·len, H)
        for (r, w) in group.iter().enumerate() {
            // Each window's first len − 1 rows predict its next tokens, HEAD_ROWS rows at a time.
            let mut nll = Vec::with_capacity(len - 1);
            for p0 in (0..len - 1).step_by(HEAD_ROWS) {
                let p1 = (p0 + HEAD_ROWS).min(len - 1);
                let logits = model.head_logits(&h.narrow(0, r * len + p0, p1 - p0)?, false)?; // (p1 − p0, V)
                nll.extend(token_nll(&logits, &w.ids[p0 + 1..p1 + 1])?);
            }
            let mut wbytes: Vec<u32> = w.bytes[1..].to_vec();
            if let Some(scored) = &w.scored {
                let keep = |i: &usize| scored[i + 1];
                nll = (0..nll.len()).filter(keep).map(|i| nll[i]).collect();
                wbytes = (0..wbytes.len()).filter(keep).map(|i| wbytes[i]).collect();
            }
            nats += nll.iter().sum::<f64>();
            tokens += nll.len();
            bytes += wbytes.iter().map(|&b| b as u64).sum::<u64>();
            if let Some(all) = all.as_mut() {
                all.push(nll);
            }
        }
        i = j;
    }
    if tokens == 0 {
        return Err(LmError::invalid("data", "no windows", "nothing to score (every text is shorter than 2 tokens)"));
    }
    let loss = nats / tokens as f64;
    let bits_per_byte = if bytes > 0 { nats / std::f64::consts::LN_2 / bytes as f64 } else { f64::NAN };
    Ok((Score { loss, bits_per_byte, tokens, bytes }, all))
}
