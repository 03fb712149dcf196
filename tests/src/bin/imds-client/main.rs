//! A client that behaves like a workload: it enters a network namespace and a cgroup, becomes
//! the given uid/gid, then talks to an address. It prints one JSON line: its pid and what
//! happened (`{"pid":..,"ok":true,"body":".."}` or `{"pid":..,"ok":false,"errno":1,..}`).
//!
//! Usage: imds-client --netns FILE --cgroup DIR --uid N --gid N [--repeat N] ACTION ADDR PORT
//!
//! ACTION: imds, tcp, udp, the HTTP conversations of `http.rs` (`--path P`, default
//! `/latest/meta-data/instance-id`): v1, v2, sdk-v2 (each request in one write), keepalive,
//! split-v1, split-v2, pipelined, pipelined-padded, fastopen-v1, fastopen-v1-rthdr, urgent-v2,
//! reconnect-nat (v2 on IMDS itself, then the same socket connected again to ADDR, v1);
//! or one of the routes in `routes.rs`: nonblocking-connect, fastopen-sendto, fastopen-connect,
//! connected-udp, connected-udp-thrice, connected-udp-ip-options, sendto-on-connected-udp,
//! sendmmsg, io-uring-connect, io-uring-connect-async, io-uring-sendmsg, thread-connect,
//! child-connect, raw-udp, raw-syn, ping-echo, udplite-connected, mptcp-connect, held-imds
//! (`--hold-at DIR`: the metadata request on a connection opened before the test opened the
//! gate DIR; held-v1 the same tokenless), reconnect-held (the same on a socket refused by
//! IMDS's port 81 before the gate opened, connected again after), passed-socket,
//! passed-connection, connect-close, bulk-send, bulk-rounds (with `--alternate`: see
//! `bulk_rounds`) and until-allowed (for the benchmarks), and
//! `churn DIR SECS` (makes and removes cgroups below DIR for SECS seconds, as its uid).
//!
//! `--timings` (with `--warmup N`) adds the median, 10th and 90th percentile durations of the
//! repeated attempts. `--alternate DIR,DIR,... --blocks N` (with `--repeat` and `--warmup`)
//! instead makes N rounds of blocks, one per cgroup, moving into each in turn, and prints each
//! block's median attempt (`"blocks": [[ns, ...], ...]`, by cgroup); `--alternate-ports P,...`
//! gives each of those arms its own port; `--alternate-refused yes` times arms whose every
//! attempt is refused with `EPERM` (otherwise a failed attempt ends the client).
//!
//! ADDR may be written in any form the C library resolves (`2852039166`, a host name);
//! `--hosts FILE` puts FILE in place of /etc/hosts for this process; `--drop-to UID` makes the
//! forked child of `child-connect`, `passed-socket` and `passed-connection` drop to UID (and the
//! same gid) before it acts; `--move-to DIR` makes the client, once it is its uid, try to move
//! itself into the cgroup DIR (`"moved"` in the line says whether it could).
//!
//! With `--repeat N` the action runs N times and the line also counts the failures with
//! `EPERM` (`"eperm": k`); with `--ports N` as well, attempt k goes to PORT + k mod N.
//! `--uids N`: attempt k is made as real uid UID + k mod N (the client keeps saved uid 0 to
//! switch). `--linger SECS` keeps the client alive that long after its attempts.
//!
//! `--effective EUID:EGID` keeps UID and GID as the client's real ids and makes these its
//! effective ones (as a setuid or setgid program runs).
//!
//! `--namespaces pid,cgroup` (either or both) makes the client, once in its cgroup and before
//! it becomes its uid, enter new namespaces of those kinds, as a container runtime puts a
//! container's processes: for `pid`, the workload is a forked child, pid 1 in the new
//! namespace (the line gives its pid on the host). `--exec-sleep SECS` makes the client, after
//! printing its line, run `sleep SECS` in its place (`execve`: the same process, another
//! program).

mod http;
mod routes;

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use nix::{
    sched::{CloneFlags, setns},
    unistd::{Gid, Uid, setgid, setgroups, setresgid, setresuid, setuid},
};

pub(crate) const TIMEOUT: Duration = Duration::from_secs(3);

/// `--name value` options, and the positional arguments.
fn arguments() -> (std::collections::HashMap<String, String>, Vec<String>) {
    let mut options = std::collections::HashMap::new();
    let mut rest = Vec::new();
    let mut iter = std::env::args().skip(1);
    while let Some(arg) = iter.next() {
        if let Some(name) = arg.strip_prefix("--") {
            options.insert(name.to_owned(), iter.next().expect("option value"));
        } else {
            rest.push(arg);
        }
    }
    (options, rest)
}

fn main() {
    let (options, rest) = arguments();
    let [action, host, port] = rest.as_slice() else {
        panic!("usage: imds-client --netns F --cgroup D --uid N --gid N (imds|tcp|udp) ADDR PORT");
    };
    let port: u16 = port.parse().expect("port");
    if action == "churn" {
        churn(&options, std::path::Path::new(host), port);
        return;
    }

    let (addr, moved) = become_workload(&options, host, port);
    // `--hold-at DIR`: the gate `held-imds` waits at with its connection open.
    let hold = Hold(options.get("hold-at").map(std::path::PathBuf::from));
    let path = options
        .get("path")
        .cloned()
        .unwrap_or_else(|| "/latest/meta-data/instance-id".to_owned());
    let drop_to: Option<(u32, u32)> = options.get("drop-to").map(|id| {
        let id = id.parse().expect("drop-to");
        (id, id)
    });
    let mut child_pid = None;
    // `--ports N`: attempt k goes to PORT + k mod N (distinct attempts, for flood tests).
    let ports: u32 = options
        .get("ports")
        .map_or(1, |n| n.parse().expect("ports"));
    // `--uids N`: attempt k is made as real uid UID + k mod N.
    let uids: u32 = options.get("uids").map_or(1, |n| n.parse().expect("uids"));
    let first_uid: u32 = options["uid"].parse().expect("uid");
    let base = addr;
    // The port of `--alternate`'s arm in progress (`--alternate-ports`).
    let port = std::cell::Cell::new(base.port());
    let mut attempt = 0u32;

    let mut act = || {
        let offset = u16::try_from(attempt % ports).expect("--ports fits a port");
        if uids > 1 {
            let uid = Uid::from_raw(first_uid + attempt % uids);
            // Back to euid 0 (the saved uid), then to the next real and effective uid.
            setresuid(
                Uid::from_raw(u32::MAX),
                Uid::from_raw(0),
                Uid::from_raw(u32::MAX),
            )
            .expect("seteuid 0");
            setresuid(uid, uid, Uid::from_raw(0)).expect("setresuid");
        }
        attempt += 1;
        let addr = SocketAddr::new(base.ip(), port.get().wrapping_add(offset));
        act_once(action, addr, drop_to, &hold, &path, &mut child_pid)
    };
    let repeat: u32 = options
        .get("repeat")
        .map_or(1, |n| n.parse().expect("repeat"));
    // `--timings`: time every attempt after `--warmup` untimed ones, for the benchmarks.
    let timed = options.contains_key("timings");
    let warmup: u32 = options
        .get("warmup")
        .map_or(0, |n| n.parse().expect("warmup"));
    if let Some(cgroups) = options.get("alternate") {
        if action == "bulk-rounds" {
            return bulk_rounds(&options, cgroups, addr, moved);
        }
        return alternate(&options, cgroups, &port, &mut act, repeat, warmup, moved);
    }
    let Repeated {
        result,
        eperm,
        mut durations_ns,
        elapsed_ns,
        ..
    } = repeated(&mut act, repeat, timed, warmup);
    // The process that made the attempt: a forked child's, for the routes that fork.
    let pid = child_pid.unwrap_or_else(host_pid);
    let line = match result {
        Ok(body) => serde_json::json!({
            "pid": pid, "ok": true, "body": body, "eperm": eperm, "moved": moved,
        }),
        Err(err) => serde_json::json!({
            "pid": pid, "ok": false, "errno": errno_of(&err),
            "error": err.to_string(), "eperm": eperm, "moved": moved,
        }),
    };
    let mut line = line;
    if timed {
        durations_ns.sort_unstable();
        let at = |q: f64| {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "an index into the sorted samples"
            )]
            let index = ((durations_ns.len().saturating_sub(1)) as f64 * q).round() as usize;
            durations_ns.get(index).copied().unwrap_or(0)
        };
        line["timings"] = serde_json::json!({
            "n": durations_ns.len(), "p10_ns": at(0.1), "median_ns": at(0.5), "p90_ns": at(0.9),
            "elapsed_ns": elapsed_ns,
        });
    }
    if let Some(secs) = options.get("linger") {
        std::thread::sleep(Duration::from_secs(secs.parse().expect("linger")));
    }
    println!("{line}");
    if let Some(secs) = options.get("exec-sleep") {
        exec_sleep(secs);
    }
}

/// `--alternate DIR,DIR,... --blocks N`: `blocks` rounds; in each the client moves into every
/// cgroup in turn (the order rotating by one each round), makes `warmup` untimed attempts
/// there, then `repeat` timed ones; with `--alternate-ports P,P,...`, each arm's attempts go
/// to its own port (set in `port`). Prints the median attempt of each block, by arm
/// (`"blocks": [[ns, ...], ...]`, `[arm][round]`). One process, alternating every few
/// milliseconds: the arms share its CPU, memory and the machine's drift. Moving needs the saved
/// uid 0 the client keeps with this option; each attempt is made as `--uid` (real and
/// effective).
fn alternate(
    options: &std::collections::HashMap<String, String>,
    cgroups: &str,
    port: &std::cell::Cell<u16>,
    act: &mut dyn FnMut() -> io::Result<String>,
    repeat: u32,
    warmup: u32,
    moved: Option<bool>,
) {
    let blocks: usize = options
        .get("blocks")
        .map_or(1, |n| n.parse().expect("blocks"));
    assert!(
        repeat >= 2,
        "--alternate times --repeat attempts after the first: 2 or more"
    );
    let cgroups: Vec<&str> = cgroups.split(',').collect();
    let ports: Vec<u16> = options.get("alternate-ports").map_or_else(
        || vec![port.get(); cgroups.len()],
        |ports| ports.split(',').map(|p| p.parse().expect("port")).collect(),
    );
    assert_eq!(ports.len(), cgroups.len(), "a port for each cgroup");
    let uid = Uid::from_raw(options["uid"].parse().expect("uid"));
    let refused = options
        .get("alternate-refused")
        .is_some_and(|yes| yes == "yes");
    let mut medians = vec![Vec::with_capacity(blocks); cgroups.len()];
    for block in 0..blocks {
        for turn in 0..cgroups.len() {
            let arm = (block + turn) % cgroups.len();
            enter_arm(cgroups[arm], uid);
            port.set(ports[arm]);
            let run = repeated(act, repeat, true, warmup);
            // An attempt that ends otherwise than the arm's do is not the arm's time: the
            // comparison would be wrong, so the client fails instead.
            let (expected, what) = if refused {
                (run.eperm == repeat, "were not refused with EPERM")
            } else {
                (run.failed == 0, "failed")
            };
            assert!(
                expected,
                "of {repeat} attempts in {} (port {}), some {what} ({} failed, {} with EPERM); \
                 the last: {:?}",
                cgroups[arm], ports[arm], run.failed, run.eperm, run.result
            );
            let mut durations = run.durations_ns;
            durations.sort_unstable();
            medians[arm].push(durations[durations.len() / 2]);
        }
    }
    println!(
        "{}",
        serde_json::json!({"pid": host_pid(), "ok": true, "body": "", "eperm": 0,
                           "moved": moved, "blocks": medians})
    );
}

/// Moves the client into the cgroup `dir`: back to euid 0 (the saved uid the `--alternate`
/// options keep) to move, then `uid` again (real and effective).
fn enter_arm(dir: &str, uid: Uid) {
    let keep = Uid::from_raw(u32::MAX);
    setresuid(keep, Uid::from_raw(0), keep).expect("seteuid 0");
    std::fs::write(format!("{dir}/cgroup.procs"), "0").expect("move");
    setresuid(uid, uid, Uid::from_raw(0)).expect("setresuid");
}

/// Timed blocks of each connection of `bulk-rounds` in a round.
const BULK_BLOCKS_PER_ROUND: usize = (1 << 30) / imds_guard_tests::BULK_BLOCK_BYTES;

/// `bulk-rounds` with `--alternate DIR,DIR,... --blocks N`: an established flow's throughput
/// in N rounds. In each, the client opens a connection to `addr` from every cgroup (moving into
/// it to make the socket, which stays that cgroup's), writes one untimed block on each, then
/// 1 GiB on each as blocks of [`imds_guard_tests::BULK_BLOCK_BYTES`], one connection after the
/// other (the order rotating by one each block), each block timed until the receiver
/// acknowledges it. Prints each arm's time for its GiB by round (`"blocks": [[ns, ...], ...]`,
/// `[arm][round]`). One process for every arm, alternating every few tens of milliseconds: the
/// arms share its CPU, memory and the machine's drift, which a transfer per arm cannot. (The
/// bench runs a client per round, whose first block is the first arm's: it rotates the order
/// of the arms it gives.)
fn bulk_rounds(
    options: &std::collections::HashMap<String, String>,
    cgroups: &str,
    addr: SocketAddr,
    moved: Option<bool>,
) {
    let rounds: usize = options
        .get("blocks")
        .map_or(1, |n| n.parse().expect("blocks"));
    let cgroups: Vec<&str> = cgroups.split(',').collect();
    let uid = Uid::from_raw(options["uid"].parse().expect("uid"));
    let block = vec![0x5au8; imds_guard_tests::BULK_BLOCK_BYTES];
    let send = |stream: &mut TcpStream| -> Duration {
        let start = std::time::Instant::now();
        stream.write_all(&block).expect("write a block");
        let mut ack = [0u8; 1];
        stream
            .read_exact(&mut ack)
            .expect("the block's acknowledgement");
        start.elapsed()
    };
    let mut totals = vec![Vec::with_capacity(rounds); cgroups.len()];
    for round in 0..rounds {
        let mut streams: Vec<TcpStream> = cgroups
            .iter()
            .map(|dir| {
                enter_arm(dir, uid);
                let mut stream = TcpStream::connect(addr).expect("connect");
                // Untimed: the connection's first block grows its window.
                send(&mut stream);
                stream
            })
            .collect();
        let mut elapsed = vec![Duration::ZERO; cgroups.len()];
        for step in 0..BULK_BLOCKS_PER_ROUND {
            for turn in 0..cgroups.len() {
                let arm = (round + step + turn) % cgroups.len();
                elapsed[arm] += send(&mut streams[arm]);
            }
        }
        for (total, elapsed) in totals.iter_mut().zip(elapsed) {
            total.push(u64::try_from(elapsed.as_nanos()).expect("a round's nanoseconds"));
        }
        streams.clear();
    }
    println!(
        "{}",
        serde_json::json!({"pid": host_pid(), "ok": true, "body": "", "eperm": 0,
                           "moved": moved, "blocks": totals})
    );
}

/// Runs `sleep SECS` in this process's place.
fn exec_sleep(secs: &str) -> ! {
    io::stdout().flush().expect("flush");
    let secs = std::ffi::CString::new(secs).expect("seconds");
    let Err(err) = nix::unistd::execv(c"/bin/sleep", &[c"sleep", secs.as_c_str()]);
    panic!("exec sleep: {err}");
}

/// `churn DIR SECS`: as its uid, in its cgroup (a user's delegated subtree), makes and removes
/// cgroups below `DIR` as fast as it can for `secs` seconds: a hostile user flooding the agent
/// with cgroup changes. The line's body is how many it made.
fn churn(options: &std::collections::HashMap<String, String>, dir: &std::path::Path, secs: u16) {
    std::fs::write(format!("{}/cgroup.procs", options["cgroup"]), "0").expect("join cgroup");
    setgroups(&[]).expect("setgroups");
    setgid(Gid::from_raw(options["gid"].parse().expect("gid"))).expect("setgid");
    setuid(Uid::from_raw(options["uid"].parse().expect("uid"))).expect("setuid");
    let until = std::time::Instant::now() + Duration::from_secs(u64::from(secs));
    let mut made = 0u64;
    while std::time::Instant::now() < until {
        for n in 0..64 {
            let child = dir.join(format!("c{n}"));
            if std::fs::create_dir(&child).is_ok() {
                made += 1;
            }
            let _ = std::fs::remove_dir(&child);
        }
    }
    println!(
        "{}",
        serde_json::json!({"pid": std::process::id(), "ok": true, "body": made.to_string(),
                           "eperm": 0, "moved": null})
    );
}

/// This process's id on the host: in a pid namespace of its own, `std::process::id` is the one
/// in there, while the host's procfs (still mounted) names it by its host pid.
fn host_pid() -> u32 {
    std::fs::read_link("/proc/self")
        .ok()
        .and_then(|link| link.to_str()?.parse().ok())
        .unwrap_or_else(std::process::id)
}

/// Enters new namespaces of the `kinds` listed (`pid`, `cgroup`), as a container runtime does;
/// for a pid namespace the caller continues as a forked child (pid 1 there) while this process
/// waits for it and exits as it did.
fn enter_namespaces(kinds: &str) {
    let mut flags = CloneFlags::empty();
    for kind in kinds.split(',') {
        flags |= match kind {
            "pid" => CloneFlags::CLONE_NEWPID,
            "cgroup" => CloneFlags::CLONE_NEWCGROUP,
            other => panic!("unknown namespace kind {other}"),
        };
    }
    nix::sched::unshare(flags).expect("unshare");
    if flags.contains(CloneFlags::CLONE_NEWPID) {
        // SAFETY: the client is single-threaded here; the child only goes on with `main`.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Parent { child } => {
                let code = match nix::sys::wait::waitpid(child, None).expect("waitpid") {
                    nix::sys::wait::WaitStatus::Exited(_, code) => code,
                    _ => 1,
                };
                std::process::exit(code);
            }
            nix::unistd::ForkResult::Child => {}
        }
    }
}

/// The errno of a failure; a timeout of our own (`connect_timeout`, a read timeout) counts as
/// `ETIMEDOUT`, so that the harness sees it failed.
fn errno_of(err: &io::Error) -> Option<i32> {
    err.raw_os_error().or(match err.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Some(libc::ETIMEDOUT),
        _ => None,
    })
}

/// Runs `action` once against `addr`; the routes that fork record the child's pid.
fn act_once(
    action: &str,
    addr: SocketAddr,
    drop_to: Option<(u32, u32)>,
    hold: &Hold,
    path: &str,
    child_pid: &mut Option<u32>,
) -> io::Result<String> {
    match action {
        "v1" => http::v1(addr, path),
        "v2" => http::v2(addr, path),
        "sdk-v2" => http::sdk_v2(addr, path),
        "keepalive" => http::keepalive(addr, path),
        "split-v2" => http::split(addr, path, true),
        "split-v1" => http::split(addr, path, false),
        "reconnect-nat" => http::reconnect_nat(addr, path),
        "long-v2" => http::long(addr, path, true),
        "long-v1" => http::long(addr, path, false),
        "pipelined" => http::pipelined(addr, path),
        "pipelined-padded" => http::pipelined_padded(addr, path),
        "fastopen-v1" => http::fastopen(addr, path, false),
        "fastopen-v1-rthdr" => http::fastopen(addr, path, true),
        "urgent-v2" => http::urgent_v2(addr, path),
        "imds" => imds_v2(addr),
        "held-imds" => held_imds(addr, hold),
        "reconnect-held" => reconnect_held(addr, hold),
        "held-v1" => request(
            held(addr, hold)?,
            addr,
            "GET /latest/meta-data/instance-id HTTP/1.1\r\n",
        ),
        "tcp" => TcpStream::connect_timeout(&addr, TIMEOUT).map(|_| String::new()),
        "udp" => udp_echo(addr),
        "nonblocking-connect" => routes::nonblocking_connect(addr),
        "fastopen-sendto" => routes::fastopen_sendto(addr),
        "fastopen-connect" => routes::fastopen_connect(addr),
        "connected-udp" => routes::connected_udp(addr),
        "connected-udp-thrice" => routes::connected_udp_thrice(addr),
        "connected-udp-ip-options" => routes::connected_udp_ip_options(addr),
        "sendto-on-connected-udp" => routes::sendto_on_connected_udp(addr),
        "sendmmsg" => routes::sendmmsg(addr),
        "io-uring-connect" => routes::io_uring_connect(addr, false),
        "io-uring-connect-async" => routes::io_uring_connect(addr, true),
        "io-uring-sendmsg" => routes::io_uring_sendmsg(addr),
        "thread-connect" => routes::thread_connect(addr),
        "raw-udp" => routes::raw_udp(addr),
        "raw-syn" => routes::raw_syn(addr),
        "ping-echo" => routes::ping_echo(addr),
        "udplite-connected" => routes::udplite_connected(addr),
        "mptcp-connect" => routes::mptcp_connect(addr),
        "connect-close" => routes::connect_close(addr),
        "bulk-send" => routes::bulk_send(addr),
        "until-allowed" => routes::until_allowed(addr),
        "child-connect" | "passed-socket" | "passed-connection" => {
            let (pid, result) = match action {
                "child-connect" => routes::child_connect(addr, drop_to),
                other => routes::passed_socket(
                    addr,
                    other == "passed-connection",
                    drop_to.expect("--drop-to"),
                ),
            };
            child_pid.replace(pid);
            result
        }
        other => panic!("unknown action {other}"),
    }
}

/// What repeating an action gave.
struct Repeated {
    /// The last attempt's result.
    result: io::Result<String>,
    /// Attempts that failed with `EPERM`.
    eperm: u32,
    /// Attempts that failed, whatever the error.
    failed: u32,
    /// Durations of the timed attempts.
    durations_ns: Vec<u64>,
    /// Wall time of all attempts after the warm-up.
    elapsed_ns: u64,
}

/// Runs `act` `warmup` times untimed, then `repeat` times, timing each after the first when
/// `timed`.
fn repeated(
    act: &mut dyn FnMut() -> io::Result<String>,
    repeat: u32,
    timed: bool,
    warmup: u32,
) -> Repeated {
    let is_eperm = |result: &io::Result<String>| {
        result
            .as_ref()
            .is_err_and(|err| err.raw_os_error() == Some(libc::EPERM))
    };
    for _ in 0..warmup {
        let _ = act();
    }
    let mut durations_ns: Vec<u64> = Vec::with_capacity(if timed { repeat as usize } else { 0 });
    let started = std::time::Instant::now();
    let (mut eperm, mut failed) = (0u32, 0u32);
    let mut result = act();
    for _ in 1..repeat {
        eperm += u32::from(is_eperm(&result));
        failed += u32::from(result.is_err());
        let start = std::time::Instant::now();
        result = act();
        if timed {
            durations_ns.push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
    }
    eperm += u32::from(is_eperm(&result));
    failed += u32::from(result.is_err());
    Repeated {
        result,
        eperm,
        failed,
        durations_ns,
        elapsed_ns: u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
    }
}

/// Enters the network namespace and cgroup, puts the hosts file in place, resolves the
/// address, becomes the uid/gid and, if asked, tries to move to another cgroup. Returns the
/// address and whether that move succeeded.
fn become_workload(
    options: &std::collections::HashMap<String, String>,
    host: &str,
    port: u16,
) -> (SocketAddr, Option<bool>) {
    let netns = std::fs::File::open(&options["netns"]).expect("open netns");
    setns(netns, CloneFlags::CLONE_NEWNET).expect("setns");
    std::fs::write(format!("{}/cgroup.procs", options["cgroup"]), "0").expect("join cgroup");
    if let Some(kinds) = options.get("namespaces") {
        enter_namespaces(kinds);
    }
    if let Some(hosts) = options.get("hosts") {
        // A private /etc/hosts: the name resolves through the C library like any other.
        use nix::mount::{MsFlags, mount};
        nix::sched::unshare(CloneFlags::CLONE_NEWNS).expect("unshare mounts");
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("private mounts");
        mount(
            Some(hosts.as_str()),
            "/etc/hosts",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind /etc/hosts");
    }
    // Any spelling the C library accepts: `169.254.169.254`, `2852039166`, `0xa9fea9fe`,
    // `169.254.43518`, or a host name.
    let addr: SocketAddr = match host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port),
        Err(_) => std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .expect("resolve")
            .next()
            .expect("an address"),
    };
    let gid = Gid::from_raw(options["gid"].parse().expect("gid"));
    setgroups(&[]).expect("setgroups");
    setgid(gid).expect("setgid");
    let uid = Uid::from_raw(options["uid"].parse().expect("uid"));
    if let Some(ids) = options.get("effective") {
        // `--effective EUID:EGID`: real ids UID and GID, effective (and file system) ids these,
        // as a setuid or setgid program has them.
        let (user, group) = ids.split_once(':').expect("--effective EUID:EGID");
        let user = Uid::from_raw(user.parse().expect("effective uid"));
        let group = Gid::from_raw(group.parse().expect("effective gid"));
        setresgid(gid, group, gid).expect("setresgid");
        setresuid(uid, user, uid).expect("setresuid");
    } else if options.contains_key("uids") || options.contains_key("alternate") {
        // Keep the saved uid 0, as a setuid-root program would, to switch real uids later.
        setresuid(uid, uid, Uid::from_raw(0)).expect("setresuid");
    } else {
        setuid(uid).expect("setuid");
    }
    // As the workload: try to move into another cgroup (a delegated subtree lets its owner).
    let moved = options
        .get("move-to")
        .map(|dir| std::fs::write(format!("{dir}/cgroup.procs"), "0").is_ok());
    (addr, moved)
}

/// The `IMDSv2` flow: a session token, then a metadata read with it.
fn imds_v2(addr: SocketAddr) -> io::Result<String> {
    let token = http(
        addr,
        "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n",
    )?;
    http(
        addr,
        &format!(
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\n"
        ),
    )
}

/// Where a held connection waits before its request: the gate `--hold-at DIR` of
/// `imds-guard-tests`' `Gate`. The client marks that it is there (a new file `DIR/ready-*`),
/// then waits until the test opens the gate (makes `DIR/open`): what the test does meanwhile (a
/// reload, the agent's start) comes after the connection's opening and before its request,
/// however loaded the machine.
struct Hold(Option<std::path::PathBuf>);

impl Hold {
    /// How long a client waits for its gate before it gives up.
    const PATIENCE: Duration = Duration::from_mins(1);

    fn wait(&self) -> io::Result<()> {
        let Some(dir) = &self.0 else {
            return Err(io::Error::other("a held route needs --hold-at DIR"));
        };
        // Unique among clients of other pid namespaces too, where each may be pid 1.
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        std::fs::File::create_new(dir.join(format!("ready-{}-{stamp}", std::process::id())))?;
        let deadline = std::time::Instant::now() + Self::PATIENCE;
        while !dir.join("open").exists() {
            if std::time::Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "the gate {} was not opened within {:?}",
                    dir.display(),
                    Self::PATIENCE
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

/// `IMDSv2` with the metadata request on a connection opened before the gate: what an
/// established connection gets when the policy changes meanwhile.
fn held_imds(addr: SocketAddr, hold: &Hold) -> io::Result<String> {
    let token = http(
        addr,
        "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n",
    )?;
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    hold.wait()?;
    request(
        stream,
        addr,
        &format!(
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\n"
        ),
    )
}

/// A connection to `addr`, opened before the gate, once the gate is open.
fn held(addr: SocketAddr, hold: &Hold) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    hold.wait()?;
    Ok(stream)
}

/// `IMDSv2` through `addr` (a NAT's way to IMDS), with the metadata request on a socket first
/// connected to IMDS itself, on a port nothing listens on (port 81, refused), then, once the
/// gate is open, connected again to `addr`: a socket whose verdict was remembered for IMDS
/// under the policy of its first connect, reused under the one in force at its second.
fn reconnect_held(addr: SocketAddr, hold: &Hold) -> io::Result<String> {
    let token = http(
        addr,
        "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n",
    )?;
    let imds = imds_of_family(addr);
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // Blocking: a refused blocking connect leaves the socket unconnected, ready for another
    // (a non-blocking one whose refusal `poll` saw fails the next with `ECONNABORTED`).
    match socket.connect(&SocketAddr::new(imds, 81).into()) {
        Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {}
        Err(err) => return Err(err),
        Ok(()) => return Err(io::Error::other("IMDS port 81 accepted the connection")),
    }
    hold.wait()?;
    socket.connect_timeout(&addr.into(), TIMEOUT)?;
    request(
        socket.into(),
        addr,
        &format!(
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\n"
        ),
    )
}

/// The IMDS address of `addr`'s family.
pub(crate) fn imds_of_family(addr: SocketAddr) -> IpAddr {
    if addr.is_ipv4() {
        imds_guard_tests::IMDS_V4.into()
    } else {
        imds_guard_tests::IMDS_V6.into()
    }
}

/// One request on a fresh connection; the body of a 200 response, or an error.
pub(crate) fn http(addr: SocketAddr, head: &str) -> io::Result<String> {
    request(TcpStream::connect_timeout(&addr, TIMEOUT)?, addr, head)
}

/// One request on `stream`; the body of a 200 response, or an error.
fn request(mut stream: TcpStream, addr: SocketAddr, head: &str) -> io::Result<String> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "{head}Host: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    http::body_of(&response)
}

/// An unconnected datagram (`sendto`) and its echo.
fn udp_echo(addr: SocketAddr) -> io::Result<String> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("bind");
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send_to(b"ping", addr)?;
    let mut buf = [0u8; 64];
    let (n, _) = socket.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
