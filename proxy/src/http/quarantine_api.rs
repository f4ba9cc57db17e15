//! `/admin/v1/quarantine`: the deltas the database refused (a counter's
//! total past the 64-bit range, a value too long), held in each group's
//! `quarantine` table instead of stalling the group; listing them and
//! re-applying them once the cause is fixed (docs/operations.md).

use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

use crate::app::App;
use crate::engine::quarantine;
use crate::error::ApiError;
use crate::http::error::ErrorBody;
use crate::http::params::Params;

/// Rows listed per group by default, and at most.
const LIST_DEFAULT: usize = 100;
const LIST_MAX: usize = 1000;
/// Rows re-applied per group and call by default, and at most.
const REAPPLY_DEFAULT: usize = 1000;
const REAPPLY_MAX: usize = 10_000;

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ListQuery {
    /// Rows listed per group (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ReapplyQuery {
    /// Rows re-applied per group (default 1,000); call again for more.
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<u64>,
}

/// What every group holds.
#[derive(Serialize, ToSchema)]
pub struct QuarantineReport {
    groups: Vec<GroupQuarantine>,
}

#[derive(Serialize, ToSchema)]
pub struct GroupQuarantine {
    group: String,
    /// Held rows in all (one per counter and minute).
    held_rows: u64,
    /// The oldest held rows, at most `limit`.
    rows: Vec<HeldDelta>,
}

/// One held delta.
#[derive(Serialize, ToSchema)]
pub struct HeldDelta {
    id: u64,
    ns: String,
    key: String,
    /// Unix seconds of the minute.
    minute: i64,
    /// Exact, as a decimal string (it may not fit 64 bits).
    delta: String,
    /// The batch (`batch <writer_id>/<seq>`) or log replay it came from.
    source: String,
    /// The database's refusal.
    reason: String,
    /// Unix seconds.
    quarantined_at: i64,
}

/// Lists the held deltas of every group.
#[utoipa::path(get, path = "/admin/v1/quarantine", tag = "operations", security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "Held rows per group", body = QuarantineReport),
        (status = 400, description = "`invalid_param`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 503, description = "`unavailable`: a group's master cannot be read", body = ErrorBody),
    ))]
pub(crate) async fn get_quarantine(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
) -> Result<Json<QuarantineReport>, ApiError> {
    let limit = limit(query.as_deref(), LIST_DEFAULT, LIST_MAX)?;
    let groups = quarantine::list(&app, limit).await.map_err(|failed| {
        ApiError::Unavailable(format!("cannot read the quarantine of {failed}"))
    })?;
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    Ok(Json(QuarantineReport {
        groups: groups
            .into_iter()
            .map(|g| GroupQuarantine {
                group: g.group,
                held_rows: g.total,
                rows: g
                    .rows
                    .into_iter()
                    .map(|r| HeldDelta {
                        id: r.id,
                        ns: text(r.ns),
                        key: text(r.key),
                        minute: r.minute,
                        delta: r.delta,
                        source: r.source,
                        reason: r.reason,
                        quarantined_at: r.quarantined_at,
                    })
                    .collect(),
            })
            .collect(),
    }))
}

/// What a re-apply did, per group, in held rows.
#[derive(Serialize, ToSchema)]
pub struct ReapplyReport {
    groups: Vec<GroupReapplied>,
}

#[derive(Serialize, ToSchema)]
pub struct GroupReapplied {
    group: String,
    /// Added to their counters and removed from the quarantine.
    applied_rows: usize,
    /// Refused again (the cause is still there); still held.
    refused_rows: usize,
    /// Of counters the group no longer owns (resharded); still held.
    not_owned_rows: usize,
}

/// Re-applies held deltas: per group, in one transaction, the rows of every
/// counter the database now accepts are added to it and removed from the
/// quarantine together (exactly once, however often this is called).
#[utoipa::path(post, path = "/admin/v1/quarantine/reapply", tag = "operations", security(("bearer" = [])),
    params(ReapplyQuery),
    responses(
        (status = 200, description = "What each group re-applied", body = ReapplyReport),
        (status = 400, description = "`invalid_param`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 503, description = "`unavailable`: a group failed; its rows stay held, retry", body = ErrorBody),
    ))]
pub(crate) async fn post_reapply(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
) -> Result<Json<ReapplyReport>, ApiError> {
    let limit = limit(query.as_deref(), REAPPLY_DEFAULT, REAPPLY_MAX)?;
    let done = quarantine::reapply(&app, limit).await.map_err(|failed| {
        ApiError::Unavailable(format!("re-apply failed on {failed}; those rows stay held"))
    })?;
    Ok(Json(ReapplyReport {
        groups: done
            .into_iter()
            .map(|(group, d)| GroupReapplied {
                group,
                applied_rows: d.applied,
                refused_rows: d.refused,
                not_owned_rows: d.not_owned,
            })
            .collect(),
    }))
}

fn limit(query: Option<&str>, default: usize, max: usize) -> Result<usize, ApiError> {
    let params = Params::parse(query, &["limit"])?;
    match params.i64("limit")? {
        None => Ok(default),
        Some(n) if (1..=max as i64).contains(&n) => Ok(n as usize),
        Some(n) => Err(ApiError::InvalidParam(format!(
            "limit {n} must be 1 to {max}"
        ))),
    }
}
