//! How the policy is laid out in the kernel maps.
//!
//! A connect to a protected address is judged in three steps:
//! 1. the *rule set*: the nearest cgroup, walking from the task's cgroup up to the root, that has
//!    an entry in `CGROUP_RULESETS` selects one; with none, [`RULESET_DEFAULT`] applies;
//! 2. the *rules* of that set for the kind of task: an `ALLOW` entry for the task's uid, for
//!    its gid, or one that allows any task ([`KIND_ANY`]), keyed by ([`RuleKey`]) generation,
//!    rule set, kind, [`TASK_HOST`] or [`TASK_CONTAINER`], and id; of those found, the one with
//!    the lowest rule id (the first in the config file) decides;
//! 3. the global *mode* when no rule matched: deny in enforce mode, report in audit mode.
//!
//! Cgroup rules are therefore compiled into rule sets holding every rule that applies inside
//! that cgroup, which is what lets a later rule say "UID 0, but not in container cgroups".
//! Whether a task is in a container is decided twice over: by the kernel at the attempt (a pid
//! or cgroup namespace that is not the host's initial one: [`TASK_CONTAINER`] keys), and by the
//! agent from the cgroup path (a container runtime's cgroup, whose rule set then holds only the
//! rules that admit containers under both keys).
//!
//! A cgroup created after the agent last knew the tree completely (its id is above
//! [`Settings::unseen_after`]) may be a container's whose entry is not written yet: it is
//! judged by [`RULESET_UNSEEN`], the rules that hold wherever it is.
//!
//! Every key carries a *generation* (0 or 1), and `GENERATION` says which is in force: a new
//! policy is written beside the live one and takes effect with one 32-bit store. A program reads
//! `GENERATION` once and makes every lookup of an attempt with it, protected addresses included,
//! so each attempt is judged by exactly one generation's complete policy.

/// Block (or, in audit mode, report) attempts no rule allows.
pub const MODE_ENFORCE: u32 = 0;
/// Allow attempts no rule allows, but report them.
pub const MODE_AUDIT: u32 = 1;

/// The rule set for tasks whose cgroup and ancestors have no entry in `CGROUP_RULESETS`.
pub const RULESET_DEFAULT: u32 = 0;
/// The rule set for tasks in a cgroup the agent has not seen yet while it is behind (see
/// [`Settings::unseen_after`]): only the rules that apply in every cgroup.
pub const RULESET_UNSEEN: u32 = u32::MAX;
/// [`Settings::unseen_after`] while the agent knows every cgroup: none is unseen.
pub const ALL_CGROUPS_SEEN: u64 = u64::MAX;
/// The rule id in events decided by the global mode rather than by a rule.
pub const RULE_DEFAULT: u32 = 0;

/// The rule matches tasks with this uid (`RuleKey::id` is the uid).
pub const KIND_UID: u16 = 1;
/// The rule matches tasks with this primary gid (`RuleKey::id` is the gid).
pub const KIND_GID: u16 = 2;
/// The rule matches every task in the rule set (`RuleKey::id` is 0).
pub const KIND_ANY: u16 = 3;

/// `RuleKey::task` of a task in the host's initial pid and cgroup namespaces.
pub const TASK_HOST: u16 = 0;
/// `RuleKey::task` of a task in a pid or cgroup namespace of its own (a container), or one the
/// packet layer cannot tell (fail closed).
pub const TASK_CONTAINER: u16 = 1;

/// The inode number of the initial pid namespace (`PROC_PID_INIT_INO`, a kernel constant since
/// Linux 3.8): what `/proc/self/ns/pid` of a host process names.
pub const INIT_PID_NS_INO: u32 = 0xEFFF_FFFC;
/// The inode number of the initial cgroup namespace (`PROC_CGROUP_INIT_INO`, since Linux 4.6).
pub const INIT_CGROUP_NS_INO: u32 = 0xEFFF_FFFB;

/// A matching rule allows the attempt but reports it (staged rollout of a rule).
pub const RULE_FLAG_AUDIT: u32 = 1;
/// The rule's workloads must use IMDSv2 (`imds = "v2"`): the message layer refuses their v1
/// requests.
pub const RULE_FLAG_V2: u32 = 2;
/// The rule has `paths` or `deny_paths`: the message layer judges each request's path by the
/// rule's entry in `PATH_RULES`.
pub const RULE_FLAG_PATHS: u32 = 4;
/// Never in `ALLOW`: set in `HttpSocket::rule_flags` when the global mode was audit at the
/// connect, so that the message layer reports what it would refuse instead of refusing it.
pub const RULE_FLAG_MODE_AUDIT: u32 = 8;

/// The deepest cgroup level (the root is level 0) whose rule the kernel looks for: a task's
/// ancestors below this level are not consulted, so the agent refuses rules on deeper cgroups.
/// systemd services sit at level 2 and Kubernetes containers at level 4 or 5.
pub const MAX_CGROUP_LEVEL: u32 = 32;

/// IPv4 addresses one policy may protect.
pub const MAX_PROTECTED_V4: usize = 8;
/// IPv6 addresses one policy may protect.
pub const MAX_PROTECTED_V6: usize = 8;

/// `PROTECTED[generation]`: the destinations one generation protects, in the order the config
/// names them. A handful of compares in an array the verifier inlines, where a hash lookup
/// took a sixth of an allowed `connect()`'s time in the programs (a policy protects a few
/// addresses: the presets together are three IPv4 and two IPv6 ones).
///
/// Addresses are as the hooks see them (`bpf_sock_addr.user_ip4`/`user_ip6`, the IP header's
/// destination): network-order bytes read as native `u32` words.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtectedSet {
    /// How many of `v4` are protected (the rest are 0 and mean nothing).
    pub v4_len: u32,
    /// How many of `v6` are protected.
    pub v6_len: u32,
    pub v4: [u32; MAX_PROTECTED_V4],
    pub v6: [[u32; 4]; MAX_PROTECTED_V6],
}
const _: () = assert!(core::mem::size_of::<ProtectedSet>() == 168);

impl ProtectedSet {
    /// Whether the IPv4 address is one of the set's.
    #[must_use]
    #[inline]
    pub fn has_v4(&self, addr: u32) -> bool {
        // A loop of constant turns with an early exit (the verifier follows it unrolled; a
        // slice of `v4_len` would need a bounds check it refuses to see panic).
        for (i, &protected) in self.v4.iter().enumerate() {
            if i >= self.v4_len as usize {
                return false;
            }
            if protected == addr {
                return true;
            }
        }
        false
    }

    /// Whether the IPv6 address is one of the set's.
    #[must_use]
    #[inline]
    pub fn has_v6(&self, addr: [u32; 4]) -> bool {
        for (i, protected) in self.v6.iter().enumerate() {
            if i >= self.v6_len as usize {
                return false;
            }
            if same_words(*protected, addr) {
                return true;
            }
        }
        false
    }

    /// Adds an IPv4 address; `false` when the set is full.
    pub fn add_v4(&mut self, addr: u32) -> bool {
        let Some(slot) = self.v4.get_mut(self.v4_len as usize) else {
            return false;
        };
        *slot = addr;
        self.v4_len += 1;
        true
    }

    /// Adds an IPv6 address; `false` when the set is full.
    pub fn add_v6(&mut self, addr: [u32; 4]) -> bool {
        let Some(slot) = self.v6.get_mut(self.v6_len as usize) else {
            return false;
        };
        *slot = addr;
        self.v6_len += 1;
        true
    }

    /// The IPv4 addresses, in order.
    pub fn v4(&self) -> impl Iterator<Item = u32> + '_ {
        self.v4.iter().take(self.v4_len as usize).copied()
    }

    /// The IPv6 addresses, in order.
    pub fn v6(&self) -> impl Iterator<Item = [u32; 4]> + '_ {
        self.v6.iter().take(self.v6_len as usize).copied()
    }
}

/// Word-by-word equality of two IPv6 addresses (an array comparison could become a `bcmp`
/// call, which BPF lacks).
#[must_use]
#[inline]
pub fn same_words(a: [u32; 4], b: [u32; 4]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// Slots of each half of [`ProtectedFilter`].
pub const FILTER_SLOTS: u32 = 256;

/// `PROTECTED_FILTER[0]`: a bitmap that tells, before any other read, that a destination is
/// protected in no generation. Slot [`filter_slot_v4`] (or [`filter_slot_v6`]) of every address
/// protected in either generation is set; a clear slot means "not protected", a set one "look it
/// up". The agent sets slots before it adds addresses and clears them only after it removed
/// them, so the bitmap always covers both generations' sets; any mix of two such bitmaps (a
/// reader that races a writer) covers them too.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtectedFilter {
    /// Slots of IPv4 destinations (and IPv4-mapped IPv6 ones).
    pub v4: [u64; 4],
    /// Slots of IPv6 destinations.
    pub v6: [u64; 4],
}
const _: () = assert!(core::mem::size_of::<ProtectedFilter>() == 64);

/// The filter slot of an IPv4 address (as in [`ProtectedSet::v4`]): its last byte, which
/// spreads real destinations well (neighbouring addresses land apart) and costs the packet
/// path one shift.
#[must_use]
pub const fn filter_slot_v4(addr: u32) -> u32 {
    filter_slot_of_last_word(addr)
}

/// The filter slot of an IPv6 address (as in [`ProtectedSet::v6`]): its last byte.
#[must_use]
pub const fn filter_slot_v6(addr: [u32; 4]) -> u32 {
    filter_slot_of_last_word(addr[3])
}

/// The one slot function of both halves: the last byte of an address's last word. So
/// [`filter_slot_v6`] of an IPv6 socket address and [`filter_slot_v4`] of the IPv4 address an
/// `::ffff:a.b.c.d` one maps to (its last word) are both this of its last word, and a slot clear
/// in both halves rules the address out, mapped or not, before its other words are read.
#[must_use]
pub const fn filter_slot_of_last_word(last: u32) -> u32 {
    last.to_ne_bytes()[3] as u32
}

/// Whether `slot` is set in `half` (one half of a [`ProtectedFilter`]).
#[must_use]
#[inline]
pub const fn filter_has(half: &[u64; 4], slot: u32) -> bool {
    // `& 3` keeps the index provably in bounds (no panic branch for the verifier to refuse).
    (half[(slot >> 6) as usize & 3] >> (slot & 63)) & 1 != 0
}

/// Sets `slot` in `half`.
pub const fn filter_set(half: &mut [u64; 4], slot: u32) {
    half[(slot >> 6) as usize & 3] |= 1 << (slot & 63);
}

/// Per-generation settings, in `SETTINGS[generation]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// [`MODE_ENFORCE`] or [`MODE_AUDIT`].
    pub mode: u32,
    /// Non-zero when rules of this generation depend on the cgroup (cgroup conditions, or
    /// rules that tell host tasks from containers'), so `CGROUP_RULESETS` may hold entries of
    /// it (cgroups come and go while it is in force); zero lets the hook skip the ancestor walk.
    pub cgroup_rules: u32,
    /// Cgroups with a larger id were created after the agent last knew the tree completely
    /// (cgroup ids only grow): their tasks get [`RULESET_UNSEEN`]. [`ALL_CGROUPS_SEEN`] while
    /// the agent keeps up; lowered when it cannot (a full map, lost change notifications).
    /// Written by the agent with one aligned 8-byte store.
    pub unseen_after: u64,
    /// The shallowest (low half) and deepest (high half) cgroup level that has an entry in
    /// `CGROUP_RULESETS` for this generation: the ancestor walk looks at those levels only
    /// ([`NO_ENTRY_LEVELS`] when no cgroup has one). One aligned 8-byte word, so that a program
    /// never reads half of an update; the agent widens it before it adds an entry at a new
    /// level and narrows it after it removed the last one there.
    pub entry_levels: u64,
    /// `RULE_FLAG_V2` when the global `imds` is `"v2"`: the message layer's rule for
    /// connections no rule decided (audit mode).
    pub default_rule_flags: u32,
    /// The kinds of `ALLOW` key no rule set of this generation has: [`key_bit`] of each
    /// (kind, task) for which no rule exists, so that the decision skips lookups that cannot
    /// hit. 0 skips nothing, which is always correct (and what an agent from before this field
    /// wrote in its place, padding).
    pub absent_keys: u32,
    /// Non-zero when [`Settings::host_uid_rules`] holds every uid rule of the default rule set
    /// for host tasks ([`RULESET_DEFAULT`], [`KIND_UID`], [`TASK_HOST`]): the decision compares
    /// the uid with those instead of looking it up in `ALLOW` (a hash of the key, a bucket and
    /// an element: a fifth of an allowed `connect()`'s time in the programs), in the line it
    /// read the settings from. 0 looks them up, which is always correct.
    pub host_uid_rules_held: u32,
    /// The rules [`Settings::host_uid_rules_held`] speaks of, the others [`UidRule::UNUSED`].
    /// `ALLOW` has their entries too.
    pub host_uid_rules: [UidRule; HOST_UID_RULES],
    /// The policy's number: each policy the agent puts in force gets the next one (never 0), so
    /// that a verdict remembered on a socket (`SocketVerdict::epoch`) tells whether the policy
    /// that gave it is still in force: a generation's slot is reused at every other switch.
    pub epoch: u32,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 64);

impl Settings {
    /// The epoch of the policy after one of `epoch`: the next, skipping 0 (no policy's).
    #[must_use]
    pub const fn next_epoch(epoch: u32) -> u32 {
        match epoch.wrapping_add(1) {
            0 => 1,
            next => next,
        }
    }

    /// The epoch of a policy written into the slot of the policy of epoch `replaced`, beside the
    /// one of epoch `in_force`: the next after `in_force`, and never `replaced`'s (which sockets
    /// may still carry), nor 0.
    #[must_use]
    pub const fn epoch_after(in_force: u32, replaced: u32) -> u32 {
        let next = Self::next_epoch(in_force);
        if next == replaced {
            Self::next_epoch(next)
        } else {
            next
        }
    }
}

/// Slots of [`Settings::host_uid_rules`]: root's rule and one more (a default policy has one).
pub const HOST_UID_RULES: usize = 2;

/// A uid rule held in the settings (see [`Settings::host_uid_rules`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UidRule {
    /// The uid it matches.
    pub uid: u32,
    /// What `ALLOW` holds for it.
    pub value: RuleValue,
}

impl UidRule {
    /// An unused slot: uid `u32::MAX` (the kernel's `INVALID_UID`, which no task's credentials
    /// hold) and rule [`RULE_DEFAULT`] (never a rule's id). Either alone keeps it from matching
    /// (a slot of zeroes would be root's uid).
    pub const UNUSED: Self = Self {
        uid: u32::MAX,
        value: RuleValue {
            rule: RULE_DEFAULT,
            flags: 0,
        },
    };
}

impl Settings {
    /// The rule of [`Settings::host_uid_rules`] for `uid`, if any.
    #[inline]
    #[must_use]
    pub fn host_uid_rule(&self, uid: u32) -> Option<RuleValue> {
        // The two slots (`HOST_UID_RULES`), written out.
        let [first, second] = self.host_uid_rules;
        if first.value.rule != RULE_DEFAULT && first.uid == uid {
            Some(first.value)
        } else if second.value.rule != RULE_DEFAULT && second.uid == uid {
            Some(second.value)
        } else {
            None
        }
    }
}

/// The bit of [`Settings::absent_keys`] for keys of `kind` (`KIND_*`) for tasks of `task`
/// (`TASK_*`).
#[must_use]
pub const fn key_bit(kind: u16, task: u16) -> u32 {
    1 << ((kind as u32 & 3) * 2 + (task as u32 & 1))
}

/// [`Settings::entry_levels`] when no cgroup has an entry: an empty range.
pub const NO_ENTRY_LEVELS: u64 = entry_levels(u32::MAX, 0);

/// [`Settings::entry_levels`] for entries from level `shallowest` to `deepest`.
#[must_use]
pub const fn entry_levels(shallowest: u32, deepest: u32) -> u64 {
    shallowest as u64 | ((deepest as u64) << 32)
}

/// Key of `CGROUP_RULESETS`. The value is the rule set id (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[expect(
    clippy::pub_underscore_fields,
    reason = "padding is written out and zeroed by both sides, never read"
)]
pub struct CgroupKey {
    /// Policy generation, 0 or 1.
    pub generation: u32,
    /// Explicit padding, always 0.
    pub _pad: u32,
    /// The cgroup v2 id (the inode number of its directory).
    pub cgroup_id: u64,
}
const _: () = assert!(core::mem::size_of::<CgroupKey>() == 16);

/// Key of `ALLOW`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleKey {
    /// Policy generation, 0 or 1.
    pub generation: u32,
    /// Rule set the rule belongs to.
    pub ruleset: u32,
    /// [`KIND_UID`], [`KIND_GID`] or [`KIND_ANY`].
    pub kind: u16,
    /// [`TASK_HOST`] or [`TASK_CONTAINER`]: which tasks the entry is for.
    pub task: u16,
    /// The uid or gid; 0 for [`KIND_ANY`].
    pub id: u32,
}
const _: () = assert!(core::mem::size_of::<RuleKey>() == 16);

/// Value of `ALLOW`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleValue {
    /// The rule's id (1-based), carried into events; never [`RULE_DEFAULT`].
    pub rule: u32,
    /// `RULE_FLAG_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<RuleValue>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::Settings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CgroupKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RuleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RuleValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProtectedSet {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProtectedFilter {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_policy_gets_an_epoch_no_policy_before_it_had() {
        assert_eq!(Settings::next_epoch(0), 1);
        assert_eq!(Settings::next_epoch(41), 42);
        // Past the last, 0 (no policy's, what a remembered verdict from missing settings has)
        // is skipped.
        assert_eq!(Settings::next_epoch(u32::MAX), 1);
        // Beside the policy in force, never the number of the one replaced.
        assert_eq!(Settings::epoch_after(7, 6), 8);
        assert_eq!(Settings::epoch_after(0, 0), 1);
        assert_eq!(Settings::epoch_after(u32::MAX, 1), 2);
        assert_eq!(Settings::epoch_after(41, 42), 43);
    }

    #[test]
    fn a_protected_set_holds_its_addresses_and_no_other() {
        let imds = u32::from_ne_bytes([169, 254, 169, 254]);
        let mut set = ProtectedSet::default();
        // Empty: its zeroed slots protect nothing, not even 0.0.0.0 or `::`.
        assert!(!set.has_v4(0));
        assert!(!set.has_v6([0; 4]));
        assert!(set.add_v4(imds));
        assert!(set.has_v4(imds));
        assert!(!set.has_v4(0));
        for last in 1..=7u8 {
            assert!(set.add_v4(u32::from_ne_bytes([10, 0, 0, last])));
        }
        // Full: the eighth is found, a ninth is refused and not found.
        assert!(set.has_v4(u32::from_ne_bytes([10, 0, 0, 7])));
        assert!(!set.add_v4(u32::from_ne_bytes([10, 0, 0, 8])));
        assert!(!set.has_v4(u32::from_ne_bytes([10, 0, 0, 8])));
        assert_eq!(set.v4().count(), MAX_PROTECTED_V4);
        // IPv6: every word counts.
        let v6 = [0x00fd_u32.to_be(), 1, 2, 0x0254_u32.to_be()];
        assert!(set.add_v6(v6));
        assert!(set.has_v6(v6));
        for word in 0..4 {
            let mut other = v6;
            other[word] ^= 1;
            assert!(!set.has_v6(other), "word {word} differs");
        }
        assert!(!set.has_v6([0; 4]));
        assert_eq!(set.v6().collect::<Vec<_>>(), [v6]);
    }

    #[test]
    fn filter_slots_set_are_found_and_others_mostly_not() {
        let imds = u32::from_ne_bytes([169, 254, 169, 254]);
        let mut filter = ProtectedFilter::default();
        filter_set(&mut filter.v4, filter_slot_v4(imds));
        assert!(filter_has(&filter.v4, filter_slot_v4(imds)));
        let loopback = u32::from_ne_bytes([127, 0, 0, 1]);
        assert!(!filter_has(&filter.v4, filter_slot_v4(loopback)));
        assert!(!filter_has(&filter.v6, filter_slot_v4(imds)));
        // Every slot is reachable, and each of 256 consecutive addresses has its own.
        let slots: std::collections::BTreeSet<u32> = (0..=255u8)
            .map(|last| filter_slot_v4(u32::from_ne_bytes([10, 0, 0, last])))
            .collect();
        assert_eq!(slots.len(), 256);
        let v6 = [0x00fd_u32.to_be(), 0, 0, 0x0254_u32.to_be()];
        assert_eq!(filter_slot_v6(v6), 0x54);
        assert_eq!(filter_slot_v4(imds), 254);
    }

    #[test]
    fn an_ipv6_socket_address_has_one_slot_from_its_last_word_mapped_or_not() {
        let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        for last in [
            u32::from_ne_bytes([169, 254, 169, 254]),
            u32::from_ne_bytes([0, 0, 0x02, 0x54]),
            u32::from_ne_bytes([0, 0, 0, 1]),
            u32::MAX,
            0,
        ] {
            let slot = filter_slot_of_last_word(last);
            assert_eq!(slot, filter_slot_v6([0xfd00_0ec2_u32.to_be(), 0, 0, last]));
            assert_eq!(slot, filter_slot_v6([0, 0, mapped, last]));
            assert_eq!(
                slot,
                filter_slot_v4(last),
                "the IPv4 address ::ffff:x maps to"
            );
        }
    }
}
