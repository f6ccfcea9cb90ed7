//! The chaos suite's history checks, on hand-made histories: the good ones pass, and each
//! kind of bad one is caught.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::history::{
    acknowledged_writes_survive, digests_agree, linearizable, regenerated_ids_dead, Attrs, Op,
    Outcome, Record, Recorder, Value, Violation,
};

/// Builds histories on a timeline in milliseconds.
struct Timeline {
    origin: Instant,
    records: Vec<Record>,
}

impl Timeline {
    fn new() -> Timeline {
        Timeline {
            origin: Instant::now(),
            records: Vec::new(),
        }
    }

    /// Records `op`, invoked at `from` ms and completed at `to` ms with `outcome`.
    fn op(&mut self, from: u64, to: u64, op: Op, outcome: Outcome) -> &mut Timeline {
        let at = |ms| self.origin + Duration::from_millis(ms);
        self.records.push(Record {
            op,
            outcome,
            invoked: at(from),
            completed: at(to),
        });
        self
    }

    /// Creates session `id` holding `k = v`, version 1.
    fn create(&mut self, from: u64, to: u64, id: &str, v: &str) -> &mut Timeline {
        self.op(
            from,
            to,
            Op::Create { attrs: k(v) },
            Outcome::Created {
                id: id.into(),
                value: value(v, 1),
            },
        )
    }

    /// Sets `k = v` on `id`, unconditionally.
    fn set(&mut self, from: u64, to: u64, id: &str, v: &str, outcome: Outcome) -> &mut Timeline {
        self.op(from, to, set(id, v, None), outcome)
    }

    /// Reads `id`.
    fn get(&mut self, from: u64, to: u64, id: &str, outcome: Outcome) -> &mut Timeline {
        self.op(from, to, Op::Get { id: id.into() }, outcome)
    }

    fn history(&self) -> Vec<Record> {
        self.records.clone()
    }
}

/// The attributes `{k: v}`.
fn k(v: &str) -> Attrs {
    Attrs::from([("k".to_string(), bytes::Bytes::copy_from_slice(v.as_bytes()))])
}

fn value(v: &str, version: u64) -> Value {
    Value {
        attrs: k(v),
        version,
    }
}

fn found(v: &str, version: u64) -> Outcome {
    Outcome::Found(value(v, version))
}

fn set(id: &str, v: &str, expected_version: Option<u64>) -> Op {
    Op::Update {
        id: id.into(),
        set: k(v),
        remove: Vec::new(),
        expected_version,
    }
}

fn updated(version: u64) -> Outcome {
    Outcome::Updated { version }
}

/// The sessions a check flagged as not linearizable.
fn not_linearizable(history: &[Record]) -> Vec<String> {
    match linearizable(history) {
        Ok(()) => Vec::new(),
        Err(violations) => violations
            .into_iter()
            .map(|v| match v {
                Violation::NotLinearizable { session, .. } => session,
                other => panic!("unexpected {other}"),
            })
            .collect(),
    }
}

fn finals(reads: &[(&str, Option<Value>)]) -> HashMap<String, Option<Value>> {
    reads
        .iter()
        .map(|(id, v)| (id.to_string(), v.clone()))
        .collect()
}

#[test]
fn a_linearizable_history_passes() {
    // s: ----create(1)----update(2)-----------CAS v1 (conflict)---destroy---
    //                      |  get(1)  get(2) | CAS v2 (3)  get(3)           get: none
    // t: concurrent with all of it, on its own.
    let mut t = Timeline::new();
    t.create(0, 10, "s", "1")
        .create(5, 15, "t", "a")
        .set(20, 40, "s", "2", updated(2))
        .get(25, 30, "s", found("1", 1))
        .set(26, 45, "t", "b", updated(2))
        .get(35, 50, "s", found("2", 2))
        .op(60, 70, set("s", "3", Some(1)), Outcome::Conflict)
        .op(60, 75, set("s", "3", Some(2)), updated(3))
        .get(80, 90, "s", found("3", 3))
        .op(
            100,
            110,
            Op::Destroy { id: "s".into() },
            Outcome::Destroyed { existed: true },
        )
        .get(120, 130, "s", Outcome::NotFound)
        .get(120, 130, "t", found("b", 2));
    let history = t.history();

    assert_eq!(linearizable(&history), Ok(()));
    assert_eq!(regenerated_ids_dead(&history), Ok(()));
    let finals = finals(&[("s", None), ("t", Some(value("b", 2)))]);
    assert_eq!(acknowledged_writes_survive(&history, &finals), Ok(()));
}

#[test]
fn a_stale_read_fails() {
    // The update completed before the read began, yet the read saw the value before it.
    let mut t = Timeline::new();
    t.create(0, 10, "s", "1")
        .set(20, 30, "s", "2", updated(2))
        .get(40, 50, "s", found("1", 1));
    assert_eq!(not_linearizable(&t.history()), ["s"]);

    // The same read, concurrent with the update, is fine.
    let mut t = Timeline::new();
    t.create(0, 10, "s", "1")
        .set(20, 30, "s", "2", updated(2))
        .get(25, 50, "s", found("1", 1));
    assert_eq!(linearizable(&t.history()), Ok(()));
}

#[test]
fn reads_that_go_back_in_time_fail() {
    // Two reads, each concurrent with the update, but the later one sees the older value.
    let mut t = Timeline::new();
    t.create(0, 10, "s", "1")
        .set(20, 100, "s", "2", updated(2))
        .get(30, 40, "s", found("2", 2))
        .get(50, 60, "s", found("1", 1));
    assert_eq!(not_linearizable(&t.history()), ["s"]);
}

#[test]
fn a_lost_acknowledged_write_fails() {
    let mut t = Timeline::new();
    t.create(0, 10, "s", "1").set(20, 30, "s", "2", updated(2));
    let before_heal = t.history();
    // After the heal, the final read finds the session as it was before the update.
    t.get(100, 110, "s", found("1", 1));

    assert_eq!(not_linearizable(&t.history()), ["s"]);
    let lost = acknowledged_writes_survive(&before_heal, &finals(&[("s", Some(value("1", 1)))]));
    assert!(
        matches!(&lost.unwrap_err()[..], [Violation::LostWrite { session, .. }] if session == "s")
    );
    let gone = acknowledged_writes_survive(&before_heal, &finals(&[("s", None)]));
    assert!(matches!(
        &gone.unwrap_err()[..],
        [Violation::LostWrite { .. }]
    ));
    let unread = acknowledged_writes_survive(&before_heal, &HashMap::new());
    assert!(matches!(
        &unread.unwrap_err()[..],
        [Violation::NoFinalRead { .. }]
    ));
    let newer = acknowledged_writes_survive(&before_heal, &finals(&[("s", Some(value("3", 3)))]));
    assert_eq!(newer, Ok(()));
}

#[test]
fn a_destroyed_session_that_comes_back_fails() {
    let mut t = Timeline::new();
    t.create(0, 10, "s", "1").op(
        20,
        30,
        Op::Destroy { id: "s".into() },
        Outcome::Destroyed { existed: true },
    );
    let came_back =
        acknowledged_writes_survive(&t.history(), &finals(&[("s", Some(value("1", 1)))]));
    assert!(matches!(
        &came_back.unwrap_err()[..],
        [Violation::LostWrite { .. }]
    ));
}

#[test]
fn an_indeterminate_write_may_have_taken_effect_or_not() {
    let write = |t: &mut Timeline| {
        t.create(0, 10, "s", "1")
            .set(20, 30, "s", "2", Outcome::Indeterminate);
    };

    let mut took_effect = Timeline::new();
    write(&mut took_effect);
    took_effect.get(40, 50, "s", found("2", 2));
    assert_eq!(linearizable(&took_effect.history()), Ok(()));

    let did_not = {
        let mut t = Timeline::new();
        write(&mut t);
        t.get(40, 50, "s", found("1", 1));
        t
    };
    assert_eq!(linearizable(&did_not.history()), Ok(()));

    // It may even take effect after the client gave up, between two later reads.
    let mut late = Timeline::new();
    write(&mut late);
    late.get(40, 50, "s", found("1", 1))
        .get(60, 70, "s", found("2", 2));
    assert_eq!(linearizable(&late.history()), Ok(()));
    assert_eq!(
        acknowledged_writes_survive(&late.history(), &finals(&[("s", Some(value("1", 1)))])),
        Ok(())
    );

    // But once seen, it cannot be undone.
    let mut undone = Timeline::new();
    write(&mut undone);
    undone
        .get(40, 50, "s", found("2", 2))
        .get(60, 70, "s", found("1", 1));
    assert_eq!(not_linearizable(&undone.history()), ["s"]);

    // Nor can it explain a value nobody wrote.
    let mut invented = Timeline::new();
    write(&mut invented);
    invented.get(40, 50, "s", found("9", 2));
    assert_eq!(not_linearizable(&invented.history()), ["s"]);
}

#[test]
fn an_indeterminate_destroy_may_explain_a_missing_session() {
    let mut t = Timeline::new();
    t.create(0, 10, "s", "1").op(
        20,
        30,
        Op::Destroy { id: "s".into() },
        Outcome::Indeterminate,
    );
    let history = t.history();
    assert_eq!(
        acknowledged_writes_survive(&history, &finals(&[("s", None)])),
        Ok(())
    );
    assert_eq!(
        acknowledged_writes_survive(&history, &finals(&[("s", Some(value("1", 1)))])),
        Ok(())
    );
}

#[test]
fn a_conflict_without_a_version_change_fails() {
    let mut t = Timeline::new();
    t.create(0, 10, "s", "1")
        .op(20, 30, set("s", "2", Some(1)), Outcome::Conflict);
    assert_eq!(not_linearizable(&t.history()), ["s"]);

    let mut t = Timeline::new();
    t.create(0, 10, "s", "1")
        .op(20, 30, set("s", "2", Some(1)), updated(2));
    assert_eq!(linearizable(&t.history()), Ok(()));
}

/// `s` is regenerated to `n` over [20, 30] ms, keeping its attributes.
fn regenerated() -> Timeline {
    let mut t = Timeline::new();
    t.create(0, 10, "s", "1").op(
        20,
        30,
        Op::Regenerate { id: "s".into() },
        Outcome::Created {
            id: "n".into(),
            value: value("1", 2),
        },
    );
    t
}

#[test]
fn a_regenerated_id_is_dead_for_operations_that_start_after_it_returned() {
    let mut t = regenerated();
    // A read that began before the Regenerate returned may still see the old ID.
    t.get(25, 35, "s", found("1", 1))
        .get(40, 50, "s", Outcome::NotFound)
        .get(40, 50, "n", found("1", 2))
        .set(55, 60, "n", "2", updated(3));
    let history = t.history();
    assert_eq!(regenerated_ids_dead(&history), Ok(()));
    assert_eq!(linearizable(&history), Ok(()));
    let finals = finals(&[("s", None), ("n", Some(value("2", 3)))]);
    assert_eq!(acknowledged_writes_survive(&history, &finals), Ok(()));
}

#[test]
fn an_old_id_alive_after_its_regenerate_returned_fails() {
    let mut alive = regenerated();
    alive.get(40, 50, "s", found("1", 1));
    let history = alive.history();
    assert!(matches!(
        &regenerated_ids_dead(&history).unwrap_err()[..],
        [Violation::OldIdAlive { old, .. }] if old == "s"
    ));
    assert_eq!(not_linearizable(&history), ["s"]);

    // A conflict says the session is there too.
    let mut conflict = regenerated();
    conflict.op(40, 50, set("s", "2", Some(7)), Outcome::Conflict);
    assert!(regenerated_ids_dead(&conflict.history()).is_err());
}

#[test]
fn a_regenerate_must_carry_the_session_over() {
    let mut t = Timeline::new();
    t.create(0, 10, "s", "1").op(
        20,
        30,
        Op::Regenerate { id: "s".into() },
        Outcome::Created {
            id: "n".into(),
            value: value("other", 2),
        },
    );
    assert_eq!(not_linearizable(&t.history()), ["s"]);
}

#[test]
fn digests_must_all_agree() {
    assert_eq!(digests_agree(&[(1, "abc"), (2, "abc"), (3, "abc")]), Ok(()));
    assert!(matches!(
        digests_agree(&[(1, "abc"), (2, "abd"), (3, "abc")]),
        Err(Violation::DigestsDiffer { .. })
    ));
    assert_eq!(digests_agree::<u8, u8>(&[]), Ok(()));
}

#[test]
fn the_recorder_notes_outcomes_and_treats_the_abandoned_as_indeterminate() {
    let recorder = Recorder::new();
    let first = recorder.invoke(Op::Get { id: "a".into() });
    let second = recorder.invoke(Op::Destroy { id: "b".into() });
    second.complete(Outcome::Destroyed { existed: false });
    drop(first);

    let history = recorder.history();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].op, Op::Get { id: "a".into() });
    assert_eq!(history[0].outcome, Outcome::Indeterminate);
    assert_eq!(history[1].outcome, Outcome::Destroyed { existed: false });
    assert!(history[0].invoked <= history[1].invoked);
    assert!(history.iter().all(|r| r.invoked <= r.completed));
}

#[test]
fn only_decided_refusals_are_definite() {
    use tonic::Status;
    assert_eq!(
        Outcome::from_status(&Status::not_found("gone")),
        Outcome::NotFound
    );
    assert_eq!(
        Outcome::from_status(&Status::aborted("version")),
        Outcome::Conflict
    );
    assert!(matches!(
        Outcome::from_status(&Status::resource_exhausted("cap")),
        Outcome::Failed(_)
    ));
    for status in [
        Status::unavailable("no leader"),
        Status::deadline_exceeded("slow"),
        Status::cancelled("timeout"),
        Status::unknown("h2"),
        Status::internal("?"),
    ] {
        assert_eq!(Outcome::from_status(&status), Outcome::Indeterminate);
    }
}
