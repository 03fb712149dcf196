//! Tables 1 and 2: what a `connect()` costs, against no firewall and iptables, and with
//! policies of growing size.

use std::{fmt::Write as _, time::Instant};

use imds_guard_tests::{Client, IMDS_V4, Pins, Sandbox, TestCgroup, Timings};

use crate::stats::{Estimate, estimate, interleave, ratios};
use crate::{
    CONNECTS, RULE_COUNTS, SINK_PORT, USER,
    report::{Report, micros, ratio, spread},
    setup::{
        DEFAULT_WINDOW, agent, connect_once, connects, iptables, iptables_flush,
        iptables_owner_rules, loopback, sink,
    },
};

/// Rounds of table 1 and of the scale table: each measures every arm once.
const ROUNDS: usize = 25;
/// The target: imds-guard's `connect()`+`close()` against no firewall.
const TARGET: f64 = 1.01;

/// Table 1: a loopback `connect()` + `close()` over IPv4 and IPv6, in interleaved rounds: no
/// firewall, imds-guard, and the iptables owner-match rules (put in place for their arm only:
/// they are the namespace's); and a denied IMDS connect.
pub fn connect_costs(
    report: &mut Report,
    sandbox: &Sandbox,
    attach: &TestCgroup,
    workload: &TestCgroup,
) {
    let open = &TestCgroup::new("bench-open");
    let pins = Pins::new();
    let (agent, config) = agent(attach, &pins, "", DEFAULT_WINDOW);
    let (rules, rules6) = iptables_owner_rules(&[0]);
    let (v4, v6) = (loopback(), sink("::1".parse().expect("::1")));
    let median = |t: Timings| {
        #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
        let ns = t.median_ns as f64;
        ns
    };
    let count = CONNECTS / 2;
    let mut arms: Vec<Box<dyn FnMut() -> f64>> = Vec::new();
    for addr in [v4, v6] {
        arms.push(Box::new(move || {
            median(connect_once(sandbox, open, USER, addr, count))
        }));
        arms.push(Box::new(move || {
            median(connect_once(sandbox, workload, USER, addr, count))
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
    let samples = interleave(ROUNDS, &mut arms);
    let denied = connect_once(sandbox, workload, USER, sink(IMDS_V4.into()), count);
    drop((agent, config, pins));
    let _ = writeln!(
        report,
        "## 1. connect()+close() to a loopback listener (not protected)\n\n\
         {ROUNDS} interleaved rounds of {count} connects per arm (each round's median per \
         connect); the ratio is each round's over the same round's without a firewall, as the \
         median and 95% confidence interval of the rounds.\n\n\
         | | IPv4 | ratio | IPv6 | ratio |\n|---|---|---|---|---|"
    );
    let mut ours = Vec::new();
    for (index, label) in [
        "no firewall",
        "imds-guard (enforce)",
        "iptables + ip6tables owner match",
    ]
    .iter()
    .enumerate()
    {
        let cell = |family: usize| {
            let arm = family * 3 + index;
            let time = estimate(&samples[arm]);
            let ratio = estimate(&ratios(&samples[arm], &samples[family * 3]));
            (time, ratio)
        };
        let ((t4, r4), (t6, r6)) = (cell(0), cell(1));
        if index == 1 {
            ours = vec![("IPv4", r4), ("IPv6", r6)];
        }
        let show = |r: Estimate| {
            if index == 0 {
                "1.000".to_owned()
            } else {
                r.to_string()
            }
        };
        let _ = writeln!(
            report,
            "| {label} | {:.2} µs | {} | {:.2} µs | {} |",
            t4.median / 1000.0,
            show(r4),
            t6.median / 1000.0,
            show(r6)
        );
    }
    for (family, ratio) in ours {
        report.target(
            format!("connect()+close() over {family}: ≤ {TARGET} of no firewall ({ROUNDS} interleaved rounds)"),
            ratio.to_string(),
            ratio.median <= TARGET,
        );
    }
    denied_connect(report, sandbox, workload, &denied);
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
