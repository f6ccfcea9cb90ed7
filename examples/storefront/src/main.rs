//! The storefront demo server. Environment: `SESSIOND_ADDR` (default `127.0.0.1:7420`),
//! `SESSIOND_TOKEN` (a tenant's token, if sessiond has tenants), `PORT` (default 8080; 0
//! picks a free one), `STOREFRONT_IDLE_TIMEOUT_SECONDS` (new sessions' idle timeout).
//! Prints `listening on http://127.0.0.1:PORT` once it accepts connections.

use std::net::SocketAddr;
use std::time::Duration;

use sessiond_client::{ClientOptions, SessionClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let addr = env("SESSIOND_ADDR").unwrap_or_else(|| "127.0.0.1:7420".into());
    let port: u16 = env("PORT").map_or(Ok(8080), |p| p.parse())?;
    let idle = env("STOREFRONT_IDLE_TIMEOUT_SECONDS")
        .map(|s| s.parse().map(Duration::from_secs))
        .transpose()?;
    let client = SessionClient::connect_with(
        &addr,
        ClientOptions {
            token: env("SESSIOND_TOKEN"),
            ..ClientOptions::default()
        },
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        storefront::app(client, idle)?.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
