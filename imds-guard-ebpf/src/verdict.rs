//! The socket address hooks' judgement: is the destination protected, and if so, may the
//! current task reach it? The decision itself is `imds_guard_common::decide`, on the maps.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_current_ancestor_cgroup_id},
    programs::SockAddrContext,
};
use imds_guard_common::{
    decide::{Cgroup, Decision, PolicyMaps, decide},
    event::{
        EVENT_FLAG_CONTAINER, FAMILY_INET, FAMILY_INET6, HOOK_CONNECT4, HOOK_CONNECT6,
        HOOK_SENDMSG4, HOOK_SENDMSG6, JUDGED_GID, JUDGED_UID, SocketVerdict, VERDICT_ALLOW,
        VERDICT_AUDIT, VERDICT_DENY,
    },
    http::HTTP_PORT,
    policy::{CgroupKey, RuleKey, RuleValue, Settings, TASK_CONTAINER},
};

use crate::{
    http,
    maps::{self, ALLOW, CGROUP_RULESETS, SETTINGS, SOCKET_VERDICTS},
    protected::{self, Destination},
    record::{self, Decided},
    task,
};

/// `IPPROTO_TCP`.
const IPPROTO_TCP: u32 = 6;

const PROCEED: i32 = 1;
const REJECT: i32 = 0;

/// Judges an IPv4 destination. Inlined into each entry point, so that the fast path costs
/// no call.
#[inline(always)]
pub fn judge_v4(ctx: &SockAddrContext, hook: u8) -> i32 {
    // SAFETY: the kernel hands sock_addr programs a valid context.
    let ip4 = unsafe { (*ctx.sock_addr).user_ip4 };
    // Fast path: an unprotected destination costs one array read and a bit test.
    if !protected::v4_may_be_protected(ip4) {
        return PROCEED;
    }
    let mut report = MaybeUninit::uninit();
    let outcome = judge_protected(ctx, hook, FAMILY_INET, Destination::v4(ip4), &mut report);
    reported(ctx, outcome, &report, [ip4, 0, 0, 0])
}

/// Judges an IPv6 destination, treating `::ffff:a.b.c.d` as the IPv4 address it maps to.
/// Inlined into each entry point (`connect6`, `sendmsg6`): shared by two, LLVM made it a
/// function of its own, and the fast path a call.
#[inline(always)]
pub fn judge_v6(ctx: &SockAddrContext, hook: u8) -> i32 {
    // The verifier only allows `user_ip6` to be read one aligned 32-bit word at a time
    // ("invalid bpf_context access" otherwise), so each word is a separate volatile read that
    // the compiler cannot merge into a 64-bit load. Each is two loads (the context's pointer to
    // the address, then the word).
    let ip6 = {
        // SAFETY: the kernel hands sock_addr programs a valid context.
        let ip6 = unsafe { &raw const (*ctx.sock_addr).user_ip6 };
        move |word: usize| {
            // SAFETY: one of the four words, read alone as the verifier requires.
            unsafe { core::ptr::read_volatile(ip6.cast::<u32>().add(word)) }
        }
    };
    // Fast path: the last word alone rules out almost every destination, mapped or not.
    let last = ip6(3);
    if !protected::v6_socket_address_may_be_protected(last) {
        return PROCEED;
    }
    let words = [ip6(0), ip6(1), ip6(2), last];
    // `::` is never protected.
    let Some(destination) = Destination::of_v6(words) else {
        return PROCEED;
    };
    if !destination.may_be_protected() {
        return PROCEED;
    }
    let mut report = MaybeUninit::uninit();
    let outcome = judge_protected(ctx, hook, FAMILY_INET6, destination, &mut report);
    reported(ctx, outcome, &report, words)
}

/// [`judge_protected`]'s outcome: it asked for `report` to be reported
/// ([`sock_addr_event`], called from here, the entry point: from inside `judge_protected`
/// the three frames' stacks together passed the verifier's 512 bytes).
const REPORT: i32 = 2;

/// The verdict of `outcome`, once the attempt (to `addr`, as the socket gave it) is reported
/// when it says so.
#[inline(always)]
fn reported(
    ctx: &SockAddrContext,
    outcome: i32,
    report: &MaybeUninit<[u64; 2]>,
    addr: [u32; 4],
) -> i32 {
    if outcome & REPORT != 0 {
        // SAFETY: `judge_protected` wrote the report when it said to report it. (Left
        // uninitialised otherwise: zeroing it became a call to a byte-by-byte `memset` on
        // every attempt to a protected address.)
        let [decided, ids] = unsafe { report.assume_init_read() };
        let [low, high] = record::address_words(addr);
        // SAFETY: the program's own context.
        unsafe { sock_addr_event(ctx.sock_addr, decided, ids, low, high) };
    }
    outcome & !REPORT
}

/// The slow path: the destination may be protected. One function for all four hooks. Returns
/// the verdict, with [`REPORT`] when the attempt is to be reported as `report` says
/// ([`Decided::words`]).
#[inline(never)]
fn judge_protected(
    ctx: &SockAddrContext,
    hook: u8,
    family: u8,
    destination: Destination,
    report: &mut MaybeUninit<[u64; 2]>,
) -> i32 {
    let generation = protected::generation_in_force();
    if !destination.protected_in(generation) {
        return PROCEED;
    }
    // The kind of task and its uid, as one value the verifier explores once (see
    // `current_task_kind`). The gid only where it is asked for: by the decision where a rule
    // set has gid rules, and below for what is remembered or reported.
    let facts = task::current_task_kind();
    let (task, uid) = (task::kind_of(facts), task::uid_of(facts));
    let Decision {
        verdict,
        rule,
        by_gid,
        rule_flags,
        ..
    } = decide(
        &KernelMaps,
        generation,
        Some(uid),
        || Some(task::current_gid()),
        task,
        &CurrentCgroup,
    );
    // SAFETY: the kernel hands sock_addr programs a valid context.
    let (port, protocol) = unsafe { ((*ctx.sock_addr).user_port, (*ctx.sock_addr).protocol) };
    // Truncation intended: the port is the low 16 bits, in network byte order.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the port is the low 16 bits"
    )]
    let port = u16::from_be(port as u16);
    let tcp_connect = (hook == HOOK_CONNECT4 || hook == HOOK_CONNECT6) && protocol == IPPROTO_TCP;
    // A rule that judges requests admits TCP to a protected address on the HTTP port alone, where
    // the message layer follows the connection: on another, a NAT in the workload's own network
    // namespace could take it to the HTTP port unread.
    let verdict = if verdict != VERDICT_DENY
        && tcp_connect
        && port != HTTP_PORT
        && http::refuses_requests_of(rule_flags)
    {
        VERDICT_DENY
    } else {
        verdict
    };
    record::count_attempt(generation, rule, verdict);
    // The packet layer judges the socket's packets again by its owner and cgroup, as a host
    // task's, which gives the same for uid and cgroup rules on the host. A gid rule it cannot
    // see, a container it cannot tell, an audited attempt it would report again, a task whose
    // sockets another uid owns (its file system uid, which `seteuid` sets: root that dropped
    // its effective uid is still root here, but not there), and a datagram sent with an
    // address on a socket connected elsewhere (there, a destination that is not the socket's
    // peer, which it would judge and count as a new attempt): those verdicts are remembered on
    // the socket. (Only those: creating socket storage costs more than the rest of this
    // program.)
    if by_gid
        || verdict == VERDICT_AUDIT
        || (verdict == VERDICT_ALLOW
            && (task == TASK_CONTAINER
                || task::owns_sockets_as_another(facts)
                || sent_on_connected_socket(ctx, hook)))
    {
        remember(
            ctx,
            destination,
            SocketVerdict {
                epoch: epoch_of(generation),
                uid,
                gid: task::current_gid(),
                verdict,
                task: SocketVerdict::task_byte(task),
                known: JUDGED_UID | JUDGED_GID,
                ..SocketVerdict::default()
            },
        );
    }
    if verdict != VERDICT_DENY && tcp_connect && port == HTTP_PORT {
        http::follow(ctx, generation, verdict, rule, rule_flags, task);
    }
    if verdict == VERDICT_ALLOW {
        return PROCEED;
    }
    report.write(
        Decided {
            verdict,
            rule,
            // `generation` is 0 or 1, so this cannot truncate.
            generation: u8::from(generation != 0),
            hook,
            family,
            flags: if task == TASK_CONTAINER {
                EVENT_FLAG_CONTAINER
            } else {
                0
            },
            uid,
            gid: task::current_gid(),
        }
        .words(),
    );
    REPORT
        | if verdict == VERDICT_DENY {
            REJECT
        } else {
            PROCEED
        }
}

/// `TCP_ESTABLISHED`: a UDP socket's state once connected.
const TCP_ESTABLISHED: u32 = 1;

/// Whether `hook` is a `sendmsg` hook judging a datagram sent with an address on a connected
/// socket (to another destination: a send to the peer's own address is no attempt of its own to
/// the packet layer).
#[inline(always)]
fn sent_on_connected_socket(ctx: &SockAddrContext, hook: u8) -> bool {
    (hook == HOOK_SENDMSG4 || hook == HOOK_SENDMSG6)
        // SAFETY: the kernel hands sock_addr programs a valid context and its socket.
        && unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).state } == TCP_ESTABLISHED
}

/// Reports the attempt judged as `decided` and `ids` say ([`Decided::words`]), to the address
/// `low` and `high` say ([`record::address_words`]), reading its port and protocol from the
/// context again. A global function, which the verifier
/// checks once on its own: inlined, the event's code was checked again for each way the
/// decision before it could end (two thirds of what each socket hook cost it). (It cannot read
/// the address itself: the verifier refuses `user_ip4` to an IPv6 hook's program, whatever the
/// path.)
///
/// # Safety
/// `ctx` is the running `sock_addr` program's context.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn sock_addr_event(
    ctx: *mut bpf_sock_addr,
    decided: u64,
    ids: u64,
    low: u64,
    high: u64,
) -> u64 {
    // SAFETY: as the caller promises.
    let (port, protocol) = unsafe { ((*ctx).user_port, (*ctx).protocol) };
    // Truncation intended: the port is the low 16 bits, in network byte order.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the port and IPPROTO_* values are the low bits"
    )]
    let (port, protocol) = (u16::from_be(port as u16), protocol as u8);
    // The process id: the high half.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    record::event(
        &Decided::of_words([decided, ids]).attempt(
            record::address_of_words([low, high]),
            port,
            protocol,
        ),
        record::current_cgroup_id(),
        tgid,
        record::Identity::current_task,
        None,
    );
    0
}

/// Records on the socket that the task was let through to `destination` (allowed by a gid rule,
/// or audited), so that the packet layer passes the packets that follow without judging them by
/// the socket's owner while the policy that judged it is in force, and judges them for the
/// identity `judged` names under the next. A failure (no memory) only means the packets are
/// judged there.
fn remember(ctx: &SockAddrContext, destination: Destination, judged: SocketVerdict) {
    let (family, addr) = destination.words();
    // SAFETY: the helper checks the socket; the pointer it returns, if not null, is this
    // socket's storage (zeroed when new), valid while the program runs.
    unsafe {
        let stored = SOCKET_VERDICTS.get_or_insert_ptr_mut(ctx, None);
        if !stored.is_null() {
            maps::store_socket_verdict(
                stored,
                SocketVerdict {
                    addr,
                    family,
                    ..judged
                },
            );
        }
    }
}

/// `Settings::epoch` of `generation`: 0, which is no policy's, were its settings missing (a
/// verdict remembered with it is decided again at the next packet).
#[inline]
pub fn epoch_of(generation: u32) -> u32 {
    SETTINGS
        .get(generation)
        .map_or(0, |settings| settings.epoch)
}

/// The kernel's maps, as the decision reads them.
pub struct KernelMaps;

impl PolicyMaps for KernelMaps {
    #[inline]
    fn settings(&self, generation: u32) -> Option<Settings> {
        SETTINGS.get(generation).copied()
    }

    #[inline]
    fn cgroup_ruleset(&self, key: CgroupKey) -> Option<u32> {
        // SAFETY: plain values, only read.
        unsafe { CGROUP_RULESETS.get(key) }.copied()
    }

    #[inline]
    fn rule(&self, key: RuleKey) -> Option<RuleValue> {
        // SAFETY: plain values, only read.
        unsafe { ALLOW.get(key) }.copied()
    }

    #[inline]
    fn host_uid_rule(&self, generation: u32, uid: u32) -> Option<RuleValue> {
        SETTINGS
            .get(generation)
            .and_then(|settings| settings.host_uid_rule(uid))
    }
}

/// The current task's cgroup, for the socket address hooks.
pub struct CurrentCgroup;

impl Cgroup for CurrentCgroup {
    fn own(&self) -> u64 {
        record::current_cgroup_id()
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
