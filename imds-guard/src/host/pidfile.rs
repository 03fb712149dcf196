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

/// Where the agent writes its pid when `--pid-file` is not given.
pub const DEFAULT_PID_FILE: &str = "/run/imds-guard/imds-guard.pid";

/// What went wrong finding, holding or signalling the agent through its pid file.
#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    /// The pid file could not be created, locked, read or written.
    #[error("{}: cannot use the pid file: {source}", path.display())]
    Use {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another agent holds the pid file.
    #[error(
        "{}: another imds-guard agent is running (pid {pid}): stop it first, or give this one \
         its own --pid-file",
        path.display()
    )]
    AlreadyRunning {
        /// The pid file.
        path: PathBuf,
        /// What the file says.
        pid: String,
    },
    /// No agent holds the pid file.
    #[error("{}: no imds-guard agent is running ({why})", path.display())]
    NotRunning {
        /// The pid file.
        path: PathBuf,
        /// What was found instead.
        why: String,
    },
    /// A signal could not be sent to the agent.
    #[error("cannot signal the imds-guard agent (pid {pid}): {source}")]
    Signal {
        /// The agent's pid.
        pid: i32,
        /// Why.
        source: Errno,
    },
}

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
    /// [`PidFileError::AlreadyRunning`] when another process holds it, [`PidFileError::Use`]
    /// otherwise.
    pub fn lock(path: &Path) -> Result<Self, PidFileError> {
        let io_error = |source| PidFileError::Use {
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
                Err(PidFileError::AlreadyRunning {
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
    /// [`PidFileError::Use`].
    pub fn publish(&mut self) -> Result<(), PidFileError> {
        let pid = std::process::id();
        let file: &mut File = &mut self.file;
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{pid}"))
            .map_err(|source| PidFileError::Use {
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
/// [`PidFileError::NotRunning`] when no process holds the file (or it has not published its pid
/// yet), [`PidFileError::Use`] when it cannot be read.
pub fn running_agent(path: &Path) -> Result<i32, PidFileError> {
    let not_running = |why: String| PidFileError::NotRunning {
        path: path.to_owned(),
        why,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(not_running("the pid file does not exist".into()));
        }
        Err(source) => {
            return Err(PidFileError::Use {
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
            return Err(PidFileError::Use {
                path: path.to_owned(),
                source: errno.into(),
            });
        }
    };
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|source| PidFileError::Use {
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
            Err(PidFileError::NotRunning { .. })
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
