//! `imds-guard detach`: enforcement stopped, the pins removed.

use crate::{
    cli::DetachArgs,
    error::{PidFileError, Result},
    host::pidfile,
    kernel::pins::PinDir,
};

/// `imds-guard detach`: detaches every pinned link and removes the pins.
///
/// # Errors
/// [`PidFileError::AlreadyRunning`] while an agent runs (it would put enforcement back), or the
/// first pin that could not be removed.
pub fn run(args: &DetachArgs) -> Result<()> {
    if let Ok(pid) = pidfile::running_agent(&args.pid_file) {
        return Err(PidFileError::AlreadyRunning {
            path: args.pid_file.clone(),
            pid: format!("{pid}; stop it first, e.g. `systemctl stop imds-guard`"),
        }
        .into());
    }
    let pins = PinDir::new(&args.pin_dir);
    if !pins.root().exists() {
        println!(
            "nothing to detach: {} does not exist",
            pins.root().display()
        );
        return Ok(());
    }
    let detached = pins.remove_all()?;
    println!(
        "detached {} and removed {}: IMDS is no longer guarded",
        if detached.is_empty() {
            "nothing".to_owned()
        } else {
            detached.join(", ")
        },
        pins.root().display()
    );
    Ok(())
}
