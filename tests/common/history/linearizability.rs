//! The linearizability check: each session's records become a history of register steps,
//! and todc-utils' WGL checker looks for an order that explains them.

use std::collections::BTreeMap;
use std::time::Instant;

use todc_utils::linearizability::history::{Action, History};
use todc_utils::{Specification, WGLChecker};

use super::{show, target, Op, Outcome, Record, SessionId, Value};

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
pub(super) struct SessionStep {
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
pub(super) fn by_session(history: &[Record]) -> BTreeMap<SessionId, Vec<SessionStep>> {
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
pub(super) fn session_linearizable(steps: &[SessionStep]) -> bool {
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
                Outcome::Replayed { version } => *version >= updated.version,
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
pub(super) fn render(steps: &[SessionStep], history: &[Record]) -> String {
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
