//! `sessionctl`: the command-line client of sessiond, the way redis-cli is Redis's.
//!
//! Human output by default, `--json` for scripts. The exit code is the gRPC status code of
//! the failed call (NOT_FOUND = 5, INVALID_ARGUMENT = 3, UNAVAILABLE = 14, ...), 0 on
//! success, and 2 for a command line clap cannot parse.
//!
//! This file holds the command line and the calls; `output` renders the answers, `stats`
//! summarises the admin endpoint's `/metrics`. `sessionctl cluster` lives in the library
//! (`sessiond_tools::cluster`), where its tests run it against real nodes.

mod output;
mod stats;

use std::process::ExitCode;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use sessiond_client::pb;
use sessiond_client::pb::session_store_client::SessionStoreClient;
use sessiond_client::{Bearer, ClientOptions, Error, Stub};
use sessiond_tools::cluster::{self, render, ClusterError};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::output::{human, session_json, timestamp};
use crate::stats::stats;

/// Command-line client for sessiond.
///
/// Exit codes: 0 on success; otherwise the gRPC status code of the failed call (3
/// INVALID_ARGUMENT, 5 NOT_FOUND, 8 RESOURCE_EXHAUSTED, 10 ABORTED, 14 UNAVAILABLE when
/// sessiond cannot be reached, ...); 2 for a malformed command line.
///
/// Attribute values print as UTF-8 text when they are valid UTF-8, otherwise as
/// `base64:<standard base64>`; `--set k=base64:...` accepts the same form.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// sessiond's gRPC address (host:port or http://host:port).
    #[arg(
        long,
        env = "SESSIOND_ADDR",
        default_value = "127.0.0.1:7420",
        global = true
    )]
    addr: String,
    /// sessiond's admin HTTP address, for `stats`.
    #[arg(
        long,
        env = "SESSIOND_ADMIN_ADDR",
        default_value = "127.0.0.1:7421",
        global = true
    )]
    admin_addr: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Give up on a call after this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,
    /// Bearer token of a tenant, when sessiond has tenants.
    #[arg(long, env = "SESSIOND_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// PEM CA bundle to verify sessiond's certificate with; turns on TLS (so does an
    /// https:// address).
    #[arg(long, env = "SESSIOND_CA", global = true)]
    ca: Option<std::path::PathBuf>,
    /// PEM client certificate, for mutual TLS (with --key).
    #[arg(long, env = "SESSIOND_CERT", global = true, requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, env = "SESSIOND_KEY", global = true, requires = "cert")]
    key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a session and print it.
    Create {
        /// Bind the session to this user.
        #[arg(long)]
        user: Option<String>,
        /// Idle timeout, e.g. 30m (default: the server's).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Absolute timeout, e.g. 24h (default: the server's).
        #[arg(long, value_parser = humantime::parse_duration)]
        absolute: Option<Duration>,
        /// An attribute, key=value; repeat for more.
        #[arg(long = "set", value_name = "K=V", value_parser = parse_pair)]
        set: Vec<(String, Bytes)>,
    },
    /// Read a session (slides its idle deadline unless --peek).
    Get {
        /// The session ID (it may start with "-": IDs are URL-safe base64).
        #[arg(allow_hyphen_values = true)]
        id: String,
        /// Read without sliding the idle deadline.
        #[arg(long)]
        peek: bool,
    },
    /// Set attributes: `set ID k=v...`.
    Set {
        /// The session ID (it may start with "-": IDs are URL-safe base64).
        #[arg(allow_hyphen_values = true)]
        id: String,
        #[arg(required = true, value_name = "K=V", value_parser = parse_pair)]
        pairs: Vec<(String, Bytes)>,
        /// Apply only if the session is at this version (compare-and-set).
        #[arg(long)]
        expect_version: Option<u64>,
    },
    /// Remove attributes: `unset ID k...`.
    Unset {
        /// The session ID (it may start with "-": IDs are URL-safe base64).
        #[arg(allow_hyphen_values = true)]
        id: String,
        #[arg(required = true)]
        keys: Vec<String>,
        /// Apply only if the session is at this version (compare-and-set).
        #[arg(long)]
        expect_version: Option<u64>,
    },
    /// Slide the idle deadline.
    Touch {
        /// The session ID (it may start with "-": IDs are URL-safe base64).
        #[arg(allow_hyphen_values = true)]
        id: String,
    },
    /// Move the session to a fresh ID (bind --user on login).
    Regenerate {
        /// The session ID (it may start with "-": IDs are URL-safe base64).
        #[arg(allow_hyphen_values = true)]
        id: String,
        /// Bind the new ID to this user ("" for anonymous).
        #[arg(long)]
        user: Option<String>,
        /// Start the new ID without attributes.
        #[arg(long)]
        drop_attributes: bool,
    },
    /// End one session.
    Destroy {
        /// The session ID (it may start with "-": IDs are URL-safe base64).
        #[arg(allow_hyphen_values = true)]
        id: String,
    },
    /// List a user's live sessions.
    Ls {
        #[arg(long)]
        user: String,
        /// Include each session's attributes.
        #[arg(long)]
        attributes: bool,
    },
    /// End all of a user's sessions (--user), or every session of the tenant (--all --yes).
    Kill {
        /// The user whose sessions to end.
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        user: Option<String>,
        /// Spare this session.
        #[arg(long, conflicts_with = "all", allow_hyphen_values = true)]
        except: Option<String>,
        /// End every session of the tenant (a leaked secret: log every user out).
        #[arg(long)]
        all: bool,
        /// Confirm --all; without it, --all does nothing.
        #[arg(long, requires = "all")]
        yes: bool,
    },
    /// A readable summary of the daemon's metrics.
    Stats,
    /// Check that sessiond is up and serving.
    Ping,
    /// Manage a replicated sessiond through a node's peer port (--peer): status, init, add,
    /// remove, transfer-leader.
    Cluster {
        /// A node's peer address (its cluster.peer_listen). Changes go to the leader, found
        /// from this node's status: any member will do. add, remove and transfer-leader take
        /// several, comma-separated, and use the first that is a member.
        #[arg(
            long,
            env = "SESSIOND_PEER_ADDR",
            default_value = cluster::DEFAULT_PEER,
            global = true
        )]
        peer: String,
        /// PEM bundle of the cluster CA (the nodes' cluster.tls_ca); turns on peer TLS.
        #[arg(long, env = "SESSIOND_PEER_CA", global = true)]
        peer_ca: Option<std::path::PathBuf>,
        /// PEM certificate from the cluster CA: the peer port asks every dialler for one
        /// (with --peer-key).
        #[arg(long, env = "SESSIOND_PEER_CERT", global = true, requires = "peer_key")]
        peer_cert: Option<std::path::PathBuf>,
        /// PEM private key of --peer-cert.
        #[arg(long, env = "SESSIOND_PEER_KEY", global = true, requires = "peer_cert")]
        peer_key: Option<std::path::PathBuf>,
        /// The name node certificates are verified against (the nodes'
        /// cluster.tls_server_name); default: the host of each address dialled.
        #[arg(long, env = "SESSIOND_PEER_SERVER_NAME", global = true)]
        peer_server_name: Option<String>,
        /// How long a membership change, a new node's catching up or a leadership move may
        /// take.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration, global = true)]
        wait: Duration,
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Run the load generator against --addr: `sessionctl bench -- --duration 5s ...`
    /// passes the rest to sessiond-bench (see `sessiond-bench --help`).
    Bench {
        /// Arguments for sessiond-bench.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// The node's view of the cluster: role, term, leader, log indexes, the members and, on
    /// the leader, how far each one is behind.
    Status,
    /// Start a new cluster with --peer's node as its only voter (once, on the first node).
    Init {
        /// The peer addresses of the other nodes meant to form the cluster (comma-separated or
        /// repeated). With them init is safe to repeat: if --peer's node or any of these is in
        /// a cluster already it starts none and succeeds, saying so; one that stays
        /// unreachable for --wait fails it, since that node may be in a cluster.
        #[arg(long, value_name = "PEER_ADDR", value_delimiter = ',')]
        group: Vec<String>,
    },
    /// Add nodes as voters, one after another: each joins as a learner, catches up, then votes.
    /// A node that is a voter already is left as it is.
    Add {
        /// The new node's peer address (comma-separated or repeated for several); its ID and
        /// addresses are read from its status.
        #[arg(long, value_name = "PEER_ADDR", value_delimiter = ',', required = true)]
        node: Vec<String>,
    },
    /// Remove a member, voter or learner.
    Remove {
        /// The member's node ID (see `cluster status`).
        #[arg(long, value_name = "NODE_ID")]
        id: u64,
    },
    /// Hand leadership to another voter, e.g. before restarting the leader's host.
    TransferLeader {
        /// The voter to lead (see `cluster status`).
        #[arg(long, value_name = "NODE_ID")]
        to: u64,
    },
}

/// A failure, with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl From<ClusterError> for Failure {
    fn from(e: ClusterError) -> Self {
        Failure {
            code: e.code() as u8,
            message: format!("{}: {e}", code_name(e.code())),
        }
    }
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure {
            code: s.code() as u8,
            message: format!("{}: {}", code_name(s.code()), s.message()),
        }
    }
}

fn code_name(code: Code) -> String {
    // The canonical upper-case names, as in the gRPC spec: NotFound -> NOT_FOUND.
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    if out == "OK" || out == "O_K" {
        "OK".into()
    } else {
        out
    }
}

fn parse_pair(s: &str) -> Result<(String, Bytes), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected key=value, got {s:?}"))?;
    let value = match v.strip_prefix("base64:") {
        Some(b64) => STANDARD
            .decode(b64)
            .map_err(|e| format!("bad base64 for {k:?}: {e}"))?,
        None => v.as_bytes().to_vec(),
    };
    Ok((k.to_string(), Bytes::from(value)))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Bench { args } = &cli.command {
        return bench(&cli, args);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sessionctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let answer = match &cli.command {
        Command::Cluster {
            peer,
            peer_ca,
            peer_cert,
            peer_key,
            peer_server_name,
            wait,
            command,
        } => peer_tls(peer_ca, peer_cert, peer_key, peer_server_name).and_then(|tls| {
            let o = cluster::Options {
                timeout: cli.timeout,
                wait: *wait,
                tls,
            };
            runtime.block_on(cluster(peer, &o, command))
        }),
        _ => runtime.block_on(run(&cli)).map(|json| {
            let text = human(&json);
            (json, text)
        }),
    };
    match answer {
        Ok((json, text)) => {
            if cli.json {
                println!("{json}");
            } else {
                print!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("sessionctl: {}", f.message);
            ExitCode::from(f.code.max(1))
        }
    }
}

async fn connect(cli: &Cli) -> Result<Stub, Failure> {
    let channel = channel(cli).await?;
    let bearer = Bearer::new(cli.token.as_deref()).map_err(|_| Failure {
        code: 2,
        message: "--token must be printable ASCII".into(),
    })?;
    Ok(SessionStoreClient::with_interceptor(channel, bearer))
}

async fn channel(cli: &Cli) -> Result<Channel, Failure> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| Failure {
            code: 2,
            message: format!("cannot read {}: {e}", path.display()),
        })
    };
    let identity_pem = match (&cli.cert, &cli.key) {
        (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
        _ => None,
    };
    let options = ClientOptions {
        ca_pem: cli.ca.as_deref().map(read).transpose()?,
        identity_pem,
        timeout: Some(cli.timeout),
        ..ClientOptions::default()
    };
    sessiond_client::channel(&cli.addr, &options)
        .await
        .map_err(|e| {
            let why = match e {
                Error::Unavailable(why) | Error::InvalidArgument(why) => why,
                other => other.to_string(),
            };
            Failure {
                code: Code::Unavailable as u8,
                message: format!("UNAVAILABLE: cannot reach sessiond at {}: {why}", cli.addr),
            }
        })
}

async fn run(cli: &Cli) -> Result<Value, Failure> {
    match &cli.command {
        Command::Create {
            user,
            ttl,
            absolute,
            set,
        } => {
            let req = pb::CreateRequest {
                user_id: user.clone().unwrap_or_default(),
                attributes: set.iter().cloned().collect(),
                idle_timeout: ttl.map(proto_duration),
                absolute_timeout: absolute.map(proto_duration),
                client: None,
                idempotency_key: String::new(),
            };
            let s = connect(cli).await?.create(req).await?.into_inner();
            Ok(session_json(&s))
        }
        Command::Get { id, peek } => {
            let req = pb::GetRequest {
                id: id.clone(),
                peek: *peek,
            };
            Ok(session_json(
                &connect(cli).await?.get(req).await?.into_inner(),
            ))
        }
        Command::Set {
            id,
            pairs,
            expect_version,
        } => {
            let req = pb::UpdateRequest {
                id: id.clone(),
                set: pairs.iter().cloned().collect(),
                remove: vec![],
                expected_version: *expect_version,
                idempotency_key: String::new(),
            };
            Ok(session_json(
                &connect(cli).await?.update(req).await?.into_inner(),
            ))
        }
        Command::Unset {
            id,
            keys,
            expect_version,
        } => {
            let req = pb::UpdateRequest {
                id: id.clone(),
                set: Default::default(),
                remove: keys.clone(),
                expected_version: *expect_version,
                idempotency_key: String::new(),
            };
            Ok(session_json(
                &connect(cli).await?.update(req).await?.into_inner(),
            ))
        }
        Command::Touch { id } => {
            let r = connect(cli)
                .await?
                .touch(pb::TouchRequest { id: id.clone() })
                .await?
                .into_inner();
            Ok(json!({ "expires_at": timestamp(r.expires_at) }))
        }
        Command::Regenerate {
            id,
            user,
            drop_attributes,
        } => {
            let req = pb::RegenerateRequest {
                id: id.clone(),
                user_id: user.clone(),
                drop_attributes: *drop_attributes,
                idempotency_key: String::new(),
            };
            Ok(session_json(
                &connect(cli).await?.regenerate(req).await?.into_inner(),
            ))
        }
        Command::Destroy { id } => {
            let r = connect(cli)
                .await?
                .destroy(pb::DestroyRequest { id: id.clone() })
                .await?
                .into_inner();
            Ok(json!({ "existed": r.existed }))
        }
        Command::Ls { user, attributes } => {
            let req = pb::ListUserSessionsRequest {
                user_id: user.clone(),
                include_attributes: *attributes,
            };
            let r = connect(cli)
                .await?
                .list_user_sessions(req)
                .await?
                .into_inner();
            Ok(json!({ "sessions": r.sessions.iter().map(session_json).collect::<Vec<_>>() }))
        }
        Command::Kill { all: true, yes, .. } => {
            if !yes {
                return Err(Failure {
                    code: 2,
                    message: "kill --all ends every session of the tenant; add --yes to confirm"
                        .into(),
                });
            }
            let req = pb::DestroyAllSessionsRequest {
                confirm: sessiond_client::DESTROY_ALL_CONFIRMATION.into(),
            };
            let r = connect(cli)
                .await?
                .destroy_all_sessions(req)
                .await?
                .into_inner();
            Ok(json!({ "destroyed": r.destroyed }))
        }
        Command::Kill { user, except, .. } => {
            let req = pb::DestroyUserSessionsRequest {
                user_id: user.clone().unwrap_or_default(),
                except_id: except.clone().unwrap_or_default(),
            };
            let r = connect(cli)
                .await?
                .destroy_user_sessions(req)
                .await?
                .into_inner();
            Ok(json!({ "destroyed": r.destroyed }))
        }
        Command::Ping => ping(cli).await,
        Command::Stats => stats(cli).await,
        Command::Bench { .. } => unreachable!("bench runs before any connection"),
        Command::Cluster { .. } => unreachable!("cluster commands have their own rendering"),
    }
}

/// Peer TLS from the `cluster` flags: on with --peer-ca.
fn peer_tls(
    ca: &Option<std::path::PathBuf>,
    cert: &Option<std::path::PathBuf>,
    key: &Option<std::path::PathBuf>,
    server_name: &Option<String>,
) -> Result<Option<cluster::PeerTls>, Failure> {
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| Failure {
            code: 2,
            message: format!("cannot read {flag} {}: {e}", path.display()),
        })
    };
    let Some(ca) = ca else {
        if cert.is_some() || server_name.is_some() {
            return Err(Failure {
                code: 2,
                message: "--peer-cert and --peer-server-name need --peer-ca (the cluster CA)"
                    .into(),
            });
        }
        return Ok(None);
    };
    let identity_pem = match (cert, key) {
        (Some(cert), Some(key)) => Some((read("--peer-cert", cert)?, read("--peer-key", key)?)),
        _ => None,
    };
    Ok(Some(cluster::PeerTls {
        ca_pem: read("--peer-ca", ca)?,
        identity_pem,
        server_name: server_name.clone(),
    }))
}

/// A `cluster` command: its answer as JSON, and as text for a person.
async fn cluster(
    peer: &str,
    o: &cluster::Options,
    command: &ClusterCommand,
) -> Result<(Value, String), Failure> {
    Ok(match command {
        ClusterCommand::Status => {
            let s = cluster::status(peer, o).await?;
            (render::status_json(&s), render::status_text(&s))
        }
        ClusterCommand::Init { group } if group.is_empty() => {
            let s = cluster::init(peer, o).await?;
            (render::init_json(&s), render::init_text(&s))
        }
        ClusterCommand::Init { group } => {
            let i = cluster::init_once(peer, group, o).await?;
            (render::init_once_json(&i), render::init_once_text(&i))
        }
        ClusterCommand::Add { node } => {
            let mut added = Vec::new();
            for n in node {
                added.push(cluster::add(peer, n, o).await?);
            }
            (
                render::added_all_json(&added),
                render::added_all_text(&added),
            )
        }
        ClusterCommand::Remove { id } => {
            let s = cluster::remove(peer, *id, o).await?;
            (render::removed_json(*id, &s), render::removed_text(*id, &s))
        }
        ClusterCommand::TransferLeader { to } => {
            let m = cluster::transfer_leader(peer, *to, o).await?;
            (render::moved_json(&m), render::moved_text(&m))
        }
    })
}

/// Hands over to `sessiond-bench`, installed beside this binary, aimed at `--addr`.
fn bench(cli: &Cli, args: &[String]) -> ExitCode {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.join("sessiond-bench")))
        .filter(|p| p.exists());
    let Some(exe) = exe else {
        eprintln!("sessionctl: bench: sessiond-bench is not installed beside sessionctl");
        return ExitCode::from(2);
    };
    let addr = cli.addr.rsplit("://").next().unwrap_or(&cli.addr);
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "--target",
        &format!("grpc://{addr}"),
        "--admin-addr",
        &cli.admin_addr,
    ]);
    if cli.json {
        cmd.arg("--json");
    }
    match cmd.args(args).status() {
        Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("sessionctl: bench: cannot run sessiond-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn ping(cli: &Cli) -> Result<Value, Failure> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let started = std::time::Instant::now();
    let status = HealthClient::new(channel(cli).await?)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status();
    if status != ServingStatus::Serving {
        return Err(Failure {
            code: Code::Unavailable as u8,
            message: format!(
                "UNAVAILABLE: sessiond at {} is {}",
                cli.addr,
                status.as_str_name()
            ),
        });
    }
    Ok(json!({
        "status": status.as_str_name(),
        "rtt_ms": started.elapsed().as_secs_f64() * 1000.0,
    }))
}

fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One ID in 64 starts with "-" (URL-safe base64): it is an ID, not a flag.
    #[test]
    fn an_id_starting_with_a_hyphen_is_an_id() {
        let id = "-UmQRZ35l4iGROjcbZCgJt1E2YFj6w6jqdKI_oBZJ18";
        for args in [
            vec!["get", id, "--peek"],
            vec!["set", id, "k=v"],
            vec!["unset", id, "k"],
            vec!["touch", id],
            vec!["regenerate", id],
            vec!["destroy", id],
            vec!["kill", "--user", "u", "--except", id],
        ] {
            let cli = Cli::try_parse_from(std::iter::once("sessionctl").chain(args.clone()));
            assert!(cli.is_ok(), "{args:?}: {}", cli.err().unwrap());
        }
    }

    /// --peer defaults to the daemon's default peer_listen, and may follow the subcommand.
    #[test]
    fn cluster_commands_parse_with_the_default_peer() {
        let cli = Cli::try_parse_from(["sessionctl", "cluster", "status"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Cluster { ref peer, command: ClusterCommand::Status, .. } if peer == "127.0.0.1:7422"
        ));
        let cli = Cli::try_parse_from([
            "sessionctl",
            "cluster",
            "transfer-leader",
            "--to",
            "7",
            "--peer",
            "10.0.0.1:7422",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Cluster { ref peer, command: ClusterCommand::TransferLeader { to: 7 }, .. } if peer == "10.0.0.1:7422"
        ));
    }
}
