//! The instance's IMDS posture, asked of IMDS itself: does it still answer a tokenless (IMDSv1)
//! request (`HttpTokens=optional`, CIS AWS Foundations 5.6 fails), and what hop limit does it
//! put on the token's response (`HttpPutResponseHopLimit`: above 1, containers behind a bridge
//! get tokens too)?
//!
//! Two requests, as any IMDS client makes: a tokenless `GET /latest/meta-data/` (200: optional;
//! 401: required), and a token `PUT` whose response packets' IPv4 TTL is the hop limit (IMDS
//! sends them with TTL = hop limit, and the host is its first hop). The TTL is read from a copy
//! of those packets on a raw socket (root only; `null` otherwise), connected to the IMDS address
//! so that the kernel gives it nothing else; nothing is sent on it. A failed, refused or
//! timed-out request is `unknown`, never `required`.
//!
//! It sends traffic to IMDS: run it only on an instance, or in a network namespace with a mock.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use serde::Serialize;

/// IMDS's IPv4 address.
pub const IMDS_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// How long each request may take.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Whether IMDS requires session tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpTokens {
    /// A tokenless GET was answered: IMDSv1 works (CIS 5.6 fails).
    Optional,
    /// A tokenless GET was refused with 401: IMDSv2 only.
    Required,
    /// The check failed, was refused or timed out.
    Unknown,
}

impl HttpTokens {
    /// The name `posture` prints and the metric's label.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Optional => "optional",
            Self::Required => "required",
            Self::Unknown => "unknown",
        }
    }
}

/// What the check found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Posture {
    /// Whether IMDS requires tokens.
    pub http_tokens: HttpTokens,
    /// The token response's hop limit, when it could be read.
    pub hop_limit: Option<u8>,
    /// Why `http_tokens` is `unknown`, or `hop_limit` is `null`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// The tokenless request was refused by a policy (`EPERM`, `EACCES`): asking again soon
    /// would get the same.
    #[serde(skip)]
    pub refused_by_policy: bool,
}

/// Asks IMDS at `addr` (port 80), each request within `timeout`.
#[must_use]
pub fn check(addr: Ipv4Addr, timeout: Duration) -> Posture {
    let target = SocketAddrV4::new(addr, 80);
    let mut problems = Vec::new();
    let mut refused_by_policy = false;
    let http_tokens = match request(target, timeout, V1_REQUEST) {
        Ok((200, _)) => HttpTokens::Optional,
        Ok((401, _)) => HttpTokens::Required,
        Ok((status, _)) => {
            problems.push(format!("a tokenless GET was answered {status}"));
            HttpTokens::Unknown
        }
        Err(err) => {
            refused_by_policy = matches!(err.raw_os_error(), Some(libc::EPERM | libc::EACCES));
            problems.push(format!("a tokenless GET failed: {}", describe(&err)));
            HttpTokens::Unknown
        }
    };
    let hop_limit = if http_tokens == HttpTokens::Unknown {
        None
    } else {
        match hop_limit(target, timeout) {
            Ok(limit) => Some(limit),
            Err(err) => {
                problems.push(format!(
                    "the hop limit could not be read: {}",
                    describe(&err)
                ));
                None
            }
        }
    };
    Posture {
        http_tokens,
        hop_limit,
        problems,
        refused_by_policy,
    }
}

/// What a failed request says, with `EACCES`/`EPERM` named as what they are here.
fn describe(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::EPERM) => format!("{err} (a policy refused the connection)"),
        Some(libc::EACCES) => format!("{err} (a policy refused the request: imds = \"v2\"?)"),
        _ => err.to_string(),
    }
}

/// The tokenless request: IMDSv1.
const V1_REQUEST: &[u8] =
    b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n";
/// The token request, for the shortest token IMDS gives (one second); the token is dropped.
const TOKEN_REQUEST: &[u8] = b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n\
    X-aws-ec2-metadata-token-ttl-seconds: 1\r\nConnection: close\r\n\r\n";

/// Sends `head` to `target` and reads the response's status; returns it and the local port.
fn request(target: SocketAddrV4, timeout: Duration, head: &[u8]) -> io::Result<(u16, u16)> {
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(target), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(head)?;
    let local_port = stream.local_addr()?.port();
    let mut response = Vec::new();
    let mut buffer = [0u8; 512];
    // The status line is all this needs; the connection closes after the response.
    while !response.windows(2).any(|w| w == b"\r\n") && response.len() < 4096 {
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        response.extend_from_slice(&buffer[..read]);
    }
    let line = String::from_utf8_lossy(&response);
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "not an HTTP response: {:?}",
                    line.lines().next().unwrap_or("")
                ),
            )
        })?;
    Ok((status, local_port))
}

/// The TTL of the token response's packets, read on a raw socket while the token is asked for.
fn hop_limit(target: SocketAddrV4, timeout: Duration) -> io::Result<u8> {
    let raw = RawTcp::connected_to(*target.ip(), timeout).map_err(|err| {
        io::Error::new(
            err.kind(),
            format!("a raw socket to read it on (it needs CAP_NET_RAW): {err}"),
        )
    })?;
    let (status, port) = request(target, timeout, TOKEN_REQUEST)?;
    if status != 200 {
        return Err(io::Error::other(format!(
            "the token request was answered {status}"
        )));
    }
    raw.response_ttl(port, Instant::now() + timeout)
}

/// A raw IPv4 socket that receives a copy of each TCP packet from one address.
struct RawTcp(OwnedFd);

impl RawTcp {
    fn connected_to(addr: Ipv4Addr, timeout: Duration) -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_TCP,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let socket = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        let remote = libc::sockaddr_in {
            sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET is 2"),
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(addr).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: a valid `sockaddr_in` of its size. A connected raw socket receives only
        // packets from that address.
        let connected = unsafe {
            libc::connect(
                socket.0.as_raw_fd(),
                (&raw const remote).cast(),
                socklen::<libc::sockaddr_in>(),
            )
        };
        if connected < 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        };
        // SAFETY: a valid `timeval` of its size.
        let set = unsafe {
            libc::setsockopt(
                socket.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                socklen::<libc::timeval>(),
            )
        };
        if set < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(socket)
    }

    /// The TTL of the first packet with data from port 80 to `port`, read before `deadline`.
    fn response_ttl(&self, port: u16, deadline: Instant) -> io::Result<u8> {
        let mut packet = [0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: `packet` is writable for its length.
            let read = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    packet.as_mut_ptr().cast(),
                    packet.len(),
                    0,
                )
            };
            if read < 0 {
                return Err(io::Error::last_os_error());
            }
            let packet = &packet[..usize::try_from(read).unwrap_or(0)];
            if let Some(ttl) = response_ttl(packet, port) {
                return Ok(ttl);
            }
        }
        Err(io::Error::from(io::ErrorKind::TimedOut))
    }
}

/// The size of `T`, as the kernel takes it.
fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).expect("a socket option or address is small")
}

/// The TTL of `packet` (an IPv4 packet, from its header on) when it is a TCP segment with data
/// from port 80 to `port`.
fn response_ttl(packet: &[u8], port: u16) -> Option<u8> {
    let version_ihl = *packet.first()?;
    if version_ihl >> 4 != 4 {
        return None;
    }
    let ip_len = usize::from(version_ihl & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    let tcp = packet.get(ip_len..total.min(packet.len()))?;
    let source = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let destination = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let tcp_len = usize::from(*tcp.get(12)? >> 4) * 4;
    (source == 80 && destination == port && tcp.len() > tcp_len).then_some(packet[8])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP segment from port 80 to `port`, with `ttl` and `data`.
    fn segment(ttl: u8, port: u16, data: &[u8]) -> Vec<u8> {
        let total = u16::try_from(20 + 20 + data.len()).unwrap();
        let mut packet = vec![0x45, 0];
        packet.extend_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(&[0, 0, 0x40, 0, ttl, 6, 0, 0]);
        packet.extend_from_slice(&[169, 254, 169, 254, 10, 0, 0, 1]);
        packet.extend_from_slice(&80u16.to_be_bytes());
        packet.extend_from_slice(&port.to_be_bytes());
        packet.extend_from_slice(&[0; 8]);
        packet.extend_from_slice(&[0x50, 0x18, 0, 0, 0, 0, 0, 0]);
        packet.extend_from_slice(data);
        packet
    }

    #[test]
    fn reads_the_ttl_of_the_response_to_our_port_only() {
        assert_eq!(
            response_ttl(&segment(1, 40000, b"HTTP/1.1 200"), 40000),
            Some(1)
        );
        assert_eq!(response_ttl(&segment(2, 40000, b"x"), 40000), Some(2));
        // An ACK without data, another connection's response, a cut packet, IPv6.
        assert_eq!(response_ttl(&segment(1, 40000, b""), 40000), None);
        assert_eq!(response_ttl(&segment(1, 40001, b"x"), 40000), None);
        assert_eq!(response_ttl(&segment(1, 40000, b"x")[..30], 40000), None);
        let mut v6 = segment(1, 40000, b"x");
        v6[0] = 0x60;
        assert_eq!(response_ttl(&v6, 40000), None);
    }

    #[test]
    fn unknown_is_serialised_with_its_reasons_and_null_hop_limit() {
        let posture = Posture {
            http_tokens: HttpTokens::Unknown,
            hop_limit: None,
            problems: vec!["a tokenless GET failed: timed out".into()],
            refused_by_policy: false,
        };
        assert_eq!(
            serde_json::to_value(&posture).unwrap(),
            serde_json::json!({
                "http_tokens": "unknown",
                "hop_limit": null,
                "problems": ["a tokenless GET failed: timed out"],
            })
        );
    }
}
