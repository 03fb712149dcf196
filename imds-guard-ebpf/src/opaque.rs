//! Values the verifier must not see through.
//!
//! The verifier walks every path through a program and keeps a state per path where it cannot
//! prove two the same; a constant a later branch decides on is part of every state after it.
//! A few such facts (the kind of task, whether the socket is connected, ...) computed on
//! different paths before the cgroup walk multiply its states: on Linux 6.1 the packet
//! program went past the verifier's million instructions that way, while 6.18 needed 90
//! thousand. Made into a value the verifier knows only as a number, each fact becomes one
//! unknown it explores once, whatever path computed it. Three ways to such a value here: a
//! global function's result ([`opaque_word`]; the socket hooks'
//! `task::current_task_kind_fallback`); a load from the program's context of what it stored
//! there (the packet layer's `opaque_found`, through the packet's control block); a value
//! computed from loaded ones without a branch (the socket hooks' `task::current_task_kind`).
//!
//! (Through a per-CPU map slot before: a program that interrupted another holding the slot on
//! its CPU found it busy and had to fail closed, unreported.)

/// `value`, as the verifier sees a global function's result: unknown. A global function is
/// verified once on its own, and its caller only knows that it returns a number. The value
/// goes through a volatile slot of the function's stack, so that LLVM cannot pass it around
/// the call either (it would know the function returns its argument). Cannot fail: the slot
/// is this call's own.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn opaque_word(value: u64) -> u64 {
    let mut slot = 0u64;
    // SAFETY: a local of this frame.
    unsafe {
        core::ptr::write_volatile(&raw mut slot, value);
        core::ptr::read_volatile(&raw const slot)
    }
}
