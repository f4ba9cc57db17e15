//! Every topology change goes through [`apply`]: startup (from an empty
//! map), `PUT /admin/v1/topology`, `POST /admin/v1/reload`, SIGHUP and the
//! file watcher.
//!
//! The steps, in order: serialize with other changes → check the expected
//! version → fill `***` passwords from the running servers → validate
//! (every problem at once) → refuse key-moving changes while data exists →
//! build the new map (pools, schema on masters, one health probe) →
//! persist (temp file + rename) → swap the `ArcSwap` → start tasks for new
//! groups. A failure at any step before the swap leaves the running map and
//! the file untouched. In-flight requests finish on the map they loaded.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mysql_async::prelude::*;
use tally_admin::{Dsn, Invalid, Problems, Topology, TopologyDiff, TopologyDoc, diff};

use crate::app::App;
use crate::control::reshard;
use crate::engine::{flusher, probes};
use crate::error::ApiError;
use crate::storage::db;
use crate::storage::health;
use crate::storage::shard_map::ShardMap;
use crate::storage::store::{Store, StoreError};
use crate::telemetry;

/// Where a change came from (for logs and version rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Startup,
    Api,
    File,
    Promotion,
    /// A newer version another proxy wrote to the shared store.
    Store,
    /// A step of the online reshard workflow (`crate::control::reshard`).
    Reshard,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Startup => "startup",
            Source::Api => "api",
            Source::File => "file",
            Source::Promotion => "promotion",
            Source::Store => "store",
            Source::Reshard => "reshard",
        }
    }
}

/// Why a change was refused. Each maps to one HTTP status in `error.rs`.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("invalid topology: {0}")]
    Invalid(Invalid),
    #[error("the topology is at version {current}, not {expected}; re-read it and retry")]
    VersionConflict { expected: u64, current: u64 },
    #[error("{0}")]
    ReshardRequired(String),
    #[error("{0}")]
    ReshardInProgress(String),
    #[error("cannot read topology file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot persist the topology to {path}: {source}")]
    Persist {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Unavailable(String),
}

/// The result of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub version: u64,
    pub changed: bool,
}

/// Applies `doc` (see the module docs). `expected` is the `If-Match`
/// version for API changes.
pub async fn apply(
    app: &Arc<App>,
    doc: TopologyDoc,
    source: Source,
    expected: Option<u64>,
) -> Result<Applied, ChangeError> {
    let _serial = app.topology_lock.lock().await;
    apply_locked(app, doc, source, expected).await
}

/// [`apply`] with the change lock already held (a promotion holds it for
/// the whole switchover).
pub(crate) async fn apply_locked(
    app: &Arc<App>,
    doc: TopologyDoc,
    source: Source,
    expected: Option<u64>,
) -> Result<Applied, ChangeError> {
    let current = app.map.load_full();
    if let Some(expected) = expected
        && expected != current.version()
    {
        return Err(ChangeError::VersionConflict {
            expected,
            current: current.version(),
        });
    }
    let mut topology = validated(doc, &current, source)?;
    // How the last reshard ended is the workflow's record, like the
    // migration: a document from the API or the file keeps the running one
    // (whether it omits the section or not).
    if matches!(source, Source::Api | Source::File | Source::Promotion) {
        topology.last_reshard = current.topology.last_reshard.clone();
    }
    let unchanged = Applied {
        version: current.version(),
        changed: false,
    };
    // Startup and the shared store carry their own version; every other
    // source makes the next one.
    let startup = matches!(source, Source::Startup | Source::Store);
    if source == Source::Store && topology.version <= current.version() {
        return Ok(unchanged);
    }
    if !startup {
        topology.version = current.version();
        if same_topology(&topology, &current.topology) {
            return Ok(unchanged);
        }
    }
    let change = diff(&current.topology, &topology);
    guard_reshard(app, &current, &topology, &change, source).await?;
    let reroutes = change.moves_keys() || current.topology.migration != topology.migration;
    if !startup {
        topology.version = current.version() + 1;
    }
    // Once at start, and when a change drops the admin user.
    if topology.admin.is_none() && (current.groups.is_empty() || current.topology.admin.is_some()) {
        tracing::warn!(
            "the topology names no admin user: the DSNs' user flushes, promotes and fences, \
             so read_only cannot stop it during a switchover (add an `admin:` section; see docs/operations.md)"
        );
    }
    let map = ShardMap::build(topology, &app.config, Some(&current));
    prepare(app, &map).await;
    if !startup {
        record(app, &map, source, current.version()).await?;
    }
    let version = swap_in(app, map, reroutes);
    telemetry::topology_change(source.as_str());
    tracing::info!(source = source.as_str(), version, change = %change.to_string().replace('\n', "; "), "topology applied");
    Ok(Applied {
        version,
        changed: true,
    })
}

/// The document validated, with redacted passwords taken from the running
/// topology and the secrets of `password_file` / `password_env` references
/// read; every problem at once.
///
/// A change from the API, the file (reload, SIGHUP, the watcher), the
/// store or the start reads every reference again, so a rotated secret is
/// picked up (the servers using it get new pools). A promotion or a
/// reshard step keeps the running password of a reference it still names:
/// a switchover must not fail on a secret file being replaced meanwhile.
pub(crate) fn validated(
    doc: TopologyDoc,
    current: &ShardMap,
    source: Source,
) -> Result<Topology, ChangeError> {
    let mut problems = Problems::new();
    let doc = keep_redacted_passwords(doc, &current.topology, &mut problems);
    let keep = matches!(source, Source::Promotion | Source::Reshard).then_some(&current.topology);
    match doc.validate() {
        Ok(mut t) => match t.resolve_secrets(keep) {
            Ok(()) => problems.finish(t),
            Err(invalid) => {
                problems.extend(invalid);
                problems.fail()
            }
        },
        Err(invalid) => {
            problems.extend(invalid);
            problems.fail()
        }
    }
    .map_err(ChangeError::Invalid)
}

/// While a reshard runs, only its workflow may touch the ring or the
/// migration section (server changes such as a replica or a promotion are
/// fine); outside one, a change that moves keys of groups holding data
/// must go through the reshard workflow. A version from the store was
/// accepted by the proxy that wrote it, and a reshard step moves keys on
/// purpose (its reads span both owners): neither is refused here.
async fn guard_reshard(
    app: &App,
    current: &ShardMap,
    topology: &Topology,
    change: &TopologyDiff,
    source: Source,
) -> Result<(), ChangeError> {
    let reshard_step = matches!(source, Source::Store | Source::Reshard | Source::Startup);
    if reshard_step {
        return Ok(());
    }
    if let Some(m) = &current.topology.migration
        && (topology.migration.as_ref() != Some(m) || change.moves_keys())
    {
        return Err(ChangeError::ReshardInProgress(format!(
            "reshard {} is in phase {}; only server changes are accepted until it is done \
             (GET /admin/v1/reshard shows its progress, POST /admin/v1/reshard/cancel cancels it before cutover)",
            m.id,
            m.phase.as_str()
        )));
    }
    if current.topology.migration.is_none() && topology.migration.is_some() {
        return Err(ChangeError::ReshardRequired(
            "the migration section is written by the reshard workflow: POST /admin/v1/reshard with the target topology".into(),
        ));
    }
    if change.moves_keys() {
        refuse_if_data(app, current, change).await?;
    }
    Ok(())
}

/// Makes the new version durable before it is used: an insert of the next
/// version into the shared store (the compare-and-set), or the topology
/// file (temp + rename).
async fn record(
    app: &App,
    map: &ShardMap,
    source: Source,
    current_version: u64,
) -> Result<(), ChangeError> {
    let Some(store) = &app.store else {
        return persist(&app.config.topology_file, &map.topology).map_err(|source| {
            ChangeError::Persist {
                path: app.config.topology_file.display().to_string(),
                source,
            }
        });
    };
    store
        .insert(
            map.version(),
            &map.topology.to_yaml(),
            source.as_str(),
            &app.writer_id,
        )
        .await
        .map_err(|e| match e {
            StoreError::Conflict(v) => ChangeError::VersionConflict {
                expected: current_version,
                current: v,
            },
            StoreError::Unavailable(why) => ChangeError::Unavailable(format!(
                "topology changes are refused while the topology store is unreachable ({why}); \
                 the running topology stays in effect"
            )),
        })
}

/// Swaps the new map in and starts what it needs: the settle of a routing
/// change, health probes for its groups and a flusher for each new group.
fn swap_in(app: &Arc<App>, map: ShardMap, reroutes: bool) -> u64 {
    let version = map.version();
    let groups = map.groups.clone();
    let previous = app.map.swap(Arc::new(map));
    if reroutes {
        reshard::settle(app, previous, version);
    }
    telemetry::topology_version(version);
    probes::spawn(
        &groups,
        app.config.health.interval,
        app.config.health.timeout,
    );
    flusher::start_all(app);
    version
}

/// Re-reads the topology file and applies it if it differs. The file is
/// read under the change lock: a read from before a concurrent API change
/// must not be applied after it.
pub async fn reload(app: &Arc<App>) -> Result<Applied, ChangeError> {
    if app.store.is_some() {
        return follow_store(app).await;
    }
    let _serial = app.topology_lock.lock().await;
    let path = &app.config.topology_file;
    let text = std::fs::read_to_string(path).map_err(|source| ChangeError::Read {
        path: path.display().to_string(),
        source,
    })?;
    apply_locked(app, parse_doc(&text)?, Source::File, None).await
}

/// Applies the store's newest version if it is newer than the running one.
/// A successful read counts for this proxy's [`StoreLease`] (it lifts a
/// fence once a heartbeat was recorded before the read was sent).
///
/// [`StoreLease`]: crate::storage::store::StoreLease
pub async fn follow_store(app: &Arc<App>) -> Result<Applied, ChangeError> {
    let Some(store) = &app.store else {
        return Err(ChangeError::Unavailable(
            "no topology store is configured".into(),
        ));
    };
    let unavailable = |e: StoreError| ChangeError::Unavailable(e.to_string());
    let _serial = app.topology_lock.lock().await;
    let sent = std::time::Instant::now();
    let applied = follow_locked(app, store).await.map_err(|e| match e {
        Followed::Store(e) => unavailable(e),
        Followed::Change(e) => e,
    })?;
    if app.store_lease.store_read(sent) {
        app.store_lease.report();
    }
    Ok(applied)
}

/// Why following the store failed: the store, or applying what it holds.
enum Followed {
    Store(StoreError),
    Change(ChangeError),
}

impl From<StoreError> for Followed {
    fn from(e: StoreError) -> Self {
        Followed::Store(e)
    }
}

impl From<ChangeError> for Followed {
    fn from(e: ChangeError) -> Self {
        Followed::Change(e)
    }
}

/// [`follow_store`] under the change lock. Until this proxy has read the
/// store once (it started from its file while the store was unreachable)
/// it first creates the store's tables and seeds an empty store with the
/// running topology, as a start with a reachable store does.
async fn follow_locked(app: &Arc<App>, store: &Store) -> Result<Applied, Followed> {
    let current = app.map.load().version();
    let unchanged = Applied {
        version: current,
        changed: false,
    };
    if !app.store_lease.ever_synced() {
        // Tables may exist while the account cannot create them: then
        // reading is what matters.
        if let Err(e) = store.init().await {
            tracing::debug!(error = %e, "cannot create the topology store's tables; reading it anyway");
        }
        if store.latest_version().await? == 0 {
            let yaml = app.map.load().topology.to_yaml();
            match store.insert(current, &yaml, "seed", &app.writer_id).await {
                Ok(()) => {
                    tracing::info!(version = current, "seeded the topology store from the file");
                    return Ok(unchanged);
                }
                Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    if store.latest_version().await? <= current {
        return Ok(unchanged);
    }
    let Some((version, text)) = store.latest().await? else {
        return Ok(unchanged);
    };
    let mut doc = parse_doc(&text)?;
    doc.version = version;
    Ok(apply_locked(app, doc, Source::Store, None).await?)
}

/// Polls the store for newer versions (a cheap `MAX(version)`) until
/// `stop`. An unreachable store is logged once per outage; the running
/// topology stays in effect.
pub async fn watch_store(
    app: Arc<App>,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        match follow_store(&app).await {
            Ok(a) => {
                if failing {
                    tracing::info!("topology store reachable again");
                    failing = false;
                }
                if a.changed {
                    tracing::info!(
                        version = a.version,
                        "followed a topology change from the store"
                    );
                }
            }
            Err(e) if !failing => {
                tracing::warn!(error = %e, "cannot follow the topology store; serving with the running topology");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// Parses a topology document (YAML or JSON). Unknown keys are problems;
/// when there are any, the validation problems are reported with them.
pub fn parse_doc(text: &str) -> Result<TopologyDoc, ChangeError> {
    let mut problems = Problems::new();
    let doc: TopologyDoc =
        tally_admin::yaml::parse(text, &mut problems).map_err(ChangeError::Invalid)?;
    if let Err(mut invalid) = problems.finish(()) {
        if let Err(more) = doc.validate() {
            invalid.problems.extend(more.problems);
        }
        return Err(ChangeError::Invalid(invalid));
    }
    Ok(doc)
}

/// Schema on every master and one health probe per server, so a new map is
/// usable the moment it is swapped in. An unreachable master is logged, not
/// fatal: its group's flusher applies the schema before its first flush, and
/// other groups must not wait for it.
async fn prepare(app: &App, map: &ShardMap) {
    let timeout = app.config.pool.connect_timeout;
    let work = map.groups.iter().map(|g| async move {
        if let Err(e) = g.ensure_schema(timeout).await {
            tracing::warn!(group = %g.name, master = %g.master.dsn, error = %e, "cannot apply the schema now; will retry before the first flush");
        }
        health::probe_group(g, app.config.health.timeout).await;
    });
    futures::future::join_all(work).await;
}

/// Equal apart from the version.
fn same_topology(a: &Topology, b: &Topology) -> bool {
    a.vnodes == b.vnodes
        && a.groups == b.groups
        && a.migration == b.migration
        && a.admin == b.admin
        && a.last_reshard == b.last_reshard
}

/// Replaces a `***` password with the password of the running server at the
/// same address; a `***` with no such server is a problem. Where the running
/// password comes from a `password_file` or `password_env`, the `***`
/// becomes that reference (never the secret, which would then be persisted).
pub(crate) fn keep_redacted_passwords(
    mut doc: TopologyDoc,
    current: &Topology,
    problems: &mut Problems,
) -> TopologyDoc {
    let running: Vec<&Dsn> = current
        .groups
        .iter()
        .flat_map(|g| std::iter::once(&g.master).chain(&g.replicas))
        .collect();
    let mut fix = |path: String, text: &mut String| {
        let Ok(mut dsn) = Dsn::parse(text) else {
            return;
        };
        if !dsn.password_is_redacted() {
            return;
        }
        match running.iter().find(|r| r.addr() == dsn.addr()) {
            Some(r) => {
                dsn.password = r.inline_password().map(str::to_owned);
                dsn.secret = r.secret.clone();
                *text = dsn.expose();
            }
            None => problems.push(
                path,
                format!("password *** means \"keep the current password\", but no running server is at {}", dsn.addr()),
            ),
        }
    };
    for (i, g) in doc.groups.iter_mut().enumerate() {
        fix(format!("groups[{i}].master"), &mut g.master);
        for (j, r) in g.replicas.iter_mut().enumerate() {
            fix(format!("groups[{i}].replicas[{j}]"), r);
        }
    }
    if let Some(a) = doc.admin.as_mut()
        && a.password.as_deref() == Some(tally_admin::dsn::REDACTED)
        && a.secret().is_none()
    {
        match current.admin.as_ref().filter(|c| c.user == a.user) {
            Some(running) if running.secret().is_some() => {
                a.password = None;
                a.password_file = running.password_file.clone();
                a.password_env = running.password_env.clone();
            }
            Some(running) => a.password = running.password.clone(),
            None => problems.push(
                "admin.password",
                format!(
                    "password *** means \"keep the current password\", but the running admin user is not {:?}",
                    a.user
                ),
            ),
        }
    }
    doc
}

/// Key-moving changes are safe only while no group holds data (online
/// resharding is separate work): nothing pending in any buffer and no
/// stored counter on any current master.
async fn refuse_if_data(
    app: &App,
    current: &ShardMap,
    change: &TopologyDiff,
) -> Result<(), ChangeError> {
    let why = format!(
        "this change moves {:.1}% of the hash space between groups ({}), which needs a reshard \
         (POST /admin/v1/reshard with the target topology, or `tallyctl reshard start FILE`)",
        change.moved_fraction * 100.0,
        change.to_string().replace('\n', "; ")
    );
    for g in &current.groups {
        if g.buffer.pending() > 0 {
            return Err(ChangeError::ReshardRequired(format!(
                "{why}: group {} has pending deltas",
                g.name
            )));
        }
        let timeout = app.config.pool.connect_timeout;
        let probe = async {
            let mut c = db::conn(&g.master.pool, timeout).await?;
            let any: Option<u8> = c.query_first("SELECT 1 FROM counter_total LIMIT 1").await?;
            Ok::<_, db::DbError>(any.is_some())
        };
        match tokio::time::timeout(timeout, probe).await {
            Ok(Ok(false)) => {}
            Ok(Ok(true)) => {
                return Err(ChangeError::ReshardRequired(format!(
                    "{why}: group {} holds counters",
                    g.name
                )));
            }
            Ok(Err(e)) => {
                return Err(ChangeError::Unavailable(format!(
                    "{why}; cannot tell whether group {} holds data: {e}",
                    g.name
                )));
            }
            Err(_) => {
                return Err(ChangeError::Unavailable(format!(
                    "{why}; group {} did not answer within {timeout:?}",
                    g.name
                )));
            }
        }
    }
    Ok(())
}

/// Writes the topology next to its final path and renames it over, so a
/// crash leaves either the old or the new file, never half of one. The
/// file holds the inline DSN passwords (a `password_file` or `password_env`
/// is written as the reference, never its secret): the temporary file is
/// created 0600 (the
/// rename keeps that mode), whatever mode the file had. The directory is
/// fsynced after the rename, so the new name survives a power loss too.
fn persist(path: &Path, topology: &Topology) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("topology.yaml");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let body = format!(
        "# Written by tally-proxy on a topology change; edits are picked up\n# by the file watcher, SIGHUP or POST /admin/v1/reload.\n{}",
        topology.to_yaml()
    );
    let result = (|| {
        // A temporary file left by an earlier crash of this pid may have
        // another mode; `create_new` never opens an existing file.
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(body.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    // The change is in place once renamed; a directory that cannot be
    // synced (it never fails on a healthy disk) is not a reason to refuse it.
    if result.is_ok()
        && let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all())
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot fsync the topology file's directory; the rename may not survive a power loss");
    }
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Polls the topology file and reloads it when it changes. Polling (mtime
/// and size) works on every filesystem, including bind mounts and
/// ConfigMaps, where inotify is unreliable; a change is applied once it has
/// been stable for one interval (debounce against editors writing in steps).
pub async fn watch_file(
    app: Arc<App>,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let stamp = |p: &Path| -> Option<(SystemTime, u64)> {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    let path = app.config.topology_file.clone();
    let mut seen = stamp(&path);
    let mut pending: Option<Option<(SystemTime, u64)>> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        let now = stamp(&path);
        match pending {
            Some(candidate) if candidate == now => {
                pending = None;
                seen = now;
                match reload(&app).await {
                    Ok(a) if a.changed => {
                        tracing::info!(version = a.version, "topology file change applied")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "topology file change rejected; still running the previous topology")
                    }
                }
            }
            _ if now != seen => pending = Some(now),
            _ => pending = None,
        }
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        use ChangeError as C;
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    /// The file holds DSN passwords: it is written 0600 whatever it was
    /// (and whatever a stale temporary file of this pid was), and nothing
    /// is left next to it.
    #[test]
    fn the_topology_file_is_persisted_owner_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("topology.yaml");
        let topology = TopologyDoc::parse_and_validate(
            "groups:\n  - name: g0\n    master: mysql://app:s3cret@127.0.0.1:3307/tally\n",
        )
        .expect("valid");
        std::fs::write(&path, "old\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let stale = dir
            .path()
            .join(format!(".topology.yaml.tmp-{}", std::process::id()));
        std::fs::write(&stale, "stale\n").expect("stale temp");
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        for _ in 0..2 {
            persist(&path, &topology).expect("persist");
            assert_eq!(mode(&path), 0o600, "{:o}", mode(&path));
        }
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains("app:s3cret@"), "{text}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["topology.yaml"]);
    }

    /// Issue #23 item 2: a server or admin user whose password comes from a
    /// file is persisted with the reference, and a `***` sent for it keeps
    /// the reference, never turning the secret into an inline password.
    #[test]
    fn secrets_are_persisted_as_references_and_kept_through_redaction() {
        let dir = tempfile::tempdir().expect("temp dir");
        let secret = dir.path().join("db.pw").display().to_string();
        std::fs::write(&secret, "s3cret\n").expect("write");
        let text = format!(
            "groups:\n  - name: g0\n    master: mysql://app@127.0.0.1:3307/tally?password_file={secret}\n\
             admin:\n  user: tally_admin\n  password_file: {secret}\n"
        );
        let mut running = TopologyDoc::parse_and_validate(&text).expect("valid");
        running.resolve_secrets(None).expect("readable");
        assert_eq!(running.groups[0].master.password.as_deref(), Some("s3cret"));
        let path = dir.path().join("topology.yaml");
        persist(&path, &running).expect("persist");
        let file = std::fs::read_to_string(&path).expect("read");
        assert!(!file.contains("s3cret"), "{file}");
        assert!(file.contains(&format!("?password_file={secret}")), "{file}");
        let mut again = parse_doc(&file).expect("parses").validate().expect("valid");
        again.resolve_secrets(None).expect("readable");
        assert_eq!(again, running);

        let sent: TopologyDoc = tally_admin::yaml::parse(
            "groups:\n  - name: g0\n    master: mysql://app:***@127.0.0.1:3307/tally\n\
             admin: { user: tally_admin, password: '***' }\n",
            &mut Problems::new(),
        )
        .expect("doc");
        let mut problems = Problems::new();
        let kept = keep_redacted_passwords(sent, &running, &mut problems);
        assert!(problems.finish(()).is_ok());
        assert_eq!(
            kept.groups[0].master,
            format!("mysql://app@127.0.0.1:3307/tally?password_file={secret}")
        );
        let admin = kept.admin.as_ref().expect("admin");
        assert_eq!(admin.password, None);
        assert_eq!(admin.password_file.as_deref(), Some(secret.as_str()));
        assert!(!format!("{kept:?}").contains("s3cret"));
    }
}
