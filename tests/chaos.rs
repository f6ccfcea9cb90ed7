//! The chaos suite: clients write to a group of three real sessiond processes while a fault
//! driver kills, partitions, pauses, restarts and wipes them; afterwards the history is
//! checked.
//!
//! **Budget.** Each scenario runs its faults for `SESSIOND_CHAOS_SECS` seconds (default
//! 30), then heals, reads and checks. The five scenarios run one after another (a lock
//! keeps them from sharing the two cores), about 3–4 minutes in all on a two-core machine:
//! what CI runs. A longer run:
//!
//! ```sh
//! SESSIOND_CHAOS_SECS=600 cargo test --test chaos -- --nocapture
//! ```
//!
//! **Scenarios**, three nodes each, `fsync = "always"` unless said:
//! - `kills`: kill -9 of the leader (two times in three) or of a follower, restart on the
//!   data left behind;
//! - `partitions`: the leader isolated (blackhole, or every connection reset), the leader's
//!   outgoing links cut one way, and a majorities ring ("bridge"), each healed after a while;
//! - `pauses`: SIGSTOP of the leader for 0.5–10 s, then SIGCONT: a leader that wakes after
//!   the others elected a new one must not serve from its old state (split brain);
//! - `mixed`: all of the above, SIGTERM of the leader (a planned leadership transfer), and a
//!   follower wiped and swapped in under a new ID;
//! - `everysec_kills`: `fsync = "everysec"` with process kills only, one node, the leader,
//!   or all three at once: a killed process loses nothing the kernel holds, so no
//!   acknowledged write may be lost.
//!
//! **Clients.** Three tasks, each through its own node (any node forwards to the leader), and
//! moving to the next node when a call fails: Create, Get (peek or sliding), Update with and
//! without `expected_version`, Regenerate and Destroy over a small pool of sessions. Half the
//! writes carry an `idempotency_key` and are retried with it on UNAVAILABLE or a timeout; a
//! retried write is one operation whose outcome is its final answer. A fourth task creates
//! sessions for a fresh user, calls DestroyUserSessions, and checks that none of the sessions
//! acknowledged before the call is alive after it returned.
//!
//! **Checks** (tests/common/history.rs), after the faults heal and a final read of every
//! session ever acknowledged: linearizability per session, no acknowledged write lost, no
//! stale read, Regenerate's old ID dead, DestroyUserSessions complete, and every replica's
//! digest the same once their applied indexes agree. A violation prints the session's
//! history and fails the test after the scenario's report.
//!
//! **Report.** `cargo test --test chaos -- --nocapture` shows one summary per scenario and
//! running totals: faults injected, operations acknowledged / failed / indeterminate, the
//! violations of each kind, unplanned failover times (kill -9 of the leader until a write
//! succeeds again) and the planned transfer's refused-write window (SIGTERM of the leader),
//! under the default heartbeat (150 ms) and election timeouts (500 ms–1 s). Figures are printed,
//! never asserted: this machine is shared.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::faultproxy::{Mode, Partition};
use common::history::{self, Op, Outcome, Recorder, Value, Violation};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sessiond::api::pb;
use sessiond::api::pb::session_store_client::SessionStoreClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Seconds of faults per scenario unless `SESSIOND_CHAOS_SECS` says otherwise.
const DEFAULT_SECS: u64 = 30;

/// How long a client waits for one call: a paused node never answers.
const CALL: Duration = Duration::from_secs(3);

/// How long a write with an idempotency key is retried before the client gives up on it.
const KEYED_RETRIES: Duration = Duration::from_secs(10);

/// How long a probe waits for the group to take a write again after a fault.
const RECOVERY: Duration = Duration::from_secs(30);

/// Operations on one session before a client retires it (destroys it): short histories keep
/// the linearizability check fast.
const OPS_PER_SESSION: u32 = 30;

/// Sessions the clients keep in play.
const POOL: std::ops::Range<usize> = 3..10;

/// Violations printed per kind: enough to debug, not a flood.
const PRINTED: usize = 10;

/// One scenario at a time: three daemons each on two cores are load enough.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The reports of the scenarios run so far, for the running totals.
static TOTALS: Mutex<Vec<Report>> = Mutex::new(Vec::new());

/// The faults each scenario injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Faults {
    Kills,
    Partitions,
    Pauses,
    Mixed,
    EverysecKills,
}

/// What a scenario did and found.
#[derive(Clone, Debug, Default)]
struct Report {
    name: &'static str,
    leader_kills: u32,
    follower_kills: u32,
    total_outages: u32,
    partitions: u32,
    pauses: u32,
    restarts: u32,
    wipes: u32,
    transfers: u32,
    acknowledged: u64,
    failed: u64,
    indeterminate: u64,
    user_destroys: u64,
    lost_writes: usize,
    not_linearizable: usize,
    stale_reads: usize,
    old_ids_alive: usize,
    user_sessions_alive: usize,
    digest_mismatches: usize,
    /// kill -9 of the leader until a write succeeded again.
    failovers: Vec<Duration>,
    /// SIGTERM of the leader: from the first refused write to the next success (zero if none
    /// was refused).
    transfer_windows: Vec<Duration>,
}

impl Report {
    fn violations(&self) -> usize {
        self.lost_writes
            + self.not_linearizable
            + self.stale_reads
            + self.old_ids_alive
            + self.user_sessions_alive
            + self.digest_mismatches
    }

    fn add(&mut self, o: &Report) {
        self.leader_kills += o.leader_kills;
        self.follower_kills += o.follower_kills;
        self.total_outages += o.total_outages;
        self.partitions += o.partitions;
        self.pauses += o.pauses;
        self.restarts += o.restarts;
        self.wipes += o.wipes;
        self.transfers += o.transfers;
        self.acknowledged += o.acknowledged;
        self.failed += o.failed;
        self.indeterminate += o.indeterminate;
        self.user_destroys += o.user_destroys;
        self.lost_writes += o.lost_writes;
        self.not_linearizable += o.not_linearizable;
        self.stale_reads += o.stale_reads;
        self.old_ids_alive += o.old_ids_alive;
        self.user_sessions_alive += o.user_sessions_alive;
        self.digest_mismatches += o.digest_mismatches;
        self.failovers.extend(&o.failovers);
        self.transfer_windows.extend(&o.transfer_windows);
    }

    fn print(&self) {
        let figures = |v: &[Duration]| {
            let mut v = v.to_vec();
            v.sort();
            match (v.get(v.len() / 2), v.last()) {
                (Some(p50), Some(max)) => format!("p50 {p50:.2?}, max {max:.2?} (n={})", v.len()),
                _ => "none measured".to_string(),
            }
        };
        println!(
            "== chaos {}: faults: {} leader kills, {} follower kills, {} total outages, \
             {} partitions, {} pauses, {} restarts, {} wipes, {} planned transfers\n   \
             operations: {} acknowledged, {} failed, {} indeterminate; {} DestroyUserSessions \
             checked\n   violations: {} lost acknowledged writes, {} linearizability, {} stale \
             reads, {} regenerated IDs alive, {} user sessions alive after \
             DestroyUserSessions, {} digest mismatches\n   unplanned failover (kill -9 of \
             the leader until a write succeeds): {}\n   planned transfer (SIGTERM of the \
             leader), refused-write window: {}",
            self.name,
            self.leader_kills,
            self.follower_kills,
            self.total_outages,
            self.partitions,
            self.pauses,
            self.restarts,
            self.wipes,
            self.transfers,
            self.acknowledged,
            self.failed,
            self.indeterminate,
            self.user_destroys,
            self.lost_writes,
            self.not_linearizable,
            self.stale_reads,
            self.old_ids_alive,
            self.user_sessions_alive,
            self.digest_mismatches,
            figures(&self.failovers),
            figures(&self.transfer_windows),
        );
    }
}

/// Seconds of faults per scenario.
fn budget() -> Duration {
    let secs = std::env::var("SESSIOND_CHAOS_SECS")
        .ok()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("SESSIOND_CHAOS_SECS={s:?} is not a number of seconds"))
        })
        .unwrap_or(DEFAULT_SECS);
    Duration::from_secs(secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills() {
    scenario("kills", Faults::Kills, "always").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions() {
    scenario("partitions", Faults::Partitions, "always").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pauses() {
    scenario("pauses", Faults::Pauses, "always").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed() {
    scenario("mixed", Faults::Mixed, "always").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everysec_kills() {
    scenario("everysec_kills", Faults::EverysecKills, "everysec").await;
}

/// Runs one scenario: clients and faults for the budget, then heal, read, check and report.
async fn scenario(name: &'static str, faults: Faults, fsync: &'static str) {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(3, fsync).await;
    let urls: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("http://{}", n.grpc))
        .collect();
    let work = Arc::new(Workload::default());
    let mut clients = Vec::new();
    for c in 0..3 {
        let client = Client::new(c, &urls, work.clone());
        clients.push(tokio::spawn(client.run()));
    }
    let doomed = tokio::spawn(destroy_users(Client::new(3, &urls, work.clone())));

    let mut report = Report {
        name,
        ..Report::default()
    };
    let mut driver = Driver {
        cluster: &mut cluster,
        urls: &urls,
        recorder: work.recorder.clone(),
        rng: StdRng::from_os_rng(),
        report: &mut report,
    };
    driver.run(faults, budget()).await;
    driver.heal().await;

    // Give keyed retries in flight their chance against the healed group, then stop.
    work.stop.store(true, Ordering::Release);
    for c in clients {
        c.await.unwrap();
    }
    let destroyed_users = doomed.await.unwrap();

    let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
    let mut reader = Client::new(leader, &urls, work.clone());
    let history_so_far = work.recorder.history();
    let mut final_reads = HashMap::new();
    for id in ids_seen(&history_so_far) {
        let value = reader.final_read(&id).await;
        final_reads.insert(id, value);
    }
    let mut user_sessions_alive = Vec::new();
    for (user, id) in destroyed_users.checked {
        if reader.final_read(&id).await.is_some() {
            user_sessions_alive.push(format!(
                "a session of {user} acknowledged before DestroyUserSessions returned is alive \
                 after the faults healed"
            ));
        }
    }
    user_sessions_alive.extend(destroyed_users.alive);
    report.user_destroys = destroyed_users.calls;
    let digests = cluster.settled_digests().await;

    let history = work.recorder.history();
    for r in &history {
        match r.outcome {
            Outcome::Indeterminate => report.indeterminate += 1,
            Outcome::Failed(_) => report.failed += 1,
            _ => report.acknowledged += 1,
        }
    }
    let mut failures = Vec::new();
    let mut note = |what: &str, found: Result<(), Vec<Violation>>| -> usize {
        let v = found.err().unwrap_or_default();
        for violation in v.iter().take(PRINTED) {
            failures.push(format!("{what}: {violation}"));
        }
        v.len()
    };
    report.not_linearizable = note("linearizability", history::linearizable(&history));
    report.lost_writes = note(
        "acknowledged writes",
        history::acknowledged_writes_survive(&history, &final_reads),
    );
    report.stale_reads = note("stale reads", history::stale_reads(&history));
    report.old_ids_alive = note("regenerated IDs", history::regenerated_ids_dead(&history));
    let pairs: Vec<(usize, (u64, Vec<u8>))> = digests
        .iter()
        .enumerate()
        .map(|(i, d)| (i, (d.sessions, d.sha256.to_vec())))
        .collect();
    report.digest_mismatches = note(
        "digests",
        history::digests_agree(&pairs).map_err(|v| vec![v]),
    );
    report.user_sessions_alive = user_sessions_alive.len();
    failures.extend(
        user_sessions_alive
            .iter()
            .take(PRINTED)
            .map(|s| format!("DestroyUserSessions: {s}")),
    );

    report.print();
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    totals.push(report.clone());
    let mut sum = Report {
        name: "totals so far",
        ..Report::default()
    };
    for r in totals.iter() {
        sum.add(r);
    }
    let names: Vec<&str> = totals.iter().map(|r| r.name).collect();
    drop(totals);
    println!("   (totals below cover {names:?})");
    sum.print();

    assert!(
        report.violations() == 0,
        "chaos {name} found violations:\n{}",
        failures.join("\n")
    );
}

/// Every session ID the history saw acknowledged: created, or regenerated into.
fn ids_seen(history: &[history::Record]) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut ids = Vec::new();
    for r in history {
        if let Outcome::Created { id, .. } = &r.outcome {
            if seen.insert(id.clone()) {
                ids.push(id.clone());
            }
        }
    }
    ids
}

/// What the clients share: the history, the sessions in play, and the stop flag.
#[derive(Default)]
struct Workload {
    recorder: Recorder,
    pool: Mutex<Vec<Known>>,
    stop: AtomicBool,
    /// Numbers requests, so attributes and idempotency keys are unique.
    serial: AtomicU64,
}

/// A session in play, as the clients last saw it.
#[derive(Clone, Debug)]
struct Known {
    id: String,
    version: u64,
    ops: u32,
}

impl Workload {
    fn next(&self) -> u64 {
        self.serial.fetch_add(1, Ordering::Relaxed)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Vec<Known>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, id: &str, version: u64) {
        self.pool().push(Known {
            id: id.to_string(),
            version,
            ops: 0,
        });
    }

    fn forget(&self, id: &str) {
        self.pool().retain(|k| k.id != id);
    }

    fn saw(&self, id: &str, version: u64) {
        if let Some(k) = self.pool().iter_mut().find(|k| k.id == id) {
            k.version = k.version.max(version);
        }
    }

    fn replace(&self, old: &str, new: &str, version: u64) {
        let mut pool = self.pool();
        match pool.iter_mut().find(|k| k.id == old) {
            Some(k) => {
                k.id = new.to_string();
                k.version = version;
            }
            None => pool.push(Known {
                id: new.to_string(),
                version,
                ops: 0,
            }),
        }
    }
}

/// A write that may be retried with its idempotency key.
#[derive(Clone)]
enum Write {
    Create(pb::CreateRequest),
    Update(pb::UpdateRequest),
    Regenerate(pb::RegenerateRequest),
}

/// One client: a connection to every node, starting with its own.
struct Client {
    nodes: Vec<SessionStoreClient<Channel>>,
    /// The node it calls now.
    at: usize,
    name: usize,
    work: Arc<Workload>,
    rng: StdRng,
}

/// Whether a failed call may have taken effect, so that a keyed retry is worth it.
fn retryable(s: &Status) -> bool {
    Outcome::from_status(s) == Outcome::Indeterminate
        || (s.code() == Code::Aborted && s.message().contains("still in progress"))
}

/// The outcome of a call that failed with `s`. ABORTED because the session kept changing
/// under a write (the leader's replans ran out) changed nothing: definite, and not a
/// version mismatch.
fn failed(s: &Status) -> Outcome {
    if s.code() == Code::Aborted && !s.message().starts_with("version mismatch") {
        return if s.message().contains("still in progress") {
            Outcome::Indeterminate
        } else {
            Outcome::Failed(s.to_string())
        };
    }
    Outcome::from_status(s)
}

impl Client {
    fn new(name: usize, urls: &[String], work: Arc<Workload>) -> Client {
        let nodes = urls
            .iter()
            .map(|u| {
                let channel = Endpoint::from_shared(u.clone())
                    .unwrap()
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .connect_lazy();
                SessionStoreClient::new(channel)
            })
            .collect();
        Client {
            nodes,
            at: name % urls.len(),
            name,
            work,
            rng: StdRng::from_os_rng(),
        }
    }

    /// Moves to the next node.
    fn rotate(&mut self) {
        self.at = (self.at + 1) % self.nodes.len();
    }

    fn node(&mut self) -> &mut SessionStoreClient<Channel> {
        &mut self.nodes[self.at]
    }

    /// One attempt of `write` at the current node.
    async fn send(&mut self, write: &Write) -> Result<pb::Session, Status> {
        let node = &mut self.nodes[self.at];
        let call = async {
            match write.clone() {
                Write::Create(r) => node.create(r).await,
                Write::Update(r) => node.update(r).await,
                Write::Regenerate(r) => node.regenerate(r).await,
            }
        };
        within(call).await
    }

    /// Sends `write`; with an idempotency key, retries it on the next node while the answer
    /// leaves it open, for at most [`KEYED_RETRIES`]. Also says whether an earlier attempt
    /// may have applied (the final answer may then be a replay).
    async fn write(&mut self, write: Write, keyed: bool) -> (Result<pb::Session, Status>, bool) {
        let started = Instant::now();
        let mut maybe_applied = false;
        loop {
            match self.send(&write).await {
                Err(s) if retryable(&s) => {
                    self.rotate();
                    if !keyed || started.elapsed() >= KEYED_RETRIES {
                        return (Err(s), maybe_applied);
                    }
                    maybe_applied = true;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                answer => return (answer, maybe_applied),
            }
        }
    }

    /// The clients' loop: operations on the pool until the stop flag.
    async fn run(mut self) {
        while !self.work.stopping() {
            self.step().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// One operation, chosen at random.
    async fn step(&mut self) {
        let picked = {
            let mut pool = self.work.pool();
            if pool.len() < POOL.start {
                None
            } else {
                let i = self.rng.random_range(0..pool.len());
                pool[i].ops += 1;
                Some(pool[i].clone())
            }
        };
        let pool_full = self.work.pool().len() >= POOL.end;
        let roll = self.rng.random_range(0..100);
        match picked {
            None => self.create().await,
            Some(k) if k.ops > OPS_PER_SESSION => self.destroy(&k).await,
            Some(_) if roll < 12 && !pool_full => self.create().await,
            Some(k) if roll < 47 => self.get(&k).await,
            Some(k) if roll < 80 => self.update(&k).await,
            Some(k) if roll < 92 => self.regenerate(&k).await,
            Some(k) => self.destroy(&k).await,
        }
    }

    async fn create(&mut self) {
        let n = self.work.next();
        let attrs = common::attrs(&[("owner", &format!("c{}-{n}", self.name))]);
        let keyed = self.rng.random_bool(0.5);
        let req = pb::CreateRequest {
            // A few sessions per user: far from max_sessions_per_user, even counting the
            // ones indeterminate creates left behind.
            user_id: format!("u{}-{}", self.name, n / 20),
            attributes: attrs.clone(),
            idempotency_key: key(keyed, n),
            ..Default::default()
        };
        let pending = self.work.recorder.invoke(Op::Create {
            attrs: attrs.into_iter().collect(),
        });
        let (answer, maybe_applied) = self.write(Write::Create(req), keyed).await;
        pending.complete(match answer {
            Ok(s) => {
                self.work.add(&s.id, s.version);
                Outcome::Created {
                    id: s.id.clone(),
                    value: Value::of(&s),
                }
            }
            Err(s) if maybe_applied && s.code() == Code::NotFound => Outcome::Indeterminate,
            Err(s) => failed(&s),
        });
    }

    async fn get(&mut self, k: &Known) {
        let peek = self.rng.random_bool(0.5);
        let pending = self.work.recorder.invoke(Op::Get { id: k.id.clone() });
        let req = pb::GetRequest {
            id: k.id.clone(),
            peek,
        };
        let answer = within(self.node().get(req)).await;
        pending.complete(match answer {
            Ok(s) => {
                self.work.saw(&s.id, s.version);
                Outcome::Found(Value::of(&s))
            }
            Err(s) => {
                if retryable(&s) {
                    self.rotate();
                }
                failed(&s)
            }
        });
    }

    async fn update(&mut self, k: &Known) {
        let n = self.work.next();
        let slot = self.rng.random_range(0..3);
        let set = common::attrs(&[(&format!("k{slot}"), &format!("c{}-{n}", self.name))]);
        let remove = match self.rng.random_bool(0.2) {
            true => vec![format!("k{}", (slot + 1) % 3)],
            false => Vec::new(),
        };
        let expected_version = self.rng.random_bool(0.5).then_some(k.version);
        let keyed = self.rng.random_bool(0.5);
        let req = pb::UpdateRequest {
            id: k.id.clone(),
            set: set.clone(),
            remove: remove.clone(),
            expected_version,
            idempotency_key: key(keyed, n),
        };
        let pending = self.work.recorder.invoke(Op::Update {
            id: k.id.clone(),
            set: set.into_iter().collect(),
            remove,
            expected_version,
        });
        let (answer, maybe_applied) = self.write(Write::Update(req), keyed).await;
        pending.complete(match answer {
            Ok(s) => {
                self.work.saw(&s.id, s.version);
                match maybe_applied {
                    true => Outcome::Replayed { version: s.version },
                    false => Outcome::Updated { version: s.version },
                }
            }
            Err(s) if maybe_applied && matches!(s.code(), Code::NotFound | Code::Aborted) => {
                Outcome::Indeterminate
            }
            Err(s) => {
                if s.code() == Code::NotFound {
                    self.work.forget(&k.id);
                }
                failed(&s)
            }
        });
    }

    async fn regenerate(&mut self, k: &Known) {
        let n = self.work.next();
        let keyed = self.rng.random_bool(0.5);
        let req = pb::RegenerateRequest {
            id: k.id.clone(),
            idempotency_key: key(keyed, n),
            ..Default::default()
        };
        let pending = self
            .work
            .recorder
            .invoke(Op::Regenerate { id: k.id.clone() });
        let (answer, maybe_applied) = self.write(Write::Regenerate(req), keyed).await;
        pending.complete(match answer {
            Ok(s) => {
                self.work.replace(&k.id, &s.id, s.version);
                Outcome::Created {
                    id: s.id.clone(),
                    value: Value::of(&s),
                }
            }
            Err(s) => {
                // Gone, or perhaps gone: either way, out of play.
                self.work.forget(&k.id);
                match maybe_applied && s.code() == Code::NotFound {
                    true => Outcome::Indeterminate,
                    false => failed(&s),
                }
            }
        });
    }

    async fn destroy(&mut self, k: &Known) {
        self.work.forget(&k.id);
        let pending = self.work.recorder.invoke(Op::Destroy { id: k.id.clone() });
        let req = pb::DestroyRequest { id: k.id.clone() };
        let answer = within(self.node().destroy(req)).await;
        pending.complete(match answer {
            Ok(r) => Outcome::Destroyed { existed: r.existed },
            Err(s) => {
                if retryable(&s) {
                    self.rotate();
                }
                failed(&s)
            }
        });
    }

    /// A read of `id` once the faults are over, recorded: its value, or `None` if there is
    /// no such session. Retried while the group answers nothing definite.
    async fn final_read(&mut self, id: &str) -> Option<Value> {
        let started = Instant::now();
        loop {
            let pending = self.work.recorder.invoke(Op::Get { id: id.into() });
            let req = pb::GetRequest {
                id: id.into(),
                peek: true,
            };
            match within(self.node().get(req)).await {
                Ok(s) => {
                    let value = Value::of(&s);
                    pending.complete(Outcome::Found(value.clone()));
                    return Some(value);
                }
                Err(s) if s.code() == Code::NotFound => {
                    pending.complete(Outcome::NotFound);
                    return None;
                }
                Err(s) => {
                    pending.complete(failed(&s));
                    assert!(
                        started.elapsed() < RECOVERY,
                        "the healed group answers no read within {RECOVERY:?}: {s}"
                    );
                    self.rotate();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// An idempotency key for request `n`, or none.
fn key(keyed: bool, n: u64) -> String {
    match keyed {
        true => format!("chaos-{n}"),
        false => String::new(),
    }
}

/// A call that gives up after [`CALL`] (DEADLINE_EXCEEDED: indeterminate).
/// A probe's Create, tagged `tag`, and its operation for the history. Each probe write is
/// for a user of its own, so probes never meet `max_sessions_per_user`.
fn probe_create(tag: &str) -> (pb::CreateRequest, Op) {
    static PROBES: AtomicU64 = AtomicU64::new(0);
    let attrs = common::attrs(&[("probe", tag)]);
    let op = Op::Create {
        attrs: attrs.clone().into_iter().collect(),
    };
    let req = pb::CreateRequest {
        user_id: format!("probe-{}", PROBES.fetch_add(1, Ordering::Relaxed)),
        attributes: attrs,
        ..Default::default()
    };
    (req, op)
}

/// Whether `s` is how a group refuses or loses a write while it has no leader: what a
/// failover may cost a probe (an answer that is definite, a refusal for a limit say, is a
/// fault of its own).
fn refusal(s: &Status) -> bool {
    matches!(failed(s), Outcome::Indeterminate)
}

async fn within<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(CALL, call).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded("the client gave up waiting")),
    }
}

/// What the DestroyUserSessions task found.
#[derive(Default)]
struct UserDestroys {
    /// Calls that returned.
    calls: u64,
    /// Sessions that must be dead at the end: (user, ID).
    checked: Vec<(String, String)>,
    /// Sessions found alive right after their user's destruction returned.
    alive: Vec<String>,
}

/// Rounds until the stop flag: a fresh user, two sessions, DestroyUserSessions (retried
/// while the answer leaves it open: destroying a user's sessions twice is harmless), and a
/// read of each session acknowledged before the call, which must find nothing. These users'
/// sessions stay out of the recorded history, whose per-session model has no DestroyUser.
async fn destroy_users(mut c: Client) -> UserDestroys {
    let mut found = UserDestroys::default();
    let mut round = 0;
    while !c.work.stopping() {
        round += 1;
        let user = format!("doomed-{round}");
        let mut acked = Vec::new();
        for _ in 0..2 {
            let req = pb::CreateRequest {
                user_id: user.clone(),
                ..Default::default()
            };
            match within(c.node().create(req)).await {
                Ok(s) => acked.push(s.id),
                Err(_) => c.rotate(),
            }
        }
        let started = Instant::now();
        let destroyed = loop {
            let req = pb::DestroyUserSessionsRequest {
                user_id: user.clone(),
                except_id: String::new(),
            };
            match within(c.node().destroy_user_sessions(req)).await {
                Ok(_) => break true,
                Err(s) if retryable(&s) && started.elapsed() < KEYED_RETRIES => {
                    c.rotate();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(_) => break false,
            }
        };
        if !destroyed {
            continue;
        }
        found.calls += 1;
        for id in acked {
            let req = pb::GetRequest {
                id: id.clone(),
                peek: true,
            };
            match within(c.node().get(req)).await {
                Ok(_) => found.alive.push(format!(
                    "a session of {user} acknowledged before DestroyUserSessions was found \
                     right after it returned"
                )),
                Err(s) if retryable(&s) => c.rotate(),
                Err(_) => {}
            }
            found.checked.push((user.clone(), id));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    found
}

/// Injects one scenario's faults.
struct Driver<'a> {
    cluster: &'a mut Cluster,
    urls: &'a [String],
    recorder: Recorder,
    rng: StdRng,
    report: &'a mut Report,
}

/// A fault episode.
#[derive(Clone, Copy, Debug)]
enum Episode {
    KillLeader,
    KillFollower,
    KillAll,
    IsolateLeader,
    OneWay,
    Bridge,
    Pause,
    Terminate,
    Wipe,
}

impl Driver<'_> {
    async fn run(&mut self, faults: Faults, budget: Duration) {
        let started = Instant::now();
        let end = started + budget;
        let mut turn = self.rng.random_range(0..8);
        while Instant::now() < end {
            turn += 1;
            let episode = self.pick(faults, turn);
            println!(
                "   [{} {:.1}s] {episode:?}",
                self.report.name,
                started.elapsed().as_secs_f64()
            );
            self.episode(episode).await;
            // Let the group recover and the clients make progress between faults.
            self.wait(500..2000).await;
        }
    }

    /// The episode for turn `turn`: in `mixed`, every kind in turn (so that a short run sees
    /// each), elsewhere one at random.
    fn pick(&mut self, faults: Faults, turn: usize) -> Episode {
        use Episode::*;
        let choices: &[Episode] = match faults {
            Faults::Kills => &[KillLeader, KillLeader, KillFollower],
            Faults::Partitions => &[IsolateLeader, OneWay, Bridge],
            Faults::Pauses => &[Pause],
            Faults::Mixed => &[
                KillLeader,
                KillFollower,
                IsolateLeader,
                OneWay,
                Bridge,
                Pause,
                Terminate,
                Wipe,
            ],
            Faults::EverysecKills => &[KillLeader, KillLeader, KillFollower, KillAll],
        };
        match faults {
            Faults::Mixed => choices[turn % choices.len()],
            _ => choices[self.rng.random_range(0..choices.len())],
        }
    }

    /// Sleeps a random number of milliseconds in `range`.
    async fn wait(&mut self, range: std::ops::Range<u64>) {
        let ms = self.rng.random_range(range);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    async fn leader(&self) -> usize {
        self.cluster.wait_for_leader(&[0, 1, 2]).await
    }

    async fn episode(&mut self, episode: Episode) {
        let leader = self.leader().await;
        let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        match episode {
            Episode::KillLeader => {
                let killed = Instant::now();
                self.cluster.kill(leader);
                self.report.leader_kills += 1;
                let took = self.probe(&others, killed).await;
                self.report.failovers.push(took);
                self.wait(0..2000).await;
                self.cluster.restart(leader);
                self.report.restarts += 1;
            }
            Episode::KillFollower => {
                let victim = others[self.rng.random_range(0..2)];
                self.cluster.kill(victim);
                self.report.follower_kills += 1;
                self.wait(500..3000).await;
                self.cluster.restart(victim);
                self.report.restarts += 1;
            }
            Episode::KillAll => {
                for i in 0..3 {
                    self.cluster.kill(i);
                }
                self.report.total_outages += 1;
                self.wait(0..1000).await;
                for i in 0..3 {
                    self.cluster.restart(i);
                    self.report.restarts += 1;
                }
            }
            Episode::IsolateLeader => {
                let mode = match self.rng.random_bool(0.5) {
                    true => Mode::Blackhole,
                    false => Mode::Reset,
                };
                self.cluster
                    .mesh
                    .partition_with(&Partition::isolate(leader), mode);
                self.report.partitions += 1;
                self.wait(1000..5000).await;
                self.cluster.mesh.heal();
            }
            Episode::OneWay => {
                // The leader's requests (appends, heartbeats) are held; what the others
                // send it still arrives.
                for &j in &others {
                    self.cluster.mesh.link(leader, j).set(Mode::Blackhole);
                }
                self.report.partitions += 1;
                self.wait(1000..5000).await;
                self.cluster.mesh.heal();
            }
            Episode::Bridge => {
                let bridge = self.rng.random_range(0..3);
                self.cluster.mesh.partition(&Partition::bridge(bridge));
                self.report.partitions += 1;
                self.wait(1000..5000).await;
                self.cluster.mesh.heal();
            }
            Episode::Pause => {
                self.cluster.pause(leader);
                self.report.pauses += 1;
                self.wait(500..10_000).await;
                self.cluster.resume(leader);
            }
            Episode::Terminate => {
                let window = self.terminate(leader, others[0]).await;
                self.report.transfer_windows.push(window);
                self.report.transfers += 1;
                self.cluster.restart(leader);
                self.report.restarts += 1;
            }
            Episode::Wipe => {
                let victim = others[self.rng.random_range(0..2)];
                self.cluster.wipe_and_rejoin(victim).await;
                self.report.wipes += 1;
            }
        }
    }

    /// Creates sessions through `via` (the next node on each failure) until one is
    /// acknowledged; returns how long after `since` that was. Each attempt is recorded.
    async fn probe(&self, via: &[usize], since: Instant) -> Duration {
        let work = Arc::new(Workload {
            recorder: self.recorder.clone(),
            ..Workload::default()
        });
        let mut probe = Client::new(via[0], self.urls, work);
        let mut turn = 0;
        loop {
            probe.at = via[turn % via.len()];
            turn += 1;
            let (req, op) = probe_create("1");
            let pending = self.recorder.invoke(op);
            match within(probe.node().create(req)).await {
                Ok(s) => {
                    pending.complete(Outcome::Created {
                        id: s.id.clone(),
                        value: Value::of(&s),
                    });
                    return since.elapsed();
                }
                Err(s) => {
                    pending.complete(failed(&s));
                    assert!(
                        refusal(&s),
                        "a probe's write failed for another reason: {s}"
                    );
                    assert!(
                        since.elapsed() < RECOVERY,
                        "no write succeeded within {RECOVERY:?} of the fault: {s}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// SIGTERM of `leader` while a probe writes through `via`; the refused-write window: from
    /// the first refused write to the next success, zero if none was refused.
    async fn terminate(&mut self, leader: usize, via: usize) -> Duration {
        let stop = Arc::new(AtomicBool::new(false));
        let probe = {
            let stop = stop.clone();
            let recorder = self.recorder.clone();
            let urls = self.urls.to_vec();
            tokio::spawn(async move {
                let work = Arc::new(Workload {
                    recorder: recorder.clone(),
                    ..Workload::default()
                });
                let mut c = Client::new(via, &urls, work);
                let mut first_refused: Option<Instant> = None;
                let mut window = Duration::ZERO;
                let started = Instant::now();
                while !stop.load(Ordering::Acquire) || first_refused.is_some() {
                    if started.elapsed() > RECOVERY + Duration::from_secs(30) {
                        return Err(format!(
                            "no write succeeded through node {via} after the leader's SIGTERM"
                        ));
                    }
                    let (req, op) = probe_create("transfer");
                    let pending = recorder.invoke(op);
                    let invoked = Instant::now();
                    match within(c.node().create(req)).await {
                        Ok(s) => {
                            pending.complete(Outcome::Created {
                                id: s.id.clone(),
                                value: Value::of(&s),
                            });
                            if let Some(first) = first_refused.take() {
                                window = window.max(first.elapsed());
                            }
                        }
                        Err(s) => {
                            pending.complete(failed(&s));
                            if !refusal(&s) {
                                return Err(format!(
                                    "a probe's write through node {via} failed for another \
                                     reason: {s}"
                                ));
                            }
                            first_refused.get_or_insert(invoked);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(window)
            })
        };
        // Let the probe see the group working first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let proc = self.cluster.nodes[leader].proc.take().expect("running");
        let (status, output) = tokio::task::spawn_blocking(move || proc.terminate())
            .await
            .unwrap();
        assert!(status.success(), "the leader's SIGTERM: {output}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Release);
        match probe.await.unwrap() {
            Ok(window) => window,
            Err(e) => {
                self.print_logs(&output);
                panic!("{e}");
            }
        }
    }

    /// The end of every node's log (and of the terminated leader's, `terminated`), for a
    /// failure's report.
    fn print_logs(&self, terminated: &str) {
        let tail = |log: &str| {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        for (i, node) in self.cluster.nodes.iter().enumerate() {
            if let Some(p) = &node.proc {
                eprintln!("--- node {i} (id {}):\n{}", node.id, tail(&p.output()));
            }
        }
        eprintln!("--- the terminated leader:\n{}", tail(terminated));
    }

    /// Ends every fault: links pass, paused nodes go on, dead ones restart on their data.
    async fn heal(&mut self) {
        self.cluster.mesh.heal();
        for i in 0..3 {
            if self.cluster.nodes[i].paused {
                self.cluster.resume(i);
            }
            if self.cluster.nodes[i].proc.is_none() {
                self.cluster.restart(i);
                self.report.restarts += 1;
            }
        }
        self.leader().await;
    }
}
