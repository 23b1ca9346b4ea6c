//! OpenAI-shaped errors, rendered in one place: `{"error": {"message", "type", "param", "code"}}`.
//!
//! Classified once at the source ([`ErrorKind`]), rendered at the edge: the kind picks the HTTP status, the `type`
//! string and a stable `code`. 5xx bodies carry a generic message; the real cause is logged, never sent (axum's
//! error-handling example; TGI's single `From<InferError>`, but with the real OpenAI envelope and a `param`).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Closed set of error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input (400).
    InvalidRequest,
    /// The prompt plus `max_tokens` does not fit the context (400, `context_length_exceeded`).
    ContextLength,
    /// No or a wrong API key (401, `invalid_api_key`).
    Unauthorized,
    /// Unknown model name (404, `model_not_found`).
    ModelNotFound,
    /// Request body over the limit (413).
    PayloadTooLarge,
    /// Queue full (429).
    RateLimited,
    /// No worker ready (503).
    Unavailable,
    /// Anything else (500); details are logged only.
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::ContextLength => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::ModelNotFound => StatusCode::NOT_FOUND,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn type_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::ContextLength | ErrorKind::PayloadTooLarge => "invalid_request_error",
            ErrorKind::ModelNotFound | ErrorKind::Unauthorized => "invalid_request_error",
            ErrorKind::RateLimited => "rate_limit_error",
            ErrorKind::Unavailable => "service_unavailable_error",
            ErrorKind::Internal => "internal_server_error",
        }
    }

    fn default_code(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_value",
            ErrorKind::ContextLength => "context_length_exceeded",
            ErrorKind::Unauthorized => "invalid_api_key",
            ErrorKind::ModelNotFound => "model_not_found",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::RateLimited => "rate_limit_exceeded",
            ErrorKind::Unavailable => "no_worker_ready",
            ErrorKind::Internal => "internal_error",
        }
    }
}

/// An error on its way to the client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    /// Client-safe message (ignored for 5xx, which get a generic one).
    pub message: String,
    /// The request field at fault.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), param: None, code: None }
    }

    /// A 400 about `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self { param: Some(param.to_string()), ..Self::new(ErrorKind::InvalidRequest, message) }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body (`{"error": {...}}`), also used for SSE error events after streaming has begun.
    pub fn body(&self) -> ErrorBody {
        let message = if self.kind.status().is_server_error() {
            match self.kind {
                ErrorKind::Unavailable => "No worker is ready to serve this request; retry later.".to_string(),
                _ => "The server had an error while processing your request.".to_string(),
            }
        } else {
            self.message.clone()
        };
        ErrorBody {
            error: ErrorObject {
                message,
                r#type: self.kind.type_str(),
                param: self.param.clone(),
                code: self.code.unwrap_or(self.kind.default_code()),
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorObject {
    pub message: String,
    pub r#type: &'static str,
    pub param: Option<String>,
    pub code: &'static str,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.kind.status().is_server_error() {
            tracing::error!(kind = ?self.kind, detail = %self.message, "request failed");
        }
        (self.kind.status(), Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_shape_and_statuses() {
        let e = ApiError::invalid("temperature", "`temperature` must be in [0, 2], got 3");
        let v = serde_json::to_value(e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": "`temperature` must be in [0, 2], got 3",
                "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}})
        );
        assert_eq!(e.kind.status(), StatusCode::BAD_REQUEST);
        let ctx = ApiError::new(ErrorKind::ContextLength, "too long").body();
        assert_eq!(ctx.error.code, "context_length_exceeded");
        assert_eq!(ApiError::new(ErrorKind::RateLimited, "full").kind.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(ApiError::new(ErrorKind::ModelNotFound, "x").kind.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn server_errors_never_leak_internals() {
        let e = ApiError::new(ErrorKind::Internal, "panicked at /srv/worker/src/engine.rs:42 secret");
        let body = serde_json::to_string(&e.body()).unwrap();
        assert!(!body.contains("secret") && !body.contains("/srv"), "{body}");
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
