//! The policy: settings resolved against this host ([`Policy::resolve`]) and compiled into the
//! entries of the kernel maps ([`Policy::compile`], pure).

use std::{collections::BTreeMap, net::IpAddr};

use imds_guard_common::policy::{
    CgroupKey, KIND_ANY, KIND_GID, KIND_UID, MAX_CGROUP_LEVEL, MODE_AUDIT, MODE_ENFORCE,
    RULE_FLAG_AUDIT, RULESET_DEFAULT, RuleKey, RuleValue, Settings,
};

use crate::{
    cgroups::{Cgroup, Hierarchy},
    config::{Config, Match, Mode},
    error::{Error, Origin, Result},
};

/// An allow rule with its cgroup resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRule {
    /// Name used in events.
    pub name: String,
    /// Where it was written.
    pub origin: Origin,
    /// What it matches.
    pub matches: Matcher,
    /// Allows, but reports (a staged rule).
    pub audit: bool,
}

/// What a rule matches, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Matcher {
    /// Tasks with this uid.
    Uid(u32),
    /// Tasks with this primary gid.
    Gid(u32),
    /// Tasks in this cgroup or below.
    Cgroup(Cgroup),
}

/// The policy in force: mode, protected addresses and rules. Rule `i` has id `i + 1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Global mode.
    pub mode: Mode,
    /// Protected destinations.
    pub protect: Vec<IpAddr>,
    /// Allow rules.
    pub rules: Vec<PolicyRule>,
}

/// Everything one generation of the policy puts into the kernel maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapEntries {
    /// `SETTINGS[generation]`.
    pub settings: Settings,
    /// Keys of `PROTECTED_V4`.
    pub protected_v4: Vec<u32>,
    /// Keys of `PROTECTED_V6`.
    pub protected_v6: Vec<[u32; 4]>,
    /// `CGROUP_RULESETS` entries.
    pub cgroup_rulesets: Vec<(CgroupKey, u32)>,
    /// `ALLOW` entries.
    pub allow: Vec<(RuleKey, RuleValue)>,
}

impl Policy {
    /// Resolves the config's cgroups on this host.
    ///
    /// # Errors
    /// When a cgroup does not exist or lies deeper than the kernel looks
    /// ([`MAX_CGROUP_LEVEL`]).
    pub fn resolve(config: &Config, hierarchy: &Hierarchy) -> Result<Self> {
        let rules = config
            .allow
            .iter()
            .map(|rule| {
                let matches = match &rule.matches {
                    Match::Uid(uid) => Matcher::Uid(*uid),
                    Match::Gid(gid) => Matcher::Gid(*gid),
                    Match::Cgroup(given) => {
                        let cgroup = hierarchy.resolve(&rule.origin, given)?;
                        if cgroup.level > MAX_CGROUP_LEVEL {
                            return Err(Error::InvalidSetting {
                                origin: rule.origin.clone(),
                                message: format!(
                                    "cgroup {} is {} levels deep; imds-guard looks at most \
                                     {MAX_CGROUP_LEVEL} levels deep",
                                    cgroup.path, cgroup.level
                                ),
                            });
                        }
                        Matcher::Cgroup(cgroup)
                    }
                };
                Ok(PolicyRule {
                    name: rule.matches.to_string(),
                    origin: rule.origin.clone(),
                    matches,
                    audit: false,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            mode: config.mode,
            protect: config.protect.iter().map(|setting| setting.value).collect(),
            rules,
        })
    }

    /// The name of rule `id` as events show it (`default` for [`imds_guard_common::policy::RULE_DEFAULT`]).
    #[must_use]
    pub fn rule_name(&self, id: u32) -> &str {
        id.checked_sub(1)
            .and_then(|index| self.rules.get(usize::try_from(index).ok()?))
            .map_or("default", |rule| rule.name.as_str())
    }

    /// The map entries of this policy as generation `generation`.
    ///
    /// Each distinct rule cgroup gets a rule set holding the rules that apply inside it: its
    /// own cgroup rules, those of rule cgroups above it, and every uid/gid rule. Tasks in no
    /// rule cgroup use [`RULESET_DEFAULT`], which holds the uid/gid rules.
    #[must_use]
    pub fn compile(&self, generation: u32) -> MapEntries {
        let mut entries = MapEntries::default();
        for address in &self.protect {
            match address {
                IpAddr::V4(v4) => entries.protected_v4.push(u32::from_ne_bytes(v4.octets())),
                IpAddr::V6(v6) => entries.protected_v6.push(v6_key(v6.octets())),
            }
        }

        // Distinct rule cgroups, shallowest first, each with its rule set id.
        let mut cgroups: Vec<&Cgroup> = self
            .rules
            .iter()
            .filter_map(|rule| match &rule.matches {
                Matcher::Cgroup(cgroup) => Some(cgroup),
                _ => None,
            })
            .collect();
        cgroups.sort_by(|a, b| (a.level, &a.path).cmp(&(b.level, &b.path)));
        cgroups.dedup_by_key(|cgroup| cgroup.id);

        let mut allow: BTreeMap<RuleKey, RuleValue> = BTreeMap::new();
        let mut add = |ruleset: u32, kind: u32, id: u32, rule: u32, audit: bool| {
            let key = RuleKey {
                generation,
                ruleset,
                kind,
                id,
            };
            let value = RuleValue {
                rule,
                flags: if audit { RULE_FLAG_AUDIT } else { 0 },
            };
            // Of two rules for one key, one that allows outright wins over a staged one.
            allow
                .entry(key)
                .and_modify(|existing| {
                    if existing.flags & RULE_FLAG_AUDIT != 0 && !audit {
                        *existing = value;
                    }
                })
                .or_insert(value);
        };

        let rulesets = std::iter::once((RULESET_DEFAULT, None))
            .chain((1u32..).zip(cgroups.iter().copied().map(Some)));
        for (ruleset, cgroup) in rulesets {
            for (rule_id, rule) in (1u32..).zip(&self.rules) {
                match &rule.matches {
                    Matcher::Uid(uid) => add(ruleset, KIND_UID, *uid, rule_id, rule.audit),
                    Matcher::Gid(gid) => add(ruleset, KIND_GID, *gid, rule_id, rule.audit),
                    Matcher::Cgroup(rule_cgroup) => {
                        if cgroup.is_some_and(|inside| is_within(inside, rule_cgroup)) {
                            add(ruleset, KIND_ANY, 0, rule_id, rule.audit);
                        }
                    }
                }
            }
            if let Some(cgroup) = cgroup {
                entries.cgroup_rulesets.push((
                    CgroupKey {
                        generation,
                        _pad: 0,
                        cgroup_id: cgroup.id,
                    },
                    ruleset,
                ));
            }
        }
        entries.allow = allow.into_iter().collect();
        entries.settings = Settings {
            mode: match self.mode {
                Mode::Enforce => MODE_ENFORCE,
                Mode::Audit => MODE_AUDIT,
            },
            cgroup_entries: u32::try_from(entries.cgroup_rulesets.len()).unwrap_or(u32::MAX),
        };
        entries
    }
}

/// `PROTECTED_V6` key of an address: four native words of its network-order bytes.
#[must_use]
pub fn v6_key(octets: [u8; 16]) -> [u32; 4] {
    std::array::from_fn(|i| {
        u32::from_ne_bytes([
            octets[i * 4],
            octets[i * 4 + 1],
            octets[i * 4 + 2],
            octets[i * 4 + 3],
        ])
    })
}

/// Whether `inner` is `outer` or lies below it.
fn is_within(inner: &Cgroup, outer: &Cgroup) -> bool {
    inner.id == outer.id
        || outer.path == "/"
        || inner
            .path
            .strip_prefix(&outer.path)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::PathBuf};

    use super::*;

    fn cgroup(path: &str, id: u64) -> Cgroup {
        Cgroup {
            path: path.into(),
            dir: PathBuf::from("/cg").join(path.trim_start_matches('/')),
            id,
            level: u32::try_from(path.split('/').filter(|p| !p.is_empty()).count()).unwrap(),
        }
    }

    fn rule(matches: Matcher) -> PolicyRule {
        PolicyRule {
            name: format!("{matches:?}"),
            origin: "test".into(),
            matches,
            audit: false,
        }
    }

    fn policy(rules: Vec<PolicyRule>) -> Policy {
        Policy {
            mode: Mode::Enforce,
            protect: vec![IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254))],
            rules,
        }
    }

    fn key(generation: u32, ruleset: u32, kind: u32, id: u32) -> RuleKey {
        RuleKey {
            generation,
            ruleset,
            kind,
            id,
        }
    }

    fn value(rule: u32) -> RuleValue {
        RuleValue { rule, flags: 0 }
    }

    #[test]
    fn uid_and_gid_rules_go_to_the_default_rule_set() {
        let entries = policy(vec![rule(Matcher::Uid(0)), rule(Matcher::Gid(50))]).compile(1);
        assert_eq!(
            entries.allow,
            [
                (key(1, 0, KIND_UID, 0), value(1)),
                (key(1, 0, KIND_GID, 50), value(2))
            ]
        );
        assert!(entries.cgroup_rulesets.is_empty());
        assert_eq!(
            entries.settings,
            Settings {
                mode: MODE_ENFORCE,
                cgroup_entries: 0
            }
        );
        assert_eq!(
            entries.protected_v4,
            [u32::from_ne_bytes([169, 254, 169, 254])]
        );
    }

    #[test]
    fn cgroup_rules_get_rule_sets_that_keep_the_global_rules() {
        let entries = policy(vec![
            rule(Matcher::Uid(0)),
            rule(Matcher::Cgroup(cgroup("/system.slice/ssm.service", 77))),
        ])
        .compile(0);
        assert_eq!(
            entries.cgroup_rulesets,
            [(
                CgroupKey {
                    generation: 0,
                    _pad: 0,
                    cgroup_id: 77
                },
                1
            )]
        );
        assert_eq!(
            entries.allow,
            [
                (key(0, 0, KIND_UID, 0), value(1)),
                (key(0, 1, KIND_UID, 0), value(1)),
                (key(0, 1, KIND_ANY, 0), value(2)),
            ]
        );
        assert_eq!(entries.settings.cgroup_entries, 1);
    }

    #[test]
    fn nested_rule_cgroups_inherit_their_ancestors_rules() {
        let mut staged = rule(Matcher::Cgroup(cgroup("/a/b", 2)));
        staged.audit = true;
        let entries = policy(vec![rule(Matcher::Cgroup(cgroup("/a", 1))), staged]).compile(0);
        // /a/b is inside /a, so /a's outright allow beats /a/b's staged one there.
        assert_eq!(
            entries.allow,
            [
                (key(0, 1, KIND_ANY, 0), value(1)),
                (key(0, 2, KIND_ANY, 0), value(1))
            ]
        );
    }

    #[test]
    fn sibling_prefixes_are_not_ancestors() {
        assert!(!is_within(&cgroup("/ab", 2), &cgroup("/a", 1)));
        assert!(is_within(&cgroup("/a/b", 2), &cgroup("/a", 1)));
        assert!(is_within(&cgroup("/a", 1), &cgroup("/", 9)));
    }

    #[test]
    fn same_cgroup_twice_is_one_rule_set() {
        let entries = policy(vec![
            rule(Matcher::Cgroup(cgroup("/a", 1))),
            rule(Matcher::Cgroup(cgroup("/a", 1))),
        ])
        .compile(0);
        assert_eq!(entries.cgroup_rulesets.len(), 1);
        assert_eq!(entries.allow, [(key(0, 1, KIND_ANY, 0), value(1))]);
    }

    #[test]
    fn audit_mode_and_v6_keys() {
        let mut p = policy(vec![]);
        p.mode = Mode::Audit;
        p.protect.push("fd00:ec2::254".parse().unwrap());
        let entries = p.compile(0);
        assert_eq!(entries.settings.mode, MODE_AUDIT);
        let expected = v6_key([
            0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54,
        ]);
        assert_eq!(entries.protected_v6, [expected]);
    }

    #[test]
    fn rule_names() {
        let p = policy(vec![rule(Matcher::Uid(0))]);
        assert_eq!(p.rule_name(0), "default");
        assert_eq!(p.rule_name(1), "Uid(0)");
        assert_eq!(p.rule_name(9), "default");
    }
}
