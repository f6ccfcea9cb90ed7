//! Both stacks end to end over real HTTP and real stores: a sessiond daemon in-process and a
//! `redis-server` child, each on an ephemeral loopback port, behind the app of `shop`, driven
//! by a short run of the load generator and its lost-adds check.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sessiond::clock::Clock;
use sessiond::config::Config;
use sessiond::server::Daemon;
use sessiond_client::SessionClient;
use sessiond_web_bench::load::{self, LoadConfig, Report};
use sessiond_web_bench::shop;
use tower_sessions_redis_store::fred::prelude::{ClientLike, Config as RedisConfig, Pool};

/// The longest a store may take to accept connections.
const STARTUP: Duration = Duration::from_secs(20);

async fn sessiond() -> Daemon {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        persist: false,
        ..Config::default()
    };
    Daemon::start(config, Clock::system()).await.unwrap()
}

/// Serves `app` on an ephemeral port; its address.
async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A short run: 4 browsers, then 2 browsers of 4 tabs adding 3 items each.
fn short(target: SocketAddr) -> LoadConfig {
    LoadConfig {
        target,
        browsers: 4,
        warmup: Duration::ZERO,
        duration: Duration::from_millis(300),
        mix: Default::default(),
        skus: 5,
        tab_browsers: 2,
        tabs: 4,
        adds_per_tab: 3,
        pids: vec![std::process::id()],
        cookie: shop::COOKIE.to_string(),
    }
}

/// What both stacks must show after a short run.
fn check_run(r: &Report) {
    assert!(r.overall.count > 0, "no request completed: {r:?}");
    assert_eq!(r.errors.values().sum::<u64>(), 0, "error answers: {r:?}");
    assert!(r.processes.is_some(), "this process's CPU was not read");
    let lost = r.lost_adds.as_ref().expect("the lost-adds check ran");
    assert_eq!(
        lost.acknowledged,
        2 * 4 * 3,
        "every add acknowledged: {lost:?}"
    );
    assert_eq!(lost.failed, 0);
    assert_eq!(lost.kept + lost.lost, lost.acknowledged);
}

/// One plain HTTP exchange: status and body.
async fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessiond_stack_serves_the_mix_and_loses_no_add() {
    let daemon = sessiond().await;
    let client = SessionClient::connect(&format!("http://{}", daemon.grpc_addr))
        .await
        .unwrap();
    let app = serve(shop::sessiond_app(client).unwrap()).await;

    let report = load::run(short(app)).await.unwrap();
    check_run(&report);
    let lost = report.lost_adds.unwrap();
    assert_eq!(
        lost.lost, 0,
        "sessiond's partial write-back lost adds: {lost:?}"
    );

    let (status, body) = post(app, "/cart/items", r#"{"sku":"apple","qty":0}"#).await;
    assert_eq!(status, 400);
    assert!(body.contains("qty 1-1000"), "{body}");
    let (status, body) = post(app, "/login", r#"{"user":""}"#).await;
    assert_eq!(status, 400);
    assert!(body.contains("user must not be empty"), "{body}");
}

/// A `redis-server` child, killed on drop.
struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `redis-server` on a free loopback port (no persistence: the test measures nothing).
async fn redis() -> (Redis, u16) {
    // Redis cannot bind port 0: take a free port from the kernel and hand it over.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--daemonize", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server is installed (apt-get install redis-server)");
    let redis = Redis(child);
    let deadline = tokio::time::Instant::now() + STARTUP;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "redis-server did not listen on {port}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (redis, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stack_serves_the_same_contract() {
    let (_redis, port) = redis().await;
    let config = RedisConfig::from_url(&format!("redis://127.0.0.1:{port}")).unwrap();
    let pool = Pool::new(config, None, None, None, 2).unwrap();
    let _connections = pool.connect();
    pool.wait_for_connect().await.unwrap();
    let app = serve(shop::redis_app(pool)).await;

    let report = load::run(short(app)).await.unwrap();
    check_run(&report);

    let (status, body) = post(app, "/cart/items", r#"{"sku":"","qty":1}"#).await;
    assert_eq!(status, 400);
    assert!(body.contains("sku must be 1-64 bytes"), "{body}");
}
