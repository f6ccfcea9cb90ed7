//! The durable Raft log: openraft's [`RaftLogStorage`] on one append-only file.
//!
//! `raft/log.sdl` is a file of the format `persist::format` defines (header, then framed,
//! CRC-checked records), whose records are [`pb::LogRecord`]s: an entry, a vote, a
//! truncate-after, a purge, or the last committed log ID. The file is the history of the log's
//! changes; at start-up it is replayed in order to rebuild the state, which lives in memory
//! while the node runs: the vote, the last purged log ID, the committed log ID, and every entry
//! since the last purge (a snapshot holds the rest). A torn last record, as a crash mid-write
//! leaves, is cut off, as persist's recovery does; any other damage stops the node with an
//! error that names the file and offset.
//!
//! # Ordering and durability
//!
//! Every write goes through one writer thread, in the order openraft asked for it: openraft's
//! `docs/protocol/io_ordering.md` explains how a vote and an append that reach the disk
//! reordered can lose committed entries. Since the file is append-only and written in that
//! order, what a crash leaves is always a prefix of the history: a state the log really was in.
//!
//! - `save_vote` returns once the vote is written and fsynced, whatever the policy.
//! - `append` returns at once (the entries are readable from memory), and fires its callback
//!   once the entries are durable under the fsync policy: fsynced under `always`; written to
//!   the page cache under `everysec` (fsynced within the second) and `no`. A killed process
//!   loses nothing under any policy; a machine that loses power loses what was not fsynced.
//! - `truncate_after` and `purge` return once written.
//! - `save_committed` is written in order but waits for nothing: a committed log ID that is
//!   lost only means less is re-applied from the log at the next start.
//!
//! Group commit: the writer takes every request queued while it was busy and writes them with
//! one `write(2)` and (when one is due) one fsync, then answers all of them.
//!
//! A failed write or fsync is not retried: the writer refuses everything from then on, and
//! openraft, told of the error, stops the node. A Raft member with a failing disk must not go
//! on acknowledging entries; the others carry on without it.
//!
//! # Compaction
//!
//! Purged entries stay in the file until it is rewritten. After a purge, once the file is over
//! [`LogOptions::compact_at_bytes`] and more than twice the size of what it still needs, the
//! writer writes a fresh file (the vote, the committed log ID, the purge point and the remaining
//! entries) to `log.sdl.tmp`, fsyncs it and renames it over `log.sdl`: the rename is atomic, so a
//! crash leaves either the old file or the new, each a whole history.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::RangeBounds;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::OptionalSend;
use prost::Message;

use super::pb::log_record::Op as Rec;
use super::pb_impl::check_vote;
use super::{lock, pb, LogId, TypeConfig};
use crate::persist::cache::Behind;
use crate::persist::format::{self, frame, frame_with, scan, write_header, End, FormatError};
use crate::persist::log::FsyncPolicy;

/// Magic of the Raft log file.
pub const RAFT_LOG_MAGIC: &[u8; 6] = b"SDRLG\0";

/// The log file's name in the Raft directory.
const LOG_FILE: &str = "log.sdl";

/// Where a compaction writes the new file before renaming it into place.
const LOG_TMP: &str = "log.sdl.tmp";

/// The lock that keeps two nodes off one Raft directory.
const LOCK_FILE: &str = "LOCK";

/// A writer pass takes at most this many queued requests, so one pass's answers are not held
/// back behind an unbounded queue.
const MAX_BATCH: usize = 4096;

/// How the log behaves, beyond its directory.
#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    /// When appends are fsynced (see the module docs).
    pub fsync: FsyncPolicy,
    /// The file is rewritten after a purge once it is this large and more than twice what it
    /// still needs.
    pub compact_at_bytes: u64,
}

impl LogOptions {
    /// The default compaction threshold: 64 MiB, a fraction of a second to replay at start-up.
    pub const COMPACT_AT_BYTES: u64 = 64 << 20;

    /// Options with the default compaction threshold.
    pub fn new(fsync: FsyncPolicy) -> Self {
        LogOptions {
            fsync,
            compact_at_bytes: Self::COMPACT_AT_BYTES,
        }
    }
}

/// Why the log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The file is unreadable, foreign, too new or damaged.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The directory or a file in it cannot be used.
    #[error("{}: {source}", path.display())]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Another node holds the directory.
    #[error("{} is in use by another sessiond (it holds {LOCK_FILE})", path.display())]
    Locked {
        /// The directory.
        path: PathBuf,
    },
}

/// An entry the log holds, and where it starts in the count of appended bytes.
#[derive(Debug)]
struct Kept {
    start: u64,
    entry: pb::Entry,
}

/// The log's state, as the records so far make it.
#[derive(Debug, Default)]
struct Mem {
    vote: Option<pb::Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
    entries: BTreeMap<u64, Kept>,
    /// The encoded bytes of every entry appended so far, less those truncated away: an
    /// entry's `start` is this count when it was appended, so the log's size after any index
    /// is one subtraction (what the snapshot trigger asks for, see [`LogSize`]).
    appended: u64,
    /// Bytes of the file, counting what is queued for the writer and `unsent`.
    file_bytes: u64,
    /// Records made but not yet queued: the committed log ID's, which wait for nothing, go to
    /// the writer with the next request instead of waking it on their own.
    unsent: Vec<u8>,
}

impl Mem {
    /// `bytes` as they go to the file: counted in its size, behind the records not yet sent.
    fn outgoing(&mut self, bytes: Vec<u8>) -> Vec<u8> {
        self.file_bytes += bytes.len() as u64;
        if self.unsent.is_empty() {
            return bytes;
        }
        let mut all = std::mem::take(&mut self.unsent);
        all.extend_from_slice(&bytes);
        all
    }

    /// Applies one record, at replay or as it is made.
    fn apply(&mut self, rec: Rec) -> Result<(), &'static str> {
        match rec {
            Rec::Entry(e) => {
                if self.purged.is_some_and(|p| e.index <= p.index) {
                    return Ok(());
                }
                self.insert(e);
            }
            Rec::Vote(v) => self.vote = Some(check_vote(Some(v)).map_err(|_| "vote")?),
            Rec::TruncateAfter(t) => self.truncate_from(t.last_kept.map_or(0, |id| id.index + 1)),
            Rec::Purge(id) => {
                let id = LogId::from(id);
                self.entries = self.entries.split_off(&(id.index + 1));
                if self.purged.is_none_or(|p| p.index < id.index) {
                    self.purged = Some(id);
                }
            }
            Rec::Committed(id) => self.committed = Some(id.into()),
        }
        Ok(())
    }

    /// Adds `e`, which replaces the entry at its index and everything after it.
    fn insert(&mut self, e: pb::Entry) {
        self.truncate_from(e.index);
        let start = self.appended;
        self.appended += e.encoded_len() as u64;
        self.entries.insert(e.index, Kept { start, entry: e });
    }

    /// Drops the entries from `index` on.
    fn truncate_from(&mut self, index: u64) {
        let tail = self.entries.split_off(&index);
        if let Some((_, first)) = tail.first_key_value() {
            self.appended = first.start;
        }
    }

    /// The encoded bytes of the entries after `index` (all of them for `None`).
    fn bytes_after(&self, index: Option<u64>) -> u64 {
        let from = index.map_or(0, |i| i + 1);
        self.entries
            .range(from..)
            .next()
            .map_or(0, |(_, k)| self.appended - k.start)
    }

    fn last_log_id(&self) -> Option<LogId> {
        self.entries
            .last_key_value()
            .map(|(_, k)| k.entry.log_id())
            .or(self.purged)
    }

    /// The whole state as a fresh file: what a compaction writes.
    fn image(&self) -> Vec<u8> {
        let mut out = Vec::new();
        write_header(&mut out, RAFT_LOG_MAGIC).expect("a Vec grows");
        if let Some(v) = &self.vote {
            push(&mut out, Rec::Vote(*v));
        }
        if let Some(p) = self.purged {
            push(&mut out, Rec::Purge(p.into()));
        }
        if let Some(c) = self.committed {
            push(&mut out, Rec::Committed(c.into()));
        }
        for k in self.entries.values() {
            push_entry(&mut out, &k.entry);
        }
        out
    }

    /// Bytes the entries kept need in the file.
    fn live_bytes(&self) -> u64 {
        let framing = 16 * self.entries.len() as u64;
        self.bytes_after(None) + framing
    }
}

/// Frames one record onto `out`.
fn push(out: &mut Vec<u8>, rec: Rec) {
    frame(&pb::LogRecord { op: Some(rec) }.encode_to_vec(), out);
}

/// Frames an entry's record onto `out` without copying the entry: the record's encoding is its
/// field 1, the entry.
fn push_entry(out: &mut Vec<u8>, e: &pb::Entry) {
    frame_with(out, |out| prost::encoding::message::encode(1, e, out));
}

/// Where the writer answers a caller that awaits its write.
type Reply = tokio::sync::oneshot::Receiver<io::Result<()>>;

/// Waits for the writer's answer.
async fn written(rx: Reply) -> io::Result<()> {
    rx.await
        .unwrap_or_else(|_| Err(io::Error::other("the Raft log writer stopped")))
}

/// What the writer tells when a request is done.
enum Done {
    /// Nobody waits.
    Nothing,
    /// openraft's append callback.
    Flushed(IOFlushed<TypeConfig>),
    /// A caller awaiting the write.
    Reply(tokio::sync::oneshot::Sender<io::Result<()>>),
}

impl Done {
    fn finish(self, result: Result<(), &str>) {
        let result = result.map_err(|e| io::Error::other(e.to_string()));
        match self {
            Done::Nothing => {}
            Done::Flushed(cb) => cb.io_completed(result),
            Done::Reply(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

/// A request to the writer.
enum Op {
    /// Append framed records; fsync first if `sync`.
    Write {
        bytes: Vec<u8>,
        sync: bool,
        done: Done,
    },
    /// Replace the file with this image.
    Compact { image: Vec<u8> },
    /// Nothing to write: an append written in place made the file dirty, and under
    /// `everysec` the writer fsyncs it within the second.
    Nudge,
    /// Write and fsync what is queued, answer, and stop.
    Close(mpsc::Sender<()>),
}

/// The state both the store and its readers see.
struct Shared {
    mem: Mutex<Mem>,
    /// Requests go in under the `mem` lock, so the queue's order is the order of the state's
    /// changes.
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    options: LogOptions,
    /// The Raft directory.
    dir: PathBuf,
    /// The file, which the writer and the appends written in place share.
    out: Mutex<Out>,
    /// Writes and rewrites queued for the writer and not yet in the file: raised under `mem`'s
    /// lock as they are queued, lowered by the writer once they are written. While it is
    /// above zero, an append goes through the queue too, behind them.
    queued: AtomicUsize,
}

impl Shared {
    /// Queues `op`. Called with `mem` locked, so requests queue in the order of the changes.
    fn send(&self, op: Op) -> io::Result<()> {
        let closed = || io::Error::other("the Raft log is closed");
        let counted = matches!(op, Op::Write { .. } | Op::Compact { .. });
        let tx = lock(&self.tx);
        let Some(tx) = &*tx else {
            return Err(closed());
        };
        if counted {
            self.queued.fetch_add(1, Ordering::SeqCst);
        }
        tx.send(op).map_err(|_| {
            if counted {
                self.queued.fetch_sub(1, Ordering::SeqCst);
            }
            closed()
        })
    }

    /// Whether an append may be written in place, on the caller's thread, instead of being
    /// handed to the writer: not under `always`, whose appends wait for an fsync the writer
    /// shares among them, and only while nothing is queued for the writer, so the file
    /// keeps the order of the changes. Asked with `mem` locked.
    fn in_place(&self) -> bool {
        self.options.fsync != FsyncPolicy::Always && self.queued.load(Ordering::SeqCst) == 0
    }

    /// Writes `bytes` in place (see [`Shared::in_place`]). Called with `mem` locked.
    fn write_in_place(&self, bytes: &[u8]) -> Result<(), String> {
        let mut out = lock(&self.out);
        let was_dirty = out.dirty;
        let result = out.write(bytes, &self.dir);
        let nudge = !was_dirty && out.dirty && self.options.fsync == FsyncPolicy::Everysec;
        drop(out);
        if nudge {
            let _ = self.send(Op::Nudge);
        }
        result
    }
}

/// The Raft log store. openraft owns it; [`LogStore::closer`] lets the node stop its writer.
pub struct LogStore {
    shared: Arc<Shared>,
}

/// A reader of the log, for openraft's replication tasks.
#[derive(Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

/// How large the log is: for the snapshot trigger, which snapshots once the log since the
/// last snapshot calls for it.
#[derive(Clone)]
pub struct LogSize {
    shared: Arc<Shared>,
}

impl LogSize {
    /// The encoded bytes of the entries after `index` that the log holds (every entry for
    /// `None`): the log a snapshot up to `index` would make redundant.
    pub fn bytes_after(&self, index: Option<u64>) -> u64 {
        lock(&self.shared.mem).bytes_after(index)
    }
}

/// Stops a log's writer: what is queued is written and fsynced first. Kept by the node, which
/// closes the log after openraft has stopped, so a restart in the same process finds the
/// directory free.
#[derive(Clone)]
pub struct LogCloser {
    shared: Arc<Shared>,
}

impl LogCloser {
    /// Closes the log and waits for its writer to finish.
    pub fn close(&self) {
        let (tx, rx) = mpsc::channel();
        let sent = {
            let mut mem = lock(&self.shared.mem);
            if !mem.unsent.is_empty() {
                let bytes = std::mem::take(&mut mem.unsent);
                let _ = self.shared.send(Op::Write {
                    bytes,
                    sync: false,
                    done: Done::Nothing,
                });
            }
            self.shared.send(Op::Close(tx)).is_ok()
        };
        lock(&self.shared.tx).take();
        if sent {
            let _ = rx.recv();
        }
        if let Some(handle) = lock(&self.shared.writer).take() {
            let _ = handle.join();
        }
    }
}

impl LogStore {
    /// Opens the log in `dir` (created if missing), replaying its file, and starts the writer.
    pub fn open(dir: &Path, options: LogOptions) -> Result<LogStore, OpenError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| OpenError::Io { path, source }
        };
        create_private_dir(dir).map_err(io_err(dir))?;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join(LOCK_FILE))
            .map_err(io_err(dir))?;
        if lock_file.try_lock().is_err() {
            return Err(OpenError::Locked {
                path: dir.to_owned(),
            });
        }
        let _ = std::fs::remove_file(dir.join(LOG_TMP));
        let path = dir.join(LOG_FILE);
        let mut mem = Mem::default();
        if path.exists() {
            replay(&path, &mut mem)?;
        } else {
            let mut f = create_file(&path).map_err(io_err(&path))?;
            write_header(&mut f, RAFT_LOG_MAGIC).map_err(io_err(&path))?;
            f.sync_all().map_err(io_err(&path))?;
            sync_dir(dir).map_err(io_err(dir))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let file_bytes = file.metadata().map_err(io_err(&path))?.len();
        mem.file_bytes = file_bytes;
        let (tx, rx) = mpsc::channel();
        let sync_file = file.try_clone().map_err(io_err(&path))?;
        let shared = Arc::new(Shared {
            mem: Mutex::new(mem),
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(None),
            options,
            dir: dir.to_owned(),
            out: Mutex::new(Out {
                file,
                len: file_bytes,
                dirty: false,
                failed: None,
            }),
            queued: AtomicUsize::new(0),
        });
        let writer = Writer {
            shared: shared.clone(),
            sync_file,
            last_sync: Instant::now(),
            joined: Vec::new(),
            behind: Behind::default(),
            _lock: lock_file,
        };
        let handle = std::thread::Builder::new()
            .name("sessiond-raft-log".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err(dir))?;
        *lock(&shared.writer) = Some(handle);
        Ok(LogStore { shared })
    }

    /// A handle that reports this log's size.
    pub fn size(&self) -> LogSize {
        LogSize {
            shared: self.shared.clone(),
        }
    }

    /// A handle that stops this log's writer.
    pub fn closer(&self) -> LogCloser {
        LogCloser {
            shared: self.shared.clone(),
        }
    }

    /// Queues `bytes`, releasing `mem`; the receiver hears when the writer has written them.
    fn queue_reply(
        &self,
        mem: MutexGuard<'_, Mem>,
        bytes: Vec<u8>,
        sync: bool,
    ) -> io::Result<Reply> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.queue(mem, bytes, sync, Done::Reply(tx))?;
        Ok(rx)
    }

    /// Queues `bytes` with `done`, behind the records not yet sent, and releases `mem`.
    fn queue(
        &self,
        mut mem: MutexGuard<'_, Mem>,
        bytes: Vec<u8>,
        sync: bool,
        done: Done,
    ) -> io::Result<()> {
        let bytes = mem.outgoing(bytes);
        let result = self.shared.send(Op::Write { bytes, sync, done });
        drop(mem);
        result
    }
}

fn replay(path: &Path, mem: &mut Mem) -> Result<(), OpenError> {
    let end = scan(path, RAFT_LOG_MAGIC, "Raft log", |payload| {
        let bad = || FormatError::Corrupt {
            path: path.to_owned(),
            offset: 0,
        };
        let rec = pb::LogRecord::decode(payload)
            .ok()
            .and_then(|r| r.op)
            .ok_or_else(bad)?;
        mem.apply(rec).map_err(|_| bad())
    })?;
    match end {
        End::Clean => Ok(()),
        End::Torn { offset } => {
            tracing::warn!(file = %path.display(), offset, "Raft log ends in a torn record (a crash mid-write); truncating there");
            let err = |source| OpenError::Io {
                path: path.to_owned(),
                source,
            };
            let mut f = OpenOptions::new().write(true).open(path).map_err(err)?;
            if offset < format::HEADER_BYTES {
                f.set_len(0).map_err(err)?;
                write_header(&mut f, RAFT_LOG_MAGIC).map_err(err)?;
            } else {
                f.set_len(offset).map_err(err)?;
            }
            f.sync_all().map_err(err)
        }
        End::Corrupt { offset, .. } => Err(FormatError::Corrupt {
            path: path.to_owned(),
            offset,
        }
        .into()),
    }
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn create_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The log file, and what is known of it, shared by the writer thread and the appends written
/// in place (see [`LogStore::append`]). Locked only around a write, never around an fsync.
struct Out {
    file: File,
    /// The file's length.
    len: u64,
    /// Written since the last fsync.
    dirty: bool,
    /// Why the log stopped writing, once it has.
    failed: Option<String>,
}

impl Out {
    /// Appends `bytes`, unless the log has stopped writing; why not, if not.
    fn write(&mut self, bytes: &[u8], dir: &Path) -> Result<(), String> {
        if let Some(why) = &self.failed {
            return Err(why.clone());
        }
        if bytes.is_empty() {
            return Ok(());
        }
        match self.file.write_all(bytes) {
            Ok(()) => {
                self.dirty = true;
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => Err(self.fail(dir, "write", &e)),
        }
    }

    /// The log stops writing: says why, and returns it.
    fn fail(&mut self, dir: &Path, op: &str, e: &io::Error) -> String {
        let why = format!(
            "the Raft log cannot {op} {}: {e}; this node stops taking part until it is restarted",
            dir.join(LOG_FILE).display()
        );
        tracing::error!(error = %e, op, "Raft log {op} failed: the node stops");
        self.failed = Some(why.clone());
        why
    }
}

/// The one thread that writes the log file, but for the appends written in place.
struct Writer {
    shared: Arc<Shared>,
    /// A second handle on the file, to fsync it without holding [`Shared::out`].
    sync_file: File,
    last_sync: Instant,
    /// Where a pass joins its writes, kept between passes so a busy log does not grow a new
    /// buffer for each.
    joined: Vec<u8>,
    /// The synced bytes leave the page cache: entries are read from memory, the file only at
    /// start-up.
    behind: Behind,
    _lock: File,
}

/// The most a kept [`Writer::joined`] buffer holds on to between passes.
const KEEP_JOINED_BYTES: usize = 4 << 20;

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        let mut batch = Vec::new();
        loop {
            let dirty = lock(&self.shared.out).dirty;
            let first = if self.shared.options.fsync == FsyncPolicy::Everysec && dirty {
                let wait = Duration::from_secs(1).saturating_sub(self.last_sync.elapsed());
                match rx.recv_timeout(wait) {
                    Ok(op) => Some(op),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return self.finish(),
                }
            } else {
                match rx.recv() {
                    Ok(op) => Some(op),
                    Err(_) => return self.finish(),
                }
            };
            batch.extend(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            if self.pass(&mut batch) {
                return;
            }
        }
    }

    /// Writes one batch and answers it; true once closed.
    fn pass(&mut self, batch: &mut Vec<Op>) -> bool {
        // A lone write goes to the file as it came; several are joined into one write.
        let mut lone = None;
        let mut bytes = std::mem::take(&mut self.joined);
        bytes.clear();
        let mut dones = Vec::new();
        let mut sync = false;
        let mut close = None;
        let mut taken = 0;
        let shared = self.shared.clone();
        let mut out = lock(&shared.out);
        for op in batch.drain(..) {
            match op {
                Op::Write {
                    bytes: b,
                    sync: s,
                    done,
                } => {
                    taken += 1;
                    match lone.take() {
                        None if bytes.is_empty() => lone = Some(b),
                        None => bytes.extend_from_slice(&b),
                        Some(first) => {
                            bytes.extend_from_slice(&first);
                            bytes.extend_from_slice(&b);
                        }
                    }
                    sync |= s
                        || (self.shared.options.fsync == FsyncPolicy::Always
                            && !matches!(done, Done::Nothing));
                    dones.push(done);
                }
                Op::Compact { image } => {
                    taken += 1;
                    // The image is the state after every request before it: what they would
                    // have written is in it.
                    bytes.clear();
                    lone = None;
                    if out.failed.is_none() {
                        if let Err(e) = self.compact(&mut out, &image) {
                            out.fail(&self.shared.dir, "rewrite", &e);
                        }
                    }
                }
                Op::Nudge => {}
                Op::Close(reply) => {
                    close = Some(reply);
                    sync = true;
                    break;
                }
            }
        }
        let _ = out.write(lone.as_deref().unwrap_or(&bytes), &self.shared.dir);
        // Everything queued before is in the file: appends may be written in place again.
        self.shared.queued.fetch_sub(taken, Ordering::SeqCst);
        if bytes.capacity() <= KEEP_JOINED_BYTES {
            self.joined = bytes;
        }
        let due = self.shared.options.fsync == FsyncPolicy::Everysec
            && self.last_sync.elapsed() >= Duration::from_secs(1);
        let fsync = out.failed.is_none() && out.dirty && (sync || due);
        if fsync {
            out.dirty = false;
        }
        let len = out.len;
        drop(out);
        if fsync {
            match self.sync_file.sync_data() {
                Ok(()) => {
                    self.last_sync = Instant::now();
                    self.behind.synced(&self.sync_file, len);
                }
                Err(e) => {
                    lock(&self.shared.out).fail(&self.shared.dir, "fsync", &e);
                }
            }
        }
        let failed = lock(&self.shared.out).failed.clone();
        let result = match &failed {
            None => Ok(()),
            Some(why) => Err(why.as_str()),
        };
        for done in dones {
            done.finish(result);
        }
        match close {
            Some(reply) => {
                let _ = reply.send(());
                true
            }
            None => false,
        }
    }

    fn compact(&mut self, out: &mut Out, image: &[u8]) -> io::Result<()> {
        let tmp = self.shared.dir.join(LOG_TMP);
        let mut f = create_file(&tmp)?;
        f.write_all(image)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.shared.dir.join(LOG_FILE))?;
        sync_dir(&self.shared.dir)?;
        out.file = OpenOptions::new()
            .append(true)
            .open(self.shared.dir.join(LOG_FILE))?;
        self.sync_file = out.file.try_clone()?;
        out.dirty = false;
        out.len = image.len() as u64;
        self.behind.replaced(&self.sync_file, out.len);
        Ok(())
    }

    fn finish(self) {
        let mut out = lock(&self.shared.out);
        if out.dirty && out.failed.is_none() {
            let _ = out.file.sync_data();
            out.dirty = false;
        }
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<pb::Entry>, io::Error> {
        let mem = lock(&self.shared.mem);
        Ok(mem
            .entries
            .range(range)
            .map(|(_, k)| k.entry.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> Result<Option<pb::Vote>, io::Error> {
        Ok(lock(&self.shared.mem).vote)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<pb::Entry>, io::Error> {
        self.get_log_reader().await.try_get_log_entries(range).await
    }

    async fn read_vote(&mut self) -> Result<Option<pb::Vote>, io::Error> {
        Ok(lock(&self.shared.mem).vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let mem = lock(&self.shared.mem);
        Ok(LogState {
            last_purged_log_id: mem.purged,
            last_log_id: mem.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        LogReader {
            shared: self.shared.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &pb::Vote) -> Result<(), io::Error> {
        let mut bytes = Vec::new();
        push(&mut bytes, Rec::Vote(*vote));
        let rx = {
            let mut mem = lock(&self.shared.mem);
            mem.vote = Some(*vote);
            self.queue_reply(mem, bytes, true)?
        };
        written(rx).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let Some(id) = committed else {
            return Ok(());
        };
        let mut mem = lock(&self.shared.mem);
        mem.committed = Some(id);
        // Nothing waits for it (a committed ID lost only means more is applied again at the
        // next start), so it rides with the next request: an append, as a rule.
        let before = mem.unsent.len();
        push(&mut mem.unsent, Rec::Committed(id.into()));
        mem.file_bytes += (mem.unsent.len() - before) as u64;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(lock(&self.shared.mem).committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = pb::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<pb::Entry> = entries.into_iter().collect();
        // A frame's header and the entry's field key and length: at most 8 + 1 + 10 bytes.
        let mut bytes = Vec::with_capacity(entries.iter().map(|e| e.encoded_len() + 19).sum());
        for e in &entries {
            push_entry(&mut bytes, e);
        }
        let mut mem = lock(&self.shared.mem);
        for e in entries {
            mem.insert(e);
        }
        if !self.shared.in_place() {
            return self.queue(mem, bytes, false, Done::Flushed(callback));
        }
        // Written here, the entries are as durable as `everysec` and `no` make them (in the
        // page cache; the writer fsyncs within the second) without a hand-off to the writer
        // thread and back.
        let bytes = mem.outgoing(bytes);
        let result = self.shared.write_in_place(&bytes);
        drop(mem);
        callback.io_completed(result.map_err(io::Error::other));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let mut bytes = Vec::new();
        let rec = Rec::TruncateAfter(pb::TruncateAfter {
            last_kept: last_log_id.map(Into::into),
        });
        push(&mut bytes, rec.clone());
        let rx = {
            let mut mem = lock(&self.shared.mem);
            mem.apply(rec).map_err(io::Error::other)?;
            self.queue_reply(mem, bytes, false)?
        };
        written(rx).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let mut bytes = Vec::new();
        let rec = Rec::Purge(log_id.into());
        push(&mut bytes, rec.clone());
        let rx = {
            let mut mem = lock(&self.shared.mem);
            mem.apply(rec).map_err(io::Error::other)?;
            let after = mem.file_bytes + bytes.len() as u64;
            let compact = after >= self.shared.options.compact_at_bytes
                && after > 2 * (mem.live_bytes() + format::HEADER_BYTES + 256);
            if compact {
                let image = mem.image();
                tracing::info!(
                    from_bytes = after,
                    to_bytes = image.len(),
                    "rewriting the Raft log without its purged entries"
                );
                // The image holds the committed ID too.
                mem.unsent.clear();
                mem.file_bytes = image.len() as u64;
                self.shared.send(Op::Compact { image })?;
                // Answered once the rewrite is done: it is ahead in the queue.
                self.queue_reply(mem, Vec::new(), false)?
            } else {
                self.queue_reply(mem, bytes, false)?
            }
        };
        written(rx).await
    }
}

#[cfg(test)]
mod tests;
