//! Table 7: the message layer, on an IMDSv2 request.

use std::{fmt::Write as _, net::Ipv4Addr};

use imds_guard_common::http::HTTP_CHUNK_BYTES;
use imds_guard_tests::{Client, IMDS_V4, Pins, Sandbox, TestCgroup, Timings};

use crate::{
    CONNECTS, HTTP_FLOWS, HTTP_PAIRS, SINK_PORT, USER, check_abort,
    report::{Report, spread},
    setup::{DEFAULT_WINDOW, agent, enable_stats, newest_program, program_id, run_stats},
};

/// What the message layer may add to an IMDSv2 flow (token, then metadata), as a ratio.
const MESSAGE_LAYER_TARGET: f64 = 1.05;

/// Table 7: an IMDSv2 request (token, then metadata, each on its own connection) through the
/// message layer (IMDS port 80: `sock_ops` follows the connection, `sk_msg` reads each write)
/// against the same flow the connect hooks judge alone (port 8080, which the message layer does
/// not follow), interleaved pair by pair; and what `sock_ops` costs every other TCP connection
/// of the attach cgroup.
pub fn http_costs(
    report: &mut Report,
    sandbox: &Sandbox,
    attach: &TestCgroup,
    workload: &TestCgroup,
) {
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
    let ratio = crate::stats::estimate(&ratios);
    report.target(
        format!(
            "an IMDSv2 flow through the message layer: ≤ {MESSAGE_LAYER_TARGET} of the connect \
             hooks alone ({HTTP_PAIRS} interleaved pairs)"
        ),
        ratio.to_string(),
        ratio.median <= MESSAGE_LAYER_TARGET,
    );
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
         In the kernel (statistics on): `http_msg` ran {:.1} times per flow (up to {HTTP_CHUNK_BYTES} bytes \
         a run), \
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
