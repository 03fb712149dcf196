//! imds-guard: only the workloads you name reach the EC2 instance metadata service.
//!
//! The data flows one way, and the modules are its stages:
//!
//! ```text
//! config ─parse, validate→ policy ─resolve, compile × the cgroup tree (host)→ kernel maps
//! kernel programs: attempt → verdict (allow / deny / audit) → event in a ring buffer + counters
//! events: ring buffer → decode → enrich (host: /proc, cgroup paths) → fold → JSON lines
//! ```
//!
//! - [`config`]: the TOML file and the command line, parsed and validated.
//! - [`policy`]: the config resolved against this host ([`policy::Policy`]), and compiled into
//!   map entries ([`policy::compile`]).
//! - [`host`]: the cgroup hierarchy and its changes, workloads by cgroup path, `/proc`
//!   ([`host::procfs`]), the clocks, the pid file.
//! - [`kernel`]: the embedded programs, loaded, attached and pinned; [`kernel::maps`] is the one
//!   place that knows each map's layout, [`kernel::sys`] the `bpf()` calls aya lacks.
//! - [`events`]: what the programs record, decoded, enriched, folded
//!   ([`events::accounting`] keeps every attempt accounted for) and written out.
//! - [`agent`]: `imds-guard run`: [`agent::enforcement`] keeps the policy in force,
//!   [`agent::serve`] runs the loop; its metrics.
//! - [`commands`]: the operator's other commands, one module each.
//! - [`migrate`]: iptables rules read, judged and translated into a config.
//! - [`error`]: the errors of each subsystem, and [`error::Error`], any of them.
//!
//! The decision itself, the rule-set walk and the first matching rule, is written once, in
//! `imds_guard_common::decide`: the programs run it on the maps, `explain` on the entries the
//! agent would write.

pub mod agent;
pub mod cli;
pub mod commands;
pub mod config;
pub mod error;
pub mod events;
pub mod host;
pub mod kernel;
pub mod migrate;
pub mod policy;
