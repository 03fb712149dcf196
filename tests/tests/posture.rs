//! `imds-guard posture` against the mock IMDS, always inside the sandbox's network namespace
//! (never the host's: its own IMDS may answer): `optional` when the mock answers a tokenless
//! GET, `required` when it refuses it with 401, `unknown` when it is down; the hop limit is the
//! TTL the mock puts on its token responses.

use std::time::{Duration, Instant};

use imds_guard_tests::{
    Agent, ConfigFile, Sandbox, agent_binary, free_port, http_get, privileged, sample, setup,
};
use serde_json::{Value, json};

/// `imds-guard posture --json`, run in `sandbox`'s namespace.
fn posture_in(sandbox: &Sandbox) -> Value {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &sandbox.name])
        .arg(agent_binary())
        .args(["posture", "--json"])
        .output()
        .expect("run imds-guard posture");
    assert!(
        out.status.success(),
        "posture: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("posture --json prints one object")
}

#[test]
fn posture_tells_optional_from_required_and_reads_the_hop_limit() {
    if !privileged() {
        return;
    }
    let mut sandbox = Sandbox::new();
    sandbox.put_hop_limit(2);

    sandbox.answer_v1(true);
    let optional = posture_in(&sandbox);
    assert_eq!(optional["http_tokens"], "optional", "{optional}");
    assert_eq!(optional["hop_limit"], 2, "{optional}");

    sandbox.answer_v1(false);
    sandbox.put_hop_limit(1);
    let required = posture_in(&sandbox);
    assert_eq!(
        required,
        json!({"http_tokens": "required", "hop_limit": 1}),
        "{required}"
    );

    // Down: unknown, never required, and why.
    sandbox.stop_http();
    let down = posture_in(&sandbox);
    assert_eq!(down["http_tokens"], "unknown", "{down}");
    assert_eq!(down["hop_limit"], Value::Null, "{down}");
    assert!(
        down["problems"][0]
            .as_str()
            .is_some_and(|p| p.starts_with("a tokenless GET failed: ")),
        "{down}"
    );
}

#[test]
fn the_agent_checks_posture_at_start_and_shows_it_in_status_and_metrics() {
    let Some((sandbox, attach)) = setup("posture") else {
        return;
    };
    sandbox.answer_v1(true);
    sandbox.put_hop_limit(2);
    let config = ConfigFile::new(&format!("cgroup = \"{}\"\nposture = true\n", attach.path));
    let port = free_port();
    // In the sandbox's namespace (its posture check must never reach the host's IMDS), and in
    // the attach cgroup, so that the message layer reads its own check.
    // (`nsenter`, not `ip netns exec`, which mounts a sysfs of its own over the cgroup and BPF
    // file systems.)
    let wrapper = format!(
        "echo $$ > {}/cgroup.procs && exec nsenter --net={} \"$@\"",
        attach.dir.display(),
        sandbox.netns.display()
    );
    let mut agent = Agent::start_wrapped(
        &["sh", "-c", &wrapper, "sh"],
        &agent_binary(),
        &[
            "--config",
            &config.arg(),
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let posture = loop {
        let status = agent.status();
        if !status["agent"]["posture"].is_null() {
            break status["agent"]["posture"].clone();
        }
        assert!(Instant::now() < deadline, "no posture in status: {status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(posture["http_tokens"], "optional", "{posture}");
    assert_eq!(posture["hop_limit"], 2, "{posture}");
    let (_, metrics) = sandbox.within(|| Ok(http_get(port, "/metrics")));
    for (series, value) in [
        (
            "imds_guard_posture_http_tokens{http_tokens=\"optional\"}",
            1,
        ),
        (
            "imds_guard_posture_http_tokens{http_tokens=\"required\"}",
            0,
        ),
        ("imds_guard_posture_hop_limit", 2),
    ] {
        assert_eq!(sample(&metrics, series), value, "{series} in:\n{metrics}");
    }
    // Its own tokenless request is read like any other, and marked as its check: `report`
    // does not name the agent as a workload that still uses IMDSv1.
    let own = agent.wait_events_of(agent.pid(), 1);
    assert_eq!(own[0]["posture_check"], true, "{own:?}");
    assert_eq!(own[0]["imds_version"], "v1", "{own:?}");

    // Turned off by a reload: the last answer is no longer shown as current.
    config.write(&format!("cgroup = \"{}\"\n", attach.path));
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    agent.wait_reloads(1, 0);
    let status = agent.status();
    assert!(status["agent"]["posture"].is_null(), "{status}");
    let (_, metrics) = sandbox.within(|| Ok(http_get(port, "/metrics")));
    assert!(
        !metrics.contains("imds_guard_posture_http_tokens{"),
        "{metrics}"
    );
    assert!(agent.stop().success(), "{}", agent.stderr());
}
