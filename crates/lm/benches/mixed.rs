//! One decode step of a serving batch (16 sequences, 32 cached tokens each) on the LM demo's shape
//! (hidden 256, MLP 768, 4 layers): no adapter, one adapter for every row, and 16 adapters mixed.
//! The mixed/one ratio is the serving issue's ≥ 0.8 goal at the level of the model. `MIXED_DISTINCT=N`
//! spreads the sixteen sequences of the mixed case over N adapters (sequence i gets adapter i mod N), to see
//! how the cost grows with the adapters a step must read.

use criterion::{criterion_group, criterion_main, Criterion};
use lora::LoraConfig;
use lora_lm::mixed::Sequence;
use lora_lm::{KvCache, Llama, LlamaConfig, PROJECTIONS};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// The allocator `lora` uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn setup() -> (Llama, Vec<lora::PackedAdapter>) {
    let c = LlamaConfig::byte_default();
    let mut m = Llama::random(&c, 1).unwrap();
    if bf16_base() {
        // The weights of a checkpoint stored in bf16: every value a bf16 number.
        for (_, l) in m.lora_mut().layers_mut() {
            let w = l.weight().unwrap();
            let v: Vec<f32> =
                w.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(|v| f32::from_bits(v.to_bits() & 0xFFFF_0000)).collect();
            l.restore_base(&candle_core::Tensor::from_vec(v, w.shape(), w.device()).unwrap(), None).unwrap();
        }
        m.freeze_base();
        m.hold_base_in_bf16().unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = LoraConfig {
        target_modules: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
        init: lora::Init::PeftGaussian,
        ..LoraConfig::new(8, 16.0)
    };
    let mut packed = Vec::new();
    for i in 0..16 {
        let name = format!("a{i}");
        m.lora_mut().add_adapter(&name, &config, &mut StdRng::seed_from_u64(i)).unwrap();
        let d = dir.path().join(&name);
        lora_lm::hf::save_adapter(&m, &name, &d, None, Default::default(), false).unwrap();
        packed.push(m.pack_adapter(&lora::read_adapter(&d).unwrap()).unwrap());
        m.lora_mut().remove_adapter(&name).unwrap();
    }
    (m, packed)
}

/// `MIXED_BASE=bf16`: the base's weights are bf16 numbers, held in bf16.
fn bf16_base() -> bool {
    std::env::var("MIXED_BASE").is_ok_and(|v| v == "bf16")
}

fn caches(m: &Llama, n: usize) -> Vec<KvCache> {
    (0..n)
        .map(|i| {
            let mut c = m.sequence_cache();
            let prompt: Vec<u32> = (0..32).map(|t| ((t * 7 + i) % 256) as u32).collect();
            m.forward_mixed(&mut [Sequence { tokens: &prompt, cache: &mut c, adapter: None }]).unwrap();
            c
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let (m, packed) = setup();
    let rows = 16;
    let distinct: usize = std::env::var("MIXED_DISTINCT").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    let tokens: Vec<[u32; 1]> = (0..rows).map(|i| [(i * 13 % 256) as u32]).collect();
    let mut g = c.benchmark_group("decode step, 16 sequences");
    for (label, pick) in [("base", None), ("one adapter", Some(false)), ("16 adapters", Some(true))] {
        let mut cs = caches(&m, rows);
        g.bench_function(label, |b| {
            b.iter(|| {
                // Each step decodes the 33rd token, then the caches forget it again: a steady decode step.
                let mut seqs: Vec<Sequence<'_>> = cs
                    .iter_mut()
                    .zip(&tokens)
                    .enumerate()
                    .map(|(i, (cache, t))| {
                        cache.truncate(32);
                        Sequence { tokens: t, cache, adapter: pick.map(|mixed: bool| &packed[if mixed { i % distinct } else { 0 }]) }
                    })
                    .collect();
                m.forward_mixed(&mut seqs).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
