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

/// `sockops`: puts established TCP connections to a protected address's HTTP port into
/// `HTTP_SOCKHASH`, so that the message program reads their writes.
pub const SOCK_OPS: &str = "sock_ops";
/// `sk_msg` on `HTTP_SOCKHASH`: classifies and judges each HTTP request. Attached to the map,
/// not to a cgroup (no link: the pinned map keeps it).
pub const HTTP_MSG: &str = "http_msg";

/// Every program the agent attaches to the cgroup (one pinned link each), in the order it
/// attaches them. The message program is attached to its map before these.
pub const ALL: [&str; 6] = [CONNECT4, CONNECT6, SENDMSG4, SENDMSG6, EGRESS, SOCK_OPS];
