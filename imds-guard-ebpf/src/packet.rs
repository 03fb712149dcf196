//! The packet layer, on `cgroup_skb/egress`: every packet to a protected address is judged,
//! whatever its socket. The socket hooks see the address a task gives; a packet can still reach
//! a protected address around them: a raw socket writes its own header, NAT in the workload's
//! network namespace rewrites the destination after the hooks (`DNAT` on `OUTPUT`: this hook
//! runs after it, in `ip_finish_output`), and some protocols have no socket address hook at all
//! (ICMP echo sockets, connected UDP-Lite, SCTP).
//!
//! A packet passes when its socket was let through to that very destination by a gid rule, a
//! container rule or in audit mode (remembered in `SOCKET_VERDICTS`: a packet knows no gid nor
//! its sender's namespaces, and an audited attempt is reported once) by the policy in force, or
//! when the policy allows the socket's owner in the socket's cgroup (as uid and cgroup rules
//! allowed its connect). A verdict remembered under an earlier policy is decided again, for
//! the identity remembered with it. Otherwise it is dropped
//! (the sender gets `EPERM` where it sends in process context) and reported: once for a
//! connected socket other than UDP's (its packets are one attempt, as its connect is), each
//! packet for a UDP or UDP-Lite socket, connected or not, and for an unconnected one (as each
//! datagram is).
//!
//! Packets to unprotected destinations cost one read of the destination from the packet and a
//! bit test in `PROTECTED_FILTER` ([`certainly_unprotected`]): no helper call, no hash lookup.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock},
    helpers::generated::{
        bpf_get_socket_uid, bpf_sk_fullsock, bpf_sk_storage_get, bpf_skb_ancestor_cgroup_id,
        bpf_skb_cgroup_id,
    },
    programs::SkBuffContext,
};
use imds_guard_common::{
    decide::{Cgroup, Decision, decide},
    event::{
        EVENT_FLAG_CONTAINER, EVENT_FLAG_REWRITTEN, EVENT_FLAG_UID_IGNORED, FAMILY_INET6,
        HOOK_EGRESS, JUDGED_GID, JUDGED_REWRITTEN, JUDGED_UID, SocketVerdict, VERDICT_ALLOW,
        VERDICT_DENY,
    },
    http::HTTP_PORT,
    policy::{TASK_CONTAINER, TASK_HOST},
};

use crate::{
    http,
    maps::{self, SOCKET_VERDICTS},
    protected::{self, Destination},
    record::{self, Decided, Identity},
    task, verdict,
};

/// `cgroup_skb` programs return 1 to let the packet go and 0 to drop it (`EPERM` to a sender
/// in process context).
const PASS: i32 = 1;
const DROP: i32 = 0;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `BPF_SK_STORAGE_GET_F_CREATE`.
const STORAGE_CREATE: u64 = 1;

/// What the packet layer reads of a packet's IP header.
struct Packet {
    destination: Destination,
    /// The IPv4 protocol or the IPv6 next header (extension headers are not followed).
    protocol: u8,
    /// Offset of the transport header.
    transport: usize,
}

/// Judges one outgoing packet.
///
/// The entry point holds the fast path alone, everything else is [`judge_closer`]'s: the
/// image every packet runs is ~200 bytes whatever the slow path becomes (with the rest
/// inlined it was 1 KiB, and every return jumped to the epilogue at its end). What the fast
/// path costs is decided mostly by where the kernel puts that image (BENCHMARKS.md, table 0b).
#[inline(always)]
pub fn judge_egress(ctx: &SkBuffContext) -> i32 {
    if certainly_unprotected(ctx) {
        return PASS;
    }
    judge_closer(ctx)
}

/// Judges a packet whose destination the filter did not rule out.
#[inline(never)]
fn judge_closer(ctx: &SkBuffContext) -> i32 {
    let Some(packet) = Packet::read(ctx) else {
        // Not IPv4 or IPv6, or too short to hold a destination: the kernel sends it nowhere.
        return PASS;
    };
    if !packet.destination.may_be_protected() {
        return PASS;
    }
    let mut report = MaybeUninit::uninit();
    let outcome = judge_protected(ctx, &packet, &mut report);
    if outcome & REPORT != 0 {
        // SAFETY: `judge_protected` wrote the report when it said to report it.
        let [decided, ids, cgroup_id] = unsafe { report.assume_init_read() };
        // SAFETY: the program's own context.
        unsafe { packet_event(ctx.skb.skb, decided, ids, cgroup_id) };
    }
    outcome & !REPORT
}

/// [`judge_protected`]'s outcome: it asked for `report` to be reported ([`packet_event`],
/// called from [`judge_closer`]: from inside `judge_protected`, the frames' stacks passed the
/// verifier's 512 bytes).
const REPORT: i32 = 2;

/// The fast path, for (almost) every packet: the destination read straight from the linear
/// header and ruled out by the filter, nothing else read or kept. `false` means "look closer"
/// (a destination the filter does not rule out, or a header this cannot read directly).
#[inline(always)]
fn certainly_unprotected(ctx: &SkBuffContext) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: the kernel hands cgroup_skb programs a valid context; the verifier turns these
    // two fields into packet pointers, and every read below is within a checked bound.
    unsafe {
        let (data, end) = ((*skb).data as usize, (*skb).data_end as usize);
        if data + 20 > end {
            return false;
        }
        match *(data as *const u8) >> 4 {
            4 => !protected::v4_may_be_protected(*((data + 16) as *const u32)),
            6 if data + 40 <= end => !protected::v6_may_be_protected([
                *((data + 24) as *const u32),
                *((data + 28) as *const u32),
                *((data + 32) as *const u32),
                *((data + 36) as *const u32),
            ]),
            _ => false,
        }
    }
}

impl Packet {
    /// Whether the packet may carry TCP: its protocol is TCP, or it is IPv6 and its next header
    /// is one this does not follow (extension headers, which any socket can add: `IPV6_DSTOPTS`,
    /// `IPV6_HOPOPTS`; or ESP and AH), so TCP may come after it.
    #[inline(always)]
    fn may_carry_tcp(&self) -> bool {
        self.protocol == IPPROTO_TCP
            || (self.destination.words().0 == FAMILY_INET6
                && matches!(
                    self.protocol,
                    0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
                ))
    }

    /// What an event reports of the packet: its destination address (as [`Destination`]'s
    /// words), protocol and destination port, read as [`Packet::read`] reads the header. The
    /// address is the one judged a moment before (nothing changes the packet while the program
    /// runs), read again rather than passed to the event function, whose arguments carry the
    /// cgroup id instead (a helper call fewer). A header that cannot be read now (it was, by
    /// the judgement) is reported without what could not be (0). Only what the event needs,
    /// inlined: [`Packet::read`]'s frame on top of the event's was the deepest stack of the
    /// packet program, at the verifier's 512 bytes.
    #[inline(always)]
    fn reported(ctx: &SkBuffContext) -> ([u32; 4], u8, u16) {
        // The destination port, big-endian, two bytes into each of these headers.
        let has_port = |protocol| {
            matches!(
                protocol,
                IPPROTO_TCP | IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP
            )
        };
        // The usual headers (IPv4 without options, IPv6), linear up to the port: read in place.
        if let Some(header) = Linear::<24>::of(ctx) {
            let first = header.byte(0);
            if first == 0x45 {
                let protocol = header.byte(9);
                let port = if has_port(protocol) {
                    header.port(22)
                } else {
                    0
                };
                return ([header.word(16), 0, 0, 0], protocol, port);
            }
            if first >> 4 == 6
                && let Some(header) = Linear::<44>::of(ctx)
            {
                let protocol = header.byte(6);
                let port = if has_port(protocol) {
                    header.port(42)
                } else {
                    0
                };
                let addr = [24, 28, 32, 36].map(|at| header.word(at));
                return (addr, protocol, port);
            }
        }
        let Ok(first) = ctx.load::<u8>(0) else {
            return ([0; 4], 0, 0);
        };
        let (addr, at, transport) = match first >> 4 {
            4 => (
                [ctx.load::<u32>(16).unwrap_or(0), 0, 0, 0],
                9,
                usize::from(first & 0x0f) * 4,
            ),
            6 => (
                [24, 28, 32, 36].map(|at| ctx.load::<u32>(at).unwrap_or(0)),
                6,
                40,
            ),
            _ => return ([0; 4], 0, 0),
        };
        let Ok(protocol) = ctx.load::<u8>(at) else {
            return (addr, 0, 0);
        };
        let port = if has_port(protocol) {
            ctx.load::<u16>(transport + 2).map_or(0, u16::from_be)
        } else {
            0
        };
        (addr, protocol, port)
    }

    /// The header fields: read in place from the linear header where it holds them (as the
    /// fast path reads the destination), else through `bpf_skb_load_bytes` (a header split
    /// over fragments). The slow path only, for destinations the filter did not rule out.
    #[inline(always)]
    fn read(ctx: &SkBuffContext) -> Option<Self> {
        if let Some(header) = Linear::<20>::of(ctx) {
            let first = header.byte(0);
            match first >> 4 {
                4 => return Some(Self::v4(first, header.word(16), header.byte(9))),
                6 => {
                    if let Some(header) = Linear::<40>::of(ctx) {
                        let destination = [24, 28, 32, 36].map(|at| header.word(at));
                        return Some(Self::v6(destination, header.byte(6)));
                    }
                }
                _ => return None,
            }
        }
        Self::read_through_helper(ctx)
    }

    /// [`Packet::read`] through `bpf_skb_load_bytes`, for a header the linear part does not
    /// hold whole (or a packet shorter than an IPv6 header). The output path builds the IP
    /// header linear, so the local stack's packets do not come here; one that did would still
    /// be judged, not passed unread.
    fn read_through_helper(ctx: &SkBuffContext) -> Option<Self> {
        let first: u8 = ctx.load(0).ok()?;
        match first >> 4 {
            4 => Some(Self::v4(first, ctx.load(16).ok()?, ctx.load(9).ok()?)),
            6 => Some(Self::v6(
                [
                    ctx.load(24).ok()?,
                    ctx.load(28).ok()?,
                    ctx.load(32).ok()?,
                    ctx.load(36).ok()?,
                ],
                ctx.load(6).ok()?,
            )),
            _ => None,
        }
    }

    /// An IPv4 packet whose header begins with `first` (version and length).
    #[inline(always)]
    fn v4(first: u8, destination: u32, protocol: u8) -> Self {
        Self {
            destination: Destination::v4(destination),
            protocol,
            transport: usize::from(first & 0x0f) * 4,
        }
    }

    /// An IPv6 packet (its next header is `protocol`: extension headers are not followed).
    #[inline(always)]
    fn v6(destination: [u32; 4], protocol: u8) -> Self {
        Self {
            destination: Destination::v6(destination),
            protocol,
            transport: 40,
        }
    }
}

/// The first `N` bytes of a packet, when its linear part holds them: read with plain loads at
/// constant offsets, each within the one bound the verifier checked (`data + N <= data_end`).
/// A `bpf_skb_load_bytes` call and its copy cost some 20 ns a field on the AMD machine of
/// BENCHMARKS.md (history: "the header read in place"); a load, about one.
#[derive(Clone, Copy)]
pub struct Linear<const N: usize> {
    data: usize,
}

impl<const N: usize> Linear<N> {
    /// `None` when the linear part is shorter than `N` bytes.
    #[inline(always)]
    pub fn of(ctx: &SkBuffContext) -> Option<Self> {
        // SAFETY: the kernel hands cgroup_skb programs a valid context; the verifier turns
        // these two fields into packet pointers.
        let (data, end) = unsafe {
            let skb = ctx.skb.skb;
            ((*skb).data as usize, (*skb).data_end as usize)
        };
        (data + N <= end).then_some(Self { data })
    }

    #[inline(always)]
    fn byte(self, at: usize) -> u8 {
        debug_assert!(at < N);
        // SAFETY: within the first `N` bytes, which `of` checked (the callers' offsets are
        // constants the verifier checks against that bound).
        unsafe { *((self.data + at) as *const u8) }
    }

    /// A 32-bit word as it lies in the packet (network byte order), at a multiple of 4.
    #[inline(always)]
    pub fn word(self, at: usize) -> u32 {
        debug_assert!(at + 4 <= N && at.is_multiple_of(4));
        // SAFETY: as for `byte`. Aligned: the output path starts the IP header on a 4-byte
        // boundary (the fast path reads the destination so too), and the x86-64 and arm64
        // JITs need no alignment of packet loads.
        unsafe { *((self.data + at) as *const u32) }
    }

    /// A 16-bit word as it lies in the packet (network byte order), at an even offset.
    #[inline(always)]
    pub fn half(self, at: usize) -> u16 {
        debug_assert!(at + 2 <= N && at.is_multiple_of(2));
        // SAFETY: as for `word`.
        unsafe { *((self.data + at) as *const u16) }
    }

    /// A big-endian port at an even offset, in host byte order.
    #[inline(always)]
    fn port(self, at: usize) -> u16 {
        u16::from_be(self.half(at))
    }
}

/// The slow path: the destination may be protected. A function of its own, so that
/// [`judge_closer`]'s frame stays small: the deepest stack is the entry point's, `judge_closer`'s,
/// this one's and its calls' (416 bytes as Linux 5.10 counts them, of 512). Returns the
/// verdict, with [`REPORT`] when the packet is to be reported as `report` says
/// ([`Decided::words`], then the socket's cgroup id).
#[inline(never)]
fn judge_protected(
    ctx: &SkBuffContext,
    packet: &Packet,
    report: &mut MaybeUninit<[u64; 3]>,
) -> i32 {
    let generation = protected::generation_in_force();
    if !packet.destination.protected_in(generation) {
        return PASS;
    }
    let skb = ctx.skb.skb;
    let socket = full_socket(ctx);
    // SAFETY: a full socket from `bpf_sk_fullsock`, or null.
    let facts = unsafe { SocketFacts::of(socket) };
    // Bytes the message layer never read, where the rule judges requests: fail closed.
    let followed = followed_by_message_layer(ctx, socket, &facts, packet);
    if followed == http::UNREAD {
        return DROP;
    }
    let (family, addr) = packet.destination.words();
    let rewritten = facts.connected && !facts.peer.same(packet.destination);
    // A TCP socket's packet, or one that may carry TCP (see `may_carry_tcp`).
    let tcp = facts.protocol == u32::from(IPPROTO_TCP) || packet.may_carry_tcp();
    let unjudged_tcp = tcp && facts.unjudged_tcp(rewritten, followed);
    // SAFETY: a full socket from `bpf_sk_fullsock`, or null.
    let remembered = unsafe {
        remembered(
            socket,
            packet.destination,
            generation,
            tcp.then_some(rewritten),
            unjudged_tcp,
        )
    };
    let mut judged = match remembered {
        Ok(judged) => judged,
        Err(verdict) => return verdict,
    };
    // SAFETY: helpers on the valid context (Linux 4.5+, 4.18+, 4.19+); they use the full
    // socket behind a request socket.
    let (uid, cgroup_id) = unsafe { (bpf_get_socket_uid(skb), bpf_skb_cgroup_id(skb)) };
    if !judged.again {
        let (task, uid_known) = judged_as(&facts, rewritten, uid, cgroup_id);
        judged = Judged {
            task,
            uid_known,
            uid,
            ..Judged::NOBODY
        };
    }
    // What the paths above found, as values the verifier explores once from here on (see
    // `opaque_found`); the decision and the record after it are the heaviest part of the
    // program.
    let Found {
        judged,
        seen_by_hooks,
        rewritten,
        remember,
        unjudged_tcp,
        followed,
    } = opaque_found(
        ctx,
        Found {
            judged,
            seen_by_hooks: facts.seen_by_hooks,
            rewritten,
            remember: facts.remember(),
            unjudged_tcp,
            followed: followed & http::FOLLOWED != 0,
        },
    );
    let Decision { verdict, rule, .. } = judged.decide(
        generation,
        &SocketCgroup { skb, id: cgroup_id },
        unjudged_tcp,
    );
    if verdict == VERDICT_DENY && followed {
        // Its next write fails at once (the client reconnects), rather than waiting on a
        // segment that is dropped.
        // SAFETY: a full socket from `bpf_sk_fullsock`.
        unsafe { http::refuse(socket) };
    }
    // Built where it is kept (the policy's epoch is one more lookup).
    let value = || judged.remembered(addr, family, verdict, generation, rewritten);
    if judged.again {
        // SAFETY: as above.
        unsafe { keep(socket, value()) };
        if verdict == judged.previous {
            // The same verdict for the same identity: not a new attempt.
            return if verdict == VERDICT_DENY { DROP } else { PASS };
        }
    } else {
        if verdict == VERDICT_ALLOW && seen_by_hooks && !rewritten {
            // A TCP or UDP socket's packet to the destination a socket hook judged (and
            // counted): the same verdict again is not a new attempt. Judged again at its next
            // packet, which is cheaper than creating socket storage for it.
            return PASS;
        }
        if remember {
            // A connected socket's packets are one attempt, as its connect is: its later
            // packets (retransmissions, the rest of the flow, one a timer sends) get this verdict
            // uncounted and unreported. A datagram socket's are each an attempt, as for
            // `sendmsg4/6`, each judged as its sender's (storage for them cost a new socket's
            // first datagram four times the rest of this program).
            // SAFETY: as above.
            unsafe { keep(socket, value()) };
        }
    }
    record::count_attempt(generation, rule, verdict);
    if verdict == VERDICT_ALLOW {
        return PASS;
    }
    let [decided, ids] = Decided {
        verdict,
        rule,
        // `generation` is 0 or 1.
        generation: u8::from(generation != 0),
        hook: HOOK_EGRESS,
        family,
        flags: event_flags(rewritten, judged.task, judged.uid_known),
        uid: judged.uid,
        gid: if judged.gid_known {
            judged.gid
        } else {
            u32::MAX
        },
    }
    .words();
    report.write([decided, ids, cgroup_id]);
    REPORT | if verdict == VERDICT_DENY { DROP } else { PASS }
}

/// Whether the message layer follows the packet's socket (`socket`, a full socket or null, of
/// which `facts` tell), as `http::carries_unread_bytes` says: which sockets it follows, their
/// storage says (whatever the packet's next header claims). It follows TCP sockets only:
/// `http::follow` makes the storage in the connect hooks, for a socket whose protocol is TCP
/// (`tcp_connect` in `verdict::judge_protected`; an MPTCP connection's subflows are such
/// sockets, and raw sockets reach no connect hook), so another's storage is not looked up.
#[inline(always)]
fn followed_by_message_layer(
    ctx: &SkBuffContext,
    socket: *mut bpf_sock,
    facts: &SocketFacts,
    packet: &Packet,
) -> u32 {
    if socket.is_null() || facts.protocol != u32::from(IPPROTO_TCP) {
        return http::NOT_FOLLOWED;
    }
    let tcp_at = (packet.protocol == IPPROTO_TCP).then_some(packet.transport);
    // SAFETY: a full socket from `bpf_sk_fullsock`, not null.
    unsafe { http::carries_unread_bytes(ctx, socket, tcp_at) }
}

/// The packet's full socket, or null: none, or a request socket (a listener's SYN-ACK).
#[inline(always)]
fn full_socket(ctx: &SkBuffContext) -> *mut bpf_sock {
    // SAFETY: the kernel hands cgroup_skb programs a valid context; `sk` may be null (then the
    // helper returns null), and is a request socket for a listener's SYN-ACK (null too).
    unsafe {
        let sk = (*ctx.skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            core::ptr::null_mut()
        } else {
            bpf_sk_fullsock(sk)
        }
    }
}

/// `EVENT_FLAG_*` of a packet's event.
#[inline(always)]
fn event_flags(rewritten: bool, task: u16, uid_known: bool) -> u8 {
    (if rewritten { EVENT_FLAG_REWRITTEN } else { 0 })
        | if task == TASK_CONTAINER {
            EVENT_FLAG_CONTAINER
        } else {
            0
        }
        | if uid_known { 0 } else { EVENT_FLAG_UID_IGNORED }
}

/// Keeps `value` as the socket's remembered verdict. A failure (no memory) only means its
/// packets are judged again.
///
/// # Safety
/// `socket` is null or a full socket returned by `bpf_sk_fullsock`.
#[inline(always)]
unsafe fn keep(socket: *mut bpf_sock, value: SocketVerdict) {
    // SAFETY: as the caller promises.
    if let Some(stored) = unsafe { socket_verdict(socket, true) } {
        // SAFETY: the socket's storage, valid while the program runs.
        unsafe { maps::store_socket_verdict(stored, value) };
    }
}

/// Reports the packet judged as `decided` and `ids` say ([`Decided::words`]), from a socket in
/// `cgroup_id`, reading its destination, protocol and port again ([`Packet::reported`]). A
/// global function, checked once on its own (see [`crate::verdict::sock_addr_event`]).
///
/// # Safety
/// `skb` is the running `cgroup_skb` program's context.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn packet_event(
    skb: *mut __sk_buff,
    decided: u64,
    ids: u64,
    cgroup_id: u64,
) -> u64 {
    let ctx = SkBuffContext::new(skb);
    let (addr, protocol, port) = Packet::reported(&ctx);
    record::event(
        &Decided::of_words([decided, ids]).attempt(addr, port, protocol),
        cgroup_id,
        0,
        Identity::socket,
        None,
    );
    0
}

/// The kind of task a packet is judged as, and whether its socket's uid may match uid rules.
///
/// A connected socket's packet to the destination its connect was judged for is judged again as
/// a host task's, by its owner (a container's allow is remembered on the socket, above, unless
/// its storage could not be made). Anything else (unconnected, or rewritten by NAT) is judged
/// as its sender's kind of task, and by its uid only when the sender is the current task (see
/// `sender_kind`).
#[inline(always)]
fn judged_as(facts: &SocketFacts, rewritten: bool, uid: u32, cgroup_id: u64) -> (u16, bool) {
    if facts.seen_by_hooks && facts.connected && !rewritten {
        (TASK_HOST, true)
    } else {
        let sender = task::sender_kind(u64::from(uid), cgroup_id);
        (task::kind_of(sender), task::sender_confirmed(sender))
    }
}

/// Who a packet is judged as.
#[derive(Clone, Copy)]
struct Judged {
    /// `TASK_*`.
    task: u16,
    /// `uid` is its sender's: uid rules may match.
    uid_known: bool,
    /// The socket's uid (`bpf_get_socket_uid`), or the one a remembered verdict was given to.
    uid: u32,
    /// `gid` is known (a remembered verdict's): gid rules may match. A packet knows none.
    gid_known: bool,
    gid: u32,
    /// A remembered verdict, `previous`, of a policy no longer in force, is judged again.
    again: bool,
    previous: u8,
}

impl Judged {
    /// The decision for this identity in `cgroup` by `generation`. A packet knows no gid: gid
    /// rules match only a remembered identity's packets. A TCP packet whose requests the
    /// message layer would not judge by this rule (`unjudged_tcp`) is refused where the rule
    /// judges requests ([`http::unread_under`]).
    #[inline(always)]
    fn decide(self, generation: u32, cgroup: &SocketCgroup, unjudged_tcp: bool) -> Decision {
        let decision = decide(
            &verdict::KernelMaps,
            generation,
            self.uid_known.then_some(self.uid),
            || self.gid_known.then_some(self.gid),
            self.task,
            cgroup,
        );
        if decision.verdict != VERDICT_DENY && http::unread_under(decision.rule_flags, unjudged_tcp)
        {
            Decision {
                verdict: VERDICT_DENY,
                ..decision
            }
        } else {
            decision
        }
    }

    /// The verdict to remember on the socket for this identity: `verdict` on packets to
    /// `addr` (of `FAMILY_*` `family`), by the policy in force as `generation`, `rewritten` by
    /// NAT or not.
    #[inline(always)]
    fn remembered(
        self,
        addr: [u32; 4],
        family: u8,
        verdict: u8,
        generation: u32,
        rewritten: bool,
    ) -> SocketVerdict {
        SocketVerdict {
            addr,
            epoch: verdict::epoch_of(generation),
            uid: self.uid,
            gid: self.gid,
            family,
            verdict,
            task: SocketVerdict::task_byte(self.task),
            known: if self.uid_known { JUDGED_UID } else { 0 }
                | if self.gid_known { JUDGED_GID } else { 0 }
                | if rewritten { JUDGED_REWRITTEN } else { 0 },
            // Sealed as it is stored.
            check: 0,
        }
    }

    /// Nobody yet: every field written.
    const NOBODY: Self = Self {
        task: 0,
        uid_known: false,
        uid: 0,
        gid_known: false,
        gid: 0,
        again: false,
        previous: 0,
    };
}

/// What the judge keeps of the paths before the decision, for after it.
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent facts, packed into one word for the verifier (`opaque_found`)"
)]
struct Found {
    judged: Judged,
    /// The socket hooks judged this socket's destination (see [`SocketFacts::seen_by_hooks`]).
    seen_by_hooks: bool,
    /// NAT rewrote the destination of a connected socket.
    rewritten: bool,
    /// The verdict is remembered on the socket: a connected socket other than a datagram one.
    remember: bool,
    /// TCP whose requests the message layer would not judge by the rule deciding it.
    unjudged_tcp: bool,
    /// The message layer follows the socket.
    followed: bool,
}

/// `found` as values the verifier cannot see through: two words written to the packet's control
/// block (`__sk_buff.cb`) and read back. The verifier knows a value loaded from the context
/// only as a number, whatever was stored there, so it explores what follows once, whatever
/// path computed `found` (see `opaque` for why that matters). The block is the packet's own:
/// no other program shares it (on this CPU or another, interrupting this one or interrupted),
/// so this cannot fail, where a per-CPU map slot could be another run's at the time. The
/// kernel saves the block before a `cgroup_skb` program that uses it and restores it after
/// (`__bpf_prog_run_save_cb`): nothing outside the program sees what it wrote.
#[inline(always)]
fn opaque_found(ctx: &SkBuffContext, found: Found) -> Found {
    let Judged {
        task,
        uid_known,
        uid,
        gid_known,
        gid,
        again,
        previous,
    } = found.judged;
    let word = u64::from(task & 0xff)
        | u64::from(found.seen_by_hooks) << 8
        | u64::from(found.rewritten) << 9
        | u64::from(found.remember) << 10
        | u64::from(uid_known) << 11
        | u64::from(gid_known) << 12
        | u64::from(again) << 13
        | u64::from(found.unjudged_tcp) << 14
        | u64::from(found.followed) << 15
        | u64::from(previous) << 16
        | u64::from(uid) << 32;
    // SAFETY: the running program's context, whose `cb` is five `u32`s from offset 48: two
    // words, 8-aligned, which the verifier lets a `cgroup_skb` program read and write (Linux
    // 4.10+). Volatile, so that LLVM neither passes the values around the block nor drops the
    // stores.
    let (word, gid) = unsafe {
        #[expect(
            clippy::cast_ptr_alignment,
            reason = "`cb` is at offset 48 of the context (the verifier refuses an access not \
                      aligned to its size), and what the kernel makes of it, the control \
                      block's data, is 8-aligned in the `sk_buff`"
        )]
        let cb = (&raw mut (*ctx.skb.skb).cb).cast::<u64>();
        core::ptr::write_volatile(cb, word);
        core::ptr::write_volatile(cb.add(1), u64::from(gid));
        (
            core::ptr::read_volatile(cb),
            core::ptr::read_volatile(cb.add(1)),
        )
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "fields of the words, masked or shifted into place"
    )]
    Found {
        judged: Judged {
            task: (word & 0xff) as u16,
            uid_known: word & 1 << 11 != 0,
            uid: (word >> 32) as u32,
            gid_known: word & 1 << 12 != 0,
            gid: gid as u32,
            again: word & 1 << 13 != 0,
            previous: (word >> 16) as u8,
        },
        seen_by_hooks: word & 1 << 8 != 0,
        rewritten: word & 1 << 9 != 0,
        remember: word & 1 << 10 != 0,
        unjudged_tcp: word & 1 << 14 != 0,
        followed: word & 1 << 15 != 0,
    }
}

/// The verdict remembered on `socket` for `destination` (for a TCP packet, `tcp_rewritten`
/// says whether NAT rewrote it: only a verdict on packets of the same kind counts, see
/// `JUDGED_REWRITTEN`): `Err` with it when it stands (the
/// policy that gave it is in force: a denial was reported already); otherwise who the packet
/// is judged as, the identity it was given to when there is one (judged again, by the policy
/// in force), [`Judged::NOBODY`] when there is none.
///
/// Every field of the `Judged` is written on every path: an `Option` whose `None` leaves its
/// payload undefined made LLVM spill an uninitialised register, which the verifier refuses
/// (`R5 !read_ok`).
///
/// # Safety
/// `socket` is null or a full socket returned by `bpf_sk_fullsock`.
#[inline(always)]
unsafe fn remembered(
    socket: *mut bpf_sock,
    destination: Destination,
    generation: u32,
    tcp_rewritten: Option<bool>,
    unjudged_tcp: bool,
) -> Result<Judged, i32> {
    // SAFETY: as the caller promises.
    let Some(remembered) = (unsafe { socket_verdict(socket, false) }) else {
        return Ok(Judged::NOBODY);
    };
    // SAFETY: the socket's storage, valid while the program runs.
    let remembered = unsafe { *remembered };
    let (family, addr) = destination.words();
    if remembered.family != family
        || !protected::same_words(remembered.addr, addr)
        || !remembered.whole()
        || tcp_rewritten
            .is_some_and(|rewritten| rewritten != (remembered.known & JUDGED_REWRITTEN != 0))
    {
        return Ok(Judged::NOBODY);
    }
    // A verdict of the policy in force stands, unless it lets through TCP whose requests the
    // message layer would not judge: that is decided again (by the same identity), in case
    // the rule judges requests.
    if remembered.epoch == verdict::epoch_of(generation)
        && (remembered.verdict == VERDICT_DENY || !unjudged_tcp)
    {
        return Err(if remembered.verdict == VERDICT_DENY {
            DROP
        } else {
            PASS
        });
    }
    Ok(Judged {
        task: u16::from(remembered.task),
        uid_known: remembered.known & JUDGED_UID != 0,
        uid: remembered.uid,
        gid_known: remembered.known & JUDGED_GID != 0,
        gid: remembered.gid,
        again: true,
        previous: remembered.verdict,
    })
}

/// A packet's socket's cgroup.
struct SocketCgroup {
    skb: *mut aya_ebpf::bindings::__sk_buff,
    id: u64,
}

impl Cgroup for SocketCgroup {
    fn own(&self) -> u64 {
        self.id
    }

    fn ancestor(&self, level: u32) -> u64 {
        #[expect(
            clippy::cast_possible_wrap,
            reason = "levels are at most MAX_CGROUP_LEVEL"
        )]
        // SAFETY: a helper on the valid context (Linux 4.19+); it uses the full socket behind a
        // request socket.
        unsafe {
            bpf_skb_ancestor_cgroup_id(self.skb, level as i32)
        }
    }
}

/// The socket's entry in `SOCKET_VERDICTS`, created (zeroed) when it has none and `create`
/// says so.
///
/// # Safety
/// `socket` is null or a full socket returned by `bpf_sk_fullsock`.
#[inline]
unsafe fn socket_verdict(socket: *mut bpf_sock, create: bool) -> Option<*mut SocketVerdict> {
    if socket.is_null() {
        return None;
    }
    // SAFETY: the map is socket-local storage; the helper checks the socket (Linux 5.2+).
    let stored = unsafe {
        bpf_sk_storage_get(
            (&raw const SOCKET_VERDICTS).cast_mut().cast(),
            socket.cast(),
            core::ptr::null_mut(),
            if create { STORAGE_CREATE } else { 0 },
        )
    };
    (!stored.is_null()).then_some(stored.cast())
}

/// What the packet layer reads of a packet's socket, in one place: one null check, plain values
/// after it. (Separate checks of the same pointer let LLVM merge them into arithmetic on the
/// pointer, which the verifier refuses: "bitwise operator |= on pointer prohibited".)
struct SocketFacts {
    /// The socket is connected, to `peer`: the destination the socket hooks saw, before any
    /// rewrite (for TCP from its `connect()` on).
    connected: bool,
    /// Where it is connected to (unset when not connected).
    peer: Destination,
    /// The port it is connected to (0 when not connected).
    peer_port: u16,
    /// The socket hooks judge what it sends: a TCP or UDP socket that is not raw (`connect4/6`
    /// its connect, `sendmsg4/6` each unconnected datagram); not a raw socket, nor another
    /// protocol (ICMP echo, UDP-Lite, SCTP).
    seen_by_hooks: bool,
    /// The socket's type and protocol (0 when not known), read where they are needed (a fact
    /// decided early would be one more the verifier keeps states apart by).
    kind: u32,
    protocol: u32,
}

impl SocketFacts {
    /// Whether TCP from this socket (`rewritten` by NAT or not), which the message layer follows
    /// as `followed` says (`http::carries_unread_bytes`), has its requests go unjudged by the
    /// rule deciding it: on a connection the message layer does not follow (not a TCP socket's
    /// connection to a protected address's HTTP port that the socket hooks judged: a raw
    /// socket's, one NAT took there from another address or port, one opened before the agent
    /// started), or follows under a rule that judged less (`http::admitted_judging_less`).
    #[inline(always)]
    fn unjudged_tcp(&self, rewritten: bool, followed: u32) -> bool {
        rewritten
            || !self.seen_by_hooks
            || self.peer_port != HTTP_PORT
            || followed & http::FOLLOWED == 0
            || http::admitted_judging_less(followed)
    }

    /// Whether the verdict is remembered on the socket: a connected socket that is not a
    /// datagram one (UDP or UDP-Lite, not raw: every packet it sends is a datagram a system
    /// call of its sender sends; no timer sends for it, as TCP's and SCTP's retransmit).
    #[inline]
    fn remember(&self) -> bool {
        let datagrams = self.kind == SOCK_DGRAM
            && (self.protocol == u32::from(IPPROTO_UDP)
                || self.protocol == u32::from(IPPROTO_UDPLITE));
        self.connected && !datagrams
    }

    /// # Safety
    /// `socket` is null (nothing is known) or a full socket returned by `bpf_sk_fullsock`.
    #[inline]
    unsafe fn of(socket: *mut bpf_sock) -> Self {
        if socket.is_null() {
            return Self {
                connected: false,
                peer: Destination::v4(0),
                peer_port: 0,
                seen_by_hooks: false,
                kind: 0,
                protocol: 0,
            };
        }
        // SAFETY: a full socket; the verifier allows 32-bit reads of these fields, one word at
        // a time for `dst_ip6`, and a 16-bit read of `dst_port` (network byte order).
        unsafe {
            let (kind, protocol) = ((*socket).type_, (*socket).protocol);
            let peer = match (*socket).family {
                AF_INET => match (*socket).dst_ip4 {
                    0 => None,
                    addr => Some(Destination::v4(addr)),
                },
                AF_INET6 => {
                    let ip6 = &raw const (*socket).dst_ip6;
                    Destination::of_v6([
                        core::ptr::read_volatile(ip6.cast::<u32>()),
                        core::ptr::read_volatile(ip6.cast::<u32>().add(1)),
                        core::ptr::read_volatile(ip6.cast::<u32>().add(2)),
                        core::ptr::read_volatile(ip6.cast::<u32>().add(3)),
                    ])
                }
                _ => None,
            };
            Self {
                connected: peer.is_some(),
                peer: peer.unwrap_or(Destination::v4(0)),
                peer_port: u16::from_be(core::ptr::read_volatile(&raw const (*socket).dst_port)),
                seen_by_hooks: kind != SOCK_RAW
                    && (protocol == u32::from(IPPROTO_TCP) || protocol == u32::from(IPPROTO_UDP)),
                kind,
                protocol,
            }
        }
    }
}
