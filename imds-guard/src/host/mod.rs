//! What the agent reads of the host: the cgroup hierarchy and its changes, what a cgroup's path
//! says about its workload, `/proc` (the mount table, processes), the clocks, the pid file, and
//! the instance's IMDS settings (its posture).

pub mod cgroups;
pub mod clock;
pub mod follow;
pub mod pidfile;
pub mod posture;
pub mod procfs;
pub mod workload;
