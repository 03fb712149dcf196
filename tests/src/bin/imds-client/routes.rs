//! Less polite ways to reach an address than `connect()`: each returns what the kernel said.

use std::{io, net::SocketAddr, os::fd::AsRawFd as _};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const REQUEST: &[u8] = b"GET /latest/meta-data/ HTTP/1.0\r\n\r\n";

/// `setsockopt(socket, level, name, value)`: an option socket2 does not offer, its value as
/// the kernel reads it (a `c_int`'s native bytes, or a header's).
pub fn set_option(
    socket: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(value.len()).map_err(io::Error::other)?;
    // SAFETY: a valid descriptor and a buffer of the length given.
    let result =
        unsafe { libc::setsockopt(socket.as_raw_fd(), level, name, value.as_ptr().cast(), len) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `connect()` on a non-blocking TCP socket: `EINPROGRESS` means the SYN went out.
pub fn nonblocking_connect(addr: SocketAddr) -> io::Result<String> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => Ok("connected".into()),
        Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => Ok("in progress".into()),
        Err(err) => Err(err),
    }
}

/// TCP Fast Open without `connect()`: `sendto(..., MSG_FASTOPEN, addr)` connects and sends.
pub fn fastopen_sendto(addr: SocketAddr) -> io::Result<String> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.send_to_with_flags(REQUEST, &addr.into(), libc::MSG_FASTOPEN)?;
    Ok("sent".into())
}

/// TCP Fast Open through the `TCP_FASTOPEN_CONNECT` socket option, then `connect()`.
pub fn fastopen_connect(addr: SocketAddr) -> io::Result<String> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    let on: libc::c_int = 1;
    set_option(
        &socket,
        libc::IPPROTO_TCP,
        libc::TCP_FASTOPEN_CONNECT,
        &on.to_ne_bytes(),
    )?;
    socket.connect(&addr.into())?;
    socket.send(REQUEST)?;
    Ok("sent".into())
}

/// `connect()` on a UDP socket, then `send()` without an address.
pub fn connected_udp(addr: SocketAddr) -> io::Result<String> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.connect(&addr.into())?;
    socket.send(b"ping")?;
    Ok("sent".into())
}

/// [`connected_udp`] with IPv4 options in each datagram's header (`IP_OPTIONS`, which needs no
/// privilege for these: three no-operations and an end of list), so that its header is 24
/// bytes, not 20, and its UDP header 4 bytes further in.
pub fn connected_udp_ip_options(addr: SocketAddr) -> io::Result<String> {
    const OPTIONS: [u8; 4] = [1, 1, 1, 0];
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    set_option(&socket, libc::IPPROTO_IP, libc::IP_OPTIONS, &OPTIONS)?;
    socket.connect(&addr.into())?;
    socket.send(b"ping")?;
    Ok("sent".into())
}

/// Three datagrams on one connected UDP socket: each send's outcome (`sent`, or the errno's
/// name), space-separated.
pub fn connected_udp_thrice(addr: SocketAddr) -> io::Result<String> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.connect(&addr.into())?;
    Ok(thrice(|| socket.send(b"ping")))
}

/// Three sends' outcomes (`sent`, or the errno's name), space-separated.
fn thrice(mut send: impl FnMut() -> io::Result<usize>) -> String {
    let outcomes: Vec<String> = (0..3)
        .map(|_| match send() {
            Ok(_) => "sent".to_owned(),
            Err(err) if err.raw_os_error() == Some(libc::EPERM) => "EPERM".to_owned(),
            Err(err) => err.to_string(),
        })
        .collect();
    outcomes.join(" ")
}

/// Three datagrams sent with an explicit address (`sendto()`) on a UDP socket connected to
/// another one (the discard port of the loopback address of `addr`'s family): each send's
/// outcome, as [`connected_udp_thrice`] gives them.
pub fn sendto_on_connected_udp(addr: SocketAddr) -> io::Result<String> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let elsewhere: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::LOCALHOST, 9).into()
    } else {
        (std::net::Ipv6Addr::LOCALHOST, 9).into()
    };
    socket.connect(&elsewhere.into())?;
    Ok(thrice(|| socket.send_to(b"ping", &addr.into())))
}

/// An ICMP echo request from an unprivileged echo socket (`SOCK_DGRAM` with `IPPROTO_ICMP` or
/// `IPPROTO_ICMPV6`; the netns's `net.ipv4.ping_group_range` must hold the gid): `sendto()`
/// with the address, which no socket address hook judges. "pong" when the reply comes.
pub fn ping_echo(addr: SocketAddr) -> io::Result<String> {
    let (protocol, echo_request) = if addr.is_ipv4() {
        (Protocol::ICMPV4, 8)
    } else {
        (Protocol::ICMPV6, 128)
    };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(protocol))?;
    socket.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    // Type, code, checksum and identifier (both filled in by the kernel), sequence, payload.
    let request = [echo_request, 0, 0, 0, 0, 0, 0, 1, b'p', b'i', b'n', b'g'];
    let target = SockAddr::from(SocketAddr::new(addr.ip(), 0));
    socket.send_to(&request, &target)?;
    let mut reply = [std::mem::MaybeUninit::<u8>::uninit(); 64];
    socket.recv(&mut reply)?;
    Ok("pong".into())
}

/// `connect()` on a UDP-Lite socket, then `send()`: UDP-Lite has no connect hook
/// (`udplite_prot` has no `pre_connect`) and a connected send skips `sendmsg4/6`.
pub fn udplite_connected(addr: SocketAddr) -> io::Result<String> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM,
        Some(Protocol::from(libc::IPPROTO_UDPLITE)),
    )?;
    socket.connect(&addr.into())?;
    socket.send(b"ping")?;
    Ok("sent".into())
}

/// A Multipath TCP connection (`IPPROTO_MPTCP`), whose subflows are kernel sockets, and a
/// request on it: "answered" when the mock replies.
pub fn mptcp_connect(addr: SocketAddr) -> io::Result<String> {
    use std::io::Read as _;
    const IPPROTO_MPTCP: libc::c_int = 262;
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(Protocol::from(IPPROTO_MPTCP)),
    )?;
    let timeout = std::time::Duration::from_secs(3);
    socket.set_read_timeout(Some(timeout))?;
    socket.connect_timeout(&addr.into(), timeout)?;
    socket.send(REQUEST)?;
    let mut stream = std::net::TcpStream::from(socket);
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    if response.is_empty() {
        return Err(io::Error::other("no answer"));
    }
    Ok("answered".into())
}

/// `sendmmsg()`: two datagrams to `addr` in one call.
pub fn sendmmsg(addr: SocketAddr) -> io::Result<String> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let target = SockAddr::from(addr);
    let mut payloads = [*b"ping", *b"pong"];
    let mut iovecs = payloads.each_mut().map(|payload| libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    });
    let mut messages = iovecs.each_mut().map(|iov| {
        // SAFETY: an all-zero mmsghdr is a valid empty message header.
        let mut message: libc::mmsghdr = unsafe { std::mem::zeroed() };
        message.msg_hdr.msg_name = target.as_ptr().cast_mut().cast();
        message.msg_hdr.msg_namelen = target.len();
        message.msg_hdr.msg_iov = std::ptr::from_mut(iov);
        message.msg_hdr.msg_iovlen = 1;
        message
    });
    // SAFETY: the headers point at `target`, `iovecs` and `payloads`, all alive for the call.
    let sent = unsafe { libc::sendmmsg(socket.as_raw_fd(), messages.as_mut_ptr(), 2, 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(format!("sent {sent}"))
}

/// `IORING_OP_CONNECT`: the connect is made by `io_uring`, inline or (`force_async`) by an io-wq
/// worker thread.
pub fn io_uring_connect(addr: SocketAddr, force_async: bool) -> io::Result<String> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    let target = SockAddr::from(addr);
    let mut entry = io_uring::opcode::Connect::new(
        io_uring::types::Fd(socket.as_raw_fd()),
        target.as_ptr().cast(),
        target.len(),
    )
    .build();
    if force_async {
        entry = entry.flags(io_uring::squeue::Flags::ASYNC);
    }
    complete(&entry).map(|_| "connected".into())
}

/// `IORING_OP_SENDMSG`: an unconnected datagram sent by `io_uring`.
pub fn io_uring_sendmsg(addr: SocketAddr) -> io::Result<String> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let target = SockAddr::from(addr);
    let mut payload = *b"ping";
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_name = target.as_ptr().cast_mut().cast();
    message.msg_namelen = target.len();
    message.msg_iov = &raw mut iov;
    message.msg_iovlen = 1;
    let entry =
        io_uring::opcode::SendMsg::new(io_uring::types::Fd(socket.as_raw_fd()), &raw const message)
            .build();
    complete(&entry).map(|sent| format!("sent {sent}"))
}

/// Submits one entry and waits for its completion; its result, or the errno it carries.
fn complete(entry: &io_uring::squeue::Entry) -> io::Result<i32> {
    let mut ring = io_uring::IoUring::new(4)?;
    // SAFETY: everything the entry points at outlives the wait below.
    unsafe { ring.submission().push(entry) }.map_err(io::Error::other)?;
    ring.submit_and_wait(1)?;
    let result = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("no completion"))?
        .result();
    if result < 0 {
        Err(io::Error::from_raw_os_error(-result))
    } else {
        Ok(result)
    }
}

/// A TCP connect from a second thread of this process.
pub fn thread_connect(addr: SocketAddr) -> io::Result<String> {
    std::thread::spawn(move || tcp(addr))
        .join()
        .map_err(|_| io::Error::other("thread panicked"))?
}

/// A TCP connect from a forked child; returns the child's pid with what it got.
pub fn child_connect(addr: SocketAddr, drop_to: Option<(u32, u32)>) -> (u32, io::Result<String>) {
    // SAFETY: the child only makes system calls before `_exit`.
    match unsafe { libc::fork() } {
        0 => {
            if let Some((uid, gid)) = drop_to {
                // SAFETY: plain system calls in the child.
                let dropped = unsafe {
                    libc::setresgid(gid, gid, gid) == 0 && libc::setresuid(uid, uid, uid) == 0
                };
                if !dropped {
                    // SAFETY: as above.
                    unsafe { libc::_exit(254) };
                }
            }
            let code = match tcp(addr) {
                Ok(_) => 0,
                Err(err) => err.raw_os_error().unwrap_or(255),
            };
            // SAFETY: as above.
            unsafe { libc::_exit(code) };
        }
        -1 => (0, Err(io::Error::last_os_error())),
        child => {
            let mut status = 0;
            // SAFETY: waits for our own child.
            unsafe { libc::waitpid(child, &raw mut status, 0) };
            let pid = u32::try_from(child).unwrap_or(0);
            let code = libc::WEXITSTATUS(status);
            (
                pid,
                if code == 0 {
                    Ok("connected".into())
                } else {
                    Err(io::Error::from_raw_os_error(code))
                },
            )
        }
    }
}

fn tcp(addr: SocketAddr) -> io::Result<String> {
    std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))
        .map(|_| "connected".into())
}

/// A UDP datagram written whole by a raw socket (`SOCK_RAW`, `IPPROTO_UDP`: the kernel writes
/// the IP header, we write the UDP header), from the port of an ordinary UDP socket that then
/// reads the echo. Needs `CAP_NET_RAW`.
pub fn raw_udp(addr: SocketAddr) -> io::Result<String> {
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(io::Error::other)?;
    let receiver = std::net::UdpSocket::bind(local)?;
    receiver.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    let source_port = receiver.local_addr()?.port();
    let raw = Socket::new(Domain::for_address(addr), Type::RAW, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // IPv6 requires the UDP checksum: let the kernel compute it (offset 6 in our header).
        let offset: libc::c_int = 6;
        set_option(
            &raw,
            libc::IPPROTO_IPV6,
            libc::IPV6_CHECKSUM,
            &offset.to_ne_bytes(),
        )?;
    }
    let payload = b"ping";
    let length = u16::try_from(8 + payload.len()).map_err(io::Error::other)?;
    let mut datagram = Vec::with_capacity(usize::from(length));
    datagram.extend_from_slice(&source_port.to_be_bytes());
    datagram.extend_from_slice(&addr.port().to_be_bytes());
    datagram.extend_from_slice(&length.to_be_bytes());
    datagram.extend_from_slice(&[0, 0]); // no checksum (IPv4), or the kernel's (IPv6)
    datagram.extend_from_slice(payload);
    let mut target = addr;
    target.set_port(0); // raw sockets take the port from the header
    raw.send_to(&datagram, &target.into())?;
    let mut buf = [0u8; 64];
    let (n, _) = receiver.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A TCP SYN written by hand on a raw IPv4 socket with `IP_HDRINCL` (we write the IP header
/// too); the reply is read from a raw TCP socket. Succeeds when a SYN-ACK from `addr` comes
/// back. Needs `CAP_NET_RAW`.
pub fn raw_syn(addr: SocketAddr) -> io::Result<String> {
    let SocketAddr::V4(v4) = addr else {
        return Err(io::Error::other("raw-syn writes IPv4 headers"));
    };
    let listener = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
    listener.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    let sender = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )?;
    let source = std::net::Ipv4Addr::LOCALHOST;
    let source_port: u16 = 40_000 + u16::try_from(std::process::id() % 20_000).unwrap_or(0);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&source_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&v4.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4; // header length: 5 words
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&source.octets());
    pseudo.extend_from_slice(&v4.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let segment_checksum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&segment_checksum.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = 6; // TCP
    ip[12..16].copy_from_slice(&source.octets());
    ip[16..20].copy_from_slice(&v4.ip().octets());
    let header_checksum = checksum(&ip);
    ip[10..12].copy_from_slice(&header_checksum.to_be_bytes());
    let packet: Vec<u8> = ip.iter().chain(&tcp).copied().collect();
    sender.send_to(&packet, &SocketAddr::new(addr.ip(), 0).into())?;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 128];
    loop {
        let n = listener.recv(&mut buf)?;
        // SAFETY: `recv` initialised the first `n` bytes.
        let bytes: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        let header = usize::from(bytes.first().copied().unwrap_or(0) & 0x0f) * 4;
        let Some(segment) = bytes.get(header..header + 14) else {
            continue;
        };
        let (from_port, to_port) = (
            u16::from_be_bytes([segment[0], segment[1]]),
            u16::from_be_bytes([segment[2], segment[3]]),
        );
        if from_port == v4.port() && to_port == source_port && segment[13] & 0x12 == 0x12 {
            return Ok("syn-ack".into());
        }
    }
}

/// The Internet checksum of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0)
}

/// `SCM_RIGHTS`: this process (allowed) makes a TCP socket, connected first or not, and passes it
/// to a forked child that dropped to `drop_to`; the child connects it (or, if it came
/// connected, sends a request on it). Returns the child's pid and what it got.
pub fn passed_socket(
    addr: SocketAddr,
    connected: bool,
    drop_to: (u32, u32),
) -> (u32, io::Result<String>) {
    use std::os::fd::{AsFd as _, FromRawFd as _, OwnedFd};

    use nix::sys::socket::{
        AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
        sendmsg, socketpair,
    };

    let Ok((ours, theirs)) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    ) else {
        return (0, Err(io::Error::last_os_error()));
    };
    // SAFETY: the child only makes system calls before `_exit`.
    match unsafe { libc::fork() } {
        0 => {
            drop(ours);
            let (uid, gid) = drop_to;
            // SAFETY: plain system calls in the child.
            if unsafe { libc::setresgid(gid, gid, gid) != 0 || libc::setresuid(uid, uid, uid) != 0 }
            {
                // SAFETY: as above.
                unsafe { libc::_exit(254) };
            }
            let mut byte = [0u8; 1];
            let mut iov = [io::IoSliceMut::new(&mut byte)];
            let mut space = nix::cmsg_space!(std::os::fd::RawFd);
            let received = recvmsg::<()>(
                std::os::fd::AsRawFd::as_raw_fd(&theirs),
                &mut iov,
                Some(&mut space),
                MsgFlags::empty(),
            );
            let fd = received.ok().and_then(|message| {
                message.cmsgs().ok()?.find_map(|cmsg| match cmsg {
                    ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                    _ => None,
                })
            });
            let Some(fd) = fd else {
                // SAFETY: as above.
                unsafe { libc::_exit(253) };
            };
            // SAFETY: the kernel just gave us this descriptor.
            let socket = Socket::from(unsafe { OwnedFd::from_raw_fd(fd) });
            let result = if connected {
                socket.send(REQUEST).map(drop)
            } else {
                socket.connect(&addr.into())
            };
            let code = match result {
                Ok(()) => 0,
                Err(err) => err.raw_os_error().unwrap_or(255),
            };
            // SAFETY: as above.
            unsafe { libc::_exit(code) };
        }
        -1 => (0, Err(io::Error::last_os_error())),
        child => {
            drop(theirs);
            let pid = u32::try_from(child).unwrap_or(0);
            let sent = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
                .and_then(|socket| {
                    if connected {
                        socket.connect(&addr.into())?;
                    }
                    let fds = [std::os::fd::AsRawFd::as_raw_fd(&socket)];
                    sendmsg::<()>(
                        std::os::fd::AsRawFd::as_raw_fd(&ours.as_fd()),
                        &[io::IoSlice::new(b"x")],
                        &[ControlMessage::ScmRights(&fds)],
                        MsgFlags::empty(),
                        None,
                    )
                    .map_err(io::Error::from)?;
                    Ok(socket)
                });
            let mut status = 0;
            // SAFETY: waits for our own child.
            unsafe { libc::waitpid(child, &raw mut status, 0) };
            if let Err(err) = sent {
                return (pid, Err(err));
            }
            let code = libc::WEXITSTATUS(status);
            (
                pid,
                if code == 0 {
                    Ok(if connected {
                        "sent on the passed connection"
                    } else {
                        "connected"
                    }
                    .into())
                } else {
                    Err(io::Error::from_raw_os_error(code))
                },
            )
        }
    }
}

/// A blocking `connect()` then an abortive `close()` (`SO_LINGER` 0: a RST, so that tens of
/// thousands of connects leave no `TIME_WAIT` behind to collide with): the unit of the connect
/// benchmarks.
pub fn connect_close(addr: SocketAddr) -> io::Result<String> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.connect(&addr.into())?;
    socket.set_linger(Some(std::time::Duration::ZERO))?;
    Ok(String::new())
}

/// TCP connects to `addr`, every 100 µs, until one succeeds (or 30 s pass): how long a new
/// cgroup waits for its rules. Returns `first=NS allowed=NS`, the `CLOCK_MONOTONIC` times of the
/// first attempt and of the first that got through.
pub fn until_allowed(addr: SocketAddr) -> io::Result<String> {
    let now_ns = || {
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
    };
    let first = now_ns();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let attempt = now_ns();
        match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1)) {
            Ok(_) => return Ok(format!("first={first} allowed={attempt}")),
            Err(err) if std::time::Instant::now() > deadline => return Err(err),
            Err(_) => std::thread::sleep(std::time::Duration::from_micros(100)),
        }
    }
}

/// Bytes `bulk-send` writes.
const BULK_BYTES: usize = 1 << 30;

/// Writes 1 GiB on one connection as fast as it goes: the established-flow benchmark. Returns
/// the throughput in Gbit/s.
pub fn bulk_send(addr: SocketAddr) -> io::Result<String> {
    use std::io::Write as _;
    let mut stream = std::net::TcpStream::connect(addr)?;
    let chunk = vec![0x5au8; 1 << 20];
    let start = std::time::Instant::now();
    let mut sent = 0;
    while sent < BULK_BYTES {
        stream.write_all(&chunk)?;
        sent += chunk.len();
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut sink = [0u8; 1];
    let _ = io::Read::read(&mut stream, &mut sink);
    #[expect(clippy::cast_precision_loss, reason = "a rate for people")]
    let gbits = (sent * 8) as f64 / start.elapsed().as_secs_f64() / 1e9;
    Ok(format!("{gbits:.3}"))
}
