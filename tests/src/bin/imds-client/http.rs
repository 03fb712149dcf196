//! HTTP conversations with IMDS for the message layer's tests: tokenless (IMDSv1) requests,
//! keep-alive connections with several requests, requests written in several pieces, and
//! several requests in one write.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use crate::TIMEOUT;

/// The token request's head.
const TOKEN_REQUEST: &str =
    "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n";

/// A tokenless GET of `path` on a fresh connection: the body of a 200, or an error.
pub fn v1(addr: SocketAddr, path: &str) -> io::Result<String> {
    crate::http(addr, &format!("GET {path} HTTP/1.1\r\n"))
}

/// A token, then a GET of `path` with it.
pub fn v2(addr: SocketAddr, path: &str) -> io::Result<String> {
    let token = crate::http(addr, TOKEN_REQUEST)?;
    crate::http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\n"),
    )
}

/// The IMDSv2 flow as the AWS SDKs and curl send it: each request in one write (`v2` writes
/// each in a dozen pieces, as Rust's `write!` on an unbuffered stream does).
pub fn sdk_v2(addr: SocketAddr, path: &str) -> io::Result<String> {
    let token = in_one_write(addr, TOKEN_REQUEST)?;
    in_one_write(
        addr,
        &format!("GET {path} HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\n"),
    )
}

/// One request on a fresh connection, written whole in one `write`: the body of a 200, or an
/// error.
fn in_one_write(addr: SocketAddr, head: &str) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let request = format!("{head}Host: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    body_of(&response)
}

/// The IMDSv2 flow, its GET's last byte sent as urgent data (`MSG_OOB`; the mock keeps urgent
/// data in the stream): the response's status code, or what came instead (`timeout`).
pub fn urgent_v2(addr: SocketAddr, path: &str) -> io::Result<String> {
    let token = crate::http(addr, TOKEN_REQUEST)?;
    let request =
        format!("GET {path} HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\nHost: {addr}\r\n\r\n");
    let (head, last) = request.as_bytes().split_at(request.len() - 1);
    let socket = socket2::Socket::from(TcpStream::connect_timeout(&addr, TIMEOUT)?);
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send(head)?;
    socket.send_out_of_band(last)?;
    Ok(
        match read_response(&mut BufReader::new(TcpStream::from(socket))) {
            Ok((status, _)) => status.to_string(),
            Err(err) => errno_name(&err),
        },
    )
}

/// A tokenless GET of `path` sent with TCP Fast Open (`sendto` with `MSG_FASTOPEN`): in the SYN
/// when the namespace sends data without a cookie (`net.ipv4.tcp_fastopen` with 4), else right
/// after the handshake, both before the connection is established. The body is the response's
/// status code, or what came instead (`timeout` when nothing did).
///
/// With `routing_header` (IPv6 only), the socket first asks for a segment routing header whose
/// one segment is `addr` itself (`IPV6_RTHDR`, which needs no privilege): its packets then carry
/// an extension header before the TCP header.
pub fn fastopen(addr: SocketAddr, path: &str, routing_header: bool) -> io::Result<String> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // A send that waits for the handshake (its SYN dropped) gives up as a read does.
    socket.set_write_timeout(Some(TIMEOUT))?;
    if routing_header {
        let SocketAddr::V6(v6) = addr else {
            return Err(io::Error::other("a routing header needs an IPv6 address"));
        };
        // `struct ipv6_sr_hdr`: next header (the kernel's), length in 8-byte units past the
        // first 8, type 4 (segment routing), segments left 0, last entry 0, flags, tag; then
        // the one segment.
        let mut header = vec![0u8, 2, 4, 0, 0, 0, 0, 0];
        header.extend_from_slice(&v6.ip().octets());
        crate::routes::set_option(&socket, libc::IPPROTO_IPV6, libc::IPV6_RTHDR, &header)?;
    }
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    socket.send_to_with_flags(request.as_bytes(), &addr.into(), libc::MSG_FASTOPEN)?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(TIMEOUT))?;
    Ok(match read_response(&mut BufReader::new(stream)) {
        Ok((status, _)) => status.to_string(),
        Err(err) => errno_name(&err),
    })
}

/// One keep-alive connection: a token request, a v2 GET of `path`, a v1 GET of `path`, and a
/// v2 GET again. The body lists what each got: its status code, or `EACCES` (and nothing
/// after) when its write failed; a read that times out is `timeout`.
pub fn keepalive(addr: SocketAddr, path: &str) -> io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut seen = Vec::new();
    let mut token = String::new();
    for step in 0..4 {
        let head = match step {
            0 => TOKEN_REQUEST.to_owned(),
            2 => format!("GET {path} HTTP/1.1\r\n"),
            _ => format!("GET {path} HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\n"),
        };
        if let Err(err) = write!(writer, "{head}Host: {addr}\r\n\r\n") {
            seen.push(errno_name(&err));
            break;
        }
        match read_response(&mut reader) {
            Ok((status, body)) => {
                if step == 0 {
                    token = body;
                }
                seen.push(status.to_string());
            }
            Err(err) => {
                seen.push(errno_name(&err));
                break;
            }
        }
    }
    Ok(seen.join(" "))
}

/// A GET of `path` written in pieces, 20 ms apart (each its own `sendmsg`): the request line
/// cut inside the path, and a header name cut in two and written in mixed case. With `token`,
/// after a token request; without, tokenless.
pub fn split(addr: SocketAddr, path: &str, token: bool) -> io::Result<String> {
    let token = if token {
        Some(crate::http(addr, TOKEN_REQUEST)?)
    } else {
        None
    };
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let (start, rest) = path.split_at(path.len() / 2);
    let mut pieces = vec![
        format!("GET {start}"),
        format!("{rest} HTTP/1.1\r\nHost: {addr}\r\nX-aws-EC2-meta"),
    ];
    match &token {
        Some(token) => pieces.push(format!("dATA-ToKeN: {token}\r\nConnection: close\r\n\r\n")),
        None => pieces.push("dATA-Other: 1\r\nConnection: close\r\n\r\n".to_owned()),
    }
    for piece in pieces {
        stream.write_all(piece.as_bytes())?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    body_of(&response)
}

/// A GET of `path` in one write whose 1,000-byte `User-Agent` header comes before the token
/// header (with `token`, after a token request) or another header: the message program reads a
/// write in chunks, so the header that decides is several runs in.
pub fn long(addr: SocketAddr, path: &str, token: bool) -> io::Result<String> {
    let last = if token {
        format!(
            "X-aws-ec2-metadata-token: {}",
            crate::http(addr, TOKEN_REQUEST)?
        )
    } else {
        "X-aws-ec2-metadata-other: 1".to_owned()
    };
    let agent = "a".repeat(1000);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: {agent}\r\n{last}\r\n\
         Connection: close\r\n\r\n"
    );
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    body_of(&response)
}

/// Two v2 GETs in one write: of `/latest/meta-data/instance-id`, then of `path`. The body is
/// the responses' statuses, or `EACCES` where the write failed.
pub fn pipelined(addr: SocketAddr, path: &str) -> io::Result<String> {
    let token = crate::http(addr, TOKEN_REQUEST)?;
    pipelined_after(addr, path, &token, "")
}

/// [`pipelined`] eight times, the first request one byte longer each time (an `X-Pad` header
/// of 0 to 7 bytes), so that the byte ending it falls on every place of the eight bytes the
/// kernel reads at a time. The body is each time's statuses, separated by commas.
pub fn pipelined_padded(addr: SocketAddr, path: &str) -> io::Result<String> {
    let token = crate::http(addr, TOKEN_REQUEST)?;
    let seen: Vec<String> = (0..8)
        .map(|pad| pipelined_after(addr, path, &token, &"p".repeat(pad)))
        .collect::<io::Result<_>>()?;
    Ok(seen.join(","))
}

/// Two v2 GETs in one write, the first with an `X-Pad: {pad}` header.
fn pipelined_after(addr: SocketAddr, path: &str, token: &str, pad: &str) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let both = format!(
        "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: {addr}\r\nX-Pad: {pad}\r\n\
         X-aws-ec2-metadata-token: {token}\r\n\r\n\
         GET {path} HTTP/1.1\r\nHost: {addr}\r\nX-aws-ec2-metadata-token: {token}\r\n\
         Connection: close\r\n\r\n"
    );
    let mut seen = Vec::new();
    if let Err(err) = stream.write_all(both.as_bytes()) {
        seen.push(errno_name(&err));
    }
    let mut reader = BufReader::new(stream);
    while let Ok((status, _)) = read_response(&mut reader) {
        seen.push(status.to_string());
    }
    Ok(seen.join(" "))
}

/// One response: its status code and body.
fn read_response(reader: &mut BufReader<TcpStream>) -> io::Result<(u16, String)> {
    let mut status_line = String::new();
    if reader.read_line(&mut status_line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The body of a whole 200 response, or an error naming the status.
pub fn body_of(response: &str) -> io::Result<String> {
    let (status, body) = response.split_once("\r\n\r\n").unwrap_or((response, ""));
    if status.starts_with("HTTP/1.1 200") {
        Ok(body.to_owned())
    } else {
        Err(io::Error::other(format!(
            "HTTP error: {}",
            status.lines().next().unwrap_or("")
        )))
    }
}

fn errno_name(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::EAGAIN) => "timeout".into(),
        Some(errno) => format!("errno{errno}"),
        None => err.kind().to_string(),
    }
}

/// The v2 flow on a connection to IMDS itself (port 80 of `addr`'s family: followed by the
/// message layer), then, on the same socket, disconnected (`connect(AF_UNSPEC)`) and connected
/// to `addr` (a NAT's way to IMDS) for a tokenless GET of `path` there: its body, or an error.
pub fn reconnect_nat(addr: SocketAddr, path: &str) -> io::Result<String> {
    use std::os::fd::AsRawFd as _;
    let imds = SocketAddr::new(crate::imds_of_family(addr), 80);
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.connect_timeout(&imds.into(), TIMEOUT)?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream.try_clone()?;
    write!(writer, "{TOKEN_REQUEST}Host: {imds}\r\n\r\n")?;
    let (_, token) = read_response(&mut reader)?;
    write!(
        writer,
        "GET {path} HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\nHost: {imds}\r\n\r\n"
    )?;
    let (status, _) = read_response(&mut reader)?;
    if status != 200 {
        return Err(io::Error::other(format!("v2 on IMDS itself: {status}")));
    }
    let family = libc::sa_family_t::try_from(libc::AF_UNSPEC).expect("AF_UNSPEC");
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr>()).expect("a size");
    // SAFETY: an `AF_UNSPEC` address, zeroed otherwise, on the stream's own descriptor.
    let disconnected = unsafe {
        let mut unspec: libc::sockaddr = std::mem::zeroed();
        unspec.sa_family = family;
        libc::connect(stream.as_raw_fd(), &raw const unspec, len)
    };
    if disconnected != 0 {
        return Err(io::Error::last_os_error());
    }
    drop(reader);
    let socket = socket2::Socket::from(stream);
    socket.connect_timeout(&addr.into(), TIMEOUT)?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    write!(writer, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    match read_response(&mut reader)? {
        (200, body) => Ok(body),
        (status, _) => Err(io::Error::other(format!("HTTP error: {status}"))),
    }
}
