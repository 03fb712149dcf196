//! The cgroup v2 hierarchy: where it is mounted, naming cgroups in either of the two forms users
//! write (`/system.slice/x.service` as in `/proc/PID/cgroup`, or the directory under the mount),
//! and turning cgroup ids back into paths for events.

use std::{
    fs,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Component, Path, PathBuf},
};

use crate::host::procfs::{self, Mount, ProcError};

/// What went wrong with the cgroup hierarchy.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The mount table, where the hierarchy is found, could not be read.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// A cgroup is not written as an absolute path without `.` or `..`.
    #[error("{origin}: {message}")]
    Malformed {
        /// Option or file position.
        origin: String,
        /// What is wrong, with the value.
        message: String,
    },
    /// No cgroup v2 hierarchy is mounted.
    #[error(
        "no cgroup2 filesystem is mounted (none in /proc/self/mountinfo): \
         mount one with `mount -t cgroup2 none /sys/fs/cgroup`"
    )]
    NoCgroup2,
    /// A cgroup named in the settings does not exist.
    #[error("{origin}: cgroup {given:?} does not exist (no directory {})", dir.display())]
    NotFound {
        /// Option or file position.
        origin: String,
        /// The value as given.
        given: String,
        /// The directory looked for.
        dir: PathBuf,
    },
    /// A cgroup directory could not be inspected.
    #[error("cannot inspect cgroup {}: {source}", dir.display())]
    Inspect {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The cgroup tree cannot be watched for changes.
    #[error("cannot watch the cgroup tree for changes (inotify): {source}")]
    Watch {
        /// Why.
        source: std::io::Error,
    },
}

/// The cgroup v2 hierarchy, found from `/proc/self/mountinfo`.
#[derive(Debug)]
pub struct Hierarchy {
    mount: PathBuf,
    /// Opened once for `open_by_handle_at`; `None` when the mount cannot be opened.
    mount_fd: Option<OwnedFd>,
}

/// A cgroup that exists, resolved from a user's spelling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    /// The path as in `/proc/PID/cgroup`: `/` for the root, `/a/b` below it.
    pub path: String,
    /// The directory under the cgroup2 mount.
    pub dir: PathBuf,
    /// The cgroup id: the inode number of its directory, as `bpf_get_current_cgroup_id()` says.
    pub id: u64,
    /// Depth below the root (the root is level 0).
    pub level: u32,
}

/// A cgroup directory found under the attach point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupDir {
    /// Its id (the inode number of the directory).
    pub id: u64,
    /// Its path as in `/proc/PID/cgroup`.
    pub path: String,
}

impl CgroupDir {
    /// Depth below the root (the root is level 0).
    #[must_use]
    pub fn level(&self) -> u32 {
        u32::try_from(self.path.split('/').filter(|part| !part.is_empty()).count())
            .unwrap_or(u32::MAX)
    }
}

/// `FILEID_KERNFS` from `include/linux/exportfs.h`: a cgroup's file handle is its 64-bit id.
const FILEID_KERNFS: i32 = 0xfe;

impl Hierarchy {
    /// Finds the cgroup2 mount of this process's mount namespace.
    ///
    /// # Errors
    /// [`ProcError::Read`] when mountinfo is unreadable, [`CgroupError::NoCgroup2`]
    /// without a mount.
    pub fn discover() -> Result<Self, CgroupError> {
        let mount = cgroup2_mount(&procfs::mounts()?).ok_or(CgroupError::NoCgroup2)?;
        Ok(Self::at(mount))
    }

    /// A hierarchy mounted at `mount` (tests and tools that already know it).
    #[must_use]
    pub fn at(mount: PathBuf) -> Self {
        let mount_fd = fs::File::open(&mount).ok().map(OwnedFd::from);
        Self { mount, mount_fd }
    }

    /// The mount point.
    #[must_use]
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Resolves a cgroup given as `/a/b` (as in `/proc/PID/cgroup`) or as its directory under
    /// the mount, and checks that it exists.
    ///
    /// # Errors
    /// [`CgroupError::Malformed`] for a malformed path, [`CgroupError::NotFound`] when it does
    /// not exist, [`CgroupError::Inspect`] when it cannot be inspected.
    pub fn resolve(&self, origin: &str, given: &str) -> Result<Cgroup, CgroupError> {
        let path = self
            .hierarchy_path(given)
            .map_err(|message| CgroupError::Malformed {
                origin: origin.to_owned(),
                message,
            })?;
        let dir = self.dir_of(&path);
        let metadata = match fs::metadata(&dir) {
            Ok(metadata) if metadata.is_dir() => metadata,
            Ok(_) => {
                return Err(CgroupError::NotFound {
                    origin: origin.to_owned(),
                    given: given.to_owned(),
                    dir,
                });
            }
            Err(source) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(CgroupError::NotFound {
                    origin: origin.to_owned(),
                    given: given.to_owned(),
                    dir,
                });
            }
            Err(source) => return Err(CgroupError::Inspect { dir, source }),
        };
        let level = u32::try_from(path.split('/').filter(|part| !part.is_empty()).count())
            .unwrap_or(u32::MAX);
        Ok(Cgroup {
            path,
            dir,
            id: metadata.ino(),
            level,
        })
    }

    /// The directory of a hierarchy path (`/a/b` → `<mount>/a/b`).
    #[must_use]
    pub fn dir_of(&self, path: &str) -> PathBuf {
        self.mount.join(path.trim_start_matches('/'))
    }

    /// Normalises either spelling to the hierarchy path (`/`, `/a/b`), without touching the
    /// filesystem. A path under the mount point is taken as a directory; anything else as a
    /// hierarchy path.
    ///
    /// # Errors
    /// A message naming the value when it is relative, has `.`/`..` parts or is empty.
    pub fn hierarchy_path(&self, given: &str) -> Result<String, String> {
        let given_path = Path::new(given);
        if !given_path.is_absolute() {
            return Err(format!(
                "cgroup {given:?} must be absolute: write it as in /proc/PID/cgroup \
                 (e.g. /system.slice/amazon-ssm-agent.service) or as its directory under {}",
                self.mount.display()
            ));
        }
        let relative = given_path.strip_prefix(&self.mount).unwrap_or(given_path);
        let mut parts = Vec::new();
        for component in relative.components() {
            match component {
                Component::RootDir => {}
                Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
                Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                    return Err(format!(
                        "cgroup {given:?} may not contain `.` or `..` components"
                    ));
                }
            }
        }
        Ok(format!("/{}", parts.join("/")))
    }

    /// The hierarchy path of the cgroup with this id, if it still exists.
    ///
    /// Uses `open_by_handle_at` with the id as a kernfs file handle, so it costs two syscalls
    /// whatever the size of the tree (and needs `CAP_DAC_READ_SEARCH`).
    #[must_use]
    pub fn path_of(&self, id: u64) -> Option<String> {
        self.lookup(id).ok()
    }

    /// Whether the cgroup with `id` is known to be gone: the kernel says its handle is stale.
    /// `false` when it exists or when that cannot be told (no `CAP_DAC_READ_SEARCH`).
    #[must_use]
    pub fn is_removed(&self, id: u64) -> bool {
        self.lookup(id)
            .is_err_and(|err| err.raw_os_error() == Some(libc::ESTALE))
    }

    /// The path of the cgroup with `id`, or why it could not be found.
    fn lookup(&self, id: u64) -> std::io::Result<String> {
        #[repr(C)]
        struct KernfsHandle {
            handle_bytes: u32,
            handle_type: i32,
            id: [u8; 8],
        }
        let mount_fd = (self.mount_fd.as_ref())
            .ok_or_else(|| std::io::Error::other("the cgroup2 mount could not be opened"))?;
        let mut handle = KernfsHandle {
            handle_bytes: 8,
            handle_type: FILEID_KERNFS,
            id: id.to_ne_bytes(),
        };
        // SAFETY: `handle` is a valid `struct file_handle` with 8 bytes of payload, alive for
        // the call; the returned descriptor is owned by us.
        let fd = unsafe {
            libc::open_by_handle_at(
                mount_fd.as_raw_fd(),
                (&raw mut handle).cast::<libc::file_handle>(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is not owned elsewhere.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let dir = procfs::fd_target(fd.as_fd())?;
        let relative = dir
            .strip_prefix(&self.mount)
            .map_err(|_| std::io::Error::other("a cgroup outside the cgroup2 mount"))?;
        Ok(format!("/{}", relative.to_string_lossy()))
    }
}

/// Whether the cgroup `path` is `under` or below it.
#[must_use]
pub fn is_within(path: &str, under: &str) -> bool {
    under == "/"
        || path == under
        || path
            .strip_prefix(under)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The mount point of the first cgroup2 filesystem in a mount table.
#[must_use]
pub fn cgroup2_mount(mounts: &[Mount]) -> Option<PathBuf> {
    mounts
        .iter()
        .find(|mount| mount.fstype == "cgroup2")
        .map(|mount| mount.point.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_prefixes_are_not_within() {
        assert!(!is_within("/ab", "/a"));
        assert!(is_within("/a/b", "/a"));
        assert!(is_within("/a", "/"));
    }

    const HYBRID: &str = "\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
25 22 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
";

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        assert_eq!(
            cgroup2_mount(&procfs::parse(HYBRID)),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_mount() {
        let v1_only = "27 25 0:25 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw\n";
        assert_eq!(cgroup2_mount(&procfs::parse(v1_only)), None);
    }

    #[test]
    fn optional_fields_and_escapes() {
        let line = "30 1 0:26 / /mnt/my\\040cg rw master:1 shared:2 - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mount(&procfs::parse(line)),
            Some(PathBuf::from("/mnt/my cg"))
        );
    }

    #[test]
    fn both_spellings_give_the_hierarchy_path() {
        let h = Hierarchy::at(PathBuf::from("/sys/fs/cgroup/unified"));
        let expect = Ok("/system.slice/ssm.service".to_owned());
        assert_eq!(h.hierarchy_path("/system.slice/ssm.service"), expect);
        assert_eq!(
            h.hierarchy_path("/sys/fs/cgroup/unified/system.slice/ssm.service"),
            expect
        );
        assert_eq!(h.hierarchy_path("/system.slice//ssm.service/"), expect);
        assert_eq!(
            h.hierarchy_path("/sys/fs/cgroup/unified"),
            Ok("/".to_owned())
        );
        assert_eq!(h.hierarchy_path("/"), Ok("/".to_owned()));
    }

    #[test]
    fn rejects_relative_and_dot_dot() {
        let h = Hierarchy::at(PathBuf::from("/sys/fs/cgroup"));
        assert!(
            h.hierarchy_path("system.slice")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(h.hierarchy_path("/a/../b").unwrap_err().contains(".."));
    }

    #[test]
    fn dir_of_joins_under_mount() {
        let h = Hierarchy::at(PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(h.dir_of("/"), PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(h.dir_of("/a/b"), PathBuf::from("/sys/fs/cgroup/a/b"));
    }

    #[test]
    fn resolve_reports_missing_cgroup_with_origin() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("present")).unwrap();
        let h = Hierarchy::at(root.path().to_owned());
        let found = h.resolve("--cgroup", "/present").unwrap();
        assert_eq!(found.path, "/present");
        assert_eq!(found.level, 1);
        let err = h.resolve("--cgroup", "/absent").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("--cgroup: cgroup \"/absent\" does not exist"),
            "{text}"
        );
    }
}
