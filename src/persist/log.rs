//! The append-only log: an event sink that frames each record into a shared buffer, and one
//! flusher thread that writes the buffer to the current segment and fsyncs it under the
//! configured policy.
//!
//! Group commit falls out of the shape: while the flusher is inside one fsync, every writer
//! that arrives appends to the buffer, and the next pass writes and syncs all of them at
//! once. With `fsync = always`, a handler waits until the durable sequence number reaches
//! the one its record got, so no reply leaves before its record is on disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metrics::{Gauge, Histogram};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::format::{frame, write_header, LOG_MAGIC};
use super::records;
use crate::store::events::{Event, EventSink};

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
pub struct Durable {
    /// Records up to this sequence number are written (and fsynced, under `always`).
    pub seq: u64,
    /// A write or fsync failed: nothing after `seq` will become durable.
    pub failed: bool,
}

/// The file name of log segment `seq`.
pub fn segment_name(seq: u64) -> String {
    format!("log-{seq:016}.sdl")
}

/// Metrics the log keeps.
pub struct LogMetrics {
    /// Bytes in the current segment.
    pub segment_bytes: Gauge,
    /// fsync latency.
    pub fsync: Histogram,
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
}

/// The log writer. Cheap to share; `close` flushes and stops it.
pub struct Log {
    shared: Arc<Shared>,
    policy: FsyncPolicy,
    flusher: Mutex<Option<JoinHandle<()>>>,
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
        });
        let flusher = Flusher {
            shared: shared.clone(),
            dir: dir.to_owned(),
            seq,
            file,
            policy,
            metrics,
        };
        let handle = std::thread::Builder::new()
            .name("sessiond-log".into())
            .spawn(move || flusher.run())?;
        Ok(Log {
            shared,
            policy,
            flusher: Mutex::new(Some(handle)),
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
    pub fn segment_bytes(&self) -> u64 {
        self.shared.segment_bytes.load(Ordering::Relaxed)
    }

    /// Waits until record `seq` is durable. `Err` if the log failed before it got there.
    pub async fn wait_durable(&self, seq: u64) -> Result<(), LogFailed> {
        let mut rx = self.shared.durable.subscribe();
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
    /// in an older segment, so a snapshot begun after it holds all of their effects.
    pub fn rotate(&self) -> io::Result<u64> {
        let (tx, rx) = mpsc::channel();
        {
            let mut b = lock(&self.shared.buffer);
            b.rotate = Some(tx);
        }
        self.shared.wake.notify_one();
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::other("the log flusher stopped")))
    }

    /// Writes and fsyncs everything appended, then stops the flusher.
    pub fn close(&self) {
        lock(&self.shared.buffer).stop = true;
        self.shared.wake.notify_one();
        if let Some(handle) = lock(&self.flusher).take() {
            let _ = handle.join();
        }
    }
}

/// The log cannot make records durable any more (a write or fsync failed).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the durable log failed; this write is applied in memory but may not survive a restart")]
pub struct LogFailed;

impl EventSink for Arc<Log> {
    fn record(&self, event: &Event<'_>) {
        let payload = records::encode(event);
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
}

/// Under `everysec` and `no`, how long the flusher gathers records after a write before it
/// writes again: one system call per pause instead of one per record. This bounds how much
/// acknowledged work a crash of the process (not of the machine) can lose under those
/// policies. `always` does not pause: its writers are waiting for the disk.
const GATHER: Duration = Duration::from_millis(1);

/// A buffer this large wakes the flusher even while it pauses, so a burst stays bounded.
const WAKE_AT_BYTES: usize = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn create_segment(dir: &Path, seq: u64) -> io::Result<(File, u64)> {
    let path = dir.join(segment_name(seq));
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)?;
    let mut header = Vec::new();
    write_header(&mut header, LOG_MAGIC)?;
    file.write_all(&header)?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok((file, header.len() as u64))
}

/// Makes a file's creation, rename or removal in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

struct Flusher {
    shared: Arc<Shared>,
    dir: PathBuf,
    seq: u64,
    file: File,
    policy: FsyncPolicy,
    metrics: LogMetrics,
}

impl Flusher {
    fn run(mut self) {
        let mut last_sync = Instant::now();
        let mut dirty = false;
        let mut failed = false;
        let mut batch = Vec::with_capacity(64 * 1024);
        let mut pause = false;
        loop {
            let (upto, rotate, stop) = {
                let mut b = lock(&self.shared.buffer);
                if pause && b.rotate.is_none() && !b.stop && b.bytes.len() < WAKE_AT_BYTES {
                    b = self.wait(b, GATHER);
                }
                while b.bytes.is_empty() && b.rotate.is_none() && !b.stop {
                    let wait = match (self.policy, dirty) {
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
                std::mem::swap(&mut b.bytes, &mut batch);
                (b.seq, b.rotate.take(), b.stop)
            };
            // After a write, gather for a moment before the next; after an idle wait the
            // first record is written at once.
            pause = self.policy != FsyncPolicy::Always && !batch.is_empty();
            if !batch.is_empty() && !failed {
                match self.file.write_all(&batch) {
                    Ok(()) => {
                        dirty = true;
                        let n = self
                            .shared
                            .segment_bytes
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        self.metrics
                            .segment_bytes
                            .set((n + batch.len() as u64) as f64);
                    }
                    Err(e) => failed = self.fail("write", &e),
                }
            }
            batch.clear();
            let sync_now = match self.policy {
                FsyncPolicy::Always => dirty,
                FsyncPolicy::Everysec => dirty && last_sync.elapsed() >= Duration::from_secs(1),
                FsyncPolicy::No => false,
            } || ((stop || rotate.is_some()) && dirty);
            if sync_now && !failed {
                let started = Instant::now();
                match self.file.sync_data() {
                    Ok(()) => {
                        self.metrics.fsync.record(started.elapsed().as_secs_f64());
                        dirty = false;
                        last_sync = Instant::now();
                    }
                    Err(e) => failed = self.fail("fsync", &e),
                }
            }
            self.shared
                .durable
                .send_replace(Durable { seq: upto, failed });
            if let Some(reply) = rotate {
                let _ = reply.send(self.rotate());
            }
            if stop {
                return;
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
        self.shared.segment_bytes.store(bytes, Ordering::Relaxed);
        self.metrics.segment_bytes.set(bytes as f64);
        Ok(self.seq)
    }

    fn fail(&self, what: &str, e: &io::Error) -> bool {
        tracing::error!(error = %e, segment = %segment_name(self.seq), "durable log {what} failed; further writes are not durable");
        true
    }
}
