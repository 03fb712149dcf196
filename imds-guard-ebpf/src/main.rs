//! imds-guard's kernel programs: one entry point per attach point, each judging connects and
//! unconnected datagrams to protected addresses for the current task, and every packet sent
//! there that those hooks did not let through for its socket.
//!
//! Return values are the cgroup contract: 1 lets the syscall (or packet) proceed, 0 fails it
//! with `EPERM` at once (so an SDK fails fast instead of timing out) or drops the packet.
//!
//! On the host (`cargo clippy --workspace`, `cargo build --workspace`) the crate builds as an
//! ordinary binary that only says where the programs belong, so the whole workspace lints.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The BPF target has no atomic read-modify-write types: `record::atomic_increment` uses the
// intrinsic, which compiles to BPF's `lock xadd`.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
#![allow(
    clippy::needless_pass_by_value,
    reason = "aya's program macros hand the context over by value"
)]
#![allow(
    clippy::inline_always,
    reason = "the fast paths are inlined into each entry point: a call from one BPF function \
              to another costs more than the fast path itself"
)]

mod http;
mod maps;
mod opaque;
mod packet;
mod protected;
mod record;
mod task;
mod verdict;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock_addr, sk_msg, sock_ops},
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockOpsContext},
};
use imds_guard_common::event::{HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, HOOK_SENDMSG6};

/// `connect()` on IPv4 TCP, UDP and ICMP sockets.
#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    verdict::judge_v4(&ctx, HOOK_CONNECT4)
}

/// `connect()` on IPv6 sockets, including `::ffff:a.b.c.d` on dual-stack sockets.
#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    verdict::judge_v6(&ctx, HOOK_CONNECT6)
}

/// `sendto()`/`sendmsg()` with a destination on unconnected IPv4 UDP sockets.
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict::judge_v4(&ctx, HOOK_SENDMSG4)
}

/// `sendto()`/`sendmsg()` with a destination on unconnected IPv6 UDP sockets.
#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    verdict::judge_v6(&ctx, HOOK_SENDMSG6)
}

/// Every outgoing packet; judges those to protected addresses that no hook above let through
/// for their socket (raw sockets, rewritten destinations, protocols without those hooks).
#[cgroup_skb(egress)]
pub fn egress(ctx: SkBuffContext) -> i32 {
    packet::judge_egress(&ctx)
}

/// TCP events of the cgroup's sockets: follows the connections to a protected address's
/// HTTP port once established.
#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    http::established(&ctx)
}

/// Every write on a followed connection: classifies and judges its HTTP requests.
#[sk_msg]
pub fn http_msg(ctx: SkMsgContext) -> u32 {
    http::judge_write(&ctx)
}

/// Allows everything and does nothing: `cargo xtask bench` attaches it beside `connect4` to
/// measure what the kernel's run-time statistics themselves cost. The agent never loads it.
#[cgroup_sock_addr(connect4)]
pub fn bench_noop4(_ctx: SockAddrContext) -> i32 {
    1
}

/// The same beside `connect6`.
#[cgroup_sock_addr(connect6)]
pub fn bench_noop6(_ctx: SockAddrContext) -> i32 {
    1
}

/// The same beside `sendmsg4` (an unconnected datagram's send).
#[cgroup_sock_addr(sendmsg4)]
pub fn bench_noop_sendmsg4(_ctx: SockAddrContext) -> i32 {
    1
}

/// The same beside `sendmsg6`.
#[cgroup_sock_addr(sendmsg6)]
pub fn bench_noop_sendmsg6(_ctx: SockAddrContext) -> i32 {
    1
}

/// The same beside `egress`.
#[cgroup_skb(egress)]
pub fn bench_noop_skb(_ctx: SkBuffContext) -> i32 {
    1
}

/// The same at `sock_ops`: what the kernel's hooks cost with programs that do nothing.
#[sock_ops]
pub fn bench_noop_sock_ops(_ctx: SockOpsContext) -> u32 {
    1
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no reachable panic; this only satisfies the linker.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("imds-guard-ebpf holds kernel programs; imds-guard embeds and loads them");
    std::process::exit(2);
}

/// The kernel refuses GPL-only helpers to programs without a GPL-compatible license.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
