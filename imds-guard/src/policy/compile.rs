//! Policy × the cgroups that exist → the entries of one generation in the kernel maps: all at
//! once for a new policy ([`Compiled::new`]), then kept current as cgroups come and go
//! ([`Compiled::sync`] and [`Compiled::take_delta`]). Pure: the caller scans and writes.
//!
//! A cgroup's rules are those that apply given every condition matched by it or an ancestor,
//! for a host task and for a container's (its path may say it is a container's). It gets a
//! `CGROUP_RULESETS` entry only where they differ from its parent's (for the attach point: from
//! the default rule set): a cgroup without one inherits its nearest ancestor's, which is the same
//! set. A `**` pattern therefore costs one entry where it starts to match, not one per
//! descendant. Cgroups with the same rules share one rule set, so the `ALLOW` map grows with the
//! number of distinct situations, not with the number of containers.
//!
//! The entries of one generation are bounded (half the map: two generations meet during a
//! switch). An entry that only adds rules to what its cgroup inherits may be left out when
//! there is no room: the cgroup keeps the narrower rules it inherits (fail closed). So may
//! one below a user manager (`user@UID.service`), where the user makes the cgroups: those get
//! at most [`USER_MANAGER_ENTRIES`] per manager. One that takes rules away elsewhere (a
//! container's cgroup, a `not_cgroup`) must be written: it takes the room of an entry that may
//! be left out, and when there is none, every cgroup from the oldest such one on is judged as
//! unseen (`Settings::unseen_after`), by the rules that hold wherever it is.

use std::collections::{BTreeMap, BTreeSet, HashMap};

pub use imds_guard_common::decide::Decision;
use imds_guard_common::http::{PathRules, PathRulesKey};
use imds_guard_common::{
    decide::{Cgroup, PolicyMaps, decide},
    maps::CGROUP_RULESETS_MAX_ENTRIES,
    policy::{
        ALL_CGROUPS_SEEN, CgroupKey, HOST_UID_RULES, KIND_ANY, KIND_GID, KIND_UID,
        MAX_CGROUP_LEVEL, NO_ENTRY_LEVELS, ProtectedSet, RULESET_DEFAULT, RULESET_UNSEEN, RuleKey,
        RuleValue, Settings, TASK_CONTAINER, TASK_HOST, UidRule, entry_levels, key_bit,
    },
};

pub use crate::host::cgroups::CgroupDir;
use crate::{
    host::cgroups::is_within,
    host::workload,
    policy::{Applicable, Policy},
};

/// Cgroup entries one generation may have: half of `CGROUP_RULESETS`, so that the generation
/// in force and the next one fit together during a switch.
pub const CGROUP_ENTRIES_PER_GENERATION: usize = CGROUP_RULESETS_MAX_ENTRIES as usize / 2;
/// Cgroup entries below one user manager (`…/user@UID.service`) at most: the user makes those
/// cgroups, and must not take the room others' entries need.
pub const USER_MANAGER_ENTRIES: usize = 256;

/// Everything one generation of the policy puts into the kernel maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapEntries {
    /// `SETTINGS[generation]`.
    pub settings: Settings,
    /// `PROTECTED[generation]`.
    pub protected: ProtectedSet,
    /// `CGROUP_RULESETS` entries.
    pub cgroup_rulesets: Vec<(CgroupKey, u32)>,
    /// `ALLOW` entries.
    pub allow: Vec<(RuleKey, RuleValue)>,
    /// `PATH_RULES` entries: the rules with `paths` or `deny_paths`.
    pub path_rules: Vec<(PathRulesKey, PathRules)>,
}

/// Changes to the generation in force, in the order they must be made: new rule sets before the
/// cgroup entries that point to them, and retired rule sets only after those entries are gone
/// and no program can still be reading them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// `ALLOW` entries of new rule sets.
    pub allow_insert: Vec<(RuleKey, RuleValue)>,
    /// `CGROUP_RULESETS` entries to add or change.
    pub cgroup_upsert: Vec<(CgroupKey, u32)>,
    /// `CGROUP_RULESETS` entries to remove.
    pub cgroup_remove: Vec<CgroupKey>,
    /// `ALLOW` entries of rule sets no cgroup uses any more.
    pub allow_remove: Vec<RuleKey>,
}

impl Delta {
    /// Whether there is nothing to change.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.allow_insert.is_empty()
            && self.cgroup_upsert.is_empty()
            && self.cgroup_remove.is_empty()
            && self.allow_remove.is_empty()
    }
}

#[derive(Clone, Debug)]
struct Ruleset {
    /// The rules in it.
    rules: Applicable,
    /// Cgroup entries pointing to it.
    users: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Assigned {
    path: String,
    ruleset: u32,
    /// The entry takes rules away from what the cgroup would inherit and the cgroup is not a
    /// user's: it must be written.
    required: bool,
}

/// One generation of a policy and the cgroup entries it has now.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The policy.
    pub policy: Policy,
    generation: u32,
    /// The attach point's path: tasks elsewhere are not judged.
    attach: String,
    rulesets: BTreeMap<u32, Ruleset>,
    ruleset_of_rules: HashMap<Applicable, u32>,
    next_ruleset: u32,
    cgroups: BTreeMap<u64, Assigned>,
    /// Cgroup ids changed since the last delta, with their entry before the first change.
    dirty: BTreeMap<u64, Option<u32>>,
    /// Rule sets created since the last delta.
    new_rulesets: BTreeSet<u32>,
    /// Matching cgroups deeper than the kernel looks, reported once each.
    too_deep: BTreeSet<u64>,
    /// Entries this generation may have (see [`CGROUP_ENTRIES_PER_GENERATION`]).
    max_entries: usize,
    /// Cgroups (with their paths) whose entry would only add rules but found no room: they
    /// keep the narrower rules they inherit.
    dropped: BTreeMap<u64, String>,
    /// Cgroups whose entry would take rules away but found no room: this cgroup and every
    /// newer one are judged as unseen until room is found.
    unwritten: BTreeMap<u64, String>,
    /// The cgroups with an entry that may be left out (see [`Compiled::assign`]), to find room.
    optional: BTreeSet<u64>,
    /// Entries below each user manager (`…/user@UID.service`).
    per_manager: HashMap<String, usize>,
    /// Entries at each cgroup level.
    per_level: BTreeMap<u32, usize>,
}

impl Compiled {
    /// Compiles `policy` as `generation` for the cgroups in `dirs` (the attach point `attach`
    /// and everything below it). Also returns the matching cgroups too deep for the kernel.
    #[must_use]
    pub fn new(
        policy: Policy,
        generation: u32,
        attach: &str,
        dirs: &[CgroupDir],
    ) -> (Self, Vec<CgroupDir>) {
        Self::with_capacity(
            policy,
            generation,
            attach,
            dirs,
            CGROUP_ENTRIES_PER_GENERATION,
        )
    }

    /// As [`Compiled::new`], with room for `max_entries` cgroup entries.
    #[must_use]
    pub fn with_capacity(
        policy: Policy,
        generation: u32,
        attach: &str,
        dirs: &[CgroupDir],
        max_entries: usize,
    ) -> (Self, Vec<CgroupDir>) {
        let default_rules = policy.default_rules();
        let mut rulesets = BTreeMap::from([(
            RULESET_DEFAULT,
            Ruleset {
                rules: default_rules.clone(),
                users: 0,
            },
        )]);
        if policy.depends_on_cgroup() {
            rulesets.insert(
                RULESET_UNSEEN,
                Ruleset {
                    rules: policy.unseen_rules(),
                    users: 0,
                },
            );
        }
        let mut compiled = Self {
            policy,
            generation,
            attach: attach.to_owned(),
            rulesets,
            ruleset_of_rules: HashMap::from([(default_rules, RULESET_DEFAULT)]),
            next_ruleset: RULESET_DEFAULT + 1,
            cgroups: BTreeMap::new(),
            dirty: BTreeMap::new(),
            new_rulesets: BTreeSet::new(),
            too_deep: BTreeSet::new(),
            max_entries,
            dropped: BTreeMap::new(),
            unwritten: BTreeMap::new(),
            optional: BTreeSet::new(),
            per_manager: HashMap::new(),
            per_level: BTreeMap::new(),
        };
        let too_deep = compiled.sync(attach, dirs);
        compiled.dirty.clear();
        compiled.new_rulesets.clear();
        (compiled, too_deep)
    }

    /// `Settings::unseen_after` as this generation's entries call for: below the oldest cgroup
    /// whose entry takes rules away but found no room, else [`ALL_CGROUPS_SEEN`].
    #[must_use]
    pub fn unseen_after(&self) -> u64 {
        self.unwritten
            .keys()
            .next()
            .map_or(ALL_CGROUPS_SEEN, |oldest| oldest.saturating_sub(1))
    }

    /// `Settings::entry_levels` for the entries this generation has now: the levels the kernel's
    /// ancestor walk must look at.
    #[must_use]
    pub fn entry_levels(&self) -> u64 {
        match (
            self.per_level.keys().next(),
            self.per_level.keys().next_back(),
        ) {
            (Some(&shallowest), Some(&deepest)) => entry_levels(shallowest, deepest),
            _ => NO_ENTRY_LEVELS,
        }
    }

    /// Cgroups whose entry would only add rules and found no room (they keep the narrower
    /// rules they inherit).
    #[must_use]
    pub fn dropped(&self) -> usize {
        self.dropped.len()
    }

    /// Cgroups whose entry would take rules away and found no room.
    #[must_use]
    pub fn unwritten(&self) -> usize {
        self.unwritten.len()
    }

    /// The generation these entries belong to.
    #[must_use]
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Number of cgroups with an entry.
    #[must_use]
    pub fn cgroup_entries(&self) -> usize {
        self.cgroups.len()
    }

    /// Number of rule sets, the default one included.
    #[must_use]
    pub fn rulesets(&self) -> usize {
        self.rulesets.len()
    }

    /// Every entry, for writing the generation whole.
    ///
    /// # Panics
    /// When the policy protects more addresses of a family than `ProtectedSet` holds, which
    /// the config refuses.
    #[must_use]
    pub fn entries(&self) -> MapEntries {
        let mut entries = MapEntries {
            settings: Settings {
                mode: self.policy.mode.kernel_value(),
                cgroup_rules: u32::from(self.policy.depends_on_cgroup()),
                unseen_after: self.unseen_after(),
                entry_levels: self.entry_levels(),
                default_rule_flags: if self.policy.imds == crate::config::Imds::V2 {
                    imds_guard_common::policy::RULE_FLAG_V2
                } else {
                    0
                },
                absent_keys: self.absent_keys(),
                ..Settings::default()
            },
            ..MapEntries::default()
        };
        for address in &self.policy.protect {
            let added = match address {
                std::net::IpAddr::V4(v4) => {
                    entries.protected.add_v4(u32::from_ne_bytes(v4.octets()))
                }
                std::net::IpAddr::V6(v6) => entries.protected.add_v6(v6_key(v6.octets())),
            };
            assert!(
                added,
                "the config refuses more protected addresses than a ProtectedSet holds"
            );
        }
        entries.cgroup_rulesets = (self.cgroups.iter())
            .map(|(&id, assigned)| (self.cgroup_key(id), assigned.ruleset))
            .collect();
        for (&id, ruleset) in &self.rulesets {
            entries.allow.extend(self.allow_entries(id, &ruleset.rules));
        }
        let held = host_uid_rules(&entries.allow);
        entries.settings.host_uid_rules_held = u32::from(held.is_some());
        entries.settings.host_uid_rules = held.unwrap_or([UidRule::UNUSED; HOST_UID_RULES]);
        entries.path_rules = (1..)
            .zip(&self.policy.rules)
            .filter_map(|(rule, resolved)| {
                let paths = resolved.paths?;
                Some((
                    PathRulesKey {
                        generation: self.generation,
                        rule,
                    },
                    paths,
                ))
            })
            .collect();
        entries
    }

    /// Makes the entries of the cgroups at and below `under` those that `found` (the cgroups
    /// that exist there now) calls for. Changes accumulate until [`Compiled::take_delta`].
    /// Returns the matching cgroups newly found too deep for the kernel to look at.
    pub fn sync(&mut self, under: &str, found: &[CgroupDir]) -> Vec<CgroupDir> {
        let present: BTreeSet<u64> = found.iter().map(|dir| dir.id).collect();
        let gone_from = |map: &BTreeMap<u64, String>| -> Vec<u64> {
            (map.iter())
                .filter(|(id, path)| is_within(path, under) && !present.contains(id))
                .map(|(&id, _)| id)
                .collect()
        };
        let gone: Vec<u64> = (self.cgroups.iter())
            .filter(|(id, assigned)| is_within(&assigned.path, under) && !present.contains(id))
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.unassign(id);
        }
        for id in gone_from(&self.dropped) {
            self.dropped.remove(&id);
        }
        for id in gone_from(&self.unwritten) {
            self.unwritten.remove(&id);
        }
        let mut too_deep = Vec::new();
        for dir in found {
            self.dropped.remove(&dir.id);
            self.unwritten.remove(&dir.id);
            match self.wanted_rules(dir) {
                Wanted::Rules { rules, narrowing } => self.assign(dir, rules, narrowing),
                Wanted::Nothing => {
                    self.unassign(dir.id);
                }
                Wanted::TooDeep => {
                    self.unassign(dir.id);
                    if self.too_deep.insert(dir.id) {
                        too_deep.push(dir.clone());
                    }
                }
            }
        }
        too_deep
    }

    /// The map changes that the syncs since the last call add up to.
    pub fn take_delta(&mut self) -> Delta {
        let mut delta = Delta::default();
        for (id, before) in std::mem::take(&mut self.dirty) {
            let now = self.cgroups.get(&id).map(|assigned| assigned.ruleset);
            match now {
                _ if now == before => {}
                Some(ruleset) => delta.cgroup_upsert.push((self.cgroup_key(id), ruleset)),
                None => delta.cgroup_remove.push(self.cgroup_key(id)),
            }
        }
        let new_rulesets = std::mem::take(&mut self.new_rulesets);
        let retired: Vec<u32> = (self.rulesets.iter())
            .filter(|(id, ruleset)| {
                **id != RULESET_DEFAULT && **id != RULESET_UNSEEN && ruleset.users == 0
            })
            .map(|(&id, _)| id)
            .collect();
        for id in retired {
            if let Some(ruleset) = self.rulesets.remove(&id) {
                self.ruleset_of_rules.remove(&ruleset.rules);
                if !new_rulesets.contains(&id) {
                    delta.allow_remove.extend(
                        (self.allow_entries(id, &ruleset.rules).into_iter()).map(|(key, _)| key),
                    );
                }
            }
        }
        for id in new_rulesets {
            if let Some(ruleset) = self.rulesets.get(&id) {
                delta
                    .allow_insert
                    .extend(self.allow_entries(id, &ruleset.rules));
            }
        }
        delta
    }

    fn wanted_rules(&self, dir: &CgroupDir) -> Wanted {
        if !self.policy.depends_on_cgroup() || !is_within(&dir.path, &self.attach) {
            return Wanted::Nothing;
        }
        let rules = self.policy.rules_at(&dir.path);
        // The attach point stands for its ancestors, whose entries the kernel never sees.
        let inherited = match dir.path.rsplit_once('/') {
            _ if dir.path == self.attach => self.policy.default_rules(),
            Some(("", _)) => self.policy.rules_at("/"),
            Some((parent, _)) => self.policy.rules_at(parent),
            None => self.policy.default_rules(),
        };
        if rules == inherited {
            return Wanted::Nothing;
        }
        if dir.level() > MAX_CGROUP_LEVEL {
            return Wanted::TooDeep;
        }
        Wanted::Rules {
            narrowing: !inherited.within(&rules),
            rules,
        }
    }

    /// Gives `dir` an entry for `rules`. One that only adds rules (`narrowing` false) may be
    /// left out; so may one below a user manager, where the user makes the cgroups (leaving
    /// it out gives the user nothing its own tasks could not do anyway), and each user manager
    /// gets at most [`USER_MANAGER_ENTRIES`]: no user can take the room of others' entries.
    fn assign(&mut self, dir: &CgroupDir, rules: Applicable, narrowing: bool) {
        let manager = workload::user_manager(&dir.path).map(str::to_owned);
        let required = narrowing && manager.is_none();
        if !self.cgroups.contains_key(&dir.id) {
            let manager_full = manager.as_ref().is_some_and(|manager| {
                self.per_manager.get(manager).copied().unwrap_or(0) >= USER_MANAGER_ENTRIES
            });
            if manager_full || (!required && self.cgroups.len() >= self.max_entries) {
                // Left out, the cgroup keeps the rules it inherits.
                self.dropped.insert(dir.id, dir.path.clone());
                return;
            }
            if self.cgroups.len() >= self.max_entries {
                // Room is taken from an entry that may be left out (the newest such cgroup
                // keeps what it inherits instead); with none, this cgroup must be judged as
                // unseen.
                let Some(victim) = self.optional.iter().next_back().copied() else {
                    self.unwritten.insert(dir.id, dir.path.clone());
                    return;
                };
                if let Some(path) = self.unassign(victim) {
                    self.dropped.insert(victim, path);
                }
            }
        }
        let ruleset = if let Some(&id) = self.ruleset_of_rules.get(&rules) {
            id
        } else {
            let id = self.next_ruleset;
            self.next_ruleset += 1;
            self.ruleset_of_rules.insert(rules.clone(), id);
            self.rulesets.insert(id, Ruleset { rules, users: 0 });
            self.new_rulesets.insert(id);
            id
        };
        let wanted = Assigned {
            path: dir.path.clone(),
            ruleset,
            required,
        };
        if self.cgroups.get(&dir.id) == Some(&wanted) {
            return;
        }
        self.unassign(dir.id);
        self.dirty.entry(dir.id).or_insert(None);
        if let Some(used) = self.rulesets.get_mut(&ruleset) {
            used.users += 1;
        }
        if !required {
            self.optional.insert(dir.id);
        }
        if let Some(manager) = manager {
            *self.per_manager.entry(manager).or_default() += 1;
        }
        *self.per_level.entry(dir.level()).or_default() += 1;
        self.cgroups.insert(dir.id, wanted);
    }

    /// Removes `id`'s entry, if it has one; returns its path.
    fn unassign(&mut self, id: u64) -> Option<String> {
        let assigned = self.cgroups.remove(&id)?;
        self.dirty.entry(id).or_insert(Some(assigned.ruleset));
        if let Some(used) = self.rulesets.get_mut(&assigned.ruleset) {
            used.users = used.users.saturating_sub(1);
        }
        self.optional.remove(&id);
        let level = CgroupDir {
            id,
            path: assigned.path.clone(),
        }
        .level();
        if let Some(count) = self.per_level.get_mut(&level) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_level.remove(&level);
            }
        }
        if let Some(manager) = workload::user_manager(&assigned.path)
            && let Some(count) = self.per_manager.get_mut(manager)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_manager.remove(manager);
            }
        }
        Some(assigned.path)
    }

    fn cgroup_key(&self, cgroup_id: u64) -> CgroupKey {
        CgroupKey {
            generation: self.generation,
            _pad: 0,
            cgroup_id,
        }
    }

    /// `Settings::absent_keys`: the kinds of key (uid, gid, any) no rule has, for both kinds of
    /// task. Every rule set's entries come from the policy's rules, whichever cgroups come and
    /// go while the generation is in force, so none can have a key of such a kind.
    fn absent_keys(&self) -> u32 {
        [KIND_UID, KIND_GID, KIND_ANY]
            .into_iter()
            .filter(|&kind| !self.policy.rules.iter().any(|rule| key_kind(rule) == kind))
            .map(|kind| key_bit(kind, TASK_HOST) | key_bit(kind, TASK_CONTAINER))
            .fold(0, |bits, bit| bits | bit)
    }

    /// A rule set's `ALLOW` entries: per kind of task and key (uid, gid or any), its first rule.
    fn allow_entries(&self, ruleset: u32, rules: &Applicable) -> Vec<(RuleKey, RuleValue)> {
        let mut entries: BTreeMap<RuleKey, RuleValue> = BTreeMap::new();
        for (task, ids) in [(TASK_HOST, &rules.host), (TASK_CONTAINER, &rules.container)] {
            for &id in ids {
                let Some(rule) = self.policy.rule(id) else {
                    continue;
                };
                let (kind, key_id) = (key_kind(rule), rule.uid.or(rule.gid).unwrap_or(0));
                let key = RuleKey {
                    generation: self.generation,
                    ruleset,
                    kind,
                    task,
                    id: key_id,
                };
                entries.entry(key).or_insert(RuleValue {
                    rule: id,
                    flags: rule.kernel_flags(),
                });
            }
        }
        entries.into_iter().collect()
    }
}

/// The kind of `ALLOW` key a rule has: its uid if it has one, else its gid, else any task.
fn key_kind(rule: &super::PolicyRule) -> u16 {
    match (rule.uid, rule.gid) {
        (Some(_), _) => KIND_UID,
        (None, Some(_)) => KIND_GID,
        (None, None) => KIND_ANY,
    }
}

enum Wanted {
    Nothing,
    Rules { rules: Applicable, narrowing: bool },
    TooDeep,
}

/// An IPv6 address as `ProtectedSet::v6` holds it: four native words of its network-order bytes.
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

/// The map entries of one generation, as the decision reads them.
struct EntriesView {
    settings: Settings,
    cgroups: HashMap<CgroupKey, u32>,
    allow: HashMap<RuleKey, RuleValue>,
    generation: u32,
}

impl PolicyMaps for EntriesView {
    fn settings(&self, generation: u32) -> Option<Settings> {
        (generation == self.generation).then_some(self.settings)
    }

    fn cgroup_ruleset(&self, key: CgroupKey) -> Option<u32> {
        self.cgroups.get(&key).copied()
    }

    fn rule(&self, key: RuleKey) -> Option<RuleValue> {
        self.allow.get(&key).copied()
    }

    fn host_uid_rule(&self, generation: u32, uid: u32) -> Option<RuleValue> {
        self.settings(generation)?.host_uid_rule(uid)
    }
}

/// A cgroup given by the ids of its ancestors and itself, root first.
struct Ancestors<'a>(&'a [u64]);

impl Cgroup for Ancestors<'_> {
    fn own(&self) -> u64 {
        self.0.last().copied().unwrap_or(0)
    }

    fn ancestor(&self, level: u32) -> u64 {
        self.0.get(level as usize).copied().unwrap_or(0)
    }
}

/// The kernel's decision ([`imds_guard_common::decide::decide`], which the programs run on
/// their maps), on the map entries of `generation`: for `explain` and for testing that what is
/// compiled means what the policy says. `ancestors` are the ids of the task's cgroup and its
/// ancestors, root first. `None` for a uid or gid matches no rule that names one.
/// `in_container`: the kernel finds the task outside the host's namespaces.
#[must_use]
pub fn judge(
    entries: &MapEntries,
    generation: u32,
    ancestors: &[u64],
    uid: Option<u32>,
    gid: Option<u32>,
    in_container: bool,
) -> Decision {
    let view = EntriesView {
        settings: entries.settings,
        cgroups: entries.cgroup_rulesets.iter().copied().collect(),
        allow: entries.allow.iter().copied().collect(),
        generation,
    };
    let task = if in_container {
        TASK_CONTAINER
    } else {
        TASK_HOST
    };
    decide(&view, generation, uid, || gid, task, &Ancestors(ancestors))
}

/// `Settings::host_uid_rules`: the default rule set's uid rules for host tasks, from a
/// generation's `ALLOW` entries, when they fit in its slots. That rule set's entries are the
/// generation's from its first write to its last (cgroups that come and go make and retire
/// other rule sets), so the settings, written once with them, never disagree with `ALLOW`.
fn host_uid_rules(allow: &[(RuleKey, RuleValue)]) -> Option<[UidRule; HOST_UID_RULES]> {
    let mut held = [UidRule::UNUSED; HOST_UID_RULES];
    let mut rules = (allow.iter()).filter(|(key, _)| {
        key.ruleset == RULESET_DEFAULT && key.kind == KIND_UID && key.task == TASK_HOST
    });
    for (slot, (key, value)) in held.iter_mut().zip(rules.by_ref()) {
        *slot = UidRule {
            uid: key.id,
            value: *value,
        };
    }
    rules.next().is_none().then_some(held)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use imds_guard_common::{
        event::{VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY},
        policy::MODE_AUDIT,
    };

    use super::*;
    use crate::{
        config::{Config, Overrides},
        host::cgroups::Hierarchy,
    };
    use imds_guard_common::policy::RULE_FLAG_AUDIT;

    fn policy(text: &str) -> Policy {
        let config =
            Config::from_toml(Some(Path::new("/g.toml")), text, &Overrides::default()).unwrap();
        Policy::resolve(&config, &Hierarchy::at("/nonexistent".into())).unwrap()
    }

    fn dir(id: u64, path: &str) -> CgroupDir {
        CgroupDir {
            id,
            path: path.into(),
        }
    }

    /// A small host: ids are the position in this list.
    const TREE: [&str; 8] = [
        "/",
        "/system.slice",
        "/system.slice/amazon-ssm-agent.service",
        "/system.slice/docker-aa.scope",
        "/system.slice/docker-aa.scope/init",
        "/kubepods.slice",
        "/kubepods.slice/pod1",
        "/user.slice",
    ];

    fn tree() -> Vec<CgroupDir> {
        (0u64..).zip(TREE).map(|(id, path)| dir(id, path)).collect()
    }

    /// Ids of `path` and its ancestors in [`TREE`], root first.
    fn ancestors(path: &str) -> Vec<u64> {
        (0u64..)
            .zip(TREE)
            .filter(|(_, p)| is_within(path, p))
            .map(|(id, _)| id)
            .collect()
    }

    fn verdict_at<'a>(compiled: &'a Compiled, path: &str, uid: u32) -> (u8, &'a str) {
        let judgement = judge(
            &compiled.entries(),
            compiled.generation(),
            &ancestors(path),
            Some(uid),
            Some(uid),
            false,
        );
        (judgement.verdict, compiled.policy.rule_name(judgement.rule))
    }

    const HOST_ROOT_AND_AGENTS: &str = "\
        [[allow]]\nname = \"ssm\"\nunit = \"amazon-ssm-agent.service\"\nuid = 0\n\
        [[allow]]\nname = \"host root\"\nuid = 0\n\
        not_cgroup = [\"/system.slice/docker-*.scope\", \"/kubepods.slice/**\"]\n\
        [[allow]]\nname = \"staged pods\"\ncgroup = \"/kubepods.slice/**\"\nmode = \"audit\"\n";

    #[test]
    fn the_compiled_maps_decide_as_the_policy_says() {
        let compiled = Compiled::new(policy(HOST_ROOT_AND_AGENTS), 1, "/", &tree()).0;
        let allow = VERDICT_ALLOW;
        assert_eq!(
            verdict_at(&compiled, "/system.slice/amazon-ssm-agent.service", 0),
            (allow, "ssm")
        );
        assert_eq!(
            verdict_at(&compiled, "/user.slice", 0),
            (allow, "host root")
        );
        assert_eq!(
            verdict_at(&compiled, "/user.slice", 1000),
            (VERDICT_DENY, "default")
        );
        assert_eq!(
            verdict_at(&compiled, "/system.slice/docker-aa.scope/init", 0),
            (VERDICT_DENY, "default")
        );
        assert_eq!(
            verdict_at(&compiled, "/kubepods.slice/pod1", 0),
            (VERDICT_AUDIT, "staged pods")
        );
        // /kubepods.slice itself is not matched by /kubepods.slice/**, but it is a container
        // cgroup all the same (Kubernetes' tree): host root's rule stays out.
        assert_eq!(
            verdict_at(&compiled, "/kubepods.slice", 0),
            (VERDICT_DENY, "default")
        );
    }

    #[test]
    fn kinds_of_key_no_rule_has_are_skipped_and_no_entry_has_one() {
        let bits = |kind| key_bit(kind, TASK_HOST) | key_bit(kind, TASK_CONTAINER);
        for (text, absent) in [
            // Root's rule alone (the default policy): gid and any-task lookups are skipped.
            ("[[allow]]\nuid = 0\n", bits(KIND_GID) | bits(KIND_ANY)),
            (HOST_ROOT_AND_AGENTS, bits(KIND_GID)),
            ("[[allow]]\ngid = 2000\n", bits(KIND_UID) | bits(KIND_ANY)),
            (
                "allow = []\n",
                bits(KIND_UID) | bits(KIND_GID) | bits(KIND_ANY),
            ),
        ] {
            let compiled = Compiled::new(policy(text), 0, "/", &tree()).0;
            let entries = compiled.entries();
            assert_eq!(entries.settings.absent_keys, absent, "{text}");
            // Whatever rule sets the tree made, none has a key of a kind said to be absent.
            for (key, _) in &entries.allow {
                assert_eq!(absent & key_bit(key.kind, key.task), 0, "{text}: {key:?}");
            }
        }
        // The decision is the same as with nothing skipped.
        let compiled = Compiled::new(policy(HOST_ROOT_AND_AGENTS), 1, "/", &tree()).0;
        let mut everything = compiled.entries();
        everything.settings.absent_keys = 0;
        for path in TREE {
            for uid in [0, 1000] {
                let judge_with = |entries: &MapEntries| {
                    judge(entries, 1, &ancestors(path), Some(uid), Some(uid), false)
                };
                assert_eq!(
                    judge_with(&compiled.entries()),
                    judge_with(&everything),
                    "{path} uid {uid}"
                );
            }
        }
    }

    #[test]
    fn the_default_rule_sets_host_uid_rules_are_held_in_the_settings_when_they_fit() {
        let held = |text: &str| {
            let entries = Compiled::new(policy(text), 0, "/", &tree()).0.entries();
            let settings = entries.settings;
            let in_allow: Vec<UidRule> = (entries.allow.iter())
                .filter(|(key, _)| {
                    key.ruleset == RULESET_DEFAULT && key.kind == KIND_UID && key.task == TASK_HOST
                })
                .map(|&(key, value)| UidRule { uid: key.id, value })
                .collect();
            (
                settings.host_uid_rules_held,
                settings.host_uid_rules,
                in_allow,
            )
        };
        // Root's rule alone (the default policy): held, and its `ALLOW` entry kept.
        let (on, slots, in_allow) = held("[[allow]]\nuid = 0\n");
        assert_eq!(on, 1);
        assert_eq!(slots[0], in_allow[0]);
        assert_eq!((slots[0].uid, slots[0].value.rule), (0, 1));
        assert_eq!(slots[1], UidRule::UNUSED);
        // Two fit; the first rule of each uid is the one held, as in `ALLOW`.
        let (on, slots, in_allow) = held(
            "[[allow]]\nuid = 1000\nmode = \"audit\"\n[[allow]]\nuid = 0\n[[allow]]\nuid = 1000\n",
        );
        assert_eq!(on, 1);
        assert_eq!(slots.to_vec(), in_allow);
        assert_eq!(
            slots.map(|slot| (slot.uid, slot.value.rule)),
            [(0, 2), (1000, 1)]
        );
        // Three do not: none is held, `ALLOW` is asked.
        let (on, slots, in_allow) =
            held("[[allow]]\nuid = 0\n[[allow]]\nuid = 1\n[[allow]]\nuid = 2\n");
        assert_eq!((on, slots, in_allow.len()), (0, [UidRule::UNUSED; 2], 3));
        // Rules of other kinds, or for some cgroups only, are not the default set's host uid
        // rules: the default set has one uid rule here, held.
        let (on, slots, in_allow) = held(HOST_ROOT_AND_AGENTS);
        assert_eq!((on, slots[0], slots[1]), (1, in_allow[0], UidRule::UNUSED));
        assert_eq!(in_allow.len(), 1);
        // No uid rule in the default set (the agent's unit's rule is another set's): held,
        // both slots unused, and root on the host matches neither.
        let ssm_only = "[[allow]]\nunit = \"amazon-ssm-agent.service\"\nuid = 0\n";
        assert_eq!(held(ssm_only), (1, [UidRule::UNUSED; 2], vec![]));
        assert_eq!(
            verdict_at(
                &Compiled::new(policy(ssm_only), 1, "/", &tree()).0,
                "/user.slice",
                0
            ),
            (VERDICT_DENY, "default")
        );
        // And the decision is the same with the settings' rules as with `ALLOW`'s, with rules
        // of every kind in the default set too, an audit one first: the lowest rule decides
        // whichever kind it is and wherever its entry is read.
        let mixed = "[[allow]]\ngid = 1000\nmode = \"audit\"\n[[allow]]\nuid = 1000\n\
                     [[allow]]\nuid = 0\n[[allow]]\nname = \"all\"\nnot_cgroup = \"/user.slice/**\"\n";
        for text in [
            HOST_ROOT_AND_AGENTS,
            "[[allow]]\nuid = 0\n[[allow]]\nuid = 1000\n",
            ssm_only,
            mixed,
        ] {
            let entries = Compiled::new(policy(text), 1, "/", &tree()).0.entries();
            let mut looked_up = entries.clone();
            looked_up.settings.host_uid_rules_held = 0;
            for path in TREE {
                let cases = [0, 1000, 1001].map(|uid| [(uid, false), (uid, true)]);
                for (uid, in_container) in cases.into_iter().flatten() {
                    let judge_with = |entries: &MapEntries| {
                        judge(
                            entries,
                            1,
                            &ancestors(path),
                            Some(uid),
                            Some(uid),
                            in_container,
                        )
                    };
                    assert_eq!(
                        judge_with(&entries),
                        judge_with(&looked_up),
                        "{text}: {path} uid {uid}, container {in_container}"
                    );
                }
            }
        }
    }

    #[test]
    fn only_matching_cgroups_get_entries_and_rule_sets_are_shared() {
        let mut dirs = tree();
        dirs.push(dir(100, "/system.slice/docker-bb.scope"));
        let compiled = Compiled::new(policy(HOST_ROOT_AND_AGENTS), 0, "/", &dirs).0;
        let entries = compiled.entries();
        let ids: Vec<u64> = entries
            .cgroup_rulesets
            .iter()
            .map(|(k, _)| k.cgroup_id)
            .collect();
        // Where the rules differ from the parent's: the unit, both containers, the pods' tree
        // and the pod the staged rule matches; not docker-aa/init, which inherits.
        assert_eq!(ids, [2, 3, 5, 6, 100]);
        // Both containers and the pods' tree share one rule set (nothing allowed); ssm, the
        // pod, the default and the unseen rule set have their own.
        assert_eq!(entries.cgroup_rulesets[1].1, entries.cgroup_rulesets[4].1);
        assert_eq!(entries.cgroup_rulesets[1].1, entries.cgroup_rulesets[2].1);
        assert_eq!(compiled.rulesets(), 5);
        assert_eq!(entries.settings.cgroup_rules, 1);
    }

    #[test]
    fn first_rule_per_key_wins_and_uid_rules_need_no_walk() {
        let compiled = Compiled::new(
            policy(
                "[[allow]]\nuid = 5\nmode = \"audit\"\ncontainers = true\n\
                 [[allow]]\nuid = 5\ncontainers = true\n\
                 [[allow]]\ngid = 9\ncontainers = true\n",
            ),
            0,
            "/",
            &tree(),
        )
        .0;
        let entries = compiled.entries();
        assert_eq!(entries.settings.cgroup_rules, 0);
        assert!(entries.cgroup_rulesets.is_empty());
        let allow: Vec<(u16, u16, u32, u32, u32)> = (entries.allow.iter())
            .map(|(k, v)| (k.kind, k.task, k.id, v.rule, v.flags))
            .collect();
        assert_eq!(
            allow,
            [
                (KIND_UID, TASK_HOST, 5, 1, RULE_FLAG_AUDIT),
                (KIND_UID, TASK_CONTAINER, 5, 1, RULE_FLAG_AUDIT),
                (KIND_GID, TASK_HOST, 9, 3, 0),
                (KIND_GID, TASK_CONTAINER, 9, 3, 0),
            ]
        );
        // uid 5 with gid 9: rule 1 comes first.
        let j = judge(&entries, 0, &[0], Some(5), Some(9), true);
        assert_eq!((j.verdict, j.rule), (VERDICT_AUDIT, 1));
    }

    #[test]
    fn host_rules_keep_namespaced_tasks_and_container_cgroups_out() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let container = format!("/system.slice/docker-{id}.scope");
        let dirs = [
            dir(1, "/"),
            dir(2, "/system.slice"),
            dir(3, &container),
            dir(4, &format!("{container}/init")),
        ];
        let compiled = Compiled::new(policy("[[allow]]\nuid = 0\n"), 0, "/", &dirs).0;
        let entries = compiled.entries();
        // One entry: the container's cgroup, which takes host root's rule away.
        assert_eq!(entries.cgroup_rulesets.len(), 1);
        assert_eq!(entries.settings.unseen_after, ALL_CGROUPS_SEEN);
        let judged = |ancestors: &[u64], in_container| {
            judge(&entries, 0, ancestors, Some(0), Some(0), in_container).verdict
        };
        assert_eq!(judged(&[1, 2], false), VERDICT_ALLOW);
        // Root in its own pid or cgroup namespace, in an ordinary cgroup.
        assert_eq!(judged(&[1, 2], true), VERDICT_DENY);
        // Root in the container's cgroup, whatever the kernel says of its namespaces.
        assert_eq!(judged(&[1, 2, 3], false), VERDICT_DENY);
        assert_eq!(judged(&[1, 2, 3, 4], false), VERDICT_DENY);
    }

    #[test]
    fn cgroups_coming_and_going_give_minimal_deltas() {
        let mut compiled = Compiled::new(policy(HOST_ROOT_AND_AGENTS), 1, "/", &tree()).0;
        let before = compiled.cgroup_entries();
        // A new container: one entry, its rule set exists already.
        compiled.sync(
            "/system.slice/docker-cc.scope",
            &[dir(200, "/system.slice/docker-cc.scope")],
        );
        let delta = compiled.take_delta();
        assert_eq!(delta.cgroup_upsert.len(), 1);
        assert!(delta.allow_insert.is_empty() && delta.cgroup_remove.is_empty());
        assert_eq!(compiled.cgroup_entries(), before + 1);
        // It goes away: its entry goes with it.
        compiled.sync("/system.slice/docker-cc.scope", &[]);
        let delta = compiled.take_delta();
        assert_eq!(delta.cgroup_remove, [compiled.cgroup_key(200)]);
        assert!(
            delta.allow_remove.is_empty(),
            "docker-aa still uses the rule set"
        );
        assert_eq!(compiled.cgroup_entries(), before);
        // Created and removed between two deltas: nothing to do.
        compiled.sync(
            "/system.slice/docker-dd.scope",
            &[dir(300, "/system.slice/docker-dd.scope")],
        );
        compiled.sync("/system.slice/docker-dd.scope", &[]);
        assert!(compiled.take_delta().is_empty());
        // A resync that finds nothing changed changes nothing.
        compiled.sync("/", &tree());
        assert!(compiled.take_delta().is_empty());
    }

    #[test]
    fn a_full_scan_repairs_whatever_notifications_missed() {
        let mut compiled = Compiled::new(policy(HOST_ROOT_AND_AGENTS), 0, "/", &tree()).0;
        // Missed: docker-aa went away, docker-bb and a new ssm cgroup came.
        let mut now: Vec<CgroupDir> = tree()
            .into_iter()
            .filter(|dir| !dir.path.starts_with("/system.slice/docker-aa.scope"))
            .filter(|dir| dir.id != 2)
            .collect();
        now.push(dir(500, "/system.slice/docker-bb.scope"));
        now.push(dir(501, "/system.slice/amazon-ssm-agent.service"));
        compiled.sync("/", &now);
        let delta = compiled.take_delta();
        let upserted: Vec<u64> = delta
            .cgroup_upsert
            .iter()
            .map(|(k, _)| k.cgroup_id)
            .collect();
        let removed: Vec<u64> = delta.cgroup_remove.iter().map(|k| k.cgroup_id).collect();
        assert_eq!((upserted, removed), (vec![500, 501], vec![2, 3]));
        // The result is what compiling from scratch gives.
        let fresh = Compiled::new(policy(HOST_ROOT_AND_AGENTS), 0, "/", &now).0;
        for path in [
            "/system.slice/docker-bb.scope",
            "/system.slice/amazon-ssm-agent.service",
        ] {
            let ids: Vec<u64> = now
                .iter()
                .filter(|d| is_within(path, &d.path))
                .map(|d| d.id)
                .collect();
            let judged = |c: &Compiled| {
                let j = judge(&c.entries(), 0, &ids, Some(0), Some(0), false);
                (j.verdict, j.rule)
            };
            assert_eq!(judged(&compiled), judged(&fresh), "{path}");
        }
    }

    #[test]
    fn unused_rule_sets_are_retired_and_new_ones_written_first() {
        let mut compiled = Compiled::new(policy(HOST_ROOT_AND_AGENTS), 0, "/", &tree()).0;
        let ssm = compiled.cgroups[&2].ruleset;
        // The unit restarts: old id gone, new id, same rule set, which is never retired.
        compiled.sync(
            "/system.slice/amazon-ssm-agent.service",
            &[dir(400, "/system.slice/amazon-ssm-agent.service")],
        );
        let delta = compiled.take_delta();
        assert_eq!(delta.cgroup_upsert, [(compiled.cgroup_key(400), ssm)]);
        assert_eq!(delta.cgroup_remove, [compiled.cgroup_key(2)]);
        assert!(delta.allow_insert.is_empty() && delta.allow_remove.is_empty());
        // The unit stops: its rule set is retired.
        compiled.sync("/system.slice/amazon-ssm-agent.service", &[]);
        let delta = compiled.take_delta();
        assert!(!delta.allow_remove.is_empty());
        assert!(delta.allow_remove.iter().all(|key| key.ruleset == ssm));
        // It starts again: a fresh rule set, written with the entry.
        compiled.sync(
            "/system.slice/amazon-ssm-agent.service",
            &[dir(401, "/system.slice/amazon-ssm-agent.service")],
        );
        let delta = compiled.take_delta();
        // Rules 1 and 2 both allow uid 0 there: one entry, for rule 1.
        assert_eq!(delta.allow_insert.len(), 1, "{delta:?}");
        assert_eq!(delta.allow_insert[0].1.rule, 1);
        let fresh = delta.cgroup_upsert[0].1;
        assert!(
            fresh != ssm
                && delta
                    .allow_insert
                    .iter()
                    .all(|(key, _)| key.ruleset == fresh)
        );
    }

    #[test]
    fn the_attach_point_carries_what_its_ancestors_match() {
        let compiled = Compiled::new(
            policy("[[allow]]\nuid = 0\nnot_cgroup = \"/system.slice/**\"\n"),
            0,
            "/system.slice/docker-aa.scope",
            &[
                dir(3, "/system.slice/docker-aa.scope"),
                dir(4, "/system.slice/docker-aa.scope/init"),
            ],
        )
        .0;
        // The attach point's entry takes the rule away; its child inherits it.
        assert_eq!(compiled.cgroup_entries(), 1);
        let (verdict, _) = verdict_at(&compiled, "/system.slice/docker-aa.scope", 0);
        assert_eq!(verdict, VERDICT_DENY);
        let (verdict, _) = verdict_at(&compiled, "/system.slice/docker-aa.scope/init", 0);
        assert_eq!(verdict, VERDICT_DENY);
    }

    #[test]
    fn too_deep_cgroups_are_reported_once() {
        let deep = format!("/k{}/target", "/x".repeat(40));
        let mut compiled = Compiled::new(
            policy("[[allow]]\ncgroup = \"/k/**/target\"\n"),
            0,
            "/",
            &[],
        )
        .0;
        assert_eq!(compiled.sync(&deep, &[dir(9, &deep)]).len(), 1);
        assert!(compiled.sync(&deep, &[dir(9, &deep)]).is_empty());
        assert_eq!(compiled.cgroup_entries(), 0);
    }

    #[test]
    fn audit_mode_and_v6_keys() {
        let compiled = Compiled::new(
            policy("mode = \"audit\"\nprotect = [\"imds\"]\n"),
            0,
            "/",
            &[],
        )
        .0;
        let entries = compiled.entries();
        assert_eq!(entries.settings.mode, MODE_AUDIT);
        let expected = v6_key([
            0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54,
        ]);
        assert_eq!(entries.protected.v6().collect::<Vec<_>>(), [expected]);
        assert_eq!(
            entries.protected.v4().collect::<Vec<_>>(),
            [u32::from_ne_bytes([169, 254, 169, 254])]
        );
    }

    #[test]
    fn a_double_star_pattern_costs_an_entry_where_it_starts_to_match() {
        let mut dirs = vec![dir(1, "/"), dir(2, "/w")];
        for child in 0..100u64 {
            dirs.push(dir(1000 + child, &format!("/w/c{child}")));
            for grandchild in 0..200u64 {
                dirs.push(dir(
                    100_000 + child * 1000 + grandchild,
                    &format!("/w/c{child}/g{grandchild}"),
                ));
            }
        }
        let compiled = Compiled::new(
            policy("[[allow]]\ncgroup = \"/w/**\"\nuid = 1000\n"),
            0,
            "/",
            &dirs,
        )
        .0;
        // 20,100 cgroups match; 100 entries (the children of /w) say so.
        assert_eq!(compiled.cgroup_entries(), 100);
        let j = judge(
            &compiled.entries(),
            0,
            &[1, 2, 1007, 107_042],
            Some(1000),
            None,
            false,
        );
        assert_eq!((j.verdict, j.rule), (VERDICT_ALLOW, 1));
    }

    #[test]
    fn a_full_map_never_widens_what_a_new_cgroup_gets() {
        let id = |n: u8| format!("{n:02x}").repeat(32);
        let container = |n: u8| format!("/system.slice/docker-{}.scope", id(n));
        let text = "[[allow]]\nuid = 0\n[[allow]]\ncgroup = \"/w/*\"\nuid = 1000\n";
        let base = [dir(1, "/"), dir(2, "/system.slice"), dir(3, "/w")];
        let mut dirs = base.to_vec();
        dirs.extend([dir(10, "/w/a"), dir(11, "/w/b")]);
        // Room for two entries: both widening ones fit.
        let (mut compiled, _) = Compiled::with_capacity(policy(text), 0, "/", &dirs, 2);
        assert_eq!((compiled.cgroup_entries(), compiled.dropped()), (2, 0));
        // A container's cgroup must be written: it takes the newest widening entry's room.
        dirs.push(dir(20, &container(1)));
        compiled.sync("/", &dirs);
        assert_eq!((compiled.cgroup_entries(), compiled.dropped()), (2, 1));
        let entries = compiled.entries();
        let judged = |entries: &MapEntries, ancestors: &[u64], uid| {
            let j = judge(entries, 0, ancestors, Some(uid), None, false);
            (j.verdict, j.ruleset)
        };
        assert_eq!(judged(&entries, &[1, 2, 20], 0).0, VERDICT_DENY);
        // /w/b lost its entry: uid 1000 there keeps what /w has (nothing), never more.
        assert_eq!(judged(&entries, &[1, 3, 11], 1000).0, VERDICT_DENY);
        assert_eq!(judged(&entries, &[1, 3, 10], 1000).0, VERDICT_ALLOW);
        // Two more containers: the last widening entry makes room for one; the other cannot
        // be written, so it and every newer cgroup are judged as unseen.
        dirs.push(dir(21, &container(2)));
        dirs.push(dir(22, &container(3)));
        compiled.sync("/", &dirs);
        assert_eq!((compiled.unwritten(), compiled.unseen_after()), (1, 21));
        let entries = compiled.entries();
        assert_eq!(entries.settings.unseen_after, 21);
        assert_eq!(
            judged(&entries, &[1, 2, 22], 0),
            (VERDICT_DENY, RULESET_UNSEEN)
        );
        // A host service started meanwhile: root is denied until there is room (fail closed).
        dirs.push(dir(30, "/system.slice/new.service"));
        compiled.sync("/", &dirs);
        let entries = compiled.entries();
        assert_eq!(
            judged(&entries, &[1, 2, 30], 0),
            (VERDICT_DENY, RULESET_UNSEEN)
        );
        // Older cgroups keep their rules.
        assert_eq!(judged(&entries, &[1, 2], 0).0, VERDICT_ALLOW);
        // A container goes: its room goes to the unwritten one, and nothing is unseen.
        dirs.retain(|d| d.id != 20);
        compiled.sync("/", &dirs);
        assert_eq!(
            (compiled.unwritten(), compiled.unseen_after()),
            (0, ALL_CGROUPS_SEEN)
        );
        let entries = compiled.entries();
        assert_eq!(judged(&entries, &[1, 2, 30], 0).0, VERDICT_ALLOW);
        assert_eq!(judged(&entries, &[1, 2, 22], 0).0, VERDICT_DENY);
    }

    #[test]
    fn a_user_cannot_take_the_room_of_others_entries() {
        let manager = "/user.slice/user-1000.slice/user@1000.service";
        let text = "[[allow]]\nuid = 0\nnot_cgroup = \"/user.slice/**/bad-*\"\n\
                    [[allow]]\ncgroup = \"/user.slice/**/good-*\"\nuid = 1000\n";
        let mut dirs = vec![
            dir(1, "/"),
            dir(2, "/user.slice"),
            dir(3, "/user.slice/user-1000.slice"),
            dir(4, manager),
            dir(5, "/system.slice"),
        ];
        // Names a container runtime would use, and names the rules match, made by the user.
        for n in 0..300u64 {
            dirs.push(dir(
                100 + n,
                &format!("{manager}/docker-{}.scope", "ab".repeat(32)),
            ));
            dirs.push(dir(1000 + n, &format!("{manager}/bad-{n}")));
            dirs.push(dir(2000 + n, &format!("{manager}/good-{n}")));
        }
        let (mut compiled, _) = Compiled::with_capacity(policy(text), 0, "/", &dirs, 300);
        // The user's names are no container's; its entries are capped and may be left out, so
        // they never make anything unseen.
        assert_eq!(compiled.cgroup_entries(), USER_MANAGER_ENTRIES);
        assert_eq!(compiled.unseen_after(), ALL_CGROUPS_SEEN);
        // Real containers' cgroups take the room they need from them.
        for n in 0..100u64 {
            dirs.push(dir(
                5000 + n,
                &format!("/system.slice/docker-{:064x}.scope", n + 1),
            ));
        }
        compiled.sync("/", &dirs);
        assert_eq!(compiled.cgroup_entries(), 300);
        assert_eq!((compiled.unwritten(), compiled.dropped()), (0, 600 - 200));
        let entries = compiled.entries();
        let root = |ancestors: &[u64]| judge(&entries, 0, ancestors, Some(0), None, false).verdict;
        assert_eq!(root(&[1, 5, 5099]), VERDICT_DENY);
        assert_eq!(root(&[1, 5]), VERDICT_ALLOW);
    }

    #[test]
    fn the_walk_looks_only_at_levels_with_entries() {
        let mut compiled = Compiled::new(policy(HOST_ROOT_AND_AGENTS), 0, "/", &tree()).0;
        // /kubepods.slice (level 1), the unit, the container and the pod (level 2).
        assert_eq!(compiled.entry_levels(), entry_levels(1, 2));
        // The unit, deeper down, widens the range; gone, it narrows it again.
        let deep = "/system.slice/a.slice/b.slice/amazon-ssm-agent.service";
        compiled.sync(deep, &[dir(600, deep)]);
        assert_eq!(compiled.entry_levels(), entry_levels(1, 4));
        compiled.sync(deep, &[]);
        assert_eq!(compiled.entry_levels(), entry_levels(1, 2));
        let empty = Compiled::new(policy("[[allow]]\nuid = 0\n"), 0, "/", &[dir(0, "/")]).0;
        assert_eq!(empty.entry_levels(), NO_ENTRY_LEVELS);
        assert_eq!(empty.entries().settings.entry_levels, NO_ENTRY_LEVELS);
    }
}
