//! `[[allow]]` rules on the real kernel: cgroup globs, units, combined conditions, staged rules,
//! names, and a policy that follows cgroups as they come and go.

use std::time::{Duration, Instant};

use imds_guard_tests::{
    Agent, Client, ConfigFile, EPERM, IMDS_V4, MOCK_INSTANCE_ID, Outcome, TestCgroup,
    assert_fields, setup,
};
use serde_json::json;

const USER: u32 = 1000;
/// `nobody` and `nogroup` on Debian.
const NOBODY: u32 = 65534;

/// Polls `probe` until it says yes; returns how long that took.
fn wait_until(what: &str, mut probe: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !probe() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still not {what} after 10 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    start.elapsed()
}

fn agent_with(config: &ConfigFile) -> Agent {
    Agent::start(&["--config", &config.arg()])
}

fn connects(outcome: &Outcome) -> bool {
    outcome.errno.is_none()
}

#[test]
fn a_matching_cgroup_created_after_start_is_allowed_at_once() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let config = ConfigFile::new(&format!(
        "cgroup = \"{0}\"\n[[allow]]\nname = \"web\"\ncgroup = \"{0}/web-*\"\n",
        attach.path
    ));
    let agent = agent_with(&config);

    let web = attach.child("web-1");
    let took = wait_until("allowed", || {
        connects(&Client::new(&sandbox, &web, USER, USER).tcp(IMDS_V4, 80))
    });
    eprintln!("a new matching cgroup was allowed {took:?} after mkdir (client start included)");
    Client::new(&sandbox, &web, USER, USER)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    // A cgroup the rule does not match, made at the same time, stays out.
    let other = attach.child("other-1");
    let refused = Client::new(&sandbox, &other, USER, USER).imds(IMDS_V4, 80);
    refused.assert_errno(EPERM);
    let events = agent.wait_events_of(refused.pid, 1);
    assert_fields(
        &events[0],
        &[("rule", json!("default")), ("cgroup", json!(other.path))],
    );
    assert_eq!(agent.cgroup_entries(), 1);
}

#[test]
fn a_restarted_unit_keeps_its_access_under_its_new_cgroup_id() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let slice = attach.child("app.slice");
    let unit = format!("{}.service", imds_guard_tests::unique_name("svc"));
    let config = ConfigFile::new(&format!(
        "cgroup = \"{}\"\n[[allow]]\nname = \"svc\"\nunit = \"{unit}\"\nuid = {USER}\n",
        attach.path
    ));
    let service = slice.child(&unit);
    let first_id = service.id;
    let agent = agent_with(&config);
    Client::new(&sandbox, &service, USER, USER)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    // The rule is on the unit as a whole: another uid in it is refused, by the default.
    Client::new(&sandbox, &service, USER + 1, USER + 1)
        .tcp(IMDS_V4, 80)
        .assert_errno(EPERM);

    // The unit stops (systemd removes its cgroup) and starts again (a new one, a new id).
    service.remove();
    wait_until("the stopped unit's entry removed", || {
        agent.cgroup_entries() == 0
    });
    let service = slice.child(&unit);
    assert_ne!(service.id, first_id, "the kernel reused the cgroup id");
    wait_until("allowed again", || {
        connects(&Client::new(&sandbox, &service, USER, USER).tcp(IMDS_V4, 80))
    });
    Client::new(&sandbox, &service, USER, USER)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    assert_eq!(agent.cgroup_entries(), 1);
    // The same unit name in another slice of the system manager is the same unit to the rule
    // (a user manager's is not: see the next test).
    let nested = attach.child("other.slice").child(&unit);
    wait_until("the nested unit allowed", || {
        connects(&Client::new(&sandbox, &nested, USER, USER).tcp(IMDS_V4, 80))
    });
}

#[test]
fn glob_rules_match_their_cgroups_and_everything_below() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let config = ConfigFile::new(&format!(
        "cgroup = \"{0}\"\n\
         [[allow]]\ncgroup = \"{0}/ctr-*\"\n\
         [[allow]]\ncgroup = \"{0}/pods/**\"\n",
        attach.path
    ));
    let ctr = attach.child("ctr-a1");
    let inside_ctr = ctr.child("init");
    let lookalike = attach.child("ctrl");
    let pods = attach.child("pods");
    let pod = pods.child("p1");
    let container = pod.child("c1");
    let agent = agent_with(&config);

    for allowed in [&ctr, &inside_ctr, &pod, &container] {
        let outcome = Client::new(&sandbox, allowed, USER, USER).imds(IMDS_V4, 80);
        assert_eq!(outcome.errno, None, "{} refused: {outcome:?}", allowed.path);
    }
    for refused in [&lookalike, &pods, &attach] {
        let outcome = Client::new(&sandbox, refused, USER, USER).tcp(IMDS_V4, 80);
        assert_eq!(outcome.errno, Some(EPERM), "{} allowed", refused.path);
        let events = agent.wait_events_of(outcome.pid, 1);
        assert_fields(
            &events[0],
            &[("cgroup", json!(refused.path)), ("rule", json!("default"))],
        );
    }
}

#[test]
fn root_is_allowed_on_the_host_but_not_in_containers() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let config = ConfigFile::new(&format!(
        "cgroup = \"{0}\"\n[[allow]]\nname = \"host root\"\nuid = 0\n\
         not_cgroup = [\"{0}/docker-*.scope\", \"{0}/kubepods.slice/**\"]\n",
        attach.path
    ));
    let host = attach.child("sshd.service");
    let container = attach.child("docker-1.scope");
    let agent = agent_with(&config);

    Client::new(&sandbox, &host, 0, 0)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    let refused = Client::new(&sandbox, &container, 0, 0).imds(IMDS_V4, 80);
    refused.assert_errno(EPERM);
    let events = agent.wait_events_of(refused.pid, 1);
    assert_fields(
        &events[0],
        &[
            ("uid", json!(0)),
            ("rule", json!("default")),
            ("verdict", json!("deny")),
        ],
    );
    // A container started later, and a pod deep below kubepods, are out too.
    let later = attach.child("docker-2.scope");
    let took = wait_until("the new container refused", || {
        Client::new(&sandbox, &later, 0, 0).tcp(IMDS_V4, 80).errno == Some(EPERM)
    });
    eprintln!("a new container was refused {took:?} after mkdir (client start included)");
    let pod = attach.child("kubepods.slice").child("pod-a").child("ctr");
    wait_until("the new pod refused", || {
        Client::new(&sandbox, &pod, 0, 0).tcp(IMDS_V4, 80).errno == Some(EPERM)
    });
    // Root elsewhere stays in.
    Client::new(&sandbox, &attach.child("cron.service"), 0, 0)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
}

#[test]
fn a_staged_rule_allows_and_reports_while_others_stay_enforced() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let config = ConfigFile::new(&format!(
        "cgroup = \"{0}\"\n\
         [[allow]]\nname = \"staged\"\ncgroup = \"{0}/staged\"\nmode = \"audit\"\n\
         [[allow]]\nname = \"root\"\nuid = 0\n",
        attach.path
    ));
    let staged = attach.child("staged");
    let other = attach.child("other");
    let agent = agent_with(&config);

    let audited = Client::new(&sandbox, &staged, USER, USER).imds(IMDS_V4, 80);
    audited.assert_ok(MOCK_INSTANCE_ID);
    let denied = Client::new(&sandbox, &other, USER, USER).imds(IMDS_V4, 80);
    denied.assert_errno(EPERM);
    // Root matches "root" after the staged rule in the staged cgroup: the first rule decides.
    let staged_root = Client::new(&sandbox, &staged, 0, 0).imds(IMDS_V4, 80);
    staged_root.assert_ok(MOCK_INSTANCE_ID);
    Client::new(&sandbox, &other, 0, 0)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);

    // The IMDSv2 flow is two connects: one event each.
    let events = agent.wait_events_of(audited.pid, 2);
    for event in &events {
        assert_fields(
            event,
            &[
                ("verdict", json!("audit")),
                ("rule", json!("staged")),
                ("cgroup", json!(staged.path)),
            ],
        );
    }
    let events = agent.wait_events_of(denied.pid, 1);
    assert_fields(
        &events[0],
        &[("verdict", json!("deny")), ("rule", json!("default"))],
    );
    let events = agent.wait_events_of(staged_root.pid, 2);
    assert_fields(
        &events[0],
        &[("verdict", json!("audit")), ("rule", json!("staged"))],
    );
}

#[test]
fn user_and_group_names_resolve() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    // Staged, so that events say which rule let each one through.
    let config = ConfigFile::new(&format!(
        "cgroup = \"{}\"\n\
         [[allow]]\nuid = \"nobody\"\nmode = \"audit\"\n\
         [[allow]]\ngid = \"nogroup\"\nmode = \"audit\"\n",
        attach.path
    ));
    let agent = agent_with(&config);
    let as_nobody = Client::new(&sandbox, &attach, NOBODY, USER).imds(IMDS_V4, 80);
    as_nobody.assert_ok(MOCK_INSTANCE_ID);
    let in_nogroup = Client::new(&sandbox, &attach, USER, NOBODY).imds(IMDS_V4, 80);
    in_nogroup.assert_ok(MOCK_INSTANCE_ID);
    Client::new(&sandbox, &attach, USER, USER)
        .tcp(IMDS_V4, 80)
        .assert_errno(EPERM);
    let events = agent.wait_events_of(as_nobody.pid, 1);
    assert_fields(
        &events[0],
        &[("rule", json!("uid nobody")), ("uid", json!(NOBODY))],
    );
    let events = agent.wait_events_of(in_nogroup.pid, 1);
    assert_fields(
        &events[0],
        &[("rule", json!("gid nogroup")), ("gid", json!(NOBODY))],
    );
}

#[test]
fn removed_cgroups_leave_the_maps_and_churn_does_not_grow_them() {
    const CONTAINERS: usize = 50;
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let config = ConfigFile::new(&format!(
        "cgroup = \"{0}\"\n[[allow]]\nuid = 0\nnot_cgroup = \"{0}/churn-*\"\n",
        attach.path
    ));
    let agent = agent_with(&config);
    let allow_entries = agent.allow_entries();
    assert_eq!(agent.cgroup_entries(), 0);
    for round in 0..3 {
        let containers: Vec<TestCgroup> = (0..CONTAINERS)
            .map(|i| attach.child(&format!("churn-{round}-{i}")))
            .collect();
        wait_until("every container in the map", || {
            agent.cgroup_entries() == CONTAINERS
        });
        Client::new(&sandbox, &containers[CONTAINERS - 1], 0, 0)
            .tcp(IMDS_V4, 80)
            .assert_errno(EPERM);
        for container in containers {
            container.remove();
        }
        wait_until("every container out of the map", || {
            agent.cgroup_entries() == 0
        });
        // Their shared rule set went when the last of them did; nothing else changed.
        wait_until("the rule sets back to the start", || {
            agent.allow_entries() == allow_entries
        });
    }
    Client::new(&sandbox, &attach, 0, 0)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
}

#[test]
fn a_unit_rule_names_the_system_managers_unit_not_a_users_or_a_containers() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let system = attach.child("system.slice");
    let service = system.child("amazon-ssm-agent.service");
    // What `systemd-run --user --unit=amazon-ssm-agent.service` makes for uid 1000, and the same
    // name inside a container's cgroup.
    let user_slice = attach.child("user.slice");
    let user = user_slice.child(&format!("user-{USER}.slice"));
    let manager = user.child(&format!("user@{USER}.service"));
    let app = manager.child("app.slice");
    let users_unit = app.child("amazon-ssm-agent.service");
    let container = system.child(&format!("docker-{}.scope", "c".repeat(64)));
    let containers_unit = container.child("amazon-ssm-agent.service");
    let config = ConfigFile::new(&format!(
        "cgroup = \"{}\"\n[[allow]]\nname = \"ssm\"\nunit = \"amazon-ssm-agent.service\"\n",
        attach.path
    ));
    let agent = agent_with(&config);
    Client::new(&sandbox, &service, USER, USER)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);
    for (cgroup, uid) in [(&users_unit, USER), (&containers_unit, 0)] {
        let refused = Client::new(&sandbox, cgroup, uid, uid).tcp(IMDS_V4, 80);
        refused.assert_errno(EPERM);
        let events = agent.wait_events_of(refused.pid, 1);
        assert_fields(
            &events[0],
            &[("rule", json!("default")), ("uid", json!(uid))],
        );
    }
}
