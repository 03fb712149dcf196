//! The agent's pid file: one agent per file (an exclusive `flock` held while it runs), and how
//! `imds-guard reload` finds the agent to signal.

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use crate::error::{Error, Result};

/// Where the agent writes its pid when `--pid-file` is not given.
pub const DEFAULT_PID_FILE: &str = "/run/imds-guard/imds-guard.pid";

/// A pid file this process holds locked; removed when dropped.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    file: Flock<File>,
}

impl PidFile {
    /// Creates (or opens) and locks `path`. The pid is written by [`PidFile::publish`], once
    /// the agent handles the signals that `reload` sends.
    ///
    /// # Errors
    /// [`Error::AlreadyRunning`] when another process holds it, [`Error::PidFile`] otherwise.
    pub fn lock(path: &Path) -> Result<Self> {
        let io_error = |source| Error::PidFile {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_error)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
            .map_err(io_error)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(file) => Ok(Self {
                path: path.to_owned(),
                file,
            }),
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                Err(Error::AlreadyRunning {
                    path: path.to_owned(),
                    pid: pid.trim().to_owned(),
                })
            }
            Err((_, errno)) => Err(io_error(errno.into())),
        }
    }

    /// Writes this process's pid.
    ///
    /// # Errors
    /// [`Error::PidFile`].
    pub fn publish(&mut self) -> Result<()> {
        let pid = std::process::id();
        let file: &mut File = &mut self.file;
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{pid}"))
            .map_err(|source| Error::PidFile {
                path: self.path.clone(),
                source,
            })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Removed while still locked, so a new agent cannot lock a file that is then removed.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The pid of the agent holding `path`.
///
/// # Errors
/// [`Error::NotRunning`] when no process holds the file (or it has not published its pid yet),
/// [`Error::PidFile`] when it cannot be read.
pub fn running_agent(path: &Path) -> Result<i32> {
    let not_running = |why: String| Error::NotRunning {
        path: path.to_owned(),
        why,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(not_running("the pid file does not exist".into()));
        }
        Err(source) => {
            return Err(Error::PidFile {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut file = match Flock::lock(file, FlockArg::LockSharedNonblock) {
        // We got the lock, so nobody holds it: the file is left over.
        Ok(_) => {
            return Err(not_running(
                "the pid file is stale: nothing holds its lock".into(),
            ));
        }
        Err((file, Errno::EWOULDBLOCK)) => file,
        Err((_, errno)) => {
            return Err(Error::PidFile {
                path: path.to_owned(),
                source: errno.into(),
            });
        }
    };
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|source| Error::PidFile {
            path: path.to_owned(),
            source,
        })?;
    text.trim().parse().map_err(|_| {
        not_running(format!(
            "the agent is still starting (the pid file holds {:?}); try again",
            text.trim()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_and_reload_finds_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.pid");
        assert!(matches!(
            running_agent(&path),
            Err(Error::NotRunning { .. })
        ));
        let mut held = PidFile::lock(&path).unwrap();
        let starting = running_agent(&path).unwrap_err().to_string();
        assert!(starting.contains("still starting"), "{starting}");
        held.publish().unwrap();
        assert_eq!(
            running_agent(&path).unwrap(),
            i32::try_from(std::process::id()).unwrap()
        );
        let second = PidFile::lock(&path).unwrap_err().to_string();
        assert!(
            second.contains(&format!(
                "another imds-guard agent is running (pid {})",
                std::process::id()
            )),
            "{second}"
        );
        drop(held);
        assert!(!path.exists());
    }

    #[test]
    fn a_leftover_file_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.pid");
        std::fs::write(&path, "12345\n").unwrap();
        let err = running_agent(&path).unwrap_err().to_string();
        assert!(err.contains("stale"), "{err}");
    }
}
