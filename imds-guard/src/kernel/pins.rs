//! Enforcement that outlives the agent: the program links and the maps are pinned on a bpf
//! filesystem, so the kernel keeps judging with the last policy when the agent stops, crashes or
//! is killed, and the next agent adopts them.
//!
//! ```text
//! <pin dir>/links/connect4 …      one cgroup link per program
//! <pin dir>/maps-v3/ALLOW …       the maps, in a directory per map layout version
//! ```
//!
//! aya pins maps and links but lacks the link operations an adoption needs; those few `bpf()`
//! calls are in [`crate::kernel::sys`].

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use imds_guard_common::{maps::MAPS_LAYOUT_VERSION, programs};
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{FsType, statfs},
};
use tracing::info;

use crate::{
    host::cgroups::{Cgroup, Hierarchy, is_within},
    kernel::sys,
};

/// Where the agent pins its links and maps when `--pin-dir` is not given.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/imds-guard";

/// What went wrong with the pins.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The pin directory cannot be prepared or cleaned.
    #[error("pin directory {}: {what} failed: {source}", dir.display())]
    Dir {
        /// The pin directory.
        dir: PathBuf,
        /// What was being done.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
    /// The pinned links guard a cgroup outside the new attach point.
    #[error(
        "the links pinned in {} guard cgroup {guarded}, which is not inside {target}: moving \
         enforcement to {target} would leave {guarded} unguarded. If that is what you want, \
         run `imds-guard detach --pin-dir {}` first (enforcement stops until the next start); \
         to guard both, give this agent another --pin-dir",
        dir.display(),
        dir.display()
    )]
    Elsewhere {
        /// The pin directory.
        dir: PathBuf,
        /// The cgroup the pinned links are attached to (its path, or its id if unresolvable).
        guarded: String,
        /// The attach point asked for.
        target: String,
    },
    /// A pinned link could not be opened or read.
    #[error("program {program}: {action} failed: {source}")]
    Link {
        /// The program.
        program: &'static str,
        /// What was being done.
        action: &'static str,
        /// Why it failed.
        source: io::Error,
    },
    /// A pinned map has another layout than this build's.
    #[error(
        "pinned map {map} ({}) has layout {pinned} (key/value/entries) where this build expects \
         {expected}: it belongs to an incompatible build; `imds-guard detach` removes it \
         (enforcement stops until the next start)",
        path.display()
    )]
    MapMismatch {
        /// The map.
        map: &'static str,
        /// Its pin.
        path: PathBuf,
        /// The pinned map's layout.
        pinned: String,
        /// This build's.
        expected: String,
    },
}

/// `BPF_FS_MAGIC` from `include/uapi/linux/magic.h`.
const BPF_FS_MAGIC: FsType = FsType(0xcafe_4a11);

/// The pin directory and what lives in it.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// The pin directory at `root`.
    #[must_use]
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    /// The directory itself.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where this build's maps are pinned.
    #[must_use]
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join(format!("maps-v{MAPS_LAYOUT_VERSION}"))
    }

    /// The pin of map `name`.
    #[must_use]
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Where the links are pinned.
    #[must_use]
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The pin of `program`'s link.
    #[must_use]
    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }

    /// Map directories of other layout versions (left by an older or newer agent).
    #[must_use]
    pub fn other_map_dirs(&self) -> Vec<PathBuf> {
        let current = self.maps_dir();
        fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                path != &current
                    && path
                        .file_name()
                        .is_some_and(|name| name.to_string_lossy().starts_with("maps-v"))
            })
            .collect()
    }

    /// Makes sure the pin directory exists on a bpf filesystem. When its parent is not on one,
    /// a bpf filesystem is mounted there (as systemd does on `/sys/fs/bpf`).
    ///
    /// # Errors
    /// [`PinError::Dir`] when the directory cannot be made or the filesystem mounted.
    pub fn prepare(&self) -> Result<(), PinError> {
        let pin_error = |what: &str, source: io::Error| PinError::Dir {
            dir: self.root.clone(),
            what: what.to_owned(),
            source,
        };
        let parent = self.root.parent().unwrap_or(Path::new("/"));
        if !is_bpffs(parent) {
            fs::create_dir_all(parent).map_err(|err| pin_error("creating its parent", err))?;
            mount(
                Some("bpf"),
                parent,
                Some("bpf"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("mode=0700"),
            )
            .map_err(|err| pin_error("mounting a bpf filesystem on its parent", err.into()))?;
            info!(dir = %parent.display(), "mounted a bpf filesystem for the pins");
        }
        for dir in [&self.root, &self.maps_dir(), &self.links_dir()] {
            match fs::create_dir(dir) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(pin_error("creating it", err)),
            }
        }
        Ok(())
    }

    /// Turns enforcement off: detaches every pinned link (even if a process still holds it)
    /// and removes every pin and the directory. Returns the programs detached.
    ///
    /// # Errors
    /// [`PinError::Dir`] for the first pin that could not be removed (the rest are still tried).
    pub fn remove_all(&self) -> Result<Vec<String>, PinError> {
        let mut detached = Vec::new();
        let mut first_error = None;
        let mut fail = |what: String, source: io::Error| {
            first_error.get_or_insert(PinError::Dir {
                dir: self.root.clone(),
                what,
                source,
            });
        };
        // Ours in their order, then anything else pinned there (a link being replaced).
        let mut links: Vec<String> = programs::ALL.iter().map(|&name| name.to_owned()).collect();
        for entry in fs::read_dir(self.links_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !links.contains(&name) {
                links.push(name);
            }
        }
        for name in links {
            let path = self.links_dir().join(&name);
            match sys::open_pinned(&path) {
                Ok(Some(link)) => match sys::link_detach(link.as_fd_borrowed()) {
                    Ok(()) => detached.push(name),
                    Err(err) => fail(format!("detaching {}", path.display()), err),
                },
                Ok(None) => {}
                Err(err) => fail(format!("opening {}", path.display()), err),
            }
        }
        let mut dirs = vec![self.links_dir()];
        dirs.extend(
            fs::read_dir(&self.root)
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| entry.path())
                .filter(|path| path.is_dir() && *path != self.links_dir()),
        );
        for dir in dirs {
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if let Err(err) = fs::remove_file(entry.path()) {
                    fail(format!("removing {}", entry.path().display()), err);
                }
            }
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => fail(format!("removing {}", dir.display()), err),
            }
        }
        match fs::remove_dir(&self.root) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => fail("removing it".into(), err),
        }
        first_error.map_or(Ok(detached), Err)
    }

    /// Checks that enforcement can move from wherever the pinned links guard to `target` in one
    /// step, before anything is changed: links on `target` itself, on a cgroup inside it (the
    /// new links cover it before the old ones go), or on a removed cgroup (defunct links, which
    /// guard nothing, or links on a cgroup being removed, which only its last sockets still
    /// pass through) can be taken over. Logs what will be replaced.
    ///
    /// # Errors
    /// [`PinError::Elsewhere`] when a link guards a cgroup that still exists outside
    /// `target`: moving would leave it unguarded, which only the operator may decide.
    /// [`PinError::Link`] when a pinned link cannot be read.
    pub fn check_takeover(&self, target: &Cgroup, hierarchy: &Hierarchy) -> Result<(), PinError> {
        let mut reported = Vec::new();
        for program in programs::ALL {
            let link_error = |action: &'static str| {
                move |source| PinError::Link {
                    program,
                    action,
                    source,
                }
            };
            let Some(link) = sys::open_pinned(&self.link(program))
                .map_err(link_error("opening the pinned link"))?
            else {
                continue;
            };
            let state = sys::link_info(link.as_fd_borrowed())
                .map_err(link_error("reading the pinned link"))?;
            if state.cgroup_id == target.id || reported.contains(&state.cgroup_id) {
                continue;
            }
            reported.push(state.cgroup_id);
            if state.cgroup_id == 0 || hierarchy.is_removed(state.cgroup_id) {
                info!(
                    pins = %self.root.display(),
                    to = %target.path,
                    "the pinned links point to a removed cgroup (nothing was enforced): \
                     replacing them"
                );
                continue;
            }
            let guarded = hierarchy.path_of(state.cgroup_id);
            match guarded {
                Some(guarded) if is_within(&guarded, &target.path) => info!(
                    pins = %self.root.display(),
                    from = %guarded,
                    to = %target.path,
                    "moving enforcement to a cgroup that contains the one the pinned links guard"
                ),
                guarded => {
                    return Err(PinError::Elsewhere {
                        dir: self.root.clone(),
                        guarded: guarded.unwrap_or_else(|| format!("with id {}", state.cgroup_id)),
                        target: target.path.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Whether any program link is pinned here.
    #[must_use]
    pub fn has_links(&self) -> bool {
        programs::ALL
            .iter()
            .any(|program| self.link(program).exists())
    }
}

/// Whether `path` is on a bpf filesystem.
#[must_use]
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|stat| stat.filesystem_type() == BPF_FS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let pins = PinDir::new(Path::new("/sys/fs/bpf/imds-guard"));
        assert_eq!(
            pins.map("ALLOW"),
            Path::new("/sys/fs/bpf/imds-guard/maps-v12/ALLOW")
        );
        assert_eq!(
            pins.link("connect4"),
            Path::new("/sys/fs/bpf/imds-guard/links/connect4")
        );
    }

    #[test]
    fn a_tmpfs_is_not_a_bpffs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_bpffs(dir.path()));
    }
}
