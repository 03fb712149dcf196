//! Table 3: an established flow, 1 GiB over loopback TCP, in interleaved rounds: no firewall,
//! imds-guard (the agent, every program), a packet program that does nothing (what the
//! kernel's hook costs by itself), each of the per-packet and per-connection programs alone,
//! and the iptables owner-match rules. Every arm but iptables has a cgroup of its own (the
//! agent runs throughout), and in each round one client sends a GiB on a connection from each
//! in blocks, one connection after the other ([`bulk_rounds`]); iptables' rules are the
//! namespace's, so they are put in place for their arm only, after the others in each round.

use std::fmt::Write as _;

use imds_guard_tests::{Pins, Sandbox, TestCgroup, process};

use crate::{
    report::Report,
    setup::{
        Alone, DEFAULT_WINDOW, agent, bulk_rounds, iptables, iptables_flush, iptables_owner_rules,
    },
    stats::{estimate, ratios},
};

/// Rounds: each measures every arm once.
const ROUNDS: usize = 60;
/// The target: imds-guard's throughput against no firewall.
const TARGET: f64 = 0.99;
/// Gigabits in a GiB.
const GIB_GBITS: f64 = 8.0 * 1_073_741_824.0 / 1e9;

pub fn throughput(
    report: &mut Report,
    sandbox: &Sandbox,
    attach: &TestCgroup,
    workload: &TestCgroup,
) {
    let open = TestCgroup::new("bench-open");
    let (noop_only, egress_only, sock_ops_only) = (
        TestCgroup::new("bench-noop"),
        TestCgroup::new("bench-egress"),
        TestCgroup::new("bench-sockops"),
    );
    let _noop = Alone::attach("bench_noop_skb", &noop_only);
    let _egress = Alone::attach("egress", &egress_only);
    let _sock_ops = Alone::attach("sock_ops", &sock_ops_only);
    let pins = Pins::new();
    let (agent, config) = agent(attach, &pins, "", DEFAULT_WINDOW);
    let (rules, rules6) = iptables_owner_rules(&[0]);
    let ticks_before = process::cpu_ticks(agent.pid());
    let started = std::time::Instant::now();
    let arms = [&open, workload, &noop_only, &egress_only, &sock_ops_only];
    // `[arm][round]` in Gbit/s: the cgroups' arms, then iptables'.
    let mut samples = vec![Vec::with_capacity(ROUNDS); arms.len() + 1];
    for round in 0..ROUNDS {
        // A client per round, which rotates the arms' order by one each block; the order it
        // starts from rotates by one each round.
        let mut order: Vec<usize> = (0..arms.len()).collect();
        order.rotate_left(round % arms.len());
        let ordered: Vec<&TestCgroup> = order.iter().map(|&arm| arms[arm]).collect();
        let measured = bulk_rounds(sandbox, &ordered, 1);
        for (seconds, &arm) in measured.iter().zip(&order) {
            samples[arm].push(GIB_GBITS / seconds[0]);
        }
        iptables(sandbox, &rules, &rules6);
        let theirs = bulk_rounds(sandbox, &[&open], 1);
        iptables_flush(sandbox);
        samples[arms.len()].push(GIB_GBITS / theirs[0][0]);
    }
    #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
    let agent_cpu = (process::cpu_ticks(agent.pid()) - ticks_before) as f64
        / 100.0
        / started.elapsed().as_secs_f64();
    drop((agent, config, pins));
    let _ = writeln!(
        report,
        "## 3. Established flow: 1 GiB over loopback TCP\n\n\
         {ROUNDS} rounds. In each, one client process opens a connection from each arm's \
         cgroup and sends 1 GiB on each as blocks of {} MiB, one connection after the other \
         (the order rotating by one each block, and its start each round), each block timed \
         until the receiver acknowledges it; then, with the iptables rules in place, another client sends 1 GiB the \
         same way from the cgroup without a firewall. The ratio is each round's Gbit/s over the same \
         round's without a firewall (median and 95% confidence interval). The agent's own \
         CPU during the rounds: {:.1}% of a CPU.\n\n\
         | | Gbit/s (median) | ratio to no firewall |\n|---|---|---|",
        imds_guard_tests::BULK_BLOCK_BYTES >> 20,
        agent_cpu * 100.0
    );
    let labels = [
        "no firewall",
        "imds-guard (the agent: all its programs)",
        "a packet program that does nothing (the kernel's `cgroup_skb` machinery)",
        "`egress` alone (every packet)",
        "`sock_ops` alone (every connection's events)",
        "iptables owner match",
    ];
    let mut ours_ratio = None;
    for (index, label) in labels.iter().enumerate() {
        let rate = estimate(&samples[index]);
        let ratio = estimate(&ratios(&samples[index], &samples[0]));
        if index == 1 {
            ours_ratio = Some(ratio);
        }
        let _ = writeln!(
            report,
            "| {label} | {:.2} | {} |",
            rate.median,
            if index == 0 {
                "1.000".to_owned()
            } else {
                ratio.to_string()
            }
        );
    }
    let ratio = ours_ratio.expect("imds-guard's arm");
    report.target(
        format!(
            "1 GiB over loopback TCP: ≥ {TARGET} of no firewall ({ROUNDS} rounds, interleaved \
             by block)"
        ),
        ratio.to_string(),
        ratio.median >= TARGET,
    );
    report.text.push('\n');
}
