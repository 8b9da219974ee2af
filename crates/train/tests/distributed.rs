//! Data-parallel training of the MNIST network (`lora_dist`), on the real images of `data/mnist`: N ranks
//! with a global batch B train the network one process trains with batch B, for pre-training (every tensor,
//! where one process applies Adam during the backward pass and the ranks after summing) and for LoRA. The
//! ranks are threads (`lora_dist::Threads`, the same rank-order sums as MPI); the binary's `tests/mpi.rs`
//! runs the commands under a real `mpirun`.
//!
//! Only the order of f32 sums differs: one process sums a weight's gradient over the B examples inside
//! one product; the ranks each sum theirs and the partial sums are added in rank order. Each example's
//! dz is the same bits (its loss is divided by the global B). See `close` for the tolerance.

use std::path::Path;

use candle_core::{Device, Tensor};
use lora::LoraConfig;
use lora_dist::{Group, Threads};
use lora_train::{
    finetune, pretrain, train_with, Checkpoint, Checkpointing, Dataset, ExpensiveNet, FinetuneJob, PretrainJob, SaveEvery, TrainConfig,
};

/// Named tensors' values.
type Tensors = Vec<(String, Vec<f32>)>;

/// The first `n` training images, normalised as the binary does; and the first `n` sevens.
fn data(n: usize) -> (Dataset, Dataset) {
    let m =
        mnist::Mnist::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist")).expect("data/mnist ships with the repository");
    let (mean, std) = mnist::mean_std(&m.train.images);
    let px = 784;
    let all = Dataset::new(mnist::normalize(&m.train.images[..n * px], mean, std), &m.train.labels[..n], px, &Device::Cpu).unwrap();
    let sevens = m.train.only_digit(7);
    let seven = Dataset::new(mnist::normalize(&sevens.images[..n * px], mean, std), &sevens.labels[..n], px, &Device::Cpu).unwrap();
    (all, seven)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Losses within 1e-5 relative; each tensor within `tol` of its scale (its largest |value|, at least the
/// total movement lr·steps). Per step the runs differ by the f32 rounding of reordered sums (≈ 1e-7 of
/// the gradient's scale); Adam divides by √v̂, so an element's relative gradient difference becomes its
/// update's, and a few dozen steps compound it (measured ≲ 4e-6 here). A wrong reduction (a rank's own
/// gradient, its own mean, a missed example) moves weights by ≈ lr = 1e-3 per step: far past the bound.
fn close(what: &str, got: &(Vec<f32>, Tensors), want: &(Vec<f32>, Tensors), tol: f32) {
    assert_eq!(got.0.len(), want.0.len(), "{what}: steps");
    for (i, (a, b)) in got.0.iter().zip(&want.0).enumerate() {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "{what}: loss of step {}: {a} vs {b}", i + 1);
    }
    let mut worst = 0f32;
    for ((n, g), (m, w)) in got.1.iter().zip(&want.1) {
        assert_eq!(n, m);
        let scale = w.iter().fold(1e-3f32 * want.0.len() as f32, |s, x| s.max(x.abs()));
        for (x, y) in g.iter().zip(w) {
            let d = (x - y).abs() / scale;
            worst = worst.max(d);
            assert!(d <= tol, "{what}: {n}: {x} vs {y} (scale {scale})");
        }
    }
    eprintln!("{what}: largest difference {worst:.2e} of a tensor's scale");
}

/// Every rank holds rank 0's losses and tensors, bit for bit.
fn identical(ranks: &[(Vec<f32>, Tensors)]) {
    for (r, t) in ranks.iter().enumerate().skip(1) {
        assert_eq!(bits(&t.0), bits(&ranks[0].0), "rank {r}'s losses");
        for ((n, a), (_, b)) in t.1.iter().zip(&ranks[0].1) {
            assert_eq!(bits(a), bits(b), "rank {r}'s {n}");
        }
    }
}

fn state(net: &ExpensiveNet) -> Tensors {
    net.model.base_state().unwrap().iter().map(|(n, t)| (n.clone(), flat(t))).collect()
}

fn pretrain_on(group: Group, data: &Dataset, dir: &Path, batch: usize) -> (Vec<f32>, Tensors, bool) {
    let out = dir.join(format!("base-{batch}-{}-of-{}.safetensors", group.rank(), group.size()));
    let job = PretrainJob {
        hidden: (48, 24),
        classes: 10,
        train: TrainConfig { epochs: 2, batch_size: batch, lr: 1e-3, max_steps: None, seed: 3, loraplus_lr_ratio: None },
        out: out.clone(),
        checkpoint: Checkpointing::beside(&out),
        group,
    };
    let (net, stats) = pretrain(data, &job, |_| {}).unwrap();
    (stats.losses, state(&net), out.is_file())
}

#[test]
fn ranks_pre_train_the_network_one_process_does_short_last_batches_included() {
    let (all, _) = data(250);
    let dir = tempfile::tempdir().unwrap();
    // 250 examples in batches of 64 (the last 58) over 2 and 3 ranks; in batches of 83 the last batch is one
    // example, so every rank but one has none.
    for (batch, ranks) in [(64, 2), (64, 3), (83, 2)] {
        let one = pretrain_on(Group::single(), &all, dir.path(), batch);
        let many = Threads::run(ranks, |g| pretrain_on(g, &all, dir.path(), batch));
        assert!(one.2 && many[0].2 && many[1..].iter().all(|m| !m.2), "rank 0 writes the model, the others nothing");
        let many: Vec<_> = many.into_iter().map(|m| (m.0, m.1)).collect();
        identical(&many);
        close(&format!("pre-training, batch {batch}, {ranks} ranks"), &many[0], &(one.0, one.1), 5e-5);
    }
}

#[test]
fn two_ranks_fine_tune_a_lora_adapter_with_dropout_as_one_process_does() {
    let (all, seven) = data(120);
    let dir = tempfile::tempdir().unwrap();
    let base = ExpensiveNet::new(784, 48, 24, 10, 2, &Device::Cpu).unwrap();
    lora_train::train(&base, &all, &TrainConfig { batch_size: 50, ..TrainConfig::default() }, |_| {}).unwrap();
    let base = base.model.base_state().unwrap();
    let run = |group: Group| {
        let mut net = ExpensiveNet::from_tensors(|n| base.iter().find(|(m, _)| m == n).map(|(_, t)| t.clone()), "base").unwrap();
        let out = dir.path().join(format!("adapter-{}-of-{}", group.rank(), group.size()));
        let job = FinetuneJob {
            name: "seven".into(),
            lora: LoraConfig { dropout: 0.2, ..LoraConfig::new(2, 4.0) },
            class: 7,
            train: TrainConfig { epochs: usize::MAX, batch_size: 16, lr: 1e-3, max_steps: Some(12), seed: 4, loraplus_lr_ratio: None },
            out: out.clone(),
            base_model: None,
            convert_to_lora: false,
            checkpoint: Checkpointing::beside(&out),
            group,
        };
        let f = finetune(&mut net, &seven, &job, |_| {}).unwrap();
        let adapter: Tensors = net
            .model
            .layers()
            .flat_map(|(m, l)| l.adapter_vars("seven").into_iter().map(move |(w, v)| (format!("{m}.{w}"), flat(v.as_tensor()))))
            .collect();
        (f.stats.losses, adapter, out.join("adapter_model.safetensors").is_file())
    };
    let one = run(Group::single());
    let two = Threads::run(2, run);
    assert!(one.2 && two[0].2 && !two[1].2, "rank 0 writes the adapter, rank 1 nothing");
    let two: Vec<_> = two.into_iter().map(|m| (m.0, m.1)).collect();
    identical(&two);
    close("LoRA with dropout 0.2, batch 16, 2 ranks", &two[0], &(one.0, one.1), 5e-5);
}

#[test]
fn a_pre_training_checkpointed_on_two_ranks_resumes_on_one_and_on_three() {
    // Two ranks train 4 steps and keep the checkpoint (as rank 0 would write it); the run goes on with 1 and
    // with 3 ranks to the end of 2 epochs, and ends where one process running straight through ends.
    let (all, _) = data(200);
    let cfg = TrainConfig { epochs: 2, batch_size: 40, lr: 1e-3, max_steps: None, seed: 6, loraplus_lr_ratio: None };
    let fresh = || ExpensiveNet::new(784, 48, 24, 10, 2, &Device::Cpu).unwrap();
    let saved = Threads::run(2, |g| {
        let net = fresh();
        let mut kept = None;
        let mut save = |c: &Checkpoint| {
            if c.global_step == 4 {
                kept = Some((c.clone(), net.model.base_state().unwrap()));
            }
            Ok(())
        };
        let every = SaveEvery { every: 4, save: &mut save };
        train_with(&net, &all, &cfg, None, Some(every), &g, |_| {}).unwrap();
        kept.unwrap()
    });
    let (ck, tensors) = &saved[0];
    let straight = {
        let net = fresh();
        let s = train_with(&net, &all, &cfg, None, None, &Group::single(), |_| {}).unwrap();
        (s.losses, state(&net))
    };
    for ranks in [1, 3] {
        let resumed = Threads::run(ranks, |g| {
            let net = ExpensiveNet::from_tensors(|n| tensors.iter().find(|(m, _)| m == n).map(|(_, t)| t.clone()), "checkpoint").unwrap();
            let s = train_with(&net, &all, &cfg, Some(ck), None, &g, |_| {}).unwrap();
            (s.losses, state(&net))
        });
        identical(&resumed);
        close(&format!("2 ranks for 4 steps, then {ranks}"), &resumed[0], &straight, 5e-5);
    }
}
