//! Durable buffered acks (`durability: wal`): a local write-ahead log of
//! every accepted write, so that `ack=buffered` survives a crash (kill -9,
//! power loss) of the proxy, not only a clean shutdown.
//!
//! **Appending.** A write encodes its routed deltas into one record, then,
//! under the *fence* (shared), takes the next LSN, copies the record into
//! the in-memory tail and merges the deltas into the group buffers. It
//! releases the fence and waits until a background thread has written and
//! `fdatasync`ed the tail up to its LSN (group commit: one fsync covers
//! every record appended while the previous one ran). Only then is it
//! answered.
//!
//! **Why the fence.** A flusher cuts its group's batch under the fence
//! (exclusive) and notes the last LSN appended. Because appending and
//! merging happen under one shared hold, every record at or below that LSN
//! is entirely in this batch or an earlier one, and every later record in
//! a later batch. The batch's commit therefore upserts `wal_applied(life,
//! group) = that LSN` in the same transaction as its rows
//! (`schema/004_wal.sql`), and the same LSN makes local segments deletable
//! once every group with records in them has committed past them.
//!
//! **Replaying** ([`replay`]): at start, logs of earlier lives of this
//! directory are read back and, per group, the records above the group's
//! `wal_applied` LSN are applied in one transaction that also raises it
//! (exactly once, see `db::replay`). A life's directory is deleted once
//! every group is replayed.
//!
//! One directory per proxy process at a time (an exclusive `flock`), one
//! subdirectory per life (named by its writer id), segments named by the
//! LSN of their first record.
//!
//! **Preallocated segments.** A background thread zero-fills and fsyncs
//! the next segment ahead of time; records then *overwrite* zeros. On
//! ext4 an `fdatasync` that grows a file must commit the journal, which
//! waits for every other file's ordered data (MariaDB's writes on the
//! same disk): measured here, ~1.3 ms per fsync under write load versus
//! ~0.25 ms for an overwrite. The zeros also mark the end of the log for
//! the reader: a damaged record followed only by zeros is a torn write,
//! anything else is corruption.

pub mod lives;
pub mod record;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::sync::watch;

use crate::config::WalConfig;
use crate::storage::buffer::Delta;
use crate::telemetry;

/// Why the log cannot take or keep a write.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log {path}: {why}")]
    Io { path: PathBuf, why: String },
    #[error("write-ahead log directory {0} is in use by another process (one proxy per directory)")]
    Locked(PathBuf),
    #[error("write-ahead log failed earlier and takes no more writes: {0}")]
    Failed(Arc<str>),
    #[error(
        "group {group}'s share of the write-ahead log is full: {bytes} bytes of segments wait for its events to commit (wal.max_bytes = {max} shared by {groups} groups); its master is down or slow"
    )]
    Full {
        group: String,
        bytes: u64,
        max: u64,
        groups: usize,
    },
    #[error("write-ahead log {path} is damaged at byte {offset}: {why}")]
    Corrupt {
        path: PathBuf,
        offset: usize,
        why: String,
    },
}

pub(crate) fn io(path: &Path, e: std::io::Error) -> WalError {
    WalError::Io {
        path: path.to_owned(),
        why: e.to_string(),
    }
}

/// What the sync thread has made durable: every record up to `lsn`, or
/// the error that stopped it.
#[derive(Debug, Clone, Default)]
struct Synced {
    lsn: u64,
    failed: Option<Arc<str>>,
}

/// Records appended but not yet handed to the sync thread.
struct Tail {
    bytes: Vec<u8>,
    /// LSN of the first record in `bytes`.
    first_lsn: u64,
    next_lsn: u64,
    /// Highest LSN per group among the records in `bytes`.
    groups: HashMap<String, u64>,
    /// The appenders of the records in `bytes`, answered after the fsync
    /// that covers them: one wake-up each, none for anyone else.
    waiters: Vec<tokio::sync::oneshot::Sender<Result<(), Arc<str>>>>,
}

/// A record appended but maybe not yet on disk; [`Appended::synced`]
/// waits for the fsync that covers it.
#[must_use = "an append is durable only after `synced`"]
pub struct Appended {
    pub lsn: u64,
    done: tokio::sync::oneshot::Receiver<Result<(), Arc<str>>>,
}

impl Appended {
    /// Waits until the record is on disk.
    pub async fn synced(self) -> Result<(), WalError> {
        match self.done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(WalError::Failed(why)),
            Err(_) => Err(WalError::Failed("the log was closed".into())),
        }
    }
}

/// A segment file and what it holds.
struct Segment {
    path: PathBuf,
    /// Bytes of records written to it.
    bytes: u64,
    /// Highest LSN per group of the segment's records.
    groups: HashMap<String, u64>,
}

/// The live log of this process.
pub struct Wal {
    /// This life's directory.
    dir: PathBuf,
    fence: RwLock<()>,
    tail: Mutex<Tail>,
    work: Condvar,
    closing: AtomicBool,
    synced: watch::Sender<Synced>,
    /// Closed segments (oldest first); the open one is the sync thread's.
    closed: Mutex<Vec<Segment>>,
    /// Per group: every record of it up to this LSN is committed.
    durable: Mutex<HashMap<String, u64>>,
    /// Per group: bytes of the closed segments kept for its records not yet
    /// committed (a segment kept by two groups counts for both).
    pinned: Mutex<HashMap<String, u64>>,
    segment_bytes: u64,
    /// Bytes in segments not yet deleted; writes are refused beyond
    /// `max_bytes`.
    live_bytes: std::sync::atomic::AtomicU64,
    max_bytes: u64,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Zero-filled, fsynced files ready to become the next segment.
    spares: Mutex<Option<std::sync::mpsc::Receiver<Result<PathBuf, WalError>>>>,
    /// Holds the directory's `flock` for the life of the process.
    _lock: File,
}

/// Directory name of a life: the writer id with anything but
/// `[A-Za-z0-9._-]` replaced (the id's prefix is configurable).
pub(crate) fn life_dir_name(writer_id: &str) -> String {
    writer_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The file in a life's directory that holds its exact writer id.
const WRITER_FILE: &str = "WRITER";

fn segment_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}.wal")
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

impl Wal {
    /// Locks `cfg.dir`, lists the earlier lives in it (to replay) and
    /// starts this life's log.
    pub fn open(
        cfg: &WalConfig,
        writer_id: &str,
    ) -> Result<(Arc<Wal>, Vec<lives::OldLife>), WalError> {
        let root = &cfg.dir;
        std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
        let lock_path = root.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io(&lock_path, e))?;
        // An exclusive flock, held until the process exits (or dies: the
        // kernel releases it, so a crash never leaves a stale lock).
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(WalError::Locked(root.clone())),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path, e)),
        }
        let old = lives::read_lives(root)?;
        let dir = root.join(life_dir_name(writer_id));
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let writer_path = dir.join(WRITER_FILE);
        std::fs::write(&writer_path, writer_id).map_err(|e| io(&writer_path, e))?;
        File::open(&writer_path)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(&writer_path, e))?;
        sync_dir(&dir)?;
        sync_dir(root)?;
        let wal = Arc::new(Wal {
            dir,
            fence: RwLock::new(()),
            tail: Mutex::new(Tail {
                bytes: Vec::new(),
                first_lsn: 1,
                next_lsn: 1,
                groups: HashMap::new(),
                waiters: Vec::new(),
            }),
            work: Condvar::new(),
            closing: AtomicBool::new(false),
            synced: watch::Sender::new(Synced::default()),
            closed: Mutex::new(Vec::new()),
            durable: Mutex::new(HashMap::new()),
            pinned: Mutex::new(HashMap::new()),
            segment_bytes: cfg.segment_bytes,
            live_bytes: std::sync::atomic::AtomicU64::new(0),
            max_bytes: cfg.max_bytes,
            thread: Mutex::new(None),
            spares: Mutex::new(None),
            _lock: lock,
        });
        let (tx, rx) = std::sync::mpsc::sync_channel(0);
        *wal.spares.lock() = Some(rx);
        let (dir, size) = (wal.dir.clone(), wal.segment_bytes);
        std::thread::Builder::new()
            .name("tally-wal-prealloc".into())
            .spawn(move || prepare_spares(&dir, size, &tx))
            .map_err(|e| io(&wal.dir, e))?;
        let worker = wal.clone();
        let handle = std::thread::Builder::new()
            .name("tally-wal".into())
            .spawn(move || worker.sync_loop())
            .map_err(|e| io(&wal.dir, e))?;
        *wal.thread.lock() = Some(handle);
        Ok((wal, old))
    }

    /// Refuses early (before anything is routed) once the log has failed.
    pub fn check(&self) -> Result<(), WalError> {
        if let Some(why) = &self.synced.borrow().failed {
            return Err(WalError::Failed(why.clone()));
        }
        Ok(())
    }

    /// Refuses a write routed to `group` (before anything is merged) while
    /// the segments kept for its uncommitted records hold its share of
    /// `max_bytes`, one of `groups` equal shares. Segments are deleted only
    /// once every record in them is committed, so a group whose master is
    /// down keeps all of its own (the event count is not bounded by the
    /// aggregated pending entries); its share bounds them, and other
    /// groups, whose newer segments it does not keep, go on writing.
    pub fn check_group(&self, group: &str, groups: usize) -> Result<(), WalError> {
        let groups = groups.max(1);
        let share = self.max_bytes / groups as u64;
        let bytes = self.pinned.lock().get(group).copied().unwrap_or(0);
        if bytes >= share {
            return Err(WalError::Full {
                group: group.to_owned(),
                bytes,
                max: self.max_bytes,
                groups,
            });
        }
        Ok(())
    }

    /// The log failed and takes no more writes (until restart).
    pub fn failed(&self) -> bool {
        self.synced.borrow().failed.is_some()
    }

    /// Bytes of the segments not yet deleted.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes.load(Ordering::Relaxed)
    }

    /// Held (shared) by a write across [`Self::append`] and its merge.
    pub fn fence(&self) -> RwLockReadGuard<'_, ()> {
        self.fence.read()
    }

    /// Held (exclusive) by a cut; returns the last LSN appended, all of
    /// whose records are merged.
    pub fn cut_fence(&self) -> (RwLockWriteGuard<'_, ()>, u64) {
        let guard = self.fence.write();
        let last = self.tail.lock().next_lsn - 1;
        (guard, last)
    }

    /// Appends one record for the given groups' deltas. The caller holds
    /// [`Self::fence`] until its merge is done, then waits for
    /// [`Appended::synced`] before answering.
    pub fn append(&self, groups: &[(&str, Vec<Delta<'_>>)]) -> Appended {
        let bytes = record::encode(groups);
        let (tx, done) = tokio::sync::oneshot::channel();
        let mut tail = self.tail.lock();
        tail.waiters.push(tx);
        let lsn = tail.next_lsn;
        tail.next_lsn += 1;
        if tail.bytes.is_empty() {
            tail.first_lsn = lsn;
        }
        tail.bytes.extend_from_slice(&bytes);
        for (name, _) in groups {
            match tail.groups.get_mut(*name) {
                Some(max) => *max = lsn,
                None => {
                    tail.groups.insert((*name).to_owned(), lsn);
                }
            }
        }
        drop(tail);
        self.work.notify_one();
        Appended { lsn, done }
    }

    /// Every record of `group` up to `lsn` is committed (or had nothing
    /// for it): segments holding nothing newer can go.
    pub fn durable(&self, group: &str, lsn: u64) {
        {
            let mut durable = self.durable.lock();
            let entry = durable.entry(group.to_owned()).or_default();
            *entry = (*entry).max(lsn);
        }
        self.delete_finished();
    }

    fn delete_finished(&self) {
        let durable = self.durable.lock().clone();
        let mut closed = self.closed.lock();
        closed.retain(|seg| {
            let done = seg
                .groups
                .iter()
                .all(|(g, max)| durable.get(g).is_some_and(|d| d >= max));
            if !done {
                return true;
            }
            match std::fs::remove_file(&seg.path) {
                Ok(()) => {
                    telemetry::wal_segment_deleted();
                    self.live_bytes.fetch_sub(seg.bytes, Ordering::Relaxed);
                    false
                }
                Err(e) => {
                    tracing::warn!(path = %seg.path.display(), error = %e, "cannot delete a finished WAL segment");
                    true
                }
            }
        });
        let mut pinned: HashMap<String, u64> = HashMap::new();
        for seg in closed.iter() {
            for (g, max) in &seg.groups {
                if durable.get(g).is_none_or(|d| d < max) {
                    *pinned.entry(g.clone()).or_default() += seg.bytes;
                }
            }
        }
        *self.pinned.lock() = pinned;
    }

    /// Stops the sync thread after it wrote everything appended. When
    /// every record is committed (a clean shutdown), the life's directory
    /// is removed: there is nothing to replay.
    pub fn close(&self, everything_committed: bool) {
        self.closing.store(true, Ordering::Release);
        self.work.notify_all();
        if let Some(t) = self.thread.lock().take()
            && t.join().is_err()
        {
            tracing::error!("WAL sync thread panicked");
        }
        // The preparer's next hand-over fails; it removes its spare.
        drop(self.spares.lock().take());
        if everything_committed && self.synced.borrow().failed.is_none() {
            match std::fs::remove_dir_all(&self.dir) {
                Ok(()) => {
                    tracing::info!(dir = %self.dir.display(), "everything committed; WAL removed")
                }
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove the WAL of this life; it replays (as a no-op) at the next start")
                }
            }
        }
    }

    /// The sync thread: writes the tail to the open segment, fsyncs, and
    /// publishes the new durable LSN; rotates segments at `segment_bytes`.
    fn sync_loop(&self) {
        // The first segment is ready before the first write needs it (a
        // failure here is met again, and reported, by that write).
        let mut open: Option<(File, Segment, u64)> = self.open_segment(1).ok();
        loop {
            let (bytes, first_lsn, last_lsn, groups, waiters) = {
                let mut tail = self.tail.lock();
                while tail.bytes.is_empty() && !self.closing.load(Ordering::Acquire) {
                    self.work.wait(&mut tail);
                }
                if tail.bytes.is_empty() {
                    break;
                }
                let last = tail.next_lsn - 1;
                let first = tail.first_lsn;
                (
                    std::mem::take(&mut tail.bytes),
                    first,
                    last,
                    std::mem::take(&mut tail.groups),
                    std::mem::take(&mut tail.waiters),
                )
            };
            let started = std::time::Instant::now();
            let written = self.write_out(&mut open, &bytes, first_lsn, groups);
            match written {
                Ok(()) => {
                    telemetry::wal_synced(bytes.len(), started.elapsed());
                    self.synced.send_modify(|s| s.lsn = last_lsn);
                    for w in waiters {
                        let _ = w.send(Ok(()));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "write-ahead log failed; buffered writes are refused from now on");
                    telemetry::wal_failed();
                    let why: Arc<str> = e.to_string().into();
                    self.synced.send_modify(|s| s.failed = Some(why.clone()));
                    for w in waiters {
                        let _ = w.send(Err(why.clone()));
                    }
                    // Writers blocked on the fence are not affected; new
                    // ones see `check` fail. Keep draining so appenders
                    // never wait forever.
                }
            }
        }
        if let Some((file, seg, _)) = open
            && let Err(e) = file.sync_data()
        {
            tracing::warn!(path = %seg.path.display(), error = %e, "final WAL fsync failed");
        }
    }

    fn write_out(
        &self,
        open: &mut Option<(File, Segment, u64)>,
        bytes: &[u8],
        first_lsn: u64,
        groups: HashMap<String, u64>,
    ) -> Result<(), WalError> {
        if let Some(why) = &self.synced.borrow().failed {
            return Err(WalError::Failed(why.clone()));
        }
        if open
            .as_ref()
            .is_some_and(|(_, _, size)| *size > 0 && size + bytes.len() as u64 > self.segment_bytes)
            && let Some((_, seg, _)) = open.take()
        {
            // Already fsynced after its last write.
            self.closed.lock().push(seg);
            self.delete_finished();
        }
        if open.is_none() {
            *open = Some(self.open_segment(first_lsn)?);
        }
        let Some((file, seg, size)) = open.as_mut() else {
            unreachable!("opened above")
        };
        file.write_all(bytes).map_err(|e| io(&seg.path, e))?;
        file.sync_data().map_err(|e| io(&seg.path, e))?;
        *size += bytes.len() as u64;
        seg.bytes += bytes.len() as u64;
        self.live_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        for (g, lsn) in groups {
            let max = seg.groups.entry(g).or_default();
            *max = (*max).max(lsn);
        }
        Ok(())
    }

    /// Turns the next preallocated spare into the segment whose first
    /// record is `first_lsn`.
    fn open_segment(&self, first_lsn: u64) -> Result<(File, Segment, u64), WalError> {
        let path = self.dir.join(segment_name(first_lsn));
        let spare = self
            .spares
            .lock()
            .as_ref()
            .map(|rx| rx.recv())
            .ok_or_else(|| WalError::Failed("the log is closing".into()))?
            .map_err(|_| WalError::Failed("the segment preparer stopped".into()))??;
        std::fs::rename(&spare, &path).map_err(|e| io(&path, e))?;
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        sync_dir(&self.dir)?;
        Ok((
            file,
            Segment {
                path,
                bytes: 0,
                groups: HashMap::new(),
            },
            0,
        ))
    }
}

/// The preparer thread: keeps one zero-filled, fsynced spare segment
/// ready, handing it over when the sync thread rotates; stops (removing an
/// unclaimed spare) when the log closes.
fn prepare_spares(
    dir: &Path,
    size: u64,
    tx: &std::sync::mpsc::SyncSender<Result<PathBuf, WalError>>,
) {
    for n in 0u64.. {
        let path = dir.join(format!("spare-{n}.tmp"));
        let made = (|| {
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&path)?;
            let zeros = vec![0u8; 1 << 20];
            let mut left = size;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                f.write_all(&zeros[..n])?;
                left -= n as u64;
            }
            f.sync_all()
        })()
        .map(|()| path.clone())
        .map_err(|e| io(&path, e));
        let failed = made.is_err();
        if tx.send(made).is_err() {
            let _ = std::fs::remove_file(&path);
            return;
        }
        if failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path, segment_bytes: u64) -> WalConfig {
        WalConfig {
            dir: dir.to_owned(),
            segment_bytes,
            max_bytes: 1 << 30,
            replay_wait: std::time::Duration::from_secs(1),
        }
    }

    fn delta(key: &[u8]) -> Delta<'_> {
        Delta {
            routing_key: key,
            ring_pos: 0,
            minute: 60,
            delta: 1,
            id: None,
            dups: None,
        }
    }

    fn segments(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".wal"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[tokio::test]
    async fn records_are_synced_rotated_and_deleted_once_every_group_committed_past_them() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (wal, old) = Wal::open(&cfg(tmp.path(), 64), "life-1").expect("open");
        assert!(old.is_empty());
        let life = tmp.path().join("life-1");
        // Each record is larger than a segment: one segment per record.
        for i in 0..3u8 {
            let key = [b'v', 0, b'a' + i];
            let group = if i == 1 { "g1" } else { "g0" };
            let appended = {
                let _f = wal.fence();
                wal.append(&[(group, vec![delta(&key); 4])])
            };
            assert_eq!(appended.lsn, u64::from(i) + 1);
            appended.synced().await.expect("synced");
        }
        assert_eq!(
            segments(&life),
            [segment_name(1), segment_name(2), segment_name(3)]
        );
        let (_guard, last) = wal.cut_fence();
        drop(_guard);
        assert_eq!(last, 3);
        // g0 committed up to 3, g1 not yet: only the first segment goes
        // (the open third one stays open).
        wal.durable("g0", 3);
        assert_eq!(segments(&life), [segment_name(2), segment_name(3)]);
        wal.durable("g1", 2);
        assert_eq!(segments(&life), [segment_name(3)]);
        wal.close(true);
        assert!(!life.exists(), "a clean close removes the life");
    }

    #[tokio::test]
    async fn writes_of_a_group_are_refused_while_its_segments_hold_its_share() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut c = cfg(tmp.path(), 256);
        c.max_bytes = 2000;
        let (wal, _) = Wal::open(&c, "full").expect("open");
        let append = |group: &str| {
            let _f = wal.fence();
            wal.append(&[(group, vec![delta(b"v\0k"); 8])])
        };
        // Two groups share 2,000 bytes: g0 (never committed) fills 1,000.
        let mut lsn = 0;
        while wal.check_group("g0", 2).is_ok() {
            let appended = append("g0");
            lsn = appended.lsn;
            appended.synced().await.expect("synced");
            assert!(lsn < 100, "never refused");
        }
        match wal.check_group("g0", 2) {
            Err(WalError::Full {
                group,
                bytes,
                max: 2000,
                groups: 2,
            }) => {
                assert_eq!(group, "g0");
                assert!(bytes >= 1000, "{bytes}");
            }
            other => panic!("expected Full, got {other:?}"),
        }
        // g1 still writes, and its committed segments go.
        assert!(wal.check_group("g1", 2).is_ok());
        for _ in 0..10 {
            let appended = append("g1");
            let g1_lsn = appended.lsn;
            appended.synced().await.expect("synced");
            wal.durable("g1", g1_lsn);
            assert!(wal.check_group("g1", 2).is_ok());
        }
        // Committing g0 frees its segments and its share.
        wal.durable("g0", lsn);
        assert!(wal.check_group("g0", 2).is_ok());
        assert!(wal.live_bytes() < 1000, "{}", wal.live_bytes());
        wal.close(true);
    }

    #[tokio::test]
    async fn a_second_process_cannot_use_the_same_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (wal, _) = Wal::open(&cfg(tmp.path(), 1 << 20), "a").expect("open");
        // flock is per open file description, so a second open in this
        // process conflicts just like another process would.
        match Wal::open(&cfg(tmp.path(), 1 << 20), "b") {
            Err(WalError::Locked(p)) => assert_eq!(p, tmp.path()),
            other => panic!("expected Locked, got {:?}", other.map(|_| ())),
        }
        wal.close(true);
    }

    #[tokio::test]
    async fn an_unclean_life_is_found_by_the_next_open() {
        let tmp = tempfile::tempdir().expect("tempdir");
        {
            let (wal, _) = Wal::open(&cfg(tmp.path(), 1 << 20), "first").expect("open");
            let appended = {
                let _f = wal.fence();
                wal.append(&[("g0", vec![delta(b"v\0k"), delta(b"v\0k")])])
            };
            appended.synced().await.expect("synced");
            let appended = {
                let _f = wal.fence();
                wal.append(&[("g1", vec![delta(b"v\0j")])])
            };
            appended.synced().await.expect("synced");
            // Not committed: the directory stays.
            wal.close(false);
        }
        let (wal, old) = Wal::open(&cfg(tmp.path(), 1 << 20), "second").expect("reopen");
        assert_eq!(old.len(), 1);
        assert_eq!(old[0].writer_id, "first");
        let g0 = &old[0].groups["g0"];
        assert_eq!(g0.len(), 2);
        assert!(
            g0.iter()
                .all(|(lsn, d)| *lsn == 1 && &*d.routing_key == b"v\0k")
        );
        assert_eq!(old[0].groups["g1"][0].0, 2);
        wal.close(true);
    }
}
