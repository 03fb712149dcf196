//! The message layer on the real kernel: every HTTP request an allowed workload sends to IMDS is
//! classified (`token`, `v2`, `v1`), v1 users are named, `imds = "v2"` refuses v1 requests at
//! once, and `paths`/`deny_paths` say what a workload may read.

use imds_guard_tests::{
    Agent, Client, ConfigFile, EACCES, EPERM, Gate, IMDS_V4, IMDS_V6, MOCK_INSTANCE_ID, Sandbox,
    TestCgroup, assert_fields, free_port, http_get, imds_guard, sample, setup,
};
use serde_json::{Value, json};

/// Three workloads, three cgroups under the attach point.
const LEGACY: u32 = 2101;
const MODERN: u32 = 2102;
const MIXED: u32 = 2103;

fn agent_with(config: &ConfigFile) -> Agent {
    Agent::start(&["--config", &config.arg()])
}

/// Two workloads under two rules: `modern` (`imds = "v2"`) and `legacy` (any request), the mock
/// answering tokenless requests. Fields drop in order: the agent, the cgroups, the sandbox.
struct TwoRules {
    agent: Agent,
    modern: TestCgroup,
    legacy: TestCgroup,
    _config: ConfigFile,
    attach: TestCgroup,
    sandbox: Sandbox,
}

impl TwoRules {
    fn start(tag: &str) -> Option<Self> {
        let (sandbox, attach) = setup(tag)?;
        let config = ConfigFile::new(&format!(
            "cgroup = \"{0}\"\n\
             [[allow]]\nname = \"modern\"\ncgroup = \"{0}/modern\"\nimds = \"v2\"\n\
             [[allow]]\nname = \"legacy\"\ncgroup = \"{0}/legacy\"\n",
            attach.path
        ));
        sandbox.answer_v1(true);
        // The cgroups exist before the agent starts: one made after it is judged by the rules
        // for a cgroup it has not seen until it has its entry, and the first request raced
        // that under a loaded machine's test run (EPERM at connect instead of EACCES at write).
        let (modern, legacy) = (attach.child("modern"), attach.child("legacy"));
        Some(Self {
            agent: agent_with(&config),
            modern,
            legacy,
            _config: config,
            attach,
            sandbox,
        })
    }
}

/// The one event of the packet layer `agent` reported, once an attempt made after it in `denied`
/// (a cgroup no rule lets through) is in.
fn one_egress_event(agent: &Agent, sandbox: &Sandbox, denied: &TestCgroup) -> Value {
    let barrier = Client::new(sandbox, denied, 4242, 4242).tcp(IMDS_V4, 80);
    let _ = agent.wait_events_of(barrier.pid, 1);
    let events: Vec<_> = (agent.events().into_iter())
        .filter(|event| event["hook"] == "egress")
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    events[0].clone()
}

fn http_events(agent: &Agent, pid: u32) -> Vec<Value> {
    agent
        .events_of(pid)
        .into_iter()
        .filter(|event| event["hook"] == "http")
        .collect()
}

#[test]
fn v1_users_are_named_and_nothing_is_refused_in_audit_mode() {
    let Some((sandbox, attach)) = setup("http-audit") else {
        return;
    };
    let config = ConfigFile::new(&format!(
        "cgroup = \"{}\"\nmode = \"audit\"\nimds = \"v2\"\n",
        attach.path
    ));
    let port = free_port();
    let mut agent = Agent::start(&[
        "--config",
        &config.arg(),
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    let legacy = attach.child("legacy");
    let modern = attach.child("modern");
    let mixed = attach.child("mixed");

    // The mock refuses tokenless requests (401), as `HttpTokens=required` does: what matters
    // is that the request reached it, not refused by us.
    let v1 = Client::new(&sandbox, &legacy, LEGACY, LEGACY).route("v1", IMDS_V4, 80);
    assert_eq!(v1.errno, None, "audit mode refused nothing: {v1:?}");
    assert!(
        v1.detail.contains("401"),
        "the mock saw the v1 request: {v1:?}"
    );
    let v2 = Client::new(&sandbox, &modern, MODERN, MODERN).imds(IMDS_V4, 80);
    v2.assert_ok(MOCK_INSTANCE_ID);
    let both = Client::new(&sandbox, &mixed, MIXED, MIXED).route("keepalive", IMDS_V6, 80);
    both.assert_ok("200 200 401 200");

    let legacy_events = agent.wait_events_of(v1.pid, 2);
    let request = legacy_events
        .iter()
        .find(|event| event["hook"] == "http")
        .expect("an http event for the v1 request");
    assert_fields(
        request,
        &[
            ("verdict", json!("audit")),
            ("imds_version", json!("v1")),
            ("request", json!("GET /latest/meta-data/instance-id")),
            ("refused", json!("v1")),
            ("uid", json!(LEGACY)),
            ("cgroup", json!(legacy.path)),
            ("dst", json!("169.254.169.254")),
        ],
    );
    let mixed_events = agent.wait_events_of(both.pid, 2);
    let mixed_http: Vec<_> = mixed_events
        .iter()
        .filter(|e| e["hook"] == "http")
        .collect();
    assert_eq!(
        mixed_http.len(),
        1,
        "one v1 request of three: {mixed_http:?}"
    );
    assert_eq!(mixed_http[0]["dst"], "fd00:ec2::254");
    // The v2 flow is counted, not reported.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        http_events(&agent, v2.pid).is_empty(),
        "{:?}",
        agent.events_of(v2.pid)
    );

    // Counted by version and by the rule that let the connection through (none: the mode's).
    let (_, metrics) = http_get(port, "/metrics");
    for (version, count) in [("v1", 2), ("v2", 3), ("token", 2)] {
        let series = format!(
            "imds_guard_http_requests_total{{rule=\"default\",imds_version=\"{version}\"}}"
        );
        assert_eq!(sample(&metrics, &series), count, "{series} in:\n{metrics}");
    }
    assert_eq!(
        sample(&metrics, "imds_guard_http_refused_total"),
        0,
        "{metrics}"
    );

    // `report` names exactly the v1 users, from the agent's own stream.
    assert!(agent.stop().success(), "{}", agent.stderr());
    assert_report_names(
        &agent,
        &[(&legacy.path, LEGACY), (&mixed.path, MIXED)],
        &modern.path,
    );
}

/// `imds-guard report` on `agent`'s events names exactly `v1_users` (cgroup, uid) in its summary
/// line and counts a v1 request for each; `v2_only` appears with none.
fn assert_report_names(agent: &Agent, v1_users: &[(&str, u32)], v2_only: &str) {
    let stream: Vec<String> = agent.events().iter().map(Value::to_string).collect();
    let recorded = ConfigFile::new(&(stream.join("\n") + "\n"));
    let out = imds_guard(&["report", &recorded.arg()]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).expect("UTF-8");
    let prefix = format!("{} workloads still use IMDSv1: ", v1_users.len());
    let summary = table
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no summary naming {v1_users:?}:\n{table}"));
    let mut named: Vec<&str> = summary.split(", ").collect();
    named.sort_unstable();
    let mut expected: Vec<String> = (v1_users.iter())
        .map(|(cgroup, uid)| format!("cgroup {cgroup} (uid {uid})"))
        .collect();
    expected.sort_unstable();
    assert_eq!(named, expected, "{table}");
    let json = imds_guard(&["report", "--format", "json", &recorded.arg()]);
    let workloads: Value = serde_json::from_slice(&json.stdout).expect("report --format json");
    let v1_of = |cgroup: &str| {
        (workloads.as_array().expect("an array").iter())
            .find(|w| w["cgroup"] == cgroup)
            .map(|w| w["v1"].clone())
    };
    for (cgroup, _) in v1_users {
        assert_eq!(v1_of(cgroup), Some(json!(1)), "{workloads}");
    }
    // Its connect was audited, its requests were not reported.
    assert_eq!(v1_of(v2_only), Some(json!(0)), "{workloads}");
}

#[test]
fn imds_v2_refuses_v1_requests_at_once_request_by_request() {
    let Some(rules) = TwoRules::start("http-v2") else {
        return;
    };
    let TwoRules {
        sandbox,
        agent,
        modern,
        legacy,
        ..
    } = &rules;

    let refused = Client::new(sandbox, modern, MODERN, MODERN).route("v1", IMDS_V4, 80);
    refused.assert_errno(EACCES);
    let events = agent.wait_events_of(refused.pid, 1);
    assert_fields(
        &events[0],
        &[
            ("verdict", json!("deny")),
            ("hook", json!("http")),
            ("imds_version", json!("v1")),
            ("refused", json!("v1")),
            ("rule", json!("modern")),
            ("request", json!("GET /latest/meta-data/instance-id")),
        ],
    );
    // The same workload's v2 flow goes through; so does a v1 GET under the other rule.
    Client::new(sandbox, modern, MODERN, MODERN)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    Client::new(sandbox, legacy, LEGACY, LEGACY)
        .route("v1", IMDS_V6, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    // Keep-alive: token, v2 and the v1 request judged one by one; the v1 one fails its write,
    // and nothing after it goes through on that connection.
    Client::new(sandbox, modern, MODERN, MODERN)
        .route("keepalive", IMDS_V4, 80)
        .assert_ok("200 200 EACCES");
    // Headers split over writes, with mixed-case names: still v2, or still v1.
    Client::new(sandbox, modern, MODERN, MODERN)
        .route("split-v2", IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    Client::new(sandbox, modern, MODERN, MODERN)
        .route("split-v1", IMDS_V4, 80)
        .assert_errno(EACCES);
    // One write longer than a run reads, the deciding header runs in: still v2, or still v1.
    Client::new(sandbox, modern, MODERN, MODERN)
        .route("long-v2", IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    Client::new(sandbox, modern, MODERN, MODERN)
        .route("long-v1", IMDS_V4, 80)
        .assert_errno(EACCES);
}

#[test]
fn paths_and_deny_paths_say_what_a_workload_may_read() {
    let Some((sandbox, attach)) = setup("http-paths") else {
        return;
    };
    let config = ConfigFile::new(&format!(
        "cgroup = \"{0}\"\n\
         [[allow]]\nname = \"controller\"\ncgroup = \"{0}/controller\"\n\
         paths = [\"/latest/meta-data/placement/*\", \"/latest/meta-data/instance-id\"]\n\
         [[allow]]\nname = \"agent\"\ncgroup = \"{0}/agent\"\n\
         deny_paths = [\"/latest/meta-data/iam/**\", \"/latest/user-data\"]\n",
        attach.path
    ));
    // The cgroups exist before the agent starts: a cgroup made after it is judged by the rules
    // of every cgroup until the agent has given it its entry (`cgroups.rs` tests that wait),
    // and under a loaded machine's test run the first request raced that.
    let controller = attach.child("controller");
    let other = attach.child("agent");
    let agent = agent_with(&config);
    let region = "/latest/meta-data/placement/region";
    let credentials = "/latest/meta-data/iam/security-credentials/role";

    let client = |cgroup, path: &str| Client::new(&sandbox, cgroup, MODERN, MODERN).path(path);
    client(&controller, region)
        .route("v2", IMDS_V4, 80)
        .assert_ok(region);
    let denied = client(&controller, credentials).route("v2", IMDS_V4, 80);
    denied.assert_errno(EACCES);
    let events = agent.wait_events_of(denied.pid, 1);
    assert_fields(
        &events[0],
        &[
            ("verdict", json!("deny")),
            ("refused", json!("path")),
            ("imds_version", json!("v2")),
            ("request", json!(format!("GET {credentials}"))),
            ("rule", json!("controller")),
        ],
    );
    // No token's value ever reaches an event.
    assert!(
        !events[0].to_string().contains("mockToken"),
        "{}",
        events[0]
    );
    // Each request in one write, as the SDKs and curl send it: the same verdicts.
    client(&controller, region)
        .route("sdk-v2", IMDS_V4, 80)
        .assert_ok(region);
    client(&controller, credentials)
        .route("sdk-v2", IMDS_V4, 80)
        .assert_errno(EACCES);
    // Written in pieces, and in another case: still refused.
    client(&controller, credentials)
        .route("split-v2", IMDS_V4, 80)
        .assert_errno(EACCES);
    client(
        &controller,
        "/latest/meta-data/placement/../iam/security-credentials/role",
    )
    .route("v2", IMDS_V4, 80)
    .assert_errno(EACCES);
    client(&other, "/latest/meta-data/IAM/security-credentials/role")
        .route("v2", IMDS_V4, 80)
        .assert_errno(EACCES);
    client(&other, region)
        .route("v2", IMDS_V6, 80)
        .assert_ok(region);
    // The rule's second pattern (each is judged on its own in the kernel).
    client(&other, "/latest/user-data")
        .route("v2", IMDS_V4, 80)
        .assert_errno(EACCES);
    // An allowed request and a denied one in one write: the first is answered, the second
    // refused.
    client(&controller, credentials)
        .route("pipelined", IMDS_V4, 80)
        .assert_ok("EACCES 200");
    // Two allowed ones, the byte ending the first at every place of the kernel's reads: each
    // time both answered (a run that passed bytes of the second unread, or read them as the
    // first's, would refuse or misjudge it).
    client(&other, region)
        .route("pipelined-padded", IMDS_V4, 80)
        .assert_ok(&["200 200"; 8].join(","));
}

/// The request never reached the mock: the client's read timed out (`EAGAIN`, or `timeout` in
/// an HTTP conversation's body), or the mock, which never got a whole request, closed the
/// connection when its own read timed out.
fn assert_unanswered(outcome: &imds_guard_tests::Outcome) {
    let unanswered = match outcome.errno {
        Some(errno) => errno == libc::EAGAIN,
        None => matches!(
            outcome.detail.as_str(),
            "timeout" | "unexpected end of file"
        ),
    };
    assert!(unanswered, "expected no answer: {outcome:?}");
}

/// What the message layer cannot read is refused where a rule judges requests, and left alone
/// where none does: a request sent with TCP Fast Open (before the connection is in the socket
/// map) and an MPTCP connection (whose subflows send without a write the message program
/// reads): their segments are dropped, so the client gets no answer.
#[test]
fn what_the_message_layer_cannot_read_is_refused_where_rules_judge_requests() {
    let Some(rules) = TwoRules::start("http-unread") else {
        return;
    };
    let TwoRules {
        sandbox,
        agent,
        modern,
        legacy,
        ..
    } = &rules;

    // Fast Open without a cookie: the request is queued before the handshake ends and sent
    // right after it, never written through the message program.
    assert_unanswered(&Client::new(sandbox, modern, MODERN, MODERN).route(
        "fastopen-v1",
        IMDS_V4,
        80,
    ));
    // With data in the SYN (no cookie needed in this namespace).
    sandbox.exec("sysctl", &["-qw", "net.ipv4.tcp_fastopen=5"]);
    assert_unanswered(&Client::new(sandbox, modern, MODERN, MODERN).route(
        "fastopen-v1",
        IMDS_V6,
        80,
    ));
    // With an IPv6 extension header (segment routing, which the namespace accepts) before the
    // TCP header: refused all the same.
    sandbox.exec("sysctl", &["-qw", "net.ipv6.conf.all.seg6_enabled=1"]);
    sandbox.exec("sysctl", &["-qw", "net.ipv6.conf.lo.seg6_enabled=1"]);
    Client::new(sandbox, legacy, LEGACY, LEGACY)
        .route("fastopen-v1-rthdr", IMDS_V6, 80)
        .assert_ok("200");
    assert_unanswered(&Client::new(sandbox, modern, MODERN, MODERN).route(
        "fastopen-v1-rthdr",
        IMDS_V6,
        80,
    ));
    // Urgent data, which a server may keep in the stream or take out of it: what the program
    // read is not then what the server reads. A rule that judges nothing lets it through.
    Client::new(sandbox, legacy, LEGACY, LEGACY)
        .route("urgent-v2", IMDS_V4, 80)
        .assert_ok("200");
    assert_unanswered(&Client::new(sandbox, modern, MODERN, MODERN).route(
        "urgent-v2",
        IMDS_V4,
        80,
    ));
    // A rule that judges no request lets Fast Open through, unread.
    Client::new(sandbox, legacy, LEGACY, LEGACY)
        .route("fastopen-v1", IMDS_V4, 80)
        .assert_ok("200");

    // MPTCP: its subflows send what the application writes without a write the message program
    // reads, so its bytes are unread too: dropped for the rule that judges requests.
    assert_unanswered(&Client::new(sandbox, modern, MODERN, MODERN).route(
        "mptcp-connect",
        IMDS_V4,
        80,
    ));
    let unjudged = agent.status()["counters"]["http_unjudged"].as_u64();
    assert!(unjudged.is_some_and(|n| n >= 3), "{unjudged:?}");
    Client::new(sandbox, legacy, LEGACY, LEGACY)
        .route("mptcp-connect", IMDS_V4, 80)
        .assert_ok("answered");
}

/// A connection opened under one policy and used after a reload (its rule refuses nothing) is
/// still counted: its requests land in the retired generation's counters, which the metrics keep
/// reading until that slot is reused.
#[test]
fn requests_on_a_connection_from_before_a_reload_are_counted() {
    let Some((sandbox, attach)) = setup("http-reload") else {
        return;
    };
    let policy = format!(
        "cgroup = \"{0}\"\n[[allow]]\nname = \"legacy\"\ncgroup = \"{0}/legacy\"\n",
        attach.path
    );
    let config = ConfigFile::new(&policy);
    let port = free_port();
    let agent = Agent::start(&[
        "--config",
        &config.arg(),
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    let legacy = attach.child("legacy");
    // The token is asked for and the connection opened; then the policy is switched (to the
    // same rules, in another generation).
    let outcome = agent.across_reloads(&config, &[&policy], 1, |gate| {
        Client::new(&sandbox, &legacy, LEGACY, LEGACY)
            .hold_at(gate)
            .route("held-imds", IMDS_V4, 80)
    });
    outcome.assert_ok(MOCK_INSTANCE_ID);
    let (_, metrics) = http_get(port, "/metrics");
    for (version, count) in [("token", 1), ("v2", 1)] {
        let series =
            format!("imds_guard_http_requests_total{{rule=\"legacy\",imds_version=\"{version}\"}}");
        assert_eq!(sample(&metrics, &series), count, "{series} in:\n{metrics}");
    }
}

/// A connection's requests are judged by the rule that admitted it only while that rule's policy
/// is in force. Two reloads later the policy's slot (its generation) holds another policy, whose
/// rule of the same id is another rule: the connection must not be judged by that one. Here it
/// would have let `LEGACY` read what only uid 4242 may, which no policy ever allowed `LEGACY`.
#[test]
fn a_connection_is_not_judged_by_another_policys_rule_of_the_same_id() {
    let Some((sandbox, attach)) = setup("http-epoch") else {
        return;
    };
    let rules = |first: (&str, u32, &str), second: (&str, u32, &str)| {
        [first, second].iter().fold(
            format!("cgroup = \"{}\"\n", attach.path),
            |config, (name, uid, paths)| {
                config + &format!("[[allow]]\nname = \"{name}\"\nuid = {uid}\npaths = [{paths}]\n")
            },
        )
    };
    let token = "\"/latest/api/token\"";
    let token_and_id = "\"/latest/api/token\", \"/latest/meta-data/instance-id\"";
    // The connection is admitted by rule 2 ("app": tokens only); after two switches rule 2 is
    // "other", which may read the instance id.
    let before = rules(("other", 4242, token), ("app", LEGACY, token));
    let after = rules(("app", LEGACY, token), ("other", 4242, token_and_id));
    let config = ConfigFile::new(&before);
    let agent = agent_with(&config);
    let held = agent.across_reloads(&config, &[&before, &after], 1, |gate| {
        Client::new(&sandbox, &attach, LEGACY, LEGACY)
            .hold_at(gate)
            .route("held-imds", IMDS_V4, 80)
    });
    assert_ne!(
        held.detail, MOCK_INSTANCE_ID,
        "a request was judged by a rule that never admitted its connection: {held:?}"
    );
    // The rule in force now refuses it too, on a new connection.
    Client::new(&sandbox, &attach, LEGACY, LEGACY)
        .path("/latest/meta-data/instance-id")
        .route("v2", IMDS_V4, 80)
        .assert_errno(EACCES);
}

/// A rule that judges requests (`imds = "v2"`) lets TCP to IMDS through only on connections the
/// message layer reads: those a socket hook let through to IMDS itself. A workload that adds a
/// NAT in its own network namespace (a container's root with `NET_ADMIN`) reaches IMDS by way
/// of another address, a connection the message layer never follows: its requests would go
/// unjudged, v1 included. Refused instead, as whatever the message layer cannot read is; a rule
/// that judges no requests still lets such a connection through.
#[test]
fn a_rule_that_judges_requests_refuses_connections_nat_rewrote_to_imds() {
    const NAT_PORT: u16 = 9080;
    let Some(rules) = TwoRules::start("http-nat") else {
        return;
    };
    rules.sandbox.dnat(
        "iptables",
        "tcp",
        "127.0.0.1",
        NAT_PORT,
        "169.254.169.254:80",
    );
    let through_nat = |cgroup| {
        Client::new(&rules.sandbox, cgroup, MODERN, MODERN).route(
            "v1",
            std::net::Ipv4Addr::LOCALHOST,
            NAT_PORT,
        )
    };
    let refused = through_nat(&rules.modern);
    assert_ne!(refused.detail, MOCK_INSTANCE_ID, "{refused:?}");
    assert_ne!(refused.errno, None, "{refused:?}");
    assert_fields(
        &one_egress_event(&rules.agent, &rules.sandbox, &rules.attach),
        &[
            ("verdict", json!("deny")),
            ("rule", json!("modern")),
            ("rewritten", json!(true)),
            ("port", json!(80)),
        ],
    );
    // A NAT in its namespace that changes only the port: IMDS's port 81 to its port 80. Where
    // the rule judges requests, a TCP connect to IMDS goes to port 80 alone, which the message
    // layer follows; elsewhere the NAT takes it there.
    rules.sandbox.dnat(
        "iptables",
        "tcp",
        "169.254.169.254",
        81,
        "169.254.169.254:80",
    );
    let port_rewritten =
        |cgroup| Client::new(&rules.sandbox, cgroup, MODERN, MODERN).route("v1", IMDS_V4, 81);
    port_rewritten(&rules.modern).assert_errno(EPERM);
    port_rewritten(&rules.legacy).assert_ok(MOCK_INSTANCE_ID);
    // Directly, the message layer reads the requests: v2 answered, v1 refused at its write.
    Client::new(&rules.sandbox, &rules.modern, MODERN, MODERN)
        .route("v2", IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    // The rule that judges no requests: through the same NAT, v1 answered.
    through_nat(&rules.legacy).assert_ok(MOCK_INSTANCE_ID);
}

/// A container under a rule that judges requests, let through to IMDS (its verdict remembered on
/// the socket, the message layer following its connection), connects the same socket again, to
/// an address its NAT takes to IMDS, and sends a v1 request there. Refused: the new connection
/// gets neither the verdict remembered for the last one nor a pass for the bytes the message
/// layer read of it. (Its SYN is dropped. Before the packet layer told a reconnected socket's
/// packets from its last connection's, the message layer, still following the socket, refused
/// the request at its write: a route closed twice over.)
#[test]
fn a_socket_connected_again_through_a_nat_keeps_nothing_of_its_last_connection() {
    let Some((sandbox, attach)) = setup("http-reconnect") else {
        return;
    };
    let container = attach
        .child("system.slice")
        .child(&format!("docker-{}.scope", "5d".repeat(32)));
    let config = ConfigFile::new(&format!(
        "cgroup = \"{0}\"\n\
         [[allow]]\nname = \"web\"\ncgroup = \"{0}/system.slice/docker-*.scope\"\nimds = \"v2\"\n",
        attach.path
    ));
    sandbox.answer_v1(true);
    sandbox.dnat("iptables", "tcp", "127.0.0.1", 9080, "169.254.169.254:80");
    let _agent = agent_with(&config);
    let outcome = Client::new(&sandbox, &container, 0, 0)
        .namespaces("pid,cgroup")
        .path("/latest/meta-data/instance-id")
        .route("reconnect-nat", std::net::Ipv4Addr::LOCALHOST, 9080);
    assert_ne!(outcome.detail, MOCK_INSTANCE_ID, "{outcome:?}");
    // The v2 conversation on IMDS itself went through: what failed is the second connection.
    assert!(
        !outcome.detail.starts_with("v2 on IMDS itself"),
        "{outcome:?}"
    );
}

/// A connection to IMDS opened before the agent started was never followed by the message layer:
/// under a rule that judges requests, its requests cannot be judged, so it is refused at its next
/// packet (the client reconnects and is judged). Before, its requests went through unread.
#[test]
fn a_connection_from_before_the_agent_is_refused_where_the_rule_judges_requests() {
    let Some((sandbox, attach)) = setup("http-before") else {
        return;
    };
    let modern = attach.child("modern");
    let config = ConfigFile::new(&format!(
        "cgroup = \"{0}\"\n[[allow]]\nname = \"modern\"\ncgroup = \"{0}/modern\"\nimds = \"v2\"\n",
        attach.path
    ));
    let gate = Gate::new();
    let (held, agent) = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            Client::new(&sandbox, &modern, MODERN, MODERN)
                .hold_at(&gate)
                .route("held-imds", IMDS_V4, 80)
        });
        assert!(
            gate.wait_for(1, std::time::Duration::from_secs(30), || client
                .is_finished()),
            "the connection was not opened before the agent started"
        );
        let agent = agent_with(&config);
        gate.open();
        (client.join().expect("client"), agent)
    });
    assert_ne!(held.detail, MOCK_INSTANCE_ID, "{held:?}");
    // A new connection is followed: its v2 request is answered.
    Client::new(&sandbox, &modern, MODERN, MODERN)
        .route("v2", IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    assert_fields(
        &one_egress_event(&agent, &sandbox, &attach),
        &[
            ("verdict", json!("deny")),
            ("rule", json!("modern")),
            ("rewritten", json!(false)),
        ],
    );
}

/// A keep-alive connection a rule let in while it judged fewer requests (audit mode's, or one
/// that judged none), still open when a reload makes the rule refuse v1, has its v1 request
/// refused: the packet layer, deciding its packets by the rule now in force, drops what the
/// message layer judged by the old one (and its next write fails at once). Before, it went on
/// sending v1 requests unrefused: the rollouts from audit to enforce and from v1 to v2.
#[test]
fn connections_a_rule_let_in_while_it_judged_less_are_judged_by_it_now() {
    let Some((sandbox, attach)) = setup("http-rollout") else {
        return;
    };
    let rule = |imds: &str| format!("[[allow]]\nname = \"app\"\nuid = {LEGACY}\n{imds}");
    let v2 = format!("cgroup = \"{}\"\n{}", attach.path, rule("imds = \"v2\"\n"));
    sandbox.answer_v1(true);
    for before in [
        format!(
            "cgroup = \"{}\"\nmode = \"audit\"\n{}",
            attach.path,
            rule("imds = \"v2\"\n")
        ),
        format!("cgroup = \"{}\"\n{}", attach.path, rule("")),
    ] {
        let config = ConfigFile::new(&before);
        let agent = agent_with(&config);
        let held = agent.across_reloads(&config, &[&v2], 1, |gate| {
            Client::new(&sandbox, &attach, LEGACY, LEGACY)
                .hold_at(gate)
                .route("held-v1", IMDS_V4, 80)
        });
        assert_ne!(held.detail, MOCK_INSTANCE_ID, "{before}: {held:?}");
        // Under the policy in force, a new connection's v1 request is refused at its write.
        Client::new(&sandbox, &attach, LEGACY, LEGACY)
            .route("v1", IMDS_V4, 80)
            .assert_errno(EACCES);
    }
}
