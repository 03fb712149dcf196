//! Enforcement that outlives the agent: the program links and the maps are pinned on a bpf
//! filesystem, so the kernel keeps judging with the last policy when the agent stops, crashes or
//! is killed, and the next agent adopts them.
//!
//! ```text
//! <pin dir>/links/connect4 …      one cgroup link per program
//! <pin dir>/maps-v3/ALLOW …       the maps, in a directory per map layout version
//! ```
//!
//! aya pins maps and links but does not expose the link operations an adoption needs
//! (`BPF_LINK_UPDATE`, `BPF_LINK_DETACH`, the cgroup a link is on), so those few `bpf()` calls
//! are made here.

use std::{
    ffi::CString,
    fmt::Write as _,
    fs, io,
    mem::size_of,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use imds_guard_common::maps::MAPS_LAYOUT_VERSION;
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{FsType, statfs},
};
use tracing::info;

use crate::{
    error::{Error, Result},
    host::cgroups::{Cgroup, Hierarchy},
    kernel::PROGRAMS,
    policy::compile::is_within,
};

/// Where the agent pins its links and maps when `--pin-dir` is not given.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/imds-guard";

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
    /// [`Error::PinDir`] when the directory cannot be made or the filesystem mounted.
    pub fn prepare(&self) -> Result<()> {
        let pin_error = |what: &str, source: io::Error| Error::PinDir {
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
    /// [`Error::PinDir`] for the first pin that could not be removed (the rest are still tried).
    pub fn remove_all(&self) -> Result<Vec<String>> {
        let mut detached = Vec::new();
        let mut first_error = None;
        let mut fail = |what: String, source: io::Error| {
            first_error.get_or_insert(Error::PinDir {
                dir: self.root.clone(),
                what,
                source,
            });
        };
        // Ours in their order, then anything else pinned there (a link being replaced).
        let mut links: Vec<String> = PROGRAMS.iter().map(|&name| name.to_owned()).collect();
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
            match open_pinned(&path) {
                Ok(Some(link)) => match link_detach(link.as_fd_borrowed()) {
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
    /// [`Error::PinnedElsewhere`] when a link guards a cgroup that still exists outside
    /// `target`: moving would leave it unguarded, which only the operator may decide.
    /// [`Error::Link`] when a pinned link cannot be read.
    pub fn check_takeover(&self, target: &Cgroup, hierarchy: &Hierarchy) -> Result<()> {
        let mut reported = Vec::new();
        for program in PROGRAMS {
            let link_error = |action: &'static str| {
                move |source| Error::Link {
                    program,
                    action,
                    source,
                }
            };
            let Some(link) =
                open_pinned(&self.link(program)).map_err(link_error("opening the pinned link"))?
            else {
                continue;
            };
            let state =
                link_info(link.as_fd_borrowed()).map_err(link_error("reading the pinned link"))?;
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
                    return Err(Error::PinnedElsewhere {
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
        PROGRAMS.iter().any(|program| self.link(program).exists())
    }
}

/// Whether `path` is on a bpf filesystem.
#[must_use]
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|stat| stat.filesystem_type() == BPF_FS_MAGIC)
}

/// An open BPF object (link, program or map).
#[derive(Debug)]
pub struct BpfFd(OwnedFd);

impl BpfFd {
    /// The descriptor, borrowed.
    #[must_use]
    pub fn as_fd_borrowed(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.0)
    }
}

/// What a pinned cgroup link is: its program and where it is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    /// The link's id.
    pub id: u32,
    /// The program it runs.
    pub program_id: u32,
    /// The cgroup it is attached to; 0 once that cgroup is gone.
    pub cgroup_id: u64,
    /// `BPF_CGROUP_INET4_CONNECT` and so on.
    pub attach_type: u32,
}

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `bpf(cmd, attr, size)`, returning the non-negative result.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, valid for reads
    // and writes of `size_of::<T>()` bytes; the kernel zero-extends shorter attrs.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>(),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn owned(fd: i64) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: the kernel just returned this new descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the object pinned at `path`; `None` when nothing is pinned there.
///
/// # Errors
/// Any other failure of `BPF_OBJ_GET`.
pub fn open_pinned(path: &Path) -> io::Result<Option<BpfFd>> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    match bpf(BPF_OBJ_GET, &mut attr) {
        Ok(fd) => Ok(Some(BpfFd(owned(fd)?))),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// Reads `size` bytes of an object's info (`struct bpf_*_info`) into `buffer`.
fn object_info(fd: BorrowedFd<'_>, buffer: &mut [u8]) -> io::Result<()> {
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = GetInfo {
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(io::Error::other)?,
        info_len: u32::try_from(buffer.len()).map_err(io::Error::other)?,
        info: buffer.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

fn u32_at(buffer: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(buffer[offset..offset + 4].try_into().unwrap_or_default())
}

fn u64_at(buffer: &[u8], offset: usize) -> u64 {
    u64::from_ne_bytes(buffer[offset..offset + 8].try_into().unwrap_or_default())
}

/// What a cgroup link is attached to (`struct bpf_link_info`: type, id, `prog_id`, then the
/// 8-aligned union whose `cgroup` member is `cgroup_id`, `attach_type`).
///
/// # Errors
/// When the kernel refuses `BPF_OBJ_GET_INFO_BY_FD`.
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkState> {
    let mut buffer = [0u8; 64];
    object_info(link, &mut buffer)?;
    Ok(LinkState {
        id: u32_at(&buffer, 4),
        program_id: u32_at(&buffer, 8),
        cgroup_id: u64_at(&buffer, 16),
        attach_type: u32_at(&buffer, 24),
    })
}

/// Makes `link` run `program` instead of its current one, atomically: every attempt is judged
/// by one or the other (Linux 5.7+).
///
/// # Errors
/// When the kernel refuses `BPF_LINK_UPDATE` (a program of another type, say).
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdate {
        link_fd: u32::try_from(link.as_raw_fd()).map_err(io::Error::other)?,
        new_prog_fd: u32::try_from(program.as_raw_fd()).map_err(io::Error::other)?,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detaches `link` now, whoever else holds it (Linux 5.9+).
///
/// # Errors
/// When the kernel refuses `BPF_LINK_DETACH`.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let mut attr = LinkDetach {
        link_fd: u32::try_from(link.as_raw_fd()).map_err(io::Error::other)?,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// A loaded program, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProgramState {
    /// Its id.
    pub id: u32,
    /// Its name (the kernel keeps 15 bytes).
    pub name: String,
    /// The kernel's hash of its instructions: equal tags, equal programs.
    pub tag: String,
}

/// The program with `id` (`struct bpf_prog_info`: `tag` at 8, `name` at 64).
///
/// # Errors
/// When no such program is loaded.
pub fn program_state(id: u32) -> io::Result<ProgramState> {
    #[repr(C)]
    struct GetFdById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = GetFdById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    let fd = owned(bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?)?;
    let mut buffer = [0u8; 128];
    object_info(std::os::fd::AsFd::as_fd(&fd), &mut buffer)?;
    let tag = buffer[8..16]
        .iter()
        .fold(String::with_capacity(16), |mut tag, byte| {
            let _ = write!(tag, "{byte:02x}");
            tag
        });
    let name_bytes = &buffer[64..80];
    let end = name_bytes
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(name_bytes.len());
    Ok(ProgramState {
        id: u32_at(&buffer, 4),
        name: String::from_utf8_lossy(&name_bytes[..end]).into_owned(),
        tag,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let pins = PinDir::new(Path::new("/sys/fs/bpf/imds-guard"));
        assert_eq!(
            pins.map("ALLOW"),
            Path::new("/sys/fs/bpf/imds-guard/maps-v4/ALLOW")
        );
        assert_eq!(
            pins.link("connect4"),
            Path::new("/sys/fs/bpf/imds-guard/links/connect4")
        );
    }

    #[test]
    fn nothing_pinned_is_none() {
        // Not a bpf filesystem: BPF_OBJ_GET fails, but not with "no such file".
        let dir = tempfile::tempdir().unwrap();
        assert!(open_pinned(&dir.path().join("absent")).unwrap().is_none());
        assert!(!is_bpffs(dir.path()));
    }
}
