//! Durability: an append-only log of every change and periodic snapshots, under `data_dir`.
//!
//! - [`format`]: the framed, checksummed, versioned file format.
//! - [`records`]: records <-> domain, and the idempotent replay.
//! - [`log`]: the log writer, its flusher thread and the fsync policies.
//! - [`snapshotter`]: the background task that says when a snapshot is due and takes it on a
//!   low-priority thread of its own.
//! - this module: recovery at start-up, `--repair`, and snapshots.
//!
//! Files in `data_dir`: `log-N.sdl` segments and `snapshot-N.sds`, where snapshot N holds
//! every change logged in segments before N (and perhaps some of N's). Recovery loads the
//! newest snapshot and replays segments N, N+1, ... over it.

pub(crate) mod cache;
pub mod format;
pub mod log;
pub mod records;
pub(crate) mod snapshotter;

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;

use self::cache::DropBehind;
use self::format::{frame_with, scan, write_header, End, FormatError, SNAPSHOT_MAGIC};
use self::log::{create_private, segment_name, sync_dir, Log};
use crate::observe::LogMetrics;
use crate::store::Store;

/// The generated storage records.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("sessiond.persist.v1");
}

/// The lock file that keeps two daemons off one data directory.
pub(crate) const LOCK_FILE: &str = "LOCK";

/// The file name of snapshot `seq`.
pub fn snapshot_name(seq: u64) -> String {
    format!("snapshot-{seq:016}.sds")
}

/// Why recovery could not finish.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// A file is unreadable, foreign, too new or damaged.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The data directory itself is the problem.
    #[error("data_dir {}: {source}", path.display())]
    Dir {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Another sessiond holds the directory.
    #[error("data_dir {} is in use by another sessiond (it holds {LOCK_FILE})", path.display())]
    Locked {
        /// The directory.
        path: PathBuf,
    },
}

/// What recovery rebuilt.
pub struct Recovered {
    /// The Store, holding every session of the snapshot and the log. Sessions that died
    /// while the daemon was down are in it until the reaper ends them; no read returns them.
    pub store: Store,
    /// Sessions the snapshot held.
    pub from_snapshot: usize,
    /// Log records replayed.
    pub records: u64,
    /// The segment number the new log starts at.
    pub next_segment: u64,
    /// The lock on the directory; hold it for the daemon's life.
    pub lock: Option<File>,
    /// How long it took.
    pub took: Duration,
}

/// The data directory's files, by number.
struct Listing {
    snapshots: Vec<u64>,
    segments: Vec<u64>,
}

fn list(dir: &Path) -> Result<Listing, RecoveryError> {
    let dir_err = |source| RecoveryError::Dir {
        path: dir.to_owned(),
        source,
    };
    let mut snapshots = Vec::new();
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(dir_err)? {
        let name = entry.map_err(dir_err)?.file_name();
        let name = name.to_string_lossy();
        let number = |prefix: &str, suffix: &str| {
            name.strip_prefix(prefix)?
                .strip_suffix(suffix)?
                .parse::<u64>()
                .ok()
        };
        if let Some(n) = number("snapshot-", ".sds") {
            snapshots.push(n);
        } else if let Some(n) = number("log-", ".sdl") {
            segments.push(n);
        } else if name.ends_with(".tmp") {
            // A snapshot that was being written when the daemon stopped: never complete.
            let _ = std::fs::remove_file(dir.join(&*name));
        }
    }
    snapshots.sort_unstable();
    segments.sort_unstable();
    Ok(Listing {
        snapshots,
        segments,
    })
}

/// A data directory opened for recovery: locked and listed, not yet read.
pub struct Recovery {
    dir: PathBuf,
    lock: File,
    listing: Listing,
    started: Instant,
}

/// Opens `dir` (creating it) and takes its lock.
pub fn open(dir: &Path) -> Result<Recovery, RecoveryError> {
    let started = Instant::now();
    let dir_err = |source| RecoveryError::Dir {
        path: dir.to_owned(),
        source,
    };
    create_private_dir(dir).map_err(dir_err)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(dir.join(LOCK_FILE))
        .map_err(dir_err)?;
    if lock.try_lock().is_err() {
        return Err(RecoveryError::Locked {
            path: dir.to_owned(),
        });
    }
    Ok(Recovery {
        dir: dir.to_owned(),
        lock,
        listing: list(dir)?,
        started,
    })
}

/// Opens `dir` and rebuilds its sessions into the store `make` builds (given how many
/// sessions the snapshot holds): [`open`], then [`Recovery::replay`].
pub fn recover(
    dir: &Path,
    repair: bool,
    make: impl FnOnce(usize) -> Store,
) -> Result<Recovered, RecoveryError> {
    open(dir)?.replay(repair, make)
}

/// A record that decodes but makes no sense: damage that slipped past the checksum.
fn nonsense(path: &Path) -> FormatError {
    FormatError::Corrupt {
        path: path.to_owned(),
        offset: 0,
    }
}

impl Recovery {
    /// The segment number the new log starts at: after every segment there is.
    pub(crate) fn next_segment(&self) -> u64 {
        let base = self.listing.snapshots.last().copied().unwrap_or(0);
        self.listing
            .segments
            .last()
            .map_or(base.max(1), |&n| n + 1)
            .max(base)
    }

    /// Loads the newest snapshot into the store `make` builds, then applies every later log
    /// record to it through `Store::apply`, the code live writes use.
    ///
    /// A torn tail in the last segment (a crash mid-write) is cut off with a warning. Any
    /// other damage stops recovery with an error naming the file and offset, unless
    /// `repair`, which truncates at the damage, removes later segments, and says what it
    /// dropped.
    pub fn replay(
        self,
        repair: bool,
        make: impl FnOnce(usize) -> Store,
    ) -> Result<Recovered, RecoveryError> {
        let next_segment = self.next_segment();
        let Recovery {
            dir,
            lock,
            listing,
            started,
        } = self;
        let dir = dir.as_path();
        let dir_err = |source| RecoveryError::Dir {
            path: dir.to_owned(),
            source,
        };
        let mut snapshot = Vec::new();
        let mut keys = Vec::new();
        let base = listing.snapshots.last().copied().unwrap_or(0);
        if listing.snapshots.last().is_some() {
            let path = dir.join(snapshot_name(base));
            let end = scan(&path, SNAPSHOT_MAGIC, "snapshot", |p| {
                match records::decode_snapshot_entry(p).ok_or_else(|| nonsense(&path))? {
                    records::SnapshotEntry::Session(s) => snapshot.push(s),
                    records::SnapshotEntry::Idempotency(r) => keys.push(r),
                }
                Ok(())
            })?;
            // Snapshots are renamed into place only when complete, so any damage is corruption.
            match end {
                End::Clean => {}
                End::Torn { offset } | End::Corrupt { offset, .. } => {
                    return Err(FormatError::Corrupt { path, offset }.into())
                }
            }
        }
        let from_snapshot = snapshot.len();
        let store = make(from_snapshot);
        store.restore(snapshot);
        store.restore_idempotency(keys);
        let mut records = 0u64;
        let segments: Vec<u64> = listing
            .segments
            .iter()
            .copied()
            .filter(|&n| n >= base)
            .collect();
        for (i, &n) in segments.iter().enumerate() {
            let path = dir.join(segment_name(n));
            let last = i + 1 == segments.len();
            let end = scan(&path, format::LOG_MAGIC, "log", |p| {
                let _ = store.apply(&records::decode(p).ok_or_else(|| nonsense(&path))?);
                records += 1;
                Ok(())
            })?;
            let damage = match end {
                End::Clean => continue,
                End::Torn { offset } if last => {
                    tracing::warn!(file = %path.display(), offset, "log ends in a torn record (a crash mid-write); truncating there");
                    truncate(&path, offset)?;
                    continue;
                }
                End::Torn { offset } => (offset, 0),
                End::Corrupt {
                    offset,
                    frames_after,
                } => (offset, frames_after),
            };
            let (offset, frames_after) = damage;
            if !repair {
                return Err(FormatError::Corrupt { path, offset }.into());
            }
            let mut dropped = frames_after + 1;
            for &later in &segments[i + 1..] {
                let later_path = dir.join(segment_name(later));
                let mut count = 0u64;
                let _ = scan(&later_path, format::LOG_MAGIC, "log", |_| {
                    count += 1;
                    Ok(())
                });
                dropped += count;
                std::fs::remove_file(&later_path).map_err(dir_err)?;
            }
            let cut = std::fs::metadata(&path).map_or(0, |m| m.len().saturating_sub(offset));
            eprintln!(
                "sessiond --repair: {}: truncating at byte offset {offset}, dropping {cut} byte(s) holding at least {dropped} record(s) from there on ({} later segment(s) removed)",
                path.display(),
                segments.len() - i - 1
            );
            truncate(&path, offset)?;
            break;
        }
        Ok(Recovered {
            store,
            from_snapshot,
            records,
            next_segment,
            lock: Some(lock),
            took: started.elapsed(),
        })
    }
}

/// Creates `dir` (and missing parents) readable by this user only: it holds every session in
/// the clear. An existing directory that others can read is kept, with a warning.
fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        return std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir);
    }
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            data_dir = %dir.display(),
            mode = format!("{:o}", mode & 0o777),
            "data_dir can be read by other users, and it holds every session: chmod 700 it"
        );
    }
    Ok(())
}

/// Cuts a log segment at `offset`. A cut inside the header (a crash between creating the
/// segment and writing its header) leaves a fresh header, so the next start reads an empty
/// segment rather than a foreign file.
fn truncate(path: &Path, offset: u64) -> Result<(), RecoveryError> {
    let err = |source| RecoveryError::Dir {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(err)?;
    if offset < format::HEADER_BYTES {
        f.set_len(0).map_err(err)?;
        write_header(&mut f, format::LOG_MAGIC).map_err(err)?;
    } else {
        f.set_len(offset).map_err(err)?;
    }
    f.sync_all().map_err(err)
}

/// What one snapshot wrote.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotStats {
    /// Its number: segments before it are now deleted.
    pub seq: u64,
    /// Sessions written.
    pub sessions: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Writes a point-in-time snapshot of `store` without stopping writes, then deletes the
/// segments and snapshots it replaces.
///
/// The log is rotated first, so every change in the older segments is already in the map
/// when the snapshot reads it; changes that land while it runs are in the new segment too,
/// and replaying them over the snapshot is idempotent.
pub fn snapshot(dir: &Path, log: &Log, store: &Store) -> io::Result<SnapshotStats> {
    let seq = log.rotate()?;
    let tmp = dir.join(format!("{}.tmp", snapshot_name(seq)));
    // A leftover of an earlier attempt that failed is incomplete: start afresh.
    let _ = std::fs::remove_file(&tmp);
    let file = DropBehind::new(create_private(&tmp, false)?);
    let mut w = BufWriter::with_capacity(1 << 20, file);
    write_header(&mut w, SNAPSHOT_MAGIC)?;
    let (sessions, written) = match write_sessions(store, &mut w) {
        Ok(counts) => counts,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let bytes = format::HEADER_BYTES + written;
    w.into_inner().map_err(|e| e.into_error())?.finish()?;
    std::fs::rename(&tmp, dir.join(snapshot_name(seq)))?;
    sync_dir(dir)?;
    // Only now is everything before `seq` redundant.
    if let Ok(listing) = list(dir) {
        for n in listing.snapshots.into_iter().filter(|&n| n < seq) {
            let _ = std::fs::remove_file(dir.join(snapshot_name(n)));
        }
        for n in listing.segments.into_iter().filter(|&n| n < seq) {
            let _ = std::fs::remove_file(dir.join(segment_name(n)));
        }
        let _ = sync_dir(dir);
    }
    Ok(SnapshotStats {
        seq,
        sessions,
        bytes,
    })
}

/// Writes every session of `store` to `w` as snapshot frames (the body of a snapshot file,
/// after its header), beside live traffic as [`Store::for_each_session`] allows, then the
/// store's idempotency records. Returns the sessions and bytes written. The cluster's
/// snapshots share this body. Public for the benches.
pub fn write_sessions(store: &Store, w: &mut impl Write) -> io::Result<(u64, u64)> {
    let mut sessions = 0u64;
    let mut bytes = 0u64;
    let mut buf = Vec::new();
    let mut failed = None;
    store.for_each_session(|s| {
        if failed.is_some() {
            return;
        }
        buf.clear();
        frame_with(&mut buf, |out| records::encode_stored(&s, out));
        bytes += buf.len() as u64;
        sessions += 1;
        if let Err(e) = w.write_all(&buf) {
            failed = Some(e);
        }
    });
    // After the sessions: a live write records its key before its session is reachable,
    // so every keyed change the sessions above hold has its record here.
    if failed.is_none() {
        for r in store.idempotency_records() {
            buf.clear();
            frame_with(&mut buf, |out| {
                records::stored_idempotency(&r)
                    .encode(out)
                    .expect("a Vec grows to fit")
            });
            bytes += buf.len() as u64;
            if let Err(e) = w.write_all(&buf) {
                failed = Some(e);
                break;
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok((sessions, bytes)),
    }
}

/// The size of the newest snapshot in `dir`; 0 if there is none.
pub(crate) fn newest_snapshot_bytes(dir: &Path) -> u64 {
    list(dir)
        .ok()
        .and_then(|l| l.snapshots.last().copied())
        .and_then(|n| std::fs::metadata(dir.join(snapshot_name(n))).ok())
        .map_or(0, |m| m.len())
}

/// Whether the log written since the last snapshot calls for a new one: once it reaches the
/// larger of `min_bytes` and `percent` percent of that snapshot's size, as Redis's
/// `auto-aof-rewrite-percentage` does. A fixed size alone would rewrite a large store's whole
/// snapshot for every small slice of log; relative to the snapshot, the work of snapshots
/// stays proportional to the writes, and recovery replays at most about `percent` percent of
/// a snapshot's worth of log on top of it. `percent = 0` leaves `min_bytes` alone.
pub(crate) fn snapshot_due(
    log_bytes: u64,
    last_snapshot_bytes: u64,
    min_bytes: u64,
    percent: u64,
) -> bool {
    let relative = u128::from(last_snapshot_bytes) * u128::from(percent) / 100;
    let relative = u64::try_from(relative).unwrap_or(u64::MAX);
    log_bytes >= min_bytes.max(relative)
}

/// A started log with what recovery loaded, ready to hang off the Store.
pub struct Persistence {
    /// The log writer.
    pub log: Arc<Log>,
    /// The data directory.
    pub dir: PathBuf,
    _lock: Option<File>,
}

impl Persistence {
    /// Opens `dir` for recovery and starts a fresh log segment after the ones there. The
    /// Store is built next, with the log among its sinks, and [`Recovery::replay`] fills it.
    pub fn open(
        dir: &Path,
        policy: log::FsyncPolicy,
        metrics: LogMetrics,
    ) -> Result<(Persistence, Recovery), RecoveryError> {
        let recovery = open(dir)?;
        let log = Log::start(dir, recovery.next_segment(), policy, metrics).map_err(|e| {
            RecoveryError::Dir {
                path: dir.to_owned(),
                source: e,
            }
        })?;
        let lock = recovery.lock.try_clone().map_err(|e| RecoveryError::Dir {
            path: dir.to_owned(),
            source: e,
        })?;
        Ok((
            Persistence {
                log: Arc::new(log),
                dir: dir.to_owned(),
                _lock: Some(lock),
            },
            recovery,
        ))
    }
}

#[cfg(test)]
mod tests;
