//! The policy: settings resolved against this host ([`Policy::resolve`]: user and group names
//! looked up, cgroup patterns compiled), and which rules apply to a task in a given cgroup
//! ([`Policy::rules_in`]). What the kernel maps hold for it is [`crate::policy::compile`]'s
//! business.

pub mod compile;

use std::{collections::BTreeSet, net::IpAddr};

use globset::{GlobSet, GlobSetBuilder};
use imds_guard_common::{http::PathRules, policy::MAX_CGROUP_LEVEL};

use crate::config::glob::compile_glob;
use crate::{
    config::{Config, ConfigError, Containers, Imds, Mode, Origin, Principal, Rule, Setting},
    host::cgroups::Hierarchy,
    host::workload,
};

/// An allow rule, resolved.
#[derive(Clone, Debug)]
pub struct PolicyRule {
    /// Name used in events: the config's `name`, or the rule's conditions.
    pub name: String,
    /// Where it was written.
    pub origin: Origin,
    /// Its conditions as written, e.g. `uid cwagent, unit amazon-cloudwatch-agent.service`.
    pub conditions: String,
    /// The task's uid must be this.
    pub uid: Option<u32>,
    /// The task's primary gid must be this.
    pub gid: Option<u32>,
    /// The task must be in (or below) a cgroup matching one of these patterns (indices into
    /// [`Policy::patterns`]); empty: no such condition.
    pub cgroup: Vec<usize>,
    /// The task must be in (or below) the cgroup of one of these units (pattern indices).
    pub unit: Vec<usize>,
    /// The task must be in (or below) none of these (pattern indices).
    pub not_cgroup: Vec<usize>,
    /// Whether tasks in containers match: as written, else [`Containers::Included`] when one of
    /// its `cgroup` or `unit` patterns names container cgroups (see
    /// [`workload::names_container_cgroups`]), else [`Containers::Excluded`].
    pub containers: Containers,
    /// `containers` was written in the rule (not the default).
    pub containers_written: bool,
    /// Allows, but reports (a staged rule).
    pub audit: bool,
    /// Which IMDS requests its workloads may make: the rule's `imds`, else the global one.
    pub imds: Imds,
    /// Its `paths` and `deny_paths`, compiled; `None` when it has neither.
    pub paths: Option<PathRules>,
}

impl PolicyRule {
    /// Its `RULE_FLAG_*` bits, as `ALLOW` carries them.
    #[must_use]
    pub fn kernel_flags(&self) -> u32 {
        use imds_guard_common::policy::{RULE_FLAG_AUDIT, RULE_FLAG_PATHS, RULE_FLAG_V2};
        (if self.audit { RULE_FLAG_AUDIT } else { 0 })
            | (if self.imds == Imds::V2 {
                RULE_FLAG_V2
            } else {
                0
            })
            | (if self.paths.is_some() {
                RULE_FLAG_PATHS
            } else {
                0
            })
    }
}

impl PolicyRule {
    /// Whether the rule applies to tasks in a cgroup whose own path or ancestors' paths match
    /// exactly the patterns in `matched` (uid and gid aside).
    #[must_use]
    pub fn applies_in(&self, matched: &BTreeSet<usize>) -> bool {
        let any = |patterns: &[usize]| patterns.iter().any(|p| matched.contains(p));
        (self.cgroup.is_empty() || any(&self.cgroup))
            && (self.unit.is_empty() || any(&self.unit))
            && !any(&self.not_cgroup)
    }

    /// Whether the rule's decision depends on the task's cgroup.
    #[must_use]
    pub fn has_cgroup_conditions(&self) -> bool {
        !(self.cgroup.is_empty() && self.unit.is_empty() && self.not_cgroup.is_empty())
    }
}

/// The rules that apply in one situation, by rule id in order: to a task on the host and to a
/// task in a container (in the kernel's view: its namespaces). In a container's cgroup both
/// are the container's rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Applicable {
    /// For `TASK_HOST`.
    pub host: Vec<u32>,
    /// For `TASK_CONTAINER`.
    pub container: Vec<u32>,
}

impl Applicable {
    /// The rules for a task that is (`true`) or is not in a container.
    #[must_use]
    pub fn for_task(&self, in_container: bool) -> &[u32] {
        if in_container {
            &self.container
        } else {
            &self.host
        }
    }

    /// Whether every rule of `self` is in `other` (`self` allows no more than `other`).
    #[must_use]
    pub fn within(&self, other: &Self) -> bool {
        sorted_subset(&self.host, &other.host) && sorted_subset(&self.container, &other.container)
    }
}

/// Whether every id of `ids` is in `of`, both in ascending order (as [`Policy::rules_in`] makes
/// them): one pass over both, not a search of `of` per id (10,000 rules and as many cgroups
/// took 10 s to start that way).
fn sorted_subset(ids: &[u32], of: &[u32]) -> bool {
    debug_assert!(ids.is_sorted() && of.is_sorted(), "rule ids in order");
    let mut of = of.iter();
    ids.iter()
        .all(|id| of.find(|&candidate| candidate >= id) == Some(id))
}

/// A cgroup condition: a path pattern, or a unit name pattern matched against the last part of
/// the path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pattern {
    /// `cgroup`/`not_cgroup`: the whole path (`*` stops at `/`, `**` does not).
    Path(String),
    /// `unit`: the cgroup's own name, wherever it is in the tree.
    Unit(String),
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path(path) => write!(f, "cgroup {path}"),
            Self::Unit(unit) => write!(f, "unit {unit}"),
        }
    }
}

/// The policy in force: mode, protected addresses and rules. Rule `i` has id `i + 1`; of the
/// rules matching an attempt, the one with the lowest id decides.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Global mode.
    pub mode: Mode,
    /// Global `imds`: for connections no rule decided.
    pub imds: Imds,
    /// Protected destinations.
    pub protect: Vec<IpAddr>,
    /// Allow rules.
    pub rules: Vec<PolicyRule>,
    /// Every distinct cgroup condition of the rules.
    pub patterns: Vec<Pattern>,
    /// The [`Pattern::Path`] patterns, as a set; `path_ids[i]` is the index of its `i`th.
    paths: GlobSet,
    path_ids: Vec<usize>,
    /// The [`Pattern::Unit`] patterns, likewise.
    units: GlobSet,
    unit_ids: Vec<usize>,
}

impl Policy {
    /// Resolves the config on this host: names to ids, cgroup spellings to hierarchy paths,
    /// patterns to matchers.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for an unknown user or group, a bad pattern, or a rule that
    /// repeats an earlier one; [`ConfigError::Cgroup`] for an `allow_cgroup` that does not exist.
    pub fn resolve(config: &Config, hierarchy: &Hierarchy) -> Result<Self, ConfigError> {
        let mut patterns: Vec<Pattern> = Vec::new();
        let mut index_of = |pattern: Pattern| {
            patterns
                .iter()
                .position(|p| *p == pattern)
                .unwrap_or_else(|| {
                    patterns.push(pattern);
                    patterns.len() - 1
                })
        };
        let mut rules: Vec<PolicyRule> = Vec::new();
        for rule in &config.allow {
            let resolved = resolve_rule(rule, config.imds, hierarchy, &mut index_of)?;
            if let Some(earlier) = rules.iter().find(|other| same_conditions(other, &resolved)) {
                if resolved.origin.starts_with("--") {
                    // An option repeating the file's rule adds nothing.
                    continue;
                }
                return Err(ConfigError::Invalid {
                    origin: resolved.origin,
                    message: format!(
                        "duplicate rule: the rule at {} ({}) already has these conditions",
                        earlier.origin, earlier.name
                    ),
                });
            }
            rules.push(resolved);
        }

        let (paths, path_ids) = glob_set(&patterns, |p| match p {
            Pattern::Path(path) => Some(path),
            Pattern::Unit(_) => None,
        });
        let (units, unit_ids) = glob_set(&patterns, |p| match p {
            Pattern::Unit(unit) => Some(unit),
            Pattern::Path(_) => None,
        });
        Ok(Self {
            mode: config.mode,
            imds: config.imds,
            protect: config.protect.iter().map(|setting| setting.value).collect(),
            rules,
            patterns,
            paths,
            path_ids,
            units,
            unit_ids,
        })
    }

    /// The name of rule `id` as events show it (`default` for
    /// [`imds_guard_common::policy::RULE_DEFAULT`]).
    #[must_use]
    pub fn rule_name(&self, id: u32) -> &str {
        self.rule(id).map_or("default", |rule| rule.name.as_str())
    }

    /// Rule `id` (1-based).
    #[must_use]
    pub fn rule(&self, id: u32) -> Option<&PolicyRule> {
        let index = usize::try_from(id.checked_sub(1)?).ok()?;
        self.rules.get(index)
    }

    /// Whether a rule's decision may depend on the task's cgroup: a cgroup condition, or a
    /// rule that tells host tasks from containers' (which a container's cgroup path decides as
    /// well as the kernel). Otherwise the kernel skips the ancestor walk.
    #[must_use]
    pub fn depends_on_cgroup(&self) -> bool {
        !self.patterns.is_empty()
            || self
                .rules
                .iter()
                .any(|rule| rule.containers != Containers::Included)
    }

    /// The patterns that the cgroup at `path` (`/`, `/a/b`) matches itself.
    #[must_use]
    pub fn matched_by(&self, path: &str) -> BTreeSet<usize> {
        let mut matched: BTreeSet<usize> = (self.paths.matches(path).into_iter())
            .map(|i| self.path_ids[i])
            .collect();
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        if !name.is_empty() && !beyond_the_system_manager(parent) {
            matched.extend(
                self.units
                    .matches(name)
                    .into_iter()
                    .map(|i| self.unit_ids[i]),
            );
        }
        matched
    }

    /// The patterns that `path` or one of its ancestors matches: what decides which rules
    /// apply to the tasks in it.
    #[must_use]
    pub fn matched_within(&self, path: &str) -> BTreeSet<usize> {
        let mut matched = self.matched_by("/");
        let mut prefix = String::new();
        for part in path.split('/').filter(|part| !part.is_empty()) {
            prefix.push('/');
            prefix.push_str(part);
            matched.extend(self.matched_by(&prefix));
        }
        matched
    }

    /// The rules that apply in a cgroup within which `matched` holds; `container_cgroup`: the
    /// cgroup is a container's (its path says so), so every task in it is in a container.
    ///
    /// Namespaces only ever take rules away: a task the kernel finds in namespaces of its own
    /// (the `container` set) gets the rules that admit containers too (`containers = true`),
    /// but rules only for containers (`"only"`) only in a container's cgroup. Any local user
    /// can make a pid or cgroup namespace (with a user namespace of their own), so a rule
    /// they could satisfy that way would be one any local user satisfies.
    #[must_use]
    pub fn rules_in(&self, matched: &BTreeSet<usize>, container_cgroup: bool) -> Applicable {
        let ids = |admits: &dyn Fn(Containers) -> bool| {
            (1u32..)
                .zip(&self.rules)
                .filter(|(_, rule)| rule.applies_in(matched) && admits(rule.containers))
                .map(|(id, _)| id)
                .collect()
        };
        if container_cgroup {
            let rules: Vec<u32> = ids(&|containers| containers.admits(true));
            return Applicable {
                host: rules.clone(),
                container: rules,
            };
        }
        Applicable {
            host: ids(&|containers| containers.admits(false)),
            container: ids(&|containers| containers == Containers::Included),
        }
    }

    /// The rules that apply in the cgroup at `path` (a hierarchy path).
    #[must_use]
    pub fn rules_at(&self, path: &str) -> Applicable {
        self.rules_in(
            &self.matched_within(path),
            workload::is_container_cgroup(path),
        )
    }

    /// The rules for tasks outside every cgroup with an entry: none of the patterns matched.
    #[must_use]
    pub fn default_rules(&self) -> Applicable {
        self.rules_in(&BTreeSet::new(), false)
    }

    /// The rules that apply in a cgroup whatever its path: those for a cgroup the agent has
    /// not seen (`RULESET_UNSEEN`). Rules with cgroup conditions are out (the path is not
    /// known); so are rules that do not admit containers (the cgroup may be a container's) and
    /// rules only for containers (it may not be).
    #[must_use]
    pub fn unseen_rules(&self) -> Applicable {
        let rules: Vec<u32> = (1u32..)
            .zip(&self.rules)
            .filter(|(_, rule)| {
                !rule.has_cgroup_conditions() && rule.containers == Containers::Included
            })
            .map(|(id, _)| id)
            .collect();
        Applicable {
            host: rules.clone(),
            container: rules,
        }
    }
}

/// A rule that a container or a local user could satisfy, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// The rule's position in the config (or its option).
    pub origin: Origin,
    /// The rule's name.
    pub rule: String,
    /// What could satisfy it, and what to write instead.
    pub message: String,
}

impl Policy {
    /// The rules that someone other than the workload they are meant for could satisfy: a
    /// container's root (which can take any uid or gid), a pod (`runAsUser`), any container a
    /// runtime starts, or a local user (who makes and names the cgroups below their own
    /// `user@UID.service`). `check-config` and `run` print them.
    #[must_use]
    pub fn warnings(&self) -> Vec<Warning> {
        let mut warnings = Vec::new();
        for rule in &self.rules {
            let mut warn = |message: String| {
                warnings.push(Warning {
                    origin: rule.origin.clone(),
                    rule: rule.name.clone(),
                    message,
                });
            };
            let positive: Vec<&str> = (rule.cgroup.iter().chain(&rule.unit))
                .map(|&index| self.pattern_text(index))
                .collect();
            if rule.containers.admits(true) {
                let who = match (rule.uid, rule.gid) {
                    (Some(uid), _) => Some(format!("uid {uid}")),
                    (None, Some(gid)) => Some(format!("gid {gid}")),
                    (None, None) => None,
                };
                if positive.is_empty() {
                    match who {
                        Some(who) => warn(format!(
                            "any container can satisfy this rule: a container's root can switch \
                             to {who} (setuid), and a pod can run as it (runAsUser); name the \
                             container's cgroup (cgroup = ...), or set containers = false"
                        )),
                        None => warn(
                            "every task in every container satisfies this rule: name the \
                             containers' cgroups (cgroup = ...)"
                                .to_owned(),
                        ),
                    }
                } else if let Some(broad) = positive.iter().find(|p| matches_any_container(p)) {
                    warn(format!(
                        "any container a runtime starts (one made later included) can satisfy \
                         this rule: {broad:?} matches every container's cgroup there; name the \
                         container (docker-<id>*.scope) or add a uid"
                    ));
                }
            }
            for pattern in &positive {
                if let Some(who) = user_made(pattern) {
                    warn(format!(
                        "{who} can satisfy this rule: {pattern:?} is below a user manager \
                         (user@UID.service), where users make and name cgroups themselves"
                    ));
                }
            }
            for &index in &rule.not_cgroup {
                let pattern = self.pattern_text(index);
                if let Some(who) = user_made(pattern) {
                    warn(format!(
                        "{who} can stay out of not_cgroup {pattern:?}: users name the cgroups \
                         below their user manager themselves, so this keeps no one out"
                    ));
                }
            }
        }
        warnings
    }

    fn pattern_text(&self, index: usize) -> &str {
        match &self.patterns[index] {
            Pattern::Path(text) | Pattern::Unit(text) => text,
        }
    }
}

/// Whether a cgroup or unit pattern matches the cgroup of any container its runtime starts:
/// a wildcard stands where the container's id goes (`docker-*.scope`, `/docker/*`,
/// `/kubepods.slice/**`), not after a prefix of one id (`docker-0123abcd*.scope`).
fn matches_any_container(pattern: &str) -> bool {
    let wild = |part: &str| part.starts_with(['*', '?', '[']);
    let parts: Vec<&str> = pattern.split('/').filter(|part| !part.is_empty()).collect();
    parts.iter().enumerate().any(|(index, part)| {
        if let Some(id) = workload::after_scope_prefix(part) {
            return wild(id);
        }
        workload::names_container_cgroups(part)
            && parts.get(index + 1).is_some_and(|next| wild(next))
    })
}

/// Who makes the cgroups a pattern can match below a user manager: `Some("any local user")`
/// when the pattern spans users' managers, `Some("user N")` for one user's, `None` when it
/// reaches none.
fn user_made(pattern: &str) -> Option<String> {
    let parts: Vec<&str> = pattern.split('/').filter(|part| !part.is_empty()).collect();
    let manager = parts.iter().position(|part| part.starts_with("user@"));
    match manager {
        Some(index) => {
            let part = parts[index];
            let uid = part
                .strip_prefix("user@")
                .and_then(|rest| rest.strip_suffix(".service"))
                .filter(|uid| uid.bytes().all(|b| b.is_ascii_digit()));
            let wild_above = parts[..=index]
                .iter()
                .any(|part| part.contains(['*', '?', '[']));
            match uid {
                Some(uid) if !wild_above => Some(format!("user {uid}")),
                _ => Some("any local user".to_owned()),
            }
        }
        // `/user.slice/**` and the like reach every user's manager.
        None => parts
            .iter()
            .position(|part| *part == "user.slice" || part.starts_with("user-"))
            .filter(|&index| {
                parts[index..]
                    .iter()
                    .any(|part| part.contains(['*', '?', '[']))
            })
            .map(|_| "any local user".to_owned()),
    }
}

/// Whether the cgroups below `parent` (a hierarchy path) are named by someone other than the
/// system manager: a user, below `user.slice` (a user manager's `user@UID.service` and what it
/// delegates: `systemd-run --user --unit=amazon-ssm-agent.service` makes that name there), or
/// a container runtime, Kubernetes or a container itself, below a container's or a pod's
/// cgroup. A unit rule names a system manager's unit, so it matches none of those: to allow one
/// of them, a rule names its cgroup path.
#[must_use]
pub fn beyond_the_system_manager(parent: &str) -> bool {
    parent.split('/').any(|part| {
        part == "user.slice"
            || (part.starts_with("user@") && part.ends_with(".service"))
            || part.starts_with("kubepods")
    }) || crate::host::workload::Placement::of(parent)
        .container
        .is_some()
}

/// One rule resolved on this host, its patterns numbered by `index_of`.
fn resolve_rule(
    rule: &Rule,
    imds: Imds,
    hierarchy: &Hierarchy,
    index_of: &mut impl FnMut(Pattern) -> usize,
) -> Result<PolicyRule, ConfigError> {
    let path_patterns = |items: &[Setting<String>]| {
        items
            .iter()
            .map(|item| path_pattern(hierarchy, rule, item))
            .collect::<Result<Vec<_>, _>>()
    };
    let cgroup = path_patterns(&rule.cgroup)?;
    let not_cgroup = path_patterns(&rule.not_cgroup)?;
    // Containers are in by default only where the rule names their cgroups.
    let names_containers = (rule.cgroup.iter().chain(&rule.unit))
        .any(|item| workload::names_container_cgroups(&item.value));
    let containers = rule.containers.as_ref().map_or(
        if names_containers {
            Containers::Included
        } else {
            Containers::Excluded
        },
        |setting| setting.value,
    );
    Ok(PolicyRule {
        name: rule.display_name(),
        origin: rule.origin.clone(),
        conditions: rule.conditions(),
        uid: (rule.uid.as_ref())
            .map(|uid| resolve_uid(uid, &rule.origin))
            .transpose()?,
        gid: (rule.gid.as_ref())
            .map(|gid| resolve_gid(gid, &rule.origin))
            .transpose()?,
        cgroup: cgroup.into_iter().map(&mut *index_of).collect(),
        unit: (rule.unit.iter())
            .map(|unit| index_of(Pattern::Unit(unit.value.clone())))
            .collect(),
        not_cgroup: not_cgroup.into_iter().map(&mut *index_of).collect(),
        containers,
        containers_written: rule.containers.is_some(),
        audit: rule.audit,
        imds: rule.imds.as_ref().map_or(imds, |setting| setting.value),
        paths: crate::config::paths::compile(&rule.paths, &rule.deny_paths)?,
    })
}

/// A `cgroup`/`not_cgroup` value as a hierarchy path pattern; `allow_cgroup` values must exist.
fn path_pattern(
    hierarchy: &Hierarchy,
    rule: &Rule,
    item: &Setting<String>,
) -> Result<Pattern, ConfigError> {
    let invalid = |message| ConfigError::Invalid {
        origin: item.origin.clone(),
        message,
    };
    let path = hierarchy.hierarchy_path(&item.value).map_err(invalid)?;
    if rule.cgroup_must_exist {
        let cgroup = hierarchy.resolve(&item.origin, &item.value)?;
        if cgroup.level > MAX_CGROUP_LEVEL {
            return Err(invalid(format!(
                "cgroup {} is {} levels deep; imds-guard looks at most {MAX_CGROUP_LEVEL} \
                 levels deep",
                cgroup.path, cgroup.level
            )));
        }
        return Ok(Pattern::Path(globset::escape(&cgroup.path)));
    }
    Ok(Pattern::Path(path))
}

fn glob_set(
    patterns: &[Pattern],
    select: impl Fn(&Pattern) -> Option<&String>,
) -> (GlobSet, Vec<usize>) {
    let mut builder = GlobSetBuilder::new();
    let mut ids = Vec::new();
    for (index, pattern) in patterns.iter().enumerate() {
        if let Some(text) = select(pattern) {
            // Checked when the config was read; a pattern that still fails cannot match.
            if let Ok(glob) = compile_glob(text) {
                builder.add(glob);
                ids.push(index);
            }
        }
    }
    (builder.build().unwrap_or_else(|_| GlobSet::empty()), ids)
}

fn same_conditions(a: &PolicyRule, b: &PolicyRule) -> bool {
    let set = |patterns: &[usize]| patterns.iter().copied().collect::<BTreeSet<_>>();
    a.uid == b.uid
        && a.gid == b.gid
        && set(&a.cgroup) == set(&b.cgroup)
        && set(&a.unit) == set(&b.unit)
        && set(&a.not_cgroup) == set(&b.not_cgroup)
        && a.containers == b.containers
        && a.audit == b.audit
}

fn resolve_uid(uid: &Principal, origin: &Origin) -> Result<u32, ConfigError> {
    resolve(uid, origin, "user", "getent passwd", |name| {
        nix::unistd::User::from_name(name).map(|user| user.map(|user| user.uid.as_raw()))
    })
}

/// A gid as written: a number, or a group name looked up in the group database.
///
/// # Errors
/// [`ConfigError::Invalid`] for an unknown group.
pub(crate) fn resolve_gid(gid: &Principal, origin: &Origin) -> Result<u32, ConfigError> {
    resolve(gid, origin, "group", "getent group", |name| {
        nix::unistd::Group::from_name(name).map(|group| group.map(|group| group.gid.as_raw()))
    })
}

/// A numeric id as it is, a name through `lookup` (the user or group database).
fn resolve(
    principal: &Principal,
    origin: &Origin,
    what: &str,
    command: &str,
    lookup: impl Fn(&str) -> nix::Result<Option<u32>>,
) -> Result<u32, ConfigError> {
    let invalid = |message| ConfigError::Invalid {
        origin: origin.clone(),
        message,
    };
    match principal {
        Principal::Id(id) => Ok(*id),
        Principal::Name(name) => match lookup(name) {
            Ok(Some(id)) => Ok(id),
            Ok(None) => Err(invalid(format!(
                "unknown {what} {name:?}: not in the {what} database (`{command} {name}`)"
            ))),
            Err(err) => Err(invalid(format!("cannot look up {what} {name:?}: {err}"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn within_is_a_subset_of_rule_ids() {
        let set = |host: &[u32], container: &[u32]| Applicable {
            host: host.to_vec(),
            container: container.to_vec(),
        };
        assert!(set(&[], &[]).within(&set(&[], &[])));
        assert!(set(&[2, 5], &[]).within(&set(&[1, 2, 3, 5], &[7])));
        assert!(!set(&[2, 4], &[]).within(&set(&[1, 2, 3, 5], &[])));
        assert!(!set(&[6], &[]).within(&set(&[1, 2, 3, 5], &[])));
        assert!(!set(&[1], &[]).within(&set(&[], &[])));
        assert!(!set(&[1], &[2]).within(&set(&[1], &[1, 3])));
        assert!(set(&[1], &[1, 3]).within(&set(&[1], &[1, 2, 3])));
    }
    use crate::config::Overrides;

    fn policy(text: &str) -> Policy {
        let hierarchy = Hierarchy::at("/nonexistent-cgroup-mount".into());
        let config =
            Config::from_toml(Some(Path::new("/g.toml")), text, &Overrides::default()).unwrap();
        Policy::resolve(&config, &hierarchy).unwrap()
    }

    /// The rules for a host task (as the kernel sees its namespaces) in `path`.
    fn rules_at(policy: &Policy, path: &str) -> Vec<u32> {
        policy.rules_at(path).host
    }

    #[test]
    fn globs_stop_at_slashes_and_double_stars_do_not() {
        let p = policy(
            "[[allow]]\ncgroup = \"/system.slice/docker-*.scope\"\n\
             [[allow]]\ncgroup = \"/kubepods.slice/**\"\n",
        );
        assert_eq!(rules_at(&p, "/system.slice/docker-ab12.scope"), [1]);
        assert_eq!(rules_at(&p, "/system.slice/docker-ab12.scope/init"), [1]);
        assert_eq!(
            rules_at(&p, "/system.slice/docker.service"),
            Vec::<u32>::new()
        );
        assert_eq!(
            rules_at(&p, "/system.slice/x/docker-1.scope"),
            Vec::<u32>::new()
        );
        assert_eq!(rules_at(&p, "/kubepods.slice/a/b"), [2]);
        assert_eq!(rules_at(&p, "/kubepods.slice"), Vec::<u32>::new());
    }

    #[test]
    fn units_match_the_system_managers_units_wherever_they_are() {
        let p = policy("[[allow]]\nunit = \"amazon-ssm-agent.service\"\nuid = 0\n");
        assert_eq!(rules_at(&p, "/system.slice/amazon-ssm-agent.service"), [1]);
        assert_eq!(
            rules_at(&p, "/system.slice/amazon-ssm-agent.service/sub"),
            [1]
        );
        assert_eq!(
            rules_at(&p, "/attach/system.slice/amazon-ssm-agent.service"),
            [1]
        );
        // Names a user, a container or Kubernetes chose are not the system manager's units.
        for beyond in [
            "/user.slice/user-1.slice/user@1.service/app.slice/amazon-ssm-agent.service/sub",
            "/user.slice/amazon-ssm-agent.service",
            &format!(
                "/system.slice/docker-{}.scope/amazon-ssm-agent.service",
                "a".repeat(64)
            ),
            "/kubepods.slice/kubepods-pod1.slice/amazon-ssm-agent.service",
        ] {
            assert_eq!(rules_at(&p, beyond), Vec::<u32>::new(), "{beyond}");
        }
        assert_eq!(
            rules_at(&p, "/system.slice/amazon-ssm-agent.service2"),
            Vec::<u32>::new()
        );
        assert_eq!(p.rules[0].uid, Some(0));
        // A rule that names the path does match there.
        let p = policy(
            "[[allow]]\ncgroup = \"/user.slice/user-1.slice/user@1.service/app.slice/a.service\"\n",
        );
        assert_eq!(
            rules_at(
                &p,
                "/user.slice/user-1.slice/user@1.service/app.slice/a.service"
            ),
            [1]
        );
    }

    #[test]
    fn not_cgroup_takes_containers_out_of_root() {
        let p = policy(
            "[[allow]]\nname = \"host root\"\nuid = 0\n\
             not_cgroup = [\"/system.slice/docker-*.scope\", \"/kubepods.slice/**\"]\n",
        );
        assert_eq!(rules_at(&p, "/"), [1]);
        assert_eq!(rules_at(&p, "/system.slice/sshd.service"), [1]);
        assert_eq!(
            rules_at(&p, "/system.slice/docker-1.scope"),
            Vec::<u32>::new()
        );
        assert_eq!(rules_at(&p, "/kubepods.slice/pod/ctr"), Vec::<u32>::new());
        assert_eq!(p.rule_name(1), "host root");
        // A container's cgroup the patterns do not list is still a container's.
        assert_eq!(rules_at(&p, CONTAINER), Vec::<u32>::new());
    }

    #[test]
    fn conditions_combine_and_unnamed_rules_are_named_by_them() {
        let p = policy("[[allow]]\nuid = 7\nunit = \"a.service\"\ncgroup = \"/system.slice/**\"\n");
        assert_eq!(rules_at(&p, "/system.slice/a.service"), [1]);
        assert_eq!(rules_at(&p, "/other.slice/a.service"), Vec::<u32>::new());
        assert_eq!(
            p.rule_name(1),
            "uid 7, cgroup /system.slice/**, unit a.service"
        );
        assert_eq!(p.rule_name(0), "default");
        assert_eq!(p.rule_name(2), "default");
    }

    #[test]
    fn systemd_escapes_are_literal_and_exact_paths_are_escaped() {
        let p = policy("[[allow]]\nunit = 'systemd-fsck@dev-disk-by\\x2dlabel-ROOT.service'\n");
        assert_eq!(
            rules_at(
                &p,
                "/system.slice/system-systemd\\x2dfsck.slice/systemd-fsck@dev-disk-by\\x2dlabel-ROOT.service"
            ),
            [1]
        );
        let mount = tempfile::tempdir().unwrap();
        std::fs::create_dir(mount.path().join("a[1]*")).unwrap();
        let config =
            Config::from_toml(None, "allow_cgroup = [\"/a[1]*\"]\n", &Overrides::default())
                .unwrap();
        let p = Policy::resolve(&config, &Hierarchy::at(mount.path().to_owned())).unwrap();
        assert_eq!(rules_at(&p, "/a[1]*"), [1]);
        assert_eq!(rules_at(&p, "/a1x"), Vec::<u32>::new());
    }

    #[test]
    fn names_resolve_from_the_host_databases() {
        let p = policy("[[allow]]\nuid = \"root\"\n[[allow]]\ngid = \"root\"\n");
        assert_eq!((p.rules[0].uid, p.rules[1].gid), (Some(0), Some(0)));
    }

    #[test]
    fn warnings_name_rules_a_container_or_a_user_could_satisfy() {
        let p = policy(
            "[[allow]]\nname = \"cw\"\nuid = 998\ncontainers = true\n\
             [[allow]]\nname = \"host cw\"\nuid = 998\n\
             [[allow]]\nname = \"any docker\"\ncgroup = \"/system.slice/docker-*.scope\"\n\
             [[allow]]\nname = \"one docker\"\ncgroup = \"/system.slice/docker-0123abcd*.scope\"\n\
             [[allow]]\nname = \"users\"\ncgroup = \"/user.slice/**/app.service\"\n\
             [[allow]]\nname = \"alice\"\ncgroup = \"/user.slice/user-1000.slice/user@1000.service/app.slice/x.service\"\n\
             [[allow]]\nname = \"root but not\"\nuid = 0\nnot_cgroup = \"/user.slice/*/user@*.service/bad.service\"\n\
             [[allow]]\nname = \"ssm\"\nunit = \"amazon-ssm-agent.service\"\nuid = 0\n",
        );
        let warnings = p.warnings();
        let rules: Vec<&str> = warnings.iter().map(|w| w.rule.as_str()).collect();
        assert_eq!(
            rules,
            ["cw", "any docker", "users", "alice", "root but not"],
            "{:#?}",
            p.warnings()
        );
        let messages: Vec<String> = p.warnings().into_iter().map(|w| w.message).collect();
        assert!(messages[0].starts_with("any container can satisfy this rule"));
        assert!(messages[1].starts_with("any container a runtime starts"));
        assert!(messages[2].starts_with("any local user can satisfy this rule"));
        assert!(messages[3].starts_with("user 1000 can satisfy this rule"));
        assert!(messages[4].starts_with("any local user can stay out of not_cgroup"));
    }

    #[test]
    fn cgroup_free_policies_skip_the_walk() {
        // A host-only uid rule depends on the cgroup: a container's path takes it away.
        assert!(policy("allow_uid = [0]\n").depends_on_cgroup());
        assert!(!policy("[[allow]]\nuid = 0\ncontainers = true\n").depends_on_cgroup());
        assert!(policy("[[allow]]\nnot_cgroup = \"/x\"\ncontainers = true\n").depends_on_cgroup());
    }

    /// Rules with each `containers` setting, written and implied (by a container cgroup).
    const EACH_CONTAINERS_SETTING: &str = "[[allow]]\nuid = 0\n\
         [[allow]]\nuid = 998\ncontainers = true\n\
         [[allow]]\nuid = 5\ncontainers = \"only\"\n\
         [[allow]]\ncgroup = \"/system.slice/docker-*.scope\"\nuid = 7\n\
         [[allow]]\ncgroup = \"/system.slice/docker-*.scope\"\nuid = 8\ncontainers = false\n";

    const CONTAINER: &str = "/system.slice/docker-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope";

    #[test]
    fn rules_match_host_tasks_only_unless_they_say_otherwise() {
        let p = policy(EACH_CONTAINERS_SETTING);
        let containers: Vec<Containers> = p.rules.iter().map(|r| r.containers).collect();
        assert_eq!(
            containers,
            [
                Containers::Excluded,
                Containers::Included,
                Containers::Only,
                Containers::Included,
                Containers::Excluded
            ]
        );
        // A host task on the host; a namespaced task in an ordinary cgroup; any task in a
        // container's cgroup.
        assert_eq!(p.rules_at("/system.slice/x.service").host, [1, 2]);
        // Namespaces only take rules away: "only" needs a container's cgroup, since any user
        // can make namespaces of their own.
        assert_eq!(p.rules_at("/system.slice/x.service").container, [2]);
        assert_eq!(p.rules_at(CONTAINER).host, [2, 3, 4]);
        assert_eq!(p.rules_at(CONTAINER).container, [2, 3, 4]);
        assert_eq!(p.rules_at(&format!("{CONTAINER}/deeper")).host, [2, 3, 4]);
        // A cgroup the agent has not seen: only what applies wherever it is.
        let unseen = p.unseen_rules();
        assert_eq!((unseen.host, unseen.container), (vec![2], vec![2]));
        assert!(p.depends_on_cgroup());
    }

    /// Wherever a task is, the rules for a task in a container are among those for a task on
    /// the host. The packet layer relies on it: a packet with no sender to ask (sent from a
    /// timer, a tunnel's queue, another holder's uncork) is judged as a container's, which no
    /// policy may let through where it stops the host task that owns the socket.
    #[test]
    fn a_containers_rules_are_among_a_host_tasks_everywhere() {
        let p = policy(&format!(
            "{EACH_CONTAINERS_SETTING}\
             [[allow]]\nnot_cgroup = \"/x/**\"\ngid = 3\ncontainers = true\n\
             [[allow]]\ncgroup = \"/k/**\"\nuid = 9\ncontainers = \"only\"\n\
             [[allow]]\nunit = \"app.service\"\nuid = 10\n"
        ));
        let deeper = format!("{CONTAINER}/deeper");
        let places = [
            "/",
            "/system.slice/x.service",
            "/system.slice/app.service",
            CONTAINER,
            &deeper,
            "/x/y",
            "/k/pod/c",
        ];
        let mut cases: Vec<(String, Applicable)> = places
            .iter()
            .map(|place| ((*place).to_owned(), p.rules_at(place)))
            .collect();
        cases.push(("no cgroup entry".into(), p.default_rules()));
        cases.push(("an unseen cgroup".into(), p.unseen_rules()));
        for (place, applicable) in cases {
            assert!(
                sorted_subset(&applicable.container, &applicable.host),
                "{place}: {applicable:?}"
            );
        }
    }
}
