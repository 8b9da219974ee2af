//! The HTTP routes. Every failure is an [`ApiError`]: a 4xx (or 5xx) with an OpenAI-shaped JSON body.
//!
//! | route | does |
//! |---|---|
//! | `GET /health` | `{"status": "ok", "kind", "model", "adapters_loaded"}` |
//! | `GET /metrics` | Prometheus metrics |
//! | `GET /v1/models` | the base and each adapter (`parent` = the base; `lora` = rank, alpha, targets, size, fingerprint) |
//! | `POST /v1/completions` | OpenAI completions (LM), streamed as server-sent events with `"stream": true` |
//! | `POST /v1/predict` | `{"model", "images": [[pixels 0-255]]}` → predictions and probabilities (classifier) |
//! | `GET /v1/mnist/sample` | a random test image and its label (classifier) |
//! | `POST /v1/load_lora_adapter` | `{"lora_name", "lora_path", "load_inplace"?}` |
//! | `POST /v1/unload_lora_adapter` | `{"lora_name"}` |

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State as AxState};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use lora_lm::generate::Sampling;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::lm::{Event, FinishReason, Job};
use crate::metrics::{RouteLabel, RouteModel, RouteModelStatus};
use crate::registry::{Lookup, ServedAdapter};
use crate::server::{ModelKind, State};

type S = AxState<Arc<State>>;

pub(crate) fn router(state: Arc<State>) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/predict", post(predict))
        .route("/v1/mnist/sample", get(sample))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::status(StatusCode::NOT_FOUND, format!("no route {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::status(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {}", uri.path()))
}

/// Records a finished request in the metrics.
fn record(state: &State, route: &str, model: &str, started: Instant, status: StatusCode) {
    let m = &state.metrics;
    m.requests.get_or_create(&RouteModel { route: route.into(), model: model.into() }).inc();
    m.latency.get_or_create(&RouteLabel { route: route.into() }).observe(started.elapsed().as_secs_f64());
    if !status.is_success() {
        m.errors.get_or_create(&RouteModelStatus { route: route.into(), model: model.into(), status: status.as_u16() }).inc();
    }
}

/// The model label of a request's metrics, set once the request names a known model.
#[derive(Clone, Default)]
struct ModelSlot(Arc<std::sync::Mutex<Option<String>>>);

impl ModelSlot {
    fn set(&self, name: String) {
        if let Ok(mut m) = self.0.lock() {
            *m = Some(name);
        }
    }
    fn get(&self) -> String {
        self.0.lock().ok().and_then(|m| m.clone()).unwrap_or_else(|| "-".to_string())
    }
}

/// Runs a handler body and records its outcome.
async fn observed<F, Fut>(state: Arc<State>, route: &'static str, f: F) -> Response
where
    F: FnOnce(Arc<State>, ModelSlot) -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let started = Instant::now();
    let slot = ModelSlot::default();
    let out = f(state.clone(), slot.clone()).await;
    let model = slot.get();
    let response = out.unwrap_or_else(|e| {
        tracing::debug!(route, status = e.status.as_u16(), message = %e.message, "request refused");
        e.into_response()
    });
    record(&state, route, &model, started, response.status());
    response
}

/// The body as JSON, or a JSON error naming what is wrong with it (413 when over the size limit).
fn body(b: Result<Json<Value>, JsonRejection>, limit: usize) -> Result<Value, ApiError> {
    match b {
        Ok(Json(v)) => Ok(v),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::status(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is over the limit of {limit} bytes")))
        }
        Err(e) => Err(ApiError::status(
            if e.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE { e.status() } else { StatusCode::BAD_REQUEST },
            format!("the request body is not valid JSON: {}", e.body_text()),
        )),
    }
}

/// The request as `T`; an error names the field (`images: invalid type: integer `3`, expected a sequence`).
fn parse<T: for<'de> Deserialize<'de>>(v: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::status(StatusCode::BAD_REQUEST, format!("bad request: {inner}"))
        } else {
            ApiError::invalid(path.clone(), format!("{path}: {inner}"))
        }
    })
}

/// The adapter `model` names (`None` for the base), or a 404 in OpenAI's words.
async fn resolve(state: &Arc<State>, model: &str) -> Result<Option<Arc<ServedAdapter>>, ApiError> {
    if model == state.registry.base_name() {
        return Ok(None);
    }
    // Held adapters are a lock away; only an evicted one is read from disk, off the async threads.
    let got = match state.registry.lookup(model)? {
        Lookup::Held(a) => Some(a),
        Lookup::Unknown => None,
        Lookup::Evicted => {
            let (registry, name) = (state.registry.clone(), model.to_string());
            tokio::task::spawn_blocking(move || registry.reload(&name))
                .await
                .map_err(|e| ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??
        }
    };
    got.map(Some).ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("The model `{model}` does not exist."),
        param: Some("model".into()),
    })
}

fn wrong_kind(state: &State, route: &str) -> ApiError {
    let other = match state.kind {
        ModelKind::Lm => "/v1/completions",
        ModelKind::Classifier => "/v1/predict",
    };
    ApiError::status(
        StatusCode::NOT_FOUND,
        format!("this server runs a {} model: {route} is not served here; use {other}", state.kind.as_str()),
    )
}

/// The page to try the adapters (issue: a web page, no build step, no external files).
async fn page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("page.html"))
}

async fn health(AxState(state): S) -> Response {
    Json(json!({"status": "ok", "kind": state.kind.as_str(), "model": state.registry.base_name(),
        "adapters_loaded": state.registry.held()}))
    .into_response()
}

async fn metrics(AxState(state): S) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.render()).into_response()
}

async fn models(AxState(state): S) -> Response {
    let base = state.registry.base_name();
    let mut data =
        vec![json!({"id": base, "object": "model", "created": state.created, "owned_by": "lora-rs", "root": base, "parent": null})];
    for a in state.registry.list() {
        data.push(json!({"id": a.name, "object": "model", "created": state.created, "owned_by": "lora-rs", "root": a.path,
            "parent": base, "lora": a}));
    }
    Json(json!({"object": "list", "kind": state.kind.as_str(), "data": data})).into_response()
}

#[derive(Deserialize)]
struct LoadRequest {
    lora_name: String,
    lora_path: String,
    #[serde(default)]
    load_inplace: bool,
}

#[derive(Deserialize)]
struct UnloadRequest {
    lora_name: String,
}

async fn load_adapter(AxState(state): S, b: Result<Json<Value>, JsonRejection>) -> Response {
    observed(state, "/v1/load_lora_adapter", |state, model| async move {
        let r: LoadRequest = parse(body(b, state.limits.max_body_bytes)?)?;
        let registry = state.registry.clone();
        let info = tokio::task::spawn_blocking(move || registry.load(&r.lora_name, &r.lora_path, r.load_inplace))
            .await
            .map_err(|e| ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
        // Labelled only once accepted: refused names (any text a client sends) never become label values.
        model.set(info.name.clone());
        Ok(Json(json!({"status": "ok", "adapter": info})).into_response())
    })
    .await
}

async fn unload_adapter(AxState(state): S, b: Result<Json<Value>, JsonRejection>) -> Response {
    observed(state, "/v1/unload_lora_adapter", |state, model| async move {
        let r: UnloadRequest = parse(body(b, state.limits.max_body_bytes)?)?;
        state.registry.unload(&r.lora_name)?;
        model.set(r.lora_name.clone());
        Ok(Json(json!({"status": "ok", "unloaded": r.lora_name})).into_response())
    })
    .await
}

#[derive(Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: Value,
    max_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<u64>,
    stop: Option<Value>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u64>,
    best_of: Option<u64>,
    echo: Option<bool>,
    logprobs: Option<Value>,
    suffix: Option<Value>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

fn strings(v: &Value, field: &str, what: &str) -> Result<Vec<String>, ApiError> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_str().map(String::from).ok_or_else(|| ApiError::invalid(field, format!("{field}[{i}] = {x}: {what} must be strings")))
            })
            .collect(),
        other => Err(ApiError::invalid(field, format!("{field} = {other}: must be a string or a list of strings"))),
    }
}

/// Refuses the OpenAI options this server does not honour, by name.
fn refuse_unsupported(r: &CompletionRequest) -> Result<(), ApiError> {
    let no = |field: &str, why: &str| Err(ApiError::invalid(field, format!("{field}: {why}")));
    if r.n.is_some_and(|n| n != 1) {
        return no("n", "only n = 1 is served (send the prompt several times, or several prompts)");
    }
    if r.best_of.is_some_and(|n| n != 1) {
        return no("best_of", "only best_of = 1 is served");
    }
    if r.echo == Some(true) {
        return no("echo", "echo is not served");
    }
    if r.logprobs.as_ref().is_some_and(|v| !v.is_null()) {
        return no("logprobs", "log-probabilities are not served");
    }
    if r.suffix.as_ref().is_some_and(|v| !v.is_null()) {
        return no("suffix", "suffix (insertion) is not served");
    }
    if r.presence_penalty.is_some_and(|p| p != 0.0) || r.frequency_penalty.is_some_and(|p| p != 0.0) {
        return no("presence_penalty", "presence and frequency penalties are not served (leave them 0)");
    }
    if r.logit_bias.as_ref().is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty())) {
        return no("logit_bias", "logit_bias is not served");
    }
    Ok(())
}

async fn completions(AxState(state): S, b: Result<Json<Value>, JsonRejection>) -> Response {
    observed(state, "/v1/completions", |state, model| async move {
        let Some(lm) = &state.lm else { return Err(wrong_kind(&state, "/v1/completions")) };
        let r: CompletionRequest = parse(body(b, state.limits.max_body_bytes)?)?;
        refuse_unsupported(&r)?;
        let adapter = resolve(&state, &r.model).await?;
        model.set(r.model.clone());
        let limits = state.limits;
        let prompts = strings(&r.prompt, "prompt", "prompts")?;
        if prompts.is_empty() || prompts.len() > limits.max_prompts {
            return Err(ApiError::invalid(
                "prompt",
                format!("{} prompts: give 1 to {} (the server's --max-prompts)", prompts.len(), limits.max_prompts),
            ));
        }
        let max_tokens = r.max_tokens.unwrap_or(16) as usize;
        if max_tokens == 0 || max_tokens > limits.max_tokens {
            return Err(ApiError::invalid("max_tokens", format!("max_tokens = {max_tokens}: must be 1 to {} (the server's --max-tokens)", limits.max_tokens)));
        }
        let temperature = r.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid("temperature", format!("temperature = {temperature}: must be in [0, 2]")));
        }
        let top_k = match r.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k > 0 => Some(k as usize),
            Some(k) => return Err(ApiError::invalid("top_k", format!("top_k = {k}: must be ≥ 1 (or -1 for all)"))),
        };
        let sampling = Sampling { temperature, top_k, top_p: r.top_p.filter(|&p| p != 1.0), seed: r.seed.unwrap_or_else(rand::random) };
        sampling.validate().map_err(|e| ApiError::invalid("top_p", e.to_string()))?;
        let stop = match &r.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => strings(v, "stop", "stop sequences")?,
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "stop: up to 4 non-empty strings"));
        }
        let mut encoded = Vec::with_capacity(prompts.len());
        for (i, p) in prompts.iter().enumerate() {
            let ids = lm.tokenizer.encode(p).map_err(|e| ApiError::invalid("prompt", format!("prompt {i}: {e}")))?;
            if ids.is_empty() {
                return Err(ApiError::invalid("prompt", format!("prompt {i} is empty (no tokens)")));
            }
            if ids.len() + max_tokens > lm.context {
                return Err(ApiError::invalid(
                    "prompt",
                    format!(
                        "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in prompt {i}, {max_tokens} for the completion).",
                        lm.context,
                        ids.len() + max_tokens,
                        ids.len()
                    ),
                ));
            }
            encoded.push(ids);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let prompt_tokens: usize = encoded.iter().map(Vec::len).sum();
        for (index, prompt) in encoded.into_iter().enumerate() {
            let job = Job { index, prompt, max_tokens, sampling, stop: stop.clone(), adapter: adapter.clone(), model: r.model.clone(), events: tx.clone() };
            if !lm.engine.submit(job) {
                return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"));
            }
        }
        drop(tx);
        let id = format!("cmpl-{:x}", state.next_id.fetch_add(1, Ordering::Relaxed));
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let n = prompts.len();
        if r.stream {
            let usage = r.stream_options.as_ref().is_some_and(|o| o.include_usage).then_some(prompt_tokens);
            Ok(stream_completion(rx, id, created, r.model, usage).into_response())
        } else {
            collect_completion(rx, n, id, created, r.model, prompt_tokens).await
        }
    })
    .await
}

fn chunk(id: &str, created: u64, model: &str, index: usize, text: &str, finish: Option<FinishReason>) -> String {
    json!({"id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": index, "text": text, "logprobs": null, "finish_reason": finish.map(FinishReason::as_str)}]})
    .to_string()
}

/// Server-sent events: a chunk per piece of text, one with each prompt's finish reason, then (with
/// `stream_options.include_usage`, given the prompt tokens) a chunk with the usage, then `[DONE]`.
fn stream_completion(
    rx: mpsc::UnboundedReceiver<Event>,
    id: String,
    created: u64,
    model: String,
    usage: Option<usize>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let generated = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = generated.clone();
    let (id2, model2) = (id.clone(), model.clone());
    let events = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) }).map(move |e| {
        let data = match e {
            Event::Text(i, text) => chunk(&id, created, &model, i, &text, None),
            Event::Done(i, f, tokens) => {
                counted.fetch_add(tokens, Ordering::Relaxed);
                chunk(&id, created, &model, i, "", Some(f))
            }
            Event::Failed(_, why) => json!({"error": {"message": why, "type": "server_error", "code": 500}}).to_string(),
        };
        Ok(SseEvent::default().data(data))
    });
    let tail = stream::once(async move {
        usage.map(|prompt_tokens| {
            let completion_tokens = generated.load(Ordering::Relaxed);
            let v = json!({"id": id2, "object": "text_completion", "created": created, "model": model2, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}});
            Ok(SseEvent::default().data(v.to_string()))
        })
    })
    .filter_map(|x| async move { x });
    let done = stream::once(async { Ok(SseEvent::default().data("[DONE]")) });
    Sse::new(events.chain(tail).chain(done))
}

async fn collect_completion(
    mut rx: mpsc::UnboundedReceiver<Event>,
    n: usize,
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
) -> Result<Response, ApiError> {
    let mut text = vec![String::new(); n];
    let mut finish: Vec<Option<FinishReason>> = vec![None; n];
    let mut completion_tokens = 0;
    while let Some(e) = rx.recv().await {
        match e {
            Event::Text(i, t) => text[i].push_str(&t),
            Event::Done(i, f, tokens) => {
                finish[i] = Some(f);
                completion_tokens += tokens;
            }
            Event::Failed(_, why) => return Err(ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, why)),
        }
    }
    if finish.iter().any(Option::is_none) {
        return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the generation stopped early (the server is shutting down)"));
    }
    let choices: Vec<Value> = text
        .into_iter()
        .zip(finish)
        .enumerate()
        .map(|(i, (t, f))| json!({"index": i, "text": t, "logprobs": null, "finish_reason": f.map(FinishReason::as_str)}))
        .collect();
    Ok(Json(json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}}))
    .into_response())
}

#[derive(Deserialize)]
struct PredictRequest {
    model: String,
    images: Vec<Value>,
}

async fn predict(AxState(state): S, b: Result<Json<Value>, JsonRejection>) -> Response {
    observed(state, "/v1/predict", |state, model| async move {
        let Some(c) = &state.classifier else { return Err(wrong_kind(&state, "/v1/predict")) };
        let r: PredictRequest = parse(body(b, state.limits.max_body_bytes)?)?;
        let adapter = resolve(&state, &r.model).await?;
        model.set(r.model.clone());
        let (inputs, classes) = (c.engine.inputs(), c.engine.classes());
        let n = r.images.len();
        if n == 0 || n > state.limits.max_images {
            return Err(ApiError::invalid(
                "images",
                format!("{n} images: give 1 to {} (the server's --max-images)", state.limits.max_images),
            ));
        }
        let mut pixels = Vec::with_capacity(n * inputs);
        for (i, img) in r.images.iter().enumerate() {
            let Some(values) = img.as_array() else {
                return Err(ApiError::invalid("images", format!("images[{i}] is not a list of {inputs} pixel values")));
            };
            if values.len() != inputs {
                return Err(ApiError::invalid(
                    "images",
                    format!("images[{i}] has {} values; the model takes {inputs} (28 × 28 pixels, row by row)", values.len()),
                ));
            }
            for (j, v) in values.iter().enumerate() {
                match v.as_f64() {
                    Some(p) if (0.0..=255.0).contains(&p) => pixels.push(c.engine.normalize(p as f32)),
                    _ => {
                        return Err(ApiError::invalid(
                            "images",
                            format!("images[{i}][{j}] = {v}: pixel values must be numbers from 0 to 255"),
                        ))
                    }
                }
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !c.engine.submit(crate::classifier::Job { pixels, adapter, reply: tx }) {
            return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"));
        }
        let probs = rx
            .await
            .map_err(|_| ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"))?
            .map_err(|e| ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        state.metrics.images.get_or_create(&crate::metrics::ModelLabel { model: r.model.clone() }).inc_by(n as u64);
        let rows: Vec<&[f32]> = probs.chunks_exact(classes).collect();
        let predictions: Vec<usize> =
            rows.iter().map(|p| p.iter().enumerate().fold(0, |b, (i, &v)| if v > p[b] { i } else { b })).collect();
        Ok(Json(json!({"model": r.model, "predictions": predictions, "probabilities": rows})).into_response())
    })
    .await
}

async fn sample(AxState(state): S) -> Response {
    let Some(c) = &state.classifier else { return wrong_kind(&state, "/v1/mnist/sample").into_response() };
    let s = &c.samples;
    if s.labels.is_empty() {
        return ApiError::status(StatusCode::NOT_FOUND, "no test images").into_response();
    }
    let i = rand::random_range(0..s.labels.len());
    let px = s.pixels();
    Json(json!({"index": i, "label": s.labels[i], "pixels": &s.images[i * px..(i + 1) * px]})).into_response()
}
