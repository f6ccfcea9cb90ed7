//! `sessiond`: config -> store -> reaper -> servers -> graceful shutdown.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;
use sessiond::clock::Clock;
use sessiond::config::{Config, LogFormat};
use sessiond::persist::log::FsyncPolicy;
use sessiond::server::Daemon;
use sessiond::store::events::Discard;
use sessiond::store::{Limits, Store};

/// The session-store daemon. Every flag overrides the config file and the environment.
#[derive(Parser, Serialize)]
#[command(version, about)]
struct Flags {
    /// Config file [default: config/sessiond.toml, if it exists]
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// gRPC listen address [env: SESSIOND_LISTEN] [default: 127.0.0.1:7420]
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    /// Admin HTTP listen address [env: SESSIOND_ADMIN_LISTEN] [default: 127.0.0.1:7421]
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_listen: Option<String>,
    /// Data directory [env: SESSIOND_DATA_DIR] [default: ./data]
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// Keep nothing on disk: a pure in-memory cache [env: SESSIOND_PERSIST=false]
    #[arg(long = "no-persist", action = clap::ArgAction::SetFalse)]
    #[serde(skip_serializing_if = "is_true")]
    persist: bool,
    /// When the log is fsynced [env: SESSIOND_FSYNC] [default: everysec]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    fsync: Option<FsyncPolicy>,
    /// Check the data directory, cut a damaged log at the damage (saying how many records it
    /// drops), and exit without serving
    #[arg(long)]
    #[serde(skip)]
    repair: bool,
    /// Log format [env: SESSIOND_LOG_FORMAT] [default: text]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
    /// Default idle timeout, e.g. 30m [env: SESSIOND_IDLE_TIMEOUT]
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_timeout: Option<String>,
    /// Default absolute timeout, e.g. 24h [env: SESSIOND_ABSOLUTE_TIMEOUT]
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    absolute_timeout: Option<String>,
    /// PEM certificate chain for TLS on the gRPC port [env: SESSIOND_TLS_CERT]
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert [env: SESSIOND_TLS_KEY]
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle for client certificates: turns on mutual TLS [env: SESSIOND_TLS_CLIENT_CA]
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_client_ca: Option<PathBuf>,
    /// Allow a non-loopback --listen without TLS (trusted networks only) [env: SESSIOND_INSECURE_LISTEN]
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    insecure_listen: bool,
    /// Map shards, a power of two [env: SESSIOND_SHARDS] [default: 64]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    shards: Option<usize>,
    /// Make a new cluster with this node as its only member, if it has never been part of
    /// one (needs a [cluster] section; sets cluster.bootstrap)
    #[arg(long)]
    #[serde(skip)]
    bootstrap: bool,
}

/// Serialise `persist` only when `--no-persist` turned it off.
fn is_true(b: &bool) -> bool {
    *b
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    let mut config = match Config::load(flags.config.as_deref(), &flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sessiond: {e}");
            return ExitCode::from(2);
        }
    };
    if flags.bootstrap {
        match config.cluster.as_mut() {
            Some(cluster) => cluster.bootstrap = true,
            None => {
                eprintln!("sessiond: --bootstrap makes a cluster: it needs a [cluster] section in the config");
                return ExitCode::from(2);
            }
        }
    }
    init_tracing(config.log_format);
    if flags.repair {
        return repair(&config);
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers(cpus))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sessiond: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("sessiond: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--repair`: recovery with permission to truncate, then exit. Checks `data_dir` and every
/// tenant's directory under `data_dir/tenants/` (configured or not: a tenant removed from the
/// config keeps its data until someone deletes it), since the daemon will not start while
/// any of them is damaged.
fn repair(config: &Config) -> ExitCode {
    let clock = Clock::system();
    let mut dirs = vec![config.data_dir.clone()];
    let tenants_dir = config.data_dir.join("tenants");
    let mut tenant_dirs: Vec<PathBuf> = config
        .tenants
        .iter()
        .map(|t| tenants_dir.join(&t.name))
        .collect();
    if let Ok(entries) = std::fs::read_dir(&tenants_dir) {
        tenant_dirs.extend(
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    tenant_dirs.sort();
    tenant_dirs.dedup();
    dirs.extend(tenant_dirs);
    let mut failed = false;
    for dir in &dirs {
        let scratch = |capacity| {
            Store::with_capacity(
                Limits::default(),
                16,
                clock.clone(),
                Box::new(Discard),
                capacity,
            )
        };
        match sessiond::persist::recover(dir, true, scratch) {
            Ok(r) => {
                // What died while the daemon was down is not counted as live.
                r.store.reap(usize::MAX);
                println!(
                    "sessiond --repair: {} is consistent: {} live session(s), {} record(s) replayed",
                    dir.display(),
                    r.store.stats().sessions,
                    r.records
                );
            }
            Err(e) => {
                eprintln!("sessiond --repair: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let daemon = Daemon::start(config, Clock::system()).await?;
    let handle = daemon.shutdown_handle();
    tokio::spawn(async move {
        // Every SIGINT or SIGTERM is forwarded: the first starts the shutdown, the second
        // skips the shutdown delay.
        loop {
            if shutdown_signal().await.is_err() {
                tracing::error!("cannot listen for shutdown signals");
                return;
            }
            if handle.send(()).await.is_err() {
                return;
            }
        }
    });
    let tls = daemon.tls_handles();
    tokio::spawn(async move {
        if tls.is_empty() {
            return;
        }
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::error!("cannot listen for SIGHUP; TLS files reload on change only");
            return;
        };
        while hup.recv().await.is_some() {
            match tls.iter().try_for_each(|t| t.reload()) {
                Ok(()) => tracing::info!("SIGHUP: TLS files reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: cannot reload TLS files; keeping the previous certificate")
                }
            }
        }
    });
    daemon.wait().await
}

async fn shutdown_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
