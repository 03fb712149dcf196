//! Map names and indices: the agent finds maps by these names and never spells one itself.

/// IPv4 addresses under protection: [`crate::policy::ProtectedV4Key`] → generation mask (`u32`).
pub const PROTECTED_V4: &str = "PROTECTED_V4";
/// IPv6 addresses under protection: [`crate::policy::ProtectedV6Key`] → generation mask (`u32`).
pub const PROTECTED_V6: &str = "PROTECTED_V6";
/// The policy generation in force: a one-entry array of `u32` (0 or 1).
pub const GENERATION: &str = "GENERATION";
/// Per-generation settings: an array of [`crate::policy::Settings`] indexed by generation.
pub const SETTINGS: &str = "SETTINGS";
/// Cgroups that select a rule set: [`crate::policy::CgroupKey`] → rule set id (`u32`).
pub const CGROUP_RULESETS: &str = "CGROUP_RULESETS";
/// Allow rules: [`crate::policy::RuleKey`] → [`crate::policy::RuleValue`].
pub const ALLOW: &str = "ALLOW";
/// Denied and audited attempts: a ring buffer of [`crate::event::Event`].
pub const EVENTS: &str = "EVENTS";
/// Per-CPU `u64` counters indexed by the `COUNTER_*` constants below.
pub const COUNTERS: &str = "COUNTERS";

/// Every map name, so the agent can check the embedded object has each of them.
pub const ALL: [&str; 8] = [
    PROTECTED_V4,
    PROTECTED_V6,
    GENERATION,
    SETTINGS,
    CGROUP_RULESETS,
    ALLOW,
    EVENTS,
    COUNTERS,
];

/// Ring buffer size in bytes (a power of two and a multiple of the page size): room for about
/// 11,900 events of 88 bytes (80 + the 8-byte record header) before the agent must drain.
pub const EVENTS_RING_BYTES: u32 = 1 << 20;

/// Connects and datagrams to a protected address that the policy allowed.
pub const COUNTER_ALLOWED: u32 = 0;
/// Attempts to a protected address that were refused (enforce mode).
pub const COUNTER_DENIED: u32 = 1;
/// Attempts to a protected address that were allowed but reported (audit mode or an audit rule).
pub const COUNTER_AUDITED: u32 = 2;
/// Denied or audited attempts whose event could not be reserved in the ring buffer.
pub const COUNTER_EVENTS_LOST: u32 = 3;
/// Number of counters in [`COUNTERS`].
pub const COUNTER_COUNT: u32 = 4;

/// `BPF_F_NO_PREALLOC`: the policy maps take memory per entry in use, not for their capacity.
pub const MAP_FLAGS_NO_PREALLOC: u32 = 1;
/// Capacity of [`CGROUP_RULESETS`] (both generations together).
pub const CGROUP_RULESETS_MAX_ENTRIES: u32 = 65_536;
/// Capacity of [`ALLOW`] (both generations together).
pub const ALLOW_MAX_ENTRIES: u32 = 65_536;
/// Capacity of each of [`PROTECTED_V4`] and [`PROTECTED_V6`].
pub const PROTECTED_MAX_ENTRIES: u32 = 256;
