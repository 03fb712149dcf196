//! Which destinations are protected. A bitmap answers "not protected" for almost every address
//! in a few instructions and no helper call; only a destination it does not rule out is looked
//! up, in the entries of the generation in force.

use imds_guard_common::{
    event::{FAMILY_INET, FAMILY_INET6},
    policy::{ProtectedV4Key, ProtectedV6Key, filter_has, filter_slot_v4, filter_slot_v6},
};

use crate::maps::{GENERATION, PROTECTED_FILTER, PROTECTED_V4, PROTECTED_V6};

/// A destination as packets carry it: `::ffff:a.b.c.d` is the IPv4 address.
#[derive(Clone, Copy)]
pub enum Destination {
    /// Network-order bytes read as a native `u32`.
    V4(u32),
    /// Four native `u32` words of network-order bytes.
    V6([u32; 4]),
}

/// `::ffff:0:0/96`, the IPv4-mapped prefix, as the third word of an IPv6 address.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Destination {
    /// The destination of an IPv6 address: the IPv4 address of `::ffff:a.b.c.d`. `None` for
    /// `::` (an unconnected socket's peer).
    #[inline]
    pub fn of_v6(words: [u32; 4]) -> Option<Self> {
        match words {
            [0, 0, 0, 0] => None,
            [0, 0, V4_MAPPED_WORD, v4] => Some(Self::V4(v4)),
            words => Some(Self::V6(words)),
        }
    }

    /// Whether the destination may be protected in some generation: `false` is certain.
    #[inline]
    pub fn may_be_protected(self) -> bool {
        // The array has one entry, which always exists; were it missing, look the address up.
        let Some(filter) = PROTECTED_FILTER.get(0) else {
            return true;
        };
        match self {
            Self::V4(addr) => filter_has(&filter.v4, filter_slot_v4(addr)),
            Self::V6(addr) => filter_has(&filter.v6, filter_slot_v6(addr)),
        }
    }

    /// Whether `generation` protects the destination.
    #[inline]
    pub fn protected_in(self, generation: u32) -> bool {
        // SAFETY: plain values, only read.
        unsafe {
            match self {
                Self::V4(addr) => PROTECTED_V4
                    .get(ProtectedV4Key { generation, addr })
                    .is_some(),
                Self::V6(addr) => PROTECTED_V6
                    .get(ProtectedV6Key { generation, addr })
                    .is_some(),
            }
        }
    }

    /// Whether both are the same destination.
    #[inline]
    pub fn same(self, other: Self) -> bool {
        let ((family, words), (other_family, other_words)) = (self.words(), other.words());
        family == other_family && same_words(words, other_words)
    }

    /// `FAMILY_*` and the address as four words (IPv4 in the first).
    #[inline]
    pub fn words(self) -> (u8, [u32; 4]) {
        match self {
            Self::V4(addr) => (FAMILY_INET, [addr, 0, 0, 0]),
            Self::V6(words) => (FAMILY_INET6, words),
        }
    }
}

/// The generation in force. An attempt reads it once and makes every lookup with it, so it is
/// judged by one generation's complete policy: the agent removes a generation's entries only
/// after a grace period that outlasts every program that read it as in force.
#[inline]
pub fn generation_in_force() -> u32 {
    GENERATION.get(0).copied().unwrap_or(0) & 1
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

/// Word-by-word equality (an array comparison could become a `bcmp` call, which BPF lacks).
#[inline]
pub fn same_words(a: [u32; 4], b: [u32; 4]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}
