//! Following the cgroup tree below the attach point: a scan lists the cgroups that exist
//! ([`Watcher::scan`]), and inotify says where directories were created or removed
//! ([`Watcher::changed`]), so that rules on cgroups that come and go take effect at once.
//!
//! `mkdir`/`rmdir` on cgroupfs go through the VFS, which reports them to inotify like on any
//! filesystem; cgroup v2 refuses `rename` (EPERM), so a cgroup's path never changes.
//! Inotify watches one directory each, so every directory is watched, each one before it is
//! listed: a child created between the two is then either listed or reported. If the kernel
//! drops events (queue overflow) or a watch cannot be added, the caller's periodic full scan
//! puts things right.
//!
//! Directories at and below a user manager (`user@UID.service`) are listed but not watched:
//! the user makes those cgroups, and watching them would let any local user spend the agent's
//! inotify watches (`fs.inotify.max_user_watches` counts per uid, and the agent's is root's).
//! Cgroups there get their entries (which may be left out: see `compile`) at the next scan.

use std::{
    collections::HashMap,
    ffi::OsStr,
    fs, io,
    os::{
        fd::{AsFd as _, AsRawFd, RawFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
};

use nix::{
    errno::Errno,
    sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor},
};
use tracing::warn;

use crate::host::cgroups::{CgroupDir, Hierarchy};

/// What one read of the inotify queue says.
#[derive(Debug, Default)]
pub struct Changes {
    /// Cgroup paths created or removed, none below another.
    pub paths: Vec<String>,
    /// The kernel dropped events: only a full scan is reliable now.
    pub overflow: bool,
}

/// Watches every cgroup directory at and below one point.
#[derive(Debug)]
pub struct Watcher {
    inotify: Inotify,
    /// Watched directories by watch, as hierarchy paths.
    watches: HashMap<WatchDescriptor, String>,
    /// `add_watch` failed (the per-user watch limit): warned once.
    watch_failed: bool,
    /// Directories whose watch could not be added since the last [`Watcher::take_unwatched`].
    unwatched: usize,
}

impl AsRawFd for Watcher {
    fn as_raw_fd(&self) -> RawFd {
        self.inotify.as_fd().as_raw_fd()
    }
}

impl Watcher {
    /// An inotify instance with nothing watched yet.
    ///
    /// # Errors
    /// When inotify is unavailable or the instance limit is reached.
    pub fn new() -> io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        Ok(Self {
            inotify,
            watches: HashMap::new(),
            watch_failed: false,
            unwatched: 0,
        })
    }

    /// Number of directories watched.
    #[must_use]
    pub fn watched(&self) -> usize {
        self.watches.len()
    }

    /// Watches and lists the cgroup at `path` and everything below it. A cgroup that vanishes
    /// meanwhile is left out; `path` itself missing gives an empty list.
    pub fn scan(&mut self, hierarchy: &Hierarchy, path: &str) -> Vec<CgroupDir> {
        walk(hierarchy, path, |dir, path| self.watch(dir, path))
    }

    /// Directories whose watch could not be added since the last call: cgroups made below them
    /// are found at the next full scan only.
    pub fn take_unwatched(&mut self) -> usize {
        std::mem::take(&mut self.unwatched)
    }

    fn watch(&mut self, dir: &Path, path: &str) {
        if crate::host::workload::user_manager(path).is_some() {
            return;
        }
        let flags = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ONLYDIR
            | AddWatchFlags::IN_DONT_FOLLOW;
        match self.inotify.add_watch(dir, flags) {
            // The same directory gives the same watch again (the periodic scan re-adds them all).
            Ok(watch) => {
                self.watches.insert(watch, path.to_owned());
            }
            Err(Errno::ENOENT | Errno::ENOTDIR) => {}
            Err(err) => {
                self.unwatched += 1;
                if !self.watch_failed {
                    self.watch_failed = true;
                    warn!(
                        "cannot watch {} ({err}; see fs.inotify.max_user_watches): cgroups \
                         created there are found by the periodic scan, not at once",
                        dir.display()
                    );
                }
            }
        }
    }

    /// Reads what the kernel has queued, without blocking.
    ///
    /// # Errors
    /// When the inotify descriptor cannot be read.
    pub fn changed(&mut self) -> io::Result<Changes> {
        let mut changes = Changes::default();
        loop {
            let events = match self.inotify.read_events() {
                Ok(events) => events,
                Err(Errno::EAGAIN) => break,
                Err(err) => return Err(err.into()),
            };
            if events.is_empty() {
                break;
            }
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    changes.overflow = true;
                }
                if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                    self.watches.remove(&event.wd);
                    continue;
                }
                let made_or_removed = AddWatchFlags::IN_CREATE | AddWatchFlags::IN_DELETE;
                if !event.mask.contains(AddWatchFlags::IN_ISDIR)
                    || !event.mask.intersects(made_or_removed)
                {
                    continue;
                }
                if let (Some(parent), Some(name)) = (self.watches.get(&event.wd), &event.name) {
                    changes.paths.push(child_path(parent, name));
                }
            }
        }
        changes.paths = outermost(changes.paths);
        Ok(changes)
    }
}

/// Lists the cgroup at `path` and everything below it, without watching.
#[must_use]
pub fn scan(hierarchy: &Hierarchy, path: &str) -> Vec<CgroupDir> {
    walk(hierarchy, path, |_, _| {})
}

/// Lists the cgroups at and below `path`, calling `before_listing` on each directory first.
fn walk(
    hierarchy: &Hierarchy,
    path: &str,
    mut before_listing: impl FnMut(&Path, &str),
) -> Vec<CgroupDir> {
    let mut found = Vec::new();
    let mut pending = vec![path.to_owned()];
    while let Some(path) = pending.pop() {
        let dir = hierarchy.dir_of(&path);
        before_listing(&dir, &path);
        let Ok(metadata) = fs::symlink_metadata(&dir) else {
            continue;
        };
        if !metadata.is_dir() {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        found.push(CgroupDir {
            id: metadata.ino(),
            path: path.clone(),
        });
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                pending.push(child_path(&path, &entry.file_name()));
            }
        }
    }
    found
}

fn child_path(parent: &str, name: &OsStr) -> String {
    let name = name.to_string_lossy();
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// The paths without duplicates and without those below another of them.
fn outermost(mut paths: Vec<String>) -> Vec<String> {
    paths.sort();
    paths.dedup();
    let mut kept: Vec<String> = Vec::new();
    for path in paths {
        let below_kept = kept.last().is_some_and(|last| {
            path.strip_prefix(last.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
        });
        if !below_kept {
            kept.push(path);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outermost_paths_only() {
        let paths = ["/a/b", "/a", "/ab", "/a/b/c", "/ab"]
            .map(String::from)
            .to_vec();
        assert_eq!(outermost(paths), ["/a", "/ab"]);
    }

    #[test]
    fn scans_and_reports_directories_made_and_removed() {
        let root = tempfile::tempdir().unwrap();
        let hierarchy = Hierarchy::at(root.path().to_owned());
        fs::create_dir_all(root.path().join("w/a/b")).unwrap();
        let mut watcher = Watcher::new().unwrap();
        let mut paths: Vec<String> = (watcher.scan(&hierarchy, "/w").into_iter())
            .map(|dir| dir.path)
            .collect();
        paths.sort();
        assert_eq!(paths, ["/w", "/w/a", "/w/a/b"]);
        assert_eq!(watcher.watched(), 3);

        fs::create_dir(root.path().join("w/a/c")).unwrap();
        fs::create_dir(root.path().join("w/d")).unwrap();
        fs::create_dir(root.path().join("w/d/e")).unwrap();
        fs::remove_dir(root.path().join("w/a/b")).unwrap();
        fs::write(root.path().join("w/file"), b"").unwrap();
        let changes = watcher.changed().unwrap();
        assert_eq!(changes.paths, ["/w/a/b", "/w/a/c", "/w/d"]);
        assert!(!changes.overflow);
        // `/w/d/e` was made before `/w/d` was watched: the scan of `/w/d` finds it.
        let found: Vec<String> = (watcher.scan(&hierarchy, "/w/d").into_iter())
            .map(|dir| dir.path)
            .collect();
        assert_eq!(found.len(), 2);
        assert!(watcher.scan(&hierarchy, "/w/a/b").is_empty());
    }

    #[test]
    fn a_user_managers_cgroups_are_listed_not_watched() {
        let root = tempfile::tempdir().unwrap();
        let hierarchy = Hierarchy::at(root.path().to_owned());
        fs::create_dir_all(root.path().join("u/user@1000.service/app.slice")).unwrap();
        let mut watcher = Watcher::new().unwrap();
        assert_eq!(watcher.scan(&hierarchy, "/u").len(), 3);
        assert_eq!(watcher.watched(), 1);
        fs::create_dir(root.path().join("u/user@1000.service/app.slice/x")).unwrap();
        assert!(watcher.changed().unwrap().paths.is_empty());
        assert_eq!(watcher.take_unwatched(), 0);
    }
}
