//! The systemd unit: it passes `systemd-analyze verify`, and its hardening does not break the
//! agent: the agent does its whole job with only the unit's capabilities, and makes no system
//! call outside the unit's filter.

use std::{collections::BTreeSet, process::Command};

use imds_guard_tests::{
    Agent, Client, EPERM, IMDS_V4, Pins, Sandbox, TestCgroup, agent_binary, privileged,
};
use nix::{sys::signal::Signal, unistd::Pid};

const UNIT: &str = include_str!("../../packaging/imds-guard.service");

/// The values of `key=` in the unit's `[Service]` section, split on spaces.
fn unit_values(key: &str) -> Vec<String> {
    UNIT.lines()
        .filter_map(|line| line.strip_prefix(&format!("{key}=")))
        .flat_map(|value| value.split_whitespace().map(str::to_owned))
        .collect()
}

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("{program}: {err} (cargo xtask test installs it)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_unit_passes_systemd_analyze_verify_and_is_hardened() {
    if !privileged() {
        return;
    }
    // `verify` checks that the commands exist: point them at the binary under test.
    let dir = std::env::temp_dir().join(imds_guard_tests::unique_name("unit"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let unit = dir.join("imds-guard.service");
    let binary = agent_binary();
    std::fs::write(
        &unit,
        UNIT.replace("/usr/bin/imds-guard", &binary.to_string_lossy()),
    )
    .expect("write unit");
    let unit_arg = unit.to_string_lossy().into_owned();
    let (verified, output) = run("systemd-analyze", &["verify", &unit_arg]);
    let (_, security) = run("systemd-analyze", &["security", "--offline=yes", &unit_arg]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        verified && output.trim().is_empty(),
        "systemd-analyze verify:\n{output}"
    );
    let exposure: f64 = security
        .lines()
        .find_map(|line| {
            line.split("Overall exposure level for imds-guard.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|score| score.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{security}"));
    eprintln!("systemd-analyze security: exposure {exposure} (0 is best, 10 worst)");
    assert!(exposure < 4.0, "exposure {exposure}:\n{security}");
    for (key, value) in [
        ("Type", "notify"),
        ("Restart", "on-failure"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("Before", "cloud-init-local.service"),
    ] {
        assert!(
            unit_values(key).iter().any(|v| v == value),
            "{key}={value} missing from the unit"
        );
    }
}

#[test]
fn the_agent_works_with_only_the_units_capabilities() {
    if !privileged() {
        return;
    }
    let caps: Vec<String> = unit_values("CapabilityBoundingSet")
        .iter()
        .map(|cap| format!("+{}", cap.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(caps.len() >= 2, "no CapabilityBoundingSet in the unit");
    let bounding = format!("-all,{}", caps.join(","));
    let (sandbox, attach) = (Sandbox::new(), TestCgroup::new("test"));
    let pins = Pins::new();
    let mut agent = Agent::start_wrapped(
        &["setpriv", "--bounding-set", &bounding, "--inh-caps", "-all"],
        &agent_binary(),
        &["--cgroup", &attach.path, "--pin-dir", &pins.arg()],
    );
    // It lingers, so the agent can read its executable and command line too: another user's
    // process, whose /proc/PID/exe only a process allowed to trace it may read.
    let refused = Client::new(&sandbox, &attach, 1000, 1000)
        .linger(2)
        .tcp(IMDS_V4, 80);
    refused.assert_errno(EPERM);
    let events = agent.wait_events_of(refused.pid, 1);
    assert_eq!(
        events[0]["cgroup"],
        serde_json::json!(attach.path),
        "{}",
        agent.stderr()
    );
    assert_eq!(
        (&events[0]["unread"], events[0]["ppid"].is_u64()),
        (&serde_json::json!([]), true),
        "everything an event says is readable with the unit's capabilities: {}",
        events[0]
    );
    agent.signal(Signal::SIGHUP);
    agent.wait_reloads(1, 0);
    assert!(agent.stop().success(), "{}", agent.stderr());
    assert!(!agent.stderr().contains("WARN"), "{}", agent.stderr());
}

/// Every system call in the groups and names of a `SystemCallFilter=` allow-list.
fn allowed_syscalls(filter: &[String]) -> BTreeSet<String> {
    let mut allowed = BTreeSet::new();
    let mut groups_seen = BTreeSet::new();
    let mut pending: Vec<String> = filter.to_vec();
    while let Some(item) = pending.pop() {
        if !item.starts_with('@') {
            allowed.insert(item);
            continue;
        }
        if !groups_seen.insert(item.clone()) {
            continue;
        }
        let (ok, listing) = run("systemd-analyze", &["syscall-filter", &item]);
        assert!(ok, "{listing}");
        // The group's name, then its members (indented): names and nested groups.
        for line in listing.lines().skip(1).map(str::trim) {
            if !line.is_empty() && !line.starts_with('#') && !line.contains(' ') {
                pending.push(line.to_owned());
            }
        }
    }
    allowed
}

#[test]
fn the_agent_makes_no_system_call_outside_the_units_filter() {
    if !privileged() {
        return;
    }
    let allowed = allowed_syscalls(&unit_values("SystemCallFilter"));
    assert!(
        allowed.contains("bpf") && allowed.contains("read"),
        "{allowed:?}"
    );
    let (sandbox, attach) = (Sandbox::new(), TestCgroup::new("test"));
    let pins = Pins::new();
    let trace = std::env::temp_dir().join(format!("{}.strace", imds_guard_tests::unique_name("t")));
    let trace_arg = trace.to_string_lossy().into_owned();
    let mut agent = Agent::start_wrapped(
        &["strace", "-f", "-qq", "-c", "-U", "name", "-o", &trace_arg],
        &agent_binary(),
        &["--cgroup", &attach.path, "--pin-dir", &pins.arg()],
    );
    // Its whole job: judge and report, follow a new cgroup, reload, stop.
    let refused = Client::new(&sandbox, &attach, 1000, 1000).tcp(IMDS_V4, 80);
    refused.assert_errno(EPERM);
    let _ = agent.wait_events_of(refused.pid, 1);
    let _child = attach.child("new");
    std::thread::sleep(std::time::Duration::from_millis(100));
    // strace is the child: signal the agent itself.
    let real: i32 = std::fs::read_to_string(agent.pid_file())
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    nix::sys::signal::kill(Pid::from_raw(real), Signal::SIGHUP).expect("SIGHUP");
    agent.wait_reloads(1, 0);
    nix::sys::signal::kill(Pid::from_raw(real), Signal::SIGTERM).expect("SIGTERM");
    assert!(agent.stop().success(), "{}", agent.stderr());
    let summary = std::fs::read_to_string(&trace).expect("strace summary");
    let _ = std::fs::remove_file(&trace);
    let used: BTreeSet<String> = summary
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("syscall") && !line.starts_with('-'))
        .filter(|line| !line.starts_with("total"))
        .map(str::to_owned)
        .collect();
    assert!(used.contains("bpf"), "strace saw no bpf(): {summary}");
    let outside: Vec<&String> = used.difference(&allowed).collect();
    assert!(
        outside.is_empty(),
        "system calls outside SystemCallFilter=: {outside:?}\n(used: {used:?})"
    );
    eprintln!(
        "{} distinct system calls, all within the unit's filter",
        used.len()
    );
}
