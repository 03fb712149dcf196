//! Values the verifier must not see through.
//!
//! The verifier walks every path through a program and keeps a state per path where it cannot
//! prove two the same; a constant a later branch decides on is part of every state after it.
//! A few such facts (the kind of task, whether the socket is connected, ...) computed on
//! different paths before the cgroup walk multiply its states: on Linux 6.1 the packet
//! program went past the verifier's million instructions that way, while 6.18 needed 90
//! thousand. Passed through a map value, each fact becomes one unknown the verifier explores
//! once, whatever path computed it.

use aya_ebpf::{macros::map, maps::PerCpuArray};

/// Slots per CPU: one per program that can be inside [`word`] at once on a CPU. A program in
/// process context can be interrupted by one for a packet sent from a softirq; no deeper
/// nesting reaches these hooks.
const SLOTS: usize = 4;

/// A CPU's slots, and how many programs on it are inside [`word`] now.
#[repr(C)]
pub struct Slots {
    depth: u64,
    slots: [u64; SLOTS],
}

/// Not pinned: nothing in it outlives one call of [`word`].
#[map(name = "OPAQUE")]
static OPAQUE: PerCpuArray<Slots> = PerCpuArray::with_max_entries(1, 0);

/// `value`, as the verifier sees a map value: unknown. `None` if there is no slot for it (never
/// in practice), for the caller to fail closed.
///
/// Each nesting level has its own slot, so a program that interrupts this one on the same CPU
/// between the write and the read cannot put its value there: it finds the depth raised and
/// uses the next slot, and puts the depth back before this one resumes. (Interruptions nest,
/// so the plain per-CPU counter needs no atomics.)
#[inline]
pub fn word(value: u64) -> Option<u64> {
    let slots = OPAQUE.get_ptr_mut(0)?;
    // SAFETY: this CPU's entry of a one-entry array, valid while the program runs; the level is
    // checked against the array's length, and the volatile accesses keep LLVM from passing the
    // value around the map.
    unsafe {
        let depth = core::ptr::read_volatile(&raw const (*slots).depth);
        if depth >= SLOTS as u64 {
            return None;
        }
        core::ptr::write_volatile(&raw mut (*slots).depth, depth + 1);
        #[expect(clippy::cast_possible_truncation, reason = "below SLOTS")]
        let slot = (&raw mut (*slots).slots).cast::<u64>().add(depth as usize);
        core::ptr::write_volatile(slot, value);
        let value = core::ptr::read_volatile(slot);
        core::ptr::write_volatile(&raw mut (*slots).depth, depth);
        Some(value)
    }
}
