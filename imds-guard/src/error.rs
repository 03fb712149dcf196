//! The one error type of the agent: each variant names the action that failed, carries the
//! evidence, and says what to do next.

use std::{io, path::PathBuf};

/// Where a setting came from, for error messages: `--allow-uid` or `/etc/x.toml:3:14`.
pub type Origin = String;

/// Everything that can go wrong in imds-guard.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read.
    #[error("{}: cannot read the config file: {source}", path.display())]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The config file is not valid TOML or has an unknown key or a value of the wrong type.
    #[error("{}:{line}:{column}: {message}", path.display())]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the parser said.
        message: String,
    },
    /// A setting has a value that cannot work.
    #[error("{origin}: {message}")]
    InvalidSetting {
        /// Option or file position.
        origin: Origin,
        /// What is wrong, with the value.
        message: String,
    },
    /// No cgroup v2 hierarchy is mounted.
    #[error(
        "no cgroup2 filesystem is mounted (none in /proc/self/mountinfo): \
         mount one with `mount -t cgroup2 none /sys/fs/cgroup`"
    )]
    NoCgroup2,
    /// A cgroup named in the settings does not exist.
    #[error("{origin}: cgroup {given:?} does not exist (no directory {})", dir.display())]
    CgroupNotFound {
        /// Option or file position.
        origin: Origin,
        /// The value as given.
        given: String,
        /// The directory looked for.
        dir: PathBuf,
    },
    /// A cgroup directory could not be inspected.
    #[error("cannot inspect cgroup {}: {source}", dir.display())]
    InspectCgroup {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A `/proc` file could not be read.
    #[error("cannot read {path}: {source}")]
    ReadProc {
        /// The file.
        path: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The process lacks the capabilities to load and attach BPF programs.
    #[error(
        "imds-guard needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN) to load and attach its \
         programs, and this process lacks {missing}: run it as root"
    )]
    MissingCapabilities {
        /// The missing capabilities, by name.
        missing: String,
    },
    /// The kernel lacks a BPF feature imds-guard needs.
    #[error("this kernel does not support {feature}, which imds-guard needs ({needs})")]
    KernelFeature {
        /// The feature.
        feature: &'static str,
        /// The kernel version and config that provide it.
        needs: &'static str,
    },
    /// Probing a kernel feature failed unexpectedly.
    #[error("probing the kernel for {feature} failed: {message}")]
    ProbeFeature {
        /// The feature.
        feature: &'static str,
        /// What the probe reported.
        message: String,
    },
    /// The embedded object could not be loaded (maps created, BTF parsed).
    #[error("loading the kernel object failed: {source}")]
    LoadObject {
        /// Why.
        source: aya::EbpfError,
    },
    /// The embedded object lacks a map or program the agent expects.
    #[error("the embedded kernel object has no {kind} named {name}: the build is broken")]
    MissingInObject {
        /// "map" or "program".
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// A map could not be opened with the expected type.
    #[error("map {map} has an unexpected type or layout: {source}")]
    OpenMap {
        /// The map.
        map: &'static str,
        /// Why.
        source: aya::maps::MapError,
    },
    /// Writing the policy into a map failed.
    /// A pinned map could not be opened.
    #[error("cannot open the pinned map {}: {source}", path.display())]
    OpenPinnedMap {
        /// Its pin.
        path: PathBuf,
        /// Why.
        source: aya::maps::MapError,
    },
    #[error("writing {what} to map {map} failed: {source}")]
    WriteMap {
        /// The map.
        map: &'static str,
        /// The entry.
        what: String,
        /// Why.
        source: aya::maps::MapError,
    },
    /// Reading a map failed.
    #[error("reading map {map} failed: {source}")]
    ReadMap {
        /// The map.
        map: &'static str,
        /// Why.
        source: aya::maps::MapError,
    },
    /// The verifier (or the kernel) refused a program.
    #[error("loading program {program} failed: {source}{}", verifier_hint(source))]
    LoadProgram {
        /// The program.
        program: &'static str,
        /// Why, with the verifier log.
        source: aya::programs::ProgramError,
    },
    /// A program could not be attached to the cgroup.
    #[error("attaching program {program} to cgroup {} failed: {source}", cgroup.display())]
    Attach {
        /// The program.
        program: &'static str,
        /// The cgroup directory.
        cgroup: PathBuf,
        /// Why.
        source: aya::programs::ProgramError,
    },
    /// Detaching a program failed.
    #[error("detaching program {program} failed: {source}")]
    Detach {
        /// The program.
        program: &'static str,
        /// Why.
        source: aya::programs::ProgramError,
    },
    /// The event pipeline failed.
    #[error("reading events failed: {source}")]
    Events {
        /// Why.
        source: io::Error,
    },
    /// The async runtime or signal handlers could not be set up.
    /// The pin directory cannot be prepared or cleaned.
    #[error("pin directory {}: {what} failed: {source}", dir.display())]
    PinDir {
        /// The pin directory.
        dir: PathBuf,
        /// What was being done.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
    /// The pinned links guard a cgroup outside the new attach point.
    #[error(
        "the links pinned in {} guard cgroup {guarded}, which is not inside {target}: moving \
         enforcement to {target} would leave {guarded} unguarded. If that is what you want, \
         run `imds-guard detach --pin-dir {}` first (enforcement stops until the next start); \
         to guard both, give this agent another --pin-dir",
        dir.display(),
        dir.display()
    )]
    PinnedElsewhere {
        /// The pin directory.
        dir: PathBuf,
        /// The cgroup the pinned links are attached to (its path, or its id if unresolvable).
        guarded: String,
        /// The attach point asked for.
        target: String,
    },
    /// A program link could not be created, adopted or replaced.
    #[error("program {program}: {action} failed: {source}")]
    Link {
        /// The program.
        program: &'static str,
        /// What was being done.
        action: &'static str,
        /// Why it failed.
        source: io::Error,
    },
    /// A pinned map has another layout than this build's.
    #[error(
        "pinned map {map} ({}) has layout {pinned} (key/value/entries) where this build expects \
         {expected}: it belongs to an incompatible build; `imds-guard detach` removes it \
         (enforcement stops until the next start)",
        path.display()
    )]
    PinnedMapMismatch {
        /// The map.
        map: &'static str,
        /// Its pin.
        path: PathBuf,
        /// The pinned map's layout.
        pinned: String,
        /// This build's.
        expected: String,
    },
    /// The metrics address cannot be listened on.
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// An event stream could not be read.
    #[error("{at}: {message}")]
    Report {
        /// The file (and line).
        at: String,
        /// What is wrong.
        message: String,
    },
    /// The cgroup tree cannot be watched for changes.
    #[error("cannot watch the cgroup tree for changes (inotify): {source}")]
    WatchCgroups {
        /// Why.
        source: io::Error,
    },
    /// The pid file could not be created, locked, read or written.
    #[error("{}: cannot use the pid file: {source}", path.display())]
    PidFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
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
        source: nix::errno::Errno,
    },
    /// A process named on the command line could not be inspected.
    #[error("cannot inspect process {pid}: {source}")]
    InspectProcess {
        /// The process.
        pid: u32,
        /// Why.
        source: io::Error,
    },
    #[error("setting up the runtime failed: {source}")]
    Runtime {
        /// Why.
        source: io::Error,
    },
}

fn verifier_hint(source: &aya::programs::ProgramError) -> &'static str {
    if matches!(source, aya::programs::ProgramError::LoadError { .. }) {
        "\n(the verifier log above says which instruction it refused; a kernel older than \
         Linux 5.8 lacks helpers these programs use)"
    } else {
        ""
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
            io_error: io::Error::from_raw_os_error(libc::EINVAL),
        });
        let err = Error::Attach {
            program: "connect4",
            cgroup: PathBuf::from("/cg/x"),
            source,
        };
        assert_eq!(
            report(&err),
            "attaching program connect4 to cgroup /cg/x failed: `bpf_link_create` failed: \
             Invalid argument (os error 22)"
        );
    }
}
