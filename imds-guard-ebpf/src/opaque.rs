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

/// One per-CPU slot the programs write a value into and read it back from. Not pinned: it
/// holds nothing between two runs of a program.
#[map(name = "OPAQUE")]
static OPAQUE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `value`, as the verifier sees a map value: unknown. `None` if the slot cannot be had (it
/// always can: one entry, index 0), for the caller to fail closed.
#[inline]
pub fn word(value: u64) -> Option<u64> {
    let slot = OPAQUE.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot of a one-entry array; the program cannot migrate while it runs,
    // and the volatile accesses keep LLVM from passing the value around the map.
    unsafe {
        core::ptr::write_volatile(slot, value);
        Some(core::ptr::read_volatile(slot))
    }
}
