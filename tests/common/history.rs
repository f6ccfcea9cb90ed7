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
//! - It is a young crate with one author (2023), and we pin its minor version. The tests in
//!   tests/history.rs hold its answers to hand-made histories, so a regression in it would show.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use sessiond::api::pb;
use todc_utils::linearizability::history::{Action, History};
use todc_utils::{Specification, WGLChecker};

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
/// - Update: `Updated`, `Conflict`, `NotFound` or `Indeterminate`.
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
        }
    }
}

/// The first characters of a session ID: enough to tell sessions apart in a report, and never
/// the full ID (STYLE.md, 7).
fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

/// Checks that every session's history is linearizable, one session at a time.
pub fn linearizable(history: &[Record]) -> Result<(), Vec<Violation>> {
    let violations: Vec<Violation> = by_session(history)
        .into_iter()
        .filter(|(_, steps)| !session_linearizable(steps))
        .map(|(session, steps)| Violation::NotLinearizable {
            session,
            history: render(&steps, history),
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
            (Op::Update { id, .. }, Outcome::Updated { version }) => {
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

/// The session an operation names, if it names one (a Create does not).
fn target(op: &Op) -> Option<&SessionId> {
    match op {
        Op::Create { .. } => None,
        Op::Get { id } | Op::Update { id, .. } | Op::Destroy { id } | Op::Regenerate { id } => {
            Some(id)
        }
    }
}

/// What one record did to one session's register.
#[derive(Clone, Debug)]
enum Step {
    /// The session began with this value: the new ID of an acknowledged Regenerate.
    Born(Value),
    /// The record, on the session it names (or, for a Create, the one it created).
    Op(Op, Outcome),
}

/// One record's part in one session's history.
#[derive(Clone, Debug)]
struct SessionStep {
    /// Its index in the whole history, for printing.
    record: usize,
    step: Step,
    invoked: Instant,
    /// `None` when it is indeterminate: it may take effect at any time after `invoked`.
    completed: Option<Instant>,
}

/// Splits the history into one list of steps per session. Records that tell nothing about any
/// session are left out: a Create that returned no ID, a read that returned nothing, and a
/// refusal that changed nothing.
fn by_session(history: &[Record]) -> BTreeMap<SessionId, Vec<SessionStep>> {
    let mut sessions: BTreeMap<SessionId, Vec<SessionStep>> = BTreeMap::new();
    for (i, record) in history.iter().enumerate() {
        let completed = match record.outcome {
            Outcome::Indeterminate => None,
            _ => Some(record.completed),
        };
        let mut add = |id: &SessionId, step: Step| {
            sessions.entry(id.clone()).or_default().push(SessionStep {
                record: i,
                step,
                invoked: record.invoked,
                completed,
            });
        };
        let this = Step::Op(record.op.clone(), record.outcome.clone());
        match (&record.op, &record.outcome) {
            (_, Outcome::Failed(_)) | (Op::Get { .. }, Outcome::Indeterminate) => {}
            (Op::Create { .. }, Outcome::Created { id, .. }) => add(id, this),
            (Op::Create { .. }, _) => {}
            (Op::Regenerate { id: old }, Outcome::Created { id: new, value }) => {
                add(old, this);
                add(new, Step::Born(value.clone()));
            }
            (op, _) => add(
                target(op).expect("every op but Create names a session"),
                this,
            ),
        }
    }
    sessions
}

/// Runs the WGL checker over one session's steps.
fn session_linearizable(steps: &[SessionStep]) -> bool {
    if steps.is_empty() {
        return true;
    }
    /// When an action happens. `Never` sorts after every instant: it is the response of an
    /// indeterminate operation.
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    enum At {
        Instant(Instant),
        Never,
    }
    // At equal instants, calls go first: operations that merely touch count as concurrent,
    // which can only make the check more lenient, never wrong.
    let mut events: Vec<(At, bool, usize)> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        events.push((At::Instant(step.invoked), false, i));
        let end = step.completed.map_or(At::Never, At::Instant);
        events.push((end, true, i));
    }
    events.sort();
    // One process per operation: the order of the actions carries the real-time order.
    let actions = events
        .into_iter()
        .map(|(_, is_response, i)| {
            let step = steps[i].step.clone();
            let action = if is_response {
                Action::Response(step)
            } else {
                Action::Call(step)
            };
            (i, action)
        })
        .collect();
    WGLChecker::<SessionSpec>::is_linearizable(History::from_actions(actions))
}

/// One session as a sequential object. `None` is "no live session with this ID": never
/// created yet, destroyed, or regenerated away. IDs are never reused, so these need no telling
/// apart.
struct SessionSpec;

impl Specification for SessionSpec {
    type State = Option<Value>;
    type Operation = Step;

    fn init() -> Self::State {
        None
    }

    fn apply(step: &Step, state: &Option<Value>) -> (bool, Option<Value>) {
        match after(step, state) {
            Some(next) => (true, next),
            None => (false, state.clone()),
        }
    }
}

/// The session's state after `step`, or `None` if `step` could not have seen `state`.
fn after(step: &Step, state: &Option<Value>) -> Option<Option<Value>> {
    let (op, outcome) = match step {
        Step::Born(value) => return state.is_none().then(|| Some(value.clone())),
        Step::Op(op, outcome) => (op, outcome),
    };
    let gone = Some(None);
    match (op, outcome) {
        (Op::Create { attrs }, Outcome::Created { value, .. }) => {
            let fresh = state.is_none() && value.version == 1 && value.attrs == *attrs;
            fresh.then(|| Some(value.clone()))
        }

        (Op::Get { .. }, Outcome::Found(value)) => {
            (state.as_ref() == Some(value)).then(|| state.clone())
        }
        (Op::Get { .. }, Outcome::NotFound) => state.is_none().then_some(None),

        (
            Op::Update {
                set,
                remove,
                expected_version,
                ..
            },
            outcome,
        ) => {
            let Some(current) = state else {
                return matches!(outcome, Outcome::NotFound | Outcome::Indeterminate)
                    .then_some(None);
            };
            let applies = expected_version.is_none_or(|v| v == current.version);
            if !applies {
                // Nothing changes, whether the client heard ABORTED or never heard.
                let valid = matches!(outcome, Outcome::Conflict | Outcome::Indeterminate);
                return valid.then(|| state.clone());
            }
            let mut updated = current.clone();
            updated
                .attrs
                .extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
            for key in remove {
                updated.attrs.remove(key);
            }
            updated.version += 1;
            let valid = match outcome {
                Outcome::Updated { version } => *version == updated.version,
                Outcome::Indeterminate => true,
                _ => false,
            };
            valid.then_some(Some(updated))
        }

        (Op::Destroy { .. }, Outcome::Destroyed { existed }) => {
            (*existed == state.is_some()).then_some(None)
        }
        (Op::Destroy { .. }, Outcome::NotFound) => state.is_none().then_some(None),
        (Op::Destroy { .. }, Outcome::Indeterminate) => gone,

        (Op::Regenerate { .. }, Outcome::Created { value: moved, .. }) => {
            let kept = state
                .as_ref()
                .is_some_and(|old| moved.attrs == old.attrs && moved.version == old.version + 1);
            kept.then_some(None)
        }
        (Op::Regenerate { .. }, Outcome::NotFound) => state.is_none().then_some(None),
        (Op::Regenerate { .. }, Outcome::Indeterminate) => gone,

        // An outcome that does not fit the operation explains nothing.
        _ => None,
    }
}

/// One session's steps, one a line, with times in milliseconds from the history's start.
fn render(steps: &[SessionStep], history: &[Record]) -> String {
    let origin = history[0].invoked;
    steps
        .iter()
        .map(|s| {
            let record = &history[s.record];
            match &s.step {
                Step::Born(_) => format!("  (born of) {}", show(record, origin)),
                Step::Op(..) => format!("  {}", show(record, origin)),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
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
