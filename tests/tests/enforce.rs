//! Privileged end-to-end tests of `imds-guard run` on the real kernel: real processes as real
//! uids/gids in real cgroups, connecting inside a network namespace of their own to a mock IMDS.

use imds_guard_tests::{
    Agent, Client, ConfigFile, EPERM, IMDS_V4, IMDS_V6, MOCK_INSTANCE_ID, Pins, assert_fields,
    assert_time_within, imds_guard, run_to_end, setup,
};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const ECONNREFUSED: i32 = libc::ECONNREFUSED;
const USER: u32 = 1000;
const OTHER_USER: u32 = 1001;

/// A sandbox and a cgroup to attach to, or `None` when privileged tests cannot run here.

#[test]
fn root_is_allowed_by_default_and_not_reported() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let agent = Agent::start(&["--cgroup", &attach.path]);
    let root = Client::new(&sandbox, &attach, 0, 0).imds(IMDS_V4, 80);
    root.assert_ok(MOCK_INSTANCE_ID);
    agent.barrier(&sandbox, &attach);
    assert_eq!(agent.events_of(root.pid), Vec::<Value>::new());
}

#[test]
fn other_uid_is_denied_with_eperm_and_reported_once() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let work = attach.child("work");
    let agent = Agent::start(&["--cgroup", &attach.path]);
    let before = jiff::Timestamp::now();
    let denied = Client::new(&sandbox, &work, USER, USER).imds(IMDS_V4, 80);
    let after = jiff::Timestamp::now();
    denied.assert_errno(EPERM);
    agent.barrier(&sandbox, &attach);
    let events = agent.events_of(denied.pid);
    assert_eq!(events.len(), 1, "one denial, one event: {events:?}");
    assert_fields(
        &events[0],
        &[
            ("verdict", json!("deny")),
            ("pid", json!(denied.pid)),
            ("tgid", json!(denied.pid)),
            ("uid", json!(USER)),
            ("gid", json!(USER)),
            ("comm", json!("imds-client")),
            ("cgroup", json!(work.path)),
            ("cgroup_id", json!(work.id)),
            ("family", json!("ipv4")),
            ("protocol", json!("tcp")),
            ("dst", json!("169.254.169.254")),
            ("port", json!(80)),
            ("rule", json!("default")),
            ("hook", json!("connect4")),
        ],
    );
    assert_time_within(&events[0], before, after);
}

#[test]
fn allowed_uid_gets_through() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let agent = Agent::start(&["--cgroup", &attach.path, "--allow-uid", &USER.to_string()]);
    let allowed = Client::new(&sandbox, &attach, USER, USER).imds(IMDS_V4, 80);
    allowed.assert_ok(MOCK_INSTANCE_ID);
    Client::new(&sandbox, &attach, OTHER_USER, OTHER_USER)
        .imds(IMDS_V4, 80)
        .assert_errno(EPERM);
    // A rule on the command line replaces the default (uid 0), as one in a file does: root is
    // not allowed now.
    let root = Client::new(&sandbox, &attach, 0, 0).imds(IMDS_V4, 80);
    root.assert_errno(EPERM);
    let events = agent.wait_events_of(root.pid, 1);
    assert_fields(&events[0], &[("uid", json!(0)), ("rule", json!("default"))]);
    assert!(agent.events_of(allowed.pid).is_empty());
}

#[test]
fn allowed_gid_gets_through() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let _agent = Agent::start(&["--cgroup", &attach.path, "--allow-gid", "2000"]);
    Client::new(&sandbox, &attach, USER, 2000)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    Client::new(&sandbox, &attach, USER, USER)
        .imds(IMDS_V4, 80)
        .assert_errno(EPERM);
}

#[test]
fn a_task_is_judged_by_its_real_uid_and_gid_not_its_effective_ones() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let agent = Agent::start(&[
        "--cgroup",
        &attach.path,
        "--allow-uid",
        "0",
        "--allow-gid",
        "2000",
    ]);
    // A setuid-root program run by a denied user is judged as that user, and named so.
    let setuid_root = Client::new(&sandbox, &attach, USER, USER)
        .effective(0, 0)
        .imds(IMDS_V4, 80);
    setuid_root.assert_errno(EPERM);
    let events = agent.wait_events_of(setuid_root.pid, 1);
    assert_fields(&events[0], &[("uid", json!(USER)), ("gid", json!(USER))]);
    // Its raw socket (its effective root has `CAP_NET_RAW`) is root's to the packet layer, which
    // judges by a socket's owner: not root's rule either.
    let raw = Client::new(&sandbox, &attach, USER, USER)
        .effective(0, 0)
        .route("raw-udp", IMDS_V4, 53);
    assert_eq!(
        raw.errno,
        Some(EPERM),
        "setuid root's raw datagram: {raw:?}"
    );
    // Real root's raw socket is: its datagram reaches the mock.
    let raw = Client::new(&sandbox, &attach, 0, 0).route("raw-udp", IMDS_V4, 53);
    assert_eq!(
        (raw.errno, raw.detail.as_str()),
        (None, "ping"),
        "root's raw datagram"
    );
    // Root with a user's effective ids (`seteuid`, which it can undo) is root.
    Client::new(&sandbox, &attach, 0, 0)
        .effective(USER, USER)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    // The same for groups: the real gid decides.
    Client::new(&sandbox, &attach, USER, USER)
        .effective(USER, 2000)
        .imds(IMDS_V4, 80)
        .assert_errno(EPERM);
    Client::new(&sandbox, &attach, USER, 2000)
        .effective(USER, USER)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
}

#[test]
fn allowed_cgroup_and_its_children_get_through() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let agent_cgroup = attach.child("ssm-agent");
    let child = agent_cgroup.child("worker");
    let other = attach.child("webapp");
    // Written as in /proc/PID/cgroup; `cgroups_given_as_directories_resolve` covers the other form.
    let _agent = Agent::start(&[
        "--cgroup",
        &attach.path,
        "--allow-cgroup",
        &agent_cgroup.path,
    ]);
    for cgroup in [&agent_cgroup, &child] {
        Client::new(&sandbox, cgroup, USER, USER)
            .imds(IMDS_V4, 80)
            .assert_ok(MOCK_INSTANCE_ID);
        Client::new(&sandbox, cgroup, USER, USER)
            .imds(IMDS_V6, 80)
            .assert_ok(MOCK_INSTANCE_ID);
    }
    Client::new(&sandbox, &other, USER, USER)
        .imds(IMDS_V4, 80)
        .assert_errno(EPERM);
}

#[test]
fn cgroups_given_as_directories_resolve() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let allowed = attach.child("allowed");
    let _agent = Agent::start(&[
        "--cgroup",
        &attach.dir.to_string_lossy(),
        "--allow-cgroup",
        &allowed.dir.to_string_lossy(),
    ]);
    Client::new(&sandbox, &allowed, USER, USER)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    Client::new(&sandbox, &attach, USER, USER)
        .imds(IMDS_V4, 80)
        .assert_errno(EPERM);
}

#[test]
fn cgroup_outside_the_attach_point_is_untouched() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let guarded = attach.child("guarded");
    let outside = attach.child("outside");
    let agent = Agent::start(&["--cgroup", &guarded.path]);
    let free = Client::new(&sandbox, &outside, USER, USER).imds(IMDS_V4, 80);
    free.assert_ok(MOCK_INSTANCE_ID);
    Client::new(&sandbox, &guarded, USER, USER)
        .imds(IMDS_V4, 80)
        .assert_errno(EPERM);
    agent.barrier(&sandbox, &guarded);
    assert!(agent.events_of(free.pid).is_empty());
}

#[test]
fn other_destinations_are_untouched_for_a_denied_uid() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let agent = Agent::start(&["--cgroup", &attach.path]);
    let client = Client::new(&sandbox, &attach, USER, USER);
    let pids: Vec<u32> = [
        client.imds(std::net::Ipv4Addr::LOCALHOST, 80),
        client.imds(std::net::Ipv6Addr::LOCALHOST, 8080),
        client.udp(std::net::Ipv4Addr::LOCALHOST, 53),
    ]
    .into_iter()
    .map(|outcome| {
        assert!(
            outcome.errno.is_none(),
            "non-IMDS destination blocked: {outcome:?}"
        );
        outcome.pid
    })
    .collect();
    agent.barrier(&sandbox, &attach);
    for pid in pids {
        assert!(agent.events_of(pid).is_empty());
    }
}

#[test]
fn ipv6_and_ipv4_mapped_ipv6_are_denied() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let agent = Agent::start(&["--cgroup", &attach.path]);
    let client = Client::new(&sandbox, &attach, USER, USER);
    let mapped: std::net::Ipv6Addr = IMDS_V4.to_ipv6_mapped();
    for (addr, dst) in [
        (IMDS_V6, "fd00:ec2::254"),
        (mapped, "::ffff:169.254.169.254"),
    ] {
        let denied = client.imds(addr, 80);
        denied.assert_errno(EPERM);
        let events = agent.wait_events_of(denied.pid, 1);
        assert_fields(
            &events[0],
            &[
                ("family", json!("ipv6")),
                ("dst", json!(dst)),
                ("hook", json!("connect6")),
            ],
        );
    }
    // The same addresses work for root: the EPERM is ours, not the sandbox's.
    let root = Client::new(&sandbox, &attach, 0, 0);
    root.imds(IMDS_V6, 80).assert_ok(MOCK_INSTANCE_ID);
    root.imds(mapped, 80).assert_ok(MOCK_INSTANCE_ID);
}

#[test]
fn udp_is_denied_over_ipv4_and_ipv6() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let agent = Agent::start(&["--cgroup", &attach.path]);
    let client = Client::new(&sandbox, &attach, USER, USER);
    for (addr, family, hook) in [
        (std::net::IpAddr::from(IMDS_V4), "ipv4", "sendmsg4"),
        (std::net::IpAddr::from(IMDS_V6), "ipv6", "sendmsg6"),
    ] {
        let denied = client.udp(addr, 53);
        denied.assert_errno(EPERM);
        let events = agent.wait_events_of(denied.pid, 1);
        assert_fields(
            &events[0],
            &[
                ("protocol", json!("udp")),
                ("family", json!(family)),
                ("hook", json!(hook)),
                ("port", json!(53)),
            ],
        );
        // Root's datagram is echoed: the mock is there, the EPERM is ours.
        let root = Client::new(&sandbox, &attach, 0, 0).udp(addr, 53);
        root.assert_ok("ping");
    }
}

#[test]
fn every_port_of_a_protected_address_is_denied() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let agent = Agent::start(&["--cgroup", &attach.path]);
    for port in [8080, 443, 1] {
        let denied = Client::new(&sandbox, &attach, USER, USER).tcp(IMDS_V4, port);
        denied.assert_errno(EPERM);
        let events = agent.wait_events_of(denied.pid, 1);
        assert_fields(&events[0], &[("port", json!(port))]);
    }
    // For root, port 443 has no listener: refused by the stack, not by us.
    Client::new(&sandbox, &attach, 0, 0)
        .tcp(IMDS_V4, 443)
        .assert_errno(ECONNREFUSED);
}

#[test]
fn audit_mode_allows_and_reports() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let agent = Agent::start(&["--cgroup", &attach.path, "--mode", "audit"]);
    let audited = Client::new(&sandbox, &attach, USER, USER).imds(IMDS_V4, 80);
    audited.assert_ok(MOCK_INSTANCE_ID);
    // Two connects (token, then metadata), two reports.
    let events = agent.wait_events_of(audited.pid, 2);
    for event in &events {
        assert_fields(event, &[("verdict", json!("audit")), ("uid", json!(USER))]);
    }
    let root = Client::new(&sandbox, &attach, 0, 0).imds(IMDS_V4, 80);
    root.assert_ok(MOCK_INSTANCE_ID);
    let marker = Client::new(&sandbox, &attach, USER, USER).tcp(IMDS_V4, 80);
    let _ = agent.wait_events_of(marker.pid, 1);
    assert_eq!(agent.events_of(audited.pid).len(), 2);
    assert!(agent.events_of(root.pid).is_empty());
}

#[test]
fn config_file_sets_the_policy_and_options_add_to_it() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let config =
        std::env::temp_dir().join(format!("{}.toml", imds_guard_tests::unique_name("cfg")));
    std::fs::write(
        &config,
        format!(
            "mode = \"enforce\"\ncgroup = \"{}\"\nallow_uid = [{USER}]\n",
            attach.path
        ),
    )
    .expect("write config");
    let agent = Agent::start(&["--config", &config.to_string_lossy(), "--allow-gid", "3000"]);
    let _ = std::fs::remove_file(&config);
    Client::new(&sandbox, &attach, USER, USER)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    Client::new(&sandbox, &attach, OTHER_USER, 3000)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    // allow_uid = [USER] replaces the default, so root is no longer allowed.
    let root = Client::new(&sandbox, &attach, 0, 0).imds(IMDS_V4, 80);
    root.assert_errno(EPERM);
    let events = agent.wait_events_of(root.pid, 1);
    assert_fields(&events[0], &[("uid", json!(0)), ("verdict", json!("deny"))]);
}

/// Up to two uid rules of the default rule set for host tasks are held in the generation's
/// settings and judged without `ALLOW`; a third sends them all back to `ALLOW`. Either way the
/// same uids get the same verdicts, the rules' modes and names included.
#[test]
fn host_uid_rules_judge_the_same_held_in_the_settings_or_looked_up() {
    const AUDITED: u32 = 1002;
    const THIRD: u32 = 1003;
    const DENIED: u32 = 1004;
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let rules = format!(
        "cgroup = \"{}\"\n[[allow]]\nname = \"user\"\nuid = {USER}\n\
         [[allow]]\nname = \"staged\"\nuid = {AUDITED}\nmode = \"audit\"\n",
        attach.path
    );
    for (held, text) in [
        (true, rules.clone()),
        (
            false,
            format!("{rules}[[allow]]\nname = \"third\"\nuid = {THIRD}\n"),
        ),
    ] {
        let config = ConfigFile::new(&text);
        let agent = Agent::start(&["--config", &config.path().to_string_lossy()]);
        let client = |uid| Client::new(&sandbox, &attach, uid, uid);
        client(USER).imds(IMDS_V4, 80).assert_ok(MOCK_INSTANCE_ID);
        client(USER).imds(IMDS_V6, 80).assert_ok(MOCK_INSTANCE_ID);
        let audited = client(AUDITED).imds(IMDS_V4, 80);
        audited.assert_ok(MOCK_INSTANCE_ID);
        let third = client(THIRD).imds(IMDS_V4, 80);
        let denied = client(DENIED).imds(IMDS_V4, 80);
        denied.assert_errno(EPERM);
        // Root has no rule here: neither held nor in `ALLOW`.
        let root = client(0).imds(IMDS_V6, 80);
        root.assert_errno(EPERM);
        let audit_event = agent.wait_events_of(audited.pid, 1);
        assert_fields(
            &audit_event[0],
            &[("verdict", json!("audit")), ("rule", json!("staged"))],
        );
        for (pid, uid) in [(denied.pid, DENIED), (root.pid, 0)] {
            let events = agent.wait_events_of(pid, 1);
            assert_fields(
                &events[0],
                &[
                    ("verdict", json!("deny")),
                    ("uid", json!(uid)),
                    ("rule", json!("default")),
                ],
            );
        }
        if held {
            third.assert_errno(EPERM);
        } else {
            third.assert_ok(MOCK_INSTANCE_ID);
        }
        agent.barrier(&sandbox, &attach);
    }
}

#[test]
fn sigterm_and_sigint_exit_zero_and_enforcement_stays_until_detach() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let client = Client::new(&sandbox, &attach, USER, USER);
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let pins = Pins::new();
        let mut agent = Agent::start(&["--cgroup", &attach.path, "--pin-dir", &pins.arg()]);
        client.imds(IMDS_V4, 80).assert_errno(EPERM);
        let status = agent.stop_with(signal);
        assert!(
            status.success(),
            "{signal}: exit status {status}:\n{}",
            agent.stderr()
        );
        assert!(
            agent.stderr().contains("enforcement stays in force"),
            "{}",
            agent.stderr()
        );
        // No agent, and still no way through.
        client.imds(IMDS_V4, 80).assert_errno(EPERM);
        let out = imds_guard(&[
            "detach",
            "--pin-dir",
            &pins.arg(),
            "--pid-file",
            &agent.pid_file().to_string_lossy(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        client.imds(IMDS_V4, 80).assert_ok(MOCK_INSTANCE_ID);
        assert!(!pins.dir().exists(), "pins left: {:?}", pins.listing());
    }
}

#[test]
fn bad_input_is_refused_and_nothing_is_attached() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let config =
        std::env::temp_dir().join(format!("{}.toml", imds_guard_tests::unique_name("cfg")));
    std::fs::write(&config, "mode = \"enforce\"\nalow_uid = [1000]\n").expect("write config");
    let config_arg = config.to_string_lossy().into_owned();
    let missing = format!("{}/absent", attach.path);
    let unprivileged = [
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
    ];
    let cases: [(&[&str], Vec<&str>, String); 5] = [
        (
            &[],
            vec!["--cgroup", &attach.path, "--allow-cgroup", &missing],
            format!("--allow-cgroup: cgroup \"{missing}\" does not exist"),
        ),
        (
            &[],
            vec!["--cgroup", &missing],
            format!("--cgroup: cgroup \"{missing}\" does not exist"),
        ),
        (
            &[],
            vec!["--cgroup", &attach.path, "--allow-uid", "bob"],
            "invalid value 'bob' for '--allow-uid <UID>'".into(),
        ),
        (
            &[],
            vec!["--cgroup", &attach.path, "--config", &config_arg],
            format!("{config_arg}:2:1: unknown field `alow_uid`"),
        ),
        (
            &unprivileged,
            vec!["--cgroup", &attach.path],
            "lacks CAP_BPF and CAP_NET_ADMIN: run it as root".into(),
        ),
    ];
    for (wrapper, args, expected) in cases {
        let mut all = vec!["run"];
        all.extend(args.iter().copied());
        let (status, stderr) = run_to_end(wrapper, &all);
        assert!(!status.success(), "{args:?} was accepted");
        assert!(
            stderr.contains(&expected),
            "{args:?}\nexpected: {expected}\nstderr: {stderr}"
        );
        // Nothing was attached: a uid the default policy denies still gets through.
        Client::new(&sandbox, &attach, USER, USER)
            .imds(IMDS_V4, 80)
            .assert_ok(MOCK_INSTANCE_ID);
    }
    let _ = std::fs::remove_file(&config);
}

#[test]
fn ring_buffer_overflow_is_counted_never_lost_silently() {
    const ATTEMPTS: u32 = 20_000; // more than the 1 MiB ring holds (about 11,900 events)
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let mut agent = Agent::start(&["--cgroup", &attach.path]);
    // A frozen agent drains nothing, so the ring fills up.
    agent.signal(Signal::SIGSTOP);
    let flood = Client::new(&sandbox, &attach, USER, USER)
        .repeat(ATTEMPTS)
        .tcp(IMDS_V4, 80);
    agent.signal(Signal::SIGCONT);
    assert_eq!(
        flood.eperm, ATTEMPTS,
        "every attempt is denied, full ring or not"
    );
    let status = agent.stop();
    assert!(status.success(), "{}", agent.stderr());

    let reported = u64::try_from(agent.events_of(flood.pid).len()).expect("count");
    let stderr = agent.stderr();
    assert_eq!(agent.counter("denied"), u64::from(ATTEMPTS), "{stderr}");
    let lost = agent.counter("events_lost");
    assert!(
        lost > 0,
        "the ring never overflowed; the test proves nothing: {stderr}"
    );
    eprintln!("{ATTEMPTS} denied attempts: {reported} reported, {lost} counted as lost");
    assert_eq!(
        reported + lost,
        u64::from(ATTEMPTS),
        "reported {reported} + lost {lost}"
    );
}
