//! The HTTP routes. Every failure is an [`ApiError`]: a 4xx (or 5xx) with an OpenAI-shaped JSON body.
//!
//! | route | does |
//! |---|---|
//! | `GET /health` | `{"status": "ok", "kind", "model", "chat", "adapters_loaded", "worker", …}`; 503 with `unhealthy` or `draining` |
//! | `GET /metrics` | Prometheus metrics |
//! | `GET /v1/models` | the base and each adapter (`parent` = the base; `lora` = rank, alpha, targets, size, fingerprint) |
//! | `POST /v1/completions` | OpenAI completions (LM), streamed as server-sent events with `"stream": true` |
//! | `POST /v1/chat/completions` | OpenAI chat completions (LM): the messages rendered with the model's chat template, the reply ended at its end tokens; streamed as `delta`s |
//! | `POST /v1/predict` | `{"model", "images": [[pixels 0-255]]}` → predictions and probabilities (classifier) |
//! | `GET /v1/mnist/sample` | a random sample image and its label (classifier) |
//! | `POST /v1/load_lora_adapter` | `{"lora_name", "lora_path", "load_inplace"?}` (with `--allow-adapter-updates`) |
//! | `POST /v1/unload_lora_adapter` | `{"lora_name"}` (with `--allow-adapter-updates`) |
//!
//! Around them: with an API key every `/v1` route wants `Authorization: Bearer KEY` ([`authorize`], 401);
//! completions and predictions take an admission permit before their body is read ([`admit`], 503 with
//! `Retry-After` past `--max-concurrent-requests`, or while draining). Work that costs CPU in proportion to
//! the request — tokenising prompts, checking pixels, reading adapters — runs on the blocking pool, never
//! on the async threads that answer `/health`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State as AxState};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use lora_lm::generate::Sampling;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::admission::HeldBody;
use crate::error::ApiError;
use crate::lm::{Event, Failure, FailureKind, FinishReason, Job};
use crate::metrics::{RouteLabel, RouteModel, RouteModelStatus};
use crate::registry::{Lookup, ServedAdapter};
use crate::server::{key_digest, ModelKind, State};
use crate::worker::WorkerState;

pub(crate) type S = AxState<Arc<State>>;

pub(crate) fn router(state: Arc<State>) -> Router {
    let limit = state.limits.max_body_bytes;
    let work = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(crate::chat::chat_completions))
        .route("/v1/predict", post(predict))
        .route_layer(from_fn_with_state(state.clone(), admit));
    let v1 = Router::new()
        .merge(work)
        .route("/v1/models", get(models))
        .route("/v1/mnist/sample", get(sample))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .route_layer(from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The matched route of a request (for metrics; `-` when none).
fn route_of(req: &Request) -> String {
    req.extensions().get::<MatchedPath>().map_or_else(|| "-".to_string(), |m| m.as_str().to_string())
}

/// Refuses a `/v1` request without the server's API key (when it has one): 401 with `WWW-Authenticate`.
async fn authorize(AxState(state): S, req: Request, next: Next) -> Response {
    if let Some(want) = &state.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given.map(|k| key_digest(k.trim())) != Some(*want) {
            let route = route_of(&req);
            let message = if given.is_some() {
                "the API key is not valid"
            } else {
                "this server wants an API key: send the header `Authorization: Bearer KEY` (the key it was started with, --api-key or LORA_API_KEY)"
            };
            let mut r = ApiError::status(StatusCode::UNAUTHORIZED, message).into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            record(&state, &route, "-", Instant::now(), r.status());
            return r;
        }
    }
    next.run(req).await
}

/// Takes an admission permit for a completion or prediction before its body is read, and keeps it in the
/// response body until that is written out; past the limit (or while draining) a 503 with `Retry-After`.
async fn admit(AxState(state): S, req: Request, next: Next) -> Response {
    let refuse = |message: String| {
        let mut r = ApiError::status(StatusCode::SERVICE_UNAVAILABLE, message).into_response();
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        record(&state, &route_of(&req), "-", Instant::now(), r.status());
        r
    };
    if state.draining.load(Ordering::Acquire) {
        return refuse("the server is shutting down; retry on another instance".into());
    }
    let Some(permit) = state.admission.try_admit() else {
        return refuse(format!(
            "the server is at its limit of {} requests in flight (--max-concurrent-requests); retry after 1 s",
            state.admission.limit()
        ));
    };
    let response = next.run(req).await;
    response.map(|b| Body::new(HeldBody::new(b, permit)))
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
    let model = &if model == "-" { model.to_string() } else { m.models.label(model) };
    m.requests.get_or_create(&RouteModel { route: route.into(), model: model.into() }).inc();
    m.latency.get_or_create(&RouteLabel { route: route.into() }).observe(started.elapsed().as_secs_f64());
    if !status.is_success() {
        m.errors.get_or_create(&RouteModelStatus { route: route.into(), model: model.into(), status: status.as_u16() }).inc();
    }
}

/// The model label of a request's metrics, set once the request names a known model.
#[derive(Clone, Default)]
pub(crate) struct ModelSlot(Arc<std::sync::Mutex<Option<String>>>);

impl ModelSlot {
    pub(crate) fn set(&self, name: String) {
        if let Ok(mut m) = self.0.lock() {
            *m = Some(name);
        }
    }
    fn get(&self) -> String {
        self.0.lock().ok().and_then(|m| m.clone()).unwrap_or_else(|| "-".to_string())
    }
}

/// Runs a handler body and records its outcome.
pub(crate) async fn observed<F, Fut>(state: Arc<State>, route: &'static str, f: F) -> Response
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
pub(crate) fn body(b: Result<Json<Value>, JsonRejection>, limit: usize) -> Result<Value, ApiError> {
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
pub(crate) fn parse<T: for<'de> Deserialize<'de>>(v: Value) -> Result<T, ApiError> {
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
pub(crate) async fn resolve(state: &Arc<State>, model: &str) -> Result<Option<Arc<ServedAdapter>>, ApiError> {
    if model == state.registry.base_name() {
        return Ok(None);
    }
    // Held adapters are a lock away; only an evicted one is read from disk, off the async threads.
    let got = match state.registry.lookup(model)? {
        Lookup::Held(a) => Some(a),
        Lookup::Unknown => None,
        Lookup::Evicted => {
            let (registry, name) = (state.registry.clone(), model.to_string());
            tokio::task::spawn_blocking(move || registry.reload(&name)).await.map_err(joined)??
        }
    };
    got.map(Some).ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("The model `{model}` does not exist."),
        param: Some("model".into()),
    })
}

pub(crate) fn wrong_kind(state: &State, route: &str) -> ApiError {
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

/// 200 `ok` while the worker runs; 503 `unhealthy` when it is restarting, stuck in one step past the
/// request timeout, or dead; 503 `draining` after the shutdown signal (so that a load balancer stops
/// sending).
async fn health(AxState(state): S) -> Response {
    let worker = state.worker();
    let (status, code) = if state.draining.load(Ordering::Acquire) {
        ("draining", StatusCode::SERVICE_UNAVAILABLE)
    } else if worker.state() != WorkerState::Running {
        ("unhealthy", StatusCode::SERVICE_UNAVAILABLE) // restarting, stuck or dead
    } else {
        ("ok", StatusCode::OK)
    };
    // The chat template /v1/chat/completions renders with: its origin, whether it is lora-rs' default; null when
    // chats are refused (a classifier, or a model without a template).
    let chat = state.lm.as_ref().and_then(|lm| lm.chat.as_ref().ok()).map(|c| {
        let origin = match c.template.origin() {
            lora_lm::chat::TemplateSource::Default => "ChatML (lora-rs' default for byte-level models)".to_string(),
            lora_lm::chat::TemplateSource::Given(s) => s.clone(),
        };
        json!({"template": origin, "default": c.template.is_default()})
    });
    let body = json!({"status": status, "kind": state.kind.as_str(), "model": state.registry.base_name(), "chat": chat,
        "adapters_loaded": state.registry.held(), "adapter_updates": state.allow_adapter_updates,
        "worker": {"state": worker.state(), "panics": worker.panics(), "last_panic": worker.last_panic(),
            "step_seconds": worker.step_age().map(|d| d.as_secs_f64())},
        "requests_in_flight": state.admission.in_flight(), "max_concurrent_requests": state.admission.limit()});
    (code, Json(body)).into_response()
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

/// The refusal of an adapter route on a server started without `--allow-adapter-updates`.
fn updates_allowed(state: &State, route: &str) -> Result<(), ApiError> {
    if state.allow_adapter_updates {
        return Ok(());
    }
    Err(ApiError::status(
        StatusCode::FORBIDDEN,
        format!(
            "{route}: loading and unloading adapters over HTTP is off on this server; start it with --allow-adapter-updates to allow it"
        ),
    ))
}

pub(crate) fn joined(e: tokio::task::JoinError) -> ApiError {
    ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, format!("a blocking task failed: {e}"))
}

async fn load_adapter(AxState(state): S, b: Result<Json<Value>, JsonRejection>) -> Response {
    observed(state, "/v1/load_lora_adapter", |state, model| async move {
        updates_allowed(&state, "/v1/load_lora_adapter")?;
        let r: LoadRequest = parse(body(b, state.limits.max_body_bytes)?)?;
        let registry = state.registry.clone();
        let info =
            tokio::task::spawn_blocking(move || registry.load(&r.lora_name, &r.lora_path, r.load_inplace)).await.map_err(joined)??;
        // Labelled only once accepted: refused names (any text a client sends) never become label values.
        model.set(info.name.clone());
        Ok(Json(json!({"status": "ok", "adapter": info})).into_response())
    })
    .await
}

async fn unload_adapter(AxState(state): S, b: Result<Json<Value>, JsonRejection>) -> Response {
    observed(state, "/v1/unload_lora_adapter", |state, model| async move {
        updates_allowed(&state, "/v1/unload_lora_adapter")?;
        let r: UnloadRequest = parse(body(b, state.limits.max_body_bytes)?)?;
        // Waits for a load of the same name under way: off the async threads.
        let (registry, name) = (state.registry.clone(), r.lora_name.clone());
        tokio::task::spawn_blocking(move || registry.unload(&name)).await.map_err(joined)??;
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
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
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
    refuse_penalties(r.presence_penalty, r.frequency_penalty, r.logit_bias.as_ref())
}

/// Refuses, by name, the penalties and logit bias both completion routes accept but do not honour: non-zero
/// presence or frequency penalties, a non-empty `logit_bias`.
pub(crate) fn refuse_penalties(presence: Option<f64>, frequency: Option<f64>, logit_bias: Option<&Value>) -> Result<(), ApiError> {
    let no = |field: &str, why: &str| Err(ApiError::invalid(field, format!("{field}: {why}")));
    if presence.is_some_and(|p| p != 0.0) || frequency.is_some_and(|p| p != 0.0) {
        return no("presence_penalty", "presence and frequency penalties are not served (leave them 0)");
    }
    if logit_bias.is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty())) {
        return no("logit_bias", "logit_bias is not served");
    }
    Ok(())
}

/// The sampling settings of a request: temperature in [0, 2] (default 1), `top_p`, `top_k` (−1 or 0: all), `seed`
/// (default: random).
pub(crate) fn sampling_of(
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<u64>,
) -> Result<Sampling, ApiError> {
    let temperature = temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("temperature", format!("temperature = {temperature}: must be in [0, 2]")));
    }
    let top_k = match top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => return Err(ApiError::invalid("top_k", format!("top_k = {k}: must be ≥ 1 (or -1 for all)"))),
    };
    let sampling = Sampling { temperature, top_k, top_p: top_p.filter(|&p| p != 1.0), seed: seed.unwrap_or_else(rand::random) };
    sampling.validate().map_err(|e| ApiError::invalid("top_p", e.to_string()))?;
    Ok(sampling)
}

/// `max_tokens` (default `default`), 1 to the server's `--max-tokens`; `field` names it in errors.
pub(crate) fn max_tokens_of(v: Option<u64>, default: usize, limits: &crate::Limits, field: &str) -> Result<usize, ApiError> {
    let max_tokens = v.map_or(default, |m| m as usize);
    if max_tokens == 0 || max_tokens > limits.max_tokens {
        return Err(ApiError::invalid(
            field,
            format!("{field} = {max_tokens}: must be 1 to {} (the server's --max-tokens)", limits.max_tokens),
        ));
    }
    Ok(max_tokens)
}

/// The request's stop strings: up to 4, none empty.
pub(crate) fn stops_of(v: &Option<Value>) -> Result<Vec<String>, ApiError> {
    let stop = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => strings(v, "stop", "stop sequences")?,
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop: up to 4 non-empty strings"));
    }
    Ok(stop)
}

/// A prompt that fits the context with `max_tokens` more (`which` names it in the error).
pub(crate) fn check_fits(ids: &[u32], max_tokens: usize, context: usize, which: &str) -> Result<(), ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid("prompt", format!("{which} is empty (no tokens)")));
    }
    if ids.len() + max_tokens > context {
        return Err(ApiError::invalid(
            if which.starts_with("messages") { "messages" } else { "prompt" },
            format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens ({} in {which}, {max_tokens} for the completion).",
                ids.len() + max_tokens,
                ids.len()
            ),
        ));
    }
    Ok(())
}

/// What a request asks the worker for, besides its prompts.
pub(crate) struct Ask {
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub stop_ids: Arc<[u32]>,
    pub adapter: Option<Arc<ServedAdapter>>,
    pub model: String,
}

/// Queues one job per prompt; the events of all of them arrive on the returned channel.
pub(crate) fn submit(
    lm: &crate::server::LmState,
    prompts: Vec<Vec<u32>>,
    ask: &Ask,
    deadline: Instant,
) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    for (index, prompt) in prompts.into_iter().enumerate() {
        let job = Job {
            index,
            prompt,
            max_tokens: ask.max_tokens,
            sampling: ask.sampling,
            stop: ask.stop.clone(),
            stop_ids: ask.stop_ids.clone(),
            adapter: ask.adapter.clone(),
            model: ask.model.clone(),
            events: tx.clone(),
            deadline,
        };
        if !lm.engine.submit(job) {
            return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the model worker has stopped; this server cannot complete"));
        }
    }
    Ok(rx)
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn completions(AxState(state): S, b: Result<Json<Value>, JsonRejection>) -> Response {
    observed(state, "/v1/completions", |state, model| async move {
        let deadline = Instant::now() + state.timeouts.request;
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
        let max_tokens = max_tokens_of(r.max_tokens, 16, &limits, "max_tokens")?;
        let sampling = sampling_of(r.temperature, r.top_p, r.top_k, r.seed)?;
        let stop = stops_of(&r.stop)?;
        // Tokenising a long prompt costs CPU in proportion to its length: on the blocking pool.
        let (tokenizer, n) = (lm.tokenizer.clone(), prompts.len());
        let ids =
            tokio::task::spawn_blocking(move || prompts.iter().map(|p| tokenizer.encode(p)).collect::<Vec<_>>()).await.map_err(joined)?;
        let mut encoded = Vec::with_capacity(n);
        for (i, ids) in ids.into_iter().enumerate() {
            let ids = ids.map_err(|e| ApiError::invalid("prompt", format!("prompt {i}: {e}")))?;
            check_fits(&ids, max_tokens, lm.context, &format!("prompt {i}"))?;
            encoded.push(ids);
        }
        let prompt_tokens: usize = encoded.iter().map(Vec::len).sum();
        let ask = Ask { max_tokens, sampling, stop, stop_ids: lm.end_ids.clone(), adapter, model: r.model.clone() };
        let rx = submit(lm, encoded, &ask, deadline)?;
        let id = format!("cmpl-{:x}", state.next_id.fetch_add(1, Ordering::Relaxed));
        let reply = Reply { shape: Shape::Text, id, created: unix_now(), model: r.model, prompt_tokens, deadline };
        if r.stream {
            let usage = r.stream_options.as_ref().is_some_and(|o| o.include_usage);
            Ok(stream_completion(rx, reply, usage).keep_alive(KeepAlive::new().interval(state.timeouts.keep_alive)).into_response())
        } else {
            collect_completion(rx, n, reply).await
        }
    })
    .await
}

/// The OpenAI shape of a reply: a text completion or a chat completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    Text,
    Chat,
}

/// What every chunk or body of one reply repeats.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub shape: Shape,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub prompt_tokens: usize,
    pub deadline: Instant,
}

impl Reply {
    /// A streamed chunk: a piece of text (`delta.content` for a chat), or the end with its finish reason.
    fn chunk(&self, index: usize, text: &str, finish: Option<FinishReason>) -> String {
        let finish = finish.map(FinishReason::as_str);
        match self.shape {
            Shape::Text => json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": index, "text": text, "logprobs": null, "finish_reason": finish}]}),
            Shape::Chat => {
                let delta = if finish.is_some() && text.is_empty() { json!({}) } else { json!({"content": text}) };
                json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "system_fingerprint": null, "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}]})
            }
        }
        .to_string()
    }
    /// A chat stream's first chunk: the assistant's role, no content yet.
    fn role_chunk(&self) -> Option<String> {
        (self.shape == Shape::Chat).then(|| {
            json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": null, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]})
            .to_string()
        })
    }
    fn usage(&self, completion_tokens: usize) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": self.prompt_tokens + completion_tokens})
    }
    fn object(&self, chunk: bool) -> &'static str {
        match (self.shape, chunk) {
            (Shape::Text, _) => "text_completion",
            (Shape::Chat, true) => "chat.completion.chunk",
            (Shape::Chat, false) => "chat.completion",
        }
    }
}

/// The HTTP error of a worker's failure.
fn failure(f: Failure) -> ApiError {
    let status = match f.kind {
        FailureKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        FailureKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
    };
    ApiError::status(status, f.message)
}

/// The next event, or a timeout failure once `deadline` has passed (a worker that never answers cannot
/// hold a request past it), or `None` when the worker dropped the request.
async fn next_event(rx: &mut mpsc::UnboundedReceiver<Event>, deadline: Instant) -> Option<Event> {
    // A second past the worker's own check, which normally ends a late sequence first.
    match tokio::time::timeout_at((deadline + std::time::Duration::from_secs(1)).into(), rx.recv()).await {
        Ok(e) => e,
        Err(_) => Some(Event::Failed(0, Failure::timeout("the request ran past the server's request timeout (--request-timeout)"))),
    }
}

/// Server-sent events: for a chat, first a chunk with the assistant's role; a chunk per piece of text, one with
/// each prompt's finish reason, then (with `stream_options.include_usage`) a chunk with the usage, then
/// `[DONE]`. A failure is an error event, and the stream ends after it.
pub(crate) fn stream_completion(
    rx: mpsc::UnboundedReceiver<Event>,
    reply: Reply,
    usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let generated = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = generated.clone();
    let (head, tail_reply, r) = (reply.role_chunk(), reply.clone(), reply);
    let deadline = r.deadline;
    let head = stream::iter(head.map(|h| Ok(SseEvent::default().data(h))));
    let events = stream::unfold(Some(rx), move |rx| async move {
        let mut rx = rx?;
        let e = next_event(&mut rx, deadline).await?;
        let last = matches!(e, Event::Failed(..));
        Some((e, (!last).then_some(rx)))
    })
    .map(move |e| {
        let data = match e {
            Event::Text(i, text) => r.chunk(i, &text, None),
            Event::Done(i, f, tokens) => {
                counted.fetch_add(tokens, Ordering::Relaxed);
                r.chunk(i, "", Some(f))
            }
            Event::Failed(_, f) => failure(f).body().to_string(),
        };
        Ok(SseEvent::default().data(data))
    });
    let tail = stream::once(async move {
        usage.then(|| {
            let t = &tail_reply;
            let v = json!({"id": t.id, "object": t.object(true), "created": t.created, "model": t.model, "choices": [],
                "usage": t.usage(generated.load(Ordering::Relaxed))});
            Ok(SseEvent::default().data(v.to_string()))
        })
    })
    .filter_map(|x| async move { x });
    let done = stream::once(async { Ok(SseEvent::default().data("[DONE]")) });
    Sse::new(head.chain(events).chain(tail).chain(done))
}

pub(crate) async fn collect_completion(mut rx: mpsc::UnboundedReceiver<Event>, n: usize, reply: Reply) -> Result<Response, ApiError> {
    let mut text = vec![String::new(); n];
    let mut finish: Vec<Option<FinishReason>> = vec![None; n];
    let mut completion_tokens = 0;
    while let Some(e) = next_event(&mut rx, reply.deadline).await {
        match e {
            Event::Text(i, t) => text[i].push_str(&t),
            Event::Done(i, f, tokens) => {
                finish[i] = Some(f);
                completion_tokens += tokens;
            }
            Event::Failed(_, f) => return Err(failure(f)),
        }
    }
    if finish.iter().any(Option::is_none) {
        return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the model worker stopped before this completion finished"));
    }
    let choices: Vec<Value> = text
        .into_iter()
        .zip(finish)
        .enumerate()
        .map(|(i, (t, f))| {
            let f = f.map(FinishReason::as_str);
            match reply.shape {
                Shape::Text => json!({"index": i, "text": t, "logprobs": null, "finish_reason": f}),
                Shape::Chat => json!({"index": i, "message": {"role": "assistant", "content": t}, "logprobs": null, "finish_reason": f}),
            }
        })
        .collect();
    let mut body = json!({"id": reply.id, "object": reply.object(false), "created": reply.created, "model": reply.model,
        "choices": choices, "usage": reply.usage(completion_tokens)});
    if reply.shape == Shape::Chat {
        body["system_fingerprint"] = Value::Null;
    }
    Ok(Json(body).into_response())
}

#[derive(Deserialize)]
struct PredictRequest {
    model: String,
    images: Vec<Value>,
}

/// The images of a prediction request, checked and normalised (`norm`), row-major; an error names the
/// image, the pixel and the value.
fn pixels(images: &[Value], inputs: usize, norm: impl Fn(f32) -> f32) -> Result<Vec<f32>, ApiError> {
    let mut pixels = Vec::with_capacity(images.len() * inputs);
    for (i, img) in images.iter().enumerate() {
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
                Some(p) if (0.0..=255.0).contains(&p) => pixels.push(norm(p as f32)),
                _ => {
                    return Err(ApiError::invalid("images", format!("images[{i}][{j}] = {v}: pixel values must be numbers from 0 to 255")))
                }
            }
        }
    }
    Ok(pixels)
}

async fn predict(AxState(state): S, b: Result<Json<Value>, JsonRejection>) -> Response {
    observed(state, "/v1/predict", |state, model| async move {
        let deadline = Instant::now() + state.timeouts.request;
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
        // Up to --max-images × 784 values to check: on the blocking pool.
        let engine = c.engine.clone();
        let images = r.images;
        let pixels = tokio::task::spawn_blocking(move || pixels(&images, inputs, |p| engine.normalize(p))).await.map_err(joined)??;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !c.engine.submit(crate::classifier::Job { pixels, adapter, reply: tx, deadline }) {
            return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the classifier worker has stopped; this server cannot predict"));
        }
        let answer = tokio::time::timeout_at((deadline + std::time::Duration::from_secs(1)).into(), rx)
            .await
            .map_err(|_| failure(Failure::timeout("the prediction ran past the server's request timeout (--request-timeout)")))?;
        let probs = answer
            .map_err(|_| {
                ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the classifier worker stopped before this prediction finished")
            })?
            .map_err(failure)?;
        let label = state.metrics.models.label(&r.model);
        state.metrics.images.get_or_create(&crate::metrics::ModelLabel { model: label }).inc_by(n as u64);
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
        return ApiError::status(StatusCode::NOT_FOUND, "this server was given no sample images").into_response();
    }
    let i = rand::random_range(0..s.labels.len());
    let px = s.pixels;
    Json(json!({"index": i, "label": s.labels[i], "pixels": &s.images[i * px..(i + 1) * px]})).into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::json;

    use crate::testing::{get, options, post, write_lm, Running};
    use crate::worker::fault::{HANG_STEP, KILL_WORKER, PANIC_STEP};
    use crate::{Access, Limits, Timeouts};

    fn greedy(prompt: &str) -> serde_json::Value {
        json!({"model": "base", "prompt": prompt, "max_tokens": 8, "temperature": 0})
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_in_a_step_fails_only_that_steps_requests_and_the_next_request_succeeds() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 64);
        let s = Running::start(options(d.path())).await;
        let c = reqwest::Client::new();
        let u = format!("{}/v1/completions", s.url);
        let (status, before) = post(&c, &u, &greedy("SELECT 1")).await;
        assert_eq!(status, 200, "{before}");
        let (status, v) = post(&c, &u, &greedy(PANIC_STEP)).await;
        assert_eq!(status, 500, "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("panicked") && message.contains("test hook"), "{message}");
        // The worker goes on: the same request gives the same text as before the panic.
        let (status, after) = post(&c, &u, &greedy("SELECT 1")).await;
        assert_eq!((status, &after["choices"][0]["text"]), (200, &before["choices"][0]["text"]));
        // A streamed request in a panicking step gets an error event.
        let r = c.post(&u).json(&json!({"model": "a", "prompt": PANIC_STEP, "max_tokens": 8, "stream": true})).send().await.unwrap();
        let body = r.text().await.unwrap();
        assert!(body.contains("\"code\":500") && body.contains("panicked"), "{body}");
        let (status, h) = get(&c, &format!("{}/health", s.url)).await;
        assert_eq!((status, h["status"].as_str(), h["worker"]["state"].as_str()), (200, Some("ok"), Some("running")), "{h}");
        assert_eq!(h["worker"]["panics"], 2, "{h}");
        let metrics = c.get(format!("{}/metrics", s.url)).send().await.unwrap().text().await.unwrap();
        assert!(metrics.contains("lora_worker_panics_total 2") && metrics.contains("lora_worker_up 1"), "{metrics}");
        assert_eq!(s.stop().await, crate::Stopped::Drained);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_load_each_injected_panic_fails_only_the_requests_of_its_step_and_every_other_gets_its_text() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 64);
        let s = Running::start(options(d.path())).await;
        let c = reqwest::Client::new();
        let u = format!("{}/v1/completions", s.url);
        let prompt = |k: usize| format!("client {k} SELECT");
        // What each client's request gives alone.
        let mut alone = Vec::new();
        for k in 0..16 {
            let (status, v) = post(&c, &u, &greedy(&prompt(k))).await;
            assert_eq!(status, 200, "{v}");
            alone.push(v["choices"][0]["text"].clone());
        }
        // Sixteen clients send their request again and again until the five panics are injected.
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..16)
            .map(|k| {
                let (c, u, want, p, stop) = (c.clone(), u.clone(), alone[k].clone(), prompt(k), stop.clone());
                tokio::spawn(async move {
                    let (mut ok, mut failed_with_step, mut other) = (0, 0, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        let (status, v) = post(&c, &u, &greedy(&p)).await;
                        match status {
                            200 if v["choices"][0]["text"] == want => ok += 1,
                            500 if v["error"]["message"].as_str().unwrap_or("").contains("panicked in the step") => failed_with_step += 1,
                            _ => other.push(v),
                        }
                    }
                    (ok, failed_with_step, other)
                })
            })
            .collect();
        let mut injected = Vec::new();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            injected.push(post(&c, &u, &greedy(PANIC_STEP)).await.0);
        }
        stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failed_with_step) = (0, 0);
        for h in clients {
            let (o, f, other) = h.await.unwrap();
            assert!(other.is_empty(), "answers other than the right text or the step's 500: {other:?}");
            ok += o;
            failed_with_step += f;
        }
        assert_eq!(injected, [500; 5]);
        // A step holds at most --max-batch (16) sequences: at most 15 others fail with each panic.
        assert!(failed_with_step <= 5 * 15, "{failed_with_step} requests failed with 5 panicking steps");
        assert!(ok > failed_with_step, "{ok} served, {failed_with_step} failed");
        // Running again (after a back-off, had two panics come without a good step between).
        let mut h = serde_json::Value::Null;
        for _ in 0..100 {
            h = get(&c, &format!("{}/health", s.url)).await.1;
            if h["status"] == "ok" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!((h["status"].as_str(), h["worker"]["panics"].as_u64()), (Some("ok"), Some(5)), "{h}");
        let (status, v) = post(&c, &u, &greedy(&prompt(0))).await;
        assert_eq!((status, &v["choices"][0]["text"]), (200, &alone[0]));
        eprintln!(
            "FAULTS panics: 16 clients completing again and again while 5 panics were injected (test hook): {ok} got their text, \
             {failed_with_step} shared a panicking step and got its 500, 0 other answers, 0 lost; /health ok after, 5 panics counted"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_running_past_the_request_timeout_makes_health_unhealthy_until_it_ends() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 64);
        let o =
            crate::ServeOptions { timeouts: Timeouts { request: Duration::from_millis(500), ..Timeouts::default() }, ..options(d.path()) };
        let s = Running::start(o).await;
        let c = reqwest::Client::new();
        let hung = tokio::spawn({
            let (c, u) = (c.clone(), format!("{}/v1/completions", s.url));
            async move { post(&c, &u, &greedy(HANG_STEP)).await }
        });
        tokio::time::sleep(Duration::from_millis(900)).await; // the step sleeps 1.5 s; the limit is 0.5 s
        let (status, h) = get(&c, &format!("{}/health", s.url)).await;
        assert_eq!((status, h["worker"]["state"].as_str()), (503, Some("stuck")), "{h}");
        assert!(h["worker"]["step_seconds"].as_f64().unwrap() > 0.5, "{h}");
        let (status, v) = hung.await.unwrap();
        assert_eq!(status, 504, "{v}");
        // Once the step returns, the worker runs again.
        let mut h = serde_json::Value::Null;
        for _ in 0..100 {
            h = get(&c, &format!("{}/health", s.url)).await.1;
            if h["status"] == "ok" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(h["worker"]["state"].as_str(), Some("running"), "{h}");
        let (status, v) = post(&c, &format!("{}/v1/completions", s.url), &greedy("a")).await;
        assert_eq!(status, 200, "{v}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_worker_makes_health_unhealthy_and_completions_get_503() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 64);
        let s = Running::start(options(d.path())).await;
        let c = reqwest::Client::new();
        let u = format!("{}/v1/completions", s.url);
        assert_eq!(get(&c, &format!("{}/health", s.url)).await.0, 200);
        let (status, v) = post(&c, &u, &greedy(KILL_WORKER)).await;
        assert_eq!(status, 500, "{v}");
        // The thread is gone once its guard has run; wait for it (bounded).
        for _ in 0..200 {
            if s.server.worker().state() == crate::WorkerState::Dead {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (status, h) = get(&c, &format!("{}/health", s.url)).await;
        assert_eq!((status, h["status"].as_str(), h["worker"]["state"].as_str()), (503, Some("unhealthy"), Some("dead")), "{h}");
        let (status, v) = post(&c, &u, &greedy("SELECT 1")).await;
        assert_eq!(status, 503, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("worker has stopped"), "{v}");
        let metrics = c.get(format!("{}/metrics", s.url)).send().await.unwrap().text().await.unwrap();
        assert!(metrics.contains("lora_worker_up 0"), "{metrics}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_the_admission_limit_a_request_gets_503_with_retry_after_at_once_and_a_freed_place_is_taken() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 64);
        // An idle worker waits 1.5 s for company: two streams admitted now stay in flight meanwhile.
        let o = crate::ServeOptions {
            batch_window: Duration::from_millis(1500),
            limits: Limits { max_concurrent_requests: 2, ..Limits::default() },
            ..options(d.path())
        };
        let s = Running::start(o).await;
        let c = reqwest::Client::new();
        let u = format!("{}/v1/completions", s.url);
        let body = json!({"model": "base", "prompt": "a", "max_tokens": 4, "temperature": 0, "stream": true});
        let r1 = c.post(&u).json(&body).send().await.unwrap();
        let r2 = c.post(&u).json(&body).send().await.unwrap();
        assert_eq!((r1.status().as_u16(), r2.status().as_u16()), (200, 200));
        let started = std::time::Instant::now();
        let r3 = c.post(&u).json(&greedy("b")).send().await.unwrap();
        let waited = started.elapsed();
        assert_eq!(r3.status(), 503);
        assert_eq!(r3.headers()["retry-after"], "1");
        let v: serde_json::Value = r3.json().await.unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains("--max-concurrent-requests"), "{v}");
        // "At once": long before the streams in flight could end (the batcher is still waiting).
        assert!(waited < Duration::from_millis(1000), "the refusal took {waited:?}");
        let (_, h) = get(&c, &format!("{}/health", s.url)).await;
        assert_eq!((h["requests_in_flight"].as_u64(), h["max_concurrent_requests"].as_u64()), (Some(2), Some(2)), "{h}");
        for r in [r1, r2] {
            assert!(r.text().await.unwrap().contains("[DONE]"));
        }
        let (status, v) = post(&c, &u, &greedy("b")).await;
        assert_eq!(status, 200, "{v}");
        let (_, h) = get(&c, &format!("{}/health", s.url)).await;
        assert_eq!(h["requests_in_flight"], 0, "{h}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_v1_routes_want_the_api_key_and_health_metrics_and_the_page_stay_open() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 64);
        let o = crate::ServeOptions { access: Access { api_key: Some("sekrit".into()), allow_adapter_updates: true }, ..options(d.path()) };
        let s = Running::start(o).await;
        let c = reqwest::Client::new();
        for route in ["/health", "/metrics", "/"] {
            assert_eq!(c.get(format!("{}{route}", s.url)).send().await.unwrap().status(), 200, "{route}");
        }
        let models = format!("{}/v1/models", s.url);
        let r = c.get(&models).send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains("Authorization: Bearer"), "{v}");
        let r = c.get(&models).bearer_auth("wrong").send().await.unwrap();
        assert_eq!(r.status(), 401);
        let r = c.post(format!("{}/v1/completions", s.url)).json(&greedy("a")).send().await.unwrap();
        assert_eq!(r.status(), 401, "completions without the key");
        let r = c.post(format!("{}/v1/unload_lora_adapter", s.url)).json(&json!({"lora_name": "a"})).send().await.unwrap();
        assert_eq!(r.status(), 401, "unload without the key");
        assert_eq!(c.get(&models).bearer_auth("sekrit").send().await.unwrap().status(), 200);
        let r = c.post(format!("{}/v1/completions", s.url)).bearer_auth("sekrit").json(&greedy("a")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_allow_adapter_updates_the_adapter_routes_are_refused_naming_the_flag() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 64);
        let s = Running::start(crate::ServeOptions { access: Access::default(), ..options(d.path()) }).await;
        let c = reqwest::Client::new();
        for (route, body) in [
            ("/v1/load_lora_adapter", json!({"lora_name": "c", "lora_path": "spare/c"})),
            ("/v1/unload_lora_adapter", json!({"lora_name": "a"})),
        ] {
            let (status, v) = post(&c, &format!("{}{route}", s.url), &body).await;
            assert_eq!(status, 403, "{route}: {v}");
            assert!(v["error"]["message"].as_str().unwrap().contains("--allow-adapter-updates"), "{route}: {v}");
        }
        let (_, models) = get(&c, &format!("{}/v1/models", s.url)).await;
        let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["base", "a", "b"], "the refused routes changed the adapters");
        let (_, h) = get(&c, &format!("{}/health", s.url)).await;
        assert_eq!(h["adapter_updates"], false);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_past_its_deadline_gets_a_504_and_a_stream_an_error_event() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 64);
        // The idle batcher waits 600 ms for company; the requests must finish within 200 ms.
        let o = crate::ServeOptions {
            batch_window: Duration::from_millis(600),
            timeouts: Timeouts { request: Duration::from_millis(200), ..Timeouts::default() },
            ..options(d.path())
        };
        let s = Running::start(o).await;
        let c = reqwest::Client::new();
        let u = format!("{}/v1/completions", s.url);
        let (status, v) = post(&c, &u, &greedy("a")).await;
        assert_eq!(status, 504, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("--request-timeout"), "{v}");
        let r = c.post(&u).json(&json!({"model": "base", "prompt": "a", "max_tokens": 4, "stream": true})).send().await.unwrap();
        let body = r.text().await.unwrap();
        assert!(body.contains("\"code\":504") && body.contains("--request-timeout"), "{body}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_with_nothing_to_send_sends_keep_alive_comments() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 64);
        // The idle batcher waits 1 s for company before the first token; keep-alive every 200 ms.
        let o = crate::ServeOptions {
            batch_window: Duration::from_millis(1000),
            timeouts: Timeouts { keep_alive: Duration::from_millis(200), ..Timeouts::default() },
            ..options(d.path())
        };
        let s = Running::start(o).await;
        let c = reqwest::Client::new();
        let r = c
            .post(format!("{}/v1/completions", s.url))
            .json(&json!({"model": "base", "prompt": "a", "max_tokens": 2, "temperature": 0, "stream": true}))
            .send()
            .await
            .unwrap();
        let body = r.text().await.unwrap();
        let before_data = &body[..body.find("data:").unwrap()];
        let comments = before_data.matches(":\n\n").count();
        assert!(comments >= 2, "{comments} keep-alive comments in the 1 s wait: {body:?}");
        assert!(body.contains("data: [DONE]"), "{body}");
    }

    #[test]
    fn pixel_errors_name_the_image_the_pixel_and_the_value() {
        let norm = |p: f32| p / 255.0;
        let ok = super::pixels(&[json!([0, 255, 127.5])], 3, norm).unwrap();
        assert_eq!(ok, [0.0, 1.0, 0.5]);
        for (images, want) in [
            (vec![json!([0, 0]), json!([0, 0])], "images[0] has 2 values; the model takes 3"),
            (vec![json!([0, 0, 0]), json!([0, 256, 0])], "images[1][1] = 256"),
            (vec![json!([0, -1, 0])], "images[0][1] = -1"),
            (vec![json!([0, "x", 0])], "images[0][1] = \"x\""),
            (vec![json!([0, null, 0])], "images[0][1] = null"),
            (vec![json!(3)], "images[0] is not a list of 3 pixel values"),
        ] {
            let e = super::pixels(&images, 3, norm).unwrap_err();
            assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some("images")));
            assert!(e.message.contains(want), "{} lacks {want}", e.message);
        }
    }

    #[test]
    fn completion_fields_are_checked_by_name() {
        let request = |v: serde_json::Value| -> Result<super::CompletionRequest, crate::ApiError> { super::parse(v) };
        let e = request(json!({"prompt": "a"})).err().unwrap();
        assert!(e.message.contains("missing field `model`"), "{}", e.message);
        let e = request(json!({"model": "m", "prompt": "a", "max_tokens": "many"})).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("max_tokens"), "{}", e.message);
        for (extra, field) in [
            (json!({"n": 2}), "n"),
            (json!({"best_of": 3}), "best_of"),
            (json!({"echo": true}), "echo"),
            (json!({"logprobs": 1}), "logprobs"),
            (json!({"suffix": "x"}), "suffix"),
            (json!({"presence_penalty": 0.5}), "presence_penalty"),
            (json!({"logit_bias": {"1": 2}}), "logit_bias"),
        ] {
            let mut v = json!({"model": "m", "prompt": "a"});
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            let e = super::refuse_unsupported(&request(v).ok().unwrap()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{}", e.message);
        }
        // What the server does serve passes, including OpenAI's neutral values.
        let fine = json!({"model": "m", "prompt": "a", "n": 1, "best_of": 1, "echo": false, "logprobs": null, "presence_penalty": 0, "logit_bias": {}});
        assert!(super::refuse_unsupported(&request(fine).ok().unwrap()).is_ok());
        assert_eq!(super::strings(&json!(["a", "b"]), "stop", "stop sequences").unwrap(), ["a", "b"]);
        let e = super::strings(&json!(["a", 1]), "stop", "stop sequences").unwrap_err();
        assert!(e.message.contains("stop[1] = 1"), "{}", e.message);
        let e = super::strings(&json!(5), "prompt", "prompts").unwrap_err();
        assert!(e.message.contains("prompt = 5"), "{}", e.message);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn while_draining_health_says_so_and_new_work_gets_503() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 64);
        let s = Running::start(options(d.path())).await;
        let c = reqwest::Client::new();
        s.server.state.draining.store(true, std::sync::atomic::Ordering::Release);
        let (status, h) = get(&c, &format!("{}/health", s.url)).await;
        assert_eq!((status, h["status"].as_str()), (503, Some("draining")), "{h}");
        let r = c.post(format!("{}/v1/completions", s.url)).json(&greedy("a")).send().await.unwrap();
        assert_eq!((r.status().as_u16(), r.headers().get("retry-after").is_some()), (503, true));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn model_labels_of_ever_new_adapter_names_stay_bounded_in_the_metrics() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 64);
        let s = Running::start(options(d.path())).await;
        let c = reqwest::Client::new();
        let n = crate::metrics::MODEL_LABELS + 20;
        for i in 0..n {
            let name = format!("n{i}");
            let (status, v) = post(&c, &format!("{}/v1/load_lora_adapter", s.url), &json!({"lora_name": name, "lora_path": "a"})).await;
            assert_eq!(status, 200, "{v}");
            let (status, v) = post(&c, &format!("{}/v1/unload_lora_adapter", s.url), &json!({"lora_name": name})).await;
            assert_eq!(status, 200, "{v}");
        }
        let metrics = c.get(format!("{}/metrics", s.url)).send().await.unwrap().text().await.unwrap();
        let models: std::collections::HashSet<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("lora_requests_total{"))
            .filter_map(|l| l.split("model=\"").nth(1)?.split('"').next())
            .collect();
        assert!(models.len() <= crate::metrics::MODEL_LABELS + 1, "{} model labels", models.len());
        assert!(models.contains("other"), "{models:?}");
    }
}
