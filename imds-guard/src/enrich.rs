//! What the agent adds to an event from `/proc` and the user database: the executable, the
//! command line, and user and group names. All best effort: a process may be gone by the time
//! its event is read (the kernel already recorded what must not be lost), and a uid may have no
//! name. Lookups are cached, and user database lookups (which may ask a directory service) are
//! limited per batch of events, so that neither a slow directory nor a flood of distinct uids
//! holds up reporting.

use std::{
    collections::HashMap,
    fs,
    io::Read as _,
    time::{Duration, Instant},
};

/// Bytes of a command line kept; longer ones end with `…`.
pub const CMDLINE_MAX_BYTES: usize = 1024;
/// Entries each cache holds before it is emptied (memory stays bounded under any load).
const CACHE_ENTRIES: usize = 4096;

/// What `/proc/PID` says about a process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Process {
    /// `/proc/PID/exe`.
    pub exe: Option<String>,
    /// `/proc/PID/cmdline`, arguments separated by spaces, at most [`CMDLINE_MAX_BYTES`].
    pub cmdline: Option<String>,
}

/// How long a process's `/proc` entry, once read, is taken to be the same process without
/// reading its start time again: a pid is not reused that fast (the kernel hands out pids in
/// order, so reuse needs `pid_max` forks in between).
const RECHECK_NS: u64 = 1_000_000_000;

/// A process as read, and when that was checked.
struct Seen {
    /// Start time in clock ticks since boot.
    started: u64,
    process: Process,
    /// When the start time was last read (`CLOCK_BOOTTIME` ns).
    checked_ns: u64,
}

/// Caches of process, user and group lookups.
#[derive(Default)]
pub struct Enricher {
    /// tgid → what was read.
    processes: HashMap<u32, Seen>,
    users: HashMap<u32, Option<String>>,
    groups: HashMap<u32, Option<String>>,
    /// Nanoseconds per clock tick of `/proc/PID/stat`'s start time.
    tick_ns: u64,
    /// User database lookups stop at this instant (`None`: no limit).
    lookups_until: Option<Instant>,
}

impl Enricher {
    /// An enricher with empty caches.
    #[must_use]
    pub fn new() -> Self {
        let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|ticks| u64::try_from(ticks).ok())
            .filter(|&ticks| ticks > 0)
            .unwrap_or(100);
        Self {
            tick_ns: 1_000_000_000 / ticks_per_second,
            ..Self::default()
        }
    }

    /// The process `tgid` that made an attempt at `boot_ns` (`CLOCK_BOOTTIME`), if it still
    /// runs; a process with that id started after the attempt is another one (`None`).
    pub fn process(&mut self, tgid: u32, boot_ns: u64) -> Option<Process> {
        let now = crate::events::boot_time_ns();
        let tick_ns = self.tick_ns;
        // One tick of slack: the start time is rounded down to a tick.
        let made_it =
            |started: u64| started.saturating_mul(tick_ns) <= boot_ns.saturating_add(tick_ns);
        if let Some(seen) = self.processes.get(&tgid)
            && now.saturating_sub(seen.checked_ns) < RECHECK_NS
        {
            return made_it(seen.started).then(|| seen.process.clone());
        }
        let started = start_ticks(tgid)?;
        if !made_it(started) {
            return None;
        }
        if self.processes.len() >= CACHE_ENTRIES {
            self.processes.clear();
        }
        let known = self
            .processes
            .get(&tgid)
            .filter(|seen| seen.started == started)
            .map(|seen| seen.process.clone());
        let process = if let Some(process) = known {
            process
        } else {
            let process = Process {
                exe: fs::read_link(format!("/proc/{tgid}/exe"))
                    .ok()
                    .map(|path| path.to_string_lossy().into_owned()),
                cmdline: cmdline(tgid),
            };
            // Read after the start time: if the process ended and its id was reused in
            // between, the start time no longer matches and what was read is another's.
            if start_ticks(tgid) != Some(started) {
                return None;
            }
            process
        };
        self.processes.insert(
            tgid,
            Seen {
                started,
                process: process.clone(),
                checked_ns: now,
            },
        );
        Some(process)
    }

    /// Allows `budget` of user database lookups from now on (the cache answers regardless):
    /// a directory that answers slowly, or a flood of distinct uids, then costs a batch of
    /// events at most that, and the names it could not look up are left unread.
    pub fn allow_lookups_for(&mut self, budget: Duration) {
        self.lookups_until = Some(Instant::now() + budget);
    }

    /// The name of `uid` in the user database.
    pub fn user(&mut self, uid: u32) -> Name {
        let until = self.lookups_until;
        cached(&mut self.users, uid, until, |uid| {
            nix::unistd::User::from_uid(uid.into())
                .ok()
                .flatten()
                .map(|user| user.name)
        })
    }

    /// The name of `gid` in the group database.
    pub fn group(&mut self, gid: u32) -> Name {
        let until = self.lookups_until;
        cached(&mut self.groups, gid, until, |gid| {
            nix::unistd::Group::from_gid(gid.into())
                .ok()
                .flatten()
                .map(|group| group.name)
        })
    }
}

fn cached(
    cache: &mut HashMap<u32, Option<String>>,
    id: u32,
    until: Option<Instant>,
    look_up: impl FnOnce(u32) -> Option<String>,
) -> Name {
    let name = match cache.get(&id) {
        Some(name) => name.clone(),
        None if until.is_some_and(|until| Instant::now() >= until) => return Name::NotLookedUp,
        None => {
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            let name = look_up(id);
            cache.insert(id, name.clone());
            name
        }
    };
    name.map_or(Name::Nameless, Name::Known)
}

/// What the user or group database says of an id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Name {
    /// Its name.
    Known(String),
    /// It has none.
    Nameless,
    /// It was not looked up: the batch's lookup budget was spent.
    NotLookedUp,
}

impl Name {
    /// The name, if known.
    #[must_use]
    pub fn known(self) -> Option<String> {
        match self {
            Self::Known(name) => Some(name),
            Self::Nameless | Self::NotLookedUp => None,
        }
    }
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot.
fn start_ticks(tgid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{tgid}/stat")).ok()?;
    parse_start_ticks(&stat)
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    // The name (field 2) is in parentheses and may hold spaces and parentheses itself.
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Field 3 is the first after the name; field 22 is the 20th.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

fn cmdline(tgid: u32) -> Option<String> {
    let file = fs::File::open(format!("/proc/{tgid}/cmdline")).ok()?;
    let mut bytes = Vec::with_capacity(256);
    file.take(CMDLINE_MAX_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    // Kernel threads and zombies have none.
    if bytes.is_empty() {
        return None;
    }
    Some(render_cmdline(&bytes))
}

/// NUL-separated arguments as one line, cut at [`CMDLINE_MAX_BYTES`].
fn render_cmdline(bytes: &[u8]) -> String {
    let cut = bytes.len() > CMDLINE_MAX_BYTES;
    let kept = &bytes[..bytes.len().min(CMDLINE_MAX_BYTES)];
    let kept = kept.strip_suffix(b"\0").unwrap_or(kept);
    let mut text: String = String::from_utf8_lossy(kept)
        .chars()
        .map(|c| if c == '\0' { ' ' } else { c })
        .collect();
    if cut {
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_after_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 10 18446744073709551615";
        assert_eq!(parse_start_ticks(stat), Some(987_654));
        assert_eq!(parse_start_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn command_lines_are_joined_and_bounded() {
        assert_eq!(
            render_cmdline(b"curl\0-s\0http://x/\0"),
            "curl -s http://x/"
        );
        let long = vec![b'a'; CMDLINE_MAX_BYTES + 1];
        let text = render_cmdline(&long);
        assert_eq!(text.chars().count(), CMDLINE_MAX_BYTES + 1);
        assert!(text.ends_with('…'));
    }

    #[test]
    fn reads_this_process_and_refuses_a_later_start() {
        let mut enricher = Enricher::new();
        let me = std::process::id();
        let now = crate::events::boot_time_ns();
        let process = enricher.process(me, now).unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(process.exe.as_deref(), exe.to_str());
        assert!(process.cmdline.is_some());
        // An attempt before this process started was not this process's.
        assert_eq!(enricher.process(me, 0), None);
        assert_eq!(enricher.user(0), Name::Known("root".into()));
        assert_eq!(enricher.group(0), Name::Known("root".into()));
        assert_eq!(enricher.user(4_000_000_000), Name::Nameless);
        // Out of budget: what is cached still answers, the rest is not looked up.
        enricher.allow_lookups_for(Duration::ZERO);
        assert_eq!(enricher.user(0), Name::Known("root".into()));
        assert_eq!(enricher.user(4_000_000_000), Name::Nameless);
        assert_eq!(enricher.user(65534), Name::NotLookedUp);
    }
}
