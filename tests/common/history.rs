//! Recording what clients saw of a replicated group, and checking it.
//!
//! The chaos suite records every operation with its invoke and complete instants and its
//! outcome, through a [`Recorder`]. Afterwards it runs these checks over the history:
//! - [`linearizable`]: each session is a register keyed by its ID, holding attributes and a
//!   version. Linearizability composes per object, so the check runs per session, which keeps
//!   the histories short.
//! - [`regenerated_ids_dead`]: after a Regenerate returned, its old ID is dead.
//! - [`acknowledged_writes_survive`]: after the faults heal, every acknowledged write can still be
//!   read.
//! - [`digests_agree`]: the replicas hold the same state.
//! - [`stale_reads`]: no read returned less than a write that had been acknowledged before the
//!   read began (implied by linearizability, and counted on its own for the chaos report).
//!
//! A timeout or `UNAVAILABLE` is *indeterminate*: the operation may have taken effect, at any
//! time after it was invoked, even after the client gave up, or it may never take effect.
//!
//! # The checker crate: todc-utils, not stateright
//!
//! Both were measured on this machine, each built cold in its own target directory (debug, two
//! cores):
//! - `todc-utils` 0.1.1 (`WGLChecker`, Wing–Gong–Lowe with memoisation) has no dependencies at
//!   all. It is about 1,300 lines and builds in about 1 s.
//! - `stateright` 0.31 is a whole model checker, and its linearizability tester is a small part
//!   of it. It pulls 45 crates, among them tiny_http (its web explorer), serde_json, ahash,
//!   parking_lot and crossbeam, and builds in about 64 s. It would add 8 crates to our
//!   Cargo.lock. It also turns on serde's `rc` feature, which changes serde's features in the
//!   test build, so serde and everything above it would build twice.
//!
//! CI has 30 minutes on two cores, so todc-utils wins. What it lacks we make up for here:
//! - Its `Specification::apply` is deterministic and cannot say "maybe". So an indeterminate
//!   operation gets its response at the end of time, after every other response (the usual
//!   trick, as in Knossos and Porcupine). Then "it took effect" means the checker linearizes
//!   it somewhere after its invocation, and "it never took effect" means it linearizes it last,
//!   where nothing observes it.
//! - It answers only yes or no. [`Violation::NotLinearizable`] therefore carries the
//!   session's history, printed.
//! - It is small and still at 0.1, so we pin its minor version. The tests in tests/history.rs
//!   hold its answers to hand-made histories, so a regression in it would show.
//!
//! The machinery of that check (splitting the history per session, the sequential spec) is in
//! the child module `linearizability`; this file holds the records and the checks' entry points.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use sessiond::api::pb;

mod linearizability;

/// A session ID, as the API returns it.
pub type SessionId = String;

/// A session's attributes, ordered so that a state can be hashed.
pub type Attrs = BTreeMap<String, Bytes>;

/// What a session holds: the value of the register.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Value {
    /// The attributes.
    pub attrs: Attrs,
    /// 1 at creation, +1 on each Update and Regenerate.
    pub version: u64,
}

impl Value {
    /// The value of a session as the API returned it.
    pub fn of(session: &pb::Session) -> Value {
        Value {
            attrs: session
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            version: session.version,
        }
    }
}

/// An operation, as the client invoked it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Create a session with these attributes. The server picks the ID.
    Create {
        /// The attributes asked for.
        attrs: Attrs,
    },
    /// Read a session.
    Get {
        /// The session.
        id: SessionId,
    },
    /// Set and remove attributes. With `expected_version`, only if the version is that one.
    Update {
        /// The session.
        id: SessionId,
        /// Attributes to insert or overwrite.
        set: Attrs,
        /// Attribute keys to remove.
        remove: Vec<String>,
        /// Compare-and-set on the version.
        expected_version: Option<u64>,
    },
    /// End a session.
    Destroy {
        /// The session.
        id: SessionId,
    },
    /// Move a session to a fresh ID. The checks expect the defaults (attributes kept), so that
    /// the new session's value is the old one's with the version bumped.
    Regenerate {
        /// The old ID.
        id: SessionId,
    },
}

/// How an operation ended, as the client saw it. Which outcomes fit which operations:
/// - Create: `Created`, `Failed` or `Indeterminate`.
/// - Get: `Found`, `NotFound` or `Indeterminate`.
/// - Update: `Updated`, `Replayed`, `Conflict`, `NotFound` or `Indeterminate`.
/// - Destroy: `Destroyed`, `NotFound` or `Indeterminate`.
/// - Regenerate: `Created`, `NotFound` or `Indeterminate`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Create or Regenerate returned a session: its (new) ID, and its value as returned.
    Created {
        /// The new session's ID.
        id: SessionId,
        /// What it holds.
        value: Value,
    },
    /// Get returned the session.
    Found(Value),
    /// Update applied. This is the session's new version.
    Updated {
        /// The version after the update.
        version: u64,
    },
    /// An Update retried with its idempotency key after an attempt that may have applied
    /// returned a session. It applied exactly once, but the reply may be a replay: the
    /// session as it is now, so `version` is the one the update made or a later one.
    Replayed {
        /// The version the reply carried: at least the one the update made.
        version: u64,
    },
    /// Destroy returned. `existed` says whether a live session was destroyed.
    Destroyed {
        /// Whether the session was alive.
        existed: bool,
    },
    /// `NOT_FOUND`: the session does not exist.
    NotFound,
    /// `ABORTED`: Update's expected version did not match, and nothing changed.
    Conflict,
    /// A definite refusal that changed nothing (`INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED`, ...).
    Failed(String),
    /// A timeout, `UNAVAILABLE`, or a broken connection. The operation may or may not take
    /// effect.
    Indeterminate,
}

impl Outcome {
    /// The outcome of an RPC that failed with `status`. Only codes the server sends after
    /// deciding, and for which nothing happened, are definite. Everything else might have been
    /// applied.
    pub fn from_status(status: &tonic::Status) -> Outcome {
        use tonic::Code;
        match status.code() {
            Code::NotFound => Outcome::NotFound,
            Code::Aborted => Outcome::Conflict,
            Code::InvalidArgument
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::AlreadyExists
            | Code::OutOfRange
            | Code::Unimplemented => Outcome::Failed(status.to_string()),
            _ => Outcome::Indeterminate,
        }
    }
}

/// One operation in a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// What was asked.
    pub op: Op,
    /// How it ended.
    pub outcome: Outcome,
    /// When the client sent it.
    pub invoked: Instant,
    /// When the client had its answer, or gave up.
    pub completed: Instant,
}

/// Collects records from many tasks. It is a cheap handle: clone it into each client task.
#[derive(Clone, Default)]
pub struct Recorder {
    /// The records so far. The lock is only ever held for a push or a copy, never across an
    /// `.await`.
    records: Arc<Mutex<Vec<Record>>>,
}

impl Recorder {
    /// An empty history.
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// Notes that `op` is invoked now. Complete the returned [`Pending`] with its outcome. If
    /// the Pending is dropped instead (say, its task was cancelled), the operation is recorded
    /// as indeterminate.
    pub fn invoke(&self, op: Op) -> Pending {
        Pending {
            recorder: self.clone(),
            op: Some(op),
            invoked: Instant::now(),
        }
    }

    /// The history so far, in order of invocation.
    pub fn history(&self) -> Vec<Record> {
        let mut records = self.records.lock().unwrap().clone();
        records.sort_by_key(|r| r.invoked);
        records
    }

    fn push(&self, record: Record) {
        self.records.lock().unwrap().push(record);
    }
}

/// An invoked operation that has not completed yet.
pub struct Pending {
    recorder: Recorder,
    /// `None` once recorded.
    op: Option<Op>,
    invoked: Instant,
}

impl Pending {
    /// Records the operation as ended now with `outcome`.
    pub fn complete(mut self, outcome: Outcome) {
        self.record(outcome);
    }

    fn record(&mut self, outcome: Outcome) {
        if let Some(op) = self.op.take() {
            self.recorder.push(Record {
                op,
                outcome,
                invoked: self.invoked,
                completed: Instant::now(),
            });
        }
    }
}

impl Drop for Pending {
    /// An operation that nobody completed may still have happened.
    fn drop(&mut self) {
        self.record(Outcome::Indeterminate);
    }
}

/// A property the history breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// No order of this session's operations explains what the clients saw.
    NotLinearizable {
        /// The session.
        session: SessionId,
        /// Its operations, printed with times relative to the first.
        history: String,
    },
    /// An operation that started after a Regenerate had returned found the old ID alive.
    OldIdAlive {
        /// The ID that should have been dead.
        old: SessionId,
        /// The Regenerate and the operation, printed.
        detail: String,
    },
    /// A write the cluster acknowledged is not in the final read.
    LostWrite {
        /// The session.
        session: SessionId,
        /// What was acknowledged and what the final read saw.
        detail: String,
    },
    /// A session with acknowledged writes has no final read to check them against.
    NoFinalRead {
        /// The session.
        session: SessionId,
    },
    /// The replicas' digests differ.
    DigestsDiffer {
        /// Every node's digest, printed.
        digests: String,
    },
    /// A read returned an older state than a write acknowledged before the read began.
    StaleRead {
        /// The session.
        session: SessionId,
        /// The write and the read, printed.
        detail: String,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::NotLinearizable { session, history } => {
                write!(
                    f,
                    "session {} is not linearizable:\n{history}",
                    short(session)
                )
            }
            Violation::OldIdAlive { old, detail } => {
                write!(f, "regenerated ID {} still alive: {detail}", short(old))
            }
            Violation::LostWrite { session, detail } => {
                write!(f, "session {} lost a write: {detail}", short(session))
            }
            Violation::NoFinalRead { session } => {
                write!(f, "session {} has no final read", short(session))
            }
            Violation::DigestsDiffer { digests } => write!(f, "replicas differ: {digests}"),
            Violation::StaleRead { session, detail } => {
                write!(f, "session {} had a stale read: {detail}", short(session))
            }
        }
    }
}

/// The first characters of a session ID: enough to tell sessions apart in a report, and never
/// the full ID (STYLE.md, 7).
fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// Checks that every session's history is linearizable, one session at a time.
pub fn linearizable(history: &[Record]) -> Result<(), Vec<Violation>> {
    let violations: Vec<Violation> = linearizability::by_session(history)
        .into_iter()
        .filter(|(_, steps)| !linearizability::session_linearizable(steps))
        .map(|(session, steps)| Violation::NotLinearizable {
            session,
            history: linearizability::render(&steps, history),
        })
        .collect();
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// Checks that for every Regenerate that returned a new ID, every operation on the old ID
/// that was invoked after the Regenerate completed found nothing there.
pub fn regenerated_ids_dead(history: &[Record]) -> Result<(), Vec<Violation>> {
    let mut violations = Vec::new();
    for regenerate in history {
        let (Op::Regenerate { id: old }, Outcome::Created { .. }) =
            (&regenerate.op, &regenerate.outcome)
        else {
            continue;
        };
        for later in history {
            let found_alive = !matches!(
                &later.outcome,
                Outcome::NotFound
                    | Outcome::Destroyed { existed: false }
                    | Outcome::Failed(_)
                    | Outcome::Indeterminate
            );
            if target(&later.op) == Some(old) && later.invoked > regenerate.completed && found_alive
            {
                let origin = history[0].invoked;
                violations.push(Violation::OldIdAlive {
                    old: old.clone(),
                    detail: format!(
                        "{} was followed by {}",
                        show(regenerate, origin),
                        show(later, origin)
                    ),
                });
            }
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// Checks the final reads, taken once the faults have healed, against what was acknowledged.
/// `final_reads` maps each session to what a read returned: `None` for `NOT_FOUND`.
/// - A session whose removal was acknowledged (Destroy, or Regenerate away) must be gone.
/// - Otherwise, a session with an acknowledged Create or Update must be there, at the
///   highest acknowledged version or later, unless a removal that might have happened
///   (an indeterminate Destroy or Regenerate) explains its absence.
///
/// Give the sessions timeouts longer than the test, or an expiry would look like a loss.
pub fn acknowledged_writes_survive(
    history: &[Record],
    final_reads: &HashMap<SessionId, Option<Value>>,
) -> Result<(), Vec<Violation>> {
    #[derive(Default)]
    struct Acked {
        version: Option<u64>,
        removed: bool,
        maybe_removed: bool,
    }
    let mut sessions: BTreeMap<&SessionId, Acked> = BTreeMap::new();
    for record in history {
        match (&record.op, &record.outcome) {
            (Op::Create { .. }, Outcome::Created { id, value }) => {
                let acked = sessions.entry(id).or_default();
                acked.version = acked.version.max(Some(value.version));
            }
            (
                Op::Update { id, .. },
                Outcome::Updated { version } | Outcome::Replayed { version },
            ) => {
                let acked = sessions.entry(id).or_default();
                acked.version = acked.version.max(Some(*version));
            }
            (Op::Regenerate { id: old }, Outcome::Created { id: new, value }) => {
                sessions.entry(old).or_default().removed = true;
                let acked = sessions.entry(new).or_default();
                acked.version = acked.version.max(Some(value.version));
            }
            (Op::Destroy { id }, Outcome::Destroyed { .. }) => {
                sessions.entry(id).or_default().removed = true;
            }
            (Op::Destroy { id } | Op::Regenerate { id }, Outcome::Indeterminate) => {
                sessions.entry(id).or_default().maybe_removed = true;
            }
            _ => {}
        }
    }

    let mut violations = Vec::new();
    for (session, acked) in sessions {
        if !acked.removed && acked.version.is_none() {
            continue;
        }
        let Some(seen) = final_reads.get(session) else {
            violations.push(Violation::NoFinalRead {
                session: session.clone(),
            });
            continue;
        };
        let lost = match (acked.removed, acked.version, seen) {
            (true, _, Some(value)) => Some(format!(
                "its removal was acknowledged, but the final read found version {}",
                value.version
            )),
            (false, Some(version), None) if !acked.maybe_removed => Some(format!(
                "version {version} was acknowledged, but the final read found nothing"
            )),
            (false, Some(version), Some(value)) if value.version < version => Some(format!(
                "version {version} was acknowledged, but the final read found version {}",
                value.version
            )),
            _ => None,
        };
        if let Some(detail) = lost {
            violations.push(Violation::LostWrite {
                session: session.clone(),
                detail,
            });
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// Checks that every node reported the same digest, after the cluster has quiesced.
pub fn digests_agree<N: fmt::Debug, D: PartialEq + fmt::Debug>(
    digests: &[(N, D)],
) -> Result<(), Violation> {
    match digests.split_first() {
        Some(((_, first), rest)) if rest.iter().any(|(_, d)| d != first) => {
            Err(Violation::DigestsDiffer {
                digests: format!("{digests:?}"),
            })
        }
        _ => Ok(()),
    }
}

/// Checks that no read returned an older state than a write acknowledged before the read was
/// invoked: a version below that write's, or nothing at all when no removal of the session
/// (Destroy or Regenerate, whatever its outcome) had been invoked before the read completed.
/// Linearizability implies this; it is checked on its own to count stale reads, the failure a
/// deposed leader serving from its old state would show.
pub fn stale_reads(history: &[Record]) -> Result<(), Vec<Violation>> {
    // Per session: its acknowledged writes (completed, version) and its removals' invocations.
    let mut writes: HashMap<&SessionId, Vec<(Instant, u64, usize)>> = HashMap::new();
    let mut removals: HashMap<&SessionId, Vec<Instant>> = HashMap::new();
    for (i, record) in history.iter().enumerate() {
        match (&record.op, &record.outcome) {
            (Op::Create { .. } | Op::Regenerate { .. }, Outcome::Created { id, value }) => {
                writes
                    .entry(id)
                    .or_default()
                    .push((record.completed, value.version, i));
            }
            (Op::Update { id, .. }, Outcome::Updated { version }) => {
                writes
                    .entry(id)
                    .or_default()
                    .push((record.completed, *version, i));
            }
            _ => {}
        }
        if let Op::Destroy { id } | Op::Regenerate { id } = &record.op {
            removals.entry(id).or_default().push(record.invoked);
        }
    }
    let origin = history.first().map(|r| r.invoked);
    let mut violations = Vec::new();
    for read in history {
        let (Op::Get { id }, seen) = (&read.op, &read.outcome) else {
            continue;
        };
        let Some(acked) = writes.get(id) else {
            continue;
        };
        let before: Vec<_> = acked.iter().filter(|w| w.0 < read.invoked).collect();
        let Some(&&(_, newest, w)) = before.iter().max_by_key(|w| w.1) else {
            continue;
        };
        let stale = match seen {
            Outcome::Found(value) => value.version < newest,
            Outcome::NotFound => !removals
                .get(id)
                .is_some_and(|r| r.iter().any(|&t| t < read.completed)),
            _ => false,
        };
        if stale {
            let origin = origin.expect("a history with a read");
            violations.push(Violation::StaleRead {
                session: id.clone(),
                detail: format!(
                    "{} was followed by {}",
                    show(&history[w], origin),
                    show(read, origin)
                ),
            });
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// The session an operation names, if it names one (a Create does not).
fn target(op: &Op) -> Option<&SessionId> {
    match op {
        Op::Create { .. } => None,
        Op::Get { id } | Op::Update { id, .. } | Op::Destroy { id } | Op::Regenerate { id } => {
            Some(id)
        }
    }
}

/// A record in one line: `[invoked, completed] op -> outcome`, IDs shortened.
fn show(record: &Record, origin: Instant) -> String {
    let ms = |t: Instant| t.saturating_duration_since(origin).as_secs_f64() * 1e3;
    let end = match record.outcome {
        Outcome::Indeterminate => format!("{:.1}..", ms(record.completed)),
        _ => format!("{:.1}", ms(record.completed)),
    };
    let op = match &record.op {
        Op::Create { attrs } => format!("Create {attrs:?}"),
        Op::Get { id } => format!("Get {}", short(id)),
        Op::Update {
            id,
            set,
            remove,
            expected_version,
        } => format!(
            "Update {} set {set:?} remove {remove:?} if version {expected_version:?}",
            short(id)
        ),
        Op::Destroy { id } => format!("Destroy {}", short(id)),
        Op::Regenerate { id } => format!("Regenerate {}", short(id)),
    };
    let outcome = match &record.outcome {
        Outcome::Created { id, value } => format!("Created {} {value:?}", short(id)),
        other => format!("{other:?}"),
    };
    format!("[{:.1}, {end}] {op} -> {outcome}", ms(record.invoked))
}
