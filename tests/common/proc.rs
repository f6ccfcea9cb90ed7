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
    spawn_listening(cwd, "127.0.0.1:0", args, env)
}

/// Like [`spawn`], with gRPC on `listen`: a node restarted where its clients (and its group's
/// membership) expect it.
pub fn spawn_listening(
    cwd: &Path,
    listen: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<Proc, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sessiond"));
    cmd.args(["--listen", listen, "--admin-listen", "127.0.0.1:0"])
        .args(args);
    spawn_command(cmd, cwd, env)
}

/// Like [`spawn`], on a disk that stops growing files at `max_file_bytes`: the child runs
/// with that `RLIMIT_FSIZE` (soft limit) and SIGXFSZ ignored, so a write past it fails with
/// EFBIG as on a full disk. [`Proc::lift_file_size_limit`] makes the disk work again.
pub fn spawn_with_file_size_limit(
    cwd: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    max_file_bytes: u64,
) -> Result<Proc, String> {
    use std::os::unix::process::CommandExt;
    // An ignored signal stays ignored across exec; the shell sets that up, then becomes
    // sessiond (same pid).
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "trap '' XFSZ; exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_sessiond"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(args);
    let hard = rustix::process::getrlimit(rustix::process::Resource::Fsize).maximum;
    // SAFETY: setrlimit is a plain system call, safe between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setrlimit(
                rustix::process::Resource::Fsize,
                rustix::process::Rlimit {
                    current: Some(max_file_bytes),
                    maximum: hard,
                },
            )
            .map_err(std::io::Error::from)
        });
    }
    spawn_command(cmd, cwd, env)
}

fn spawn_command(mut cmd: Command, cwd: &Path, env: &[(&str, &str)]) -> Result<Proc, String> {
    let mut child = cmd
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

    /// Lifts the file size limit of [`spawn_with_file_size_limit`]: the disk works again.
    pub fn lift_file_size_limit(&self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32);
        let hard = rustix::process::getrlimit(rustix::process::Resource::Fsize).maximum;
        rustix::process::prlimit(
            pid,
            rustix::process::Resource::Fsize,
            rustix::process::Rlimit {
                current: hard,
                maximum: hard,
            },
        )
        .expect("prlimit on the child");
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// SIGSTOP: the process stops where it is, sockets open, until [`Proc::resume`].
    pub fn pause(&self) {
        self.signal(rustix::process::Signal::STOP);
    }

    /// SIGCONT after [`Proc::pause`].
    pub fn resume(&self) {
        self.signal(rustix::process::Signal::CONT);
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("a child's pid");
        rustix::process::kill_process(pid, signal).expect("signalling the child");
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

/// A test that fails part-way still stops its daemon: no sessiond outlives its test.
impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
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

/// A thread of a sessiond child held stopped with ptrace, as if it hung in a system call (a
/// disk that stops answering, for the log's flusher) while the rest of the process runs on.
/// Dropping it lets the thread go on.
#[cfg(target_os = "linux")]
pub struct Frozen {
    thaw: Option<mpsc::Sender<()>>,
    tracer: Option<std::thread::JoinHandle<()>>,
}

#[cfg(target_os = "linux")]
impl Proc {
    /// Stops the child's thread named `name` while it waits for work: inside a futex wait,
    /// where it holds no lock. Stopped while holding one, it would stop every thread that
    /// then wants that lock, and the test would see a daemon that hangs, not a slow disk.
    pub fn freeze_waiting_thread(&self, name: &str) -> Frozen {
        let task = format!("/proc/{}/task", self.child.id());
        let tid: i32 = std::fs::read_dir(&task)
            .unwrap()
            .filter_map(Result::ok)
            .find(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
            })
            .unwrap_or_else(|| panic!("sessiond has no thread named {name}"))
            .file_name()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let syscall = std::path::PathBuf::from(format!("{task}/{tid}/syscall"));
        let (frozen_tx, frozen) = mpsc::channel();
        let (thaw, thawed) = mpsc::channel::<()>();
        // Every ptrace request must come from the thread that attached: one thread does all.
        let tracer = std::thread::spawn(move || {
            let result = stop_while_waiting(tid, &syscall);
            let stopped = result.is_ok();
            let _ = frozen_tx.send(result);
            if stopped {
                let _ = thawed.recv();
            }
            let none = std::ptr::null_mut::<libc::c_void>();
            // SAFETY: ptrace and waitpid on a thread this thread traces; no memory is shared.
            unsafe {
                if libc::ptrace(libc::PTRACE_DETACH, tid, none, none) != 0 && stopped {
                    // It died while stopped (the child was killed first): reap it, or the
                    // child's own exit could never be collected.
                    let mut status = 0;
                    libc::waitpid(tid, &mut status, libc::__WALL);
                }
            }
        });
        match frozen.recv().unwrap() {
            Ok(()) => Frozen {
                thaw: Some(thaw),
                tracer: Some(tracer),
            },
            Err(e) => {
                let _ = tracer.join();
                panic!("cannot stop sessiond's {name} thread with ptrace: {e}");
            }
        }
    }
}

/// Attaches to thread `tid` and stops it, and lets it run on and stops it again until it is
/// stopped inside a futex wait (FUTEX_WAIT or FUTEX_WAIT_BITSET), as `syscall`, its
/// `/proc/PID/task/TID/syscall`, shows.
#[cfg(target_os = "linux")]
fn stop_while_waiting(tid: i32, syscall: &Path) -> Result<(), String> {
    let none = std::ptr::null_mut::<libc::c_void>();
    let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: ptrace and waitpid on a thread of this process's own child; no memory is
    // shared with it.
    unsafe {
        if libc::ptrace(libc::PTRACE_SEIZE, tid, none, none) != 0 {
            return Err(os("PTRACE_SEIZE"));
        }
        loop {
            if libc::ptrace(libc::PTRACE_INTERRUPT, tid, none, none) != 0 {
                return Err(os("PTRACE_INTERRUPT"));
            }
            let mut status = 0;
            if libc::waitpid(tid, &mut status, libc::__WALL) != tid {
                return Err(os("waitpid"));
            }
            if !libc::WIFSTOPPED(status) {
                return Err(format!("the thread ended (wait status {status:#x})"));
            }
            // A stop for a signal sent to the thread: hand the signal on when it goes on.
            let signal = if status >> 16 == 0 {
                libc::WSTOPSIG(status)
            } else {
                0
            };
            if signal == 0 && waiting_on_futex(syscall) {
                return Ok(());
            }
            let signal = std::ptr::without_provenance_mut::<libc::c_void>(signal as usize);
            if libc::ptrace(libc::PTRACE_CONT, tid, none, signal) != 0 {
                return Err(os("PTRACE_CONT"));
            }
        }
    }
}

/// Whether `/proc/PID/task/TID/syscall` shows a thread in a futex wait: `nr arg1 arg2 ...`,
/// with arg2 the futex operation.
#[cfg(target_os = "linux")]
fn waiting_on_futex(syscall: &Path) -> bool {
    const FUTEX_CMD_MASK: u64 = 0x7f;
    const FUTEX_WAIT: u64 = 0;
    const FUTEX_WAIT_BITSET: u64 = 9;
    let Ok(text) = std::fs::read_to_string(syscall) else {
        return false;
    };
    let mut fields = text.split_whitespace();
    let nr = fields.next().and_then(|n| n.parse::<libc::c_long>().ok());
    let op = fields
        .nth(1)
        .and_then(|op| u64::from_str_radix(op.trim_start_matches("0x"), 16).ok());
    match (nr, op) {
        (Some(nr), Some(op)) => {
            nr == libc::SYS_futex && matches!(op & FUTEX_CMD_MASK, FUTEX_WAIT | FUTEX_WAIT_BITSET)
        }
        _ => false,
    }
}

#[cfg(target_os = "linux")]
impl Drop for Frozen {
    fn drop(&mut self) {
        drop(self.thaw.take());
        if let Some(tracer) = self.tracer.take() {
            let _ = tracer.join();
        }
    }
}
