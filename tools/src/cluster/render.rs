//! How `sessionctl cluster` prints: JSON for scripts, and for a person a summary, a table of
//! the members, and a warning line for anything that needs attention.
//!
//! Node IDs are strings in the JSON, as the protobuf JSON mapping has every uint64: they are
//! random 64-bit numbers, which a double (jq 1.6, JavaScript) would round to a wrong ID.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde_json::{json, Value};

use super::{members, pb, Added, InitOnce, Moved, LEADER};

/// One row of the members table.
struct Row {
    id: u64,
    /// "leader", "voter", "learner"; during a membership change "voter (joining)" or
    /// "voter (leaving)".
    role: String,
    node: pb::Node,
    /// On a leader: the last index the member is known to hold (None: not known yet).
    matched: Option<u64>,
    /// On a leader: how far the member is behind the leader's log.
    lag: Option<u64>,
}

fn rows(s: &pb::StatusResponse) -> Vec<Row> {
    let configs: Vec<BTreeSet<u64>> = s
        .membership
        .iter()
        .flat_map(|m| &m.configs)
        .map(|c| c.ids.iter().copied().collect())
        .collect();
    let leads = s.role == LEADER;
    members(s)
        .into_iter()
        .map(|(id, node)| {
            let old = configs.first().is_some_and(|c| c.contains(&id));
            let new = configs.last().is_some_and(|c| c.contains(&id));
            let role = match (old, new) {
                _ if id == s.leader_id => "leader",
                (true, true) => "voter",
                (false, true) => "voter (joining)",
                (true, false) => "voter (leaving)",
                (false, false) => "learner",
            };
            // A leader holds its own log; a member it has not heard back from yet is unknown.
            let matched = match (leads, s.matched_index.get(&id)) {
                (false, _) => None,
                (true, Some(m)) => Some(*m),
                (true, None) if id == s.node_id => Some(s.last_log_index),
                (true, None) => None,
            };
            Row {
                id,
                role: role.into(),
                node,
                matched,
                lag: matched.map(|m| s.last_log_index.saturating_sub(m)),
            }
        })
        .collect()
}

/// What needs an operator's attention in a node's status, each a sentence.
fn warnings(s: &pb::StatusResponse) -> Vec<String> {
    let mut out = Vec::new();
    let members = members(s);
    let configs = s.membership.as_ref().map_or(0, |m| m.configs.len());
    if s.role == "shutdown" {
        out.push("this node's Raft has stopped: it serves nothing; see its log".into());
    }
    if members.is_empty() {
        out.push(
            "this node is not part of a cluster yet: start one with `sessionctl cluster init`, \
             or add it to one with `sessionctl cluster add --peer LEADER --node THIS_PEER_ADDR`"
                .into(),
        );
        return out;
    }
    if !members.contains_key(&s.node_id) {
        out.push(format!(
            "node {} is not a member of the cluster it knows of (removed?)",
            s.node_id
        ));
    }
    if s.leader_id == 0 {
        out.push(
            "no leader known: an election is under way, or fewer than a majority of the voters \
             are up"
                .into(),
        );
    }
    if configs > 1 {
        out.push(
            "a membership change is under way (joint consensus of the old and new voters)".into(),
        );
    }
    out
}

/// A node's status as JSON.
pub fn status_json(s: &pb::StatusResponse) -> Value {
    let own = s.node.clone().unwrap_or_default();
    let leader = match (s.leader_id, &s.leader) {
        (0, _) => Value::Null,
        (id, node) => {
            let node = node.clone().unwrap_or_default();
            json!({
                "node_id": id.to_string(),
                "peer_addr": node.peer_addr,
                "client_addr": node.client_addr,
            })
        }
    };
    let rows = rows(s);
    let ids = |learners: bool| -> Vec<String> {
        rows.iter()
            .filter(|r| (r.role == "learner") == learners)
            .map(|r| r.id.to_string())
            .collect()
    };
    json!({
        "node_id": s.node_id.to_string(),
        "peer_addr": own.peer_addr,
        "client_addr": own.client_addr,
        "role": s.role,
        "term": s.term,
        "leader": leader,
        "committed_index": s.committed_index,
        "applied_index": s.applied_index,
        "last_log_index": s.last_log_index,
        "voters": ids(false),
        "learners": ids(true),
        "members": rows.iter().map(|r| json!({
            "node_id": r.id.to_string(),
            "role": r.role,
            "peer_addr": r.node.peer_addr,
            "client_addr": r.node.client_addr,
            "matched_index": r.matched,
            "lag": r.lag,
        })).collect::<Vec<_>>(),
        "warnings": warnings(s),
    })
}

/// A node's status for a person: who it is and who leads, its log, the members, warnings.
pub fn status_text(s: &pb::StatusResponse) -> String {
    let mut out = String::new();
    let own = s.node.clone().unwrap_or_default();
    let _ = writeln!(out, "node       {}", s.node_id);
    let _ = writeln!(
        out,
        "addresses  peer {}  clients {}",
        dash(&own.peer_addr),
        dash(&own.client_addr)
    );
    let _ = writeln!(out, "role       {}", s.role);
    let _ = writeln!(out, "term       {}", s.term);
    let leader = match (s.leader_id, &s.leader) {
        (0, _) => "none known".to_string(),
        (id, _) if id == s.node_id => format!("{id} (this node)"),
        (id, Some(n)) => format!(
            "{id}  peer {}  clients {}",
            dash(&n.peer_addr),
            dash(&n.client_addr)
        ),
        (id, None) => format!("{id} (address unknown)"),
    };
    let _ = writeln!(out, "leader     {leader}");
    let _ = writeln!(
        out,
        "log        committed {}  applied {}  last {}",
        s.committed_index, s.applied_index, s.last_log_index
    );
    let rows = rows(s);
    if !rows.is_empty() {
        let learners = rows.iter().filter(|r| r.role == "learner").count();
        let _ = writeln!(
            out,
            "members    {} voters, {} learners",
            rows.len() - learners,
            learners
        );
        out.push('\n');
        out.push_str(&table(s, &rows));
        if s.role != LEADER && s.leader_id != 0 {
            let _ = writeln!(
                out,
                "(matched and lag are known to the leader only: sessionctl cluster status --peer {})",
                s.leader.as_ref().map_or("LEADER", |n| n.peer_addr.as_str())
            );
        }
    }
    for w in warnings(s) {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

/// The members table, columns aligned to their widest cell.
fn table(s: &pb::StatusResponse, rows: &[Row]) -> String {
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let mut cells = vec![[
        "NODE".to_string(),
        "ROLE".into(),
        "PEER".into(),
        "CLIENTS".into(),
        "MATCHED".into(),
        "LAG".into(),
        String::new(),
    ]];
    for r in rows {
        cells.push([
            r.id.to_string(),
            r.role.clone(),
            dash(&r.node.peer_addr).into(),
            dash(&r.node.client_addr).into(),
            opt(r.matched),
            opt(r.lag),
            match r.id == s.node_id {
                true => "<- this node".into(),
                false => String::new(),
            },
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for row in &cells {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

fn dash(s: &str) -> &str {
    match s.is_empty() {
        true => "-",
        false => s,
    }
}

/// `init`'s answer: the new cluster's status.
pub fn init_json(s: &pb::StatusResponse) -> Value {
    json!({ "initialized": s.node_id.to_string(), "status": status_json(s) })
}

/// `init`'s answer for a person.
pub fn init_text(s: &pb::StatusResponse) -> String {
    format!(
        "initialized a new cluster: node {} leads it, alone; add members with `sessionctl \
         cluster add --peer {} --node PEER_ADDR`\n\n{}",
        s.node_id,
        s.node.as_ref().map_or("ADDR", |n| n.peer_addr.as_str()),
        status_text(s)
    )
}

/// `init --group`'s answer: the new cluster's, or the existing one's.
pub fn init_once_json(i: &InitOnce) -> Value {
    match i {
        InitOnce::Started(s) => init_json(s),
        InitOnce::Exists { addr, status } => json!({
            "initialized": Value::Null,
            "exists_at": addr,
            "status": status_json(status),
        }),
    }
}

/// `init --group`'s answer for a person.
pub fn init_once_text(i: &InitOnce) -> String {
    match i {
        InitOnce::Started(s) => init_text(s),
        InitOnce::Exists { addr, status } => format!(
            "node {} at {addr} is already part of a cluster; no new cluster started (add the \
             nodes that are not members with `sessionctl cluster add`)\n\n{}",
            status.node_id,
            status_text(status)
        ),
    }
}

/// `add`'s answer for several nodes, in the order they were added.
pub fn added_all_json(all: &[Added]) -> Value {
    match all {
        [one] => added_json(one),
        _ => json!({ "nodes": all.iter().map(added_json).collect::<Vec<_>>() }),
    }
}

/// `add`'s answer for several nodes, for a person: a line each, then the leader's status.
pub fn added_all_text(all: &[Added]) -> String {
    match all {
        [.., last] => {
            let mut out = String::new();
            for a in all {
                let _ = writeln!(out, "{}", added_line(a));
            }
            format!("{out}\n{}", status_text(&last.status))
        }
        [] => String::new(),
    }
}

/// `add`'s answer.
pub fn added_json(a: &Added) -> Value {
    json!({
        "added": a.node_id.to_string(),
        "already_voter": a.already_voter,
        "status": status_json(&a.status),
    })
}

/// `add`'s answer for a person.
pub fn added_text(a: &Added) -> String {
    format!("{}\n\n{}", added_line(a), status_text(&a.status))
}

fn added_line(a: &Added) -> String {
    match a.already_voter {
        true => format!("node {} is already a voter; nothing changed", a.node_id),
        false => format!("node {} caught up and is now a voter", a.node_id),
    }
}

/// `remove`'s answer.
pub fn removed_json(id: u64, s: &pb::StatusResponse) -> Value {
    json!({ "removed": id.to_string(), "status": status_json(s) })
}

/// `remove`'s answer for a person.
pub fn removed_text(id: u64, s: &pb::StatusResponse) -> String {
    let mut what = format!("node {id} is no longer a member");
    if id == s.node_id {
        what.push_str("; it led, so the remaining voters elect a new leader");
    }
    format!("{what}\n\n{}", status_text(s))
}

/// `transfer-leader`'s answer.
pub fn moved_json(m: &Moved) -> Value {
    json!({
        "from": m.from.to_string(),
        "to": m.to.to_string(),
        "leader_id": m.leader_id.to_string(),
    })
}

/// `transfer-leader`'s answer for a person.
pub fn moved_text(m: &Moved) -> String {
    match (m.from == m.to, m.leader_id == m.to) {
        (true, _) => format!("node {} leads already; nothing changed\n", m.to),
        (false, true) => format!("leadership moved from node {} to node {}\n", m.from, m.to),
        (false, false) => format!(
            "node {} no longer leads, but node {} won the election instead of node {}\n",
            m.from, m.leader_id, m.to
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: u16) -> pb::Node {
        pb::Node {
            peer_addr: format!("127.0.0.1:{port}"),
            client_addr: String::new(),
        }
    }

    /// Node 1 leads, midway through replacing voter 3 with voter 4; 5 is a learner.
    fn joint(role: &str) -> pb::StatusResponse {
        let set = |ids: &[u64]| pb::NodeIdSet { ids: ids.to_vec() };
        pb::StatusResponse {
            node_id: 1,
            role: role.into(),
            term: 4,
            leader_id: 1,
            leader: Some(node(1)),
            committed_index: 40,
            applied_index: 40,
            last_log_index: 42,
            membership: Some(pb::Membership {
                configs: vec![set(&[1, 2, 3]), set(&[1, 2, 4])],
                nodes: (1..=5).map(|id| (id, node(id as u16))).collect(),
            }),
            matched_index: [(1, 42), (2, 41), (3, 42)].into(),
            node: Some(node(1)),
        }
    }

    #[test]
    fn a_membership_change_shows_who_joins_and_who_leaves() {
        let json = status_json(&joint(LEADER));
        let roles: Vec<(&str, &str)> = json["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["node_id"].as_str().unwrap(), m["role"].as_str().unwrap()))
            .collect();
        assert_eq!(
            roles,
            [
                ("1", "leader"),
                ("2", "voter"),
                ("3", "voter (leaving)"),
                ("4", "voter (joining)"),
                ("5", "learner")
            ]
        );
        assert_eq!(json["learners"], json!(["5"]));
        let text = status_text(&joint(LEADER));
        assert!(
            text.contains("warning: a membership change is under way"),
            "{text}"
        );
    }

    #[test]
    fn progress_is_the_leaders_and_unknown_progress_is_not_zero() {
        let json = status_json(&joint(LEADER));
        let m = &json["members"];
        assert_eq!(
            (m[1]["matched_index"].clone(), m[1]["lag"].clone()),
            (json!(41), json!(1))
        );
        // The leader has not heard back from node 4 yet: unknown, not 42 behind.
        assert_eq!(m[3]["matched_index"], Value::Null);
        let json = status_json(&joint("follower"));
        assert!(json["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["lag"].is_null()));
    }
}
