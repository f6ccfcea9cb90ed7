//! sessionctl end to end: the real binary against a real daemon (in-process) on ephemeral
//! loopback ports.

mod common;

use std::process::Command;

use serde_json::Value;

struct Ctl {
    grpc: String,
    admin: String,
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ctl {
    async fn run(&self, args: &[&str]) -> Out {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sessionctl"));
        cmd.args(["--addr", &self.grpc, "--admin-addr", &self.admin])
            .args(args);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.run(&all).await;
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
        serde_json::from_str(&out.stdout).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subcommand_works_end_to_end() {
    let daemon = common::start(common::test_config()).await;
    let ctl = Ctl {
        grpc: daemon.grpc_addr.to_string(),
        admin: daemon.admin_addr.to_string(),
    };

    let ping = ctl.run(&["ping"]).await;
    assert_eq!(ping.code, 0, "{}", ping.stderr);
    assert!(ping.stdout.contains("SERVING"));

    let s = ctl
        .json(&[
            "create",
            "--user",
            "alice",
            "--ttl",
            "10m",
            "--set",
            "cart=apple",
            "--set",
            "raw=base64:AP8=",
        ])
        .await;
    let id = s["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 43);
    assert_eq!(s["user_id"], "alice");
    assert_eq!(s["version"], 1);
    assert_eq!(s["idle_timeout_seconds"], 600);
    assert_eq!(s["attributes"]["cart"], "apple");
    assert_eq!(s["attributes"]["raw"], "base64:AP8=");

    // Human output names the fields.
    let human = ctl.run(&["get", &id, "--peek"]).await;
    assert_eq!(human.code, 0);
    for field in ["id", "user_id", "version", "expires_at", "cart", "apple"] {
        assert!(
            human.stdout.contains(field),
            "{field} missing:\n{}",
            human.stdout
        );
    }

    let s = ctl
        .json(&["set", &id, "theme=dark", "--expect-version", "1"])
        .await;
    assert_eq!(s["version"], 2);
    let stale = ctl
        .run(&["set", &id, "theme=light", "--expect-version", "1"])
        .await;
    assert_eq!(stale.code, 10, "ABORTED");
    assert!(
        stale.stderr.starts_with("sessionctl: ABORTED"),
        "{}",
        stale.stderr
    );
    let s = ctl.json(&["unset", &id, "cart"]).await;
    assert!(s["attributes"].get("cart").is_none());
    let t = ctl.json(&["touch", &id]).await;
    assert!(t["expires_at"].as_str().unwrap().ends_with('Z'));

    let r = ctl.json(&["regenerate", &id, "--user", "bob"]).await;
    let new_id = r["id"].as_str().unwrap().to_string();
    assert_ne!(new_id, id);
    assert_eq!(r["user_id"], "bob");
    let gone = ctl.run(&["get", &id]).await;
    assert_eq!(gone.code, 5, "NOT_FOUND");
    assert!(
        !gone.stderr.contains(&id),
        "the error echoes the session ID"
    );

    ctl.json(&["create", "--user", "bob"]).await;
    let ls = ctl.json(&["ls", "--user", "bob"]).await;
    assert_eq!(ls["sessions"].as_array().unwrap().len(), 2);
    let killed = ctl
        .json(&["kill", "--user", "bob", "--except", &new_id])
        .await;
    assert_eq!(killed["destroyed"], 1);
    let d = ctl.json(&["destroy", &new_id]).await;
    assert_eq!(d["existed"], true);
    let d = ctl.json(&["destroy", &new_id]).await;
    assert_eq!(d["existed"], false);

    let stats = ctl.json(&["stats"]).await;
    assert_eq!(stats["created"], 2.0);
    assert_eq!(stats["regenerated"], 1.0);
    assert_eq!(stats["sessions"], 0.0);
    let human_stats = ctl.run(&["stats"]).await;
    assert!(human_stats.stdout.contains("uptime_seconds"));

    assert_eq!(
        ctl.run(&["get", "not-an-id"]).await.code,
        3,
        "INVALID_ARGUMENT"
    );
    // bench hands over to the load generator, aimed at the same daemon.
    let bench = ctl
        .run(&[
            "bench",
            "--sessions",
            "200",
            "--concurrency",
            "4",
            "--connections",
            "1",
            "--duration",
            "1s",
            "--warmup",
            "0s",
        ])
        .await;
    assert_eq!(bench.code, 0, "{}", bench.stderr);
    for word in ["overall", "get", "ops/s", "p99"] {
        assert!(
            bench.stdout.contains(word),
            "{word} missing:\n{}",
            bench.stdout
        );
    }
    assert_eq!(ctl.run(&["frobnicate"]).await.code, 2, "usage error");

    let dead = Ctl {
        grpc: "127.0.0.1:1".into(),
        admin: "127.0.0.1:1".into(),
    };
    let out = dead.run(&["ping"]).await;
    assert_eq!(out.code, 14, "UNAVAILABLE");
    assert!(out.stderr.contains("127.0.0.1:1"), "{}", out.stderr);
    assert_eq!(dead.run(&["stats"]).await.code, 14);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_tokens_and_tls_from_the_command_line() {
    use common::certs::{write, Ca};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server ca");
    let (cert, key) = ca.issue("localhost");
    let token = "ctl-token";
    let hash = common::sha256_hex(token);
    let daemon = common::start(sessiond::config::Config {
        tls_cert: write(dir.path(), "server.pem", &cert),
        tls_key: write(dir.path(), "server.key", &key),
        tenants: vec![sessiond::config::TenantConfig {
            name: "ops".into(),
            token_sha256: hash,
            ..Default::default()
        }],
        ..common::test_config()
    })
    .await;
    let ca_path = write(dir.path(), "ca.pem", &ca.pem);
    let ctl = Ctl {
        grpc: format!("localhost:{}", daemon.grpc_addr.port()),
        admin: daemon.admin_addr.to_string(),
    };
    let ca_arg = ca_path.to_str().unwrap();
    let s = ctl
        .json(&["--ca", ca_arg, "--token", token, "create", "--user", "ann"])
        .await;
    assert_eq!(s["user_id"], "ann");
    let refused = ctl.run(&["--ca", ca_arg, "create"]).await;
    assert_eq!(refused.code, 16, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("credentials required"),
        "{}",
        refused.stderr
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_all_needs_yes_and_ends_every_session() {
    let daemon = common::start(common::test_config()).await;
    // No `stats` here: the admin address is not needed.
    let ctl = Ctl {
        grpc: daemon.grpc_addr.to_string(),
        admin: "127.0.0.1:1".into(),
    };
    let mut ids = Vec::new();
    for i in 0..20 {
        let user = format!("u{}", i % 4);
        let s = ctl.json(&["create", "--user", &user, "--set", "k=v"]).await;
        ids.push(s["id"].as_str().unwrap().to_string());
    }

    let refused = ctl.run(&["kill", "--all"]).await;
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("--yes"), "{}", refused.stderr);
    assert_eq!(ctl.json(&["get", &ids[0], "--peek"]).await["id"], ids[0]);

    let killed = ctl.json(&["kill", "--all", "--yes"]).await;
    assert_eq!(killed["destroyed"], 20);
    for id in &ids {
        let gone = ctl.run(&["get", id, "--peek"]).await;
        assert_eq!(gone.code, 5, "NOT_FOUND: {}", gone.stderr);
    }
    let human = ctl.run(&["kill", "--all", "--yes"]).await;
    assert_eq!(human.code, 0, "{}", human.stderr);
    assert!(human.stdout.contains("destroyed"), "{}", human.stdout);
    daemon.stop().await.unwrap();
}
