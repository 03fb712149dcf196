//! Table 6: how long a new cgroup waits for its entry while cgroups churn.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use imds_guard::kernel::{maps, pins::PinDir};
use imds_guard_tests::{Agent, Client, Pins, Sandbox, TestCgroup, process};

use crate::{
    check_abort,
    report::{Report, micros},
    setup::{DEFAULT_WINDOW, agent},
};

/// Table 6: how long a new cgroup waits for its own rules (the agent's entry in the kernel's
/// map), while quiet, while an unprivileged user makes and removes cgroups in its own delegated
/// subtree as fast as it can, and while root does the same elsewhere below the attach point
/// (which overflows inotify's queue: the agent then marks newer cgroups as unseen and rescans).
/// Interleaved: one sample of each, `SAMPLES` times.
pub fn churn(report: &mut Report, sandbox: &Sandbox, attach: &TestCgroup) {
    const SAMPLES: usize = 10;
    const HOSTILE_UID: u32 = 4243;
    const STORM_SECS: u16 = 2;
    let pins = Pins::new();
    let extra = format!(
        "[[allow]]\nname = \"host root\"\nuid = 0\n\
         [[allow]]\nname = \"apps\"\ncgroup = \"{}/apps/app-*\"\nuid = 4242\n",
        attach.path
    );
    let (agent, _config) = agent(attach, &pins, &extra, DEFAULT_WINDOW);
    let apps = attach.child("apps");
    let (session, user_owned) = delegated_to(attach, HOSTILE_UID);
    let root_owned = attach.child("churn");
    let mut entries = CgroupEntries::open(&pins);
    let storms: [(&str, Option<Storm>); 3] = [
        ("quiet", None),
        (
            "an unprivileged user's storm in its own subtree",
            Some((HOSTILE_UID, &session, &user_owned)),
        ),
        (
            "root's storm elsewhere",
            Some((0, &root_owned, &root_owned)),
        ),
    ];
    let mut waits: Vec<Vec<u64>> = vec![Vec::new(); storms.len()];
    let mut made = vec![0u64; storms.len()];
    let mut ticks = vec![0u64; storms.len()];
    let mut rescans = vec![0usize; storms.len()];
    for n in 0..SAMPLES {
        for (index, (_, storm)) in storms.iter().enumerate() {
            check_abort();
            let before = (process::cpu_ticks(agent.pid()), overflows(&agent));
            std::thread::scope(|scope| {
                let flood = storm.map(|(uid, runs_in, makes_in)| {
                    scope.spawn(move || {
                        Client::new(sandbox, runs_in, uid, uid).route_to_host(
                            "churn",
                            &makes_in.dir.to_string_lossy(),
                            STORM_SECS,
                        )
                    })
                });
                if flood.is_some() {
                    std::thread::sleep(Duration::from_millis(300));
                }
                let made_ns = monotonic_ns();
                let cgroup = apps.child(&format!("app-{n}-{index}"));
                waits[index].push(entries.wait_for(cgroup.id).saturating_sub(made_ns));
                if let Some(flood) = flood {
                    let outcome = flood.join().expect("storm");
                    made[index] += outcome.detail.parse::<u64>().unwrap_or(0);
                }
            });
            ticks[index] += process::cpu_ticks(agent.pid()) - before.0;
            rescans[index] += overflows(&agent) - before.1;
        }
    }
    let _ = writeln!(
        report,
        "## 6. A new cgroup under cgroup churn\n\n\
         From `mkdir` of a cgroup a rule allows to its entry in the kernel's map (polled every \
         20 µs), {SAMPLES} samples each, interleaved; each storm makes and removes cgroups as \
         fast as one process can, for {STORM_SECS} s around its sample. A container needs no \
         such wait: its namespaces are read by the kernel from its first instant.\n\n\
         | | median wait | longest wait | cgroups made per second | agent CPU | rescans after lost notifications |\n\
         |---|---|---|---|---|---|"
    );
    let seconds = SAMPLES as u64 * u64::from(STORM_SECS);
    for (index, (label, storm)) in storms.iter().enumerate() {
        let samples = &mut waits[index];
        samples.sort_unstable();
        #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
        let cpu = ticks[index] as f64 / (seconds as f64 * 100.0) * 100.0;
        let (rate, cpu) = if storm.is_some() {
            ((made[index] / seconds).to_string(), format!("{cpu:.0} %"))
        } else {
            ("—".to_owned(), "—".to_owned())
        };
        let _ = writeln!(
            report,
            "| {label} | {} | {} | {rate} | {cpu} | {} |",
            micros(samples[SAMPLES / 2]),
            micros(samples[SAMPLES - 1]),
            rescans[index]
        );
    }
    let _ = writeln!(report);
}

/// A storm of cgroup changes: the uid it runs as, the cgroup it runs in, the one it makes and
/// removes cgroups in.
pub type Storm<'a> = (u32, &'a TestCgroup, &'a TestCgroup);

/// How often the agent has said the kernel dropped cgroup notifications.
pub fn overflows(agent: &Agent) -> usize {
    agent
        .stderr()
        .matches("cgroup change notifications were dropped by the kernel")
        .count()
}

/// The agent's pinned maps, read directly.
pub struct CgroupEntries(maps::Pinned);

impl CgroupEntries {
    pub fn open(pins: &Pins) -> Self {
        Self(maps::Pinned::new(&PinDir::new(pins.dir())))
    }

    /// Waits until cgroup `id` has an entry (of either generation); returns when it was first
    /// seen (`CLOCK_MONOTONIC` ns).
    pub fn wait_for(&mut self, id: u64) -> u64 {
        let start = Instant::now();
        loop {
            let found = [0, 1].into_iter().any(|generation| {
                maps::cgroup_ruleset(&mut self.0, generation, id)
                    .expect("CGROUP_RULESETS")
                    .is_some()
            });
            if found {
                return monotonic_ns();
            }
            assert!(
                start.elapsed() < Duration::from_mins(1),
                "cgroup {id} got no entry within a minute"
            );
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

/// A user's manager below `attach`, delegated to `uid` as systemd does it (`Delegate=yes`):
/// the cgroup its processes run in, and one it owns and may make cgroups in.
pub fn delegated_to(attach: &TestCgroup, uid: u32) -> (TestCgroup, TestCgroup) {
    let manager = attach
        .child("user.slice")
        .child(&format!("user-{uid}.slice"))
        .child(&format!("user@{uid}.service"));
    let session = manager.child("init.scope");
    let owned = manager.child("storm");
    let (user, group) = (
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(uid)),
    );
    for path in [
        owned.dir.clone(),
        owned.dir.join("cgroup.procs"),
        owned.dir.join("cgroup.subtree_control"),
        owned.dir.join("cgroup.threads"),
    ] {
        nix::unistd::chown(&path, user, group).expect("delegate the cgroup");
    }
    (session, owned)
}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}
