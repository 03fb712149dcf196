//! `imds-guard explain`: the verdict a workload would get now, judged by the same decision
//! function the programs run, on the entries the agent would write.

use std::{collections::BTreeSet, fmt::Write as _, fs, os::unix::fs::MetadataExt as _};

use imds_guard_common::{
    event::{VERDICT_ALLOW, VERDICT_AUDIT},
    policy::{INIT_CGROUP_NS_INO, INIT_PID_NS_INO},
};
use nix::unistd::{Uid, User};

use super::{with_group_name, with_user_name};
use crate::{
    cli::ExplainArgs,
    config::{Config, Overrides, Principal},
    error::{ConfigError, ProcError, Result},
    host::{
        cgroups::{Cgroup, Hierarchy, is_within},
        procfs, workload,
    },
    policy::{
        Pattern, Policy, PolicyRule,
        compile::{self, CgroupDir, Compiled},
    },
};

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
pub fn run(args: &ExplainArgs) -> Result<()> {
    let config = Config::load(args.config.as_deref(), &Overrides::default())?;
    let hierarchy = Hierarchy::discover()?;
    let attach = hierarchy.resolve(&config.attach.origin, &config.attach.value)?;
    let policy = Policy::resolve(&config, &hierarchy)?;
    let workload = workload(args, &hierarchy)?;
    print!("{}", explanation(&hierarchy, policy, &attach, &workload));
    Ok(())
}

/// The workload `explain` is asked about: a running process, or the ids and cgroup given.
fn workload(args: &ExplainArgs, hierarchy: &Hierarchy) -> Result<Workload> {
    match args.pid {
        Some(pid) => process(pid),
        None => described(args, hierarchy),
    }
}

/// A running process, as the kernel sees it.
fn process(pid: u32) -> Result<Workload> {
    let (uid, gid) = procfs::real_ids(pid)?;
    // As the kernel tells (see the programs' `task::kind_bits`): a namespace that is not
    // the initial one, by its inode number.
    let namespaced = if procfs::namespace(pid, "pid")? != u64::from(INIT_PID_NS_INO) {
        Some("its pid namespace is not the host's")
    } else if procfs::namespace(pid, "cgroup")? != u64::from(INIT_CGROUP_NS_INO) {
        Some("its cgroup namespace is not the host's")
    } else {
        None
    };
    let cgroup = procfs::cgroup(pid).map_err(|source| ProcError::Process { pid, source })?;
    Ok(Workload {
        label: Some(format!("pid {pid} ({})", procfs::comm(pid))),
        uid,
        gid,
        cgroup,
        namespaced,
    })
}

/// The workload the options describe: `--uid` (its primary group unless `--gid`), `--cgroup`,
/// `--in-container`.
fn described(args: &ExplainArgs, hierarchy: &Hierarchy) -> Result<Workload> {
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
        Some(given) => hierarchy.resolve("--cgroup", given)?.path,
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
    let mut out = describe_workload(workload);
    if !is_within(&workload.cgroup, &attach.path) {
        let _ = writeln!(
            out,
            "verdict: allow: not judged, its cgroup is outside the attach point {}",
            attach.path
        );
        return out;
    }
    let chain = ancestry(hierarchy, &workload.cgroup);
    let ancestors: Vec<u64> = chain.iter().map(|dir| dir.id).collect();
    let within_attach: Vec<CgroupDir> = (chain.into_iter())
        .filter(|dir| is_within(&dir.path, &attach.path))
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
    let _ = match policy.rule(judgement.rule) {
        Some(rule) => writeln!(
            out,
            "decided by: rule {} \"{}\" [{}]",
            judgement.rule, rule.name, rule.origin
        ),
        None => writeln!(
            out,
            "decided by: default (mode {}: no rule matches)",
            policy.mode
        ),
    };
    let matched = policy.matched_within(&workload.cgroup);
    let _ = writeln!(out, "rules:");
    for (id, rule) in (1u32..).zip(&policy.rules) {
        let status = match why_not(policy, rule, workload, &matched) {
            None => "matches".to_owned(),
            Some(reason) => format!("does not match: {reason}"),
        };
        let _ = writeln!(out, "  {id}. {}: {status}", rule.name);
    }
    out
}

/// The first lines of an explanation: who the workload is, and whether it is in a container.
fn describe_workload(workload: &Workload) -> String {
    let who = |id: Option<u32>, name: fn(u32) -> String| id.map_or_else(|| "any".to_owned(), name);
    let container_cgroup = workload::is_container_cgroup(&workload.cgroup);
    let label = (workload.label.as_ref()).map_or_else(String::new, |label| format!("{label}, "));
    format!(
        "workload: {label}uid {}, gid {}, cgroup {}\nin a container: {}\n",
        who(workload.uid, with_user_name),
        who(workload.gid, with_group_name),
        workload.cgroup,
        match (workload.namespaced, container_cgroup) {
            (Some(why), true) => format!("yes ({why}, and its cgroup is a container's)"),
            (Some(why), false) => format!("yes ({why})"),
            (None, true) => "yes (its cgroup is a container's)".to_owned(),
            (None, false) => "no (the host's namespaces, not a container's cgroup)".to_owned(),
        }
    )
}

/// `cgroup` and its ancestors, root first, as the kernel walks them.
fn ancestry(hierarchy: &Hierarchy, cgroup: &str) -> Vec<CgroupDir> {
    let mut chain = vec![CgroupDir {
        id: dir_id(hierarchy, "/"),
        path: "/".to_owned(),
    }];
    let mut prefix = String::new();
    for part in cgroup.split('/').filter(|part| !part.is_empty()) {
        prefix.push('/');
        prefix.push_str(part);
        chain.push(CgroupDir {
            id: dir_id(hierarchy, &prefix),
            path: prefix.clone(),
        });
    }
    chain
}

/// Why `rule` does not match `workload`, or `None` when it does.
fn why_not(
    policy: &Policy,
    rule: &PolicyRule,
    workload: &Workload,
    matched: &BTreeSet<usize>,
) -> Option<String> {
    let in_container =
        workload.namespaced.is_some() || workload::is_container_cgroup(&workload.cgroup);
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
