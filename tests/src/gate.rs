//! A gate that held clients wait at ([`crate::Client::hold_at`]): each marks that its
//! connection is open, then waits until the test opens the gate. What the test does meanwhile
//! (a reload, the agent's start) comes after the connections' opening and before their
//! requests, however loaded the machine; a fixed sleep could not say which came first.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// A directory: `ready-*` files made by the clients at the gate, `open` made by [`Gate::open`].
/// Removed on drop.
pub struct Gate(PathBuf);

impl Gate {
    /// A new, closed gate that clients of any uid can reach.
    ///
    /// # Panics
    /// When the directory cannot be made.
    #[must_use]
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(crate::unique_name("gate"));
        std::fs::create_dir(&dir).expect("make the gate's directory");
        // The clients have become their workload's uid by the time they reach it.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
            .expect("open the gate's directory to every uid");
        Self(dir)
    }

    /// Its directory, for `imds-client --hold-at`.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// How many clients are at the gate.
    ///
    /// # Panics
    /// When the directory cannot be read.
    #[must_use]
    pub fn arrived(&self) -> usize {
        std::fs::read_dir(&self.0)
            .expect("read the gate's directory")
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().starts_with("ready-"))
            .count()
    }

    /// Waits until `count` clients are at the gate, `done()` says they will not all come (a
    /// client ended early: its outcome says why), or `timeout` passes. Whether they all came.
    pub fn wait_for(&self, count: usize, timeout: Duration, done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.arrived() >= count {
                return true;
            }
            if done() || Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Lets the clients at the gate, and any that come later, go on.
    ///
    /// # Panics
    /// When the gate cannot be opened.
    pub fn open(&self) {
        std::fs::File::create(self.0.join("open")).expect("open the gate");
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
