//! The record the kernel writes to the `EVENTS` ring buffer for every denied or audited attempt.

/// The attempt was allowed (never in an event; used in counters and by `explain`).
pub const VERDICT_ALLOW: u8 = 0;
/// The attempt was refused with `EPERM`.
pub const VERDICT_DENY: u8 = 1;
/// The attempt was allowed but reported.
pub const VERDICT_AUDIT: u8 = 2;

/// `cgroup/connect4`.
pub const HOOK_CONNECT4: u8 = 1;
/// `cgroup/connect6`.
pub const HOOK_CONNECT6: u8 = 2;
/// `cgroup/sendmsg4`.
pub const HOOK_SENDMSG4: u8 = 3;
/// `cgroup/sendmsg6`.
pub const HOOK_SENDMSG6: u8 = 4;
/// `cgroup_skb/egress`: a packet to a protected address that no socket hook let through for
/// its socket: a raw socket's, one whose destination NAT rewrote after the socket hooks, or one
/// of a protocol they do not see (ICMP echo sockets, UDP-Lite, SCTP). No task is known: pid,
/// tgid and comm are 0; the uid is the socket owner's (judged or not: see
/// [`EVENT_FLAG_UID_IGNORED`]); the gid is unknown, `u32::MAX`.
pub const HOOK_EGRESS: u8 = 5;
/// `sk_msg` on a connection to a protected address: an HTTP request (`imds_version`,
/// `request`) that was IMDSv1, or that the rule refuses. The task is the writer's; its comm,
/// parent and executable are not read there (the agent names the process from `/proc`).
pub const HOOK_HTTP: u8 = 6;

/// `AF_INET`.
pub const FAMILY_INET: u8 = 2;
/// `AF_INET6`.
pub const FAMILY_INET6: u8 = 10;

/// [`Event::flags`]: the packet's destination is not the one its socket is connected to: NAT
/// (or another rewrite on the output path) changed it after the socket hooks judged the
/// socket's own (only known for connected sockets).
pub const EVENT_FLAG_REWRITTEN: u8 = 1;
/// [`Event::flags`]: the task was judged as in a container by the kernel: its pid or cgroup
/// namespace is not the host's initial one (or, for a packet, what sent it could not be told).
/// A container the agent recognises by its cgroup path is named in the event's cgroup.
pub const EVENT_FLAG_CONTAINER: u8 = 2;
/// [`Event::flags`]: a packet judged with its socket's uid ignored, so that only rules on
/// cgroups could let it through: its sender could not be confirmed as a task that owns the
/// socket under that uid (a user-namespaced container's root, whose socket's owner reads as
/// uid 0 of its namespace; a setuid program; a packet sent for another task). The event's uid is
/// still the socket owner's, as the kernel maps it.
pub const EVENT_FLAG_UID_IGNORED: u8 = 4;
/// The [`Event::flags`] that set attempts apart in a [`FoldKey`] (all of them): what was judged,
/// or the route, differs, and an aggregate says what its key says.
pub const FOLD_FLAGS: u8 = EVENT_FLAG_CONTAINER | EVENT_FLAG_UID_IGNORED | EVENT_FLAG_REWRITTEN;

/// Length of [`Event::comm`], the kernel's `TASK_COMM_LEN`.
pub const COMM_LEN: usize = 16;
/// Components of the executable's path an event keeps (see [`Event::exe_path`]).
pub const EXE_PATH_PARTS: usize = 8;
/// Bytes kept of each component, its NUL included (a longer name is cut).
pub const EXE_PART_LEN: usize = 32;
/// [`Event::exe_flags`]: the path has more components than [`EXE_PATH_PARTS`]: those nearest
/// the root are missing.
pub const EXE_FLAG_TRUNCATED: u8 = 1;

/// One denied or audited attempt.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[expect(
    clippy::pub_underscore_fields,
    reason = "padding is written out and zeroed by both sides, never read"
)]
pub struct Event {
    /// `bpf_ktime_get_boot_ns()`: nanoseconds since boot, `CLOCK_BOOTTIME`.
    pub boot_ns: u64,
    /// cgroup v2 id of the task.
    pub cgroup_id: u64,
    /// Thread id (the kernel's pid).
    pub pid: u32,
    /// Process id (the kernel's tgid).
    pub tgid: u32,
    /// Real uid of the task, in the initial user namespace.
    pub uid: u32,
    /// Real primary gid of the task, in the initial user namespace.
    pub gid: u32,
    /// Rule that decided the verdict, or `policy::RULE_DEFAULT`.
    pub rule: u32,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// `HOOK_*`.
    pub hook: u8,
    /// `FAMILY_*`: the socket's address family (`AF_INET6` for `::ffff:a.b.c.d`).
    pub family: u8,
    /// IP protocol of the socket: 6 (TCP), 17 (UDP), or another `IPPROTO_*`.
    pub protocol: u8,
    /// Destination port, host byte order.
    pub port: u16,
    /// Policy generation (0 or 1) that judged the attempt, so `rule` names the right rule
    /// across a policy switch.
    pub generation: u8,
    /// `UNREAD_*` bits: what the kernel could not read (those fields are 0).
    pub unread: u8,
    /// `EVENT_FLAG_*` bits.
    pub flags: u8,
    /// Explicit padding, always 0.
    pub _pad: [u8; 3],
    /// Destination address, network byte order: IPv4 in the first 4 bytes, the rest 0.
    pub addr: [u8; 16],
    /// `comm` of the thread, NUL-padded.
    pub comm: [u8; COMM_LEN],
    /// Process id (tgid) of the parent process (`real_parent`, not a tracer).
    pub ppid: u32,
    /// `comm` of the parent process (its main thread's), NUL-padded.
    pub parent_comm: [u8; COMM_LEN],
    /// The executable's device, as the kernel encodes it (`MAJOR << 20 | MINOR`), read at the
    /// attempt from `mm->exe_file`, so that a process gone before the agent reads `/proc`, or
    /// one that has exec'd since, is still named by what it ran.
    pub exe_dev: u32,
    /// The executable's inode number (0 when unread: see [`UNREAD_EXE`]).
    pub exe_ino: u64,
    /// The executable's path from the root of its file system (for a container's image, the
    /// container's root): `exe_parts` components, leaf first, each NUL-terminated in its own
    /// [`EXE_PART_LEN`] bytes. The agent joins them and finds where that file system is
    /// mounted.
    pub exe_path: [u8; EXE_PATH_PARTS * EXE_PART_LEN],
    /// Components in `exe_path`.
    pub exe_parts: u8,
    /// `EXE_FLAG_*` bits.
    pub exe_flags: u8,
    /// `http::IMDS_VERSION_*` of an HTTP request (hook `HOOK_HTTP`), else 0.
    pub imds_version: u8,
    /// `http::REFUSED_*`: what the rule does not allow of the request (hook `HOOK_HTTP`).
    pub refused: u8,
    /// Bytes of the request line in `request` (at most `http::HTTP_REQUEST_BYTES`; the line
    /// may have been longer).
    pub request_len: u16,
    /// Explicit padding, always 0.
    pub _tail: [u8; 2],
    /// The request line of an HTTP request (hook `HOOK_HTTP`), `request_len` bytes of it:
    /// never a header.
    pub request: [u8; crate::http::HTTP_REQUEST_BYTES],
}
const _: () = assert!(core::mem::size_of::<Event>() == 632);

/// [`Event::unread`]: the parent (`ppid`, `parent_comm`) could not be read: no task (a
/// packet), the agent found no `task_struct` layout in the kernel's BTF, or a read failed.
pub const UNREAD_PARENT: u8 = 1;
/// [`Event::unread`]: the thread's `comm` could not be read.
pub const UNREAD_COMM: u8 = 2;
/// [`Event::unread`]: the executable (`exe_dev`, `exe_ino`, `exe_path`) could not be read: no
/// task (a packet), no layout from the kernel's BTF, a kernel thread, or a failed read.
pub const UNREAD_EXE: u8 = 4;

/// Where the fields the programs read from a `task_struct` (and what it points to) sit, in
/// bytes, as the agent found them in the running kernel's BTF (`/sys/kernel/btf/vmlinux`). The
/// agent sets it as a read-only global before loading, so the verifier sees constants and, for
/// a group whose `LAYOUT_*` bit is clear in `known`, never reaches its reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskLayout {
    /// `LAYOUT_*` bits: which groups of offsets below are the running kernel's.
    pub known: u32,
    /// `task_struct.real_parent`, a `struct task_struct *`.
    pub real_parent: u32,
    /// `task_struct.group_leader`, a `struct task_struct *` (the process's main thread).
    pub group_leader: u32,
    /// `task_struct.tgid`, a `pid_t`.
    pub tgid: u32,
    /// `task_struct.comm`, `char[TASK_COMM_LEN]`.
    pub comm: u32,
    /// `task_struct.thread_pid`, a `struct pid *`.
    pub thread_pid: u32,
    /// `pid.level`, an `unsigned int`: the depth of the task's pid namespace (0: the host's).
    pub pid_level: u32,
    /// `task_struct.nsproxy`, a `struct nsproxy *`.
    pub nsproxy: u32,
    /// `nsproxy.cgroup_ns`, a `struct cgroup_namespace *`.
    pub cgroup_ns: u32,
    /// `cgroup_namespace.ns.inum`, an `unsigned int`.
    pub cgroup_ns_inum: u32,
    /// `task_struct.cgroups`, a `struct css_set *`.
    pub cgroups: u32,
    /// `css_set.dfl_cgrp`, a `struct cgroup *` (the task's cgroup v2 cgroup).
    pub dfl_cgrp: u32,
    /// `cgroup.kn`, a `struct kernfs_node *`.
    pub cgroup_kn: u32,
    /// `kernfs_node.id`, a `u64`: the cgroup id.
    pub kn_id: u32,
    /// `task_struct.cred`, a `const struct cred *`.
    pub cred: u32,
    /// `cred.fsuid`, a `kuid_t` (`u32`): the uid a socket the task makes is owned by.
    pub fsuid: u32,
    /// `cred.uid`, a `kuid_t` (`u32`): the task's uid, as `bpf_get_current_uid_gid` gives it.
    pub uid: u32,
    /// `cred.gid`, a `kgid_t` (`u32`): its gid, the same way.
    pub gid: u32,
    /// `task_struct.mm`, a `struct mm_struct *` (null for kernel threads).
    pub mm: u32,
    /// `mm_struct.exe_file`, a `struct file *`.
    pub exe_file: u32,
    /// `file.f_inode`, a `struct inode *`.
    pub f_inode: u32,
    /// `file.f_path.dentry`, a `struct dentry *`.
    pub f_dentry: u32,
    /// `inode.i_ino`, an `unsigned long`.
    pub i_ino: u32,
    /// `inode.i_sb`, a `struct super_block *`.
    pub i_sb: u32,
    /// `super_block.s_dev`, a `dev_t` (`u32`).
    pub s_dev: u32,
    /// `dentry.d_name.name`, a `const unsigned char *`.
    pub d_name: u32,
    /// `dentry.d_parent`, a `struct dentry *` (the root of a file system is its own parent).
    pub d_parent: u32,
}

/// [`TaskLayout::known`]: the parent's offsets (`real_parent`, `group_leader`, `tgid`, `comm`).
pub const LAYOUT_PARENT: u32 = 1;
/// [`TaskLayout::known`]: the namespace and credential offsets (`thread_pid` to `gid`).
pub const LAYOUT_NAMESPACES: u32 = 2;
/// [`TaskLayout::known`]: the executable's offsets (`mm` to `d_parent`).
pub const LAYOUT_EXE: u32 = 4;
/// [`TaskLayout::known`]: read the task with `bpf_get_current_task_btf` and plain loads (which
/// the verifier checks against the kernel's BTF and turns into loads that cannot fault) rather
/// than `bpf_probe_read_kernel` per field: a few nanoseconds instead of about fifty each.
/// Kernels that do not offer the helper to these programs load a build without it.
pub const LAYOUT_BTF_TASK: u32 = 8;

/// The name of the [`TaskLayout`] global in the object. The agent and `status` read its `known`
/// in the programs in force, by this name and the field's (located by the programs' own BTF):
/// keep both.
pub const TASK_LAYOUT_GLOBAL: &str = "TASK_LAYOUT";

/// How programs tell a container's task ([`containers_by_of`]): by its namespaces, read with
/// BTF-typed loads, and by its cgroup path.
pub const CONTAINERS_BY_NAMESPACES_BTF: u32 = 1;
/// By its namespaces, read with `bpf_probe_read_kernel`, and by its cgroup path.
pub const CONTAINERS_BY_NAMESPACES_PROBE: u32 = 2;
/// By its cgroup path alone: the programs read nothing of tasks (the kernel refused those
/// reads, its BTF lacks the fields, or `IMDS_GUARD_TASK_READS=none` asked for it).
pub const CONTAINERS_BY_CGROUP_PATHS: u32 = 3;

/// How programs whose [`TaskLayout::known`] is `known` tell a container's task:
/// `CONTAINERS_BY_*`.
#[must_use]
pub const fn containers_by_of(known: u32) -> u32 {
    match (known & LAYOUT_NAMESPACES != 0, known & LAYOUT_BTF_TASK != 0) {
        (true, true) => CONTAINERS_BY_NAMESPACES_BTF,
        (true, false) => CONTAINERS_BY_NAMESPACES_PROBE,
        (false, _) => CONTAINERS_BY_CGROUP_PATHS,
    }
}

/// What the start line, `status` and the metrics say of a `CONTAINERS_BY_*` value: its text
/// and the metrics' label.
#[must_use]
pub fn containers_by_names(containers_by: u32) -> (&'static str, &'static str) {
    match containers_by {
        CONTAINERS_BY_NAMESPACES_BTF => {
            ("namespaces (BTF loads) and cgroup paths", "namespaces_btf")
        }
        CONTAINERS_BY_NAMESPACES_PROBE => (
            "namespaces (probe reads) and cgroup paths",
            "namespaces_probe",
        ),
        CONTAINERS_BY_CGROUP_PATHS => ("cgroup paths only", "cgroup_paths"),
        _ => ("unknown", "unknown"),
    }
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)` plain integers without padding.
unsafe impl aya::Pod for TaskLayout {}

/// The name of the `u64` global holding the fold window in nanoseconds (0: every attempt is
/// queued as an event).
pub const FOLD_WINDOW_GLOBAL: &str = "FOLD_WINDOW_NS";

/// The name of the `u32` global saying which clock times fold windows ([`FoldValue`]'s times):
/// [`FOLD_CLOCK_BOOT`] or [`FOLD_CLOCK_COARSE`], set by the agent before loading.
pub const FOLD_CLOCK_GLOBAL: &str = "FOLD_CLOCK";
/// Fold windows in `CLOCK_BOOTTIME` (`bpf_ktime_get_boot_ns`, read precisely: about 40 ns on a
/// virtual machine's clock): kernels without the coarse clock's helper (before 5.11).
pub const FOLD_CLOCK_BOOT: u32 = 0;
/// Fold windows in `CLOCK_MONOTONIC_COARSE` (`bpf_ktime_get_coarse_ns`, Linux 5.11+: the time
/// at the last tick, read without the clock source). A repeat, the attempt a flood makes most
/// often, reads no other clock; a window lasts what it says to a tick's resolution.
pub const FOLD_CLOCK_COARSE: u32 = 1;

/// What makes two attempts the same: the same process (cgroup, uid, gid, tgid) tried the same
/// protected address and port through the same hook, and the same rule of the same policy gave
/// the same verdict. Only when does not count. An aggregate therefore only ever counts the
/// attempts of the process its first event names: a second process (a decoy's neighbour), or
/// another port, opens a burst of its own, reported at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FoldKey {
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// Real uid (a packet: the socket owner's).
    pub uid: u32,
    /// Real primary gid (a packet: `u32::MAX`).
    pub gid: u32,
    /// The deciding rule.
    pub rule: u32,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// Policy generation.
    pub generation: u8,
    /// `HOOK_*`.
    pub hook: u8,
    /// `FAMILY_*`.
    pub family: u8,
    /// Destination address, as in [`Event::addr`].
    pub addr: [u8; 16],
    /// Process id (the kernel's tgid); 0 for a packet.
    pub tgid: u32,
    /// Destination port, host byte order.
    pub port: u16,
    /// The attempts' [`FOLD_FLAGS`]: whether they were judged as a container's, with their uid
    /// ignored, and sent to a destination NAT rewrote.
    pub flags: u8,
    /// `http::IMDS_VERSION_*` of an HTTP request, else 0: v1 requests fold apart from refused
    /// v2 ones.
    pub imds_version: u8,
}
const _: () = assert!(core::mem::size_of::<FoldKey>() == 48);

impl FoldKey {
    /// The key of the attempt `event` reports.
    #[must_use]
    pub fn of(event: &Event) -> Self {
        Self {
            cgroup_id: event.cgroup_id,
            uid: event.uid,
            gid: event.gid,
            rule: event.rule,
            verdict: event.verdict,
            generation: event.generation,
            hook: event.hook,
            family: event.family,
            addr: event.addr,
            tgid: event.tgid,
            port: event.port,
            flags: event.flags & FOLD_FLAGS,
            imds_version: event.imds_version,
        }
    }
}

/// The repeats of a [`FoldKey`]. `folded` only grows (the agent reports what it grew by);
/// a new window restarts when an attempt comes `window` or more after `window_start_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FoldValue {
    /// When the attempt that opened the current window was made, in the fold clock
    /// ([`FOLD_CLOCK_GLOBAL`]: nanoseconds of `CLOCK_MONOTONIC_COARSE`, or `CLOCK_BOOTTIME`);
    /// that attempt was queued as an event (whose time is `CLOCK_BOOTTIME`, read precisely).
    pub window_start_ns: u64,
    /// When the last repeat was made.
    pub last_ns: u64,
    /// Repeats folded since the entry was created.
    pub folded: u64,
}

/// Value of `SOCKET_VERDICTS`: a verdict on this socket's packets to one protected destination
/// that judging them by the socket's owner and cgroup would not give, or would report again: a
/// socket hook's allow by a gid rule (packets carry no gid) or audit, or the packet layer's own
/// verdict on a connected socket whose destination the socket hooks did not judge. The packet
/// layer applies it to the socket's later packets to that destination without counting or
/// reporting them again, while the policy that gave it is in force (`epoch`). Under another
/// policy it decides again, for the identity judged (`uid`, `gid`, `task`) in the socket's
/// cgroup, and remembers that verdict instead: a revoked rule ends what it let in.
///
/// Five 8-byte words, no padding. The programs write an entry a word at a time, in order, the
/// last its [`SocketVerdict::check`] of the others; a reader takes an entry whose check does not
/// match for none (one it read while another program wrote it, on any CPU, in any order: the
/// words are not written atomically together).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketVerdict {
    /// The destination as the packet carries it, four native words of network-order bytes:
    /// IPv4 (also for `::ffff:a.b.c.d`) in the first, the others 0.
    pub addr: [u32; 4],
    /// The uid judged, when `known` has [`JUDGED_UID`].
    pub uid: u32,
    /// The gid judged, when `known` has [`JUDGED_GID`].
    pub gid: u32,
    /// `Settings::epoch` of the policy that gave the verdict.
    pub epoch: u32,
    /// `FAMILY_INET` or `FAMILY_INET6`: of the packet, not of the socket.
    pub family: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// `TASK_*` the attempt was judged as.
    pub task: u8,
    /// Which ids the decision had, and of which packets: [`JUDGED_UID`], [`JUDGED_GID`],
    /// [`JUDGED_REWRITTEN`].
    pub known: u8,
    /// [`SocketVerdict::check_of_fields`] when the entry is whole.
    pub check: u64,
}
const _: () = assert!(core::mem::size_of::<SocketVerdict>() == 40);

impl SocketVerdict {
    /// `TASK_*` (`TASK_HOST` or `TASK_CONTAINER`) as [`SocketVerdict::task`] keeps it.
    #[must_use]
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the kinds of task are 0 and 1"
    )]
    pub const fn task_byte(task: u16) -> u8 {
        task as u8
    }

    /// A mix of every field but `check`: parts of two different entries (a read that raced a
    /// write) give another value but by a chance of 2^-64. Not a secret: only the programs
    /// write entries.
    #[must_use]
    #[inline]
    pub const fn check_of_fields(&self) -> u64 {
        const fn mix(x: u64) -> u64 {
            (x ^ (x >> 31)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        }
        let words = [
            self.addr[0] as u64 | (self.addr[1] as u64) << 32,
            self.addr[2] as u64 | (self.addr[3] as u64) << 32,
            self.uid as u64 | (self.gid as u64) << 32,
            self.epoch as u64
                | (self.family as u64) << 32
                | (self.verdict as u64) << 40
                | (self.task as u64) << 48
                | (self.known as u64) << 56,
        ];
        let mut check = 0x5ac3_e1d7_0b1e_77a5;
        let mut i = 0;
        while i < words.len() {
            check = mix(check ^ words[i]);
            i += 1;
        }
        check
    }

    /// The entry with its check.
    #[must_use]
    #[inline]
    pub const fn sealed(self) -> Self {
        Self {
            check: self.check_of_fields(),
            ..self
        }
    }

    /// Whether the entry is whole: its check matches its fields (a zeroed one's does not).
    #[must_use]
    #[inline]
    pub const fn whole(&self) -> bool {
        self.check == self.check_of_fields()
    }
}

/// [`SocketVerdict::known`]: the decision had the uid (uid rules could match).
pub const JUDGED_UID: u8 = 1;
/// [`SocketVerdict::known`]: the decision had the gid (gid rules could match).
pub const JUDGED_GID: u8 = 2;
/// [`SocketVerdict::known`]: the verdict is the packet layer's, on packets NAT rewrote to `addr`
/// (not the socket's peer). A TCP packet takes a remembered verdict only if it is of the same
/// kind: rewritten, or sent to the peer its connect was judged for (a socket can be connected
/// again elsewhere, and NAT take that connection to where the last one went).
pub const JUDGED_REWRITTEN: u8 = 4;

#[cfg(feature = "user")]
mod user {
    // SAFETY: `repr(C)` plain integers and bytes without padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::FoldKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FoldValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_verdict_read_half_written_is_not_taken_for_whole() {
        let old = SocketVerdict {
            addr: [0xfea9_fea9, 0, 0, 0],
            uid: 1000,
            gid: 3001,
            epoch: 7,
            family: FAMILY_INET,
            verdict: VERDICT_ALLOW,
            task: 1,
            known: JUDGED_UID | JUDGED_GID,
            check: 0,
        }
        .sealed();
        let new = SocketVerdict {
            uid: 0,
            gid: 0,
            epoch: 8,
            verdict: VERDICT_DENY,
            ..old
        }
        .sealed();
        assert!(old.whole() && new.whole());
        // A zeroed entry (new storage) is no entry.
        assert!(!SocketVerdict::default().whole());
        // Any mix of the two entries' words, in whichever order a read met a write: the words
        // as they lie in memory, which the programs store one at a time.
        // SAFETY: `SocketVerdict` is five 8-byte words, 8-aligned, without padding, and any bit
        // pattern is a value of it.
        let words = |entry: SocketVerdict| -> [u64; 5] { unsafe { core::mem::transmute(entry) } };
        let (a, b) = (words(old), words(new));
        for mask in 0..32u32 {
            let mixed: [u64; 5] =
                core::array::from_fn(|i| if mask & 1 << i != 0 { b[i] } else { a[i] });
            // SAFETY: as above.
            let entry: SocketVerdict = unsafe { core::mem::transmute(mixed) };
            let whole = entry == old || entry == new;
            assert_eq!(entry.whole(), whole, "words {mask:05b}: {entry:?}");
        }
    }
}
