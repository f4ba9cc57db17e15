//! The one mapping of [`ApiError`] to HTTP: status codes, the JSON shape
//! `{"error": {"code", "message", "index"?, "problems"?}}` and
//! `Retry-After`. Internal failures and groups that could not serve are
//! logged here and answered without their details (server addresses,
//! driver errors).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tally_admin::Problem;
use utoipa::ToSchema;

use crate::error::ApiError;

// `ApiError` is serialized through this type only, so the OpenAPI schema
// derived from it is the shape clients get. (`///` text below is the
// schema's description in the OpenAPI document.)
/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong, for programs (`code`) and for people (`message`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code: `invalid_json`, `invalid_event`,
    /// `ts_out_of_range`, `invalid_param`, `invalid_range`,
    /// `too_many_points`, `payload_too_large`, `body_timeout`,
    /// `unsupported_media_type`,
    /// `unauthorized`, `forbidden_origin`, `not_found`, `overloaded`,
    /// `commit_timeout`,
    /// `unavailable`, `shutting_down`, `internal`, `invalid_topology`,
    /// `version_conflict`, `reshard_required`, `precondition_required`,
    /// `topology_storage`, `replica_behind`, `promotion_failed`,
    /// `wal_failed`, `count_out_of_range`, `store_unreachable`.
    #[schema(example = "invalid_param")]
    pub code: &'static str,
    pub message: String,
    /// The first bad event of a batch (0-based), for `invalid_event` and
    /// `ts_out_of_range`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// Every problem of a rejected topology (`invalid_topology`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problems: Option<Vec<Problem>>,
}

/// The HTTP status of each error: the one table.
pub fn status(e: &ApiError) -> StatusCode {
    match e {
        ApiError::InvalidJson(_)
        | ApiError::InvalidEvent { .. }
        | ApiError::TsOutOfRange { .. }
        | ApiError::InvalidParam(_)
        | ApiError::InvalidRange(_)
        | ApiError::TooManyPoints(_) => StatusCode::BAD_REQUEST,
        ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
        ApiError::ForbiddenOrigin(_) => StatusCode::FORBIDDEN,
        ApiError::NotFound(_) => StatusCode::NOT_FOUND,
        ApiError::Overloaded { .. }
        | ApiError::Unavailable(_)
        | ApiError::GroupUnavailable { .. }
        | ApiError::ShuttingDown
        | ApiError::WalFailed(_)
        | ApiError::WalFull { .. }
        | ApiError::BodyBudgetFull { .. }
        | ApiError::StoreUnreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        ApiError::CommitTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        ApiError::Internal(_) | ApiError::TopologyStorage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ApiError::InvalidTopology(_) => StatusCode::UNPROCESSABLE_ENTITY,
        ApiError::VersionConflict(_)
        | ApiError::ReshardRequired(_)
        | ApiError::ReshardInProgress(_)
        | ApiError::PastCutover(_)
        | ApiError::ReplicaBehind(_)
        | ApiError::CountOutOfRange(_) => StatusCode::CONFLICT,
        ApiError::PromotionFailed(_) => StatusCode::SERVICE_UNAVAILABLE,
        ApiError::PreconditionRequired(_) => StatusCode::PRECONDITION_REQUIRED,
    }
}

/// Whether the error is about one event of a batch (and which).
fn index(e: &ApiError) -> Option<usize> {
    match e {
        ApiError::InvalidEvent { index, .. } | ApiError::TsOutOfRange { index, .. } => *index,
        _ => None,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error answering a request");
            }
            ApiError::GroupUnavailable { group, detail } => {
                tracing::warn!(%group, %detail, "group unavailable; answered 503 without the detail");
            }
            _ => {}
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
                index: index(&self),
                problems: match &self {
                    ApiError::InvalidTopology(invalid) => Some(invalid.problems.clone()),
                    _ => None,
                },
            },
        };
        let mut response = (status(&self), Json(body)).into_response();
        if let ApiError::Overloaded { retry_after, .. }
        | ApiError::WalFull { retry_after, .. }
        | ApiError::BodyBudgetFull { retry_after }
        | ApiError::StoreUnreachable { retry_after, .. } = &self
        {
            let secs = retry_after.as_secs().max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        // A refused body was not read to its end: the connection cannot
        // carry another request (hyper closes it), and the client is told.
        if let ApiError::BodyTimeout(_) | ApiError::BodyBudgetFull { .. } = &self {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use serde_json::{Value, json};
    use tally_admin::{Invalid, Problem};

    use super::*;

    /// Position of each variant in [`cases`]. The match is exhaustive, so a
    /// new variant does not compile until it has a row in the table below.
    fn variant(e: &ApiError) -> usize {
        match e {
            ApiError::InvalidJson(_) => 0,
            ApiError::InvalidEvent { .. } => 1,
            ApiError::TsOutOfRange { .. } => 2,
            ApiError::InvalidParam(_) => 3,
            ApiError::InvalidRange(_) => 4,
            ApiError::TooManyPoints(_) => 5,
            ApiError::PayloadTooLarge(_) => 6,
            ApiError::UnsupportedMediaType(_) => 7,
            ApiError::Unauthorized => 8,
            ApiError::NotFound(_) => 9,
            ApiError::Overloaded { .. } => 10,
            ApiError::CommitTimeout(_) => 11,
            ApiError::Unavailable(_) => 12,
            ApiError::ShuttingDown => 13,
            ApiError::Internal(_) => 14,
            ApiError::InvalidTopology(_) => 15,
            ApiError::VersionConflict(_) => 16,
            ApiError::ReshardRequired(_) => 17,
            ApiError::ReshardInProgress(_) => 18,
            ApiError::PastCutover(_) => 19,
            ApiError::PreconditionRequired(_) => 20,
            ApiError::TopologyStorage(_) => 21,
            ApiError::ReplicaBehind(_) => 22,
            ApiError::PromotionFailed(_) => 23,
            ApiError::WalFailed(_) => 24,
            ApiError::WalFull { .. } => 25,
            ApiError::CountOutOfRange(_) => 26,
            ApiError::BodyTimeout(_) => 27,
            ApiError::BodyBudgetFull { .. } => 28,
            ApiError::GroupUnavailable { .. } => 29,
            ApiError::ForbiddenOrigin(_) => 30,
            ApiError::StoreUnreachable { .. } => 31,
        }
    }
    const VARIANTS: usize = 32;

    fn invalid_topology() -> ApiError {
        ApiError::InvalidTopology(Invalid {
            problems: vec![
                Problem {
                    path: "groups[0].weight".into(),
                    message: "must be 1 to 1000".into(),
                },
                Problem {
                    path: "groups[1].name".into(),
                    message: "duplicate group name".into(),
                },
            ],
        })
    }

    /// Every variant with the status and code clients must see. The codes
    /// are the documented ones (SPEC §2, §3 and `ErrorDetail::code`); the
    /// statuses follow SPEC where it names them (400 for bad input, 413,
    /// 401, 422, 409 `version_conflict`, 503 `overloaded`, 504
    /// `commit_timeout`) and HTTP's meaning elsewhere: a state conflict is
    /// 409, a missing `If-Match` is 428, a request refused whoever sends
    /// it is 403, "try again later" is 503 and our own fault is 500.
    fn cases() -> Vec<(ApiError, StatusCode, &'static str)> {
        use StatusCode as S;
        let s = |m: &str| m.to_owned();
        vec![
            (
                ApiError::InvalidJson(s("expected value")),
                S::BAD_REQUEST,
                "invalid_json",
            ),
            (
                ApiError::InvalidEvent {
                    index: Some(3),
                    message: s("delta out of range"),
                },
                S::BAD_REQUEST,
                "invalid_event",
            ),
            (
                ApiError::TsOutOfRange {
                    index: None,
                    message: s("ts is 8 days old"),
                },
                S::BAD_REQUEST,
                "ts_out_of_range",
            ),
            (
                ApiError::InvalidParam(s("unknown query parameter")),
                S::BAD_REQUEST,
                "invalid_param",
            ),
            (
                ApiError::InvalidRange(s("from >= to")),
                S::BAD_REQUEST,
                "invalid_range",
            ),
            (
                ApiError::TooManyPoints(s("10001 points")),
                S::BAD_REQUEST,
                "too_many_points",
            ),
            (
                ApiError::PayloadTooLarge(s("10001 events")),
                S::PAYLOAD_TOO_LARGE,
                "payload_too_large",
            ),
            (
                ApiError::UnsupportedMediaType(s("text/plain")),
                S::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
            ),
            (ApiError::Unauthorized, S::UNAUTHORIZED, "unauthorized"),
            (
                ApiError::ForbiddenOrigin(s("the admin API does not serve web pages")),
                S::FORBIDDEN,
                "forbidden_origin",
            ),
            (
                ApiError::NotFound(s("no such route")),
                S::NOT_FOUND,
                "not_found",
            ),
            (
                ApiError::Overloaded {
                    group: s("g0"),
                    retry_after: Duration::from_secs(2),
                },
                S::SERVICE_UNAVAILABLE,
                "overloaded",
            ),
            (
                ApiError::CommitTimeout(Duration::from_secs(5)),
                S::GATEWAY_TIMEOUT,
                "commit_timeout",
            ),
            (
                ApiError::Unavailable(s("group g0 unreachable")),
                S::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
            (
                ApiError::GroupUnavailable {
                    group: s("g0"),
                    detail: s("cannot connect to 10.0.0.5:3306: Connection refused"),
                },
                S::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
            (
                ApiError::ShuttingDown,
                S::SERVICE_UNAVAILABLE,
                "shutting_down",
            ),
            (
                ApiError::Internal(s("pool poisoned")),
                S::INTERNAL_SERVER_ERROR,
                "internal",
            ),
            (
                invalid_topology(),
                S::UNPROCESSABLE_ENTITY,
                "invalid_topology",
            ),
            (
                ApiError::VersionConflict(s("version is 4")),
                S::CONFLICT,
                "version_conflict",
            ),
            (
                ApiError::ReshardRequired(s("keys move")),
                S::CONFLICT,
                "reshard_required",
            ),
            (
                ApiError::ReshardInProgress(s("reshard 7 running")),
                S::CONFLICT,
                "reshard_in_progress",
            ),
            (
                ApiError::PastCutover(s("copy finished")),
                S::CONFLICT,
                "past_cutover",
            ),
            (
                ApiError::PreconditionRequired(s("If-Match missing")),
                S::PRECONDITION_REQUIRED,
                "precondition_required",
            ),
            (
                ApiError::TopologyStorage(s("rename failed")),
                S::INTERNAL_SERVER_ERROR,
                "topology_storage",
            ),
            (
                ApiError::ReplicaBehind(s("lag 12 s")),
                S::CONFLICT,
                "replica_behind",
            ),
            (
                ApiError::PromotionFailed(s("replica unreachable")),
                S::SERVICE_UNAVAILABLE,
                "promotion_failed",
            ),
            (
                ApiError::WalFailed(s("fsync failed")),
                S::SERVICE_UNAVAILABLE,
                "wal_failed",
            ),
            (
                ApiError::WalFull {
                    message: s("write-ahead log full"),
                    retry_after: Duration::from_secs(1),
                },
                S::SERVICE_UNAVAILABLE,
                "overloaded",
            ),
            (
                ApiError::CountOutOfRange(s("v/a: 2^63 + 4")),
                S::CONFLICT,
                "count_out_of_range",
            ),
            (
                ApiError::BodyTimeout(s("the request body did not arrive within 30s")),
                S::REQUEST_TIMEOUT,
                "body_timeout",
            ),
            (
                ApiError::BodyBudgetFull {
                    retry_after: Duration::from_secs(1),
                },
                S::SERVICE_UNAVAILABLE,
                "overloaded",
            ),
            (
                ApiError::StoreUnreachable {
                    fence_after: Duration::from_millis(3750),
                    retry_after: Duration::from_secs(1),
                },
                S::SERVICE_UNAVAILABLE,
                "store_unreachable",
            ),
        ]
    }

    async fn answer(e: ApiError) -> (StatusCode, axum::http::HeaderMap, Value) {
        let response = e.into_response();
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.expect("body");
        let json: Value = serde_json::from_slice(&bytes).expect("error body is JSON");
        (parts.status, parts.headers, json)
    }

    #[test]
    fn the_table_lists_every_variant_once() {
        let mut seen = [0; VARIANTS];
        for (e, _, _) in cases() {
            seen[variant(&e)] += 1;
        }
        assert_eq!(seen, [1; VARIANTS], "variant rows in cases()");
    }

    #[test]
    fn every_variant_has_its_status_and_code() {
        for (e, want_status, want_code) in cases() {
            assert_eq!(status(&e), want_status, "status of {e:?}");
            assert_eq!(e.code(), want_code, "code of {e:?}");
        }
    }

    #[test]
    fn codes_are_snake_case_and_only_overload_shares_one() {
        let cases = cases();
        for (e, _, _) in &cases {
            let code = e.code();
            assert!(
                !code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{code:?} is not a snake_case code"
            );
        }
        let mut codes: Vec<&str> = cases.iter().map(|(e, _, _)| e.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        // A full write-ahead log and a full body budget are a full buffer
        // to clients: all three say `overloaded`; a group that could not
        // serve is `unavailable` like any other unavailability. Every
        // other variant has a code of its own.
        assert_eq!(codes.len(), VARIANTS - 3);
    }

    #[tokio::test]
    async fn every_answer_is_the_documented_json_shape() {
        for (e, want_status, want_code) in cases() {
            let message = e.to_string();
            let (status, headers, body) = answer(e).await;
            assert_eq!(status, want_status);
            assert_eq!(
                headers.get(header::CONTENT_TYPE).map(|v| v.as_bytes()),
                Some(&b"application/json"[..]),
                "{want_code}"
            );
            let top = body.as_object().expect("body is an object");
            assert_eq!(top.len(), 1, "only `error` at the top: {body}");
            let error = body["error"].as_object().expect("`error` is an object");
            assert_eq!(error["code"], want_code);
            assert!(error["message"].is_string(), "{body}");
            if want_code != "internal" {
                assert_eq!(error["message"], message.as_str());
            }
            let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
            keys.sort_unstable();
            let expected: &[&str] = match want_code {
                "invalid_event" => &["code", "index", "message"],
                "invalid_topology" => &["code", "message", "problems"],
                _ => &["code", "message"],
            };
            assert_eq!(keys, expected, "fields of {want_code}: {body}");
        }
    }

    #[tokio::test]
    async fn index_names_the_first_bad_event_and_is_absent_without_one() {
        let (_, _, body) = answer(ApiError::InvalidEvent {
            index: Some(0),
            message: "unknown field `detla`".into(),
        })
        .await;
        assert_eq!(
            body,
            json!({"error": {"code": "invalid_event", "message": "unknown field `detla`", "index": 0}})
        );
        let (_, _, body) = answer(ApiError::TsOutOfRange {
            index: Some(41),
            message: "too old".into(),
        })
        .await;
        assert_eq!(body["error"]["index"], 41);
        assert_eq!(body["error"]["code"], "ts_out_of_range");
        // A single event (or a query parameter) has no batch position.
        let (_, _, body) = answer(ApiError::TsOutOfRange {
            index: None,
            message: "too old".into(),
        })
        .await;
        assert!(body["error"].get("index").is_none(), "{body}");
    }

    #[tokio::test]
    async fn invalid_topology_lists_every_problem() {
        let (status, _, body) = answer(invalid_topology()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            body["error"]["problems"],
            json!([
                {"path": "groups[0].weight", "message": "must be 1 to 1000"},
                {"path": "groups[1].name", "message": "duplicate group name"}
            ])
        );
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.starts_with("2 problems"), "{message}");
    }

    #[tokio::test]
    async fn overloaded_and_wal_full_say_when_to_retry_in_whole_seconds_at_least_one() {
        // Retry-After is delay-seconds (RFC 9110 §10.2.3): a whole number,
        // and 0 would invite an immediate retry of a full buffer.
        for (retry_after, want) in [
            (Duration::ZERO, "1"),
            (Duration::from_millis(250), "1"),
            (Duration::from_millis(1999), "1"),
            (Duration::from_secs(2), "2"),
            (Duration::from_secs(30), "30"),
        ] {
            for e in [
                ApiError::Overloaded {
                    group: "g1".into(),
                    retry_after,
                },
                ApiError::WalFull {
                    message: "write-ahead log full".into(),
                    retry_after,
                },
                ApiError::BodyBudgetFull { retry_after },
                ApiError::StoreUnreachable {
                    fence_after: Duration::from_millis(3750),
                    retry_after,
                },
            ] {
                let code = e.code();
                let (status, headers, body) = answer(e).await;
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
                assert_eq!(body["error"]["code"], code);
                let header = headers
                    .get(header::RETRY_AFTER)
                    .unwrap_or_else(|| panic!("{code} without Retry-After"));
                assert_eq!(header, want, "{code} with retry_after {retry_after:?}");
            }
        }
    }

    #[tokio::test]
    async fn errors_that_retrying_cannot_fix_carry_no_retry_after() {
        for e in [
            ApiError::InvalidParam("limit=abc is not an integer".into()),
            ApiError::PayloadTooLarge("10001 events".into()),
            ApiError::CommitTimeout(Duration::from_secs(5)),
        ] {
            let (_, headers, _) = answer(e).await;
            assert!(headers.get(header::RETRY_AFTER).is_none());
        }
    }

    #[tokio::test]
    async fn refused_bodies_close_the_connection_and_nothing_else_does() {
        for (e, _, code) in cases() {
            let closes = matches!(
                e,
                ApiError::BodyTimeout(_) | ApiError::BodyBudgetFull { .. }
            );
            let (_, headers, _) = answer(e).await;
            let want = closes.then_some(&b"close"[..]);
            assert_eq!(
                headers.get(header::CONNECTION).map(|v| v.as_bytes()),
                want,
                "{code}"
            );
        }
    }

    #[tokio::test]
    async fn overloaded_names_the_full_group() {
        let (_, _, body) = answer(ApiError::Overloaded {
            group: "g7".into(),
            retry_after: Duration::from_secs(1),
        })
        .await;
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains("g7"), "{message}");
    }

    /// Issue #20 item 6: a read of a group whose servers failed told
    /// data-plane clients the server's address and the driver's error.
    #[tokio::test]
    async fn an_unavailable_group_is_named_without_its_detail() {
        let (status, headers, body) = answer(ApiError::GroupUnavailable {
            group: "g3".into(),
            detail: "cannot connect to 10.0.0.5:3306 (mysql://tally:s3cret@10.0.0.5): Connection refused".into(),
        })
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            json!({"error": {"code": "unavailable", "message": "group g3 is unavailable; retry later"}})
        );
        assert!(headers.get(header::RETRY_AFTER).is_none());
    }

    #[tokio::test]
    async fn internal_errors_do_not_leak_their_detail() {
        let detail = "mysql://tally:s3cret@10.0.0.5:3306/tally: Access denied";
        let (status, headers, body) = answer(ApiError::Internal(detail.into())).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"]["code"], "internal");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(!message.is_empty());
        let whole = body.to_string();
        for secret in ["s3cret", "10.0.0.5", "Access denied", "mysql://"] {
            assert!(!whole.contains(secret), "{secret:?} leaked: {whole}");
        }
        for (_, v) in &headers {
            assert!(!v.as_bytes().windows(6).any(|w| w == b"s3cret"));
        }
    }
}
