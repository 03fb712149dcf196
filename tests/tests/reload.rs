//! Live reload (SIGHUP) on the real kernel: the policy changes with no gap and no mix.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use imds_guard_tests::{
    Agent, Client, ConfigFile, EPERM, IMDS_V4, IMDS_V6, MOCK_INSTANCE_ID, Outcome, Sandbox,
    StopOnDrop, TestCgroup, probe, setup,
};
use nix::sys::signal::Signal;

const ALLOWED: u32 = 1000;
const DENIED: u32 = 1001;
const LATE: u32 = 1002;

/// Sends SIGHUP and waits until the agent has taken `taken` reloads and refused `refused`.
fn reload_and_wait(agent: &Agent, taken: usize, refused: usize) {
    agent.signal(Signal::SIGHUP);
    agent.wait_reloads(taken, refused);
}

#[test]
fn reload_under_fire_gives_no_wrong_verdict() {
    const RELOADS: usize = 60;
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let other = attach.child("other");
    // Both policies allow ALLOWED and deny DENIED; everything else about them differs: mode of
    // nothing else, extra rules, extra protected addresses, a cgroup rule (so rule sets and
    // the ancestor walk change too).
    let policy_a = format!("cgroup = \"{}\"\nallow_uid = [0, {ALLOWED}]\n", attach.path);
    let policy_b = format!(
        "cgroup = \"{0}\"\nprotect = [\"imds\", \"ecs-credentials\", \"10.9.8.7\"]\n\
         [[allow]]\nname = \"prober\"\nuid = {ALLOWED}\nnot_cgroup = \"{0}/other*\"\n\
         [[allow]]\nname = \"staged other\"\ncgroup = \"{1}\"\nmode = \"audit\"\n\
         [[allow]]\ngid = 3000\n\
         [[allow]]\nuid = 0\nnot_cgroup = \"{0}/ctr-*\"\n",
        attach.path, other.path
    );
    let config = ConfigFile::new(&policy_a);
    // Repeats are folded in the kernel (the default): every denied probe on a line of its own
    // is thousands of lines a second, and on a loaded machine this test's reader of them fell
    // behind, the agent waited on the full pipe with a switch in hand, and a reload took over
    // the wait's 10 s. This test is about verdicts; events across switches are `events.rs`'s.
    let agent = Agent::start(&[
        "--config",
        &config.path().to_string_lossy(),
        "--aggregate-window",
        "10",
    ]);

    let done = AtomicBool::new(false);
    let (allowed_rounds, denied_rounds, containers) = std::thread::scope(|scope| {
        let allowed = scope.spawn(|| probe(&done, &sandbox, &attach, ALLOWED, true, 20));
        let denied = scope.spawn(|| probe(&done, &sandbox, &attach, DENIED, false, 50));
        // Containers come and go meanwhile: the agent follows them between switches.
        let churn = scope.spawn(|| {
            let mut made = 0;
            while !done.load(Ordering::Relaxed) {
                let container = attach.child(&format!("ctr-{made}"));
                std::thread::sleep(Duration::from_millis(3));
                container.remove();
                made += 1;
            }
            made
        });
        // Stops the probers however this loop ends, so a failure cannot hang the scope.
        let stop = StopOnDrop(&done);
        for round in 1..=RELOADS {
            config.write(if round % 2 == 1 { &policy_b } else { &policy_a });
            reload_and_wait(&agent, round, 0);
            // Pacing, not timing: give both probers connects under this policy too.
            std::thread::sleep(Duration::from_millis(15));
        }
        drop(stop);
        (
            allowed.join().expect("allowed prober"),
            denied.join().expect("denied prober"),
            churn.join().expect("cgroup churn"),
        )
    });
    eprintln!(
        "{RELOADS} reloads under {allowed_rounds} + {denied_rounds} rounds of connects and \
         {containers} containers made and removed: no wrong verdict"
    );
    assert!(
        allowed_rounds > 1 && denied_rounds > 1,
        "the probers did not overlap the reloads"
    );
}

#[test]
fn invalid_config_at_reload_keeps_the_policy_in_force() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let valid = format!("cgroup = \"{}\"\nallow_uid = [0, {ALLOWED}]\n", attach.path);
    let config = ConfigFile::new(&valid);
    let agent = Agent::start(&["--config", &config.path().to_string_lossy()]);

    config.write(&format!(
        "cgroup = \"{}\"\nallow_uid = [0, {LATE}]\nalow_gid = [1]\n",
        attach.path
    ));
    reload_and_wait(&agent, 0, 1);
    let expected = format!("{}:3:1: unknown field `alow_gid`", config.path().display());
    assert!(agent.stderr().contains(&expected), "{}", agent.stderr());
    assert!(
        agent.stderr().contains("failed_reloads=1"),
        "{}",
        agent.stderr()
    );
    // Nothing of the refused file applies: ALLOWED still in, LATE still out.
    Client::new(&sandbox, &attach, ALLOWED, ALLOWED)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    Client::new(&sandbox, &attach, LATE, LATE)
        .imds(IMDS_V4, 80)
        .assert_errno(EPERM);

    // A valid file then takes effect at the next reload.
    config.write(&format!(
        "cgroup = \"{}\"\nallow_uid = [0, {LATE}]\n",
        attach.path
    ));
    reload_and_wait(&agent, 1, 1);
    Client::new(&sandbox, &attach, LATE, LATE)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    let refused = Client::new(&sandbox, &attach, ALLOWED, ALLOWED).imds(IMDS_V4, 80);
    refused.assert_errno(EPERM);
    let events = agent.wait_events_of(refused.pid, 1);
    assert_eq!(events[0]["rule"], "default");
}

#[test]
fn back_to_back_switches_under_probers_on_every_cpu_judge_each_attempt_by_one_whole_policy() {
    const SWITCHES: usize = 200;
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    // Both protect IMDS, allow ALLOWED and deny DENIED. Each switch writes the other generation
    // whole, protected addresses included, and then removes the old one: an attempt whose
    // lookups mixed two generations (the address from one, the rules from the other) would be
    // passed unjudged or judged by rules that are not in force.
    let policy_a = format!("cgroup = \"{}\"\nallow_uid = [0, {ALLOWED}]\n", attach.path);
    let policy_b = format!(
        "cgroup = \"{}\"\nprotect = [\"imds\", \"10.9.8.7\"]\n\
         [[allow]]\nname = \"prober\"\nuid = {ALLOWED}\n\
         [[allow]]\ngid = 3000\n",
        attach.path
    );
    let config = ConfigFile::new(&policy_a);
    // The test build, whose programs spin up to 100 µs between reading the generation in
    // force and using it: a switch lands inside most attempts in flight, so removing a
    // generation's entries before every program that read it has finished shows at once.
    // Repeats are folded in the kernel (the default), so that the agent, which makes the
    // switches, is not kept busy reporting every denied probe.
    let agent = Agent::start_binary(
        &imds_guard_tests::test_variant_binary(),
        &[
            "--config",
            &config.path().to_string_lossy(),
            "--aggregate-window",
            "10",
        ],
    );
    let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let done = AtomicBool::new(false);
    let rounds = std::thread::scope(|scope| {
        let probers: Vec<_> = (0..cpus)
            .flat_map(|_| {
                [
                    scope.spawn(|| probe(&done, &sandbox, &attach, ALLOWED, true, 200)),
                    scope.spawn(|| probe(&done, &sandbox, &attach, DENIED, false, 200)),
                ]
            })
            .collect();
        let stop = StopOnDrop(&done);
        for round in 1..=SWITCHES {
            config.write(if round % 2 == 1 { &policy_b } else { &policy_a });
            reload_and_wait(&agent, round, 0);
        }
        drop(stop);
        probers
            .into_iter()
            .map(|prober| prober.join().expect("prober"))
            .collect::<Vec<u32>>()
    });
    eprintln!(
        "{SWITCHES} back-to-back switches under {rounds:?} rounds of 200 connects: no wrong verdict"
    );
    assert!(
        rounds.iter().all(|&r| r > 1),
        "a prober did not overlap the switches: {rounds:?}"
    );
}

const MEMBER: u32 = 3000;
const GROUP: u32 = 3001;

/// A container's cgroup below `attach`: a Docker container's scope.
fn docker_container(attach: &TestCgroup) -> TestCgroup {
    attach
        .child("system.slice")
        .child(&format!("docker-{}.scope", "3f".repeat(32)))
}

/// A policy that lets in `ALLOWED` by a uid rule, `GROUP` by a gid rule and containers' root,
/// and `extra` (a config fragment).
fn three_rules(attach: &TestCgroup, extra: &str) -> String {
    format!(
        "cgroup = \"{}\"\n{extra}[[allow]]\nuid = {ALLOWED}\n[[allow]]\ngid = {GROUP}\n\
         [[allow]]\nuid = 0\ncontainers = \"only\"\n",
        attach.path
    )
}

/// Connections by each of `three_rules`' workloads, each opened under the agent's policy and
/// its request sent after a reload to `next`: what the uid rule's, the gid rule's and the
/// container's root's got.
fn held_across_reload(
    sandbox: &Sandbox,
    attach: &TestCgroup,
    container: &TestCgroup,
    agent: &Agent,
    config: &ConfigFile,
    next: &str,
) -> [Outcome; 3] {
    agent.across_reloads(config, &[next], 3, |gate| {
        std::thread::scope(|scope| {
            let held = |uid, gid, in_container: bool| {
                scope.spawn(move || {
                    let client = if in_container {
                        Client::new(sandbox, container, uid, gid).namespaces("pid,cgroup")
                    } else {
                        Client::new(sandbox, attach, uid, gid)
                    };
                    client.hold_at(gate).route("held-imds", IMDS_V4, 80)
                })
            };
            [
                held(ALLOWED, ALLOWED, false),
                held(MEMBER, GROUP, false),
                held(0, 0, true),
            ]
            .map(|client| client.join().expect("client"))
        })
    })
}

/// The packet layer's events of `attach`'s workloads, once an attempt made after them is in.
fn egress_events(agent: &Agent, sandbox: &Sandbox, attach: &TestCgroup) -> Vec<serde_json::Value> {
    let barrier = Client::new(sandbox, attach, DENIED, DENIED).tcp(IMDS_V4, 80);
    let _ = agent.wait_events_of(barrier.pid, 1);
    agent
        .events()
        .into_iter()
        .filter(|event| event["hook"] == "egress")
        .collect()
}

#[test]
fn a_new_policy_applies_to_established_connections_its_rules_no_longer_allow() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let config = ConfigFile::new(&three_rules(&attach, ""));
    let agent = Agent::start(&["--config", &config.path().to_string_lossy()]);
    let neither = format!("cgroup = \"{}\"\nallow_uid = [0]\n", attach.path);
    let container = docker_container(&attach);
    let held = held_across_reload(&sandbox, &attach, &container, &agent, &config, &neither);
    // No rule lets them in any more: each connection's next packet is judged by the new
    // policy, dropped, and reported. The request never arrives (the mock gives up on it and
    // closes). The uid rule's is judged by its socket's owner; the gid rule's and the
    // container's, whose verdicts were remembered on their sockets under the old policy, as
    // the identity their connect was judged as.
    for outcome in &held {
        assert_ne!(
            outcome.detail, MOCK_INSTANCE_ID,
            "a connection the new policy denies still got its answer: {outcome:?}"
        );
    }
    let cut = egress_events(&agent, &sandbox, &attach);
    assert_eq!(cut.len(), 3, "events {cut:?}, held connections {held:?}");
    for (uid, gid, in_container) in [
        (ALLOWED, serde_json::Value::Null, false),
        (MEMBER, serde_json::json!(GROUP), false),
        (0, serde_json::json!(0), true),
    ] {
        let event = cut
            .iter()
            .find(|event| event["uid"] == uid)
            .unwrap_or_else(|| panic!("no event of uid {uid}: {cut:?}"));
        imds_guard_tests::assert_fields(
            event,
            &[
                ("verdict", serde_json::json!("deny")),
                ("rewritten", serde_json::json!(false)),
                ("port", serde_json::json!(80)),
                ("gid", gid),
                ("in_container", serde_json::json!(in_container)),
            ],
        );
    }
}

/// A reload that keeps the rules that let connections in keeps the connections, including those
/// whose verdict the packet layer judges again for the identity remembered on the socket.
#[test]
fn a_reload_that_keeps_a_connections_rule_keeps_the_connection() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let config = ConfigFile::new(&three_rules(&attach, ""));
    let agent = Agent::start(&["--config", &config.path().to_string_lossy()]);
    // Another rule first: the rules that let them in have other ids now.
    let kept = three_rules(&attach, &format!("[[allow]]\nuid = {LATE}\n"));
    let container = docker_container(&attach);
    for outcome in held_across_reload(&sandbox, &attach, &container, &agent, &config, &kept) {
        outcome.assert_ok(MOCK_INSTANCE_ID);
    }
    let events = egress_events(&agent, &sandbox, &attach);
    assert!(events.is_empty(), "{events:?}");
}

/// A container's root, let through to IMDS once (its verdict remembered on the socket), whose
/// rule is then revoked, cannot reuse that verdict: it connects the socket again elsewhere, to
/// an address its own NAT rewrites to IMDS. That packet is judged by the policy in force. Two
/// reloads: the second puts the policy in the slot (generation) of the one that let it through,
/// which a verdict remembered by generation would take for its own.
#[test]
fn a_verdict_remembered_on_a_socket_ends_with_its_policy() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    sandbox.dnat("iptables", "tcp", "127.0.0.1", 9080, "169.254.169.254:80");
    let config = ConfigFile::new(&three_rules(&attach, ""));
    let agent = Agent::start(&["--config", &config.path().to_string_lossy()]);
    let revoked = format!("cgroup = \"{}\"\n[[allow]]\nuid = {ALLOWED}\n", attach.path);
    let container = docker_container(&attach);
    let reused = agent.across_reloads(&config, &[&revoked, &revoked], 1, |gate| {
        Client::new(&sandbox, &container, 0, 0)
            .namespaces("pid,cgroup")
            .hold_at(gate)
            .route("reconnect-held", std::net::Ipv4Addr::LOCALHOST, 9080)
    });
    assert_ne!(
        reused.detail, MOCK_INSTANCE_ID,
        "a socket let through under a revoked rule reached IMDS: {reused:?}"
    );
    let events = egress_events(&agent, &sandbox, &attach);
    assert_eq!(events.len(), 1, "{events:?}");
    imds_guard_tests::assert_fields(
        &events[0],
        &[
            ("verdict", serde_json::json!("deny")),
            ("uid", serde_json::json!(0)),
            ("rewritten", serde_json::json!(true)),
            ("in_container", serde_json::json!(true)),
        ],
    );
}

/// Every address a config protects is judged, as many as a policy holds (eight of each family),
/// and no other: one in the same slot of the kernel's filter passes. A reload that drops
/// addresses frees them, and one that adds them back protects them again.
#[test]
fn the_configured_addresses_are_protected_and_no_others() {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    // Besides IMDS's own: seven IPv4 addresses (eight in all) and seven IPv6 ones.
    let v4: Vec<IpAddr> = (1..=7)
        .map(|last| IpAddr::V4(Ipv4Addr::new(10, 9, 8, last)))
        .collect();
    let v6: Vec<IpAddr> = (1..=7)
        .map(|last| IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 1, last)))
        .collect();
    // The filter's slot is an address's last byte: these share one with protected addresses.
    let neighbours = [
        IpAddr::V4(Ipv4Addr::new(10, 9, 7, 7)),
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 2, 7)),
    ];
    for addr in v4.iter().chain(&v6).chain(&neighbours) {
        let (prefix, extra) = if addr.is_ipv4() {
            ("32", None)
        } else {
            ("128", Some("nodad"))
        };
        let cidr = format!("{addr}/{prefix}");
        let mut args = vec!["addr", "add", &cidr, "dev", "lo"];
        args.extend(extra);
        sandbox.exec("ip", &args);
    }
    let config_of = |protected: &[&IpAddr]| {
        let list: Vec<String> = protected.iter().map(|addr| format!("\"{addr}\"")).collect();
        format!(
            "cgroup = \"{}\"\nprotect = [\"imds\", {}]\n",
            attach.path,
            list.join(", ")
        )
    };
    let all: Vec<&IpAddr> = v4.iter().chain(&v6).collect();
    // The last of each family dropped.
    let fewer: Vec<&IpAddr> = v4[..6].iter().chain(&v6[..6]).collect();
    let config = ConfigFile::new(&config_of(&all));
    let agent = Agent::start(&["--config", &config.path().to_string_lossy()]);
    let check = |protected: &[&IpAddr], free: &[&IpAddr]| {
        for &&addr in protected {
            Client::new(&sandbox, &attach, DENIED, DENIED)
                .tcp(addr, 80)
                .assert_errno(EPERM);
        }
        for &&addr in free {
            let outcome = Client::new(&sandbox, &attach, DENIED, DENIED).tcp(addr, 80);
            assert_ne!(
                outcome.errno,
                Some(EPERM),
                "{addr} is not protected: {outcome:?}"
            );
        }
    };
    let neighbours: Vec<&IpAddr> = neighbours.iter().collect();
    let imds = [IpAddr::V4(IMDS_V4), IpAddr::V6(IMDS_V6)];
    let imds: Vec<&IpAddr> = imds.iter().collect();
    // The last IPv4 address through an IPv6 socket: the hooks compare it as the IPv4 address.
    let mapped = IpAddr::V6(Ipv4Addr::new(10, 9, 8, 7).to_ipv6_mapped());
    check(&[&imds[..], &all, &[&mapped]].concat(), &neighbours);
    config.write(&config_of(&fewer));
    reload_and_wait(&agent, 1, 0);
    check(
        &[&imds[..], &fewer].concat(),
        &[&[&v4[6], &v6[6], &mapped][..], &neighbours].concat(),
    );
    config.write(&config_of(&all));
    reload_and_wait(&agent, 2, 0);
    check(&[&imds[..], &all, &[&mapped]].concat(), &neighbours);
}
