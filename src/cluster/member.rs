//! This node as the daemon runs it in a group: the edge's view of the node ([`Group`],
//! [`Leadership`]) and the node's background work.
//!
//! - **Touches.** A sliding read on the leader moves the last-access time in its memory; the
//!   store reports a `Touch` through the same quarter-window throttle the single-node log
//!   uses, and [`TouchSink`] queues it. [`touches`] proposes the queue in batches, so the
//!   replicas' idle deadlines trail the leader's by at most a quarter of the idle window:
//!   after an unplanned failover a session can expire that much earlier, never later. A full
//!   queue drops a touch with the same bound. At shutdown the queue is flushed before the
//!   node hands its leadership over, so a planned restart loses no touch.
//! - **Expiry.** [`reaper`] runs on every node so each node's expiry wheel stays bounded,
//!   but only the leader proposes the `End`s it plans: expiry is the leader's decision,
//!   replicated as records, never a lease that a leader change resets.
//! - **Readiness.** [`readiness`] reports ready while the node knows a leader.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;
use tokio::sync::{mpsc, watch};
use tonic::Status;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::node::ClusterNode;
use crate::api::forward::{Leadership, Route};
use crate::api::group::Pending;
use crate::api::Group;
use crate::persist::snapshot_due;
use crate::proto::SERVICE_NAME;
use crate::session::{Millis, SessionKey};
use crate::store::events::{Event, EventSink};
use crate::store::{Applied, Effect, Store};
use crate::ticker::Ticker;

/// Touches waiting to be proposed; past it, a touch is dropped (see the module docs).
const TOUCH_QUEUE: usize = 64 * 1024;

/// The most touches proposed as one entry.
const TOUCH_BATCH: usize = 1024;

/// A node of a group, as the edge uses it.
pub struct Member {
    node: Arc<ClusterNode>,
    /// Where clients reach this node (`host:port`).
    client_addr: Arc<str>,
}

impl Member {
    /// The edge's view of `node`, which clients reach at `client_addr` (`host:port`).
    pub fn new(node: Arc<ClusterNode>, client_addr: &str) -> Self {
        Member {
            node,
            client_addr: client_addr.into(),
        }
    }

    /// The node.
    pub fn node(&self) -> &Arc<ClusterNode> {
        &self.node
    }
}

#[tonic::async_trait]
impl Group for Member {
    async fn propose(&self, effects: Vec<Effect>) -> Result<Vec<Applied>, Status> {
        Ok(self.node.propose(effects).await?.0)
    }

    async fn submit(&self, effects: Vec<Effect>) -> Result<Pending, Status> {
        let pending = self.node.submit(effects).await?;
        Ok(Box::pin(async move { Ok(pending.await?.0) }))
    }

    async fn lease_read(&self) -> Result<(), Status> {
        Ok(self.node.lease_read().await?)
    }

    fn lease_holds(&self) -> bool {
        self.node.lease_holds()
    }
}

impl Leadership for Member {
    fn route(&self) -> Route {
        let metrics = self.node.metrics();
        let m = metrics.borrow_watched();
        if m.state == ServerState::Leader {
            return Route::Here(self.client_addr.clone());
        }
        let Some(leader) = m.current_leader else {
            return Route::NoLeader;
        };
        match m.membership_config.get_node(&leader) {
            Some(n) if !n.peer_addr.is_empty() => Route::Leader {
                peer_addr: n.peer_addr.clone(),
                client_addr: n.client_addr.clone(),
            },
            _ => Route::NoLeader,
        }
    }

    fn dial(&self, peer_addr: &str) -> Result<tonic::transport::Channel, String> {
        self.node.dialer().channel(peer_addr)
    }
}

/// The store's sink for a member: queues the touches its sliding reads report.
pub struct TouchSink(mpsc::Sender<(SessionKey, Millis)>);

/// The queue behind a [`TouchSink`], for [`touches`].
pub struct TouchQueue(mpsc::Receiver<(SessionKey, Millis)>);

/// A sink and the queue it fills.
pub fn touch_queue() -> (TouchSink, TouchQueue) {
    let (tx, rx) = mpsc::channel(TOUCH_QUEUE);
    (TouchSink(tx), TouchQueue(rx))
}

impl EventSink for TouchSink {
    fn record(&self, event: &Event<'_>) {
        if let Effect::Touch { key, at } = event.effect {
            // Full: dropped, within the bound the module docs give.
            let _ = self.0.try_send((*key, *at));
        }
    }
}

/// Proposes queued touches while this node leads, until `stop`; then flushes what is queued
/// (the caller hands leadership over only after this returns).
pub async fn touches(
    node: Arc<ClusterNode>,
    mut queue: TouchQueue,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(TOUCH_BATCH);
    loop {
        let first = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            t = queue.0.recv() => t,
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < TOUCH_BATCH {
            match queue.0.try_recv() {
                Ok(t) => batch.push(t),
                Err(_) => break,
            }
        }
        propose_touches(&node, &mut batch).await;
    }
    // Flush: what the reads reported before the drain must reach the replicas.
    queue.0.close();
    while let Some(t) = queue.0.recv().await {
        batch.push(t);
        if batch.len() >= TOUCH_BATCH {
            propose_touches(&node, &mut batch).await;
        }
    }
    propose_touches(&node, &mut batch).await;
}

async fn propose_touches(node: &ClusterNode, batch: &mut Vec<(SessionKey, Millis)>) {
    if batch.is_empty() {
        return;
    }
    let effects = batch
        .drain(..)
        .map(|(key, at)| Effect::Touch { key, at })
        .collect();
    if let Err(e) = node.propose(effects).await {
        // Not the leader any more: the new leader's deadlines are at most a quarter window
        // behind, as the module docs say.
        tracing::debug!(error = %e, "touches not proposed");
    }
}

/// Plans expiry on every node each `interval`, in batches of `batch`; the leader proposes
/// the `End`s. Runs until `stop`.
pub async fn reaper(
    node: Arc<ClusterNode>,
    store: Store,
    interval: Duration,
    batch: usize,
    stop: watch::Receiver<bool>,
) {
    let mut ticker = Ticker::new(interval, stop);
    while ticker.tick().await {
        loop {
            let ends = store.plan_reap(batch);
            let full = ends.len() >= batch;
            if ends.is_empty() || !leads(&node) {
                break;
            }
            if let Err(e) = node.propose(ends).await {
                tracing::debug!(error = %e, "expiry not proposed");
                break;
            }
            if !full || ticker.stopping() {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}

/// How often [`snapshots`] weighs the log.
const SNAPSHOT_CHECK: Duration = Duration::from_secs(1);

/// Snapshots this node's applied state once the log since its last snapshot calls for it, by
/// the single node's rule (`snapshot_log_bytes`, or `snapshot_log_percent` of the last
/// snapshot's size if that is larger: see [`snapshot_due`]), and at least every `interval`
/// while entries come in. Every member snapshots on its own, as Raft has it: a snapshot
/// replaces the log it covers, which is then purged. A snapshot writes the whole state, so a
/// fixed count of entries would rewrite a large store for every small slice of log; by size,
/// the work stays in proportion to the writes. Runs until `stop`.
pub async fn snapshots(
    node: &ClusterNode,
    min_bytes: u64,
    percent: u64,
    interval: Duration,
    stop: watch::Receiver<bool>,
) {
    let mut ticker = Ticker::new(SNAPSHOT_CHECK, stop);
    let mut last = Instant::now();
    while ticker.tick().await {
        let log = node.log_since_snapshot();
        let due = snapshot_due(log, node.snapshot_bytes(), min_bytes, percent)
            || (log > 0 && last.elapsed() >= interval);
        if !due {
            continue;
        }
        // openraft builds one snapshot at a time: a trigger while one is built is ignored.
        match node.snapshot_now().await {
            Ok(()) => last = Instant::now(),
            Err(e) => tracing::warn!(error = %e, "snapshot not started"),
        }
    }
}

/// Whether this node leads now.
fn leads(node: &ClusterNode) -> bool {
    node.metrics().borrow_watched().state == ServerState::Leader
}

/// Keeps `/readyz` and gRPC health in step with the group: serving while this node knows a
/// leader (a follower that knows one can forward; one that does not can serve nothing).
/// Runs until aborted (shutdown reports not serving itself).
pub async fn readiness(node: Arc<ClusterNode>, ready: Arc<AtomicBool>, health: HealthReporter) {
    let mut metrics = node.metrics();
    let mut last = None;
    loop {
        let now = metrics.borrow_watched().current_leader.is_some();
        if last != Some(now) {
            ready.store(now, Ordering::Release);
            let status = match now {
                true => ServingStatus::Serving,
                false => ServingStatus::NotServing,
            };
            health.set_service_status("", status).await;
            health.set_service_status(SERVICE_NAME, status).await;
            tracing::info!(ready = now, "cluster readiness");
            last = Some(now);
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
