//! Table 5: start to enforcement, and memory at rest.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use imds_guard_tests::{Pins, TestCgroup, process};

use crate::{
    RUNS,
    report::Report,
    setup::{DEFAULT_WINDOW, agent, newest_program, program_id, program_info},
};

/// The agent's programs, by the hook `status` names them with (the message program by its
/// name: it is attached to a socket map, not through a link).
const HOOKS: [&str; 6] = [
    "connect4", "connect6", "sendmsg4", "sendmsg6", "egress", "sock_ops",
];

/// Table 5: start to enforcement, and memory at rest.
pub fn footprint(report: &mut Report, attach: &TestCgroup) {
    let mut starts = Vec::new();
    let mut rss = Vec::new();
    let mut verified = Vec::new();
    for _ in 0..RUNS {
        let pins = Pins::new();
        let start = Instant::now();
        let (agent, _config) = agent(attach, &pins, "", DEFAULT_WINDOW);
        starts.push(start.elapsed());
        if verified.is_empty() {
            verified = verified_instructions(&pins);
        }
        std::thread::sleep(Duration::from_millis(500));
        rss.push(process::status_kib(agent.pid(), "VmRSS:").unwrap_or(0));
    }
    starts.sort();
    rss.sort_unstable();
    let (ready, idle_kib) = (starts[RUNS / 2], rss[RUNS / 2]);
    report.target(
        "start to enforcement < 200 ms",
        format!("{} ms", ready.as_millis()),
        ready < Duration::from_millis(200),
    );
    report.target(
        "resident memory idle < 20 MB",
        format!(
            "{:.1} MB",
            f64::from(u32::try_from(idle_kib).unwrap_or(u32::MAX)) * 1.024e-3
        ),
        idle_kib * 1024 < 20_000_000,
    );
    let _ = writeln!(
        report,
        "## 5. Footprint\n\n\
         Start to READY=1 (programs attached, policy in force): {} ms (median of {RUNS}; \
         {}–{} ms). Resident memory idle: {:.1} MiB. Target: under 200 ms and 20 MB.\n\n\
         What the start grows with: the instructions the kernel's verifier walked for each \
         program (`verified_insns`; a path it cannot prove the same as one it checked is \
         walked again): {}.\n",
        starts[RUNS / 2].as_millis(),
        starts[0].as_millis(),
        starts[RUNS - 1].as_millis(),
        {
            #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
            let mib = rss[RUNS / 2] as f64 / 1024.0;
            mib
        },
        verified
            .iter()
            .map(|(name, count)| format!("`{name}` {count}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
}

/// The count of instructions the verifier walked for each of the agent's programs (pinned at
/// `pins`), as the kernel reports it (Linux 5.16+; "unknown" before).
fn verified_instructions(pins: &Pins) -> Vec<(&'static str, String)> {
    let count = |id: u32| {
        program_info(id)
            .and_then(|info| info.verified_instruction_count())
            .map_or_else(|| "unknown".to_owned(), |count| count.to_string())
    };
    HOOKS
        .iter()
        .map(|&hook| (hook, count(program_id(pins, hook))))
        .chain([("http_msg", count(newest_program("http_msg")))])
        .collect()
}
