//! Shared test harness: a real sessiond on an ephemeral loopback port, driven by a manual
//! clock, and a client for it.

#![allow(dead_code)]

pub mod certs;
pub mod cluster;
mod config;
/// The tools' reader of Prometheus samples, the same file.
#[path = "../../tools/src/exposition.rs"]
mod exposition;
pub mod faultproxy;
pub mod history;
pub mod proc;

pub use config::{sha256_hex, test_config, T0};
pub use exposition::sample;

use std::time::Duration;

use sessiond::api::pb;
use sessiond::api::pb::session_store_client::SessionStoreClient;
use sessiond::clock::Clock;
use sessiond::config::{Config, TenantConfig};
use sessiond::server::Daemon;
use tonic::codegen::{Body, Bytes, StdError};
use tonic::transport::Channel;
use tonic::IntoRequest;

/// A tenant picked by the bearer token `token`.
pub fn token_tenant(name: &str, token: &str) -> TenantConfig {
    TenantConfig {
        name: name.into(),
        token_sha256: sha256_hex(token),
        ..TenantConfig::default()
    }
}

/// `msg` with `authorization: Bearer {token}`.
pub fn bearer<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// A plaintext channel to `url`, connected.
pub async fn channel(url: String) -> Channel {
    Channel::from_shared(url).unwrap().connect().await.unwrap()
}

/// Creates a session the test goes on to use: a failed create fails the test.
pub async fn create<T>(
    client: &mut SessionStoreClient<T>,
    req: impl IntoRequest<pb::CreateRequest>,
) -> pb::Session
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    client.create(req).await.unwrap().into_inner()
}

/// Regenerates session `id` with the defaults (same user, attributes kept): its new self.
/// A failed regenerate fails the test.
pub async fn regenerate<T>(client: &mut SessionStoreClient<T>, id: &str) -> pb::Session
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let req = pb::RegenerateRequest {
        id: id.into(),
        ..Default::default()
    };
    client.regenerate(req).await.unwrap().into_inner()
}

/// A running daemon on a manual clock.
pub struct TestServer {
    pub daemon: Daemon,
    pub clock: Clock,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::with_config(test_config()).await
    }

    pub async fn with_config(config: Config) -> Self {
        let clock = Clock::manual(T0);
        let daemon = Daemon::start(config, clock.clone()).await.unwrap();
        TestServer { daemon, clock }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.daemon.grpc_addr)
    }

    pub async fn channel(&self) -> Channel {
        channel(self.url()).await
    }

    pub async fn client(&self) -> SessionStoreClient<Channel> {
        SessionStoreClient::new(self.channel().await)
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// GETs a path on the admin endpoint: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.daemon.admin_addr, path).await
    }

    /// The value of one unlabelled sample in /metrics.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.admin_get("/metrics").await;
        sample(&body, name).unwrap_or_else(|| panic!("{name} not in /metrics"))
    }

    pub async fn stop(self) {
        self.daemon.stop().await.unwrap();
    }
}

/// A client of the daemon at `url` (`http://host:port`).
pub async fn connect(url: String) -> SessionStoreClient<Channel> {
    SessionStoreClient::new(channel(url).await)
}

/// A minimal HTTP/1.0 GET over a plain socket: enough for the admin endpoint in tests.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Attribute map from string pairs.
pub fn attrs(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, bytes::Bytes> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), bytes::Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}
