//! Privileged end-to-end tests of what events say: who made the attempt (process, parent,
//! user, executable, unit, container, pod), even when the process is gone before the agent
//! reads the event; and how floods are reported: repeats folded into counts, every attempt
//! accounted for, memory bounded.

use std::time::{Duration, Instant};

use imds_guard_tests::{
    Agent, Client, ConfigFile, EPERM, IMDS_V4, Pins, agent_binary, assert_fields, free_port,
    http_get, imds_guard, sample, setup,
};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// `nobody`/`nogroup`: a uid and gid with names on every Debian machine.
const NOBODY: u32 = 65534;
const CONTAINER_ID: &str = "5d1e0c4b3a29f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a392817060";
const POD_UID: &str = "0f8e2a5c-91b3-4d7e-a6f0-3c2b1d9e8f7a";

/// This test process's name (its main thread's `comm`: the executable's name, cut to 15 bytes).
fn own_comm() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .expect("own comm")
        .trim_end()
        .to_owned()
}

#[test]
fn an_event_names_process_parent_user_executable_and_command_line() {
    let Some((sandbox, attach)) = setup("events") else {
        return;
    };
    let agent = Agent::start(&["--cgroup", &attach.path]);
    // The client outlives the agent's reading of its event by far, as a daemon would.
    let denied = Client::new(&sandbox, &attach, NOBODY, NOBODY)
        .linger(2)
        .tcp(IMDS_V4, 80);
    denied.assert_errno(EPERM);
    let events = agent.wait_events_of(denied.pid, 1);
    let event = &events[0];
    assert_fields(
        event,
        &[
            ("pid", json!(denied.pid)),
            ("tgid", json!(denied.pid)),
            // The client is this test's child: the kernel read its parent at the attempt.
            ("ppid", json!(std::process::id())),
            ("parent_comm", json!(own_comm())),
            ("uid", json!(NOBODY)),
            ("user", json!("nobody")),
            ("gid", json!(NOBODY)),
            ("group", json!("nogroup")),
            ("comm", json!("imds-client")),
            ("cgroup", json!(attach.path)),
            ("count", json!(1)),
            ("aggregated", json!(false)),
        ],
    );
    let exe = imds_guard_tests::target_binary("imds-client", "IMDS_CLIENT_BIN");
    let exe = exe.canonicalize().expect("client path");
    assert_eq!(event["exe"], json!(exe.to_string_lossy()), "{event}");
    let cmdline = event["cmdline"].as_str().expect("cmdline");
    assert!(
        cmdline.contains("--uid 65534") && cmdline.ends_with("tcp 169.254.169.254 80"),
        "{cmdline}"
    );
    assert_eq!(event["unread"], json!([]), "{event}");
}

#[test]
fn a_cgroup_named_to_forge_an_event_line_is_named_as_it_is() {
    // Cgroup names are a workload's to choose (a delegated subtree): one that closes the
    // string and the object and starts a forged event, with a backslash and control bytes (a
    // newline the kernel refuses in a cgroup's name).
    let Some((sandbox, attach)) = setup("events") else {
        return;
    };
    let name = "x\"},{\"verdict\":\"allow\",\"cgroup\":\"\\\u{1}\u{1f}\t\u{7f}é";
    let evil = attach.child(name);
    let agent = Agent::start(&["--cgroup", &attach.path]);
    let denied = Client::new(&sandbox, &evil, NOBODY, NOBODY).tcp(IMDS_V4, 80);
    denied.assert_errno(EPERM);
    let events = agent.wait_events_of(denied.pid, 1);
    assert_eq!(events[0]["cgroup"], json!(evil.path), "{}", events[0]);
    assert_eq!(events[0]["verdict"], json!("deny"));
    // Every line the agent printed parsed as one event (the harness fails on any other), and
    // none is the forgery.
    assert!(
        agent
            .events()
            .iter()
            .all(|e| e["verdict"] != json!("allow")),
        "{:?}",
        agent.events()
    );
}

#[test]
fn a_short_lived_process_still_yields_pid_parent_uid_comm_and_cgroup() {
    let Some((sandbox, attach)) = setup("events") else {
        return;
    };
    let work = attach.child("work");
    let agent = Agent::start(&["--cgroup", &attach.path]);
    // A frozen agent reads nothing: the client tries, exits and is reaped before its event is
    // read, as a `curl` that fails at once would.
    agent.signal(Signal::SIGSTOP);
    let gone = Client::new(&sandbox, &work, 1000, 1000).tcp(IMDS_V4, 80);
    agent.signal(Signal::SIGCONT);
    gone.assert_errno(EPERM);
    let events = agent.wait_events_of(gone.pid, 1);
    let event = &events[0];
    assert_fields(
        event,
        &[
            ("pid", json!(gone.pid)),
            ("tgid", json!(gone.pid)),
            ("ppid", json!(std::process::id())),
            ("parent_comm", json!(own_comm())),
            ("uid", json!(1000)),
            ("gid", json!(1000)),
            ("comm", json!("imds-client")),
            ("cgroup", json!(work.path)),
            // The kernel recorded the executable at the attempt.
            ("exe", json!(client_path())),
            ("cmdline", Value::Null),
        ],
    );
    // What could not be read is said, not left to guess: only /proc had the command line.
    assert_eq!(event["unread"], json!(["cmdline"]), "{event}");
}

/// The client's executable, as `/proc/PID/exe` names it.
fn client_path() -> String {
    imds_guard_tests::target_binary("imds-client", "IMDS_CLIENT_BIN")
        .canonicalize()
        .expect("client")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn without_the_kernels_btf_the_agent_enforces_and_events_say_the_parent_is_unread() {
    let Some((sandbox, attach)) = setup("events") else {
        return;
    };
    // The agent in a mount namespace of its own, where the kernel's BTF (which gives the
    // programs the layout of a task, to read its parent) is an empty file, as on kernels
    // built without it.
    let hide_btf = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind /dev/null /sys/kernel/btf/vmlinux && exec \"$0\" \"$@\"",
    ];
    let agent = Agent::start_wrapped(&hide_btf, &agent_binary(), &["--cgroup", &attach.path]);
    agent.wait_log("events will not name parent processes");
    let denied = Client::new(&sandbox, &attach, 1000, 1000)
        .linger(1)
        .tcp(IMDS_V4, 80);
    denied.assert_errno(EPERM);
    let events = agent.wait_events_of(denied.pid, 1);
    let event = &events[0];
    assert_fields(
        event,
        &[
            ("verdict", json!("deny")),
            ("pid", json!(denied.pid)),
            ("uid", json!(1000)),
            ("comm", json!("imds-client")),
            ("cgroup", json!(attach.path)),
            ("ppid", Value::Null),
            ("parent_comm", Value::Null),
        ],
    );
    assert_eq!(event["unread"], json!(["ppid", "parent_comm"]), "{event}");
}

#[test]
fn docker_and_kubepods_cgroup_paths_name_the_container_and_pod() {
    let Some((sandbox, attach)) = setup("events") else {
        return;
    };
    let docker_scope = format!("docker-{CONTAINER_ID}.scope");
    let docker = attach.child("system.slice").child(&docker_scope);
    // The kubelet's systemd driver: the pod UID with `_` for `-`, a containerd scope below.
    let pod_slice = format!("kubepods-besteffort-pod{}.slice", POD_UID.replace('-', "_"));
    let kube_scope = format!("cri-containerd-{CONTAINER_ID}.scope");
    let kube = attach
        .child("kubepods.slice")
        .child("kubepods-besteffort.slice")
        .child(&pod_slice)
        .child(&kube_scope);
    // The cgroupfs driver: plain directories.
    let kube_fs = attach
        .child("kubepods")
        .child("burstable")
        .child(&format!("pod{POD_UID}"))
        .child(CONTAINER_ID);
    let agent = Agent::start(&["--cgroup", &attach.path]);

    let cases = [
        (
            &docker,
            json!({"runtime": "docker", "id": CONTAINER_ID}),
            Value::Null,
            json!(docker_scope),
        ),
        (
            &kube,
            json!({"runtime": "containerd", "id": CONTAINER_ID}),
            json!(POD_UID),
            json!(kube_scope),
        ),
        (
            &kube_fs,
            json!({"runtime": null, "id": CONTAINER_ID}),
            json!(POD_UID),
            Value::Null,
        ),
    ];
    for (cgroup, container, pod_uid, unit) in cases {
        let denied = Client::new(&sandbox, cgroup, 1000, 1000).tcp(IMDS_V4, 80);
        let events = agent.wait_events_of(denied.pid, 1);
        assert_fields(
            &events[0],
            &[
                ("verdict", json!("deny")),
                ("cgroup", json!(cgroup.path)),
                ("container", container),
                ("pod_uid", pod_uid),
                ("unit", unit),
            ],
        );
    }
}

#[test]
fn repeats_are_folded_into_one_event_with_a_count_the_first_reported_at_once() {
    const ATTEMPTS: u32 = 500;
    let Some((sandbox, attach)) = setup("events") else {
        return;
    };
    // A window longer than the test: the repeats are reported when the agent stops.
    let mut agent = Agent::start(&["--cgroup", &attach.path, "--aggregate-window", "3600"]);
    let flood = Client::new(&sandbox, &attach, 1000, 1000)
        .repeat(ATTEMPTS)
        .tcp(IMDS_V4, 80);
    assert_eq!(flood.eperm, ATTEMPTS);
    // The first attempt is reported while its repeats are still being folded.
    let first = agent.wait_events_of(flood.pid, 1);
    assert_fields(
        &first[0],
        &[("count", json!(1)), ("aggregated", json!(false))],
    );
    let status = agent.stop();
    assert!(status.success(), "{}", agent.stderr());
    let events = agent.events_of(flood.pid);
    assert_eq!(events.len(), 2, "the first, then one aggregate: {events:?}");
    let aggregate = &events[1];
    assert_fields(
        aggregate,
        &[
            ("aggregated", json!(true)),
            ("count", json!(ATTEMPTS - 1)),
            ("verdict", json!("deny")),
            ("uid", json!(1000)),
            ("dst", json!("169.254.169.254")),
            ("port", json!(80)),
        ],
    );
    let time = |event: &Value, field: &str| -> jiff::Timestamp {
        event[field].as_str().expect(field).parse().expect(field)
    };
    // The window opened at the first attempt, as the fold clock tells it: to a tick (the
    // coarse clock's resolution, where the kernel has it: the tick at or before the attempt; a
    // busy virtual machine takes its ticks late, hence a few), and the millisecond that covers
    // the event's own read of the clock after it and the two clocks' offsets, each sampled when
    // its line was written.
    let tick = nix::time::clock_getres(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("the coarse clock's resolution");
    let tick = jiff::SignedDuration::new(tick.tv_sec(), i32::try_from(tick.tv_nsec()).unwrap()) * 5;
    let slack = jiff::SignedDuration::from_millis(1);
    let (first_time, first_seen) = (time(&first[0], "time"), time(aggregate, "first_seen"));
    assert!(
        first_seen <= first_time + slack && first_time.duration_since(first_seen) <= tick + slack,
        "the window opened at the first attempt ({first_time}), to a few ticks ({tick}), not at \
         {first_seen}"
    );
    assert!(time(aggregate, "first_seen") <= time(aggregate, "last_seen"));
    assert_eq!(aggregate["time"], aggregate["last_seen"]);
}

#[test]
fn an_aggregate_is_reported_when_its_window_closes() {
    let Some((sandbox, attach)) = setup("events") else {
        return;
    };
    let agent = Agent::start(&["--cgroup", &attach.path, "--aggregate-window", "1"]);
    let flood = Client::new(&sandbox, &attach, 1000, 1000)
        .repeat(50)
        .tcp(IMDS_V4, 80);
    assert_eq!(flood.eperm, 50);
    // No stop, no further attempt: the window closing alone reports the repeats.
    let events = agent.wait_events_of_within(flood.pid, 2, Duration::from_secs(10));
    assert_fields(
        &events[1],
        &[("aggregated", json!(true)), ("count", json!(49))],
    );
}

/// How a test puts a new policy in force.
#[derive(Clone, Copy)]
enum Switch {
    /// SIGHUP to the running agent.
    Reload,
    /// A new agent, which adopts the pinned state of the one stopped.
    Restart,
    /// As `Restart`, the agent in between not folding repeats (`--aggregate-window 0`).
    RestartWithoutFolding,
}

#[test]
fn after_two_reloads_a_burst_is_named_by_the_policy_that_judged_it() {
    bursts_across_two_switches(Switch::Reload);
}

#[test]
fn after_two_restarts_a_burst_is_named_by_the_policy_that_judged_it() {
    bursts_across_two_switches(Switch::Restart);
}

#[test]
fn after_restarts_through_an_agent_that_does_not_fold_a_burst_is_named_by_its_policy() {
    bursts_across_two_switches(Switch::RestartWithoutFolding);
}

/// A staged rule of each name judges the client's attempts as rule 1 of its policy; two
/// switches bring the first policy's generation slot back within one fold window. The burst
/// after them is a new one (reported at once, named by the new policy's rule), not more
/// repeats of the burst the first policy judged.
fn bursts_across_two_switches(switch: Switch) {
    let Some((sandbox, attach)) = setup("events") else {
        return;
    };
    let staged = |name: &str| {
        format!(
            "cgroup = \"{}\"\n[[allow]]\nname = \"{name}\"\nuid = 1000\nmode = \"audit\"\n",
            attach.path
        )
    };
    let config = ConfigFile::new(&staged("alpha"));
    let pins = Pins::new();
    let (config_arg, pins_arg) = (config.arg(), pins.arg());
    let start = |window| {
        Agent::start(&[
            "--config",
            &config_arg,
            "--aggregate-window",
            window,
            "--pin-dir",
            &pins_arg,
        ])
    };
    let mut agent = start("3600");
    // The events of the agents stopped on the way.
    let mut events = Vec::new();
    let client = Client::new(&sandbox, &attach, 1000, 1000).repeat(3);
    let before = client.tcp(IMDS_V4, 80);
    assert_eq!(before.eperm, 0, "audited, not denied");
    let _ = agent.wait_events_of(before.pid, 1);
    for (round, name) in [(1, "between"), (2, "beta")] {
        config.write(&staged(name));
        match switch {
            Switch::Reload => {
                agent.signal(Signal::SIGHUP);
                agent.wait_reloads(round, 0);
            }
            Switch::Restart | Switch::RestartWithoutFolding => {
                assert!(agent.stop().success(), "{}", agent.stderr());
                events.extend(agent.events());
                let folds = round == 2 || matches!(switch, Switch::Restart);
                agent = start(if folds { "3600" } else { "0" });
            }
        }
    }
    let after = client.tcp(IMDS_V4, 80);
    let first = agent.wait_events_of(after.pid, 1);
    assert_fields(
        &first[0],
        &[
            ("rule", json!("beta")),
            ("verdict", json!("audit")),
            ("count", json!(1)),
        ],
    );
    assert!(agent.stop().success(), "{}", agent.stderr());
    events.extend(agent.events());
    for (pid, rule) in [(before.pid, "alpha"), (after.pid, "beta")] {
        let mine: Vec<&Value> = events.iter().filter(|e| e["tgid"] == pid).collect();
        assert_eq!(mine.len(), 2, "the first, then one aggregate: {mine:?}");
        for event in &mine {
            assert_fields(event, &[("rule", json!(rule))]);
        }
        assert_fields(mine[1], &[("aggregated", json!(true)), ("count", json!(2))]);
    }
}

/// The kernel's count of events that did not fit in the ring, from the pinned maps.
fn events_lost(pins: &Pins) -> u64 {
    let out = imds_guard(&["status", "--json", "--pin-dir", &pins.arg()]);
    let status: Value = serde_json::from_slice(&out.stdout).expect("status --json");
    status["counters"]["events_lost"]
        .as_u64()
        .unwrap_or_else(|| panic!("no counters in {status}"))
}

/// `VmHWM` (peak resident set) of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    imds_guard_tests::process::status_kib(pid, "VmHWM:").expect("VmHWM")
}

#[test]
fn a_flood_is_accounted_for_exactly_with_bounded_memory() {
    // Distinct workloads (one uid each), more than the ring holds, while the agent is frozen;
    // then one workload looping on connect() over many ports, which the kernel folds.
    const SPREAD: u32 = 12_000;
    const REPEATS: u32 = 100_000;
    /// The agent is ready at about 32 MiB (the running kernel's BTF read, the 4 MiB ring
    /// mapped); a flood must not grow it without bound.
    const PEAK_RSS_LIMIT_KIB: u64 = 72 * 1024;
    /// What the agent may keep of a flood, by construction: the first attempts of the bursts
    /// the kernel follows (9,216 at most, about 1.5 KiB each with a request line), the pages of
    /// the ring it has read (4 MiB, which the kernel maps twice: 8 MiB resident), caches of
    /// 4,096 entries, and the allocator's slack. Measured: 24.4 MiB with the lab's VMs running
    /// beside the other tests (it was 19 MiB with a 2 MiB ring and 376-byte events).
    const PEAK_RSS_GROWTH_LIMIT_KIB: u64 = 32 * 1024;
    let Some((sandbox, attach)) = setup("events") else {
        return;
    };
    let pins = Pins::new();
    let mut agent = Agent::start(&[
        "--cgroup",
        &attach.path,
        "--pin-dir",
        &pins.arg(),
        "--aggregate-window",
        "10",
    ]);
    let before_kib = peak_rss_kib(agent.pid());
    agent.signal(Signal::SIGSTOP);
    let spread = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            Client::new(&sandbox, &attach, 100_000, 100_000)
                .repeat(SPREAD)
                .uids(SPREAD)
                .tcp(IMDS_V4, 80)
        });
        // Thawed once the ring has overflowed (or the flood is over).
        while events_lost(&pins) == 0 && !flood.is_finished() {
            std::thread::sleep(Duration::from_millis(20));
        }
        agent.signal(Signal::SIGCONT);
        flood.join().expect("flood")
    });
    let repeats = Client::new(&sandbox, &attach, NOBODY, NOBODY)
        .repeat(REPEATS)
        .ports(1000)
        .tcp(IMDS_V4, 1);
    assert_eq!((spread.eperm, repeats.eperm), (SPREAD, REPEATS));
    let attempts = u64::from(SPREAD + REPEATS);
    // Read before stopping: the peak the flood caused.
    let peak_kib = peak_rss_kib(agent.pid());
    let status = agent.stop();
    let stderr = agent.stderr();
    assert!(status.success(), "{stderr}");

    let denied = agent.counter("denied");
    let reported = agent.final_figure("events_reported");
    let aggregated = agent.final_figure("events_aggregated");
    let folded = agent.counter("folded");
    let lost = agent.counter("events_lost");
    eprintln!(
        "{attempts} attempts: {reported} reported + {aggregated} aggregated + {lost} lost; \
         agent peak RSS {before_kib} KiB when ready, {peak_kib} KiB after the flood"
    );
    assert_eq!(denied, attempts, "the kernel counted every attempt");
    assert!(
        lost > 0,
        "the ring never overflowed: the test proves less than it says"
    );
    assert_eq!(
        aggregated, folded,
        "every repeat the kernel folded was reported"
    );
    // A repeat is the same process to the same port: each of the 1,000 ports is reported once.
    assert!(
        aggregated >= u64::from(REPEATS) - 1000 - 10,
        "a loop on connect() is folded, port by port: {aggregated} of {REPEATS}"
    );
    assert_eq!(reported + aggregated + lost, attempts);
    // The stream says the same: lines of single attempts plus the counts of aggregates.
    let lines = agent.events();
    let singles = lines
        .iter()
        .filter(|e| e["aggregated"] == json!(false))
        .count();
    let counted: u64 = lines
        .iter()
        .filter(|e| e["aggregated"] == json!(true))
        .map(|e| e["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(
        (u64::try_from(singles).expect("count"), counted),
        (reported, aggregated)
    );
    assert!(
        peak_kib < PEAK_RSS_LIMIT_KIB && peak_kib - before_kib < PEAK_RSS_GROWTH_LIMIT_KIB,
        "agent peak RSS {peak_kib} KiB during a flood of {attempts} attempts \
         ({before_kib} KiB when ready)"
    );
}

#[test]
fn repeats_evicted_before_they_are_reported_are_counted_and_said() {
    // Workloads that repeat, then passes of more distinct workloads than the fold map holds,
    // all while the agent is frozen (it walks the map once a second): the repeats' entries
    // are evicted before the agent could report them. The kernel's LRU spares entries used
    // lately while others can go: the repeating workloads fill most of the map, so that some
    // of theirs must go.
    const REPEATING: u32 = 8_000;
    const ROUNDS: u32 = 2;
    const DISTINCT: u32 = 20_000;
    const PASSES: u32 = 2;
    let Some((sandbox, attach)) = setup("events") else {
        return;
    };
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let mut agent = Agent::start(&[
        "--cgroup",
        &attach.path,
        "--aggregate-window",
        "3600",
        "--metrics-addr",
        &metrics_addr,
    ]);
    agent.signal(Signal::SIGSTOP);
    let repeating = Client::new(&sandbox, &attach, 200_000, 200_000)
        .repeat(REPEATING * ROUNDS)
        .uids(REPEATING)
        .tcp(IMDS_V4, 80);
    let distinct: u32 = (1..=PASSES)
        .map(|pass| {
            let base = 300_000 * pass;
            Client::new(&sandbox, &attach, base, base)
                .repeat(DISTINCT)
                .uids(DISTINCT)
                .tcp(IMDS_V4, 80)
                .eperm
        })
        .sum();
    agent.signal(Signal::SIGCONT);
    assert_eq!(
        (repeating.eperm, distinct),
        (REPEATING * ROUNDS, DISTINCT * PASSES)
    );
    let attempts = u64::from(REPEATING * ROUNDS + DISTINCT * PASSES);
    // Found while the agent runs (its next walk of the fold map), not only when it stops.
    let deadline = Instant::now() + Duration::from_secs(10);
    let found = loop {
        let (_, metrics) = http_get(port, "/metrics");
        let found = sample(&metrics, "imds_guard_repeats_unreported_total");
        if found > 0 || Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(agent.stop().success(), "{}", agent.stderr());
    // The agent's accounting, from its last line; the kernel's counters, as `status` reads them.
    let figure = |name| agent.final_figure(name);
    let (reported, aggregated, unreported, lost) = (
        figure("events_reported"),
        figure("events_aggregated"),
        figure("repeats_unreported"),
        agent.counter("events_lost"),
    );
    eprintln!(
        "{attempts} attempts: {reported} reported + {aggregated} aggregated + {unreported} \
         unreported + {lost} lost; {found} unreported found while running"
    );
    assert_eq!(
        agent.counter("denied"),
        attempts,
        "the kernel counted every attempt"
    );
    assert_eq!(reported + aggregated + unreported + lost, attempts);
    assert_eq!(aggregated + unreported, agent.counter("folded"));
    // The stop line's kernel figures are one reading, taken after everything was reported:
    // nothing was attempted since, so they are what `status` reads now.
    for name in ["denied", "folded", "events_lost"] {
        assert_eq!(figure(name), agent.counter(name), "{name} on the stop line");
    }
    assert!(
        unreported > 0,
        "no repeat was evicted unreported: the test proves less than it says"
    );
    assert!(
        (1..=unreported).contains(&found),
        "the running agent found {found} of {unreported}"
    );
    agent.wait_log("repeats the kernel counted will never be reported");
}
