//! Errors: [`ServeError`] for starting a server, [`ApiError`] for a request (an HTTP status and an
//! OpenAI-shaped JSON body `{"error": {"message", "type", "param", "code"}}`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Result with [`ServeError`].
pub type Result<T> = std::result::Result<T, ServeError>;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model or an adapter could not be loaded; names the file.
    #[error(transparent)]
    Lm(#[from] lora_lm::LmError),
    /// From the LoRA layers or adapter files.
    #[error(transparent)]
    Lora(#[from] lora::LoraError),
    /// From the MNIST network.
    #[error(transparent)]
    Train(#[from] lora_train::TrainError),
    /// A setting is out of range; names the setting and value.
    #[error("invalid setting {name} = {value}: {why}")]
    Setting {
        /// The setting (a command-line flag's name without dashes).
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it is refused.
        why: String,
    },
    /// A file or directory problem; names the path.
    #[error("{path}: {why}")]
    Path {
        /// The path.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The network (binding, serving).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ServeError {
    pub(crate) fn setting(name: &'static str, value: impl std::fmt::Display, why: impl Into<String>) -> Self {
        ServeError::Setting { name, value: value.to_string(), why: why.into() }
    }
    pub(crate) fn path(path: &std::path::Path, why: impl Into<String>) -> Self {
        ServeError::Path { path: path.display().to_string(), why: why.into() }
    }
}

/// A request's failure: the status and the message the client sees.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status (4xx for the client's mistakes, 5xx for ours).
    pub status: StatusCode,
    /// What went wrong, naming the field and value.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
}

impl ApiError {
    /// A 400 about field `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), param: Some(param.into()) }
    }
    /// An error with `status` and no particular field.
    pub fn status(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), param: None }
    }
    /// The OpenAI error type for the status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }
    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.status.as_u16()}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}
