//! Which destinations are protected. A bitmap answers "not protected" for almost every address
//! in a few instructions and no helper call; only a destination it does not rule out is
//! compared with the addresses of the generation in force.

pub use imds_guard_common::policy::same_words;
use imds_guard_common::{
    event::{FAMILY_INET, FAMILY_INET6},
    policy::{filter_has, filter_slot_of_last_word, filter_slot_v4, filter_slot_v6},
};

use crate::maps::{GENERATION, PROTECTED, PROTECTED_FILTER};

/// A destination as packets carry it: `::ffff:a.b.c.d` is the IPv4 address.
///
/// A struct whose every byte is always written, not an enum: copying an enum whose IPv4 variant
/// leaves the rest of its payload undefined made LLVM spill an uninitialised register, which
/// the verifier refuses (`R9 !read_ok`).
#[derive(Clone, Copy)]
pub struct Destination {
    /// `FAMILY_INET` or `FAMILY_INET6`.
    family: u8,
    /// Four native `u32` words of network-order bytes; IPv4 in the first, the others 0.
    addr: [u32; 4],
}

/// `::ffff:0:0/96`, the IPv4-mapped prefix, as the third word of an IPv6 address.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Destination {
    /// An IPv4 destination: network-order bytes read as a native `u32`.
    #[inline]
    pub fn v4(addr: u32) -> Self {
        Self {
            family: FAMILY_INET,
            addr: [addr, 0, 0, 0],
        }
    }

    /// An IPv6 destination as a packet carries it (no mapping: a packet is IPv4 or IPv6).
    #[inline]
    pub fn v6(addr: [u32; 4]) -> Self {
        Self {
            family: FAMILY_INET6,
            addr,
        }
    }

    /// The destination of a socket's IPv6 address: the IPv4 address of `::ffff:a.b.c.d`.
    /// `None` for `::` (an unconnected socket's peer).
    #[inline(always)]
    pub fn of_v6(words: [u32; 4]) -> Option<Self> {
        match words {
            [0, 0, 0, 0] => None,
            [0, 0, V4_MAPPED_WORD, v4] => Some(Self::v4(v4)),
            words => Some(Self::v6(words)),
        }
    }

    /// Whether the destination may be protected in some generation: `false` is certain.
    #[inline(always)]
    pub fn may_be_protected(self) -> bool {
        if self.family == FAMILY_INET {
            v4_may_be_protected(self.addr[0])
        } else {
            v6_may_be_protected(self.addr)
        }
    }

    /// Whether `generation` protects the destination. Were its set missing (an array's entry
    /// always exists), it does: the attempt is judged. Inlined into the socket hooks' judgement:
    /// a function of its own, its call and return were 6% of an allowed `connect()`'s time in
    /// the programs.
    #[inline(always)]
    pub fn protected_in(self, generation: u32) -> bool {
        PROTECTED.get(generation).is_none_or(|set| {
            if self.family == FAMILY_INET {
                set.has_v4(self.addr[0])
            } else {
                set.has_v6(self.addr)
            }
        })
    }

    /// [`Destination::protected_in`] as a function of its own, for the message layer, whose
    /// frames stay as they were: Linux 5.10's verifier allows 512 bytes of stack across a
    /// program's frame and those of the functions it calls. (The packet layer's slow path has
    /// it inlined, in a frame of 224 bytes.)
    #[inline(never)]
    pub fn protected_in_outlined(self, generation: u32) -> bool {
        self.protected_in(generation)
    }

    /// Whether both are the same destination.
    #[inline]
    pub fn same(self, other: Self) -> bool {
        self.family == other.family && same_words(self.addr, other.addr)
    }

    /// `FAMILY_*` and the address as four words (IPv4 in the first).
    #[inline]
    pub fn words(self) -> (u8, [u32; 4]) {
        (self.family, self.addr)
    }
}

/// Whether the IPv4 address (as in [`Destination::v4`]) may be protected in some generation:
/// `false` is certain. The fast path of every hook: an array read the verifier inlines, a few
/// shifts and a bit test.
#[inline(always)]
pub fn v4_may_be_protected(addr: u32) -> bool {
    // The array has one entry, which always exists; were it missing, look the address up.
    PROTECTED_FILTER
        .get(0)
        .is_none_or(|filter| filter_has(&filter.v4, filter_slot_v4(addr)))
}

/// The same for an IPv6 address (as in [`Destination::v6`]).
#[inline(always)]
pub fn v6_may_be_protected(addr: [u32; 4]) -> bool {
    PROTECTED_FILTER
        .get(0)
        .is_none_or(|filter| filter_has(&filter.v6, filter_slot_v6(addr)))
}

/// Whether an IPv6 socket address whose last word is `last` may be protected in some
/// generation, as an IPv6 address or as the IPv4 address `::ffff:a.b.c.d` maps to: `false` is
/// certain ([`filter_slot_of_last_word`]). The IPv6 socket hooks' fast path: one word of the
/// address read, not four.
#[inline(always)]
pub fn v6_socket_address_may_be_protected(last: u32) -> bool {
    let slot = filter_slot_of_last_word(last);
    PROTECTED_FILTER
        .get(0)
        .is_none_or(|filter| filter_has(&filter.v6, slot) || filter_has(&filter.v4, slot))
}

/// The generation in force. An attempt reads it once and makes every lookup with it, so it is
/// judged by one generation's complete policy: the agent removes a generation's entries only
/// after a grace period that outlasts every program that read it as in force.
#[inline]
pub fn generation_in_force() -> u32 {
    let generation = GENERATION.get(0).copied().unwrap_or(0) & 1;
    #[cfg(feature = "switch-race-window")]
    widen_switch_window();
    generation
}

/// Test builds only: spins up to 2 ms (a bounded loop the verifier can follow; each turn
/// reads the clock 16 times), so that an attempt in flight straddles the policy switches a
/// test makes, the agent's removal of the old generation included.
#[cfg(feature = "switch-race-window")]
fn widen_switch_window() {
    use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
    const SPIN_NS: u64 = 2_000_000;
    // SAFETY: a helper without arguments.
    let start = unsafe { bpf_ktime_get_ns() };
    for _ in 0..4096 {
        let mut now = 0;
        for _ in 0..16 {
            // SAFETY: as above.
            now = unsafe { bpf_ktime_get_ns() };
        }
        if now.wrapping_sub(start) > SPIN_NS {
            break;
        }
    }
}

/// An address as events carry it: network-order bytes.
#[inline]
pub fn bytes_of(words: [u32; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    for (i, word) in words.iter().enumerate() {
        addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    addr
}
