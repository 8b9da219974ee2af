//! Generation with a KV cache: the prompts (left-padded to one length) run as one batch, then each step
//! feeds one token per row and attends over the cached keys and values.
//!
//! Sampling follows transformers' order: logits / temperature → keep the top-k → keep the smallest set
//! of most likely tokens whose probability reaches top-p → renormalise → draw. Temperature 0 is greedy
//! (the first most likely token). Each row draws from its own generator seeded by (seed, row).

use std::sync::Mutex;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::error::{LmError, Result};
use crate::model::{KvCache, Llama};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0: greedy; else logits are divided by it.
    pub temperature: f64,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens with total probability ≥ p.
    pub top_p: Option<f64>,
    /// Seed of the draws.
    pub seed: u64,
}

impl Sampling {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Sampling { temperature: 0.0, top_k: None, top_p: None, seed: 0 }
    }

    /// Checks the settings; errors name the setting and value.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(LmError::invalid("temperature", self.temperature, "must be a number ≥ 0 (0 = greedy)"));
        }
        if self.top_k == Some(0) {
            return Err(LmError::invalid("top_k", 0, "must be at least 1"));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(LmError::invalid("top_p", p, "must be in (0, 1]"));
        }
        Ok(())
    }

    /// The generator of prompt `row` (each row draws from its own, seeded by (seed, row)), so a prompt
    /// samples the same text alone, in a batch, or from a server.
    pub fn rng(&self, row: usize) -> StdRng {
        StdRng::seed_from_u64(self.seed.wrapping_add((row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
    }

    /// Picks a token from one row of logits.
    pub fn pick<R: Rng + ?Sized>(&self, logits: &[f32], rng: &mut R) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let t = self.temperature;
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let mut p: Vec<(u32, f64)> = logits.iter().enumerate().map(|(i, &x)| (i as u32, ((x as f64 - max) / t).exp())).collect();
        p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = self.top_k {
            p.truncate(k.max(1));
        }
        if let Some(top_p) = self.top_p {
            let z: f64 = p.iter().map(|x| x.1).sum();
            let mut acc = 0.0;
            let mut keep = p.len();
            for (i, x) in p.iter().enumerate() {
                acc += x.1 / z;
                if acc >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            p.truncate(keep.max(1));
        }
        let z: f64 = p.iter().map(|x| x.1).sum();
        let mut u = rng.random::<f64>() * z;
        for &(id, w) in &p {
            if u < w {
                return id;
            }
            u -= w;
        }
        p[p.len() - 1].0
    }
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// `max_tokens` were generated.
    Length,
    /// An end-of-sequence token (or a stop sequence) was produced.
    Stop,
    /// The model's context is full.
    Context,
}

/// One row's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The new tokens (without the prompt; an end-of-sequence token is not included).
    pub tokens: Vec<u32>,
    /// Why it stopped.
    pub finish: Finish,
}

/// Generates up to `max_tokens` tokens after each prompt, all prompts as one batch. `stop` lists
/// end-of-sequence ids. `on_token(row, id)` sees each new token as it is chosen and may return false to
/// stop that row (a stop sequence was seen).
pub fn generate(
    model: &Llama,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    sampling: &Sampling,
    stop: &[u32],
    on_token: impl FnMut(usize, u32) -> Result<bool> + Send,
) -> Result<Vec<Generated>> {
    sampling.validate()?;
    let ctx = model.config().max_position_embeddings;
    let vocab = model.config().vocab_size;
    if prompts.is_empty() {
        return Err(LmError::invalid("prompts", 0, "give at least one prompt"));
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(LmError::invalid(format!("prompt {}", i + 1), "\"\"", "is empty (no tokens)"));
        }
        if p.len() > ctx {
            return Err(LmError::invalid(
                format!("prompt {}", i + 1),
                format!("{} tokens", p.len()),
                format!("is longer than the model's context ({ctx} tokens)"),
            ));
        }
        if let Some(id) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(LmError::invalid(format!("prompt {}", i + 1), format!("token {id}"), format!("outside the vocabulary ({vocab})")));
        }
    }
    // Rows generate independently, so a batch runs as one group per core, each group's products on its
    // own core: a decode step of a few rows is too little work to split well inside each product (batch 8
    // measured no faster on 2 threads than on 1 that way).
    let groups = lora_kernels::threads().min(prompts.len()).max(1);
    if groups == 1 {
        let mut on_token = on_token;
        return generate_rows(model, prompts, 0, max_tokens, sampling, stop, &mut on_token);
    }
    let per = prompts.len().div_ceil(groups);
    let callback = Mutex::new(on_token);
    let parts: Vec<Result<Vec<Generated>>> = prompts
        .chunks(per)
        .enumerate()
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|(g, chunk)| {
            let mut cb = |r: usize, id: u32| -> Result<bool> {
                let mut f =
                    callback.lock().map_err(|_| LmError::invalid("generation", "a token callback", "panicked on another thread"))?;
                f(r, id)
            };
            lora_kernels::serial(|| generate_rows(model, chunk, g * per, max_tokens, sampling, stop, &mut cb))
        })
        .collect();
    let mut out = Vec::with_capacity(prompts.len());
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

/// Generates for `prompts` as one batch; `first` is the index of the first prompt in the caller's list
/// (the row numbers `on_token` sees and the rows' generator seeds).
fn generate_rows(
    model: &Llama,
    prompts: &[Vec<u32>],
    first: usize,
    max_tokens: usize,
    sampling: &Sampling,
    stop: &[u32],
    on_token: &mut dyn FnMut(usize, u32) -> Result<bool>,
) -> Result<Vec<Generated>> {
    let ctx = model.config().max_position_embeddings;
    let vocab = model.config().vocab_size;
    let rows = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(1);
    let pad: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let ids: Vec<u32> = prompts.iter().flat_map(|p| std::iter::repeat_n(0, longest - p.len()).chain(p.iter().copied())).collect();
    let mut cache = KvCache::new(model.config(), pad);
    let mut logits = last_logits(model, &Tensor::from_vec(ids, (rows, longest), &Device::Cpu)?, &mut cache)?;
    let mut rngs: Vec<StdRng> = (first..first + rows).map(|r| sampling.rng(r)).collect();
    let mut out: Vec<Generated> = (0..rows).map(|_| Generated { tokens: Vec::new(), finish: Finish::Length }).collect();
    let mut live = vec![true; rows];
    for _ in 0..max_tokens {
        if cache.len() >= ctx {
            for (r, g) in out.iter_mut().enumerate() {
                if live[r] {
                    g.finish = Finish::Context;
                }
            }
            break;
        }
        let mut next = vec![0u32; rows];
        for r in 0..rows {
            if !live[r] {
                continue;
            }
            let id = sampling.pick(&logits[r * vocab..(r + 1) * vocab], &mut rngs[r]);
            next[r] = id;
            if stop.contains(&id) {
                live[r] = false;
                out[r].finish = Finish::Stop;
                continue;
            }
            out[r].tokens.push(id);
            if !on_token(first + r, id)? {
                live[r] = false;
                out[r].finish = Finish::Stop;
            }
        }
        if !live.iter().any(|&l| l) || out.iter().all(|g| g.tokens.len() >= max_tokens) {
            break;
        }
        logits = last_logits(model, &Tensor::from_vec(next, (rows, 1), &Device::Cpu)?, &mut cache)?;
    }
    Ok(out)
}

/// Runs `ids` (rows, T) through the model with the cache; the logits of each row's last position, flat.
fn last_logits(model: &Llama, ids: &Tensor, cache: &mut KvCache) -> Result<Vec<f32>> {
    let (_, t) = ids.dims2()?;
    let logits = model.forward(ids, Some(cache), false)?; // (rows, t, V)
    Ok(logits.narrow(1, t - 1, 1)?.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy_and_greedy_takes_the_first_maximum() {
        let logits = [0.5f32, 3.0, 3.0, -1.0];
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(Sampling::greedy().pick(&logits, &mut rng), 1);
        let k1 = Sampling { temperature: 1.0, top_k: Some(1), top_p: None, seed: 0 };
        let p0 = Sampling { temperature: 1.0, top_k: None, top_p: Some(1e-9), seed: 0 };
        for _ in 0..20 {
            assert_eq!(k1.pick(&logits, &mut rng), 1);
            assert_eq!(p0.pick(&logits, &mut rng), 1);
        }
    }

    #[test]
    fn sampling_frequencies_follow_the_softmax() {
        let logits = [0.0f32, (2f32).ln(), -50.0];
        let s = Sampling { temperature: 1.0, top_k: None, top_p: None, seed: 0 };
        let mut rng = StdRng::seed_from_u64(7);
        let n = 30_000;
        let ones = (0..n).filter(|_| s.pick(&logits, &mut rng) == 1).count() as f64 / n as f64;
        // p(1) = 2/3; the standard error of the mean over 30,000 draws is 0.0027, so 0.015 is > 5 sigma.
        assert!((ones - 2.0 / 3.0).abs() < 0.015, "{ones}");
    }

    #[test]
    fn bad_sampling_settings_are_named() {
        let e = Sampling { temperature: -1.0, ..Sampling::greedy() }.validate().unwrap_err().to_string();
        assert!(e.contains("temperature = -1"), "{e}");
        let e = Sampling { top_p: Some(1.5), ..Sampling::greedy() }.validate().unwrap_err().to_string();
        assert!(e.contains("top_p = 1.5"), "{e}");
    }
}
