//! End to end on the real MNIST files in `data/mnist`, with a small network and few steps so it runs in
//! seconds: pre-train, LoRA fine-tune on the worst digit, and check the seed's claims.

use std::path::Path;

use candle_core::Device;
use lora::{Bias, LoraConfig};
use lora_train::{evaluate, train, Dataset, ExpensiveNet, TrainConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn data_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist")
}

fn bits(v: &[(String, candle_core::Tensor)]) -> Vec<Vec<u32>> {
    v.iter().map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()).collect()
}

#[test]
fn lora_finetune_improves_the_chosen_digit_and_leaves_the_base_untouched() {
    let m = mnist::Mnist::load(&data_dir()).expect("data/mnist is shipped with the repository");
    let (mean, std) = mnist::mean_std(&m.train.images);
    assert!((mean - 0.1307).abs() < 5e-5 && (std - 0.3081).abs() < 5e-5, "{mean} {std}");
    let dev = Device::Cpu;
    let train_set = Dataset::new(mnist::normalize(&m.train.images, mean, std), &m.train.labels, 784, &dev).unwrap();
    let test_set = Dataset::new(mnist::normalize(&m.test.images, mean, std), &m.test.labels, 784, &dev).unwrap();

    let mut net = ExpensiveNet::new(784, 64, 32, 10, 0, &dev).unwrap();
    let cfg = TrainConfig { max_steps: Some(300), ..TrainConfig::default() };
    let stats = train(&net, &train_set, &cfg, |_| {}).unwrap();
    assert!(stats.losses[299] < stats.losses[0], "pre-training loss did not fall");
    let pre = evaluate(&net, &test_set, 1000).unwrap();
    assert!(pre.accuracy > 0.85, "accuracy after 300 steps: {}", pre.accuracy);

    let original = net.model.base_state().unwrap();
    net.model.add_adapter("d", &LoraConfig::new(2, 3.0), &mut StdRng::seed_from_u64(1)).unwrap();
    net.model.set_active(&["d"]).unwrap();
    net.model.freeze_base(Bias::None);
    let digit = (0..10).max_by_key(|&d| pre.wrong[d]).unwrap();
    let s = m.train.only_digit(digit as u8);
    let digit_set = Dataset::new(mnist::normalize(&s.images, mean, std), &s.labels, 784, &dev).unwrap();
    let fcfg = TrainConfig { epochs: 10, batch_size: 10, max_steps: Some(30), ..TrainConfig::default() };
    train(&net, &digit_set, &fcfg, |_| {}).unwrap();

    assert_eq!(bits(&original), bits(&net.model.base_state().unwrap()), "base weights changed during LoRA training");
    let on = evaluate(&net, &test_set, 1000).unwrap();
    assert!(on.wrong[digit] * 2 <= pre.wrong[digit], "digit {digit}: {} wrong before, {} after", pre.wrong[digit], on.wrong[digit]);
    let off = net.with_adapters_disabled(|n| evaluate(n, &test_set, 1000).unwrap()).unwrap();
    assert_eq!(off.logits.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), pre.logits.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
}

#[test]
fn training_is_reproducible_with_the_same_seed() {
    let dev = Device::Cpu;
    // Tiny generated data: two separable classes.
    let inputs: Vec<f32> = (0..40 * 6).map(|i| ((i * 7919) % 13) as f32 / 13.0 - if (i / 6) % 2 == 0 { 0.5 } else { 0.0 }).collect();
    let labels: Vec<u8> = (0..40).map(|i| (i % 2) as u8).collect();
    let data = Dataset::new(inputs, &labels, 6, &dev).unwrap();
    let run = || {
        let net = ExpensiveNet::new(6, 8, 5, 2, 42, &dev).unwrap();
        let s = train(&net, &data, &TrainConfig { epochs: 3, batch_size: 7, seed: 9, ..TrainConfig::default() }, |_| {}).unwrap();
        (s.losses, bits(&net.model.base_state().unwrap()))
    };
    assert_eq!(run(), run());
}

#[test]
fn a_model_with_everything_frozen_refuses_to_train() {
    let dev = Device::Cpu;
    let mut net = ExpensiveNet::new(4, 3, 3, 2, 0, &dev).unwrap();
    net.model.freeze_base(Bias::None);
    let data = Dataset::new(vec![0.0; 8], &[0, 1], 4, &dev).unwrap();
    let e = train(&net, &data, &TrainConfig::default(), |_| {}).unwrap_err().to_string();
    assert!(e.contains("nothing to train"), "{e}");
    let e = train(&net, &data, &TrainConfig { batch_size: 0, ..TrainConfig::default() }, |_| {}).unwrap_err().to_string();
    assert!(e.contains("batch_size = 0"), "{e}");
}

#[test]
fn saved_adapter_reloads_bit_identically_and_merging_keeps_test_logits_within_tolerance() {
    let m = mnist::Mnist::load(&data_dir()).unwrap();
    let (mean, std) = mnist::mean_std(&m.train.images);
    let dev = Device::Cpu;
    let test_set = Dataset::new(mnist::normalize(&m.test.images, mean, std), &m.test.labels, 784, &dev).unwrap();
    let mut net = ExpensiveNet::new(784, 64, 32, 10, 1, &dev).unwrap();
    let mut c = LoraConfig::new(3, 5.0);
    c.scaling = lora::Scaling::RankStabilized;
    net.model.add_adapter("a", &c, &mut StdRng::seed_from_u64(2)).unwrap();
    for (_, l) in net.model.layers() {
        let b = l.adapter("a").unwrap().b();
        b.set(&(candle_core::Tensor::randn(0f32, 1.0, b.shape(), &dev).unwrap() * 0.02).unwrap()).unwrap();
    }
    net.model.set_active(&["a"]).unwrap();
    let unmerged = evaluate(&net, &test_set, 1000).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    net.model.save_adapter("a", &dir, &lora::SaveOptions::default()).unwrap();
    let state = net.model.base_state().unwrap();
    let mut net2 = ExpensiveNet::from_tensors(|n| state.iter().find(|(k, _)| k == n).map(|(_, t)| t.clone()), "mem").unwrap();
    net2.model.load_adapter("a", &dir, &lora::LoadOptions::default()).unwrap();
    net2.model.set_active(&["a"]).unwrap();
    let reloaded = evaluate(&net2, &test_set, 1000).unwrap();
    assert_eq!(unmerged.logits, reloaded.logits, "save → load changed the logits");

    let snap = net.model.snapshot_base().unwrap();
    net.model.merge("a", true).unwrap();
    let merged = evaluate(&net, &test_set, 1000).unwrap();
    let max = unmerged.logits.iter().zip(&merged.logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = unmerged.logits.iter().fold(0f32, |m, x| m.max(x.abs()));
    // Folding s·B·A into W changes the summation order of 784/64/32-term dot products in f32:
    // differences are a few ulps of the largest logit, so 1e-5 relative to it (≈ 80 ulps) is the bound.
    assert!(max <= 1e-5 * scale.max(1.0), "merged vs unmerged logits differ by {max} (max |logit| {scale})");
    net.model.unmerge("a").unwrap();
    net.model.restore_base(&snap).unwrap();
    assert_eq!(bits(&state), bits(&net.model.base_state().unwrap()));
}
