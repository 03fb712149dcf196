//! `imds-guard reload`: the running agent re-reads its settings, once they are known valid.

use clap::Parser as _;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    cli::{Cli, Command, ReloadArgs},
    config::Config,
    error::{PidFileError, Result},
    host::{cgroups::Hierarchy, pidfile, procfs},
    policy::Policy,
};

/// `imds-guard reload`: checks the config the running agent would read (from the agent's own
/// command line) and, when it is valid, sends the agent SIGHUP.
///
/// # Errors
/// [`PidFileError::NotRunning`], the config's error (nothing is sent), or [`PidFileError::Signal`].
pub fn run(args: &ReloadArgs) -> Result<()> {
    let pid = pidfile::running_agent(&args.pid_file)?;
    let agent_args = procfs::args(pid.unsigned_abs())?;
    let config_file = match Cli::try_parse_from(agent_args) {
        Ok(Cli {
            command: Command::Run(run),
        }) => {
            let config = Config::load(run.config.as_deref(), &run.overrides())?;
            Policy::resolve(&config, &Hierarchy::discover()?)?;
            config.file.map_or_else(
                || "its command line (no config file)".to_owned(),
                |file| file.display().to_string(),
            )
        }
        _ => {
            return Err(PidFileError::NotRunning {
                path: args.pid_file.clone(),
                why: format!("pid {pid} is not an `imds-guard run` process"),
            }
            .into());
        }
    };
    kill(Pid::from_raw(pid), Signal::SIGHUP)
        .map_err(|source| PidFileError::Signal { pid, source })?;
    println!(
        "imds-guard (pid {pid}) is re-reading {config_file}; its log says when it is in force"
    );
    Ok(())
}
