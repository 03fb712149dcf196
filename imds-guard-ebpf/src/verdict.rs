//! The decision: is the destination protected, and if so, may the current task reach it?

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::bpf_get_current_ancestor_cgroup_id,
    },
    programs::SockAddrContext,
};
use imds_guard_common::{
    event::{
        EVENT_FLAG_CONTAINER, FAMILY_INET, FAMILY_INET6, SocketVerdict, VERDICT_ALLOW,
        VERDICT_AUDIT, VERDICT_DENY,
    },
    maps::{COUNTER_ALLOWED, COUNTER_AUDITED, COUNTER_DENIED},
    policy::{
        ALL_CGROUPS_SEEN, CgroupKey, KIND_ANY, KIND_GID, KIND_UID, MAX_CGROUP_LEVEL, MODE_AUDIT,
        RULE_DEFAULT, RULE_FLAG_AUDIT, RULESET_DEFAULT, RULESET_UNSEEN, RuleKey, RuleValue,
        Settings, TASK_CONTAINER,
    },
};

use crate::{
    maps::{ALLOW, CGROUP_RULESETS, SETTINGS, SOCKET_VERDICTS},
    protected::{self, Destination},
    report::{self, Attempt},
    task,
};

const PROCEED: i32 = 1;
const REJECT: i32 = 0;

/// Judges an IPv4 destination.
#[inline]
pub fn judge_v4(ctx: &SockAddrContext, hook: u8) -> i32 {
    // SAFETY: the kernel hands sock_addr programs a valid context.
    let ip4 = unsafe { (*ctx.sock_addr).user_ip4 };
    // Fast path: an unprotected destination costs one array read and a bit test.
    if !protected::v4_may_be_protected(ip4) {
        return PROCEED;
    }
    judge_protected(ctx, hook, FAMILY_INET, Destination::v4(ip4), [ip4, 0, 0, 0])
}

/// Judges an IPv6 destination, treating `::ffff:a.b.c.d` as the IPv4 address it maps to.
#[inline]
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
    // `::` is never protected.
    let Some(destination) = Destination::of_v6(words) else {
        return PROCEED;
    };
    if !destination.may_be_protected() {
        return PROCEED;
    }
    judge_protected(ctx, hook, FAMILY_INET6, destination, words)
}

/// The slow path: the destination may be protected. `addr` is the address as the socket gave
/// it (for the event).
fn judge_protected(
    ctx: &SockAddrContext,
    hook: u8,
    family: u8,
    destination: Destination,
    addr: [u32; 4],
) -> i32 {
    let generation = protected::generation_in_force();
    if !destination.protected_in(generation) {
        return PROCEED;
    }
    let uid_gid = bpf_get_current_uid_gid();
    // Truncation intended: the low half is the uid, the high half the gid.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "splitting a u64 into halves"
    )]
    let (uid, gid) = (uid_gid as u32, (uid_gid >> 32) as u32);
    let task = task::current_kind();
    let Decision {
        verdict,
        rule,
        by_gid,
    } = decide(generation, uid, Some(gid), task, &CurrentCgroup);
    count(generation, verdict, rule);
    // The packet layer judges the socket's packets again by its owner and cgroup, as a host
    // task's, which gives the same for uid and cgroup rules on the host. A gid rule it cannot
    // see, a container it cannot tell, and an audited attempt it would report again: those
    // verdicts are remembered on the socket. (Only those: creating socket storage costs more
    // than the rest of this program.)
    if by_gid || verdict == VERDICT_AUDIT || (task == TASK_CONTAINER && verdict == VERDICT_ALLOW) {
        remember(ctx, destination, verdict);
    }
    if verdict == VERDICT_ALLOW {
        return PROCEED;
    }
    // SAFETY: the kernel hands sock_addr programs a valid context.
    let (port, protocol) = unsafe { ((*ctx.sock_addr).user_port, (*ctx.sock_addr).protocol) };
    // The process id: the high half.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
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
            addr: protected::bytes_of(addr),
            flags: if task == TASK_CONTAINER {
                EVENT_FLAG_CONTAINER
            } else {
                0
            },
        },
        report::current_cgroup_id(),
        tgid,
        report::Identity::current_task,
    );
    if verdict == VERDICT_DENY {
        REJECT
    } else {
        PROCEED
    }
}

/// Records on the socket that the task was let through to `destination` (allowed by a gid rule,
/// or audited), so that the packet layer passes the packets that follow without judging them by
/// the socket's owner. A failure (no memory) only means the packets are judged there.
fn remember(ctx: &SockAddrContext, destination: Destination, verdict: u8) {
    let (family, addr) = destination.words();
    let mut value = SocketVerdict {
        addr,
        family,
        verdict,
        _pad: [0; 2],
    };
    // SAFETY: the helper checks the socket; the pointer it returns, if not null, is this
    // socket's storage, valid while the program runs.
    unsafe {
        let stored = SOCKET_VERDICTS.get_or_insert_ptr_mut(ctx, Some(&mut value));
        if !stored.is_null() {
            *stored = value;
        }
    }
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

/// Returns the verdict and the deciding rule for `uid`/`gid` (no gid: gid rules cannot match),
/// a task of kind `task` (`TASK_HOST` or `TASK_CONTAINER`), in `cgroup`.
///
/// Of the rules that match (by uid, by gid, or any task of the rule set), the one with the lowest
/// id decides: the first in the config file, as the agent's `explain` says. With none, the
/// generation's mode decides. If the settings cannot be read (they always can: the agent writes
/// them before attaching), the task is judged as in enforce mode, in a cgroup the agent has not
/// seen: fail closed.
pub fn decide(
    generation: u32,
    uid: u32,
    gid: Option<u32>,
    task: u16,
    cgroup: &impl Cgroup,
) -> Decision {
    let settings = SETTINGS.get(generation).copied().unwrap_or(Settings {
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
        nearest_ruleset(generation, settings.entry_levels, cgroup)
    };
    // Three lookups written out, not a loop over an array of (kind, id, asked): LLVM spilled
    // that array's padding as an uninitialised register, which the verifier refuses
    // ("R3 !read_ok").
    let lookup = |kind: u16, id: u32| {
        let key = RuleKey {
            generation,
            ruleset,
            kind,
            task,
            id,
        };
        // SAFETY: plain values, only read.
        unsafe { ALLOW.get(key) }.copied()
    };
    let mut first: Option<(RuleValue, u16)> = lookup(KIND_UID, uid).map(|found| (found, KIND_UID));
    if let Some(gid) = gid
        && let Some(found) = lookup(KIND_GID, gid)
        && first.is_none_or(|(first, _)| found.rule < first.rule)
    {
        first = Some((found, KIND_GID));
    }
    if let Some(found) = lookup(KIND_ANY, 0)
        && first.is_none_or(|(first, _)| found.rule < first.rule)
    {
        first = Some((found, KIND_ANY));
    }
    let (verdict, rule) = match first {
        Some((rule, _)) if rule.flags & RULE_FLAG_AUDIT == 0 => (VERDICT_ALLOW, rule.rule),
        Some((rule, _)) => (VERDICT_AUDIT, rule.rule),
        None if settings.mode == MODE_AUDIT => (VERDICT_AUDIT, RULE_DEFAULT),
        None => (VERDICT_DENY, RULE_DEFAULT),
    };
    Decision {
        verdict,
        rule,
        by_gid: first.is_some_and(|(_, kind)| kind == KIND_GID),
    }
}

/// What [`decide`] found.
pub struct Decision {
    /// `VERDICT_*`.
    pub verdict: u8,
    /// The deciding rule, or `RULE_DEFAULT`.
    pub rule: u32,
    /// A gid rule decided: the packet layer, which knows no gid, could not decide the same.
    pub by_gid: bool,
}

/// The cgroup an attempt is judged in: its own id and its ancestors'.
pub trait Cgroup {
    /// Its id.
    fn own(&self) -> u64;
    /// The id of its ancestor at `level` (the root is level 0); 0 below the cgroup itself.
    fn ancestor(&self, level: u32) -> u64;
}

/// The rule set of the nearest cgroup, from the task's own up to the root, that has one.
///
/// Looks only at the levels where some cgroup has an entry (`entry_levels`, from the settings),
/// from the shallowest down, and stops below the cgroup itself (where `ancestor` returns 0): a
/// host without containers or cgroup rules costs no lookup at all, and one whose entries are
/// all containers' (one level) costs one.
fn nearest_ruleset(generation: u32, entry_levels: u64, cgroup: &impl Cgroup) -> u32 {
    // Truncation intended: the halves of one word.
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

/// The current task's cgroup, for the socket address hooks.
pub struct CurrentCgroup;

impl Cgroup for CurrentCgroup {
    fn own(&self) -> u64 {
        report::current_cgroup_id()
    }

    fn ancestor(&self, level: u32) -> u64 {
        #[expect(
            clippy::cast_possible_wrap,
            reason = "levels are at most MAX_CGROUP_LEVEL"
        )]
        // SAFETY: a helper without pointer arguments (Linux 5.7+ for sock_addr programs).
        unsafe {
            bpf_get_current_ancestor_cgroup_id(level as i32)
        }
    }
}
