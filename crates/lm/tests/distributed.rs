//! Data-parallel training of the language model (`lora_dist`): N ranks with a global batch B train the
//! model one process trains with batch B. The ranks here are threads (`lora_dist::Threads`, the same
//! rank-order sums as MPI); `tests/mpi.rs` of the binary runs the same jobs under a real `mpirun`.
//!
//! What differs between the two is the order of f32 sums only: one process sums a weight's gradient over
//! all B·T rows inside one product; N ranks each sum their rows, and the N partial sums are added in rank
//! order. Each row's logits and dz are the same bits (its loss share is divided by the global count). The
//! tolerances below are derived from that in `close`.

use std::path::Path;

use lora::LoraConfig;
use lora_dist::{Group, Threads};
use lora_lm::chat::ChatTemplate;
use lora_lm::data::{read_corpus, Corpus};
use lora_lm::instruct::{read_instructions, Encoder, Examples, LossOn, Packing};
use lora_lm::jobs::{finetune, finetune_on as finetune_data, pretrain, Checkpointing, FinetuneJob, PretrainJob, TrainData};
use lora_lm::train::{Mixture, TrainSettings, Trainer};
use lora_lm::{Llama, Tokenizer};

mod support;
use support::tiny;

/// Named tensors' values.
type Tensors = Vec<(String, Vec<f32>)>;

fn settings(steps: usize, batch_size: usize) -> TrainSettings {
    TrainSettings {
        steps,
        batch_size,
        seq_len: 16,
        lr: 3e-3,
        min_lr_ratio: 0.1,
        warmup: 1,
        weight_decay: 0.01,
        clip: Some(1.0),
        seed: 5,
        loraplus_lr_ratio: None,
    }
}

const SQL: &str = "SELECT name, id FROM users WHERE id = 1 ORDER BY name;\n";

fn corpus(dir: &Path, name: &str, text: &str) -> Corpus {
    let p = dir.join(name);
    std::fs::write(&p, text.repeat(20)).unwrap();
    read_corpus(&p).unwrap()
}

fn flat(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The adapter `name`'s tensors, layer by layer (A, B).
fn adapter(model: &Llama, name: &str) -> Tensors {
    model
        .lora()
        .layers()
        .flat_map(|(m, l)| {
            let ad = l.adapter(name).unwrap();
            [(format!("{m}.A"), flat(ad.a().as_tensor())), (format!("{m}.B"), flat(ad.b().as_tensor()))]
        })
        .collect()
}

/// Losses within 1e-5 relative, each tensor within `tol` of its scale (its largest |value|, at least the
/// total movement lr·steps). Per step the runs differ by the f32 rounding of sums reordered (≈ 1e-7
/// relative to the gradient's scale); Adam divides by √v̂, so a gradient element's relative difference
/// becomes its update's, and a handful of steps compound it to ≈ 1e-6 of the weights' scale (measured up to
/// ≈ 2e-6 here). A wrong reduction — a rank's own gradient, a mean over its own rows, an unclipped norm —
/// moves weights by ≈ lr = 3e-3 per step, 1000× the bound.
fn close(what: &str, got: &[(String, Vec<f32>)], want: &[(String, Vec<f32>)], losses: (&[f64], &[f64]), tol: f32) {
    assert_eq!(losses.0.len(), losses.1.len());
    for (i, (a, b)) in losses.0.iter().zip(losses.1).enumerate() {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "{what}: loss of step {}: {a} vs {b}", i + 1);
    }
    let mut worst = 0f32;
    for ((n, g), (m, w)) in got.iter().zip(want) {
        assert_eq!(n, m);
        let scale = w.iter().fold(3e-3f32 * losses.1.len() as f32, |s, x| s.max(x.abs()));
        for (x, y) in g.iter().zip(w) {
            let d = (x - y).abs() / scale;
            worst = worst.max(d);
            assert!(d <= tol, "{what}: {n}: {x} vs {y} (scale {scale})");
        }
    }
    eprintln!("{what}: largest difference {worst:.2e} of a tensor's scale");
}

fn losses(t: &Trainer) -> Vec<f64> {
    t.losses.iter().map(|l| l.1).collect()
}

/// Fine-tunes a rank-4 adapter for `steps` steps on `group`; returns the losses and the adapter, and whether
/// the adapter directory was written.
fn finetune_on(group: Group, dir: &Path, batch: usize, dropout: f64) -> (Vec<f64>, Tensors, bool) {
    let sql = read_corpus(&dir.join("sql.txt")).unwrap();
    let mut model = Llama::random(&tiny(), 3).unwrap();
    let out = dir.join(format!("adapter-{}-of-{}", group.rank(), group.size()));
    let lora = LoraConfig { dropout, ..LoraConfig::new(4, 8.0) };
    let job = FinetuneJob {
        name: "sql".into(),
        lora,
        settings: settings(6, batch),
        out: out.clone(),
        base_model: None,
        convert_to_lora: false,
        checkpoint: Checkpointing::beside(&out),
        group,
    };
    let f = finetune(&mut model, &Tokenizer::bytes(), &sql, &job, &mut |_| {}).unwrap();
    (losses(&f.trainer), adapter(&model, "sql"), out.join("adapter_model.safetensors").is_file())
}

#[test]
fn two_ranks_fine_tune_the_adapter_one_process_does_and_only_rank_0_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path(), "sql.txt", SQL);
    // Batches of 4 (2 rows each), 3 (2 + 1) and 1 (rank 1 has no rows: its gradient is zeros).
    for batch in [4, 3, 1] {
        let one = finetune_on(Group::single(), dir.path(), batch, 0.0);
        let two = Threads::run(2, |g| finetune_on(g, dir.path(), batch, 0.0));
        assert!(one.2 && two[0].2 && !two[1].2, "rank 0 writes the adapter, rank 1 nothing");
        for (r, t) in two.iter().enumerate().skip(1) {
            assert_eq!(t.0, two[0].0, "rank {r}'s losses are rank 0's");
            for ((n, a), (_, b)) in t.1.iter().zip(&two[0].1) {
                assert_eq!(bits(a), bits(b), "rank {r}'s {n} is rank 0's bit for bit");
            }
        }
        close(&format!("LoRA, batch {batch}, 2 ranks"), &two[0].1, &one.1, (&two[0].0, &one.0), 2e-5);
    }
}

#[test]
fn two_ranks_fine_tune_on_instruction_data_as_one_process_does_though_their_rows_count_unequally() {
    // Completions of 1 to 12 bytes: each rank's rows hold a different number of targets that count, so a rank
    // that divided by its own count (not the global batch's) would weight its rows wrongly and part at step 1.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qa.jsonl");
    let rows: String =
        (0..9).map(|i| format!("{{\"prompt\": \"Q{i}:\", \"completion\": \" {}\"}}\n", "y".repeat(1 + i * 11 % 12))).collect();
    std::fs::write(&path, rows).unwrap();
    let data = read_instructions(&path).unwrap();
    let (tok, chat) = (Tokenizer::bytes(), ChatTemplate::chatml());
    let enc = Encoder { tokenizer: &tok, chat: &chat, loss: LossOn::Completions };
    let ex = Examples::build(&data.path, "qa", &data.train, &enc, 16, Packing::Off).unwrap();
    let run = |group: Group| {
        let mut model = Llama::random(&tiny(), 3).unwrap();
        let out = dir.path().join(format!("qa-{}-of-{}", group.rank(), group.size()));
        let job = FinetuneJob {
            name: "qa".into(),
            lora: LoraConfig::new(4, 8.0),
            settings: settings(6, 3),
            out: out.clone(),
            base_model: None,
            convert_to_lora: false,
            checkpoint: Checkpointing::beside(&out),
            group,
        };
        let f = finetune_data(&mut model, &tok, TrainData::Examples(&ex, Packing::Off), &job, &mut |_| {}).unwrap();
        (losses(&f.trainer), adapter(&model, "qa"))
    };
    let one = run(Group::single());
    let two = Threads::run(2, run);
    assert_eq!(two[1].0, two[0].0, "rank 1's losses are rank 0's");
    close("LoRA on instruction data, batch 3, 2 ranks", &two[0].1, &one.1, (&two[0].0, &one.0), 2e-5);
}

#[test]
fn ranks_draw_the_adapter_dropout_masks_one_process_draws() {
    // With dropout 0.3 every step's masks come from (seed, step): the ranks' rows must get the one process's
    // mask values, or the runs part at the first step by far more than rounding.
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path(), "sql.txt", SQL);
    let one = finetune_on(Group::single(), dir.path(), 4, 0.3);
    let two = Threads::run(2, |g| finetune_on(g, dir.path(), 4, 0.3));
    close("LoRA with dropout, 2 ranks", &two[0].1, &one.1, (&two[0].0, &one.0), 2e-5);
}

#[test]
fn three_ranks_pre_train_the_base_one_process_does_and_only_rank_0_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let sql = corpus(dir.path(), "sql.txt", "SELECT name FROM users WHERE id = 1;\n");
    let py = corpus(dir.path(), "py.txt", "def f(x):\n    return x + 1\n");
    let run = |group: Group| {
        let out = dir.path().join(format!("base-{}-of-{}", group.rank(), group.size()));
        let job = PretrainJob {
            config: tiny(),
            settings: settings(5, 5),
            out: out.clone(),
            dtype: Default::default(),
            checkpoint: Checkpointing::beside(&out),
            group,
        };
        let p = pretrain(&job, &[(&py, 0.5), (&sql, 0.5)], &mut |_| {}).unwrap();
        let state: Tensors = p.model.base_state().unwrap().iter().map(|(n, t)| (n.clone(), flat(t))).collect();
        (losses(&p.trainer), state, out.join("model.safetensors").is_file())
    };
    let one = run(Group::single());
    let three = Threads::run(3, run);
    assert!(one.2 && three[0].2 && !three[1].2 && !three[2].2, "rank 0 writes the model, the others nothing");
    for t in &three[1..] {
        assert_eq!(t.0, three[0].0);
        assert!(t.1.iter().zip(&three[0].1).all(|((_, a), (_, b))| bits(a) == bits(b)), "every rank keeps rank 0's weights");
    }
    close("full training, batch 5 over 3 ranks", &three[0].1, &one.1, (&three[0].0, &one.0), 2e-5);
}

#[test]
fn a_run_checkpointed_on_two_ranks_resumes_on_one_and_on_three() {
    // 2 ranks train 3 of 6 steps and checkpoint (rank 0 writes); the run then goes on with 1 and with 3
    // ranks. Each ends where an uninterrupted single-process run ends, within the same rounding bound.
    let dir = tempfile::tempdir().unwrap();
    let sql = corpus(dir.path(), "sql.txt", SQL);
    let mut data = Mixture::new();
    data.add("sql", lora_lm::data::TokenStream::from_corpus(&sql, &Tokenizer::bytes()).unwrap(), 1.0).unwrap();
    let s = settings(6, 6);
    let model = || {
        let mut m = Llama::random(&tiny(), 3).unwrap();
        m.lora_mut()
            .add_adapter("sql", &LoraConfig::new(4, 8.0), &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(6))
            .unwrap();
        m.lora_mut().set_active(&["sql"]).unwrap();
        m.freeze_base();
        m
    };
    let ck = dir.path().join("run.ckpt.safetensors");
    Threads::run(2, |g| {
        let m = model();
        let mut t = Trainer::new(&m, s.clone()).unwrap().in_group(g.clone());
        t.run(&m, &data, 3, |_, _| Ok(true)).unwrap();
        if g.is_root() {
            t.save_checkpoint(&ck).unwrap();
        }
    });
    let straight = {
        let m = model();
        let mut t = Trainer::new(&m, s.clone()).unwrap();
        t.run(&m, &data, 6, |_, _| Ok(true)).unwrap();
        (losses(&t), adapter(&m, "sql"))
    };
    for ranks in [1, 3] {
        let resumed = Threads::run(ranks, |g| {
            let m = model();
            let mut t = Trainer::resume(&m, s.clone(), &ck).unwrap().in_group(g);
            t.run(&m, &data, 6, |_, _| Ok(true)).unwrap();
            (losses(&t), adapter(&m, "sql"))
        });
        close(&format!("2 ranks, then {ranks}"), &resumed[0].1, &straight.1, (&resumed[0].0, &straight.0), 2e-5);
    }
}

#[test]
fn ranks_that_start_from_different_bases_fail_together_naming_the_rank() {
    let dir = tempfile::tempdir().unwrap();
    let sql = corpus(dir.path(), "sql.txt", "SELECT 1;\n");
    let errs = Threads::run(2, |g| {
        // Rank 1 loaded another base (another seed): its batches would train another model.
        let mut model = Llama::random(&tiny(), 3 + g.rank() as u64).unwrap();
        let out = dir.path().join(format!("a{}", g.rank()));
        let job = FinetuneJob {
            name: "sql".into(),
            lora: LoraConfig::new(2, 4.0),
            settings: settings(2, 2),
            out: out.clone(),
            base_model: None,
            convert_to_lora: false,
            checkpoint: Checkpointing::beside(&out),
            group: g,
        };
        let e = finetune(&mut model, &Tokenizer::bytes(), &sql, &job, &mut |_| {}).unwrap_err().to_string();
        (e, out.exists())
    });
    for (e, written) in errs {
        assert!(e.contains("ranks disagree on the model (base, trained tensors, step): rank 1 differs from rank 0 (2 ranks)"), "{e}");
        assert!(!written);
    }
}

#[test]
fn ranks_whose_weights_parted_are_named_before_anything_is_written() {
    // A rank whose weights differ after training (here: changed by hand; in life, a fault) fails every rank.
    let dir = tempfile::tempdir().unwrap();
    let sql = corpus(dir.path(), "sql.txt", SQL);
    let mut data = Mixture::new();
    data.add("sql", lora_lm::data::TokenStream::from_corpus(&sql, &Tokenizer::bytes()).unwrap(), 1.0).unwrap();
    let errs = Threads::run(3, |g| {
        let m = Llama::random(&tiny(), 3).unwrap();
        let mut t = Trainer::new(&m, settings(2, 3)).unwrap().in_group(g.clone());
        t.run(&m, &data, 2, |_, _| Ok(true)).unwrap();
        t.check_weights_agree().unwrap();
        if g.rank() == 2 {
            let (_, v) = &m.trainable_vars()[0];
            v.set(&(v.as_tensor() + 1e-6).unwrap()).unwrap();
        }
        t.check_weights_agree().unwrap_err().to_string()
    });
    for e in errs {
        assert!(e.contains("ranks disagree on the trained tensors after step 2: rank 2 differs from rank 0 (3 ranks)"), "{e}");
    }
}
