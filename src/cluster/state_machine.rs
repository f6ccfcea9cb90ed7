//! The state machine: the node's one [`Store`], driven by committed entries.
//!
//! The Store stays the in-memory state it is on a single node. Each committed entry's effects
//! are applied in order with `Store::apply`, the code recovery replays the single-node log
//! with, and every waiting client is answered through its responder (without that,
//! `client_write` would never return). Membership entries update the stored membership. Applied
//! state is not persisted entry by entry: after a restart the node loads its last snapshot and
//! openraft re-applies the log from there up to the committed log ID the log store keeps.
//!
//! # Snapshots
//!
//! `raft/snapshot.sds` is the single-node snapshot format (`persist::format` frames of
//! `StoredSession`, written by `persist::write_sessions`) under a magic of its own, with one
//! frame in front: a [`pb::SnapshotMeta`] (the last log ID and membership it holds). It is
//! written to a temporary file, fsynced and renamed into place, so a restart finds the last whole
//! snapshot. Snapshots travel between nodes as that same file, chunk by chunk.
//!
//! A snapshot is built beside live applies, without stopping them: the Store is concurrent. So
//! it is fuzzy: it holds every effect up to its last log ID, and perhaps some later ones, some
//! sessions newer than others. That is safe only because `Store::apply` is idempotent (see
//! `store/apply.rs`): openraft re-applies every entry after the snapshot's last log ID on top of
//! it, and an effect met twice changes nothing the second time, so the result is the state at
//! the end of the log. For that, the last log ID must be taken *before* the sessions are read,
//! never after: [`RaftStateMachine::try_create_snapshot_builder`] runs between applies and takes
//! it there, and the builder reads the sessions later, on a thread of its own.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::{Stream, StreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::OptionalSend;
use prost::Message;

use super::pb_impl::effects;
use super::{lock, pb, Applied, LogId, SnapshotMeta, StoredMembership, TypeConfig};
use crate::persist::cache::DropBehind;
use crate::persist::format::{
    self, frame, frame_with, scan, write_header, End, FormatError, FRAME_HEADER_BYTES, HEADER_BYTES,
};
use crate::persist::snapshotter::in_background;
use crate::persist::{records, write_sessions};
use crate::session::Session;
use crate::store::events::EndCause;
use crate::store::{Applied as Outcome, Effect, IdempotencyRecord, Store};

/// Magic of a Raft snapshot file.
pub const RAFT_SNAPSHOT_MAGIC: &[u8; 6] = b"SDRSN\0";

/// The current snapshot's name in the Raft directory.
const SNAPSHOT_FILE: &str = "snapshot.sds";

/// A snapshot as openraft hands it around: the open file, and where it is.
#[derive(Debug)]
pub struct SnapshotFile {
    /// Open for reading, at its start.
    pub file: File,
    /// Its path: the current snapshot, or one received from the leader and not yet installed.
    pub path: PathBuf,
}

impl SnapshotFile {
    /// Opens the snapshot at `path`.
    pub fn open(path: PathBuf) -> io::Result<SnapshotFile> {
        Ok(SnapshotFile {
            file: File::open(&path)?,
            path,
        })
    }
}

/// What has been applied: the last log ID and membership.
#[derive(Debug, Clone, Default)]
struct AppliedState {
    last: Option<LogId>,
    membership: StoredMembership,
}

struct Shared {
    store: Store,
    dir: PathBuf,
    applied: Mutex<AppliedState>,
    /// The metadata of `snapshot.sds`, if there is one. Its lock is held while the file is
    /// replaced, so an older snapshot never replaces a newer one.
    current: Mutex<Option<SnapshotMeta>>,
    /// While a snapshot is being built: the sessions the Regenerates applied meanwhile made.
    /// The build lists the keys before it reads them, so a move applied in between has its old
    /// key gone and its new key unlisted; written after the listed sessions, these keep the
    /// snapshot from missing the session altogether (see `Store::apply_committed`).
    moves: Mutex<Option<Vec<Session>>>,
}

/// openraft's state machine over the node's Store.
pub struct StateMachine {
    shared: Arc<Shared>,
}

/// Builds a snapshot of the state at the log ID it was made at (and perhaps later).
pub struct SnapshotBuilder {
    shared: Arc<Shared>,
    meta: SnapshotMeta,
}

impl StateMachine {
    /// The state machine over `store`, keeping snapshots in `dir` (the Raft directory, which
    /// [`super::log_store::LogStore::open`] creates and locks). Reads the current snapshot's
    /// metadata; openraft loads the snapshot itself when the node starts.
    pub fn open(dir: &Path, store: Store) -> Result<StateMachine, FormatError> {
        let io_err = |source| FormatError::Io {
            path: dir.to_owned(),
            source,
        };
        for entry in std::fs::read_dir(dir).map_err(io_err)? {
            let name = entry.map_err(io_err)?.file_name();
            if name.to_string_lossy().ends_with(".tmp") && name != "log.sdl.tmp" {
                // A snapshot being written or received when the node stopped: never whole.
                let _ = std::fs::remove_file(dir.join(name));
            }
        }
        let path = dir.join(SNAPSHOT_FILE);
        let current = match path.exists() {
            true => Some(read_meta(&path)?),
            false => None,
        };
        Ok(StateMachine {
            shared: Arc::new(Shared {
                store,
                dir: dir.to_owned(),
                applied: Mutex::new(AppliedState::default()),
                current: Mutex::new(current),
                moves: Mutex::new(None),
            }),
        })
    }

    /// The Store this state machine drives.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    fn builder(&self) -> SnapshotBuilder {
        // Between applies: every move from here on is kept for the snapshot.
        *lock(&self.shared.moves) = Some(Vec::new());
        let applied = lock(&self.shared.applied).clone();
        SnapshotBuilder {
            shared: self.shared.clone(),
            meta: SnapshotMeta {
                last_log_id: applied.last,
                last_membership: applied.membership,
            },
        }
    }
}

/// A new temporary file in the Raft directory, readable by its owner only.
pub(crate) fn temp_file(dir: &Path, what: &str) -> io::Result<(File, PathBuf)> {
    let path = dir.join(format!("{what}-{:016x}.tmp", rand::random::<u64>()));
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&path)?;
    Ok((file, path))
}

fn meta_to_pb(meta: &SnapshotMeta) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: meta.last_log_id.map(Into::into),
        last_membership_log_id: meta.last_membership.log_id().map(Into::into),
        last_membership: Some(meta.last_membership.membership().into()),
    }
}

fn meta_from_pb(m: pb::SnapshotMeta) -> SnapshotMeta {
    SnapshotMeta {
        last_log_id: m.last_log_id.map(Into::into),
        last_membership: StoredMembership::new(
            m.last_membership_log_id.map(Into::into),
            m.last_membership.unwrap_or_default().into(),
        ),
    }
}

/// Reads only a snapshot's metadata: its header and first frame.
pub(crate) fn read_meta(path: &Path) -> Result<SnapshotMeta, FormatError> {
    let corrupt = |offset| FormatError::Corrupt {
        path: path.to_owned(),
        offset,
    };
    let io_err = |source| FormatError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(io_err)?;
    let mut header = [0u8; (HEADER_BYTES + FRAME_HEADER_BYTES) as usize];
    f.read_exact(&mut header).map_err(|_| corrupt(0))?;
    if &header[..6] != RAFT_SNAPSHOT_MAGIC {
        return Err(FormatError::BadMagic {
            path: path.to_owned(),
            kind: "Raft snapshot",
        });
    }
    let n = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
    if n > format::MAX_FRAME_BYTES {
        return Err(corrupt(HEADER_BYTES));
    }
    let mut payload = vec![0u8; n as usize];
    f.read_exact(&mut payload)
        .map_err(|_| corrupt(HEADER_BYTES))?;
    if crc32c::crc32c(&payload) != crc {
        return Err(corrupt(HEADER_BYTES));
    }
    pb::SnapshotMeta::decode(payload.as_slice())
        .map(meta_from_pb)
        .map_err(|_| corrupt(HEADER_BYTES))
}

/// A snapshot's metadata, sessions and idempotency records.
pub(crate) type SnapshotContents = (SnapshotMeta, Vec<Session>, Vec<IdempotencyRecord>);

/// Reads a whole snapshot, checking every frame: its metadata, sessions and idempotency
/// records.
pub(crate) fn read_snapshot(path: &Path) -> Result<SnapshotContents, FormatError> {
    let corrupt = || FormatError::Corrupt {
        path: path.to_owned(),
        offset: 0,
    };
    let mut meta = None;
    let (mut sessions, mut keys) = (Vec::new(), Vec::new());
    let end = scan(path, RAFT_SNAPSHOT_MAGIC, "Raft snapshot", |p| {
        if meta.is_none() {
            meta = Some(pb::SnapshotMeta::decode(p).map_err(|_| corrupt())?);
        } else {
            match records::decode_snapshot_entry(p).ok_or_else(corrupt)? {
                records::SnapshotEntry::Session(s) => sessions.push(s),
                records::SnapshotEntry::Idempotency(r) => keys.push(r),
            }
        }
        Ok(())
    })?;
    match (end, meta) {
        (End::Clean, Some(meta)) => Ok((meta_from_pb(meta), sessions, keys)),
        (End::Clean, None) => Err(corrupt()),
        // Snapshots are whole before anyone reads them: any damage is corruption.
        (End::Torn { offset } | End::Corrupt { offset, .. }, _) => Err(FormatError::Corrupt {
            path: path.to_owned(),
            offset,
        }),
    }
}

/// Checks every frame of a received snapshot (length and checksum) and reads its metadata,
/// without decoding its sessions: a transfer cut short or damaged is refused before openraft
/// installs it, since an install that fails stops the node.
pub(crate) fn verify_snapshot(path: &Path) -> Result<SnapshotMeta, FormatError> {
    let corrupt = |offset| FormatError::Corrupt {
        path: path.to_owned(),
        offset,
    };
    let mut meta = None;
    let end = scan(path, RAFT_SNAPSHOT_MAGIC, "Raft snapshot", |p| {
        if meta.is_none() {
            meta = Some(pb::SnapshotMeta::decode(p).map_err(|_| corrupt(HEADER_BYTES))?);
        }
        Ok(())
    })?;
    match (end, meta) {
        (End::Clean, Some(meta)) => Ok(meta_from_pb(meta)),
        (End::Clean, None) => Err(corrupt(HEADER_BYTES)),
        (End::Torn { offset } | End::Corrupt { offset, .. }, _) => Err(corrupt(offset)),
    }
}

/// The size of the snapshot in the Raft directory `dir`; 0 if there is none.
pub(crate) fn snapshot_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(SNAPSHOT_FILE)).map_or(0, |m| m.len())
}

/// Writes a snapshot of `store` with `meta` to a temporary file, fsynced; returns its path.
fn write_snapshot(
    dir: &Path,
    store: &Store,
    moves: &Mutex<Option<Vec<Session>>>,
    meta: &SnapshotMeta,
) -> io::Result<PathBuf> {
    let (file, tmp) = temp_file(dir, "snapshot")?;
    let written = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, DropBehind::new(file));
        write_header(&mut w, RAFT_SNAPSHOT_MAGIC)?;
        let mut buf = Vec::new();
        frame(&meta_to_pb(meta).encode_to_vec(), &mut buf);
        w.write_all(&buf)?;
        let listed = write_sessions(store, &mut w);
        let moved = lock(moves).take().unwrap_or_default();
        let (sessions, bytes) = listed?;
        for s in moved {
            buf.clear();
            frame_with(&mut buf, |out| records::encode_stored(&s, out));
            w.write_all(&buf)?;
        }
        w.into_inner().map_err(|e| e.into_error())?.finish()?;
        tracing::info!(sessions, bytes, last_log_id = ?meta.last_log_id, "Raft snapshot written");
        Ok(())
    })();
    match written {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

impl Shared {
    /// Makes the snapshot at `path` with `meta` the current one, unless a newer one already
    /// is; returns the file to hand out.
    fn keep(&self, path: &Path, meta: &SnapshotMeta) -> io::Result<SnapshotFile> {
        let target = self.dir.join(SNAPSHOT_FILE);
        let mut current = lock(&self.current);
        let newer = current
            .as_ref()
            .is_some_and(|c| c.last_log_id > meta.last_log_id);
        if newer {
            // Open before removing: the caller still gets the snapshot it asked for.
            let out = SnapshotFile::open(path.to_owned())?;
            let _ = std::fs::remove_file(path);
            return Ok(out);
        }
        if path != target {
            if path.parent() == Some(self.dir.as_path()) {
                std::fs::rename(path, &target)?;
            } else {
                // Not ours to move (openraft's storage suite hands one node's snapshot to
                // another): copy it in, then rename.
                let (_, tmp) = temp_file(&self.dir, "snapshot")?;
                std::fs::copy(path, &tmp)?;
                File::open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, &target)?;
            }
            File::open(&self.dir)?.sync_all()?;
        }
        *current = Some(meta.clone());
        SnapshotFile::open(target)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(
        &mut self,
    ) -> Result<Snapshot<u64, u64, pb::Node, SnapshotFile>, io::Error> {
        let shared = self.shared.clone();
        let meta = self.meta.clone();
        // At the lowest CPU priority, as a single node's snapshots: serving comes first.
        in_background(move || {
            let written = write_snapshot(&shared.dir, &shared.store, &shared.moves, &meta);
            // A failed build keeps no moves either.
            lock(&shared.moves).take();
            let tmp = written?;
            let file = shared.keep(&tmp, &meta)?;
            Ok(Snapshot {
                meta,
                snapshot: file,
            })
        })
        .await
        .map_err(io::Error::other)?
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applied = lock(&self.shared.applied).clone();
        Ok((applied.last, applied.membership))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let log_id = entry.log_id();
            let effects = effects(&entry).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("entry {log_id}: {e}"))
            })?;
            let mut outcomes = Vec::with_capacity(effects.len());
            for effect in &effects {
                let outcome = self.shared.store.apply_committed(effect);
                if let (Effect::Regenerate { session, .. }, Outcome::Done) = (effect, outcome) {
                    if let Some(moves) = lock(&self.shared.moves).as_mut() {
                        moves.push(session.clone());
                    }
                }
                outcomes.push(outcome);
            }
            {
                let mut applied = lock(&self.shared.applied);
                if let Some(m) = entry.get_membership() {
                    applied.membership = StoredMembership::new(Some(log_id), m);
                }
                applied.last = Some(log_id);
            }
            if let Some(responder) = responder {
                responder.send(Applied(outcomes));
            }
        }
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, _force: bool) -> Option<SnapshotBuilder> {
        Some(self.builder())
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.builder()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let shared = self.shared.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || {
            let (inside, sessions, keys) =
                read_snapshot(&snapshot.path).map_err(io::Error::other)?;
            if inside.last_log_id != meta.last_log_id {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: holds the state at {:?}, not at {:?} as its metadata says",
                        snapshot.path.display(),
                        inside.last_log_id,
                        meta.last_log_id
                    ),
                ));
            }
            replace_contents(&shared.store, sessions, keys);
            shared.keep(&snapshot.path, &meta)?;
            *lock(&shared.applied) = AppliedState {
                last: meta.last_log_id,
                membership: meta.last_membership.clone(),
            };
            tracing::info!(last_log_id = ?meta.last_log_id, "Raft snapshot installed");
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<u64, u64, pb::Node, SnapshotFile>>, io::Error> {
        let current = lock(&self.shared.current).clone();
        match current {
            None => Ok(None),
            Some(meta) => Ok(Some(Snapshot {
                meta,
                snapshot: SnapshotFile::open(self.shared.dir.join(SNAPSHOT_FILE))?,
            })),
        }
    }
}

/// Replaces everything `store` holds with a snapshot's `sessions` and idempotency `keys`:
/// every session it has ends (through apply, as a replayed `End`, so no sink hears of it),
/// then the snapshot's are restored. Runs between applies; a follower serves no reads
/// meanwhile.
fn replace_contents(store: &Store, sessions: Vec<Session>, records: Vec<IdempotencyRecord>) {
    let mut keys = Vec::new();
    store.for_each_session(|s| keys.push(s.key));
    let at = store.clock().now();
    for key in keys {
        let _ = store.apply(&crate::store::Effect::End {
            key,
            cause: EndCause::Destroyed,
            at,
        });
    }
    store.restore(sessions);
    store.replace_idempotency(records);
}

#[cfg(test)]
mod tests;
