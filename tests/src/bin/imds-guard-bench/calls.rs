//! Table 0c: what a call costs in a BPF program on this machine. The programs' paths in table
//! 0 are mostly calls (helpers, and BPF-to-BPF calls into the agent's global functions) and
//! the memory they read; a call's price is the machine's (its CPU's return and indirect-branch
//! mitigations, a virtual machine's clock), not imds-guard's, and it differs several times over
//! from one machine to another. Measured with `BPF_PROG_TEST_RUN` on programs of the bench's
//! own, attached nowhere.

use std::{
    fmt::Write as _,
    os::fd::{AsRawFd as _, OwnedFd},
};

use crate::{
    report::Report,
    setup::{bpf, insn, load_raw_program},
    stats,
};

/// Calls in each measured program: its cost over the empty program, divided by this.
const CALLS: usize = 16;
/// Runs of a program per `BPF_PROG_TEST_RUN` (the kernel reports their mean).
const REPEAT: u32 = 200_000;
/// Interleaved rounds: each program once per round.
const ROUNDS: usize = 11;

/// `BPF_FUNC_*` numbers of the helpers measured.
const BPF_FUNC_GET_CURRENT_PID_TGID: i32 = 14;
const BPF_FUNC_GET_CURRENT_UID_GID: i32 = 15;
const BPF_FUNC_KTIME_GET_BOOT_NS: i32 = 125;
const BPF_FUNC_KTIME_GET_COARSE_NS: i32 = 160;

/// `r0 = 0`, then `exit`.
fn ret0() -> [u64; 2] {
    [insn(0xb7, 0, 0, 0, 0), insn(0x95, 0, 0, 0, 0)]
}

/// The programs measured, by what they call [`CALLS`] times (the first calls nothing).
fn programs() -> Vec<(&'static str, Vec<u64>)> {
    let helper = |id| {
        let mut insns = vec![insn(0x85, 0, 0, 0, id); CALLS];
        insns.extend(ret0());
        insns
    };
    // Calls into a subprogram after the main one's `exit` (`src` 1: `imm` is the offset from
    // the next instruction), which returns at once.
    let mut local: Vec<u64> = (0..CALLS)
        .map(|at| {
            let to = i32::try_from(CALLS + 2 - (at + 1)).expect("a few instructions");
            insn(0x85, 0, 1, 0, to)
        })
        .collect();
    local.extend(ret0());
    local.extend(ret0());
    vec![
        ("nothing (the program's entry and exit)", ret0().to_vec()),
        (
            "a helper that reads a field (`bpf_get_current_pid_tgid`)",
            helper(BPF_FUNC_GET_CURRENT_PID_TGID),
        ),
        (
            "a helper that maps ids through the user namespace (`bpf_get_current_uid_gid`)",
            helper(BPF_FUNC_GET_CURRENT_UID_GID),
        ),
        (
            "the clock (`bpf_ktime_get_boot_ns`, at every event; every fold before Linux 5.11)",
            helper(BPF_FUNC_KTIME_GET_BOOT_NS),
        ),
        (
            "the coarse clock (`bpf_ktime_get_coarse_ns`, at every fold from Linux 5.11)",
            helper(BPF_FUNC_KTIME_GET_COARSE_NS),
        ),
        (
            "a BPF-to-BPF call (as into the agent's global functions)",
            local,
        ),
    ]
}

pub fn call_costs(out: &mut Report) {
    let programs: Vec<(&str, OwnedFd)> = programs()
        .into_iter()
        .map(|(what, insns)| (what, load(&insns)))
        .collect();
    let mut runs: Vec<_> = programs
        .iter()
        .map(|(_, fd)| {
            let fd = fd.as_raw_fd();
            move || f64::from(test_run(fd))
        })
        .collect();
    let mut arms: Vec<&mut dyn FnMut() -> f64> = runs
        .iter_mut()
        .map(|run| run as &mut dyn FnMut() -> f64)
        .collect();
    let samples = stats::interleave(ROUNDS, &mut arms);
    let _ = writeln!(
        out,
        "## 0c. What a call costs in a BPF program here\n\n\
         The programs' paths in tables 0 and 7 are mostly calls (helpers, and BPF-to-BPF calls \
         into the agent's global functions) and the memory they read. What a call costs is the \
         machine's: its CPU's return and indirect-branch mitigations (`/sys/devices/system/cpu/\
         vulnerabilities`), a virtual machine's clock. Programs of the bench's own (socket \
         filters attached nowhere), each making {CALLS} of one call, run {REPEAT} times per \
         `BPF_PROG_TEST_RUN`, {ROUNDS} interleaved rounds; a call's cost is the round's mean run \
         less the empty program's, divided by {CALLS} (the median of the rounds and its 95% \
         confidence interval).\n\n\
         | a call of | per run | per call |\n|---|---|---|"
    );
    let nothing = &samples[0];
    for (at, ((what, _), runs)) in programs.iter().zip(&samples).enumerate() {
        let run = stats::estimate(runs);
        // The first program calls nothing: the others' baseline.
        let per_call = if at == 0 {
            String::new()
        } else {
            #[expect(clippy::cast_precision_loss, reason = "a small count")]
            let per_call: Vec<f64> = runs
                .iter()
                .zip(nothing)
                .map(|(run, base)| (run - base) / CALLS as f64)
                .collect();
            stats::estimate(&per_call).show(|ns| format!("{ns:.1} ns"))
        };
        let _ = writeln!(out, "| {what} | {:.0} ns | {per_call} |", run.median);
    }
    let _ = writeln!(
        out,
        "\n{}\n",
        mitigations()
            .map(|line| format!("This machine's return and branch mitigations: {line}."))
            .unwrap_or_default()
    );
}

/// What the kernel says of the CPU's Spectre v2 and return-address mitigations.
fn mitigations() -> Option<String> {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/devices/system/cpu/vulnerabilities/{name}"))
            .ok()
            .map(|text| format!("{name}: {}", text.trim()))
    };
    let lines: Vec<String> = ["spectre_v2", "retbleed", "spec_rstack_overflow"]
        .into_iter()
        .filter_map(read)
        .collect();
    (!lines.is_empty()).then(|| lines.join("; "))
}

/// Loads `insns` as a socket filter (`BPF_PROG_TYPE_SOCKET_FILTER`), attached nowhere.
fn load(insns: &[u64]) -> OwnedFd {
    const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
    load_raw_program(BPF_PROG_TYPE_SOCKET_FILTER, insns, "bench_call")
}

/// Runs the program `fd` [`REPEAT`] times on a zeroed 64-byte packet; the mean run in ns.
fn test_run(fd: i32) -> u32 {
    /// `BPF_PROG_TEST_RUN`'s attributes up to `ctx_out`.
    #[repr(C)]
    struct TestRun {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        pad: u32,
    }
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    let packet = [0u8; 64];
    let mut attr = TestRun {
        prog_fd: u32::try_from(fd).expect("a descriptor"),
        retval: 0,
        data_size_in: 64,
        data_size_out: 0,
        data_in: packet.as_ptr() as u64,
        data_out: 0,
        repeat: REPEAT,
        duration: 0,
        ctx_size_in: 0,
        ctx_size_out: 0,
        ctx_in: 0,
        ctx_out: 0,
        flags: 0,
        cpu: 0,
        batch_size: 0,
        pad: 0,
    };
    // SAFETY: `attr` is a valid `BPF_PROG_TEST_RUN` attribute block, whose pointers reach live
    // memory for the call.
    unsafe {
        bpf(
            BPF_PROG_TEST_RUN,
            &mut attr,
            "running a program of table 0c",
        )
    };
    attr.duration
}
