//! The packet-level layer: raw sockets (`SOCK_RAW`) write their own IP headers and never pass
//! the socket address hooks, so their packets to protected addresses are judged here, on
//! `cgroup_skb/egress`, by the socket's owner and cgroup.
//!
//! Packets of every other socket pass at once: their connect or send was judged already, and a
//! connection an allowed workload opened must keep flowing. The cost for them is one helper call
//! (`bpf_sk_fullsock`) and one field read per packet.

use aya_ebpf::{
    helpers::generated::{
        bpf_get_socket_uid, bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    programs::SkBuffContext,
};
use imds_guard_common::event::{
    FAMILY_INET, FAMILY_INET6, HOOK_EGRESS, VERDICT_ALLOW, VERDICT_DENY,
};

use crate::{
    maps::{PROTECTED_V4, PROTECTED_V6},
    report::{self, Attempt, Identity},
    verdict,
};

/// `cgroup_skb` programs return 1 to let the packet go and 0 to drop it (`EPERM` to a sender
/// in process context).
const PASS: i32 = 1;
const DROP: i32 = 0;

const SOCK_RAW: u32 = 3;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Judges one outgoing packet.
pub fn judge_egress(ctx: &SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: the kernel hands cgroup_skb programs a valid context; `sk` may be null.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return PASS;
    }
    // SAFETY: a helper that checks its argument; it returns null for request/timewait socks.
    let full = unsafe { bpf_sk_fullsock(sk) };
    // SAFETY: non-null results of bpf_sk_fullsock point to a full socket.
    if full.is_null() || unsafe { (*full).type_ } != SOCK_RAW {
        return PASS;
    }
    judge_raw(ctx).unwrap_or(PASS)
}

/// The slow path, for raw sockets only. `None` (pass) for a packet too short to hold the
/// header fields read: the kernel would not send it to an address anyway.
fn judge_raw(ctx: &SkBuffContext) -> Option<i32> {
    let first: u8 = ctx.load(0).ok()?;
    let (family, generations, addr, protocol, transport) = match first >> 4 {
        4 => {
            // The destination as the hooks see it: network-order bytes read as a native u32.
            let daddr: u32 = ctx.load(16).ok()?;
            // SAFETY: plain u32 values, only read.
            let generations = unsafe { PROTECTED_V4.get(daddr) }.copied()?;
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&daddr.to_ne_bytes());
            let protocol: u8 = ctx.load(9).ok()?;
            (
                FAMILY_INET,
                generations,
                addr,
                protocol,
                usize::from(first & 0x0f) * 4,
            )
        }
        6 => {
            let words: [u32; 4] = [
                ctx.load(24).ok()?,
                ctx.load(28).ok()?,
                ctx.load(32).ok()?,
                ctx.load(36).ok()?,
            ];
            // SAFETY: as above.
            let generations = unsafe { PROTECTED_V6.get(words) }.copied()?;
            let mut addr = [0u8; 16];
            for (i, word) in words.iter().enumerate() {
                addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
            // The next header; extension headers are not followed (the port is then 0).
            let protocol: u8 = ctx.load(6).ok()?;
            (FAMILY_INET6, generations, addr, protocol, 40)
        }
        _ => return None,
    };
    let generation = verdict::generation_in_force(generations)?;
    let skb = ctx.skb.skb;
    // SAFETY: helpers on the valid context (Linux 4.5+, 4.18+, 4.19+).
    let (uid, cgroup_id) = unsafe { (bpf_get_socket_uid(skb), bpf_skb_cgroup_id(skb)) };
    // SAFETY: as above.
    let ancestor = |level: i32| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) };
    // The socket's gid is not known here: gid rules do not apply to raw packets.
    let (verdict, rule) = verdict::decide(generation, uid, None, ancestor);
    verdict::count(generation, verdict, rule);
    if verdict == VERDICT_ALLOW {
        return Some(PASS);
    }
    let port = if protocol == IPPROTO_TCP || protocol == IPPROTO_UDP {
        // The destination port, big-endian, two bytes into the TCP or UDP header.
        ctx.load::<u16>(transport + 2).map_or(0, u16::from_be)
    } else {
        0
    };
    report::event(
        &Attempt {
            verdict,
            rule,
            // `generation` is 0 or 1.
            generation: u8::from(generation != 0),
            hook: HOOK_EGRESS,
            family,
            port,
            protocol,
            uid,
            gid: u32::MAX,
            addr,
        },
        cgroup_id,
        Identity::socket,
    );
    Some(if verdict == VERDICT_DENY { DROP } else { PASS })
}
