//! What the programs read of the current task beyond what helpers give: its parent, whether it
//! runs in a container (its namespaces) and what executable it runs.
//!
//! aya does not relocate field offsets (CO-RE) in Rust programs: the agent finds them in the
//! running kernel's BTF and sets [`TASK_LAYOUT`] before loading. It is a read-only global, so
//! the verifier sees constants: a group of reads whose `LAYOUT_*` bit is clear is never
//! reached.
//!
//! Two ways to read, chosen by `LAYOUT_BTF_TASK`: plain loads from the task that
//! `bpf_get_current_task_btf` gives (the verifier checks each against the kernel's BTF and
//! makes it a load that reads 0 instead of faulting; a few nanoseconds each), or
//! `bpf_probe_read_kernel` per field (about fifty). Kernels that refuse the first helper to
//! these program types load a build with the second; those that refuse `bpf_get_current_task`
//! or `bpf_probe_read_kernel` too, one with `known == 0` (the agent retries so, and says so).

use aya_ebpf::helpers::{
    bpf_get_current_uid_gid, bpf_probe_read_kernel,
    generated::{self, bpf_get_current_task, bpf_get_current_task_btf, bpf_probe_read_kernel_str},
};
use imds_guard_common::{
    event::{
        COMM_LEN, EXE_FLAG_TRUNCATED, EXE_PART_LEN, EXE_PATH_PARTS, LAYOUT_BTF_TASK, LAYOUT_EXE,
        LAYOUT_NAMESPACES, LAYOUT_PARENT, TaskLayout,
    },
    policy::{INIT_CGROUP_NS_INO, TASK_CONTAINER, TASK_HOST},
};

/// Where `task_struct` and what it points to keep what this module reads: set by the agent
/// from the kernel's BTF before loading (see the module's documentation).
#[unsafe(no_mangle)]
static TASK_LAYOUT: TaskLayout = TaskLayout {
    known: 0,
    real_parent: 0,
    group_leader: 0,
    tgid: 0,
    comm: 0,
    thread_pid: 0,
    pid_level: 0,
    nsproxy: 0,
    cgroup_ns: 0,
    cgroup_ns_inum: 0,
    cgroups: 0,
    dfl_cgrp: 0,
    cgroup_kn: 0,
    kn_id: 0,
    cred: 0,
    fsuid: 0,
    uid: 0,
    gid: 0,
    mm: 0,
    exe_file: 0,
    f_inode: 0,
    f_dentry: 0,
    i_ino: 0,
    i_sb: 0,
    s_dev: 0,
    d_name: 0,
    d_parent: 0,
};

/// One field of [`TASK_LAYOUT`], as the agent set it (`layout(|l| &l.nsproxy)`).
///
/// One volatile read of that field alone: a volatile read of the whole struct made LLVM load
/// every one of its 25 words at each use, and the verifier, though it knows their values, keeps
/// the loads: 150 of them in what is now [`kind_of_current`], most of its 23% of an allowed
/// `connect()`'s time in the program.
#[inline(always)]
fn layout(field: fn(&TaskLayout) -> &u32) -> u32 {
    // SAFETY: a read-only global the agent sets before loading; `field` picks one of its fields.
    unsafe { core::ptr::read_volatile(field(&TASK_LAYOUT)) }
}

/// Whether the agent found `LAYOUT_*` `bits` in the kernel's BTF (and, for `LAYOUT_BTF_TASK`,
/// chose BTF-typed loads).
#[inline(always)]
fn known(bits: u32) -> bool {
    layout(|l| &l.known) & bits != 0
}

/// The current task: a BTF-typed pointer with `LAYOUT_BTF_TASK`, else a plain address.
#[inline]
fn current() -> *const u8 {
    if known(LAYOUT_BTF_TASK) {
        // SAFETY: a helper without arguments (Linux 5.11+ where offered); its result is only
        // loaded from, each load checked by the verifier against the kernel's BTF.
        unsafe { bpf_get_current_task_btf() as *const u8 }
    } else {
        // SAFETY: a helper without arguments; the result is only used as an address to read
        // from with `bpf_probe_read_kernel`.
        unsafe { bpf_get_current_task() as *const u8 }
    }
}

/// Reads a `T` at `offset` bytes into the kernel object at `base` (a pointer [`current`] gave,
/// or one read from it): a plain load with `LAYOUT_BTF_TASK`, which the verifier turns into one
/// that reads 0 instead of faulting; else `bpf_probe_read_kernel`, `None` when it fails.
///
/// # Safety
/// None beyond the verifier's and the helper's: a bad address never faults.
#[inline]
unsafe fn read<T: Copy>(base: *const u8, offset: u32) -> Option<T> {
    // SAFETY: as the function says.
    unsafe {
        if known(LAYOUT_BTF_TASK) {
            Some(load(base, offset))
        } else {
            bpf_probe_read_kernel(base.add(offset as usize).cast::<T>()).ok()
        }
    }
}

/// A BTF-typed load of a `T` at `offset` bytes into the kernel object at `base`: the verifier
/// checks it against the kernel's BTF and makes it one that reads 0 instead of faulting.
///
/// # Safety
/// `LAYOUT_BTF_TASK` is set, and `base` is a pointer [`current`] gave or one read from it so.
#[inline(always)]
unsafe fn load<T: Copy>(base: *const u8, offset: u32) -> T {
    // SAFETY: as the caller promises.
    unsafe { core::ptr::read_volatile(base.add(offset as usize).cast::<T>()) }
}

/// As [`read`], but the value is always defined (0 for a failed read) and the outcome a flag
/// beside it (`true`: failed), with no branch between the read and its use: the value is a
/// stack slot written before the helper's call (which zeroes it too when it fails).
///
/// # Safety
/// As [`read`].
#[inline]
unsafe fn read_flagged<T: Copy + Default>(base: *const u8, offset: u32) -> (T, bool) {
    // SAFETY: as the function says.
    unsafe {
        if known(LAYOUT_BTF_TASK) {
            (load(base, offset), false)
        } else {
            let mut value = T::default();
            #[expect(clippy::cast_possible_truncation, reason = "a word or two")]
            let result = generated::bpf_probe_read_kernel(
                (&raw mut value).cast(),
                size_of::<T>() as u32,
                base.add(offset as usize).cast(),
            );
            (value, result != 0)
        }
    }
}

/// How a group of reads reaches the task's fields, so that one walk serves both ways:
/// [`Loads`] where the caller tested `LAYOUT_BTF_TASK` once (straight-line BTF-typed loads,
/// none of which fails), [`AsTheLayoutSays`] otherwise (each read tests the layout: BTF-typed
/// loads or `bpf_probe_read_kernel`; the JIT keeps each test's load and a jump, where the
/// verifier removed the way not taken).
trait Reads {
    /// Whether the reads are BTF-typed loads (a load through a null pointer reads 0).
    fn btf() -> bool;
    /// The current task ([`current`]).
    fn current() -> *const u8;
    /// [`read`].
    ///
    /// # Safety
    /// As [`read`].
    unsafe fn read<T: Copy>(base: *const u8, offset: u32) -> Option<T>;
    /// [`read_flagged`].
    ///
    /// # Safety
    /// As [`read`].
    unsafe fn read_flagged<T: Copy + Default>(base: *const u8, offset: u32) -> (T, bool);
}

/// BTF-typed loads: only where the caller tested `LAYOUT_BTF_TASK` (so that the verifier never
/// reaches these reads, nor `bpf_get_current_task_btf`, on a kernel without them).
struct Loads;

impl Reads for Loads {
    #[inline(always)]
    fn btf() -> bool {
        true
    }

    #[inline(always)]
    fn current() -> *const u8 {
        // SAFETY: a helper without arguments (Linux 5.11+, where the agent sets
        // `LAYOUT_BTF_TASK`); its result is only loaded from, as `load` says.
        unsafe { bpf_get_current_task_btf() as *const u8 }
    }

    #[inline(always)]
    unsafe fn read<T: Copy>(base: *const u8, offset: u32) -> Option<T> {
        // SAFETY: as the caller promises, with `LAYOUT_BTF_TASK` tested.
        Some(unsafe { load(base, offset) })
    }

    #[inline(always)]
    unsafe fn read_flagged<T: Copy + Default>(base: *const u8, offset: u32) -> (T, bool) {
        // SAFETY: as above.
        (unsafe { load(base, offset) }, false)
    }
}

/// Each read as `LAYOUT_BTF_TASK` says ([`read`]).
struct AsTheLayoutSays;

impl Reads for AsTheLayoutSays {
    #[inline(always)]
    fn btf() -> bool {
        known(LAYOUT_BTF_TASK)
    }

    #[inline(always)]
    fn current() -> *const u8 {
        current()
    }

    #[inline(always)]
    unsafe fn read<T: Copy>(base: *const u8, offset: u32) -> Option<T> {
        // SAFETY: as the caller promises.
        unsafe { read(base, offset) }
    }

    #[inline(always)]
    unsafe fn read_flagged<T: Copy + Default>(base: *const u8, offset: u32) -> (T, bool) {
        // SAFETY: as the caller promises.
        unsafe { read_flagged(base, offset) }
    }
}

/// Which `ALLOW` keys judge the current task, and its uid: [`TASK_CONTAINER`] when its pid or
/// cgroup namespace is not the host's initial one (container runtimes make both; systemd
/// services make neither), [`TASK_HOST`] otherwise. Read at the attempt, so a container is one
/// from its first instruction, whether or not the agent has seen its cgroup yet. A failed read
/// counts as a container (fail closed). Without the layout (a kernel that refused the reads)
/// every task is [`TASK_HOST`] here, and containers are known by their cgroup path alone.
///
/// The kind is in the low bits ([`kind_of`]); [`FSUID_NOT_UID`] is set when the sockets the
/// task makes are owned by another uid than its own ([`owns_sockets_as_another`]); the uid is
/// the high half ([`uid_of`]), read from the credentials this reads for the file system uid
/// (the uid read on its own cost the allowed path a second task pointer from a helper and a
/// second walk to the credentials), or asked of `bpf_get_current_uid_gid` where they cannot be
/// trusted (`Credentials::uid_trusted`).
///
/// Read in place where the task's fields are BTF-typed loads and its credentials' pointer is
/// not null (always, for a task making a system call): straight-line loads ([`Loads`]) after
/// one test of the layout and one of the pointer. Otherwise (without the namespaces' layout,
/// with `bpf_probe_read_kernel` reads, each of which may fail, or for the helper's uid) by the
/// global function [`current_task_kind_fallback`]: the same walks ([`credentials`],
/// [`kind_of_current`]) and the same arithmetic ([`kind_bits`]), which has no branch where
/// every read is a load: after it the verifier explores the decision once, with the kind and
/// the flag as numbers, as after the global function's return. (The reads with branches made
/// it explore the decision once per way they went, and the agent's start took 55 ms longer;
/// the global function's call on every attempt, and reads that each tested the layout, cost an
/// allowed attempt 10-30 ns by table 0b of BENCHMARKS.md.)
#[inline(always)]
pub fn current_task_kind() -> u64 {
    if known(LAYOUT_BTF_TASK) && known(LAYOUT_NAMESPACES) {
        let task = Loads::current();
        let credentials = credentials::<Loads>(task);
        // With loads, only a null credentials' pointer leaves the uid untrusted.
        if credentials.uid_trusted {
            return kind_of_current::<Loads>(task, credentials) | u64::from(credentials.uid) << 32;
        }
    }
    current_task_kind_fallback()
}

/// [`current_task_kind`] without the namespaces' layout, where its reads are not BTF-typed
/// loads, or when the credentials' pointer read null: a global function, which the verifier
/// checks once on its own, and whose result it knows only as a number (the paths that computed
/// it do not multiply its states after the call, what a value passed through a map did before:
/// see `opaque`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn current_task_kind_fallback() -> u64 {
    if !known(LAYOUT_NAMESPACES) {
        return u64::from(TASK_HOST) | FSUID_NOT_UID | helper_uid();
    }
    let task = current();
    let credentials = credentials::<AsTheLayoutSays>(task);
    let uid = if credentials.uid_trusted {
        u64::from(credentials.uid) << 32
    } else {
        helper_uid()
    };
    kind_of_current::<AsTheLayoutSays>(task, credentials) | uid
}

/// In the build with feature `refused-task-reads-test-variant` only: a load from a plain number,
/// which the verifier refuses, on the paths that read a task's namespaces (the agent then meets
/// a kernel that refuses the task's reads). Nothing in any other build.
#[inline(always)]
fn refused_in_test_variant() {
    #[cfg(feature = "refused-task-reads-test-variant")]
    // SAFETY: never runs: the verifier refuses the program that holds it.
    unsafe {
        core::ptr::read_volatile(core::ptr::without_provenance::<u64>(8));
    }
}

/// [`current_task_kind`]'s kind and [`FSUID_NOT_UID`], for `task` (the current task, as
/// `R::current` gave it) with `credentials` ([`kind_bits`]). A null `nsproxy` (an exiting
/// task's) is not read through with `bpf_probe_read_kernel` (that a read at a small address
/// fails is each architecture's rule); a load through it reads 0, no namespace's inode.
#[inline(always)]
fn kind_of_current<R: Reads>(task: *const u8, credentials: Credentials) -> u64 {
    refused_in_test_variant();
    // SAFETY: reads as `R` says, from the task and through the pointers read from it.
    let (level, cgroup_ns_inum) = unsafe {
        (
            R::read::<*const u8>(task, layout(|l| &l.thread_pid))
                .and_then(|pid| R::read::<u32>(pid, layout(|l| &l.pid_level))),
            R::read::<*const u8>(task, layout(|l| &l.nsproxy))
                .filter(|nsproxy| R::btf() || !nsproxy.is_null())
                .and_then(|nsproxy| R::read::<*const u8>(nsproxy, layout(|l| &l.cgroup_ns)))
                .and_then(|ns| R::read::<u32>(ns, layout(|l| &l.cgroup_ns_inum))),
        )
    };
    kind_bits(
        level,
        cgroup_ns_inum,
        credentials.uid_read.then_some(credentials.uid),
        credentials.fsuid_read.then_some(credentials.fsuid),
    )
}

/// The kind of task and [`FSUID_NOT_UID`] of [`current_task_kind`]'s result, from what was read
/// (`None`: the read failed). [`TASK_HOST`] when the task's pid namespace's level is 0 and its
/// cgroup namespace is the initial one, else [`TASK_CONTAINER`]: a failed read counts as a
/// container, and so does a null pointer on the way to the cgroup namespace (a BTF-typed load
/// through it reads 0, which is no cgroup namespace's inode; a null pid reads level 0, and the
/// task is the host's only if its cgroup namespace is too). The flag is set unless both uids
/// were read and are the same (where a read failed, as without the layout, the caller
/// remembers the verdict its connect hook gave on the socket, rather than have the packet
/// layer judge the socket's packets by an owner it could not compare). Without a branch where
/// every read is `Some` ([`Loads`]).
#[inline(always)]
fn kind_bits(
    level: Option<u32>,
    cgroup_ns_inum: Option<u32>,
    uid: Option<u32>,
    fsuid: Option<u32>,
) -> u64 {
    let kind = match (level, cgroup_ns_inum) {
        (Some(level), Some(inum)) => {
            nonzero(u64::from(level) | u64::from(inum ^ INIT_CGROUP_NS_INO))
        }
        _ => u64::from(TASK_CONTAINER),
    };
    let fsuid_not_uid = match (uid, fsuid) {
        (Some(uid), Some(fsuid)) => nonzero(u64::from(uid ^ fsuid)),
        _ => 1,
    };
    kind | fsuid_not_uid << FSUID_NOT_UID.trailing_zeros()
}

// `kind_bits`'s arithmetic: 1 for a container, 0 for the host.
const _: () = assert!(TASK_HOST == 0 && TASK_CONTAINER == 1);

/// 1 when `x` is not 0, else 0, without a branch: `x | -x` has its top bit set exactly when `x`
/// is not 0. The negation passes through a volatile stack slot, so that LLVM cannot see the
/// comparison it is and make it one (a branch: BPF has no conditional move).
#[inline(always)]
fn nonzero(x: u64) -> u64 {
    let negated = x.wrapping_neg();
    // SAFETY: a local's own address.
    let negated = unsafe { core::ptr::read_volatile(&raw const negated) };
    (x | negated) >> 63
}

/// In [`current_task_kind`]'s result: the task's file system uid (`cred.fsuid`, which owns the
/// sockets it makes, and which `seteuid` and `setfsuid` set) is not its uid, or could not be
/// read. (Above the kind's bits, below the uid's.)
const FSUID_NOT_UID: u64 = 1 << 16;

/// Whether a task of which [`current_task_kind`] returned `returned` makes sockets another uid
/// owns ([`FSUID_NOT_UID`]).
#[inline(always)]
pub fn owns_sockets_as_another(returned: u64) -> bool {
    returned & FSUID_NOT_UID != 0
}

/// The uid in [`current_task_kind`]'s result: the high half.
#[inline(always)]
pub fn uid_of(returned: u64) -> u32 {
    (returned >> 32) as u32
}

/// The current task's uid as `bpf_get_current_uid_gid` gives it, in the high half.
#[inline(always)]
fn helper_uid() -> u64 {
    bpf_get_current_uid_gid() << 32
}

/// What [`credentials`] read of a task's credentials.
#[derive(Clone, Copy)]
struct Credentials {
    uid: u32,
    /// `uid` is the task's, as `bpf_get_current_uid_gid` gives it (the credentials' ids are
    /// the initial user namespace's, which the helper maps them to): read from a credentials
    /// pointer that is not null, with BTF-typed loads (a load that faults reads 0, which would
    /// be root's). From `bpf_probe_read_kernel` reads the helper is asked instead.
    uid_trusted: bool,
    /// The file system uid (`cred.fsuid`, which owns the sockets the task makes, and which
    /// `seteuid` and `setfsuid` set).
    fsuid: u32,
    /// Each read succeeded (always, with BTF-typed loads).
    uid_read: bool,
    fsuid_read: bool,
}

/// The uid and file system uid of `task` (the current task, as `R::current` gave it), read
/// from its credentials, one line, once for all their uses, as `R` reads.
#[inline(always)]
fn credentials<R: Reads>(task: *const u8) -> Credentials {
    // SAFETY: reads as `R` says, from the task and through the credentials' pointer.
    unsafe {
        let Some(cred) = R::read::<*const u8>(task, layout(|l| &l.cred)).filter(|c| !c.is_null())
        else {
            return Credentials {
                uid: 0,
                uid_trusted: false,
                fsuid: 0,
                uid_read: false,
                fsuid_read: false,
            };
        };
        // Both words always defined, failed or not: with `Option`s (and sentinels for `None`)
        // LLVM compared the two words first and checked that both reads succeeded after,
        // reading a register the failed helper call had left unset, which every verifier
        // refuses ("R1 !read_ok").
        let (uid, uid_failed) = R::read_flagged::<u32>(cred, layout(|l| &l.uid));
        let (fsuid, fsuid_failed) = R::read_flagged::<u32>(cred, layout(|l| &l.fsuid));
        Credentials {
            uid,
            // Never a failed read's 0 (root's): with BTF-typed loads none fails.
            uid_trusted: R::btf() && !uid_failed,
            fsuid,
            uid_read: !uid_failed,
            fsuid_read: !fsuid_failed,
        }
    }
}

/// The current task's gid, as `bpf_get_current_uid_gid` gives it: for the decision where a
/// rule set has gid rules, and for what is remembered or reported (the uid is
/// [`current_task_kind`]'s). Asked on those paths alone, each a call of [`current_task_gid`].
#[inline(always)]
pub fn current_gid() -> u32 {
    // Truncation intended: a gid is 32 bits.
    #[expect(clippy::cast_possible_truncation, reason = "a gid")]
    {
        current_task_gid() as u32
    }
}

/// [`current_gid`]'s global function, which the verifier checks once on its own: inlined where
/// the decision asks for the gid and again where it is kept or reported, its reads (the task's
/// credentials, or the helper where they cannot be trusted) were explored once per path that
/// reached each of them, and the socket hooks' verification took half as long again (the
/// agent's start: 199 -> 427 ms). With `LAYOUT_BTF_TASK`, a load from the task's credentials
/// (the helper's call and its mapping through the user namespace were 6% of the allowed path's
/// samples, when it read the ids there); otherwise, and should the credentials' pointer read
/// null (a load through it reads 0, root's group), the helper.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn current_task_gid() -> u64 {
    if known(LAYOUT_BTF_TASK) && known(LAYOUT_NAMESPACES) {
        // SAFETY: BTF-typed loads with the layout tested, from the current task and through
        // its credentials' pointer, which is tested for null first.
        unsafe {
            let cred = load::<*const u8>(Loads::current(), layout(|l| &l.cred));
            if !cred.is_null() {
                return u64::from(load::<u32>(cred, layout(|l| &l.gid)));
            }
        }
    }
    bpf_get_current_uid_gid() >> 32
}

/// The kind of task that sent a packet the socket hooks did not judge (a raw socket's, one of a
/// protocol without them, a destination NAT rewrote): the current task's, as
/// [`current_task_kind`] tells, when it is the packet's sender: in its socket's cgroup
/// (`socket_cgroup`) with the socket owner's uid (`socket_uid`), as in the system call that
/// sends such a packet first (`sendmsg`, or `connect` for a SYN). Otherwise (a retransmission
/// from a timer, a packet sent in interrupt context, whatever task was current then) there is
/// no sender to ask: the packet counts as a container's, and its uid as unknown
/// ([`SENDER_UNCONFIRMED`]; fail closed). That includes a sender whose socket's uid is not its
/// own: `socket_uid` is the owner as the user namespace owning the socket's network namespace
/// maps it (`bpf_get_socket_uid`), so an unprivileged container's root, global uid 100000, owns
/// its sockets as uid 0 there, which no rule may take for root's. And a sender whose file
/// system uid (its sockets' owner) is not its uid: the socket hooks judge the real uid, so a
/// setuid-root program run by a denied user is not root here either. Without the layout
/// (containers known by their cgroup path alone) no sender can be confirmed: a host task's,
/// with its uid unknown.
///
/// A global function, as [`current_task_kind_fallback`] is (`TASK_*` in the low bits,
/// [`kind_of`]): checked once on its own, its result only a number to the caller, whatever
/// paths its reads took. (Read in place as [`current_task_kind`] reads, it measured the same on
/// the NAT datagram's path: BENCHMARKS.md, "The task's kind read in place".)
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sender_kind(socket_uid: u64, socket_cgroup: u64) -> u64 {
    if !known(LAYOUT_NAMESPACES) {
        return u64::from(TASK_HOST) | SENDER_UNCONFIRMED;
    }
    let task = current();
    let credentials = credentials::<AsTheLayoutSays>(task);
    // A failed read is a value no socket has (no cgroup's id). (An `Option` compared whole
    // made LLVM read a `None`'s payload from the stack and mask it away: a read of stack never
    // written, which Linux 5.10's verifier refuses.)
    // SAFETY: reads through `bpf_probe_read_kernel` (see `read`).
    let cgroup = unsafe {
        read::<*const u8>(task, layout(|l| &l.cgroups))
            .and_then(|set| read::<*const u8>(set, layout(|l| &l.dfl_cgrp)))
            .and_then(|cgroup| read::<*const u8>(cgroup, layout(|l| &l.cgroup_kn)))
            .and_then(|node| read::<u64>(node, layout(|l| &l.kn_id)))
            .unwrap_or(u64::MAX)
    };
    let is_sender = cgroup == socket_cgroup
        && credentials.fsuid_read
        && u64::from(credentials.fsuid) == socket_uid;
    if !is_sender {
        return u64::from(TASK_CONTAINER) | SENDER_UNCONFIRMED;
    }
    // The kind from the task and credentials already in hand (not a call of
    // `current_task_kind`, which would ask for them again).
    let kind = kind_of_current::<AsTheLayoutSays>(task, credentials);
    if owns_sockets_as_another(kind) {
        kind | SENDER_UNCONFIRMED
    } else {
        kind
    }
}

/// In [`sender_kind`]'s result: the current task is not known to be the packet's sender, so the
/// socket's uid says nothing about who sent it ([`sender_confirmed`]).
const SENDER_UNCONFIRMED: u64 = 1 << 17;

/// Whether [`sender_kind`], which returned `returned`, found the current task to be the sender.
#[inline(always)]
pub fn sender_confirmed(returned: u64) -> bool {
    returned & SENDER_UNCONFIRMED == 0
}

/// A kind of task [`current_task_kind`] returned: the low bits.
#[inline(always)]
pub fn kind_of(returned: u64) -> u16 {
    #[expect(clippy::cast_possible_truncation, reason = "a TASK_* value")]
    {
        returned as u16
    }
}

/// The current task's parent process (`real_parent`: a tracer does not count) and its name,
/// read now so an event names it even when both are gone before the agent reads the event.
#[inline]
pub fn current_parent() -> Option<(u32, [u8; COMM_LEN])> {
    if !known(LAYOUT_PARENT) {
        return None;
    }
    let task = current();
    // SAFETY: reads through `bpf_probe_read_kernel` (see `read`).
    unsafe {
        let parent: *const u8 = read(task, layout(|l| &l.real_parent))?;
        let tgid: i32 = read(parent, layout(|l| &l.tgid))?;
        // The parent is the thread that forked; the process is named by its main thread.
        let leader: *const u8 = read(parent, layout(|l| &l.group_leader))?;
        let comm: [u8; COMM_LEN] = read(leader, layout(|l| &l.comm))?;
        #[expect(clippy::cast_sign_loss, reason = "a pid is never negative")]
        Some((tgid as u32, comm))
    }
}

/// What identifies the executable a process runs: its file's device and inode, and where
/// its path starts.
pub struct Executable {
    /// `super_block.s_dev` of its file system (the kernel's `dev_t` encoding).
    pub dev: u32,
    /// Its inode number.
    pub ino: u64,
    /// Its dentry, from which [`write_path`] reads the path.
    dentry: *const u8,
}

/// The current process's executable (`mm->exe_file`), read at the attempt: the agent turns it
/// into a path even when the process is gone, or has run another program since, by the time it
/// reads the event. `None` for a kernel thread, without the layout, or when a read fails.
#[inline]
pub fn current_executable() -> Option<Executable> {
    if !known(LAYOUT_EXE) {
        return None;
    }
    let task = current();
    // SAFETY: reads through `bpf_probe_read_kernel` (see `read`).
    unsafe {
        let mm: *const u8 = read(task, layout(|l| &l.mm))?;
        if mm.is_null() {
            return None;
        }
        let file: *const u8 = read(mm, layout(|l| &l.exe_file))?;
        if file.is_null() {
            return None;
        }
        let inode: *const u8 = read(file, layout(|l| &l.f_inode))?;
        let ino: u64 = read(inode, layout(|l| &l.i_ino))?;
        let super_block: *const u8 = read(inode, layout(|l| &l.i_sb))?;
        let dev: u32 = read(super_block, layout(|l| &l.s_dev))?;
        let dentry: *const u8 = read(file, layout(|l| &l.f_dentry))?;
        Some(Executable { dev, ino, dentry })
    }
}

/// Writes the executable's path components, leaf first, one per [`EXE_PART_LEN`] bytes of
/// `path` (which must hold [`EXE_PATH_PARTS`] of them and be zeroed), up to the root of its
/// file system. Returns how many it wrote and `EXE_FLAG_*` bits.
///
/// # Safety
/// `path` points to `EXE_PATH_PARTS * EXE_PART_LEN` writable bytes.
#[inline]
pub unsafe fn write_path(exe: &Executable, path: *mut u8) -> (u8, u8) {
    let mut dentry = exe.dentry;
    let mut parts = 0u8;
    for part in 0..EXE_PATH_PARTS {
        // SAFETY: reads through `bpf_probe_read_kernel` (see `read`).
        let Some(parent) = (unsafe { read::<*const u8>(dentry, layout(|l| &l.d_parent)) }) else {
            return (parts, EXE_FLAG_TRUNCATED);
        };
        // The root of the file system is its own parent: the path is complete.
        if parent == dentry {
            return (parts, 0);
        }
        // SAFETY: as above; the component goes into its own slot of `path`, which the caller
        // promises is writable.
        unsafe {
            let Some(name) = read::<*const u8>(dentry, layout(|l| &l.d_name)) else {
                return (parts, EXE_FLAG_TRUNCATED);
            };
            #[expect(clippy::cast_possible_truncation, reason = "a small constant")]
            let _ = bpf_probe_read_kernel_str(
                path.add(part * EXE_PART_LEN).cast(),
                EXE_PART_LEN as u32,
                name.cast(),
            );
        }
        #[expect(clippy::cast_possible_truncation, reason = "at most EXE_PATH_PARTS")]
        {
            parts = part as u8 + 1;
        }
        dentry = parent;
    }
    // SAFETY: as above.
    match unsafe { read::<*const u8>(dentry, layout(|l| &l.d_parent)) } {
        Some(parent) if parent == dentry => (parts, 0),
        _ => (parts, EXE_FLAG_TRUNCATED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonzero_is_one_for_every_value_but_zero() {
        for x in [1, 2, 0xffff_ffff, 1 << 32, (1 << 63) - 1, 1 << 63, u64::MAX] {
            assert_eq!(nonzero(x), 1, "{x:#x}");
        }
        assert_eq!(nonzero(0), 0);
    }

    #[test]
    fn the_host_is_the_initial_pid_and_cgroup_namespaces_and_any_failed_read_a_container() {
        let kind = |level, inum| kind_of(kind_bits(level, inum, Some(0), Some(0)));
        assert_eq!(kind(Some(0), Some(INIT_CGROUP_NS_INO)), TASK_HOST);
        assert_eq!(kind(Some(1), Some(INIT_CGROUP_NS_INO)), TASK_CONTAINER);
        assert_eq!(kind(Some(0), Some(INIT_CGROUP_NS_INO - 1)), TASK_CONTAINER);
        // What a null namespace pointer reads with BTF-typed loads.
        assert_eq!(kind(Some(0), Some(0)), TASK_CONTAINER);
        assert_eq!(kind(None, Some(INIT_CGROUP_NS_INO)), TASK_CONTAINER);
        assert_eq!(kind(Some(0), None), TASK_CONTAINER);
    }

    #[test]
    fn sockets_are_owned_as_another_unless_both_uids_were_read_and_are_the_same() {
        let host = |uid, fsuid| kind_bits(Some(0), Some(INIT_CGROUP_NS_INO), uid, fsuid);
        assert!(!owns_sockets_as_another(host(Some(1000), Some(1000))));
        assert!(owns_sockets_as_another(host(Some(0), Some(1000))));
        assert!(owns_sockets_as_another(host(Some(1000), Some(0))));
        assert!(owns_sockets_as_another(host(None, Some(0))));
        assert!(owns_sockets_as_another(host(Some(0), None)));
        assert_eq!(kind_of(host(Some(0), Some(1000))), TASK_HOST);
    }
}
