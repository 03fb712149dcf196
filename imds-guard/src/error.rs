//! The agent's errors, by subsystem as aya splits its own: each subsystem's enum lives in its
//! module ([`ConfigError`] in `config`, [`CgroupError`] in `host::cgroups`, [`ProcError`] in
//! `host::procfs`, [`PidFileError`] in `host::pidfile`, [`KernelError`] in `kernel`,
//! [`PinError`] in `kernel::pins`, [`EventsError`] in `events`), and every variant names the
//! action that failed, carries the evidence, and says what to do next. [`Error`] is any of
//! them, as the commands return it (printing the subsystem's message unchanged), or one of the
//! agent process's own: its runtime, its metrics address.

use std::io;

pub use crate::{
    config::ConfigError,
    events::EventsError,
    host::{cgroups::CgroupError, pidfile::PidFileError, procfs::ProcError},
    kernel::{KernelError, pins::PinError},
};

/// Anything that can go wrong in imds-guard, by subsystem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The settings: the config file and the command line.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The cgroup hierarchy.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// `/proc`.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// Finding and signalling the running agent.
    #[error(transparent)]
    PidFile(#[from] PidFileError),
    /// The programs and their maps (boxed: aya's errors are large, and every `Result` of the
    /// crate carries this one).
    #[error(transparent)]
    Kernel(Box<KernelError>),
    /// The pins that keep enforcement in force between agents.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// Events: the ring buffer, event streams.
    #[error(transparent)]
    Events(#[from] EventsError),
    /// `migrate`: reading, translating or deleting iptables rules.
    #[error(transparent)]
    Migrate(#[from] crate::migrate::MigrateError),
    /// The agent's async runtime or signal handlers could not be set up.
    #[error("setting up the runtime failed: {source}")]
    Runtime {
        /// Why.
        source: io::Error,
    },
    /// The metrics address cannot be listened on.
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: io::Error,
    },
}

impl From<KernelError> for Error {
    fn from(err: KernelError) -> Self {
        Self::Kernel(Box::new(err))
    }
}

/// The error and every underlying cause not already in its message, joined with `: `.
///
/// Variants print their direct cause, but aya's errors keep the errno one level further down
/// (`bpf_link_create failed` → `Invalid argument (os error 22)`): an operator needs both.
#[must_use]
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        cause = inner.source();
    }
    text
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_adds_causes_missing_from_the_message() {
        let source = aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
            call: "bpf_link_create",
            io_error: std::io::Error::from_raw_os_error(libc::EINVAL),
        });
        let err = Error::from(KernelError::Attach {
            program: "connect4",
            cgroup: std::path::PathBuf::from("/cg/x"),
            source,
        });
        assert_eq!(
            report(&err),
            "attaching program connect4 to cgroup /cg/x failed: `bpf_link_create` failed: \
             Invalid argument (os error 22)"
        );
    }
}
