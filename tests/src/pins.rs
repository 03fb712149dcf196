use std::{
    fs,
    path::{Path, PathBuf},
};

/// A pin directory of the test's own: on a bpf filesystem that the agent mounts (the parent is
/// a plain directory, so the agent's mounting is exercised), detached, unmounted and removed on
/// drop.
pub struct Pins {
    base: PathBuf,
    mount: PathBuf,
    dir: PathBuf,
}

impl Pins {
    /// A fresh, empty place for pins.
    ///
    /// # Panics
    /// When the directories cannot be made.
    #[must_use]
    pub fn new() -> Self {
        let base = std::env::temp_dir().join(crate::unique_name("pins"));
        let mount = base.join("bpf");
        fs::create_dir_all(&mount).expect("pins base");
        let dir = mount.join("imds-guard");
        Self { base, mount, dir }
    }

    /// The pin directory (`--pin-dir`).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A pid file beside the pins (not on the bpf filesystem), removed with them.
    #[must_use]
    pub fn pid_file(&self) -> PathBuf {
        self.base.join("agent.pid")
    }

    /// `--pin-dir` as an argument.
    #[must_use]
    pub fn arg(&self) -> String {
        self.dir.to_string_lossy().into_owned()
    }

    /// What is pinned, as paths relative to the pin directory, sorted.
    ///
    /// # Panics
    /// Never: every path listed is below the pin directory.
    #[must_use]
    pub fn listing(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut pending = vec![self.dir.clone()];
        while let Some(dir) = pending.pop() {
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    pending.push(path.clone());
                }
                found.push(
                    path.strip_prefix(&self.dir)
                        .expect("below")
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
        found.sort();
        found
    }
}

impl Default for Pins {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if self.dir.exists() {
            let nobody = self.base.join("no-agent.pid");
            let _ = crate::imds_guard(&[
                "detach",
                "--pin-dir",
                &self.arg(),
                "--pid-file",
                &nobody.to_string_lossy(),
            ]);
        }
        // Whatever is left goes with the filesystem.
        let _ = nix::mount::umount2(&self.mount, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir_all(&self.base);
    }
}
