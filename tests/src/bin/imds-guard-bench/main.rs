//! `cargo xtask bench`: what imds-guard costs, against no firewall and against the iptables
//! owner-match rules it replaces, measured in one run on this machine (ratios against a
//! baseline of the same run: these machines are noisy).
//!
//! Everything happens in a network namespace and cgroups of its own (iptables rules exist only
//! in that namespace), removed at the end. Prints Markdown tables.

mod calls;
mod churn;
mod connect;
mod footprint;
mod http;
mod kernel;
mod pipeline;
mod placement;
mod report;
mod scale;
mod setup;
mod stats;
mod throughput;

use std::{
    cell::RefCell,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use imds_guard_tests::{Sandbox, TestCgroup};

use crate::report::Report;

/// Connects per measurement, after `WARMUP` untimed ones.
pub(crate) const CONNECTS: u32 = 20_000;
pub(crate) const WARMUP: u32 = 2_000;

/// Repetitions of each measurement; the table shows the median repetition.
pub(crate) const RUNS: usize = 5;

pub(crate) const SINK_PORT: u16 = 9000;

pub(crate) const BULK_PORT: u16 = 9001;

/// The block sink: acknowledges each block of `imds-client`'s `bulk-rounds`.
pub(crate) const BULK_BLOCKS_PORT: u16 = 9002;

pub(crate) const USER: u32 = 1000;

/// The tables, by the names `cargo xtask bench NAME...` selects them with.
const TABLES: [&str; 10] = [
    "kernel",
    "placement",
    "calls",
    "connect",
    "scaling",
    "throughput",
    "pipeline",
    "footprint",
    "churn",
    "http",
];

/// IMDSv2 flows (token, then metadata) of the message layer's run with statistics on.
pub(crate) const HTTP_FLOWS: u32 = 1_000;

/// Rounds of that table's comparison (connect hooks alone, then with the message layer), and
/// flows per arm and round.
pub(crate) const HTTP_ROUNDS: usize = 201;
pub(crate) const HTTP_BLOCK: u32 = 50;

pub(crate) const RULE_COUNTS: [usize; 4] = [1, 100, 1_000, 10_000];

/// Set on SIGINT/SIGTERM: the measurements stop at the next check, by unwinding, so that every
/// namespace, cgroup, agent and pin is removed by its guard.
static ABORT: AtomicBool = AtomicBool::new(false);

extern "C" fn interrupted(_: libc::c_int) {
    ABORT.store(true, Ordering::Relaxed);
}

/// Stops the measurements (by unwinding) once SIGINT or SIGTERM came.
pub(crate) fn check_abort() {
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
    setup::start_sinks(&sandbox, &stop);
    // Tables named on the command line, or all; each printed as soon as it is measured, the
    // summary against the targets at the end.
    let chosen: Vec<String> = std::env::args().skip(1).collect();
    let targets = RefCell::new(Vec::new());
    let section = |name: &str, measure: &dyn Fn(&mut Report)| {
        if chosen.is_empty() || chosen.iter().any(|c| c == name) {
            let mut report = Report::default();
            measure(&mut report);
            println!("{}", report.text);
            targets.borrow_mut().extend(report.targets);
        }
    };
    println!("{}", machine());
    section("kernel", &|out| {
        kernel::kernel_costs(out, &sandbox, &attach, &workload);
    });
    section("placement", &|out| {
        placement::placement(out, &sandbox, &attach, &workload);
    });
    section("calls", &|out| calls::call_costs(out));
    section("connect", &|out| {
        connect::connect_costs(out, &sandbox, &attach, &workload);
    });
    section("scaling", &|out| {
        connect::scaling(out, &sandbox, &attach, &workload);
        scale::large_policy(out, &sandbox);
    });
    section("throughput", &|out| {
        throughput::throughput(out, &sandbox, &attach, &workload);
    });
    section("pipeline", &|out| {
        pipeline::pipeline(out, &sandbox, &attach, &workload);
    });
    section("footprint", &|out| footprint::footprint(out, &attach));
    section("churn", &|out| {
        churn::churn(out, &sandbox, &attach);
        scale::container_churn(out, &attach);
    });
    section("http", &|out| {
        http::http_costs(out, &sandbox, &attach, &workload);
    });
    stop.store(true, Ordering::Relaxed);
    println!("{}", report::summary(&targets.borrow()));
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
        "Machine: Linux {}, {} CPUs ({cpu}).\n",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
    )
}
