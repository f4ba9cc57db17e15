//! The one mapping of [`ApiError`] to HTTP: status codes, the JSON shape
//! `{"error": {"code", "message", "index"?, "problems"?}}` and
//! `Retry-After`. Internal failures are logged here and answered without
//! their details.

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
    /// `too_many_points`, `payload_too_large`, `unsupported_media_type`,
    /// `unauthorized`, `not_found`, `overloaded`, `commit_timeout`,
    /// `unavailable`, `shutting_down`, `internal`, `invalid_topology`,
    /// `version_conflict`, `reshard_required`, `precondition_required`,
    /// `topology_storage`, `replica_behind`, `promotion_failed`.
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
        ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
        ApiError::NotFound(_) => StatusCode::NOT_FOUND,
        ApiError::Overloaded { .. }
        | ApiError::Unavailable(_)
        | ApiError::ShuttingDown
        | ApiError::WalFailed(_)
        | ApiError::WalFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
        ApiError::CommitTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        ApiError::Internal(_) | ApiError::TopologyStorage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ApiError::InvalidTopology(_) => StatusCode::UNPROCESSABLE_ENTITY,
        ApiError::VersionConflict(_)
        | ApiError::ReshardRequired(_)
        | ApiError::ReshardInProgress(_)
        | ApiError::PastCutover(_)
        | ApiError::ReplicaBehind(_) => StatusCode::CONFLICT,
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
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error answering a request");
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
        if let ApiError::Overloaded { retry_after, .. } | ApiError::WalFull { retry_after, .. } =
            &self
        {
            let secs = retry_after.as_secs().max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}
