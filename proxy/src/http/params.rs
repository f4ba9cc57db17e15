//! Query-string and path parameters with our error shape.
//!
//! axum's own extractors answer malformed input with plain-text bodies; the
//! contract wants `{"error": {...}}` everywhere, so parameters are parsed
//! here and every problem becomes an [`ApiError`].

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;

use crate::domain::event::{MAX_KEY_BYTES, valid_ns};
use crate::error::ApiError;

/// Decoded query parameters; names outside the endpoint's list are refused
/// so that a typo (`dleta=5`) is not silently ignored.
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Params, ApiError> {
        let pairs: Vec<(String, String)> =
            url::form_urlencoded::parse(raw.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        for (k, _) in &pairs {
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::InvalidParam(format!(
                    "unknown query parameter {k:?}; accepted: {}",
                    allowed.join(", ")
                )));
            }
        }
        Ok(Params(pairs))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn i64(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| ApiError::InvalidParam(format!("{name}={v:?} is not an integer")))
            })
            .transpose()
    }

    /// One of `choices`, or `default` when absent.
    pub fn choice<'c>(
        &self,
        name: &str,
        choices: &[&'c str],
        default: &'c str,
    ) -> Result<&'c str, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => choices.iter().find(|c| **c == v).copied().ok_or_else(|| {
                ApiError::InvalidParam(format!("{name}={v:?}; accepted: {}", choices.join(", ")))
            }),
        }
    }
}

/// The OpenAPI description of [`CounterPath`]'s two segments.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // documentation only: the path is parsed by `CounterPath`
pub struct CounterPathDoc {
    /// Namespace.
    #[param(pattern = "^[a-z][a-z0-9_]{0,63}$", example = "views")]
    ns: String,
    /// Counter key, percent-encoded: 1 to 256 bytes of UTF-8, no control
    /// characters.
    #[param(min_length = 1, max_length = 256, example = "BV1x")]
    key: String,
}

/// The OpenAPI description of a `{ns}` path segment.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // documentation only: the handler parses the path
pub struct NsPathDoc {
    /// Namespace.
    #[param(pattern = "^[a-z][a-z0-9_]{0,63}$", example = "views")]
    ns: String,
}

/// axum's `Path` with our error shape. Its own rejection is a plain-text
/// 400 (`/v1/top/%FF` answered `Invalid URL: Invalid UTF-8 in ns`), which
/// breaks the contract that every error is `{"error": {...}}`.
pub struct PathParam<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for PathParam<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| PathParam(v))
            .map_err(|e| ApiError::InvalidParam(format!("bad path: {e}")))
    }
}

/// `{ns}/{key}` from the path, percent-decoded and validated.
pub struct CounterPath {
    pub ns: String,
    pub key: String,
}

impl<S: Send + Sync> FromRequestParts<S> for CounterPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let PathParam((ns, key)) =
            PathParam::<(String, String)>::from_request_parts(parts, state).await?;
        CounterPath::new(ns, key)
    }
}

impl CounterPath {
    /// Validates decoded path segments.
    pub fn new(ns: String, key: String) -> Result<CounterPath, ApiError> {
        if !valid_ns(&ns) {
            return Err(ApiError::InvalidParam(format!(
                "ns {ns:?} must match ^[a-z][a-z0-9_]{{0,63}}$"
            )));
        }
        if key.is_empty() || key.len() > MAX_KEY_BYTES || key.chars().any(char::is_control) {
            return Err(ApiError::InvalidParam(format!(
                "key must be 1 to {MAX_KEY_BYTES} bytes without control characters"
            )));
        }
        Ok(CounterPath { ns, key })
    }
}

/// Parses a JSON request body: malformed JSON is `invalid_json`, a
/// well-formed body of the wrong shape (unknown field, wrong type) is
/// `invalid_param`.
pub fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::InvalidParam(e.to_string()),
        _ => ApiError::InvalidJson(e.to_string()),
    })
}
