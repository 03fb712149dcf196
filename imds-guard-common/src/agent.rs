//! What the agent records about itself in the pinned `AGENT` map.

/// How often the agent records that it is alive ([`AgentInfo::heartbeat_ns`]); `status` calls
/// an agent unhealthy after three missed heartbeats.
pub const HEARTBEAT_INTERVAL_SECS: u64 = 5;

/// Bytes of the agent's version text (NUL-padded).
pub const VERSION_LEN: usize = 32;

/// The agent's own state, for `status` when the agent is not there to ask. Times are
/// `CLOCK_BOOTTIME` nanoseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentInfo {
    /// Version of the agent that installed the programs and policy in force (`0.1.0`).
    pub version: [u8; VERSION_LEN],
    /// When that agent started.
    pub started_ns: u64,
    /// Its last sign of life (written every few seconds while it runs).
    pub heartbeat_ns: u64,
    /// Its pid; 0 once it has stopped cleanly.
    pub pid: u32,
    /// Policy reloads that took effect since it started.
    pub reloads: u32,
    /// Reloads refused since it started.
    pub failed_reloads: u32,
    /// Rules in the policy in force.
    pub rules: u32,
    /// Cgroups with an entry in the policy in force.
    pub cgroup_entries: u32,
    /// Non-zero while the maps may differ from the policy (an update failed; the agent
    /// rewrites them at its next scan).
    pub maps_uncertain: u32,
    /// Cgroups whose entry would only add rules but found no room in the map (they keep the
    /// narrower rules they inherit).
    pub cgroups_dropped: u32,
    /// Cgroup directories the last full scan could not watch (the inotify watch limit): cgroups
    /// made below them get their rules at the next scan.
    pub cgroups_unwatched: u32,
    /// `Settings::unseen_after` in force: below `ALL_CGROUPS_SEEN`, newer cgroups are judged
    /// by the rules that hold wherever they are (a full map, or lost notifications).
    pub unseen_after: u64,
    /// When the agent last checked the instance's posture (`posture = true`); 0: never.
    pub posture_checked_ns: u64,
    /// What that check found of `HttpTokens`: one of the `POSTURE_TOKENS_*` values.
    pub posture_http_tokens: u32,
    /// The hop limit of IMDS's token responses it read; 0 when it could not.
    pub posture_hop_limit: u32,
}
const _: () = assert!(core::mem::size_of::<AgentInfo>() == 104);

/// [`AgentInfo::posture_http_tokens`]: no check yet.
pub const POSTURE_TOKENS_UNCHECKED: u32 = 0;
/// IMDS answered a tokenless request (`HttpTokens=optional`).
pub const POSTURE_TOKENS_OPTIONAL: u32 = 1;
/// IMDS refused a tokenless request with 401 (`HttpTokens=required`).
pub const POSTURE_TOKENS_REQUIRED: u32 = 2;
/// The check got no answer.
pub const POSTURE_TOKENS_UNKNOWN: u32 = 3;

impl Default for AgentInfo {
    fn default() -> Self {
        Self {
            version: [0; VERSION_LEN],
            started_ns: 0,
            heartbeat_ns: 0,
            pid: 0,
            reloads: 0,
            failed_reloads: 0,
            rules: 0,
            cgroup_entries: 0,
            maps_uncertain: 0,
            cgroups_dropped: 0,
            cgroups_unwatched: 0,
            unseen_after: crate::policy::ALL_CGROUPS_SEEN,
            posture_checked_ns: 0,
            posture_http_tokens: POSTURE_TOKENS_UNCHECKED,
            posture_hop_limit: 0,
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: plain `#[repr(C)]` integers and bytes without padding; every bit pattern is valid.
unsafe impl aya::Pod for AgentInfo {}
