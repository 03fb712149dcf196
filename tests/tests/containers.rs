//! Rules mean what they say: a container's root, a container process that took an allowed
//! uid, and a process in namespaces of its own never satisfy a rule meant for the host's tasks;
//! the built-in default is host root alone; each event names the process that acted.
//!
//! A "container" here is what a runtime makes: a cgroup named as Docker, containerd or
//! Kubernetes name theirs (anywhere below the attach point), and processes in new pid or cgroup
//! namespaces (`unshare`, as runc does). Nothing else of a container matters to the kernel.

use std::time::Duration;

use imds_guard_tests::{
    Agent, Client, ConfigFile, EPERM, IMDS_V4, IMDS_V6, MOCK_INSTANCE_ID, TestCgroup,
    assert_fields, privileged, setup,
};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// cloudwatch-agent's uid on a typical host.
const AGENT_UID: u32 = 998;
const CONTAINER_ID: &str = "3f1a6c2b9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";
const POD: &str = "6a1b2c3d_4e5f_6a7b_8c9d_0e1f2a3b4c5d";

/// A Docker container's cgroup (systemd driver) in `system_slice`.
fn docker_scope(system_slice: &TestCgroup) -> TestCgroup {
    system_slice.child(&format!("docker-{CONTAINER_ID}.scope"))
}

/// A Kubernetes container's cgroup (systemd driver), nested a few levels below `attach`.
fn kube_container(attach: &TestCgroup) -> TestCgroup {
    attach
        .child("kubepods.slice")
        .child("kubepods-besteffort.slice")
        .child(&format!("kubepods-besteffort-pod{POD}.slice"))
        .child(&format!("cri-containerd-{CONTAINER_ID}.scope"))
}

#[test]
fn by_default_host_root_gets_through_and_root_in_any_container_does_not() {
    let Some((sandbox, attach)) = setup("ctr") else {
        return;
    };
    let system = attach.child("system.slice");
    let host = system.child("cloud-init.service");
    let docker = docker_scope(&system);
    let kube = kube_container(&attach);
    let plain = attach.child("plain");
    let agent = Agent::start(&["--cgroup", &attach.path]);
    agent.wait_log("rules_from=the built-in default");

    Client::new(&sandbox, &host, 0, 0)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    // The containers' cgroups: root there is a container's root.
    for (cgroup, namespaces) in [
        (&docker, None),
        (&kube, None),
        (&plain, Some("pid")),
        (&plain, Some("cgroup")),
    ] {
        let client = Client::new(&sandbox, cgroup, 0, 0);
        let client = match namespaces {
            Some(kinds) => client.namespaces(kinds),
            None => client,
        };
        let addrs: [(&str, std::net::IpAddr); 2] =
            [("ipv4", IMDS_V4.into()), ("ipv6", IMDS_V6.into())];
        for (family, addr) in addrs {
            let denied = client.imds(addr, 80);
            denied.assert_errno(EPERM);
            let events = agent.wait_events_of(denied.pid, 1);
            assert_fields(
                &events[0],
                &[
                    ("verdict", json!("deny")),
                    ("uid", json!(0)),
                    ("cgroup", json!(cgroup.path)),
                    ("family", json!(family)),
                    ("in_container", json!(true)),
                    ("rule", json!("default")),
                ],
            );
        }
    }
    // Root in the host's namespaces and an ordinary cgroup is the host's root.
    let root = Client::new(&sandbox, &plain, 0, 0).imds(IMDS_V4, 80);
    root.assert_ok(MOCK_INSTANCE_ID);
    agent.barrier(&sandbox, &attach);
    assert!(agent.events_of(root.pid).is_empty());
    // Both namespaces at once, and nested deeper in a container's cgroup.
    let deeper = docker.child("init");
    Client::new(&sandbox, &deeper, 0, 0)
        .namespaces("pid,cgroup")
        .tcp(IMDS_V4, 80)
        .assert_errno(EPERM);
}

/// Where the kernel's BTF has the namespaces' fields (this machine's), the agent tells
/// containers by them: a program refused with the task's reads would make it fall back to
/// cgroup paths alone, where a namespaced task in an ordinary cgroup passes for the host's.
/// Said here at once, rather than by the container tests' verdicts alone.
#[test]
fn where_the_kernel_has_the_fields_containers_are_told_by_their_namespaces() {
    if !privileged() {
        return;
    }
    let found = imds_guard::kernel::btf::task_layout();
    if found.layout.known & imds_guard_common::event::LAYOUT_NAMESPACES == 0 {
        eprintln!(
            "this kernel's BTF lacks the namespaces' fields: {:?}",
            found.missing
        );
        return;
    }
    let attach = TestCgroup::new("containers-by");
    let agent = Agent::start(&["--cgroup", &attach.path]);
    agent.wait_log("imds-guard is enforcing");
    // "namespaces (BTF loads) and cgroup paths", or "(probe reads)": not "cgroup paths only".
    assert!(
        agent.stderr().contains("containers_by=\"namespaces ("),
        "the agent fell back from the namespaces:\n{}",
        agent.stderr()
    );
}

#[test]
fn each_option_alone_replaces_the_default() {
    let Some((sandbox, attach)) = setup("ctr") else {
        return;
    };
    let allowed_cgroup = attach.child("allowed");
    let elsewhere = attach.child("elsewhere");
    for (option, value, allowed) in [
        (
            "--allow-uid",
            "4242",
            Client::new(&sandbox, &elsewhere, 4242, 4242),
        ),
        (
            "--allow-gid",
            "4343",
            Client::new(&sandbox, &elsewhere, 4242, 4343),
        ),
        (
            "--allow-cgroup",
            allowed_cgroup.path.as_str(),
            Client::new(&sandbox, &allowed_cgroup, 4242, 4242),
        ),
    ] {
        let agent = Agent::start(&["--cgroup", &attach.path, option, value]);
        agent.wait_log("rules_from=the command line (the built-in default is replaced)");
        allowed.imds(IMDS_V4, 80).assert_ok(MOCK_INSTANCE_ID);
        let root = Client::new(&sandbox, &elsewhere, 0, 0).imds(IMDS_V4, 80);
        root.assert_errno(EPERM);
        let events = agent.wait_events_of(root.pid, 1);
        assert_fields(&events[0], &[("uid", json!(0)), ("rule", json!("default"))]);
        drop(agent);
    }
}

#[test]
fn a_uid_rule_is_not_satisfied_by_a_container_process_that_takes_that_uid() {
    let Some((sandbox, attach)) = setup("ctr") else {
        return;
    };
    let system = attach.child("system.slice");
    let service = system.child("amazon-cloudwatch-agent.service");
    let docker = docker_scope(&system);
    let config = ConfigFile::new(&format!(
        "cgroup = \"{}\"\n[[allow]]\nname = \"cloudwatch\"\nuid = {AGENT_UID}\n",
        attach.path
    ));
    let agent = Agent::start(&["--config", &config.arg()]);
    Client::new(&sandbox, &service, AGENT_UID, AGENT_UID)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    // Container root calls setuid(998): in the container's cgroup, and (another runtime's
    // cgroup naming aside) in its namespaces.
    for client in [
        Client::new(&sandbox, &docker, AGENT_UID, AGENT_UID),
        Client::new(&sandbox, &service, AGENT_UID, AGENT_UID).namespaces("pid,cgroup"),
    ] {
        let denied = client.imds(IMDS_V4, 80);
        denied.assert_errno(EPERM);
        let events = agent.wait_events_of(denied.pid, 1);
        assert_fields(
            &events[0],
            &[
                ("uid", json!(AGENT_UID)),
                ("in_container", json!(true)),
                ("rule", json!("default")),
            ],
        );
    }
    drop(agent);

    // Said so, the rule lets containers in too.
    config.write(&format!(
        "cgroup = \"{}\"\n[[allow]]\nname = \"cloudwatch\"\nuid = {AGENT_UID}\ncontainers = true\n",
        attach.path
    ));
    let _agent = Agent::start(&["--config", &config.arg()]);
    Client::new(&sandbox, &docker, AGENT_UID, AGENT_UID)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    Client::new(&sandbox, &service, AGENT_UID, AGENT_UID)
        .namespaces("pid")
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
}

#[test]
fn containers_only_rules_and_rules_naming_container_cgroups() {
    let Some((sandbox, attach)) = setup("ctr") else {
        return;
    };
    let system = attach.child("system.slice");
    let docker = docker_scope(&system);
    let other = system.child(&format!("docker-{}.scope", "5e".repeat(32)));
    let plain = attach.child("plain");
    let config = ConfigFile::new(&format!(
        "cgroup = \"{0}\"\n\
         [[allow]]\nname = \"sidecar\"\nuid = 4242\ncontainers = \"only\"\n\
         [[allow]]\nname = \"this container\"\ncgroup = \"{0}/system.slice/docker-{1}*.scope\"\n",
        attach.path,
        &CONTAINER_ID[..12]
    ));
    let agent = Agent::start(&["--config", &config.arg()]);
    // A rule that names the container's cgroup matches in it (its default is containers too).
    Client::new(&sandbox, &docker, 0, 0)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    // "only": 4242 in any container's cgroup gets through (root there does not), the host's
    // 4242 does not, nor does a 4242 that made namespaces of its own (as any local user can,
    // with a user namespace): namespaces only ever take rules away.
    Client::new(&sandbox, &other, 4242, 4242)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    Client::new(&sandbox, &other, 0, 0)
        .imds(IMDS_V4, 80)
        .assert_errno(EPERM);
    let host = Client::new(&sandbox, &plain, 4242, 4242).imds(IMDS_V4, 80);
    host.assert_errno(EPERM);
    let events = agent.wait_events_of(host.pid, 1);
    assert_fields(&events[0], &[("in_container", json!(false))]);
    let namespaced = Client::new(&sandbox, &plain, 4242, 4242)
        .namespaces("pid,cgroup")
        .imds(IMDS_V4, 80);
    namespaced.assert_errno(EPERM);
    let events = agent.wait_events_of(namespaced.pid, 1);
    assert_fields(&events[0], &[("in_container", json!(true))]);
}

#[test]
fn check_config_says_where_the_rules_come_from_and_warns_of_weak_rules() {
    if !privileged() {
        return;
    }
    let config = ConfigFile::new(
        "[[allow]]\nname = \"cw\"\nuid = 998\ncontainers = true\n\
         [[allow]]\nname = \"any docker\"\ncgroup = \"/system.slice/docker-*.scope\"\n",
    );
    let out = imds_guard_tests::imds_guard(&["check-config", &config.arg()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "rules from: {} (the built-in default is replaced)",
            config.arg()
        )),
        "{text}"
    );
    assert!(
        text.contains("containers: yes: the host's tasks and containers' (as written)"),
        "{text}"
    );
    assert!(text.contains("warnings (2):"), "{text}");
    assert!(
        text.contains("rule \"cw\": any container can satisfy this rule"),
        "{text}"
    );
    assert!(
        text.contains("rule \"any docker\": any container a runtime starts"),
        "{text}"
    );
    // No file: the built-in default, said so.
    let empty = ConfigFile::new("mode = \"audit\"\n");
    let out = imds_guard_tests::imds_guard(&["check-config", &empty.arg()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rules from: the built-in default (no rule in the config file or on the command line): uid 0 on the host, never in a container"),
        "{text}"
    );
    assert!(
        text.contains("containers: no: only the host's tasks"),
        "{text}"
    );
    assert!(!text.contains("warnings"), "{text}");
}

#[test]
fn two_processes_in_one_cgroup_are_each_named_for_their_own_attempts() {
    let Some((sandbox, attach)) = setup("ctr") else {
        return;
    };
    let work = attach.child("work");
    // A second executable: the same client under another name.
    let dir = tempfile::tempdir().expect("tempdir");
    let decoy = dir.path().join("decoy-client");
    std::fs::copy(
        imds_guard_tests::target_binary("imds-client", "IMDS_CLIENT_BIN"),
        &decoy,
    )
    .expect("copy client");
    let agent = Agent::start(&["--cgroup", &attach.path, "--aggregate-window", "2"]);
    let first = Client::new(&sandbox, &work, 4242, 4242)
        .repeat(5)
        .linger(1)
        .tcp(IMDS_V4, 80);
    let second = Client::new(&sandbox, &work, 4242, 4242)
        .binary(&decoy)
        .repeat(3)
        .linger(1)
        .tcp(IMDS_V4, 81);
    assert_eq!((first.eperm, second.eperm), (5, 3));
    for (client, exe, port, repeats) in [
        (
            &first,
            imds_guard_tests::target_binary("imds-client", "IMDS_CLIENT_BIN"),
            80,
            4,
        ),
        (&second, decoy.clone(), 81, 2),
    ] {
        // Its first attempt at once, its repeats when the window closes: both its own.
        let events = agent.wait_events_of_within(client.pid, 2, Duration::from_secs(10));
        let exe = exe
            .canonicalize()
            .expect("exe")
            .to_string_lossy()
            .into_owned();
        for event in &events {
            assert_fields(
                event,
                &[
                    ("tgid", json!(client.pid)),
                    ("port", json!(port)),
                    ("exe", json!(exe)),
                ],
            );
        }
        let counts: Vec<(bool, u64)> = events
            .iter()
            .map(|event| {
                (
                    event["aggregated"] == json!(true),
                    event["count"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        assert_eq!(counts, [(false, 1), (true, repeats)], "{events:#?}");
    }
    // Nothing of either was counted in another's line.
    let total: u64 = agent
        .events()
        .iter()
        .filter(|event| event["cgroup"] == json!(work.path))
        .map(|event| event["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(total, 8);
}

#[test]
fn a_process_gone_or_running_another_program_is_named_by_what_made_the_attempt() {
    let Some((sandbox, attach)) = setup("ctr") else {
        return;
    };
    let work = attach.child("work");
    let client = imds_guard_tests::target_binary("imds-client", "IMDS_CLIENT_BIN")
        .canonicalize()
        .expect("client")
        .to_string_lossy()
        .into_owned();
    let agent = Agent::start(&["--cgroup", &attach.path]);
    // Gone before the agent reads /proc (the agent is stopped meanwhile): the kernel's record
    // names it; no command line, which only /proc had.
    agent.signal(Signal::SIGSTOP);
    let gone = Client::new(&sandbox, &work, 4242, 4242).tcp(IMDS_V4, 80);
    agent.signal(Signal::SIGCONT);
    gone.assert_errno(EPERM);
    let events = agent.wait_events_of(gone.pid, 1);
    assert_fields(
        &events[0],
        &[("exe", json!(client)), ("cmdline", Value::Null)],
    );
    assert!(
        !events[0]["unread"]
            .as_array()
            .expect("unread")
            .contains(&json!("exe")),
        "{}",
        events[0]
    );
    // Still there, but running `sleep` by the time the agent reads the event: named by the
    // program that made the attempt, not by `sleep`.
    agent.signal(Signal::SIGSTOP);
    let execd = std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            Client::new(&sandbox, &work, 4343, 4343)
                .exec_sleep(3)
                .tcp(IMDS_V4, 80)
        });
        // The attempt is made and `sleep` runs in its place well within this.
        std::thread::sleep(Duration::from_secs(1));
        agent.signal(Signal::SIGCONT);
        running.join().expect("client")
    });
    execd.assert_errno(EPERM);
    let events = agent.wait_events_of(execd.pid, 1);
    assert_fields(
        &events[0],
        &[("exe", json!(client)), ("cmdline", Value::Null)],
    );
    // And in a container's namespaces: named as well.
    let ns = Client::new(&sandbox, &work, 0, 0)
        .namespaces("pid")
        .tcp(IMDS_V4, 80);
    ns.assert_errno(EPERM);
    let events = agent.wait_events_of(ns.pid, 1);
    assert_fields(
        &events[0],
        &[("exe", json!(client)), ("in_container", json!(true))],
    );
}

#[test]
fn a_double_star_rule_over_twenty_thousand_cgroups_costs_a_few_entries() {
    let Some((sandbox, attach)) = setup("ctr") else {
        return;
    };
    let apps = attach.child("apps");
    let config = ConfigFile::new(&format!(
        "cgroup = \"{0}\"\n[[allow]]\nname = \"host root\"\nuid = 0\n\
         [[allow]]\nname = \"apps\"\ncgroup = \"{0}/apps/**\"\nuid = 4242\n",
        attach.path
    ));
    let agent = Agent::start(&["--config", &config.arg()]);
    let mut made = Vec::new();
    for tenant in 0..20 {
        let tenant = apps.child(&format!("t{tenant}"));
        for n in 0..1000 {
            std::fs::create_dir(tenant.dir.join(format!("w{n}"))).expect("mkdir");
        }
        made.push(tenant);
        // A container created meanwhile is denied, whatever the agent is doing.
        if made.len() == 10 {
            let docker = docker_scope(&attach.child("system.slice"));
            Client::new(&sandbox, &docker, 0, 0)
                .namespaces("pid,cgroup")
                .tcp(IMDS_V4, 80)
                .assert_errno(EPERM);
        }
    }
    let deep = made[19].child("late").child("deeper");
    let allowed = || {
        Client::new(&sandbox, &deep, 4242, 4242)
            .tcp(IMDS_V4, 80)
            .errno
            .is_none()
    };
    let start = std::time::Instant::now();
    while !allowed() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "20,001 cgroups not followed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // 20,022 cgroups match; the rule starts to match at the 20 tenants, and the container's
    // cgroup takes host root's rule away: 21 entries.
    assert_eq!(agent.cgroup_entries(), 21);
}

#[test]
fn lost_cgroup_notifications_trigger_an_immediate_rescan() {
    let Some((sandbox, attach)) = setup("ctr") else {
        return;
    };
    let bulk = attach.child("bulk");
    let config = ConfigFile::new(&format!(
        "cgroup = \"{0}\"\n[[allow]]\nname = \"late\"\ncgroup = \"{0}/late-*\"\nuid = 4242\n",
        attach.path
    ));
    let agent = Agent::start(&["--config", &config.arg()]);
    // Frozen, the agent reads nothing while more cgroups are made than inotify queues
    // (fs.inotify.max_queued_events, 16,384 by default): the kernel drops the rest.
    agent.signal(Signal::SIGSTOP);
    let queued: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .expect("max_queued_events")
        .trim()
        .parse()
        .expect("a number");
    for n in 0..=queued {
        std::fs::create_dir(bulk.dir.join(format!("d{n}"))).expect("mkdir");
    }
    let late = attach.child("late-1");
    agent.signal(Signal::SIGCONT);
    agent.wait_log("cgroup change notifications were dropped by the kernel: rescanning now");
    agent.wait_log("every cgroup has its rules again");
    // The scan found what the lost notifications would have said.
    Client::new(&sandbox, &late, 4242, 4242)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
}
