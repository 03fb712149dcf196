//! What every table uses: the sandbox's listeners, agents, iptables rules, the kernel's
//! statistics, programs attached by the bench itself, single measurements.

use std::{
    fmt::Write as _,
    io::Read as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use aya::programs::{CgroupAttachMode, ProgramInfo};
use imds_guard_tests::{
    Agent, BULK_BLOCK_BYTES, Client, ConfigFile, Pins, Sandbox, TestCgroup, Timings,
};

use crate::{BULK_BLOCKS_PORT, BULK_PORT, RUNS, SINK_PORT, USER, WARMUP, check_abort};

/// Listeners inside the namespace: one that accepts and closes (connect benchmarks, on every
/// address: the IMDS ones too), one that swallows a bulk transfer.
pub fn start_sinks(sandbox: &Sandbox, stop: &Arc<AtomicBool>) {
    let netns = sandbox.netns.clone();
    let (ready_send, ready) = std::sync::mpsc::channel();
    let stop = Arc::clone(stop);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&netns).expect("netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let sink = listen(SINK_PORT);
        let bulk = listen(BULK_PORT);
        let blocks = listen(BULK_BLOCKS_PORT);
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
        std::thread::spawn(move || {
            for stream in blocks.incoming().flatten() {
                std::thread::spawn(move || acknowledge_blocks(stream));
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

/// Reads `stream` to its end, acknowledging each [`BULK_BLOCK_BYTES`] with a byte (the other
/// end of `imds-client`'s `bulk-rounds`, which times a block until its acknowledgement).
fn acknowledge_blocks(mut stream: std::net::TcpStream) {
    use std::io::Write as _;
    let mut buf = vec![0u8; 1 << 20];
    let mut unacknowledged = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => unacknowledged += n,
        }
        while unacknowledged >= BULK_BLOCK_BYTES {
            unacknowledged -= BULK_BLOCK_BYTES;
            if stream.write_all(&[1]).is_err() {
                return;
            }
        }
    }
}

/// A dual-stack listener on every address of the namespace, with a deep accept queue.
pub fn listen(port: u16) -> TcpListener {
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
pub fn connects(
    sandbox: &Sandbox,
    cgroup: &TestCgroup,
    uid: u32,
    addr: SocketAddr,
    count: u32,
) -> Timings {
    let mut runs: Vec<Timings> = (0..RUNS)
        .map(|_| connect_once(sandbox, cgroup, uid, addr, count))
        .collect();
    runs.sort_by_key(|t| t.median_ns);
    runs[RUNS / 2]
}

pub fn sink(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, SINK_PORT)
}

pub fn loopback() -> SocketAddr {
    sink(Ipv4Addr::LOCALHOST.into())
}

/// The agent's default fold window, in seconds: what production runs with.
pub const DEFAULT_WINDOW: &str = "10";

/// An agent attached at `attach` with the config lines `extra`, folding repeats within `window`
/// seconds (`DEFAULT_WINDOW`, or "0" to report every attempt).
pub fn agent(attach: &TestCgroup, pins: &Pins, extra: &str, window: &str) -> (Agent, ConfigFile) {
    agent_started_by(Agent::start, attach, pins, extra, window)
}

/// As [`agent`], started by `start` ([`Agent::start`] or another way of the harness).
pub fn agent_started_by(
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
pub fn enable_stats() -> std::os::fd::OwnedFd {
    #[repr(C)]
    struct EnableStats {
        kind: u32,
    }
    const BPF_ENABLE_STATS: libc::c_long = 32;
    let mut attr = EnableStats { kind: 0 }; // BPF_STATS_RUN_TIME
    // SAFETY: a valid attr for BPF_ENABLE_STATS.
    let fd = unsafe { bpf(BPF_ENABLE_STATS, &mut attr, "BPF_ENABLE_STATS") };
    // SAFETY: a new descriptor the kernel just returned.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(i32::try_from(fd).expect("fd")) }
}

/// `bpf(cmd, attr)`, its non-negative result; panics naming `what` when it fails.
///
/// # Safety
/// `attr` is a valid attribute block for `cmd`, whose pointers reach live memory for the call.
pub unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T, what: &str) -> i64 {
    // SAFETY: as the caller promises.
    let result =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    assert!(result >= 0, "{what}: {}", std::io::Error::last_os_error());
    result
}

/// What the kernel says of the loaded program `id` (`None` once it is gone).
pub fn program_info(id: u32) -> Option<ProgramInfo> {
    aya::programs::loaded_programs()
        .flatten()
        .find(|info: &ProgramInfo| info.id() == id)
}

/// (run time ns, run count) of the program `id`.
pub fn run_stats(id: u32) -> (u64, u64) {
    program_info(id).map_or((0, 0), |info| {
        (
            u64::try_from(info.run_time().as_nanos()).unwrap_or(0),
            info.run_count(),
        )
    })
}

/// Where the kernel put program `id`'s code: its JIT image's offset in its 4 KiB page, which
/// decides the instruction-cache sets its lines use. From `/proc/kallsyms`, where the image is
/// `bpf_prog_<tag>_<name>`; `None` when the symbol is not there (the kernel names it after the
/// program's function, which the program's name only matches up to 15 characters), when
/// addresses are hidden, or when another program has the same code and name (another agent of
/// the same build).
pub fn image_offset(id: u32) -> Option<u64> {
    let info = program_info(id)?;
    let symbol = format!("bpf_prog_{:016x}_{}", info.tag(), info.name_as_str()?);
    let symbols = std::fs::read_to_string("/proc/kallsyms").ok()?;
    let mut found = symbols.lines().filter_map(|line| {
        let mut fields = line.split_whitespace();
        let address = fields.next()?;
        (fields.nth(1)? == symbol).then_some(address)
    });
    let address = u64::from_str_radix(found.next()?, 16).ok()?;
    (found.next().is_none() && address != 0).then_some(address % 4096)
}

/// The id of the agent's program on `hook`, from `status --json`.
pub fn program_id(pins: &Pins, hook: &str) -> u32 {
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
pub fn newest_program(name: &str) -> u32 {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|program| program.name_as_str() == Some(name))
        .map(|program| program.id())
        .max()
        .unwrap_or_else(|| panic!("no program {name} loaded"))
}

/// `ip netns exec NAME iptables-restore` with `rules` (and ip6tables with `rules6`).
pub fn iptables(sandbox: &Sandbox, rules: &str, rules6: &str) {
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
pub fn iptables_owner_rules(allowed_uids: &[u32]) -> (String, String) {
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

pub fn iptables_flush(sandbox: &Sandbox) {
    let empty = "*filter\n:INPUT ACCEPT\n:FORWARD ACCEPT\n:OUTPUT ACCEPT\nCOMMIT\n";
    iptables(sandbox, empty, empty);
}

/// One program of imds-guard's object, loaded and attached by the bench itself at a cgroup of
/// its own: a no-op beside the agent's programs (the statistics' baseline), or one of the
/// agent's programs alone (what it costs by itself). Its maps are its own and empty: every
/// destination is unprotected to it, which is the path the bench measures with it. Detached
/// and unloaded when dropped.
pub struct Alone {
    _ebpf: aya::Ebpf,
    pub id: u32,
}

impl Alone {
    pub fn attach(name: &str, cgroup: &TestCgroup) -> Self {
        use aya::programs::{CgroupSkbAttachType, Program};
        let mut ebpf = aya::Ebpf::load(imds_guard::kernel::OBJECT).expect("object");
        let file = std::fs::File::open(&cgroup.dir).expect("cgroup");
        // Through a link (aya uses `bpf_link_create` where the kernel has it), which ignores
        // the exclusive mode: links always run beside the agent's.
        let mode = CgroupAttachMode::Single;
        let program = ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("no {name}"));
        let info = match program {
            Program::CgroupSockAddr(program) => {
                program.load().expect("load");
                program.attach(&file, mode).expect("attach");
                program.info()
            }
            Program::CgroupSkb(program) => {
                program.load().expect("load");
                program
                    .attach(&file, CgroupSkbAttachType::Egress, mode)
                    .expect("attach");
                program.info()
            }
            Program::SockOps(program) => {
                program.load().expect("load");
                program.attach(&file, mode).expect("attach");
                program.info()
            }
            _ => panic!("{name}: not a cgroup program"),
        };
        let id = info.expect("info").id();
        Self { _ebpf: ebpf, id }
    }
}

/// Nanoseconds per run of program `id` between two [`run_stats`] readings.
pub fn per_run(before: (u64, u64), after: (u64, u64)) -> Option<f64> {
    let runs = after.1.checked_sub(before.1).filter(|&runs| runs > 0)?;
    #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
    Some((after.0 - before.0) as f64 / runs as f64)
}

/// One measurement of `count` `connect()`+`close()` from `cgroup` as `uid` to `addr`.
pub fn connect_once(
    sandbox: &Sandbox,
    cgroup: &TestCgroup,
    uid: u32,
    addr: SocketAddr,
    count: u32,
) -> Timings {
    check_abort();
    Client::new(sandbox, cgroup, uid, uid)
        .repeat(count)
        .timings(WARMUP.min(count))
        .route("connect-close", addr.ip(), addr.port())
        .timings
        .expect("timings")
}

/// One 1 GiB transfer over loopback TCP from `cgroup`, in Gbit/s.
pub fn bulk_once(sandbox: &Sandbox, cgroup: &TestCgroup) -> f64 {
    check_abort();
    let outcome = Client::new(sandbox, cgroup, USER, USER).route(
        "bulk-send",
        std::net::Ipv4Addr::LOCALHOST,
        BULK_PORT,
    );
    outcome.detail.parse().expect("Gbit/s")
}

/// `rounds` rounds of an established flow from each of `arms`, interleaved block by block in
/// one client (`imds-client`'s `bulk-rounds`): each arm's seconds for its GiB, `[arm][round]`.
pub fn bulk_rounds(sandbox: &Sandbox, arms: &[&TestCgroup], rounds: usize) -> Vec<Vec<f64>> {
    check_abort();
    let blocks = Client::new(sandbox, arms[0], USER, USER)
        .alternate(arms, rounds, 0)
        .route("bulk-rounds", Ipv4Addr::LOCALHOST, BULK_BLOCKS_PORT)
        .blocks
        .expect("blocks");
    #[expect(clippy::cast_precision_loss, reason = "figures for people")]
    blocks
        .iter()
        .map(|arm| arm.iter().map(|&ns| ns as f64 / 1e9).collect())
        .collect()
}

/// One eBPF instruction: `code`, registers `dst` and `src`, `off`, `imm`.
pub fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let [off0, off1] = off.to_le_bytes();
    let [i0, i1, i2, i3] = imm.to_le_bytes();
    u64::from_le_bytes([code, (src << 4) | dst, off0, off1, i0, i1, i2, i3])
}

/// Loads `insns` as a program of `prog_type` named `name` (at most 15 bytes), attached nowhere:
/// the bench's own programs (table 0b's spacers, table 0c's calls). Unloaded when its
/// descriptor closes.
pub fn load_raw_program(prog_type: u32, insns: &[u64], name: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    /// `BPF_PROG_LOAD`'s attributes up to `expected_attach_type`, and zeroes.
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
        rest: [u8; 56],
    }
    const BPF_PROG_LOAD: libc::c_long = 5;
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    let length = name.len().min(15);
    prog_name[..length].copy_from_slice(&name.as_bytes()[..length]);
    let mut attr = ProgLoad {
        prog_type,
        insn_cnt: u32::try_from(insns.len()).expect("a few instructions"),
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: 0,
        rest: [0; 56],
    };
    // SAFETY: `attr` is a valid `BPF_PROG_LOAD` attribute block, whose pointers reach live
    // memory for the call.
    let fd = unsafe {
        bpf(
            BPF_PROG_LOAD,
            &mut attr,
            &format!("loading the bench's program {name}"),
        )
    };
    // SAFETY: a descriptor the kernel just gave this process, owned by nothing else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(i32::try_from(fd).expect("a descriptor")) }
}
