//! Events: raw ring-buffer records decoded ([`decode`]) and turned into the JSON lines the agent
//! prints ([`Record`]).

pub mod accounting;
pub mod enrich;
pub mod folds;
pub mod line;
pub mod output;
pub mod reporter;

use std::{
    borrow::Cow,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use imds_guard_common::event::{
    COMM_LEN, EVENT_FLAG_CONTAINER, EVENT_FLAG_REWRITTEN, EVENT_FLAG_UID_IGNORED,
    EXE_FLAG_TRUNCATED, EXE_PART_LEN, EXE_PATH_PARTS, Event, FAMILY_INET, FAMILY_INET6, FoldKey,
    HOOK_CONNECT4, HOOK_CONNECT6, HOOK_EGRESS, HOOK_HTTP, HOOK_SENDMSG4, HOOK_SENDMSG6,
    UNREAD_COMM, UNREAD_EXE, UNREAD_PARENT, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
};
use imds_guard_common::http::{
    HTTP_REQUEST_BYTES, IMDS_VERSION_TOKEN, IMDS_VERSION_V1, IMDS_VERSION_V2, REFUSED_NONE,
    REFUSED_PATH, REFUSED_UNREADABLE_PATH, REFUSED_V1,
};

pub use crate::events::line::UnixTime;
use crate::{
    events::enrich::{Enricher, Executable, Name, Now},
    host::workload::{self, Placement},
};

/// What went wrong reading events.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// The ring buffer the programs report to could not be polled.
    #[error("reading events failed: {source}")]
    Ring {
        /// Why.
        source: std::io::Error,
    },
    /// An event stream (`imds-guard report`'s input) could not be read or has a bad line.
    #[error("{at}: {message}")]
    Stream {
        /// The file (and line).
        at: String,
        /// What is wrong.
        message: String,
    },
}

/// Why a ring-buffer record could not be decoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The record is shorter than an [`Event`].
    #[error("record of {0} bytes is shorter than an event ({size} bytes)", size = size_of::<Event>())]
    Short(usize),
    /// A field holds a value the agent does not know.
    #[error("record has unknown {field} {value}")]
    Unknown {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u8,
    },
}

/// The verdict an event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Refused with `EPERM` (an HTTP request: its write failed with `EACCES`).
    Deny,
    /// Allowed and reported: what enforcement would refuse.
    Audit,
    /// Allowed, and reported only because it is an IMDSv1 request (hook `http`): the
    /// migration to IMDSv2 is not done while these come.
    Allow,
}

impl Verdict {
    /// Its name in an event.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::Audit => "audit",
            Self::Allow => "allow",
        }
    }
}

/// The address family of the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `AF_INET`.
    Ipv4,
    /// `AF_INET6`.
    Ipv6,
}

impl Family {
    /// Its name in an event.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
        }
    }
}

/// The hook that judged the attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// `cgroup/connect4`.
    Connect4,
    /// `cgroup/connect6`.
    Connect6,
    /// `cgroup/sendmsg4`.
    Sendmsg4,
    /// `cgroup/sendmsg6`.
    Sendmsg6,
    /// `cgroup_skb/egress`: a packet to a protected address that no socket hook let through
    /// for its socket (a raw socket's, a destination NAT rewrote, a protocol without socket
    /// address hooks).
    Egress,
    /// `sk_msg`: an HTTP request on a connection the policy let through.
    Http,
}

impl Hook {
    /// Its name in an event.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Connect4 => "connect4",
            Self::Connect6 => "connect6",
            Self::Sendmsg4 => "sendmsg4",
            Self::Sendmsg6 => "sendmsg6",
            Self::Egress => "egress",
            Self::Http => "http",
        }
    }
}

/// How an HTTP request asked IMDS (hook `http`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImdsVersion {
    /// Neither a token nor a token request: IMDSv1.
    V1,
    /// With `X-aws-ec2-metadata-token`.
    V2,
    /// `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`.
    Token,
}

impl ImdsVersion {
    /// Its name in an event (what `report` reads back).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
            Self::Token => "token",
        }
    }

    /// The version of `IMDS_VERSION_*` `value`; `None` for 0.
    ///
    /// # Errors
    /// When `value` is unknown.
    pub fn of(value: u8) -> Result<Option<Self>, DecodeError> {
        match value {
            0 => Ok(None),
            IMDS_VERSION_V1 => Ok(Some(Self::V1)),
            IMDS_VERSION_V2 => Ok(Some(Self::V2)),
            IMDS_VERSION_TOKEN => Ok(Some(Self::Token)),
            value => Err(DecodeError::Unknown {
                field: "imds_version",
                value,
            }),
        }
    }
}

/// What the rule refused of an HTTP request (hook `http`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// An IMDSv1 request where the rule says `imds = "v2"`.
    V1,
    /// A path `paths`/`deny_paths` do not allow.
    Path,
    /// A path that cannot be judged safely (`..`, `%`, cut, not absolute) for a rule with
    /// path patterns.
    UnreadablePath,
}

impl Refused {
    /// Its name in an event.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::Path => "path",
            Self::UnreadablePath => "unreadable_path",
        }
    }
}

/// A decoded event, with kernel constants turned into types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// The raw record.
    pub raw: Event,
    /// Its verdict.
    pub verdict: Verdict,
    /// Its hook.
    pub hook: Hook,
    /// Its family.
    pub family: Family,
    /// The destination.
    pub dst: IpAddr,
    /// An HTTP request's IMDS version (hook `http`).
    pub imds_version: Option<ImdsVersion>,
    /// What the rule refused of an HTTP request.
    pub refused: Option<Refused>,
}

/// Decodes one ring-buffer record.
///
/// # Errors
/// When it is too short or holds unknown constants.
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    if bytes.len() < size_of::<Event>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    // SAFETY: `Event` is `repr(C)` plain integers (every bit pattern is valid) and the length
    // was checked; `read_unaligned` copes with any alignment of the ring buffer record.
    decode_event(unsafe { bytes.as_ptr().cast::<Event>().read_unaligned() })
}

/// Turns the kernel constants of `raw` into types.
///
/// # Errors
/// When it holds unknown constants.
pub fn decode_event(raw: Event) -> Result<Decoded, DecodeError> {
    let verdict = match raw.verdict {
        VERDICT_DENY => Verdict::Deny,
        VERDICT_AUDIT => Verdict::Audit,
        VERDICT_ALLOW if raw.hook == HOOK_HTTP => Verdict::Allow,
        value => {
            return Err(DecodeError::Unknown {
                field: "verdict",
                value,
            });
        }
    };
    let hook = match raw.hook {
        HOOK_CONNECT4 => Hook::Connect4,
        HOOK_CONNECT6 => Hook::Connect6,
        HOOK_SENDMSG4 => Hook::Sendmsg4,
        HOOK_SENDMSG6 => Hook::Sendmsg6,
        HOOK_EGRESS => Hook::Egress,
        HOOK_HTTP => Hook::Http,
        value => {
            return Err(DecodeError::Unknown {
                field: "hook",
                value,
            });
        }
    };
    let (family, dst) = match raw.family {
        FAMILY_INET => {
            let [a, b, c, d, ..] = raw.addr;
            (Family::Ipv4, IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
        }
        FAMILY_INET6 => (Family::Ipv6, IpAddr::V6(Ipv6Addr::from(raw.addr))),
        value => {
            return Err(DecodeError::Unknown {
                field: "family",
                value,
            });
        }
    };
    let imds_version = ImdsVersion::of(raw.imds_version)?;
    let refused = match raw.refused {
        REFUSED_NONE => None,
        REFUSED_V1 => Some(Refused::V1),
        REFUSED_PATH => Some(Refused::Path),
        REFUSED_UNREADABLE_PATH => Some(Refused::UnreadablePath),
        value => {
            return Err(DecodeError::Unknown {
                field: "refused",
                value,
            });
        }
    };
    Ok(Decoded {
        raw,
        verdict,
        hook,
        family,
        dst,
        imds_version,
        refused,
    })
}

/// The method and target of the request line `line` (its first `len` bytes), as an event shows
/// it: `GET /latest/meta-data/...`, without the protocol version, bytes that are not printable
/// ASCII as `?`. The kernel keeps the request line only, never a header.
#[must_use]
pub fn request_text(line: &[u8; HTTP_REQUEST_BYTES], len: u16) -> String {
    let line = &line[..usize::from(len).min(HTTP_REQUEST_BYTES)];
    let line = line
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    // Method and target: up to the second space.
    let end = line
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b == b' ')
        .nth(1)
        .map_or(line.len(), |(at, _)| at);
    line[..end]
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect()
}

/// What an event's cgroup id tells: the cgroup's path and what the path says of its workload.
/// Worked out once per cgroup, not per event (the reporter keeps it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupFacts {
    /// Its path as in `/proc/PID/cgroup`; `None` when it is gone.
    pub path: Option<String>,
    /// Its unit, container and pod.
    pub placement: Placement,
    /// Whether it is a container runtime's cgroup.
    pub container: bool,
}

impl CgroupFacts {
    /// What the cgroup at `path` (`None`: gone) tells.
    #[must_use]
    pub fn of(path: Option<String>) -> Self {
        Self {
            placement: path.as_deref().map(Placement::of).unwrap_or_default(),
            container: path.as_deref().is_some_and(workload::is_container_cgroup),
            path,
        }
    }
}

/// One line of the event stream (`imds-guard run`'s stdout): one attempt reported at once, or
/// (`aggregated`) the repeats of one that were folded until its window closed.
///
/// Fields the agent could not read are `null` and named in `unread`; fields that do not apply
/// (no task sends a raw socket's packet) are `null` too. [`Record::write_line`] writes it, its
/// fields in this order under these names.
#[expect(
    clippy::struct_excessive_bools,
    reason = "the event's JSON fields, a contract: each says one thing"
)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// When, RFC 3339 in UTC (an aggregate: its last repeat).
    pub time: UnixTime,
    /// `deny` or `audit`.
    pub verdict: Verdict,
    /// Attempts this line stands for: 1, or an aggregate's repeats (its first attempt was
    /// reported on its own line).
    pub count: u64,
    /// Whether this line reports repeats the kernel folded: attempts identical to the first of
    /// a burst (same process, cgroup, uid, gid, destination address and port, hook, rule,
    /// verdict and flags) within the fold window. Its other fields are that first attempt's
    /// (reported on its own line), or, when the agent never saw it, `null` beyond what the
    /// repeats share. Only the process it names made them.
    pub aggregated: bool,
    /// The first attempt this line counts (an aggregate: when its burst began).
    pub first_seen: UnixTime,
    /// The last attempt this line counts.
    pub last_seen: UnixTime,
    /// Thread id; `null` for a packet (`hook` `egress`), which no task is known to send.
    pub pid: Option<u32>,
    /// Process id; `null` for a packet.
    pub tgid: Option<u32>,
    /// Parent process id, read by the kernel at the attempt.
    pub ppid: Option<u32>,
    /// Parent process name, read by the kernel at the attempt.
    pub parent_comm: Option<String>,
    /// Real uid (for a packet: the socket owner's).
    pub uid: u32,
    /// Its name in the user database, when it has one.
    pub user: Option<Arc<str>>,
    /// Real primary gid; `null` for a packet.
    pub gid: Option<u32>,
    /// Its name in the group database, when it has one.
    pub group: Option<Arc<str>>,
    /// Thread name; `null` for a packet.
    pub comm: Option<String>,
    /// The executable that made the attempt, as the kernel recorded it then: `/proc/PID/exe`
    /// while the process still runs it, else its path (a container's program: as the
    /// container sees it). `null` for a packet, a kernel thread, or when the kernel could not
    /// read it.
    pub exe: Option<Arc<str>>,
    /// Command line, arguments joined by spaces, bounded (see [`crate::events::enrich`]): only
    /// while the process still runs the program that made the attempt.
    pub cmdline: Option<Arc<str>>,
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// The cgroup: its path as in `/proc/PID/cgroup` (`cgroup`; `null` when the cgroup is
    /// already gone) and what the path tells: the systemd unit (`unit`), the container
    /// (`container`), the Kubernetes pod UID (`pod_uid`). Shared by the events of a cgroup.
    pub workload: Arc<CgroupFacts>,
    /// Whether the task was in a container: the kernel found it outside the host's initial pid
    /// or cgroup namespace at the attempt, or its cgroup is a container's. Rules match inside
    /// containers only when they say so (`containers`).
    pub in_container: bool,
    /// `ipv4` or `ipv6`.
    pub family: Family,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `udplite`, `sctp`, or the protocol number; `null` when
    /// unknown (see `aggregated`).
    pub protocol: Option<Cow<'static, str>>,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port; `null` when unknown (see `aggregated`).
    pub port: Option<u16>,
    /// The rule that decided, or `default` (the global mode).
    pub rule: Arc<str>,
    /// The hook that judged the attempt.
    pub hook: Hook,
    /// A packet (`hook` `egress`) whose destination is not the one its socket is connected to:
    /// NAT or another rewrite on the output path changed it after the socket hooks. `false`
    /// when it was not, or cannot be told (an unconnected socket).
    pub rewritten: bool,
    /// A packet judged with its `uid` ignored: only rules on cgroups could let it through, as
    /// its sender could not be confirmed as a task owning the socket under that uid (a
    /// user-namespaced container's root, whose sockets' owner reads as its namespace's uid 0;
    /// a setuid program; a sender outside the socket's cgroup; any sender where containers
    /// are known by their cgroup path alone). `user` is then not looked up: the uid may be
    /// another user namespace's. Only present when `true`.
    pub uid_ignored: bool,
    /// An HTTP request's IMDS version: `v1`, `v2` or `token` (hook `http` only).
    pub imds_version: Option<ImdsVersion>,
    /// An HTTP request's method and path (`GET /latest/meta-data/...`, at most 256 bytes of
    /// the request line, never a header) (hook `http` only).
    pub request: Option<String>,
    /// What the rule does not allow of an HTTP request: `v1`, `path` or `unreadable_path`
    /// (hook `http` only; with verdict `audit`, what enforcement would refuse).
    pub refused: Option<Refused>,
    /// The attempt is this agent's own posture check (`posture = true`): its process made it
    /// (the tokenless request, or a connect the policy judged). `report` does not count it as
    /// a workload's. Only present when `true`.
    pub posture_check: bool,
    /// Fields that could not be read, so are `null`.
    pub unread: Vec<&'static str>,
    /// The executable as the kernel recorded it, for [`Record::enrich`] (not in the line).
    executable: Option<Executable>,
}

impl Record {
    /// Builds the line for an event from what the kernel recorded and the cgroup path.
    /// `boot_to_unix_ns` converts `CLOCK_BOOTTIME` to Unix time.
    #[must_use]
    pub fn new(
        event: &Decoded,
        boot_to_unix_ns: i128,
        cgroup: &Arc<CgroupFacts>,
        rule: &Arc<str>,
    ) -> Self {
        let raw = &event.raw;
        // Socket address hooks run in the task's context; the packet hook knows no task.
        let task = event.hook != Hook::Egress;
        let time = unix_time(raw.boot_ns, boot_to_unix_ns);
        let in_container = raw.flags & EVENT_FLAG_CONTAINER != 0 || cgroup.container;
        let parent = task && raw.unread & UNREAD_PARENT == 0;
        let comm = task && raw.unread & UNREAD_COMM == 0;
        // A packet knows no gid, except the one remembered on its socket, judged again
        // (`u32::MAX`, no gid, otherwise).
        let gid = task || raw.gid != u32::MAX;
        let mut unread = Vec::new();
        if !task {
            unread.extend(["pid", "tgid"]);
        }
        if !gid {
            unread.push("gid");
        }
        if !parent {
            unread.extend(["ppid", "parent_comm"]);
        }
        if !comm {
            unread.push("comm");
        }
        if cgroup.path.is_none() {
            unread.push("cgroup");
        }
        Self {
            first_seen: time,
            last_seen: time,
            time,
            verdict: event.verdict,
            count: 1,
            aggregated: false,
            pid: task.then_some(raw.pid),
            tgid: task.then_some(raw.tgid),
            ppid: parent.then_some(raw.ppid),
            parent_comm: parent.then(|| comm_text(&raw.parent_comm)),
            uid: raw.uid,
            user: None,
            gid: gid.then_some(raw.gid),
            group: None,
            comm: comm.then(|| comm_text(&raw.comm)),
            exe: None,
            cmdline: None,
            cgroup_id: raw.cgroup_id,
            workload: Arc::clone(cgroup),
            in_container,
            family: event.family,
            protocol: Some(protocol_name(raw.protocol)),
            dst: event.dst,
            port: Some(raw.port),
            rule: Arc::clone(rule),
            hook: event.hook,
            rewritten: raw.flags & EVENT_FLAG_REWRITTEN != 0,
            uid_ignored: raw.flags & EVENT_FLAG_UID_IGNORED != 0,
            imds_version: event.imds_version,
            request: (event.hook == Hook::Http && raw.request_len > 0)
                .then(|| request_text(&raw.request, raw.request_len)),
            refused: event.refused,
            // The kernel's process id of the writer: no other process can be this one.
            posture_check: raw.tgid != 0 && raw.tgid == own_pid(),
            unread,
            executable: (task && raw.unread & UNREAD_EXE == 0 && raw.exe_parts > 0).then(|| {
                Executable {
                    dev: (raw.exe_dev >> 20, raw.exe_dev & 0xf_ffff),
                    ino: raw.exe_ino,
                    on_fs: path_on_fs(raw),
                    in_container,
                }
            }),
        }
    }

    /// Adds what `/proc` and the user database say (best effort: see [`Enricher`]), their
    /// caches' ages measured at `now`.
    pub fn enrich(&mut self, enricher: &mut Enricher, boot_ns: u64, now: &Now) {
        // A uid that was not judged may be another user namespace's (a container's root
        // reads as 0): not named as the host's.
        if !self.uid_ignored {
            let user = enricher.user(self.uid, now);
            if user == Name::NotLookedUp {
                self.unread.push("user");
            }
            self.user = user.known();
        }
        if let Some(gid) = self.gid {
            let group = enricher.group(gid, now);
            if group == Name::NotLookedUp {
                self.unread.push("group");
            }
            self.group = group.known();
        }
        // Needed once: a record kept as the first of a burst should not carry it.
        let executable = self.executable.take();
        if let Some(tgid) = self.tgid {
            let process = enricher.process(tgid, boot_ns, executable.as_ref(), now);
            if process.exe.is_none() {
                self.unread.push("exe");
            }
            if process.cmdline.is_none() {
                self.unread.push("cmdline");
            }
            self.exe = process.exe;
            self.cmdline = process.cmdline;
        } else {
            self.unread.extend(["exe", "cmdline"]);
        }
    }

    /// The line for repeats the kernel folded when the agent never saw the burst's first
    /// attempt: only what the repeats share, from their fold key (the process, not its
    /// executable: it may have run another program since).
    ///
    /// # Errors
    /// When the key holds unknown constants.
    pub fn of_repeats(
        key: &FoldKey,
        boot_to_unix_ns: i128,
        cgroup: &Arc<CgroupFacts>,
        rule: &Arc<str>,
    ) -> Result<Self, DecodeError> {
        let raw = Event {
            boot_ns: 0,
            cgroup_id: key.cgroup_id,
            pid: 0,
            tgid: key.tgid,
            uid: key.uid,
            gid: key.gid,
            rule: key.rule,
            verdict: key.verdict,
            hook: key.hook,
            family: key.family,
            protocol: 0,
            port: key.port,
            generation: key.generation,
            unread: UNREAD_PARENT | UNREAD_COMM | UNREAD_EXE,
            flags: key.flags,
            _pad: [0; 3],
            addr: key.addr,
            comm: [0; COMM_LEN],
            ppid: 0,
            parent_comm: [0; COMM_LEN],
            exe_dev: 0,
            exe_ino: 0,
            exe_path: [0; EXE_PATH_PARTS * EXE_PART_LEN],
            exe_parts: 0,
            exe_flags: 0,
            imds_version: key.imds_version,
            refused: 0,
            request_len: 0,
            _tail: [0; 2],
            request: [0; HTTP_REQUEST_BYTES],
        };
        let mut record = Self::new(&decode_event(raw)?, boot_to_unix_ns, cgroup, rule);
        record.pid = None;
        record.protocol = None;
        if record.hook != Hook::Egress {
            record.unread.insert(0, "pid");
        }
        Ok(record)
    }

    /// The line for `repeats` more attempts like this one, from `first` to `last`.
    #[must_use]
    pub fn aggregate(&self, repeats: u64, first: UnixTime, last: UnixTime) -> Self {
        Self {
            time: last,
            count: repeats,
            aggregated: true,
            first_seen: first,
            last_seen: last,
            ..self.clone()
        }
    }
}

/// The executable's path on its file system, from the components the kernel recorded.
fn path_on_fs(raw: &Event) -> String {
    let parts = usize::from(raw.exe_parts).min(EXE_PATH_PARTS);
    let mut path = String::new();
    if raw.exe_flags & EXE_FLAG_TRUNCATED != 0 {
        path.push('…');
    }
    for part in (0..parts).rev() {
        let slot = &raw.exe_path[part * EXE_PART_LEN..(part + 1) * EXE_PART_LEN];
        let end = slot.iter().position(|&b| b == 0).unwrap_or(EXE_PART_LEN);
        path.push('/');
        path.push_str(&String::from_utf8_lossy(&slot[..end]));
    }
    path
}

/// This process's id, asked of the kernel once (not a system call per event).
fn own_pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

/// `CLOCK_BOOTTIME` nanoseconds as Unix time.
fn unix_time(boot_ns: u64, boot_to_unix_ns: i128) -> UnixTime {
    UnixTime(i128::from(boot_ns) + boot_to_unix_ns)
}

/// The thread name up to its first NUL, with invalid UTF-8 replaced.
fn comm_text(comm: &[u8; COMM_LEN]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// The name of an `IPPROTO_*` number, or the number.
fn protocol_name(protocol: u8) -> Cow<'static, str> {
    match protocol {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        other => other.to_string().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        let mut comm = [0u8; COMM_LEN];
        comm[..4].copy_from_slice(b"curl");
        Event {
            boot_ns: 1_500_000_000,
            cgroup_id: 4242,
            pid: 10,
            tgid: 9,
            uid: 1000,
            gid: 1001,
            rule: 0,
            verdict: VERDICT_DENY,
            hook: HOOK_CONNECT4,
            family: FAMILY_INET,
            protocol: 6,
            port: 80,
            generation: 0,
            unread: 0,
            flags: 0,
            _pad: [0; 3],
            addr: [169, 254, 169, 254, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            comm,
            ppid: 1,
            parent_comm: *b"bash\0\0\0\0\0\0\0\0\0\0\0\0",
            exe_dev: (254 << 20) | 3,
            exe_ino: 77,
            exe_path: exe_path(&["curl", "bin", "usr"]),
            exe_parts: 3,
            exe_flags: 0,
            imds_version: 0,
            refused: 0,
            request_len: 0,
            _tail: [0; 2],
            request: [0; HTTP_REQUEST_BYTES],
        }
    }

    /// Path components as the kernel writes them, leaf first.
    fn exe_path(parts: &[&str]) -> [u8; EXE_PATH_PARTS * EXE_PART_LEN] {
        let mut path = [0u8; EXE_PATH_PARTS * EXE_PART_LEN];
        for (i, part) in parts.iter().enumerate() {
            path[i * EXE_PART_LEN..i * EXE_PART_LEN + part.len()].copy_from_slice(part.as_bytes());
        }
        path
    }

    fn bytes(event: &Event) -> Vec<u8> {
        // SAFETY: reading a plain repr(C) value's bytes.
        unsafe { std::slice::from_raw_parts((&raw const *event).cast::<u8>(), size_of::<Event>()) }
            .to_vec()
    }

    /// The record of `raw`, in no known cgroup, decided by the default.
    fn record_of(raw: &Event) -> Record {
        Record::new(
            &decode(&bytes(raw)).unwrap(),
            0,
            &Arc::new(CgroupFacts::default()),
            &"default".into(),
        )
    }

    #[test]
    fn decodes_and_renders_every_field() {
        let decoded = decode(&bytes(&event())).unwrap();
        // 1970-01-01T00:00:01.5Z is boot_ns with a zero offset.
        let record = Record::new(
            &decoded,
            0,
            &Arc::new(CgroupFacts::of(Some("/work".into()))),
            &"default".into(),
        );
        let mut line = Vec::new();
        record.write_line(&mut line);
        assert_eq!(line.iter().position(|&b| b == b'\n'), Some(line.len() - 1));
        let json: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "time": "1970-01-01T00:00:01.5Z", "verdict": "deny", "count": 1,
                "aggregated": false, "first_seen": "1970-01-01T00:00:01.5Z",
                "last_seen": "1970-01-01T00:00:01.5Z", "pid": 10, "tgid": 9, "ppid": 1,
                "parent_comm": "bash", "uid": 1000, "user": null, "gid": 1001, "group": null,
                "comm": "curl", "exe": null, "cmdline": null, "cgroup_id": 4242,
                "cgroup": "/work", "unit": null, "container": null, "pod_uid": null,
                "in_container": false, "family": "ipv4", "protocol": "tcp", "dst": "169.254.169.254", "port": 80,
                "rule": "default", "hook": "connect4", "rewritten": false, "unread": []
            })
        );
    }

    #[test]
    fn the_kernels_record_of_the_executable_is_decoded() {
        let record = record_of(&event());
        assert_eq!(
            record.executable,
            Some(Executable {
                dev: (254, 3),
                ino: 77,
                on_fs: "/usr/bin/curl".into(),
                in_container: false,
            })
        );
        // Cut: only the last components were kept. In a container: the path it saw.
        let mut raw = event();
        raw.exe_flags = EXE_FLAG_TRUNCATED;
        raw.flags = EVENT_FLAG_CONTAINER;
        let record = record_of(&raw);
        let executable = record.executable.unwrap();
        assert_eq!(executable.on_fs, "…/usr/bin/curl");
        assert!(executable.in_container && record.in_container);
        // Unread: nothing to go by.
        raw.unread = UNREAD_EXE;
        let record = record_of(&raw);
        assert_eq!(record.executable, None);
    }

    #[test]
    fn a_packet_names_no_task_and_says_what_it_could_not_read() {
        let mut raw = event();
        raw.hook = HOOK_EGRESS;
        raw.unread = UNREAD_PARENT | UNREAD_COMM;
        // The gid a verdict remembered on the socket was given to, judged again: shown.
        assert_eq!(record_of(&raw).gid, Some(1001));
        // Otherwise the packet knows none.
        raw.gid = u32::MAX;
        let id = "ab".repeat(32);
        let cgroup = format!("/system.slice/docker-{id}.scope");
        let record = Record::new(
            &decode(&bytes(&raw)).unwrap(),
            0,
            &Arc::new(CgroupFacts::of(Some(cgroup))),
            &"default".into(),
        );
        assert_eq!(
            (record.pid, record.tgid, record.gid, record.ppid),
            (None, None, None, None)
        );
        assert_eq!(record.comm, None);
        assert_eq!(
            record.unread,
            ["pid", "tgid", "gid", "ppid", "parent_comm", "comm"]
        );
        let container = record.workload.placement.container.clone().unwrap();
        assert_eq!(
            (container.runtime.as_deref(), container.id),
            (Some("docker"), id)
        );
    }

    #[test]
    fn an_aggregate_counts_repeats_between_its_times() {
        let record = record_of(&event());
        assert_eq!(record.unread, ["cgroup"]);
        let aggregate = record.aggregate(41, UnixTime(2_000_000_000), UnixTime(3_000_000_000));
        assert_eq!((aggregate.count, aggregate.aggregated), (41, true));
        assert_eq!(aggregate.first_seen.to_string(), "1970-01-01T00:00:02Z");
        assert_eq!(aggregate.last_seen.to_string(), "1970-01-01T00:00:03Z");
        assert_eq!(aggregate.time, aggregate.last_seen);
        assert_eq!(aggregate.pid, record.pid);
        let mut line = Vec::new();
        aggregate.write_line(&mut line);
        let json: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            [&json["time"], &json["first_seen"], &json["last_seen"]],
            [
                "1970-01-01T00:00:03Z",
                "1970-01-01T00:00:02Z",
                "1970-01-01T00:00:03Z"
            ]
        );
    }

    #[test]
    fn ipv6_and_mapped_addresses() {
        let mut raw = event();
        raw.family = FAMILY_INET6;
        raw.hook = HOOK_SENDMSG6;
        raw.verdict = VERDICT_AUDIT;
        raw.protocol = 17;
        raw.addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 169, 254, 169, 254];
        let decoded = decode(&bytes(&raw)).unwrap();
        let record = Record::new(
            &decoded,
            0,
            &Arc::new(CgroupFacts::default()),
            &"uid 0".into(),
        );
        assert_eq!(record.dst.to_string(), "::ffff:169.254.169.254");
        assert_eq!(record.protocol.as_deref(), Some("udp"));
        assert_eq!(record.verdict, Verdict::Audit);
        assert_eq!(record.hook, Hook::Sendmsg6);
    }

    #[test]
    fn a_rewritten_icmp_packet_says_so() {
        let mut raw = event();
        raw.hook = HOOK_EGRESS;
        raw.protocol = 1;
        raw.flags = EVENT_FLAG_REWRITTEN;
        let record = record_of(&raw);
        assert_eq!(record.protocol.as_deref(), Some("icmp"));
        assert!(record.rewritten);
        raw.flags = 0;
        raw.protocol = 136;
        let record = record_of(&raw);
        assert_eq!(record.protocol.as_deref(), Some("udplite"));
        assert!(!record.rewritten);
    }

    #[test]
    fn a_packet_judged_without_its_uid_says_so_in_its_line() {
        let line_of = |flags: u8| {
            let mut raw = event();
            raw.hook = HOOK_EGRESS;
            raw.uid = 0;
            raw.flags = flags;
            let record = record_of(&raw);
            let mut line = Vec::new();
            record.write_line(&mut line);
            serde_json::from_slice::<serde_json::Value>(&line).unwrap()
        };
        let ignored = line_of(EVENT_FLAG_UID_IGNORED | EVENT_FLAG_REWRITTEN);
        assert_eq!(ignored["uid_ignored"], true, "{ignored}");
        assert_eq!(ignored["uid"], 0, "{ignored}");
        assert_eq!(ignored["rewritten"], true, "{ignored}");
        let judged = line_of(EVENT_FLAG_REWRITTEN);
        assert!(judged.get("uid_ignored").is_none(), "{judged}");
    }

    #[test]
    fn repeats_keep_every_flag_of_their_first_attempt() {
        let mut raw = event();
        raw.hook = HOOK_EGRESS;
        raw.flags = EVENT_FLAG_REWRITTEN | EVENT_FLAG_UID_IGNORED | EVENT_FLAG_CONTAINER;
        let key = FoldKey::of(&raw);
        let other = FoldKey::of(&Event { flags: 0, ..raw });
        assert_ne!(key, other, "attempts that differ in a flag fold apart");
        // An aggregate whose first attempt the agent never saw says what its key says.
        let record = Record::of_repeats(
            &key,
            0,
            &Arc::new(CgroupFacts::default()),
            &"default".into(),
        )
        .unwrap();
        assert!(record.rewritten && record.uid_ignored && record.in_container);
    }

    #[test]
    fn an_imds_version_reads_back_as_written() {
        // The line writes `name`; `report` reads it back through `Deserialize`.
        for version in [ImdsVersion::V1, ImdsVersion::V2, ImdsVersion::Token] {
            let read: ImdsVersion =
                serde_json::from_str(&format!("\"{}\"", version.name())).unwrap();
            assert_eq!(read, version);
        }
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert_eq!(decode(&[0; 12]), Err(DecodeError::Short(12)));
        let mut raw = event();
        raw.verdict = 9;
        assert_eq!(
            decode(&bytes(&raw)),
            Err(DecodeError::Unknown {
                field: "verdict",
                value: 9
            })
        );
    }

    #[test]
    fn comm_without_nul_and_with_bad_utf8() {
        assert_eq!(comm_text(b"0123456789abcdef"), "0123456789abcdef");
        let mut comm = [0u8; COMM_LEN];
        comm[0] = 0xff;
        assert_eq!(comm_text(&comm), "\u{fffd}");
    }
}
