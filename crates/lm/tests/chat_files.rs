//! A model folder's chat files: the template from `tokenizer_config.json` (a string or transformers' list of
//! named templates), `chat_template.jinja` or a file given for it, lora-rs' default for byte-level models, a clear
//! error otherwise; the special tokens it renders with; and the end tokens of `config.json` and
//! `generation_config.json` (one or a list).

use std::path::Path;

use lora_lm::chat::Message;
use lora_lm::hf::{end_token_ids, load_chat_template, read_special_tokens};
use lora_lm::{LlamaConfig, TokenizerKind};

fn hf_config() -> LlamaConfig {
    LlamaConfig { vocab_size: 96, tokenizer: TokenizerKind::File, eos_token_ids: vec![2], ..LlamaConfig::byte_default() }
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn hi() -> Vec<Message> {
    vec![Message::new("user", "hi")]
}

#[test]
fn the_template_comes_from_the_given_file_then_tokenizer_config_then_chat_template_jinja() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let c = hf_config();
    let e = load_chat_template(dir, &c, None).unwrap_err().to_string();
    assert!(e.contains("has no chat template") && e.contains("--chat-template"), "{e}");
    write(dir, "chat_template.jinja", "J:{{ messages[0].content }}{{ eos_token }}");
    write(dir, "tokenizer_config.json", r#"{"eos_token": {"content": "</s>", "special": true}}"#);
    assert_eq!(load_chat_template(dir, &c, None).unwrap().render(&hi(), false).unwrap(), "J:hi</s>");
    write(dir, "tokenizer_config.json", r#"{"eos_token": "</s>", "chat_template": "T:{{ messages[0].content }}"}"#);
    assert_eq!(load_chat_template(dir, &c, None).unwrap().render(&hi(), false).unwrap(), "T:hi");
    write(
        dir,
        "tokenizer_config.json",
        r#"{"chat_template": [{"name": "tool_use", "template": "X"}, {"name": "default", "template": "D:{{ messages[0].content }}"}]}"#,
    );
    assert_eq!(load_chat_template(dir, &c, None).unwrap().render(&hi(), false).unwrap(), "D:hi");
    write(dir, "mine.jinja", "F:{{ messages[0].content }}{{ eos_token }}");
    write(dir, "tokenizer_config.json", r#"{"eos_token": "<e>", "chat_template": "T"}"#);
    let t = load_chat_template(dir, &c, Some(&dir.join("mine.jinja"))).unwrap();
    assert_eq!(t.render(&hi(), false).unwrap(), "F:hi<e>", "a given file wins, rendered with the model's special tokens");
    assert_eq!(read_special_tokens(dir).unwrap().eos.as_deref(), Some("<e>"));
}

#[test]
fn a_byte_level_model_without_a_template_gets_chatml_and_bad_files_are_named() {
    let d = tempfile::tempdir().unwrap();
    let t = load_chat_template(d.path(), &LlamaConfig::byte_default(), None).unwrap();
    assert!(t.is_default());
    assert_eq!(t.render(&hi(), true).unwrap(), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    write(d.path(), "tokenizer_config.json", "{oops");
    let e = load_chat_template(d.path(), &LlamaConfig::byte_default(), None).unwrap_err().to_string();
    assert!(e.contains("tokenizer_config.json") && e.contains("not valid JSON"), "{e}");
    write(d.path(), "tokenizer_config.json", r#"{"chat_template": 5}"#);
    let e = load_chat_template(d.path(), &LlamaConfig::byte_default(), None).unwrap_err().to_string();
    assert!(e.contains("chat_template = 5"), "{e}");
    write(d.path(), "tokenizer_config.json", r#"{"chat_template": "{% for %}"}"#);
    let e = load_chat_template(d.path(), &LlamaConfig::byte_default(), None).unwrap_err().to_string();
    assert!(e.contains("tokenizer_config.json") && e.contains("does not compile"), "{e}");
    let e = load_chat_template(d.path(), &LlamaConfig::byte_default(), Some(&d.path().join("missing.jinja"))).unwrap_err().to_string();
    assert!(e.contains("missing.jinja"), "{e}");
}

#[test]
fn end_tokens_are_config_jsons_then_generation_configs_one_or_a_list() {
    let d = tempfile::tempdir().unwrap();
    let c = hf_config();
    assert_eq!(end_token_ids(d.path(), &c).unwrap(), vec![2]);
    write(d.path(), "generation_config.json", r#"{"eos_token_id": [2, 7, 9]}"#);
    assert_eq!(end_token_ids(d.path(), &c).unwrap(), vec![2, 7, 9]);
    write(d.path(), "generation_config.json", r#"{"eos_token_id": 5, "bos_token_id": 1}"#);
    assert_eq!(end_token_ids(d.path(), &c).unwrap(), vec![2, 5]);
    for (bad, want) in
        [(r#"{"eos_token_id": 96}"#, "eos_token_id = 96"), (r#"{"eos_token_id": ["a"]}"#, "eos_token_id = \"a\""), ("[]", "JSON object")]
    {
        write(d.path(), "generation_config.json", bad);
        let e = end_token_ids(d.path(), &c).unwrap_err().to_string();
        assert!(e.contains("generation_config.json") && e.contains(want), "{bad}: {e}");
    }
    // The transformers fixture: generation_config.json repeats config.json's end token.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama-peft-tiny/base");
    let config = lora_lm::hf::read_config(&fixture).unwrap();
    assert_eq!(end_token_ids(&fixture, &config).unwrap(), vec![2]);
}
