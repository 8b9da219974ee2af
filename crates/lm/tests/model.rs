//! The decoder's own invariants: the KV cache changes nothing, every trainable tensor gets its gradient,
//! LoRA gradients agree with finite differences, files round-trip, half-precision weights load, a short
//! fine-tune lowers its corpus' loss, and a serving batch of sequences with different adapters gives each
//! what it gets alone.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use lora::LoraConfig;
use lora_lm::generate::{generate, Sampling};
use lora_lm::hf::{load_model, save_adapter, save_model, save_model_as, WeightDtype, META_FINGERPRINT};
use lora_lm::mixed::Sequence;
use lora_lm::train::{batch_loss, Mixture, TrainSettings, Trainer};
use lora_lm::{Llama, LlamaConfig, PROJECTIONS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A tiny config with grouped KV heads (4 query heads over 2 KV heads), odd-ish sizes.
fn tiny(tied: bool) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 24,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 6,
        max_position_embeddings: 32,
        rope_theta: 100.0,
        tie_word_embeddings: tied,
        initializer_range: 0.3,
        ..LlamaConfig::byte_default()
    }
}

fn ids(seed: u64, n: usize) -> Vec<u32> {
    let mut g = StdRng::seed_from_u64(seed);
    (0..n).map(|_| g.random_range(0..256u32)).collect()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// An active adapter with non-zero B on every projection and lm_head (a fresh one has B = 0), rank 3.
fn with_adapter(m: &mut Llama, name: &str, seed: u64) {
    add_adapter(m, name, 3, seed);
    m.lora_mut().set_active(&[name]).unwrap();
}

#[test]
fn generation_with_the_kv_cache_gives_the_logits_of_a_full_forward() {
    let mut m = Llama::random(&tiny(false), 1).unwrap();
    with_adapter(&mut m, "a", 2);
    // Two prompts of different lengths: the shorter one is left-padded inside the batch.
    let prompts = vec![ids(3, 5), ids(4, 3)];
    let out = generate(&m, &prompts, 6, &Sampling::greedy(), &[], |_, _| Ok(true)).unwrap();
    for (p, g) in prompts.iter().zip(&out) {
        assert_eq!(g.tokens.len(), 6);
        // Greedy continuation must be the argmax of a full forward over prompt + generated so far.
        let mut seq = p.clone();
        for &tok in &g.tokens {
            let t = Tensor::from_vec(seq.clone(), (1, seq.len()), &Device::Cpu).unwrap();
            let logits = m.forward(&t, None, false).unwrap();
            let last = flat(&logits.get(0).unwrap().get(seq.len() - 1).unwrap());
            let best = last.iter().enumerate().fold(0, |b, (i, &x)| if x > last[b] { i } else { b });
            assert_eq!(best as u32, tok, "cached generation chose another token than the full forward");
            seq.push(tok);
        }
    }
    // And the cached logits themselves: the last position of a cached step equals the full forward's.
    let seq = ids(5, 9);
    let mut cache = lora_lm::KvCache::new(m.config(), vec![0]);
    let a = m.forward(&Tensor::from_vec(seq[..6].to_vec(), (1, 6), &Device::Cpu).unwrap(), Some(&mut cache), false).unwrap();
    let b = m.forward(&Tensor::from_vec(seq[6..].to_vec(), (1, 3), &Device::Cpu).unwrap(), Some(&mut cache), false).unwrap();
    let full = m.forward(&Tensor::from_vec(seq.clone(), (1, 9), &Device::Cpu).unwrap(), None, false).unwrap();
    let cached = Tensor::cat(&[&a, &b], 1).unwrap();
    // Same sums in the same order except the attention's row lengths: f32 rounding only (≲ 1e-6 here).
    for (x, y) in flat(&cached).iter().zip(flat(&full)) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
}

fn grads_of(m: &Llama, x: &[u32]) -> BTreeMap<String, Vec<f32>> {
    let loss = batch_loss(m, x, 2, 8, true).unwrap();
    let g = loss.backward().unwrap();
    m.trainable_vars().into_iter().map(|(n, v)| (n, g.get(v.as_tensor()).map(flat).unwrap_or_default())).collect()
}

#[test]
fn every_trainable_tensor_gets_a_gradient_in_pre_training_and_in_lora_training() {
    for tied in [false, true] {
        let mut m = Llama::random(&tiny(tied), 7).unwrap();
        let x = ids(8, 16);
        let g = grads_of(&m, &x);
        let want = 1 + 2 * 2 + 1 + 7 * 2 + usize::from(!tied); // embed, norms, final norm, projections, lm_head
        assert_eq!(g.len(), want, "tied = {tied}: {:?}", g.keys().collect::<Vec<_>>());
        for (n, v) in &g {
            assert!(!v.is_empty() && v.iter().any(|x| *x != 0.0), "tied = {tied}: no gradient reached {n}");
        }
        with_adapter(&mut m, "a", 9);
        m.freeze_base();
        let g = grads_of(&m, &x);
        assert_eq!(g.len(), 2 * (7 * 2 + 1), "A and B of 15 layers");
        for (n, v) in &g {
            assert!(n.contains(".lora_"), "{n} trains while the base is frozen");
            assert!(v.iter().any(|x| *x != 0.0), "tied = {tied}: no gradient reached {n}");
        }
    }
}

#[test]
fn lora_gradients_agree_with_finite_differences() {
    let mut m = Llama::random(&tiny(false), 11).unwrap();
    with_adapter(&mut m, "a", 12);
    m.freeze_base();
    let x = ids(13, 16);
    let g = grads_of(&m, &x);
    let loss = |m: &Llama| batch_loss(m, &x, 2, 8, false).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let mut checked = 0;
    for (name, var) in m.trainable_vars() {
        if !(name.contains("layers.1.self_attn.q_proj") || name.contains("layers.0.mlp.down_proj") || name.starts_with("lm_head")) {
            continue;
        }
        let base = flat(var.as_tensor());
        for i in [0, base.len() / 2, base.len() - 1] {
            // Central differences in f32: h = 1e-2 balances truncation (∝ h²) against rounding of a loss
            // of size ~5 (∝ 6e-8·5/h); the estimate is then good to ~1e-3 of the gradient's scale.
            let h = 1e-2f32;
            let mut p = base.clone();
            p[i] += h;
            var.set(&Tensor::from_vec(p.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
            let up = loss(&m);
            p[i] -= 2.0 * h;
            var.set(&Tensor::from_vec(p, var.shape(), &Device::Cpu).unwrap()).unwrap();
            let down = loss(&m);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
            let fd = (up - down) / (2.0 * h as f64);
            let an = g[&name][i] as f64;
            let scale = g[&name].iter().fold(0f32, |a, b| a.max(b.abs())) as f64;
            assert!((fd - an).abs() <= 2e-3 * scale.max(1e-3) + 1e-4, "{name}[{i}]: analytic {an} vs finite difference {fd}");
            checked += 1;
        }
    }
    assert_eq!(checked, 18, "A and B of three layers, three entries each");
}

#[test]
fn a_saved_model_loads_bit_for_bit_and_half_precision_weights_load() {
    let d = tempfile::tempdir().unwrap();
    let m = Llama::random(&tiny(true), 21).unwrap();
    save_model(&m, d.path(), &BTreeMap::new()).unwrap();
    let (back, files) = load_model(d.path()).unwrap();
    assert_eq!(files.dtypes.get("F32"), Some(&m.base_state().unwrap().len()));
    assert_eq!(m.fingerprint().unwrap(), back.fingerprint().unwrap());
    // The same weights stored as F16 and BF16 load as the exactly converted values.
    for dt in [DType::F16, DType::BF16] {
        let dir = d.path().join(format!("{dt:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(d.path().join("config.json"), dir.join("config.json")).unwrap();
        let state: Vec<(String, Tensor)> = m.base_state().unwrap().into_iter().map(|(n, t)| (n, t.to_dtype(dt).unwrap())).collect();
        candle_core::safetensors::save(&state.iter().cloned().collect::<std::collections::HashMap<_, _>>(), dir.join("model.safetensors"))
            .unwrap();
        let (h, files) = load_model(&dir).unwrap();
        assert_eq!(files.dtypes.keys().collect::<Vec<_>>(), vec![&format!("{dt:?}")]);
        for ((n, a), (_, b)) in h.base_state().unwrap().iter().zip(&state) {
            assert_eq!(flat(a), flat(&b.to_dtype(DType::F32).unwrap()), "{n}");
        }
    }
}

#[test]
fn a_short_fine_tune_lowers_the_loss_on_its_corpus_and_leaves_the_base_alone() {
    let mut m = Llama::random(&tiny(false), 31).unwrap();
    // A corpus the random base knows nothing about: a repeated SQL-like line.
    let text = "SELECT id, name FROM users WHERE id = 42;\n".repeat(40);
    let stream = {
        let c = lora_lm::data::Corpus { path: "sql.txt".into(), train: vec![text.clone()], validation: vec![text] };
        lora_lm::data::TokenStream::from_corpus(&c, &lora_lm::Tokenizer::bytes()).unwrap()
    };
    let mut mix = Mixture::new();
    mix.add("sql", stream, 1.0).unwrap();
    let probe = mix.batch(99, 0, 4, 16).unwrap();
    let before_loss = batch_loss(&m, &probe, 4, 16, false).unwrap().to_scalar::<f32>().unwrap();
    let before = m.fingerprint().unwrap();
    let c = LoraConfig {
        target_modules: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
        init: lora::Init::PeftGaussian,
        ..LoraConfig::new(4, 8.0)
    };
    m.lora_mut().add_adapter("sql", &c, &mut StdRng::seed_from_u64(1)).unwrap();
    m.lora_mut().set_active(&["sql"]).unwrap();
    m.freeze_base();
    let s = TrainSettings {
        steps: 40,
        batch_size: 4,
        seq_len: 16,
        lr: 1e-2,
        min_lr_ratio: 0.1,
        warmup: 4,
        weight_decay: 0.0,
        clip: Some(1.0),
        seed: 0,
        loraplus_lr_ratio: None,
    };
    let mut t = Trainer::new(&m, s).unwrap();
    t.run(&m, &mix, 40, |_, _| Ok(true)).unwrap();
    let after_loss = batch_loss(&m, &probe, 4, 16, false).unwrap().to_scalar::<f32>().unwrap();
    assert!(after_loss < 0.7 * before_loss, "loss {before_loss} → {after_loss}");
    assert_eq!(m.fingerprint().unwrap(), before, "the frozen base changed");
    m.lora_mut().set_active(&[]).unwrap();
    let off = batch_loss(&m, &probe, 4, 16, false).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(off.to_bits(), before_loss.to_bits(), "adapter off must give the base's loss bit for bit");
}

#[test]
fn a_resumed_run_continues_exactly_where_it_stopped() {
    let cfg = tiny(false);
    let text = "function add(a, b) { return a + b; }\n".repeat(30);
    let c = lora_lm::data::Corpus { path: "js.txt".into(), train: vec![text.clone()], validation: vec![text] };
    let mut mix = Mixture::new();
    mix.add("js", lora_lm::data::TokenStream::from_corpus(&c, &lora_lm::Tokenizer::bytes()).unwrap(), 1.0).unwrap();
    let s = TrainSettings {
        steps: 6,
        batch_size: 2,
        seq_len: 12,
        lr: 5e-3,
        min_lr_ratio: 0.1,
        warmup: 2,
        weight_decay: 0.1,
        clip: Some(1.0),
        seed: 3,
        loraplus_lr_ratio: None,
    };
    let straight = Llama::random(&cfg, 41).unwrap();
    let mut t = Trainer::new(&straight, s.clone()).unwrap();
    t.run(&straight, &mix, 6, |_, _| Ok(true)).unwrap();
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("ck.safetensors");
    let first = Llama::random(&cfg, 41).unwrap();
    let mut t1 = Trainer::new(&first, s.clone()).unwrap();
    t1.run(&first, &mix, 3, |_, _| Ok(true)).unwrap();
    t1.save_checkpoint(&ck).unwrap();
    let second = Llama::random(&cfg, 41).unwrap();
    let mut t2 = Trainer::resume(&second, s.clone(), &ck).unwrap();
    assert_eq!(t2.step(), 3);
    t2.run(&second, &mix, 6, |_, _| Ok(true)).unwrap();
    assert_eq!(second.fingerprint().unwrap(), straight.fingerprint().unwrap(), "resumed weights differ from an uninterrupted run");
    let losses = |t: &Trainer| t.losses.iter().map(|l| l.1.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(&t2), losses(&t));
    // A checkpoint of another shape is refused before any tensor is written.
    let wider = Llama::random(&LlamaConfig { intermediate_size: 48, ..cfg.clone() }, 41).unwrap();
    let fp = wider.fingerprint().unwrap();
    let e = Trainer::resume(&wider, s.clone(), &ck).unwrap_err().to_string();
    assert!(e.contains("shape"), "{e}");
    assert_eq!(wider.fingerprint().unwrap(), fp, "a refused checkpoint changed the model");
    let other = TrainSettings { lr: 1e-3, ..s };
    let e = Trainer::resume(&Llama::random(&cfg, 41).unwrap(), other, &ck).unwrap_err().to_string();
    assert!(e.contains("saved with lr = 0.005") && e.contains("this run has lr = 0.001"), "{e}");
}

#[test]
fn a_prompt_longer_than_the_context_is_refused_by_name() {
    let m = Llama::random(&tiny(false), 51).unwrap();
    let e = generate(&m, &[ids(1, 33)], 4, &Sampling::greedy(), &[], |_, _| Ok(true)).unwrap_err().to_string();
    assert!(e.contains("prompt 1") && e.contains("33 tokens") && e.contains("context (32 tokens)"), "{e}");
    // A prompt that fills the context stops at once without an error.
    let out = generate(&m, &[ids(1, 32)], 4, &Sampling::greedy(), &[], |_, _| Ok(true)).unwrap();
    assert_eq!(out[0].finish, lora_lm::generate::Finish::Context);
}

#[test]
fn base_state_is_a_snapshot_that_later_merges_do_not_change() {
    let mut m = Llama::random(&tiny(false), 61).unwrap();
    with_adapter(&mut m, "a", 62);
    let before = m.base_state().unwrap();
    let x = Tensor::from_vec(ids(63, 8), (1, 8), &Device::Cpu).unwrap();
    let unmerged = flat(&m.forward(&x, None, false).unwrap());
    m.lora_mut().merge("a", true).unwrap();
    let after = m.base_state().unwrap();
    let changed = before.iter().zip(&after).filter(|((_, a), (_, b))| flat(a) != flat(b)).count();
    assert_eq!(changed, 15, "7 projections × 2 layers and lm_head change; the snapshot taken before must not");
    // Merged forward = unmerged forward up to the rounding of W + s·B·A (values ≲ 10, f32: ≲ 1e-5).
    for (a, b) in flat(&m.forward(&x, None, false).unwrap()).iter().zip(&unmerged) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

/// Adds (does not activate) adapter `name` with a non-zero B on every projection and lm_head, rank `r`.
fn add_adapter(m: &mut Llama, name: &str, r: usize, seed: u64) {
    let mut targets: Vec<String> = PROJECTIONS.iter().map(|s| s.to_string()).collect();
    targets.push("lm_head".into());
    let c = LoraConfig { target_modules: targets.into(), init: lora::Init::PeftGaussian, ..LoraConfig::new(r, 2.0 * r as f64 + 1.0) };
    m.lora_mut().add_adapter(name, &c, &mut StdRng::seed_from_u64(seed)).unwrap();
    let mut g = StdRng::seed_from_u64(seed + 100);
    for (_, l) in m.lora().layers().filter(|(_, l)| l.has_adapter(name)) {
        let b = l.adapter(name).unwrap().b();
        let v: Vec<f32> = (0..b.elem_count()).map(|_| g.random::<f32>() * 0.2 - 0.1).collect();
        b.set(&Tensor::from_vec(v, b.shape(), &Device::Cpu).unwrap()).unwrap();
    }
}

/// The ordinary forward's logits after `seq` with `adapter` active (or none).
fn alone(m: &mut Llama, adapter: Option<&str>, seq: &[u32]) -> Vec<f32> {
    m.lora_mut().set_active(&adapter.into_iter().collect::<Vec<_>>()).unwrap();
    let t = Tensor::from_vec(seq.to_vec(), (1, seq.len()), &Device::Cpu).unwrap();
    let logits = m.forward(&t, None, false).unwrap();
    logits.get(0).unwrap().get(seq.len() - 1).unwrap().to_vec1::<f32>().unwrap()
}

fn argmax(x: &[f32]) -> u32 {
    x.iter().enumerate().fold(0, |b, (i, &v)| if v > x[b] { i } else { b }) as u32
}

/// One step of a mixed batch: sequence s feeds `fresh[s]` with adapter `packed[which[s]]` (or none).
fn mixed_step(
    m: &Llama,
    fresh: &[Vec<u32>],
    caches: &mut [lora_lm::KvCache],
    which: &[Option<usize>],
    packed: &[lora::PackedAdapter],
) -> Vec<f32> {
    let mut batch: Vec<Sequence<'_>> = fresh
        .iter()
        .zip(caches.iter_mut())
        .zip(which)
        .map(|((t, cache), w)| Sequence { tokens: t, cache, adapter: w.map(|i| &packed[i]) })
        .collect();
    m.forward_mixed(&mut batch).unwrap()
}

#[test]
fn a_mixed_batch_gives_every_sequence_its_own_adapters_logits_step_after_step() {
    let mut m = Llama::random(&tiny(false), 7).unwrap();
    add_adapter(&mut m, "sql", 3, 1);
    add_adapter(&mut m, "js", 5, 2);
    // Pack each adapter from its PEFT files, as the server does.
    let dir = tempfile::tempdir().unwrap();
    let mut packed = Vec::new();
    for name in ["sql", "js"] {
        let d = dir.path().join(name);
        save_adapter(&m, name, &d, None, Default::default(), false).unwrap();
        packed.push(m.pack_adapter(&lora::read_adapter(&d).unwrap()).unwrap());
    }
    let which = [Some(0usize), None, Some(1), Some(0)];
    let mut seqs: Vec<Vec<u32>> = vec![ids(10, 5), ids(11, 1), ids(12, 9), ids(13, 3)];
    let mut caches: Vec<_> = seqs.iter().map(|_| m.sequence_cache()).collect();
    let mut fresh: Vec<Vec<u32>> = seqs.clone(); // what each sequence feeds this step
    for step in 0..4 {
        let logits = mixed_step(&m, &fresh, &mut caches, &which, &packed);
        let vocab = m.config().vocab_size;
        for (s, w) in which.iter().enumerate() {
            let got = &logits[s * vocab..(s + 1) * vocab];
            let want = alone(&mut m, w.map(|i| ["sql", "js"][i]), &seqs[s]);
            // Same kernels, other batch sizes: the base products sum in another order, f32 rounding of
            // sums of ≤ 40 terms of size ≲ 3 (≈ 1e-5); 1e-4 is far below any adapter's effect (≈ 0.1).
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "step {step}, sequence {s}: logits differ by {worst}");
            assert_eq!(argmax(got), argmax(&want), "step {step}, sequence {s}: another greedy token");
            let next = argmax(got);
            seqs[s].push(next);
            fresh[s] = vec![next];
        }
    }
    // The adapters matter: the same prompt under the two adapters gives different logits.
    let base = alone(&mut m, None, &seqs[0]);
    assert!(alone(&mut m, Some("sql"), &seqs[0]).iter().zip(&base).any(|(a, b)| (a - b).abs() > 1e-3));
}

/// f32 → bf16 rounded to nearest, ties to even (finite values), written out independently of candle's.
fn bf16_nearest(x: f32) -> f32 {
    let b = x.to_bits();
    f32::from_bits(b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000)
}

#[test]
fn a_model_saved_in_bf16_reads_back_rounded_held_in_bf16_and_computes_what_its_f32_widening_does() {
    for tied in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let m = Llama::random(&tiny(tied), 23).unwrap();
        save_model_as(&m, d.path(), &BTreeMap::new(), WeightDtype::Bf16).unwrap();
        let (mut back, files) = load_model(d.path()).unwrap();
        let n = m.base_state().unwrap().len();
        assert_eq!(files.dtypes.get("BF16"), Some(&n), "{:?}", files.dtypes);
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(config["torch_dtype"], "bfloat16");
        let meta = lora::io::TensorFile::load(&d.path().join("model.safetensors"), &Device::Cpu).unwrap().metadata;
        assert_eq!(meta[META_FINGERPRINT], back.fingerprint().unwrap(), "the fingerprint is that of the weights as written");
        for ((name, a), (_, b)) in m.base_state().unwrap().iter().zip(back.base_state().unwrap().iter()) {
            let want: Vec<f32> = flat(a).into_iter().map(bf16_nearest).collect();
            assert_eq!(flat(b), want, "{name}: each value rounded to the nearest bf16");
        }
        // The embedding, every projection and lm_head are held in bf16 (a tied lm_head shares the embedding's).
        let layers = 7 * back.config().num_hidden_layers + 2;
        assert_eq!(back.lora().layers().filter(|(_, l)| l.weight_bf16().is_some()).count(), layers);
        let (v, h) = (back.config().vocab_size, back.config().hidden_size);
        let matrices: usize = back.lora().layers().map(|(_, l)| l.weight_dims().iter().product::<usize>()).sum::<usize>();
        assert_eq!(back.base_bf16_bytes(), 2 * (matrices - if tied { v * h } else { 0 }), "tied: counted once");
        // Its f32 widening: the same values in f32 variables.
        let (mut wide, _) = load_model(d.path()).unwrap();
        wide.lora_mut().widen_base().unwrap();
        assert!(wide.lora().layers().all(|(_, l)| l.weight_bf16().is_none()));
        assert_eq!(wide.fingerprint().unwrap(), back.fingerprint().unwrap());
        for model in [&mut back, &mut wide] {
            with_adapter(model, "sql", 1);
            add_adapter(model, "js", 5, 2);
        }
        // Logits, the LoRA gradients of a training batch, greedy generation: the same bits.
        let x = ids(30, 16);
        let ids_t = Tensor::from_vec(x.clone(), (2, 8), &Device::Cpu).unwrap();
        assert_eq!(
            bits(&back.forward(&ids_t, None, false).unwrap()),
            bits(&wide.forward(&ids_t, None, false).unwrap()),
            "tied {tied}: logits"
        );
        assert_eq!(grads_of(&back, &x), grads_of(&wide, &x), "tied {tied}: gradients");
        let greedy = |m: &Llama| {
            let sampling = lora_lm::generate::Sampling::greedy();
            lora_lm::generate::generate(m, &[ids(31, 5), ids(32, 3)], 6, &sampling, &[], |_, _| Ok(true)).unwrap()
        };
        assert_eq!(format!("{:?}", greedy(&back)), format!("{:?}", greedy(&wide)), "tied {tied}: generation");
        // A mixed batch of two adapters and the base.
        let dir = tempfile::tempdir().unwrap();
        let mut runs = Vec::new();
        for model in [&back, &wide] {
            let mut packed = Vec::new();
            for name in ["sql", "js"] {
                let ad = dir.path().join(name);
                save_adapter(model, name, &ad, None, Default::default(), false).unwrap();
                packed.push(model.pack_adapter(&lora::read_adapter(&ad).unwrap()).unwrap());
            }
            let which = [Some(0usize), None, Some(1)];
            let prompts = [ids(40, 6), ids(41, 2), ids(42, 4)];
            let mut caches: Vec<_> = prompts.iter().map(|_| model.sequence_cache()).collect();
            let mut fresh: Vec<Vec<u32>> = prompts.to_vec();
            let mut all = Vec::new();
            for _ in 0..3 {
                let logits = mixed_step(model, &fresh, &mut caches, &which, &packed);
                let vocab = model.config().vocab_size;
                fresh = (0..which.len()).map(|s| vec![argmax(&logits[s * vocab..(s + 1) * vocab])]).collect();
                all.extend(logits);
            }
            runs.push(all);
        }
        assert!(runs[0].iter().zip(&runs[1]).all(|(a, b)| a.to_bits() == b.to_bits()), "tied {tied}: a mixed batch's logits");
        // The base can be trained again: widened once, a tied embedding still one variable.
        back.lora_mut().set_active(&[]).unwrap();
        back.unfreeze_base().unwrap();
        assert!(back.lora().layers().all(|(_, l)| l.weight_bf16().is_none()));
        let names: Vec<String> = back.trainable_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names.iter().filter(|n| n.contains("embed_tokens") || n.starts_with("lm_head")).count(),
            if tied { 1 } else { 2 },
            "{names:?}"
        );
    }
    // f32 weights as trained have full mantissas: none is held in bf16.
    let mut m = Llama::random(&tiny(false), 23).unwrap();
    m.freeze_base();
    assert_eq!(m.hold_base_in_bf16().unwrap(), 0);
}

fn bits(t: &Tensor) -> Vec<u32> {
    flat(t).into_iter().map(f32::to_bits).collect()
}

#[test]
fn a_sequence_past_the_context_or_outside_the_vocabulary_is_refused_by_name() {
    let m = Llama::random(&tiny(false), 7).unwrap();
    let mut cache = m.sequence_cache();
    let long = ids(1, 33);
    let e = m.forward_mixed(&mut [Sequence { tokens: &long, cache: &mut cache, adapter: None }]).unwrap_err().to_string();
    assert!(e.contains("sequence 0") && e.contains("33 new tokens"), "{e}");
    let e = m.forward_mixed(&mut [Sequence { tokens: &[5000], cache: &mut cache, adapter: None }]).unwrap_err().to_string();
    assert!(e.contains("token 5000"), "{e}");
}
