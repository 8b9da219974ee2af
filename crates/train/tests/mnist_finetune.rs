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
