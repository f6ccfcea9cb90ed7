//! The real `sessiond` binary as a child process on ephemeral ports.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running sessiond child.
pub struct Proc {
    pub child: Child,
    /// The gRPC address it reported.
    pub grpc: String,
    /// Everything it printed so far, stdout and stderr interleaved.
    pub output: Arc<Mutex<String>>,
}

/// Runs sessiond with `args` and `env` in `cwd`, on ephemeral loopback ports, and waits for
/// the log line that says where it listens. `Err` carries the output if it exited first.
pub fn spawn(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Proc, String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
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
                    let _ = tx.send(Some(
                        rest.split_whitespace().next().unwrap_or("").to_string(),
                    ));
                }
                let mut out = output.lock().unwrap();
                out.push_str(&line);
                out.push('\n');
            }
            let _ = tx.send(None);
        });
    }
    drop(tx);
    // Both streams closing without the line means the process exited.
    let mut closed = 0;
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(grpc)) => {
                return Ok(Proc {
                    child,
                    grpc,
                    output,
                })
            }
            Ok(None) => {
                closed += 1;
                if closed == 2 {
                    let _ = child.wait();
                    return Err(output.lock().unwrap().clone());
                }
            }
            Err(_) => {
                let _ = child.kill();
                return Err(format!(
                    "no start-up line within 60 s:\n{}",
                    output.lock().unwrap()
                ));
            }
        }
    }
}

impl Proc {
    /// `http://` URL of the gRPC port.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// kill -9.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit; returns the status and all output.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = self.child.wait().unwrap();
        // The reader threads end at EOF; wait for the last line to be collected.
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

/// Runs sessiond to completion (for `--repair`, or a start-up that must fail).
pub fn run_to_exit(cwd: &Path, args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}
