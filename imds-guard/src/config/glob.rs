//! Glob patterns as rules write them, for cgroup paths and unit names.

use globset::{Glob, GlobBuilder};

/// A glob in which `*` and `?` stop at `/` and `**` crosses it, as in shells. A backslash is an
/// ordinary character: systemd escapes unit names with it (`dev-disk-by\x2dlabel.device`).
///
/// # Errors
/// The parser's complaint.
pub fn compile_glob(text: &str) -> std::result::Result<Glob, globset::Error> {
    GlobBuilder::new(text)
        .literal_separator(true)
        .backslash_escape(false)
        .build()
}
