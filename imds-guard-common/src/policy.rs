//! How the policy is laid out in the kernel maps.
//!
//! A connect to a protected address is judged in three steps:
//! 1. the *rule set*: the nearest cgroup, walking from the task's cgroup up to the root, that has
//!    an entry in `CGROUP_RULESETS` selects one; with none, [`RULESET_DEFAULT`] applies;
//! 2. the *rules* of that set: an `ALLOW` entry for the task's uid, for its gid, or one that
//!    allows any task ([`KIND_ANY`]), keyed by ([`RuleKey`]) generation, rule set, kind and id;
//!    of those found, the one with the lowest rule id (the first in the config file) decides;
//! 3. the global *mode* when no rule matched: deny in enforce mode, report in audit mode.
//!
//! Cgroup rules are therefore compiled into rule sets holding every rule that applies inside
//! that cgroup, which is what lets a later rule say "UID 0, but not in container cgroups".
//!
//! Every key carries a *generation* (0 or 1), and `GENERATION` says which is in force: a new
//! policy is written beside the live one and takes effect with one 32-bit store.

/// Block (or, in audit mode, report) attempts no rule allows.
pub const MODE_ENFORCE: u32 = 0;
/// Allow attempts no rule allows, but report them.
pub const MODE_AUDIT: u32 = 1;

/// The rule set for tasks whose cgroup and ancestors have no entry in `CGROUP_RULESETS`.
pub const RULESET_DEFAULT: u32 = 0;
/// The rule id in events decided by the global mode rather than by a rule.
pub const RULE_DEFAULT: u32 = 0;

/// The rule matches tasks with this uid (`RuleKey::id` is the uid).
pub const KIND_UID: u32 = 1;
/// The rule matches tasks with this primary gid (`RuleKey::id` is the gid).
pub const KIND_GID: u32 = 2;
/// The rule matches every task in the rule set (`RuleKey::id` is 0).
pub const KIND_ANY: u32 = 3;

/// A matching rule allows the attempt but reports it (staged rollout of a rule).
pub const RULE_FLAG_AUDIT: u32 = 1;

/// The deepest cgroup level (the root is level 0) whose rule the kernel looks for: a task's
/// ancestors below this level are not consulted, so the agent refuses rules on deeper cgroups.
/// systemd services sit at level 2 and Kubernetes containers at level 4 or 5.
pub const MAX_CGROUP_LEVEL: u32 = 32;

/// Key of `PROTECTED_V4`: the address as the hook sees it (`bpf_sock_addr.user_ip4`, network
/// byte order, read as a native `u32`). The value is a `u32` mask: bit `g` set means the address
/// is protected in generation `g`.
pub type ProtectedV4Key = u32;
/// Key of `PROTECTED_V6`: the address as four native `u32` words of network-order bytes
/// (`bpf_sock_addr.user_ip6`). Value as for [`ProtectedV4Key`].
pub type ProtectedV6Key = [u32; 4];

/// Per-generation settings, in `SETTINGS[generation]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// [`MODE_ENFORCE`] or [`MODE_AUDIT`].
    pub mode: u32,
    /// Non-zero when rules of this generation have cgroup conditions, so `CGROUP_RULESETS` may
    /// hold entries of it (cgroups come and go while it is in force); zero lets the hook skip
    /// the ancestor walk.
    pub cgroup_rules: u32,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 8);

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
    pub kind: u32,
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
}
