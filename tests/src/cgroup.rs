use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use imds_guard::host::cgroups::Hierarchy;

/// A cgroup this test created under the cgroup2 mount. The top-level one removes itself and
/// every cgroup below it on drop.
pub struct TestCgroup {
    /// Hierarchy path, as in `/proc/PID/cgroup`.
    pub path: String,
    /// Directory under the mount.
    pub dir: PathBuf,
    /// cgroup id (inode number).
    pub id: u64,
    /// Only the top-level cgroup removes the tree.
    owner: bool,
}

impl TestCgroup {
    /// Creates a top-level cgroup with a unique name.
    ///
    /// # Panics
    /// When the cgroup2 mount cannot be found or the directory cannot be made.
    #[must_use]
    pub fn new(tag: &str) -> Self {
        let hierarchy = Hierarchy::discover().expect("cgroup2 mount");
        let path = format!("/{}", crate::unique_name(tag));
        Self::create(hierarchy.dir_of(&path), path, true)
    }

    /// Creates `name` below this cgroup; its top-level ancestor removes it.
    ///
    /// # Panics
    /// When the directory cannot be made.
    #[must_use]
    pub fn child(&self, name: &str) -> Self {
        Self::create(self.dir.join(name), format!("{}/{name}", self.path), false)
    }

    /// Moves process `pid` (all its threads) into this cgroup.
    ///
    /// # Panics
    /// When the kernel refuses.
    pub fn adopt(&self, pid: u32) {
        fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|err| panic!("move {pid} to {}: {err}", self.path));
    }

    /// Removes this (empty) cgroup now, as systemd does when a unit stops.
    ///
    /// # Panics
    /// When it cannot be removed.
    pub fn remove(self) {
        assert!(!self.owner, "the top-level cgroup removes itself on drop");
        fs::remove_dir(&self.dir).unwrap_or_else(|err| panic!("rmdir {}: {err}", self.path));
    }

    fn create(dir: PathBuf, path: String, owner: bool) -> Self {
        fs::create_dir(&dir).unwrap_or_else(|err| panic!("mkdir {}: {err}", dir.display()));
        let id = fs::metadata(&dir).expect("stat cgroup").ino();
        Self {
            path,
            dir,
            id,
            owner,
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if self.owner {
            remove_tree(&self.dir);
        }
    }
}

/// Removes a cgroup and its descendants, deepest first. Clients exit before a test ends, so
/// a cgroup that is still busy is only retried briefly.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    for _ in 0..100 {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    eprintln!("warning: could not remove test cgroup {}", dir.display());
}
