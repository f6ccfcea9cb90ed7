//! CPU time of other processes, read from Linux's `/proc`: `--pids` names every server
//! process of a run (a replicated group's members, Redis and its replica), and the report
//! says how busy they were together, where the target's own metrics see only itself.

/// Clock ticks per second of `/proc/PID/stat`'s CPU times: `USER_HZ`, 100 on every Linux
/// architecture sessiond builds for.
const USER_HZ: f64 = 100.0;

/// User plus system CPU seconds of each process in `pids`, all threads included, and the
/// children it has waited for (Redis's AOF-rewrite and RDB forks: the work is the server's);
/// `None` if any of them cannot be read (not Linux, or the process has gone).
pub(crate) fn cpu_seconds(pids: &[u32]) -> Option<Vec<f64>> {
    pids.iter().map(|&pid| one(pid)).collect()
}

fn one(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count fields after its end.
    // After it come state (field 3), ..., utime (field 14), stime (15), and the waited-for
    // children's cutime (16) and cstime (17).
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let mut ticks = 0.0;
    for _ in 0..4 {
        ticks += fields.next()?.parse::<f64>().ok()?;
    }
    Some(ticks / USER_HZ)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        if cfg!(target_os = "linux") {
            let own = super::cpu_seconds(&[std::process::id()]).expect("own /proc entry");
            assert_eq!(own.len(), 1);
            assert!(own[0] >= 0.0);
        }
    }
}
