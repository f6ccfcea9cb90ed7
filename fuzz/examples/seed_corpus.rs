//! Writes seed inputs for every fuzz target, built with sessiond's own types, so each run
//! starts from well-formed IDs, requests and records instead of searching for them.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example seed_corpus [DIR]` writes
//! `DIR/<target>/seed-*` (DIR defaults to `fuzz/corpus`, where `cargo fuzz run` looks).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use sessiond::api::pb::{self, pipeline_request::Op};
use sessiond::persist::records;
use sessiond::session::{ClientInfo, Session, SessionKey};
use sessiond::store::events::{Effect, EndCause};
use sessiond::store::{IdempotencyRecord, IdempotentOp};

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os().nth(1).map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"),
        PathBuf::from,
    );
    let mut count = 0;
    for (target, seeds) in [
        ("session_id", session_id()),
        ("requests", requests()),
        ("persist_records", persist_records()),
    ] {
        let target_dir = dir.join(target);
        std::fs::create_dir_all(&target_dir)?;
        for (name, bytes) in seeds {
            std::fs::write(target_dir.join(format!("seed-{name}")), bytes)?;
            count += 1;
        }
    }
    println!("wrote {count} seed inputs under {}", dir.display());
    Ok(())
}

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn session_id() -> Seeds {
    let id = SessionKey::generate().encode();
    vec![
        ("valid", id.clone().into_bytes()),
        ("short", id.as_bytes()[..42].to_vec()),
        ("padded", format!("{}=", &id[..42]).into_bytes()),
        ("empty", Vec::new()),
    ]
}

fn duration(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos })
}

fn attributes(items: &[(&str, &str)]) -> HashMap<String, Bytes> {
    items
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

/// One of each operation, on the sessions the `requests` target starts with (`@0`..`@2`).
fn ops() -> Vec<(&'static str, Op)> {
    vec![
        (
            "create",
            Op::Create(pb::CreateRequest {
                user_id: "alice".into(),
                attributes: attributes(&[("cart", "pear"), ("lang", "en")]),
                idle_timeout: duration(600, 250_000_000),
                absolute_timeout: duration(3600, 500_000),
                client: Some(pb::ClientInfo {
                    ip: "198.51.100.7".into(),
                    user_agent: "Mozilla/5.0".into(),
                }),
                idempotency_key: "create-1".into(),
            }),
        ),
        (
            "get",
            Op::Get(pb::GetRequest {
                id: "@0".into(),
                peek: false,
            }),
        ),
        ("touch", Op::Touch(pb::TouchRequest { id: "@1".into() })),
        (
            "update",
            Op::Update(pb::UpdateRequest {
                id: "@0".into(),
                set: attributes(&[("cart", "plum"), ("step", "2")]),
                remove: vec!["theme".into()],
                expected_version: Some(1),
                idempotency_key: String::new(),
            }),
        ),
        (
            "regenerate",
            Op::Regenerate(pb::RegenerateRequest {
                id: "@2".into(),
                user_id: Some("bob".into()),
                drop_attributes: false,
                idempotency_key: String::new(),
            }),
        ),
        (
            "destroy",
            Op::Destroy(pb::DestroyRequest { id: "@1".into() }),
        ),
        (
            "list",
            Op::ListUserSessions(pb::ListUserSessionsRequest {
                user_id: "alice".into(),
                include_attributes: true,
            }),
        ),
        (
            "destroy-user",
            Op::DestroyUserSessions(pb::DestroyUserSessionsRequest {
                user_id: "alice".into(),
                except_id: "@0".into(),
            }),
        ),
    ]
}

fn requests() -> Seeds {
    let mut seeds = Seeds::new();
    for (selector, (name, op)) in ops().into_iter().enumerate() {
        let body = match op {
            Op::Create(r) => r.encode_to_vec(),
            Op::Get(r) => r.encode_to_vec(),
            Op::Touch(r) => r.encode_to_vec(),
            Op::Update(r) => r.encode_to_vec(),
            Op::Regenerate(r) => r.encode_to_vec(),
            Op::Destroy(r) => r.encode_to_vec(),
            Op::ListUserSessions(r) => r.encode_to_vec(),
            Op::DestroyUserSessions(r) => r.encode_to_vec(),
        };
        seeds.push((name, [&[selector as u8][..], &body].concat()));
    }
    let many = pb::GetManyRequest {
        ids: vec!["@0".into(), "@1".into(), "@2".into(), "not-an-id".into()],
        peek: true,
    };
    seeds.push(("get-many", [&[8][..], &many.encode_to_vec()].concat()));
    // A pipeline: every op, with time passing (the request id is the clock step in ms).
    let mut stream = Vec::new();
    for (i, (_, op)) in ops().into_iter().chain(ops()).enumerate() {
        pb::PipelineRequest {
            id: i as u64 * 600_000,
            op: Some(op),
        }
        .encode_length_delimited(&mut stream)
        .unwrap();
    }
    // Selector 9 plus the flags: default limits, tight limits, tight limits evicting.
    seeds.push(("pipeline", [&[0x09][..], &stream].concat()));
    seeds.push(("pipeline-tight", [&[0x19][..], &stream].concat()));
    seeds.push(("pipeline-evict", [&[0x39][..], &stream].concat()));
    seeds
}

fn session(user: Option<&str>) -> Session {
    let now = 1_700_000_000_000;
    Session {
        key: SessionKey::generate(),
        user: user.map(Arc::from),
        attributes: attributes(&[("cart", "fig")]).into(),
        version: 1,
        created_at: now - 60_000,
        last_access_at: now - 30_000,
        idle_timeout: 1_800_000,
        absolute_expires_at: now + 86_400_000,
        client: ClientInfo {
            ip: "203.0.113.9".into(),
            user_agent: "curl".into(),
        },
    }
}

/// Chunks as the `persist_records` target reads them: a length byte, then the payload.
fn chunks(payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in payloads {
        assert!(p.len() < 0xfe, "a seed record is too long for one chunk");
        out.push(p.len() as u8);
        out.extend_from_slice(p);
    }
    out
}

fn persist_records() -> Seeds {
    let a = session(Some("alice"));
    let b = session(None);
    let mut rotated = a.clone();
    rotated.key = SessionKey::generate();
    rotated.version = 3;
    let log = vec![
        records::encode(&Effect::Create {
            session: a.clone(),
            idempotency: Some("create-a".into()),
        }),
        records::encode(&Effect::Create {
            session: b.clone(),
            idempotency: None,
        }),
        records::encode(&Effect::Update {
            key: a.key,
            set: vec![("cart".into(), Bytes::from_static(b"kiwi"))],
            remove: vec!["gone".into()],
            version: 2,
            at: 1_700_000_000_000,
            idempotency: Some("update-a".into()),
        }),
        records::encode(&Effect::Touch {
            key: b.key,
            at: 1_700_000_000_000,
        }),
        records::encode(&Effect::Regenerate {
            old: a.key,
            session: rotated,
            idempotency: None,
        }),
        records::encode(&Effect::End {
            key: b.key,
            cause: EndCause::Destroyed,
            at: 1_700_000_000_000,
        }),
    ];
    let snapshot = vec![
        records::stored(a.clone()).encode_to_vec(),
        records::stored(b).encode_to_vec(),
        records::stored_idempotency(&IdempotencyRecord {
            key: "create-a".into(),
            op: IdempotentOp::Create,
            target: None,
            result: a.key,
            version: 1,
            at: a.created_at,
        })
        .encode_to_vec(),
    ];
    let log_chunks = chunks(&log);
    let mut torn = log_chunks.clone();
    torn.extend_from_slice(&[0x40, 1, 2, 3]);
    vec![
        ("log", [&[0][..], &log_chunks].concat()),
        (
            "snapshot-and-log",
            [&[1][..], &chunks(&snapshot), &[0xff], &log_chunks].concat(),
        ),
        ("torn-tail", [&[0][..], &torn].concat()),
        (
            "two-segments",
            [&[0][..], &log_chunks, &[0xff], &chunks(&log[..2])].concat(),
        ),
        // A segment whose header was cut short (a crash while creating it).
        (
            "torn-header",
            [&[2][..], &log_chunks, &[0xff, 0x10], b"SDL"].concat(),
        ),
    ]
}
