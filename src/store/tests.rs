//! Store unit tests: the session rules, without gRPC, on a manual clock.

use std::sync::Mutex;
use std::time::Duration;

use std::collections::HashSet;

use super::events::{EndCause, Event, EventSink};
use super::*;

const T0: Millis = 1_700_000_000_000;
const MIN: Duration = Duration::from_secs(60);

fn store_with(limits: Limits) -> Store {
    Store::new(limits, 8, Clock::manual(T0), Box::new(events::Discard))
}

fn store() -> Store {
    store_with(Limits::default())
}

fn attrs(pairs: &[(&str, &str)]) -> Vec<(String, Bytes)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

fn create(store: &Store, user: Option<&str>) -> Session {
    store
        .create(NewSession {
            user: user.map(str::to_owned),
            attributes: attrs(&[("cart", "apple")]),
            ..NewSession::default()
        })
        .unwrap()
}

fn id(s: &Session) -> String {
    s.key.encode()
}

/// An update that sets these attributes and nothing else.
fn set_attrs(pairs: &[(&str, &str)]) -> Change {
    Change {
        set: attrs(pairs),
        ..Change::default()
    }
}

/// A session of about 750 bytes by the store's accounting (one 500-byte value), for the
/// memory-cap tests.
fn blob(user: Option<&str>) -> NewSession {
    NewSession {
        user: user.map(str::to_owned),
        attributes: attrs(&[("blob", &"v".repeat(500))]),
        ..NewSession::default()
    }
}

#[test]
fn create_then_get_returns_what_was_stored() {
    let st = store();
    let s = create(&st, Some("alice"));
    assert_eq!(s.version, 1);
    assert_eq!(s.user.as_deref(), Some("alice"));
    assert_eq!(s.expires_at(), T0 + 30 * 60 * 1000);
    assert_eq!(s.absolute_expires_at, T0 + 24 * 3600 * 1000);
    let got = st.get(&id(&s), false).unwrap();
    assert_eq!(got, s);
    assert_eq!(st.stats().sessions, 1);
    assert_eq!(st.stats().users, 1);
}

#[test]
fn malformed_ids_are_rejected_before_lookup_and_unknown_ids_are_not_found() {
    let st = store();
    assert!(matches!(st.get("nope", false), Err(StoreError::BadId(_))));
    let unknown = SessionKey::generate().encode();
    assert_eq!(st.get(&unknown, false), Err(StoreError::NotFound));
    assert_eq!(st.destroy(&unknown), Ok(false));
}

#[test]
fn idle_timeout_slides_on_get_but_not_on_peek() {
    let st = store();
    let s = create(&st, None);
    st.clock().advance(20 * MIN);
    st.get(&id(&s), true).unwrap();
    st.clock().advance(11 * MIN);
    // 31 minutes since the last sliding access: dead, although the peek was 11 minutes ago.
    assert_eq!(st.get(&id(&s), false), Err(StoreError::NotFound));

    let s = create(&st, None);
    st.clock().advance(20 * MIN);
    st.get(&id(&s), false).unwrap();
    st.clock().advance(20 * MIN);
    assert!(st.touch(&id(&s)).is_ok());
    st.clock().advance(29 * MIN);
    assert!(st.get(&id(&s), true).is_ok());
    st.clock().advance(MIN);
    assert_eq!(st.touch(&id(&s)), Err(StoreError::NotFound));
}

#[test]
fn nothing_slides_past_the_absolute_deadline() {
    let st = store();
    let s = st
        .create(NewSession {
            idle_timeout: Some(10 * MIN),
            absolute_timeout: Some(25 * MIN),
            ..NewSession::default()
        })
        .unwrap();
    st.clock().advance(9 * MIN);
    st.touch(&id(&s)).unwrap();
    st.clock().advance(9 * MIN);
    let expires = st.touch(&id(&s)).unwrap();
    assert_eq!(expires, T0 + 25 * 60 * 1000);
    st.clock().advance(7 * MIN);
    assert_eq!(st.get(&id(&s), false), Err(StoreError::NotFound));
}

#[test]
fn expired_sessions_are_unreachable_before_the_reaper_and_freed_by_it() {
    let st = store();
    let s = create(&st, Some("bob"));
    st.clock().advance(30 * MIN);
    assert_eq!(st.get(&id(&s), false), Err(StoreError::NotFound));
    assert_eq!(
        st.update(&id(&s), Change::default()),
        Err(StoreError::NotFound)
    );
    assert_eq!(
        st.regenerate(&id(&s), Rotation::default()),
        Err(StoreError::NotFound)
    );
    assert!(st.list_user("bob", false).unwrap().is_empty());
    assert_eq!(st.stats().sessions, 1, "memory is the reaper's job");
    let r = st.reap(100);
    assert_eq!(r.expired, 1);
    assert_eq!(
        st.stats(),
        Stats {
            sessions: 0,
            bytes: 0,
            users: 0
        }
    );
    assert_eq!(st.wheel_len(), 0);
}

#[test]
fn reaper_refiles_touched_sessions_instead_of_freeing_them() {
    let st = store();
    let s = create(&st, None);
    st.clock().advance(29 * MIN);
    st.touch(&id(&s)).unwrap();
    st.clock().advance(2 * MIN);
    let r = st.reap(100);
    assert_eq!((r.expired, r.refiled), (0, 1));
    assert!(st.get(&id(&s), true).is_ok());
    st.clock().advance(30 * MIN);
    assert_eq!(st.reap(100).expired, 1);
}

#[test]
fn reaper_work_is_bounded_per_batch() {
    let st = store();
    for _ in 0..25 {
        create(&st, None);
    }
    st.clock().advance(31 * MIN);
    let first = st.reap(10);
    assert_eq!(first.expired, 10);
    assert!(first.more);
    assert!(first.lag.unwrap() >= 60_000);
    assert_eq!(st.reap(10).expired, 10);
    let last = st.reap(10);
    assert_eq!(last.expired, 5);
    assert!(!last.more);
    assert_eq!(st.stats().sessions, 0);
}

#[test]
fn update_is_partial_and_versioned() {
    let st = store();
    let s = create(&st, None);
    let u = st
        .update(
            &id(&s),
            Change {
                set: attrs(&[("theme", "dark")]),
                remove: vec!["cart".into(), "missing".into()],
                expected_version: Some(1),
                idempotency_key: None,
            },
        )
        .unwrap();
    assert_eq!(u.version, 2);
    assert_eq!(u.attributes.len(), 1);
    assert_eq!(u.attributes["theme"], Bytes::from_static(b"dark"));

    let err = st
        .update(
            &id(&s),
            Change {
                set: attrs(&[("theme", "light")]),
                expected_version: Some(1),
                ..Change::default()
            },
        )
        .unwrap_err();
    assert_eq!(
        err,
        StoreError::VersionMismatch {
            expected: 1,
            current: 2
        }
    );
    let now = st.get(&id(&s), true).unwrap();
    assert_eq!(now.version, 2);
    assert_eq!(now.attributes["theme"], Bytes::from_static(b"dark"));
}

#[test]
fn removing_a_key_twice_removes_it_once() {
    let st = store();
    let s = create(&st, None);
    let before = st.stats().bytes;
    let u = st
        .update(
            &id(&s),
            Change {
                remove: vec!["cart".into(), "cart".into()],
                ..Change::default()
            },
        )
        .unwrap();
    assert!(u.attributes.is_empty());
    assert_eq!(
        st.stats().bytes,
        before - ("cart".len() + "apple".len() + ATTRIBUTE_OVERHEAD_BYTES)
    );
}

#[test]
fn limit_failures_change_nothing_and_name_the_limit() {
    let st = store_with(Limits {
        max_attributes: 2,
        max_value_bytes: 8,
        max_key_bytes: 4,
        ..Limits::default()
    });
    let s = create(&st, None);
    let before = st.get(&id(&s), true).unwrap();
    let cases = [
        (attrs(&[("a", "1"), ("b", "2")]), "max_attributes"),
        (attrs(&[("a", "123456789")]), "max_value_bytes"),
        (attrs(&[("toolong", "1")]), "max_key_bytes"),
    ];
    for (set, limit) in cases {
        let err = st
            .update(
                &id(&s),
                Change {
                    set,
                    ..Change::default()
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains(limit), "{err} should name {limit}");
        assert_eq!(st.get(&id(&s), true).unwrap(), before);
    }
    let err = st
        .update(
            &id(&s),
            Change {
                set: attrs(&[("a", "1")]),
                remove: vec!["a".into()],
                ..Change::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)));
    assert_eq!(st.get(&id(&s), true).unwrap(), before);
}

#[test]
fn session_byte_limit_counts_the_whole_session() {
    let st = store_with(Limits {
        max_session_bytes: 1024,
        ..Limits::default()
    });
    let s = create(&st, None);
    let big = "x".repeat(400);
    st.update(&id(&s), set_attrs(&[("a", &big)])).unwrap();
    let err = st.update(&id(&s), set_attrs(&[("b", &big)])).unwrap_err();
    assert!(err.to_string().contains("max_session_bytes"), "{err}");
    // Replacing a value with one of the same size fits.
    st.update(&id(&s), set_attrs(&[("a", &big)])).unwrap();
}

#[test]
fn regenerate_moves_the_session_and_kills_the_old_id() {
    let st = store();
    let s = create(&st, None);
    st.clock().advance(MIN);
    let r = st.regenerate(&id(&s), Rotation::default()).unwrap();
    assert_ne!(r.key, s.key);
    assert_eq!(r.version, 2);
    assert_eq!(r.attributes, s.attributes);
    assert_eq!(
        r.absolute_expires_at, s.absolute_expires_at,
        "rotation keeps the cap"
    );
    assert_eq!(r.created_at, s.created_at);
    assert_eq!(st.get(&id(&s), false), Err(StoreError::NotFound));
    assert_eq!(
        st.update(&id(&s), Change::default()),
        Err(StoreError::NotFound)
    );
    assert_eq!(st.get(&id(&r), false).unwrap().key, r.key);
    assert_eq!(st.stats().sessions, 1);
}

#[test]
fn regenerate_keeps_the_slot_and_draws_fresh_random_bits() {
    use crate::session::Slot;
    let st = store();
    for _ in 0..4 {
        let first = create(&st, None);
        let slot = Slot::of(&first.key);
        let mut current = first.key;
        let mut tails = HashSet::from([*current.random_tail()]);
        for round in 0..100 {
            // Plain rotations, logins and attribute drops all keep the slot.
            let rotation = Rotation {
                user: (round % 3 == 1).then(|| format!("user{round}")),
                drop_attributes: round % 5 == 4,
                idempotency_key: None,
            };
            let r = st.regenerate(&current.encode(), rotation).unwrap();
            assert_eq!(Slot::of(&r.key), slot, "round {round}");
            assert!(tails.insert(*r.key.random_tail()), "random bits repeat");
            current = r.key;
        }
        assert_eq!(st.get(&current.encode(), true).unwrap().key, current);
    }
    assert_eq!(st.stats().sessions, 4);
}

#[test]
fn login_regenerate_binds_the_user_and_starts_a_fresh_lifetime() {
    let st = store();
    let anon = create(&st, None);
    for _ in 0..2 {
        st.clock().advance(29 * MIN);
        st.touch(&id(&anon)).unwrap();
    }
    let r = st
        .regenerate(
            &id(&anon),
            Rotation {
                user: Some("carol".into()),
                drop_attributes: false,
                idempotency_key: None,
            },
        )
        .unwrap();
    let now = st.clock().now();
    assert_eq!(r.user.as_deref(), Some("carol"));
    assert_eq!(r.created_at, now);
    assert_eq!(r.absolute_expires_at, now + 24 * 3600 * 1000);
    assert_eq!(r.attributes["cart"], Bytes::from_static(b"apple"));
    let listed = st.list_user("carol", false).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, r.key);
    assert!(listed[0].attributes.is_empty());

    let dropped = st
        .regenerate(
            &id(&r),
            Rotation {
                user: None,
                drop_attributes: true,
                idempotency_key: None,
            },
        )
        .unwrap();
    assert!(dropped.attributes.is_empty());
    assert_eq!(dropped.absolute_expires_at, r.absolute_expires_at);
    assert_eq!(st.list_user("carol", false).unwrap()[0].key, dropped.key);
}

#[test]
fn user_index_lists_and_destroys_exactly_the_live_sessions() {
    let st = store();
    let a = create(&st, Some("dave"));
    let b = create(&st, Some("dave"));
    let c = create(&st, Some("dave"));
    let other = create(&st, Some("erin"));
    st.destroy(&id(&c)).unwrap();
    let listed: Vec<_> = st
        .list_user("dave", false)
        .unwrap()
        .iter()
        .map(|s| s.key)
        .collect();
    assert_eq!(listed, vec![a.key, b.key]);

    assert_eq!(st.destroy_user("dave", Some(&id(&a))).unwrap(), 1);
    assert!(st.get(&id(&a), true).is_ok());
    assert_eq!(st.get(&id(&b), true), Err(StoreError::NotFound));
    assert!(st.get(&id(&other), true).is_ok());
    assert_eq!(st.destroy_user("dave", None).unwrap(), 1);
    assert_eq!(st.stats().users, 1, "dave's index entry is gone");
    assert!(matches!(
        st.list_user("", false),
        Err(StoreError::Invalid(_))
    ));
}

#[test]
fn per_user_limit_denies_and_ignores_dead_sessions() {
    let st = store_with(Limits {
        max_sessions_per_user: 2,
        ..Limits::default()
    });
    create(&st, Some("fay"));
    create(&st, Some("fay"));
    let err = st
        .create(NewSession {
            user: Some("fay".into()),
            ..NewSession::default()
        })
        .unwrap_err();
    assert!(err.to_string().contains("max_sessions_per_user"), "{err}");
    assert_eq!(st.stats().sessions, 2, "a denied create leaves no trace");
    st.clock().advance(31 * MIN);
    create(&st, Some("fay"));
}

#[test]
fn per_user_limit_can_evict_the_oldest_session_instead() {
    let st = store_with(Limits {
        max_sessions_per_user: 2,
        per_user_policy: PerUserPolicy::EvictOldest,
        ..Limits::default()
    });
    let first = create(&st, Some("gil"));
    st.clock().advance(MIN);
    let second = create(&st, Some("gil"));
    st.clock().advance(MIN);
    // The oldest is evicted even though it was used most recently.
    st.touch(&id(&first)).unwrap();
    let third = create(&st, Some("gil"));
    assert_eq!(st.get(&id(&first), true), Err(StoreError::NotFound));
    let listed: Vec<_> = st
        .list_user("gil", false)
        .unwrap()
        .iter()
        .map(|s| s.key)
        .collect();
    assert_eq!(listed, vec![second.key, third.key]);
    // A login into a full account evicts too.
    let anon = create(&st, None);
    st.regenerate(
        &id(&anon),
        Rotation {
            user: Some("gil".into()),
            drop_attributes: false,
            idempotency_key: None,
        },
    )
    .unwrap();
    assert_eq!(st.get(&id(&second), true), Err(StoreError::NotFound));
    assert_eq!(st.list_user("gil", false).unwrap().len(), 2);
    assert_eq!(st.stats().sessions, 2);
}

#[test]
fn memory_cap_evicts_anonymous_sessions_first_then_the_longest_idle() {
    const CAP: usize = 3 * 1024;
    let st = store_with(Limits {
        max_memory_bytes: CAP,
        ..Limits::default()
    });
    // About 750 bytes each by the store's accounting: four fit under the cap, five do not.
    let mut made = Vec::new();
    for user in [Some("alice"), None, Some("bob"), None] {
        made.push(st.create(blob(user)).unwrap());
        st.clock().advance(MIN);
    }
    let [alice, anon_old, bob, anon_new] = <[Session; 4]>::try_from(made).unwrap();
    let gone = |s: &Session| st.get(&id(s), true) == Err(StoreError::NotFound);

    // Anonymous first, the longest idle of them first.
    let carol = st.create(blob(Some("carol"))).unwrap();
    assert!(gone(&anon_old));
    assert!(!gone(&anon_new) && !gone(&alice) && !gone(&bob) && !gone(&carol));
    st.clock().advance(MIN);
    let dave = st.create(blob(Some("dave"))).unwrap();
    assert!(gone(&anon_new));
    // No anonymous session left: the longest-idle authenticated one goes, even though it
    // was created first only if it is also idle longest; touch alice so bob is older.
    st.touch(&id(&alice)).unwrap();
    st.clock().advance(MIN);
    st.create(blob(Some("erin"))).unwrap();
    assert!(gone(&bob));
    assert!(!gone(&alice) && !gone(&carol) && !gone(&dave));
    assert!(st.stats().bytes <= CAP);

    let err = st
        .create(NewSession {
            attributes: attrs(&[("blob", &"w".repeat(5000))]),
            ..NewSession::default()
        })
        .unwrap_err();
    assert!(err.to_string().contains("max_memory_bytes"), "{err}");
    assert!(
        !gone(&alice) && !gone(&carol) && !gone(&dave),
        "a hopeless request evicted nobody"
    );
}

#[test]
fn total_session_limit_is_exact() {
    let st = store_with(Limits {
        max_sessions: 3,
        ..Limits::default()
    });
    for _ in 0..3 {
        create(&st, None);
    }
    let err = st.create(NewSession::default()).unwrap_err();
    assert!(matches!(
        err,
        StoreError::Exhausted {
            limit: "max_sessions",
            ..
        }
    ));
}

#[test]
fn timeouts_are_checked_against_their_maximums() {
    let st = store();
    for (idle, abs, what) in [
        (Some(Duration::ZERO), None, "idle_timeout"),
        (
            Some(Duration::from_secs(8 * 24 * 3600)),
            None,
            "max_idle_timeout",
        ),
        (
            None,
            Some(Duration::from_secs(91 * 24 * 3600)),
            "max_absolute_timeout",
        ),
    ] {
        let err = st
            .create(NewSession {
                idle_timeout: idle,
                absolute_timeout: abs,
                ..NewSession::default()
            })
            .unwrap_err();
        assert!(err.to_string().contains(what), "{err}");
    }
}

#[test]
fn concurrent_partial_writes_and_cas_lose_nothing() {
    let st = store();
    let s = create(&st, None);
    let sid = id(&s);
    std::thread::scope(|scope| {
        for t in 0..8 {
            let st = st.clone();
            let sid = sid.clone();
            scope.spawn(move || {
                for i in 0..200 {
                    let key = format!("t{t}");
                    st.update(&sid, set_attrs(&[(&key, &i.to_string())]))
                        .unwrap();
                    // A CAS counter: read, then write back at the version read, retry on conflict.
                    loop {
                        let cur = st.get(&sid, true).unwrap();
                        let n: u64 = cur
                            .attributes
                            .get("counter")
                            .map_or(0, |v| std::str::from_utf8(&v).unwrap().parse().unwrap());
                        let next = (n + 1).to_string();
                        match st.update(
                            &sid,
                            Change {
                                set: attrs(&[("counter", &next)]),
                                expected_version: Some(cur.version),
                                ..Change::default()
                            },
                        ) {
                            Ok(_) => break,
                            Err(StoreError::VersionMismatch { .. }) => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            });
        }
    });
    let end = st.get(&sid, true).unwrap();
    assert_eq!(end.attributes["counter"], Bytes::from("1600"));
    for t in 0..8 {
        assert_eq!(end.attributes[format!("t{t}").as_str()], Bytes::from("199"));
    }
    assert_eq!(end.version, 1 + 8 * 200 * 2);
}

#[test]
fn regenerate_raced_by_writers_keeps_every_acknowledged_write() {
    let st = store_with(Limits {
        max_attributes: 1_000_000,
        max_session_bytes: usize::MAX,
        ..Limits::default()
    });
    let s = create(&st, Some("gus"));
    let sid = id(&s);
    let acked = Mutex::new(Vec::new());
    let new_id = std::thread::scope(|scope| {
        for t in 0..4 {
            let (st, sid, acked) = (st.clone(), sid.clone(), &acked);
            scope.spawn(move || {
                for i in 0.. {
                    let key = format!("w{t}-{i}");
                    match st.update(&sid, set_attrs(&[(&key, "1")])) {
                        Ok(_) => acked.lock().unwrap().push(key),
                        Err(StoreError::NotFound) => break,
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
        // Regenerate only once the writers are demonstrably mid-flight.
        while acked.lock().unwrap().len() < 100 {
            std::thread::yield_now();
        }
        st.regenerate(&sid, Rotation::default()).unwrap()
    });
    let after = st.get(&new_id.key.encode(), true).unwrap();
    let acked = acked.into_inner().unwrap();
    assert!(!acked.is_empty());
    for key in &acked {
        assert!(
            after.attributes.contains_key(key.as_str()),
            "lost acknowledged write {key}"
        );
    }
    assert_eq!(st.list_user("gus", false).unwrap().len(), 1);
}

#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl EventSink for std::sync::Arc<Recorder> {
    fn record(&self, event: &Event<'_>) {
        let name = match event.effect {
            Effect::Create { .. } => "created".to_string(),
            Effect::Update { version, .. } => format!("updated v{version}"),
            Effect::Touch { .. } => "touched".to_string(),
            Effect::Regenerate { .. } => "regenerated".to_string(),
            Effect::End { cause, .. } => format!("ended {cause:?}"),
        };
        self.0.lock().unwrap().push(name);
    }
}

#[test]
fn every_change_emits_one_event() {
    let rec = std::sync::Arc::new(Recorder::default());
    let st = Store::new(
        Limits::default(),
        4,
        Clock::manual(T0),
        Box::new(rec.clone()),
    );
    let s = create(&st, Some("hal"));
    st.get(&id(&s), true).unwrap();
    // Touches are reported once the deadline has moved a quarter of the idle window.
    st.get(&id(&s), false).unwrap();
    st.clock().advance(7 * MIN);
    st.touch(&id(&s)).unwrap();
    st.clock().advance(MIN);
    st.get(&id(&s), false).unwrap();
    st.get(&id(&s), false).unwrap();
    st.update(&id(&s), Change::default()).unwrap();
    let r = st.regenerate(&id(&s), Rotation::default()).unwrap();
    let other = create(&st, Some("hal"));
    st.destroy(&id(&r)).unwrap();
    st.clock().advance(31 * MIN);
    st.reap(10);
    assert!(st.get(&id(&other), true).is_err());
    let seen = rec.0.lock().unwrap().clone();
    let expected = [
        "created",
        "touched",
        "updated v2",
        "regenerated",
        "created",
        "ended Destroyed",
        "ended Expired",
    ];
    assert_eq!(seen, expected);
}

#[test]
fn create_rate_is_a_token_bucket_on_the_store_clock() {
    let st = store_with(Limits {
        create_rate: 2,
        create_burst: 3,
        ..Limits::default()
    });
    for _ in 0..3 {
        create(&st, None);
    }
    let err = st.create(NewSession::default()).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Exhausted {
                limit: "create_rate",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("create_rate reached (2)"), "{err}");
    // A refused create costs nothing else: reads and updates go on.
    assert_eq!(st.stats().sessions, 3);
    // Half a second refills one token at 2 per second.
    st.clock().advance(Duration::from_millis(500));
    create(&st, None);
    assert!(st.create(NewSession::default()).is_err());
    // A bad request is refused before it takes a token.
    st.clock().advance(Duration::from_millis(500));
    assert!(matches!(
        st.create(NewSession {
            user: Some("u".repeat(10_000)),
            ..NewSession::default()
        }),
        Err(StoreError::Invalid(_))
    ));
    create(&st, None);
}

#[test]
fn stores_in_one_pool_share_the_daemon_wide_memory_cap() {
    const CAP: usize = 3 * 1024;
    let pool = MemoryPool::shared(CAP, 2);
    let tenant = || {
        Store::in_pool(
            Limits::default(),
            8,
            Clock::manual(T0),
            Box::new(events::Discard),
            0,
            pool.clone(),
        )
    };
    let (a, b) = (tenant(), tenant());
    // About 750 bytes each: two fit in a share of 1.5 KiB. Tenant a keeps creating; past its
    // share it evicts its own sessions, since b's share is held for b.
    let a_sessions: Vec<Session> = (0..6).map(|_| a.create(blob(None)).unwrap()).collect();
    assert!(a.stats().bytes <= CAP / 2);
    assert_eq!(a.stats().sessions, 2);
    // b, under its share, is never made to evict its own because of a.
    let b_sessions: Vec<Session> = (0..2).map(|_| b.create(blob(None)).unwrap()).collect();
    for s in &b_sessions {
        b.get(&id(s), true).unwrap();
    }
    a.get(&id(&a_sessions[5]), true).unwrap();
    assert_eq!(pool.used(), a.stats().bytes + b.stats().bytes);
    assert!(pool.used() <= CAP);
    // Past its own share, b evicts its own, never a's.
    b.create(blob(None)).unwrap();
    let b_left = b_sessions.iter().filter(|s| b.get(&id(s), true).is_ok());
    assert_eq!(b_left.count(), 1);
    assert_eq!(a.stats().sessions, 2);
    a.get(&id(&a_sessions[5]), true).unwrap();
    assert!(pool.used() <= CAP);
}

#[test]
fn a_tenant_filling_the_pool_never_makes_another_evict_below_its_share() {
    const CAP: usize = 8 * 1024;
    let pool = MemoryPool::shared(CAP, 2);
    // The greedy tenant has a cap of its own as big as the whole pool; the quiet one takes
    // the default, its equal share.
    let store = |max_memory_bytes| {
        Store::in_pool(
            Limits {
                max_memory_bytes,
                ..Limits::default()
            },
            8,
            Clock::manual(T0),
            Box::new(events::Discard),
            0,
            pool.clone(),
        )
    };
    let (greedy, quiet) = (store(CAP), store(pool.share()));
    // The greedy tenant alone may grow into what nobody else holds, but not into the quiet
    // tenant's share.
    for _ in 0..40 {
        greedy.create(blob(None)).unwrap();
    }
    assert!(
        greedy.stats().bytes <= CAP - pool.share(),
        "{:?}",
        greedy.stats()
    );
    // The quiet tenant fills its share without evicting any of its own users.
    let mut mine = Vec::new();
    while quiet.stats().bytes + 800 <= pool.share() {
        mine.push(quiet.create(blob(Some("user"))).unwrap());
        greedy.create(blob(None)).unwrap();
    }
    assert!(mine.len() >= 4);
    for s in &mine {
        assert!(
            quiet.get(&id(s), true).is_ok(),
            "the quiet tenant lost a session"
        );
    }
    assert!(pool.used() <= CAP);
}

#[test]
fn timeouts_under_a_millisecond_are_refused_not_dead_on_arrival() {
    let st = store();
    for (idle, absolute, field) in [
        (Some(Duration::from_micros(500)), None, "idle_timeout"),
        (None, Some(Duration::from_nanos(1)), "absolute_timeout"),
    ] {
        let err = st
            .create(NewSession {
                idle_timeout: idle,
                absolute_timeout: absolute,
                ..NewSession::default()
            })
            .unwrap_err();
        assert_eq!(
            err,
            StoreError::Invalid(format!("{field} must be at least 1ms"))
        );
    }
    assert_eq!(st.stats().sessions, 0);
}

#[test]
fn update_counts_are_checked_before_any_other_work() {
    let st = store();
    let s = create(&st, None);
    let many: Vec<String> = (0..200_000).map(|i| format!("k{i}")).collect();
    let err = st
        .update(
            &id(&s),
            Change {
                remove: many.clone(),
                ..Change::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("max_attributes"), "{err}");
    // Even for a session that does not exist: the counts come first.
    let unknown = SessionKey::generate().encode();
    let set: Vec<(String, Bytes)> = many[..257]
        .iter()
        .map(|k| (k.clone(), Bytes::new()))
        .collect();
    let err = st
        .update(
            &unknown,
            Change {
                set,
                ..Change::default()
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("max_attributes"), "{err}");
    assert_eq!(st.get(&id(&s), true).unwrap().version, 1);

    // At the limit, duplicates and overlaps are still refused by name.
    let dup = st
        .update(&id(&s), set_attrs(&[("a", "1"), ("b", "2"), ("a", "3")]))
        .unwrap_err();
    assert_eq!(
        dup,
        StoreError::Invalid("an attribute key appears twice in set".into())
    );
    let remove: Vec<String> = (0..255)
        .map(|i| format!("r{i}"))
        .chain(["a".into()])
        .collect();
    let overlap = st
        .update(
            &id(&s),
            Change {
                set: attrs(&[("a", "1")]),
                remove,
                ..Change::default()
            },
        )
        .unwrap_err();
    assert_eq!(
        overlap,
        StoreError::Invalid("an attribute key is in both set and remove".into())
    );
    // And the full count is accepted.
    let remove: Vec<String> = (0..256).map(|i| format!("r{i}")).collect();
    let u = st
        .update(
            &id(&s),
            Change {
                set: (0..256)
                    .map(|i| (format!("s{i}"), Bytes::from_static(b"v")))
                    .collect(),
                remove,
                ..Change::default()
            },
        )
        .unwrap_err();
    // 256 new keys beside the stored "cart" are one too many: the result's shape is checked.
    assert!(u.to_string().contains("max_attributes"), "{u}");
    let u = st
        .update(
            &id(&s),
            Change {
                set: (0..255)
                    .map(|i| (format!("s{i}"), Bytes::from_static(b"v")))
                    .collect(),
                remove: vec!["cart".into(); 256],
                ..Change::default()
            },
        )
        .unwrap();
    assert_eq!(u.attributes.len(), 255);
}

/// A store near its memory cap: four sessions of about 750 bytes under 3 KiB.
fn nearly_full(sink: Box<dyn EventSink>, clock: Clock) -> (Store, Vec<Session>) {
    let st = Store::new(
        Limits {
            max_memory_bytes: 3 * 1024,
            ..Limits::default()
        },
        8,
        clock,
        sink,
    );
    let made = [None, None, Some("ann"), Some("bob")]
        .into_iter()
        .map(|user| st.create(blob(user)).unwrap())
        .collect();
    (st, made)
}

#[test]
fn a_failing_update_near_the_memory_cap_evicts_nobody() {
    let (st, made) = nearly_full(Box::new(events::Discard), Clock::manual(T0));
    let grow = |expected_version| Change {
        set: attrs(&[("more", &"w".repeat(600))]),
        expected_version,
        ..Change::default()
    };
    let missing = SessionKey::generate().encode();
    assert_eq!(st.update(&missing, grow(None)), Err(StoreError::NotFound));
    assert!(matches!(
        st.update(&id(&made[2]), grow(Some(7))),
        Err(StoreError::VersionMismatch { .. })
    ));
    for s in &made {
        assert!(
            st.get(&id(s), true).is_ok(),
            "a failing Update evicted a session"
        );
    }
    // A Regenerate of a missing session does not make room either.
    let login = Rotation {
        user: Some("u".repeat(200)),
        drop_attributes: false,
        idempotency_key: None,
    };
    assert_eq!(st.regenerate(&missing, login), Err(StoreError::NotFound));
    assert_eq!(st.stats().sessions, 4);
    // An Update that succeeds evicts an anonymous session for its room.
    st.update(&id(&made[2]), grow(Some(1))).unwrap();
    assert_eq!(st.stats().sessions, 3);
}

/// Moves a manual clock forward whenever a session is evicted: as if making room took that
/// long.
struct SlowEviction(Clock, Duration);

impl EventSink for SlowEviction {
    fn record(&self, event: &Event<'_>) {
        if let Effect::End {
            cause: EndCause::Evicted,
            ..
        } = event.effect
        {
            self.0.advance(self.1);
        }
    }
}

#[test]
fn a_session_that_expires_while_room_is_made_stays_dead() {
    let clock = Clock::manual(T0);
    let (st, made) = nearly_full(
        Box::new(SlowEviction(clock.clone(), 2 * MIN)),
        clock.clone(),
    );
    // ann's session dies at T0 + 30 min; eviction for the Update below takes 2 minutes.
    clock.advance(29 * MIN);
    let err = st.update(&id(&made[2]), set_attrs(&[("more", &"w".repeat(600))]));
    assert_eq!(err, Err(StoreError::NotFound), "a dead session was written");
    assert_eq!(st.get(&id(&made[2]), true), Err(StoreError::NotFound));

    // The same for a login that needs room for its longer user ID.
    let clock = Clock::manual(T0);
    let (st, made) = nearly_full(
        Box::new(SlowEviction(clock.clone(), 2 * MIN)),
        clock.clone(),
    );
    st.update(&id(&made[3]), set_attrs(&[("pad", &"p".repeat(200))]))
        .unwrap_or_else(|e| panic!("{e}"));
    let before = st.stats().sessions;
    clock.advance(29 * MIN);
    let login = Rotation {
        user: Some("u".repeat(250)),
        drop_attributes: false,
        idempotency_key: None,
    };
    let err = st.regenerate(&id(&made[3]), login);
    assert!(st.stats().sessions < before, "the login had to make room");
    assert_eq!(
        err,
        Err(StoreError::NotFound),
        "a dead session was regenerated"
    );
}

/// Records, at the moment each new key's event goes out, whether the key could already be
/// reached: by a lookup, or in the expiry wheel.
#[derive(Default)]
struct Reachability {
    store: std::sync::OnceLock<Store>,
    seen: Mutex<Vec<(&'static str, bool, usize)>>,
}

impl EventSink for Arc<Reachability> {
    fn record(&self, event: &Event<'_>) {
        let (what, key) = match event.effect {
            Effect::Create { session, .. } => ("created", session.key),
            Effect::Regenerate { session, .. } => ("regenerated", session.key),
            _ => return,
        };
        let st = self.store.get().expect("store set");
        let found = st.get(&key.encode(), true).is_ok();
        self.seen
            .lock()
            .unwrap()
            .push((what, found, st.wheel_len()));
    }
}

#[test]
fn a_new_key_is_reachable_only_after_its_event_is_out() {
    let rec = Arc::new(Reachability::default());
    let st = Store::new(
        Limits::default(),
        4,
        Clock::manual(T0),
        Box::new(rec.clone()),
    );
    rec.store.set(st.clone()).ok().unwrap();
    let a = create(&st, None);
    let ivy = create(&st, Some("ivy"));
    st.regenerate(&id(&a), Rotation::default()).unwrap();
    st.regenerate(
        &id(&ivy),
        Rotation {
            user: Some("jo".into()),
            drop_attributes: false,
            idempotency_key: None,
        },
    )
    .unwrap();
    // Wheel sizes: the regenerated keys' old entries wait there for the reaper.
    assert_eq!(
        *rec.seen.lock().unwrap(),
        [
            ("created", false, 0),
            ("created", false, 1),
            ("regenerated", false, 2),
            ("regenerated", false, 3),
        ]
    );
}

/// Records every event's key in order, for checking that no `Ended` precedes its `Created`.
#[derive(Default)]
struct Order(Mutex<Vec<(bool, SessionKey)>>);

impl EventSink for Arc<Order> {
    fn record(&self, event: &Event<'_>) {
        let entry = match event.effect {
            Effect::Create { session, .. } | Effect::Regenerate { session, .. } => {
                (true, session.key)
            }
            Effect::End { key, .. } => (false, *key),
            _ => return,
        };
        self.0.lock().unwrap().push(entry);
    }
}

#[test]
fn no_end_reaches_the_sink_before_the_record_that_made_the_key() {
    let order = Arc::new(Order::default());
    let st = Store::new(
        Limits {
            max_memory_bytes: 16 * 1024,
            ..Limits::default()
        },
        4,
        Clock::manual(T0),
        Box::new(order.clone()),
    );
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for i in 0..500 {
                    // Short-lived sessions file at the front of the wheel, where eviction
                    // samples; every create past the cap evicts.
                    // (Racing evictors may leave each other no sample: a refusal is fine.)
                    let Ok(s) = st.create(NewSession {
                        attributes: attrs(&[("blob", &"b".repeat(300))]),
                        idle_timeout: Some(Duration::from_millis(1 + i % 3)),
                        ..NewSession::default()
                    }) else {
                        continue;
                    };
                    if i % 2 == 0 {
                        let _ = st.regenerate(&id(&s), Rotation::default());
                    }
                }
            });
        }
    });
    let mut made = HashSet::new();
    for (created, key) in order.0.lock().unwrap().iter() {
        if *created {
            made.insert(*key);
        } else {
            assert!(
                made.contains(key),
                "an End before the record that made its key"
            );
        }
    }
}

#[test]
fn destroyed_and_regenerated_sessions_do_not_pile_up_in_the_wheel() {
    let st = store();
    let live: Vec<Session> = (0..10).map(|_| create(&st, Some("kim"))).collect();
    let mut peak = 0;
    let mut rotating = create(&st, None);
    for i in 0..30_000 {
        let s = create(&st, None);
        st.destroy(&id(&s)).unwrap();
        if i % 3 == 0 {
            rotating = st.regenerate(&id(&rotating), Rotation::default()).unwrap();
        }
        if i % 100 == 0 {
            // What the reaper does every tick.
            st.reap(1000);
            peak = peak.max(st.wheel_len());
        }
    }
    while st.reap(1000).more {}
    let sessions = st.stats().sessions;
    assert_eq!(sessions, live.len() + 1);
    let bound = 2 * sessions + WHEEL_SWEEP_SLACK + 1000 + 200;
    assert!(
        peak <= bound,
        "the wheel grew to {peak} keys for {sessions} sessions"
    );
    assert!(st.wheel_len() <= bound);
    for s in &live {
        assert!(st.get(&id(s), true).is_ok());
    }
    // Live keys are still filed: they expire and are freed as usual.
    st.clock().advance(31 * MIN);
    while st.reap(1000).more {}
    assert_eq!(st.stats().sessions, 0);
    assert_eq!(st.wheel_len(), 0);
}

/// On the first `Regenerated` event, the moment the old ID is already dead, runs `action` on
/// another thread, and gives it a bounded while to finish (it may be held back until the
/// Regenerate is done, which is the point).
struct DuringRegenerate {
    store: std::sync::OnceLock<Store>,
    action: fn(&Store) -> Result<(), StoreError>,
    fired: std::sync::atomic::AtomicBool,
    ran: Mutex<Option<std::thread::JoinHandle<Result<(), StoreError>>>>,
}

impl DuringRegenerate {
    fn store(action: fn(&Store) -> Result<(), StoreError>, limits: Limits) -> (Store, Arc<Self>) {
        let hook = Arc::new(DuringRegenerate {
            store: std::sync::OnceLock::new(),
            action,
            fired: std::sync::atomic::AtomicBool::new(false),
            ran: Mutex::new(None),
        });
        let st = Store::new(limits, 4, Clock::manual(T0), Box::new(hook.clone()));
        hook.store.set(st.clone()).ok().unwrap();
        (st, hook)
    }

    fn outcome(&self) -> Result<(), StoreError> {
        let ran = self.ran.lock().unwrap().take().expect("the hook fired");
        ran.join().unwrap()
    }
}

impl EventSink for Arc<DuringRegenerate> {
    fn record(&self, event: &Event<'_>) {
        if !matches!(event.effect, Effect::Regenerate { .. })
            || self.fired.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let st = self.store.get().expect("store set").clone();
        let action = self.action;
        let ran = std::thread::spawn(move || action(&st));
        let deadline = std::time::Instant::now() + Duration::from_millis(200);
        while !ran.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        *self.ran.lock().unwrap() = Some(ran);
    }
}

fn log_in(st: &Store, id: &str, user: &str) -> Result<Session, StoreError> {
    st.regenerate(
        id,
        Rotation {
            user: Some(user.into()),
            drop_attributes: false,
            idempotency_key: None,
        },
    )
}

#[test]
fn log_out_everywhere_after_the_old_id_died_ends_the_login() {
    let (st, hook) = DuringRegenerate::store(
        |st| st.destroy_user("lee", None).map(|_| ()),
        Limits::default(),
    );
    let anon = create(&st, None);
    let login = log_in(&st, &id(&anon), "lee").unwrap();
    hook.outcome().unwrap();
    // The logout started once the old ID was dead, so the login had happened: its session
    // must be gone, not left out of the user's list while it moved.
    assert_eq!(st.get(&id(&login), true), Err(StoreError::NotFound));
    assert!(st.list_user("lee", false).unwrap().is_empty());
}

#[test]
fn a_login_racing_another_into_one_user_keeps_the_per_user_cap() {
    let (st, hook) = DuringRegenerate::store(
        |st| {
            let anon = create(st, None);
            log_in(st, &id(&anon), "mia").map(|_| ())
        },
        Limits {
            max_sessions_per_user: 2,
            ..Limits::default()
        },
    );
    create(&st, Some("mia"));
    let anon = create(&st, None);
    let first = log_in(&st, &id(&anon), "mia");
    let second = hook.outcome();
    assert!(first.is_ok(), "{first:?}");
    assert!(
        matches!(
            second,
            Err(StoreError::Exhausted {
                limit: "max_sessions_per_user",
                ..
            })
        ),
        "{second:?}"
    );
    assert_eq!(st.list_user("mia", false).unwrap().len(), 2);
}

/// Holds the thread up a little on each `Regenerated` event, as a slow log would, to open
/// up any gap a Regenerate leaves between its steps.
struct SlowRegenerate;

impl EventSink for SlowRegenerate {
    fn record(&self, event: &Event<'_>) {
        if matches!(event.effect, Effect::Regenerate { .. }) {
            for _ in 0..200 {
                std::thread::yield_now();
            }
        }
    }
}

#[test]
fn concurrent_logins_keep_the_per_user_cap_and_logouts_stay_linearizable() {
    const CAP: usize = 3;
    let st = Store::new(
        Limits {
            max_sessions_per_user: CAP,
            ..Limits::default()
        },
        4,
        Clock::manual(T0),
        Box::new(SlowRegenerate),
    );
    let logged_in = Mutex::new(Vec::<SessionKey>::new());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let logins: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    for _ in 0..300 {
                        let anon = create(&st, None);
                        let login = st.regenerate(
                            &id(&anon),
                            Rotation {
                                user: Some("max".into()),
                                drop_attributes: false,
                                idempotency_key: None,
                            },
                        );
                        match login {
                            Ok(s) => logged_in.lock().unwrap().push(s.key),
                            Err(StoreError::Exhausted { limit, .. }) => {
                                assert_eq!(limit, "max_sessions_per_user");
                                st.destroy(&id(&anon)).unwrap();
                            }
                            Err(e) => panic!("{e}"),
                        }
                        let listed = st.list_user("max", false).unwrap().len();
                        assert!(listed <= CAP, "{listed} sessions over a cap of {CAP}");
                    }
                })
            })
            .collect();
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                // Every login that returned before the logout started must be gone after it.
                let before: Vec<SessionKey> = logged_in.lock().unwrap().clone();
                st.destroy_user("max", None).unwrap();
                for key in before {
                    assert_eq!(
                        st.get(&key.encode(), true),
                        Err(StoreError::NotFound),
                        "a login survived log-out-everywhere"
                    );
                }
                std::thread::yield_now();
            }
        });
        for l in logins {
            l.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(st.list_user("max", false).unwrap().len() <= CAP);
}

/// Destroys the session named in `target` when the first session is evicted.
struct DestroyOnEviction {
    store: std::sync::OnceLock<Store>,
    target: Mutex<Option<String>>,
}

impl EventSink for Arc<DestroyOnEviction> {
    fn record(&self, event: &Event<'_>) {
        if let Effect::End {
            cause: EndCause::Evicted,
            ..
        } = event.effect
        {
            if let Some(id) = self.target.lock().unwrap().take() {
                self.store.get().expect("store set").destroy(&id).unwrap();
            }
        }
    }
}

#[test]
fn a_login_that_fails_evicts_none_of_the_users_sessions() {
    let hook = Arc::new(DestroyOnEviction {
        store: std::sync::OnceLock::new(),
        target: Mutex::new(None),
    });
    let st = Store::new(
        Limits {
            max_sessions_per_user: 2,
            per_user_policy: PerUserPolicy::EvictOldest,
            ..Limits::default()
        },
        4,
        Clock::manual(T0),
        Box::new(hook.clone()),
    );
    hook.store.set(st.clone()).ok().unwrap();
    let mine = [create(&st, Some("ned")), create(&st, Some("ned"))];
    let anon = create(&st, None);
    // The anonymous session is destroyed by someone else the moment anything is evicted.
    *hook.target.lock().unwrap() = Some(id(&anon));
    let login = st.regenerate(
        &id(&anon),
        Rotation {
            user: Some("ned".into()),
            drop_attributes: false,
            idempotency_key: None,
        },
    );
    let left = mine.iter().filter(|s| st.get(&id(s), true).is_ok()).count();
    match login {
        // The old session was taken before anyone was evicted.
        Ok(s) => {
            assert_eq!(left, 1);
            assert!(st.get(&id(&s), true).is_ok());
        }
        Err(e) => {
            assert_eq!(e, StoreError::NotFound);
            assert_eq!(left, 2, "a failed login evicted one of the user's sessions");
        }
    }
    assert!(st.list_user("ned", false).unwrap().len() <= 2);
}
