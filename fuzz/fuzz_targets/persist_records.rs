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
//! Checked: no panic in the scanner, the record decoders or `Replay`, fed both from files
//! and directly (every payload through `Replay::apply` and `Replay::load_snapshot_entry`);
//! failures are format errors, never I/O or lock errors; on well-formed files, recovery
//! agrees with an in-memory replay of the same records; `--repair` on files that recover
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
use sessiond::persist::records::Replay;
use sessiond::persist::{recover, snapshot_name, Recovered, RecoveryError};
use sessiond::session::{Millis, Session};
use sessiond::store::events::Discard;
use sessiond::store::{Change, Limits, Rotation, Store};

/// Recovery's "now": records are judged live or dead against it.
const NOW: Millis = 1_700_000_000_000;
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

    let first = recover(&plain, NOW, false).map(Outcome::from);
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

    let fixed = recover(&repaired, NOW, true).map(Outcome::from);
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
        Outcome::new(r.sessions, r.from_snapshot, r.records)
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
    match recover(dir, NOW, false) {
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
    let store = Store::with_capacity(
        Limits::default(),
        4,
        Clock::manual(NOW),
        Box::new(Discard),
        sessions.len(),
    );
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
            ..Change::default()
        };
        let _ = store.update(&id, change);
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

    /// Every payload, and every raw tail as one payload, through both record decoders.
    fn replay_directly(&self) {
        let path = Path::new("direct");
        let mut replay = Replay::default();
        let mut snapshot = Replay::default();
        for f in &self.files {
            let raw = Bytes::copy_from_slice(&f.bytes);
            for p in f.payloads.iter().chain([&raw]) {
                let _ = replay.apply(p.clone(), path);
                let _ = snapshot.load_snapshot_entry(p.clone(), path);
            }
        }
        let _ = replay.live(NOW);
        let _ = snapshot.live(NOW);
    }

    /// What recovery must produce from well-formed files: an in-memory replay of the same
    /// records. `Err` if a record is nonsense; `None` if some file is damaged, where only
    /// the properties in `check` apply.
    fn expected(&self) -> Option<Result<Outcome, ()>> {
        if self.files.iter().any(|f| f.damaged) {
            return None;
        }
        let path = Path::new("expected");
        let mut replay = Replay::default();
        let mut from_snapshot = 0;
        for f in &self.files {
            for p in &f.payloads {
                let applied = if f.snapshot {
                    replay.load_snapshot_entry(p.clone(), path)
                } else {
                    replay.apply(p.clone(), path)
                };
                if applied.is_err() {
                    return Some(Err(()));
                }
            }
            if f.snapshot {
                from_snapshot = replay.sessions.len();
            }
        }
        let records = replay.records;
        Some(Ok(Outcome::new(replay.live(NOW), from_snapshot, records)))
    }
}
