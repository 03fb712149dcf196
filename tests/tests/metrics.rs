//! Prometheus metrics from a real agent: counts by verdict and by rule match what the kernel
//! judged, survive reloads (a generation's slots reused), and the endpoint fails early on a
//! bad address.

use std::net::TcpListener;

use imds_guard_tests::{
    Agent, Client, ConfigFile, EPERM, IMDS_V4, MOCK_INSTANCE_ID, Sandbox, TestCgroup, free_port,
    http_get, run_to_end, sample, setup,
};
use nix::sys::signal::Signal;

const PROBER: u32 = 1000;
const STRANGER: u32 = 1001;

#[test]
fn metrics_count_by_verdict_and_rule_across_a_reload() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let staged = attach.child("staged");
    let config = ConfigFile::new(&format!(
        "cgroup = \"{0}\"\n\
         [[allow]]\nname = \"prober\"\nuid = {PROBER}\n\
         [[allow]]\nname = \"staged\"\ncgroup = \"{1}\"\nmode = \"audit\"\n",
        attach.path, staged.path
    ));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // Repeats are folded for longer than the test: the reload reports them.
    let agent = Agent::start(&[
        "--config",
        &config.arg(),
        "--metrics-addr",
        &addr,
        "--aggregate-window",
        "3600",
    ]);

    Client::new(&sandbox, &attach, PROBER, PROBER)
        .repeat(3)
        .tcp(IMDS_V4, 80)
        .assert_ok("");
    Client::new(&sandbox, &attach, STRANGER, STRANGER)
        .tcp(IMDS_V4, 80)
        .assert_errno(EPERM);
    Client::new(&sandbox, &staged, STRANGER, STRANGER)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);

    let (status, metrics) = http_get(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{metrics}");
    assert_series(
        &metrics,
        &[
            ("imds_guard_attempts_total{verdict=\"allow\"}", 3),
            ("imds_guard_attempts_total{verdict=\"deny\"}", 1),
            ("imds_guard_attempts_total{verdict=\"audit\"}", 2),
            (
                "imds_guard_rule_attempts_total{rule=\"prober\",verdict=\"allow\"}",
                3,
            ),
            (
                "imds_guard_rule_attempts_total{rule=\"default\",verdict=\"deny\"}",
                1,
            ),
            (
                "imds_guard_rule_attempts_total{rule=\"staged\",verdict=\"audit\"}",
                2,
            ),
            ("imds_guard_policy_rules", 2),
            ("imds_guard_policy_protected_addresses", 2),
            ("imds_guard_reloads_total", 0),
        ],
    );

    // A reload switches generations: what the old one counted is kept, the new one adds.
    agent.signal(Signal::SIGHUP);
    agent.wait_reloads(1, 0);
    Client::new(&sandbox, &attach, PROBER, PROBER)
        .tcp(IMDS_V4, 80)
        .assert_ok("");
    let (_, metrics) = http_get(port, "/metrics");
    assert_eq!(
        sample(
            &metrics,
            "imds_guard_rule_attempts_total{rule=\"prober\",verdict=\"allow\"}"
        ),
        4,
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "imds_guard_reloads_total"), 1, "{metrics}");
    // The denial and the staged workload's first attempt were reported at once; its second
    // (token, then metadata) was folded, and reported as a count before the reload.
    assert_eq!(
        (
            sample(&metrics, "imds_guard_events_reported_total"),
            sample(&metrics, "imds_guard_events_aggregated_total"),
        ),
        (2, 1),
        "{metrics}"
    );

    a_second_reload_keeps_what_the_reused_slots_counted(&agent, &sandbox, &attach, port);

    let (status, _) = http_get(port, "/other");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

/// A second reload reuses the first generation's slots: what they counted stays in the totals,
/// for the metrics and for `status`, which reads them from the pinned maps. (Before it: 4
/// attempts allowed, 1 denied, 2 audited.)
fn a_second_reload_keeps_what_the_reused_slots_counted(
    agent: &Agent,
    sandbox: &Sandbox,
    attach: &TestCgroup,
    port: u16,
) {
    agent.signal(Signal::SIGHUP);
    agent.wait_reloads(2, 0);
    Client::new(sandbox, attach, PROBER, PROBER)
        .tcp(IMDS_V4, 80)
        .assert_ok("");
    let (_, metrics) = http_get(port, "/metrics");
    assert_series(
        &metrics,
        &[
            ("imds_guard_attempts_total{verdict=\"allow\"}", 5),
            ("imds_guard_attempts_total{verdict=\"deny\"}", 1),
            ("imds_guard_attempts_total{verdict=\"audit\"}", 2),
            (
                "imds_guard_rule_attempts_total{rule=\"prober\",verdict=\"allow\"}",
                5,
            ),
        ],
    );
    let status = agent.status();
    assert_eq!(
        (
            &status["counters"]["allowed"],
            &status["counters"]["denied"],
            &status["counters"]["audited"]
        ),
        (
            &serde_json::json!(5),
            &serde_json::json!(1),
            &serde_json::json!(2)
        ),
        "{status}"
    );
}

/// Each of `expected`'s series has its value in `metrics`.
fn assert_series(metrics: &str, expected: &[(&str, u64)]) {
    for &(series, value) in expected {
        assert_eq!(sample(metrics, series), value, "{series} in:\n{metrics}");
    }
}

#[test]
fn an_address_in_use_fails_before_anything_is_attached() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (status, stderr) = run_to_end(
        &[],
        &["run", "--cgroup", &attach.path, "--metrics-addr", &addr],
    );
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("cannot serve metrics on {addr}")),
        "{stderr}"
    );
    Client::new(&sandbox, &attach, STRANGER, STRANGER)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
}
