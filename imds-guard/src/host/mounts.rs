//! The mount table, from `/proc/self/mountinfo`: where the cgroup2 hierarchy is mounted, and
//! where a file system (by device) is, to turn an executable's path on its file system, as the
//! kernel records it in an event, into a path the operator can open.

use std::{ffi::OsStr, os::unix::ffi::OsStrExt as _, path::PathBuf};

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

/// Reads this process's mount table (empty when it cannot be read).
#[must_use]
pub fn read() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo").map_or_else(|_| Vec::new(), |text| parse(&text))
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
