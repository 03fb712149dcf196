//! Privileged end-to-end test of the audit-to-enforce path: an agent in audit mode records who
//! touched IMDS, `imds-guard report` says it, `--suggest-policy` turns it into a policy, and
//! that policy, loaded back, lets exactly those workloads through.

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
