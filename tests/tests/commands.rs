//! The operator's commands against a real host and a real agent: `check-config`, `explain`,
//! `reload`, and the pid file that ties `reload` to the agent.

use std::{
    os::unix::process::CommandExt as _,
    process::{Child, Command},
    time::Duration,
};

use imds_guard_tests::{
    Agent, Client, ConfigFile, EPERM, IMDS_V4, MOCK_INSTANCE_ID, TestCgroup, imds_guard,
    privileged, run_to_end, setup,
};

const USER: u32 = 1000;
const LATE: u32 = 1002;

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A `sleep` running as `uid` in `cgroup`, killed (by its pid) on drop.
struct Sleeper(Child);

impl Sleeper {
    fn new(cgroup: &TestCgroup, uid: u32) -> Self {
        let child = Command::new("sleep")
            .arg("60")
            .uid(uid)
            .gid(uid)
            .spawn()
            .expect("spawn sleep");
        let sleeper = Self(child);
        cgroup.adopt(sleeper.0.id());
        sleeper
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn check_config_prints_the_effective_policy_and_what_it_matches() {
    if !privileged() {
        return;
    }
    let attach = TestCgroup::new("test");
    let ssm = attach.child("amazon-ssm-agent.service");
    let _container = attach.child("docker-ab.scope");
    let config = ConfigFile::new(&format!(
        "cgroup = \"{0}\"\n\
         [[allow]]\nname = \"ssm\"\nunit = \"amazon-ssm-agent.service\"\nuid = \"root\"\n\
         [[allow]]\nuid = 0\nnot_cgroup = \"{0}/docker-*.scope\"\nmode = \"audit\"\n",
        attach.path
    ));
    let output = imds_guard(&["check-config", &config.arg()]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}\n{}", stderr(&output));
    let file = config.arg();
    for expected in [
        format!("{file}: valid"),
        "mode: enforce (attempts no rule allows are denied (EPERM) and reported)".to_owned(),
        format!("attach: {} ({file}:1:10)", attach.path),
        "protect: 169.254.169.254 (default)".to_owned(),
        format!("  1. ssm [{file}:2:1]: allow"),
        "     when: uid 0 (root), in unit amazon-ssm-agent.service".to_owned(),
        format!("     in cgroups now: 1\n       {}", ssm.path),
        format!(
            "  2. uid 0, not cgroup {0}/docker-*.scope [{file}:6:1]: allow and report (staged)",
            attach.path
        ),
        format!(
            "     excluded now: 1\n       {}/docker-ab.scope",
            attach.path
        ),
        "  default: attempts no rule allows are denied (EPERM) and reported".to_owned(),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }
}

#[test]
fn check_config_fails_with_file_line_column() {
    if !privileged() {
        return;
    }
    let config =
        ConfigFile::new("mode = \"enforce\"\n[[allow]]\nuid = 0\nnot_cgroup = \"docker\"\n");
    let output = imds_guard(&["check-config", &config.arg()]);
    assert_eq!(output.status.code(), Some(1));
    let expected = format!(
        "{}:4:14: cgroup \"docker\" must be absolute, as in /proc/PID/cgroup",
        config.arg()
    );
    assert!(
        stderr(&output).starts_with(&expected),
        "{}",
        stderr(&output)
    );
    assert!(stdout(&output).is_empty());
}

#[test]
fn explain_agrees_with_the_kernel() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let web = attach.child("web");
    let host = attach.child("cron.service");
    let config = ConfigFile::new(&format!(
        "cgroup = \"{0}\"\n\
         [[allow]]\nname = \"host root\"\nuid = 0\nnot_cgroup = \"{0}/web\"\n\
         [[allow]]\nname = \"web staged\"\ncgroup = \"{0}/web\"\nmode = \"audit\"\n",
        attach.path
    ));
    let _agent = Agent::start(&["--config", &config.arg()]);

    // Root in web: the kernel reports and allows it, by the staged rule.
    let explained = imds_guard(&[
        "explain",
        "--config",
        &config.arg(),
        "--uid",
        "root",
        "--cgroup",
        &web.path,
    ]);
    let text = stdout(&explained);
    assert!(explained.status.success(), "{text}{}", stderr(&explained));
    assert!(text.contains("verdict: allow and report (audit)"), "{text}");
    assert!(text.contains("decided by: rule 2 \"web staged\""), "{text}");
    assert!(
        text.contains(&format!(
            "1. host root: does not match: it is in cgroup {}",
            web.path
        )),
        "{text}"
    );
    Client::new(&sandbox, &web, 0, 0)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);

    // A running process, by pid: uid 1000 in cron.service is denied, by the default.
    let sleeper = Sleeper::new(&host, USER);
    let explained = imds_guard(&[
        "explain",
        "--config",
        &config.arg(),
        "--pid",
        &sleeper.0.id().to_string(),
    ]);
    let text = stdout(&explained);
    assert!(explained.status.success(), "{text}{}", stderr(&explained));
    assert!(
        text.contains(&format!("uid {USER}")) && text.contains(&host.path),
        "{text}"
    );
    assert!(text.contains("verdict: deny (EPERM) and report"), "{text}");
    assert!(
        text.contains("decided by: default (mode enforce: no rule matches)"),
        "{text}"
    );
    assert!(
        text.contains("1. host root: does not match: its uid is not 0"),
        "{text}"
    );
    Client::new(&sandbox, &host, USER, USER)
        .tcp(IMDS_V4, 80)
        .assert_errno(EPERM);

    // Outside the attach point nothing is judged.
    let outside = imds_guard(&[
        "explain",
        "--config",
        &config.arg(),
        "--uid",
        "1000",
        "--cgroup",
        "/",
    ]);
    assert!(
        stdout(&outside).contains("not judged"),
        "{}",
        stdout(&outside)
    );
}

#[test]
fn reload_command_checks_the_config_then_signals_the_agent() {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let config = ConfigFile::new(&format!("cgroup = \"{}\"\nallow_uid = [0]\n", attach.path));
    let agent = Agent::start(&["--config", &config.arg()]);
    let pid_file = agent.pid_file().to_string_lossy().into_owned();
    Client::new(&sandbox, &attach, LATE, LATE)
        .tcp(IMDS_V4, 80)
        .assert_errno(EPERM);

    config.write(&format!(
        "cgroup = \"{}\"\n[[allow]]\nuid = {LATE}\n",
        attach.path
    ));
    let output = imds_guard(&["reload", "--pid-file", &pid_file]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains(&format!(
            "imds-guard (pid {}) is re-reading {}",
            agent.pid(),
            config.arg()
        )),
        "{}",
        stdout(&output)
    );
    agent.wait_reloads(1, 0);
    Client::new(&sandbox, &attach, LATE, LATE)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);

    // An invalid config is reported by the command and never reaches the agent.
    config.write(&format!(
        "cgroup = \"{}\"\n[[allow]]\nuid = \"no-such-user-imdsg\"\n",
        attach.path
    ));
    let output = imds_guard(&["reload", "--pid-file", &pid_file]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains(&format!(
            "{}:2:1: unknown user \"no-such-user-imdsg\"",
            config.arg()
        )),
        "{}",
        stderr(&output)
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !agent.stderr().contains("reload refused"),
        "{}",
        agent.stderr()
    );
    Client::new(&sandbox, &attach, LATE, LATE)
        .imds(IMDS_V4, 80)
        .assert_ok(MOCK_INSTANCE_ID);

    // One agent per pid file.
    config.write(&format!("cgroup = \"{}\"\n", attach.path));
    let (status, err) = run_to_end(
        &[],
        &["run", "--config", &config.arg(), "--pid-file", &pid_file],
    );
    assert!(!status.success());
    assert!(
        err.contains(&format!(
            "another imds-guard agent is running (pid {})",
            agent.pid()
        )),
        "{err}"
    );
}

#[test]
fn reload_without_an_agent_says_so() {
    if !privileged() {
        return;
    }
    let output = imds_guard(&["reload", "--pid-file", "/nonexistent/imds-guard.pid"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("/nonexistent/imds-guard.pid: no imds-guard agent is running (the pid file does not exist)"),
        "{}",
        stderr(&output)
    );
}
