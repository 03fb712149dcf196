//! `imds-guard migrate`: the iptables rules a host carries today, read ([`save`]), judged as
//! iptables does into the workloads they let through ([`logic`], [`translate`]), the rules
//! that may go once imds-guard enforces ([`delete`]), and written as a config with what could
//! not be translated and the commands that delete what was ([`render`]).
//!
//! ```text
//! iptables-save, ip6tables-save ─parse→ Ruleset ─translate→ Translation ─delete→ deletions
//!                                                                        ─render→ config, report
//! ```

pub mod delete;
pub mod logic;
pub mod render;
pub mod save;
pub mod translate;

use std::{io::Read as _, path::PathBuf, process::Command};

/// What went wrong in a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The input file could not be read.
    #[error("{}: cannot read the iptables rules: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `iptables-save` (or `ip6tables-save`) could not be run or failed.
    #[error("{command}: {message}")]
    Tool {
        /// The command.
        command: String,
        /// What happened, and what to do.
        message: String,
    },
    /// The input is not iptables-save output.
    #[error(transparent)]
    Input(#[from] save::SaveError),
    /// The rules cannot be translated.
    #[error("{source_name}{}: {message}", at_line(*line))]
    Translate {
        /// The input.
        source_name: String,
        /// The line (0: the rules as a whole).
        line: usize,
        /// Why.
        message: String,
    },
    /// `--apply` found a reason not to delete the rules.
    #[error("not deleting the iptables rules: {0}")]
    NotApplied(String),
    /// Deleting the rules failed.
    #[error("deleting the {tool} rules failed ({status}): {stderr}")]
    Apply {
        /// `iptables-restore` or `ip6tables-restore`.
        tool: String,
        /// Its exit status.
        status: String,
        /// What it said.
        stderr: String,
    },
}

/// `:LINE`, or nothing for line 0 (the rules as a whole).
fn at_line(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}")
    }
}

/// The rules to translate, and what to call them: a file, standard input (`-`), or, without
/// either, the output of `iptables-save` and `ip6tables-save` run here.
///
/// # Errors
/// [`MigrateError::Read`] or [`MigrateError::Tool`].
pub fn read_input(input: Option<&std::path::Path>) -> Result<(String, String), MigrateError> {
    match input {
        Some(path) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|source| MigrateError::Read {
                    path: path.to_owned(),
                    source,
                })?;
            Ok((text, "<stdin>".into()))
        }
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| MigrateError::Read {
                path: path.to_owned(),
                source,
            })?;
            Ok((text, path.display().to_string()))
        }
        None => {
            let mut text = run_save("iptables-save")?;
            text.push_str(&run_save("ip6tables-save")?);
            Ok((text, "iptables-save + ip6tables-save".into()))
        }
    }
}

/// The output of `tool` (which reads the firewall, and changes nothing).
fn run_save(tool: &str) -> Result<String, MigrateError> {
    let output = Command::new(tool)
        .output()
        .map_err(|err| MigrateError::Tool {
            command: tool.into(),
            message: if err.kind() == std::io::ErrorKind::NotFound {
                "not found: install iptables (apt-get install iptables), or give the saved rules \
             as a file"
                    .into()
            } else {
                err.to_string()
            },
        })?;
    if !output.status.success() {
        return Err(MigrateError::Tool {
            command: tool.into(),
            message: format!(
                "{}: {} (it needs root)",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    String::from_utf8(output.stdout).map_err(|_| MigrateError::Tool {
        command: tool.into(),
        message: "printed something that is not UTF-8".into(),
    })
}
