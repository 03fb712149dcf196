//! imds-guard: only the workloads you name reach the EC2 instance metadata service.
//!
//! The data flows one way: [`config`] → [`policy`] → [`ebpf`] maps → kernel verdicts →
//! [`events`] → JSON lines, driven by [`agent`].

pub mod agent;
pub mod aggregate;
pub mod btf;
pub mod cgroups;
pub mod cli;
pub mod commands;
pub mod compile;
pub mod config;
pub mod ebpf;
pub mod enrich;
pub mod error;
pub mod events;
pub mod metrics;
pub mod mounts;
pub mod pidfile;
pub mod pins;
pub mod policy;
pub mod report;
pub mod status;
pub mod tree;
pub mod workload;
