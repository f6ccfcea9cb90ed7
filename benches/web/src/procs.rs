//! CPU time of the processes under test (the app and its store), read from Linux's `/proc`,
//! as `sessiond-bench --pids` does: the report says how busy the whole stack was.

/// Clock ticks per second of `/proc/PID/stat`'s CPU times: `USER_HZ`, 100 on every Linux
/// architecture this builds for.
const USER_HZ: f64 = 100.0;

/// User plus system CPU seconds of each process in `pids`, all threads included; `None` if
/// any of them cannot be read (not Linux, or the process has gone).
pub fn cpu_seconds(pids: &[u32]) -> Option<Vec<f64>> {
    pids.iter().map(|&pid| one(pid)).collect()
}

fn one(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count fields after its end.
    // After it come state (field 3), ..., utime (field 14) and stime (field 15).
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process_and_refuses_a_missing_one() {
        if cfg!(target_os = "linux") {
            let own = super::cpu_seconds(&[std::process::id()]).expect("own /proc entry");
            assert_eq!(own.len(), 1);
            assert!(own[0] >= 0.0);
            // PID 0 has no /proc entry.
            assert!(super::cpu_seconds(&[std::process::id(), 0]).is_none());
        }
    }
}
