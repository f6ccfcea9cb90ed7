//! Everything an operator watches: every metric name (declared here and nowhere else), the
//! Prometheus rendering, and the bundles of handles that keep the numbers moving: one per
//! tenant ([`TenantMetrics`], whose parts are the store's event sink, the log's, the
//! snapshot task's, the reaper's and the guess watch's), the gRPC port's
//! ([`ConnMetrics`]) and the cluster node's ([`ClusterMetrics`]). Telemetry builds every
//! bundle; their owners only record.
//!
//! Counters are registered once, at start-up, into handles that are plain atomics, so
//! updating one on the hot path takes no lock and allocates nothing. Gauges that mirror the
//! Store's own counters (sessions, bytes, users) are read from it at scrape time instead, and
//! so are the cluster's series whose label values come and go (the leader, each follower's
//! lag): the registry cannot forget a series, so those are written into each scrape.

mod cluster_metrics;
pub(crate) mod grpc;
mod tenant_metrics;

/// The tools' reader of Prometheus samples (the same file), for the daemon's unit tests.
#[cfg(test)]
#[path = "../../tools/src/exposition.rs"]
pub(crate) mod exposition;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics::{Counter, Gauge, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

pub use self::cluster_metrics::Role;
pub(crate) use self::cluster_metrics::{ClusterMetrics, ClusterView, ProposalResult};
pub use self::tenant_metrics::{GuessMetrics, LogMetrics};
pub(crate) use self::tenant_metrics::{ReaperMetrics, SnapshotMetrics};
use crate::store::Stats;

/// Metric names, with their help text and unit. The one list: code refers to these consts.
pub(crate) mod names {
    /// Live sessions in memory.
    pub(crate) const SESSIONS_ACTIVE: &str = "sessiond_sessions_active";
    /// Sessions created.
    pub(crate) const SESSIONS_CREATED: &str = "sessiond_sessions_created_total";
    /// Sessions ended by Destroy, DestroyUserSessions or DestroyAllSessions.
    pub(crate) const SESSIONS_DESTROYED: &str = "sessiond_sessions_destroyed_total";
    /// Sessions that reached their deadline.
    pub(crate) const SESSIONS_EXPIRED: &str = "sessiond_sessions_expired_total";
    /// Sessions moved to a fresh ID.
    pub(crate) const SESSIONS_REGENERATED: &str = "sessiond_sessions_regenerated_total";
    /// Sessions pushed out to make room.
    pub(crate) const SESSIONS_EVICTED: &str = "sessiond_sessions_evicted_total";
    /// Sessions updated.
    pub(crate) const SESSIONS_UPDATED: &str = "sessiond_sessions_updated_total";
    /// How long sessions lived, recorded when they end.
    pub(crate) const SESSION_LIFETIME: &str = "sessiond_session_lifetime_seconds";
    /// Approximate bytes held by sessions.
    pub(crate) const SESSION_BYTES: &str = "sessiond_session_bytes";
    /// Users with at least one session.
    pub(crate) const USERS: &str = "sessiond_users_with_sessions";
    /// gRPC requests by method and status code.
    pub(crate) const GRPC_REQUESTS: &str = "sessiond_grpc_requests_total";
    /// gRPC request latency by method.
    pub(crate) const GRPC_DURATION: &str = "sessiond_grpc_request_duration_seconds";
    /// Operations carried by Pipeline streams, by operation and status code. They are
    /// series of [`GRPC_REQUESTS`] with `via="pipeline"`; unary calls have no `via` label.
    pub(crate) const PIPELINE_OPS: &str = GRPC_REQUESTS;
    /// Requests and pipelined operations refused at once because `max_concurrent_requests`
    /// were in flight, by method and `via` (`unary` or `pipeline`).
    pub(crate) const REQUESTS_SHED: &str = "sessiond_requests_shed_total";
    /// The label saying how an operation arrived: `unary` or `pipeline`.
    pub(crate) const VIA: &str = "via";
    /// Reaper batches run.
    pub(crate) const REAPER_RUNS: &str = "sessiond_reaper_runs_total";
    /// How late the oldest due session was when the reaper reached it.
    pub(crate) const REAPER_LAG: &str = "sessiond_reaper_lag_seconds";
    /// Time one reaper batch took.
    pub(crate) const REAPER_BATCH: &str = "sessiond_reaper_batch_seconds";
    /// Lookups of well-formed session IDs that matched no live session.
    pub(crate) const SESSION_ID_MISSES: &str = "sessiond_session_id_misses_total";
    /// Times a peer crossed `guess_threshold` misses within `guess_window`.
    pub(crate) const GUESSING_PEERS: &str = "sessiond_guessing_peers_flagged_total";
    /// Bytes in the current log segment.
    pub(crate) const LOG_BYTES: &str = "sessiond_log_bytes";
    /// Log fsync latency.
    pub(crate) const FSYNC: &str = "sessiond_fsync_seconds";
    /// Failed log writes and fsyncs, retries included.
    pub(crate) const LOG_WRITE_ERRORS: &str = "sessiond_log_write_errors_total";
    /// 1 while the durable log writes; 0 while it fails and writes are refused.
    pub(crate) const LOG_WRITABLE: &str = "sessiond_log_writable";
    /// Snapshots written.
    pub(crate) const SNAPSHOTS: &str = "sessiond_snapshots_total";
    /// Seconds since the last snapshot (or since start, before the first).
    pub(crate) const SNAPSHOT_AGE: &str = "sessiond_snapshot_age_seconds";
    /// Sessions loaded by recovery at start-up.
    pub(crate) const RECOVERED: &str = "sessiond_recovered_sessions";
    /// Seconds since start.
    pub(crate) const UPTIME: &str = "sessiond_uptime_seconds";
    /// Always 1; the labels carry the build.
    pub(crate) const BUILD_INFO: &str = "sessiond_build_info";
    /// Client connections open on the gRPC port.
    pub(crate) const CONNECTIONS_OPEN: &str = "sessiond_connections_open";
    /// Connections closed at once because `max_connections` were open.
    pub(crate) const CONNECTIONS_REFUSED: &str = "sessiond_connections_refused_total";
    /// Requests refused for missing or wrong credentials.
    pub(crate) const UNAUTHENTICATED: &str = "sessiond_unauthenticated_requests_total";
    /// Connections closed for spending `unauthenticated_requests`.
    pub(crate) const CONNECTIONS_CLOSED_UNAUTHENTICATED: &str =
        "sessiond_connections_closed_unauthenticated_total";
    /// This node's role: one series per role, 1 for the current one and 0 for the others.
    pub(crate) const CLUSTER_ROLE: &str = "sessiond_cluster_role";
    /// The label of [`CLUSTER_ROLE`]: `leader`, `follower`, `candidate`, `learner`, `shutdown`.
    pub(crate) const ROLE: &str = "role";
    /// The Raft term this node is in.
    pub(crate) const CLUSTER_TERM: &str = "sessiond_cluster_term";
    /// Always 1; `node_id` names the leader this node knows of (`0`: none). Node IDs are
    /// random u64s, which a gauge's f64 would round, so an ID is only ever a label value.
    pub(crate) const CLUSTER_LEADER: &str = "sessiond_cluster_leader";
    /// Always 1; `node_id` names this node, to match the IDs in other series to instances.
    pub(crate) const CLUSTER_NODE_INFO: &str = "sessiond_cluster_node_info";
    /// The label carrying a node ID on [`CLUSTER_LEADER`] and [`CLUSTER_NODE_INFO`].
    pub(crate) const NODE_ID: &str = "node_id";
    /// The last log index this node knows to be committed.
    pub(crate) const CLUSTER_COMMIT_INDEX: &str = "sessiond_cluster_commit_index";
    /// The last log index this node has applied to its store.
    pub(crate) const CLUSTER_APPLIED_INDEX: &str = "sessiond_cluster_applied_index";
    /// The last log index in this node's log.
    pub(crate) const CLUSTER_LAST_LOG_INDEX: &str = "sessiond_cluster_last_log_index";
    /// The last log index this node's current snapshot covers (0: no snapshot).
    pub(crate) const CLUSTER_SNAPSHOT_INDEX: &str = "sessiond_cluster_snapshot_index";
    /// Members of the cluster as this node's membership config has them, by [`KIND`].
    pub(crate) const CLUSTER_MEMBERS: &str = "sessiond_cluster_members";
    /// The label of [`CLUSTER_MEMBERS`]: `voter` or `learner`.
    pub(crate) const KIND: &str = "kind";
    /// On the leader only: entries each node it replicates to lacks (the leader's last log
    /// index minus the node's matched index), by [`FOLLOWER`].
    pub(crate) const CLUSTER_REPLICATION_LAG: &str = "sessiond_cluster_replication_lag_entries";
    /// The label naming a follower (or learner) by node ID on [`CLUSTER_REPLICATION_LAG`].
    pub(crate) const FOLLOWER: &str = "follower";
    /// Times this node saw the term rise (one per election it stood in or learned of).
    pub(crate) const CLUSTER_ELECTIONS: &str = "sessiond_cluster_elections_total";
    /// Times this node learned of a leader other than the last one it knew.
    pub(crate) const CLUSTER_LEADER_CHANGES: &str = "sessiond_cluster_leader_changes_total";
    /// Proposals made on this node, by [`RESULT`].
    pub(crate) const CLUSTER_PROPOSALS: &str = "sessiond_cluster_proposals_total";
    /// The label of [`CLUSTER_PROPOSALS`]: `ok`, `stale`, `unavailable`, `indeterminate`,
    /// `rejected` or `fatal`.
    pub(crate) const RESULT: &str = "result";
    /// Time from proposing to applied on this node, for proposals that committed.
    pub(crate) const CLUSTER_PROPOSAL_SECONDS: &str = "sessiond_cluster_proposal_seconds";
    /// Log entries of writes proposed on this node that committed (several writes waiting
    /// together share one).
    pub(crate) const CLUSTER_WRITE_ENTRIES: &str = "sessiond_cluster_write_entries_total";
    /// Prefix of the process metrics (RSS, open fds, CPU seconds, ...).
    pub(crate) const PROCESS_PREFIX: &str = "sessiond_";
    /// The label naming the tenant on every per-tenant metric.
    pub(crate) const TENANT: &str = "tenant";
}

use names::*;

/// Latency buckets for gRPC requests, reaper batches, fsyncs and cluster proposals: 50 µs
/// to 5 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

/// Session lifetime buckets: 1 s to 30 days.
const LIFETIME_BUCKETS: &[f64] = &[
    1.0,
    10.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    4.0 * 3600.0,
    12.0 * 3600.0,
    86400.0,
    7.0 * 86400.0,
    30.0 * 86400.0,
];

/// The metrics registry of one daemon. Not global: tests run several daemons in one process.
#[derive(Clone)]
pub(crate) struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    process: metrics_process::Collector,
    started: Instant,
    uptime: Gauge,
    /// The cluster's handles, once [`Telemetry::cluster`] made them: their labelled series
    /// are written into each scrape by [`Telemetry::render`].
    cluster: OnceLock<ClusterMetrics>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// A fresh registry with every metric described.
    pub(crate) fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(GRPC_DURATION.into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(REAPER_BATCH.into()), LATENCY_BUCKETS)
            })
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(FSYNC.into()), LATENCY_BUCKETS))
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(CLUSTER_PROPOSAL_SECONDS.into()),
                    LATENCY_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(SESSION_LIFETIME.into()), LIFETIME_BUCKETS)
            })
            .expect("bucket lists are non-empty constants")
            .build_recorder();
        let handle = recorder.handle();
        let process = metrics_process::Collector::new(PROCESS_PREFIX);
        let uptime = metrics::with_local_recorder(&recorder, || {
            describe();
            process.describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            metrics::gauge!(UPTIME)
        });
        Telemetry {
            inner: Arc::new(Inner {
                recorder,
                handle,
                process,
                started: Instant::now(),
                uptime,
                cluster: OnceLock::new(),
            }),
        }
    }

    /// Registers metrics inside `f` with this registry (handles outlive the call).
    pub(crate) fn register<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.inner.recorder, f)
    }

    /// The Prometheus text exposition, with scrape-time gauges refreshed from each tenant's
    /// store: `stores` gives each tenant's name and its store's stats.
    pub(crate) fn render<'a>(&self, stores: impl IntoIterator<Item = (&'a str, Stats)>) -> String {
        let i = &self.inner;
        self.register(|| {
            for (name, stats) in stores {
                let name = name.to_string();
                metrics::gauge!(SESSIONS_ACTIVE, TENANT => name.clone()).set(stats.sessions as f64);
                metrics::gauge!(SESSION_BYTES, TENANT => name.clone()).set(stats.bytes as f64);
                metrics::gauge!(USERS, TENANT => name).set(stats.users as f64);
            }
        });
        i.uptime.set(i.started.elapsed().as_secs_f64());
        self.register(|| i.process.collect());
        i.handle.run_upkeep();
        let mut text = i.handle.render();
        if let Some(cluster) = i.cluster.get() {
            cluster.render_into(&mut text);
        }
        text
    }

    /// The cluster's metric handles: one bundle per daemon, made on the first call (a daemon
    /// without a cluster never calls it, and shows no cluster metrics).
    pub(crate) fn cluster(&self) -> ClusterMetrics {
        self.inner
            .cluster
            .get_or_init(|| self.register(ClusterMetrics::register))
            .clone()
    }

    /// Records how many of `tenant`'s sessions recovery loaded.
    pub(crate) fn recovered(&self, tenant: &str, sessions: usize) {
        let t = tenant.to_string();
        self.register(|| metrics::gauge!(RECOVERED, TENANT => t).set(sessions as f64));
    }

    /// The gRPC port's connection metrics.
    pub(crate) fn conn_metrics(&self) -> ConnMetrics {
        self.register(|| ConnMetrics {
            open: metrics::gauge!(CONNECTIONS_OPEN),
            refused: metrics::counter!(CONNECTIONS_REFUSED),
            unauthenticated: metrics::counter!(UNAUTHENTICATED),
            closed_unauthenticated: metrics::counter!(CONNECTIONS_CLOSED_UNAUTHENTICATED),
        })
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        SESSIONS_ACTIVE,
        "Sessions in memory (refreshed at scrape time)."
    );
    describe_counter!(SESSIONS_CREATED, "Sessions created.");
    describe_counter!(SESSIONS_UPDATED, "Successful Update calls.");
    describe_counter!(
        SESSIONS_DESTROYED,
        "Sessions ended by Destroy, DestroyUserSessions or DestroyAllSessions."
    );
    describe_counter!(
        SESSIONS_EXPIRED,
        "Sessions that reached their idle or absolute deadline."
    );
    describe_counter!(SESSIONS_REGENERATED, "Sessions moved to a fresh ID.");
    describe_counter!(
        SESSIONS_EVICTED,
        "Sessions pushed out by a per-user or memory limit."
    );
    describe_histogram!(
        SESSION_LIFETIME,
        Unit::Seconds,
        "How long sessions lived, recorded when they end."
    );
    describe_gauge!(
        SESSION_BYTES,
        Unit::Bytes,
        "Approximate bytes held by sessions."
    );
    describe_gauge!(USERS, "Users with at least one session.");
    describe_counter!(
        GRPC_REQUESTS,
        "gRPC requests by method and status code; operations inside Pipeline streams carry via=pipeline."
    );
    describe_counter!(
        REQUESTS_SHED,
        "Requests and pipelined operations refused because max_concurrent_requests were in flight."
    );
    describe_histogram!(
        GRPC_DURATION,
        Unit::Seconds,
        "gRPC request latency by method."
    );
    describe_counter!(REAPER_RUNS, "Reaper batches run.");
    describe_gauge!(
        REAPER_LAG,
        Unit::Seconds,
        "How late the oldest due session was when the reaper last reached it."
    );
    describe_histogram!(REAPER_BATCH, Unit::Seconds, "Time one reaper batch took.");
    describe_counter!(
        SESSION_ID_MISSES,
        "Lookups of well-formed session IDs that matched no live session."
    );
    describe_counter!(
        GUESSING_PEERS,
        "Times a peer crossed guess_threshold misses within guess_window."
    );
    describe_gauge!(
        LOG_BYTES,
        Unit::Bytes,
        "Bytes in the current durable log segment."
    );
    describe_histogram!(FSYNC, Unit::Seconds, "Durable log fsync latency.");
    describe_counter!(
        LOG_WRITE_ERRORS,
        "Failed durable log writes and fsyncs, retries included."
    );
    describe_gauge!(
        LOG_WRITABLE,
        "1 while the durable log writes; 0 while it fails and writes are refused."
    );
    describe_counter!(SNAPSHOTS, "Snapshots written.");
    describe_gauge!(
        SNAPSHOT_AGE,
        Unit::Seconds,
        "Seconds since the last snapshot (or since start, before the first)."
    );
    describe_gauge!(RECOVERED, "Sessions loaded by recovery at start-up.");
    describe_gauge!(UPTIME, Unit::Seconds, "Seconds since the daemon started.");
    describe_gauge!(
        CONNECTIONS_OPEN,
        "Client connections open on the gRPC port."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed at once because max_connections were open."
    );
    describe_counter!(
        UNAUTHENTICATED,
        "Requests refused for missing or wrong credentials."
    );
    describe_counter!(
        CONNECTIONS_CLOSED_UNAUTHENTICATED,
        "Connections closed for spending unauthenticated_requests."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the build.");
    describe_gauge!(
        CLUSTER_ROLE,
        "This node's Raft role: 1 on the series of the current role, 0 on the others."
    );
    describe_gauge!(CLUSTER_TERM, "The Raft term this node is in.");
    describe_gauge!(
        CLUSTER_COMMIT_INDEX,
        "The last log index this node knows to be committed."
    );
    describe_gauge!(
        CLUSTER_APPLIED_INDEX,
        "The last log index this node has applied to its store."
    );
    describe_gauge!(
        CLUSTER_LAST_LOG_INDEX,
        "The last log index in this node's Raft log."
    );
    describe_gauge!(
        CLUSTER_SNAPSHOT_INDEX,
        "The last log index this node's snapshot covers (0: no snapshot)."
    );
    describe_gauge!(
        CLUSTER_MEMBERS,
        "Members of the cluster in this node's membership config, by kind (voter or learner)."
    );
    describe_counter!(
        CLUSTER_ELECTIONS,
        "Times this node saw the Raft term rise: one per election it stood in or learned of."
    );
    describe_counter!(
        CLUSTER_LEADER_CHANGES,
        "Times this node learned of a leader other than the last one it knew."
    );
    describe_counter!(CLUSTER_PROPOSALS, "Proposals made on this node, by result.");
    describe_counter!(
        CLUSTER_WRITE_ENTRIES,
        "Log entries of writes proposed on this node that committed; several writes waiting together share one."
    );
    describe_histogram!(
        CLUSTER_PROPOSAL_SECONDS,
        Unit::Seconds,
        "Time from proposing a write to applying it on this node, for proposals that committed."
    );
}

/// The gRPC port's connection metrics (per daemon: a connection has no tenant until its
/// requests show their credentials).
#[derive(Clone)]
pub(crate) struct ConnMetrics {
    /// Connections open now.
    pub open: Gauge,
    /// Connections closed at once because `max_connections` were open.
    pub refused: Counter,
    /// Requests refused for missing or wrong credentials.
    pub unauthenticated: Counter,
    /// Connections closed for spending their unauthenticated budget.
    pub closed_unauthenticated: Counter,
}

impl ConnMetrics {
    /// Handles that record nothing, for a port that does not report its connections.
    pub(crate) fn noop() -> Self {
        ConnMetrics {
            open: Gauge::noop(),
            refused: Counter::noop(),
            unauthenticated: Counter::noop(),
            closed_unauthenticated: Counter::noop(),
        }
    }
}
