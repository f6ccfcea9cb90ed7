//! Store unit tests: the session rules, without gRPC, on a manual clock.

use std::sync::Mutex;
use std::time::Duration;

use super::events::{Event, EventSink};
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
    st.update(
        &id(&s),
        Change {
            set: attrs(&[("a", &big)]),
            ..Change::default()
        },
    )
    .unwrap();
    let err = st
        .update(
            &id(&s),
            Change {
                set: attrs(&[("b", &big)]),
                ..Change::default()
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("max_session_bytes"), "{err}");
    // Replacing a value with one of the same size fits.
    st.update(
        &id(&s),
        Change {
            set: attrs(&[("a", &big)]),
            ..Change::default()
        },
    )
    .unwrap();
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
    let value = "v".repeat(500);
    // About 750 bytes each by the store's accounting: four fit under the cap, five do not.
    let big = |user: Option<&str>| NewSession {
        user: user.map(str::to_owned),
        attributes: attrs(&[("blob", value.as_str())]),
        ..NewSession::default()
    };
    let mut made = Vec::new();
    for user in [Some("alice"), None, Some("bob"), None] {
        made.push(st.create(big(user)).unwrap());
        st.clock().advance(MIN);
    }
    let [alice, anon_old, bob, anon_new] = <[Session; 4]>::try_from(made).unwrap();
    let gone = |s: &Session| st.get(&id(s), true) == Err(StoreError::NotFound);

    // Anonymous first, the longest idle of them first.
    let carol = st.create(big(Some("carol"))).unwrap();
    assert!(gone(&anon_old));
    assert!(!gone(&anon_new) && !gone(&alice) && !gone(&bob) && !gone(&carol));
    st.clock().advance(MIN);
    let dave = st.create(big(Some("dave"))).unwrap();
    assert!(gone(&anon_new));
    // No anonymous session left: the longest-idle authenticated one goes, even though it
    // was created first only if it is also idle longest; touch alice so bob is older.
    st.touch(&id(&alice)).unwrap();
    st.clock().advance(MIN);
    st.create(big(Some("erin"))).unwrap();
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
                    st.update(
                        &sid,
                        Change {
                            set: attrs(&[(&key, &i.to_string())]),
                            ..Change::default()
                        },
                    )
                    .unwrap();
                    // A CAS counter: read, then write back at the version read, retry on conflict.
                    loop {
                        let cur = st.get(&sid, true).unwrap();
                        let n: u64 = cur
                            .attributes
                            .get("counter")
                            .map_or(0, |v| std::str::from_utf8(v).unwrap().parse().unwrap());
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
                    match st.update(
                        &sid,
                        Change {
                            set: attrs(&[(&key, "1")]),
                            ..Change::default()
                        },
                    ) {
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
        let name = match event {
            Event::Created { .. } => "created".to_string(),
            Event::Updated { version, .. } => format!("updated v{version}"),
            Event::Touched { .. } => "touched".to_string(),
            Event::Regenerated { .. } => "regenerated".to_string(),
            Event::Ended { cause, .. } => format!("ended {cause:?}"),
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
    let pool = MemoryPool::new(CAP);
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
    let value = "v".repeat(500);
    let big = || NewSession {
        attributes: attrs(&[("blob", value.as_str())]),
        ..NewSession::default()
    };
    // Four sessions of about 750 bytes fit in the pool: three in a, one in b.
    let a_sessions: Vec<Session> = (0..3).map(|_| a.create(big()).unwrap()).collect();
    let b_first = b.create(big()).unwrap();
    assert_eq!(pool.used(), a.stats().bytes + b.stats().bytes);
    // The fifth, in b, makes room by evicting b's own session, never a's.
    b.create(big()).unwrap();
    assert_eq!(b.get(&id(&b_first), true), Err(StoreError::NotFound));
    for s in &a_sessions {
        a.get(&id(s), true).unwrap();
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
