//! The HTTP client for the admin API, and the one place that turns transport
//! failures and server error bodies into [`CliError`]s.
//!
//! Every command goes through [`AdminClient::send`], so the bearer token,
//! the timeout, the URL joining and the reading of `{"error": {...}}` bodies
//! behave the same for all of them.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue, IF_MATCH};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;

use super::CliError;

/// A successful (2xx) answer: the body as received, for `--json`, and parsed.
#[derive(Debug)]
pub struct Reply {
    pub raw: String,
    pub json: Value,
}

impl Reply {
    /// Reads the body as `T`; a body that does not fit means the server and
    /// this tallyctl disagree about the API, which is a server-side failure.
    pub fn parse<T: serde::de::DeserializeOwned>(&self, what: &str) -> Result<T, CliError> {
        serde_json::from_value(self.json.clone()).map_err(|e| {
            CliError::BadResponse(format!(
                "unexpected {what} response: {e}; body: {}",
                self.raw
            ))
        })
    }
}

/// A server error body, `{"error": {"code", "message", "problems"?}}`.
#[derive(Debug, Clone, Deserialize)]
pub struct ServerError {
    pub code: String,
    pub message: String,
    /// Only on 422 `invalid_topology`: every problem found.
    #[serde(default)]
    pub problems: Vec<ServerProblem>,
}

/// One problem of a 422 `invalid_topology` answer.
#[derive(Debug, Clone, Deserialize)]
pub struct ServerProblem {
    #[serde(default)]
    pub path: String,
    pub message: String,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ServerError,
}

/// A client for one admin API base URL.
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    auth: Option<HeaderValue>,
}

impl AdminClient {
    /// Checks the URL and token up front so a typo is a usage error (exit 2)
    /// rather than a confusing transport failure.
    /// `ca`: a PEM file of the CA certificate(s) an `https://` admin
    /// listener is verified with, instead of the system's roots.
    pub fn new(
        url: &str,
        token: Option<&str>,
        timeout: Duration,
        ca: Option<&std::path::Path>,
    ) -> Result<Self, CliError> {
        let parsed = url::Url::parse(url)
            .map_err(|e| CliError::Usage(format!("--url {url:?} is not a URL: {e}")))?;
        if parsed.scheme() != "http" && parsed.scheme() != "https" {
            return Err(CliError::Usage(format!(
                "--url {url:?} must start with http:// or https://"
            )));
        }
        let auth = match token.filter(|t| !t.is_empty()) {
            None => None,
            Some(t) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    CliError::Usage(
                        "the admin token contains characters not allowed in an HTTP header".into(),
                    )
                })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout);
        if let Some(path) = ca {
            let pem = std::fs::read(path).map_err(|e| {
                CliError::Usage(format!("cannot read --ca {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "--ca {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                        path.display()
                    ))
                })?;
            builder = builder.tls_certs_only(certs);
        }
        let http = builder
            .build()
            .map_err(|e| CliError::Usage(format!("cannot build the HTTP client: {e}")))?;
        Ok(AdminClient {
            http,
            base: url.trim_end_matches('/').to_owned(),
            auth,
        })
    }

    /// The base URL, as used in messages.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn get(&self, path: &str) -> Result<Reply, CliError> {
        self.send(Method::GET, path, None, None).await
    }

    pub async fn post(&self, path: &str) -> Result<Reply, CliError> {
        self.send(Method::POST, path, None, None).await
    }

    /// POST with a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Reply, CliError> {
        self.send(Method::POST, path, Some(body), None).await
    }

    /// PUT with a JSON body and `If-Match: "<version>"`.
    pub async fn put(&self, path: &str, body: &Value, if_match: u64) -> Result<Reply, CliError> {
        self.send(Method::PUT, path, Some(body), Some(if_match))
            .await
    }

    /// Sends one request. `path` starts with `/` and may carry an already
    /// encoded query string.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<u64>,
    ) -> Result<Reply, CliError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        if let Some(v) = if_match {
            req = req.header(IF_MATCH, format!("\"{v}\""));
        }
        if let Some(body) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status();
        let raw = resp.text().await.map_err(|e| self.transport(e))?;
        if status.is_success() {
            let json = serde_json::from_str(&raw).map_err(|e| {
                CliError::BadResponse(format!(
                    "{url} answered {status} with a body that is not JSON ({e}): {}",
                    truncate(&raw)
                ))
            })?;
            return Ok(Reply { raw, json });
        }
        Err(server_error(status, raw))
    }

    fn transport(&self, e: reqwest::Error) -> CliError {
        let detail = chain(&e);
        if e.is_connect() {
            CliError::Unreachable {
                url: self.base.clone(),
                detail,
            }
        } else if e.is_timeout() {
            // Connected but no answer in time: the request may still take
            // effect on the server, so this is not "unreachable".
            CliError::Timeout {
                url: self.base.clone(),
                detail,
            }
        } else {
            CliError::BadResponse(format!("request to {} failed: {detail}", self.base))
        }
    }
}

/// Builds the error for a non-2xx answer. A body that is not our error shape
/// (a reverse proxy's HTML page, say) still yields the status and its start.
fn server_error(status: StatusCode, raw: String) -> CliError {
    let parsed = serde_json::from_str::<ErrorEnvelope>(&raw).ok();
    let json = serde_json::from_str::<Value>(&raw).ok();
    let error = parsed.map(|e| e.error).unwrap_or_else(|| ServerError {
        code: format!("http_{}", status.as_u16()),
        message: if raw.trim().is_empty() {
            status.canonical_reason().unwrap_or("no message").to_owned()
        } else {
            truncate(&raw)
        },
        problems: Vec::new(),
    });
    CliError::Server {
        status: status.as_u16(),
        error,
        raw_json: json.map(|_| raw),
    }
}

/// The causes of a transport error ("client error (Connect): tcp connect
/// error: Connection refused"): reqwest's own top message only repeats the
/// URL, which the caller's message already names.
fn chain(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut parts: Vec<String> = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

fn truncate(s: &str) -> String {
    const MAX: usize = 300;
    let s = s.trim();
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Percent-encodes a query value: everything but unreserved characters, so
/// spaces become `%20` (not `+`) and `/`, `&`, `=` and `#` cannot split or
/// end the query.
pub fn encode_query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_fully_percent_encoded() {
        assert_eq!(
            encode_query_value("a b/c&d=e#f+g%é"),
            "a%20b%2Fc%26d%3De%23f%2Bg%25%C3%A9"
        );
        // And the proxy's decoder (form-urlencoded) gets the original back.
        let decoded: Vec<(String, String)> =
            url::form_urlencoded::parse(format!("k={}", encode_query_value("x y/z+é")).as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        assert_eq!(decoded, [("k".to_owned(), "x y/z+é".to_owned())]);
    }

    #[test]
    fn non_json_error_bodies_keep_status_and_text() {
        let CliError::Server {
            status,
            error,
            raw_json,
        } = server_error(StatusCode::BAD_GATEWAY, "<html>bad gateway</html>".into())
        else {
            panic!("expected a server error");
        };
        assert_eq!(status, 502);
        assert_eq!(error.code, "http_502");
        assert!(error.message.contains("bad gateway"));
        assert!(raw_json.is_none());
    }

    #[test]
    fn problems_are_read_from_422_bodies() {
        let body = r#"{"error":{"code":"invalid_topology","message":"2 problems","problems":[{"path":"groups[0].weight","message":"must be 1..=1000, got 0"},{"path":"vnodes","message":"bad"}]}}"#;
        let CliError::Server { error, .. } =
            server_error(StatusCode::UNPROCESSABLE_ENTITY, body.into())
        else {
            panic!("expected a server error");
        };
        assert_eq!(error.code, "invalid_topology");
        assert_eq!(error.problems.len(), 2);
        assert_eq!(error.problems[1].path, "vnodes");
    }
}
