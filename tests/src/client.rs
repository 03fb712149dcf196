use std::{net::IpAddr, process::Command};

use serde_json::Value;

use crate::{Sandbox, TestCgroup};

/// A workload identity and place: who connects, from which cgroup.
pub struct Client<'a> {
    sandbox: &'a Sandbox,
    cgroup: &'a TestCgroup,
    uid: u32,
    gid: u32,
    repeat: u32,
    /// Extra `--option value` pairs (`--drop-to`, `--hosts`, `--move-to`).
    options: Vec<(&'static str, String)>,
    /// Another copy of the client to run.
    binary: Option<std::path::PathBuf>,
}

/// What a client saw.
#[derive(Debug)]
pub struct Outcome {
    /// The client's pid (and tgid: it is single-threaded).
    pub pid: u32,
    /// The errno of the failed call, `None` on success.
    pub errno: Option<i32>,
    /// The response body on success; the error text on failure.
    pub detail: String,
    /// How many attempts failed with `EPERM` (see [`Client::repeat`]).
    pub eperm: u32,
    /// With [`Client::move_to`]: whether the move into the other cgroup succeeded.
    pub moved: Option<bool>,
    /// With [`Client::timings`]: how long the attempts took.
    pub timings: Option<Timings>,
    /// With [`Client::alternate`]: each block's median attempt in nanoseconds, by cgroup
    /// (`[cgroup][round]`).
    pub blocks: Option<Vec<Vec<u64>>>,
}

/// Durations of repeated attempts, in nanoseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// Attempts timed.
    pub n: u64,
    /// 10th percentile.
    pub p10_ns: u64,
    /// Median.
    pub median_ns: u64,
    /// 90th percentile.
    pub p90_ns: u64,
    /// Wall time of all attempts (timed or not, warm-up excluded).
    pub elapsed_ns: u64,
}

impl Outcome {
    /// Succeeded with `body`.
    ///
    /// # Panics
    /// Otherwise.
    pub fn assert_ok(&self, body: &str) {
        assert_eq!(
            (self.errno, self.detail.as_str()),
            (None, body),
            "expected success: {self:?}"
        );
    }

    /// Failed with `errno`.
    ///
    /// # Panics
    /// Otherwise.
    pub fn assert_errno(&self, errno: i32) {
        assert_eq!(self.errno, Some(errno), "expected errno {errno}: {self:?}");
    }
}

impl<'a> Client<'a> {
    /// A client running as `uid`/`gid` in `cgroup`, inside `sandbox`'s network namespace.
    #[must_use]
    pub fn new(sandbox: &'a Sandbox, cgroup: &'a TestCgroup, uid: u32, gid: u32) -> Self {
        Self {
            sandbox,
            cgroup,
            uid,
            gid,
            repeat: 1,
            options: Vec::new(),
            binary: None,
        }
    }

    /// For the forking routes: the child drops to `uid` (and the same gid) before it acts.
    #[must_use]
    pub fn drop_to(mut self, uid: u32) -> Self {
        self.options.push(("--drop-to", uid.to_string()));
        self
    }

    /// Runs with `user` and `group` as its effective ids, its real ones those of [`Client::new`]
    /// (as a setuid or setgid program runs).
    #[must_use]
    pub fn effective(mut self, user: u32, group: u32) -> Self {
        self.options
            .push(("--effective", format!("{user}:{group}")));
        self
    }

    /// Resolves names through `hosts` in place of /etc/hosts.
    #[must_use]
    pub fn hosts(mut self, hosts: &std::path::Path) -> Self {
        self.options
            .push(("--hosts", hosts.to_string_lossy().into_owned()));
        self
    }

    /// After becoming its uid, the client tries to move itself into the cgroup at `dir`
    /// ([`Outcome::moved`] says whether the kernel let it).
    #[must_use]
    pub fn move_to(mut self, dir: &std::path::Path) -> Self {
        self.options
            .push(("--move-to", dir.to_string_lossy().into_owned()));
        self
    }

    /// Times each repeated attempt after `warmup` untimed ones ([`Outcome::timings`]).
    #[must_use]
    pub fn timings(mut self, warmup: u32) -> Self {
        self.options.push(("--timings", "yes".into()));
        self.options.push(("--warmup", warmup.to_string()));
        self
    }

    /// Instead of one run of the repeated attempts, `blocks` rounds of a block in each of
    /// `cgroups` in turn (the order rotating by one each round): the client moves into the
    /// cgroup, makes `warmup` untimed attempts, then times the repeated ones
    /// ([`Outcome::blocks`]: each block's median). One process for every arm, alternating every
    /// few milliseconds, so that the arms share its CPU, memory and the machine's drift.
    #[must_use]
    pub fn alternate(mut self, cgroups: &[&TestCgroup], blocks: usize, warmup: u32) -> Self {
        let dirs: Vec<String> = cgroups
            .iter()
            .map(|cgroup| cgroup.dir.to_string_lossy().into_owned())
            .collect();
        self.options.push(("--alternate", dirs.join(",")));
        self.options.push(("--blocks", blocks.to_string()));
        self.options.push(("--warmup", warmup.to_string()));
        self
    }

    /// With [`Client::alternate`]: every attempt is to be refused with `EPERM`, and is timed so
    /// (without it, a failed attempt ends the client).
    #[must_use]
    pub fn alternate_refused(mut self) -> Self {
        self.options.push(("--alternate-refused", "yes".into()));
        self
    }

    /// With [`Client::alternate`]: the port of each arm, in the order of its cgroups (the
    /// route's port is then not used).
    #[must_use]
    pub fn alternate_ports(mut self, ports: &[u16]) -> Self {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        self.options.push(("--alternate-ports", ports.join(",")));
        self
    }

    /// `route` to `host`, written as the C library resolves it (`2852039166`, a name).
    #[must_use]
    pub fn route_to_host(&self, route: &str, host: &str, port: u16) -> Outcome {
        self.run_text(route, host, port)
    }

    /// Makes each action run `times` times in the one process; [`Outcome`] reports the last
    /// attempt and counts the `EPERM`s.
    #[must_use]
    pub fn repeat(mut self, times: u32) -> Self {
        self.repeat = times;
        self
    }

    /// Spreads repeated attempts over `n` real uids from the client's on (switching back
    /// through saved uid 0 between attempts): distinct workloads, which the kernel cannot fold.
    #[must_use]
    pub fn uids(mut self, n: u32) -> Self {
        self.options.push(("--uids", n.to_string()));
        self
    }

    /// Makes the held routes (`held-imds`, `held-v1`, `reconnect-held`) wait at `gate` once
    /// their connection is open (or refused, for `reconnect-held`), and go on when it opens.
    #[must_use]
    pub fn hold_at(mut self, gate: &crate::Gate) -> Self {
        self.options
            .push(("--hold-at", gate.dir().to_string_lossy().into_owned()));
        self
    }

    /// Keeps the client alive `secs` seconds after its attempts, so that its `/proc` entry
    /// is there when the agent reads its events.
    #[must_use]
    pub fn linger(mut self, secs: u32) -> Self {
        self.options.push(("--linger", secs.to_string()));
        self
    }

    /// Runs the client in new namespaces, as a container runtime runs a container's processes:
    /// `"pid"`, `"cgroup"` or `"pid,cgroup"` (its cgroup as the new cgroup namespace's root).
    #[must_use]
    pub fn namespaces(mut self, kinds: &str) -> Self {
        self.options.push(("--namespaces", kinds.to_owned()));
        self
    }

    /// After its attempts, the client runs `sleep secs` in its place (`execve`): the process
    /// lives on, running another program.
    #[must_use]
    pub fn exec_sleep(mut self, secs: u32) -> Self {
        self.options.push(("--exec-sleep", secs.to_string()));
        self
    }

    /// Runs `binary` (a copy of `imds-client` under another name) in place of `imds-client`.
    #[must_use]
    pub fn binary(mut self, binary: &std::path::Path) -> Self {
        self.binary = Some(binary.to_owned());
        self
    }

    /// Spreads repeated attempts over `n` ports, from the one given on: distinct attempts,
    /// which the agent cannot fold into one.
    #[must_use]
    pub fn ports(mut self, n: u16) -> Self {
        self.options.push(("--ports", n.to_string()));
        self
    }

    /// Requests `path` in the HTTP conversations of the message layer's tests (see
    /// `http.rs` of `imds-client`).
    #[must_use]
    pub fn path(mut self, path: &str) -> Self {
        self.options.push(("--path", path.to_owned()));
        self
    }

    /// The `IMDSv2` flow (token, then instance id) against `addr:port`.
    #[must_use]
    pub fn imds(&self, addr: impl Into<IpAddr>, port: u16) -> Outcome {
        self.run("imds", addr.into(), port)
    }

    /// A TCP connect to `addr:port`, then close.
    #[must_use]
    pub fn tcp(&self, addr: impl Into<IpAddr>, port: u16) -> Outcome {
        self.run("tcp", addr.into(), port)
    }

    /// An unconnected UDP `sendto` to `addr:port` and its echo.
    #[must_use]
    pub fn udp(&self, addr: impl Into<IpAddr>, port: u16) -> Outcome {
        self.run("udp", addr.into(), port)
    }

    /// One of the client's other routes to `addr:port` (see `imds-client --help`), e.g.
    /// `fastopen-sendto` or `sendmmsg`.
    #[must_use]
    pub fn route(&self, route: &str, addr: impl Into<IpAddr>, port: u16) -> Outcome {
        self.run(route, addr.into(), port)
    }

    fn run(&self, action: &str, addr: IpAddr, port: u16) -> Outcome {
        self.run_text(action, &addr.to_string(), port)
    }

    fn run_text(&self, action: &str, host: &str, port: u16) -> Outcome {
        let mut command = Command::new(
            self.binary
                .clone()
                .unwrap_or_else(|| crate::agent::target_binary("imds-client", "IMDS_CLIENT_BIN")),
        );
        command
            .args(["--netns", &self.sandbox.netns.to_string_lossy()])
            .args(["--cgroup", &self.cgroup.dir.to_string_lossy()])
            .args([
                "--uid",
                &self.uid.to_string(),
                "--gid",
                &self.gid.to_string(),
            ])
            .args(["--repeat", &self.repeat.to_string()]);
        for (option, value) in &self.options {
            command.arg(option).arg(value);
        }
        let out = command
            .args([action, host, &port.to_string()])
            .output()
            .expect("run imds-client");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "imds-client failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let line: Value = serde_json::from_str(stdout.trim()).expect("imds-client output");
        Outcome {
            pid: u32::try_from(line["pid"].as_u64().expect("pid")).expect("pid"),
            errno: line["errno"]
                .as_i64()
                .map(|e| i32::try_from(e).expect("errno")),
            eperm: u32::try_from(line["eperm"].as_u64().expect("eperm")).expect("eperm"),
            moved: line["moved"].as_bool(),
            timings: line
                .get("timings")
                .filter(|t| !t.is_null())
                .map(|t| Timings {
                    n: t["n"].as_u64().unwrap_or(0),
                    p10_ns: t["p10_ns"].as_u64().unwrap_or(0),
                    median_ns: t["median_ns"].as_u64().unwrap_or(0),
                    p90_ns: t["p90_ns"].as_u64().unwrap_or(0),
                    elapsed_ns: t["elapsed_ns"].as_u64().unwrap_or(0),
                }),
            blocks: line.get("blocks").filter(|b| !b.is_null()).map(|blocks| {
                blocks
                    .as_array()
                    .expect("blocks by cgroup")
                    .iter()
                    .map(|arm| {
                        arm.as_array()
                            .expect("medians")
                            .iter()
                            .map(|ns| ns.as_u64().expect("nanoseconds"))
                            .collect()
                    })
                    .collect()
            }),
            detail: line["body"]
                .as_str()
                .or(line["error"].as_str())
                .unwrap_or("")
                .to_owned(),
        }
    }
}
