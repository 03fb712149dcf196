//! Tables 1 and 2: what a `connect()` costs, against no firewall and iptables, and with
//! policies of growing size.

use std::{fmt::Write as _, net::SocketAddr, time::Instant};

use imds_guard_tests::{Client, IMDS_V4, Pins, Sandbox, TestCgroup, Timings};

use crate::stats::{Estimate, estimate, interleave, ratios};
use crate::{
    CONNECTS, RULE_COUNTS, SINK_PORT, USER, check_abort,
    report::{Report, micros, ratio, spread},
    setup::{
        Alone, DEFAULT_WINDOW, agent, connect_once, connects, iptables, iptables_flush,
        iptables_owner_rules, loopback, sink,
    },
};

/// Rounds of the iptables arm of table 1 and of the scale table: each measures every arm once.
const ROUNDS: usize = 25;
/// Rounds of table 1's imds-guard against no firewall: one client alternating between the
/// arms' cgroups, a block of `BLOCK` connects in each per round (after `BLOCK_WARMUP` untimed
/// ones).
const BLOCKS: usize = 301;
const BLOCK: u32 = 1_000;
const BLOCK_WARMUP: u32 = 100;
/// The target: imds-guard's `connect()`+`close()` against no firewall.
const TARGET: f64 = 1.01;

/// Table 1: a loopback `connect()` + `close()` over IPv4 and IPv6 against no firewall: with
/// imds-guard and with programs that do nothing at its hooks (one client alternating between
/// their cgroups and one outside them), and with the iptables owner-match rules (in interleaved
/// rounds: the rules are the namespace's, put in place for their arm only); and a denied IMDS
/// connect.
pub fn connect_costs(
    report: &mut Report,
    sandbox: &Sandbox,
    attach: &TestCgroup,
    workload: &TestCgroup,
) {
    let open = &TestCgroup::new("bench-open");
    let pins = Pins::new();
    let (agent, config) = agent(attach, &pins, "", DEFAULT_WINDOW);
    // The kernel's hooks as imds-guard uses them on a TCP connection, with programs that do
    // nothing: what any program there costs.
    let noops = &TestCgroup::new("bench-noops");
    let attached = [
        "bench_noop4",
        "bench_noop6",
        "bench_noop_skb",
        "bench_noop_sock_ops",
    ]
    .map(|name| Alone::attach(name, noops));
    let (v4, v6) = (loopback(), sink("::1".parse().expect("::1")));
    // [no firewall, imds-guard, no-ops] by family, each `[round]`.
    let alternating = [v4, v6].map(|addr| alternate(sandbox, &[open, workload, noops], addr));
    drop(attached);
    let count = CONNECTS / 2;
    let rounds = iptables_rounds(sandbox, open, [v4, v6], count);
    let denied = connect_once(sandbox, workload, USER, sink(IMDS_V4.into()), count);
    drop((agent, config, pins));
    let _ = writeln!(
        report,
        "## 1. connect()+close() to a loopback listener (not protected)\n\n\
         imds-guard against no firewall: one client process alternating between three cgroups \
         (outside the agent's; the agent's; one with programs that do nothing at the hooks \
         imds-guard uses on a TCP connection: `connect4`, `connect6`, `egress`, `sock_ops`), \
         {BLOCKS} rounds of a block of {BLOCK} connects in each (after {BLOCK_WARMUP} untimed \
         ones; the order rotating each round, so that the arms share the process, its CPU and \
         the machine's drift); a round's figure is its block's median per connect. iptables \
         against no firewall: {ROUNDS} interleaved rounds of {count} connects per arm, a client \
         process each (the rules are the namespace's: put in place for their arm only). A ratio \
         is each round's over the same round's baseline, as the median and 95% confidence \
         interval of the rounds.\n\n\
         | | IPv4 | ratio | IPv6 | ratio |\n|---|---|---|---|---|"
    );
    let arm = |family: usize, arm: usize| Some(estimate(&alternating[family][arm]));
    let over = |family: usize, arm: usize, base: usize| {
        estimate(&ratios(
            &alternating[family][arm],
            &alternating[family][base],
        ))
    };
    let ours = [0, 1].map(|f| over(f, 1, 0));
    let _ = writeln!(
        report,
        "{}\n{}\n{}\n{}\n{}\n{}",
        row("no firewall", [0, 1].map(|f| (arm(f, 0), None))),
        row(
            "imds-guard (enforce)",
            [0, 1].map(|f| (arm(f, 1), Some(ours[f])))
        ),
        row(
            "programs that do nothing at the same hooks (the kernel's part)",
            [0, 1].map(|f| (arm(f, 2), Some(over(f, 2, 0))))
        ),
        row(
            "imds-guard over those programs (its own part)",
            [0, 1].map(|f| (None, Some(over(f, 1, 2))))
        ),
        row(
            &format!("no firewall (the {ROUNDS} rounds with iptables)"),
            [0, 1].map(|f| (Some(estimate(&rounds[f][0])), None))
        ),
        row(
            "iptables + ip6tables owner match",
            [0, 1].map(|f| (
                Some(estimate(&rounds[f][1])),
                Some(estimate(&ratios(&rounds[f][1], &rounds[f][0])))
            ))
        ),
    );
    // Against no firewall, and what imds-guard adds to what the kernel's hooks cost any program.
    for (family, f) in [("IPv4", 0), ("IPv6", 1)] {
        for (what, ratio) in [
            ("of no firewall", ours[f]),
            (
                "of programs that do nothing at the same hooks",
                over(f, 1, 2),
            ),
        ] {
            report.target(
                format!(
                    "connect()+close() over {family}: ≤ {TARGET} {what} ({BLOCKS} alternating \
                     rounds)"
                ),
                ratio.to_string(),
                ratio.median <= TARGET,
            );
        }
    }
    denied_connect(report, sandbox, workload, &denied);
}

/// Each `arms` cgroup's figures (`[arm][round]`), from one client alternating between them
/// ([`BLOCKS`] rounds of a block of [`BLOCK`] connects to `addr` in each).
fn alternate(sandbox: &Sandbox, arms: &[&TestCgroup], addr: SocketAddr) -> Vec<Vec<f64>> {
    check_abort();
    let blocks = Client::new(sandbox, arms[0], USER, USER)
        .repeat(BLOCK)
        .alternate(arms, BLOCKS, BLOCK_WARMUP)
        .route("connect-close", addr.ip(), addr.port())
        .blocks
        .expect("blocks");
    #[expect(clippy::cast_precision_loss, reason = "figures for people")]
    blocks
        .iter()
        .map(|arm| arm.iter().map(|&ns| ns as f64).collect())
        .collect()
}

/// `[no firewall, iptables]` for each of `addrs`, each `[round]`: [`ROUNDS`] interleaved rounds
/// of `count` connects from `open`, a client process per arm and round; the iptables rules are
/// put in place for their arm and flushed after it.
fn iptables_rounds(
    sandbox: &Sandbox,
    open: &TestCgroup,
    addrs: [SocketAddr; 2],
    count: u32,
) -> [[Vec<f64>; 2]; 2] {
    let (rules, rules6) = iptables_owner_rules(&[0]);
    let median = |t: Timings| {
        #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
        let ns = t.median_ns as f64;
        ns
    };
    let mut arms: Vec<Box<dyn FnMut() -> f64>> = Vec::new();
    for addr in addrs {
        arms.push(Box::new(move || {
            median(connect_once(sandbox, open, USER, addr, count))
        }));
        let (rules, rules6) = (rules.clone(), rules6.clone());
        arms.push(Box::new(move || {
            iptables(sandbox, &rules, &rules6);
            let ns = median(connect_once(sandbox, open, USER, addr, count));
            iptables_flush(sandbox);
            ns
        }));
    }
    let mut arms: Vec<&mut dyn FnMut() -> f64> =
        arms.iter_mut().map(|arm| &mut **arm as _).collect();
    let mut samples = interleave(ROUNDS, &mut arms).into_iter();
    let mut next = || samples.next().expect("an arm");
    [[next(), next()], [next(), next()]]
}

/// A row of table 1: a label, then a time and a ratio for IPv4 and for IPv6 (no time: blank; no
/// ratio: the baseline's 1.000).
fn row(label: &str, cells: [(Option<Estimate>, Option<Estimate>); 2]) -> String {
    let show = |(time, ratio): (Option<Estimate>, Option<Estimate>)| {
        format!(
            "{} | {}",
            time.map_or_else(String::new, |t| format!("{:.2} µs", t.median / 1000.0)),
            ratio.map_or_else(|| "1.000".to_owned(), |r| r.to_string())
        )
    };
    format!("| {label} | {} | {} |", show(cells[0]), show(cells[1]))
}

/// A denied IMDS connect: with imds-guard (`denied`, measured), and with the iptables rules.
fn denied_connect(report: &mut Report, sandbox: &Sandbox, workload: &TestCgroup, denied: &Timings) {
    let (rules, rules6) = iptables_owner_rules(&[0]);
    iptables(sandbox, &rules, &rules6);
    let started = Instant::now();
    let dropped = Client::new(sandbox, workload, USER, USER).tcp(IMDS_V4, SINK_PORT);
    let waited = started.elapsed();
    iptables_flush(sandbox);
    let _ = writeln!(
        report,
        "\nA denied IMDS connect with imds-guard: {} (fails with EPERM). With the iptables DROP \
         rule it does not fail: {}.\n",
        spread(denied),
        if dropped.detail.contains("timed out") || dropped.errno == Some(libc::ETIMEDOUT) {
            format!(
                "the SYN is dropped and the client waits until its own 3 s timeout \
                 ({:.1} s: \"{}\"); without one, the kernel retries for about 2 minutes",
                waited.as_secs_f64(),
                dropped.detail
            )
        } else {
            format!("unexpected: {dropped:?}")
        },
    );
}

/// Table 2: policies of growing size.
pub fn scaling(report: &mut Report, sandbox: &Sandbox, attach: &TestCgroup, workload: &TestCgroup) {
    let _ = writeln!(
        report,
        "## 2. Scaling with the number of rules\n\n\
         imds-guard: N allow rules, half uids (10000, 10001, ...) and half cgroup rules (so the \
         kernel walks the cgroup ancestry); iptables: N `--uid-owner` ACCEPT rules before the \
         DROP. The matching workload is the uid of the last uid rule. Ratios against the same \
         column at N = 1.\n\n\
         | N | imds-guard: not protected | imds-guard: IMDS, matching | imds-guard: IMDS, not matching (denied) | iptables: not protected | iptables: IMDS, matching |\n|---|---|---|---|---|---|"
    );
    let count = CONNECTS / 4;
    let mut base: Option<[u64; 5]> = None;
    for n in RULE_COUNTS {
        let uids: Vec<u32> = (0..n.div_ceil(2))
            .map(|i| 10_000 + u32::try_from(i).expect("n"))
            .collect();
        let mut extra = format!(
            "allow_uid = [{}]\n",
            uids.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        for i in 0..n / 2 {
            let _ = writeln!(extra, "[[allow]]\ncgroup = \"{}/svc-{i}\"", attach.path);
        }
        let matching = *uids.last().expect("a uid");
        let pins = Pins::new();
        let (agent, config) = agent(attach, &pins, &extra, DEFAULT_WINDOW);
        let figures_ours = [
            connects(sandbox, workload, USER, loopback(), count),
            connects(sandbox, workload, matching, sink(IMDS_V4.into()), count),
            connects(sandbox, workload, USER, sink(IMDS_V4.into()), count),
        ];
        drop((agent, config, pins));
        let iptables_uids: Vec<u32> = (0..n)
            .map(|i| 10_000 + u32::try_from(i).expect("n"))
            .collect();
        let (rules, rules6) = iptables_owner_rules(&iptables_uids);
        iptables(sandbox, &rules, &rules6);
        let theirs_match = *iptables_uids.last().expect("a uid");
        let figures_theirs = [
            connects(sandbox, workload, USER, loopback(), count),
            connects(sandbox, workload, theirs_match, sink(IMDS_V4.into()), count),
        ];
        iptables_flush(sandbox);
        let medians = [
            figures_ours[0].median_ns,
            figures_ours[1].median_ns,
            figures_ours[2].median_ns,
            figures_theirs[0].median_ns,
            figures_theirs[1].median_ns,
        ];
        let base = *base.get_or_insert(medians);
        let cell = |i: usize| format!("{} ({})", micros(medians[i]), ratio(medians[i], base[i]));
        let _ = writeln!(
            report,
            "| {n} | {} | {} | {} | {} | {} |",
            cell(0),
            cell(1),
            cell(2),
            cell(3),
            cell(4)
        );
    }
    report.text.push('\n');
}
