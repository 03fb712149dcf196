//! What the agent reads of `/proc`, in one place: the mount table; a process's cgroup, start
//! time, command line, ids, name and namespaces; where a descriptor points.
//!
//! Hand-written rather than with the `procfs` crate: the agent wants single fields of small
//! files, two of them (`stat`, `cmdline`) read for every new process on the event path during a
//! flood, where one bounded read and one field are the point, not a parse of the whole file into
//! a struct of fifty fields. Each parser is a few lines and unit-tested below.

use std::{
    ffi::{OsStr, OsString},
    fs,
    io::{self, Read as _},
    os::{
        fd::{AsRawFd as _, BorrowedFd},
        unix::{
            ffi::{OsStrExt as _, OsStringExt as _},
            fs::MetadataExt as _,
        },
    },
    path::PathBuf,
};

/// What could not be read of `/proc`.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// One of this process's own files.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: &'static str,
        /// Why.
        source: io::Error,
    },
    /// A process named on the command line (or the agent, for `reload`).
    #[error("cannot inspect process {pid}: {source}")]
    Process {
        /// The process.
        pid: u32,
        /// Why.
        source: io::Error,
    },
}

/// This process's mount table.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The file system's device: major and minor.
    pub dev: (u32, u32),
    /// The directory of the file system this mount shows (`/` for the whole of it).
    pub root: PathBuf,
    /// Where it is mounted.
    pub point: PathBuf,
    /// The file system type (`ext4`, `overlay`, `cgroup2`).
    pub fstype: String,
}

/// The mounts of a mountinfo text, in its order; malformed lines are skipped.
#[must_use]
pub fn parse(mountinfo: &str) -> Vec<Mount> {
    mountinfo.lines().filter_map(parse_line).collect()
}

/// This process's mount table.
///
/// # Errors
/// [`ProcError::Read`] when mountinfo cannot be read.
pub fn mounts() -> Result<Vec<Mount>, ProcError> {
    fs::read_to_string(MOUNTINFO)
        .map(|text| parse(&text))
        .map_err(|source| ProcError::Read {
            path: MOUNTINFO,
            source,
        })
}

fn parse_line(line: &str) -> Option<Mount> {
    // id parent major:minor root mountpoint options [optional...] - fstype source super
    let (before, after) = line.split_once(" - ")?;
    let mut fields = before.split(' ');
    let (major, minor) = fields.nth(2)?.split_once(':')?;
    let root = fields.next()?;
    let point = fields.next()?;
    Some(Mount {
        dev: (major.parse().ok()?, minor.parse().ok()?),
        root: path(root),
        point: path(point),
        fstype: after.split(' ').next()?.to_owned(),
    })
}

fn path(field: &str) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(&unescape_octal(field)))
}

/// Where the file at `on_fs` (a path from the root of the file system on `dev`) can be opened:
/// below a mount of that file system whose root contains it. `None` when none does (a file
/// system mounted only in another mount namespace, such as a container's image).
#[must_use]
pub fn locate(mounts: &[Mount], dev: (u32, u32), on_fs: &str) -> Option<PathBuf> {
    mounts
        .iter()
        .filter(|mount| mount.dev == dev)
        .find_map(|mount| {
            let rest = std::path::Path::new(on_fs).strip_prefix(&mount.root).ok()?;
            Some(mount.point.join(rest))
        })
}

/// Undoes mountinfo's `\040`-style escapes of space, tab, newline and backslash.
fn unescape_octal(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(u8::try_from(value).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The hierarchy path of `pid`'s cgroup v2, from `/proc/PID/cgroup` (the `0::` line).
///
/// # Errors
/// The I/O error reading the file, or `InvalidData` without a v2 entry.
pub fn cgroup(pid: u32) -> io::Result<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    cgroup_v2_path(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no cgroup v2 line"))
}

fn cgroup_v2_path(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix("0::").map(str::to_owned))
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot. With
/// the pid it names one process for as long as the system runs.
#[must_use]
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_ticks(&stat)
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    // The name (field 2) is in parentheses and may hold spaces and parentheses itself.
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Field 3 is the first after the name; field 22 is the 20th.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The first `max_bytes + 1` bytes of `/proc/PID/cmdline` (one more than kept, to tell a cut
/// line): NUL-terminated arguments, empty for kernel threads and zombies.
#[must_use]
pub fn cmdline_bytes(pid: u32, max_bytes: usize) -> Option<Vec<u8>> {
    let file = fs::File::open(format!("/proc/{pid}/cmdline")).ok()?;
    let mut bytes = Vec::with_capacity(max_bytes.min(4096) + 1);
    file.take(
        u64::try_from(max_bytes)
            .unwrap_or(u64::MAX)
            .saturating_add(1),
    )
    .read_to_end(&mut bytes)
    .ok()?;
    Some(bytes)
}

/// `pid`'s arguments, whole.
///
/// # Errors
/// [`ProcError::Process`] when they cannot be read.
pub fn args(pid: u32) -> Result<Vec<OsString>, ProcError> {
    let bytes = fs::read(format!("/proc/{pid}/cmdline"))
        .map_err(|source| ProcError::Process { pid, source })?;
    Ok(split_args(&bytes))
}

fn split_args(bytes: &[u8]) -> Vec<OsString> {
    bytes
        .split(|&byte| byte == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| OsString::from_vec(arg.to_vec()))
        .collect()
}

/// `pid`'s real user and group ids (the first of the four on `/proc/PID/status`'s `Uid:` and
/// `Gid:` lines, as the kernel's `bpf_get_current_uid_gid` gives them).
///
/// # Errors
/// [`ProcError::Process`] when the file cannot be read.
pub fn real_ids(pid: u32) -> Result<(Option<u32>, Option<u32>), ProcError> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|source| ProcError::Process { pid, source })?;
    Ok((real_id(&status, "Uid:"), real_id(&status, "Gid:")))
}

fn real_id(status: &str, key: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok())
}

/// `pid`'s name (`/proc/PID/comm`), empty when it cannot be read.
#[must_use]
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|comm| comm.trim_end().to_owned())
        .unwrap_or_default()
}

/// The inode number of `pid`'s namespace of `kind` (`pid`, `cgroup`, …), as the kernel names
/// namespaces.
///
/// # Errors
/// [`ProcError::Process`] when it cannot be read.
pub fn namespace(pid: u32, kind: &str) -> Result<u64, ProcError> {
    fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .map(|metadata| metadata.ino())
        .map_err(|source| ProcError::Process { pid, source })
}

/// `/proc/PID/exe`: the link to the executable `pid` runs (read it, or stat what it points to).
#[must_use]
pub fn exe(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/exe"))
}

/// What an open descriptor of this process points to.
///
/// # Errors
/// The I/O error reading the link.
pub fn fd_target(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
60 22 254:1 /srv/app /opt/my\\040app rw - ext4 /dev/vdb rw
61 22 254:1 / /data rw - ext4 /dev/vdb rw
bad line
";

    #[test]
    fn lines_are_parsed_and_unescaped() {
        let mounts = parse(MOUNTINFO);
        assert_eq!(mounts.len(), 4);
        assert_eq!(
            mounts[2],
            Mount {
                dev: (254, 1),
                root: "/srv/app".into(),
                point: "/opt/my app".into(),
                fstype: "ext4".into(),
            }
        );
        assert_eq!(mounts[1].fstype, "cgroup2");
    }

    #[test]
    fn process_files_are_parsed() {
        // The start time, after a name with spaces and parentheses.
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 10 18446744073709551615";
        assert_eq!(parse_start_ticks(stat), Some(987_654));
        assert_eq!(parse_start_ticks("4242 (x) S 1"), None);
        assert_eq!(
            cgroup_v2_path("12:cpu:/x\n0::/system.slice/a.service\n"),
            Some("/system.slice/a.service".into())
        );
        assert_eq!(cgroup_v2_path("12:cpu:/x\n"), None);
        let status = "Name:\tcurl\nUid:\t1000\t0\t0\t0\nGid:\t998\t998\t998\t998\n";
        assert_eq!(real_id(status, "Uid:"), Some(1000));
        assert_eq!(real_id(status, "Gid:"), Some(998));
        assert_eq!(real_id("Name:\tx\n", "Uid:"), None);
        assert_eq!(
            split_args(b"imds-guard\0run\0--cgroup\0\0/x\0"),
            ["imds-guard", "run", "--cgroup", "/x"].map(OsString::from)
        );
    }

    #[test]
    fn a_file_is_located_below_a_mount_that_shows_it() {
        let mounts = parse(MOUNTINFO);
        assert_eq!(
            locate(&mounts, (254, 0), "/usr/bin/curl"),
            Some("/usr/bin/curl".into())
        );
        // Only the mount of /srv/app shows it at /opt/my app; the whole file system at /data.
        assert_eq!(
            locate(&mounts, (254, 1), "/srv/app/bin/x"),
            Some("/opt/my app/bin/x".into())
        );
        assert_eq!(
            locate(&mounts, (254, 1), "/other/y"),
            Some("/data/other/y".into())
        );
        assert_eq!(locate(&mounts, (0, 99), "/usr/bin/curl"), None);
    }
}
