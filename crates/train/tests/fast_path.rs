//! The fast (fused) training path end to end on the shipped MNIST: one epoch of the full ExpensiveNet
//! (784-1000-2000-10, batch 64, Adam 1e-3) still reaches the seed's accuracy.

use std::path::Path;

use candle_core::Device;
use lora::Backend;
use lora_train::{evaluate, train, Dataset, ExpensiveNet, TrainConfig};

#[test]
fn one_epoch_of_the_full_network_on_the_fused_path_reaches_95_percent_accuracy() {
    let m = mnist::Mnist::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist")).expect("data/mnist is shipped");
    let (mean, std) = mnist::mean_std(&m.train.images);
    let dev = Device::Cpu;
    let train_set = Dataset::new(mnist::normalize(&m.train.images, mean, std), &m.train.labels, 784, &dev).unwrap();
    let test_set = Dataset::new(mnist::normalize(&m.test.images, mean, std), &m.test.labels, 784, &dev).unwrap();
    let net = ExpensiveNet::new(784, 1000, 2000, 10, 0, &dev).unwrap();
    assert_eq!(net.backend(), Backend::Fused, "the fast path is the default");
    let stats = train(&net, &train_set, &TrainConfig::default(), |_| {}).unwrap();
    assert_eq!(stats.steps, 938);
    let e = evaluate(&net, &test_set, 1000).unwrap();
    assert!(e.accuracy >= 0.95, "accuracy after one epoch: {}", e.accuracy);
}
