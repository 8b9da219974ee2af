//! Ragged, mixed-adapter batches for serving: sequences of different lengths, at different positions,
//! each with its own adapter and its own cache, run through the model as one batch of rows.
//!
//! For sequences s = 1…S with t_s new tokens after c_s cached ones, the rows of every projection are
//! the Σ t_s new tokens one after another (no padding):
//!
//! ```text
//! h = E[tokens]                                        (Σ t_s, H)
//! per layer: x = RMSNorm(h)
//!            q, k, v = x·Wᵀ + s_a·(x·A_aᵀ)·B_aᵀ         one base product for all rows, each row's own delta
//!            RoPE at each row's own position c_s + j (in the table of the sequence's own length)
//!            attention per sequence over its cache     (t_s queries, c_s + t_s keys, causal, the layer's window)
//!            h = h + o_proj(…);  h = h + down(act(gate(x)) ⊙ up(x))
//! logits of each sequence's last row = RMSNorm(h_last)·W_headᵀ (+ its delta)   (S, V)
//! ```
//!
//! The layer is [`Llama::forward`]'s own (`layer_forward`: every family's blocks), on the fused kernels;
//! the projections are [`lora::LoraModel::forward_mixed`]. A sequence's logits therefore do not depend on the other
//! sequences' adapters, and differ from its logits alone only by the f32 rounding of the base products'
//! batch-size-dependent summation order. Projections whose weights are held in bf16 (a checkpoint stored in
//! bf16, or [`Llama::hold_base_in_bf16`]) are read as bf16: the same bits, from half the bytes, which is what
//! a decode step of many adapters is short of (the base and the adapters compete for the last-level cache).

use candle_core::{Device, Tensor};
use lora::{Activation, PackedAdapter, RowGroup};

use crate::error::{LmError, Result};
use crate::fused::{attention::attention_forward, AttentionShape, RopeOp};
use crate::model::{module_name, KvCache, Llama, LM_HEAD};

/// One sequence of a mixed batch: its new tokens, its cache (made by [`Llama::sequence_cache`]) and
/// its adapter.
#[derive(Debug)]
pub struct Sequence<'a> {
    /// Tokens after the cached ones (the prompt, then one token per step).
    pub tokens: &'a [u32],
    /// The sequence's keys and values so far; the new tokens are added.
    pub cache: &'a mut KvCache,
    /// The adapter for this sequence (`None`: the base model).
    pub adapter: Option<&'a PackedAdapter>,
}

impl Llama {
    /// An empty cache for one sequence of [`Llama::forward_mixed`].
    pub fn sequence_cache(&self) -> KvCache {
        KvCache::new(&self.config, vec![0])
    }

    /// Lays out adapter files for mixed batches of this model, after checking them against it.
    pub fn pack_adapter(&self, files: &lora::AdapterFiles) -> Result<PackedAdapter> {
        Ok(self.lora.pack_adapter(files)?)
    }

    /// Runs every sequence's new tokens as one batch; returns the logits after each sequence's last
    /// token, (S, V) flat. Nothing is recorded for gradients.
    ///
    /// With several threads and several sequences, the sequences are split into one part per thread,
    /// each part a batch of its own on its own core (as [`crate::generate::generate`] splits its rows):
    /// a decode step's products are too small to split well inside each product.
    pub fn forward_mixed(&self, seqs: &mut [Sequence<'_>]) -> Result<Vec<f32>> {
        use rayon::prelude::*;
        self.check_sequences(seqs)?;
        let at = self.positions()?;
        let parts = lora_kernels::threads().min(seqs.len());
        if parts <= 1 {
            return self.forward_part(seqs, &at);
        }
        let per = seqs.len().div_ceil(parts);
        let outs: Vec<Result<Vec<f32>>> =
            seqs.par_chunks_mut(per).map(|part| lora_kernels::serial(|| self.forward_part(part, &at))).collect();
        let mut logits = Vec::with_capacity(seqs.len() * self.config.vocab_size);
        for o in outs {
            logits.extend(o?);
        }
        Ok(logits)
    }

    fn check_sequences(&self, seqs: &[Sequence<'_>]) -> Result<()> {
        let vocab = self.config.vocab_size;
        let max = self.rope.max_positions();
        for (i, s) in seqs.iter().enumerate() {
            if s.tokens.is_empty() || s.cache.pad().len() != 1 || s.cache.len + s.tokens.len() > max {
                return Err(LmError::invalid(
                    format!("sequence {i}"),
                    format!("{} new tokens after {}", s.tokens.len(), s.cache.len),
                    format!("needs at least one token, a one-sequence cache and at most {max} positions"),
                ));
            }
            if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(LmError::invalid(format!("sequence {i}"), format!("token {t}"), format!("outside the vocabulary ({vocab})")));
            }
        }
        Ok(())
    }

    /// [`Llama::forward_mixed`] of checked sequences as one batch.
    fn forward_part(&self, seqs: &mut [Sequence<'_>], at: &Positions) -> Result<Vec<f32>> {
        let c = &self.config;
        let (nh, nkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let groups = row_groups(seqs, |s| s.tokens.len());
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let positions: Vec<u32> = seqs.iter().flat_map(|s| (s.cache.len..s.cache.len + s.tokens.len()).map(|p| p as u32)).collect();
        let rows = ids.len();
        for s in seqs.iter_mut() {
            let want = s.cache.len + s.tokens.len();
            s.cache.reserve(want);
        }
        // Each sequence's RoPE table is that of its own length, whatever else is in the batch.
        let lengths: Vec<usize> = seqs.iter().map(|s| s.cache.len + s.tokens.len()).collect();
        let (tables, which) = self.rope_tables(&lengths)?;
        let which = seqs.iter().zip(&which).flat_map(|(s, &w)| std::iter::repeat_n(w, s.tokens.len())).collect();
        let rope = RopeOp::with_tables(tables, which, positions, d)?;
        let dev = Device::Cpu;
        let mut h = self.embed_rows(&Tensor::from_vec(ids, (1, rows), &dev)?, false)?.detach(); // (rows, H)
        for l in 0..c.num_hidden_layers {
            let proj = |i: usize, x: &Tensor| -> Result<Tensor> {
                Ok(self.lora.forward_mixed(at.layers[l][i], x, &groups, Activation::Identity)?)
            };
            let opts = self.attention_opts(l);
            let seqs_l = &mut *seqs;
            let mut attend = |q: Tensor, k: Tensor, v: Tensor| -> Result<Tensor> {
                let (q, k, v) = (flat(&rope.apply(&q)?)?, flat(&rope.apply(&k)?)?, flat(&v.contiguous()?)?);
                let mut a = Vec::with_capacity(rows * nh * d);
                let mut r0 = 0;
                for s in seqs_l.iter_mut() {
                    let t = s.tokens.len();
                    let cache = &mut *s.cache;
                    cache.write(l, &k[r0 * nkv * d..(r0 + t) * nkv * d], &v[r0 * nkv * d..(r0 + t) * nkv * d], t);
                    let shape = AttentionShape {
                        batch: 1,
                        tq: t,
                        tk: cache.len + t,
                        heads: nh,
                        kv_heads: nkv,
                        d,
                        offset: cache.len,
                        pad: vec![0],
                        opts,
                    };
                    let (kb, vb) = &cache.layers[l];
                    let (out, _) = attention_forward(&q[r0 * nh * d..(r0 + t) * nh * d], kb, vb, cache.cap, &shape)?;
                    a.extend_from_slice(&out);
                    r0 += t;
                }
                Ok(Tensor::from_vec(a, (rows, nh * d), &dev)?)
            };
            h = self.layer_forward(l, h, true, true, &proj, &mut attend)?;
        }
        let mut last = Vec::with_capacity(seqs.len());
        let mut r = 0;
        for s in seqs.iter_mut() {
            r += s.tokens.len();
            last.push((r - 1) as u32);
            s.cache.len += s.tokens.len();
        }
        let h = h.index_select(&Tensor::from_vec(last, seqs.len(), &dev)?, 0)?;
        let h = self.norm(&h, &self.final_norm, true, true)?;
        let heads = row_groups(seqs, |_| 1);
        flat(&self.softcap_logits(self.lora.forward_mixed(at.head, &h, &heads, Activation::Identity)?)?)
    }

    /// Where the projections and `lm_head` sit in the model's [`lora::LoraModel`], found by their
    /// transformers names (never assumed from the order they were pushed in): once per step, shared by
    /// its parts.
    fn positions(&self) -> Result<Positions> {
        let projections = self.config.projections();
        let mut layers = Vec::with_capacity(self.config.num_hidden_layers);
        for l in 0..self.config.num_hidden_layers {
            layers.push(projections.iter().map(|p| self.lora.position(&module_name(l, p))).collect::<lora::Result<Vec<usize>>>()?);
        }
        Ok(Positions { layers, head: self.lora.position(LM_HEAD)? })
    }
}

/// The positions of a model's layers in its `LoraModel` ([`Llama::positions`]).
struct Positions {
    layers: Vec<Vec<usize>>, // each decoder layer's projections, the family's order
    head: usize,
}

/// The row groups of `seqs`, each sequence contributing `rows(seq)` rows: neighbours with the same adapter
/// form one group (one pair of delta products for all their rows).
fn row_groups<'a>(seqs: &[Sequence<'a>], rows: impl Fn(&Sequence<'a>) -> usize) -> Vec<RowGroup<'a>> {
    let mut groups: Vec<RowGroup<'a>> = Vec::with_capacity(seqs.len());
    for s in seqs {
        match groups.last_mut() {
            Some(g) if same(g.adapter, s.adapter) => g.rows += rows(s),
            _ => groups.push(RowGroup { rows: rows(s), adapter: s.adapter }),
        }
    }
    groups
}

/// Whether two sequences use the same packed adapter (the same one in memory, or both none).
fn same(a: Option<&PackedAdapter>, b: Option<&PackedAdapter>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LlamaConfig;
    use lora::{LoraLinear, LoraModel};

    #[test]
    fn the_projections_are_found_by_name_whatever_their_order_in_the_model() {
        let cfg = LlamaConfig {
            hidden_size: 24,
            intermediate_size: 40,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 6,
            max_position_embeddings: 32,
            initializer_range: 0.3,
            ..LlamaConfig::byte_default()
        };
        let mut m = Llama::random(&cfg, 7).unwrap();
        let tokens = [3u32, 1, 4, 1, 5];
        let logits = |m: &Llama| {
            let mut cache = m.sequence_cache();
            m.forward_mixed(&mut [Sequence { tokens: &tokens, cache: &mut cache, adapter: None }]).unwrap()
        };
        let want = logits(&m);
        // The same layers (sharing their variables) pushed in reverse order: every position changes, no name.
        let mut reversed = LoraModel::new();
        for (name, l) in m.lora.layers().collect::<Vec<_>>().into_iter().rev() {
            let w = l.weight().unwrap();
            let layer =
                if l.is_embedding() { LoraLinear::embedding(w) } else { LoraLinear::new(w, l.bias().map(|b| b.as_tensor().clone())) };
            reversed.push(name, layer.unwrap()).unwrap();
        }
        reversed.set_output_layer(LM_HEAD).unwrap();
        m.lora = reversed;
        // The same products of the same rows: the same bits.
        assert_eq!(logits(&m), want);
    }
}
