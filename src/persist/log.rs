//! The append-only log: an event sink that frames each record into a shared buffer, and one
//! flusher thread that writes the buffer to the current segment and fsyncs it under the
//! configured policy.
//!
//! Group commit falls out of the shape: while the flusher is inside one fsync, every writer
//! that arrives appends to the buffer, and the next pass writes and syncs all of them at
//! once. With `fsync = always`, a handler waits until the durable sequence number reaches
//! the one its record got, so no reply leaves before its record is on disk.
//!
//! # When the disk fails
//!
//! As Redis does with its AOF, a failed write or fsync never switches durability off and is
//! never acknowledged. The flusher keeps every byte after the last point it knows is safe
//! (fsynced under `always` and `everysec`, written under `no`): the batch that failed, the
//! written but unsynced bytes before it, and every record appended since. It marks the log
//! not writable, so the Store refuses every write with `UNAVAILABLE` (see
//! [`EventSink::accepting`]) while reads go on, and it tells the waiters of `always` that
//! their records failed. Then it retries with backoff: each try cuts the segment back to the
//! last whole record written (dropping a partial one), writes the kept bytes again from the
//! safe point on, and fsyncs. Writing again what was written already matters after a failed
//! fsync, which may have dropped those pages; it writes the same bytes at the same offsets,
//! so a try that fails half-way leaves the file no worse than it was, and a crash meanwhile
//! loses no more than it would have.
//!
//! A successful retry makes the durable state whole again without a restart or a snapshot:
//! every change that reached memory emitted its record into the buffer while it held the
//! session's lock, in the order the changes happened, and nothing was dropped from the
//! buffer, so the segment then holds every change, in order, as if the disk had never failed.
//! This holds for the changes that were refused too: a refused write changes nothing. The
//! changes that do reach memory while the log fails are the reaper's ends and the touches of
//! reads, and their records wait in the buffer like the others.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::cache::Behind;
use super::format::{frame, write_header, LOG_MAGIC};
use super::records;
use crate::lock;
use crate::observe::LogMetrics;
use crate::store::events::{Event, EventSink, Refused};

/// When the log is fsynced: Redis's `appendfsync` policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Before every reply: a crash loses nothing acknowledged.
    Always,
    /// Once a second: a crash loses at most about the last second.
    Everysec,
    /// Never explicitly: the OS writes back when it likes (typically within 30 s).
    No,
}

/// How far the log is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Durable {
    /// Records up to this sequence number are written (and fsynced, under `always`). While
    /// the log fails, this stays at the last record really on disk.
    pub seq: u64,
    /// The last write or fsync failed: records after `seq` wait for a retry to succeed.
    pub failed: bool,
}

/// The file name of log segment `seq`.
pub fn segment_name(seq: u64) -> String {
    format!("log-{seq:016}.sdl")
}

struct Buffer {
    bytes: Vec<u8>,
    seq: u64,
    rotate: Option<mpsc::Sender<io::Result<u64>>>,
    stop: bool,
    /// The flusher is blocked waiting for a record, so the next one must wake it. While it
    /// is busy, or pausing between writes, appends only fill the buffer: waking a thread
    /// costs a system call, which once per record would cost more than the record.
    idle: bool,
}

struct Shared {
    buffer: Mutex<Buffer>,
    wake: Condvar,
    appended: AtomicU64,
    segment_bytes: AtomicU64,
    durable: watch::Sender<Durable>,
    /// False while the log fails, and once it is closed: the Store then refuses writes.
    writable: AtomicBool,
    /// Why writes are refused, while `writable` is false.
    refusal: Mutex<String>,
}

impl Shared {
    fn refuse(&self, why: String) {
        *lock(&self.refusal) = why;
        self.writable.store(false, Ordering::Release);
    }
}

/// The log writer. Cheap to share; `close` flushes and stops it.
pub struct Log {
    shared: Arc<Shared>,
    policy: FsyncPolicy,
    flusher: Mutex<Option<JoinHandle<()>>>,
    /// One rotation at a time: the buffer holds one reply channel, so a second caller (a
    /// snapshot beside a DestroyAllSessions) would take the first one's answer away.
    rotating: Mutex<()>,
}

impl Log {
    /// Starts a new segment `seq` in `dir` and the flusher thread.
    pub fn start(
        dir: &Path,
        seq: u64,
        policy: FsyncPolicy,
        metrics: LogMetrics,
    ) -> io::Result<Log> {
        let (file, bytes) = create_segment(dir, seq)?;
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Buffer {
                bytes: Vec::with_capacity(64 * 1024),
                seq: 0,
                rotate: None,
                stop: false,
                idle: false,
            }),
            wake: Condvar::new(),
            appended: AtomicU64::new(0),
            segment_bytes: AtomicU64::new(bytes),
            durable: watch::Sender::new(Durable {
                seq: 0,
                failed: false,
            }),
            writable: AtomicBool::new(true),
            refusal: Mutex::new(String::new()),
        });
        metrics.writable.set(1.0);
        let flusher = Flusher {
            shared: shared.clone(),
            dir: dir.to_owned(),
            seq,
            file,
            policy,
            metrics,
            safe_len: bytes,
            safe_seq: 0,
            kept: Vec::with_capacity(64 * 1024),
            kept_written: 0,
            written_seq: 0,
            dirty: false,
            failing: None,
            behind: Behind::default(),
        };
        let handle = std::thread::Builder::new()
            .name("sessiond-log".into())
            .spawn(move || flusher.run())?;
        Ok(Log {
            shared,
            policy,
            flusher: Mutex::new(Some(handle)),
            rotating: Mutex::new(()),
        })
    }

    /// The fsync policy.
    pub fn policy(&self) -> FsyncPolicy {
        self.policy
    }

    /// The sequence number of the last record appended so far.
    pub fn appended(&self) -> u64 {
        self.shared.appended.load(Ordering::Acquire)
    }

    /// Bytes in the current segment (written so far).
    pub(crate) fn segment_bytes(&self) -> u64 {
        self.shared.segment_bytes.load(Ordering::Relaxed)
    }

    /// `Ok` while the log writes; otherwise why not (the file and OS error, or shutdown).
    pub(crate) fn writable(&self) -> Result<(), Refused> {
        if self.shared.writable.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(Refused(lock(&self.shared.refusal).clone()))
        }
    }

    /// Waits until record `seq` is durable. `Err` if the log failed before it got there.
    pub(crate) async fn wait_durable(&self, seq: u64) -> Result<(), LogFailed> {
        let mut rx = self.shared.durable.subscribe();
        // `seq` is only ever published as far as the disk really is, failed or not, so
        // reaching it is the one way to succeed; a failure short of it fails at once.
        let reached = match rx.wait_for(|d| d.seq >= seq || d.failed).await {
            Ok(d) => d.seq >= seq,
            Err(_) => false,
        };
        if reached {
            Ok(())
        } else {
            Err(LogFailed)
        }
    }

    /// Starts a new segment; returns its number. Every record appended before this call is
    /// in an older segment, so a snapshot begun after it holds all of their effects. Fails
    /// while the log cannot write.
    pub(crate) fn rotate(&self) -> io::Result<u64> {
        let _one = lock(&self.rotating);
        let (tx, rx) = mpsc::channel();
        {
            let mut b = lock(&self.shared.buffer);
            if b.stop {
                // The flusher has stopped or is stopping: nobody would answer.
                return Err(io::Error::other("the log is closed"));
            }
            b.rotate = Some(tx);
        }
        self.shared.wake.notify_one();
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::other("the log flusher stopped")))
    }

    /// Refuses further writes, writes and fsyncs everything appended, then stops the flusher.
    pub fn close(&self) {
        self.shared
            .refuse("sessiond is shutting down: the durable log is closed".into());
        lock(&self.shared.buffer).stop = true;
        self.shared.wake.notify_one();
        if let Some(handle) = lock(&self.flusher).take() {
            let _ = handle.join();
        }
    }
}

/// The log cannot make records durable any more (a write or fsync failed).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the durable log could not write this change: it is applied in memory and is logged if the disk recovers, but it may not survive a restart")]
pub(crate) struct LogFailed;

impl EventSink for Arc<Log> {
    fn record(&self, event: &Event<'_>) {
        let payload = records::encode(event.effect);
        let mut b = lock(&self.shared.buffer);
        frame(&payload, &mut b.bytes);
        b.seq += 1;
        self.shared.appended.store(b.seq, Ordering::Release);
        let wake = std::mem::take(&mut b.idle) || b.bytes.len() >= WAKE_AT_BYTES;
        drop(b);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    fn accepting(&self) -> Result<(), Refused> {
        self.writable()
    }
}

/// Under `everysec` and `no`, how long the flusher gathers records after a write before it
/// writes again: one system call per pause instead of one per record. This bounds how much
/// acknowledged work a crash of the process (not of the machine) can lose under those
/// policies. `always` does not pause: its writers are waiting for the disk.
const GATHER: Duration = Duration::from_millis(1);

/// A buffer this large wakes the flusher even while it pauses, so a burst stays bounded.
const WAKE_AT_BYTES: usize = 1 << 20;

/// Under `everysec`, this many written but unsynced bytes are fsynced before the second is
/// up. The flusher keeps a copy of them until they are synced (a failed fsync may have
/// dropped their pages), so this bounds that copy, and with it the memory the log holds
/// beyond the sessions; it also spreads a burst's writeback. 4 MiB is a few extra fsyncs a
/// second under a write burst, off the request path.
const SYNC_AT_BYTES: usize = 4 << 20;

/// After a sync, a kept copy whose buffer grew past this is given back to the allocator, so
/// one burst does not hold its peak for the daemon's life.
const KEEP_CAPACITY: usize = 2 * WAKE_AT_BYTES;

/// The first wait before retrying a failed write.
const RETRY_FIRST: Duration = Duration::from_millis(50);

/// The longest wait between retries; the wait doubles up to it.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Opens a new data file for writing, readable by its owner only: it holds sessions in the
/// clear, like the directory around it.
pub(crate) fn create_private(path: &Path, append: bool) -> io::Result<File> {
    OpenOptions::new()
        .create_new(true)
        .write(true)
        .append(append)
        .mode(0o600)
        .open(path)
}

fn create_segment(dir: &Path, seq: u64) -> io::Result<(File, u64)> {
    let path = dir.join(segment_name(seq));
    let mut file = create_private(&path, true)?;
    let mut header = Vec::new();
    write_header(&mut header, LOG_MAGIC)?;
    let written = file
        .write_all(&header)
        .and_then(|()| file.sync_all())
        .and_then(|()| sync_dir(dir));
    if let Err(e) = written {
        // Leave no half-made segment behind: a later rotation would find its name taken.
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok((file, header.len() as u64))
}

/// Makes a file's creation, rename or removal in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The log is failing: since when, and when to try again.
struct Failing {
    since: Instant,
    next_try: Instant,
    backoff: Duration,
}

struct Flusher {
    shared: Arc<Shared>,
    dir: PathBuf,
    seq: u64,
    file: File,
    policy: FsyncPolicy,
    metrics: LogMetrics,
    /// The segment's length up to which every byte is as safe as the policy makes it:
    /// fsynced (`always`, `everysec`) or written (`no`).
    safe_len: u64,
    /// The last record within `safe_len`.
    safe_seq: u64,
    /// Every byte after `safe_len`, written or not: what a retry writes again.
    kept: Vec<u8>,
    /// How much of `kept` is written to the file, in whole records.
    kept_written: usize,
    /// The last record written (within `safe_len + kept_written`).
    written_seq: u64,
    /// Written since the last fsync.
    dirty: bool,
    failing: Option<Failing>,
    /// The segment's synced bytes leave the page cache.
    behind: Behind,
}

impl Flusher {
    fn run(mut self) {
        let mut last_sync = Instant::now();
        let mut batch = Vec::with_capacity(64 * 1024);
        let mut pause = false;
        loop {
            let (upto, rotate, stop) = {
                let mut b = lock(&self.shared.buffer);
                if let Some(f) = &self.failing {
                    let wait = f.next_try.saturating_duration_since(Instant::now());
                    if !wait.is_zero() && b.rotate.is_none() && !b.stop {
                        b = self.wait(b, wait);
                    }
                } else {
                    if pause && b.rotate.is_none() && !b.stop && b.bytes.len() < WAKE_AT_BYTES {
                        b = self.wait(b, GATHER);
                    }
                    while b.bytes.is_empty() && b.rotate.is_none() && !b.stop {
                        let wait = match (self.policy, self.dirty) {
                            (FsyncPolicy::Everysec, true) => {
                                Duration::from_secs(1).saturating_sub(last_sync.elapsed())
                            }
                            _ => Duration::from_secs(1),
                        };
                        if wait.is_zero() {
                            break;
                        }
                        b.idle = true;
                        b = self.wait(b, wait);
                        b.idle = false;
                    }
                }
                std::mem::swap(&mut b.bytes, &mut batch);
                (b.seq, b.rotate.take(), b.stop)
            };
            // After a write, gather for a moment before the next; after an idle wait the
            // first record is written at once.
            pause = self.policy != FsyncPolicy::Always && !batch.is_empty();
            if self.kept.is_empty() {
                std::mem::swap(&mut self.kept, &mut batch);
            } else {
                self.kept.extend_from_slice(&batch);
                batch.clear();
            }

            if let Some(f) = &self.failing {
                if stop || rotate.is_some() || Instant::now() >= f.next_try {
                    self.retry(upto, stop);
                    if self.failing.is_none() {
                        last_sync = Instant::now();
                    }
                }
            } else {
                if self.kept_written < self.kept.len() {
                    match self.file.write_all(&self.kept[self.kept_written..]) {
                        Ok(()) => {
                            self.kept_written = self.kept.len();
                            self.written_seq = upto;
                            self.dirty = true;
                            if self.policy == FsyncPolicy::No {
                                self.settle();
                            }
                        }
                        Err(e) => self.fail("write", &e),
                    }
                }
                let sync_now = self.dirty
                    && (match self.policy {
                        FsyncPolicy::Always => true,
                        FsyncPolicy::Everysec => {
                            last_sync.elapsed() >= Duration::from_secs(1)
                                || self.kept_written >= SYNC_AT_BYTES
                        }
                        FsyncPolicy::No => false,
                    } || stop
                        || rotate.is_some());
                if sync_now && self.failing.is_none() {
                    let started = Instant::now();
                    match self.file.sync_data() {
                        Ok(()) => {
                            self.metrics.fsync.record(started.elapsed().as_secs_f64());
                            self.dirty = false;
                            self.settle();
                            self.behind.synced(&self.file, self.safe_len);
                            last_sync = Instant::now();
                        }
                        Err(e) => self.fail("fsync", &e),
                    }
                }
                self.publish_length();
                if self.failing.is_none() {
                    self.shared.durable.send_replace(Durable {
                        seq: self.written_seq,
                        failed: false,
                    });
                }
            }
            if let Some(reply) = rotate {
                let result = match &self.failing {
                    None => self.rotate(),
                    Some(_) => Err(io::Error::other(lock(&self.shared.refusal).clone())),
                };
                let _ = reply.send(result);
            }
            if stop {
                if self.failing.is_some() {
                    tracing::error!(
                        segment = %self.path().display(),
                        bytes = self.kept.len(),
                        records = upto - self.safe_seq,
                        "shutdown: the durable log still cannot write; these records are lost"
                    );
                }
                return;
            }
        }
    }

    /// Everything written is now as safe as the policy makes it: nothing to keep.
    fn settle(&mut self) {
        self.safe_len += self.kept_written as u64;
        self.safe_seq = self.written_seq;
        self.kept.drain(..self.kept_written);
        self.kept_written = 0;
        if self.kept.capacity() > KEEP_CAPACITY {
            self.kept.shrink_to(KEEP_CAPACITY);
        }
    }

    fn publish_length(&self) {
        let len = self.safe_len + self.kept_written as u64;
        self.shared.segment_bytes.store(len, Ordering::Relaxed);
        self.metrics.segment_bytes.set(len as f64);
    }

    fn path(&self) -> PathBuf {
        self.dir.join(segment_name(self.seq))
    }

    /// A write or fsync failed: refuse writes, fail the waiters short of the safe point,
    /// and schedule a retry. Says so once; retries that fail again only count.
    fn fail(&mut self, op: &str, e: &io::Error) {
        self.metrics.write_errors.increment(1);
        let now = Instant::now();
        let path = self.path();
        tracing::warn!(
            segment = %path.display(),
            error = %e,
            op,
            "durable log {op} failed: refusing writes until a retry succeeds"
        );
        self.shared.refuse(format!(
            "the durable log cannot {op} {}: {e}; writes are refused until it recovers",
            path.display()
        ));
        self.metrics.writable.set(0.0);
        self.failing = Some(Failing {
            since: now,
            next_try: now + RETRY_FIRST,
            backoff: RETRY_FIRST,
        });
        self.shared.durable.send_replace(Durable {
            seq: self.safe_seq,
            failed: true,
        });
    }

    /// One retry: cut the segment back to the last whole record written, write every kept
    /// byte from the safe point on (again, for those written before), fsync. At `stop` the
    /// log stays closed to writes even if the retry succeeds.
    fn retry(&mut self, upto: u64, stop: bool) {
        use std::os::unix::fs::FileExt;
        let whole = self.safe_len + self.kept_written as u64;
        let attempt = self.file.set_len(whole).and_then(|()| {
            // Positioned writes need a descriptor without O_APPEND.
            let f = OpenOptions::new().write(true).open(self.path())?;
            f.write_all_at(&self.kept, self.safe_len)?;
            f.sync_data()
        });
        let Some(f) = self.failing.as_mut() else {
            return;
        };
        match attempt {
            Ok(()) => {
                let failed_for = f.since.elapsed();
                self.failing = None;
                self.kept_written = self.kept.len();
                self.written_seq = upto;
                self.dirty = false;
                self.settle();
                self.publish_length();
                self.metrics.writable.set(1.0);
                if !stop {
                    self.shared.writable.store(true, Ordering::Release);
                }
                self.shared.durable.send_replace(Durable {
                    seq: upto,
                    failed: false,
                });
                tracing::warn!(
                    segment = %self.path().display(),
                    failed_for_ms = failed_for.as_millis() as u64,
                    "durable log recovered: every record is written; accepting writes again"
                );
            }
            Err(e) => {
                self.metrics.write_errors.increment(1);
                f.backoff = (f.backoff * 2).min(RETRY_MAX);
                f.next_try = Instant::now() + f.backoff;
                tracing::debug!(error = %e, "durable log retry failed");
            }
        }
    }

    /// Waits on the buffer's condition for at most `timeout`.
    fn wait<'a>(&self, b: MutexGuard<'a, Buffer>, timeout: Duration) -> MutexGuard<'a, Buffer> {
        self.shared
            .wake
            .wait_timeout(b, timeout)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
    }

    fn rotate(&mut self) -> io::Result<u64> {
        let (file, bytes) = create_segment(&self.dir, self.seq + 1)?;
        self.seq += 1;
        self.file = file;
        self.safe_len = bytes;
        self.behind = Behind::default();
        self.publish_length();
        Ok(self.seq)
    }
}
