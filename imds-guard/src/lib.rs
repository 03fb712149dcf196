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
//! - [`policy`]: the config resolved against this host, and compiled into map entries.
//! - [`host`]: the cgroup hierarchy and its changes, workloads by cgroup path, mounts, clocks.
//! - [`kernel`]: the embedded programs, loaded, attached and pinned, and their maps.
//! - [`events`]: what the programs report, decoded, enriched and folded.
//! - [`agent`]: `imds-guard run`, which drives all of the above, and its metrics.
//! - [`commands`]: the operator's other commands.

pub mod agent;
pub mod cli;
pub mod commands;
pub mod config;
pub mod error;
pub mod events;
pub mod host;
pub mod kernel;
pub mod policy;
