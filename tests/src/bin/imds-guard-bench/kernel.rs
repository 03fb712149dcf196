//! Table 0: nanoseconds per program run, from the kernel's statistics, over a program that
//! does nothing attached beside it (the statistics' own clock reads and the hook's machinery
//! cancel out). Every round measures both on the same attempts, so each round gives one
//! difference; the table shows their median and its confidence interval.

use std::{fmt::Write as _, net::SocketAddr};

use imds_guard_tests::{Client, IMDS_V4, Pins, Sandbox, TestCgroup};

use crate::{
    USER,
    report::Report,
    setup::{
        Alone, DEFAULT_WINDOW, agent, bulk_once, connect_once, enable_stats, loopback, per_run,
        program_id, run_stats, sink,
    },
    stats::{Estimate, estimate},
};

/// Rounds per case, attempts per round.
const ROUNDS: usize = 11;
const ATTEMPTS: u32 = 10_000;
/// The target of a destination not protected, per run over a no-op (table 0b judges it too,
/// across starts of the agent).
pub const NOT_PROTECTED_TARGET_NS: f64 = 10.0;
/// The target of an allowed attempt, per run over a no-op (table 0b judges it too).
pub const ALLOWED_TARGET_NS: f64 = 100.0;
/// The UDP port the sandbox's NAT rewrites to IMDS (port 53).
const NAT_PORT: u16 = 9053;
/// The sandbox's UDP echo, on every address of its loopback.
const ECHO_PORT: u16 = 53;

/// What a round does to make the program run.
pub enum Load {
    Connects(u32, SocketAddr),
    /// Unconnected UDP datagrams (`sendto`, each on a new socket) to the sandbox's echo.
    Datagrams(SocketAddr),
    Bulk,
    /// Connected UDP datagrams to `127.0.0.1:NAT_PORT`, which NAT rewrites to IMDS: the
    /// socket hooks see loopback, the packet layer judges IMDS.
    Rewritten,
}

pub struct Case {
    pub what: &'static str,
    /// The agent's program and the no-op beside it.
    pub program: &'static str,
    pub noop: &'static str,
    pub load: Load,
    pub target_ns: f64,
    /// Where the kernel puts the code moves the figure more than the code does: a fast path of
    /// a few instructions, or the allowed path. Table 0b measures it at each of its starts.
    pub placement_bound: bool,
}

/// The cases measured with the default fold window, and those without folding.
pub fn cases() -> ([Case; 8], [Case; 1]) {
    let imds = sink(IMDS_V4.into());
    let folded = [
        Case {
            what: "not protected (127.0.0.1)",
            program: "connect4",
            noop: "bench_noop4",
            load: Load::Connects(USER, loopback()),
            target_ns: NOT_PROTECTED_TARGET_NS,
            placement_bound: true,
        },
        Case {
            what: "not protected (::1)",
            program: "connect6",
            noop: "bench_noop6",
            load: Load::Connects(USER, sink("::1".parse().expect("::1"))),
            target_ns: NOT_PROTECTED_TARGET_NS,
            placement_bound: true,
        },
        Case {
            what: "not protected (127.0.0.1), an unconnected datagram",
            program: "sendmsg4",
            noop: "bench_noop_sendmsg4",
            load: Load::Datagrams(SocketAddr::new([127, 0, 0, 1].into(), ECHO_PORT)),
            target_ns: NOT_PROTECTED_TARGET_NS,
            placement_bound: true,
        },
        Case {
            what: "not protected (::1), an unconnected datagram",
            program: "sendmsg6",
            noop: "bench_noop_sendmsg6",
            load: Load::Datagrams(SocketAddr::new(
                std::net::Ipv6Addr::LOCALHOST.into(),
                ECHO_PORT,
            )),
            target_ns: NOT_PROTECTED_TARGET_NS,
            placement_bound: true,
        },
        Case {
            what: "IMDS, allowed (uid 0)",
            program: "connect4",
            noop: "bench_noop4",
            load: Load::Connects(0, imds),
            target_ns: ALLOWED_TARGET_NS,
            placement_bound: true,
        },
        Case {
            what: "IMDS, denied, repeats folded (the default)",
            program: "connect4",
            noop: "bench_noop4",
            load: Load::Connects(USER, imds),
            target_ns: 300.0,
            placement_bound: false,
        },
        Case {
            what: "every packet of a 1 GiB loopback transfer (not protected)",
            program: "egress",
            noop: "bench_noop_skb",
            load: Load::Bulk,
            target_ns: NOT_PROTECTED_TARGET_NS,
            placement_bound: true,
        },
        Case {
            what: "a datagram NAT rewrote to IMDS, denied, repeats folded",
            program: "egress",
            noop: "bench_noop_skb",
            load: Load::Rewritten,
            target_ns: 300.0,
            placement_bound: false,
        },
    ];
    let queued = [Case {
        what: "IMDS, denied, each with its event (`--aggregate-window 0`)",
        program: "connect4",
        noop: "bench_noop4",
        load: Load::Connects(USER, imds),
        target_ns: 1000.0,
        placement_bound: false,
    }];
    (folded, queued)
}

pub fn kernel_costs(
    report: &mut Report,
    sandbox: &Sandbox,
    attach: &TestCgroup,
    workload: &TestCgroup,
) {
    let (folded, queued) = cases();
    let noops: Vec<(&str, Alone)> = [
        "bench_noop4",
        "bench_noop6",
        "bench_noop_sendmsg4",
        "bench_noop_sendmsg6",
        "bench_noop_skb",
    ]
    .into_iter()
    .map(|name| (name, Alone::attach(name, attach)))
    .collect();
    let noop_id = |name: &str| {
        noops
            .iter()
            .find(|(noop, _)| *noop == name)
            .map(|(_, alone)| alone.id)
            .expect("a no-op")
    };
    sandbox.dnat(
        "iptables",
        "udp",
        "127.0.0.1",
        NAT_PORT,
        "169.254.169.254:53",
    );
    let _ = writeln!(
        report,
        "## 0. In the kernel: per program run\n\n\
         From `BPF_ENABLE_STATS` (run_time_ns / run_cnt) of the agent's program minus the same \
         for a program that returns at once, attached beside it and run by the same attempts \
         ({ROUNDS} rounds of {ATTEMPTS} attempts, or one 1 GiB transfer; the median of the \
         rounds' differences and its 95% confidence interval). Neither figure holds the \
         kernel's work around a program: for `egress`, that includes the save and restore of \
         the packet's control block, which the agent's program uses and the no-op does not (20 \
         bytes copied, zeroed and copied back; BENCHMARKS.md, history).\n\n\
         | program | destination | per run | no-op | over the no-op | target |\n\
         |---|---|---|---|---|---|"
    );
    for (cases, window) in [(&folded[..], DEFAULT_WINDOW), (&queued[..], "0")] {
        let pins = Pins::new();
        let (agent, config) = agent(attach, &pins, "", window);
        let stats = enable_stats();
        let mut rounds: Vec<Vec<(f64, f64)>> = vec![Vec::new(); cases.len()];
        for _ in 0..ROUNDS {
            for (case, samples) in cases.iter().zip(&mut rounds) {
                let (ours, noop) = (program_id(&pins, case.program), noop_id(case.noop));
                let before = (run_stats(ours), run_stats(noop));
                make_run(sandbox, workload, &case.load);
                let after = (run_stats(ours), run_stats(noop));
                samples.push((
                    per_run(before.0, after.0).expect("the program ran"),
                    per_run(before.1, after.1).expect("the no-op ran"),
                ));
            }
        }
        drop(stats);
        drop((agent, config, pins));
        for (case, samples) in cases.iter().zip(rounds) {
            let mine = estimate(&samples.iter().map(|s| s.0).collect::<Vec<_>>());
            let noop = estimate(&samples.iter().map(|s| s.1).collect::<Vec<_>>());
            let over = estimate(&samples.iter().map(|s| s.0 - s.1).collect::<Vec<_>>());
            let _ = writeln!(
                report,
                "| `{}` | {} | {:.0} ns | {:.0} ns | {} | ≤ {:.0} ns |",
                case.program,
                case.what,
                mine.median,
                noop.median,
                nanos(&over),
                case.target_ns
            );
            report.target(
                format!(
                    "`{}`, {}: ≤ {:.0} ns per run over a no-op",
                    case.program, case.what, case.target_ns
                ),
                nanos(&over),
                over.median <= case.target_ns,
            );
        }
    }
    sandbox.exec("iptables", &["-t", "nat", "-F", "OUTPUT"]);
    report.text.push('\n');
}

/// Makes the programs of a case run: `ATTEMPTS` attempts, or one transfer.
pub fn make_run(sandbox: &Sandbox, workload: &TestCgroup, load: &Load) {
    match *load {
        Load::Connects(uid, addr) => {
            connect_once(sandbox, workload, uid, addr, ATTEMPTS);
        }
        Load::Datagrams(addr) => {
            let outcome = Client::new(sandbox, workload, USER, USER)
                .repeat(ATTEMPTS)
                .timings(0)
                .udp(addr.ip(), addr.port());
            outcome.assert_ok("ping");
        }
        Load::Bulk => {
            bulk_once(sandbox, workload);
        }
        Load::Rewritten => {
            let outcome = Client::new(sandbox, workload, USER, USER)
                .repeat(ATTEMPTS)
                .timings(0)
                .route("connected-udp", [127, 0, 0, 1], NAT_PORT);
            assert_eq!(outcome.eperm, ATTEMPTS, "every datagram dropped");
        }
    }
}

pub fn nanos(estimate: &Estimate) -> String {
    estimate.show(|ns| format!("{ns:.0} ns"))
}
