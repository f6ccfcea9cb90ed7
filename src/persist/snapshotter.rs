//! The background task that takes a tenant's snapshots: it decides when one is due and runs
//! each on a thread of its own at the lowest CPU priority, so a snapshot never holds an async
//! thread and never takes a core from serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::log::Log;
use super::{newest_snapshot_bytes, snapshot, snapshot_due};
use crate::observe::SnapshotMetrics;
use crate::store::Store;
use crate::ticker::Ticker;

/// How often the task looks at the log to see whether a snapshot is due.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Takes a snapshot when the log since the last one is due (see [`snapshot_due`]) or `every`
/// has passed with changes, one at a time, off the async threads; stops when `stop` turns
/// true. While the log cannot write it waits: a snapshot starts by rotating the log, and the
/// records the log keeps for its retries belong in the segment they were meant for.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    dir: PathBuf,
    log: Arc<Log>,
    store: Store,
    min_bytes: u64,
    percent: u64,
    every: Duration,
    metrics: SnapshotMetrics,
    stop: watch::Receiver<bool>,
) {
    let mut ticker = Ticker::new(CHECK_EVERY, stop);
    let mut last = Instant::now();
    let mut appended_at_last = log.appended();
    let mut last_bytes = newest_snapshot_bytes(&dir);
    while ticker.tick().await {
        metrics.age.set(last.elapsed().as_secs_f64());
        let changed = log.appended() != appended_at_last;
        let due = snapshot_due(log.segment_bytes(), last_bytes, min_bytes, percent);
        if !(due || (changed && last.elapsed() >= every)) || log.writable().is_err() {
            continue;
        }
        let (dir, log2, store) = (dir.clone(), log.clone(), store.clone());
        let started = Instant::now();
        appended_at_last = log.appended();
        match in_background(move || snapshot(&dir, &log2, &store)).await {
            Ok(Ok(s)) => {
                metrics.written.increment(1);
                last = Instant::now();
                last_bytes = s.bytes;
                tracing::info!(
                    seq = s.seq,
                    sessions = s.sessions,
                    bytes = s.bytes,
                    took_ms = started.elapsed().as_millis() as u64,
                    "snapshot written"
                );
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "snapshot failed; the log keeps growing until one succeeds")
            }
            Err(e) => tracing::error!(error = %e, "snapshot task failed"),
        }
    }
}

/// Runs `work` (a snapshot) on a thread of its own at the lowest CPU priority, off the async
/// threads; its result, or why it has none (the thread could not start, or panicked).
pub(crate) async fn in_background<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("sessiond-snapshot".into())
        .spawn(move || {
            lower_priority();
            let _ = done.send(work());
        })
        .map_err(|e| format!("cannot start a snapshot thread: {e}"))?;
    result
        .await
        .map_err(|_| "the snapshot thread panicked".to_string())
}

/// Lowers the calling thread's scheduling priority to the lowest, for background work that
/// must not take the cores from serving: a snapshot of a large store encodes for seconds.
///
/// On Linux the thread runs under `SCHED_IDLE`: any thread of normal priority that wakes up
/// preempts it at once. At nice 19 (the fallback) it keeps a small share, but once the
/// scheduler picks it, a request can wait out its time slice, milliseconds on a busy machine.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let idle = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler reads the parameter struct, which outlives the call; pid
        // 0 is the calling thread.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) } == 0 {
            return;
        }
        // On Linux, PRIO_PROCESS with a thread ID sets that one thread's nice value.
        if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19) {
            tracing::debug!(error = %e, "cannot lower the snapshot thread's priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_background_snapshot_runs_at_idle_priority_and_serving_threads_do_not() {
        // SAFETY: sched_getscheduler only reads the calling thread's policy.
        let policy = || unsafe { libc::sched_getscheduler(0) };
        let background = in_background(policy).await.expect("the thread ran");
        assert_eq!(background, libc::SCHED_IDLE, "the snapshot thread's policy");
        assert_ne!(
            policy(),
            libc::SCHED_IDLE,
            "the caller's own policy was changed"
        );
    }
}
