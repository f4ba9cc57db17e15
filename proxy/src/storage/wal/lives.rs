//! Reading back the logs of earlier lives of this proxy (after a crash or
//! a stop that left records), for the replay engine to apply.
//!
//! A torn last record ends a life's log; damage anywhere else refuses the
//! start rather than dropping records.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::storage::wal::record::{self, OwnedDelta, Tail};
use crate::storage::wal::{WRITER_FILE, WalError, io};

/// The unreplayed log of one earlier life.
#[derive(Debug)]
pub struct OldLife {
    pub writer_id: String,
    pub dir: PathBuf,
    /// Per group: `(lsn, delta)` in LSN order.
    pub groups: BTreeMap<String, Vec<(u64, OwnedDelta)>>,
}

impl OldLife {
    pub fn entries(&self) -> usize {
        self.groups.values().map(Vec::len).sum()
    }
}

/// Reads every earlier life under `root`. A torn last record (a write the
/// crash cut short, never acknowledged) ends a life's log; damage anywhere
/// else is an error: the proxy refuses to start rather than drop records.
pub fn read_lives(root: &Path) -> Result<Vec<OldLife>, WalError> {
    let mut lives = Vec::new();
    let entries = std::fs::read_dir(root).map_err(|e| io(root, e))?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        let writer_path = dir.join(WRITER_FILE);
        let Ok(writer_id) = std::fs::read_to_string(&writer_path) else {
            // Created but never written: the life crashed before its
            // first record could exist.
            tracing::warn!(dir = %dir.display(), "WAL directory without a writer id; ignored");
            continue;
        };
        lives.push(read_life(writer_id.trim().to_owned(), dir)?);
    }
    Ok(lives)
}

fn read_life(writer_id: String, dir: PathBuf) -> Result<OldLife, WalError> {
    let mut segments: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .map_err(|e| io(&dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let first = name.strip_suffix(".wal")?.parse::<u64>().ok()?;
            Some((first, e.path()))
        })
        .collect();
    segments.sort();
    let mut groups: BTreeMap<String, Vec<(u64, OwnedDelta)>> = BTreeMap::new();
    let last = segments.len().saturating_sub(1);
    for (i, (first_lsn, path)) in segments.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
        let (records, tail) = record::decode_all(&bytes);
        match tail {
            Tail::Clean => {}
            Tail::Torn { offset } if i == last => {
                tracing::warn!(path = %path.display(), offset, "torn last WAL record (never acknowledged) ignored");
            }
            Tail::Torn { offset } => {
                return Err(WalError::Corrupt {
                    path: path.clone(),
                    offset,
                    why: "incomplete record before the newest segment".into(),
                });
            }
            Tail::Corrupt { offset, why } => {
                return Err(WalError::Corrupt {
                    path: path.clone(),
                    offset,
                    why,
                });
            }
        }
        for (n, rec) in records.into_iter().enumerate() {
            let lsn = first_lsn + n as u64;
            for (group, deltas) in rec.groups {
                let list = groups.entry(group).or_default();
                list.extend(deltas.into_iter().map(|d| (lsn, d)));
            }
        }
    }
    Ok(OldLife {
        writer_id,
        dir,
        groups,
    })
}
