//! Values the verifier must not see through.
//!
//! The verifier walks every path through a program and keeps a state per path where it cannot
//! prove two the same; a constant a later branch decides on is part of every state after it.
//! A few such facts (the kind of task, whether the socket is connected, ...) computed on
//! different paths before the cgroup walk multiply its states: on Linux 6.1 the packet
//! program went past the verifier's million instructions that way, while 6.18 needed 90
//! thousand. Passed through a map value, each fact becomes one unknown the verifier explores
//! once, whatever path computed it. (A global function's result is such an unknown too, without
//! the map, and so is a value computed from loaded ones without a branch: the socket hooks get
//! the kind of task so, from `task::current_task_kind`.)

use aya_ebpf::{macros::map, maps::PerCpuArray};

/// A CPU's slot, and whether a program on it is using the slot now.
#[repr(C)]
pub struct Slot {
    busy: u64,
    value: u64,
}

/// Not pinned: nothing in it outlives one call of [`word`].
#[map(name = "OPAQUE")]
static OPAQUE: PerCpuArray<Slot> = PerCpuArray::with_max_entries(1, 0);

/// `value`, as the verifier sees a map value: unknown. `None` when the slot cannot be had, for
/// the caller to fail closed.
///
/// A program can be interrupted on its CPU by another that comes here too (a packet sent from
/// a softirq while a task's packet is judged). The interrupted one has marked the slot busy
/// before writing it, so the interrupting one finds it busy and fails closed: its packet is
/// dropped once (TCP sends it again), and the value the interrupted one reads back is its own.
/// An interruption before the mark finishes before the interrupted program touches the slot.
/// (Interruptions nest, so the plain per-CPU flag needs no atomics. A slot per nesting level
/// would spare that packet, but a variable offset into the map value tripled what the
/// socket hooks cost Linux 6.1's verifier.)
#[inline]
pub fn word(value: u64) -> Option<u64> {
    let slot = OPAQUE.get_ptr_mut(0)?;
    // SAFETY: this CPU's entry of a one-entry array, valid while the program runs; the
    // volatile accesses keep LLVM from passing the value around the map, or reordering them.
    unsafe {
        if core::ptr::read_volatile(&raw const (*slot).busy) != 0 {
            return None;
        }
        core::ptr::write_volatile(&raw mut (*slot).busy, 1);
        core::ptr::write_volatile(&raw mut (*slot).value, value);
        let value = core::ptr::read_volatile(&raw const (*slot).value);
        core::ptr::write_volatile(&raw mut (*slot).busy, 0);
        Some(value)
    }
}
