//! Ingest: validated events are routed to their groups, room is reserved
//! in every target group's bound, and they are merged (appended to the
//! write-ahead log first, under the same fence hold, when there is one);
//! all or nothing per request. A request refused for a full group waits
//! (up to `buffer.admission_wait`) for that group's flush to make room,
//! so a busy group slows its writers down instead of turning their
//! requests away to be parsed again at once. With a committed ack the
//! caller waits until every touched group committed them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use futures::future::join_all;
use tally_admin::ShardRing;

use crate::app::App;
use crate::domain::event::Event;
use crate::error::ApiError;
use crate::storage::buffer::{Delta, Duplicates, GroupBuffer, Reservation};
use crate::storage::shard_map::{GroupHandle, ShardMap};
use crate::storage::wal::WalError;
use crate::telemetry;

/// One routed event; its routing key is `arena[key_start..key_end]` of the
/// request's [`Routed`] set, its id `arena[key_end..id_end]` (empty: none).
#[derive(Debug, Clone, Copy)]
struct RoutedEvent {
    key_start: usize,
    key_end: usize,
    id_end: usize,
    ring_pos: u64,
    minute: i64,
    delta: i64,
}

/// A request's events by target group. Routing keys live in one arena
/// instead of one allocation per event.
struct Routed {
    arena: Vec<u8>,
    /// Indexed like the map's groups.
    per_group: Vec<Vec<RoutedEvent>>,
    /// With ids in the request: its count of events already counted.
    dups: Option<Duplicates>,
}

impl Routed {
    /// The deltas of one group's routed events, keys borrowed from the
    /// arena.
    fn deltas<'a>(&'a self, items: &'a [RoutedEvent]) -> impl Iterator<Item = Delta<'a>> + 'a {
        items.iter().map(|e| Delta {
            routing_key: &self.arena[e.key_start..e.key_end],
            ring_pos: e.ring_pos,
            minute: e.minute,
            delta: e.delta,
            id: (e.id_end > e.key_end).then(|| &self.arena[e.key_end..e.id_end]),
            dups: self.dups.as_ref(),
        })
    }
}

/// Routes, bounds-checks and merges validated events; all or nothing. With
/// `wait_for_commit`, waits until every touched group committed them and
/// returns how many of the events (with an id) were already counted;
/// without, returns 0 (that is decided when their batch commits).
///
/// A request refused because a target group's buffer is full (nothing of
/// it merged) is tried again, routed anew, at each flush outcome of that
/// group until `buffer.admission_wait` has passed; it is refused at once
/// when the group's last flush attempt failed (a group whose master is
/// down does not drain, so waiting would only hold the connection).
pub async fn ingest(
    app: &App,
    events: &[Event<'_>],
    wait_for_commit: bool,
) -> Result<usize, ApiError> {
    let deadline = Instant::now() + app.config.buffer.admission_wait;
    let mut watching: Option<(String, watch::Receiver<u64>)> = None;
    loop {
        let (group, retry_after) = match ingest_once(app, events, wait_for_commit).await {
            Err(ApiError::Overloaded { group, retry_after }) => (group, retry_after),
            other => return other,
        };
        let buffer = app
            .map
            .load()
            .groups
            .iter()
            .find(|g| g.name == group)
            .map(|g| g.buffer.clone());
        let buffer = match buffer {
            Some(b) if !b.flush_failing() && Instant::now() < deadline => b,
            _ => return Err(ApiError::Overloaded { group, retry_after }),
        };
        match &mut watching {
            Some((name, outcomes)) if *name == group => {
                match tokio::time::timeout_at(deadline, outcomes.changed()).await {
                    Ok(Ok(())) => {}
                    // The buffer left the map (a group removed, maybe added
                    // back with a new buffer): watch again from scratch.
                    Ok(Err(_)) => watching = None,
                    // One last try: the deadline and a commit may meet.
                    Err(_) => return ingest_once(app, events, wait_for_commit).await,
                }
            }
            // Room may have been freed between the refusal and now: the
            // first refusal only starts watching and tries again at once.
            _ => watching = Some((group, buffer.flush_outcomes())),
        }
    }
}

/// One attempt of [`ingest`]: refused with `Overloaded` (nothing merged)
/// when a target group has no room.
async fn ingest_once(
    app: &App,
    events: &[Event<'_>],
    wait_for_commit: bool,
) -> Result<usize, ApiError> {
    // Before anything is merged: a proxy cut off from its shared store may
    // route by a ring the others have left (see `StoreLease`).
    if app.store_fenced() {
        return Err(store_unreachable(app));
    }
    let wal = app.wal();
    if let Some(wal) = wal {
        wal.check().map_err(|e| wal_refusal(app, e))?;
    }
    let map = app.map.load_full();
    let routed = route(&map, events)?;
    let reserved = reserve(app, &map, &routed)?;
    let mut waits = Vec::new();
    // With a log, the record is appended and merged under one shared hold
    // of the fence, so a cut sees either both or neither (see `wal`).
    let fence = wal.map(|w| w.fence());
    let appended = wal.map(|w| {
        let record: Vec<(&str, Vec<Delta>)> = reserved
            .iter()
            .map(|r| (r.group.name.as_str(), routed.deltas(r.items).collect()))
            .collect();
        w.append(&record)
    });
    for Reserved { group, items, room } in reserved {
        let generation = room.merge(map.version(), routed.deltas(items));
        waits.push((group.buffer.clone(), generation));
    }
    drop(fence);
    if let Some(appended) = appended {
        appended.synced().await.map_err(|e| {
            ApiError::WalFailed(format!(
                "{e}; the events are held in memory and will be committed unless this proxy stops, so retrying may count them twice"
            ))
        })?;
    }
    telemetry::events_accepted(events.len());
    if wait_for_commit {
        wait_committed(app, &waits).await?;
        // Every batch holding our events committed, and each filled in its
        // duplicates before it let the waiters go.
        return Ok(routed
            .dups
            .map_or(0, |d| d.load(std::sync::atomic::Ordering::Relaxed)));
    }
    Ok(0)
}

/// Each event to the group that owns its key on the current ring.
fn route(map: &ShardMap, events: &[Event<'_>]) -> Result<Routed, ApiError> {
    let mut routed = Routed {
        arena: Vec::with_capacity(events.len() * 32),
        per_group: vec![Vec::new(); map.groups.len()],
        dups: events
            .iter()
            .any(|e| e.id.is_some())
            .then(Duplicates::default),
    };
    for e in events {
        let key_start = routed.arena.len();
        routed.arena.extend_from_slice(e.ns.as_bytes());
        routed.arena.push(0);
        routed.arena.extend_from_slice(e.key.as_bytes());
        let key_end = routed.arena.len();
        if let Some(id) = &e.id {
            routed.arena.extend_from_slice(id.as_bytes());
        }
        let rk = &routed.arena[key_start..key_end];
        let owner = map
            .ring
            .owner(rk)
            .ok_or_else(|| ApiError::Unavailable("the topology has no group".into()))?;
        let event = RoutedEvent {
            key_start,
            key_end,
            id_end: routed.arena.len(),
            ring_pos: ShardRing::position(rk),
            minute: e.ts - e.ts.rem_euclid(60),
            delta: e.delta,
        };
        routed.per_group[owner].push(event);
    }
    Ok(routed)
}

/// One target group's events and the room reserved for them.
struct Reserved<'m, 'r> {
    group: &'m Arc<GroupHandle>,
    items: &'r [RoutedEvent],
    room: Reservation<'m>,
}

/// Room in every target group first (in its buffer, and with a log in its
/// share of the log): a refusal (or an early return) drops the
/// reservations taken so far, so nothing is merged.
fn reserve<'m, 'r>(
    app: &App,
    map: &'m ShardMap,
    routed: &'r Routed,
) -> Result<Vec<Reserved<'m, 'r>>, ApiError> {
    let mut reserved = Vec::new();
    for (group, items) in map.groups.iter().zip(&routed.per_group) {
        if items.is_empty() {
            continue;
        }
        if let Some(wal) = app.wal() {
            wal.check_group(&group.name, map.groups.len())
                .map_err(|e| wal_refusal(app, e))?;
        }
        // Room for every event, id'd or not: the bound counts pending ids
        // besides the entries (`GroupBuffer::reserve`).
        match group.buffer.reserve(items.len()) {
            Ok(room) => reserved.push(Reserved { group, items, room }),
            Err(_) => {
                return Err(ApiError::Overloaded {
                    group: group.name.clone(),
                    retry_after: retry_after(app),
                });
            }
        }
    }
    Ok(reserved)
}

/// Waits until every touched group committed the generation it merged
/// into, up to `buffer.commit_timeout`.
async fn wait_committed(app: &App, waits: &[(Arc<GroupBuffer>, u64)]) -> Result<(), ApiError> {
    let timeout = app.config.buffer.commit_timeout;
    let all = join_all(waits.iter().map(|(b, g)| b.wait_committed(*g)));
    tokio::time::timeout(timeout, all)
        .await
        .map(|_| ())
        .map_err(|_| ApiError::CommitTimeout(timeout))
}

/// A write the log cannot take: a full share is overload (503 with
/// `Retry-After`), anything else a failed log.
fn wal_refusal(app: &App, e: WalError) -> ApiError {
    match e {
        full @ WalError::Full { .. } => ApiError::WalFull {
            message: format!("{full}; retry later"),
            retry_after: retry_after(app),
        },
        e => ApiError::WalFailed(format!("{e}; nothing of this request was accepted")),
    }
}

/// A write refused by the self-fence (the first refusal of a fence logs
/// it, unless the store follower's check did already).
fn store_unreachable(app: &App) -> ApiError {
    app.store_lease.report();
    ApiError::StoreUnreachable {
        fence_after: app.store_lease.fence_after(),
        retry_after: (app.config.heartbeat_interval + app.config.store_poll_interval)
            .max(Duration::from_secs(1)),
    }
}

/// What a refused write is told to wait: one flush interval, at least 1 s.
fn retry_after(app: &App) -> Duration {
    app.config.buffer.flush_interval.max(Duration::from_secs(1))
}
