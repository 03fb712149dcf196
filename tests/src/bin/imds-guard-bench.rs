//! `cargo xtask bench`: what imds-guard costs, against no firewall and against the iptables
//! owner-match rules it replaces, measured in one run on this machine (ratios against a
//! baseline of the same run: these machines are noisy).
//!
//! Everything happens in a network namespace and cgroups of its own (iptables rules exist only
//! in that namespace), removed at the end. Prints Markdown tables.

use std::{
    fmt::Write as _,
    io::Read as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramInfo};
use imds_guard::kernel::{maps, pins::PinDir};
use imds_guard_tests::{
    Agent, Client, ConfigFile, IMDS_V4, Pins, Sandbox, TestCgroup, Timings, process,
};

/// Connects per measurement, after `WARMUP` untimed ones.
const CONNECTS: u32 = 20_000;
const WARMUP: u32 = 2_000;
/// Repetitions of each measurement; the table shows the median repetition.
const RUNS: usize = 5;
const SINK_PORT: u16 = 9000;
const BULK_PORT: u16 = 9001;
const USER: u32 = 1000;
/// The tables, by the names `cargo xtask bench NAME...` selects them with.
const TABLES: [&str; 8] = [
    "kernel",
    "connect",
    "scaling",
    "throughput",
    "pipeline",
    "footprint",
    "churn",
    "http",
];
/// IMDSv2 flows (token, then metadata) per measurement of the message layer's table.
const HTTP_FLOWS: u32 = 1_000;
/// Interleaved pairs (connect hooks alone, then with the message layer) in that table.
const HTTP_PAIRS: usize = 11;
const RULE_COUNTS: [usize; 4] = [1, 100, 1_000, 10_000];

/// Set on SIGINT/SIGTERM: the measurements stop at the next check, by unwinding, so that every
/// namespace, cgroup, agent and pin is removed by its guard.
static ABORT: AtomicBool = AtomicBool::new(false);

extern "C" fn interrupted(_: libc::c_int) {
    ABORT.store(true, Ordering::Relaxed);
}

fn check_abort() {
    assert!(!ABORT.load(Ordering::Relaxed), "interrupted: cleaning up");
}

fn main() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the benchmarks load BPF programs and make a network namespace: run as root"
    );
    // A handler, not a blocked mask: the clients this starts must keep default signal handling
    // (exec resets handlers but keeps the mask).
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(interrupted),
        nix::sys::signal::SaFlags::SA_RESTART,
        nix::sys::signal::SigSet::empty(),
    );
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { nix::sys::signal::sigaction(signal, &action) }.expect("signal handler");
    }
    let unknown: Vec<String> = std::env::args()
        .skip(1)
        .filter(|name| !TABLES.contains(&name.as_str()))
        .collect();
    if !unknown.is_empty() {
        eprintln!(
            "imds-guard-bench: unknown table(s) {}; the tables are {}",
            unknown.join(", "),
            TABLES.join(", ")
        );
        std::process::exit(2);
    }
    if std::panic::catch_unwind(measure).is_err() {
        eprintln!("imds-guard-bench: stopped; everything it made is removed");
        std::process::exit(1);
    }
}

fn measure() {
    let sandbox = Sandbox::new();
    let attach = TestCgroup::new("bench");
    let workload = attach.child("workload");
    let stop = Arc::new(AtomicBool::new(false));
    start_sinks(&sandbox, &stop);
    // Tables named on the command line, or all; each printed as soon as it is measured.
    let chosen: Vec<String> = std::env::args().skip(1).collect();
    let section = |name: &str, measure: &dyn Fn(&mut String)| {
        if chosen.is_empty() || chosen.iter().any(|c| c == name) {
            let mut text = String::new();
            measure(&mut text);
            println!("{text}");
        }
    };
    println!("{}", machine());
    section("kernel", &|out| {
        kernel_costs(out, &sandbox, &attach, &workload);
    });
    section("connect", &|out| {
        connect_costs(out, &sandbox, &attach, &workload);
    });
    section("scaling", &|out| scaling(out, &sandbox, &attach, &workload));
    section("throughput", &|out| {
        throughput(out, &sandbox, &attach, &workload);
    });
    section("pipeline", &|out| {
        pipeline(out, &sandbox, &attach, &workload);
    });
    section("footprint", &|out| footprint(out, &attach));
    section("churn", &|out| churn(out, &sandbox, &attach));
    section("http", &|out| http_costs(out, &sandbox, &attach, &workload));
    stop.store(true, Ordering::Relaxed);
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            line.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    format!(
        "Machine: Linux {}, {} CPUs ({cpu}). {CONNECTS} timed connects per measurement after \
         {WARMUP} untimed; each figure is the median of {RUNS} runs.\n",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
    )
}

/// Listeners inside the namespace: one that accepts and closes (connect benchmarks, on every
/// address: the IMDS ones too), one that swallows a bulk transfer.
fn start_sinks(sandbox: &Sandbox, stop: &Arc<AtomicBool>) {
    let netns = sandbox.netns.clone();
    let (ready_send, ready) = std::sync::mpsc::channel();
    let stop = Arc::clone(stop);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&netns).expect("netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let sink = listen(SINK_PORT);
        let bulk = listen(BULK_PORT);
        ready_send.send(()).expect("ready");
        // A second acceptor: a full accept queue drops SYNs, and a dropped SYN costs the
        // client a one-second retransmission, which would be measured as the hook's cost.
        let second = sink.try_clone().expect("listener");
        let second_stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            for stream in second.incoming() {
                if second_stop.load(Ordering::Relaxed) {
                    break;
                }
                drop(stream);
            }
        });
        std::thread::spawn(move || {
            for stream in bulk.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let mut buf = vec![0u8; 1 << 20];
                    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                });
            }
        });
        for stream in sink.incoming() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            drop(stream);
        }
    });
    ready.recv().expect("sinks ready");
}

/// A dual-stack listener on every address of the namespace, with a deep accept queue.
fn listen(port: u16) -> TcpListener {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None).expect("socket");
    socket.set_only_v6(false).expect("dual stack");
    socket.set_reuse_address(true).expect("reuse");
    let addr: SocketAddr = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port);
    socket.bind(&addr.into()).expect("bind");
    socket.listen(4096).expect("listen");
    socket.into()
}

/// `connect()`+`close()` timings from `cgroup` as `uid` to `addr`, median of `RUNS` runs.
fn connects(
    sandbox: &Sandbox,
    cgroup: &TestCgroup,
    uid: u32,
    addr: SocketAddr,
    count: u32,
) -> Timings {
    let mut runs: Vec<Timings> = (0..RUNS)
        .map(|_| {
            check_abort();
            Client::new(sandbox, cgroup, uid, uid)
                .repeat(count)
                .timings(WARMUP.min(count))
                .route("connect-close", addr.ip(), addr.port())
                .timings
                .expect("timings")
        })
        .collect();
    runs.sort_by_key(|t| t.median_ns);
    runs[RUNS / 2]
}

fn sink(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, SINK_PORT)
}

fn loopback() -> SocketAddr {
    sink(Ipv4Addr::LOCALHOST.into())
}

fn micros(ns: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
    let us = ns as f64 / 1000.0;
    format!("{us:.2} µs")
}

fn ratio(value: u64, base: u64) -> String {
    if base == 0 {
        return "-".into();
    }
    #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
    let r = value as f64 / base as f64;
    format!("{r:.3}")
}

fn spread(t: &Timings) -> String {
    format!(
        "{} ({}–{})",
        micros(t.median_ns),
        micros(t.p10_ns),
        micros(t.p90_ns)
    )
}

/// The agent's default fold window, in seconds: what production runs with.
const DEFAULT_WINDOW: &str = "10";

/// An agent attached at `attach` with the config lines `extra`, folding repeats within `window`
/// seconds (`DEFAULT_WINDOW`, or "0" to report every attempt).
fn agent(attach: &TestCgroup, pins: &Pins, extra: &str, window: &str) -> (Agent, ConfigFile) {
    agent_started_by(Agent::start, attach, pins, extra, window)
}

/// As [`agent`], started by `start` ([`Agent::start`] or another way of the harness).
fn agent_started_by(
    start: fn(&[&str]) -> Agent,
    attach: &TestCgroup,
    pins: &Pins,
    extra: &str,
    window: &str,
) -> (Agent, ConfigFile) {
    let config = ConfigFile::new(&format!("cgroup = \"{}\"\n{extra}", attach.path));
    let agent = start(&[
        "--config",
        &config.arg(),
        "--pin-dir",
        &pins.arg(),
        "--aggregate-window",
        window,
    ]);
    (agent, config)
}

/// Enables the kernel's run-time statistics for as long as the returned descriptor lives
/// (`BPF_ENABLE_STATS`; the sysctl is never touched).
fn enable_stats() -> std::os::fd::OwnedFd {
    #[repr(C)]
    struct EnableStats {
        kind: u32,
    }
    const BPF_ENABLE_STATS: libc::c_long = 32;
    let mut attr = EnableStats { kind: 0 }; // BPF_STATS_RUN_TIME
    // SAFETY: a valid attr for BPF_ENABLE_STATS.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            std::ptr::from_mut(&mut attr),
            size_of::<EnableStats>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_ENABLE_STATS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor the kernel just returned.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(i32::try_from(fd).expect("fd")) }
}

/// (run time ns, run count) of the program `id`.
fn run_stats(id: u32) -> (u64, u64) {
    aya::programs::loaded_programs()
        .flatten()
        .find(|info: &ProgramInfo| info.id() == id)
        .map_or((0, 0), |info| {
            (
                u64::try_from(info.run_time().as_nanos()).unwrap_or(0),
                info.run_count(),
            )
        })
}

/// The id of the agent's program on `hook`, from `status --json`.
fn program_id(pins: &Pins, hook: &str) -> u32 {
    let out = imds_guard_tests::imds_guard(&["status", "--json", "--pin-dir", &pins.arg()]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status");
    let id = status["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .find(|p| p["hook"] == hook)
        .and_then(|p| p["program"]["id"].as_u64())
        .expect("program id");
    u32::try_from(id).expect("id")
}

/// The id of the newest loaded program named `name`: the message program, which the agent
/// attaches to its socket map, not through a link `status` lists.
fn newest_program(name: &str) -> u32 {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|program| program.name_as_str() == Some(name))
        .map(|program| program.id())
        .max()
        .unwrap_or_else(|| panic!("no program {name} loaded"))
}

/// Table 0: nanoseconds per program run, from the kernel's statistics, minus what a program
/// that does nothing costs under the same statistics.
fn kernel_costs(
    report: &mut String,
    sandbox: &Sandbox,
    attach: &TestCgroup,
    workload: &TestCgroup,
) {
    let pins = Pins::new();
    let (mut agent, config) = agent(attach, &pins, "", DEFAULT_WINDOW);
    let mut ebpf = aya::Ebpf::load(imds_guard::kernel::OBJECT).expect("object");
    let noop: &mut CgroupSockAddr = ebpf
        .program_mut("bench_noop4")
        .expect("bench_noop4")
        .try_into()
        .expect("type");
    noop.load().expect("load noop");
    let cgroup = std::fs::File::open(&attach.dir).expect("cgroup");
    let _link = noop
        .attach(&cgroup, CgroupAttachMode::Single)
        .expect("attach noop");
    let noop_id = noop.info().expect("noop info").id();
    let _stats = enable_stats();
    // The last case restarts the agent without folding: every attempt queues its event.
    let cases: [(&str, u32, SocketAddr, &str); 4] = [
        (
            "not protected (127.0.0.1)",
            USER,
            loopback(),
            DEFAULT_WINDOW,
        ),
        (
            "IMDS, allowed (uid 0)",
            0,
            sink(IMDS_V4.into()),
            DEFAULT_WINDOW,
        ),
        (
            "IMDS, denied, repeats folded (the default)",
            USER,
            sink(IMDS_V4.into()),
            DEFAULT_WINDOW,
        ),
        (
            "IMDS, denied, each with its event (`--aggregate-window 0`)",
            USER,
            sink(IMDS_V4.into()),
            "0",
        ),
    ];
    let mut config = config;
    let _ = writeln!(
        report,
        "## 0. In the kernel: `connect4` per run\n\n\
         From `BPF_ENABLE_STATS` (run_time_ns / run_cnt), minus a program that returns at once \
         (`bench_noop4`, attached beside it) under the same statistics.\n\n\
         | destination | connect4 | no-op program | connect4 − no-op | target |\n|---|---|---|---|---|"
    );
    for ((name, uid, addr, window), target) in
        cases
            .into_iter()
            .zip(["≤ 30 ns", "≤ 150 ns", "≤ 1 µs", "≤ 1 µs"])
    {
        if window != DEFAULT_WINDOW {
            assert!(agent.stop().success());
            (agent, config) = self::agent(attach, &pins, "", window);
        }
        let ours = program_id(&pins, "connect4");
        let (ours_before, noop_before) = (run_stats(ours), run_stats(noop_id));
        let _ = connects(sandbox, workload, uid, addr, CONNECTS);
        let (ours_after, noop_after) = (run_stats(ours), run_stats(noop_id));
        let per_run = |after: (u64, u64), before: (u64, u64)| {
            (after.0 - before.0)
                .checked_div(after.1 - before.1)
                .unwrap_or(0)
        };
        let (mine, baseline) = (
            per_run(ours_after, ours_before),
            per_run(noop_after, noop_before),
        );
        let _ = writeln!(
            report,
            "| {name} | {mine} ns | {baseline} ns | {} ns | {target} |",
            mine.saturating_sub(baseline)
        );
    }
    drop((agent, config));
    report.push('\n');
}

/// `ip netns exec NAME iptables-restore` with `rules` (and ip6tables with `rules6`).
fn iptables(sandbox: &Sandbox, rules: &str, rules6: &str) {
    for (program, text) in [("iptables-restore", rules), ("ip6tables-restore", rules6)] {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &sandbox.name, program])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("iptables-restore (cargo xtask bench installs iptables)");
        std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), text.as_bytes())
            .expect("rules");
        assert!(
            child.wait().expect("wait").success(),
            "{program} refused the rules"
        );
    }
}

/// The owner-match equivalent of allowing root and `allowed_uids`: an ACCEPT rule per uid, then
/// DROP for packets of every other local socket. Root's rule comes first: in this sandbox the
/// mock IMDS (root's) answers from the same namespace, and its replies must not pay for the
/// rule list (on an instance they come from outside, through INPUT).
fn iptables_owner_rules(allowed_uids: &[u32]) -> (String, String) {
    let table = |dst: &str| {
        let mut text = String::from("*filter\n:INPUT ACCEPT\n:FORWARD ACCEPT\n:OUTPUT ACCEPT\n");
        let _ = writeln!(text, "-A OUTPUT -d {dst} -m owner --uid-owner 0 -j ACCEPT");
        for uid in allowed_uids.iter().filter(|&&uid| uid != 0) {
            let _ = writeln!(
                text,
                "-A OUTPUT -d {dst} -m owner --uid-owner {uid} -j ACCEPT"
            );
        }
        let _ = writeln!(
            text,
            "-A OUTPUT -d {dst} -m owner --socket-exists -j DROP\nCOMMIT"
        );
        text
    };
    (table("169.254.169.254/32"), table("fd00:ec2::254/128"))
}

fn iptables_flush(sandbox: &Sandbox) {
    let empty = "*filter\n:INPUT ACCEPT\n:FORWARD ACCEPT\n:OUTPUT ACCEPT\nCOMMIT\n";
    iptables(sandbox, empty, empty);
}

/// Table 1: a loopback `connect()` + `close()`, and a denied IMDS connect.
fn connect_costs(
    report: &mut String,
    sandbox: &Sandbox,
    attach: &TestCgroup,
    workload: &TestCgroup,
) {
    let none = connects(sandbox, workload, USER, loopback(), CONNECTS);
    let none6 = connects(
        sandbox,
        workload,
        USER,
        sink("::1".parse().expect("::1")),
        CONNECTS,
    );
    let pins = Pins::new();
    let (agent, config) = agent(attach, &pins, "", DEFAULT_WINDOW);
    let ours = connects(sandbox, workload, USER, loopback(), CONNECTS);
    let ours6 = connects(
        sandbox,
        workload,
        USER,
        sink("::1".parse().expect("::1")),
        CONNECTS,
    );
    let denied = connects(sandbox, workload, USER, sink(IMDS_V4.into()), CONNECTS);
    drop((agent, config, pins));
    let (rules, rules6) = iptables_owner_rules(&[0]);
    iptables(sandbox, &rules, &rules6);
    let theirs = connects(sandbox, workload, USER, loopback(), CONNECTS);
    let theirs6 = connects(
        sandbox,
        workload,
        USER,
        sink("::1".parse().expect("::1")),
        CONNECTS,
    );
    let started = Instant::now();
    let dropped = Client::new(sandbox, workload, USER, USER).tcp(IMDS_V4, SINK_PORT);
    let waited = started.elapsed();
    iptables_flush(sandbox);
    let _ = writeln!(
        report,
        "## 1. connect()+close() to a loopback listener (not protected)\n\n\
         Median (10th–90th percentile) per connect; ratio of medians against no firewall.\n\n\
         | | IPv4 | ratio | IPv6 | ratio |\n|---|---|---|---|---|\n\
         | no firewall | {} | 1.000 | {} | 1.000 |\n\
         | imds-guard (enforce) | {} | {} | {} | {} |\n\
         | iptables + ip6tables owner match | {} | {} | {} | {} |\n\n\
         A denied IMDS connect with imds-guard: {} (fails with EPERM). With the iptables DROP rule \
         it does not fail: {}.\n",
        spread(&none),
        spread(&none6),
        spread(&ours),
        ratio(ours.median_ns, none.median_ns),
        spread(&ours6),
        ratio(ours6.median_ns, none6.median_ns),
        spread(&theirs),
        ratio(theirs.median_ns, none.median_ns),
        spread(&theirs6),
        ratio(theirs6.median_ns, none6.median_ns),
        spread(&denied),
        if dropped.detail.contains("timed out") || dropped.errno == Some(libc::ETIMEDOUT) {
            format!(
                "the SYN is dropped and the client waits until its own 3 s timeout \
                 ({:.1} s: \"{}\"); without one, the kernel retries for about 2 minutes",
                waited.as_secs_f64(),
                dropped.detail
            )
        } else {
            format!("unexpected: {dropped:?}")
        },
    );
}

/// Table 7: an IMDSv2 request (token, then metadata, each on its own connection) through the
/// message layer (IMDS port 80: `sock_ops` follows the connection, `sk_msg` reads each write)
/// against the same flow the connect hooks judge alone (port 8080, which the message layer does
/// not follow), interleaved pair by pair; and what `sock_ops` costs every other TCP connection
/// of the attach cgroup.
fn http_costs(report: &mut String, sandbox: &Sandbox, attach: &TestCgroup, workload: &TestCgroup) {
    let pins = Pins::new();
    let (agent, config) = agent(
        attach,
        &pins,
        &format!("[[allow]]\nname = \"bench\"\nuid = {USER}\nimds = \"v2\"\n"),
        DEFAULT_WINDOW,
    );
    let flows = |port: u16| {
        check_abort();
        Client::new(sandbox, workload, USER, USER)
            .repeat(HTTP_FLOWS)
            .timings(HTTP_FLOWS / 10)
            .route("v2", IMDS_V4, port)
            .timings
            .expect("timings")
    };
    let _stats = enable_stats();
    let (http_msg, sock_ops) = (newest_program("http_msg"), program_id(&pins, "sock_ops"));
    let before = run_stats(http_msg);
    let mut pairs: Vec<(Timings, Timings)> =
        (0..HTTP_PAIRS).map(|_| (flows(8080), flows(80))).collect();
    let after = run_stats(http_msg);
    // Every flow of every port-80 measurement, its untimed warm-up included.
    let followed =
        u64::try_from(HTTP_PAIRS).expect("pairs") * u64::from(HTTP_FLOWS + HTTP_FLOWS / 10);
    let message_runs = after.1 - before.1;
    let message_ns = (after.0 - before.0).checked_div(message_runs).unwrap_or(0);
    let ratios: Vec<f64> = pairs
        .iter()
        .map(|(hooks, read)| {
            #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
            let r = read.median_ns as f64 / hooks.median_ns as f64;
            r
        })
        .collect();
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    pairs.sort_by_key(|(_, read)| read.median_ns);
    let (hooks, read) = pairs[pairs.len() / 2];
    // What `sock_ops` costs a connection it does not follow: loopback connects.
    let before = run_stats(sock_ops);
    Client::new(sandbox, workload, USER, USER)
        .repeat(CONNECTS)
        .route("connect-close", Ipv4Addr::LOCALHOST, SINK_PORT)
        .assert_ok("");
    let after = run_stats(sock_ops);
    let runs = after.1 - before.1;
    let per_run = (after.0 - before.0).checked_div(runs).unwrap_or(0);
    drop((agent, config, pins));
    let _ = writeln!(
        report,
        "## 7. The message layer: an IMDSv2 request\n\n\
         Token then metadata (two connections), as uid {USER} under a rule with `imds = \"v2\"`; \
         {HTTP_PAIRS} interleaved pairs of {HTTP_FLOWS} flows. Port 8080 is judged by the \
         connect hooks alone, port 80 also by `sock_ops` and `sk_msg` (every write read).\n\n\
         | | per flow (median pair) | ratio to connect hooks alone |\n|---|---|---|\n\
         | connect hooks alone (port 8080) | {} | 1.000 |\n\
         | with the message layer (port 80) | {} | {:.3} (pairs: {:.3}–{:.3}) |\n\n\
         In the kernel (statistics on): `http_msg` ran {:.1} times per flow (8 bytes a run), \
         {message_ns} ns per run. `sock_ops` on connections it does not follow (loopback \
         `connect()`+`close()`): {per_run} ns per run, {:.1} runs per connection.\n",
        spread(&hooks),
        spread(&read),
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1],
        {
            #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
            let r = message_runs as f64 / followed as f64;
            r
        },
        {
            #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
            let r = runs as f64 / f64::from(CONNECTS);
            r
        },
    );
}

/// Table 2: policies of growing size.
fn scaling(report: &mut String, sandbox: &Sandbox, attach: &TestCgroup, workload: &TestCgroup) {
    let _ = writeln!(
        report,
        "## 2. Scaling with the number of rules\n\n\
         imds-guard: N allow rules, half uids (10000, 10001, ...) and half cgroup rules (so the \
         kernel walks the cgroup ancestry); iptables: N `--uid-owner` ACCEPT rules before the \
         DROP. The matching workload is the uid of the last uid rule. Ratios against the same \
         column at N = 1.\n\n\
         | N | imds-guard: not protected | imds-guard: IMDS, matching | imds-guard: IMDS, not matching (denied) | iptables: not protected | iptables: IMDS, matching |\n|---|---|---|---|---|---|"
    );
    let count = CONNECTS / 4;
    let mut base: Option<[u64; 5]> = None;
    for n in RULE_COUNTS {
        let uids: Vec<u32> = (0..n.div_ceil(2))
            .map(|i| 10_000 + u32::try_from(i).expect("n"))
            .collect();
        let mut extra = format!(
            "allow_uid = [{}]\n",
            uids.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        for i in 0..n / 2 {
            let _ = writeln!(extra, "[[allow]]\ncgroup = \"{}/svc-{i}\"", attach.path);
        }
        let matching = *uids.last().expect("a uid");
        let pins = Pins::new();
        let (agent, config) = agent(attach, &pins, &extra, DEFAULT_WINDOW);
        let figures_ours = [
            connects(sandbox, workload, USER, loopback(), count),
            connects(sandbox, workload, matching, sink(IMDS_V4.into()), count),
            connects(sandbox, workload, USER, sink(IMDS_V4.into()), count),
        ];
        drop((agent, config, pins));
        let iptables_uids: Vec<u32> = (0..n)
            .map(|i| 10_000 + u32::try_from(i).expect("n"))
            .collect();
        let (rules, rules6) = iptables_owner_rules(&iptables_uids);
        iptables(sandbox, &rules, &rules6);
        let theirs_match = *iptables_uids.last().expect("a uid");
        let figures_theirs = [
            connects(sandbox, workload, USER, loopback(), count),
            connects(sandbox, workload, theirs_match, sink(IMDS_V4.into()), count),
        ];
        iptables_flush(sandbox);
        let medians = [
            figures_ours[0].median_ns,
            figures_ours[1].median_ns,
            figures_ours[2].median_ns,
            figures_theirs[0].median_ns,
            figures_theirs[1].median_ns,
        ];
        let base = *base.get_or_insert(medians);
        let cell = |i: usize| format!("{} ({})", micros(medians[i]), ratio(medians[i], base[i]));
        let _ = writeln!(
            report,
            "| {n} | {} | {} | {} | {} | {} |",
            cell(0),
            cell(1),
            cell(2),
            cell(3),
            cell(4)
        );
    }
    report.push('\n');
}

/// Table 3: an established flow, 1 GiB over loopback.
fn throughput(report: &mut String, sandbox: &Sandbox, attach: &TestCgroup, workload: &TestCgroup) {
    let run = || {
        let mut rates: Vec<f64> = (0..RUNS)
            .map(|_| {
                check_abort();
                let outcome = Client::new(sandbox, workload, USER, USER).route(
                    "bulk-send",
                    Ipv4Addr::LOCALHOST,
                    BULK_PORT,
                );
                outcome.detail.parse().expect("Gbit/s")
            })
            .collect();
        rates.sort_by(f64::total_cmp);
        rates[RUNS / 2]
    };
    let none = run();
    let pins = Pins::new();
    let (agent, config) = agent(attach, &pins, "", DEFAULT_WINDOW);
    let egress = program_id(&pins, "egress");
    let stats = enable_stats();
    let before = run_stats(egress);
    let ours = run();
    let after = run_stats(egress);
    drop(stats);
    drop((agent, config, pins));
    let (rules, rules6) = iptables_owner_rules(&[0]);
    iptables(sandbox, &rules, &rules6);
    let theirs = run();
    iptables_flush(sandbox);
    let per_packet = (after.0 - before.0)
        .checked_div(after.1 - before.1)
        .unwrap_or(0);
    let _ = writeln!(
        report,
        "## 3. Established flow: 1 GiB over loopback TCP\n\n\
         | | Gbit/s (median of {RUNS}) | ratio |\n|---|---|---|\n\
         | no firewall | {none:.2} | 1.000 |\n\
         | imds-guard | {ours:.2} | {:.3} |\n\
         | iptables owner match | {theirs:.2} | {:.3} |\n\n\
         imds-guard's packet hook (`egress`, which reads every packet's destination) ran {} times during its transfers, \
         {per_packet} ns per packet (statistics enabled, which slows it).\n",
        ours / none,
        theirs / none,
        after.1 - before.1,
    );
}

/// Table 4: floods of denied connects; is every attempt reported, aggregated or counted lost,
/// and what does it cost the agent?
fn pipeline(report: &mut String, sandbox: &Sandbox, attach: &TestCgroup, workload: &TestCgroup) {
    const FLOOD: u32 = 100_000;
    const WORKLOADS: u32 = 20_000;
    let _ = writeln!(
        report,
        "## 4. Event pipeline\n\n\
         Floods of denied connects, as fast as one client makes them. Every attempt is reported \
         at once, reported as a repeat in an aggregate event, or counted lost by the kernel \
         (ring full); the figures are the agent's own, logged when it stops. Its events go to \
         /dev/null, so this measures the agent, not what reads its output (journald, in \
         production). Agent CPU is the CPU time it used until it had caught up, per second of \
         flood.\n\n\
         | flood | attempts/s | reported | aggregated | lost | sum | agent CPU | agent peak RSS |\n\
         |---|---|---|---|---|---|---|---|"
    );
    let one = |client: Client<'_>| client.route("connect-close", IMDS_V4, SINK_PORT);
    flood(
        report,
        (attach, "0"),
        &format!("{FLOOD} by one workload, folding off (`--aggregate-window 0`)"),
        FLOOD,
        || {
            one(Client::new(sandbox, workload, USER, USER)
                .repeat(FLOOD)
                .timings(0))
        },
    );
    flood(
        report,
        (attach, DEFAULT_WINDOW),
        &format!("{FLOOD} by one workload over 1,000 ports (the default: folded)"),
        FLOOD,
        || {
            one(Client::new(sandbox, workload, USER, USER)
                .repeat(FLOOD)
                .ports(1000)
                .timings(0))
        },
    );
    flood(
        report,
        (attach, DEFAULT_WINDOW),
        &format!("{WORKLOADS} by {WORKLOADS} workloads (one uid each: nothing to fold)"),
        WORKLOADS,
        || {
            one(Client::new(sandbox, workload, 100_000, 100_000)
                .repeat(WORKLOADS)
                .uids(WORKLOADS)
                .timings(0))
        },
    );
    report.push('\n');
}

/// One row of table 4: a fresh agent (at `attach`, folding window), `attempts` made by `run`.
fn flood(
    report: &mut String,
    (attach, window): (&TestCgroup, &str),
    label: &str,
    attempts: u32,
    run: impl FnOnce() -> imds_guard_tests::Outcome,
) {
    let pins = Pins::new();
    // Its events go to /dev/null: this measures the agent, not whatever reads its output (in
    // production, journald).
    let (mut agent, config) =
        agent_started_by(Agent::start_discarding_events, attach, &pins, "", window);
    let cpu_before = process::cpu_ticks(agent.pid());
    let outcome = run();
    assert_eq!(outcome.eperm, attempts, "every attempt denied");
    let elapsed = Duration::from_nanos(outcome.timings.expect("timings").elapsed_ns);
    // The agent reports all it has when it stops: wait until it has caught up first, so its
    // CPU time is the flood's.
    let started = Instant::now();
    while started.elapsed() < Duration::from_mins(2) {
        let before = process::cpu_ticks(agent.pid());
        std::thread::sleep(Duration::from_millis(300));
        if process::cpu_ticks(agent.pid()) == before {
            break;
        }
    }
    let cpu_after = process::cpu_ticks(agent.pid());
    let peak_kib = process::status_kib(agent.pid(), "VmHWM:").unwrap_or(0);
    assert!(agent.stop().success());
    drop((config, pins));
    let (reported, aggregated, lost) = (
        agent.final_figure("events_reported"),
        agent.final_figure("events_aggregated"),
        agent.final_figure("events_lost"),
    );
    #[expect(clippy::cast_precision_loss, reason = "figures for people")]
    let (rate, cpu) = (
        f64::from(attempts) / elapsed.as_secs_f64(),
        (cpu_after - cpu_before) as f64 / 100.0 / elapsed.as_secs_f64() * 100.0,
    );
    let _ = writeln!(
        report,
        "| {label} | {rate:.0} | {reported} | {aggregated} | {lost} | {} of {attempts} | \
         {cpu:.0}% | {} MiB |",
        reported + aggregated + lost,
        peak_kib / 1024,
    );
}

/// Table 6: how long a new cgroup waits for its own rules (the agent's entry in the kernel's
/// map), while quiet, while an unprivileged user makes and removes cgroups in its own delegated
/// subtree as fast as it can, and while root does the same elsewhere below the attach point
/// (which overflows inotify's queue: the agent then marks newer cgroups as unseen and rescans).
/// Interleaved: one sample of each, `SAMPLES` times.
fn churn(report: &mut String, sandbox: &Sandbox, attach: &TestCgroup) {
    const SAMPLES: usize = 10;
    const HOSTILE_UID: u32 = 4243;
    const STORM_SECS: u16 = 2;
    let pins = Pins::new();
    let extra = format!(
        "[[allow]]\nname = \"host root\"\nuid = 0\n\
         [[allow]]\nname = \"apps\"\ncgroup = \"{}/apps/app-*\"\nuid = 4242\n",
        attach.path
    );
    let (agent, _config) = agent(attach, &pins, &extra, DEFAULT_WINDOW);
    let apps = attach.child("apps");
    let (session, user_owned) = delegated_to(attach, HOSTILE_UID);
    let root_owned = attach.child("churn");
    let mut entries = CgroupEntries::open(&pins);
    let storms: [(&str, Option<Storm>); 3] = [
        ("quiet", None),
        (
            "an unprivileged user's storm in its own subtree",
            Some((HOSTILE_UID, &session, &user_owned)),
        ),
        (
            "root's storm elsewhere",
            Some((0, &root_owned, &root_owned)),
        ),
    ];
    let mut waits: Vec<Vec<u64>> = vec![Vec::new(); storms.len()];
    let mut made = vec![0u64; storms.len()];
    let mut ticks = vec![0u64; storms.len()];
    let mut rescans = vec![0usize; storms.len()];
    for n in 0..SAMPLES {
        for (index, (_, storm)) in storms.iter().enumerate() {
            check_abort();
            let before = (process::cpu_ticks(agent.pid()), overflows(&agent));
            std::thread::scope(|scope| {
                let flood = storm.map(|(uid, runs_in, makes_in)| {
                    scope.spawn(move || {
                        Client::new(sandbox, runs_in, uid, uid).route_to_host(
                            "churn",
                            &makes_in.dir.to_string_lossy(),
                            STORM_SECS,
                        )
                    })
                });
                if flood.is_some() {
                    std::thread::sleep(Duration::from_millis(300));
                }
                let made_ns = monotonic_ns();
                let cgroup = apps.child(&format!("app-{n}-{index}"));
                waits[index].push(entries.wait_for(cgroup.id).saturating_sub(made_ns));
                if let Some(flood) = flood {
                    let outcome = flood.join().expect("storm");
                    made[index] += outcome.detail.parse::<u64>().unwrap_or(0);
                }
            });
            ticks[index] += process::cpu_ticks(agent.pid()) - before.0;
            rescans[index] += overflows(&agent) - before.1;
        }
    }
    let _ = writeln!(
        report,
        "## 6. A new cgroup under cgroup churn\n\n\
         From `mkdir` of a cgroup a rule allows to its entry in the kernel's map (polled every \
         20 µs), {SAMPLES} samples each, interleaved; each storm makes and removes cgroups as \
         fast as one process can, for {STORM_SECS} s around its sample. A container needs no \
         such wait: its namespaces are read by the kernel from its first instant.\n\n\
         | | median wait | longest wait | cgroups made per second | agent CPU | rescans after lost notifications |\n\
         |---|---|---|---|---|---|"
    );
    let seconds = SAMPLES as u64 * u64::from(STORM_SECS);
    for (index, (label, storm)) in storms.iter().enumerate() {
        let samples = &mut waits[index];
        samples.sort_unstable();
        #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
        let cpu = ticks[index] as f64 / (seconds as f64 * 100.0) * 100.0;
        let (rate, cpu) = if storm.is_some() {
            ((made[index] / seconds).to_string(), format!("{cpu:.0} %"))
        } else {
            ("—".to_owned(), "—".to_owned())
        };
        let _ = writeln!(
            report,
            "| {label} | {} | {} | {rate} | {cpu} | {} |",
            micros(samples[SAMPLES / 2]),
            micros(samples[SAMPLES - 1]),
            rescans[index]
        );
    }
    let _ = writeln!(report);
}

/// A storm of cgroup changes: the uid it runs as, the cgroup it runs in, the one it makes and
/// removes cgroups in.
type Storm<'a> = (u32, &'a TestCgroup, &'a TestCgroup);

/// How often the agent has said the kernel dropped cgroup notifications.
fn overflows(agent: &Agent) -> usize {
    agent
        .stderr()
        .matches("cgroup change notifications were dropped by the kernel")
        .count()
}

/// The agent's pinned maps, read directly.
struct CgroupEntries(maps::Pinned);

impl CgroupEntries {
    fn open(pins: &Pins) -> Self {
        Self(maps::Pinned::new(&PinDir::new(pins.dir())))
    }

    /// Waits until cgroup `id` has an entry (of either generation); returns when it was first
    /// seen (`CLOCK_MONOTONIC` ns).
    fn wait_for(&mut self, id: u64) -> u64 {
        let start = Instant::now();
        loop {
            let found = [0, 1].into_iter().any(|generation| {
                maps::cgroup_ruleset(&mut self.0, generation, id)
                    .expect("CGROUP_RULESETS")
                    .is_some()
            });
            if found {
                return monotonic_ns();
            }
            assert!(
                start.elapsed() < Duration::from_mins(1),
                "cgroup {id} got no entry within a minute"
            );
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

/// A user's manager below `attach`, delegated to `uid` as systemd does it (`Delegate=yes`):
/// the cgroup its processes run in, and one it owns and may make cgroups in.
fn delegated_to(attach: &TestCgroup, uid: u32) -> (TestCgroup, TestCgroup) {
    let manager = attach
        .child("user.slice")
        .child(&format!("user-{uid}.slice"))
        .child(&format!("user@{uid}.service"));
    let session = manager.child("init.scope");
    let owned = manager.child("storm");
    let (user, group) = (
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(uid)),
    );
    for path in [
        owned.dir.clone(),
        owned.dir.join("cgroup.procs"),
        owned.dir.join("cgroup.subtree_control"),
        owned.dir.join("cgroup.threads"),
    ] {
        nix::unistd::chown(&path, user, group).expect("delegate the cgroup");
    }
    (session, owned)
}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

/// Table 5: start to enforcement, and memory at rest.
fn footprint(report: &mut String, attach: &TestCgroup) {
    let mut starts = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..RUNS {
        let pins = Pins::new();
        let start = Instant::now();
        let (agent, _config) = agent(attach, &pins, "", DEFAULT_WINDOW);
        starts.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(500));
        rss.push(process::status_kib(agent.pid(), "VmRSS:").unwrap_or(0));
    }
    starts.sort();
    rss.sort_unstable();
    let _ = writeln!(
        report,
        "## 5. Footprint\n\n\
         Start to READY=1 (programs attached, policy in force): {} ms (median of {RUNS}; \
         {}–{} ms). Resident memory idle: {:.1} MiB. Target: under 200 ms and 20 MB.\n",
        starts[RUNS / 2].as_millis(),
        starts[0].as_millis(),
        starts[RUNS - 1].as_millis(),
        {
            #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
            let mib = rss[RUNS / 2] as f64 / 1024.0;
            mib
        },
    );
}
