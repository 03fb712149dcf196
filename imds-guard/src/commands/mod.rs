//! The operator's commands beside `run`: `reload`, `check-config` and `explain`. They read the
//! same config and resolve it the same way as the agent, so what they say is what it does.

pub mod report;
pub mod status;

use std::{collections::BTreeSet, fmt::Write as _, fs, os::unix::fs::MetadataExt as _};

use clap::Parser as _;
use imds_guard_common::{
    event::{VERDICT_ALLOW, VERDICT_AUDIT},
    policy::{INIT_CGROUP_NS_INO, INIT_PID_NS_INO},
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::{Gid, Group, Pid, Uid, User},
};

use crate::{
    cli::{
        CheckConfigArgs, Cli, Command, DetachArgs, ExplainArgs, ReloadArgs, ReportArgs,
        ReportFormat, StatusArgs,
    },
    config::{Config, Containers, Mode, Overrides, Principal},
    error::{ConfigError, PidFileError, ProcError, Result},
    host::cgroups::{Cgroup, Hierarchy},
    host::follow,
    host::pidfile,
    host::procfs,
    host::workload,
    kernel::pins::PinDir,
    policy::compile::{self, CgroupDir, Compiled},
    policy::{Pattern, Policy, PolicyRule},
};

/// How many matching cgroups `check-config` lists per rule before summing up the rest.
const LISTED_CGROUPS_PER_RULE: usize = 20;

/// `imds-guard reload`: checks the config the running agent would read (from the agent's own
/// command line) and, when it is valid, sends the agent SIGHUP.
///
/// # Errors
/// [`PidFileError::NotRunning`], the config's error (nothing is sent), or [`PidFileError::Signal`].
pub fn reload(args: &ReloadArgs) -> Result<()> {
    let pid = pidfile::running_agent(&args.pid_file)?;
    let agent_args = procfs::args(pid.unsigned_abs())?;
    let config_file = match Cli::try_parse_from(agent_args) {
        Ok(Cli {
            command: Command::Run(run),
        }) => {
            let config = Config::load(run.config.as_deref(), &run.overrides())?;
            Policy::resolve(&config, &Hierarchy::discover()?)?;
            config.file.map_or_else(
                || "its command line (no config file)".to_owned(),
                |file| file.display().to_string(),
            )
        }
        _ => {
            return Err(PidFileError::NotRunning {
                path: args.pid_file.clone(),
                why: format!("pid {pid} is not an `imds-guard run` process"),
            }
            .into());
        }
    };
    kill(Pid::from_raw(pid), Signal::SIGHUP)
        .map_err(|source| PidFileError::Signal { pid, source })?;
    println!(
        "imds-guard (pid {pid}) is re-reading {config_file}; its log says when it is in force"
    );
    Ok(())
}

/// `imds-guard check-config`: validates and prints the effective policy.
///
/// # Errors
/// The config's first error, as `file:line:col: message`.
pub fn check_config(args: &CheckConfigArgs) -> Result<()> {
    let config = Config::load(args.file.as_deref(), &Overrides::default())?;
    let hierarchy = Hierarchy::discover()?;
    let attach = hierarchy.resolve(&config.attach.origin, &config.attach.value)?;
    let policy = Policy::resolve(&config, &hierarchy)?;
    let dirs = follow::scan(&hierarchy, &attach.path);
    print!("{}", describe(&config, &policy, &attach, &dirs));
    Ok(())
}

/// The effective policy, as `check-config` prints it.
fn describe(config: &Config, policy: &Policy, attach: &Cgroup, dirs: &[CgroupDir]) -> String {
    let mut out = String::new();
    let file = config.file.as_ref().map_or_else(
        || "no config file (built-in defaults)".to_owned(),
        |file| file.display().to_string(),
    );
    let _ = writeln!(out, "{file}: valid");
    let _ = writeln!(out, "mode: {} ({})", policy.mode, mode_effect(policy.mode));
    let _ = writeln!(out, "attach: {} ({})", attach.path, config.attach.origin);
    for setting in &config.protect {
        let _ = writeln!(out, "protect: {} ({})", setting.value, setting.origin);
    }
    let _ = writeln!(out, "rules from: {}", config.rules_source());
    let _ = writeln!(out, "rules (the first that matches an attempt decides):");
    let within: Vec<(&CgroupDir, BTreeSet<usize>, BTreeSet<usize>)> = dirs
        .iter()
        .map(|dir| {
            (
                dir,
                policy.matched_by(&dir.path),
                policy.matched_within(&dir.path),
            )
        })
        .collect();
    for (id, rule) in (1u32..).zip(&policy.rules) {
        let action = if rule.audit {
            "allow and report (staged)"
        } else {
            "allow"
        };
        let _ = writeln!(out, "  {id}. {} [{}]: {action}", rule.name, rule.origin);
        let _ = writeln!(out, "     when: {}", resolved_conditions(policy, rule));
        let _ = writeln!(out, "     containers: {}", containers_effect(rule));
        if !rule.has_cgroup_conditions() {
            continue;
        }
        let positive: Vec<&str> = within
            .iter()
            .filter(|(_, own, all)| {
                rule.cgroup
                    .iter()
                    .chain(&rule.unit)
                    .any(|p| own.contains(p))
                    && rule.applies_in(all)
            })
            .map(|(dir, _, _)| dir.path.as_str())
            .collect();
        let negative: Vec<&str> = within
            .iter()
            .filter(|(_, own, _)| rule.not_cgroup.iter().any(|p| own.contains(p)))
            .map(|(dir, _, _)| dir.path.as_str())
            .collect();
        if !rule.cgroup.is_empty() || !rule.unit.is_empty() {
            list_cgroups(&mut out, "in cgroups now", &positive);
        }
        if !rule.not_cgroup.is_empty() {
            list_cgroups(&mut out, "excluded now", &negative);
        }
    }
    let _ = writeln!(out, "  default: {}", mode_effect(policy.mode));
    let warnings = policy.warnings();
    if !warnings.is_empty() {
        let _ = writeln!(out, "warnings ({}):", warnings.len());
        for warning in warnings {
            let _ = writeln!(
                out,
                "  {}: rule \"{}\": {}",
                warning.origin, warning.rule, warning.message
            );
        }
    }
    out
}

/// Whether a rule matches tasks in containers, and why, as `check-config` says it.
fn containers_effect(rule: &PolicyRule) -> String {
    let effect = match rule.containers {
        Containers::Excluded => "no: only the host's tasks (a container's never)",
        Containers::Included => "yes: the host's tasks and containers'",
        Containers::Only => "only: containers' tasks, never the host's",
    };
    let why = if rule.containers_written {
        "as written"
    } else if rule.containers == Containers::Included {
        "the default for a rule that names container cgroups"
    } else {
        "the default"
    };
    format!("{effect} ({why})")
}

fn mode_effect(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "attempts no rule allows are denied (EPERM) and reported",
        Mode::Audit => "attempts no rule allows go through and are reported",
    }
}

fn list_cgroups(out: &mut String, label: &str, paths: &[&str]) {
    if paths.is_empty() {
        let _ = writeln!(out, "     {label}: none");
        return;
    }
    let _ = writeln!(out, "     {label}: {}", paths.len());
    for path in paths.iter().take(LISTED_CGROUPS_PER_RULE) {
        let _ = writeln!(out, "       {path}");
    }
    if paths.len() > LISTED_CGROUPS_PER_RULE {
        let _ = writeln!(
            out,
            "       … and {} more",
            paths.len() - LISTED_CGROUPS_PER_RULE
        );
    }
}

/// A rule's conditions with ids and names side by side: `uid 998 (cwagent), unit x.service`.
fn resolved_conditions(policy: &Policy, rule: &PolicyRule) -> String {
    let mut parts = Vec::new();
    if let Some(uid) = rule.uid {
        parts.push(format!("uid {}", with_user_name(uid)));
    }
    if let Some(gid) = rule.gid {
        parts.push(format!("gid {}", with_group_name(gid)));
    }
    let patterns = |indices: &[usize]| {
        let texts: Vec<String> = indices
            .iter()
            .map(|&i| policy.patterns[i].to_string())
            .collect();
        texts.join(" or ")
    };
    if !rule.cgroup.is_empty() {
        parts.push(format!("in {}", patterns(&rule.cgroup)));
    }
    if !rule.unit.is_empty() {
        parts.push(format!("in {}", patterns(&rule.unit)));
    }
    if !rule.not_cgroup.is_empty() {
        parts.push(format!("not in {}", patterns(&rule.not_cgroup)));
    }
    parts.join(", ")
}

fn with_user_name(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("{uid} ({})", user.name),
        _ => uid.to_string(),
    }
}

fn with_group_name(gid: u32) -> String {
    match Group::from_gid(Gid::from_raw(gid)) {
        Ok(Some(group)) => format!("{gid} ({})", group.name),
        _ => gid.to_string(),
    }
}

/// Who is asking, as the kernel would see it.
#[derive(Debug)]
struct Workload {
    /// `pid 42 (curl)` for a process.
    label: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
    /// Hierarchy path of its cgroup.
    cgroup: String,
    /// Outside the host's initial pid or cgroup namespace, and which one says so.
    namespaced: Option<&'static str>,
}

/// `imds-guard explain`: the verdict a workload would get now, and the rule that decides it.
///
/// # Errors
/// Config errors, an unknown process, user, group or cgroup.
pub fn explain(args: &ExplainArgs) -> Result<()> {
    let config = Config::load(args.config.as_deref(), &Overrides::default())?;
    let hierarchy = Hierarchy::discover()?;
    let attach = hierarchy.resolve(&config.attach.origin, &config.attach.value)?;
    let policy = Policy::resolve(&config, &hierarchy)?;
    let workload = workload(args, &hierarchy)?;
    print!("{}", explanation(&hierarchy, policy, &attach, &workload));
    Ok(())
}

fn workload(args: &ExplainArgs, hierarchy: &Hierarchy) -> Result<Workload> {
    if let Some(pid) = args.pid {
        let (uid, gid) = procfs::real_ids(pid)?;
        // As the kernel tells (see the programs' `task::current_kind`): a namespace that is not
        // the initial one, by its inode number.
        let namespaced = if procfs::namespace(pid, "pid")? != u64::from(INIT_PID_NS_INO) {
            Some("its pid namespace is not the host's")
        } else if procfs::namespace(pid, "cgroup")? != u64::from(INIT_CGROUP_NS_INO) {
            Some("its cgroup namespace is not the host's")
        } else {
            None
        };
        let cgroup = procfs::cgroup(pid).map_err(|source| ProcError::Process { pid, source })?;
        return Ok(Workload {
            label: Some(format!("pid {pid} ({})", procfs::comm(pid))),
            uid,
            gid,
            cgroup,
            namespaced,
        });
    }
    let principal = |text: &str| {
        text.parse::<u32>()
            .map_or_else(|_| Principal::Name(text.to_owned()), Principal::Id)
    };
    let (uid, user_gid) = match &args.uid {
        Some(text) => match principal(text) {
            Principal::Id(uid) => {
                let gid = User::from_uid(Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.gid.as_raw());
                (Some(uid), gid)
            }
            Principal::Name(name) => match User::from_name(&name) {
                Ok(Some(user)) => (Some(user.uid.as_raw()), Some(user.gid.as_raw())),
                _ => {
                    return Err(ConfigError::Invalid {
                        origin: "--uid".into(),
                        message: format!("unknown user {name:?}: not in the user database"),
                    }
                    .into());
                }
            },
        },
        None => (None, None),
    };
    let gid = match &args.gid {
        Some(text) => Some(crate::policy::resolve_gid(
            &principal(text),
            &"--gid".to_owned(),
        )?),
        None => user_gid,
    };
    let cgroup = match &args.cgroup {
        Some(given) => hierarchy.resolve(&"--cgroup".to_owned(), given)?.path,
        None => "/".to_owned(),
    };
    Ok(Workload {
        label: None,
        uid,
        gid,
        cgroup,
        namespaced: args
            .in_container
            .then_some("--in-container: namespaces of its own"),
    })
}

/// What `explain` prints: the verdict from the map entries the agent would write, judged as
/// the kernel judges, then each rule and why it does or does not match.
fn explanation(
    hierarchy: &Hierarchy,
    policy: Policy,
    attach: &Cgroup,
    workload: &Workload,
) -> String {
    let mut out = String::new();
    let who = |id: Option<u32>, name: fn(u32) -> String| id.map_or_else(|| "any".to_owned(), name);
    let _ = writeln!(
        out,
        "workload: {}uid {}, gid {}, cgroup {}",
        workload
            .label
            .as_ref()
            .map_or_else(String::new, |label| format!("{label}, ")),
        who(workload.uid, with_user_name),
        who(workload.gid, with_group_name),
        workload.cgroup
    );
    let container_cgroup = workload::is_container_cgroup(&workload.cgroup);
    let in_container = workload.namespaced.is_some() || container_cgroup;
    let _ = writeln!(
        out,
        "in a container: {}",
        match (workload.namespaced, container_cgroup) {
            (Some(why), true) => format!("yes ({why}, and its cgroup is a container's)"),
            (Some(why), false) => format!("yes ({why})"),
            (None, true) => "yes (its cgroup is a container's)".to_owned(),
            (None, false) => "no (the host's namespaces, not a container's cgroup)".to_owned(),
        }
    );
    if !compile::is_within(&workload.cgroup, &attach.path) {
        let _ = writeln!(
            out,
            "verdict: allow: not judged, its cgroup is outside the attach point {}",
            attach.path
        );
        return out;
    }
    // The cgroup and its ancestors, root first, as the kernel walks them.
    let mut chain = vec![CgroupDir {
        id: dir_id(hierarchy, "/"),
        path: "/".to_owned(),
    }];
    let mut prefix = String::new();
    for part in workload.cgroup.split('/').filter(|part| !part.is_empty()) {
        prefix.push('/');
        prefix.push_str(part);
        chain.push(CgroupDir {
            id: dir_id(hierarchy, &prefix),
            path: prefix.clone(),
        });
    }
    let ancestors: Vec<u64> = chain.iter().map(|dir| dir.id).collect();
    let within_attach: Vec<CgroupDir> = (chain.iter())
        .filter(|dir| compile::is_within(&dir.path, &attach.path))
        .cloned()
        .collect();
    let (compiled, _) = Compiled::new(policy, 0, &attach.path, &within_attach);
    let judgement = compile::judge(
        &compiled.entries(),
        0,
        &ancestors,
        workload.uid,
        workload.gid,
        workload.namespaced.is_some(),
    );
    let policy = &compiled.policy;
    let verdict = match judgement.verdict {
        VERDICT_ALLOW => "allow",
        VERDICT_AUDIT => "allow and report (audit)",
        _ => "deny (EPERM) and report",
    };
    let addresses: Vec<String> = policy.protect.iter().map(ToString::to_string).collect();
    let _ = writeln!(out, "verdict: {verdict}, for {}", addresses.join(", "));
    match policy.rule(judgement.rule) {
        Some(rule) => {
            let _ = writeln!(
                out,
                "decided by: rule {} \"{}\" [{}]",
                judgement.rule, rule.name, rule.origin
            );
        }
        None => {
            let _ = writeln!(
                out,
                "decided by: default (mode {}: no rule matches)",
                policy.mode
            );
        }
    }
    let matched = policy.matched_within(&workload.cgroup);
    let _ = writeln!(out, "rules:");
    for (id, rule) in (1u32..).zip(&policy.rules) {
        let why = why_not(policy, rule, workload, &matched, in_container);
        let status = match why {
            None => "matches".to_owned(),
            Some(reason) => format!("does not match: {reason}"),
        };
        let _ = writeln!(out, "  {id}. {}: {status}", rule.name);
    }
    out
}

/// Why `rule` does not match `workload`, or `None` when it does.
fn why_not(
    policy: &Policy,
    rule: &PolicyRule,
    workload: &Workload,
    matched: &BTreeSet<usize>,
    in_container: bool,
) -> Option<String> {
    if let Some(uid) = rule.uid
        && workload.uid != Some(uid)
    {
        return Some(format!("its uid is not {}", with_user_name(uid)));
    }
    if let Some(gid) = rule.gid
        && workload.gid != Some(gid)
    {
        return Some(format!("its gid is not {}", with_group_name(gid)));
    }
    let names = |indices: &[usize]| -> Vec<String> {
        indices
            .iter()
            .map(|&i| policy.patterns[i].to_string())
            .collect()
    };
    if !rule.cgroup.is_empty() && !rule.cgroup.iter().any(|p| matched.contains(p)) {
        return Some(format!("not in {}", names(&rule.cgroup).join(" or ")));
    }
    if !rule.unit.is_empty() && !rule.unit.iter().any(|p| matched.contains(p)) {
        return Some(format!("not in {}", names(&rule.unit).join(" or ")));
    }
    let excluded: Vec<&Pattern> = (rule.not_cgroup.iter())
        .filter(|p| matched.contains(p))
        .map(|&i| &policy.patterns[i])
        .collect();
    if let Some(pattern) = excluded.first() {
        return Some(format!("it is in {pattern}, which the rule excludes"));
    }
    if !rule.containers.admits(in_container) {
        return Some(if in_container {
            "it is in a container, and the rule matches only the host's tasks (containers = \
             false)"
                .to_owned()
        } else {
            "it is not in a container, and the rule matches only containers' tasks \
             (containers = \"only\")"
                .to_owned()
        });
    }
    None
}

/// A cgroup's id, or 0 (no entry can match) when it cannot be read.
fn dir_id(hierarchy: &Hierarchy, path: &str) -> u64 {
    fs::metadata(hierarchy.dir_of(path)).map_or(0, |metadata| metadata.ino())
}

/// Prints `value` as indented JSON.
fn print_json(value: &impl serde::Serialize) {
    // Only a map with keys that are not strings, or a `Serialize` that fails, can fail to
    // serialise: these types have neither.
    let text = serde_json::to_string_pretty(value).expect("plain structs, string keys");
    println!("{text}");
}

/// `imds-guard status`: prints the status; returns whether enforcement is in force.
#[must_use]
pub fn status(args: &StatusArgs) -> bool {
    let hierarchy = Hierarchy::discover().ok();
    let status = status::read(&args.pin_dir, &args.pid_file, hierarchy.as_ref());
    if args.json {
        print_json(&status);
    } else {
        print!("{}", status::describe(&status));
    }
    status.enforcing
}

/// `imds-guard detach`: detaches every pinned link and removes the pins.
///
/// # Errors
/// [`PidFileError::AlreadyRunning`] while an agent runs (it would put enforcement back), or the
/// first pin that could not be removed.
pub fn detach(args: &DetachArgs) -> Result<()> {
    if let Ok(pid) = pidfile::running_agent(&args.pid_file) {
        return Err(PidFileError::AlreadyRunning {
            path: args.pid_file.clone(),
            pid: format!("{pid}; stop it first, e.g. `systemctl stop imds-guard`"),
        }
        .into());
    }
    let pins = PinDir::new(&args.pin_dir);
    if !pins.root().exists() {
        println!(
            "nothing to detach: {} does not exist",
            pins.root().display()
        );
        return Ok(());
    }
    let detached = pins.remove_all()?;
    println!(
        "detached {} and removed {}: IMDS is no longer guarded",
        if detached.is_empty() {
            "nothing".to_owned()
        } else {
            detached.join(", ")
        },
        pins.root().display()
    );
    Ok(())
}

/// `imds-guard report`: who touched IMDS, or (`--suggest-policy`) a policy for them.
///
/// # Errors
/// [`crate::error::EventsError::Stream`] for an unreadable file or a line that is not an event.
pub fn report(args: &ReportArgs) -> Result<()> {
    let (input, source) = crate::commands::report::open(args.file.as_deref())?;
    let workloads = crate::commands::report::workloads(input, &source)?;
    if args.suggest_policy {
        // The audited policy must be valid: the suggestion builds on it.
        let config = Config::load(args.config.as_deref(), &Overrides::default())?;
        let text = match &config.file {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?,
            None => String::new(),
        };
        let path = config.file.as_ref().map(|path| path.display().to_string());
        let base = path
            .as_deref()
            .map(|path| crate::commands::report::Base { path, text: &text });
        print!(
            "{}",
            crate::commands::report::suggest_policy(&workloads, base.as_ref())?
        );
    } else if args.format == ReportFormat::Json {
        print_json(&workloads);
    } else {
        print!("{}", crate::commands::report::table(&workloads));
    }
    Ok(())
}
