//! The data-plane and admin error type and its one mapping to HTTP.
//!
//! Handlers return `Result<_, ApiError>`; this module alone decides status
//! codes and the JSON shape `{"error": {"code", "message", "index"?}}`.
//! Internal failures are logged here and answered without their details.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tally_admin::Problem;
use utoipa::ToSchema;

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

/// Every way a request can fail, by the code clients see.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidJson(String),
    #[error("{message}")]
    InvalidEvent {
        index: Option<usize>,
        message: String,
    },
    #[error("{message}")]
    TsOutOfRange {
        index: Option<usize>,
        message: String,
    },
    #[error("{0}")]
    InvalidParam(String),
    #[error("{0}")]
    InvalidRange(String),
    #[error("{0}")]
    TooManyPoints(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("pending buffer of group {group} is full; retry later")]
    Overloaded {
        group: String,
        retry_after: Duration,
    },
    #[error("events were not committed within {0:?}; they stay queued and will be applied")]
    CommitTimeout(Duration),
    #[error("{0}")]
    Unavailable(String),
    #[error("proxy is shutting down")]
    ShuttingDown,
    #[error("internal error")]
    Internal(String),
    #[error("{}", .0)]
    InvalidTopology(tally_admin::Invalid),
    #[error("{0}")]
    VersionConflict(String),
    #[error("{0}")]
    ReshardRequired(String),
    #[error("{0}")]
    ReshardInProgress(String),
    #[error("{0}")]
    PastCutover(String),
    #[error("{0}")]
    PreconditionRequired(String),
    #[error("{0}")]
    TopologyStorage(String),
    #[error("{0}")]
    ReplicaBehind(String),
    #[error("{0}")]
    PromotionFailed(String),
    /// The write-ahead log cannot make writes durable (`durability: wal`).
    #[error("{0}")]
    WalFailed(String),
    /// The write-ahead log holds `wal.max_bytes` of not yet committed
    /// events (a group's master is down or slow): like a full buffer.
    #[error("{message}")]
    WalFull {
        message: String,
        retry_after: Duration,
    },
}

impl From<crate::failover::PromoteError> for ApiError {
    fn from(e: crate::failover::PromoteError) -> Self {
        use crate::failover::PromoteError as P;
        match e {
            e @ P::NoGroup(_) => ApiError::NotFound(e.to_string()),
            P::NotAReplica(m) => ApiError::InvalidParam(m),
            P::Behind(m) => ApiError::ReplicaBehind(m),
            e @ P::Failed(_) => ApiError::PromotionFailed(e.to_string()),
            P::Change(c) => c.into(),
        }
    }
}

impl From<crate::topology_ctl::ChangeError> for ApiError {
    fn from(e: crate::topology_ctl::ChangeError) -> Self {
        use crate::topology_ctl::ChangeError as C;
        match e {
            C::Invalid(invalid) => ApiError::InvalidTopology(invalid),
            e @ C::VersionConflict { .. } => ApiError::VersionConflict(e.to_string()),
            C::ReshardRequired(m) => ApiError::ReshardRequired(m),
            C::ReshardInProgress(m) => ApiError::ReshardInProgress(m),
            C::Unavailable(m) => ApiError::Unavailable(m),
            e @ (C::Read { .. } | C::Persist { .. }) => ApiError::TopologyStorage(e.to_string()),
        }
    }
}

impl ApiError {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidEvent { .. } => "invalid_event",
            ApiError::TsOutOfRange { .. } => "ts_out_of_range",
            ApiError::InvalidParam(_) => "invalid_param",
            ApiError::InvalidRange(_) => "invalid_range",
            ApiError::TooManyPoints(_) => "too_many_points",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::CommitTimeout(_) => "commit_timeout",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::Internal(_) => "internal",
            ApiError::InvalidTopology(_) => "invalid_topology",
            ApiError::VersionConflict(_) => "version_conflict",
            ApiError::ReshardRequired(_) => "reshard_required",
            ApiError::ReshardInProgress(_) => "reshard_in_progress",
            ApiError::PastCutover(_) => "past_cutover",
            ApiError::PreconditionRequired(_) => "precondition_required",
            ApiError::TopologyStorage(_) => "topology_storage",
            ApiError::ReplicaBehind(_) => "replica_behind",
            ApiError::PromotionFailed(_) => "promotion_failed",
            ApiError::WalFailed(_) => "wal_failed",
            ApiError::WalFull { .. } => "overloaded",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
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
            ApiError::Internal(_) | ApiError::TopologyStorage(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
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
    fn index(&self) -> Option<usize> {
        match self {
            ApiError::InvalidEvent { index, .. } | ApiError::TsOutOfRange { index, .. } => *index,
            _ => None,
        }
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
                index: self.index(),
                problems: match &self {
                    ApiError::InvalidTopology(invalid) => Some(invalid.problems.clone()),
                    _ => None,
                },
            },
        };
        let mut response = (self.status(), Json(body)).into_response();
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
