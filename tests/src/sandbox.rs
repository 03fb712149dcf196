use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use nix::sched::{CloneFlags, setns};

/// `169.254.169.254`.
pub const IMDS_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// `fd00:ec2::254`.
pub const IMDS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
/// What the mock IMDS answers for `/latest/meta-data/instance-id`.
pub const MOCK_INSTANCE_ID: &str = "i-0123456789abcdef0";
/// The session token the mock hands out.
const MOCK_TOKEN: &str = "AQAEAmockTokenForImdsGuardTests==";

/// A network namespace of our own with the IMDS addresses on its loopback and a mock IMDS
/// listening on every address there: TCP ports 80 and 8080 (HTTP, `IMDSv2` token flow) and UDP
/// port 53 (echo). Dropping it stops the mock and deletes the namespace.
pub struct Sandbox {
    /// The namespace's name (`ip netns`).
    pub name: String,
    /// Its file, for `setns`.
    pub netns: PathBuf,
    stop: Arc<AtomicBool>,
    /// How the mock answers.
    mock: Arc<Mock>,
    servers: Vec<JoinHandle<()>>,
}

impl Sandbox {
    /// Creates the namespace and starts the mock.
    ///
    /// # Panics
    /// When `ip` fails or a port cannot be bound.
    #[must_use]
    pub fn new() -> Self {
        let name = crate::unique_name("ns");
        ip(&["netns", "add", &name]);
        Self::serving_in(name)
    }

    /// As [`Sandbox::new`], in a namespace owned by a user namespace of its own that maps
    /// 65,536 ids from `outer` up to 0 up, as an unprivileged container (LXC, Podman) has: a
    /// socket of global uid `outer` there is uid 0 to the namespace (`bpf_get_socket_uid`).
    ///
    /// # Panics
    /// When `unshare`, writing the id maps or `ip` fails.
    #[must_use]
    pub fn in_user_namespace(outer: u32) -> Self {
        let name = crate::unique_name("usrns");
        // A process holds the new namespaces while their ids are mapped (by us, root in the
        // parent namespace: no `newuidmap` needed) and `ip netns attach` names the network one
        // (which keeps its user namespace alive); then it is no longer needed.
        let mut holder = Command::new("unshare")
            .args(["--user", "--net", "--", "sleep", "60"])
            .spawn()
            .expect("run unshare");
        let pid = holder.id();
        // Its user namespace is not ours once `unshare` made them (a link that cannot be read,
        // `unshare` having failed and exited, is no namespace made).
        let made = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/user"));
            let ours = std::fs::read_link("/proc/self/ns/user");
            matches!((theirs, ours), (Ok(theirs), Ok(ours)) if theirs != ours)
        });
        let map = format!("0 {outer} 65536\n");
        let mapped = made
            && std::fs::write(format!("/proc/{pid}/uid_map"), &map).is_ok()
            && std::fs::write(format!("/proc/{pid}/gid_map"), &map).is_ok();
        let named = mapped
            && Command::new("ip")
                .args(["netns", "attach", &name, &pid.to_string()])
                .status()
                .is_ok_and(|status| status.success());
        let _ = holder.kill();
        let _ = holder.wait();
        assert!(
            named,
            "a network namespace owned by a user namespace mapping 0 to {outer}: made {made}, \
             mapped {mapped}, attached {named}"
        );
        Self::serving_in(name)
    }

    /// The namespace `name` (in `/run/netns`), its loopback up with the IMDS addresses, and the
    /// mock serving there.
    fn serving_in(name: String) -> Self {
        let mut sandbox = Self {
            netns: PathBuf::from("/run/netns").join(&name),
            name,
            stop: Arc::new(AtomicBool::new(false)),
            mock: Arc::default(),
            servers: Vec::new(),
        };
        sandbox.ip_in(&["link", "set", "lo", "up"]);
        sandbox.ip_in(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
        sandbox.ip_in(&["addr", "add", "fd00:ec2::254/128", "dev", "lo", "nodad"]);
        for port in [80, 8080] {
            let listener = sandbox.within(|| TcpListener::bind(("::", port)));
            listener.set_nonblocking(true).expect("nonblocking");
            let stop = Arc::clone(&sandbox.stop);
            let mock = Arc::clone(&sandbox.mock);
            sandbox.servers.push(std::thread::spawn(move || {
                serve_http(&listener, &stop, &mock);
            }));
        }
        let socket = sandbox.within(|| UdpSocket::bind(("::", 53)));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let stop = Arc::clone(&sandbox.stop);
        sandbox
            .servers
            .push(std::thread::spawn(move || serve_udp_echo(&socket, &stop)));
        sandbox
    }

    /// Makes the mock answer tokenless (IMDSv1) GETs, as an instance with
    /// `HttpTokens=optional` does, or refuse them with 401, as `HttpTokens=required` does.
    pub fn answer_v1(&self, answer: bool) {
        self.mock.answers_v1.store(answer, Ordering::Relaxed);
    }

    /// Makes the mock send its token responses with this IP TTL (IPv6 hop limit), as IMDS
    /// does with `HttpPutResponseHopLimit`; 0 for the namespace's default.
    pub fn put_hop_limit(&self, limit: u8) {
        self.mock.put_hop_limit.store(limit, Ordering::Relaxed);
    }

    /// Stops the mock's HTTP servers (their ports then refuse connections).
    pub fn stop_http(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for server in self.servers.drain(..) {
            let _ = server.join();
        }
    }

    fn ip_in(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Runs `program` with `args` inside the namespace (`ip netns exec`): iptables rules and
    /// sysctls there are the namespace's own, and go with it.
    ///
    /// # Panics
    /// When the command fails.
    pub fn exec(&self, program: &str, args: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .expect("run ip netns exec");
        assert!(
            out.status.success(),
            "{program} {} in {}: {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// What a workload with `CAP_NET_ADMIN` in its own network namespace can do: rewrite
    /// `protocol` packets to `from:port` into `to` (`ADDR:PORT`, `[ADDR]:PORT` for IPv6) on
    /// the output path, after the socket hooks judged the destination (`tool`: `iptables` or
    /// `ip6tables`).
    ///
    /// # Panics
    /// When the rule is refused.
    pub fn dnat(&self, tool: &str, protocol: &str, from: &str, port: u16, to: &str) {
        self.exec(
            tool,
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                protocol,
                "-d",
                from,
                "--dport",
                &port.to_string(),
                "-j",
                "DNAT",
                "--to-destination",
                to,
            ],
        );
    }

    /// Runs `make` with a thread inside the namespace, so the sockets it creates live there.
    ///
    /// # Panics
    /// When the namespace cannot be entered or `make` fails.
    pub fn within<T>(&self, make: impl FnOnce() -> std::io::Result<T> + Send) -> T
    where
        T: Send,
    {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let netns = std::fs::File::open(&self.netns).expect("open netns");
                    setns(netns, CloneFlags::CLONE_NEWNET).expect("setns");
                    make().expect("socket in the sandbox")
                })
                .join()
                .expect("sandbox thread")
        })
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for server in self.servers.drain(..) {
            let _ = server.join();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("run ip (iproute2)");
    assert!(status.success(), "ip {} failed: {status}", args.join(" "));
}

/// How the mock IMDS answers.
#[derive(Debug, Default)]
struct Mock {
    /// Whether it answers a tokenless GET (`HttpTokens=optional`); off by default, as
    /// `HttpTokens=required` answers 401.
    answers_v1: AtomicBool,
    /// The IP TTL of its token responses (`HttpPutResponseHopLimit`); 0: the default.
    put_hop_limit: AtomicU8,
}

fn serve_http(listener: &TcpListener, stop: &AtomicBool, mock: &Arc<Mock>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                // A thread per connection: a client may keep one open for several requests.
                let mock = Arc::clone(mock);
                std::thread::spawn(move || {
                    let _ = respond(&stream, &mock);
                });
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                // Until the next connection (answered at once: the benchmarks time it), or
                // 50 ms, to see `stop`.
                let mut ready = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(listener),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid `pollfd`, for the duration of the call.
                unsafe { libc::poll(&raw mut ready, 1, 50) };
            }
            Err(_) => return,
        }
    }
}

/// `IMDSv2`: `PUT /latest/api/token` with a TTL header gives a token; a GET needs that token
/// (or, with `answers_v1`, none). Requests are answered in turn until the client closes, asks
/// `Connection: close`, or speaks HTTP/1.0. A GET of `/latest/meta-data/instance-id` answers the
/// mock's instance id; any other path under `/latest/` answers the path itself.
fn respond(stream: &TcpStream, mock: &Mock) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    // Urgent data stays in the stream (`SO_OOBINLINE`): a request whose last byte is sent as
    // urgent is whole here.
    nix::sys::socket::setsockopt(stream, nix::sys::socket::sockopt::OobInline, &true)?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                // Headers never ended: an incomplete request is never answered.
                return Ok(());
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let authorised = header("x-aws-ec2-metadata-token") == Some(MOCK_TOKEN)
            || (header("x-aws-ec2-metadata-token").is_none()
                && mock.answers_v1.load(Ordering::Relaxed));
        let (status, body) = match (method, path) {
            ("PUT", "/latest/api/token")
                if header("x-aws-ec2-metadata-token-ttl-seconds").is_some() =>
            {
                let limit = mock.put_hop_limit.load(Ordering::Relaxed);
                if limit != 0 {
                    set_hop_limit(stream, limit)?;
                }
                ("200 OK", MOCK_TOKEN.to_owned())
            }
            ("PUT", "/latest/api/token") => ("400 Bad Request", String::new()),
            ("GET", "/latest/meta-data/instance-id") if authorised => {
                ("200 OK", MOCK_INSTANCE_ID.to_owned())
            }
            ("GET", path) if path.starts_with("/latest/") && authorised => {
                ("200 OK", path.to_owned())
            }
            ("GET", path) if path.starts_with("/latest/") => ("401 Unauthorized", String::new()),
            _ => ("404 Not Found", String::new()),
        };
        // HTTP/1.1 keeps the connection unless asked not to; HTTP/1.0 closes it.
        let close = !request_line.trim_end().ends_with("HTTP/1.1")
            || header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let mut writer = stream;
        write!(
            writer,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if close { "close" } else { "keep-alive" }
        )?;
        if close {
            return Ok(());
        }
    }
}

/// Sends what follows on `stream` with IP TTL (and IPv6 hop limit) `limit`: the listener is
/// dual-stack, so an IPv4 client's connection is an IPv6 socket that sends IPv4 packets.
fn set_hop_limit(stream: &TcpStream, limit: u8) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let limit = i32::from(limit);
    setsockopt(stream, sockopt::Ipv6Ttl, &limit)?;
    setsockopt(stream, sockopt::Ipv4Ttl, &limit)?;
    Ok(())
}

fn serve_udp_echo(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    }
}
