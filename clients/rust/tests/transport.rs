//! The client's transport against a real sessiond on an ephemeral loopback port: many tasks
//! over a few Pipeline streams, a stream broken with calls in flight, deadlines, lazy
//! connection while sessiond is down, restarts and fail-over between seeds.
//!
//! A small TCP proxy sits between client and daemon where a test must hold sessiond's
//! replies back (so calls are in flight) or cut the connections under the client.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sessiond::clock::Clock;
use sessiond::config::{ClusterConfig, Config};
use sessiond::server::Daemon;
use sessiond_client::{ClientOptions, Error, NewSession, SessionClient, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tonic::Code;

/// How long a test waits for a condition before it fails.
const PATIENCE: Duration = Duration::from_secs(20);

async fn daemon_at(listen: SocketAddr) -> Daemon {
    let config = Config {
        listen,
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        persist: false,
        ..Config::default()
    };
    Daemon::start(config, Clock::manual(1_750_000_000_000))
        .await
        .unwrap()
}

async fn daemon() -> Daemon {
    daemon_at("127.0.0.1:0".parse().unwrap()).await
}

/// A loopback address nothing listens on (bound, then released).
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Retries `f` until it returns `Ok`, or fails the test after [`PATIENCE`].
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("{what}: still failing: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A TCP proxy to `upstream` that can hold back the bytes of either direction and cut
/// every connection.
struct Proxy {
    addr: SocketAddr,
    /// Holds sessiond's replies back.
    frozen: watch::Sender<bool>,
    /// Holds the client's requests back.
    frozen_up: watch::Sender<bool>,
    /// Bytes of requests read while held back.
    held_up: Arc<AtomicUsize>,
    open: Arc<Mutex<Vec<AbortHandle>>>,
    accepted: Arc<AtomicUsize>,
}

/// Copies `from` to `to`, holding each chunk while `frozen` says so (counted in `held`).
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
    held: Arc<AtomicUsize>,
) {
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if *frozen.borrow() {
            held.fetch_add(n, Ordering::SeqCst);
        }
        if frozen.wait_for(|frozen| !frozen).await.is_err()
            || to.write_all(&buf[..n]).await.is_err()
        {
            return;
        }
    }
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, _) = watch::channel(false);
        let (frozen_up, _) = watch::channel(false);
        let held_up = Arc::new(AtomicUsize::new(0));
        let open: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (f, fu, h, o, a) = (
            frozen.clone(),
            frozen_up.clone(),
            held_up.clone(),
            open.clone(),
            accepted.clone(),
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                // sessiond is down: the client sees its connection closed.
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let up = tokio::spawn(relay(cr, sw, fu.subscribe(), h.clone()));
                let down = tokio::spawn(relay(sr, cw, f.subscribe(), Arc::default()));
                o.lock()
                    .unwrap()
                    .extend([up.abort_handle(), down.abort_handle()]);
            }
        });
        Proxy {
            addr,
            frozen,
            frozen_up,
            held_up,
            open,
            accepted,
        }
    }

    /// Holds sessiond's replies back (`true`) or lets them through.
    fn freeze(&self, on: bool) {
        self.frozen.send_replace(on);
    }

    /// Holds the client's requests back (`true`) or lets them through.
    fn freeze_requests(&self, on: bool) {
        self.frozen_up.send_replace(on);
    }

    /// Closes every connection made so far; what it held back is lost.
    fn cut(&self) {
        for task in self.open.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// How many connections the client has made through it.
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn options(connections: usize) -> ClientOptions {
    ClientOptions {
        connections: Some(connections),
        timeout: Some(PATIENCE),
        ..ClientOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_tasks_over_two_streams_each_get_their_own_result() {
    let d = daemon().await;
    let proxy = Proxy::start(d.grpc_addr).await;
    let c = SessionClient::connect_with(&proxy.addr.to_string(), options(2))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let s = c
                    .create(NewSession::default().attribute("n", i.to_string()))
                    .await?;
                let twice = (i * 2).to_string();
                let updated = c.update(&s.id, [("m", twice)], [] as [&str; 0], Some(1));
                assert_eq!(updated.await?.version, 2);
                let got = c.get(&s.id).await?;
                Ok::<_, Error>((i, s.id, got))
            })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        let (i, id, got) = task.await.unwrap().unwrap();
        assert_eq!(got.id, id);
        assert_eq!(got.text("n"), Some(i.to_string().as_str()));
        assert_eq!(got.text("m"), Some((i * 2).to_string().as_str()));
        ids.insert(id);
    }
    assert_eq!(ids.len(), 200);
    // Two connections carried all of it.
    assert_eq!(proxy.accepted(), 2);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_the_in_flight_bound_wait_for_a_place_and_all_complete() {
    let d = daemon().await;
    let c = SessionClient::connect_with(
        &d.grpc_addr.to_string(),
        ClientOptions {
            max_in_flight: Some(1),
            ..options(1)
        },
    )
    .await
    .unwrap();
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let s = c
                    .create(NewSession::default().attribute("n", i.to_string()))
                    .await?;
                Ok::<_, Error>((i, c.peek(&s.id).await?))
            })
        })
        .collect();
    for task in tasks {
        let (i, s) = task.await.unwrap().unwrap();
        assert_eq!(s.text("n"), Some(i.to_string().as_str()));
    }
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_fails_only_the_in_flight_calls_that_cannot_be_sent_again() {
    let d = daemon().await;
    let proxy = Proxy::start(d.grpc_addr).await;
    let c = SessionClient::connect_with(&proxy.addr.to_string(), options(1))
        .await
        .unwrap();
    let direct = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let (s1, s2, s3) = (
        c.create(NewSession::default()).await.unwrap(),
        c.create(NewSession::default()).await.unwrap(),
        c.create(NewSession::default().attribute("a", "3"))
            .await
            .unwrap(),
    );

    // Three calls in flight: sessiond applies them, its replies are held back.
    proxy.freeze(true);
    let (c1, c2, c3) = (c.clone(), c.clone(), c.clone());
    let (id1, id2, id3) = (s1.id.clone(), s2.id.clone(), s3.id.clone());
    let read = tokio::spawn(async move { c3.get(&id3).await });
    let plain = tokio::spawn(async move {
        c1.update(&id1, [("k", "v")], [] as [&str; 0], Some(1))
            .await
    });
    let keyed = tokio::spawn(async move {
        c2.update_with_key(&id2, [("k", "v")], [] as [&str; 0], Some(1), "key-s2")
            .await
    });
    eventually("both updates applied", || async {
        let (v1, v2) = (direct.peek(&s1.id).await?, direct.peek(&s2.id).await?);
        match (v1.version, v2.version) {
            (2, 2) => Ok(()),
            _ => Err(Error::NotFound),
        }
    })
    .await;

    proxy.cut();
    proxy.freeze(false);
    // The read and the keyed write are sent again on a new connection; the plain write,
    // which may or may not have been applied, is the caller's to decide.
    let read = read.await.unwrap().unwrap();
    assert_eq!(
        (read.id.as_str(), read.text("a")),
        (s3.id.as_str(), Some("3"))
    );
    assert!(matches!(
        plain.await.unwrap(),
        Err(Error::Unavailable(m)) if m.contains("may or may not have been applied")
    ));
    let keyed = keyed.await.unwrap().unwrap();
    assert_eq!(keyed.version, 2, "the keyed update was applied once");
    assert_eq!(direct.peek(&s2.id).await.unwrap().version, 2);
    assert_eq!(direct.peek(&s1.id).await.unwrap().version, 2);

    // The client goes on, on its new connection.
    assert_eq!(c.get(&s1.id).await.unwrap().text("k"), Some("v"));
    assert_eq!(proxy.accepted(), 2);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_flight_when_sessiond_drains_is_sent_to_the_next_seed() {
    // sessiond ends a stream on shutdown with UNAVAILABLE "shutting down", and applied none
    // of the requests it did not answer: even a create without a key can go elsewhere.
    let (a, b) = (daemon().await, daemon().await);
    let proxy = Proxy::start(a.grpc_addr).await;
    let seeds = [proxy.addr.to_string(), b.grpc_addr.to_string()];
    let c = SessionClient::with_seeds(&seeds, options(1)).unwrap();
    c.create(NewSession::default()).await.unwrap();

    // A create on its way to A, held back in the proxy, when A starts draining.
    proxy.freeze_requests(true);
    let c2 = c.clone();
    let create =
        tokio::spawn(async move { c2.create(NewSession::default().attribute("a", "1")).await });
    eventually("the create is on its way", || async {
        match proxy.held_up.load(Ordering::SeqCst) {
            0 => Err(Error::NotFound),
            _ => Ok(()),
        }
    })
    .await;
    let stopping = tokio::spawn(a.stop());
    let s = create.await.unwrap().unwrap();
    let direct = SessionClient::connect(&b.grpc_addr.to_string())
        .await
        .unwrap();
    assert_eq!(direct.peek(&s.id).await.unwrap().text("a"), Some("1"));
    proxy.freeze_requests(false);
    stopping.await.unwrap().unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_deadline_fails_and_its_late_reply_goes_to_no_one() {
    let d = daemon().await;
    let proxy = Proxy::start(d.grpc_addr).await;
    let direct = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let (s1, s2) = (
        direct.create(NewSession::default()).await.unwrap(),
        direct.create(NewSession::default()).await.unwrap(),
    );
    let c = SessionClient::connect_with(
        &proxy.addr.to_string(),
        ClientOptions {
            connections: Some(1),
            timeout: Some(Duration::from_millis(300)),
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    eventually("a first read", || c.peek(&s1.id)).await;

    proxy.freeze(true);
    assert!(matches!(
        c.peek(&s1.id).await,
        Err(Error::Other { code: Code::DeadlineExceeded, message }) if message.contains("timeout")
    ));
    proxy.freeze(false);
    // The late reply for s1 arrives on the same stream; the next call gets its own.
    let got = eventually("a read after the deadline", || c.peek(&s2.id)).await;
    assert_eq!(got.id, s2.id);
    assert_eq!(proxy.accepted(), 1);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_made_while_sessiond_is_down_works_once_it_is_up() {
    let addr = free_addr();
    let c = SessionClient::connect(&addr.to_string()).await.unwrap();
    assert!(matches!(
        c.create(NewSession::default()).await,
        Err(Error::Unavailable(m)) if m.contains("cannot reach sessiond")
    ));
    let d = daemon_at(addr).await;
    let new = NewSession::default()
        .attribute("a", "1")
        .idempotency_key("lazy-start");
    let s = eventually("a create once sessiond is up", || c.create(new.clone())).await;
    assert_eq!(c.get(&s.id).await.unwrap().text("a"), Some("1"));
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_recovers_when_sessiond_restarts_at_the_same_address() {
    for transport in [Transport::Pipelined, Transport::Unary] {
        let first = daemon().await;
        let addr = first.grpc_addr;
        let c = SessionClient::connect_with(
            &addr.to_string(),
            ClientOptions {
                transport,
                ..options(1)
            },
        )
        .await
        .unwrap();
        let s = c.create(NewSession::default()).await.unwrap();
        first.stop().await.unwrap();
        let stopped = c.get(&s.id).await;
        assert!(
            matches!(stopped, Err(Error::Unavailable(_))),
            "{transport:?}: {stopped:?}"
        );

        // A new (empty, in-memory) daemon at the same address.
        let second = daemon_at(addr).await;
        let after = eventually("a read after the restart", || async {
            match c.get(&s.id).await {
                Err(Error::NotFound) => Ok(()),
                Err(e) => Err(e),
                Ok(_) => panic!("the old session cannot be on a new in-memory daemon"),
            }
        });
        after.await;
        let s = c.create(NewSession::default()).await.unwrap();
        assert_eq!(c.get(&s.id).await.unwrap().id, s.id);
        second.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_are_tried_in_turn_until_one_answers() {
    let d = daemon().await;
    let dead = free_addr().to_string();
    let live = d.grpc_addr.to_string();
    let c = SessionClient::with_seeds([dead.as_str(), live.as_str()], options(2)).unwrap();
    let s = c.create(NewSession::default()).await.unwrap();
    assert_eq!(c.get(&s.id).await.unwrap().id, s.id);
    // A single node names no leader.
    assert_eq!(c.leader(), None);
    let comma = SessionClient::connect(&format!("{dead},{live}"))
        .await
        .unwrap();
    assert_eq!(comma.peek(&s.id).await.unwrap().id, s.id);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn bad_options_and_addresses_are_named_without_connecting() {
    let bad = |options: ClientOptions| SessionClient::with_seeds(["127.0.0.1:1"], options);
    assert!(matches!(
        bad(ClientOptions { connections: Some(0), ..ClientOptions::default() }),
        Err(Error::InvalidArgument(m)) if m.contains("connections")
    ));
    assert!(matches!(
        bad(ClientOptions { max_in_flight: Some(0), ..ClientOptions::default() }),
        Err(Error::InvalidArgument(m)) if m.contains("max_in_flight")
    ));
    assert!(matches!(
        SessionClient::with_seeds([] as [&str; 0], ClientOptions::default()),
        Err(Error::InvalidArgument(m)) if m.contains("no sessiond address")
    ));
    assert!(matches!(
        SessionClient::connect("127.0.0.1:7420,").await,
        Err(Error::InvalidArgument(m)) if m.contains("empty")
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_move_to_the_leader_a_reply_names() {
    // A group of one that advertises its client address as a proxy's: every reply names
    // the proxy as the leader, so a client given the node's own address moves there.
    let listen = free_addr();
    let proxy = Proxy::start(listen).await;
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        listen,
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        cluster: Some(ClusterConfig {
            peer_listen: "127.0.0.1:0".parse().unwrap(),
            advertise_client: proxy.addr.to_string(),
            bootstrap: true,
            ..ClusterConfig::default()
        }),
        ..Config::default()
    };
    let d = Daemon::start(config, Clock::system()).await.unwrap();
    let leader = format!("http://{}", proxy.addr);
    for (transport, connections) in [(Transport::Pipelined, 1), (Transport::Unary, 1)] {
        let before = proxy.accepted();
        let c = SessionClient::connect_with(
            &listen.to_string(),
            ClientOptions {
                transport,
                ..options(connections)
            },
        )
        .await
        .unwrap();
        let new = NewSession::default().idempotency_key(format!("leader-{transport:?}"));
        // The group of one may still be electing itself: poll.
        let s = eventually("a create once the group has a leader", || {
            c.create(new.clone())
        })
        .await;
        assert_eq!(c.get(&s.id).await.unwrap().id, s.id);
        assert_eq!(
            c.leader().as_deref(),
            Some(leader.as_str()),
            "{transport:?}"
        );
        assert!(
            proxy.accepted() > before,
            "{transport:?}: no call went to the leader"
        );
    }
    d.stop().await.unwrap();
}
