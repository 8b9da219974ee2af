//! Every model family against transformers and PEFT (`scripts/make_family_fixtures.py` wrote
//! `tests/fixtures/families/`): a tiny random model of each family made by transformers' own class (grouped
//! K/V heads, the family's biases, a scaled RoPE, rows longer than the sliding window) with a random PEFT
//! adapter on every projection, and the logits both compute; the RoPE frequencies of every scaling; two
//! tokenizers. lora-rs reproduces the logits on its fused and reference paths, with and without the adapter,
//! and its cache, padding, mixed-batch, training and file paths agree with its full forward.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lora_lm::hf::{load_adapter, load_model, save_adapter, save_model};
use lora_lm::mixed::Sequence;
use lora_lm::{Family, KvCache, Llama, RopeScaling};
use serde_json::Value;

const FAMILIES: [&str; 6] = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/families")
}

struct Fixture {
    ids: Vec<Vec<u32>>,
    short: Vec<Vec<u32>>,
    logits: std::collections::HashMap<String, Vec<f32>>,
}

fn fixture(name: &'static str) -> Fixture {
    let e: Value = serde_json::from_str(&std::fs::read_to_string(root().join(name).join("expected.json")).unwrap()).unwrap();
    let rows = |k: &str| -> Vec<Vec<u32>> {
        e[k].as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()).collect()
    };
    let f = lora::io::TensorFile::load(&root().join(name).join("expected.safetensors"), &Device::Cpu).unwrap();
    let logits = f.tensors.into_iter().map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect();
    Fixture { ids: rows("ids"), short: rows("short"), logits }
}

fn tensor(rows: &[Vec<u32>]) -> Tensor {
    Tensor::from_vec(rows.concat(), (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
}

fn logits(model: &Llama, rows: &[Vec<u32>]) -> Vec<f32> {
    model.forward(&tensor(rows), None, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max)
}

fn base(name: &str) -> Llama {
    load_model(&root().join(name).join("base")).unwrap().0
}

fn with_adapter(name: &str) -> Llama {
    let mut m = base(name);
    // PEFT wrote it: no lora-rs base fingerprint to check.
    load_adapter(&mut m, "peft", &root().join(name).join("adapter"), false).unwrap();
    m.lora_mut().set_active(&["peft"]).unwrap();
    m
}

/// Logits within 1e-5 of transformers' (absolute; logits of size ≲ 10). Both compute in f32 with sums of ≤ 48
/// terms in other orders and their own exp/tanh/pow (≲ 1e-6 apart); any wrong convention (a window off by
/// one, a RoPE band, a norm's 1 + w, a cap, the qkv split order) moves logits by 1e-2 or more.
const TOL: f64 = 1e-5;

#[test]
fn every_family_gives_transformers_logits_with_and_without_its_peft_adapter_on_both_paths() {
    for name in FAMILIES {
        let f = fixture(name);
        let mut plain = base(name);
        let mut adapted = with_adapter(name);
        let mut worst = 0f64;
        for fused in [true, false] {
            for (model, prefix) in [(&mut plain, "base"), (&mut adapted, "adapter")] {
                model.set_fused(fused);
                for (rows, key) in [(&f.ids, format!("{prefix}_logits")), (&f.short, format!("{prefix}_short_logits"))] {
                    let d = max_diff(&logits(model, rows), &f.logits[&key]);
                    assert!(d < TOL, "{name} {key} (fused {fused}): max |lora-rs − transformers| = {d:e}");
                    worst = worst.max(d);
                }
            }
        }
        eprintln!("{name}: max |lora-rs − transformers| logit = {worst:.1e}");
        assert_eq!(plain.config().family.spec().model_type, name);
    }
}

#[test]
fn the_adapter_switched_off_gives_the_base_bit_for_bit() {
    for name in FAMILIES {
        let f = fixture(name);
        let mut m = with_adapter(name);
        let on = logits(&m, &f.ids);
        m.lora_mut().set_active(&[]).unwrap();
        assert_eq!(logits(&m, &f.ids), logits(&base(name), &f.ids), "{name}");
        assert!(max_diff(&on, &f.logits["base_logits"]) > 0.1, "{name}: the adapter changes the logits");
    }
}

/// Step-by-step logits with the KV cache for `rows` left-padded by `pad` (prompt of `prompt` tokens, then
/// one token per step), each real position's logits.
fn cached(model: &Llama, rows: &[Vec<u32>], pad: &[usize], prompt: usize) -> Vec<Vec<Vec<f32>>> {
    let v = model.config().vocab_size;
    let len = rows[0].len();
    let total = len + pad.iter().max().unwrap();
    // Row r: pad[r] padding tokens (id 0), then its tokens, then filler so every row has `total` slots.
    let padded: Vec<Vec<u32>> = rows
        .iter()
        .zip(pad)
        .map(|(r, &p)| std::iter::repeat_n(0, p).chain(r.iter().copied()).chain(std::iter::repeat(0)).take(total).collect())
        .collect();
    let mut cache = KvCache::new(model.config(), pad.to_vec());
    let mut out = vec![Vec::new(); rows.len()];
    let mut at = 0;
    while at < total {
        let n = if at == 0 { prompt + pad.iter().max().unwrap() } else { 1 };
        let step: Vec<Vec<u32>> = padded.iter().map(|r| r[at..at + n].to_vec()).collect();
        let l = model.forward(&tensor(&step), Some(&mut cache), false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (r, o) in out.iter_mut().enumerate() {
            for s in 0..n {
                let slot = at + s;
                if slot >= pad[r] && slot < pad[r] + len {
                    o.push(l[(r * n + s) * v..(r * n + s + 1) * v].to_vec());
                }
            }
        }
        at += n;
    }
    out
}

#[test]
fn cached_and_left_padded_generation_equals_the_full_forward_for_every_family() {
    for name in FAMILIES {
        let f = fixture(name);
        let mut m = with_adapter(name);
        // Dynamic NTK and LongRoPE change the frequencies with the length in use (transformers' too): past
        // max_position_embeddings (dynamic) or the original context (longrope) a cached token is roped with the
        // table of its own step, so the comparison with one full forward holds up to there only.
        let len = match m.config().rope_scaling {
            RopeScaling::Dynamic { .. } => m.config().max_position_embeddings,
            RopeScaling::LongRope { original_max_position_embeddings, .. } => original_max_position_embeddings,
            _ => f.ids[0].len(),
        };
        assert!(len > m.config().sliding_window.unwrap_or(0), "{name}: rows longer than the window");
        let rows: Vec<Vec<u32>> = f.ids.iter().map(|r| r[..len].to_vec()).collect();
        let v = m.config().vocab_size;
        for fused in [true, false] {
            m.set_fused(fused);
            let full = logits(&m, &rows);
            let steps = cached(&m, &rows, &[0, 3], 4);
            for (r, row) in steps.iter().enumerate() {
                assert_eq!(row.len(), len);
                for (s, got) in row.iter().enumerate() {
                    let want = &full[(r * len + s) * v..(r * len + s + 1) * v];
                    // The same sums over fewer or more (masked) keys in other blocks: f32 rounding only.
                    let d = max_diff(got, want);
                    assert!(d < TOL, "{name} (fused {fused}) row {r} position {s}: cached/padded vs full {d:e}");
                }
            }
        }
    }
}

#[test]
fn mixed_adapter_batches_serve_every_family_as_each_sequence_alone() {
    for name in FAMILIES {
        let f = fixture(name);
        let m = with_adapter(name);
        let files = lora::read_adapter(&root().join(name).join("adapter")).unwrap();
        let packed = m.pack_adapter(&files).unwrap();
        let mut alone = base(name);
        let v = m.config().vocab_size;
        let (a, b) = (&f.ids[0][..11], &f.short[0][..]);
        let mut ca = m.sequence_cache();
        let mut cb = m.sequence_cache();
        // Sequence a with the adapter (prompt, then two single tokens), b without, in one batch each step.
        let mut seqs =
            [Sequence { tokens: &a[..9], cache: &mut ca, adapter: Some(&packed) }, Sequence { tokens: b, cache: &mut cb, adapter: None }];
        let first = m.forward_mixed(&mut seqs).unwrap();
        let mut last_a = Vec::new();
        for t in 9..11 {
            let mut seqs = [Sequence { tokens: &a[t..t + 1], cache: &mut ca, adapter: Some(&packed) }];
            last_a = m.forward_mixed(&mut seqs).unwrap();
        }
        let full_a = logits(&with_adapter(name), &[a.to_vec()]);
        let full_b = logits(&alone, &[b.to_vec()]);
        let pick = |l: &[f32], t: usize| l[t * v..(t + 1) * v].to_vec();
        assert!(max_diff(&first[..v], &pick(&full_a, 8)) < TOL, "{name}: a's prompt");
        assert!(max_diff(&first[v..], &pick(&full_b, b.len() - 1)) < TOL, "{name}: b");
        assert!(max_diff(&last_a, &pick(&full_a, 10)) < TOL, "{name}: a after two steps");
        alone.set_fused(false);
        assert!(max_diff(&first[v..], &pick(&logits(&alone, &[b.to_vec()]), b.len() - 1)) < TOL, "{name}: b vs reference");
    }
}

#[test]
fn a_written_model_and_adapter_read_back_to_the_same_config_and_logits() {
    for name in FAMILIES {
        let f = fixture(name);
        let m = with_adapter(name);
        let d = tempfile::tempdir().unwrap();
        save_model(&m, &d.path().join("model"), &Default::default()).unwrap();
        save_adapter(&m, "peft", &d.path().join("adapter"), None, Default::default(), false).unwrap();
        let (mut back, _) = load_model(&d.path().join("model")).unwrap();
        assert_eq!(back.config(), m.config(), "{name}: config.json round trip");
        assert_eq!(back.fingerprint().unwrap(), m.fingerprint().unwrap(), "{name}");
        load_adapter(&mut back, "peft", &d.path().join("adapter"), false).unwrap();
        back.lora_mut().set_active(&["peft"]).unwrap();
        assert_eq!(logits(&back, &f.ids), logits(&m, &f.ids), "{name}: the same weights give the same bits");
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("model/config.json")).unwrap()).unwrap();
        assert_eq!(cfg["model_type"], name);
        if name == "gemma2" {
            // transformers' Gemma2Config refuses a float here (found by scripts/family_roundtrip.py).
            assert!(cfg["query_pre_attn_scalar"].is_u64(), "{}", cfg["query_pre_attn_scalar"]);
        }
        let adapter: Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("adapter/adapter_config.json")).unwrap()).unwrap();
        let mut targets: Vec<String> =
            adapter["target_modules"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
        targets.sort();
        let mut want: Vec<String> = m.config().projections().iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(targets, want, "{name}: PEFT targets the family's own projections");
    }
}

#[test]
fn fused_and_reference_losses_and_gradients_agree_and_lora_training_learns_for_every_family() {
    for name in FAMILIES {
        let f = fixture(name);
        let mut m = base(name);
        let cfg = lora::LoraConfig {
            target_modules: lora::Targets::Names(m.config().projections().iter().map(|s| s.to_string()).collect()),
            init: lora::Init::Random, // B ≠ 0: every path of the adapter has a gradient
            ..lora::LoraConfig::new(2, 4.0)
        };
        m.lora_mut().add_adapter("a", &cfg, &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1)).unwrap();
        m.lora_mut().set_active(&["a"]).unwrap();
        m.freeze_base();
        let ids: Vec<u32> = f.ids.concat();
        let mut run = |fused: bool| {
            m.set_fused(fused);
            let loss = lora_lm::train::batch_loss(&m, &ids, 2, 16, true).unwrap();
            let g = loss.backward().unwrap();
            let grads: Vec<(String, Vec<f32>)> = m
                .trainable_vars()
                .into_iter()
                .map(|(n, v)| {
                    (
                        n.clone(),
                        g.get(v.as_tensor())
                            .unwrap_or_else(|| panic!("{name}: {n} has no gradient"))
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap(),
                    )
                })
                .collect();
            (loss.to_scalar::<f32>().unwrap(), grads)
        };
        let (lf, gf) = run(true);
        let (lr, gr) = run(false);
        assert!((lf - lr).abs() < 1e-5 * lr.abs(), "{name}: loss {lf} vs {lr}");
        for ((n, a), (_, b)) in gf.iter().zip(&gr) {
            let scale = b.iter().fold(0f32, |x, y| x.max(y.abs()));
            assert!(scale > 0.0, "{name}: {n} has an all-zero gradient");
            // Gradients through two layers, sums in other orders: 1e-4 of each tensor's largest entry (as the
            // Llama comparison in fused/).
            let d = max_diff(a, b);
            assert!(d <= 1e-4 * (1.0 + scale as f64), "{name}: gradient of {n} differs by {d:e} (max {scale})");
        }
        // A few plain gradient steps on the adapter alone (the trainer's own loop is tested elsewhere): the
        // loss of the batch falls, so every family's backward points downhill.
        m.set_fused(true);
        let loss_of = |m: &Llama| lora_lm::train::batch_loss(m, &ids, 2, 16, true).unwrap();
        let first = loss_of(&m).to_scalar::<f32>().unwrap();
        for _ in 0..15 {
            let g = loss_of(&m).backward().unwrap();
            for (_, v) in m.trainable_vars() {
                let step = (g.get(v.as_tensor()).unwrap() * 0.05).unwrap();
                v.set(&(v.as_tensor() - step).unwrap()).unwrap();
            }
        }
        let last = loss_of(&m).to_scalar::<f32>().unwrap();
        assert!(last < 0.85 * first, "{name}: LoRA training {first} → {last}");
    }
}

#[test]
fn every_rope_scaling_gives_transformers_inverse_frequencies_and_attention_factor() {
    let e: Value = serde_json::from_str(&std::fs::read_to_string(root().join("rope.json")).unwrap()).unwrap();
    let cases = e["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    let mut kinds = std::collections::BTreeSet::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut cfg = case["config"].clone();
        // The config as transformers holds it (every attribute), minus what only affects other checks.
        let o = cfg.as_object_mut().unwrap();
        let keep = [
            "model_type",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "intermediate_size",
            "num_hidden_layers",
            "max_position_embeddings",
            "original_max_position_embeddings",
            "rope_parameters",
        ];
        o.retain(|k, _| keep.contains(&k.as_str()));
        let c = lora_lm::ModelConfig::from_json(Path::new(name), &cfg.to_string()).unwrap_or_else(|err| panic!("{name}: {err}"));
        kinds.insert(c.rope_scaling.name());
        let n = case["seq_len"].as_u64().map_or(1, |n| n as usize);
        let (inv, af) = c.rope_scaling.frequencies(c.rope_theta, c.rotary_dim(), c.max_position_embeddings, n);
        let want: Vec<f64> = case["inv_freq"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(inv.len(), want.len(), "{name}");
        for (i, (g, w)) in inv.iter().zip(&want).enumerate() {
            // The same f32 operations in the same order; pow may differ by an ulp between libms: 1e-6 relative.
            assert!((*g as f64 - w).abs() <= 1e-6 * w.abs(), "{name}: inv_freq[{i}] {g} vs transformers {w}");
        }
        let waf = case["attention_factor"].as_f64().unwrap();
        assert!((af - waf).abs() <= 1e-12 * waf.abs(), "{name}: attention factor {af} vs {waf}");
    }
    assert_eq!(kinds.into_iter().collect::<Vec<_>>(), ["default", "dynamic", "linear", "llama3", "longrope", "yarn"]);
}

#[test]
fn byte_level_and_byte_fallback_tokenizers_encode_and_decode_as_transformers_does() {
    for kind in ["bytelevel-bpe", "sentencepiece-bpe"] {
        let dir = root().join("tokenizers").join(kind);
        let e: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let mut config = lora_lm::ModelConfig { tokenizer: lora_lm::TokenizerKind::File, ..lora_lm::ModelConfig::byte_default() };
        config.vocab_size = e["vocab_size"].as_u64().unwrap() as usize;
        let tok = lora_lm::Tokenizer::from_file(&dir.join("tokenizer.json"), &config).unwrap();
        let texts = e["texts"].as_array().unwrap();
        assert!(texts.iter().any(|t| t["text"].as_str().unwrap().contains("<|user|>")), "special tokens are exercised");
        for t in texts {
            let text = t["text"].as_str().unwrap();
            let want: Vec<u32> = t["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let ids = tok.encode(text).unwrap();
            assert_eq!(ids, want, "{kind}: {text:?}");
            assert_eq!(tok.decode(&ids).unwrap(), t["decoded"].as_str().unwrap(), "{kind}: decode {text:?}");
        }
    }
}

#[test]
fn the_families_table_lists_every_family_the_config_reader_knows() {
    assert_eq!(lora_lm::FAMILIES.map(|f: Family| f.spec().model_type), FAMILIES);
}
