//! Adapter files and many adapters on one base, through the real binary: finetune → eval with several
//! adapters → merge → inspect, plus the base-fingerprint guard and the storage figures.

use std::path::Path;
use std::process::Command;

fn lora(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lora")).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = lora(args);
    assert!(o.status.success(), "{args:?} failed:\n{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn two_adapters_on_one_base_match_each_alone_and_merge_matches_unmerged() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    ok(&["pretrain", "--hidden1", "48", "--hidden2", "24", "--batch-size", "300", "--out", s(&p("m.safetensors"))]);
    for digit in ["9", "4"] {
        let out = p(&format!("a{digit}"));
        ok(&[
            "finetune",
            "--model",
            s(&p("m.safetensors")),
            "--digit",
            digit,
            "--steps",
            "25",
            "--rank",
            "2",
            "--alpha",
            "3",
            "--out",
            s(&out),
        ]);
        assert!(out.join("adapter_config.json").is_file() && out.join("adapter_model.safetensors").is_file());
        let cfg = json(&out.join("adapter_config.json"));
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["r"], 2);
        assert_eq!(cfg["lora_alpha"], 3.0);
        assert_eq!(cfg["bias"], "none");
        assert_eq!(cfg["use_dora"], false);
        assert_eq!(cfg["init_lora_weights"], "gaussian");
        assert_eq!(cfg["target_modules"], serde_json::json!(["linear1", "linear2", "linear3"]));
    }
    let both = p("both.json");
    ok(&[
        "eval",
        "--model",
        s(&p("m.safetensors")),
        "--adapter",
        &format!("d9={}", s(&p("a9"))),
        "--adapter",
        &format!("d4={}", s(&p("a4"))),
        "--json",
        s(&both),
    ]);
    let both = json(&both);
    for (name, dir) in [("d9", "a9"), ("d4", "a4")] {
        let alone = p(&format!("{name}.json"));
        ok(&["eval", "--model", s(&p("m.safetensors")), "--adapter", &format!("{name}={}", s(&p(dir))), "--json", s(&alone)]);
        let alone = json(&alone);
        assert_eq!(both["adapters"][name], alone["adapters"][name], "{name} differs when loaded beside another adapter");
        assert_eq!(both["base"], alone["base"]);
    }
    assert!(both["adapters"]["d9"]["wrong"][9].as_u64() < both["base"]["wrong"][9].as_u64());
    assert_ne!(both["adapters"]["d9"], both["adapters"]["d4"]);

    // Merge the digit-9 adapter into the weights: same predictions up to float rounding of the fold.
    ok(&["merge", "--model", s(&p("m.safetensors")), "--adapter", s(&p("a9")), "--out", s(&p("merged.safetensors"))]);
    let merged = p("merged.json");
    ok(&["eval", "--model", s(&p("merged.safetensors")), "--json", s(&merged)]);
    let (m, u) = (json(&merged)["accuracy"].as_f64().unwrap(), both["adapters"]["d9"]["accuracy"].as_f64().unwrap());
    // Logits agree to ~1e-5 (see crates/train/tests); at most a couple of near-tied test images may flip.
    assert!((m - u).abs() <= 2e-4, "merged {m} vs unmerged {u}");

    // Weighted merge of both (cat combination) works and is refused with a bad weight.
    ok(&[
        "merge",
        "--model",
        s(&p("m.safetensors")),
        "--adapter",
        &format!("{}:0.5", s(&p("a9"))),
        "--adapter",
        &format!("{}:0.5", s(&p("a4"))),
        "--out",
        s(&p("mix.safetensors")),
    ]);
    let o =
        lora(&["merge", "--model", s(&p("m.safetensors")), "--adapter", &format!("{}:inf", s(&p("a9"))), "--out", s(&p("x.safetensors"))]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("inf"));

    let info = ok(&["inspect", s(&p("a9"))]);
    assert!(info.contains("r = 2") && info.contains("linear2") && info.contains("SHA-256"), "{info}");
    let info = ok(&["inspect", s(&p("merged.safetensors"))]);
    assert!(info.contains("lora_rs.merged"), "{info}");

    // An adapter trained on another base is refused unless forced.
    ok(&["pretrain", "--hidden1", "48", "--hidden2", "24", "--batch-size", "600", "--seed", "5", "--out", s(&p("other.safetensors"))]);
    let o = lora(&["eval", "--model", s(&p("other.safetensors")), "--adapter", &format!("x={}", s(&p("a9")))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("different base model") && err.contains("--force"), "{err}");
    ok(&["eval", "--model", s(&p("other.safetensors")), "--adapter", &format!("x={}", s(&p("a9"))), "--force"]);
}

#[test]
fn a_rank_one_adapter_is_a_fraction_of_the_checkpoint_and_trains_a_fraction_of_the_parameters() {
    let d = tempfile::tempdir().unwrap();
    let j = d.path().join("b.json");
    ok(&["bench-adapters", "--adapters", "3", "--repeat", "5", "--json", s(&j)]);
    let b = json(&j);
    let (adapter, base) = (b["adapter_bytes"].as_u64().unwrap(), b["checkpoint_bytes"].as_u64().unwrap());
    assert!(adapter < 40_000, "adapter {adapter} bytes");
    assert!((11_200_000..11_300_000).contains(&base), "checkpoint {base} bytes");
    assert_eq!(b["trainable_params_lora"], 6794);
    assert_eq!(b["optimizer_state_bytes_full"], 2 * 4 * 2_807_010);
}

#[test]
fn the_peft_fixture_loads_through_eval() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft-lora-r2-rslora");
    let out = ok(&["eval", "--model", s(&fx.join("base.safetensors")), "--adapter", &format!("peft={}", s(&fx.join("adapter")))]);
    assert!(out.contains("peft") && out.contains("base"), "{out}");
}
