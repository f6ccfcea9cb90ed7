//! Durability unit tests: a real log on a temporary directory, a manual clock, no gRPC.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;

use super::format::frame;
use super::log::FsyncPolicy;
use super::*;
use crate::clock::Clock;
use crate::observe::LogMetrics;
use crate::session::{Millis, Session};
use crate::store::events::Discard;
use crate::store::{Change, Limits, NewSession, Rotation, StoreError};

const T0: Millis = 1_700_000_000_000;
const MIN: Duration = Duration::from_secs(60);

fn metrics() -> LogMetrics {
    LogMetrics::noop()
}

/// A store whose changes go to a log in `dir`, loaded with what `dir` held.
fn open(dir: &Path, clock: &Clock) -> (Store, Persistence) {
    let (p, recovery) = Persistence::open(dir, FsyncPolicy::Always, metrics()).unwrap();
    let sink = Box::new(p.log.clone());
    let r = recovery
        .replay(false, |n| {
            Store::with_capacity(Limits::default(), 4, clock.clone(), sink, n)
        })
        .unwrap();
    (r.store, p)
}

/// What recovery of a directory found alive at `now`.
struct Found {
    sessions: Vec<Session>,
}

/// Recovers `dir` into a store of its own whose clock reads `now`.
fn recover(dir: &Path, now: Millis, repair: bool) -> Result<Found, RecoveryError> {
    let clock = Clock::manual(now);
    let r = super::recover(dir, repair, |n| {
        Store::with_capacity(Limits::default(), 4, clock.clone(), Box::new(Discard), n)
    })?;
    Ok(Found {
        sessions: contents(&r.store).into_values().collect(),
    })
}

/// A new data directory whose log holds `n` created sessions, closed as by a clean stop;
/// the directory, its clock, and the sessions' IDs.
fn closed_log_of(n: usize) -> (tempfile::TempDir, Clock, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(T0);
    let (store, p) = open(dir.path(), &clock);
    let ids = (0..n)
        .map(|_| store.create(NewSession::default()).unwrap().key.encode())
        .collect();
    p.log.close();
    (dir, clock, ids)
}

/// The store's live sessions.
fn contents(store: &Store) -> BTreeMap<String, Session> {
    let now = store.clock().now();
    let mut out = BTreeMap::new();
    store.for_each_session(|s| {
        if now < s.expires_at() {
            out.insert(s.key.encode(), s);
        }
    });
    out
}

fn recovered(dir: &Path, now: Millis) -> BTreeMap<String, Session> {
    recover(dir, now, false)
        .unwrap()
        .sessions
        .into_iter()
        .map(|s| (s.key.encode(), s))
        .collect()
}

fn attrs(pairs: &[(&str, &str)]) -> Vec<(String, Bytes)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

/// A workload touching every kind of record; returns the IDs that must be gone.
fn workload(store: &Store, clock: &Clock) -> Vec<String> {
    let mut gone = Vec::new();
    for i in 0..20 {
        let s = store
            .create(NewSession {
                user: (i % 3 == 0).then(|| format!("user{}", i % 2)),
                attributes: attrs(&[("cart", "apple")]),
                ..NewSession::default()
            })
            .unwrap();
        let id = s.key.encode();
        store
            .update(
                &id,
                Change {
                    set: attrs(&[("n", &i.to_string())]),
                    remove: vec!["cart".into()],
                    ..Change::default()
                },
            )
            .unwrap();
        clock.advance(MIN * 10);
        store.touch(&id).unwrap();
        match i % 4 {
            0 => {
                store.destroy(&id).unwrap();
                gone.push(id);
            }
            1 => {
                let r = store
                    .regenerate(
                        &id,
                        Rotation {
                            user: Some("login".into()),
                            drop_attributes: false,
                            idempotency_key: None,
                        },
                    )
                    .unwrap();
                assert_ne!(r.key.encode(), id);
                gone.push(id);
            }
            _ => {}
        }
    }
    gone
}

#[test]
fn a_restart_recovers_exactly_what_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(T0);
    let (store, p) = open(dir.path(), &clock);
    let gone = workload(&store, &clock);
    let before = contents(&store);
    assert!(
        before.len() >= 3,
        "the workload leaves live sessions to compare"
    );
    p.log.close();
    drop(p);
    let after = recovered(dir.path(), clock.now());
    assert_eq!(after, before);
    for id in gone {
        assert!(
            !after.contains_key(&id),
            "a destroyed or regenerated-away ID came back"
        );
    }
}

#[test]
fn snapshot_plus_tail_equals_the_store_and_replay_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(T0);
    let (store, p) = open(dir.path(), &clock);
    workload(&store, &clock);
    let stats = snapshot(dir.path(), &p.log, &store).unwrap();
    assert!(stats.sessions > 0);
    // Changes after the snapshot land in the new segment only.
    workload(&store, &clock);
    let before = contents(&store);
    p.log.close();
    drop(p);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&snapshot_name(stats.seq)), "{names:?}");
    assert!(
        !names.iter().any(|n| n == &segment_name(stats.seq - 1)),
        "segments before the snapshot are deleted: {names:?}"
    );
    assert_eq!(recovered(dir.path(), clock.now()), before);
}

#[test]
fn a_snapshot_overlapping_the_log_replays_to_the_same_state() {
    // Rotation happens before the snapshot reads the map, so records in the new segment may
    // already be in the snapshot. Write changes after rotating but before snapshotting by
    // hand: replaying them over the snapshot must change nothing.
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(T0);
    let (store, p) = open(dir.path(), &clock);
    workload(&store, &clock);
    let seq = p.log.rotate().unwrap();
    workload(&store, &clock);
    // A snapshot of the current state, numbered as if taken right after that rotation.
    let mut bytes = Vec::new();
    format::write_header(&mut bytes, SNAPSHOT_MAGIC).unwrap();
    store.for_each_session(|s| {
        frame(&records::stored(s).encode_to_vec(), &mut bytes);
    });
    std::fs::write(dir.path().join(snapshot_name(seq)), bytes).unwrap();
    let before = contents(&store);
    p.log.close();
    drop(p);
    assert_eq!(recovered(dir.path(), clock.now()), before);
}

#[test]
fn sessions_that_expired_while_down_stay_dead() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(T0);
    let (store, p) = open(dir.path(), &clock);
    let short = store
        .create(NewSession {
            idle_timeout: Some(MIN),
            ..NewSession::default()
        })
        .unwrap();
    let long = store.create(NewSession::default()).unwrap();
    p.log.close();
    drop(p);
    // Down for five minutes.
    let later = clock.now() + 5 * 60 * 1000;
    let after = recovered(dir.path(), later);
    assert!(!after.contains_key(&short.key.encode()));
    assert!(after.contains_key(&long.key.encode()));
}

fn only_segment(dir: &Path) -> PathBuf {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sdl"))
        .collect();
    segments.sort();
    segments.pop().unwrap()
}

/// Byte offsets of each frame in a log segment.
fn frame_offsets(path: &Path) -> Vec<u64> {
    let bytes = std::fs::read(path).unwrap();
    let mut at = format::HEADER_BYTES as usize;
    let mut out = Vec::new();
    while at + 8 <= bytes.len() {
        out.push(at as u64);
        let n = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += 8 + n;
    }
    out
}

#[test]
fn mid_log_corruption_refuses_to_start_and_repair_keeps_the_prefix() {
    let (dir, clock, ids) = closed_log_of(10);
    let path = only_segment(dir.path());
    let offsets = frame_offsets(&path);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offsets[4] as usize + 12] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let err = recover(dir.path(), clock.now(), false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains(&format!("offset {}", offsets[4])), "{err}");
    assert!(err.contains("--repair"), "{err}");

    let repaired = recover(dir.path(), clock.now(), true).unwrap();
    let kept: Vec<String> = repaired.sessions.iter().map(|s| s.key.encode()).collect();
    assert_eq!(kept.len(), 4);
    for id in &ids[..4] {
        assert!(kept.contains(id));
    }
    drop(repaired);
    // Repaired for good: a normal start now succeeds with the same prefix.
    assert_eq!(recovered(dir.path(), clock.now()).len(), 4);
}

#[test]
fn a_torn_tail_is_cut_at_the_last_good_record() {
    let (dir, clock, _) = closed_log_of(3);
    let path = only_segment(dir.path());
    let full = std::fs::read(&path).unwrap();
    let last = *frame_offsets(&path).last().unwrap();
    for cut in last + 1..full.len() as u64 {
        std::fs::write(&path, &full[..cut as usize]).unwrap();
        assert_eq!(recovered(dir.path(), clock.now()).len(), 2, "cut at {cut}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            last,
            "truncated at the record"
        );
    }
}

#[test]
fn files_from_a_newer_format_are_refused_by_name() {
    let (dir, clock, _) = closed_log_of(1);
    let path = only_segment(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[6] = 2;
    std::fs::write(&path, &bytes).unwrap();
    let err = recover(dir.path(), clock.now(), false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("format version 2 is newer"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[test]
fn a_data_dir_serves_one_daemon_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(T0);
    let (_store, p) = open(dir.path(), &clock);
    let err = recover(dir.path(), clock.now(), false).err().unwrap();
    assert!(matches!(err, RecoveryError::Locked { .. }), "{err}");
    p.log.close();
}

#[test]
fn touches_are_logged_throttled() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(T0);
    let (store, p) = open(dir.path(), &clock);
    let id = store.create(NewSession::default()).unwrap().key.encode();
    let before = p.log.appended();
    for _ in 0..100 {
        clock.advance(Duration::from_secs(1));
        store.get(&id, false).unwrap();
    }
    // 100 s of reads against a 30 min idle window: nothing worth a record yet.
    assert_eq!(p.log.appended(), before);
    clock.advance(MIN * 6);
    store.touch(&id).unwrap();
    assert_eq!(p.log.appended(), before + 1);
    p.log.close();
}

#[test]
fn a_damaged_or_newer_snapshot_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(T0);
    let (store, p) = open(dir.path(), &clock);
    for _ in 0..5 {
        store.create(NewSession::default()).unwrap();
    }
    let stats = snapshot(dir.path(), &p.log, &store).unwrap();
    p.log.close();
    drop(p);
    assert_eq!(recovered(dir.path(), clock.now()).len(), 5);
    let path = dir.path().join(snapshot_name(stats.seq));
    let good = std::fs::read(&path).unwrap();

    let mut bad = good.clone();
    let last = bad.len() - 3;
    bad[last] ^= 0x40;
    std::fs::write(&path, &bad).unwrap();
    let err = recover(dir.path(), clock.now(), false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("corrupt record"),
        "{err}"
    );

    let mut newer = good;
    newer[6] = 7;
    std::fs::write(&path, &newer).unwrap();
    let err = recover(dir.path(), clock.now(), false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("format version 7 is newer"), "{err}");
}

#[test]
fn a_new_data_dir_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data").join("tenants").join("shop");
    let r = recover(&dir, 0, false).unwrap();
    drop(r);
    for d in [parent.path().join("data"), dir] {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", d.display());
    }
}

#[test]
fn a_segment_cut_inside_its_header_recovers_every_time() {
    // A crash between creating a segment and writing its header leaves 0 to 7 bytes.
    let (dir, clock, _) = closed_log_of(1);
    let next = dir.path().join(segment_name(99));
    for len in 0..format::HEADER_BYTES as usize {
        std::fs::write(&next, &format::LOG_MAGIC[..len.min(6)]).unwrap();
        for round in 0..2 {
            let sessions = recovered(dir.path(), clock.now());
            assert_eq!(sessions.len(), 1, "header cut at {len}, start {round}");
        }
    }
}

#[test]
fn a_record_at_the_last_possible_version_is_refused_as_damage() {
    let key = crate::session::SessionKey::generate();
    let stored = |version| pb::StoredSession {
        key: Bytes::copy_from_slice(key.as_bytes()),
        version,
        last_access_at: T0,
        idle_timeout: 60_000,
        absolute_expires_at: T0 + 3_600_000,
        ..Default::default()
    };
    let entry = |version| Bytes::from(stored(version).encode_to_vec());
    assert!(records::decode_snapshot_entry(entry(u64::MAX)).is_none());
    assert!(records::decode_snapshot_entry(entry(u64::MAX - 1)).is_some());
    let update = pb::Record {
        op: Some(pb::record::Op::Update(pb::Update {
            key: Bytes::copy_from_slice(key.as_bytes()),
            version: u64::MAX,
            ..Default::default()
        })),
        idempotency_key: String::new(),
    };
    assert!(records::decode(Bytes::from(update.encode_to_vec())).is_none());
}

#[test]
fn a_zero_filled_tail_is_cut_like_a_torn_one() {
    // Power loss: the segment's new length reached the disk, its last bytes did not.
    let (dir, clock, ids) = closed_log_of(3);
    let path = only_segment(dir.path());
    let full = std::fs::read(&path).unwrap();
    let last = *frame_offsets(&path).last().unwrap();
    let mut bytes = full[..last as usize + 5].to_vec();
    bytes.resize(full.len() + 4096, 0);
    std::fs::write(&path, &bytes).unwrap();
    let got = recovered(dir.path(), clock.now());
    assert_eq!(got.len(), 2);
    assert!(got.contains_key(&ids[0]) && got.contains_key(&ids[1]));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), last);
}

#[test]
fn an_impossible_length_mid_log_refuses_to_start_instead_of_truncating() {
    let (dir, clock, ids) = closed_log_of(6);
    let path = only_segment(dir.path());
    let offsets = frame_offsets(&path);
    let good = std::fs::read(&path).unwrap();
    for n in [0u32, format::MAX_FRAME_BYTES + 1, 1 << 30] {
        let mut bytes = good.clone();
        let at = offsets[2] as usize;
        bytes[at..at + 4].copy_from_slice(&n.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = recover(dir.path(), clock.now(), false)
            .err()
            .unwrap_or_else(|| panic!("length {n} read as a torn tail"))
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains(&format!("offset {}", offsets[2])), "{err}");
        // Nothing was cut.
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "length {n}");
    }
    let repaired = recover(dir.path(), clock.now(), true).unwrap();
    let kept: Vec<String> = repaired.sessions.iter().map(|s| s.key.encode()).collect();
    assert_eq!(kept.len(), 2);
    assert!(kept.contains(&ids[0]) && kept.contains(&ids[1]));
}

#[test]
fn segments_snapshots_and_the_lock_are_private_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(T0);
    let (store, p) = open(dir.path(), &clock);
    store.create(NewSession::default()).unwrap();
    snapshot(dir.path(), &p.log, &store).unwrap();
    p.log.rotate().unwrap();
    p.log.close();
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
        kinds.push(path.extension().unwrap_or_default().to_owned());
    }
    for kind in ["sdl", "sds"] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "no .{kind} file: {kinds:?}"
        );
    }
}

#[test]
fn after_close_writes_are_refused_as_shutting_down_and_reads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(T0);
    let (store, p) = open(dir.path(), &clock);
    let id = store.create(NewSession::default()).unwrap().key.encode();
    let appended = p.log.appended();
    p.log.close();
    let refused = [
        store.create(NewSession::default()).err(),
        store.update(&id, Change::default()).err(),
        store.regenerate(&id, Rotation::default()).err(),
        store.destroy(&id).err(),
        store.destroy_user("someone", None).err(),
    ];
    for (i, err) in refused.into_iter().enumerate() {
        match err {
            Some(StoreError::Unavailable(why)) => {
                assert!(why.contains("shutting down"), "write {i}: {why}")
            }
            other => panic!("write {i} after close: {other:?}"),
        }
    }
    // Nothing reached the log, and the session is still there to read.
    assert_eq!(p.log.appended(), appended);
    assert_eq!(store.get(&id, true).unwrap().key.encode(), id);
    drop(p);
    assert_eq!(recovered(dir.path(), clock.now()).len(), 1);
}

#[test]
fn a_snapshot_is_due_at_the_larger_of_the_size_and_the_share_of_the_last() {
    const MIB: u64 = 1 << 20;
    // No snapshot yet, or a small one: the fixed size decides.
    assert!(!snapshot_due(64 * MIB - 1, 0, 64 * MIB, 100));
    assert!(snapshot_due(64 * MIB, 0, 64 * MIB, 100));
    assert!(snapshot_due(64 * MIB, 10 * MIB, 64 * MIB, 100));
    // A 1.2 GB snapshot: not rewritten for every 64 MiB of log.
    let big = 1200 * MIB;
    assert!(!snapshot_due(64 * MIB, big, 64 * MIB, 100));
    assert!(!snapshot_due(big - 1, big, 64 * MIB, 100));
    assert!(snapshot_due(big, big, 64 * MIB, 100));
    assert!(snapshot_due(big / 2, big, 64 * MIB, 50));
    // 0 percent: the fixed size alone.
    assert!(snapshot_due(64 * MIB, big, 64 * MIB, 0));
    // No overflow near the top.
    assert!(!snapshot_due(u64::MAX - 1, u64::MAX, 0, 1000));
}

/// Keyed writes: a Create, a compare-and-set Update and a login Regenerate, each with its
/// own key; the session they leave.
fn keyed_writes(store: &Store) -> Session {
    let created = store
        .create(NewSession {
            idempotency_key: Some("create-1".into()),
            ..NewSession::default()
        })
        .unwrap();
    let id = created.key.encode();
    store.update(&id, keyed_cas()).unwrap();
    store.regenerate(&id, keyed_login()).unwrap()
}

fn keyed_cas() -> Change {
    Change {
        set: attrs(&[("cart", "kiwi")]),
        expected_version: Some(1),
        idempotency_key: Some("update-1".into()),
        ..Change::default()
    }
}

fn keyed_login() -> Rotation {
    Rotation {
        user: Some("alice".into()),
        idempotency_key: Some("login-1".into()),
        ..Rotation::default()
    }
}

/// Retries every keyed write of [`keyed_writes`] on a recovered store: each gets the
/// original result and nothing changes.
fn retries_get_the_original(store: &Store, moved: &Session, old_id: &str) {
    let records = store.idempotency_records();
    assert_eq!(records.len(), 3, "{records:?}");
    let again = store.regenerate(old_id, keyed_login()).unwrap();
    assert_eq!(again.key, moved.key);
    assert_eq!(again.version, moved.version);
    // The Create's and the Update's session has moved on: their retries say so instead of
    // making a second session or a second version.
    let create = store.create(NewSession {
        idempotency_key: Some("create-1".into()),
        ..NewSession::default()
    });
    assert_eq!(create.unwrap_err(), StoreError::RetryEnded("created"));
    let update = store.update(old_id, keyed_cas()).unwrap_err();
    assert_eq!(update, StoreError::RetryEnded("updated"));
    assert_eq!(store.stats().sessions, 1);
    assert_eq!(
        store.idempotency_records(),
        records,
        "retries record nothing"
    );
}

#[test]
fn a_retry_after_a_restart_gets_the_original_result_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(T0);
    let (store, p) = open(dir.path(), &clock);
    let moved = keyed_writes(&store);
    let old_id = store.idempotency_records()[0].result.encode();
    let before = store.idempotency_records();
    p.log.close();
    drop((store, p));

    let (store, _p) = open(dir.path(), &clock);
    assert_eq!(store.idempotency_records(), before);
    retries_get_the_original(&store, &moved, &old_id);
}

#[test]
fn a_retry_after_a_restart_gets_the_original_result_from_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(T0);
    let (store, p) = open(dir.path(), &clock);
    let moved = keyed_writes(&store);
    let old_id = store.idempotency_records()[0].result.encode();
    let before = store.idempotency_records();
    let stats = snapshot(dir.path(), &p.log, &store).unwrap();
    assert_eq!(stats.sessions, 1);
    p.log.close();
    drop((store, p));
    // Only the snapshot is left to hold the records: the log after it is empty.
    let segments: Vec<_> = list(dir.path()).unwrap().segments;
    assert_eq!(segments, vec![stats.seq]);

    let (store, _p) = open(dir.path(), &clock);
    assert_eq!(store.idempotency_records(), before);
    retries_get_the_original(&store, &moved, &old_id);
}

#[test]
fn idempotency_records_round_trip_through_log_records_and_snapshot_frames() {
    let store = Store::new(Limits::default(), 4, Clock::manual(T0), Box::new(Discard));
    keyed_writes(&store);
    for r in store.idempotency_records() {
        let frame = Bytes::from(records::stored_idempotency(&r).encode_to_vec());
        assert_eq!(
            records::decode_snapshot_entry(frame),
            Some(records::SnapshotEntry::Idempotency(r))
        );
    }
    // A session frame still reads as a session.
    store.for_each_session(|s| {
        let frame = Bytes::from(records::stored(s.clone()).encode_to_vec());
        assert_eq!(
            records::decode_snapshot_entry(frame),
            Some(records::SnapshotEntry::Session(s))
        );
    });
    // A log record keeps its key, and one written without it reads as none.
    let key = crate::session::SessionKey::generate();
    let update = |idempotency: Option<&str>| crate::store::Effect::Update {
        key,
        set: vec![],
        remove: vec![],
        version: 2,
        at: T0,
        idempotency: idempotency.map(Into::into),
    };
    for effect in [update(Some("k")), update(None)] {
        let bytes = Bytes::from(records::encode(&effect));
        assert_eq!(records::decode(bytes), Some(effect));
    }
}

/// A session's attributes written as the `map<string, bytes>` the records once declared:
/// the same bytes on the wire as today's repeated `Attribute`.
fn with_map_attributes(key: &crate::session::SessionKey, map: &HashMap<String, Vec<u8>>) -> Bytes {
    use prost::encoding::{bytes as pbytes, hash_map, string, uint64};
    let mut buf = Vec::new();
    pbytes::encode(1, &Bytes::copy_from_slice(key.as_bytes()), &mut buf);
    hash_map::encode(
        string::encode,
        string::encoded_len,
        pbytes::encode,
        pbytes::encoded_len,
        3,
        map,
        &mut buf,
    );
    uint64::encode(4, &3, &mut buf);
    uint64::encode(6, &T0, &mut buf);
    uint64::encode(7, &60_000, &mut buf);
    uint64::encode(8, &(T0 + 3_600_000), &mut buf);
    Bytes::from(buf)
}

#[test]
fn attributes_written_as_a_map_read_back_the_same() {
    let key = crate::session::SessionKey::generate();
    let map = HashMap::from([
        ("cart".to_string(), b"[1,2,3]".to_vec()),
        ("user".to_string(), b"ada".to_vec()),
        ("empty".to_string(), Vec::new()),
    ]);
    let Some(records::SnapshotEntry::Session(s)) =
        records::decode_snapshot_entry(with_map_attributes(&key, &map))
    else {
        panic!("a session written with a map of attributes no longer decodes");
    };
    let read: HashMap<String, Vec<u8>> = s
        .attributes
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_vec()))
        .collect();
    assert_eq!(read, map);
    assert_eq!((s.key, s.version), (key, 3));
    // And today's encoding reads as the same map would.
    let again = records::stored(s.clone()).encode_to_vec();
    let Some(records::SnapshotEntry::Session(s2)) = records::decode_snapshot_entry(again.into())
    else {
        panic!("round trip");
    };
    assert_eq!(s2, s);
}

#[test]
fn a_record_repeating_a_key_keeps_its_last_value_and_one_with_a_key_not_utf8_is_damage() {
    let key = crate::session::SessionKey::generate();
    let attribute = |k: &[u8], v: &[u8]| pb::Attribute {
        key: Bytes::copy_from_slice(k),
        value: Bytes::copy_from_slice(v),
    };
    let stored = |attributes: Vec<pb::Attribute>| {
        Bytes::from(
            pb::StoredSession {
                key: Bytes::copy_from_slice(key.as_bytes()),
                attributes,
                version: 1,
                last_access_at: T0,
                idle_timeout: 60_000,
                absolute_expires_at: T0 + 3_600_000,
                ..Default::default()
            }
            .encode_to_vec(),
        )
    };
    // Few keys (a scan) and many (a hash table) alike.
    for n in [2usize, 40] {
        let mut attributes: Vec<pb::Attribute> = (0..n)
            .map(|i| attribute(format!("k{i}").as_bytes(), b"first"))
            .collect();
        attributes.push(attribute(b"k1", b"last"));
        let Some(records::SnapshotEntry::Session(s)) =
            records::decode_snapshot_entry(stored(attributes))
        else {
            panic!("{n} keys: did not decode");
        };
        assert_eq!(s.attributes.len(), n, "{n} keys: each key once");
        assert_eq!(&s.attributes["k1"][..], b"last");
        assert_eq!(&s.attributes["k0"][..], b"first");
    }
    assert!(records::decode_snapshot_entry(stored(vec![attribute(b"\xff\xfe", b"v")])).is_none());
    let update = |set: Vec<pb::Attribute>| pb::Record {
        op: Some(pb::record::Op::Update(pb::Update {
            key: Bytes::copy_from_slice(key.as_bytes()),
            set,
            version: 2,
            at: T0,
            ..Default::default()
        })),
        idempotency_key: String::new(),
    };
    let decoded = records::decode(Bytes::from(
        update(vec![attribute(b"a", b"1"), attribute(b"a", b"2")]).encode_to_vec(),
    ));
    let Some(crate::store::events::Effect::Update { set, .. }) = decoded else {
        panic!("the update did not decode");
    };
    assert_eq!(set, vec![("a".to_string(), Bytes::from_static(b"2"))]);
    assert!(records::decode(Bytes::from(
        update(vec![attribute(b"\xff", b"1")]).encode_to_vec()
    ))
    .is_none());
}

#[test]
fn a_snapshot_entry_written_directly_is_the_messages_own_encoding() {
    let store = Store::new(Limits::default(), 4, Clock::manual(T0), Box::new(Discard));
    let clock = Clock::manual(T0);
    let mut ids = workload(&store, &clock);
    // The workload's sessions, and the edges proto3 leaves out: an anonymous session with
    // no attributes, and one whose value is empty (with the client's IP and User-Agent).
    ids.push(store.create(Default::default()).unwrap().key.encode());
    let empty_value = NewSession {
        attributes: attrs(&[("flag", "")]),
        client: crate::session::ClientInfo {
            ip: "203.0.113.7".into(),
            user_agent: "curl/8".into(),
        },
        ..Default::default()
    };
    ids.push(store.create(empty_value).unwrap().key.encode());
    let mut seen = 0;
    store.for_each_session(|s| {
        let mut direct = Vec::new();
        records::encode_stored(&s, &mut direct);
        assert_eq!(direct, records::stored(s.clone()).encode_to_vec(), "{s:?}");
        seen += 1;
    });
    assert!(seen >= 3, "only {seen} sessions");
}
