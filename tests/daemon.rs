//! Tests of the real `sessiond` binary as a child process: start-up, configuration errors,
//! SIGTERM, and that no session ID ever reaches the logs.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sessiond::api::pb;
use sessiond::api::pb::session_store_client::SessionStoreClient;

struct Proc {
    child: Child,
    grpc: String,
    output: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

/// Starts the binary on ephemeral ports in an empty working directory, and waits for the
/// line that says where it listens.
fn spawn(env: &[(&str, &str)]) -> Proc {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .envs(env.iter().copied())
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let (output, tx) = (output.clone(), tx.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("grpc=").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
                let mut out = output.lock().unwrap();
                out.push_str(&line);
                out.push('\n');
            }
        });
    }
    let grpc = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("sessiond did not start: {}", output.lock().unwrap()));
    Proc {
        child,
        grpc,
        output,
        _dir: dir,
    }
}

impl Proc {
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = self.child.wait().unwrap();
        // Give the reader threads the pipe's last bytes: they end at EOF.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.output.lock().unwrap().contains("shutdown: complete")
            && std::time::Instant::now() < deadline
        {
            std::thread::yield_now();
        }
        let out = self.output.lock().unwrap().clone();
        (status, out)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly_with_exit_0() {
    let p = spawn(&[]);
    let mut c = SessionStoreClient::connect(format!("http://{}", p.grpc))
        .await
        .unwrap();
    c.create(pb::CreateRequest::default()).await.unwrap();
    // `terminate` blocks this thread; the client must not hold a connection the server
    // would wait for.
    drop(c);
    let (status, out) = p.terminate();
    assert!(status.success(), "exit {status:?}\n{out}");
    for step in [
        "NOT_SERVING",
        "draining",
        "gRPC drained",
        "reaper stopped",
        "shutdown: complete",
    ] {
        assert!(out.contains(step), "missing {step:?} in\n{out}");
    }
}

#[test]
fn a_bad_setting_exits_non_zero_naming_it() {
    for (var, value, named) in [
        ("SESSIOND_SHARDS", "3", "shards"),
        ("SESSIOND_IDLE_TIMEOUT", "forever", "IDLE_TIMEOUT"),
        ("SESSIOND_MAX_ATTRIBUTES", "0", "max_attributes"),
        // Protected mode: a public plaintext listener needs an explicit opt-in.
        (
            "SESSIOND_LISTEN",
            "0.0.0.0:0",
            "refusing to listen on 0.0.0.0:0 without TLS",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_sessiond"))
            .env(var, value)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{var}={value} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(named), "{var}: {stderr}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["--config", "nope.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_id_reaches_the_logs_even_at_trace_level() {
    let p = spawn(&[("RUST_LOG", "trace")]);
    let mut c = SessionStoreClient::connect(format!("http://{}", p.grpc))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let s = c
            .create(pb::CreateRequest {
                user_id: "u".into(),
                attributes: [(
                    "secret".to_string(),
                    bytes::Bytes::from(format!("value-{i}")),
                )]
                .into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        c.get(pb::GetRequest {
            id: s.id.clone(),
            peek: false,
        })
        .await
        .unwrap();
        let r = c
            .regenerate(pb::RegenerateRequest {
                id: s.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let _ = c
            .get(pb::GetRequest {
                id: s.id.clone(),
                peek: false,
            })
            .await;
        c.destroy(pb::DestroyRequest { id: r.id.clone() })
            .await
            .unwrap();
        ids.push(s.id);
        ids.push(r.id);
    }
    drop(c);
    let (status, out) = p.terminate();
    assert!(status.success());
    assert!(out.len() > 1000, "trace logging produced almost nothing");
    for id in &ids {
        assert!(!out.contains(id.as_str()), "a session ID is in the logs");
    }
    assert!(!out.contains("value-"), "an attribute value is in the logs");
}
