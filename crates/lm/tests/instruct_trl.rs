//! Instruction data tokenised by lora-rs gives the input ids and labels TRL's `SFTTrainer` builds for the same rows,
//! tokenizer and template (`tests/fixtures/chat/trl/expected.json`, made by scripts/make_chat_fixtures.py): every
//! format, loss on completions, on `{% generation %}`-marked assistant turns, or on everything.

use std::path::{Path, PathBuf};

use lora_lm::chat::{ChatTemplate, SpecialTokens};
use lora_lm::instruct::{read_instructions, Encoder, Format, LossOn, Row};
use lora_lm::{LlamaConfig, Tokenizer, TokenizerKind};
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat")
}

fn tokenizer(file: &str) -> Tokenizer {
    let config = LlamaConfig { vocab_size: 1024, tokenizer: TokenizerKind::File, ..LlamaConfig::byte_default() };
    Tokenizer::from_file(&fixture().join("trl").join(file), &config).unwrap()
}

fn template(name: &str, special: &Value) -> ChatTemplate {
    let source = std::fs::read_to_string(fixture().join("templates").join(format!("{name}.jinja"))).unwrap();
    ChatTemplate::new(&source, SpecialTokens::from_config(special, name).unwrap()).unwrap()
}

/// TRL's labels as lora-rs' trained flags (a label is the token itself, or −100).
fn trained(ids: &[u32], labels: &[i64], case: &str) -> Vec<bool> {
    ids.iter()
        .zip(labels)
        .map(|(&id, &l)| {
            assert!(l == -100 || l == id as i64, "{case}: a label that is neither −100 nor the token");
            l != -100
        })
        .collect()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn cases() -> Vec<Value> {
    let d: Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("trl/expected.json")).unwrap()).unwrap();
    d["cases"].as_array().unwrap().clone()
}

#[test]
fn every_format_gives_the_ids_and_labels_trl_builds() {
    let mut rows_checked = 0;
    for case in cases() {
        let name = format!(
            "{} / {} / {} / assistant_only_loss {} / completion_only_loss {}",
            case["tokenizer"], case["template"], case["rows"], case["assistant_only_loss"], case["completion_only_loss"]
        );
        let tok = tokenizer(case["tokenizer"].as_str().unwrap());
        let chat = template(case["template"].as_str().unwrap(), &case["special_tokens"]);
        let data = read_instructions(&fixture().join("trl").join(case["rows"].as_str().unwrap())).unwrap();
        // TRL trains every token of a conversation unless assistant_only_loss, and of a prompt/completion pair
        // when completion_only_loss is false.
        let all = case["completion_only_loss"] == Value::Bool(false)
            || (data.format == Format::Messages && case["assistant_only_loss"] == Value::Bool(false));
        let enc = Encoder { tokenizer: &tok, chat: &chat, loss: if all { LossOn::All } else { LossOn::Completions } };
        let want = case["examples"].as_array().unwrap();
        assert_eq!(data.train.len(), want.len(), "{name}");
        for ((line, row), w) in data.train.iter().zip(want) {
            let e = enc.encode(row, *line).unwrap_or_else(|e| panic!("{name}: {e}"));
            let ids = ids_of(&w["input_ids"]);
            let labels: Vec<i64> = w["labels"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
            assert_eq!(e.ids, ids, "{name}, line {line}: input ids");
            assert_eq!(e.trained, trained(&ids, &labels, &name), "{name}, line {line}: labels");
            rows_checked += 1;
        }
    }
    assert_eq!(rows_checked, 39, "13 cases of 3 rows");
}

#[test]
fn an_unmarked_templates_assistant_turn_is_what_trl_trains_of_the_same_chat_as_prompt_and_completion() {
    // A conversation ending in one assistant message, given as `messages`, trains the tokens TRL trains when the
    // same conversation is given as a prompt and its completion: the rule lora-rs applies to every assistant turn
    // of a template without {% generation %} blocks.
    let mut checked = 0;
    for case in cases().into_iter().filter(|c| c["rows"] == "chat_prompt_completion.jsonl" && c["assistant_only_loss"] == false) {
        let tok = tokenizer(case["tokenizer"].as_str().unwrap());
        let chat = template(case["template"].as_str().unwrap(), &case["special_tokens"]);
        assert!(!chat.has_generation_marks());
        let enc = Encoder { tokenizer: &tok, chat: &chat, loss: LossOn::Completions };
        let data = read_instructions(&fixture().join("trl/chat_prompt_completion.jsonl")).unwrap();
        for ((line, row), w) in data.train.iter().zip(case["examples"].as_array().unwrap()) {
            let Row::ChatPromptCompletion { prompt, completion } = row else { panic!("not a chat prompt/completion row") };
            let whole = Row::Messages(prompt.iter().chain(completion).cloned().collect());
            let e = enc.encode(&whole, *line).unwrap();
            let ids = ids_of(&w["input_ids"]);
            let labels: Vec<i64> = w["labels"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
            assert_eq!(e.ids, ids, "{}: line {line}", case["template"]);
            assert_eq!(e.trained, trained(&ids, &labels, "fallback"), "{}: line {line}", case["template"]);
            checked += 1;
        }
    }
    assert_eq!(checked, 12, "chatml, qwen2_5, llama3, phi3_5: 3 rows each");
}
