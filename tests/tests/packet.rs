//! The packet layer judges every packet to a protected address, whatever its socket: the
//! routes around the socket hooks. NAT in the workload's own network namespace (what a
//! container or pod with `CAP_NET_ADMIN` can add) rewrites a harmless destination to IMDS after
//! the hooks judged it; ICMP echo sockets, connected UDP-Lite and Multipath TCP are protocols
//! the socket hooks see partly or not at all.
//!
//! For each route, as a denied workload: in enforce mode nothing gets through and the attempt is
//! reported once (`hook` `egress`); in audit mode it goes through and is reported once. Root,
//! allowed, takes the same route to show that it really reaches the mock IMDS, and a workload
//! allowed only by its gid (which packets do not carry) still gets its answers.
//!
//! `IMDS_GUARD_TEST_AGENT_OFF=1` runs these with the programs detached: each test then fails.

use std::net::IpAddr;

use imds_guard_tests::{
    Agent, Client, ConfigFile, EPERM, IMDS_V4, IMDS_V6, MOCK_INSTANCE_ID, Sandbox, TestCgroup,
    agent_binary, assert_fields, privileged, setup,
};
use serde_json::{Value, json};

const ETIMEDOUT: i32 = libc::ETIMEDOUT;
const USER: u32 = 1000;
/// A user allowed only through its primary group.
const GROUP_MEMBER: u32 = 3000;
const ALLOWED_GID: u32 = 2000;
const MODES: [&str; 2] = ["enforce", "audit"];
/// Local ports the NAT rules rewrite to the IMDS addresses.
const NAT_TCP_PORT: u16 = 8081;
const NAT_UDP_PORT: u16 = 5353;

fn config(attach: &TestCgroup, mode: &str) -> ConfigFile {
    ConfigFile::new(&format!(
        "cgroup = \"{}\"\nmode = \"{mode}\"\n\
         [[allow]]\nname = \"root\"\nuid = 0\n\
         [[allow]]\nname = \"group\"\ngid = {ALLOWED_GID}\n",
        attach.path
    ))
}

/// What a workload with `CAP_NET_ADMIN` in its own network namespace can do: rewrite a local
/// destination to IMDS on the output path, after the socket hooks have judged it.
fn add_nat_to_imds(sandbox: &Sandbox) {
    for (tool, from, to_v4, to_v6) in [
        (
            "iptables",
            "127.0.0.1",
            "169.254.169.254:80",
            "169.254.169.254:53",
        ),
        (
            "ip6tables",
            "::1",
            "[fd00:ec2::254]:80",
            "[fd00:ec2::254]:53",
        ),
    ] {
        for (protocol, port, to) in [("tcp", NAT_TCP_PORT, to_v4), ("udp", NAT_UDP_PORT, to_v6)] {
            sandbox.dnat(tool, protocol, from, port, to);
        }
    }
}

/// The loopback address whose NAT rules lead to the IMDS address of `imds`'s family.
fn nat_entry(imds: IpAddr) -> IpAddr {
    if imds.is_ipv4() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
    }
}

#[test]
fn destinations_rewritten_to_imds_by_nat_are_judged_at_the_packet_layer() {
    if !privileged() {
        return;
    }
    for mode in MODES {
        let (sandbox, attach) = (Sandbox::new(), TestCgroup::new("test"));
        add_nat_to_imds(&sandbox);
        // One cgroup per case, so that each packet event (which names no process) is told
        // apart; they exist before the agent starts.
        let cases: Vec<TestCgroup> = (0..6).map(|i| attach.child(&format!("case-{i}"))).collect();
        let config = config(&attach, mode);
        let agent = Agent::start(&["--config", &config.arg()]);
        let mut case = cases.iter();
        for imds in [IpAddr::from(IMDS_V4), IMDS_V6.into()] {
            let entry = nat_entry(imds);
            // Root is allowed: through the same rewrite it gets its answer.
            Client::new(&sandbox, &attach, 0, 0)
                .imds(entry, NAT_TCP_PORT)
                .assert_ok(MOCK_INSTANCE_ID);
            // A workload allowed by its gid, which packets do not carry: the socket hooks
            // allowed it, and the packet layer lets its packets through.
            let member = Client::new(&sandbox, &attach, GROUP_MEMBER, ALLOWED_GID);
            member.imds(imds, 80).assert_ok(MOCK_INSTANCE_ID);
            let datagram = member.udp(imds, 53);
            assert_eq!(
                datagram.errno, None,
                "{mode}: gid-allowed UDP: {datagram:?}"
            );

            // TCP: the SYN is dropped after NAT. The kernel's TCP ignores a local drop and
            // retransmits (each dropped too), so the connect fails at the client's timeout.
            let tcp_case = case.next().expect("case");
            let tcp = Client::new(&sandbox, tcp_case, USER, USER).imds(entry, NAT_TCP_PORT);
            // Connected UDP: the send fails with EPERM at once.
            let udp_case = case.next().expect("case");
            let udp = Client::new(&sandbox, udp_case, USER, USER).route(
                "connected-udp",
                entry,
                NAT_UDP_PORT,
            );
            if mode == "enforce" {
                assert_eq!(
                    tcp.errno,
                    Some(ETIMEDOUT),
                    "TCP through NAT to {imds}: {tcp:?}"
                );
                assert_eq!(udp.errno, Some(EPERM), "UDP through NAT to {imds}: {udp:?}");
            } else {
                tcp.assert_ok(MOCK_INSTANCE_ID);
                assert_eq!(udp.errno, None, "audit: UDP through NAT to {imds}: {udp:?}");
            }
            // An IPv6 socket to the IPv4-mapped loopback address sends IPv4 packets, which the
            // IPv4 rule rewrites: judged the same.
            let mapped_case = case.next().expect("case");
            let mapped = imds.is_ipv4().then(|| {
                let entry = IpAddr::from(std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped());
                Client::new(&sandbox, mapped_case, USER, USER).imds(entry, NAT_TCP_PORT)
            });
            if let Some(mapped) = &mapped {
                if mode == "enforce" {
                    assert_eq!(
                        mapped.errno,
                        Some(ETIMEDOUT),
                        "mapped TCP through NAT: {mapped:?}"
                    );
                } else {
                    mapped.assert_ok(MOCK_INSTANCE_ID);
                }
            }
            let barrier = Client::new(&sandbox, &attach, USER, USER).tcp(IMDS_V4, 80);
            // Audited, the IMDSv2 exchange makes two connections (token, then the request),
            // each an attempt of its own; refused, the first one ends it.
            let connections = if mode == "enforce" { 1 } else { 2 };
            let mut judged = vec![(tcp_case, "tcp", 80, connections), (udp_case, "udp", 53, 1)];
            if mapped.is_some() {
                judged.push((mapped_case, "tcp", 80, connections));
            }
            for (cgroup, protocol, port, attempts) in judged {
                let events = agent.packet_events_in(cgroup, &barrier);
                assert_eq!(
                    events.len(),
                    attempts,
                    "{mode}: {protocol} through NAT to {imds}, reported once per connection: \
                     {events:?}"
                );
                assert_fields(
                    &events[0],
                    &[
                        ("verdict", imds_guard_tests::verdict_in(mode)),
                        ("uid", json!(USER)),
                        ("pid", Value::Null),
                        ("dst", json!(imds.to_string())),
                        ("port", json!(port)),
                        ("protocol", json!(protocol)),
                        ("rewritten", json!(true)),
                        ("rule", json!("default")),
                        // Its sender owns the socket under that uid: the uid was judged.
                        ("uid_ignored", Value::Null),
                    ],
                );
            }
        }
        // Neither root's nor the gid-allowed workload's packets were reported.
        let reported: Vec<Value> = agent
            .events()
            .into_iter()
            .filter(|event| event["uid"] == json!(0) || event["uid"] == json!(GROUP_MEMBER))
            .collect();
        assert!(
            reported.is_empty(),
            "{mode}: allowed traffic reported: {reported:?}"
        );
    }
}

/// A connected UDP socket's datagrams through NAT are each an attempt, as unconnected ones are:
/// each is judged as its sender's, refused (or audited) and reported on its own, none passed or
/// dropped on the first one's remembered verdict. Root's get through unreported.
#[test]
fn each_datagram_of_a_connected_udp_socket_is_an_attempt() {
    if !privileged() {
        return;
    }
    for mode in MODES {
        let (sandbox, attach) = (Sandbox::new(), TestCgroup::new("test"));
        add_nat_to_imds(&sandbox);
        let cases = [attach.child("v4"), attach.child("v6")];
        let config = config(&attach, mode);
        // Each attempt its own event, none folded into a repeat.
        let agent = Agent::start(&["--config", &config.arg(), "--aggregate-window", "0"]);
        for (imds, cgroup) in [IpAddr::from(IMDS_V4), IMDS_V6.into()]
            .into_iter()
            .zip(&cases)
        {
            let thrice = |uid| {
                Client::new(&sandbox, cgroup, uid, uid).route(
                    "connected-udp-thrice",
                    nat_entry(imds),
                    NAT_UDP_PORT,
                )
            };
            thrice(0).assert_ok("sent sent sent");
            let refused = if mode == "enforce" {
                "EPERM EPERM EPERM"
            } else {
                "sent sent sent"
            };
            thrice(USER).assert_ok(refused);
            let barrier = Client::new(&sandbox, &attach, USER, USER).tcp(IMDS_V4, 80);
            let events = agent.packet_events_in(cgroup, &barrier);
            assert_eq!(
                events.len(),
                3,
                "{mode}: three datagrams to {imds}, three attempts: {events:?}"
            );
            for event in &events {
                assert_fields(
                    event,
                    &[
                        ("verdict", imds_guard_tests::verdict_in(mode)),
                        ("uid", json!(USER)),
                        ("dst", json!(imds.to_string())),
                        ("protocol", json!("udp")),
                        ("rewritten", json!(true)),
                    ],
                );
            }
        }
    }
}

/// A datagram whose IPv4 header carries options (longer than the 20 bytes the packet layer
/// reads in place) is judged as any other, and reported with its protocol and port, read
/// behind the options.
#[test]
fn a_datagram_with_ip_options_through_nat_is_judged_and_reported_whole() {
    if !privileged() {
        return;
    }
    let (sandbox, attach) = (Sandbox::new(), TestCgroup::new("test"));
    add_nat_to_imds(&sandbox);
    let denied = attach.child("denied");
    let config = config(&attach, "enforce");
    let agent = Agent::start(&["--config", &config.arg(), "--aggregate-window", "0"]);
    let entry = nat_entry(IMDS_V4.into());
    let send = |cgroup, uid| {
        Client::new(&sandbox, cgroup, uid, uid).route(
            "connected-udp-ip-options",
            entry,
            NAT_UDP_PORT,
        )
    };
    send(&attach, 0).assert_ok("sent");
    let refused = send(&denied, USER);
    assert_eq!(refused.errno, Some(EPERM), "with IP options: {refused:?}");
    let barrier = Client::new(&sandbox, &attach, USER, USER).tcp(IMDS_V4, 80);
    let events = agent.packet_events_in(&denied, &barrier);
    assert_eq!(events.len(), 1, "one datagram, one attempt: {events:?}");
    assert_fields(
        &events[0],
        &[
            ("verdict", json!("deny")),
            ("uid", json!(USER)),
            ("dst", json!(IpAddr::from(IMDS_V4).to_string())),
            ("port", json!(53)),
            ("protocol", json!("udp")),
            ("rewritten", json!(true)),
        ],
    );
}

/// A datagram sent with an explicit address to IMDS on a UDP socket connected elsewhere is one
/// attempt: `sendmsg4/6` judge and count it, and the packet layer, which sees a destination
/// that is not the socket's peer, neither counts it again nor refuses it (root's, root's
/// with a user's effective uid), however many are sent.
#[test]
fn a_datagram_to_imds_on_a_udp_socket_connected_elsewhere_is_one_attempt() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let agent = Agent::start(&["--cgroup", &attach.path]);
    for imds in [IpAddr::from(IMDS_V4), IMDS_V6.into()] {
        Client::new(&sandbox, &attach, 0, 0)
            .route("sendto-on-connected-udp", imds, 53)
            .assert_ok("sent sent sent");
        Client::new(&sandbox, &attach, 0, 0)
            .effective(USER, USER)
            .route("sendto-on-connected-udp", imds, 53)
            .assert_ok("sent sent sent");
    }
    Client::new(&sandbox, &attach, USER, USER)
        .route("sendto-on-connected-udp", IMDS_V4, 53)
        .assert_ok("EPERM EPERM EPERM");
    assert_eq!(agent.counter("allowed"), 12, "{}", agent.status());
    assert_eq!(agent.counter("denied"), 3, "{}", agent.status());
}

/// A route of a protocol the socket hooks do not (fully) see.
struct Route {
    name: &'static str,
    port: u16,
    /// The protocol an IPv4 and an IPv6 event names.
    protocols: [&'static str; 2],
    /// What the route says when it gets through.
    through: &'static str,
    /// The errno a denied workload sees over IPv4 and IPv6: `EPERM` at once where the kernel
    /// passes the drop on to the sender; where it does not, the reply never comes.
    refused: [i32; 2],
}

const ROUTES: [Route; 3] = [
    // An unprivileged ICMP echo socket: `sendto()` with no socket address hook at all.
    Route {
        name: "ping-echo",
        port: 0,
        protocols: ["icmp", "icmpv6"],
        through: "pong",
        // `ping_v6_sendmsg` ignores what pushing the frame returned: no reply, after 2 s.
        refused: [EPERM, libc::EAGAIN],
    },
    // UDP-Lite has no connect hook, and a connected send skips sendmsg4/6.
    Route {
        name: "udplite-connected",
        port: 53,
        protocols: ["udplite", "udplite"],
        through: "sent",
        refused: [EPERM, EPERM],
    },
    // Multipath TCP: the connection's subflows are kernel sockets.
    Route {
        name: "mptcp-connect",
        port: 80,
        protocols: ["tcp", "tcp"],
        through: "answered",
        refused: [EPERM, EPERM],
    },
];

#[test]
fn protocols_without_socket_hooks_are_judged_at_the_packet_layer() {
    if !privileged() {
        return;
    }
    for mode in MODES {
        let (sandbox, attach) = (Sandbox::new(), TestCgroup::new("test"));
        // Echo sockets for every group in this namespace (the default allows none).
        sandbox.exec("sysctl", &["-qw", "net.ipv4.ping_group_range=0 2147483647"]);
        let cases: Vec<TestCgroup> = (0..2 * ROUTES.len())
            .map(|i| attach.child(&format!("case-{i}")))
            .collect();
        let config = config(&attach, mode);
        let agent = Agent::start(&["--config", &config.arg()]);
        let mut checked = Vec::new();
        let mut case = cases.iter();
        for route in &ROUTES {
            for (family, imds) in [IpAddr::from(IMDS_V4), IMDS_V6.into()]
                .into_iter()
                .enumerate()
            {
                let root = Client::new(&sandbox, &attach, 0, 0).route(route.name, imds, route.port);
                assert_eq!(
                    (root.errno, root.detail.as_str()),
                    (None, route.through),
                    "{}: root to {imds}: {root:?}",
                    route.name
                );
                let cgroup = case.next().expect("case");
                let denied =
                    Client::new(&sandbox, cgroup, USER, USER).route(route.name, imds, route.port);
                if mode == "enforce" {
                    assert_eq!(
                        denied.errno,
                        Some(route.refused[family]),
                        "{}: to {imds} not refused as expected: {denied:?}",
                        route.name
                    );
                } else {
                    assert_eq!(
                        (denied.errno, denied.detail.as_str()),
                        (None, route.through),
                        "{}: to {imds} refused in audit mode: {denied:?}",
                        route.name
                    );
                }
                checked.push((route, family, imds, cgroup, denied));
            }
        }
        let barrier = Client::new(&sandbox, &attach, USER, USER).tcp(IMDS_V4, 80);
        for (route, family, imds, cgroup, denied) in checked {
            let _ = agent.wait_events_of(barrier.pid, 1);
            // Judged where the kernel lets us: at connect for MPTCP, whose first subflow runs
            // the connect hook as the task; at the packet layer for the others.
            let events: Vec<Value> = agent
                .events()
                .into_iter()
                .filter(|event| {
                    event["cgroup"] == json!(cgroup.path) && event["aggregated"] == json!(false)
                })
                .collect();
            assert_eq!(
                events.len(),
                1,
                "{mode}: {} to {imds}, reported once: {events:?}",
                route.name
            );
            let hook = if route.name == "mptcp-connect" {
                json!(if family == 0 { "connect4" } else { "connect6" })
            } else {
                json!("egress")
            };
            assert_fields(
                &events[0],
                &[
                    ("verdict", imds_guard_tests::verdict_in(mode)),
                    ("uid", json!(USER)),
                    ("dst", json!(imds.to_string())),
                    ("protocol", json!(route.protocols[family])),
                    ("hook", hook),
                ],
            );
            let _ = denied;
        }
    }
}

#[test]
fn a_containers_connection_rewritten_to_imds_is_refused_even_when_its_syn_is_retransmitted() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    add_nat_to_imds(&sandbox);
    // The workload's own firewall drops every other SYN to IMDS after the rewrite, so that
    // the SYN the packet layer sees first is a retransmission, sent from a timer: no task to
    // ask then, and the packet layer must not take whatever task is current for the sender.
    sandbox.exec(
        "iptables",
        &[
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "169.254.169.254",
            "--syn",
            "-m",
            "statistic",
            "--mode",
            "nth",
            "--every",
            "2",
            "--packet",
            "0",
            "-j",
            "DROP",
        ],
    );
    let plain = attach.child("plain");
    let config = config(&attach, "enforce");
    let agent = Agent::start(&["--config", &config.arg()]);
    // Container root (its own pid and cgroup namespaces, in a cgroup no runtime names): the
    // rule for root is the host's.
    let refused = Client::new(&sandbox, &plain, 0, 0)
        .namespaces("pid,cgroup")
        .tcp(IpAddr::from([127, 0, 0, 1]), NAT_TCP_PORT);
    assert_eq!(refused.errno, Some(ETIMEDOUT), "{refused:?}");
    let events = agent.packet_events_in(
        &plain,
        &Client::new(&sandbox, &plain, USER, USER).tcp(IMDS_V4, 80),
    );
    assert_eq!(events.len(), 1, "{events:?}");
    assert_fields(
        &events[0],
        &[
            ("hook", json!("egress")),
            ("verdict", json!("deny")),
            ("uid", json!(0)),
            ("rewritten", json!(true)),
            ("in_container", json!(true)),
        ],
    );
}

/// An unprivileged container's root: global uid 100000, uid 0 in the user namespace owning its
/// network namespace, where the packet layer's `bpf_get_socket_uid` maps its sockets' owner.
/// Under a rule that admits uid 0 in containers, its direct connect is judged by its global uid
/// and refused; through a NAT it adds in its own namespace, its packets must not pass as root's.
#[test]
fn a_user_namespaced_containers_root_is_not_root_at_the_packet_layer() {
    const CONTAINER_ROOT: u32 = 100_000;
    if !privileged() {
        return;
    }
    let sandbox = Sandbox::in_user_namespace(CONTAINER_ROOT);
    add_nat_to_imds(&sandbox);
    // With the task reads, and without them (`cgroup paths only`, as on a kernel that refuses
    // them), where no sender can be confirmed.
    for reads in ["", "none"] {
        let attach = TestCgroup::new("test");
        let (tcp_case, udp_case) = (attach.child("tcp"), attach.child("udp"));
        let served = attach.child("served");
        let config = ConfigFile::new(&format!(
            "cgroup = \"{0}\"\n[[allow]]\nname = \"root anywhere\"\nuid = 0\ncontainers = true\n\
             [[allow]]\nname = \"served\"\ncgroup = \"{1}\"\n",
            attach.path, served.path
        ));
        let args = ["--config", &config.arg()];
        let agent = if reads.is_empty() {
            Agent::start(&args)
        } else {
            let env = format!("IMDS_GUARD_TASK_READS={reads}");
            let agent = Agent::start_wrapped(&["env", &env], &agent_binary(), &args);
            assert!(
                agent.stderr().contains("cgroup paths only"),
                "{}",
                agent.stderr()
            );
            agent
        };
        // The namespace serves: a cgroup's rule lets the container's root through directly.
        Client::new(&sandbox, &served, CONTAINER_ROOT, CONTAINER_ROOT)
            .imds(IMDS_V4, 80)
            .assert_ok(MOCK_INSTANCE_ID);
        // The container's root, directly: judged by its global uid.
        Client::new(&sandbox, &tcp_case, CONTAINER_ROOT, CONTAINER_ROOT)
            .imds(IMDS_V4, 80)
            .assert_errno(EPERM);
        // Through the NAT: the SYN is dropped (a timeout), the datagram refused.
        let tcp = Client::new(&sandbox, &tcp_case, CONTAINER_ROOT, CONTAINER_ROOT)
            .imds(nat_entry(IMDS_V4.into()), NAT_TCP_PORT);
        assert_eq!(
            tcp.errno,
            Some(ETIMEDOUT),
            "{reads}: TCP through NAT: {tcp:?}"
        );
        let udp = Client::new(&sandbox, &udp_case, CONTAINER_ROOT, CONTAINER_ROOT).route(
            "connected-udp",
            nat_entry(IMDS_V6.into()),
            NAT_UDP_PORT,
        );
        assert_eq!(udp.errno, Some(EPERM), "{reads}: UDP through NAT: {udp:?}");
        let barrier = Client::new(&sandbox, &attach, USER, USER).tcp(IMDS_V4, 80);
        for (cgroup, protocol) in [(&tcp_case, "tcp"), (&udp_case, "udp")] {
            let events = agent.packet_events_in(cgroup, &barrier);
            assert!(!events.is_empty(), "{reads}: {protocol}: not reported");
            assert_fields(
                &events[0],
                &[
                    ("verdict", json!("deny")),
                    ("rewritten", json!(true)),
                    ("rule", json!("default")),
                    ("protocol", json!(protocol)),
                    // The socket's owner as its namespace maps it, and that it did not count.
                    ("uid", json!(0)),
                    ("uid_ignored", json!(true)),
                ],
            );
        }
    }
}
