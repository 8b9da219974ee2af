//! Chat templates of real model families (Llama 3, Llama 3.2, Qwen2.5, Gemma 2, Phi-3.5, Mistral Nemo, ChatML and
//! TRL's training variants) rendered by lora-rs exactly as transformers renders them: every conversation of
//! `tests/fixtures/chat/rendered.json` (made by scripts/make_chat_fixtures.py with transformers'
//! `apply_chat_template(tokenize=False)`), with and without the generation prompt, text for text; where the
//! template refuses the conversation, lora-rs refuses it with the template's own message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lora_lm::chat::{ChatTemplate, Message, SpecialTokens, CHATML};
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat")
}

fn messages(v: &Value) -> Vec<Message> {
    v.as_array().unwrap().iter().map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap())).collect()
}

#[test]
fn every_family_template_renders_every_conversation_as_transformers_does() {
    let d: Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("rendered.json")).unwrap()).unwrap();
    let conversations = d["conversations"].as_object().unwrap();
    let mut checked = 0;
    let mut refused = 0;
    for (name, t) in d["templates"].as_object().unwrap() {
        let source = std::fs::read_to_string(fixture().join("templates").join(format!("{name}.jinja"))).unwrap();
        let special = SpecialTokens::from_config(&t["special_tokens"], name).unwrap();
        let template = ChatTemplate::new(&source, special).unwrap_or_else(|e| panic!("{name}: {e}"));
        let extra: BTreeMap<String, Value> = t["extra"].as_object().unwrap().clone().into_iter().collect();
        for case in t["cases"].as_array().unwrap() {
            let conv = case["conversation"].as_str().unwrap();
            let gen = case["add_generation_prompt"].as_bool().unwrap();
            let got = template.render_with(&messages(&conversations[conv]), gen, &extra);
            match (case.get("text"), got) {
                (Some(want), Ok(text)) => assert_eq!(text, want.as_str().unwrap(), "{name} / {conv} / generation prompt {gen}"),
                (None, Err(e)) => {
                    let want = case["error"].as_str().unwrap();
                    assert!(e.to_string().contains(want), "{name} / {conv}: {e} lacks {want:?}");
                    refused += 1;
                }
                (want, got) => panic!("{name} / {conv} / {gen}: transformers gave {want:?}, lora-rs {got:?}"),
            }
            checked += 1;
        }
    }
    assert_eq!((checked, refused), (90, 6), "the fixture's cases: 9 templates × 5 conversations × 2, 6 refusals");
}

#[test]
fn the_built_in_default_is_the_chatml_template_transformers_renders() {
    let fixture = std::fs::read_to_string(fixture().join("templates/chatml.jinja")).unwrap();
    assert_eq!(CHATML, fixture);
}
