//! The harness for imds-guard's privileged end-to-end tests and demo.
//!
//! Everything a test touches it creates itself and removes on drop: a network namespace with
//! the IMDS addresses on its loopback and a mock IMDS ([`Sandbox`]), cgroups under the cgroup2
//! mount ([`TestCgroup`]), the agent process ([`Agent`]) and client processes ([`Client`]).
//! Nothing is attached to the host's root cgroup and no packet leaves the namespace.

mod agent;
mod cgroup;
mod client;
mod config;
mod gate;
mod metrics;
mod pins;
mod prober;
pub mod process;
mod sandbox;

pub use agent::{
    Agent, agent_binary, imds_guard, refused_reads_variant_binary, run_to_end, target_binary,
    test_variant_binary,
};
pub use cgroup::TestCgroup;
pub use client::{Client, Outcome, Timings};
pub use config::ConfigFile;
pub use gate::Gate;
pub use metrics::{free_port, http_get, sample};
pub use pins::Pins;
pub use prober::{StopOnDrop, probe};
pub use sandbox::{IMDS_V4, IMDS_V6, MOCK_INSTANCE_ID, Sandbox};

use std::sync::atomic::{AtomicU32, Ordering};

/// The errno a denied connect or send fails with.
pub const EPERM: i32 = libc::EPERM;
/// `EACCES`: what a write refused by the message layer fails with.
pub const EACCES: i32 = libc::EACCES;

/// The block of `imds-client`'s `bulk-rounds`: it writes this many bytes, then waits for the
/// receiver's one-byte acknowledgement of them (the bench's block sink sends one per block).
pub const BULK_BLOCK_BYTES: usize = 64 << 20;

/// A sandbox and a new cgroup `tag` to attach to, or `None` where privileged tests cannot run
/// (see [`privileged`]).
#[must_use]
pub fn setup(tag: &str) -> Option<(Sandbox, TestCgroup)> {
    privileged().then(|| (Sandbox::new(), TestCgroup::new(tag)))
}

/// A name no other test (in this process or another) uses: `imdsg-<tag>-<pid>-<n>`.
#[must_use]
pub fn unique_name(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "imdsg-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether privileged tests can run here. Without root they are skipped, except under
/// `CI=true`, where that is a failure: CI must never pass by skipping them.
///
/// # Panics
/// Under `CI=true` when not root.
#[must_use]
pub fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "privileged end-to-end tests need root, and CI=true forbids skipping them"
    );
    eprintln!("skipped: privileged end-to-end tests need root (run `sudo cargo xtask test`)");
    false
}

/// Checks `event` has each `(key, value)`; on mismatch, panics with a field-by-field diff.
///
/// # Panics
/// When a field differs.
pub fn assert_fields(event: &serde_json::Value, expected: &[(&str, serde_json::Value)]) {
    let diff: Vec<String> = expected
        .iter()
        .filter(|(key, value)| &event[*key] != value)
        .map(|(key, value)| format!("  {key}: expected {value}, got {}", event[*key]))
        .collect();
    assert!(
        diff.is_empty(),
        "event differs:\n{}\nevent: {event}",
        diff.join("\n")
    );
}

/// Checks an event's `time` lies between `after` and `before`.
///
/// # Panics
/// When it is missing, malformed or outside the window.
pub fn assert_time_within(
    event: &serde_json::Value,
    after: jiff::Timestamp,
    before: jiff::Timestamp,
) {
    let time: jiff::Timestamp = event["time"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("event has no RFC 3339 time: {event}"));
    assert!(
        after <= time && time <= before,
        "event time {time} not within [{after}, {before}]"
    );
}

/// The verdict an event of a denied workload carries in `mode` (`enforce` or `audit`).
#[must_use]
pub fn verdict_in(mode: &str) -> serde_json::Value {
    serde_json::json!(if mode == "enforce" { "deny" } else { "audit" })
}
