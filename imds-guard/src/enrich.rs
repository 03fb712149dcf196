//! What the agent adds to an event from `/proc` and the user database: the executable, the
//! command line, and user and group names. All best effort: a process may be gone by the time
//! its event is read (the kernel already recorded what must not be lost), and a uid may have no
//! name. Lookups are cached, so a flood costs one `/proc` read per reported attempt.

use std::{collections::HashMap, fs, io::Read as _};

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

/// Caches of process, user and group lookups.
#[derive(Default)]
pub struct Enricher {
    /// (tgid, start time in clock ticks since boot) → what was read.
    processes: HashMap<(u32, u64), Process>,
    users: HashMap<u32, Option<String>>,
    groups: HashMap<u32, Option<String>>,
    /// Nanoseconds per clock tick of `/proc/PID/stat`'s start time.
    tick_ns: u64,
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
        let started = start_ticks(tgid)?;
        // One tick of slack: the start time is rounded down to a tick.
        if started.saturating_mul(self.tick_ns) > boot_ns.saturating_add(self.tick_ns) {
            return None;
        }
        if self.processes.len() >= CACHE_ENTRIES {
            self.processes.clear();
        }
        let process = self
            .processes
            .entry((tgid, started))
            .or_insert_with(|| Process {
                exe: fs::read_link(format!("/proc/{tgid}/exe"))
                    .ok()
                    .map(|path| path.to_string_lossy().into_owned()),
                cmdline: cmdline(tgid),
            })
            .clone();
        // Read after the start time: if the process ended and its id was reused in between,
        // the start time no longer matches and what was read belongs to another process.
        (start_ticks(tgid) == Some(started)).then_some(process)
    }

    /// The name of `uid` in the user database.
    pub fn user(&mut self, uid: u32) -> Option<String> {
        cached(&mut self.users, uid, |uid| {
            nix::unistd::User::from_uid(uid.into())
                .ok()
                .flatten()
                .map(|user| user.name)
        })
    }

    /// The name of `gid` in the group database.
    pub fn group(&mut self, gid: u32) -> Option<String> {
        cached(&mut self.groups, gid, |gid| {
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
    look_up: impl FnOnce(u32) -> Option<String>,
) -> Option<String> {
    if cache.len() >= CACHE_ENTRIES {
        cache.clear();
    }
    cache.entry(id).or_insert_with(|| look_up(id)).clone()
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
        let now = crate::agent::boot_time_ns();
        let process = enricher.process(me, now).unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(process.exe.as_deref(), exe.to_str());
        assert!(process.cmdline.is_some());
        // An attempt before this process started was not this process's.
        assert_eq!(enricher.process(me, 0), None);
        assert_eq!(enricher.user(0).as_deref(), Some("root"));
        assert_eq!(enricher.group(0).as_deref(), Some("root"));
    }
}
