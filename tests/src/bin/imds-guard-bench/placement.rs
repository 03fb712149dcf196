//! Table 0b: the fast paths of table 0 (`connect4`, `connect6`, `egress`: a destination not
//! protected), and its allowed path, by where the kernel put the agent's code. The JIT
//! allocates every program's image first-fit, in 64-byte chunks of pages all programs share,
//! and starts it at a random point of its first chunk: where the agent's images land depends on what the machine loaded
//! before. Here the bench loads programs of its own that never run ("spacers": one more each
//! time) before each start of the agent, and measures the same agent wherever it landed.

use std::{fmt::Write as _, os::fd::OwnedFd};

use imds_guard_tests::{IMDS_V4, Pins, Sandbox, TestCgroup};

use crate::{
    USER,
    kernel::{ALLOWED_TARGET_NS, NOT_PROTECTED_TARGET_NS, nanos},
    report::Report,
    setup::{
        Alone, DEFAULT_WINDOW, agent, bulk_once, connect_once, enable_stats, image_offset, insn,
        load_raw_program, loopback, per_run, program_id, run_stats, sink,
    },
    stats::estimate,
};

/// Starts of the agent, each after one more spacer than the one before.
const PLACEMENTS: usize = 12;
/// Measurements per program and start: blocks of connects, or 1 GiB transfers.
const SAMPLES: usize = 3;
const CONNECTS: u32 = 10_000;
/// Instructions of a spacer (`r0 = 1` and `exit`): its JIT image a little over one of the
/// allocator's 64-byte chunks.
const SPACER_INSNS: usize = 12;

pub fn placement(
    report: &mut Report,
    sandbox: &Sandbox,
    attach: &TestCgroup,
    workload: &TestCgroup,
) {
    let noop4 = Alone::attach("bench_noop4", attach);
    let noop6 = Alone::attach("bench_noop6", attach);
    let noop_skb = Alone::attach("bench_noop_skb", attach);
    let mut rows = Vec::new();
    for placement in 0..PLACEMENTS {
        let spacers: Vec<OwnedFd> = (0..placement).map(|_| spacer()).collect();
        let pins = Pins::new();
        let (agent, config) = agent(attach, &pins, "", DEFAULT_WINDOW);
        let stats = enable_stats();
        let measure = |program: &str, noop: &Alone, run: &dyn Fn()| {
            let id = program_id(&pins, program);
            let over: Vec<f64> = (0..SAMPLES)
                .map(|_| {
                    let before = (run_stats(id), run_stats(noop.id));
                    run();
                    let after = (run_stats(id), run_stats(noop.id));
                    per_run(before.0, after.0).expect("the program ran")
                        - per_run(before.1, after.1).expect("the no-op ran")
                })
                .collect();
            (image_offset(id), estimate(&over).median)
        };
        let connect4 = measure("connect4", &noop4, &|| {
            connect_once(sandbox, workload, USER, loopback(), CONNECTS);
        });
        let connect6 = measure("connect6", &noop6, &|| {
            connect_once(
                sandbox,
                workload,
                USER,
                sink("::1".parse().expect("::1")),
                CONNECTS,
            );
        });
        let egress = measure("egress", &noop_skb, &|| {
            bulk_once(sandbox, workload);
        });
        // The allowed path: `connect4`'s entry, then its functions, which the JIT places right
        // after it.
        let (_, allowed) = measure("connect4", &noop4, &|| {
            connect_once(sandbox, workload, 0, sink(IMDS_V4.into()), CONNECTS);
        });
        drop(stats);
        drop((agent, config, pins, spacers));
        rows.push((placement, [connect4, connect6, egress], allowed));
    }
    let offset = |id: u32| image_offset(id).map_or_else(|| "?".to_owned(), hex);
    let _ = writeln!(
        report,
        "## 0b. The fast paths by where the kernel put their code\n\n\
         Table 0's three rows for a destination not protected (`connect4` and `connect6`: \
         {CONNECTS} connects to 127.0.0.1 or ::1; `egress`: a 1 GiB loopback transfer), and its \
         allowed row (`connect4`: {CONNECTS} connects to IMDS as uid 0, through the functions \
         the JIT places after the entry point), over the no-op beside them, for \
         {PLACEMENTS} starts of the same agent, each after one more spacer (a program of \
         {SPACER_INSNS} instructions, loaded and never attached), which moves the agent's code: \
         the kernel allocates images first-fit in 64-byte chunks and starts each at a random \
         point of its first chunk. An image's offset in its 4 KiB page decides which \
         instruction-cache sets its lines use. The median of {SAMPLES} measurements each (part \
         of a column's spread is the measurement's own); the no-ops stayed where they were (`bench_noop4` at {}, \
         `bench_noop6` at {}, `bench_noop_skb` at {}).\n\n\
         | spacers | `connect4` at | over the no-op | `connect6` at | over the no-op | `egress` at \
         | over the no-op | `connect4` (IMDS, allowed), over the no-op |\n|---|---|---|---|---|---|---|---|",
        offset(noop4.id),
        offset(noop6.id),
        offset(noop_skb.id)
    );
    for (spacers, programs, allowed) in &rows {
        let _ = write!(report, "| {spacers} |");
        for (at, ns) in programs {
            let at = at.map_or_else(|| "?".to_owned(), hex);
            let _ = write!(report, " {at} | {ns:.0} ns |");
        }
        let _ = writeln!(report, " {allowed:.0} ns |");
    }
    columns(report, &rows);
    report.text.push_str("\n\n");
}

/// A start's row of table 0b: its spacers, where `connect4`, `connect6` and `egress` landed and
/// what each cost over its no-op, and the allowed attempt's cost.
type Row = (usize, [(Option<u64>, f64); 3], f64);

/// Each column's spread and median over the starts, and its target judged on that median.
fn columns(report: &mut Report, rows: &[Row]) {
    // Each column's program, what table 0 calls its case, and the case's target there.
    let columns = [
        (
            "`connect4`",
            "not protected (127.0.0.1)",
            NOT_PROTECTED_TARGET_NS,
        ),
        ("`connect6`", "not protected (::1)", NOT_PROTECTED_TARGET_NS),
        (
            "`egress`",
            "every packet of a 1 GiB loopback transfer (not protected)",
            NOT_PROTECTED_TARGET_NS,
        ),
        ("`connect4`", "IMDS, allowed (uid 0)", ALLOWED_TARGET_NS),
    ];
    for (i, (program, what, target_ns)) in columns.into_iter().enumerate() {
        let name = match i {
            3 => format!("{program} (IMDS, allowed)"),
            _ => program.to_owned(),
        };
        let figures: Vec<f64> = rows
            .iter()
            .map(|(_, programs, allowed)| programs.get(i).map_or(*allowed, |program| program.1))
            .collect();
        let (low, high) = figures
            .iter()
            .fold((f64::MAX, f64::MIN), |(low, high), &ns| {
                (low.min(ns), high.max(ns))
            });
        let across = estimate(&figures);
        let _ = write!(
            report,
            "\n{name}: {low:.0}–{high:.0} ns over the no-op, median {:.0} ns, for the same code.",
            across.median
        );
        // The place is drawn anew at every load, so a user's agent gets any of them: the
        // target judged on the median over the starts, beside table 0's one start.
        report.target(
            format!(
                "{program}, {what}, the median over {PLACEMENTS} starts of the agent, its code \
                 placed anew at each (table 0b): ≤ {target_ns:.0} ns per run over a no-op"
            ),
            nanos(&across),
            across.median <= target_ns,
        );
    }
}

/// An image offset as the table shows it.
fn hex(offset: u64) -> String {
    format!("0x{offset:03x}")
}

/// Loads a `cgroup_skb` program that returns 1 ([`SPACER_INSNS`] instructions) and never
/// attaches it: it only takes room in the JIT's pages. Unloaded when its descriptor closes.
fn spacer() -> OwnedFd {
    const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
    // `r0 = 1` (BPF_ALU64 | BPF_MOV | BPF_K), then `exit`.
    let mut insns = vec![insn(0xb7, 0, 0, 0, 1); SPACER_INSNS - 1];
    insns.push(insn(0x95, 0, 0, 0, 0));
    load_raw_program(BPF_PROG_TYPE_CGROUP_SKB, &insns, "bench_spacer")
}
