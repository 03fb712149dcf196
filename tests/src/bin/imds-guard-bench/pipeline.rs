//! Table 4: floods of denied connects, and what the agent spends reporting them.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use imds_guard_tests::{Agent, Client, IMDS_V4, Pins, Sandbox, TestCgroup, process};

use crate::{
    SINK_PORT, USER,
    report::Report,
    setup::{DEFAULT_WINDOW, agent_started_by},
};

/// Table 4: floods of denied connects; is every attempt reported, aggregated or counted lost,
/// and what does it cost the agent?
pub fn pipeline(
    report: &mut Report,
    sandbox: &Sandbox,
    attach: &TestCgroup,
    workload: &TestCgroup,
) {
    const FLOOD: u32 = 100_000;
    const WORKLOADS: u32 = 20_000;
    let _ = writeln!(
        report,
        "## 4. Event pipeline\n\n\
         Floods of denied connects, as fast as one client makes them. Every attempt is reported \
         at once, reported as a repeat in an aggregate event, or counted lost by the kernel \
         (ring full); the figures are the agent's own, logged when it stops. Its events go to \
         /dev/null, so this measures the agent, not what reads its output (journald, in \
         production). Agent CPU is the CPU time it used until it had caught up (its process \
         CPU clock, to the nanosecond), per second of flood, and per attempt; the share of a \
         CPU grows with the client's rate, the time per attempt does not.\n\n\
         | flood | attempts/s | reported | aggregated | lost | sum | agent CPU | per attempt | \
         agent peak RSS |\n\
         |---|---|---|---|---|---|---|---|---|"
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
    let distinct_cpu = flood(
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
    report.target(
        format!("agent during a flood by {WORKLOADS} distinct workloads: < 50% of a CPU"),
        format!("{distinct_cpu:.0}% of a CPU"),
        distinct_cpu < 50.0,
    );
    report.text.push('\n');
}

/// One row of table 4: a fresh agent (at `attach`, folding window), `attempts` made by `run`.
pub fn flood(
    report: &mut Report,
    (attach, window): (&TestCgroup, &str),
    label: &str,
    attempts: u32,
    run: impl FnOnce() -> imds_guard_tests::Outcome,
) -> f64 {
    let pins = Pins::new();
    // Its events go to /dev/null: this measures the agent, not whatever reads its output (in
    // production, journald).
    let (mut agent, config) =
        agent_started_by(Agent::start_discarding_events, attach, &pins, "", window);
    let cpu_ns = || process::cpu_ns(agent.pid()).expect("the agent runs");
    let cpu_before = cpu_ns();
    let outcome = run();
    assert_eq!(outcome.eperm, attempts, "every attempt denied");
    let elapsed = Duration::from_nanos(outcome.timings.expect("timings").elapsed_ns);
    // The agent reports all it has when it stops: wait until it has caught up first, so its
    // CPU time is the flood's.
    let started = Instant::now();
    let mut cpu_after = cpu_ns();
    while started.elapsed() < Duration::from_mins(2) {
        std::thread::sleep(Duration::from_millis(300));
        let now = cpu_ns();
        // Caught up: idle since (its timers' wakes, well under 1% of a CPU), which is not
        // counted.
        if now - cpu_after < 3_000_000 {
            break;
        }
        cpu_after = now;
    }
    let peak_kib = process::status_kib(agent.pid(), "VmHWM:").unwrap_or(0);
    assert!(agent.stop().success());
    drop((config, pins));
    let (reported, aggregated, lost) = (
        agent.final_figure("events_reported"),
        agent.final_figure("events_aggregated"),
        agent.final_figure("events_lost"),
    );
    #[expect(clippy::cast_precision_loss, reason = "figures for people")]
    let cpu_seconds = (cpu_after - cpu_before) as f64 / 1e9;
    let (rate, cpu, per_attempt_us) = (
        f64::from(attempts) / elapsed.as_secs_f64(),
        cpu_seconds / elapsed.as_secs_f64() * 100.0,
        cpu_seconds / f64::from(attempts) * 1e6,
    );
    let _ = writeln!(
        report,
        "| {label} | {rate:.0} | {reported} | {aggregated} | {lost} | {} of {attempts} | \
         {cpu:.0}% | {per_attempt_us:.1} µs | {} MiB |",
        reported + aggregated + lost,
        peak_kib / 1024,
    );
    cpu
}
