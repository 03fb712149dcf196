//! `imds-guard status`: what the kernel enforces and whether an agent looks after it, read from
//! the pins, so it works whether or not the agent runs.

use std::{fmt::Write as _, net::IpAddr, path::Path};

use imds_guard_common::{
    agent::{
        AgentInfo, HEARTBEAT_INTERVAL_SECS, POSTURE_TOKENS_OPTIONAL, POSTURE_TOKENS_REQUIRED,
        POSTURE_TOKENS_UNCHECKED,
    },
    policy::{ALL_CGROUPS_SEEN, MODE_AUDIT},
};
use serde::Serialize;

use crate::{
    cli::StatusArgs,
    host::cgroups::Hierarchy,
    host::pidfile,
    kernel::pins::PinDir,
    kernel::{Counters, in_force::InForce, maps, sys},
};

/// Everything `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Every program is attached through its pinned link.
    pub enforcing: bool,
    /// The pin directory read.
    pub pin_dir: String,
    /// The programs, by hook.
    pub programs: Vec<Hook>,
    /// How the programs in force tell a container's task, read from them: `namespaces (BTF
    /// loads) and cgroup paths`, `namespaces (probe reads) and cgroup paths`, `cgroup paths
    /// only`, `mixed: ...` or `unknown (...)`; `null` when none is in force.
    pub containers_by: Option<String>,
    /// A program in force tells (or may tell) containers by their cgroup paths alone
    /// ([`InForce::may_tell_by_cgroup_paths_alone`]): the text says what that lets through.
    #[serde(skip)]
    pub containers_warning: bool,
    /// The policy in force, when the maps are pinned.
    pub policy: Option<PolicySummary>,
    /// Totals since the maps were created.
    pub counters: Option<Counters>,
    /// The agent.
    pub agent: AgentStatus,
}

/// One hook's pinned link.
#[derive(Debug, Serialize)]
pub struct Hook {
    /// `connect4` and so on.
    pub hook: &'static str,
    /// Whether its link is pinned and on a live cgroup.
    pub attached: bool,
    /// Its link is pinned but its cgroup was removed: it guards nothing.
    pub defunct: bool,
    /// The cgroup's id.
    pub cgroup_id: Option<u64>,
    /// The cgroup's path.
    pub cgroup: Option<String>,
    /// The program the link runs.
    pub program: Option<sys::ProgramInfo>,
}

/// The policy in force, as the maps hold it.
#[derive(Debug, Serialize)]
pub struct PolicySummary {
    /// The generation in force.
    pub generation: u32,
    /// `enforce` or `audit`.
    pub mode: &'static str,
    /// Protected addresses.
    pub protected: Vec<IpAddr>,
    /// Rules, as the agent that installed the policy counted them.
    pub rules: u32,
    /// `ALLOW` entries of the generation.
    pub allow_entries: usize,
    /// `CGROUP_RULESETS` entries of the generation.
    pub cgroup_entries: usize,
    /// Cgroups with a larger id get only the rules that hold in every cgroup: the agent fell
    /// behind (lost notifications, rescanning) or the map is full. `null` while every cgroup
    /// has its own rules.
    pub unseen_after: Option<u64>,
    /// Cgroups whose rules would add to their parent's but found no room in the map: they
    /// keep their parent's (fail closed).
    pub cgroups_dropped: u32,
    /// Cgroup directories the agent could not watch (the inotify watch limit): cgroups made
    /// below them get their rules at the next scan (30 s).
    pub cgroups_unwatched: u32,
}

/// The agent, from its pid file and what it recorded in the pins.
#[derive(Debug, Default, Serialize)]
pub struct AgentStatus {
    /// An agent holds the pid file.
    pub running: bool,
    /// Its pid.
    pub pid: Option<i32>,
    /// Running, heard from recently, and its maps match its policy.
    pub healthy: bool,
    /// Version of the agent that installed the policy in force.
    pub version: Option<String>,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_secs: Option<u64>,
    /// Reloads taken since it started.
    pub reloads: Option<u32>,
    /// Reloads refused since it started.
    pub failed_reloads: Option<u32>,
    /// Why it is not healthy, if it is not.
    pub problem: Option<String>,
    /// Its last check of the instance's posture (`posture = true`); `null` before one.
    pub posture: Option<PostureStatus>,
}

/// What the agent's last posture check found.
#[derive(Debug, Serialize)]
pub struct PostureStatus {
    /// `optional` (IMDS answers IMDSv1), `required` or `unknown`.
    pub http_tokens: &'static str,
    /// The hop limit of IMDS's token responses; `null` when unread.
    pub hop_limit: Option<u32>,
    /// Seconds since the check.
    pub checked_secs_ago: u64,
}

/// `imds-guard status`: prints the status; returns whether enforcement is in force.
#[must_use]
pub fn run(args: &StatusArgs) -> bool {
    let hierarchy = Hierarchy::discover().ok();
    let status = read(&args.pin_dir, &args.pid_file, hierarchy.as_ref());
    if args.json {
        super::print_json(&status);
    } else {
        print!("{}", describe(&status));
    }
    status.enforcing
}

/// Reads the pins in `pin_dir` and the pid file.
#[must_use]
pub fn read(pin_dir: &Path, pid_file: &Path, hierarchy: Option<&Hierarchy>) -> Status {
    let pins = PinDir::new(pin_dir);
    let programs: Vec<Hook> = imds_guard_common::programs::ALL
        .iter()
        .map(|&hook| {
            let link = sys::open_pinned(&pins.link(hook)).ok().flatten();
            let state = link.and_then(|link| sys::link_info(link.as_fd_borrowed()).ok());
            Hook {
                hook,
                attached: state.is_some_and(|state| state.cgroup_id != 0),
                defunct: state.is_some_and(|state| state.cgroup_id == 0),
                cgroup_id: state.map(|state| state.cgroup_id),
                cgroup: state.and_then(|state| hierarchy?.path_of(state.cgroup_id)),
                program: state.and_then(|state| sys::program_info(state.program_id).ok().flatten()),
            }
        })
        .collect();
    let enforcing = programs.iter().all(|hook| hook.attached);
    let in_force = InForce::read(&pins);
    let mut maps = maps::Pinned::new(&pins);
    let info = maps::agent_info(&mut maps).ok().flatten();
    Status {
        enforcing,
        pin_dir: pin_dir.display().to_string(),
        programs,
        containers_by: in_force.describe(),
        containers_warning: in_force.may_tell_by_cgroup_paths_alone(),
        policy: policy(&mut maps, info.as_ref()),
        counters: maps::counters(&mut maps).ok(),
        agent: agent_status(pid_file, info.as_ref()),
    }
}

fn agent_status(pid_file: &Path, info: Option<&AgentInfo>) -> AgentStatus {
    let running = pidfile::running_agent(pid_file);
    let mut status = AgentStatus {
        running: running.is_ok(),
        pid: running.as_ref().ok().copied(),
        ..AgentStatus::default()
    };
    if let Some(info) = info {
        let end = info
            .version
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(info.version.len());
        status.version = Some(String::from_utf8_lossy(&info.version[..end]).into_owned());
        let now = crate::host::clock::boot_time_ns();
        status.heartbeat_age_secs = Some(now.saturating_sub(info.heartbeat_ns) / 1_000_000_000);
        status.reloads = Some(info.reloads);
        status.failed_reloads = Some(info.failed_reloads);
        status.posture =
            (info.posture_http_tokens != POSTURE_TOKENS_UNCHECKED).then(|| PostureStatus {
                http_tokens: match info.posture_http_tokens {
                    POSTURE_TOKENS_OPTIONAL => "optional",
                    POSTURE_TOKENS_REQUIRED => "required",
                    _ => "unknown",
                },
                hop_limit: (info.posture_hop_limit != 0).then_some(info.posture_hop_limit),
                checked_secs_ago: now.saturating_sub(info.posture_checked_ns) / 1_000_000_000,
            });
    }
    let fresh = status
        .heartbeat_age_secs
        .is_some_and(|age| age <= 3 * HEARTBEAT_INTERVAL_SECS);
    status.problem = match (&running, info) {
        (Err(_), Some(info)) if info.pid == 0 => Some("it stopped cleanly".into()),
        (Err(_), Some(info)) => Some(format!(
            "the last agent (pid {}) ended without stopping cleanly (killed or crashed)",
            info.pid
        )),
        (Err(err), None) => Some(err.to_string()),
        (Ok(_), None) => Some("it has not recorded its state in the pins".into()),
        (Ok(_), Some(_)) if !fresh => Some(format!(
            "no heartbeat for {} s (expected every {HEARTBEAT_INTERVAL_SECS} s)",
            status.heartbeat_age_secs.unwrap_or_default()
        )),
        (Ok(_), Some(info)) if info.maps_uncertain != 0 => {
            Some("an update of the maps failed; it rewrites them at its next scan".into())
        }
        (Ok(_), Some(info)) if info.unseen_after != ALL_CGROUPS_SEEN => Some(format!(
            "it is behind the cgroup tree (lost notifications, or a full map): cgroups with an \
             id above {} get only the rules that hold in every cgroup",
            info.unseen_after
        )),
        _ => None,
    };
    status.healthy = status.problem.is_none();
    status
}

/// The policy in force, as the pinned maps hold it.
fn policy(maps: &mut maps::Pinned, info: Option<&AgentInfo>) -> Option<PolicySummary> {
    let generation = maps::generation_in_force(maps).ok()?;
    let settings = maps::settings(maps).ok()?.get(&generation, 0).ok()?;
    let protected = maps::protected_addresses(maps, generation).ok()?;
    let (allow_entries, cgroup_entries) = maps::entries_of(maps, generation).ok()?;
    Some(PolicySummary {
        generation,
        mode: if settings.mode == MODE_AUDIT {
            "audit"
        } else {
            "enforce"
        },
        protected,
        rules: info.map_or(0, |info| info.rules),
        allow_entries,
        cgroup_entries,
        unseen_after: (settings.unseen_after != ALL_CGROUPS_SEEN).then_some(settings.unseen_after),
        cgroups_dropped: info.map_or(0, |info| info.cgroups_dropped),
        cgroups_unwatched: info.map_or(0, |info| info.cgroups_unwatched),
    })
}

/// The first line of [`describe`]: whether, and where, enforcement is in force.
fn enforcement_line(status: &Status) -> String {
    let mut out = String::new();
    let attached: Vec<&Hook> = status
        .programs
        .iter()
        .filter(|hook| hook.attached)
        .collect();
    if status.enforcing {
        let cgroup = attached.first().map_or_else(
            || "?".into(),
            |hook| {
                hook.cgroup.clone().unwrap_or_else(|| {
                    format!(
                        "(removed, id {}: only its remaining sockets are judged)",
                        hook.cgroup_id.unwrap_or(0)
                    )
                })
            },
        );
        let _ = writeln!(
            out,
            "enforcement: in force on cgroup {cgroup} (pins in {})",
            status.pin_dir
        );
    } else if status.programs.iter().any(|hook| hook.defunct) {
        let _ = writeln!(
            out,
            "enforcement: OFF: links point to a removed cgroup: nothing is enforced (pins in \
             {}); start the agent to attach again, or `imds-guard detach` to clear them",
            status.pin_dir
        );
    } else if attached.is_empty() {
        let _ = writeln!(
            out,
            "enforcement: off (no program attached through {})",
            status.pin_dir
        );
    } else {
        let _ = writeln!(
            out,
            "enforcement: PARTIAL: {} of {} programs attached (pins in {})",
            attached.len(),
            status.programs.len(),
            status.pin_dir
        );
    }
    out
}

/// The status as text for people.
#[must_use]
pub fn describe(status: &Status) -> String {
    let mut out = enforcement_line(status);
    for hook in &status.programs {
        let _ = match (&hook.program, hook.attached) {
            (Some(program), true) => writeln!(
                out,
                "  {:<9} program {} (tag {})",
                hook.hook, program.id, program.tag
            ),
            _ if hook.defunct => {
                writeln!(out, "  {:<9} defunct (its cgroup was removed)", hook.hook)
            }
            _ => writeln!(out, "  {:<9} not attached", hook.hook),
        };
    }
    if let Some(containers_by) = &status.containers_by {
        let _ = writeln!(
            out,
            "containers: told by {containers_by}{}",
            if status.containers_warning {
                " (where a program tells them by cgroup path alone, root in namespaces of its \
                 own outside a container runtime's cgroup passes for the host's root; the \
                 agent's start log says why)"
            } else {
                ""
            }
        );
    }
    if let Some(policy) = &status.policy {
        describe_policy(&mut out, policy);
    }
    if let Some(counters) = &status.counters {
        let _ = writeln!(
            out,
            "counters: allowed {}, denied {}, audited {}, repeats folded {}, events lost {}",
            counters.allowed,
            counters.denied,
            counters.audited,
            counters.folded,
            counters.events_lost
        );
        let _ = writeln!(
            out,
            "http requests: refused {}, unjudged {}, connections unfollowed {}",
            counters.http_refused, counters.http_unjudged, counters.http_unfollowed
        );
    }
    describe_agent(&mut out, &status.agent);
    out
}

/// The policy in force, and what of the cgroup tree it may be missing.
fn describe_policy(out: &mut String, policy: &PolicySummary) {
    let protected: Vec<String> = policy.protected.iter().map(ToString::to_string).collect();
    let _ = writeln!(out, "mode: {}", policy.mode);
    let _ = writeln!(
        out,
        "policy: generation {}, {} rules ({} allow entries), {} cgroup entries; protects {}",
        policy.generation,
        policy.rules,
        policy.allow_entries,
        policy.cgroup_entries,
        protected.join(", ")
    );
    if let Some(unseen_after) = policy.unseen_after {
        let _ = writeln!(
            out,
            "cgroups: BEHIND: cgroups with an id above {unseen_after} get only the rules \
             that hold in every cgroup until the agent catches up"
        );
    }
    if policy.cgroups_unwatched > 0 {
        let _ = writeln!(
            out,
            "cgroups: {} directories cannot be watched (fs.inotify.max_user_watches): \
             cgroups made below them get their rules at the next scan (30 s)",
            policy.cgroups_unwatched
        );
    }
    if policy.cgroups_dropped > 0 {
        let _ = writeln!(
            out,
            "cgroups: the map is full: {} cgroups keep their parent's rules instead of \
             wider ones of their own",
            policy.cgroups_dropped
        );
    }
}

/// Whether the agent runs, and how it is.
fn describe_agent(out: &mut String, agent: &AgentStatus) {
    let state = match (agent.running, agent.healthy) {
        (true, true) => format!("running (pid {}), healthy", agent.pid.unwrap_or_default()),
        (true, false) => format!(
            "running (pid {}), UNHEALTHY: {}",
            agent.pid.unwrap_or_default(),
            agent.problem.clone().unwrap_or_default()
        ),
        (false, _) => format!("not running: {}", agent.problem.clone().unwrap_or_default()),
    };
    let _ = writeln!(out, "agent: {state}");
    if let Some(version) = &agent.version {
        let _ = writeln!(
            out,
            "  version {version}; last heartbeat {} s ago; {} reloads, {} refused",
            agent.heartbeat_age_secs.unwrap_or_default(),
            agent.reloads.unwrap_or_default(),
            agent.failed_reloads.unwrap_or_default()
        );
    }
    if let Some(posture) = &agent.posture {
        let _ = writeln!(
            out,
            "posture: http_tokens {}{}, hop limit {}; checked {} s ago",
            posture.http_tokens,
            match posture.http_tokens {
                "optional" => " (IMDS answers IMDSv1: CIS AWS Foundations 5.6 fails)",
                "unknown" => " (the check got no answer; see the agent's log)",
                _ => "",
            },
            posture
                .hop_limit
                .map_or_else(|| "unknown".to_owned(), |limit| limit.to_string()),
            posture.checked_secs_ago
        );
    }
}
