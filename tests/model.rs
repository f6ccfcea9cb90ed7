//! A property-based model test: random sequences of operations run against the real Store
//! and against a few lines of obviously-correct reference model, on the same manual clock.
//! Any divergence in a result, a version, a deadline or a listing fails the test and proptest
//! shrinks it to a minimal sequence.
//!
//! Every effect the Store emits is also applied, in order, to a second, empty Store, as a
//! replica (or recovery) will apply them: it must end holding the same sessions and the same
//! idempotency records.
//!
//! Every other write carries an idempotency key, and `Retry` sends a successful keyed write
//! again: within the window it must get the original result as it is now, changing nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use sessiond::clock::Clock;
use sessiond::session::{Millis, Session};
use sessiond::store::events::{Discard, Event, EventSink};
use sessiond::store::{
    Applied, Change, Effect, Limits, NewSession, Rotation, Store, StoreError, TOUCH_REPORT_FRACTION,
};

const T0: Millis = 1_000_000_000_000;
const IDLE: Millis = 10_000;
const ABSOLUTE: Millis = 25_000;
const PER_USER: usize = 3;
const USERS: [&str; 3] = ["ann", "ben", "cat"];
const KEYS: [&str; 4] = ["a", "b", "c", "d"];
/// `idempotency_window`: short, so runs cross it and prune.
const WINDOW: Millis = 20_000;

#[derive(Debug, Clone)]
enum Op {
    Create {
        user: Option<usize>,
        set: Vec<(usize, u8)>,
    },
    Get {
        s: usize,
        peek: bool,
    },
    Touch {
        s: usize,
    },
    Update {
        s: usize,
        set: Vec<(usize, u8)>,
        remove: Vec<usize>,
        cas: Option<i8>,
    },
    Regenerate {
        s: usize,
        user: Option<Option<usize>>,
        drop: bool,
    },
    Destroy {
        s: usize,
    },
    DestroyUser {
        user: usize,
        except: Option<usize>,
    },
    List {
        user: usize,
    },
    Advance {
        ms: u32,
    },
    Reap,
    /// Sends a successful keyed write again.
    Retry {
        w: usize,
    },
}

/// A keyed write as sent.
#[derive(Debug, Clone)]
enum Sent {
    Create(NewSession),
    Update(String, Change),
    Regenerate(String, Rotation),
}

/// A keyed write that succeeded: what it sent, the session it left, its version and time.
struct Keyed {
    sent: Sent,
    result: String,
    version: u64,
    at: Millis,
}

fn op() -> impl Strategy<Value = Op> {
    let s = 0usize..12;
    let attrs = prop::collection::vec((0usize..KEYS.len(), any::<u8>()), 0..3);
    prop_oneof![
        (prop::option::of(0usize..USERS.len()), attrs.clone())
            .prop_map(|(user, set)| Op::Create { user, set }),
        (s.clone(), any::<bool>()).prop_map(|(s, peek)| Op::Get { s, peek }),
        s.clone().prop_map(|s| Op::Touch { s }),
        (
            s.clone(),
            attrs,
            prop::collection::vec(0usize..KEYS.len(), 0..2),
            prop::option::of(-1i8..=1)
        )
            .prop_map(|(s, set, remove, cas)| Op::Update {
                s,
                set,
                remove,
                cas
            }),
        (
            s.clone(),
            prop::option::of(prop::option::of(0usize..USERS.len())),
            any::<bool>()
        )
            .prop_map(|(s, user, drop)| Op::Regenerate { s, user, drop }),
        s.clone().prop_map(|s| Op::Destroy { s }),
        (0usize..USERS.len(), prop::option::of(s))
            .prop_map(|(user, except)| Op::DestroyUser { user, except }),
        (0usize..USERS.len()).prop_map(|user| Op::List { user }),
        // Exact deadlines and their neighbours, where off-by-one bugs live.
        prop_oneof![
            0u32..12_000,
            Just(IDLE as u32),
            Just(IDLE as u32 - 1),
            Just(1u32),
            Just(5_000u32)
        ]
        .prop_map(|ms| Op::Advance { ms }),
        Just(Op::Reap),
        (0usize..16).prop_map(|w| Op::Retry { w }),
    ]
}

/// The reference: a plain map, no concurrency, no cleverness.
#[derive(Debug, Clone, PartialEq)]
struct M {
    user: Option<String>,
    attrs: BTreeMap<String, Bytes>,
    version: u64,
    created: Millis,
    last: Millis,
    absolute: Millis,
}

impl M {
    fn live(&self, now: Millis) -> bool {
        now < (self.last + IDLE).min(self.absolute)
    }
}

struct Model {
    now: Millis,
    sessions: HashMap<String, M>,
}

impl Model {
    fn live(&self, id: &str) -> Option<&M> {
        self.sessions.get(id).filter(|m| m.live(self.now))
    }

    fn user_count(&self, user: &str) -> usize {
        self.sessions
            .values()
            .filter(|m| m.live(self.now) && m.user.as_deref() == Some(user))
            .count()
    }
}

fn kv(set: &[(usize, u8)]) -> Vec<(String, Bytes)> {
    // Later writes of the same key win, as in a map.
    let mut map = BTreeMap::new();
    for (k, v) in set {
        map.insert(KEYS[*k].to_string(), Bytes::from(vec![*v]));
    }
    map.into_iter().collect()
}

fn same(real: &sessiond::session::Session, id: &str, m: &M, with_attrs: bool) {
    assert_eq!(real.key.encode(), id);
    assert_eq!(real.user.as_deref(), m.user.as_deref());
    assert_eq!(real.version, m.version);
    assert_eq!(real.created_at, m.created);
    assert_eq!(real.last_access_at, m.last);
    assert_eq!(real.absolute_expires_at, m.absolute);
    if with_attrs {
        let attrs: BTreeMap<_, _> = real.attributes.to_map().into_iter().collect();
        assert_eq!(attrs, m.attrs);
    } else {
        assert!(real.attributes.is_empty());
    }
}

/// Every effect a Store emits, in order.
#[derive(Clone, Default)]
struct Effects(Arc<Mutex<Vec<Effect>>>);

impl EventSink for Effects {
    fn record(&self, event: &Event<'_>) {
        self.0.lock().unwrap().push(event.effect.clone());
    }
}

impl Effects {
    /// Applies the effects not applied yet to `replica`.
    fn apply_to(&self, replica: &Store, applied: &mut usize) {
        let effects = self.0.lock().unwrap();
        for effect in &effects[*applied..] {
            // Applied in the order the store made them, every effect changes something.
            assert_eq!(replica.apply(effect), Applied::Done, "{effect:?}");
        }
        *applied = effects.len();
    }
}

fn sessions_of(store: &Store) -> BTreeMap<[u8; 32], Session> {
    let mut out = BTreeMap::new();
    store.for_each_session(|s| {
        out.insert(*s.key.as_bytes(), s);
    });
    out
}

/// The replica holds what the primary holds. Only the last access may lag, by less than the
/// touch throttle's window: reads slide it without an effect until the window is up.
fn same_sessions(primary: &Store, replica: &Store) {
    let (want, got) = (sessions_of(primary), sessions_of(replica));
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "the replica holds other keys"
    );
    for (key, p) in &want {
        let r = &got[key];
        assert!(r.last_access_at <= p.last_access_at, "{r:?} vs {p:?}");
        assert!(
            p.last_access_at - r.last_access_at < IDLE / TOUCH_REPORT_FRACTION,
            "{r:?} lags {p:?} by more than the touch window"
        );
        let r = Session {
            last_access_at: p.last_access_at,
            ..r.clone()
        };
        assert_eq!(&r, p);
    }
    assert_eq!(primary.stats().sessions, replica.stats().sessions);
    assert_eq!(primary.stats().bytes, replica.stats().bytes);
}

fn run(ops: Vec<Op>) {
    let clock = Clock::manual(T0);
    let limits = Limits {
        default_idle_timeout: Duration::from_millis(IDLE),
        default_absolute_timeout: Duration::from_millis(ABSOLUTE),
        max_sessions_per_user: PER_USER,
        idempotency_window: Duration::from_millis(WINDOW),
        ..Limits::default()
    };
    let effects = Effects::default();
    let store = Store::new(limits.clone(), 4, clock.clone(), Box::new(effects.clone()));
    // Its clock never moves: applying an effect must not need one.
    let replica = Store::new(limits, 4, Clock::manual(0), Box::new(Discard));
    let mut applied = 0;
    let mut model = Model {
        now: T0,
        sessions: HashMap::new(),
    };
    // Every ID ever issued, dead or alive, so operations also hit dead sessions.
    let mut ids: Vec<String> = Vec::new();
    let pick = |ids: &Vec<String>, s: usize| ids.get(s % ids.len().max(1)).cloned();
    // Every other write gets a fresh key.
    let mut writes = 0u32;
    let mut next_key = || {
        writes += 1;
        writes.is_multiple_of(2).then(|| format!("key-{writes}"))
    };
    let mut keyed: Vec<Keyed> = Vec::new();

    for op in ops {
        // The replica keeps up after every step, not only at the end.
        effects.apply_to(&replica, &mut applied);
        same_sessions(&store, &replica);
        assert_eq!(store.idempotency_records(), replica.idempotency_records());
        let now = model.now;
        match op {
            Op::Create { user, set } => {
                let user = user.map(|u| USERS[u].to_string());
                let req = NewSession {
                    user: user.clone(),
                    attributes: kv(&set),
                    idempotency_key: next_key(),
                    ..NewSession::default()
                };
                let real = store.create(req.clone());
                let full = user
                    .as_deref()
                    .is_some_and(|u| model.user_count(u) >= PER_USER);
                if full {
                    assert!(
                        matches!(real, Err(StoreError::Exhausted { .. })),
                        "{real:?}"
                    );
                    continue;
                }
                let real = real.unwrap();
                let id = real.key.encode();
                let m = M {
                    user,
                    attrs: kv(&set).into_iter().collect(),
                    version: 1,
                    created: now,
                    last: now,
                    absolute: now + ABSOLUTE,
                };
                same(&real, &id, &m, true);
                if req.idempotency_key.is_some() {
                    keyed.push(Keyed {
                        sent: Sent::Create(req),
                        result: id.clone(),
                        version: 1,
                        at: now,
                    });
                }
                model.sessions.insert(id.clone(), m);
                ids.push(id);
            }
            Op::Get { s, peek } => {
                let Some(id) = pick(&ids, s) else { continue };
                let real = store.get(&id, peek);
                match model.live(&id).is_some() {
                    false => assert_eq!(real, Err(StoreError::NotFound)),
                    true => {
                        let m = model.sessions.get_mut(&id).unwrap();
                        if !peek {
                            m.last = now;
                        }
                        same(&real.unwrap(), &id, m, true);
                    }
                }
            }
            Op::Touch { s } => {
                let Some(id) = pick(&ids, s) else { continue };
                let real = store.touch(&id);
                match model.live(&id).is_some() {
                    false => assert_eq!(real, Err(StoreError::NotFound)),
                    true => {
                        let m = model.sessions.get_mut(&id).unwrap();
                        m.last = now;
                        assert_eq!(real, Ok((m.last + IDLE).min(m.absolute)));
                    }
                }
            }
            Op::Update {
                s,
                set,
                remove,
                cas,
            } => {
                let Some(id) = pick(&ids, s) else { continue };
                let set = kv(&set);
                let remove: Vec<String> = remove.iter().map(|k| KEYS[*k].to_string()).collect();
                let overlap = remove.iter().any(|r| set.iter().any(|(k, _)| k == r));
                let current = model.live(&id).map(|m| m.version);
                let expected = cas.map(|d| current.unwrap_or(1).saturating_add_signed(d as i64));
                let change = Change {
                    set: set.clone(),
                    remove: remove.clone(),
                    expected_version: expected,
                    idempotency_key: next_key(),
                };
                let real = store.update(&id, change.clone());
                if overlap {
                    assert!(matches!(real, Err(StoreError::Invalid(_))), "{real:?}");
                    continue;
                }
                let Some(current) = current else {
                    assert_eq!(real, Err(StoreError::NotFound));
                    continue;
                };
                if let Some(e) = expected.filter(|e| *e != current) {
                    assert_eq!(
                        real,
                        Err(StoreError::VersionMismatch {
                            expected: e,
                            current
                        })
                    );
                    continue;
                }
                let m = model.sessions.get_mut(&id).unwrap();
                for k in &remove {
                    m.attrs.remove(k);
                }
                m.attrs.extend(set);
                m.version += 1;
                m.last = now;
                same(&real.unwrap(), &id, m, true);
                if change.idempotency_key.is_some() {
                    keyed.push(Keyed {
                        sent: Sent::Update(id.clone(), change),
                        result: id,
                        version: m.version,
                        at: now,
                    });
                }
            }
            Op::Regenerate { s, user, drop } => {
                let Some(id) = pick(&ids, s) else { continue };
                let user = user.map(|u| u.map(|u| USERS[u].to_string()));
                let rotation = Rotation {
                    user: user.clone().map(|u| u.unwrap_or_default()),
                    drop_attributes: drop,
                    idempotency_key: next_key(),
                };
                let real = store.regenerate(&id, rotation.clone());
                let Some(old) = model.live(&id).cloned() else {
                    assert_eq!(real, Err(StoreError::NotFound));
                    continue;
                };
                let new_user = user.unwrap_or(old.user.clone());
                let login = new_user != old.user;
                if login
                    && new_user
                        .as_deref()
                        .is_some_and(|u| model.user_count(u) >= PER_USER)
                {
                    assert!(
                        matches!(real, Err(StoreError::Exhausted { .. })),
                        "{real:?}"
                    );
                    continue;
                }
                let real = real.unwrap();
                let new_id = real.key.encode();
                let m = M {
                    user: new_user,
                    attrs: if drop {
                        BTreeMap::new()
                    } else {
                        old.attrs.clone()
                    },
                    version: old.version + 1,
                    created: if login { now } else { old.created },
                    last: now,
                    absolute: if login { now + ABSOLUTE } else { old.absolute },
                };
                same(&real, &new_id, &m, true);
                if rotation.idempotency_key.is_some() {
                    keyed.push(Keyed {
                        sent: Sent::Regenerate(id.clone(), rotation),
                        result: new_id.clone(),
                        version: m.version,
                        at: now,
                    });
                }
                model.sessions.remove(&id);
                model.sessions.insert(new_id.clone(), m);
                ids.push(new_id);
            }
            Op::Destroy { s } => {
                let Some(id) = pick(&ids, s) else { continue };
                let live = model.live(&id).is_some();
                assert_eq!(store.destroy(&id), Ok(live));
                if live {
                    model.sessions.remove(&id);
                }
            }
            Op::DestroyUser { user, except } => {
                let user = USERS[user];
                let except = except.and_then(|s| pick(&ids, s));
                let doomed: Vec<String> = model
                    .sessions
                    .iter()
                    .filter(|(id, m)| {
                        m.live(now)
                            && m.user.as_deref() == Some(user)
                            && Some(*id) != except.as_ref()
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                let real = store.destroy_user(user, except.as_deref());
                assert_eq!(real, Ok(doomed.len() as u32));
                for id in doomed {
                    model.sessions.remove(&id);
                }
            }
            Op::List { user } => {
                let user = USERS[user];
                let mut expected: Vec<(&String, &M)> = model
                    .sessions
                    .iter()
                    .filter(|(_, m)| m.live(now) && m.user.as_deref() == Some(user))
                    .collect();
                expected.sort_by_key(|(id, m)| (m.created, (*id).clone()));
                let mut real = store.list_user(user, false).unwrap();
                real.sort_by_key(|s| (s.created_at, s.key.encode()));
                assert_eq!(real.len(), expected.len());
                for (r, (id, m)) in real.iter().zip(expected) {
                    same(r, id, m, false);
                }
            }
            Op::Advance { ms } => {
                clock.advance(Duration::from_millis(ms.into()));
                model.now += Millis::from(ms);
            }
            Op::Retry { w } => {
                let Some(k) = keyed.get(w % keyed.len().max(1)) else {
                    continue;
                };
                // Past the window the key is forgotten and the write would be new.
                if now >= k.at + WINDOW {
                    continue;
                }
                let before = effects.0.lock().unwrap().len();
                let (real, what) = match k.sent.clone() {
                    Sent::Create(req) => (store.create(req), "created"),
                    Sent::Update(id, change) => (store.update(&id, change), "updated"),
                    Sent::Regenerate(id, rotation) => (store.regenerate(&id, rotation), "moved to"),
                };
                match model.live(&k.result).filter(|m| m.version >= k.version) {
                    Some(m) => same(&real.unwrap(), &k.result, m, true),
                    None => assert_eq!(real, Err(StoreError::RetryEnded(what))),
                }
                assert_eq!(
                    effects.0.lock().unwrap().len(),
                    before,
                    "a retry changes nothing"
                );
            }
            Op::Reap => {
                while store.reap(1000).more {}
                // The reaper only frees memory: what remains is at least every live session.
                let live = model.sessions.values().filter(|m| m.live(now)).count();
                assert!(store.stats().sessions >= live);
            }
        }
    }
    effects.apply_to(&replica, &mut applied);
    same_sessions(&store, &replica);
    // Finally: once everything has expired and been reaped, nothing is left anywhere, and
    // the reaper's ends leave the replica empty too.
    clock.advance(Duration::from_millis(ABSOLUTE + IDLE + 2_000));
    while store.reap(1000).more {}
    assert_eq!(store.stats().sessions, 0);
    assert_eq!(store.stats().bytes, 0);
    assert_eq!(store.stats().users, 0);
    assert_eq!(store.wheel_len(), 0);
    effects.apply_to(&replica, &mut applied);
    assert_eq!(replica.stats().sessions, 0);
    assert_eq!(replica.stats().bytes, 0);
    assert_eq!(replica.stats().users, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_the_reference_model(ops in prop::collection::vec(op(), 1..80)) {
        run(ops);
    }
}
