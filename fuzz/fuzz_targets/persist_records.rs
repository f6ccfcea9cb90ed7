//! Persistence records: builds a data directory (a snapshot and log segments) from the input
//! and runs recovery over it, with and without `--repair`.
//!
//! Input: the first byte is flags (bit 0: the first file is snapshot 1, bit 1: the last file
//! gets no header, so its bytes are entirely the input's); the rest is a sequence of chunks,
//! each a length byte `n` and then:
//! - `n` < 0xFE: one well-formed frame (right length and CRC) around the next `n` bytes, so
//!   the record decoder sees arbitrary payloads instead of stopping at the checksum;
//! - `n` = 0xFE: a frame with a wrong CRC around the payload whose length is the next byte;
//! - `n` = 0xFF: the next file (up to four);
//! - when fewer bytes are left than the length says, they are appended raw: torn tails.
//!
//! Checked: no panic in the scanner, the record decoders or `Store::apply`, fed both from
//! files and directly (every payload through both decoders, and what decodes applied to a
//! Store); failures are format errors, never I/O or lock errors; on well-formed files,
//! recovery agrees with `Model`, a plain map replaying the same records by the rules
//! `Store::apply` documents (idempotency keys included: an effect whose key another write
//! holds, in force at the effect's time, is stale); `--repair` on files that recover
//! without it changes nothing; a directory that recovered once recovers again to the same
//! sessions; and the sessions load into a Store that reads back exactly what was recovered
//! and takes Touch, Update and Regenerate on each.
#![no_main]

use std::fs;
use std::path::Path;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sessiond::clock::Clock;
use sessiond::persist::format::{frame, write_header, FormatError, LOG_MAGIC, SNAPSHOT_MAGIC};
use sessiond::persist::log::segment_name;
use sessiond::persist::records::{decode, decode_snapshot_entry, SnapshotEntry};
use sessiond::persist::{snapshot_name, Recovered, RecoveryError};
use sessiond::session::{KeyHasherBuilder, Millis, Session, SessionKey};
use sessiond::store::events::Discard;
use sessiond::store::{Change, Effect, IdempotencyRecord, Limits, Rotation, Store};

/// Recovery's "now": records are judged live or dead against it.
const NOW: Millis = 1_700_000_000_000;

/// A store on a clock that reads `NOW`, with no limits that matter here and no sinks.
fn scratch(capacity: usize) -> Store {
    Store::with_capacity(
        Limits::default(),
        4,
        Clock::manual(NOW),
        Box::new(Discard),
        capacity,
    )
}

/// Recovers `dir` into a scratch store.
fn recover(dir: &Path, repair: bool) -> Result<Recovered, RecoveryError> {
    sessiond::persist::recover(dir, repair, scratch)
}

/// The sessions of `store` alive at `NOW`.
fn live(store: &Store) -> Vec<Session> {
    let mut out = Vec::new();
    store.for_each_session(|s| {
        if NOW < s.expires_at() {
            out.push(s);
        }
    });
    out
}
const SNAPSHOT_FIRST: u8 = 1;
const RAW_LAST_FILE: u8 = 2;
const BAD_CRC: u8 = 0xfe;
const NEXT_FILE: u8 = 0xff;
const MAX_FILES: usize = 4;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let layout = Layout::parse(flags, rest);
    layout.replay_directly();

    // tmpfs where there is one: recovery fsyncs what it truncates, which on a disk costs
    // most of each run.
    let mut temp = tempfile::Builder::new();
    temp.prefix("sessiond-fuzz-");
    let dir = temp
        .tempdir_in("/dev/shm")
        .or_else(|_| temp.tempdir())
        .expect("temp dir");
    let plain = dir.path().join("plain");
    let repaired = dir.path().join("repaired");
    layout.write(&plain);
    layout.write(&repaired);

    let first = recover(&plain, false).map(Outcome::from);
    if let Some(expected) = layout.expected() {
        match (&expected, &first) {
            (Ok(want), Ok(got)) => assert_eq!(got, want, "recovery vs in-memory replay"),
            (Err(()), Err(_)) => {}
            _ => panic!(
                "recovery {} but an in-memory replay {}",
                if first.is_ok() { "succeeded" } else { "failed" },
                if expected.is_ok() {
                    "succeeded"
                } else {
                    "failed"
                },
            ),
        }
    }
    check(&plain, &first);

    let fixed = recover(&repaired, true).map(Outcome::from);
    if let Ok(plain) = &first {
        assert_eq!(
            fixed.as_ref().ok(),
            Some(plain),
            "--repair on healthy files"
        );
    }
    check(&repaired, &fixed);
});

/// What a recovery produced, lock released: comparable across runs.
#[derive(Debug, PartialEq)]
struct Outcome {
    sessions: Vec<Session>,
    from_snapshot: usize,
    records: u64,
}

impl From<Recovered> for Outcome {
    fn from(r: Recovered) -> Self {
        Outcome::new(live(&r.store), r.from_snapshot, r.records)
    }
}

impl Outcome {
    fn new(mut sessions: Vec<Session>, from_snapshot: usize, records: u64) -> Self {
        sessions.sort_unstable_by_key(|s| *s.key.as_bytes());
        Outcome {
            sessions,
            from_snapshot,
            records,
        }
    }
}

/// Checks one recovery's result and that the directory it left recovers again to the same.
fn check(dir: &Path, result: &Result<Outcome, RecoveryError>) {
    let recovered = match result {
        Ok(r) => r,
        Err(RecoveryError::Format(
            FormatError::BadMagic { .. } | FormatError::TooNew { .. } | FormatError::Corrupt { .. },
        )) => return,
        Err(e) => panic!("recovery failed with something other than a format error: {e}"),
    };
    for s in &recovered.sessions {
        assert!(NOW < s.expires_at(), "recovery returned a dead session");
    }
    assert!(
        recovered.sessions.windows(2).all(|w| w[0].key != w[1].key),
        "recovery returned a key twice"
    );
    match recover(dir, false) {
        Ok(again) => assert_eq!(
            Outcome::from(again).sessions,
            recovered.sessions,
            "a second recovery of the same directory"
        ),
        Err(e) => panic!("a directory that recovered once does not recover again: {e}"),
    }
    restore(&recovered.sessions);
}

/// Loads recovered sessions into a Store (as start-up does), reads each one back, and runs
/// client calls on them: recovered values (versions, deadlines) are whatever the file said.
fn restore(sessions: &[Session]) {
    let store = scratch(sessions.len());
    store.restore(sessions.to_vec());
    assert_eq!(store.stats().sessions, sessions.len());
    for s in sessions {
        let got = store
            .get(&s.key.encode(), true)
            .expect("a restored session");
        assert_eq!(&got, s, "a restored session reads back differently");
    }
    let mut seen = 0;
    store.for_each_session(|_| seen += 1);
    assert_eq!(seen, sessions.len());
    assert_eq!(store.reap(usize::MAX).expired, 0, "reaped a live session");
    for s in sessions {
        let id = s.key.encode();
        let _ = store.touch(&id);
        let change = Change {
            set: vec![("fuzz".into(), Bytes::from_static(b"1"))],
            idempotency_key: Some(format!("fuzz-{id}")),
            ..Change::default()
        };
        let _ = store.update(&id, change.clone());
        // The retry of a keyed write changes nothing.
        let version = store.get(&id, true).map(|s| s.version);
        let _ = store.update(&id, change);
        assert_eq!(
            store.get(&id, true).map(|s| s.version),
            version,
            "a retried update"
        );
        let _ = store.regenerate(&id, Rotation::default());
    }
    let mut seen = 0;
    store.for_each_session(|_| seen += 1);
    assert_eq!(
        store.stats().sessions,
        seen,
        "the session count after client calls"
    );
}

/// One file of the data directory.
struct File {
    name: String,
    snapshot: bool,
    header: bool,
    /// The frames (and any raw tail), after the header.
    bytes: Vec<u8>,
    /// The payloads of the well-formed frames, in order.
    payloads: Vec<Bytes>,
    /// Whether the file holds anything but well-formed frames.
    damaged: bool,
}

struct Layout {
    files: Vec<File>,
}

impl Layout {
    fn parse(flags: u8, mut rest: &[u8]) -> Self {
        let snapshot_first = flags & SNAPSHOT_FIRST != 0;
        let file = |i: usize| {
            let snapshot = snapshot_first && i == 0;
            File {
                name: if snapshot {
                    snapshot_name(1)
                } else {
                    // After a snapshot N, recovery replays segments N, N+1, ...
                    segment_name((i + usize::from(!snapshot_first)) as u64)
                },
                snapshot,
                header: true,
                bytes: Vec::new(),
                payloads: Vec::new(),
                damaged: false,
            }
        };
        let mut files = vec![file(0)];
        while let Some((&n, tail)) = rest.split_first() {
            let f = files.last_mut().unwrap();
            match n {
                NEXT_FILE => {
                    rest = tail;
                    if files.len() < MAX_FILES {
                        files.push(file(files.len()));
                    }
                }
                BAD_CRC => match tail.split_first() {
                    Some((&n, tail)) if tail.len() >= usize::from(n) => {
                        let (payload, tail) = tail.split_at(usize::from(n));
                        let at = f.bytes.len();
                        frame(payload, &mut f.bytes);
                        f.bytes[at + 4] ^= 1;
                        f.damaged = true;
                        rest = tail;
                    }
                    _ => {
                        f.bytes.extend_from_slice(rest);
                        f.damaged = true;
                        break;
                    }
                },
                n if tail.len() >= usize::from(n) => {
                    let (payload, tail) = tail.split_at(usize::from(n));
                    frame(payload, &mut f.bytes);
                    f.payloads.push(Bytes::copy_from_slice(payload));
                    // An empty frame is eight zero bytes: where only zeros follow, recovery
                    // rightly reads it as the zero-filled tail of a power loss.
                    f.damaged |= payload.is_empty();
                    rest = tail;
                }
                _ => {
                    f.bytes.extend_from_slice(tail);
                    f.damaged = true;
                    break;
                }
            }
        }
        if flags & RAW_LAST_FILE != 0 {
            let last = files.last_mut().unwrap();
            last.header = false;
            last.damaged = true;
        }
        Layout { files }
    }

    fn write(&self, dir: &Path) {
        fs::create_dir_all(dir).expect("create data dir");
        for f in &self.files {
            let mut bytes = Vec::with_capacity(8 + f.bytes.len());
            if f.header {
                let magic = if f.snapshot {
                    SNAPSHOT_MAGIC
                } else {
                    LOG_MAGIC
                };
                write_header(&mut bytes, magic).expect("header");
            }
            bytes.extend_from_slice(&f.bytes);
            fs::write(dir.join(&f.name), bytes).expect("write data file");
        }
    }

    /// Every payload, and every raw tail as one payload, through both record decoders, and
    /// whatever decodes applied to a store.
    fn replay_directly(&self) {
        let store = scratch(0);
        for f in &self.files {
            let raw = Bytes::copy_from_slice(&f.bytes);
            for p in f.payloads.iter().chain([&raw]) {
                if let Some(effect) = decode(p.clone()) {
                    let _ = store.apply(&effect);
                }
                match decode_snapshot_entry(p.clone()) {
                    Some(SnapshotEntry::Session(s)) => {
                        let _ = store.apply(&Effect::Create {
                            session: s,
                            idempotency: None,
                        });
                    }
                    Some(SnapshotEntry::Idempotency(r)) => store.restore_idempotency(vec![r]),
                    None => {}
                }
            }
        }
        let _ = store.reap(usize::MAX);
    }

    /// What recovery must produce from well-formed files: the model's replay of the same
    /// records. `Err` if a record is nonsense; `None` if some file is damaged, where only
    /// the properties in `check` apply.
    fn expected(&self) -> Option<Result<Outcome, ()>> {
        if self.files.iter().any(|f| f.damaged) {
            return None;
        }
        let mut model = Model::default();
        let (mut from_snapshot, mut records) = (0, 0);
        let mut keys = Vec::new();
        for f in &self.files {
            for p in &f.payloads {
                if f.snapshot {
                    match decode_snapshot_entry(p.clone()) {
                        Some(SnapshotEntry::Session(s)) => {
                            model.sessions.insert(s.key, s);
                        }
                        Some(SnapshotEntry::Idempotency(r)) => keys.push(r),
                        None => return Some(Err(())),
                    }
                } else {
                    let Some(effect) = decode(p.clone()) else {
                        return Some(Err(()));
                    };
                    model.apply(effect);
                    records += 1;
                }
            }
            if f.snapshot {
                from_snapshot = model.sessions.len();
                // Recovery loads a snapshot's records after its sessions, oldest first.
                keys.sort_by(|a, b| (a.at, &a.key).cmp(&(b.at, &b.key)));
                for r in keys.drain(..) {
                    model.remember(r);
                }
            }
        }
        let live = model
            .sessions
            .into_values()
            .filter(|s| NOW < s.expires_at());
        Some(Ok(Outcome::new(live.collect(), from_snapshot, records)))
    }
}

/// Replay by the rules `Store::apply` documents, on a plain map: creates and regenerates
/// keep the higher version of a key, an update applies only onto the version just before
/// its own, touches only move time forward, and ends remove whatever is there. A keyed
/// write is stale while another write's record holds its key (in force at its time), and
/// records what it did once applied, forgetting records past the window of its time.
#[derive(Default)]
struct Model {
    sessions: std::collections::HashMap<SessionKey, Session, KeyHasherBuilder>,
    keys: std::collections::HashMap<std::sync::Arc<str>, IdempotencyRecord>,
}

/// The default `idempotency_window` the scratch stores use, in milliseconds.
fn window() -> Millis {
    Limits::default().idempotency_window.as_millis() as Millis
}

impl Model {
    fn apply(&mut self, effect: Effect) {
        let record = IdempotencyRecord::of(&effect);
        if let Some(r) = &record {
            let taken = self
                .keys
                .get(&r.key)
                .is_some_and(|held| r.at < held.at.saturating_add(window()) && held != r);
            if taken {
                return;
            }
        }
        let done = match effect {
            Effect::Create { session, .. } => self.upsert(session),
            Effect::Update {
                key,
                set,
                remove,
                version,
                at,
                ..
            } => match self.sessions.get_mut(&key) {
                Some(s) if s.version.checked_add(1) == Some(version) => {
                    let mut attributes = s.attributes.to_map();
                    for r in &remove {
                        attributes.remove(r);
                    }
                    attributes.extend(set);
                    s.attributes = attributes.into();
                    s.version = version;
                    s.last_access_at = s.last_access_at.max(at);
                    true
                }
                _ => false,
            },
            Effect::Touch { key, at } => {
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.last_access_at = s.last_access_at.max(at);
                }
                false
            }
            Effect::Regenerate { old, session, .. } => {
                // A move applies onto the version it was decided on, unless it was applied
                // before (the new key is there).
                let overtaken = !self.sessions.contains_key(&session.key)
                    && self
                        .sessions
                        .get(&old)
                        .is_some_and(|o| o.version.checked_add(1) != Some(session.version));
                if !overtaken {
                    self.sessions.remove(&old);
                }
                !overtaken && self.upsert(session)
            }
            Effect::End { key, .. } => {
                self.sessions.remove(&key);
                false
            }
        };
        if let Some(r) = record.filter(|_| done) {
            self.remember(r);
        }
    }

    /// Stores a record at its time and forgets those past the window then.
    fn remember(&mut self, r: IdempotencyRecord) {
        let t = r.at;
        self.keys.insert(r.key.clone(), r);
        self.keys
            .retain(|_, held| held.at.saturating_add(window()) > t);
    }

    /// Whether it stored `s`.
    fn upsert(&mut self, s: Session) -> bool {
        match self.sessions.get(&s.key) {
            Some(cur) if cur.version >= s.version => false,
            _ => {
                self.sessions.insert(s.key, s);
                true
            }
        }
    }
}
