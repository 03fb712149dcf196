//! Ctrl-C (SIGINT) and SIGTERM during a lab run: the signal only raises a flag; whatever is
//! waiting on a child (qemu, the image build) sees it, kills that child by its pid and returns
//! an error, so the usual cleanup (disks, a half-built image) runs on the way out.

use std::{
    process::{Child, Command, ExitStatus},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn raise_flag(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches SIGINT and SIGTERM for the rest of the run.
pub fn catch() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
        // function pointer stays valid for the program's life.
        unsafe {
            libc::signal(signal, raise_flag as *const () as libc::sighandler_t);
        }
    }
}

/// Fails if the run was interrupted.
pub fn check() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Waits for `child`, killing it (and failing) if the run is interrupted first, or if
/// `deadline` passes.
pub fn wait(child: &mut Child, deadline: Option<std::time::Instant>) -> Result<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let late = deadline.is_some_and(|deadline| std::time::Instant::now() > deadline);
        if late || INTERRUPTED.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            if late {
                bail!("timed out");
            }
            bail!("interrupted");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `command` to its end, failing on a non-zero exit or an interruption.
pub fn run(command: &mut Command) -> Result<()> {
    check()?;
    let mut child = command
        .spawn()
        .with_context(|| format!("running {command:?}"))?;
    let status = wait(&mut child, None).with_context(|| format!("{command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}
