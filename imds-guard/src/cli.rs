//! The command line. Option names are a contract: scripts and units depend on them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::{
    config::{Mode, Overrides},
    host::pidfile::DEFAULT_PID_FILE,
    kernel::pins::DEFAULT_PIN_DIR,
};

/// Keeps the EC2 instance metadata service for the workloads that need it.
#[derive(Debug, Parser)]
#[command(name = "imds-guard", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the programs, enforce the policy and print one JSON line per denied (or audited)
    /// attempt on stdout until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Make the running agent re-read its config (SIGHUP), once the config it would read has
    /// been checked: an invalid one is reported here and not sent.
    Reload(ReloadArgs),
    /// Validate a config file; print the effective policy, names resolved, and the cgroups each
    /// rule matches now. Exit 1 with `file:line:col: message` on error.
    CheckConfig(CheckConfigArgs),
    /// Say which verdict a workload would get now for an IMDS connect, and which rule decides.
    Explain(ExplainArgs),
    /// Show whether enforcement is in force, the policy, counters, and the agent's health
    /// (read from the pins: works whether or not the agent runs). Exit 3 when not enforcing.
    Status(StatusArgs),
    /// Turn enforcement off: detach the programs and remove the pins (the agent must be
    /// stopped first). Stopping the agent alone leaves enforcement in force.
    Detach(DetachArgs),
    /// Who touched IMDS, from an event stream (`run`'s stdout, or `journalctl -u imds-guard
    /// -o cat`); or a policy that lets through what audit mode saw.
    Report(ReportArgs),
    /// Ask IMDS whether this instance still answers IMDSv1 (`HttpTokens`, CIS AWS Foundations
    /// 5.6) and the hop limit of its token responses. Sends two requests to IMDS, as root.
    Posture(PostureArgs),
    /// Translate the iptables and ip6tables rules that keep workloads from IMDS into a config;
    /// say what could not be translated and how to delete what was. Reads `iptables-save` and
    /// `ip6tables-save` output (run here by default); changes nothing without --apply.
    Migrate(MigrateArgs),
}

/// `imds-guard migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// `iptables-save` and/or `ip6tables-save` output (one after the other), `-` for standard
    /// input. Default: run both tools here.
    #[arg(value_name = "FILE|-")]
    pub input: Option<PathBuf>,
    /// `config`: the config, with what was and was not translated in its comments; `json`
    /// for tools.
    #[arg(long, value_enum, default_value = "config")]
    pub format: MigrateFormat,
    /// Say whether the policy of --config already lets through every workload the rules let
    /// through and protects every address they covered; exit 1 with the difference if not.
    #[arg(long, conflicts_with = "apply")]
    pub check: bool,
    /// Delete the translated rules (atomically per family, with `iptables-restore --noflush`),
    /// once the agent enforces a policy that covers them. Reads the rules here (no FILE).
    #[arg(long, conflicts_with = "input")]
    pub apply: bool,
    /// With --check or --apply: the config the agent runs with (default:
    /// /etc/imds-guard/imds-guard.toml, or the built-in defaults when it does not exist).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// With --apply: the pin directory the agent uses.
    #[arg(long = "pin-dir", value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// With --apply: the agent's pid file.
    #[arg(long = "pid-file", value_name = "FILE", default_value = DEFAULT_PID_FILE)]
    pub pid_file: PathBuf,
}

/// Output of `imds-guard migrate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MigrateFormat {
    /// A config, commented.
    Config,
    /// One JSON object.
    Json,
}

/// `imds-guard posture`.
#[derive(Debug, Args)]
pub struct PostureArgs {
    /// Print one JSON object (`http_tokens`, `hop_limit`) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `imds-guard report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// JSON-lines events (default or `-`: standard input).
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// `table` for people, `json` for tools.
    #[arg(long, value_enum, default_value = "table")]
    pub format: ReportFormat,
    /// Print a config that keeps the policy the audit ran with and adds rules letting through
    /// the workloads audit mode reported, in enforce mode.
    #[arg(long = "suggest-policy")]
    pub suggest_policy: bool,
    /// With --suggest-policy: the config the audit ran with (default:
    /// /etc/imds-guard/imds-guard.toml, or the built-in defaults when it does not exist).
    #[arg(long, value_name = "FILE", requires = "suggest_policy")]
    pub config: Option<PathBuf>,
}

/// Output of `imds-guard report`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// A table.
    Table,
    /// One JSON array of workloads.
    Json,
}

/// `imds-guard status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The pin directory the agent uses.
    #[arg(long = "pin-dir", value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// The agent's pid file.
    #[arg(long = "pid-file", value_name = "FILE", default_value = DEFAULT_PID_FILE)]
    pub pid_file: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `imds-guard detach`.
#[derive(Debug, Args)]
pub struct DetachArgs {
    /// The pin directory the agent uses.
    #[arg(long = "pin-dir", value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// The agent's pid file (a running agent must be stopped first).
    #[arg(long = "pid-file", value_name = "FILE", default_value = DEFAULT_PID_FILE)]
    pub pid_file: PathBuf,
}

/// `imds-guard run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Config file (TOML). Default: /etc/imds-guard/imds-guard.toml when it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// enforce: refuse with EPERM and report; audit: allow and report.
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Cgroup to attach to, as in /proc/PID/cgroup or as its directory (default: the root).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
    /// Allow tasks with this uid (repeatable; adds to the config's rules; any rule replaces the
    /// default, uid 0).
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uid: Vec<u32>,
    /// Allow tasks with this primary gid (repeatable).
    #[arg(long = "allow-gid", value_name = "GID")]
    pub allow_gid: Vec<u32>,
    /// Allow tasks in this cgroup and every cgroup below it (repeatable).
    #[arg(long = "allow-cgroup", value_name = "PATH")]
    pub allow_cgroup: Vec<String>,
    /// Pid file, held locked while the agent runs (one agent per file); `reload` reads it.
    #[arg(long = "pid-file", value_name = "FILE", default_value = DEFAULT_PID_FILE)]
    pub pid_file: PathBuf,
    /// Where the program links and maps are pinned (on a bpf filesystem, mounted if needed),
    /// so that enforcement outlives the agent.
    #[arg(long = "pin-dir", value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (off by default), e.g.
    /// 127.0.0.1:9179.
    #[arg(long = "metrics-addr", value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Repeats of an attempt (same workload, destination and verdict) within this many seconds
    /// of its first, which is reported at once, are reported as one event with a count when
    /// the window closes; 0 reports every attempt.
    #[arg(
        long = "aggregate-window",
        value_name = "SECONDS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u32).range(0..=3600)
    )]
    pub aggregate_window: u32,
}

/// `imds-guard reload`.
#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// The running agent's pid file.
    #[arg(long = "pid-file", value_name = "FILE", default_value = DEFAULT_PID_FILE)]
    pub pid_file: PathBuf,
}

/// `imds-guard check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The config file (default: /etc/imds-guard/imds-guard.toml, or the built-in defaults
    /// when it does not exist).
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
}

/// `imds-guard explain`.
#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("workload")
        .required(true)
        .multiple(true)
        .args(["pid", "uid", "gid", "cgroup"])
))]
pub struct ExplainArgs {
    /// Config file (TOML). Default: /etc/imds-guard/imds-guard.toml when it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A running process: its uid, gid and cgroup.
    #[arg(long, conflicts_with_all = ["uid", "gid", "cgroup", "in_container"])]
    pub pid: Option<u32>,
    /// A uid or user name (without it, rules on uids do not match).
    #[arg(long, value_name = "UID")]
    pub uid: Option<String>,
    /// A gid or group name (default: the primary group of --uid's user, when it has one).
    #[arg(long, value_name = "GID")]
    pub gid: Option<String>,
    /// A cgroup, as in /proc/PID/cgroup or as its directory (default: the root).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
    /// The task is in a pid or cgroup namespace of its own, as a container's is (with --pid,
    /// read from the process).
    #[arg(long)]
    pub in_container: bool,
}

impl RunArgs {
    /// The settings these options add to the config file's.
    #[must_use]
    pub fn overrides(&self) -> Overrides {
        Overrides {
            mode: self.mode,
            cgroup: self.cgroup.clone(),
            allow_uid: self.allow_uid.clone(),
            allow_gid: self.allow_gid.clone(),
            allow_cgroup: self.allow_cgroup.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_options_parse() {
        let cli = Cli::try_parse_from([
            "imds-guard",
            "run",
            "--mode",
            "audit",
            "--cgroup",
            "/w",
            "--allow-uid",
            "1000",
            "--allow-uid",
            "1001",
            "--allow-gid",
            "50",
            "--allow-cgroup",
            "/system.slice/a.service",
            "--config",
            "/tmp/c.toml",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run: {:?}", cli.command);
        };
        let overrides = args.overrides();
        assert_eq!(overrides.mode, Some(Mode::Audit));
        assert_eq!(overrides.cgroup.as_deref(), Some("/w"));
        assert_eq!(overrides.allow_uid, [1000, 1001]);
        assert_eq!(overrides.allow_gid, [50]);
        assert_eq!(overrides.allow_cgroup, ["/system.slice/a.service"]);
        assert_eq!(args.config, Some(PathBuf::from("/tmp/c.toml")));
        assert_eq!(args.pid_file, PathBuf::from(DEFAULT_PID_FILE));
    }

    #[test]
    fn explain_needs_a_workload_and_pid_stands_alone() {
        let err = Cli::try_parse_from(["imds-guard", "explain"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let err =
            Cli::try_parse_from(["imds-guard", "explain", "--pid", "1", "--uid", "0"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let cli = Cli::try_parse_from([
            "imds-guard",
            "explain",
            "--uid",
            "cwagent",
            "--cgroup",
            "/a",
        ])
        .unwrap();
        let Command::Explain(args) = cli.command else {
            panic!("not explain");
        };
        assert_eq!(
            (args.uid.as_deref(), args.cgroup.as_deref()),
            (Some("cwagent"), Some("/a"))
        );
    }

    #[test]
    fn uid_must_be_a_number() {
        let err = Cli::try_parse_from(["imds-guard", "run", "--allow-uid", "bob"]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("invalid value 'bob' for '--allow-uid <UID>'"),
            "{text}"
        );
    }
}
