use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;
use imds_guard::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Human logs go to stderr (journald keeps them); stdout carries only events.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_env("IMDS_GUARD_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let result = match &cli.command {
        Command::Run(args) => imds_guard::agent::run(args),
        Command::Reload(args) => imds_guard::commands::reload::run(args),
        Command::CheckConfig(args) => imds_guard::commands::check_config::run(args),
        Command::Explain(args) => imds_guard::commands::explain::run(args),
        Command::Detach(args) => imds_guard::commands::detach::run(args),
        Command::Report(args) => imds_guard::commands::report::run(args),
        Command::Posture(args) => {
            imds_guard::commands::posture::run(args);
            Ok(())
        }
        Command::Migrate(args) => match imds_guard::commands::migrate::run(args) {
            Ok(true) => Ok(()),
            // `--check` found a difference (printed).
            Ok(false) => return ExitCode::FAILURE,
            Err(err) => Err(err),
        },
        Command::Status(args) => {
            if imds_guard::commands::status::run(args) {
                Ok(())
            } else {
                // Like `systemctl status`: 3 when the service is not doing its job.
                return ExitCode::from(3);
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // check-config speaks like a compiler: `file:line:col: message`, nothing before it.
        Err(err) if matches!(cli.command, Command::CheckConfig(_)) => {
            eprintln!("{}", imds_guard::error::report(&err));
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("imds-guard: error: {}", imds_guard::error::report(&err));
            exit_code(&err)
        }
    }
}

/// The agent's exit status for `err`: `WEAKER_THAN_IN_FORCE_EXIT` when it did not start
/// rather than weaken the programs in force (the unit does not restart it: the next try would
/// meet the same kernel), 1 otherwise.
fn exit_code(err: &imds_guard::error::Error) -> ExitCode {
    match err {
        imds_guard::error::Error::Kernel(kernel)
            if matches!(
                **kernel,
                imds_guard::kernel::KernelError::WeakerThanInForce { .. }
            ) =>
        {
            ExitCode::from(imds_guard::kernel::WEAKER_THAN_IN_FORCE_EXIT)
        }
        _ => ExitCode::FAILURE,
    }
}
