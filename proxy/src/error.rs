//! Every way a request can fail, by the code clients see.
//!
//! A leaf: it knows no other module of the crate and nothing of HTTP. The
//! one mapping to statuses and the JSON error shape lives in `http::error`;
//! domain errors of higher layers (topology changes, promotions) convert
//! into it next to where they are defined.

use std::time::Duration;

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
    /// An admin request a browser marked as coming from a web page
    /// (`Origin`, `Sec-Fetch-Site`): the admin API serves tools, and a
    /// page must not drive it through an operator's browser.
    #[error("{0}")]
    ForbiddenOrigin(String),
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
    /// A group's servers could not answer a read. Clients learn which
    /// group and to retry; `detail` (server addresses, driver errors) is
    /// logged, never answered.
    #[error("group {group} is unavailable; retry later")]
    GroupUnavailable { group: String, detail: String },
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
    /// A strong read whose stored count plus pending deltas is outside the
    /// 64-bit range counts are answered in (the deltas will be quarantined).
    #[error("{0}")]
    CountOutOfRange(String),
    /// The write-ahead log holds `wal.max_bytes` of not yet committed
    /// events (a group's master is down or slow): like a full buffer.
    #[error("{message}")]
    WalFull {
        message: String,
        retry_after: Duration,
    },
    /// A request body arrived too slowly: below the minimum rate, or not
    /// complete by the body deadline (the connection is closed).
    #[error("{0}")]
    BodyTimeout(String),
    /// The listener holds `connections.max_body_bytes_in_flight` bytes of
    /// request bodies: like a full buffer.
    #[error("too many request bodies are being read at once; retry later")]
    BodyBudgetFull { retry_after: Duration },
    /// This proxy has not reached the shared topology store for longer
    /// than its lease (`fence_after`) and may route by an outdated
    /// topology: it refuses writes until it has read the store again.
    #[error(
        "this proxy has not reached the topology store for more than {fence_after:?} and refuses writes until it has read it again (reads still work); retry later or through another proxy"
    )]
    StoreUnreachable {
        fence_after: Duration,
        retry_after: Duration,
    },
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
            ApiError::ForbiddenOrigin(_) => "forbidden_origin",
            ApiError::NotFound(_) => "not_found",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::CommitTimeout(_) => "commit_timeout",
            ApiError::Unavailable(_) | ApiError::GroupUnavailable { .. } => "unavailable",
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
            ApiError::CountOutOfRange(_) => "count_out_of_range",
            ApiError::WalFull { .. } => "overloaded",
            ApiError::BodyTimeout(_) => "body_timeout",
            ApiError::BodyBudgetFull { .. } => "overloaded",
            ApiError::StoreUnreachable { .. } => "store_unreachable",
        }
    }
}
