//! Every map the programs use. Names come from `imds_guard_common::maps`, which the agent uses
//! to find them; layouts are documented in `imds_guard_common::policy`.

use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use imds_guard_common::{
    agent::AgentInfo,
    event::{Event, FoldKey, FoldValue, SocketVerdict},
    http::{HttpSocket, PathRules, PathRulesKey},
    maps::{
        ALLOW_MAX_ENTRIES, CGROUP_RULESETS_MAX_ENTRIES, COUNTER_COUNT, EVENTS_RING_BYTES,
        FOLDS_MAX_ENTRIES, HTTP_COUNTER_SLOTS, HTTP_SOCKHASH_MAX_ENTRIES, MAP_FLAGS_NO_PREALLOC,
        PATH_RULES_MAX_ENTRIES, RULE_COUNTER_SLOTS, RuleCounts,
    },
    policy::{CgroupKey, ProtectedFilter, ProtectedSet, RuleKey, RuleValue, Settings},
};

/// Protected destinations, by generation (an array lookup is inlined by the verifier).
#[map(name = "PROTECTED")]
pub static PROTECTED: Array<ProtectedSet> = Array::with_max_entries(2, 0);

/// Rules out unprotected destinations before anything else is read (an array lookup is inlined
/// by the verifier: no helper call).
#[map(name = "PROTECTED_FILTER")]
pub static PROTECTED_FILTER: Array<ProtectedFilter> = Array::with_max_entries(1, 0);

/// Verdicts the packet layer applies to a socket's later packets (see `SocketVerdict`).
/// Socket-local storage needs BTF, so this map is defined the BTF way (`.maps`).
#[btf_map(name = "SOCKET_VERDICTS")]
pub static SOCKET_VERDICTS: SkStorage<SocketVerdict> = SkStorage::new();

/// Writes `value`, sealed with its check, into a socket's `SOCKET_VERDICTS` entry a word at a
/// time, the check last (see `SocketVerdict`). (A plain assignment compiled to a call of a
/// byte-by-byte `memmove`: a 40-turn loop, and its frame on top of the program's.)
///
/// # Safety
/// `stored` is a live entry of `SOCKET_VERDICTS` (from `bpf_sk_storage_get`).
#[inline(always)]
pub unsafe fn store_socket_verdict(stored: *mut SocketVerdict, value: SocketVerdict) {
    // SAFETY: `SocketVerdict` is five 8-byte words, 8-aligned, without padding.
    let words: [u64; 5] = unsafe { core::mem::transmute(value.sealed()) };
    let stored = stored.cast::<u64>();
    for (i, word) in words.into_iter().enumerate() {
        // SAFETY: within the entry, as the caller promises; volatile, so that the stores stay
        // five, in this order.
        unsafe { core::ptr::write_volatile(stored.add(i), word) };
    }
}

/// The policy generation in force, at index 0.
#[map(name = "GENERATION")]
pub static GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// Mode and sizes of each generation's policy.
#[map(name = "SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(2, 0);

/// Cgroups that select a rule set for themselves and their descendants.
#[map(name = "CGROUP_RULESETS")]
pub static CGROUP_RULESETS: HashMap<CgroupKey, u32> =
    HashMap::with_max_entries(CGROUP_RULESETS_MAX_ENTRIES, MAP_FLAGS_NO_PREALLOC);

/// Allow rules by (generation, rule set, uid/gid/any).
#[map(name = "ALLOW")]
pub static ALLOW: HashMap<RuleKey, RuleValue> =
    HashMap::with_max_entries(ALLOW_MAX_ENTRIES, MAP_FLAGS_NO_PREALLOC);

/// Denied and audited attempts, for the agent.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Per-CPU counters, indexed by `imds_guard_common::maps::COUNTER_*`.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Attempts to protected addresses by deciding rule and verdict, per generation (see
/// `imds_guard_common::maps::rule_counter_index`).
#[map(name = "RULE_COUNTERS")]
pub static RULE_COUNTERS: PerCpuArray<RuleCounts> =
    PerCpuArray::with_max_entries(RULE_COUNTER_SLOTS, 0);

/// Repeats being folded instead of queued as events.
#[map(name = "FOLDS")]
pub static FOLDS: LruHashMap<FoldKey, FoldValue> =
    LruHashMap::with_max_entries(FOLDS_MAX_ENTRIES, 0);

/// What the message layer keeps of each HTTP connection to a protected address (see
/// `HttpSocket`): made by the connect hooks, read and advanced by the message program.
#[btf_map(name = "HTTP_SOCKETS")]
pub static HTTP_SOCKETS: SkStorage<HttpSocket> = SkStorage::new();

/// The connections whose writes the message program reads, by socket cookie.
#[map(name = "HTTP_SOCKHASH")]
pub static HTTP_SOCKHASH: SockHash<u64> = SockHash::with_max_entries(HTTP_SOCKHASH_MAX_ENTRIES, 0);

/// Rules' `paths` and `deny_paths`, by generation and rule.
#[map(name = "PATH_RULES")]
pub static PATH_RULES: HashMap<PathRulesKey, PathRules> =
    HashMap::with_max_entries(PATH_RULES_MAX_ENTRIES, MAP_FLAGS_NO_PREALLOC);

/// HTTP requests by rule and version (see `imds_guard_common::http::http_counter_index`).
#[map(name = "HTTP_COUNTERS")]
pub static HTTP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(HTTP_COUNTER_SLOTS, 0);

/// The agent's record of itself; the programs never touch it.
#[map(name = "AGENT")]
pub static AGENT: Array<AgentInfo> = Array::with_max_entries(1, 0);

/// Compile-time proof that the event fits a ring-buffer record the verifier accepts.
const _: () = assert!(core::mem::size_of::<Event>().is_multiple_of(8));
