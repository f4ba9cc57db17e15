//! Event ids of counters a running reshard moves: while a moved range's
//! id rows are still on its source (they reach the target only with their
//! chunk's copy), the target's flush asks the source which of its batch's
//! ids it counted, so a retry routed to the new owner is not counted a
//! second time. Batches without ids, and groups no reshard moves keys to,
//! ask nobody.

use std::collections::{BTreeMap, HashSet};

use tally_admin::ShardRing;

use crate::app::App;
use crate::storage::buffer::IdEvent;
use crate::storage::db::{DbError, FlushError};
use crate::storage::ids;
use crate::storage::shard_map::ShardMap;

/// The identities (`routing key 0x00 id`) of `ids` that the sources of
/// their moved ranges counted, for a batch flushed to `group`.
pub async fn counted_on_sources(
    app: &App,
    map: &ShardMap,
    group: &str,
    batch_ids: &[IdEvent],
) -> Result<HashSet<Vec<u8>>, FlushError> {
    let mut found = HashSet::new();
    if batch_ids.is_empty() || map.moves.is_empty() {
        return Ok(found);
    }
    let mut by_source: BTreeMap<&str, Vec<&IdEvent>> = BTreeMap::new();
    for e in batch_ids {
        if let Some(m) = map.moved(ShardRing::position(e.routing_key()))
            && m.target.name == group
        {
            by_source.entry(m.source.name.as_str()).or_default().push(e);
        }
    }
    for (source, events) in by_source {
        let Some(handle) = map.group(source) else {
            continue;
        };
        let mut conn = handle
            .master_conn(app.config.pool.connect_timeout)
            .await
            .map_err(FlushError::NotApplied)?;
        let counted = ids::counted_among(&mut conn, &events, ids::MAX_SET_ENTRIES)
            .await
            .map_err(|e| FlushError::NotApplied(DbError::Mysql(e)))?;
        found.extend(counted);
    }
    Ok(found)
}
