//! Less polite ways to reach an address than `connect()`: each returns what the kernel said.

use std::{io, net::SocketAddr, os::fd::AsRawFd as _};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const REQUEST: &[u8] = b"GET /latest/meta-data/ HTTP/1.0\r\n\r\n";

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
    // SAFETY: a valid fd and a c_int option value of the right size.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN_CONNECT,
            (&raw const on).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>()).expect("size"),
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
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
