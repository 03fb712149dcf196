//! What the agent adds to an event from `/proc` and the user database: the executable, the
//! command line, and user and group names. All best effort: a process may be gone by the time
//! its event is read, or have run another program since, and a uid may have no name. The
//! kernel recorded at the attempt what must not be lost: which executable made it (its device,
//! inode and path on its file system), which names the process whatever `/proc` says by then.
//! Lookups are cached, a user or group database is listed whole where that list is all of it
//! (see [`crate::host::userdb`]), and lookups (which may ask a directory service) are limited
//! to a share of each second, so that neither a slow directory nor a flood of distinct uids
//! holds up reporting.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::host::{
    procfs::{self, Mount},
    userdb::{Database, Listing},
};

/// Bytes of a command line kept; longer ones end with `…`.
pub const CMDLINE_MAX_BYTES: usize = 1024;
/// Entries each cache holds before it is emptied (memory stays bounded under any load).
const CACHE_ENTRIES: usize = 4096;

/// What the agent says about the process that made an attempt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Process {
    /// The executable: `/proc/PID/exe` while the process runs the program that made the
    /// attempt, else where the kernel's record of it is found.
    pub exe: Option<Arc<str>>,
    /// `/proc/PID/cmdline`, arguments separated by spaces, at most [`CMDLINE_MAX_BYTES`]; only
    /// while the process runs the program that made the attempt.
    pub cmdline: Option<Arc<str>>,
}

/// An executable as the kernel recorded it at the attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executable {
    /// Its file system's device: major and minor.
    pub dev: (u32, u32),
    /// Its inode number.
    pub ino: u64,
    /// Its path from the root of its file system (a container image's root, for a container's
    /// program); starting with `…/` when the kernel kept only its last components.
    pub on_fs: String,
    /// The task was in a container: its path is the one it saw.
    pub in_container: bool,
}

impl Executable {
    /// Whether the file that `/proc/PID/exe` names (`file`, what it resolves to, and `link`)
    /// is this one: the same inode on the same device. In a container, the same inode at the
    /// same path will do: an overlay file system may show `stat` another device than the
    /// kernel's inode has. A path alone never does: a copy elsewhere can have any path.
    fn is(&self, file: Option<FileId>, link: Option<&str>) -> bool {
        file.is_some_and(|file| {
            file.ino == self.ino
                && (file.dev == self.dev
                    || (self.in_container && link.is_some_and(|link| link == self.on_fs)))
        })
    }
}

/// A file's identity: its device (major, minor) and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: (u32, u32),
    ino: u64,
}

impl FileId {
    fn of(metadata: &fs::Metadata) -> Self {
        let dev = metadata.dev();
        Self {
            dev: (
                u32::try_from(nix::sys::stat::major(dev)).unwrap_or(u32::MAX),
                u32::try_from(nix::sys::stat::minor(dev)).unwrap_or(u32::MAX),
            ),
            ino: metadata.ino(),
        }
    }
}

/// How often the mount table is read again at most, when an executable's device is not in it.
const MOUNTS_REREAD_NS: u64 = 1_000_000_000;

/// How long a process's `/proc` entry, once read, is taken to be the same process without
/// reading its start time again: a pid is not reused that fast (the kernel hands out pids in
/// order, so reuse needs `pid_max` forks in between).
const RECHECK_NS: u64 = 1_000_000_000;

/// The time, read once for a batch of events (the event loop reads it per drain of the ring,
/// a few milliseconds at most): what the caches' ages are measured against.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// Monotonic.
    pub instant: Instant,
    /// `CLOCK_BOOTTIME` nanoseconds.
    pub boot_ns: u64,
}

impl Now {
    /// The time now.
    #[must_use]
    pub fn read() -> Self {
        Self {
            instant: Instant::now(),
            boot_ns: crate::host::clock::boot_time_ns(),
        }
    }
}

/// A process as read, and when that was checked.
struct Seen {
    /// Start time in clock ticks since boot.
    started: u64,
    process: Process,
    /// What `/proc/PID/exe` resolved to when read.
    exe_file: Option<FileId>,
    /// When the start time was last read (`CLOCK_BOOTTIME` ns).
    checked_ns: u64,
}

/// Caches of process, user and group lookups.
#[derive(Default)]
pub struct Enricher {
    /// tgid → what was read.
    processes: HashMap<u32, Seen>,
    users: HashMap<u32, Option<Arc<str>>>,
    groups: HashMap<u32, Option<Arc<str>>>,
    /// The user database listed whole, where that is all of it (see [`crate::host::userdb`]).
    users_listed: Listed,
    /// The group database listed whole, likewise.
    groups_listed: Listed,
    /// Nanoseconds per clock tick of `/proc/PID/stat`'s start time.
    tick_ns: u64,
    /// What user and group database lookups may spend (`None`: no limit).
    lookups: Option<LookupBudget>,
    /// The mount table, to find an executable's file system.
    mounts: Vec<Mount>,
    /// When it was read (`CLOCK_BOOTTIME` ns).
    mounts_read_ns: u64,
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
            mounts: procfs::mounts().unwrap_or_default(),
            mounts_read_ns: crate::host::clock::boot_time_ns(),
            ..Self::default()
        }
    }

    /// The process `tgid` that made an attempt at `boot_ns` (`CLOCK_BOOTTIME`) running `exe`
    /// (the kernel's record; `None` when it could not read it). What `/proc` says is used while
    /// the process still runs that program; a process gone, or one that has run another
    /// program since (`execve`), is named by the kernel's record alone, without a command line.
    pub fn process(
        &mut self,
        tgid: u32,
        boot_ns: u64,
        exe: Option<&Executable>,
        now: &Now,
    ) -> Process {
        let live = self.live(tgid, boot_ns, exe, now.boot_ns);
        match (live, exe) {
            (Some((process, file)), Some(exe)) if exe.is(file, process.exe.as_deref()) => process,
            (Some((process, _)), None) => process,
            (_, Some(exe)) => Process {
                exe: Some(self.locate(exe).into()),
                cmdline: None,
            },
            (None, None) => Process::default(),
        }
    }

    /// What `/proc` says of process `tgid`, if it runs and made an attempt at `boot_ns` (a
    /// process with that id started later is another one), with what its `exe` resolves to.
    /// A cached reading is read again when `exe` says the process ran another program.
    fn live(
        &mut self,
        tgid: u32,
        boot_ns: u64,
        exe: Option<&Executable>,
        now: u64,
    ) -> Option<(Process, Option<FileId>)> {
        let tick_ns = self.tick_ns;
        // One tick of slack: the start time is rounded down to a tick.
        let made_it =
            |started: u64| started.saturating_mul(tick_ns) <= boot_ns.saturating_add(tick_ns);
        let same_program =
            |seen: &Seen| exe.is_none_or(|exe| exe.is(seen.exe_file, seen.process.exe.as_deref()));
        if let Some(seen) = self.processes.get(&tgid)
            && now.saturating_sub(seen.checked_ns) < RECHECK_NS
            && same_program(seen)
        {
            return made_it(seen.started).then(|| (seen.process.clone(), seen.exe_file));
        }
        let started = procfs::start_ticks(tgid)?;
        if !made_it(started) {
            return None;
        }
        if self.processes.len() >= CACHE_ENTRIES {
            self.processes.clear();
        }
        let known = self
            .processes
            .get(&tgid)
            .filter(|seen| seen.started == started && same_program(seen))
            .map(|seen| (seen.process.clone(), seen.exe_file));
        let (process, exe_file) = if let Some(known) = known {
            known
        } else {
            let link = procfs::exe(tgid);
            let process = Process {
                exe: fs::read_link(&link)
                    .ok()
                    .map(|path| path.to_string_lossy().into()),
                cmdline: cmdline(tgid),
            };
            let exe_file = fs::metadata(&link)
                .ok()
                .map(|metadata| FileId::of(&metadata));
            // Read after the start time: if the process ended and its id was reused in
            // between, the start time no longer matches and what was read is another's.
            if procfs::start_ticks(tgid) != Some(started) {
                return None;
            }
            (process, exe_file)
        };
        self.processes.insert(
            tgid,
            Seen {
                started,
                process: process.clone(),
                exe_file,
                checked_ns: now,
            },
        );
        Some((process, exe_file))
    }

    /// Where the executable the kernel recorded can be found: its path as its task saw it for
    /// a container's (its image is the container's root), else below the mount of its file
    /// system in the agent's mount table, else its path on its file system.
    fn locate(&mut self, exe: &Executable) -> String {
        if exe.in_container {
            return exe.on_fs.clone();
        }
        let now = crate::host::clock::boot_time_ns();
        let mut found = procfs::locate(&self.mounts, exe.dev, &exe.on_fs);
        if found.is_none() && now.saturating_sub(self.mounts_read_ns) >= MOUNTS_REREAD_NS {
            self.mounts = procfs::mounts().unwrap_or_default();
            self.mounts_read_ns = now;
            found = procfs::locate(&self.mounts, exe.dev, &exe.on_fs);
        }
        // Not mounted where the agent runs (a private mount namespace's file system): the path
        // is only the file's on that file system, and says so.
        found.map_or_else(
            || {
                format!(
                    "{} (on device {}:{}, not mounted where imds-guard runs)",
                    exe.on_fs, exe.dev.0, exe.dev.1
                )
            },
            |path| path.to_string_lossy().into_owned(),
        )
    }

    /// Lets user and group database lookups spend at most `per_second` of each second, a
    /// tenth of it in each tenth of a second (the caches answer regardless): a directory that
    /// answers slowly, or a flood of distinct uids and gids (each a first lookup, 10–50 µs
    /// or more through `nss-systemd`), then costs the agent that share of a CPU at most,
    /// however often it drains the ring and however short the flood, and the names it could
    /// not look up are left unread.
    pub fn limit_lookups(&mut self, per_second: Duration) {
        self.lookups = Some(LookupBudget {
            per_window: per_second / LOOKUP_WINDOWS_PER_SECOND,
            window: Instant::now(),
            spent: Duration::ZERO,
        });
    }

    /// The name of `uid` in the user database.
    pub fn user(&mut self, uid: u32, now: &Now) -> Name {
        if let Some(name) =
            self.users_listed
                .name(Database::Users, uid, self.lookups.as_mut(), now.instant)
        {
            return name;
        }
        cached(&mut self.users, uid, self.lookups.as_mut(), |uid| {
            nix::unistd::User::from_uid(uid.into())
                .ok()
                .flatten()
                .map(|user| user.name)
        })
    }

    /// The name of `gid` in the group database.
    pub fn group(&mut self, gid: u32, now: &Now) -> Name {
        if let Some(name) =
            self.groups_listed
                .name(Database::Groups, gid, self.lookups.as_mut(), now.instant)
        {
            return name;
        }
        cached(&mut self.groups, gid, self.lookups.as_mut(), |gid| {
            nix::unistd::Group::from_gid(gid.into())
                .ok()
                .flatten()
                .map(|group| group.name)
        })
    }
}

/// The windows a second's lookup budget is spread over: a burst of new ids takes a window's
/// share at once, not the second's.
const LOOKUP_WINDOWS_PER_SECOND: u32 = 10;
/// The most windows of budget one overrun may take from the windows after it (ten seconds).
const LOOKUP_DEBT_WINDOWS: u32 = 10 * LOOKUP_WINDOWS_PER_SECOND;

/// Time database lookups may spend per window (a tenth of a second), and what they spent.
struct LookupBudget {
    per_window: Duration,
    /// When the current window began.
    window: Instant,
    spent: Duration,
}

impl LookupBudget {
    /// The length of a window.
    const WINDOW: Duration = Duration::from_millis(1000 / LOOKUP_WINDOWS_PER_SECOND as u64);

    /// Whether a lookup may be made now. A lookup that overran (a directory that took seconds
    /// to answer) is paid off by the windows after it: each window that passes takes one
    /// window's budget off what was spent, so the share of time stays the budget's.
    fn available(&mut self) -> bool {
        let elapsed = self.window.elapsed();
        let windows =
            u32::try_from(elapsed.as_nanos() / Self::WINDOW.as_nanos()).unwrap_or(u32::MAX);
        if windows > 0 {
            self.window += Self::WINDOW.saturating_mul(windows);
            self.spent = self
                .spent
                .saturating_sub(self.per_window.saturating_mul(windows));
        }
        self.spent < self.per_window
    }

    /// Charges `spent` to the budget. Debt of ten seconds' budget at most: a directory that
    /// hung for a minute costs the names of the next ten seconds, not of the next ten minutes.
    fn charge(&mut self, spent: Duration) {
        self.spent = (self.spent + spent).min(self.per_window.saturating_mul(LOOKUP_DEBT_WINDOWS));
    }
}

/// How long a listing of a database answers before it is taken again (a user added since,
/// or a systemd service's dynamic user, is named that much later at most).
const LISTING_MAX_AGE: Duration = Duration::from_secs(10);

/// A database's listing, where a list is all of it, taken again once it is old.
#[derive(Default)]
struct Listed {
    listing: Option<Listing>,
    /// When `nsswitch.conf` was last read for it (`None`: never).
    checked: Option<Instant>,
}

impl Listed {
    /// The name of `id` from the listing of `database`, taken (again) first when it is old
    /// (`now`) and `budget` allows, its time charged to it (an old listing answers meanwhile);
    /// `None` when the database cannot be listed whole, and each id must be looked up.
    fn name(
        &mut self,
        database: Database,
        id: u32,
        budget: Option<&mut LookupBudget>,
        now: Instant,
    ) -> Option<Name> {
        if self
            .checked
            .is_none_or(|checked| now.saturating_duration_since(checked) >= LISTING_MAX_AGE)
        {
            let mut budget = budget;
            if budget.as_mut().is_none_or(|budget| budget.available()) {
                let started = Instant::now();
                self.listing = Listing::take(database);
                self.checked = Some(Instant::now());
                if let Some(budget) = budget {
                    budget.charge(started.elapsed());
                }
            }
        }
        let listing = self.listing.as_ref()?;
        Some(
            listing
                .name(id)
                .map_or(Name::Nameless, |name| Name::Known(name.clone())),
        )
    }
}

/// `id`'s name from `cache`, else looked up (and cached, a missing name as much as a found
/// one: a flood of unknown ids looks each up once) if `budget` allows.
fn cached(
    cache: &mut HashMap<u32, Option<Arc<str>>>,
    id: u32,
    budget: Option<&mut LookupBudget>,
    look_up: impl FnOnce(u32) -> Option<String>,
) -> Name {
    let name = if let Some(name) = cache.get(&id) {
        name.clone()
    } else {
        let mut budget = budget;
        if budget.as_mut().is_some_and(|budget| !budget.available()) {
            return Name::NotLookedUp;
        }
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        let started = Instant::now();
        let name = look_up(id).map(Arc::from);
        if let Some(budget) = budget {
            budget.charge(started.elapsed());
        }
        cache.insert(id, name.clone());
        name
    };
    name.map_or(Name::Nameless, Name::Known)
}

/// What the user or group database says of an id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Name {
    /// Its name.
    Known(Arc<str>),
    /// It has none.
    Nameless,
    /// It was not looked up: the second's lookup budget was spent.
    NotLookedUp,
}

impl Name {
    /// The name, if known.
    #[must_use]
    pub fn known(self) -> Option<Arc<str>> {
        match self {
            Self::Known(name) => Some(name),
            Self::Nameless | Self::NotLookedUp => None,
        }
    }
}

fn cmdline(tgid: u32) -> Option<Arc<str>> {
    let bytes = procfs::cmdline_bytes(tgid, CMDLINE_MAX_BYTES)?;
    // Kernel threads and zombies have none.
    if bytes.is_empty() {
        return None;
    }
    Some(render_cmdline(&bytes).into())
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

    /// The kernel's record of the file at `path`, as an event carries it.
    fn recorded(path: &std::path::Path) -> Executable {
        let metadata = fs::metadata(path).unwrap();
        let file = FileId::of(&metadata);
        // This file's own file system: the path below the mount that shows it.
        let mounts = procfs::mounts().unwrap();
        let mount = (mounts.iter())
            .filter(|m| m.dev == file.dev && path.starts_with(&m.point))
            .max_by_key(|m| m.point.as_os_str().len())
            .unwrap();
        let on_fs = mount
            .root
            .join(path.strip_prefix(&mount.point).unwrap())
            .to_string_lossy()
            .into_owned();
        Executable {
            dev: file.dev,
            ino: file.ino,
            on_fs,
            in_container: false,
        }
    }

    #[test]
    fn reads_this_process_and_refuses_a_later_start() {
        let mut enricher = Enricher::new();
        let me = std::process::id();
        let now = crate::host::clock::boot_time_ns();
        let exe = std::env::current_exe().unwrap();
        let kernel = recorded(&exe);
        let process = enricher.process(me, now, Some(&kernel), &Now::read());
        assert_eq!(process.exe.as_deref(), exe.to_str());
        assert!(process.cmdline.is_some());
        assert_eq!(enricher.process(me, now, None, &Now::read()), process);
        // An attempt before this process started was not this process's: it is named by the
        // kernel's record alone, found below the mount of its file system.
        assert_eq!(
            enricher.process(me, 0, Some(&kernel), &Now::read()),
            Process {
                exe: exe.to_str().map(Arc::from),
                cmdline: None
            }
        );
        assert_eq!(
            enricher.process(me, 0, None, &Now::read()),
            Process::default()
        );
        assert_eq!(enricher.group(0, &Now::read()), Name::Known("root".into()));
        // A user database that cannot be listed whole (a directory's): each id looked up.
        enricher.users_listed = Listed {
            listing: None,
            checked: Some(Instant::now()),
        };
        assert_eq!(enricher.user(0, &Now::read()), Name::Known("root".into()));
        assert_eq!(enricher.user(4_000_000_000, &Now::read()), Name::Nameless);
        // Out of budget: what is cached still answers, the rest is not looked up.
        enricher.limit_lookups(Duration::ZERO);
        assert_eq!(enricher.user(0, &Now::read()), Name::Known("root".into()));
        assert_eq!(enricher.user(4_000_000_000, &Now::read()), Name::Nameless);
        assert_eq!(enricher.user(65534, &Now::read()), Name::NotLookedUp);
        // One listed whole answers every id from the list, out of budget too.
        enricher.users_listed = Listed {
            listing: Some(Listing::of([(65534, "nobody")])),
            checked: Some(Instant::now()),
        };
        assert_eq!(
            enricher.user(65534, &Now::read()),
            Name::Known("nobody".into())
        );
        assert_eq!(enricher.user(65533, &Now::read()), Name::Nameless);
    }

    #[test]
    fn a_listing_is_taken_again_once_old_and_within_the_budget() {
        let mut listed = Listed::default();
        let mut budget = LookupBudget {
            per_window: Duration::from_secs(1),
            window: Instant::now(),
            spent: Duration::ZERO,
        };
        // This machine's `nsswitch.conf` decides whether its user database lists whole.
        let whole = std::fs::read_to_string("/etc/nsswitch.conf")
            .is_ok_and(|text| crate::host::userdb::listable(&text, Database::Users));
        let root = listed.name(Database::Users, 0, Some(&mut budget), Instant::now());
        assert_eq!(root, whole.then(|| Name::Known("root".into())));
        assert!(
            budget.spent > Duration::ZERO,
            "the listing's time is charged"
        );
        // Old, but no budget left: the old listing answers (none: each id is looked up).
        listed.checked = Instant::now().checked_sub(LISTING_MAX_AGE);
        budget.spent = budget.per_window;
        listed.listing = Some(Listing::of([(7, "old")]));
        assert_eq!(
            listed.name(Database::Users, 7, Some(&mut budget), Instant::now()),
            Some(Name::Known("old".into()))
        );
        // With budget, it is taken again.
        budget.spent = Duration::ZERO;
        assert_ne!(
            listed.name(Database::Users, 7, Some(&mut budget), Instant::now()),
            Some(Name::Known("old".into()))
        );
    }

    #[test]
    fn lookups_spend_at_most_the_budget_of_each_window() {
        // The window ends in an hour: a test thread the machine leaves waiting does not start
        // a new one (and a fresh budget) between the steps below.
        let mut budget = LookupBudget {
            per_window: Duration::from_millis(10),
            window: Instant::now() + Duration::from_hours(1),
            spent: Duration::ZERO,
        };
        let mut cache = HashMap::new();
        let looked_up = std::cell::RefCell::new(Vec::new());
        // Longer than the window's budget, however the sleep is scheduled.
        let slow = |id: u32| {
            looked_up.borrow_mut().push(id);
            std::thread::sleep(Duration::from_millis(12));
            None
        };
        // A slow lookup spends the window's budget; a flood of new ids is then not looked up
        // at all, while what is cached (a missing name too) still answers.
        assert_eq!(
            cached(&mut cache, 1, Some(&mut budget), slow),
            Name::Nameless
        );
        assert!(
            budget.spent >= Duration::from_millis(12),
            "its time is charged"
        );
        for id in 2..1000 {
            assert_eq!(
                cached(&mut cache, id, Some(&mut budget), slow),
                Name::NotLookedUp
            );
        }
        assert_eq!(
            cached(&mut cache, 1, Some(&mut budget), slow),
            Name::Nameless
        );
        assert_eq!(*looked_up.borrow(), [1]);
        // The next window has a budget again.
        budget.spent = budget.per_window;
        budget.window = Instant::now().checked_sub(LookupBudget::WINDOW).unwrap();
        assert_eq!(
            cached(&mut cache, 2, Some(&mut budget), slow),
            Name::Nameless
        );
        assert_eq!(*looked_up.borrow(), [1, 2]);
        // A lookup that took ten windows' budget is paid off over the ten windows after it.
        budget.spent = Duration::from_millis(100);
        budget.window = Instant::now()
            .checked_sub(LookupBudget::WINDOW * 5)
            .unwrap();
        assert_eq!(
            cached(&mut cache, 3, Some(&mut budget), slow),
            Name::NotLookedUp
        );
        budget.window -= LookupBudget::WINDOW * 5;
        assert_eq!(
            cached(&mut cache, 3, Some(&mut budget), slow),
            Name::Nameless
        );
        assert_eq!(*looked_up.borrow(), [1, 2, 3]);
        // A lookup that hung far longer owes ten seconds' budget at most.
        budget.per_window = Duration::from_millis(3);
        budget.spent = Duration::ZERO;
        let hung = |_: u32| {
            std::thread::sleep(Duration::from_millis(350));
            None
        };
        assert_eq!(
            cached(&mut cache, 5, Some(&mut budget), hung),
            Name::Nameless
        );
        assert_eq!(budget.spent, Duration::from_millis(300));
    }

    #[test]
    fn a_process_that_ran_another_program_since_is_named_by_the_kernels_record() {
        let mut enricher = Enricher::new();
        let me = std::process::id();
        let now = crate::host::clock::boot_time_ns();
        // Cached as running this test binary.
        let _ = enricher.process(me, now, None, &Now::read());
        // The attempt was made by another program (as if this process exec'd since): the
        // cached reading is not used, nor is what /proc says now.
        let shell = recorded(
            std::path::Path::new("/bin/sh")
                .canonicalize()
                .unwrap()
                .as_path(),
        );
        let process = enricher.process(me, now, Some(&shell), &Now::read());
        assert_eq!(process.cmdline, None);
        assert_eq!(
            process.exe.as_deref().map(std::path::PathBuf::from),
            Some(std::path::Path::new("/bin/sh").canonicalize().unwrap())
        );
        // A host program on a file system the agent cannot see is named as such.
        let hidden = Executable {
            dev: (0, 4242),
            ino: 7,
            on_fs: "/usr/bin/amazon-ssm-agent".into(),
            in_container: false,
        };
        assert_eq!(
            enricher
                .process(u32::MAX - 1, now, Some(&hidden), &Now::read())
                .exe
                .as_deref(),
            Some("/usr/bin/amazon-ssm-agent (on device 0:4242, not mounted where imds-guard runs)")
        );
        // A container's program is named by the path it saw.
        let in_container = Executable {
            dev: (0, 4242),
            ino: 7,
            on_fs: "/usr/bin/wget".into(),
            in_container: true,
        };
        assert_eq!(
            enricher
                .process(u32::MAX - 1, now, Some(&in_container), &Now::read())
                .exe
                .as_deref(),
            Some("/usr/bin/wget")
        );
    }
}
