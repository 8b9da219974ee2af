//! The bad-input matrix: every input the CLI reads, broken in each way we know, run through the real
//! binary. Each case must exit non-zero, print an error naming the file/field/value, never panic, and
//! leave no output file behind. The fixtures are generated here (tiny 4×4 "MNIST" data, an 8-4 network).
//!
//! Set `LORA_BAD_INPUT_DIR=DIR` to keep the generated fixtures and a `cases.tsv` listing every case, which
//! `scripts/bad-input-matrix.sh` replays through a release binary.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lora::io::{safetensors_bytes, write_atomic};
use lora::{LoraConfig, SaveOptions};
use lora_train::ExpensiveNet;
use rand::rngs::StdRng;
use rand::SeedableRng;

mod support;
use support::Case;

fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    dims.iter().for_each(|d| v.extend_from_slice(&d.to_be_bytes()));
    v.extend_from_slice(data);
    v
}

fn gz(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// A valid tiny data set: 30 train and 10 test images of 4×4 pixels.
fn data_files() -> Vec<(&'static str, Vec<u8>)> {
    let px = |n: usize| (0..n * 16).map(|i| (i * 37 % 256) as u8).collect::<Vec<u8>>();
    let lb = |n: usize| (0..n).map(|i| (i % 10) as u8).collect::<Vec<u8>>();
    vec![
        ("train-images-idx3-ubyte.gz", gz(&idx(2051, &[30, 4, 4], &px(30)))),
        ("train-labels-idx1-ubyte.gz", gz(&idx(2049, &[30], &lb(30)))),
        ("t10k-images-idx3-ubyte.gz", gz(&idx(2051, &[10, 4, 4], &px(10)))),
        ("t10k-labels-idx1-ubyte.gz", gz(&idx(2049, &[10], &lb(10)))),
    ]
}

fn write_data(dir: &Path, replace: Option<(&str, Vec<u8>)>) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in data_files() {
        let bytes = match &replace {
            Some((n, b)) if *n == name => b.clone(),
            _ => bytes,
        };
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

fn model_tensors(seed: u64) -> Vec<(String, Tensor)> {
    ExpensiveNet::new(16, 8, 4, 10, seed, &Device::Cpu).unwrap().model.base_state().unwrap()
}

fn st(path: &Path, tensors: &[(String, Tensor)]) {
    write_atomic(path, &safetensors_bytes(tensors, &HashMap::new()).unwrap()).unwrap();
}

/// Patches the JSON header of a safetensors byte buffer (keeping its length field honest).
fn patch_header(bytes: &[u8], f: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut h);
    let hs = serde_json::to_vec(&h).unwrap();
    let mut out = (hs.len() as u64).to_le_bytes().to_vec();
    out.extend(hs);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

fn adapter(dir: &Path, base_seed: u64) {
    let mut net = ExpensiveNet::new(16, 8, 4, 10, base_seed, &Device::Cpu).unwrap();
    let fp = lora::io::fingerprint(&net.model.base_state().unwrap()).unwrap();
    net.model.add_adapter("a", &LoraConfig::new(2, 3.0), &mut StdRng::seed_from_u64(0)).unwrap();
    let opts = SaveOptions { base_fingerprint: Some(fp), ..Default::default() };
    net.model.save_adapter("a", dir, &opts).unwrap();
}

fn edit_config(dir: &Path, f: impl Fn(&mut serde_json::Value)) {
    let p = dir.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn edit_weights(dir: &Path, f: impl Fn(&mut Vec<(String, Tensor)>)) {
    let p = dir.join("adapter_model.safetensors");
    let mut t = lora::io::TensorFile::load(&p, &Device::Cpu).unwrap().tensors;
    f(&mut t);
    st(&p, &t);
}

fn case(name: &'static str, args: &[&str], expect: &str) -> Case {
    Case::new(name, args, expect)
}

/// Builds every fixture under `d` and returns the cases (paths relative to `d`, the working directory).
fn build(d: &Path) -> Vec<Case> {
    let mut cases = Vec::new();
    write_data(&d.join("data"), None);
    st(&d.join("model.safetensors"), &model_tensors(0));
    adapter(&d.join("adapter"), 0);

    // IDX files.
    let good = data_files();
    let train_images = &good[0].1;
    let raw_train = idx(2051, &[30, 4, 4], &(0..480).map(|i| (i * 37 % 256) as u8).collect::<Vec<u8>>());
    let idx_cases: Vec<(&'static str, &'static str, Vec<u8>, &'static str)> = vec![
        ("idx_truncated", "train-images-idx3-ubyte.gz", gz(&raw_train[..raw_train.len() - 100]), "file truncated"),
        ("idx_wrong_magic", "train-images-idx3-ubyte.gz", gz(&idx(2049, &[30, 4, 4], &raw_train[16..])), "wrong magic number 2049"),
        ("idx_zero_dimension", "train-images-idx3-ubyte.gz", gz(&idx(2051, &[30, 0, 4], &[])), "a dimension is zero"),
        ("idx_wrong_dimensions", "t10k-images-idx3-ubyte.gz", gz(&idx(2051, &[10, 2, 8], &[0; 160])), "training images are 4x4"),
        ("idx_count_mismatch", "train-labels-idx1-ubyte.gz", gz(&idx(2049, &[29], &[1; 29])), "30 images but"),
        ("idx_empty", "t10k-labels-idx1-ubyte.gz", Vec::new(), "truncated header"),
        ("idx_gzip_corrupt", "train-images-idx3-ubyte.gz", train_images[..train_images.len() / 2].to_vec(), "train-images-idx3-ubyte.gz"),
        ("idx_label_out_of_range", "t10k-labels-idx1-ubyte.gz", gz(&idx(2049, &[10], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 12])), "label 12"),
    ];
    for (name, file, bytes, expect) in idx_cases {
        write_data(&d.join(name), Some((file, bytes)));
        cases.push(case(name, &["eval", "--model", "model.safetensors", "--data", name], expect));
    }
    cases.push(case("idx_missing_dir", &["eval", "--model", "model.safetensors", "--data", "no-such-dir"], "no-such-dir"));

    // Model safetensors files.
    let good_bytes = safetensors_bytes(&model_tensors(0), &HashMap::new()).unwrap();
    let mut files: Vec<(&'static str, Vec<u8>, &'static str)> = vec![
        ("st_truncated", good_bytes[..good_bytes.len() - 10].to_vec(), "not a valid safetensors"),
        ("st_header_size_lies", [&u64::MAX.to_le_bytes()[..], &good_bytes[8..]].concat(), "not a valid safetensors"),
        ("st_empty", Vec::new(), "not a valid safetensors"),
        (
            "st_offsets_lie",
            patch_header(&good_bytes, |h| h["linear1.bias"]["data_offsets"] = serde_json::json!([0, 999_999])),
            "not a valid safetensors",
        ),
        (
            "st_wrong_dtype",
            {
                let mut t = model_tensors(0);
                t.retain(|(n, _)| n != "linear3.bias");
                // Rebuild with the safetensors crate directly to put an I32 tensor in.
                let data = vec![0u8; 40];
                let mut views: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
                let vals: Vec<(String, Vec<u8>, Vec<usize>)> = t
                    .iter()
                    .map(|(n, x)| {
                        (
                            n.clone(),
                            x.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
                            x.dims().to_vec(),
                        )
                    })
                    .collect();
                for (n, bytes, shape) in &vals {
                    views.push((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).unwrap()));
                }
                views
                    .push(("linear3.bias".into(), safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![10], &data).unwrap()));
                safetensors::serialize(views, None).unwrap()
            },
            "linear3.bias: dtype I32",
        ),
    ];
    let mut missing = model_tensors(0);
    missing.retain(|(n, _)| n != "linear2.bias");
    let mut extra = model_tensors(0);
    extra.push(("linear4.weight".into(), Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap()));
    let mut nan = model_tensors(0);
    nan[1].1 = Tensor::full(f32::NAN, nan[1].1.shape(), &Device::Cpu).unwrap();
    let mut inf = model_tensors(0);
    inf[0].1 = Tensor::full(f32::INFINITY, inf[0].1.shape(), &Device::Cpu).unwrap();
    let mut shape = model_tensors(0);
    shape.retain(|(n, _)| n != "linear2.weight");
    shape.push(("linear2.weight".into(), Tensor::zeros((4, 7), DType::F32, &Device::Cpu).unwrap()));
    // Files that are not valid safetensors fail even `inspect`; the ones below are valid safetensors that are
    // not a usable ExpensiveNet, which `inspect` may show but nothing may load.
    let structural = files.len();
    for (name, t, expect) in [
        ("st_missing_tensor", missing, "missing tensor linear2.bias"),
        ("st_extra_tensor", extra, "unexpected tensor linear4.weight"),
        ("st_nan", nan, "non-finite value NaN"),
        ("st_inf", inf, "non-finite value inf"),
        ("st_shapes_do_not_chain", shape, "linear2.weight has 7 inputs"),
    ] {
        files.push((name, safetensors_bytes(&t, &HashMap::new()).unwrap(), expect));
    }
    for (i, (name, bytes, expect)) in files.into_iter().enumerate() {
        let f = format!("{name}.safetensors");
        std::fs::write(d.join(&f), bytes).unwrap();
        cases.push(case(name, &["eval", "--model", &f, "--data", "data"], expect));
        let mut c = case(name, &["finetune", "--model", &f, "--data", "data", "--steps", "2", "--out", "should-not-exist"], expect);
        c.absent = Some("should-not-exist".into());
        cases.push(c);
        if i < structural {
            cases.push(case(name, &["inspect", &f], &f));
        }
    }
    cases.push(case("st_is_a_directory", &["eval", "--model", "data", "--data", "data"], "data: is a directory; an MNIST model is a"));
    // A language-model folder or an adapter folder given as the MNIST model: say what it is and what takes it.
    std::fs::create_dir_all(d.join("lm")).unwrap();
    std::fs::write(d.join("lm/config.json"), "{}").unwrap();
    cases.push(case("st_is_a_language_model", &["eval", "--model", "lm", "--data", "data"], "lm: is a language-model directory"));
    cases.push(case("st_is_an_adapter", &["eval", "--model", "adapter", "--data", "data"], "adapter: is an adapter directory"));
    // A model with fewer outputs than the data has classes (it used to panic on an index).
    st(&d.join("four-outputs.safetensors"), &ExpensiveNet::new(16, 8, 4, 4, 0, &Device::Cpu).unwrap().model.base_state().unwrap());
    cases.push(case("st_fewer_outputs_than_classes", &["eval", "--model", "four-outputs.safetensors", "--data", "data"], "has 4 outputs"));
    let mut c = case(
        "st_fewer_outputs_than_classes_finetune",
        &["finetune", "--model", "four-outputs.safetensors", "--data", "data", "--steps", "2", "--out", "four-out"],
        "has 4 outputs",
    );
    c.absent = Some("four-out".into());
    cases.push(c);

    // Adapter directories.
    type Edit = Box<dyn Fn(&Path)>;
    let adapter_cases: Vec<(&'static str, Edit, &'static str)> = vec![
        ("cfg_malformed", Box::new(|p: &Path| std::fs::write(p.join("adapter_config.json"), "{\"r\": 2,").unwrap()), "not valid JSON"),
        ("cfg_not_an_object", Box::new(|p: &Path| std::fs::write(p.join("adapter_config.json"), "[1, 2]").unwrap()), "not a JSON object"),
        ("cfg_missing_r", Box::new(|p: &Path| edit_config(p, |v| drop(v.as_object_mut().unwrap().remove("r")))), "missing key r"),
        ("cfg_r_zero", Box::new(|p: &Path| edit_config(p, |v| v["r"] = 0.into())), "r = 0"),
        ("cfg_r_negative", Box::new(|p: &Path| edit_config(p, |v| v["r"] = (-2).into())), "r = -2"),
        ("cfg_alpha_not_a_number", Box::new(|p: &Path| edit_config(p, |v| v["lora_alpha"] = "big".into())), "lora_alpha = \"big\""),
        (
            "cfg_unknown_target",
            Box::new(|p: &Path| edit_config(p, |v| v["target_modules"] = serde_json::json!(["linear1", "linear2", "linear3", "conv9"]))),
            "conv9",
        ),
        (
            "cfg_dora",
            Box::new(|p: &Path| edit_config(p, |v| v["use_dora"] = true.into())),
            "missing tensor base_model.model.linear1.lora_magnitude_vector",
        ),
        (
            "cfg_dora_with_lora_bias",
            Box::new(|p: &Path| {
                edit_config(p, |v| {
                    v["use_dora"] = true.into();
                    v["lora_bias"] = true.into();
                    v["init_lora_weights"] = true.into();
                })
            }),
            "lora_bias = true",
        ),
        (
            "cfg_init_loftq",
            Box::new(|p: &Path| edit_config(p, |v| v["init_lora_weights"] = "loftq".into())),
            "init_lora_weights = \"loftq\"",
        ),
        ("cfg_init_pissa_niter", Box::new(|p: &Path| edit_config(p, |v| v["init_lora_weights"] = "pissa_niter_4".into())), "pissa_niter_N"),
        (
            "adapter_magnitude_wrong_shape",
            Box::new(|p: &Path| {
                edit_config(p, |v| v["use_dora"] = true.into());
                edit_weights(p, |t| {
                    for (l, out) in [("linear1", 7), ("linear2", 4), ("linear3", 10)] {
                        t.push((
                            format!("base_model.model.{l}.lora_magnitude_vector"),
                            Tensor::ones(out, DType::F32, &Device::Cpu).unwrap(),
                        ));
                    }
                })
            }),
            "linear1.lora_magnitude_vector: shape [7], expected [8]",
        ),
        ("cfg_bias_unknown", Box::new(|p: &Path| edit_config(p, |v| v["bias"] = "some".into())), "bias = \"some\""),
        (
            "adapter_bias_without_bias_key",
            Box::new(|p: &Path| {
                edit_weights(p, |t| t.push(("base_model.model.linear3.bias".into(), Tensor::ones(10, DType::F32, &Device::Cpu).unwrap())))
            }),
            "names no bias other than \"none\" nor module_to_save for linear3",
        ),
        (
            "adapter_modules_to_save_without_weight",
            Box::new(|p: &Path| edit_config(p, |v| v["modules_to_save"] = serde_json::json!(["linear3"]))),
            "missing tensor base_model.model.linear3.weight",
        ),
        ("cfg_rank_mismatch", Box::new(|p: &Path| edit_config(p, |v| v["r"] = 3.into())), "does not match r = 3"),
        (
            "adapter_missing_tensor",
            Box::new(|p: &Path| edit_weights(p, |t| t.retain(|(n, _)| n != "base_model.model.linear2.lora_B.weight"))),
            "missing tensor base_model.model.linear2.lora_B.weight",
        ),
        (
            "adapter_extra_tensor",
            Box::new(|p: &Path| {
                edit_weights(p, |t| {
                    t.push(("base_model.model.linear1.lora_C.weight".into(), Tensor::ones(8, DType::F32, &Device::Cpu).unwrap()))
                })
            }),
            "unexpected tensor base_model.model.linear1.lora_C.weight",
        ),
        (
            "adapter_magnitude_without_dora",
            Box::new(|p: &Path| {
                edit_weights(p, |t| {
                    t.push(("base_model.model.linear1.lora_magnitude_vector".into(), Tensor::ones(8, DType::F32, &Device::Cpu).unwrap()))
                })
            }),
            "has use_dora = false",
        ),
        (
            "adapter_nan",
            Box::new(|p: &Path| edit_weights(p, |t| t[0].1 = Tensor::full(f32::NAN, t[0].1.shape(), &Device::Cpu).unwrap())),
            "non-finite",
        ),
        (
            "adapter_wrong_shape",
            Box::new(|p: &Path| {
                edit_weights(p, |t| {
                    let i = t.iter().position(|(n, _)| n == "base_model.model.linear1.lora_A.weight").unwrap();
                    t[i].1 = Tensor::ones((2, 15), DType::F32, &Device::Cpu).unwrap();
                })
            }),
            "linear1.lora_A.weight: shape [2, 15], expected [2, 16]",
        ),
        (
            "adapter_truncated",
            Box::new(|p: &Path| {
                let f = p.join("adapter_model.safetensors");
                let b = std::fs::read(&f).unwrap();
                std::fs::write(&f, &b[..b.len() / 2]).unwrap();
            }),
            "adapter_model.safetensors",
        ),
        ("adapter_other_base", Box::new(|p: &Path| adapter(p, 99)), "different base model"),
        (
            "adapter_missing_config",
            Box::new(|p: &Path| std::fs::remove_file(p.join("adapter_config.json")).unwrap()),
            "adapter_config.json",
        ),
    ];
    for (name, edit, expect) in adapter_cases {
        let dir = d.join(name);
        adapter(&dir, 0);
        edit(&dir);
        cases.push(case(name, &["eval", "--model", "model.safetensors", "--data", "data", "--adapter", &format!("x={name}")], expect));
        let mut c = case(
            name,
            &["merge", "--model", "model.safetensors", "--adapter", name, "--out", "merged-should-not-exist.safetensors"],
            expect,
        );
        c.absent = Some("merged-should-not-exist.safetensors".into());
        cases.push(c);
    }

    // Flags out of range.
    for (name, args, expect) in [
        ("flag_rank_zero", vec!["demo", "--rank", "0"], "--rank"),
        ("flag_batch_zero", vec!["demo", "--batch-size", "0"], "--batch-size"),
        ("flag_digit_11", vec!["demo", "--digit", "11"], "--digit"),
        ("flag_epochs_zero", vec!["demo", "--epochs", "0"], "--epochs"),
        ("flag_steps_zero", vec!["finetune", "--model", "model.safetensors", "--out", "x", "--steps", "0"], "--steps"),
        ("flag_alpha_nan", vec!["demo", "--data", "data", "--alpha", "NaN", "--out", "o"], "lora_alpha = NaN"),
        ("flag_lr_zero", vec!["pretrain", "--data", "data", "--lr", "0", "--out", "p.safetensors"], "lr = 0"),
        (
            "flag_dropout_too_big",
            vec!["finetune", "--model", "model.safetensors", "--data", "data", "--out", "x", "--dropout", "1.5"],
            "lora_dropout = 1.5",
        ),
        (
            "flag_modules_to_save_also_targeted",
            vec!["finetune", "--model", "model.safetensors", "--data", "data", "--out", "x", "--modules-to-save", "linear3"],
            "modules_to_save = linear3",
        ),
        (
            "flag_modules_to_save_unknown",
            vec![
                "finetune",
                "--model",
                "model.safetensors",
                "--data",
                "data",
                "--out",
                "x",
                "--target-modules",
                "linear1",
                "--modules-to-save",
                "conv9",
            ],
            "modules_to_save = conv9",
        ),
        (
            "flag_lora_bias_with_normal_init",
            vec!["finetune", "--model", "model.safetensors", "--data", "data", "--out", "x", "--lora-bias"],
            "lora_bias = true",
        ),
        (
            "flag_dora_with_pissa",
            vec!["finetune", "--model", "model.safetensors", "--data", "data", "--out", "x", "--use-dora", "--init", "pissa"],
            "use_dora = true",
        ),
        (
            "flag_loraplus_ratio_negative",
            vec!["finetune", "--model", "model.safetensors", "--data", "data", "--out", "x", "--loraplus-lr-ratio", "-2"],
            "loraplus_lr_ratio = -2",
        ),
        ("flag_hidden_zero", vec!["params", "--hidden1", "0"], "--hidden1"),
        ("flag_adapter_without_name", vec!["eval", "--model", "model.safetensors", "--adapter", "adapter"], "NAME=DIR"),
        ("flag_unknown", vec!["demo", "--rnak", "2"], "--rnak"),
        (
            "flag_merge_weight_inf",
            vec!["merge", "--model", "model.safetensors", "--adapter", "adapter:inf", "--out", "m2.safetensors"],
            "not a finite number",
        ),
        // Output paths are checked before any work: an existing file where a directory goes and the reverse.
        (
            "out_finetune_onto_a_file",
            vec!["finetune", "--model", "model.safetensors", "--data", "data", "--out", "model.safetensors"],
            "--out model.safetensors: exists and is not a directory",
        ),
        ("out_pretrain_onto_a_directory", vec!["pretrain", "--data", "data", "--out", "adapter"], "--out adapter: is a directory"),
        (
            "out_json_under_a_file",
            vec!["eval", "--model", "model.safetensors", "--data", "data", "--json", "model.safetensors/x.json"],
            "model.safetensors is a file, not a directory",
        ),
        (
            "out_report_onto_a_file",
            vec!["demo", "--data", "data", "--report", "model.safetensors"],
            "--report model.safetensors: exists and is not a directory",
        ),
        ("out_graph_onto_a_directory", vec!["graph", "--out", "data"], "--out data: is a directory"),
    ] {
        cases.push(case(name, &args, expect));
    }
    // Combinations of two adapters with bad settings.
    let merge_two = ["merge", "--model", "model.safetensors", "--adapter", "adapter", "--adapter", "adapter", "--out", "m.safetensors"];
    for (name, extra, expect) in [
        ("flag_combination_unknown", &["--combination", "average"][..], "combination_type = average"),
        ("flag_ties_without_density", &["--combination", "ties"], "--density"),
        ("flag_density_negative", &["--combination", "ties", "--density", "-0.5"], "density = -0.5"),
        ("flag_svd_clamp_too_big", &["--combination", "svd", "--svd-clamp", "2"], "svd_clamp = 2"),
    ] {
        let mut c = case(name, &[&merge_two[..], extra].concat(), expect);
        c.absent = Some("m.safetensors".into());
        cases.push(c);
    }
    // Divergence: a learning rate that blows the loss up must stop training and write no model.
    let mut c = case(
        "diverging_training",
        &[
            "pretrain",
            "--data",
            "data",
            "--hidden1",
            "8",
            "--hidden2",
            "4",
            "--lr",
            "1e38",
            "--batch-size",
            "3",
            "--epochs",
            "5",
            "--out",
            "diverged.safetensors",
        ],
        "diverged at step",
    );
    c.absent = Some("diverged.safetensors".into());
    cases.push(c);
    cases
}

#[test]
fn every_bad_input_fails_cleanly_naming_what_is_wrong() {
    let keep = std::env::var_os("LORA_BAD_INPUT_DIR").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let d = keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&d).unwrap();
    let cases = build(&d);
    let failures = support::failures(&d, &cases);
    let tsv: String = cases.iter().map(|c| format!("{}\t{}\t{}\n", c.name, c.expect, c.args.join("\t"))).collect();
    if keep.is_some() {
        std::fs::write(d.join("cases.tsv"), tsv).unwrap();
    }
    assert!(cases.len() > 60, "the matrix shrank to {} cases", cases.len());
    support::check_doc("mnist", &cases);
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
