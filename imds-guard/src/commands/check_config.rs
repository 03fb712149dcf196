//! `imds-guard check-config`: the settings validated, and the policy they make on this host.

use std::{collections::BTreeSet, fmt::Write as _};

use super::{with_group_name, with_user_name};
use crate::{
    cli::CheckConfigArgs,
    config::{Config, Containers, Mode, Overrides},
    error::Result,
    host::{
        cgroups::{Cgroup, Hierarchy},
        follow,
    },
    policy::{Policy, PolicyRule, compile::CgroupDir},
};

/// How many matching cgroups `check-config` lists per rule before summing up the rest.
const LISTED_CGROUPS_PER_RULE: usize = 20;

/// `imds-guard check-config`: validates and prints the effective policy.
///
/// # Errors
/// The config's first error, as `file:line:col: message`.
pub fn run(args: &CheckConfigArgs) -> Result<()> {
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
    let matches: Vec<DirMatches<'_>> = dirs
        .iter()
        .map(|dir| DirMatches {
            path: &dir.path,
            own: policy.matched_by(&dir.path),
            within: policy.matched_within(&dir.path),
        })
        .collect();
    for (id, rule) in (1u32..).zip(&policy.rules) {
        describe_rule(&mut out, id, policy, rule, &matches);
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

/// The patterns a cgroup directory matches: its own path's, and those of it and its ancestors.
struct DirMatches<'a> {
    path: &'a str,
    own: BTreeSet<usize>,
    within: BTreeSet<usize>,
}

/// Rule `id`: what it allows, when, and which cgroups it takes in or leaves out now.
fn describe_rule(
    out: &mut String,
    id: u32,
    policy: &Policy,
    rule: &PolicyRule,
    matches: &[DirMatches<'_>],
) {
    let action = if rule.audit {
        "allow and report (staged)"
    } else {
        "allow"
    };
    let _ = writeln!(out, "  {id}. {} [{}]: {action}", rule.name, rule.origin);
    let _ = writeln!(out, "     when: {}", resolved_conditions(policy, rule));
    let _ = writeln!(out, "     containers: {}", containers_effect(rule));
    if !rule.cgroup.is_empty() || !rule.unit.is_empty() {
        let positive: Vec<&str> = (matches.iter())
            .filter(|dir| {
                let named = rule.cgroup.iter().chain(&rule.unit);
                named.into_iter().any(|p| dir.own.contains(p)) && rule.applies_in(&dir.within)
            })
            .map(|dir| dir.path)
            .collect();
        list_cgroups(out, "in cgroups now", &positive);
    }
    if !rule.not_cgroup.is_empty() {
        let negative: Vec<&str> = (matches.iter())
            .filter(|dir| rule.not_cgroup.iter().any(|p| dir.own.contains(p)))
            .map(|dir| dir.path)
            .collect();
        list_cgroups(out, "excluded now", &negative);
    }
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
