//! The operator's side of the quarantine (`crate::storage::quarantine`):
//! what each group holds, and re-applying it once the cause is fixed.
//!
//! Each group is asked on its master, one after the other; a group that
//! cannot be reached is reported by name and the others still answer.

use tally_admin::ShardRing;

use crate::app::App;
use crate::storage::db;
use crate::storage::quarantine::{self, HeldRow, Reapplied};

/// Held rows of one group.
pub struct GroupHeld {
    pub group: String,
    /// How many rows the group holds in all.
    pub total: u64,
    /// The oldest of them, at most the asked limit.
    pub rows: Vec<HeldRow>,
}

/// Per group: the held row count and the oldest `limit` rows. `Err` names
/// the groups that could not be read.
pub async fn list(app: &App, limit: usize) -> Result<Vec<GroupHeld>, String> {
    let timeout = app.config.pool.connect_timeout;
    let mut out = Vec::new();
    let mut failed = Vec::new();
    for group in app.groups() {
        let read = async {
            let mut conn = group.master_conn(timeout).await?;
            quarantine::list(&mut conn, limit).await
        };
        match read.await {
            Ok((total, rows)) => out.push(GroupHeld {
                group: group.name.clone(),
                total,
                rows,
            }),
            Err(e) => failed.push(format!("{}: {e}", group.name)),
        }
    }
    if failed.is_empty() {
        Ok(out)
    } else {
        Err(failed.join("; "))
    }
}

/// Re-applies up to `limit` held rows per group, each group in one
/// transaction on its master; only counters the group owns now and that no
/// running reshard is moving. `Err` names the groups that failed (their
/// rows stay held; a repeated call is safe).
pub async fn reapply(app: &App, limit: usize) -> Result<Vec<(String, Reapplied)>, String> {
    let timeout = app.config.pool.connect_timeout;
    let map = app.map.load_full();
    let mut out = Vec::new();
    let mut failed = Vec::new();
    for (index, group) in map.groups.iter().enumerate() {
        let owned = |rk: &[u8]| {
            map.ring.owner(rk) == Some(index) && map.moved(ShardRing::position(rk)).is_none()
        };
        let work = async {
            let mut conn = group
                .master_conn(timeout)
                .await
                .map_err(db::FlushError::NotApplied)?;
            quarantine::reapply(&mut conn, group.max_packet(), limit, owned).await
        };
        match work.await {
            Ok(done) => {
                tracing::info!(group = %group.name, applied = done.applied, refused = done.refused, not_owned = done.not_owned, "quarantined deltas re-applied");
                out.push((group.name.clone(), done));
            }
            Err(e) => failed.push(format!("{}: {e}", group.name)),
        }
    }
    if failed.is_empty() {
        Ok(out)
    } else {
        Err(failed.join("; "))
    }
}
