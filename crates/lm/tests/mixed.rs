//! Serving batches: sequences of different lengths with different adapters in one batch get what each
//! gets alone through the ordinary forward.

use candle_core::{Device, Tensor};
use lora::LoraConfig;
use lora_lm::hf::save_adapter;
use lora_lm::mixed::Sequence;
use lora_lm::{Llama, LlamaConfig, PROJECTIONS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn tiny() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 24,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 6,
        max_position_embeddings: 32,
        rope_theta: 100.0,
        initializer_range: 0.3,
        ..LlamaConfig::byte_default()
    }
}

/// Adds adapter `name` with a non-zero B on every projection and lm_head, rank `r`.
fn add(m: &mut Llama, name: &str, r: usize, seed: u64) {
    let mut targets: Vec<String> = PROJECTIONS.iter().map(|s| s.to_string()).collect();
    targets.push("lm_head".into());
    let c = LoraConfig { target_modules: targets, init: lora::Init::PeftGaussian, ..LoraConfig::new(r, 2.0 * r as f64 + 1.0) };
    m.lora_mut().add_adapter(name, &c, &mut StdRng::seed_from_u64(seed)).unwrap();
    let mut g = StdRng::seed_from_u64(seed + 100);
    for (_, l) in m.lora().layers() {
        let b = l.adapter(name).unwrap().b();
        let v: Vec<f32> = (0..b.elem_count()).map(|_| g.random::<f32>() * 0.2 - 0.1).collect();
        b.set(&Tensor::from_vec(v, b.shape(), &Device::Cpu).unwrap()).unwrap();
    }
}

fn ids(seed: u64, n: usize) -> Vec<u32> {
    let mut g = StdRng::seed_from_u64(seed);
    (0..n).map(|_| g.random_range(0..256u32)).collect()
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

#[test]
fn a_mixed_batch_gives_every_sequence_its_own_adapters_logits_step_after_step() {
    let mut m = Llama::random(&tiny(), 7).unwrap();
    add(&mut m, "sql", 3, 1);
    add(&mut m, "js", 5, 2);
    // Pack each adapter from its PEFT files, as the server does.
    let dir = tempfile::tempdir().unwrap();
    let mut packed = Vec::new();
    for name in ["sql", "js"] {
        let d = dir.path().join(name);
        save_adapter(&m, name, &d, None, Default::default()).unwrap();
        packed.push(m.pack_adapter(&lora::read_adapter(&d).unwrap()).unwrap());
    }
    let which = [Some(0usize), None, Some(1), Some(0)];
    let mut seqs: Vec<Vec<u32>> = vec![ids(10, 5), ids(11, 1), ids(12, 9), ids(13, 3)];
    let mut caches: Vec<_> = seqs.iter().map(|_| m.sequence_cache()).collect();
    let mut fresh: Vec<Vec<u32>> = seqs.clone(); // what each sequence feeds this step
    for step in 0..4 {
        let logits = {
            let mut batch: Vec<Sequence<'_>> = fresh
                .iter()
                .zip(caches.iter_mut())
                .zip(which)
                .map(|((t, cache), w)| Sequence { tokens: t, cache, adapter: w.map(|i| &packed[i]) })
                .collect();
            m.forward_mixed(&mut batch).unwrap()
        };
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

#[test]
fn a_sequence_past_the_context_or_outside_the_vocabulary_is_refused_by_name() {
    let m = Llama::random(&tiny(), 7).unwrap();
    let mut cache = m.sequence_cache();
    let long = ids(1, 33);
    let e = m.forward_mixed(&mut [Sequence { tokens: &long, cache: &mut cache, adapter: None }]).unwrap_err().to_string();
    assert!(e.contains("sequence 0") && e.contains("33 new tokens"), "{e}");
    let e = m.forward_mixed(&mut [Sequence { tokens: &[5000], cache: &mut cache, adapter: None }]).unwrap_err().to_string();
    assert!(e.contains("token 5000"), "{e}");
}
