//! The message layer: every HTTP request a workload writes on a connection to a protected
//! address's port 80 is classified (`token`, `v2`, `v1`) and judged by the rule that let the
//! connect through (`imds = "v2"`, `paths`, `deny_paths`), before TCP sends a byte of it.
//!
//! Three programs share the work, so that no other socket pays anything:
//! - the connect hooks record, on the socket, who was let through and by which rule
//!   ([`follow`], socket-local storage `HTTP_SOCKETS`);
//! - `sock_ops` puts the connection, once established, into `HTTP_SOCKHASH` ([`established`]);
//! - `sk_msg`, attached to that map, reads each write as it is made ([`judge_write`]). It keeps
//!   how far the current request has been read on the socket, so a request split over several
//!   writes is judged at the end of its headers, whichever write carries it. A refused request
//!   fails its write with `EACCES` at once, and every later write on the connection: the server
//!   holds an incomplete request, which it never answers.
//!
//! Helpers by kernel: `sk_msg` with `SOCKHASH` 4.18; `bpf_get_current_*` and
//! `bpf_sk_storage_get` in `sk_msg` 5.10; `bpf_get_socket_cookie` in `sock_ops` 5.7.
#![expect(
    clippy::inline_always,
    reason = "one program body, but for the per-byte step: a BPF subprogram costs a call each"
)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock, sk_action, sk_msg_md},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_socket_cookie, bpf_msg_apply_bytes, bpf_msg_pull_data, bpf_sk_storage_get,
        },
    },
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockOpsContext},
};
use imds_guard_common::{
    event::{FAMILY_INET, FAMILY_INET6, HOOK_HTTP, VERDICT_DENY},
    http::{
        HTTP_CHUNK_BYTES, HTTP_HEADER_BYTES_MAX, HTTP_PORT, HTTP_REQUEST_BYTES, HttpSocket, Judged,
        LineParser, NAME_IN_VALUE, NAME_OTHER, PATH_PATTERNS_MAX, PHASE_HEADERS, PHASE_LINE,
        PHASE_REFUSED, PathRules, PathRulesKey, REFUSED_PATH, SEEN_TOKEN, SEEN_TOKEN_TTL,
        TOKEN_HEADER_LEN, TOKEN_TTL_HEADER, carries_unread, http_counter_index, judge_request_with,
        paths_refuse, pattern_says, refuses_requests, reported,
    },
    maps::{COUNTER_HTTP_REFUSED, COUNTER_HTTP_UNFOLLOWED, COUNTER_HTTP_UNJUDGED},
    policy::TASK_CONTAINER,
};

use crate::{
    maps::{HTTP_COUNTERS, HTTP_SOCKETS, HTTP_SOCKHASH, PATH_RULES},
    opaque,
    packet::Linear,
    protected::{self, Destination},
    record::{self, Attempt, Identity},
};

/// `BPF_SK_STORAGE_GET_F_CREATE`.
const STORAGE_CREATE: u64 = 1;
const SK_PASS: u32 = sk_action::SK_PASS;
const SK_DROP: u32 = sk_action::SK_DROP;
/// `IPPROTO_TCP`, for events.
const IPPROTO_TCP: u8 = 6;
/// [`HttpSocket::seen`]: the current request was judged already (its headers ran past
/// `HTTP_HEADER_BYTES_MAX`); the rest of its headers are skipped.
const SEEN_JUDGED: u8 = 0x80;

/// The connect hooks' part: a TCP connect to a protected address's port 80 was let through
/// (allowed or audited) by `rule` of `generation`: record it on the socket for the message
/// program, with the rule's `RULE_FLAG_*` and the kind of task. A socket that cannot get the
/// storage (no memory) is refused at its first write ([`judge_write`]): fail closed.
#[inline]
pub fn follow(
    ctx: &SockAddrContext,
    generation: u32,
    verdict: u8,
    rule: u32,
    rule_flags: u32,
    task: u16,
) {
    // SAFETY: the helper checks the socket; the storage it returns, if any, is zeroed when new
    // and this socket's, valid while the program runs.
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        let state = storage(sk, STORAGE_CREATE);
        if state.is_null() {
            return;
        }
        (*state).rule = rule;
        (*state).cgroup_id = record::current_cgroup_id();
        (*state).generation = u8::from(generation != 0);
        (*state).epoch = crate::verdict::epoch_of(generation);
        (*state).verdict = verdict;
        #[expect(clippy::cast_possible_truncation, reason = "RULE_FLAG_* fit in a byte")]
        let rule_flags = rule_flags as u8;
        (*state).rule_flags = rule_flags;
        (*state).event_flags = if task == TASK_CONTAINER {
            imds_guard_common::event::EVENT_FLAG_CONTAINER
        } else {
            0
        };
        reset(state);
        (*state).phase = PHASE_LINE;
        // A new stream (storage outlives a `connect(AF_UNSPEC)` and a connect again): nothing of
        // it has been let through, and its first byte is known at its SYN.
        (*state).passed = 0;
        (*state).data_seq = 0;
        (*state).seq_known = 0;
    }
}

/// This socket's `HTTP_SOCKETS` entry (created, zeroed, with `STORAGE_CREATE`), or null.
///
/// # Safety
/// `sk` is a socket pointer the program was handed.
#[inline(always)]
unsafe fn storage(sk: *mut bpf_sock, flags: u64) -> *mut HttpSocket {
    // SAFETY: as the caller promises; a null value asks for a zeroed one.
    unsafe {
        bpf_sk_storage_get(
            (&raw const HTTP_SOCKETS).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            flags,
        )
        .cast()
    }
}

/// The record of the socket `msg` is written to (null when it has none): for the program, and
/// again for its global functions, which get the context only.
///
/// # Safety
/// `msg` is the running `sk_msg` program's context.
#[inline(always)]
unsafe fn record_of(msg: *mut sk_msg_md) -> *mut HttpSocket {
    // SAFETY: as the caller promises; `sk` is the message's socket, and its storage is valid
    // while the program runs.
    unsafe { storage((*msg).__bindgen_anon_3.sk, 0) }
}

/// `SYN` in a TCP header's flags byte.
const TCP_SYN: u8 = 0x02;
/// `URG`: urgent data, which a server may take out of the stream the program read.
const TCP_URG: u8 = 0x20;

/// Whether a connection decided with `rule_flags` (as `Decision::rule_flags`) has its requests
/// judged and refused ([`refuses_requests`]).
#[inline(always)]
pub fn refuses_requests_of(rule_flags: u32) -> bool {
    #[expect(clippy::cast_possible_truncation, reason = "RULE_FLAG_* fit in a byte")]
    refuses_requests(rule_flags as u8)
}

/// The packet layer's part, for a packet it decided itself, by `rule_flags`: whether its
/// requests would go unjudged (`unjudged_tcp`: TCP on a connection the message layer does not
/// follow, one NAT took to a protected address, a raw socket's, or one it follows under a rule
/// that judged less than this one), where this rule refuses requests. Then it is refused (fail
/// closed), as any byte the message layer could not read is.
#[inline(always)]
pub fn unread_under(rule_flags: u32, unjudged_tcp: bool) -> bool {
    if unjudged_tcp && refuses_requests_of(rule_flags) {
        record::count(COUNTER_HTTP_UNJUDGED);
        return true;
    }
    false
}

/// Whether a socket [`carries_unread_bytes`] said is followed as `followed` had its connection
/// admitted by a rule that refuses no requests (audit mode's, or one that judges none): under
/// a rule that refuses them now, its requests would go unjudged.
#[inline(always)]
pub fn admitted_judging_less(followed: u32) -> bool {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the flags are the low byte"
    )]
    let flags = followed as u8;
    followed & FOLLOWED != 0 && !refuses_requests(flags)
}

/// The packet layer's part: whether `socket`'s outgoing segment to a protected address (its TCP
/// header at `tcp_at`, when the packet has it there) carries a byte no write was read for, on a
/// connection whose rule refuses requests ([`UNREAD`]); else whether the message layer follows
/// the socket, and with which rule's flags ([`FOLLOWED`], [`NOT_FOLLOWED`]). Such bytes were
/// written before the connection reached the socket map: TCP Fast Open's, in the SYN (with a
/// cookie) or queued before the handshake ended (without). The SYN also tells the stream's
/// first sequence number. Unread bytes leave the connection refused
/// (its later writes fail with `EACCES` at once); anything that cannot be read here is unread:
/// a TCP header not where `tcp_at` says (IPv6 extension headers, which an unprivileged socket
/// can ask for with `IPV6_RTHDR`), and urgent data (a server may take it out of the stream).
///
/// # Safety
/// `socket` is a full socket from `bpf_sk_fullsock`.
#[inline(always)]
pub unsafe fn carries_unread_bytes(
    ctx: &SkBuffContext,
    socket: *mut bpf_sock,
    tcp_at: Option<usize>,
) -> u32 {
    // SAFETY: as the caller promises; the storage, if any, is this socket's, valid while the
    // program runs.
    unsafe {
        let state = storage(socket, 0);
        if state.is_null() {
            return NOT_FOLLOWED;
        }
        let followed = FOLLOWED | u32::from((*state).rule_flags);
        if !refuses_requests((*state).rule_flags) {
            // Followed to be reported only (audit mode never refuses).
            return followed;
        }
        let Some(transport) = tcp_at else {
            (*state).phase = PHASE_REFUSED;
            record::count(COUNTER_HTTP_UNJUDGED);
            return UNREAD;
        };
        let unread = match tcp_fields(ctx, transport) {
            Some((seq, offset_flags)) => {
                let seq = u32::from_be(seq);
                let [offset, flags] = offset_flags.to_ne_bytes();
                let header = u32::from(offset >> 4) * 4;
                #[expect(clippy::cast_possible_truncation, reason = "a header offset")]
                let payload = ctx.len().saturating_sub(transport as u32 + header);
                if flags & TCP_URG != 0 {
                    true
                } else if flags & TCP_SYN != 0 {
                    // A new stream: nothing of it was let through yet (what was counted is of
                    // a stream the socket had before, connected again elsewhere).
                    (*state).data_seq = seq.wrapping_add(1);
                    (*state).seq_known = 1;
                    (*state).passed = 0;
                    payload > 0
                } else if (*state).seq_known == 0 {
                    payload > 0
                } else {
                    carries_unread(seq, payload, (*state).data_seq, (*state).passed)
                }
            }
            _ => true,
        };
        if unread {
            (*state).phase = PHASE_REFUSED;
            record::count(COUNTER_HTTP_UNJUDGED);
            return UNREAD;
        }
        followed
    }
}

/// The sequence number and the word of data offset and flags of the TCP header at `transport`
/// (as the packet carries them): in place behind the usual headers (IPv4 without options,
/// IPv6 without extension headers), else through `bpf_skb_load_bytes`; `None` when unreadable.
#[inline(always)]
fn tcp_fields(ctx: &SkBuffContext, transport: usize) -> Option<(u32, u16)> {
    match transport {
        20 => Linear::<34>::of(ctx).map(|header| (header.word(24), header.half(32))),
        40 => Linear::<54>::of(ctx).map(|header| (header.word(44), header.half(52))),
        _ => None,
    }
    .or_else(|| {
        Some((
            ctx.load::<u32>(transport + 4).ok()?,
            ctx.load::<u16>(transport + 12).ok()?,
        ))
    })
}

/// [`carries_unread_bytes`]: the message layer does not follow the socket.
pub const NOT_FOLLOWED: u32 = 0;
/// [`carries_unread_bytes`]: the segment carries unread bytes (drop it).
pub const UNREAD: u32 = 0x200;
/// [`carries_unread_bytes`]: followed, the connection admitted with the `RULE_FLAG_*` in the
/// low byte.
pub const FOLLOWED: u32 = 0x100;

/// Refuses the socket's connection at its next write (the packet layer refused its rule's
/// requests: see `unread_under`), so that the client fails at once and reconnects.
///
/// # Safety
/// `socket` is a full socket from `bpf_sk_fullsock`, or null.
#[inline(always)]
pub unsafe fn refuse(socket: *mut bpf_sock) {
    if socket.is_null() {
        return;
    }
    // SAFETY: as the caller promises; the storage, if any, is this socket's.
    unsafe {
        let state = storage(socket, 0);
        if !state.is_null() {
            (*state).phase = PHASE_REFUSED;
        }
    }
}

/// `sock_ops`: an active TCP connection to a protected address's port 80 just became
/// established: its writes are to be read. Every other event and connection is left alone.
#[inline]
pub fn established(ctx: &SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    // `remote_port` holds the port in network byte order in its upper half on little-endian
    // machines (the kernel shifts it there): `from_be` of the word is the port.
    if u32::from_be(ctx.remote_port()) != u32::from(HTTP_PORT) {
        return 1;
    }
    let destination = match ctx.family() {
        2 => Destination::v4(ctx.remote_ip4()),
        10 => match Destination::of_v6(ctx.remote_ip6()) {
            Some(destination) => destination,
            None => return 1,
        },
        _ => return 1,
    };
    if !destination.may_be_protected()
        || !destination.protected_in_outlined(protected::generation_in_force())
    {
        return 1;
    }
    // The cookie, unique to the socket for the kernel's life: a key another socket (one in a
    // network namespace of the workload's own, with the same addresses and ports) cannot take.
    // SAFETY: the helper only reads the context (Linux 5.7+ for sock_ops).
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the kernel hands sock_ops programs a valid context.
    let ops = unsafe { &mut *ctx.ops };
    if HTTP_SOCKHASH.update(&mut cookie, ops, 0).is_err() {
        record::count(COUNTER_HTTP_UNFOLLOWED);
    }
    1
}

/// `sk_msg`: reads the next bytes of a write (at most `HTTP_CHUNK_BYTES` per run, or up to the
/// end of a request's headers) and judges each request whose headers end in them.
#[inline]
pub fn judge_write(ctx: &SkMsgContext) -> u32 {
    // SAFETY: the kernel hands sk_msg programs a valid context; `sk` is its socket.
    let state = unsafe { record_of(ctx.msg) };
    if state.is_null() {
        // No record of the connect: nothing says this workload may talk to it.
        record::count(COUNTER_HTTP_UNJUDGED);
        return whole(ctx, SK_DROP);
    }
    // SAFETY: this socket's storage, valid while the program runs; the socket's writes are
    // serialised by its lock, so no other run of this program changes it meanwhile.
    unsafe { judge_write_on(ctx, state) }
}

/// [`judge_write`] on the socket's record.
///
/// # Safety
/// `state` is the socket's live `HTTP_SOCKETS` entry.
#[inline(always)]
unsafe fn judge_write_on(ctx: &SkMsgContext, state: *mut HttpSocket) -> u32 {
    // SAFETY: as the caller promises.
    unsafe {
        if (*state).phase == PHASE_REFUSED {
            return whole(ctx, SK_DROP);
        }
        let generation = protected::generation_in_force();
        // Audit mode (the rule's or the global one) never refuses, not even what it cannot read.
        let enforcing = refuses_requests((*state).rule_flags);
        if enforcing && (*state).epoch != crate::verdict::epoch_of(generation) {
            // The policy that admitted the connection is no longer in force, and its rule
            // judged requests: the client reconnects and is judged by the new one. (By epoch,
            // not generation: two switches later the slot holds another policy, whose rule of
            // the same id is another rule. A connection whose rule judged less than the rule
            // now deciding it is refused by the packet layer: `refuse`.)
            (*state).phase = PHASE_REFUSED;
            record::count(COUNTER_HTTP_UNJUDGED);
            return whole(ctx, SK_DROP);
        }
        let size = ctx.size();
        let mut data = ctx.data();
        let mut data_end = ctx.data_end();
        if data == data_end && size > 0 {
            // The bytes are not in the first page of the message: make the chunk linear.
            let want = if size < HTTP_CHUNK_BYTES {
                size
            } else {
                HTTP_CHUNK_BYTES
            };
            if bpf_msg_pull_data(ctx.msg, 0, want, 0) != 0 {
                return whole(ctx, unreadable(state, enforcing));
            }
            data = ctx.data();
            data_end = ctx.data_end();
        }
        // Up to `STEP_BYTES` bytes a call of `http_step`, packed low byte first: a call, and
        // the socket record's lookup in it, a byte was half of the program's time.
        let mut read = 0u32;
        let mut stepped = STEP_MORE;
        let mut i = 0usize;
        while i < HTTP_CHUNK_BYTES as usize {
            let mut bytes = 0u64;
            let mut count = 0usize;
            while count < STEP_BYTES {
                let at = data + i + count;
                if at + 1 > data_end {
                    break;
                }
                bytes |= u64::from(*(at as *const u8)) << (8 * count);
                count += 1;
            }
            if count == 0 {
                break;
            }
            stepped = http_step(ctx.msg, bytes, count as u64);
            if stepped != STEP_MORE {
                // The bytes up to the one that completed the request, which it says.
                #[expect(clippy::cast_possible_truncation, reason = "at most STEP_BYTES")]
                {
                    read += (stepped >> STEP_USED_SHIFT) as u32;
                }
                stepped &= STEP_KIND;
                break;
            }
            #[expect(clippy::cast_possible_truncation, reason = "at most STEP_BYTES")]
            {
                read += count as u32;
            }
            if count < STEP_BYTES {
                // The end of the write's readable bytes.
                break;
            }
            i += STEP_BYTES;
        }
        if stepped == STEP_NO_RECORD {
            return whole(ctx, unreadable(state, enforcing));
        }
        let complete = stepped == STEP_COMPLETE;
        // How far the loop got, as one value the verifier cannot see through (see `opaque`):
        // otherwise it would verify what follows once for each byte the loop can stop at.
        let outcome = opaque::opaque_word(u64::from(read) | (u64::from(complete) << 32));
        #[expect(clippy::cast_possible_truncation, reason = "the low half")]
        let read = outcome as u32;
        let complete = outcome >> 32 != 0;
        if read == 0 && size > 0 {
            return whole(ctx, unreadable(state, enforcing));
        }
        let verdict = if complete {
            finish(ctx, state)
        } else {
            SK_PASS
        };
        // Always said: the kernel keeps the last run's count on the message, and a count left
        // from an earlier run would let the next write's first bytes through unread. A pass
        // covers the bytes read (another run reads the rest); a refusal, the whole write.
        if verdict == SK_PASS {
            // What the packet layer lets leave on this connection (see `HttpSocket::passed`).
            (*state).passed = (*state).passed.wrapping_add(read);
        }
        bpf_msg_apply_bytes(ctx.msg, if verdict == SK_PASS { read } else { size });
        verdict
    }
}

/// `verdict` for the whole rest of the write (see the end of [`judge_write_on`]).
#[inline(always)]
fn whole(ctx: &SkMsgContext, verdict: u32) -> u32 {
    // SAFETY: the helper only records a count on the message.
    unsafe { bpf_msg_apply_bytes(ctx.msg, ctx.size()) };
    verdict
}

/// A write whose bytes could not be read: refused if the connection's rule judges requests,
/// else let through unread.
///
/// # Safety
/// `state` is the socket's live `HTTP_SOCKETS` entry.
#[inline(always)]
unsafe fn unreadable(state: *mut HttpSocket, enforcing: bool) -> u32 {
    record::count(COUNTER_HTTP_UNJUDGED);
    if enforcing {
        // SAFETY: as the caller promises.
        unsafe { (*state).phase = PHASE_REFUSED };
        SK_DROP
    } else {
        SK_PASS
    }
}

/// Bytes [`http_step`] takes a call at most.
const STEP_BYTES: usize = 8;
/// [`http_step`]: the request needs more bytes (every byte given was read).
const STEP_MORE: u64 = 0;
/// [`http_step`]: a byte ended the request's headers; how many bytes were read, that one
/// included, is `>> STEP_USED_SHIFT`.
const STEP_COMPLETE: u64 = 1;
/// [`http_step`]: the socket has no record (it had one when the run began: never, in practice).
const STEP_NO_RECORD: u64 = 2;
/// The bits of [`http_step`]'s answer that say which of the above it is.
const STEP_KIND: u64 = 0xff;
/// Where [`http_step`]'s answer says how many bytes a completed request took.
const STEP_USED_SHIFT: u32 = 8;

/// [`step`] on the socket of `msg`, for each of the `count` bytes (at most [`STEP_BYTES`])
/// packed in `bytes`, low byte first, until one ends the request's headers. A global function
/// (exported, so its BTF says so), which the verifier checks once on its own, with `msg` the
/// context and the others any values: inlined, `step`'s every path was checked again for each
/// byte of a run (~20,000 instructions a byte, so 8 bytes a run kept `http_msg` at 217,000);
/// called, a run reads a whole write (the socket map's send path, taken once per run, was half
/// the layer's cost). Linux 5.6+ (a context argument); the socket's record is looked up again
/// here, once a call, because a pointer argument would need 5.12+: a byte a call, that lookup
/// and the call were half of the program's time.
///
/// # Safety
/// `msg` is the running `sk_msg` program's context.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn http_step(msg: *mut sk_msg_md, bytes: u64, count: u64) -> u64 {
    // SAFETY: as the caller promises.
    unsafe {
        let state = record_of(msg);
        if state.is_null() {
            return STEP_NO_RECORD;
        }
        for used in 0..STEP_BYTES {
            if used as u64 >= count {
                break;
            }
            #[expect(clippy::cast_possible_truncation, reason = "one byte of the word")]
            let byte = (bytes >> (8 * used)) as u8;
            if step(state, byte) {
                return STEP_COMPLETE | ((used as u64 + 1) << STEP_USED_SHIFT);
            }
        }
        STEP_MORE
    }
}

/// Advances the request being read by one byte; `true` at the end of its headers (or when
/// they run past `HTTP_HEADER_BYTES_MAX`, once).
///
/// # Safety
/// `state` is the socket's live `HTTP_SOCKETS` entry.
#[inline(always)]
unsafe fn step(state: *mut HttpSocket, byte: u8) -> bool {
    // SAFETY: as the caller promises.
    unsafe {
        if (*state).phase == PHASE_LINE {
            let len = (*state).line_len;
            if len == 0 && (byte == b'\r' || byte == b'\n') {
                // Empty lines before a request line are allowed (RFC 9112, 2.2).
                return false;
            }
            (*state).line.feed(byte, &mut (*state).parts);
            if byte == b'\n' {
                (*state).phase = PHASE_HEADERS;
                (*state).name_pos = 0;
                (*state).line_empty = 1;
                return false;
            }
            if (len as usize) < HTTP_REQUEST_BYTES {
                core::ptr::write_volatile(
                    (&raw mut (*state).request)
                        .cast::<u8>()
                        .add(len as usize & (HTTP_REQUEST_BYTES - 1)),
                    byte,
                );
            }
            (*state).line_len = len.saturating_add(1);
            return false;
        }
        let header_bytes = (*state).header_bytes.saturating_add(1);
        (*state).header_bytes = header_bytes;
        if byte == b'\n' {
            if (*state).line_empty != 0 {
                if (*state).seen & SEEN_JUDGED == 0 {
                    return true;
                }
                // The end of headers of a request judged already: on to the next request.
                reset(state);
                return false;
            }
            (*state).name_pos = 0;
            (*state).line_empty = 1;
            return header_bytes > HTTP_HEADER_BYTES_MAX && (*state).seen & SEEN_JUDGED == 0;
        }
        if byte == b'\r' {
            return false;
        }
        (*state).line_empty = 0;
        let pos = (*state).name_pos;
        if pos == NAME_IN_VALUE {
            return false;
        }
        if byte == b':' {
            let seen = (*state).seen;
            if pos == TOKEN_HEADER_LEN {
                (*state).seen = seen | SEEN_TOKEN;
            } else if usize::from(pos) == TOKEN_TTL_HEADER.len() {
                (*state).seen = seen | SEEN_TOKEN_TTL;
            }
            (*state).name_pos = NAME_IN_VALUE;
            return false;
        }
        let next = match TOKEN_TTL_HEADER.get(usize::from(pos)) {
            Some(&expected) if byte.to_ascii_lowercase() == expected => pos + 1,
            _ => NAME_OTHER,
        };
        (*state).name_pos = next;
        false
    }
}

/// Forgets the request read so far (the connection's record stays).
///
/// # Safety
/// `state` is the socket's live `HTTP_SOCKETS` entry.
#[inline(always)]
unsafe fn reset(state: *mut HttpSocket) {
    // SAFETY: as the caller promises.
    unsafe {
        (*state).phase = PHASE_LINE;
        (*state).name_pos = 0;
        (*state).line_empty = 0;
        (*state).seen = 0;
        (*state).line_len = 0;
        (*state).header_bytes = 0;
        (*state).line = LineParser::new();
    }
}

/// Judges the request whose headers just ended: counts it, reports it if it is v1 or refused,
/// and returns the write's verdict.
///
/// # Safety
/// `state` is the socket's live `HTTP_SOCKETS` entry.
#[inline(always)]
unsafe fn finish(ctx: &SkMsgContext, state: *mut HttpSocket) -> u32 {
    // SAFETY: as the caller promises.
    unsafe {
        let rule = (*state).rule;
        let rule_flags = (*state).rule_flags;
        let request = (*state)
            .line
            .request(&(*state).request, (*state).line_len, &(*state).parts);
        let judged = judge_request_with(rule_flags, &request, (*state).seen & !SEEN_JUDGED, || {
            match path_rules(state) {
                None => REFUSED_PATH,
                Some(paths) => paths_refuse(paths.len, paths.allow_list != 0, |i| {
                    http_pattern(ctx.msg, i as u64)
                }),
            }
        });
        let socket_generation = u32::from((*state).generation);
        if let Some(counter) =
            HTTP_COUNTERS.get_ptr_mut(http_counter_index(socket_generation, rule, judged.version))
        {
            // A live per-CPU slot.
            record::atomic_increment(counter);
        }
        if reported(&judged) {
            report(ctx, state, &judged);
        }
        if (*state).header_bytes > HTTP_HEADER_BYTES_MAX {
            // Judged before its headers ended: skip the rest of them.
            (*state).seen |= SEEN_JUDGED;
        } else {
            reset(state);
        }
        if judged.verdict == VERDICT_DENY {
            (*state).phase = PHASE_REFUSED;
            record::count(COUNTER_HTTP_REFUSED);
            SK_DROP
        } else {
            SK_PASS
        }
    }
}

/// The `paths` and `deny_paths` of the rule that admitted the connection of `state`.
///
/// # Safety
/// `state` is the socket's live `HTTP_SOCKETS` entry.
#[inline(always)]
unsafe fn path_rules(state: *const HttpSocket) -> Option<&'static PathRules> {
    // SAFETY: as the caller promises.
    unsafe {
        PATH_RULES.get(PathRulesKey {
            generation: u32::from((*state).generation),
            rule: (*state).rule,
        })
    }
}

/// What pattern `index` of the connection's rule says of the request whose headers just ended
/// (`PATTERN_*` of [`pattern_says`], or `PATTERN_UNREADABLE`). A global function, checked once
/// on its own as [`http_step`] is: inlined, the matching of each of the sixteen patterns was
/// checked for every way the ones before it could end (77,000 of the program's 108,000
/// instructions). The record and the rule's patterns are looked up again here (see
/// [`http_step`]); the rule's entry does not change while the program runs (a generation's
/// entries are rewritten only after every program that read the generation has finished).
///
/// # Safety
/// `msg` is the running `sk_msg` program's context.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn http_pattern(msg: *mut sk_msg_md, index: u64) -> u64 {
    // SAFETY: as the caller promises.
    unsafe {
        let state = record_of(msg);
        if state.is_null() {
            return PATTERN_UNREADABLE;
        }
        let Some(paths) = path_rules(state) else {
            return PATTERN_UNREADABLE;
        };
        let request = (*state)
            .line
            .request(&(*state).request, (*state).line_len, &(*state).parts);
        #[expect(
            clippy::cast_possible_truncation,
            reason = "masked to PATH_PATTERNS_MAX"
        )]
        let index = index as usize & (PATH_PATTERNS_MAX - 1);
        pattern_says(&paths.patterns[index], &request)
    }
}

/// [`http_pattern`]: the socket's record or the rule's patterns could not be read (refuses).
const PATTERN_UNREADABLE: u64 = 3;

/// Queues (or folds) the event of a v1 or refused request.
///
/// # Safety
/// `state` is the socket's live `HTTP_SOCKETS` entry.
#[inline(always)]
unsafe fn report(ctx: &SkMsgContext, state: *mut HttpSocket, judged: &Judged) {
    let uid_gid = bpf_get_current_uid_gid();
    #[expect(
        clippy::cast_possible_truncation,
        reason = "splitting a u64 into halves"
    )]
    let (uid, gid) = (uid_gid as u32, (uid_gid >> 32) as u32);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let (family, addr) = peer(ctx);
    // SAFETY: as the caller promises.
    unsafe {
        let len = (*state).line_len;
        #[expect(
            clippy::cast_possible_truncation,
            reason = "at most HTTP_REQUEST_BYTES"
        )]
        let kept = if (len as usize) < HTTP_REQUEST_BYTES {
            len as u16
        } else {
            HTTP_REQUEST_BYTES as u16
        };
        record::event(
            &Attempt {
                verdict: judged.verdict,
                rule: (*state).rule,
                generation: (*state).generation,
                hook: HOOK_HTTP,
                family,
                port: HTTP_PORT,
                protocol: IPPROTO_TCP,
                uid,
                gid,
                addr,
                flags: (*state).event_flags,
                imds_version: judged.version,
                refused: judged.refused,
            },
            record::current_cgroup_id(),
            tgid,
            Identity::writer,
            Some((&(*state).request, kept)),
        );
    }
}

/// The connection's peer, as an event names it: the socket's family and address.
#[inline(always)]
fn peer(ctx: &SkMsgContext) -> (u8, [u8; 16]) {
    // SAFETY: the kernel hands sk_msg programs a valid context; `remote_ip6` is read one
    // aligned 32-bit word at a time, the only access the verifier allows.
    unsafe {
        if (*ctx.msg).family == u32::from(FAMILY_INET) {
            return (
                FAMILY_INET,
                protected::bytes_of([(*ctx.msg).remote_ip4, 0, 0, 0]),
            );
        }
        let ip6 = &raw const (*ctx.msg).remote_ip6;
        let words = [
            core::ptr::read_volatile(ip6.cast::<u32>()),
            core::ptr::read_volatile(ip6.cast::<u32>().add(1)),
            core::ptr::read_volatile(ip6.cast::<u32>().add(2)),
            core::ptr::read_volatile(ip6.cast::<u32>().add(3)),
        ];
        (FAMILY_INET6, protected::bytes_of(words))
    }
}
