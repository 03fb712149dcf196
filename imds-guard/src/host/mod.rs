//! What the agent reads of the host: the cgroup hierarchy and its changes, what a cgroup's path
//! says about its workload, `/proc` (the mount table, processes), the clocks, the pid file, the
//! user and group databases, and the instance's IMDS settings (its posture).

pub mod cgroups;
pub mod clock;
pub mod follow;
pub mod pidfile;
pub mod posture;
pub mod procfs;
pub mod userdb;
pub mod workload;
