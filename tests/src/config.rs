use std::path::{Path, PathBuf};

/// A config file removed on drop; rewritten atomically (rename) so a reload never reads half.
pub struct ConfigFile(PathBuf);

impl ConfigFile {
    /// Writes `text` to a new file with a unique name.
    ///
    /// # Panics
    /// When it cannot be written.
    #[must_use]
    pub fn new(text: &str) -> Self {
        let file = Self(std::env::temp_dir().join(format!("{}.toml", crate::unique_name("cfg"))));
        file.write(text);
        file
    }

    /// Replaces the contents with `text` in one rename.
    ///
    /// # Panics
    /// When it cannot be written.
    pub fn write(&self, text: &str) {
        let staging = self.0.with_extension("tmp");
        std::fs::write(&staging, text).expect("write config");
        std::fs::rename(&staging, &self.0).expect("rename config");
    }

    /// Where it is.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Its path as a string, for command lines.
    #[must_use]
    pub fn arg(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
