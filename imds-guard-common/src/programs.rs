//! The programs in the kernel object, by name: what the agent loads, attaches and pins (one
//! link per program, named after it), each named after its attach point.

/// `cgroup/connect4`: IPv4 `connect()`.
pub const CONNECT4: &str = "connect4";
/// `cgroup/connect6`: IPv6 `connect()`.
pub const CONNECT6: &str = "connect6";
/// `cgroup/sendmsg4`: IPv4 datagrams sent to an address.
pub const SENDMSG4: &str = "sendmsg4";
/// `cgroup/sendmsg6`: IPv6 datagrams sent to an address.
pub const SENDMSG6: &str = "sendmsg6";
/// `cgroup_skb/egress`: packets of raw sockets, which the socket address hooks never see.
pub const EGRESS: &str = "egress";

/// Every program the agent attaches, in the order it attaches them.
pub const ALL: [&str; 5] = [CONNECT4, CONNECT6, SENDMSG4, SENDMSG6, EGRESS];
