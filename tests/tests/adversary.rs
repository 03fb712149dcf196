//! A workload that is not allowed, trying harder: raw sockets as container root, dropping
//! privileges after starting allowed, moving to another cgroup, another network namespace,
//! other spellings of the address, and sockets passed between processes. Each route is tried
//! in enforce mode (it must fail and be reported) and, where the result differs, in audit mode
//! (it goes through and is reported exactly once). `THREAT_MODEL.md` says which test covers what.
//!
//! `IMDS_GUARD_TEST_AGENT_OFF=1` runs these with the programs detached: each test then fails.

use std::net::IpAddr;

use imds_guard_tests::{
    Agent, Client, ConfigFile, EPERM, IMDS_V4, IMDS_V6, MOCK_INSTANCE_ID, Outcome, Sandbox,
    TestCgroup, assert_fields, privileged, setup,
};
use serde_json::{Value, json};

const USER: u32 = 1000;
const MODES: [&str; 2] = ["enforce", "audit"];

/// Root is allowed on the host, not in `ctr-*` cgroups (container root is host root).
fn config(attach: &TestCgroup, mode: &str, extra: &str) -> ConfigFile {
    ConfigFile::new(&format!(
        "cgroup = \"{0}\"\nmode = \"{mode}\"\n\
         [[allow]]\nname = \"host root\"\nuid = 0\nnot_cgroup = \"{0}/ctr-*\"\n{extra}",
        attach.path
    ))
}

/// The outcome a denied attempt must have in `mode`.
fn assert_judged(mode: &str, outcome: &Outcome, what: &str) {
    match mode {
        "enforce" => assert_eq!(
            outcome.errno,
            Some(EPERM),
            "{what}: not refused: {outcome:?}"
        ),
        _ => assert_eq!(
            outcome.errno, None,
            "{what}: refused in audit mode: {outcome:?}"
        ),
    }
}

#[test]
fn raw_sockets_of_container_root_are_dropped_at_the_packet_layer_and_reported() {
    if !privileged() {
        return;
    }
    for mode in MODES {
        let (sandbox, attach) = (Sandbox::new(), TestCgroup::new("test"));
        // The containers exist before the agent starts: this test is about the packet layer,
        // not about how fast the agent follows a new cgroup (until it has, a new cgroup gets
        // its parent's rules, which let root through).
        let containers: Vec<TestCgroup> =
            (0..3).map(|i| attach.child(&format!("ctr-{i}"))).collect();
        let config = config(&attach, mode, "");
        let agent = Agent::start(&["--config", &config.arg()]);
        let cases: [(&str, IpAddr, u16, &str, &str); 3] = [
            ("raw-udp", IMDS_V4.into(), 53, "udp", "ping"),
            ("raw-udp", IMDS_V6.into(), 53, "udp", "ping"),
            ("raw-syn", IMDS_V4.into(), 80, "tcp", "syn-ack"),
        ];
        for (i, (route, addr, port, protocol, reply)) in cases.into_iter().enumerate() {
            // Host root's raw packets reach the mock IMDS: the route works.
            let host = Client::new(&sandbox, &attach, 0, 0).route(route, addr, port);
            assert_eq!(
                host.errno, None,
                "{route} to {addr} fails for host root: {host:?}"
            );
            assert_eq!(host.detail, reply);
            let container = &containers[i];
            let outcome = Client::new(&sandbox, container, 0, 0).route(route, addr, port);
            assert_judged(mode, &outcome, &format!("{mode}: {route} to {addr}"));
            let barrier = Client::new(&sandbox, &attach, USER, USER).tcp(IMDS_V4, 80);
            let events = agent.packet_events_in(container, &barrier);
            assert_eq!(events.len(), 1, "{mode}: {route} to {addr}: {events:?}");
            assert_fields(
                &events[0],
                &[
                    ("verdict", imds_guard_tests::verdict_in(mode)),
                    ("uid", json!(0)),
                    ("gid", Value::Null),
                    ("pid", Value::Null),
                    ("dst", json!(addr.to_string())),
                    ("port", json!(port)),
                    ("protocol", json!(protocol)),
                    ("rule", json!("default")),
                ],
            );
        }
    }
}

#[test]
fn a_child_that_drops_from_allowed_root_to_a_denied_uid_is_judged_as_that_uid() {
    if !privileged() {
        return;
    }
    for mode in MODES {
        let (sandbox, attach) = (Sandbox::new(), TestCgroup::new("test"));
        let config = config(&attach, mode, "");
        let agent = Agent::start(&["--config", &config.arg()]);
        let outcome =
            Client::new(&sandbox, &attach, 0, 0)
                .drop_to(USER)
                .route("child-connect", IMDS_V4, 80);
        assert_judged(mode, &outcome, "child after setuid");
        let events = agent.wait_events_of(outcome.pid, 1);
        assert_fields(
            &events[0],
            &[
                ("uid", json!(USER)),
                ("verdict", imds_guard_tests::verdict_in(mode)),
            ],
        );
        // Still root: allowed, not reported.
        let root_child = Client::new(&sandbox, &attach, 0, 0).route("child-connect", IMDS_V4, 80);
        assert_eq!(root_child.errno, None);
        let barrier = Client::new(&sandbox, &attach, USER, USER).tcp(IMDS_V4, 80);
        let _ = agent.wait_events_of(barrier.pid, 1);
        assert_eq!(agent.events_of(outcome.pid).len(), 1, "reported once");
        assert!(agent.events_of(root_child.pid).is_empty());
    }
}

#[test]
fn moving_to_another_cgroup_gives_nothing_a_rule_does_not() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let allowed = attach.child("allowed");
    // A subtree delegated to the workload's user, as systemd does for user sessions.
    let delegated = attach.child("delegated");
    let (from, to) = (delegated.child("a"), delegated.child("b"));
    for dir in [&delegated.dir, &from.dir, &to.dir] {
        for path in [dir.clone(), dir.join("cgroup.procs")] {
            nix::unistd::chown(&path, Some(USER.into()), Some(USER.into())).expect("chown");
        }
    }
    let config = config(
        &attach,
        "enforce",
        &format!(
            "[[allow]]\nname = \"allowed\"\ncgroup = \"{}\"\n",
            allowed.path
        ),
    );
    let agent = Agent::start(&["--config", &config.arg()]);

    // Within its delegation it can move, and is judged where it lands.
    let moved = Client::new(&sandbox, &from, USER, USER)
        .move_to(&to.dir)
        .tcp(IMDS_V4, 80);
    assert_eq!(
        moved.moved,
        Some(true),
        "the delegated move failed: {moved:?}"
    );
    moved.assert_errno(EPERM);
    let events = agent.wait_events_of(moved.pid, 1);
    assert_fields(&events[0], &[("cgroup", json!(to.path))]);
    // Into the allowed cgroup it cannot: the kernel refuses the move.
    let escape = Client::new(&sandbox, &from, USER, USER)
        .move_to(&allowed.dir)
        .tcp(IMDS_V4, 80);
    assert_eq!(
        escape.moved,
        Some(false),
        "moved out of its delegation: {escape:?}"
    );
    escape.assert_errno(EPERM);
    // The allowed cgroup itself is allowed: the rule works.
    Client::new(&sandbox, &allowed, USER, USER)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
}

#[test]
fn every_network_namespace_is_covered() {
    if !privileged() {
        return;
    }
    // The agent runs in the host's network namespace; workloads in two others.
    let (first, second, attach) = (Sandbox::new(), Sandbox::new(), TestCgroup::new("test"));
    let config = config(&attach, "enforce", "");
    let agent = Agent::start(&["--config", &config.arg()]);
    for sandbox in [&first, &second] {
        let outcome = Client::new(sandbox, &attach, USER, USER).imds(IMDS_V6, 80);
        outcome.assert_errno(EPERM);
        let _ = agent.wait_events_of(outcome.pid, 1);
        Client::new(sandbox, &attach, 0, 0)
            .imds(IMDS_V6, 80)
            .assert_ok(MOCK_INSTANCE_ID);
    }
}

#[test]
fn other_spellings_and_names_of_the_address_are_the_address() {
    if !privileged() {
        return;
    }
    // A temporary file, removed on drop.
    let hosts_file = ConfigFile::new(
        "127.0.0.1 localhost\n169.254.169.254 metadata.internal\nfd00:ec2::254 metadata6.internal\n",
    );
    let hosts = hosts_file.path();
    for mode in MODES {
        let (sandbox, attach) = (Sandbox::new(), TestCgroup::new("test"));
        let config = config(&attach, mode, "");
        let agent = Agent::start(&["--config", &config.arg()]);
        for (spelling, dst) in [
            ("2852039166", "169.254.169.254"),
            ("0xa9fea9fe", "169.254.169.254"),
            ("169.254.43518", "169.254.169.254"),
            ("0251.0376.0251.0376", "169.254.169.254"),
            ("metadata.internal", "169.254.169.254"),
            ("metadata6.internal", "fd00:ec2::254"),
            ("[fd00:ec2:0:0:0:0:0:254]", "fd00:ec2::254"),
        ] {
            let spelling = spelling.trim_matches(|c| c == '[' || c == ']');
            let root = Client::new(&sandbox, &attach, 0, 0)
                .hosts(hosts)
                .route_to_host("tcp", spelling, 80);
            assert_eq!(
                root.errno, None,
                "{spelling} does not reach the mock IMDS: {root:?}"
            );
            let outcome = Client::new(&sandbox, &attach, USER, USER)
                .hosts(hosts)
                .route_to_host("tcp", spelling, 80);
            assert_judged(mode, &outcome, &format!("{mode}: {spelling}"));
            let events = agent.wait_events_of(outcome.pid, 1);
            assert_eq!(events.len(), 1, "{spelling}: {events:?}");
            assert_fields(
                &events[0],
                &[
                    ("dst", json!(dst)),
                    ("verdict", imds_guard_tests::verdict_in(mode)),
                ],
            );
        }
    }
}

#[test]
fn a_passed_socket_is_judged_by_who_connects_it() {
    if !privileged() {
        return;
    }
    for mode in MODES {
        let (sandbox, attach) = (Sandbox::new(), TestCgroup::new("test"));
        let config = config(&attach, mode, "");
        let agent = Agent::start(&["--config", &config.arg()]);
        // Root (allowed) hands an unconnected socket to a process that dropped to USER: the
        // connect is USER's, and judged as USER's.
        let unconnected =
            Client::new(&sandbox, &attach, 0, 0)
                .drop_to(USER)
                .route("passed-socket", IMDS_V4, 80);
        assert_judged(mode, &unconnected, "connect on a passed socket");
        let events = agent.wait_events_of(unconnected.pid, 1);
        assert_fields(
            &events[0],
            &[
                ("uid", json!(USER)),
                ("verdict", imds_guard_tests::verdict_in(mode)),
            ],
        );
        // A connection root made stays usable by whoever holds it, as with iptables'
        // owner match (which judges the socket's owner): the decision is made at connect time.
        let connected = Client::new(&sandbox, &attach, 0, 0).drop_to(USER).route(
            "passed-connection",
            IMDS_V4,
            80,
        );
        assert_eq!(connected.errno, None, "{connected:?}");
        let barrier = Client::new(&sandbox, &attach, USER, USER).tcp(IMDS_V4, 80);
        let _ = agent.wait_events_of(barrier.pid, 1);
        assert_eq!(agent.events_of(unconnected.pid).len(), 1, "reported once");
        // Its connect was root's, and allowed: no event of the connect hooks. Its request is
        // still read where it is written: the tokenless GET the holder sends is named as v1.
        let events = agent.events_of(connected.pid);
        assert!(
            events.iter().all(|event| event["hook"] == "http"),
            "the root connect is allowed: {events:?}"
        );
        assert_eq!(
            events.len(),
            1,
            "the holder's v1 request is reported: {events:?}"
        );
        assert_fields(
            &events[0],
            &[
                ("uid", json!(USER)),
                ("imds_version", json!("v1")),
                ("verdict", json!("allow")),
            ],
        );
    }
}
