//! One storefront app for the web comparison: `--store sessiond` (SessiondLayer over
//! sessiond) or `--store redis` (tower-sessions over Redis). Listens on 127.0.0.1 (port 0
//! picks a free one), prints `listening on http://ADDR` once it accepts connections, and
//! stops on SIGTERM or Ctrl-C.

use clap::{Parser, ValueEnum};
use sessiond_client::SessionClient;
use sessiond_web_bench::shop;
use tower_sessions_redis_store::fred::prelude::{ClientLike, Config, Pool};

/// The session store behind the app.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Store {
    /// sessiond, through `SessiondLayer`.
    Sessiond,
    /// Redis, through tower-sessions and tower-sessions-redis-store.
    Redis,
}

#[derive(Parser)]
#[command(about = "The storefront's session routes on sessiond or on tower-sessions + Redis")]
struct Args {
    /// The session store.
    #[arg(long, value_enum)]
    store: Store,
    /// Where the app listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// sessiond's gRPC address (with --store sessiond).
    #[arg(long, default_value = "http://127.0.0.1:7420")]
    sessiond: String,
    /// Redis's URL (with --store redis).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Connections in the Redis pool (with --store redis; tower-sessions' example uses 6).
    #[arg(long, default_value_t = 4)]
    redis_pool: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = match args.store {
        Store::Sessiond => shop::sessiond_app(SessionClient::connect(&args.sessiond).await?)?,
        Store::Redis => {
            let config = Config::from_url(&args.redis)
                .map_err(|e| anyhow::anyhow!("--redis {}: {e}", args.redis))?;
            let pool = Pool::new(config, None, None, None, args.redis_pool)?;
            // The pool's connection tasks run for the life of the process.
            let _connections = pool.connect();
            pool.wait_for_connect().await?;
            shop::redis_app(pool)
        }
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown())
        .await?;
    Ok(())
}

/// SIGTERM or Ctrl-C.
async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
