//! Table 0b: table 0's rows that where the code lands moves more than the code does (each
//! socket hook's and the packet hook's fast path for a destination not protected, and the
//! allowed path), by where the kernel put the agent's code. The JIT allocates every program's
//! image first-fit, in 64-byte chunks of pages all programs share, and starts it at a random
//! point of its first chunk: where the agent's images land depends on what the machine loaded
//! before. Here the bench loads programs of its own that never run ("spacers": one more each
//! time) before each start of the agent, and measures the same agent wherever it landed.

use std::{fmt::Write as _, os::fd::OwnedFd};

use imds_guard_tests::{Pins, Sandbox, TestCgroup};

use crate::{
    kernel::{Case, cases, make_run, nanos},
    report::Report,
    setup::{
        Alone, DEFAULT_WINDOW, agent, enable_stats, image_offset, insn, load_raw_program, per_run,
        program_id, run_stats,
    },
    stats::estimate,
};

/// Starts of the agent, each after one more spacer than the one before.
const PLACEMENTS: usize = 12;
/// Measurements per case and start: table 0's rounds (10,000 attempts, or a 1 GiB transfer).
const SAMPLES: usize = 3;
/// Instructions of a spacer (`r0 = 1` and `exit`): its JIT image a little over one of the
/// allocator's 64-byte chunks.
const SPACER_INSNS: usize = 12;

pub fn placement(
    report: &mut Report,
    sandbox: &Sandbox,
    attach: &TestCgroup,
    workload: &TestCgroup,
) {
    let (folded, _) = cases();
    let cases: Vec<&Case> = folded.iter().filter(|case| case.placement_bound).collect();
    let mut noops: Vec<(&str, Alone)> = Vec::new();
    for case in &cases {
        if !noops.iter().any(|(name, _)| *name == case.noop) {
            noops.push((case.noop, Alone::attach(case.noop, attach)));
        }
    }
    let noop = |name: &str| {
        &noops
            .iter()
            .find(|(noop, _)| *noop == name)
            .expect("a no-op")
            .1
    };
    let mut rows = Vec::new();
    for placement in 0..PLACEMENTS {
        let spacers: Vec<OwnedFd> = (0..placement).map(|_| spacer()).collect();
        let pins = Pins::new();
        let (agent, config) = agent(attach, &pins, "", DEFAULT_WINDOW);
        let stats = enable_stats();
        let row: Vec<(Option<u64>, f64)> = cases
            .iter()
            .map(|case| {
                let (id, noop) = (program_id(&pins, case.program), noop(case.noop).id);
                let over: Vec<f64> = (0..SAMPLES)
                    .map(|_| {
                        let before = (run_stats(id), run_stats(noop));
                        make_run(sandbox, workload, &case.load);
                        let after = (run_stats(id), run_stats(noop));
                        per_run(before.0, after.0).expect("the program ran")
                            - per_run(before.1, after.1).expect("the no-op ran")
                    })
                    .collect();
                (image_offset(id), estimate(&over).median)
            })
            .collect();
        drop(stats);
        drop((agent, config, pins, spacers));
        rows.push((placement, row));
    }
    let offsets: Vec<(&str, Option<u64>)> = noops
        .iter()
        .map(|(name, alone)| (*name, image_offset(alone.id)))
        .collect();
    let mut noops_at = offsets
        .iter()
        .filter_map(|(name, at)| Some(format!("`{name}` at {}", hex((*at)?))))
        .collect::<Vec<_>>()
        .join(", ");
    if offsets.iter().any(|(_, at)| at.is_none()) {
        // `bench_noop_sendmsg4` and `bench_noop_sendmsg6`: the kernel names an image by its
        // code's tag and its name's first 15 bytes.
        noops_at.push_str(
            "; the others' symbols cannot be told apart: the same code under names the kernel \
             cuts to the same 15 characters",
        );
    }
    let _ = writeln!(
        report,
        "## 0b. The fast paths by where the kernel put their code\n\n\
         Table 0's rows for a destination not protected and its allowed row (through the \
         functions the JIT places after `connect4`'s entry point), over the no-op beside them, \
         for {PLACEMENTS} starts of the same agent, each after one more spacer (a program of \
         {SPACER_INSNS} instructions, loaded and never attached), which moves the agent's code: \
         the kernel allocates images first-fit in 64-byte chunks and starts each at a random \
         point of its first chunk. An image's offset in its 4 KiB page decides which \
         instruction-cache sets its lines use. The median of {SAMPLES} of table 0's rounds \
         each (part of a column's spread is the measurement's own); the no-ops stayed where \
         they were ({noops_at}).\n"
    );
    table(report, &cases, &rows);
    columns(report, &cases, &rows);
    report.text.push_str("\n\n");
}

/// The table's rows: each start's spacers, and for each case where its program landed (once,
/// at its first case) and what the case cost over its no-op.
fn table(report: &mut Report, cases: &[&Case], rows: &[Row]) {
    // A program's place once, at its first case.
    let placed = |i: usize| {
        !cases[..i]
            .iter()
            .any(|case| case.program == cases[i].program)
    };
    let mut header = "| spacers |".to_owned();
    let mut rule = "|---|".to_owned();
    for (i, case) in cases.iter().enumerate() {
        if placed(i) {
            let _ = write!(header, " `{}` at | over the no-op |", case.program);
            rule.push_str("---|");
        } else {
            let _ = write!(
                header,
                " `{}`, {}: over the no-op |",
                case.program, case.what
            );
        }
        rule.push_str("---|");
    }
    let _ = writeln!(report, "{header}\n{rule}");
    for (spacers, row) in rows {
        let _ = write!(report, "| {spacers} |");
        for (i, (at, ns)) in row.iter().enumerate() {
            if placed(i) {
                let _ = write!(report, " {} |", at.map_or_else(|| "?".to_owned(), hex));
            }
            let _ = write!(report, " {ns:.0} ns |");
        }
        report.text.push('\n');
    }
}

/// A start's row of table 0b: its spacers, and for each case where its program landed and what
/// the case cost over its no-op.
type Row = (usize, Vec<(Option<u64>, f64)>);

/// Each case's spread and median over the starts, and its target judged on that median.
fn columns(report: &mut Report, cases: &[&Case], rows: &[Row]) {
    for (i, case) in cases.iter().enumerate() {
        let figures: Vec<f64> = rows.iter().map(|(_, row)| row[i].1).collect();
        let (low, high) = figures
            .iter()
            .fold((f64::MAX, f64::MIN), |(low, high), &ns| {
                (low.min(ns), high.max(ns))
            });
        let across = estimate(&figures);
        let _ = write!(
            report,
            "\n`{}`, {}: {low:.0}–{high:.0} ns over the no-op, median {:.0} ns, for the same code.",
            case.program, case.what, across.median
        );
        // The place is drawn anew at every load, so a user's agent gets any of them: the
        // target judged on the median over the starts, beside table 0's one start.
        report.target(
            format!(
                "`{}`, {}, the median over {PLACEMENTS} starts of the agent, its code placed \
                 anew at each (table 0b): ≤ {:.0} ns per run over a no-op",
                case.program, case.what, case.target_ns
            ),
            nanos(&across),
            across.median <= case.target_ns,
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
