//! Map names and indices: the agent finds maps by these names and never spells one itself.

/// Addresses under protection: an array of [`crate::policy::ProtectedSet`] indexed by
/// generation.
pub const PROTECTED: &str = "PROTECTED";
/// The fast "not protected" test: a one-entry array of [`crate::policy::ProtectedFilter`].
pub const PROTECTED_FILTER: &str = "PROTECTED_FILTER";
/// Verdicts the packet layer applies to a socket's later packets: socket-local storage
/// (`BPF_MAP_TYPE_SK_STORAGE`) of [`crate::event::SocketVerdict`]. The agent never reads it.
pub const SOCKET_VERDICTS: &str = "SOCKET_VERDICTS";
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
/// Per-CPU `u64` counters indexed by the `COUNTER_*` constants below (the totals by verdict are
/// [`RULE_COUNTERS`]' sum).
pub const COUNTERS: &str = "COUNTERS";
/// Per-CPU [`RuleCounts`] of attempts to protected addresses by deciding rule and verdict,
/// indexed by [`rule_counter_index`]: a judged attempt's one counter update.
pub const RULE_COUNTERS: &str = "RULE_COUNTERS";
/// Repeats being folded: [`crate::event::FoldKey`] → [`crate::event::FoldValue`], an LRU hash.
/// An attempt identical to one reported less than the fold window ago is counted here instead
/// of queued as an event, so a loop on `connect()` cannot fill the ring.
pub const FOLDS: &str = "FOLDS";
/// What the agent last said about itself: a one-entry array of [`crate::agent::AgentInfo`],
/// written by the agent only, so that `status` can tell without it.
pub const AGENT: &str = "AGENT";

/// What the message layer keeps of each HTTP connection to a protected address: socket-local
/// storage of [`crate::http::HttpSocket`], created by the connect hooks. The agent never reads it.
pub const HTTP_SOCKETS: &str = "HTTP_SOCKETS";
/// The connections whose writes the message program reads: a `SOCKHASH` keyed by socket
/// cookie (`u64`), filled by the `sock_ops` program; the message program is attached to it.
pub const HTTP_SOCKHASH: &str = "HTTP_SOCKHASH";
/// Rules' `paths` and `deny_paths`: [`crate::http::PathRulesKey`] →
/// [`crate::http::PathRules`].
pub const PATH_RULES: &str = "PATH_RULES";
/// Per-CPU `u64` counts of HTTP requests by rule and version, indexed by
/// [`crate::http::http_counter_index`].
pub const HTTP_COUNTERS: &str = "HTTP_COUNTERS";

/// Every map name, so the agent can check the embedded object has each of them.
pub const ALL: [&str; 16] = [
    PROTECTED,
    PROTECTED_FILTER,
    SOCKET_VERDICTS,
    GENERATION,
    SETTINGS,
    CGROUP_RULESETS,
    ALLOW,
    EVENTS,
    COUNTERS,
    RULE_COUNTERS,
    FOLDS,
    AGENT,
    HTTP_SOCKETS,
    HTTP_SOCKHASH,
    PATH_RULES,
    HTTP_COUNTERS,
];

/// Version of the maps' layout (names, key and value types). The maps are pinned in a directory
/// named after it, so that an agent whose layout differs never reads another's maps: an upgrade
/// that changes the layout fills new maps and then switches the programs over.
///
/// 2: events of 104 bytes (parent process), the `FOLDS` map and the `COUNTER_FOLDED` counter.
/// 3: protected addresses keyed by generation, `PROTECTED_FILTER`, `SOCKET_VERDICTS`.
/// 4: `ALLOW` keys by task kind (host or container), `Settings::unseen_after` and
/// `entry_levels`, events of 376 bytes (the executable), fold keys by process and port, a ring
/// of 2 MiB.
/// 5: the message layer (`HTTP_SOCKETS`, `HTTP_SOCKHASH`, `PATH_RULES`, `HTTP_COUNTERS`), events
/// of 632 bytes (the request line), fold keys by IMDS version, a ring of 4 MiB, `AgentInfo` of
/// 104 bytes (the instance's posture).
/// 6: `PROTECTED`, a set of addresses per generation, for the hash maps `PROTECTED_V4` and
/// `PROTECTED_V6`.
/// 7: `Settings` of 64 bytes (the default rule set's uid rules for host tasks).
/// 8: `Settings::epoch`, `SocketVerdict` of 32 bytes (the policy's epoch and the identity judged),
/// `HttpSocket::epoch`.
/// 9: `SocketVerdict`'s words reordered (the epoch, family and verdict in the last).
/// 10: `SocketVerdict` of 40 bytes (its check).
/// 11: `RULE_COUNTERS` of [`RuleCounts`] (by verdict), never zeroed; `COUNTERS` without the
/// totals by verdict (their sum).
/// 12: `FOLDS`' times in the fold clock (`CLOCK_MONOTONIC_COARSE` where the kernel offers it).
pub const MAPS_LAYOUT_VERSION: u32 = 12;

/// Rules a policy may have (rule ids run from 1 to this); one more slot per generation counts
/// the attempts no rule decided.
pub const MAX_RULES: u32 = 1024;
/// Entries of [`RULE_COUNTERS`]: one slot per rule id (0 for no rule), per generation.
pub const RULE_COUNTER_SLOTS: u32 = 2 * (MAX_RULES + 1);

/// Attempts a rule (or no rule) of a generation decided, by verdict: the value of
/// [`RULE_COUNTERS`]. An attempt adds one to one of them, and to nothing else. The slots are
/// never zeroed (a generation's reuse adds to what its earlier policies counted), so the totals
/// by verdict are their sum over rules and generations, which only grows; a policy's own counts
/// are what its slots gained since it was put in force (the agent's metrics keep that start).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounts {
    /// Allowed (`VERDICT_ALLOW`).
    pub allowed: u64,
    /// Allowed and reported (`VERDICT_AUDIT`).
    pub audited: u64,
    /// Refused (`VERDICT_DENY`).
    pub denied: u64,
}
const _: () = assert!(core::mem::size_of::<RuleCounts>() == 24);

impl RuleCounts {
    /// Every attempt counted, whatever its verdict.
    #[must_use]
    pub const fn total(&self) -> u64 {
        self.allowed
            .wrapping_add(self.audited)
            .wrapping_add(self.denied)
    }

    /// These counts and `other`'s, each verdict's added (wrapping, as the kernel's do).
    #[must_use]
    pub const fn plus(self, other: Self) -> Self {
        Self {
            allowed: self.allowed.wrapping_add(other.allowed),
            audited: self.audited.wrapping_add(other.audited),
            denied: self.denied.wrapping_add(other.denied),
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: three `u64`s, `#[repr(C)]`: no padding; every bit pattern is valid.
unsafe impl aya::Pod for RuleCounts {}

/// Index in [`RULE_COUNTERS`] of `rule` (0 for no rule) of `generation`.
#[must_use]
pub const fn rule_counter_index(generation: u32, rule: u32) -> u32 {
    let rule = if rule > MAX_RULES { MAX_RULES } else { rule };
    (generation & 1) * (MAX_RULES + 1) + rule
}

/// Ring buffer size in bytes (a power of two and a multiple of the page size): room for about
/// 6,500 events of 640 bytes (632 + the 8-byte record header) before the agent must drain.
pub const EVENTS_RING_BYTES: u32 = 1 << 22;

/// Denied or audited attempts whose event could not be reserved in the ring buffer.
pub const COUNTER_EVENTS_LOST: u32 = 0;
/// Denied or audited attempts folded into [`FOLDS`] as repeats instead of queued as events.
pub const COUNTER_FOLDED: u32 = 1;
/// HTTP requests the message layer refused (the write failed with `EACCES`).
pub const COUNTER_HTTP_REFUSED: u32 = 2;
/// Writes on a connection to a protected address that the message layer refused because it
/// had no record of the connect (its socket storage could not be made), or because the policy
/// that admitted the connection is no longer in force and it had rules on requests.
pub const COUNTER_HTTP_UNJUDGED: u32 = 3;
/// Connections to a protected address that the message layer could not follow (its map was
/// full): their writes are not read.
pub const COUNTER_HTTP_UNFOLLOWED: u32 = 4;
/// Number of counters in [`COUNTERS`].
pub const COUNTER_COUNT: u32 = 5;

/// `BPF_F_NO_PREALLOC`: the policy maps take memory per entry in use, not for their capacity.
pub const MAP_FLAGS_NO_PREALLOC: u32 = 1;
/// Capacity of [`CGROUP_RULESETS`] (both generations together).
pub const CGROUP_RULESETS_MAX_ENTRIES: u32 = 65_536;
/// Capacity of [`ALLOW`] (both generations together).
pub const ALLOW_MAX_ENTRIES: u32 = 65_536;
/// Capacity of [`FOLDS`]: attempts whose repeats are followed at once (the least recently
/// repeated is forgotten first; its next attempt is then reported as a new one).
pub const FOLDS_MAX_ENTRIES: u32 = 8192;
/// Capacity of [`HTTP_SOCKHASH`]: open HTTP connections to protected addresses.
pub const HTTP_SOCKHASH_MAX_ENTRIES: u32 = 65_536;
/// Capacity of [`PATH_RULES`]: rules with path patterns, both generations together.
pub const PATH_RULES_MAX_ENTRIES: u32 = 2 * MAX_RULES;
/// Entries of [`HTTP_COUNTERS`].
pub const HTTP_COUNTER_SLOTS: u32 = RULE_COUNTER_SLOTS * crate::http::IMDS_VERSIONS;
