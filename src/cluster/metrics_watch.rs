//! The task that follows openraft's metrics watch into the daemon's cluster metrics: on each
//! change it reads the engine's [`Metrics`] into a `ClusterView` (no engine type leaves
//! this room) and hands it to `ClusterMetrics::observe`.
//!
//! openraft's watch keeps only the latest value, so a burst of changes between two wake-ups
//! is recorded once, as its last state: the gauges are exact at each wake-up, and the
//! election and leader-change counters may miss a term or a leader that came and went
//! within one burst.

use openraft::async_runtime::WatchReceiver;
use openraft::type_config::alias::WatchReceiverOf;
use tokio::sync::watch;

use super::{Metrics, Role, TypeConfig};
use crate::observe::{ClusterMetrics, ClusterView};

/// What [`super::ClusterNode::metrics`] returns: openraft's metrics watch.
pub type MetricsWatch = WatchReceiverOf<TypeConfig, Metrics>;

/// Records every change `rx` reports into `metrics` until `stop` turns true (or its sender
/// is dropped), or Raft stops. On the way out it records the latest state once more, so the
/// final scrape shows where the node stood when it stopped.
pub(crate) async fn watch(
    mut rx: MetricsWatch,
    metrics: ClusterMetrics,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let now = view(&rx.borrow_and_update());
        metrics.observe(&now);
        tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => break,
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    let last = view(&rx.borrow_watched());
    metrics.observe(&last);
}

/// This node's view, from openraft's metrics. Indexes that do not exist yet read 0, as in
/// `Status`.
pub(crate) fn view(m: &Metrics) -> ClusterView {
    let membership = m.membership_config.membership();
    ClusterView {
        node_id: m.id,
        role: Role::from(m.state),
        term: m.current_term,
        leader: m.current_leader,
        last_log_index: m.last_log_index.unwrap_or(0),
        commit_index: m.local_committed.map_or(0, |l| l.index),
        applied_index: m.last_applied.map_or(0, |l| l.index),
        snapshot_index: m.snapshot.map_or(0, |l| l.index),
        voters: membership.voter_ids().count(),
        learners: membership.learner_ids().count(),
        matched: m
            .replication
            .iter()
            .flatten()
            .filter(|(id, _)| **id != m.id)
            .map(|(id, matched)| (*id, matched.map_or(0, |l| l.index)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use openraft::async_runtime::WatchSender;
    use openraft::type_config::TypeConfigExt;
    use openraft::ServerState;

    use super::*;
    use crate::cluster::{LogId, Membership, Node, StoredMembership};
    use crate::observe::exposition::sample;
    use crate::observe::Telemetry;

    /// Node IDs as openraft draws them: above 2^53, where an f64 would round them.
    const ME: u64 = 0xF000_0000_0000_0001;
    const B: u64 = 0xF000_0000_0000_0002;
    const C: u64 = 0xF000_0000_0000_0003;
    const L: u64 = 0xF000_0000_0000_0004;

    /// A leader's metrics as openraft reports them: `voters` and learner `L`, a log up to
    /// `last`, and each node's matched index (the leader's own among them, as openraft has it).
    fn leading(voters: &[u64], last: u64, matched: &[(u64, Option<u64>)]) -> Metrics {
        let mut m = Metrics::new_initial(ME);
        m.state = ServerState::Leader;
        m.current_term = 2;
        m.current_leader = Some(ME);
        m.last_log_index = Some(last);
        m.local_committed = Some(LogId::new(2, last - 1));
        m.last_applied = Some(LogId::new(2, last - 2));
        m.snapshot = Some(LogId::new(1, 1));
        let nodes: BTreeMap<u64, Node> = voters
            .iter()
            .chain([&L])
            .map(|id| (*id, Node::default()))
            .collect();
        let voters: BTreeSet<u64> = voters.iter().copied().collect();
        let membership = Membership::new(vec![voters], nodes).unwrap();
        m.membership_config = Arc::new(StoredMembership::new(Some(LogId::new(1, 1)), membership));
        m.replication = Some(
            matched
                .iter()
                .map(|(id, i)| (*id, i.map(|i| LogId::new(2, i))))
                .collect(),
        );
        m
    }

    fn lag(id: u64) -> String {
        format!(r#"sessiond_cluster_replication_lag_entries{{follower="{id}"}}"#)
    }

    #[tokio::test]
    async fn follows_the_watch_and_forgets_a_follower_that_left() {
        let t = Telemetry::new();
        let all = [(ME, Some(50)), (B, Some(49)), (C, None), (L, Some(45))];
        let (tx, rx) = TypeConfig::watch_channel(leading(&[ME, B, C], 50, &all));

        // Told to stop, it records the latest state on its way out.
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(watch(rx.clone(), t.cluster(), stopped));
        stop.send(true).unwrap();
        task.await.unwrap();
        let text = t.render(std::iter::empty());
        let get = |series: &str| sample(&text, series);
        assert_eq!(get(r#"sessiond_cluster_role{role="leader"}"#), Some(1.0));
        assert_eq!(get("sessiond_cluster_term"), Some(2.0));
        assert_eq!(
            get(&format!(r#"sessiond_cluster_leader{{node_id="{ME}"}}"#)),
            Some(1.0)
        );
        assert_eq!(get("sessiond_cluster_last_log_index"), Some(50.0));
        assert_eq!(get("sessiond_cluster_commit_index"), Some(49.0));
        assert_eq!(get("sessiond_cluster_applied_index"), Some(48.0));
        assert_eq!(get("sessiond_cluster_snapshot_index"), Some(1.0));
        assert_eq!(get(r#"sessiond_cluster_members{kind="voter"}"#), Some(3.0));
        assert_eq!(
            get(r#"sessiond_cluster_members{kind="learner"}"#),
            Some(1.0)
        );
        assert_eq!(get(&lag(ME)), None, "the leader is no follower of its own");
        assert_eq!(get(&lag(B)), Some(1.0));
        assert_eq!(
            get(&lag(C)),
            Some(50.0),
            "nothing matched yet: the whole log"
        );
        assert_eq!(
            get(&lag(L)),
            Some(5.0),
            "learners are replicated to as well"
        );

        // C is removed; then Raft stops (the watch's sender goes), which ends the task too.
        let (_stop, stopped) = watch::channel(false);
        let task = tokio::spawn(watch(rx, t.cluster(), stopped));
        let rest = [(ME, Some(52)), (B, Some(52)), (L, Some(52))];
        tx.send(leading(&[ME, B], 52, &rest)).unwrap();
        drop(tx);
        task.await.unwrap();
        let text = t.render(std::iter::empty());
        assert_eq!(sample(&text, &lag(C)), None, "{text}");
        assert_eq!(sample(&text, &lag(B)), Some(0.0));
        assert_eq!(
            sample(&text, r#"sessiond_cluster_members{kind="voter"}"#),
            Some(2.0)
        );
    }

    #[test]
    fn a_follower_has_no_lag_series() {
        let mut m = leading(&[ME, B], 10, &[]);
        m.state = ServerState::Follower;
        m.current_leader = Some(B);
        m.replication = None;
        let v = view(&m);
        assert_eq!(v.role, Role::Follower);
        assert_eq!(v.leader, Some(B));
        assert!(v.matched.is_empty());
    }
}
