//! Durability against the real binary: kill -9 under load, torn tails, corruption and
//! `--repair`, snapshots taken while writers run, and `DestroyAllSessions` surviving a
//! kill -9 right after its reply.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::proc::{run_to_exit, spawn, Proc};
use rand::{Rng, SeedableRng};
use sessiond::api::pb;
use sessiond::api::pb::session_store_client::SessionStoreClient;
use tonic::transport::Channel;
use tonic::Code;

fn start(dir: &Path, env: &[(&str, &str)]) -> Proc {
    let data = dir.join("data");
    let args = ["--data-dir", data.to_str().unwrap(), "--fsync", "always"];
    spawn(dir, &args, env).unwrap_or_else(|out| panic!("sessiond did not start:\n{out}"))
}

async fn client(p: &Proc) -> SessionStoreClient<Channel> {
    common::connect(p.url()).await
}

/// What the writers were told, and what they are not sure of.
#[derive(Default, Clone)]
struct Acked {
    /// Live sessions and their attributes, as last acknowledged.
    live: HashMap<String, HashMap<String, String>>,
    /// IDs acknowledged as destroyed or regenerated away: must stay NOT_FOUND.
    dead: HashSet<String>,
    /// IDs with a call in flight when the server died: either outcome is allowed.
    uncertain: HashSet<String>,
}

/// One writer: works on its own sessions until a call fails (the server died).
async fn writer(mut c: SessionStoreClient<Channel>, acked: Arc<Mutex<Acked>>, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut mine: Vec<String> = Vec::new();
    for step in 0u64.. {
        let pick = rng.random_range(0..100);
        if mine.is_empty() || pick < 30 {
            let value = format!("c{seed}-{step}");
            let req = pb::CreateRequest {
                attributes: [("v".to_string(), bytes::Bytes::from(value.clone()))].into(),
                ..Default::default()
            };
            match c.create(req).await {
                Ok(r) => {
                    let id = r.into_inner().id;
                    acked
                        .lock()
                        .unwrap()
                        .live
                        .insert(id.clone(), [("v".to_string(), value)].into());
                    mine.push(id);
                }
                Err(_) => return,
            }
            continue;
        }
        let i = rng.random_range(0..mine.len());
        let id = mine[i].clone();
        let result = if pick < 70 {
            let value = format!("u{seed}-{step}");
            let req = pb::UpdateRequest {
                id: id.clone(),
                set: [("v".to_string(), bytes::Bytes::from(value.clone()))].into(),
                ..Default::default()
            };
            c.update(req).await.map(|_| {
                let mut a = acked.lock().unwrap();
                a.live.insert(id.clone(), [("v".to_string(), value)].into());
            })
        } else if pick < 85 {
            let req = pb::RegenerateRequest {
                id: id.clone(),
                ..Default::default()
            };
            c.regenerate(req).await.map(|r| {
                let new = r.into_inner().id;
                let mut a = acked.lock().unwrap();
                let attrs = a.live.remove(&id).unwrap();
                a.live.insert(new.clone(), attrs);
                a.dead.insert(id.clone());
                mine[i] = new;
            })
        } else {
            c.destroy(pb::DestroyRequest { id: id.clone() })
                .await
                .map(|_| {
                    let mut a = acked.lock().unwrap();
                    a.live.remove(&id);
                    a.dead.insert(id.clone());
                    mine.swap_remove(i);
                })
        };
        if result.is_err() {
            acked.lock().unwrap().uncertain.insert(id);
            return;
        }
    }
}

/// Every acknowledged fact holds on the restarted server.
async fn verify(c: &mut SessionStoreClient<Channel>, acked: &Acked) {
    for (id, attrs) in &acked.live {
        if acked.uncertain.contains(id) {
            continue;
        }
        let s = c
            .get(pb::GetRequest {
                id: id.clone(),
                peek: true,
            })
            .await
            .unwrap_or_else(|e| panic!("an acknowledged session is missing: {e}"))
            .into_inner();
        let got: HashMap<String, String> = s
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        assert_eq!(&got, attrs, "acknowledged attributes differ");
    }
    for id in &acked.dead {
        if acked.uncertain.contains(id) {
            continue;
        }
        let e = c
            .get(pb::GetRequest {
                id: id.clone(),
                peek: true,
            })
            .await
            .map(|_| ())
            .expect_err("a destroyed or regenerated-away session came back");
        assert_eq!(e.code(), Code::NotFound);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let acked = Arc::new(Mutex::new(Acked::default()));
    for round in 0..20 {
        let p = start(dir.path(), &[]);
        let mut c = client(&p).await;
        let so_far = acked.lock().unwrap().clone();
        verify(&mut c, &so_far).await;
        let writers: Vec<_> = (0..4)
            .map(|w| tokio::spawn(writer(c.clone(), acked.clone(), round * 10 + w)))
            .collect();
        let pause = rand::rng().random_range(50..300);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        tokio::task::spawn_blocking(move || p.kill()).await.unwrap();
        for w in writers {
            w.await.unwrap();
        }
    }
    let p = start(dir.path(), &[]);
    let mut c = client(&p).await;
    let acked = acked.lock().unwrap().clone();
    assert!(acked.live.len() > 20, "the writers got work acknowledged");
    assert!(!acked.dead.is_empty());
    verify(&mut c, &acked).await;
    drop(c);
    tokio::task::spawn_blocking(move || p.terminate())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_under_writes_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let acked = Arc::new(Mutex::new(Acked::default()));
    // A tiny snapshot threshold: a snapshot every second or so while the writers run.
    let p = start(dir.path(), &[("SESSIOND_SNAPSHOT_LOG_BYTES", "2048")]);
    let c = client(&p).await;
    let writers: Vec<_> = (0..4)
        .map(|w| tokio::spawn(writer(c.clone(), acked.clone(), w)))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while p.output.lock().unwrap().matches("snapshot written").count() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no snapshots were written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::task::spawn_blocking(move || p.kill()).await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let names: Vec<String> = std::fs::read_dir(dir.path().join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.iter().filter(|n| n.starts_with("snapshot-")).count(),
        1,
        "old snapshots are removed: {names:?}"
    );
    let p = start(dir.path(), &[]);
    let mut c = client(&p).await;
    let acked = acked.lock().unwrap().clone();
    verify(&mut c, &acked).await;
    drop(c);
    tokio::task::spawn_blocking(move || p.terminate())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_all_sessions_is_on_disk_before_its_reply_whatever_fsync_says() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // `no`: the reply must not depend on the fsync policy for the effect to be on disk.
    let args = ["--data-dir", data.to_str().unwrap(), "--fsync", "no"];
    let p = spawn(dir.path(), &args, &[]).unwrap_or_else(|out| panic!("no start:\n{out}"));
    let mut c = client(&p).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let req = pb::CreateRequest {
            user_id: format!("u{}", i % 4),
            ..Default::default()
        };
        ids.push(c.create(req).await.unwrap().into_inner().id);
    }
    let req = pb::DestroyAllSessionsRequest {
        confirm: sessiond::api::DESTROY_ALL_CONFIRMATION.into(),
    };
    assert_eq!(
        c.destroy_all_sessions(req)
            .await
            .unwrap()
            .into_inner()
            .destroyed,
        20
    );
    // kill -9 right after the reply, then restart on the same data.
    drop(c);
    let output = p.output.clone();
    tokio::task::spawn_blocking(move || p.kill()).await.unwrap();
    let logged = |out: &str| {
        out.lines().any(|l| {
            l.contains("DestroyAllSessions")
                && l.contains("tenant=default")
                && l.contains("destroyed=20")
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !logged(&output.lock().unwrap()) {
        assert!(
            std::time::Instant::now() < deadline,
            "not logged:\n{}",
            output.lock().unwrap()
        );
        tokio::task::yield_now().await;
    }
    let p = spawn(dir.path(), &args, &[]).unwrap_or_else(|out| panic!("no restart:\n{out}"));
    let mut c = client(&p).await;
    for id in &ids {
        let e = c
            .get(pb::GetRequest {
                id: id.clone(),
                peek: true,
            })
            .await
            .expect_err("a destroyed session came back");
        assert_eq!(e.code(), Code::NotFound);
    }
    drop(c);
    tokio::task::spawn_blocking(move || p.kill()).await.unwrap();
}

/// The only log segment in `data`.
fn segment(data: &Path) -> std::path::PathBuf {
    let mut v: Vec<_> = std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sdl"))
        .collect();
    v.sort();
    v.remove(0)
}

/// Creates `n` sessions and destroys the last, then stops cleanly: a segment whose last
/// record is the destroy.
async fn seeded_log(dir: &Path, n: usize) -> (Vec<String>, Vec<u8>, u64) {
    let p = start(dir, &[]);
    let mut c = client(&p).await;
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(
            c.create(pb::CreateRequest::default())
                .await
                .unwrap()
                .into_inner()
                .id,
        );
    }
    let size_before_destroy = std::fs::metadata(segment(&dir.join("data"))).unwrap().len();
    c.destroy(pb::DestroyRequest {
        id: ids[n - 1].clone(),
    })
    .await
    .unwrap();
    drop(c);
    let (status, out) = tokio::task::spawn_blocking(move || p.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{out}");
    let bytes = std::fs::read(segment(&dir.join("data"))).unwrap();
    (ids, bytes, size_before_destroy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_record_is_cut_and_every_complete_record_kept() {
    let seed = tempfile::tempdir().unwrap();
    let (ids, full, last_record_at) = seeded_log(seed.path(), 3).await;
    let name = segment(&seed.path().join("data"));
    let name = name.file_name().unwrap();
    for cut in last_record_at + 1..full.len() as u64 {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join(name), &full[..cut as usize]).unwrap();
        let p = start(dir.path(), &[]);
        assert!(
            p.output.lock().unwrap().contains("torn record"),
            "cut at {cut}: no warning"
        );
        let mut c = client(&p).await;
        // The torn destroy is gone, so all three creates stand.
        for id in &ids {
            c.get(pb::GetRequest {
                id: id.clone(),
                peek: true,
            })
            .await
            .unwrap_or_else(|e| panic!("cut at {cut}: lost a complete record: {e}"));
        }
        drop(c);
        tokio::task::spawn_blocking(move || p.kill()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_log_corruption_is_refused_and_repair_recovers_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, mut bytes, _) = seeded_log(dir.path(), 6).await;
    let path = segment(&dir.path().join("data"));
    // Flip a bit inside the third record's payload.
    let mut at = 8usize;
    for _ in 0..2 {
        let n = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += 8 + n;
    }
    let bad_offset = at;
    bytes[at + 10] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();

    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let (status, out) = run_to_exit(dir.path(), &["--data-dir", data]);
    assert!(!status.success(), "started on a corrupt log:\n{out}");
    assert!(out.contains(&path.display().to_string()), "{out}");
    assert!(out.contains(&format!("offset {bad_offset}")), "{out}");

    let (status, out) = run_to_exit(dir.path(), &["--data-dir", data, "--repair"]);
    assert!(status.success(), "{out}");
    assert!(out.contains("at least 5 record(s)"), "{out}");

    let p = start(dir.path(), &[]);
    let mut c = client(&p).await;
    for (i, id) in ids.iter().enumerate() {
        let got = c
            .get(pb::GetRequest {
                id: id.clone(),
                peek: true,
            })
            .await;
        assert_eq!(got.is_ok(), i < 2, "session {i} after repair");
    }
    drop(c);
    tokio::task::spawn_blocking(move || p.kill()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_checks_and_repairs_every_tenant_directory() {
    use sessiond::clock::Clock;
    use sessiond::observe::LogMetrics;
    use sessiond::persist::log::FsyncPolicy;
    use sessiond::persist::Persistence;
    use sessiond::store::events::Discard;
    use sessiond::store::{NewSession, Store};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("tenants.toml");
    let hash = common::sha256_hex("shop-token");
    std::fs::write(
        &config,
        format!("[[tenants]]\nname = \"shop\"\ntoken_sha256 = \"{hash}\"\n"),
    )
    .unwrap();
    // The tenant's log, written as the daemon writes it: six sessions.
    let shop = data.join("tenants").join("shop");
    let clock = Clock::system();
    let ids: Vec<String> = {
        let (p, _) = Persistence::open(&shop, FsyncPolicy::Always, LogMetrics::noop()).unwrap();
        let store = Store::new(
            Default::default(),
            4,
            clock.clone(),
            Box::new(p.log.clone()),
        );
        let ids = (0..6)
            .map(|_| store.create(NewSession::default()).unwrap().key.encode())
            .collect();
        p.log.close();
        ids
    };
    let path = segment(&shop);
    let mut bytes = std::fs::read(&path).unwrap();
    let mut at = 8usize;
    for _ in 0..3 {
        let n = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += 8 + n;
    }
    bytes[at + 10] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();

    let args = [
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let (status, out) = run_to_exit(dir.path(), &args);
    assert!(!status.success(), "started on a corrupt tenant log:\n{out}");
    assert!(out.contains(&path.display().to_string()), "{out}");

    let (status, out) = run_to_exit(dir.path(), &[&args[..], &["--repair"]].concat());
    assert!(status.success(), "{out}");
    assert!(out.contains(&path.display().to_string()), "{out}");
    assert!(out.contains(&format!("offset {at}")), "{out}");
    assert!(
        out.contains(&format!(
            "{} is consistent: 3 live session(s)",
            shop.display()
        )),
        "{out}"
    );

    // The daemon starts now, with the prefix before the damage.
    let p = spawn(dir.path(), &args, &[]).unwrap_or_else(|out| panic!("no start:\n{out}"));
    tokio::task::spawn_blocking(move || p.kill()).await.unwrap();
    let r = sessiond::persist::recover(&shop, false, |n| {
        Store::with_capacity(Default::default(), 4, clock.clone(), Box::new(Discard), n)
    })
    .unwrap();
    let mut kept = HashSet::new();
    r.store.for_each_session(|s| {
        kept.insert(s.key.encode());
    });
    assert_eq!(kept, ids[..3].iter().cloned().collect());
}
