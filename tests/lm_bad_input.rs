//! The bad-input matrix of the language-model commands, through the real binary: every case exits
//! non-zero with an error naming the file and key (or flag and value), never panics, and writes nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use lora::io::{safetensors_bytes, write_atomic};
use lora_lm::hf::{save_adapter, save_model};
use lora_lm::{Llama, LlamaConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

mod support;
use support::Case;

fn tiny() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 8,
        max_position_embeddings: 32,
        ..LlamaConfig::byte_default()
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn edit_json(path: &Path, f: impl Fn(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

fn write_tensors(path: &Path, t: &[(String, Tensor)]) {
    write_atomic(path, &safetensors_bytes(t, &HashMap::from([("format".to_string(), "pt".to_string())])).unwrap()).unwrap();
}

fn case(name: &'static str, args: &str, expect: &str, absent: Option<&'static str>) -> Case {
    Case { absent: absent.map(String::from), ..Case::new(name, &args.split(' ').collect::<Vec<_>>(), expect) }
}

/// Builds the fixtures under `d` and returns the cases.
fn build(d: &Path) -> Vec<Case> {
    let m = Llama::random(&tiny(), 0).unwrap();
    save_model(&m, &d.join("m"), &BTreeMap::new()).unwrap();
    let mut ma = Llama::random(&tiny(), 0).unwrap();
    let cfg =
        lora::LoraConfig { target_modules: lora::Targets::Names(vec!["q_proj".into(), "v_proj".into()]), ..lora::LoraConfig::new(2, 4.0) };
    ma.lora_mut().add_adapter("a", &cfg, &mut StdRng::seed_from_u64(1)).unwrap();
    save_adapter(&ma, "a", &d.join("ad"), None, BTreeMap::new(), false).unwrap();
    let mut other = Llama::random(&tiny(), 9).unwrap();
    other.lora_mut().add_adapter("a", &cfg, &mut StdRng::seed_from_u64(1)).unwrap();
    save_adapter(&other, "a", &d.join("ad_other_base"), None, BTreeMap::new(), false).unwrap();
    std::fs::write(d.join("t.txt"), "SELECT 1;\n".repeat(20)).unwrap();
    std::fs::write(d.join("no_text.jsonl"), "{\"text\":\"a b c\"}\n{\"body\":\"x\"}\n").unwrap();
    std::fs::write(d.join("binary.txt"), [0xffu8, 0xfe, 0x00, 0x41]).unwrap();
    std::fs::write(d.join("a_file"), "x").unwrap();
    // Instruction data in TRL's formats, each file wrong in one way.
    let user = r#"{"role":"user","content":"hi"}"#;
    let system = r#"{"role":"system","content":"be brief"}"#;
    let answer = r#"{"role":"assistant","content":"yo"}"#;
    std::fs::write(d.join("chat_mixed.jsonl"), format!("{{\"messages\":[{user},{answer}]}}\n{{\"prompt\":\"a\",\"completion\":\"b\"}}\n"))
        .unwrap();
    std::fs::write(
        d.join("chat_no_content.jsonl"),
        format!("{{\"messages\":[{user},{answer}]}}\n{{\"messages\":[{{\"role\":\"user\"}}]}}\n"),
    )
    .unwrap();
    std::fs::write(d.join("chat_no_answers.jsonl"), format!("{{\"messages\":[{user}]}}\n{{\"messages\":[{system},{user}]}}\n")).unwrap();
    std::fs::write(
        d.join("chat_system.jsonl"),
        format!("{{\"messages\":[{user},{answer}]}}\n{{\"messages\":[{system},{user},{answer}]}}\n"),
    )
    .unwrap();
    std::fs::write(d.join("no_system.jinja"), "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
    std::fs::write(d.join("broken.jinja"), "{% for m in messages %}").unwrap();

    let variant = |name: &str, f: &dyn Fn(&Path)| {
        let p = d.join(name);
        copy_dir(&d.join("m"), &p);
        f(&p);
    };
    variant("m_no_hidden", &|p| edit_json(&p.join("config.json"), |v| drop(v.as_object_mut().unwrap().remove("hidden_size"))));
    variant("m_kv3", &|p| edit_json(&p.join("config.json"), |v| v["num_key_value_heads"] = 3.into()));
    // A context of 10⁹ used to abort building RoPE tables for every position at load; 2³² does not fit a position.
    variant("m_context_1e9", &|p| edit_json(&p.join("config.json"), |v| v["max_position_embeddings"] = 1_000_000_000u64.into()));
    variant("m_context_2e32", &|p| edit_json(&p.join("config.json"), |v| v["max_position_embeddings"] = 4_294_967_296u64.into()));
    variant("m_gpt2", &|p| edit_json(&p.join("config.json"), |v| v["model_type"] = "gpt2".into()));
    variant("m_bad_json", &|p| std::fs::write(p.join("config.json"), "{\"vocab_size\": 256,").unwrap());
    variant("m_no_config", &|p| std::fs::remove_file(p.join("config.json")).unwrap());
    variant("m_no_weights", &|p| std::fs::remove_file(p.join("model.safetensors")).unwrap());
    variant("m_wide", &|p| edit_json(&p.join("config.json"), |v| v["intermediate_size"] = 20.into()));
    let state = m.base_state().unwrap();
    variant("m_missing_tensor", &|p| {
        write_tensors(&p.join("model.safetensors"), &state.iter().filter(|(n, _)| n != "model.norm.weight").cloned().collect::<Vec<_>>())
    });
    variant("m_extra_tensor", &|p| {
        let mut s = state.clone();
        s.push(("model.layers.0.self_attn.q_proj.bias".into(), Tensor::zeros(16, candle_core::DType::F32, &Device::Cpu).unwrap()));
        write_tensors(&p.join("model.safetensors"), &s)
    });
    variant("m_shards", &|p| {
        std::fs::remove_file(p.join("model.safetensors")).unwrap();
        let (a, b): (Vec<_>, Vec<_>) = state.iter().cloned().partition(|(n, _)| n.contains("layers"));
        write_tensors(&p.join("model-00001-of-00002.safetensors"), &a);
        let mut map = serde_json::Map::new();
        for (n, _) in &a {
            map.insert(n.clone(), "model-00001-of-00002.safetensors".into());
        }
        for (n, _) in &b {
            map.insert(n.clone(), "model-00002-of-00002.safetensors".into());
        }
        std::fs::write(p.join("model.safetensors.index.json"), serde_json::json!({"weight_map": map}).to_string()).unwrap();
    });
    variant("m_bad_index", &|p| {
        std::fs::remove_file(p.join("model.safetensors")).unwrap();
        std::fs::write(p.join("model.safetensors.index.json"), "{\"metadata\": {}}").unwrap();
    });
    variant("m_no_tokenizer", &|p| edit_json(&p.join("config.json"), |v| drop(v.as_object_mut().unwrap().remove("lora_rs_tokenizer"))));
    variant("m_bad_tokenizer", &|p| {
        edit_json(&p.join("config.json"), |v| drop(v.as_object_mut().unwrap().remove("lora_rs_tokenizer")));
        std::fs::write(p.join("tokenizer.json"), "{\"model\": 3}").unwrap();
    });
    // An adapter for another architecture: the MNIST network's module names.
    std::fs::create_dir_all(d.join("ad_mnist")).unwrap();
    std::fs::write(d.join("ad_mnist/adapter_config.json"), r#"{"peft_type":"LORA","r":1,"lora_alpha":1,"target_modules":["linear1"]}"#)
        .unwrap();
    write_tensors(
        &d.join("ad_mnist/adapter_model.safetensors"),
        &[
            ("base_model.model.linear1.lora_A.weight".into(), Tensor::ones((1, 784), candle_core::DType::F32, &Device::Cpu).unwrap()),
            ("base_model.model.linear1.lora_B.weight".into(), Tensor::ones((1000, 1), candle_core::DType::F32, &Device::Cpu).unwrap()),
        ],
    );
    copy_dir(&d.join("ad"), &d.join("ad_shape"));
    write_tensors(
        &d.join("ad_shape/adapter_model.safetensors"),
        &[
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
                Tensor::ones((2, 15), candle_core::DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".into(),
                Tensor::ones((16, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight".into(),
                Tensor::ones((2, 16), candle_core::DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight".into(),
                Tensor::ones((8, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
            ),
        ],
    );

    let long_prompt = "x".repeat(40);
    let ev = "lm eval --data t.txt --model";
    let mut cases = vec![
        case("config_missing_key", &format!("{ev} m_no_hidden"), "missing key hidden_size", None),
        case("config_wrong_kv_heads", &format!("{ev} m_kv3"), "num_key_value_heads = 3", None),
        case("config_context_beyond_32_bits", &format!("{ev} m_context_2e32"), "max_position_embeddings = 4294967296", None),
        // Loads at once (tables are built for the lengths in use), then refuses only what is too long.
        case("config_context_1e9_too_long_a_window", &format!("{ev} m_context_1e9 --context 1000000001"), "--context 1000000001", None),
        case("config_other_architecture", &format!("{ev} m_gpt2"), "model_type = \"gpt2\"", None),
        case("config_not_json", &format!("{ev} m_bad_json"), "m_bad_json/config.json: not valid JSON", None),
        case("config_missing", &format!("{ev} m_no_config"), "m_no_config/config.json", None),
        case("weights_missing", &format!("{ev} m_no_weights"), "holds neither model.safetensors nor model.safetensors.index.json", None),
        case(
            "tensor_shape_mismatch",
            &format!("{ev} m_wide"),
            "tensor model.layers.0.mlp.gate_proj.weight: shape [24, 16], config.json implies [20, 16]",
            None,
        ),
        case("tensor_missing", &format!("{ev} m_missing_tensor"), "missing tensor model.norm.weight", None),
        case("tensor_unexpected", &format!("{ev} m_extra_tensor"), "unexpected tensor model.layers.0.self_attn.q_proj.bias", None),
        case(
            "shard_missing",
            &format!("{ev} m_shards"),
            "model-00002-of-00002.safetensors: missing shard listed in model.safetensors.index.json",
            None,
        ),
        case("index_without_weight_map", &format!("{ev} m_bad_index"), "model.safetensors.index.json: missing key weight_map", None),
        case("tokenizer_missing", &format!("{ev} m_no_tokenizer"), "m_no_tokenizer/tokenizer.json: missing", None),
        case("tokenizer_broken", &format!("{ev} m_bad_tokenizer"), "m_bad_tokenizer/tokenizer.json: not a valid tokenizer.json", None),
        case("adapter_other_architecture", "lm eval --data t.txt --model m --adapter x=ad_mnist", "the model has no module linear1", None),
        case(
            "adapter_wrong_shape",
            "lm eval --data t.txt --model m --adapter x=ad_shape",
            "q_proj.lora_A.weight: shape [2, 15], expected [2, 16]",
            None,
        ),
        case("adapter_other_base", "lm eval --data t.txt --model m --adapter x=ad_other_base", "different base model", None),
        case("adapter_named_base", "lm eval --data t.txt --model m --adapter base=ad", "the name \"base\" is taken", None),
        case("adapter_missing", "lm generate --model m --prompt a --adapter nowhere", "nowhere/adapter_config.json", None),
        case(
            "prompt_longer_than_context",
            &format!("lm generate --model m --prompt {long_prompt}"),
            "prompt 1 = 40 tokens: is longer than the model's context (32 tokens)",
            None,
        ),
        case("temperature_negative", "lm generate --model m --prompt a --temperature -1", "temperature = -1", None),
        case("top_p_above_one", "lm generate --model m --prompt a --top-p 2", "top_p = 2", None),
        case("jsonl_line_without_text", "lm eval --model m --data no_text.jsonl", "no_text.jsonl: line 2: missing key text", None),
        case("data_missing", "lm eval --model m --data missing.jsonl.gz", "missing.jsonl.gz", None),
        case("data_not_utf8", "lm eval --model m --data binary.txt", "binary.txt: not UTF-8 text", None),
        case(
            "eval_context_too_long",
            "lm eval --model m --data t.txt --context 64",
            "--context 64 is longer than the model's context (32)",
            None,
        ),
        case(
            "finetune_data_without_text",
            "lm finetune --model m --data no_text.jsonl --out out_a --steps 1",
            "line 2: missing key text",
            Some("out_a"),
        ),
        case(
            "finetune_unknown_target",
            "lm finetune --model m --data t.txt --out out_b --steps 1 --target-modules q_proj,nope",
            "nope",
            Some("out_b"),
        ),
        case(
            "finetune_target_regex_that_does_not_compile",
            "lm finetune --model m --data t.txt --out out_c --steps 1 --target-regex (bad",
            "target_modules = \"(bad\": not a regular expression",
            Some("out_c"),
        ),
        case(
            "finetune_target_regex_matching_nothing",
            "lm finetune --model m --data t.txt --out out_d --steps 1 --target-regex .*nothing",
            "adapts no module of this model",
            Some("out_d"),
        ),
        case(
            "finetune_loraplus_ratio_zero",
            "lm finetune --model m --data t.txt --out out_e --steps 1 --loraplus-lr-ratio 0",
            "loraplus_lr_ratio = 0",
            Some("out_e"),
        ),
        case(
            "finetune_dora_on_the_embedding",
            "lm finetune --model m --data t.txt --out out_h --steps 1 --target-modules embed_tokens --use-dora",
            "an embedding layer takes plain LoRA only",
            Some("out_h"),
        ),
        case(
            "finetune_lm_head_both_adapted_and_saved",
            "lm finetune --model m --data t.txt --out out_i --steps 1 --target-modules q_proj,lm_head --modules-to-save lm_head",
            "modules_to_save = lm_head",
            Some("out_i"),
        ),
        case(
            "finetune_out_is_a_file",
            "lm finetune --model m --data t.txt --out a_file --steps 1",
            "a_file: exists and is not a directory",
            None,
        ),
        case(
            "finetune_out_exists",
            "lm finetune --model m --data t.txt --out ad --steps 1",
            "ad/adapter_config.json: already exists",
            None,
        ),
        case(
            "finetune_seq_len_too_long",
            "lm finetune --model m --data t.txt --out out_c --steps 1 --seq-len 64",
            "seq_len = 64",
            Some("out_c"),
        ),
        case(
            "finetune_bad_dropout",
            "lm finetune --model m --data t.txt --out out_d --steps 1 --dropout 1.5",
            "lora_dropout = 1.5",
            Some("out_d"),
        ),
        case("pretrain_out_exists", "lm pretrain --out m --data t.txt --steps 1", "m/config.json: already exists", None),
        case(
            "pretrain_heads_do_not_divide",
            "lm pretrain --out out_e --data t.txt --steps 1 --hidden 30 --heads 8",
            "--hidden 30 is not a multiple of --heads 8",
            Some("out_e"),
        ),
        case(
            "pretrain_kv_heads_do_not_divide",
            "lm pretrain --out out_f --data t.txt --steps 1 --hidden 32 --heads 4 --kv-heads 3",
            "num_key_value_heads = 3",
            Some("out_f"),
        ),
        case("pretrain_data_weight", "lm pretrain --out out_g --data t.txt:-1 --steps 1", "weight -1", Some("out_g")),
    ];
    let ft = "lm finetune --model m --steps 1 --seq-len 16";
    cases.extend([
        case(
            "instruct_formats_mixed",
            &format!("{ft} --data chat_mixed.jsonl --out out_j"),
            "chat_mixed.jsonl: line 2: a prompt/completion row, but line 1 is a messages row",
            Some("out_j"),
        ),
        case(
            "instruct_message_without_content",
            &format!("{ft} --data chat_no_content.jsonl --out out_k"),
            "chat_no_content.jsonl: line 2: messages[0]: missing key content",
            Some("out_k"),
        ),
        case(
            "instruct_nothing_to_train",
            &format!("{ft} --data chat_no_answers.jsonl --out out_l"),
            "chat_no_answers.jsonl: no row trains any token (lines 1, 2)",
            Some("out_l"),
        ),
        case(
            "instruct_template_refuses_a_row",
            &format!("{ft} --data chat_system.jsonl --chat-template no_system.jinja --out out_m"),
            "chat_system.jsonl: line 2: chat template (no_system.jinja) = refused the conversation: System role not supported",
            Some("out_m"),
        ),
        case(
            "instruct_template_does_not_compile",
            &format!("{ft} --data chat_system.jsonl --chat-template broken.jinja --out out_n"),
            "chat template (broken.jinja) = does not compile",
            Some("out_n"),
        ),
        case(
            "instruct_template_missing",
            &format!("{ft} --data chat_system.jsonl --chat-template nowhere.jinja --out out_o"),
            "nowhere.jinja",
            Some("out_o"),
        ),
        case(
            "instruct_packing_on_a_corpus",
            &format!("{ft} --data t.txt --packing --out out_p"),
            "--packing, --chat-template and --loss-on apply to instruction data",
            Some("out_p"),
        ),
        case(
            "instruct_loss_on_bad_value",
            &format!("{ft} --data chat_system.jsonl --loss-on answers --out out_q"),
            "invalid value 'answers' for '--loss-on <WHERE>'",
            Some("out_q"),
        ),
        case(
            "instruct_eval_chat_template_without_chat_data",
            "lm eval --model m --data t.txt --chat-template no_system.jinja",
            "apply to instruction data",
            None,
        ),
    ]);
    cases.push(case(
        "resume_missing",
        "lm finetune --model m --data t.txt --out out_h --steps 1 --resume nope.safetensors",
        "nope.safetensors",
        Some("out_h"),
    ));
    cases
}

#[test]
fn every_bad_language_model_input_fails_cleanly_naming_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cases = build(d);
    let failures = support::failures(d, &cases);
    assert!(cases.len() >= 35, "the matrix shrank to {} cases", cases.len());
    support::check_doc("lm", &cases);
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
