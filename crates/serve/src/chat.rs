//! `POST /v1/chat/completions`: OpenAI's chat completions. The messages are rendered with the model's chat
//! template (transformers' `apply_chat_template(messages, add_generation_prompt=True)`, [`lora_lm::chat`]),
//! tokenised without added special tokens (the template writes them), and completed by the same batching worker
//! as `/v1/completions`, each request with its own adapter (`model`). A reply ends at the model's end tokens
//! (`config.json`, `generation_config.json`, the template's `eos_token`) or, where the tokenizer spells them out
//! (byte-level models), at the template's end text (`<|im_end|>` for the default ChatML); the end itself is not
//! sent. Non-streamed: one `chat.completion` with `message` and `usage`; streamed: a first chunk with the role,
//! `delta.content` pieces, a chunk with the finish reason (and with `stream_options.include_usage`, one with the
//! usage), then `[DONE]`.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::State as AxState;
use axum::response::sse::KeepAlive;
use axum::response::{IntoResponse, Response};
use axum::Json;
use lora_lm::chat::Message;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::routes::{
    body, check_fits, collect_completion, joined, max_tokens_of, observed, parse, refuse_penalties, resolve, sampling_of, stops_of,
    stream_completion, submit, unix_now, wrong_kind, Ask, Reply, Shape, StreamOptions, S,
};

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Value>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<u64>,
    stop: Option<Value>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u64>,
    logprobs: Option<bool>,
    top_logprobs: Option<Value>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    response_format: Option<Value>,
}

/// Refuses the chat options this server does not honour, by name.
fn refuse_unsupported_chat(r: &ChatRequest) -> Result<(), ApiError> {
    let no = |field: &str, why: &str| Err(ApiError::invalid(field, format!("{field}: {why}")));
    if r.n.is_some_and(|n| n != 1) {
        return no("n", "only n = 1 is served (send the request several times)");
    }
    if r.logprobs == Some(true) || r.top_logprobs.as_ref().is_some_and(|v| !v.is_null()) {
        return no("logprobs", "log-probabilities are not served");
    }
    refuse_penalties(r.presence_penalty, r.frequency_penalty, r.logit_bias.as_ref())?;
    if r.tools.as_ref().is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
        return no("tools", "tool calls are not served");
    }
    if r.tool_choice.as_ref().is_some_and(|v| !v.is_null() && v.as_str() != Some("none")) {
        return no("tool_choice", "tool calls are not served");
    }
    if r.response_format.as_ref().is_some_and(|v| !v.is_null() && v.get("type").and_then(Value::as_str) != Some("text")) {
        return no("response_format", "only {\"type\": \"text\"} is served");
    }
    Ok(())
}

/// The messages of a chat request: `{role, content}` with content a string or a list of text parts (joined);
/// keys holding null are dropped, other keys refused by name.
fn chat_messages(items: &[Value]) -> Result<Vec<Message>, ApiError> {
    if items.is_empty() {
        return Err(ApiError::invalid("messages", "messages is empty: give at least one message"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let bad = |why: String| ApiError::invalid("messages", format!("messages[{i}]{why}"));
            let Some(o) = m.as_object() else { return Err(bad(format!(" = {:.60}: must be {{\"role\", \"content\"}}", m.to_string()))) };
            if let Some((k, _)) = o.iter().find(|(k, v)| *k != "role" && *k != "content" && !v.is_null()) {
                return Err(bad(format!(".{k}: not served (a message is its role and content)")));
            }
            let role = match o.get("role") {
                Some(Value::String(r)) if !r.is_empty() => r.clone(),
                other => return Err(bad(format!(".role = {}: must be a non-empty string", other.unwrap_or(&Value::Null)))),
            };
            let content = match o.get("content") {
                Some(Value::String(c)) => c.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .enumerate()
                    .map(|(j, p)| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => Ok(t.to_string()),
                        _ => Err(bad(format!(
                            ".content[{j}] = {:.60}: only {{\"type\": \"text\", \"text\": string}} parts are served",
                            p.to_string()
                        ))),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
                other => {
                    return Err(bad(format!(".content = {}: must be a string or a list of text parts", other.unwrap_or(&Value::Null))))
                }
            };
            Ok(Message { role, content })
        })
        .collect()
}

pub(crate) async fn chat_completions(AxState(state): S, b: Result<Json<Value>, JsonRejection>) -> Response {
    observed(state, "/v1/chat/completions", |state, model| async move {
        let deadline = Instant::now() + state.timeouts.request;
        let Some(lm) = &state.lm else { return Err(wrong_kind(&state, "/v1/chat/completions")) };
        let r: ChatRequest = parse(body(b, state.limits.max_body_bytes)?)?;
        refuse_unsupported_chat(&r)?;
        let chat = match &lm.chat {
            Ok(c) => c,
            Err(why) => return Err(ApiError::invalid("messages", why.clone())),
        };
        let adapter = resolve(&state, &r.model).await?;
        model.set(r.model.clone());
        let messages = chat_messages(&r.messages)?;
        let max_tokens =
            max_tokens_of(r.max_completion_tokens.or(r.max_tokens), 256.min(state.limits.max_tokens), &state.limits, "max_tokens")?;
        let sampling = sampling_of(r.temperature, r.top_p, r.top_k, r.seed)?;
        let mut stop = stops_of(&r.stop)?;
        stop.extend(chat.stops.iter().cloned());
        // Rendering and tokenising cost CPU in proportion to the conversation: on the blocking pool.
        let (template, tokenizer) = (chat.template.clone(), lm.tokenizer.clone());
        let ids = tokio::task::spawn_blocking(move || -> Result<Vec<u32>, ApiError> {
            let text = template.render(&messages, true).map_err(|e| ApiError::invalid("messages", e.to_string()))?;
            Ok(tokenizer.encode_plain(&text).map_err(|e| ApiError::invalid("messages", e.to_string()))?.0)
        })
        .await
        .map_err(joined)??;
        check_fits(&ids, max_tokens, lm.context, "messages (rendered with the chat template)")?;
        let prompt_tokens = ids.len();
        let ask = Ask { max_tokens, sampling, stop, stop_ids: chat.end_ids.clone(), adapter, model: r.model.clone() };
        let rx = submit(lm, vec![ids], &ask, deadline)?;
        let id = format!("chatcmpl-{:x}", state.next_id.fetch_add(1, Ordering::Relaxed));
        let reply = Reply { shape: Shape::Chat, id, created: unix_now(), model: r.model, prompt_tokens, deadline };
        if r.stream {
            let usage = r.stream_options.as_ref().is_some_and(|o| o.include_usage);
            Ok(stream_completion(rx, reply, usage).keep_alive(KeepAlive::new().interval(state.timeouts.keep_alive)).into_response())
        } else {
            collect_completion(rx, 1, reply).await
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use lora_lm::chat::{ChatTemplate, Message, CHATML};
    use serde_json::{json, Value};

    use crate::testing::{get, options, post, write_lm, Running};

    fn hi() -> Value {
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "SELECT"}])
    }

    /// The data lines of a server-sent event stream, parsed (`[DONE]` as a string).
    async fn events(c: &reqwest::Client, url: &str, body: &Value) -> Vec<Value> {
        let text = c.post(url).json(body).send().await.unwrap().text().await.unwrap();
        text.split("\n\n")
            .filter_map(|e| e.trim().strip_prefix("data:"))
            .map(|d| serde_json::from_str(d.trim()).unwrap_or_else(|_| Value::String(d.trim().to_string())))
            .collect()
    }

    /// The greedy text `/v1/completions` gives for the conversation rendered with ChatML and the generation prompt.
    async fn completion_of_rendered(c: &reqwest::Client, url: &str, model: &str, messages: &Value, max: usize) -> String {
        let m: Vec<Message> = serde_json::from_value(messages.clone()).unwrap();
        let prompt = ChatTemplate::chatml().render(&m, true).unwrap();
        let (status, v) =
            post(c, &format!("{url}/v1/completions"), &json!({"model": model, "prompt": prompt, "max_tokens": max, "temperature": 0}))
                .await;
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["text"].as_str().unwrap().to_string()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chat_reply_is_the_completion_of_the_rendered_conversation_streamed_or_not() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 128);
        let s = Running::start(options(d.path())).await;
        let c = reqwest::Client::new();
        let u = format!("{}/v1/chat/completions", s.url);
        let (_, h) = get(&c, &format!("{}/health", s.url)).await;
        assert_eq!(h["chat"]["default"], true, "{h}");
        for model in ["base", "a"] {
            let want = completion_of_rendered(&c, &s.url, model, &hi(), 24).await;
            assert!(!want.contains("<|im_end|>"), "the random model wrote the end marker: pick another prompt");
            let (status, v) = post(&c, &u, &json!({"model": model, "messages": hi(), "max_tokens": 24, "temperature": 0})).await;
            assert_eq!(status, 200, "{v}");
            assert_eq!((v["object"].as_str(), v["model"].as_str()), (Some("chat.completion"), Some(model)));
            let choice = &v["choices"][0];
            assert_eq!((choice["message"]["role"].as_str(), choice["finish_reason"].as_str()), (Some("assistant"), Some("length")));
            assert_eq!(choice["message"]["content"].as_str().unwrap(), want, "{model}");
            let prompt_tokens = ChatTemplate::chatml().render(&serde_json::from_value::<Vec<Message>>(hi()).unwrap(), true).unwrap().len();
            assert_eq!(v["usage"], json!({"prompt_tokens": prompt_tokens, "completion_tokens": 24, "total_tokens": prompt_tokens + 24}));
            // Streamed: the role first, then the same text in deltas, the finish reason, the usage, [DONE].
            let body = json!({"model": model, "messages": hi(), "max_tokens": 24, "temperature": 0, "stream": true,
                "stream_options": {"include_usage": true}});
            let ev = events(&c, &u, &body).await;
            assert_eq!(ev[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}), "{ev:?}");
            assert!(ev.iter().take(ev.len() - 1).all(|e| e["object"] == "chat.completion.chunk" && e["id"] == ev[0]["id"]));
            let text: String = ev.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
            assert_eq!(text, want, "{model}: streamed");
            let n = ev.len();
            assert_eq!(ev[n - 3]["choices"][0]["finish_reason"], "length");
            assert_eq!(ev[n - 3]["choices"][0]["delta"], json!({}));
            assert_eq!((ev[n - 2]["choices"].as_array().map(Vec::len), &ev[n - 2]["usage"]["completion_tokens"]), (Some(0), &json!(24)));
            assert_eq!(ev[n - 1], "[DONE]");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_byte_level_reply_stops_before_the_templates_end_text_and_a_request_stop_string() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 128);
        let c = reqwest::Client::new();
        let s = Running::start(options(d.path())).await;
        let full = completion_of_rendered(&c, &s.url, "base", &hi(), 30).await;
        // A request's own stop string ends the reply before it (the random model writes random bytes: cut at an
        // ASCII character past the first).
        let (_, cut) = full.char_indices().skip(1).find(|(_, ch)| ch.is_ascii_graphic()).expect("an ASCII character in the reply");
        let u = format!("{}/v1/chat/completions", s.url);
        let stop = cut.to_string();
        let (_, v) = post(&c, &u, &json!({"model": "base", "messages": hi(), "max_tokens": 30, "temperature": 0, "stop": [stop]})).await;
        assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), &full[..full.find(cut).unwrap()]);
        s.stop().await;
        // A template of the model's own: ChatML's text with an end token the model writes a few characters in.
        let (at, end) =
            full.char_indices().skip(3).find(|(i, ch)| ch.is_ascii_graphic() && !full[..*i].contains(*ch)).expect("a new ASCII character");
        let config = json!({"chat_template": CHATML, "eos_token": end.to_string()});
        std::fs::write(d.path().join("base/tokenizer_config.json"), config.to_string()).unwrap();
        let s = Running::start(options(d.path())).await;
        let u = format!("{}/v1/chat/completions", s.url);
        let (status, v) = post(&c, &u, &json!({"model": "base", "messages": hi(), "max_tokens": 30, "temperature": 0})).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            (v["choices"][0]["message"]["content"].as_str().unwrap(), v["choices"][0]["finish_reason"].as_str()),
            (&full[..at], Some("stop"))
        );
        let (_, h) = get(&c, &format!("{}/health", s.url)).await;
        assert_eq!(h["chat"]["default"], false, "{h}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_chat_requests_get_a_400_naming_the_field_and_the_server_keeps_serving() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 64);
        std::fs::write(
            d.path().join("base/tokenizer_config.json"),
            json!({"chat_template": "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ messages[0].content }}"}).to_string(),
        )
        .unwrap();
        let s = Running::start(options(d.path())).await;
        let c = reqwest::Client::new();
        let u = format!("{}/v1/chat/completions", s.url);
        let user = json!([{"role": "user", "content": "a"}]);
        for (extra, field, want) in [
            (json!({"messages": []}), "messages", "messages is empty"),
            (json!({"messages": hi()}), "messages", "System role not supported"),
            (json!({"messages": [{"role": "user", "content": "a", "tool_calls": []}]}), "messages", "messages[0].tool_calls: not served"),
            (json!({"messages": [{"role": "user", "content": 3}]}), "messages", "messages[0].content = 3"),
            (json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "messages", "only {\"type\": \"text\""),
            (json!({"messages": [{"content": "a"}]}), "messages", "messages[0].role = null"),
            (json!({"messages": user, "n": 2}), "n", "only n = 1"),
            (json!({"messages": user, "tools": [{"type": "function"}]}), "tools", "tool calls are not served"),
            (json!({"messages": user, "logprobs": true}), "logprobs", "not served"),
            (json!({"messages": user, "response_format": {"type": "json_object"}}), "response_format", "only {\"type\": \"text\"}"),
            (json!({"messages": user, "max_tokens": 0}), "max_tokens", "max_tokens = 0"),
            (json!({"messages": user, "max_tokens": 64}), "messages", "maximum context length is 64 tokens"),
            (json!({"messages": user, "temperature": 3}), "temperature", "temperature = 3"),
            (json!({"messages": user, "stop": ["a", ""]}), "stop", "non-empty"),
            (json!({"messages": "hi"}), "messages", "invalid type"),
        ] {
            let mut body = json!({"model": "base"});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            let (status, v) = post(&c, &u, &body).await;
            assert_eq!((status, v["error"]["param"].as_str()), (400, Some(field)), "{body}: {v}");
            assert!(v["error"]["message"].as_str().unwrap().contains(want), "{body}: {v}");
        }
        let (status, v) = post(&c, &u, &json!({"model": "nope", "messages": user})).await;
        assert_eq!((status, v["error"]["param"].as_str()), (404, Some("model")), "{v}");
        let (status, v) = post(&c, &u, &json!({"model": "base", "messages": user, "max_tokens": 3, "max_completion_tokens": 2})).await;
        assert_eq!((status, v["usage"]["completion_tokens"].as_u64()), (200, Some(2)), "max_completion_tokens wins: {v}");
    }

    /// The ids `lora_lm::generate` picks greedily after the conversation rendered with `template`.
    fn greedy_reply_ids(dir: &Path, template: &Path, messages: &Value, n: usize) -> Vec<u32> {
        let (model, _) = lora_lm::hf::load_model(dir).unwrap();
        let tok = lora_lm::hf::load_tokenizer(dir, model.config()).unwrap();
        let t = lora_lm::hf::load_chat_template(dir, model.config(), Some(template)).unwrap();
        let m: Vec<Message> = serde_json::from_value(messages.clone()).unwrap();
        let prompt = tok.encode_plain(&t.render(&m, true).unwrap()).unwrap().0;
        let out = lora_lm::generate::generate(&model, &[prompt], n, &lora_lm::generate::Sampling::greedy(), &[], |_, _| Ok(true)).unwrap();
        out[0].tokens.clone()
    }

    /// The transformers fixture model with its tokenizer, in one folder: `generation_config` written if given.
    fn hf_model(dir: &Path, generation_config: Option<Value>) {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama-peft-tiny");
        std::fs::create_dir_all(dir.join("base")).unwrap();
        for (from, name) in [
            ("base", "config.json"),
            ("base", "model.safetensors"),
            ("tokenizer", "tokenizer.json"),
            ("tokenizer", "tokenizer_config.json"),
        ] {
            std::fs::copy(fixture.join(from).join(name), dir.join("base").join(name)).unwrap();
        }
        if let Some(g) = generation_config {
            std::fs::write(dir.join("base/generation_config.json"), g.to_string()).unwrap();
        }
        std::fs::create_dir_all(dir.join("adapters")).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_without_a_template_refuses_chats_by_name_and_generation_config_end_tokens_stop_replies() {
        let d = tempfile::tempdir().unwrap();
        hf_model(d.path(), None);
        let c = reqwest::Client::new();
        let body = json!({"model": "base", "messages": [{"role": "user", "content": "select name from users"}], "max_tokens": 12, "temperature": 0});
        let s = Running::start(options(d.path())).await;
        let (_, h) = get(&c, &format!("{}/health", s.url)).await;
        assert_eq!(h["chat"], Value::Null, "{h}");
        let (status, v) = post(&c, &format!("{}/v1/chat/completions", s.url), &body).await;
        assert_eq!(status, 400, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("--chat-template"), "{v}");
        // Completions still work.
        let (status, _) =
            post(&c, &format!("{}/v1/completions", s.url), &json!({"model": "base", "prompt": "select", "max_tokens": 2})).await;
        assert_eq!(status, 200);
        s.stop().await;
        // With a template given: the reply's ids, then the same with the 4th of them made an end token.
        let template = d.path().join("chatml.jinja");
        std::fs::write(&template, CHATML).unwrap();
        let with_template = || crate::ServeOptions { chat_template: Some(template.clone()), ..options(d.path()) };
        let s = Running::start(with_template()).await;
        let (status, v) = post(&c, &format!("{}/v1/chat/completions", s.url), &body).await;
        assert_eq!((status, v["choices"][0]["finish_reason"].as_str()), (200, Some("length")), "{v}");
        let full = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        s.stop().await;
        let lm = greedy_reply_ids(&d.path().join("base"), &template, &body["messages"], 12);
        let end = lm[3];
        assert!(!lm[..3].contains(&end), "the 4th token appears earlier: {lm:?}");
        hf_model(d.path(), Some(json!({"eos_token_id": [1, end]})));
        let s = Running::start(with_template()).await;
        let (_, v) = post(&c, &format!("{}/v1/chat/completions", s.url), &body).await;
        assert_eq!((v["choices"][0]["finish_reason"].as_str(), v["usage"]["completion_tokens"].as_u64()), (Some("stop"), Some(3)), "{v}");
        let reply = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(full.starts_with(reply) && reply.len() < full.len(), "{reply:?} is not a start of {full:?}");
    }
}
