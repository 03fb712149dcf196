//! What the programs record of each judged attempt, for the agent: counters, and events (or
//! folded repeats).

use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid,
    generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns},
};
use imds_guard_common::{
    event::{
        COMM_LEN, Event, FOLD_CLOCK_COARSE, FOLD_FLAGS, FoldKey, FoldValue, UNREAD_COMM,
        UNREAD_EXE, UNREAD_PARENT, VERDICT_ALLOW, VERDICT_AUDIT,
    },
    http::HTTP_REQUEST_BYTES,
    maps::{COUNTER_EVENTS_LOST, COUNTER_FOLDED, rule_counter_index},
};

use crate::{
    maps::{COUNTERS, EVENTS, FOLDS, RULE_COUNTERS},
    task::{self, Executable},
};

/// 1 in the build the upgrade tests switch to (feature `upgrade-test-variant`), else 0: the one
/// difference between the two programs, in a padding byte the agent ignores.
const BUILD_VARIANT: u8 = if cfg!(feature = "upgrade-test-variant") {
    1
} else {
    0
};

/// Repeats of an attempt within this many nanoseconds of the one that opened the window are
/// folded (set by the agent before loading; 0 folds nothing).
#[unsafe(no_mangle)]
static FOLD_WINDOW_NS: u64 = 0;

/// The clock of fold windows, `FOLD_CLOCK_*` (set by the agent before loading: the coarse one
/// where the kernel offers its helper; with the boot clock the verifier never reaches that
/// call, which an older kernel would refuse).
#[unsafe(no_mangle)]
static FOLD_CLOCK: u32 = 0;

/// Now, in the fold clock (see `FOLD_CLOCK`).
#[inline(always)]
fn fold_clock_ns() -> u64 {
    // SAFETY: a read-only global the agent sets before loading; helpers without arguments
    // (Linux 5.11+ and 5.8+: the agent chose the first only where the kernel has it).
    unsafe {
        if core::ptr::read_volatile(&raw const FOLD_CLOCK) == FOLD_CLOCK_COARSE {
            bpf_ktime_get_coarse_ns()
        } else {
            bpf_ktime_get_boot_ns()
        }
    }
}

/// What the verdict code knows about an attempt; the rest is read here.
pub struct Attempt {
    pub verdict: u8,
    pub rule: u32,
    pub generation: u8,
    pub hook: u8,
    pub family: u8,
    pub port: u16,
    pub protocol: u8,
    pub uid: u32,
    pub gid: u32,
    pub addr: [u8; 16],
    /// `EVENT_FLAG_*` bits.
    pub flags: u8,
    /// `IMDS_VERSION_*` of an HTTP request, else 0.
    pub imds_version: u8,
    /// `REFUSED_*` of an HTTP request, else 0.
    pub refused: u8,
}

/// What a program's verdict code hands its event function ([`crate::verdict::sock_addr_event`],
/// [`crate::packet::packet_event`]): an [`Attempt`] but for its address (two more words,
/// [`address_words`], for the socket hooks; the packet's event function reads it from the
/// packet) and what that function reads again itself (port, protocol), in the scalar arguments
/// a global function allows beside its context (a pointer needs Linux 5.12+). The one place
/// that knows their layout.
pub struct Decided {
    pub verdict: u8,
    pub rule: u32,
    /// 0 or 1.
    pub generation: u8,
    pub hook: u8,
    /// `FAMILY_INET` or `FAMILY_INET6`.
    pub family: u8,
    /// `EVENT_FLAG_*` bits.
    pub flags: u8,
    pub uid: u32,
    pub gid: u32,
}

impl Decided {
    /// As two words.
    #[inline(always)]
    pub fn words(&self) -> [u64; 2] {
        [
            u64::from(self.rule)
                | u64::from(self.verdict) << 32
                | u64::from(self.hook) << 40
                | u64::from(self.flags) << 48
                | u64::from(self.generation & 0x0f) << 56
                | u64::from(self.family & 0x0f) << 60,
            u64::from(self.uid) | u64::from(self.gid) << 32,
        ]
    }

    /// From [`Decided::words`].
    #[inline(always)]
    #[expect(clippy::cast_possible_truncation, reason = "fields packed by `words`")]
    pub fn of_words([first, ids]: [u64; 2]) -> Self {
        Self {
            rule: first as u32,
            verdict: (first >> 32) as u8,
            hook: (first >> 40) as u8,
            flags: (first >> 48) as u8,
            generation: (first >> 56) as u8 & 0x0f,
            family: (first >> 60) as u8,
            uid: ids as u32,
            gid: (ids >> 32) as u32,
        }
    }

    /// The attempt to `addr` (four words, as [`crate::protected::bytes_of`] takes them), with
    /// what the event function read.
    #[inline(always)]
    pub fn attempt(&self, words: [u32; 4], port: u16, protocol: u8) -> Attempt {
        Attempt {
            verdict: self.verdict,
            rule: self.rule,
            generation: self.generation,
            hook: self.hook,
            family: self.family,
            port,
            protocol,
            uid: self.uid,
            gid: self.gid,
            addr: crate::protected::bytes_of(words),
            flags: self.flags,
            imds_version: 0,
            refused: 0,
        }
    }
}

/// An address's four words (as [`crate::protected::bytes_of`] takes them) in two, for an event
/// function's arguments ([`Decided`]).
#[inline(always)]
pub fn address_words(addr: [u32; 4]) -> [u64; 2] {
    [
        u64::from(addr[0]) | u64::from(addr[1]) << 32,
        u64::from(addr[2]) | u64::from(addr[3]) << 32,
    ]
}

/// The four words of an address [`address_words`] made two.
#[inline(always)]
pub fn address_of_words([low, high]: [u64; 2]) -> [u32; 4] {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "words packed by `address_words`"
    )]
    [
        low as u32,
        (low >> 32) as u32,
        high as u32,
        (high >> 32) as u32,
    ]
}

/// Who made an attempt, as far as the hook can tell.
pub struct Identity {
    /// Thread id (low half) and process id (high half); 0 when no task is known.
    pub pid_tgid: u64,
    /// The thread's name; zeroes when no task is known.
    pub comm: [u8; COMM_LEN],
    /// The parent process's id and main thread name.
    pub parent: Option<(u32, [u8; COMM_LEN])>,
    /// The executable.
    pub exe: Option<Executable>,
    /// `UNREAD_*` bits.
    pub unread: u8,
}

impl Identity {
    /// The task making the system call (socket address hooks run in its context).
    pub fn current_task() -> Self {
        let comm = bpf_get_current_comm();
        let parent = task::current_parent();
        let exe = task::current_executable();
        Self {
            pid_tgid: bpf_get_current_pid_tgid(),
            unread: if comm.is_err() { UNREAD_COMM } else { 0 }
                | if parent.is_none() { UNREAD_PARENT } else { 0 }
                | if exe.is_none() { UNREAD_EXE } else { 0 },
            comm: comm.unwrap_or([0; COMM_LEN]),
            parent,
            exe,
        }
    }

    /// The task writing to a socket (the message program runs in its context, but cannot read
    /// its `task_struct`: the agent names it from `/proc`).
    pub fn writer() -> Self {
        Self {
            pid_tgid: bpf_get_current_pid_tgid(),
            comm: [0; COMM_LEN],
            parent: None,
            exe: None,
            unread: UNREAD_PARENT | UNREAD_COMM | UNREAD_EXE,
        }
    }

    /// A packet's sender: no task is known.
    pub fn socket() -> Self {
        Self {
            pid_tgid: 0,
            comm: [0; COMM_LEN],
            parent: None,
            exe: None,
            unread: UNREAD_PARENT | UNREAD_COMM | UNREAD_EXE,
        }
    }
}

/// Adds one to the current CPU's counter `index`.
pub fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a live per-CPU slot.
        unsafe { atomic_increment(counter) };
    }
}

/// Counts a judged attempt: one added to the current CPU's count of `verdict`s by `rule` of
/// `generation`, the attempt's one counter update (the totals by verdict are the agent's sum).
pub fn count_attempt(generation: u32, rule: u32, verdict: u8) {
    if let Some(counts) = RULE_COUNTERS.get_ptr_mut(rule_counter_index(generation, rule)) {
        // SAFETY: a live per-CPU slot.
        unsafe {
            atomic_increment(match verdict {
                VERDICT_ALLOW => &raw mut (*counts).allowed,
                VERDICT_AUDIT => &raw mut (*counts).audited,
                _ => &raw mut (*counts).denied,
            });
        }
    }
}

/// The cgroup of the task making the system call.
pub fn current_cgroup_id() -> u64 {
    // SAFETY: a helper without arguments (Linux 4.18+).
    unsafe { bpf_get_current_cgroup_id() }
}

/// Reports a denied or audited attempt by process `tgid` (0 for a packet) in `cgroup_id`:
/// folded as a repeat when an identical attempt opened a window less than `FOLD_WINDOW_NS`
/// ago, else written as an event (`who` is only asked then), with the request line of an HTTP
/// request (`request`: the bytes and how many of them count). When the ring buffer is full the
/// loss is counted. The verdict stands either way.
pub fn event(
    attempt: &Attempt,
    cgroup_id: u64,
    tgid: u32,
    who: impl FnOnce() -> Identity,
    request: Option<(&[u8; HTTP_REQUEST_BYTES], u16)>,
) {
    if fold(attempt, cgroup_id, tgid) {
        count(COUNTER_FOLDED);
        return;
    }
    // The event's own time, read precisely (a second read of the clock where windows are
    // timed by the coarse one: a repeat is what must cost little, an event costs more anyway).
    // SAFETY: a helper without arguments (Linux 5.8+).
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(COUNTER_EVENTS_LOST);
        return;
    };
    let identity = who();
    let pid_tgid = identity.pid_tgid;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "splitting a u64 into halves"
    )]
    let (pid, tgid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
    let event = entry.as_mut_ptr();
    // SAFETY: the reserved record is `size_of::<Event>()` writable bytes, 8-aligned. Zeroed
    // first, a word a store (padding, path components shorter than their slot, slots and
    // request bytes not used), then each field written in place: the whole event (with its
    // executable path) would not fit the program's 512-byte stack.
    unsafe {
        zero_words(event.cast::<u64>(), core::mem::size_of::<Event>() / 8);
        (*event).boot_ns = now;
        (*event).cgroup_id = cgroup_id;
        (*event).pid = pid;
        (*event).tgid = tgid;
        (*event).uid = attempt.uid;
        (*event).gid = attempt.gid;
        (*event).rule = attempt.rule;
        (*event).verdict = attempt.verdict;
        (*event).hook = attempt.hook;
        (*event).family = attempt.family;
        (*event).protocol = attempt.protocol;
        (*event).port = attempt.port;
        (*event).generation = attempt.generation;
        (*event).unread = identity.unread;
        (*event).flags = attempt.flags;
        (*event)._pad[2] = BUILD_VARIANT;
        (*event).addr = attempt.addr;
        (*event).comm = identity.comm;
        if let Some((ppid, comm)) = identity.parent {
            (*event).ppid = ppid;
            (*event).parent_comm = comm;
        }
        (*event).imds_version = attempt.imds_version;
        (*event).refused = attempt.refused;
        if let Some((line, len)) = request {
            (*event).request = *line;
            (*event).request_len = len;
        }
        if let Some(exe) = &identity.exe {
            (*event).exe_dev = exe.dev;
            (*event).exe_ino = exe.ino;
            let path = (&raw mut (*event).exe_path).cast::<u8>();
            let (parts, flags) = task::write_path(exe, path);
            (*event).exe_parts = parts;
            (*event).exe_flags = flags;
        }
    }
    entry.submit(0);
}

/// Writes zero to `words` words at `at`, one store each. (Zeroing the event's fields as arrays
/// became a call to `memset`, which stores a byte a turn: 568 turns an event, each followed by
/// the verifier too.)
///
/// # Safety
/// `at` points to `words` writable, aligned `u64`s.
#[inline(always)]
unsafe fn zero_words(at: *mut u64, words: usize) {
    for word in 0..words {
        // SAFETY: as the caller promises; volatile, so that LLVM cannot make it `memset` again.
        unsafe { core::ptr::write_volatile(at.add(word), 0) };
    }
}

/// Counts `attempt` as a repeat if an identical one opened a window less than the fold window
/// before now (the fold clock's); otherwise opens a window now and returns `false` (report it).
fn fold(attempt: &Attempt, cgroup_id: u64, tgid: u32) -> bool {
    // SAFETY: a read-only global the agent sets before loading.
    let window = unsafe { core::ptr::read_volatile(&raw const FOLD_WINDOW_NS) };
    if window == 0 {
        return false;
    }
    let now = fold_clock_ns();
    let key = FoldKey {
        cgroup_id,
        uid: attempt.uid,
        gid: attempt.gid,
        rule: attempt.rule,
        verdict: attempt.verdict,
        generation: attempt.generation,
        hook: attempt.hook,
        family: attempt.family,
        addr: attempt.addr,
        tgid,
        port: attempt.port,
        flags: attempt.flags & FOLD_FLAGS,
        imds_version: attempt.imds_version,
    };
    let Some(value) = FOLDS.get_ptr_mut(key) else {
        let value = FoldValue {
            window_start_ns: now,
            last_ns: now,
            folded: 0,
        };
        // A full map evicts its least recently used entry; an error only means this attempt's
        // repeats are reported one by one.
        let _ = FOLDS.insert(key, value, 0);
        return false;
    };
    // SAFETY: a live map value; concurrent programs update it too: the count with an atomic
    // add (exact), the times with plain stores (a race only blurs a time).
    unsafe {
        let start = (*value).window_start_ns;
        // Another CPU may have opened the window a little after `now`: still within. One that
        // opened a whole window after `now` was timed by another clock (a predecessor agent's,
        // whose probe chose the other one): closed, so that it cannot fold for longer.
        if now.saturating_sub(start) < window && start.saturating_sub(now) < window {
            atomic_increment(&raw mut (*value).folded);
            (*value).last_ns = now;
            return true;
        }
        (*value).window_start_ns = now;
    }
    false
}

/// Adds one to `*counter`, atomically: with respect to other CPUs (a map value's), and to a
/// program that interrupts or preempts this one on the same CPU (a per-CPU slot's: a program
/// cannot migrate while it runs, but Linux 5.11+ runs cgroup programs with migration disabled,
/// not preemption, and a packet program in a softirq can interrupt a socket hook, so a plain
/// load, add and store could overwrite the other's count of the same slot).
///
/// # Safety
/// `counter` points to a live, aligned `u64`.
#[inline(always)]
pub unsafe fn atomic_increment(counter: *mut u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: as the caller promises.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, 1,
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as the caller promises.
    unsafe {
        core::sync::atomic::AtomicU64::from_ptr(counter)
            .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decided_attempt_reads_back_from_its_words() {
        let decided = Decided {
            verdict: 3,
            rule: 0xfedc_ba98,
            generation: 1,
            hook: 5,
            family: 10,
            flags: 0x81,
            uid: 0xffff_fffe,
            gid: 0x8000_0001,
        };
        let addr = [0xfd00_0ec2, 0, 0x1234_5678, 0x0254_0000];
        let back = Decided::of_words(decided.words()).attempt(
            address_of_words(address_words(addr)),
            80,
            17,
        );
        assert_eq!(
            (
                back.verdict,
                back.rule,
                back.generation,
                back.hook,
                back.family
            ),
            (3, 0xfedc_ba98, 1, 5, 10)
        );
        assert_eq!(
            (back.flags, back.uid, back.gid),
            (0x81, 0xffff_fffe, 0x8000_0001)
        );
        assert_eq!(
            (back.addr, back.port, back.protocol),
            (crate::protected::bytes_of(addr), 80, 17)
        );
    }
}
