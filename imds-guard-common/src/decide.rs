//! The decision, once: which rule set applies to an attempt, which rule of it matches first,
//! and what verdict that gives. The kernel programs run it on their maps; the agent runs it on
//! the map entries it computes (`explain`, `check-config`, tests), so what they say is what the
//! kernel does. How each side reads the policy and the cgroup is behind [`PolicyMaps`] and
//! [`Cgroup`].
//!
//! Written for the verifier too: the loop counts a constant number of turns, and the three rule
//! lookups are written out (see [`decide`]).

use crate::{
    event::{VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY},
    policy::{
        ALL_CGROUPS_SEEN, CgroupKey, KIND_ANY, KIND_GID, KIND_UID, MAX_CGROUP_LEVEL, MODE_AUDIT,
        RULE_DEFAULT, RULE_FLAG_AUDIT, RULE_FLAG_MODE_AUDIT, RULESET_DEFAULT, RULESET_UNSEEN,
        RuleKey, RuleValue, Settings, TASK_HOST, key_bit,
    },
};

/// Where the decision reads the policy: the kernel's maps, or the agent's entries for them.
pub trait PolicyMaps {
    /// `SETTINGS[generation]`.
    fn settings(&self, generation: u32) -> Option<Settings>;
    /// The rule set of a cgroup that has an entry in `CGROUP_RULESETS`.
    fn cgroup_ruleset(&self, key: CgroupKey) -> Option<u32>;
    /// The entry of `ALLOW` for `key`.
    fn rule(&self, key: RuleKey) -> Option<RuleValue>;
    /// `SETTINGS[generation]`'s rule for `uid` among [`Settings::host_uid_rules`] (asked only
    /// when the settings hold them). Read in place: on a program's stack, a copy of the slots
    /// made the packet program's frame too large for Linux 5.10's verifier.
    fn host_uid_rule(&self, generation: u32, uid: u32) -> Option<RuleValue>;
}

/// The cgroup an attempt is judged in.
pub trait Cgroup {
    /// Its id.
    fn own(&self) -> u64;
    /// The id of its ancestor at `level` (the root is level 0, the cgroup itself its own
    /// level); 0 below the cgroup.
    fn ancestor(&self, level: u32) -> u64;
}

/// What [`decide`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// `VERDICT_*`.
    pub verdict: u8,
    /// The deciding rule, or `RULE_DEFAULT`.
    pub rule: u32,
    /// The rule set it was found in.
    pub ruleset: u32,
    /// A gid rule decided: the packet layer, which knows no gid, could not decide the same.
    pub by_gid: bool,
    /// `RULE_FLAG_*` of the deciding rule (0 when none), and `RULE_FLAG_MODE_AUDIT` when the
    /// generation's mode is audit: what the message layer applies to the connection's requests.
    pub rule_flags: u32,
}

/// The verdict and the deciding rule for `uid`/`gid` (`None`: rules on it cannot match; the
/// packet layer knows no gid, `explain` may be asked without a uid), a task
/// of kind `task` (`TASK_HOST` or `TASK_CONTAINER`), in `cgroup`, by `generation` of `maps`.
///
/// `gid` is asked only when some rule set of the generation has gid rules for tasks of the
/// kind: the socket hooks read it from the task's credentials, a function of their own (and a
/// helper call in it) that an allowed attempt under a policy without gid rules (the default's)
/// need not make.
///
/// Of the rules that match (by uid, by gid, or any task of the rule set), the one with the lowest
/// id decides: the first in the config file. With none, the generation's mode decides. If the
/// settings cannot be read (the agent writes them before anything can run), the attempt is
/// judged as in enforce mode, in a cgroup the agent has not seen: fail closed.
#[inline]
pub fn decide(
    maps: &impl PolicyMaps,
    generation: u32,
    uid: Option<u32>,
    gid: impl FnOnce() -> Option<u32>,
    task: u16,
    cgroup: &impl Cgroup,
) -> Decision {
    let settings = maps.settings(generation).unwrap_or(Settings {
        cgroup_rules: 1,
        ..Settings::default()
    });
    let ruleset = if settings.cgroup_rules == 0 {
        RULESET_DEFAULT
    } else if settings.unseen_after != ALL_CGROUPS_SEEN && cgroup.own() > settings.unseen_after {
        // Newer than the agent's last complete view of the tree (cgroup ids only grow): its
        // entry, if it needs one, may be missing.
        RULESET_UNSEEN
    } else {
        nearest_ruleset(maps, generation, settings.entry_levels, cgroup)
    };
    // Three lookups written out, not a loop over an array of (kind, id, asked): LLVM spilled
    // that array's padding as an uninitialised register, which the verifier refuses
    // ("R3 !read_ok").
    // Only the kinds of key some rule set of the generation has: a default policy (root's
    // uid rule) costs one lookup, not three.
    let lookup = |kind: u16, id: u32| {
        if settings.absent_keys & key_bit(kind, task) != 0 {
            return None;
        }
        // The host's uid rules of the default rule set, when the settings hold them all.
        if kind == KIND_UID
            && task == TASK_HOST
            && ruleset == RULESET_DEFAULT
            && settings.host_uid_rules_held != 0
        {
            return maps.host_uid_rule(generation, id);
        }
        maps.rule(RuleKey {
            generation,
            ruleset,
            kind,
            task,
            id,
        })
    };
    // The lowest rule found and its kind of key ([`NOT_FOUND`]: none), both always written:
    // with an `Option`, LLVM compared a found rule with the first one's id before checking
    // there was one, reading a stack slot no path had written when none was, which Linux
    // 5.10's verifier refuses ("invalid read from stack").
    let (mut best, mut best_kind) = (
        RuleValue {
            rule: u32::MAX,
            flags: 0,
        },
        NOT_FOUND,
    );
    let mut consider = |kind: u16, id: Option<u32>| {
        if let Some(id) = id
            && let Some(found) = lookup(kind, id)
            && found.rule < best.rule
        {
            (best, best_kind) = (found, kind);
        }
    };
    consider(KIND_UID, uid);
    if settings.absent_keys & key_bit(KIND_GID, task) == 0 {
        consider(KIND_GID, gid());
    }
    consider(KIND_ANY, Some(0));
    let first = (best_kind != NOT_FOUND).then_some(best);
    let (verdict, rule) = verdict_of(first, settings.mode);
    let mode_audit = if settings.mode == MODE_AUDIT {
        RULE_FLAG_MODE_AUDIT
    } else {
        0
    };
    Decision {
        verdict,
        rule,
        ruleset,
        by_gid: best_kind == KIND_GID,
        rule_flags: first.map_or(settings.default_rule_flags, |rule| rule.flags) | mode_audit,
    }
}

/// [`decide`]'s kind of key of the first matching rule while none matched (`KIND_*` are not 0).
const NOT_FOUND: u16 = 0;

/// The verdict of the first matching rule (`None`: none matched, the `mode` decides), and the
/// rule that gave it.
#[inline]
#[must_use]
pub fn verdict_of(first: Option<RuleValue>, mode: u32) -> (u8, u32) {
    match first {
        Some(rule) if rule.flags & RULE_FLAG_AUDIT == 0 => (VERDICT_ALLOW, rule.rule),
        Some(rule) => (VERDICT_AUDIT, rule.rule),
        None if mode == MODE_AUDIT => (VERDICT_AUDIT, RULE_DEFAULT),
        None => (VERDICT_DENY, RULE_DEFAULT),
    }
}

/// The rule set of the nearest cgroup, from the cgroup up to the root, that has one.
///
/// Looks only at the levels where some cgroup has an entry (`entry_levels`, from the settings),
/// from the shallowest down, and stops below the cgroup itself (where `ancestor` returns 0): a
/// host without containers or cgroup rules costs no lookup at all, and one whose entries are
/// all containers' (one level) costs one.
#[inline]
fn nearest_ruleset(
    maps: &impl PolicyMaps,
    generation: u32,
    entry_levels: u64,
    cgroup: &impl Cgroup,
) -> u32 {
    #[expect(clippy::cast_possible_truncation, reason = "the halves of one word")]
    let (shallowest, deepest) = (entry_levels as u32, (entry_levels >> 32) as u32);
    let mut ruleset = RULESET_DEFAULT;
    // The loop counts a constant number of turns at most, from `shallowest` on: a loop whose
    // own bound the verifier cannot know makes it explore every count of turns ("the sequence
    // of 8193 jumps is too complex"), and one from level 0 costs a turn per level above the
    // shallowest entry.
    for turn in 0..=MAX_CGROUP_LEVEL {
        let level = shallowest.saturating_add(turn);
        if level > deepest || level > MAX_CGROUP_LEVEL {
            break;
        }
        let cgroup_id = cgroup.ancestor(level);
        if cgroup_id == 0 {
            break;
        }
        if let Some(found) = maps.cgroup_ruleset(CgroupKey {
            generation,
            _pad: 0,
            cgroup_id,
        }) {
            ruleset = found;
        }
    }
    ruleset
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::policy::{TASK_CONTAINER, UidRule, entry_levels};

    #[derive(Default)]
    struct Maps {
        settings: Option<Settings>,
        cgroups: HashMap<CgroupKey, u32>,
        rules: HashMap<RuleKey, RuleValue>,
    }

    impl PolicyMaps for Maps {
        fn settings(&self, _generation: u32) -> Option<Settings> {
            self.settings
        }
        fn cgroup_ruleset(&self, key: CgroupKey) -> Option<u32> {
            self.cgroups.get(&key).copied()
        }
        fn rule(&self, key: RuleKey) -> Option<RuleValue> {
            self.rules.get(&key).copied()
        }
        fn host_uid_rule(&self, _generation: u32, uid: u32) -> Option<RuleValue> {
            self.settings?.host_uid_rule(uid)
        }
    }

    /// Ancestors by level, root first; the last is the cgroup itself.
    struct Path(&'static [u64]);

    impl Cgroup for Path {
        fn own(&self) -> u64 {
            self.0.last().copied().unwrap_or(0)
        }
        fn ancestor(&self, level: u32) -> u64 {
            self.0.get(level as usize).copied().unwrap_or(0)
        }
    }

    fn key(ruleset: u32, kind: u16, task: u16, id: u32) -> RuleKey {
        RuleKey {
            generation: 0,
            ruleset,
            kind,
            task,
            id,
        }
    }

    fn allow(rule: u32) -> RuleValue {
        RuleValue { rule, flags: 0 }
    }

    #[test]
    fn lookups_of_absent_kinds_of_key_are_not_made() {
        let mut maps = Maps {
            settings: Some(Settings {
                absent_keys: key_bit(KIND_GID, TASK_HOST) | key_bit(KIND_ANY, TASK_HOST),
                ..Settings::default()
            }),
            ..Maps::default()
        };
        maps.rules
            .insert(key(RULESET_DEFAULT, KIND_UID, TASK_HOST, 0), allow(3));
        // Entries of the kinds said to be absent (which the agent never writes) are not read.
        maps.rules
            .insert(key(RULESET_DEFAULT, KIND_GID, TASK_HOST, 0), allow(1));
        maps.rules
            .insert(key(RULESET_DEFAULT, KIND_ANY, TASK_HOST, 0), allow(2));
        let by_uid = decide(&maps, 0, Some(0), || Some(0), TASK_HOST, &Path(&[1]));
        assert_eq!((by_uid.verdict, by_uid.rule), (VERDICT_ALLOW, 3));
        // Nor is the gid asked for: reading it is a helper call in the socket hooks.
        let asked = std::cell::Cell::new(false);
        let gid = || {
            asked.set(true);
            Some(0)
        };
        decide(&maps, 0, Some(0), gid, TASK_HOST, &Path(&[1]));
        assert!(!asked.get(), "the gid was asked for without gid rules");
        // Not absent for containers' tasks: read.
        maps.rules
            .insert(key(RULESET_DEFAULT, KIND_ANY, TASK_CONTAINER, 0), allow(2));
        let any = decide(&maps, 0, Some(5), || Some(5), TASK_CONTAINER, &Path(&[1]));
        assert_eq!((any.verdict, any.rule), (VERDICT_ALLOW, 2));
        // With nothing absent, the lowest rule decides.
        maps.settings = Some(Settings::default());
        let first = decide(&maps, 0, Some(0), gid, TASK_HOST, &Path(&[1]));
        assert_eq!((first.verdict, first.rule), (VERDICT_ALLOW, 1));
        assert!(asked.get(), "the gid was not asked for, with gid rules");
    }

    #[test]
    fn host_uid_rules_held_in_the_settings_are_not_looked_up() {
        let held = |uid, rule| UidRule {
            uid,
            value: allow(rule),
        };
        let mut maps = Maps {
            settings: Some(Settings {
                cgroup_rules: 1,
                unseen_after: ALL_CGROUPS_SEEN,
                entry_levels: entry_levels(1, 1),
                host_uid_rules_held: 1,
                host_uid_rules: [held(0, 3), held(1000, 4)],
                ..Settings::default()
            }),
            ..Maps::default()
        };
        // `ALLOW` disagrees with the settings on purpose: which one was read shows.
        maps.rules
            .insert(key(RULESET_DEFAULT, KIND_UID, TASK_HOST, 0), allow(7));
        maps.rules
            .insert(key(RULESET_DEFAULT, KIND_UID, TASK_HOST, 5), allow(8));
        maps.rules
            .insert(key(RULESET_DEFAULT, KIND_UID, TASK_CONTAINER, 0), allow(9));
        maps.rules.insert(key(1, KIND_UID, TASK_HOST, 0), allow(10));
        maps.cgroups.insert(
            CgroupKey {
                generation: 0,
                _pad: 0,
                cgroup_id: 10,
            },
            1,
        );
        let rule_of = |maps: &Maps, uid, task, path: &'static [u64]| {
            let decision = decide(maps, 0, Some(uid), || None, task, &Path(path));
            (decision.verdict, decision.rule)
        };
        // Host tasks of the default rule set: the settings' slots, either of them.
        assert_eq!(rule_of(&maps, 0, TASK_HOST, &[1, 2]), (VERDICT_ALLOW, 3));
        assert_eq!(rule_of(&maps, 1000, TASK_HOST, &[1, 2]), (VERDICT_ALLOW, 4));
        // A uid in no slot has no rule, whatever `ALLOW` holds.
        assert_eq!(rule_of(&maps, 5, TASK_HOST, &[1, 2]), (VERDICT_DENY, 0));
        // Containers' tasks and other rule sets: `ALLOW`.
        assert_eq!(
            rule_of(&maps, 0, TASK_CONTAINER, &[1, 2]),
            (VERDICT_ALLOW, 9)
        );
        assert_eq!(rule_of(&maps, 0, TASK_HOST, &[1, 10]), (VERDICT_ALLOW, 10));
        // An unused slot matches nothing: a slot of rule 0 not even its uid, in either place.
        for slots in [[held(5, 0), held(0, 3)], [held(0, 3), held(5, 0)]] {
            maps.settings = maps.settings.map(|settings| Settings {
                host_uid_rules: slots,
                ..settings
            });
            assert_eq!(rule_of(&maps, 5, TASK_HOST, &[1, 2]), (VERDICT_DENY, 0));
            assert_eq!(rule_of(&maps, 0, TASK_HOST, &[1, 2]), (VERDICT_ALLOW, 3));
        }
        maps.settings = maps.settings.map(|settings| Settings {
            host_uid_rules: [UidRule::UNUSED; 2],
            ..settings
        });
        assert_eq!(
            rule_of(&maps, u32::MAX, TASK_HOST, &[1, 2]),
            (VERDICT_DENY, 0)
        );
        assert_eq!(rule_of(&maps, 0, TASK_HOST, &[1, 2]), (VERDICT_DENY, 0));
        // A held uid rule competes with the other kinds as an entry of `ALLOW` would: the
        // lowest rule decides.
        maps.settings = maps.settings.map(|settings| Settings {
            host_uid_rules: [held(0, 3), held(1000, 4)],
            ..settings
        });
        maps.rules
            .insert(key(RULESET_DEFAULT, KIND_GID, TASK_HOST, 50), allow(2));
        maps.rules
            .insert(key(RULESET_DEFAULT, KIND_ANY, TASK_HOST, 0), allow(6));
        let decided = |uid, gid| {
            let decision = decide(&maps, 0, Some(uid), || Some(gid), TASK_HOST, &Path(&[1, 2]));
            (decision.rule, decision.by_gid)
        };
        assert_eq!(decided(0, 50), (2, true));
        assert_eq!(decided(0, 0), (3, false));
        assert_eq!(decided(5, 0), (6, false));
        maps.rules
            .remove(&key(RULESET_DEFAULT, KIND_GID, TASK_HOST, 50));
        maps.rules
            .remove(&key(RULESET_DEFAULT, KIND_ANY, TASK_HOST, 0));
        // Not held: `ALLOW`.
        maps.settings = maps.settings.map(|settings| Settings {
            host_uid_rules_held: 0,
            ..settings
        });
        assert_eq!(rule_of(&maps, 0, TASK_HOST, &[1, 2]), (VERDICT_ALLOW, 7));
        assert_eq!(rule_of(&maps, 5, TASK_HOST, &[1, 2]), (VERDICT_ALLOW, 8));
    }

    #[test]
    fn the_first_rule_of_the_nearest_rule_set_decides() {
        let mut maps = Maps {
            settings: Some(Settings {
                cgroup_rules: 1,
                unseen_after: ALL_CGROUPS_SEEN,
                entry_levels: entry_levels(1, 2),
                ..Settings::default()
            }),
            ..Maps::default()
        };
        // Rule set 1 at cgroup 10 (level 1), rule set 2 at cgroup 20 (level 2, below it).
        maps.cgroups.insert(
            CgroupKey {
                generation: 0,
                _pad: 0,
                cgroup_id: 10,
            },
            1,
        );
        maps.cgroups.insert(
            CgroupKey {
                generation: 0,
                _pad: 0,
                cgroup_id: 20,
            },
            2,
        );
        maps.rules
            .insert(key(RULESET_DEFAULT, KIND_UID, TASK_HOST, 0), allow(1));
        maps.rules.insert(key(1, KIND_GID, TASK_HOST, 7), allow(3));
        maps.rules.insert(
            key(1, KIND_ANY, TASK_HOST, 0),
            RuleValue {
                rule: 2,
                flags: RULE_FLAG_AUDIT,
            },
        );
        maps.rules
            .insert(key(2, KIND_UID, TASK_CONTAINER, 5), allow(4));
        let host = |maps: &Maps, uid, gid, path: &'static [u64]| {
            decide(maps, 0, Some(uid), || gid, TASK_HOST, &Path(path))
        };
        assert_eq!(host(&maps, 0, None, &[1]).verdict, VERDICT_ALLOW);
        // In rule set 1: the any-task rule (2) comes before the gid rule (3).
        let d = host(&maps, 9, Some(7), &[1, 10]);
        assert_eq!(
            (d.verdict, d.rule, d.ruleset, d.by_gid),
            (VERDICT_AUDIT, 2, 1, false)
        );
        // Rule set 2, nearer: only for a container's uid 5.
        assert_eq!(host(&maps, 5, None, &[1, 10, 20]).verdict, VERDICT_DENY);
        let d = decide(
            &maps,
            0,
            Some(5),
            || None,
            TASK_CONTAINER,
            &Path(&[1, 10, 20]),
        );
        assert_eq!((d.verdict, d.rule, d.ruleset), (VERDICT_ALLOW, 4, 2));
        // A cgroup newer than the agent's view gets the unseen rule set.
        maps.settings.as_mut().unwrap().unseen_after = 15;
        assert_eq!(
            decide(
                &maps,
                0,
                Some(5),
                || None,
                TASK_CONTAINER,
                &Path(&[1, 10, 20])
            )
            .ruleset,
            RULESET_UNSEEN
        );
        // Unreadable settings: enforce mode, every cgroup unseen.
        maps.settings = None;
        let d = host(&maps, 0, None, &[1]);
        assert_eq!((d.verdict, d.ruleset), (VERDICT_DENY, RULESET_UNSEEN));
    }

    #[test]
    fn the_mode_decides_when_no_rule_matches() {
        assert_eq!(verdict_of(None, MODE_AUDIT), (VERDICT_AUDIT, RULE_DEFAULT));
        assert_eq!(
            verdict_of(None, crate::policy::MODE_ENFORCE),
            (VERDICT_DENY, RULE_DEFAULT)
        );
        assert_eq!(verdict_of(Some(allow(3)), MODE_AUDIT), (VERDICT_ALLOW, 3));
    }
}
