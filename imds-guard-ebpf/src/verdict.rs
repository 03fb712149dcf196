//! The decision: is the destination protected, and if so, may the current task reach it?

use aya_ebpf::{
    helpers::{bpf_get_current_uid_gid, generated::bpf_get_current_ancestor_cgroup_id},
    programs::SockAddrContext,
};
use imds_guard_common::{
    event::{FAMILY_INET, FAMILY_INET6, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY},
    maps::{COUNTER_ALLOWED, COUNTER_AUDITED, COUNTER_DENIED},
    policy::{
        CgroupKey, KIND_ANY, KIND_GID, KIND_UID, MAX_CGROUP_LEVEL, MODE_AUDIT, RULE_DEFAULT,
        RULE_FLAG_AUDIT, RULESET_DEFAULT, RuleKey, RuleValue, Settings,
    },
};

use crate::{
    maps::{ALLOW, CGROUP_RULESETS, GENERATION, PROTECTED_V4, PROTECTED_V6, SETTINGS},
    report::{self, Attempt},
};

const PROCEED: i32 = 1;
const REJECT: i32 = 0;

/// `::ffff:0:0/96`, the IPv4-mapped prefix, as the third word of `user_ip6` (network order).
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Judges an IPv4 destination.
pub fn judge_v4(ctx: &SockAddrContext, hook: u8) -> i32 {
    // SAFETY: the kernel hands sock_addr programs a valid context.
    let ip4 = unsafe { (*ctx.sock_addr).user_ip4 };
    // Fast path: an unprotected destination costs this one lookup.
    // SAFETY: the value is a plain u32 that is only read.
    let Some(&generations) = (unsafe { PROTECTED_V4.get(ip4) }) else {
        return PROCEED;
    };
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ip4.to_ne_bytes());
    judge_protected(ctx, hook, FAMILY_INET, generations, addr)
}

/// Judges an IPv6 destination, treating `::ffff:a.b.c.d` as the IPv4 address it maps to.
pub fn judge_v6(ctx: &SockAddrContext, hook: u8) -> i32 {
    // The verifier only allows `user_ip6` to be read one aligned 32-bit word at a time
    // ("invalid bpf_context access" otherwise), so each word is a separate volatile read that
    // the compiler cannot merge into a 64-bit load.
    // SAFETY: the kernel hands sock_addr programs a valid context.
    let words = unsafe {
        let ip6 = &raw const (*ctx.sock_addr).user_ip6;
        [
            core::ptr::read_volatile(ip6.cast::<u32>()),
            core::ptr::read_volatile(ip6.cast::<u32>().add(1)),
            core::ptr::read_volatile(ip6.cast::<u32>().add(2)),
            core::ptr::read_volatile(ip6.cast::<u32>().add(3)),
        ]
    };
    let protected = if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD {
        // SAFETY: plain u32 values, only read.
        unsafe { PROTECTED_V4.get(words[3]) }
    } else {
        // SAFETY: as above.
        unsafe { PROTECTED_V6.get(words) }
    };
    let Some(&generations) = protected else {
        return PROCEED;
    };
    let mut addr = [0u8; 16];
    for (i, word) in words.iter().enumerate() {
        addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    judge_protected(ctx, hook, FAMILY_INET6, generations, addr)
}

/// The slow path: the address is protected in some generation.
fn judge_protected(
    ctx: &SockAddrContext,
    hook: u8,
    family: u8,
    generations: u32,
    addr: [u8; 16],
) -> i32 {
    let Some(generation) = generation_in_force(generations) else {
        // Protected only by the other generation (a policy switch removed it).
        return PROCEED;
    };
    let uid_gid = bpf_get_current_uid_gid();
    // Truncation intended: the low half is the uid, the high half the gid.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "splitting a u64 into halves"
    )]
    let (uid, gid) = (uid_gid as u32, (uid_gid >> 32) as u32);
    // SAFETY: a helper without pointer arguments (Linux 5.7+ for sock_addr programs).
    let ancestor = |level: i32| unsafe { bpf_get_current_ancestor_cgroup_id(level) };
    let (verdict, rule) = decide(generation, uid, Some(gid), ancestor);
    count(generation, verdict, rule);
    if verdict == VERDICT_ALLOW {
        return PROCEED;
    }
    // SAFETY: the kernel hands sock_addr programs a valid context.
    let (port, protocol) = unsafe { ((*ctx.sock_addr).user_port, (*ctx.sock_addr).protocol) };
    report::event(
        &Attempt {
            verdict,
            rule,
            // `generation` is 0 or 1, so this cannot truncate.
            generation: u8::from(generation != 0),
            hook,
            family,
            // Truncation intended: the port is the low 16 bits, in network byte order.
            #[expect(
                clippy::cast_possible_truncation,
                reason = "the port is the low 16 bits"
            )]
            port: u16::from_be(port as u16),
            #[expect(
                clippy::cast_possible_truncation,
                reason = "IPPROTO_* values fit in a byte"
            )]
            protocol: protocol as u8,
            uid,
            gid,
            addr,
        },
        report::current_cgroup_id(),
        report::Identity::current_task,
    );
    if verdict == VERDICT_DENY {
        REJECT
    } else {
        PROCEED
    }
}

/// The generation in force, if the address is protected in it (`generations` is the address's
/// mask of generations).
pub fn generation_in_force(generations: u32) -> Option<u32> {
    let generation = GENERATION.get(0).copied().unwrap_or(0) & 1;
    (generations & (1 << generation) != 0).then_some(generation)
}

/// Counts a judged attempt by verdict and by rule.
pub fn count(generation: u32, verdict: u8, rule: u32) {
    report::count_rule(generation, rule);
    report::count(match verdict {
        VERDICT_ALLOW => COUNTER_ALLOWED,
        VERDICT_AUDIT => COUNTER_AUDITED,
        _ => COUNTER_DENIED,
    });
}

/// Returns the verdict and the deciding rule for `uid`/`gid` (no gid: gid rules cannot match)
/// in the cgroup whose ancestors `ancestor(level)` gives (0 below the cgroup itself).
///
/// Of the rules that match (by uid, by gid, or any task of the rule set), the one with the lowest
/// id decides: the first in the config file, as the agent's `explain` says. With none, the
/// generation's mode decides. If the settings cannot be read (they always can: the agent writes
/// them before attaching), the task is judged as in enforce mode: fail closed.
pub fn decide(
    generation: u32,
    uid: u32,
    gid: Option<u32>,
    ancestor: impl Fn(i32) -> u64,
) -> (u8, u32) {
    let settings = SETTINGS
        .get(generation)
        .copied()
        .unwrap_or(Settings::default());
    let ruleset = if settings.cgroup_rules == 0 {
        RULESET_DEFAULT
    } else {
        nearest_ruleset(generation, ancestor)
    };
    let mut first: Option<RuleValue> = None;
    for (kind, id, asked) in [
        (KIND_UID, uid, true),
        (KIND_GID, gid.unwrap_or(0), gid.is_some()),
        (KIND_ANY, 0, true),
    ] {
        if !asked {
            continue;
        }
        let key = RuleKey {
            generation,
            ruleset,
            kind,
            id,
        };
        // SAFETY: plain values, only read.
        if let Some(&found) = unsafe { ALLOW.get(key) }
            && first.is_none_or(|first| found.rule < first.rule)
        {
            first = Some(found);
        }
    }
    match first {
        Some(rule) if rule.flags & RULE_FLAG_AUDIT == 0 => (VERDICT_ALLOW, rule.rule),
        Some(rule) => (VERDICT_AUDIT, rule.rule),
        None if settings.mode == MODE_AUDIT => (VERDICT_AUDIT, RULE_DEFAULT),
        None => (VERDICT_DENY, RULE_DEFAULT),
    }
}

/// The rule set of the nearest cgroup, from the task's own up to the root, that has one.
///
/// Walks from the root down and stops below the cgroup itself (where `ancestor` returns 0), so
/// the cost follows its depth, not [`MAX_CGROUP_LEVEL`].
fn nearest_ruleset(generation: u32, ancestor: impl Fn(i32) -> u64) -> u32 {
    let mut ruleset = RULESET_DEFAULT;
    for level in 0..=MAX_CGROUP_LEVEL {
        #[expect(
            clippy::cast_possible_wrap,
            reason = "levels are at most MAX_CGROUP_LEVEL"
        )]
        let cgroup_id = ancestor(level as i32);
        if cgroup_id == 0 {
            break;
        }
        let key = CgroupKey {
            generation,
            _pad: 0,
            cgroup_id,
        };
        // SAFETY: plain values, only read.
        if let Some(&found) = unsafe { CGROUP_RULESETS.get(key) } {
            ruleset = found;
        }
    }
    ruleset
}
