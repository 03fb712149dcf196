use std::sync::atomic::{AtomicBool, Ordering};

use crate::{Client, IMDS_V4, Sandbox, TestCgroup};

/// Sets the flag when dropped, also while unwinding: a prober loop can never outlive a failed
/// test inside `std::thread::scope`.
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Connects to the IMDS as `uid` from `cgroup` until `done`, in rounds of `per_round` connects
/// from one process, and panics at the first attempt whose verdict is not `allowed`. Returns
/// the number of rounds. Denied rounds pause a little: every denial is an event the harness
/// keeps.
///
/// # Panics
/// On a wrong verdict.
#[must_use]
pub fn probe(
    done: &AtomicBool,
    sandbox: &Sandbox,
    cgroup: &TestCgroup,
    uid: u32,
    allowed: bool,
    per_round: u32,
) -> u32 {
    let mut rounds = 0;
    while !done.load(Ordering::Relaxed) {
        let outcome = Client::new(sandbox, cgroup, uid, uid)
            .repeat(per_round)
            .tcp(IMDS_V4, 80);
        if allowed {
            assert_eq!(
                (outcome.eperm, outcome.errno),
                (0, None),
                "uid {uid} should be allowed (round {rounds})"
            );
        } else {
            assert_eq!(
                outcome.eperm, per_round,
                "uid {uid} should be denied (round {rounds})"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        rounds += 1;
    }
    rounds
}
