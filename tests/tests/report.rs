//! Privileged end-to-end test of the audit-to-enforce path: an agent in audit mode records who
//! touched IMDS, `imds-guard report` says it, `--suggest-policy` turns it into a policy, and
//! that policy, loaded back, lets exactly those workloads through.

use std::net::IpAddr;

use imds_guard_tests::{
    Agent, Client, ConfigFile, EPERM, IMDS_V4, MOCK_INSTANCE_ID, Sandbox, TestCgroup, imds_guard,
    privileged,
};
use serde_json::Value;

const CONTAINER_ID: &str = "9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b";

fn stdout_of(args: &[&str]) -> String {
    let out = imds_guard(args);
    assert!(
        out.status.success(),
        "imds-guard {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn audit_findings_become_a_policy_that_allows_what_was_seen_and_denies_the_rest() {
    if !privileged() {
        return;
    }
    let sandbox = Sandbox::new();
    let attach = TestCgroup::new("report");
    let system = attach.child("system.slice");
    let app = system.child("app.service");
    let container = system.child(&format!("docker-{CONTAINER_ID}.scope"));
    let other = attach.child("other");
    // What an operator starts from: audit mode, host root allowed, containers reported.
    let audited_config = ConfigFile::new(&format!(
        "mode = \"audit\"\ncgroup = \"{}\"\n\n[[allow]]\nname = \"host root\"\nuid = 0\n\
         not_cgroup = \"/**/docker-*.scope\"\n",
        attach.path
    ));

    let mut audit = Agent::start(&["--config", &audited_config.arg()]);
    Client::new(&sandbox, &attach, 0, 0)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    let service = Client::new(&sandbox, &app, 1000, 1000).imds(IMDS_V4, 80);
    service.assert_ok(MOCK_INSTANCE_ID);
    let in_container = Client::new(&sandbox, &container, 1001, 1001).imds(IMDS_V4, 80);
    in_container.assert_ok(MOCK_INSTANCE_ID);
    let _ = audit.wait_events_of(service.pid, 2);
    let _ = audit.wait_events_of(in_container.pid, 2);
    assert!(audit.stop().success(), "{}", audit.stderr());
    let stream: Vec<String> = audit.events().iter().map(Value::to_string).collect();
    let recorded = ConfigFile::new(&(stream.join("\n") + "\n"));

    // Who touched IMDS, for people and for tools.
    let table = stdout_of(&["report", &recorded.arg()]);
    assert!(table.contains("unit app.service"), "{table}");
    assert!(
        table.contains(&format!("docker container {}", &CONTAINER_ID[..12])),
        "{table}"
    );
    let json: Value =
        serde_json::from_str(&stdout_of(&["report", "--format", "json", &recorded.arg()]))
            .expect("report --format json");
    let workloads = json.as_array().expect("an array");
    assert_eq!(
        workloads.len(),
        2,
        "root was allowed by a rule, so never reported: {json}"
    );
    for workload in workloads {
        assert_eq!(workload["audited"], 2, "token and metadata: {workload}");
        assert!(
            workload["exes"][0]
                .as_str()
                .is_some_and(|exe| exe.ends_with("/imds-client")),
            "{workload}"
        );
    }

    let suggested = ConfigFile::new(&stdout_of(&[
        "report",
        "--suggest-policy",
        "--config",
        &audited_config.arg(),
        &recorded.arg(),
    ]));
    let _ = stdout_of(&["check-config", &suggested.arg()]);
    let _enforce = Agent::start(&["--config", &suggested.arg()]);
    // What was seen, and what the audited policy allowed, gets through.
    for (cgroup, uid) in [(&app, 1000), (&container, 1001), (&attach, 0), (&other, 0)] {
        Client::new(&sandbox, cgroup, uid, uid)
            .imds(IMDS_V4, 80)
            .assert_ok(MOCK_INSTANCE_ID);
    }
    // The rest is denied: other uids in the same places, the same uids elsewhere, container
    // root.
    for (cgroup, uid) in [
        (&app, 1002),
        (&container, 1000),
        (&other, 1000),
        (&other, 1001),
        (&container, 0),
    ] {
        Client::new(&sandbox, cgroup, uid, uid)
            .tcp(IMDS_V4, 80)
            .assert_errno(EPERM);
    }
}

/// Packets judged without their uid: an unprivileged container's root (global uid 100000)
/// reaching IMDS through a NAT in its own network namespace, which its user namespace owns (the
/// socket's owner reads as uid 0 there), and a setuid-root program's raw datagram in an
/// ordinary cgroup (root's socket, not its sender's). The events say so. The suggestion lets the
/// container through by its cgroup alone, the only rule that can (one for uid 0 there, what the
/// events' uid says, would never match); the other gets a warning and no rule, as a rule on its
/// cgroup alone would admit every uid there.
#[test]
fn packets_judged_without_their_uid_are_suggested_a_rule_only_where_it_matches_them_alone() {
    const CONTAINER_ROOT: u32 = 100_000;
    const USER: u32 = 1000;
    const NAT_PORT: u16 = 8081;
    if !privileged() {
        return;
    }
    let sandbox = Sandbox::in_user_namespace(CONTAINER_ROOT);
    sandbox.dnat(
        "iptables",
        "tcp",
        "127.0.0.1",
        NAT_PORT,
        "169.254.169.254:80",
    );
    let entry = IpAddr::from([127, 0, 0, 1]);
    let attach = TestCgroup::new("report");
    let container = attach.child("lxc.payload.web");
    let app = attach.child("app");
    let other = attach.child("other");
    let audited_config =
        ConfigFile::new(&format!("mode = \"audit\"\ncgroup = \"{}\"\n", attach.path));

    let mut audit = Agent::start(&["--config", &audited_config.arg()]);
    Client::new(&sandbox, &container, CONTAINER_ROOT, CONTAINER_ROOT)
        .imds(entry, NAT_PORT)
        .assert_ok(MOCK_INSTANCE_ID);
    let raw = Client::new(&sandbox, &app, USER, USER)
        .effective(0, 0)
        .route("raw-udp", IMDS_V4, 53);
    assert_eq!(raw.errno, None, "audited: {raw:?}");
    // A later attempt, elsewhere: once its event is in, so are the packets' (the ring is FIFO).
    let marker = Client::new(&sandbox, &other, 65534, 65534).tcp(IMDS_V4, 80);
    let _ = audit.wait_events_of(marker.pid, 1);
    assert!(audit.stop().success(), "{}", audit.stderr());
    let packets_in = |cgroup: &TestCgroup| -> Vec<Value> {
        (audit.events().into_iter())
            .filter(|event| event["hook"] == "egress" && event["cgroup"] == cgroup.path.as_str())
            .collect()
    };
    // The token's connection and the request's; the datagram.
    let (from_container, from_app) = (packets_in(&container), packets_in(&app));
    assert_eq!(
        (from_container.len(), from_app.len()),
        (2, 1),
        "{from_container:?} {from_app:?}"
    );
    for event in from_container.iter().chain(&from_app) {
        // The socket's owner as the namespace maps it: the container's root, and (in that
        // namespace too) the host's root, which it does not map (the overflow uid).
        let owner = if event["cgroup"] == app.path.as_str() {
            65534
        } else {
            0
        };
        assert_eq!(event["uid"], owner, "{event}");
        assert_eq!(event["uid_ignored"], true, "{event}");
        // Uid 0 of another user namespace is not named as the host's root.
        assert_eq!(event["user"], Value::Null, "{event}");
    }
    let stream: Vec<String> = audit.events().iter().map(Value::to_string).collect();
    let recorded = ConfigFile::new(&(stream.join("\n") + "\n"));
    let table = stdout_of(&["report", &recorded.arg()]);
    assert!(
        table.contains("0 (ignored)") && table.contains("65534 (ignored)"),
        "{table}"
    );

    let out = imds_guard(&[
        "report",
        "--suggest-policy",
        "--config",
        &audited_config.arg(),
        &recorded.arg(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let (suggested, warnings) = (
        String::from_utf8(out.stdout).expect("UTF-8"),
        String::from_utf8(out.stderr).expect("UTF-8"),
    );
    assert!(
        suggested.contains(&format!("[[allow]]\ncgroup = \"{}\"\n", container.path)),
        "{suggested}"
    );
    assert!(
        !suggested.contains(&format!("cgroup = \"{}\"", app.path)),
        "{suggested}"
    );
    assert!(
        warnings.contains("imds-guard: warning: not let through: cgroup ")
            && warnings.contains(&format!("{} is not a container's cgroup", app.path)),
        "{warnings}"
    );
    let suggested = ConfigFile::new(&suggested);
    let _ = stdout_of(&["check-config", &suggested.arg()]);
    let _enforce = Agent::start(&["--config", &suggested.arg()]);
    Client::new(&sandbox, &container, CONTAINER_ROOT, CONTAINER_ROOT)
        .imds(entry, NAT_PORT)
        .assert_ok(MOCK_INSTANCE_ID);
    // Elsewhere the container's root is still refused: its SYN dropped, so the connect times
    // out. And the setuid program's datagram is refused.
    let elsewhere =
        Client::new(&sandbox, &other, CONTAINER_ROOT, CONTAINER_ROOT).imds(entry, NAT_PORT);
    assert_eq!(elsewhere.errno, Some(libc::ETIMEDOUT), "{elsewhere:?}");
    let raw = Client::new(&sandbox, &app, USER, USER)
        .effective(0, 0)
        .route("raw-udp", IMDS_V4, 53);
    assert_eq!(raw.errno, Some(EPERM), "enforced: {raw:?}");
}
