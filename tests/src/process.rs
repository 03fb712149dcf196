//! What the tests and benchmarks measure of a process they started (the agent): CPU time and
//! memory, from `/proc` and the process's CPU clock.

/// CPU time `pid` has used so far, all its threads, the ended ones too, in nanoseconds: its
/// process CPU clock (`clock_getcpuclockid`), which the kernel lets any process read. `None`
/// when the process is gone.
#[must_use]
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).ok()?);
    let clock = nix::time::clock_getcpuclockid(pid).ok()?;
    let now = nix::time::clock_gettime(clock).ok()?;
    u64::try_from(now.tv_sec())
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(u64::try_from(now.tv_nsec()).ok()?)
}

/// User and system CPU time of `pid` so far, in clock ticks (`/proc/PID/stat` fields 14, 15).
#[must_use]
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    // utime and stime: fields 14 and 15, i.e. 11 and 12 after the comm.
    fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
}

/// A `kB` line of `/proc/PID/status` (`VmRSS:`, `VmHWM:`), in KiB; `None` when unreadable.
#[must_use]
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}
