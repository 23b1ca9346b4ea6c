//! API keys: `Authorization: Bearer <key>` on every endpoint except health (and `/metrics` unless protected).
//!
//! Keys are kept as SHA-256 digests and a presented key is compared against every one of them in constant time
//! (`subtle`), so neither the match position nor a common prefix shows in the timing. Keys never reach a log: the
//! `Debug` of [`ApiKeys`] prints only how many there are.

use std::fmt;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use crate::error::RouterError;
use crate::openai::error::{ApiError, ErrorKind};

/// The accepted keys (digests only).
#[derive(Clone)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl ApiKeys {
    /// Keys from an iterator of strings (surrounding whitespace trimmed; blank entries and `#` comments skipped).
    /// At least one key is required, and a key must not contain whitespace.
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<Self, RouterError> {
        let mut digests = Vec::new();
        for k in keys.into_iter().map(str::trim).filter(|k| !k.is_empty() && !k.starts_with('#')) {
            if k.chars().any(char::is_whitespace) {
                return Err(RouterError::ApiKeys("an API key contains whitespace".into()));
            }
            digests.push(digest(k.as_bytes()));
        }
        if digests.is_empty() {
            return Err(RouterError::ApiKeys("no API key given (the file or FERRITE_API_KEYS is empty)".into()));
        }
        Ok(Self { digests })
    }

    /// Keys from a file, one per line.
    pub fn from_file(path: &std::path::Path) -> Result<Self, RouterError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| RouterError::ApiKeys(format!("reading the API key file {}: {e}", path.display())))?;
        Self::new(text.lines())
    }

    /// True when `presented` is one of the keys. Compares against every key, in constant time per key.
    pub fn accepts(&self, presented: &str) -> bool {
        let d = digest(presented.as_bytes());
        let mut hit = Choice::from(0);
        for k in &self.digests {
            hit |= k.ct_eq(&d);
        }
        hit.into()
    }
}

/// Who may call what.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub keys: Arc<ApiKeys>,
    /// `/metrics` needs a key too.
    pub protect_metrics: bool,
}

/// Paths that stay open so probes and (by default) Prometheus need no key.
fn is_open(path: &str, protect_metrics: bool) -> bool {
    matches!(path, "/health" | "/v1/health/live" | "/v1/health/ready") || (path == "/metrics" && !protect_metrics)
}

/// The middleware: 401 in the OpenAI envelope (`invalid_api_key`) unless the request carries an accepted key.
pub async fn require_key(State(auth): State<Arc<AuthConfig>>, req: Request, next: Next) -> Response {
    if is_open(req.uri().path(), auth.protect_metrics) {
        return next.run(req).await;
    }
    let presented = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    match presented {
        Some(key) if auth.keys.accepts(key) => next.run(req).await,
        Some(_) => unauthorized("Incorrect API key provided."),
        None => unauthorized("Missing API key: send `Authorization: Bearer <key>`."),
    }
}

fn unauthorized(message: &str) -> Response {
    ApiError { code: Some("invalid_api_key"), ..ApiError::new(ErrorKind::Unauthorized, message) }.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_exactly_the_listed_keys() {
        let keys = ApiKeys::new(["sk-one", " sk-two ", "", "# a comment"]).unwrap();
        assert!(keys.accepts("sk-one"));
        assert!(keys.accepts("sk-two"));
        assert!(!keys.accepts("sk-tw"));
        assert!(!keys.accepts("sk-one "));
        assert!(!keys.accepts(""));
        assert!(!keys.accepts("# a comment"));
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)");
    }

    #[test]
    fn refuses_an_empty_or_malformed_key_list() {
        assert!(ApiKeys::new(["", "  ", "#x"]).is_err());
        assert!(ApiKeys::new(["sk one"]).is_err());
    }

    #[test]
    fn health_is_open_and_metrics_only_when_unprotected() {
        assert!(is_open("/v1/health/ready", true));
        assert!(is_open("/metrics", false));
        assert!(!is_open("/metrics", true));
        assert!(!is_open("/v1/models", false));
        assert!(!is_open("/v1/chat/completions", false));
    }
}
