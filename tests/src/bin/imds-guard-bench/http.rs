//! Table 7: the message layer, on an IMDSv2 request.

use std::{fmt::Write as _, net::Ipv4Addr};

use imds_guard_common::http::HTTP_CHUNK_BYTES;
use imds_guard_tests::{Client, IMDS_V4, Pins, Sandbox, TestCgroup};

use crate::{
    CONNECTS, HTTP_BLOCK, HTTP_FLOWS, HTTP_ROUNDS, SINK_PORT, USER, check_abort,
    report::Report,
    setup::{DEFAULT_WINDOW, agent, enable_stats, newest_program, program_id, run_stats},
    stats::{estimate, ratios},
};

/// What the message layer may add to an IMDSv2 flow (token, then metadata), as a ratio.
const MESSAGE_LAYER_TARGET: f64 = 1.05;

/// The two ways an IMDSv2 flow is written in table 7: its route in `imds-client` and how the
/// table names it.
const STYLES: [(&str, &str); 2] = [
    (
        "sdk-v2",
        "each request in one write (as the AWS SDKs and curl send it)",
    ),
    (
        "v2",
        "each request in a dozen writes (Rust's `write!` on an unbuffered socket)",
    ),
];

/// Table 7: an IMDSv2 request (token, then metadata, each on its own connection) through the
/// message layer (IMDS port 80: `sock_ops` follows the connection, `sk_msg` reads each write)
/// against the same flow the connect hooks judge alone (port 8080, which the message layer does
/// not follow, from a cgroup whose rule judges no requests), one client alternating between them, for each of [`STYLES`]; then, with the kernel's
/// statistics on, what a run of `http_msg` costs and what `sock_ops` costs every other TCP
/// connection of the attach cgroup.
pub fn http_costs(
    report: &mut Report,
    sandbox: &Sandbox,
    attach: &TestCgroup,
    workload: &TestCgroup,
) {
    let pins = Pins::new();
    // The connect hooks' arm: a cgroup beside the workload's whose rule judges no requests
    // (under a rule that judges them, a connect to IMDS goes to port 80 alone).
    let hooks_only = attach.child("hooks-only");
    let (agent, config) = agent(
        attach,
        &pins,
        &format!(
            "[[allow]]\nname = \"bench\"\ncgroup = \"{}\"\nimds = \"v2\"\n\
             [[allow]]\nname = \"hooks only\"\ncgroup = \"{}\"\n",
            workload.path, hooks_only.path
        ),
        DEFAULT_WINDOW,
    );
    let flows = |route: &str, port: u16| {
        check_abort();
        Client::new(sandbox, workload, USER, USER)
            .repeat(HTTP_FLOWS)
            .timings(HTTP_FLOWS / 10)
            .route(route, IMDS_V4, port)
            .timings
            .expect("timings")
    };
    // Without the statistics (their clock reads would weigh on the followed flows' runs only):
    // [style] = [connect hooks alone, with the message layer], each `[round]`.
    let rounds: Vec<[Vec<f64>; 2]> = STYLES
        .iter()
        .map(|(route, _)| {
            check_abort();
            let blocks = Client::new(sandbox, workload, USER, USER)
                .repeat(HTTP_BLOCK)
                .alternate(&[&hooks_only, workload], HTTP_ROUNDS, HTTP_BLOCK / 10)
                .alternate_ports(&[8080, 80])
                .route(route, IMDS_V4, 80)
                .blocks
                .expect("blocks");
            #[expect(clippy::cast_precision_loss, reason = "figures for people")]
            let arm = |i: usize| blocks[i].iter().map(|&ns| ns as f64).collect::<Vec<_>>();
            [arm(0), arm(1)]
        })
        .collect();
    let _ = writeln!(
        report,
        "## 7. The message layer: an IMDSv2 request\n\n\
         Token then metadata (two connections), as uid {USER} in a cgroup whose rule has `imds = \
         \"v2\"`, for each way of writing a request: port 80, judged by the connect hooks, \
         `sock_ops` and `sk_msg` (every write read). Against port 8080 from a cgroup beside it \
         whose rule judges no requests, judged by the connect hooks alone (a rule that judges \
         requests refuses a connect to IMDS on another port than 80). One client process \
         alternates between them: {HTTP_ROUNDS} rounds of a block of {HTTP_BLOCK} flows to each (after {} \
         untimed ones, the order rotating each round); a round's figure is its block's median \
         flow, the ratio each round's, as the median and 95% confidence interval of the \
         rounds.\n\n\
         | requests written | connect hooks alone (port 8080), per flow | with the message layer \
         (port 80) | ratio |\n|---|---|---|---|",
        HTTP_BLOCK / 10
    );
    round_rows(report, &rounds);
    let _stats = enable_stats();
    let (http_msg, sock_ops) = (newest_program("http_msg"), program_id(&pins, "sock_ops"));
    let mut per_style = Vec::new();
    for (route, _) in STYLES {
        let before = run_stats(http_msg);
        flows(route, 80);
        let after = run_stats(http_msg);
        let runs = after.1 - before.1;
        // Every flow, its untimed warm-up included.
        #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
        let per_flow = runs as f64 / f64::from(HTTP_FLOWS + HTTP_FLOWS / 10);
        per_style.push((
            per_flow,
            (after.0 - before.0).checked_div(runs).unwrap_or(0),
        ));
    }
    let per_connection = program_costs(sandbox, &pins, [(&hooks_only, 8080), (workload, 80)]);
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
    let [(one_runs, one_ns), (pieces_runs, pieces_ns)] = per_style[..] else {
        unreachable!("two styles")
    };
    let _ = writeln!(
        report,
        "\nIn the kernel (statistics on, in a run of {HTTP_FLOWS} flows after the rounds): \
         `http_msg` ran {one_runs:.1} times per flow at {one_ns} ns a run with each request in \
         one write, {pieces_runs:.1} times at {pieces_ns} ns with each in a dozen (up to \
         {HTTP_CHUNK_BYTES} bytes a run). `sock_ops` on connections it does not follow \
         (loopback `connect()`+`close()`): {per_run} ns per run, {:.1} runs per connection.\n",
        {
            #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
            let r = runs as f64 / f64::from(CONNECTS);
            r
        },
    );
    breakdown(report, &rounds[0], &per_connection);
}

/// Where a connection's time goes in the programs, on each arm (`(cgroup, port)`; each request
/// in one write, statistics on): `[arm][connect4, sock_ops, http_msg, egress]`, ns per
/// connection.
fn program_costs(sandbox: &Sandbox, pins: &Pins, arms: [(&TestCgroup, u16); 2]) -> [[f64; 4]; 2] {
    let programs = [
        program_id(pins, "connect4"),
        program_id(pins, "sock_ops"),
        newest_program("http_msg"),
        program_id(pins, "egress"),
    ];
    arms.map(|(cgroup, port)| {
        check_abort();
        let before = programs.map(run_stats);
        let outcome = Client::new(sandbox, cgroup, USER, USER)
            .repeat(HTTP_FLOWS)
            .route(STYLES[0].0, IMDS_V4, port);
        assert_eq!(outcome.errno, None, "flows: {outcome:?}");
        let after = programs.map(run_stats);
        // Two connections a flow.
        let connections = 2.0 * f64::from(HTTP_FLOWS);
        #[expect(clippy::cast_precision_loss, reason = "figures for people")]
        let spent = |i: usize| (after[i].0 - before[i].0) as f64 / connections;
        [spent(0), spent(1), spent(2), spent(3)]
    })
}

/// Where the message layer's time goes: the programs' time per connection on each arm (each
/// request in one write), against what a connection cost more in the rounds (half a flow's).
fn breakdown(report: &mut Report, rounds: &[Vec<f64>; 2], per_connection: &[[f64; 4]; 2]) {
    let micros = |ns: f64| format!("{:.2} µs", ns / 1000.0);
    let _ = writeln!(
        report,
        "Per connection (two a flow; each request in one write; statistics on, {HTTP_FLOWS} \
         flows an arm), the programs' time:\n\n\
         | program | connect hooks alone (port 8080) | with the message layer (port 80) | more |\n\
         |---|---|---|---|"
    );
    let names = [
        "`connect4`",
        "`sock_ops`",
        "`http_msg`",
        "`egress` (the connection's packets to IMDS)",
    ];
    for (i, name) in names.iter().enumerate() {
        let [hooks, read] = [per_connection[0][i], per_connection[1][i]];
        let _ = writeln!(
            report,
            "| {name} | {} | {} | {} |",
            micros(hooks),
            micros(read),
            micros(read - hooks)
        );
    }
    let sum = |arm: usize| per_connection[arm].iter().sum::<f64>();
    let programs_more = sum(1) - sum(0);
    let [hooks, read] = [estimate(&rounds[0]).median, estimate(&rounds[1]).median];
    let connection_more = (read - hooks) / 2.0;
    let allowed = (MESSAGE_LAYER_TARGET - 1.0) * hooks / 2.0;
    let _ = writeln!(
        report,
        "| all four | {} | {} | {} |\n\n\
         A connection took {} more in the rounds (half the difference of the median flows, \
         statistics off); the target allows {} ({:.0}% of a connection judged by the connect \
         hooks alone, {}). Of it, the programs' share above (statistics on, in flows of their \
         own) is {}; the rest, {}, is an estimate of what happens outside the programs, where \
         what differs is the kernel's socket map (a `sk_psock` made at `sock_ops`, each write \
         through `tcp_bpf_sendmsg`, each read through `tcp_bpf_recvmsg`, the teardown at \
         close).\n",
        micros(sum(0)),
        micros(sum(1)),
        micros(programs_more),
        micros(connection_more),
        micros(allowed),
        (MESSAGE_LAYER_TARGET - 1.0) * 100.0,
        micros(hooks / 2.0),
        micros(programs_more),
        micros(connection_more - programs_more),
    );
}

/// Table 7's rows: per style, the rounds' median flow on each port and the ratio; the first
/// style's ratio against the target.
fn round_rows(report: &mut Report, rounds: &[[Vec<f64>; 2]]) {
    for (style, (_, label)) in STYLES.iter().enumerate() {
        let [hooks, read] = &rounds[style];
        let ratio = estimate(&ratios(read, hooks));
        let _ = writeln!(
            report,
            "| {label} | {} | {} | {ratio} |",
            estimate(hooks).show(|ns| format!("{:.2} µs", ns / 1000.0)),
            estimate(read).show(|ns| format!("{:.2} µs", ns / 1000.0)),
        );
        if style == 0 {
            report.target(
                format!(
                    "an IMDSv2 flow through the message layer, {label}: ≤ \
                     {MESSAGE_LAYER_TARGET} of the connect hooks alone ({HTTP_ROUNDS} alternating \
                     rounds)"
                ),
                ratio.to_string(),
                ratio.median <= MESSAGE_LAYER_TARGET,
            );
        }
    }
}
