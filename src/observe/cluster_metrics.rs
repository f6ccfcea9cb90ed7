//! The cluster node's metric handles ([`ClusterMetrics`], made by [`Telemetry::cluster`]) and
//! what they record: this node's view of the Raft group ([`ClusterView`], which the cluster
//! room's metrics watch builds from openraft's), and each proposal's result and latency.
//!
//! Most of it is ordinary registry handles. Three families are not: the leader
//! ([`CLUSTER_LEADER`]), this node's ID ([`CLUSTER_NODE_INFO`]) and each follower's lag
//! ([`CLUSTER_REPLICATION_LAG`]) have label values that come and go, and the exporter cannot
//! forget a series once it is registered. So they are kept here as plain values and written
//! into each scrape by [`Telemetry::render`]: a follower that leaves, or a leader that is
//! deposed, leaves no stale series behind.
//!
//! Node IDs are random u64s; a gauge's f64 would round most of them, so an ID is only ever a
//! label value, never a sample.
//!
//! [`Telemetry::cluster`]: super::Telemetry::cluster
//! [`Telemetry::render`]: super::Telemetry::render

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::formatting::{write_help_line, write_type_line};

use super::names::*;
use crate::lock;
/// A node's ID in its cluster: a random u64, carried here as a label, never as a value.
type NodeId = u64;

/// A node's role in its cluster, as its status and its metrics report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// It leads: writes and lease reads are served here.
    Leader,
    /// It follows a leader.
    Follower,
    /// It stands for election.
    Candidate,
    /// It receives the log but does not vote.
    Learner,
    /// It has stopped.
    Shutdown,
}

impl Role {
    /// The role's name in `Status` and in the `role` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Shutdown => "shutdown",
        }
    }
}

/// How a proposal ended, as the `result` label counts it (in the order of [`RESULTS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProposalResult {
    /// Committed and applied.
    Ok,
    /// This node no longer, or not yet, leads (asked to forward to the leader).
    Stale,
    /// No leader with a quorum.
    Unavailable,
    /// The leader changed in flight: applied or not.
    Indeterminate,
    /// Refused as it stands.
    Rejected,
    /// This node's Raft has stopped.
    Fatal,
}

/// Every role, in the order of [`Handles::roles`].
const ROLES: [Role; 5] = [
    Role::Leader,
    Role::Follower,
    Role::Candidate,
    Role::Learner,
    Role::Shutdown,
];

/// The values of the [`RESULT`] label, in the order of [`Handles::proposals`].
const RESULTS: [&str; 6] = [
    "ok",
    "stale",
    "unavailable",
    "indeterminate",
    "rejected",
    "fatal",
];

/// The help text of the families written at scrape time.
const LEADER_HELP: &str = "Always 1; node_id names the leader this node knows of (0: none known).";
const NODE_INFO_HELP: &str = "Always 1; node_id names this node.";
const LAG_HELP: &str = "On the leader only: entries each node it replicates to lacks (the leader's last log index minus the node's matched index).";

/// This node's view of the Raft group at one moment: what the cluster room reads out of
/// openraft's metrics, with no engine type in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClusterView {
    /// This node.
    pub node_id: NodeId,
    /// Its role.
    pub role: Role,
    /// The term it is in.
    pub term: u64,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// The last index in its log (0: empty).
    pub last_log_index: u64,
    /// The last index it knows to be committed (0: none).
    pub commit_index: u64,
    /// The last index it has applied (0: none).
    pub applied_index: u64,
    /// The last index its snapshot covers (0: no snapshot).
    pub snapshot_index: u64,
    /// Voters in its membership config (both halves of a joint config).
    pub voters: usize,
    /// Learners in its membership config.
    pub learners: usize,
    /// Leader only: every other node it replicates to, with the last index it knows that
    /// node holds (0: none yet). Empty on any other role.
    pub matched: BTreeMap<NodeId, u64>,
}

/// The cluster node's metric handles: a cheap clone of one shared bundle.
#[derive(Clone)]
pub(crate) struct ClusterMetrics {
    inner: Arc<Handles>,
}

struct Handles {
    roles: [Gauge; ROLES.len()],
    term: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    last_log_index: Gauge,
    snapshot_index: Gauge,
    voters: Gauge,
    learners: Gauge,
    elections: Counter,
    leader_changes: Counter,
    proposals: [Counter; RESULTS.len()],
    proposal_seconds: Histogram,
    write_entries: Counter,
    /// What the scrape writes by hand, and what counting elections and leader changes
    /// remembers. Only the metrics watch writes it, and no lock is held across an await.
    labelled: Mutex<Labelled>,
}

#[derive(Default)]
struct Labelled {
    /// This node, once the watch has reported.
    node_id: Option<NodeId>,
    /// The leader known now.
    leader: Option<NodeId>,
    /// Leader only: each follower's lag in entries.
    lag: BTreeMap<NodeId, u64>,
    /// The term last seen; `None` before the first report.
    term: Option<u64>,
    /// The last leader known, kept through spells with none.
    last_leader: Option<NodeId>,
}

impl ClusterMetrics {
    /// Registers every handle, into the registry `Telemetry::cluster` hands it.
    pub(super) fn register() -> Self {
        ClusterMetrics {
            inner: Arc::new(Handles {
                roles: ROLES.map(|r| gauge!(CLUSTER_ROLE, ROLE => r.as_str())),
                term: gauge!(CLUSTER_TERM),
                commit_index: gauge!(CLUSTER_COMMIT_INDEX),
                applied_index: gauge!(CLUSTER_APPLIED_INDEX),
                last_log_index: gauge!(CLUSTER_LAST_LOG_INDEX),
                snapshot_index: gauge!(CLUSTER_SNAPSHOT_INDEX),
                voters: gauge!(CLUSTER_MEMBERS, KIND => "voter"),
                learners: gauge!(CLUSTER_MEMBERS, KIND => "learner"),
                elections: counter!(CLUSTER_ELECTIONS),
                leader_changes: counter!(CLUSTER_LEADER_CHANGES),
                proposals: RESULTS.map(|r| counter!(CLUSTER_PROPOSALS, RESULT => r)),
                proposal_seconds: histogram!(CLUSTER_PROPOSAL_SECONDS),
                write_entries: counter!(CLUSTER_WRITE_ENTRIES),
                labelled: Mutex::new(Labelled::default()),
            }),
        }
    }

    /// Records this node's view of the group: sets the gauges, and counts an election when
    /// the term rose since the last view, and a leader change when the leader known differs
    /// from the last one known (the first leader learned after start counts; a spell with no
    /// leader does not). The first view only sets the baseline term.
    pub(crate) fn observe(&self, view: &ClusterView) {
        let h = &self.inner;
        for (gauge, role) in h.roles.iter().zip(ROLES) {
            gauge.set(if role == view.role { 1.0 } else { 0.0 });
        }
        h.term.set(view.term as f64);
        h.commit_index.set(view.commit_index as f64);
        h.applied_index.set(view.applied_index as f64);
        h.last_log_index.set(view.last_log_index as f64);
        h.snapshot_index.set(view.snapshot_index as f64);
        h.voters.set(view.voters as f64);
        h.learners.set(view.learners as f64);

        let mut l = lock(&h.labelled);
        if l.term.is_some_and(|t| view.term > t) {
            h.elections.increment(1);
        }
        l.term = Some(view.term);
        if view.leader.is_some() && view.leader != l.last_leader {
            h.leader_changes.increment(1);
            l.last_leader = view.leader;
        }
        l.node_id = Some(view.node_id);
        l.leader = view.leader;
        l.lag = view
            .matched
            .iter()
            .filter(|(id, _)| **id != view.node_id)
            .map(|(id, matched)| (*id, view.last_log_index.saturating_sub(*matched)))
            .collect();
    }

    /// Records one proposal: its result, and for one that committed, how long it took.
    pub(crate) fn proposal(&self, result: ProposalResult, took: Duration) {
        self.inner.proposals[result as usize].increment(1);
        if result == ProposalResult::Ok {
            self.inner.proposal_seconds.record(took.as_secs_f64());
        }
    }

    /// Records one committed log entry of writes proposed here (see `cluster::coalesce`).
    pub(crate) fn entry_committed(&self) {
        self.inner.write_entries.increment(1);
    }

    /// Writes the families whose label values come and go, in the text exposition format.
    /// Nothing before the metrics watch's first report.
    pub(super) fn render_into(&self, out: &mut String) {
        let l = lock(&self.inner.labelled);
        let Some(node_id) = l.node_id else {
            return;
        };
        let family = |out: &mut String, name: &str, help: &str| {
            write_help_line(out, name, help);
            write_type_line(out, name, "gauge");
        };
        family(out, CLUSTER_NODE_INFO, NODE_INFO_HELP);
        let _ = writeln!(out, "{CLUSTER_NODE_INFO}{{{NODE_ID}=\"{node_id}\"}} 1\n");
        family(out, CLUSTER_LEADER, LEADER_HELP);
        let leader = l.leader.unwrap_or(0);
        let _ = writeln!(out, "{CLUSTER_LEADER}{{{NODE_ID}=\"{leader}\"}} 1\n");
        if !l.lag.is_empty() {
            family(out, CLUSTER_REPLICATION_LAG, LAG_HELP);
            for (follower, lag) in &l.lag {
                let _ = writeln!(
                    out,
                    "{CLUSTER_REPLICATION_LAG}{{{FOLLOWER}=\"{follower}\"}} {lag}"
                );
            }
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::exposition::sample;
    use crate::observe::Telemetry;

    /// Node IDs as openraft draws them: above 2^53, where an f64 would round them.
    const ME: NodeId = 0xF000_0000_0000_0001;
    const B: NodeId = 0xF000_0000_0000_0002;
    const C: NodeId = 0xF000_0000_0000_0003;

    fn leader_view() -> ClusterView {
        ClusterView {
            node_id: ME,
            role: Role::Leader,
            term: 3,
            leader: Some(ME),
            last_log_index: 40,
            commit_index: 38,
            applied_index: 37,
            snapshot_index: 20,
            voters: 3,
            learners: 0,
            matched: BTreeMap::from([(ME, 40), (B, 38), (C, 0)]),
        }
    }

    fn get(text: &str, series: &str) -> Option<f64> {
        sample(text, series)
    }

    /// The exposition of a daemon with no tenants.
    fn scrape(t: &Telemetry) -> String {
        t.render(std::iter::empty())
    }

    #[test]
    fn a_view_sets_every_gauge_and_ids_are_labels() {
        let t = Telemetry::new();
        let m = t.cluster();
        m.observe(&leader_view());
        let text = scrape(&t);
        assert_eq!(
            get(&text, r#"sessiond_cluster_role{role="leader"}"#),
            Some(1.0)
        );
        for role in ["follower", "candidate", "learner", "shutdown"] {
            let series = format!(r#"sessiond_cluster_role{{role="{role}"}}"#);
            assert_eq!(get(&text, &series), Some(0.0), "{series}");
        }
        assert_eq!(get(&text, "sessiond_cluster_term"), Some(3.0));
        let leader = format!(r#"sessiond_cluster_leader{{node_id="{ME}"}}"#);
        assert_eq!(get(&text, &leader), Some(1.0));
        let me = format!(r#"sessiond_cluster_node_info{{node_id="{ME}"}}"#);
        assert_eq!(get(&text, &me), Some(1.0));
        assert_eq!(get(&text, "sessiond_cluster_last_log_index"), Some(40.0));
        assert_eq!(get(&text, "sessiond_cluster_commit_index"), Some(38.0));
        assert_eq!(get(&text, "sessiond_cluster_applied_index"), Some(37.0));
        assert_eq!(get(&text, "sessiond_cluster_snapshot_index"), Some(20.0));
        assert_eq!(
            get(&text, r#"sessiond_cluster_members{kind="voter"}"#),
            Some(3.0)
        );
        assert_eq!(
            get(&text, r#"sessiond_cluster_members{kind="learner"}"#),
            Some(0.0)
        );
        // The leader itself has no lag series; a follower that matched nothing lacks it all.
        let lag =
            |id: NodeId| format!(r#"sessiond_cluster_replication_lag_entries{{follower="{id}"}}"#);
        assert_eq!(get(&text, &lag(ME)), None);
        assert_eq!(get(&text, &lag(B)), Some(2.0));
        assert_eq!(get(&text, &lag(C)), Some(40.0));
        // Each family is announced once: the hand-written ones do not collide with the registry's.
        for family in [
            CLUSTER_LEADER,
            CLUSTER_NODE_INFO,
            CLUSTER_REPLICATION_LAG,
            CLUSTER_ROLE,
        ] {
            let typed = format!("# TYPE {family} ");
            assert_eq!(text.matches(&typed).count(), 1, "{family}");
        }
    }

    #[test]
    fn a_follower_that_leaves_takes_its_lag_series_along() {
        let t = Telemetry::new();
        let m = t.cluster();
        m.observe(&leader_view());
        let mut view = leader_view();
        view.matched.remove(&C);
        view.voters = 2;
        m.observe(&view);
        let text = scrape(&t);
        assert!(text.contains(&format!(r#"follower="{B}""#)));
        assert!(!text.contains(&format!(r#"follower="{C}""#)), "{text}");

        // Deposed: no lag at all, and the old leader's series is gone with its leadership.
        let view = ClusterView {
            role: Role::Follower,
            term: 4,
            leader: Some(B),
            matched: BTreeMap::new(),
            ..view
        };
        m.observe(&view);
        let text = scrape(&t);
        assert!(!text.contains(CLUSTER_REPLICATION_LAG), "{text}");
        let leader = |id: NodeId| format!(r#"sessiond_cluster_leader{{node_id="{id}"}}"#);
        assert_eq!(get(&text, &leader(B)), Some(1.0));
        assert_eq!(get(&text, &leader(ME)), None);
        assert_eq!(
            get(&text, "sessiond_cluster_leader"),
            Some(1.0),
            "one series"
        );
    }

    #[test]
    fn elections_count_term_rises_and_leader_changes_count_new_leaders() {
        let t = Telemetry::new();
        let m = t.cluster();
        let view = |term: u64, leader: Option<NodeId>| ClusterView {
            term,
            leader,
            role: if leader == Some(ME) {
                Role::Leader
            } else {
                Role::Follower
            },
            matched: BTreeMap::new(),
            ..leader_view()
        };
        // The first view is the baseline: a restarted node's persisted term is no election.
        m.observe(&view(5, None));
        m.observe(&view(5, Some(B))); // learned of a leader: a change, no election
        m.observe(&view(5, Some(B))); // nothing new
        m.observe(&view(6, None)); // an election began; no leader yet
        m.observe(&view(9, Some(B))); // three terms on, B leads again: one more election only
        m.observe(&view(10, Some(ME))); // this node won the next one
        let text = scrape(&t);
        assert_eq!(get(&text, "sessiond_cluster_elections_total"), Some(3.0));
        assert_eq!(
            get(&text, "sessiond_cluster_leader_changes_total"),
            Some(2.0)
        );
        let none = r#"sessiond_cluster_leader{node_id="0"}"#;
        m.observe(&view(11, None));
        assert_eq!(get(&scrape(&t), none), Some(1.0), "0 is no leader");
    }

    #[test]
    fn proposals_count_by_result_and_time_the_committed() {
        let t = Telemetry::new();
        let m = t.cluster();
        m.proposal(ProposalResult::Ok, Duration::from_millis(3));
        m.proposal(ProposalResult::Ok, Duration::from_millis(5));
        m.proposal(ProposalResult::Stale, Duration::from_micros(10));
        let errors = [
            ProposalResult::Unavailable,
            ProposalResult::Indeterminate,
            ProposalResult::Rejected,
            ProposalResult::Fatal,
        ];
        for e in errors {
            m.proposal(e, Duration::from_secs(1));
        }
        let text = scrape(&t);
        let count = |r: &str| {
            get(
                &text,
                &format!(r#"sessiond_cluster_proposals_total{{result="{r}"}}"#),
            )
        };
        assert_eq!(count("ok"), Some(2.0));
        for r in &RESULTS[1..] {
            assert_eq!(count(r), Some(1.0), "{r}");
        }
        assert_eq!(
            get(&text, "sessiond_cluster_proposal_seconds_count"),
            Some(2.0)
        );
        let sum = get(&text, "sessiond_cluster_proposal_seconds_sum").unwrap();
        assert!((sum - 0.008).abs() < 1e-9, "{sum}");
        let bucket = r#"sessiond_cluster_proposal_seconds_bucket{le="0.005"}"#;
        assert_eq!(get(&text, bucket), Some(2.0), "the request-latency buckets");
    }

    #[test]
    fn nothing_is_written_before_the_first_report() {
        let t = Telemetry::new();
        let text = scrape(&t);
        assert!(
            !text.contains("sessiond_cluster_"),
            "no cluster, no cluster metrics"
        );
        let _m = t.cluster();
        let text = scrape(&t);
        assert!(!text.contains("sessiond_cluster_leader{"), "{text}");
    }
}
