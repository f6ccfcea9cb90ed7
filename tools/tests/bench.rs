//! sessiond-bench against a real daemon (in-process) on ephemeral loopback ports: every
//! operation of the mix runs, over unary RPCs and over Pipeline streams, closed and open loop.

mod common;

use std::process::Command;

use serde_json::Value;

/// Runs a short bench against `daemon` with `extra` flags; its JSON report.
async fn bench(daemon: &sessiond::server::Daemon, extra: &[&str]) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sessiond-bench"));
    cmd.args([
        "--target",
        &format!("grpc://{}", daemon.grpc_addr),
        "--admin-addr",
        &daemon.admin_addr.to_string(),
        "--sessions",
        "200",
        "--concurrency",
        "4",
        "--connections",
        "2",
        "--duration",
        "1s",
        "--warmup",
        "0s",
        // Every operation often enough to be seen in a second.
        "--mix",
        "get=40,update=20,create=10,destroy=10,regenerate=10,list=10",
        "--json",
    ])
    .args(extra);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{extra:?}: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{extra:?}: {e}: {stderr}"))
}

fn assert_every_operation_ran(report: &Value, mode: &str) {
    assert!(
        report["overall"]["ops"].as_u64().unwrap() > 0,
        "{mode}: {report}"
    );
    for op in ["get", "update", "create", "destroy", "regenerate", "list"] {
        assert!(
            report["operations"][op]["ops"].as_u64().unwrap_or(0) > 0,
            "{mode}: no {op} in {report}"
        );
    }
    // The only errors allowed are the generator racing its own destroys.
    for (what, _) in report["errors"].as_object().unwrap() {
        assert!(what.ends_with("NotFound"), "{mode}: {what} in {report}");
    }
    assert_eq!(
        report["memory_after_populate"]["measure"], "sessiond RSS",
        "{mode}: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_runs_over_unary_rpcs_and_pipeline_streams() {
    let daemon = common::start(common::test_config()).await;
    let unary = bench(&daemon, &[]).await;
    assert_every_operation_ran(&unary, "unary");
    assert_eq!(unary["pipeline"], false);
    let pipelined = bench(&daemon, &["--pipeline"]).await;
    assert_every_operation_ran(&pipelined, "pipeline");
    assert_eq!(pipelined["pipeline"], true);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_loop_offers_the_rate_it_was_given() {
    let daemon = common::start(common::test_config()).await;
    let report = bench(&daemon, &["--pipeline", "--rate", "500"]).await;
    assert_every_operation_ran(&report, "open loop");
    assert_eq!(report["offered_rate"], 500);
    // 500 ops/s for one measured second, give or take the pacer's first and last step.
    let ops = report["overall"]["ops"].as_u64().unwrap();
    assert!((400..=600).contains(&ops), "{ops} operations at 500/s");
    daemon.stop().await.unwrap();
}
