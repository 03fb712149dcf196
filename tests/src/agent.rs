use std::{
    io::{BufRead as _, BufReader, Read as _},
    os::unix::net::UnixDatagram,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use imds_guard::kernel::{maps, pins::PinDir};
use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::Value;

/// How long the agent may take to report readiness.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a test waits for an expected event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent binary under test: `$IMDS_GUARD_BIN`, or the `imds-guard` that
/// `cargo build -p imds-guard` put in this test's target directory.
///
/// # Panics
/// When it does not exist.
#[must_use]
pub fn agent_binary() -> PathBuf {
    target_binary("imds-guard", "IMDS_GUARD_BIN")
}

/// The second agent `cargo xtask test` builds: its kernel programs differ from the default's in
/// one padding byte (for upgrade tests) and spin up to 100 µs between reading the generation in
/// force and using it (for the switch race test).
///
/// # Panics
/// When it does not exist.
#[must_use]
pub fn test_variant_binary() -> PathBuf {
    target_binary("imds-guard-upgrade-variant", "IMDS_GUARD_VARIANT_BIN")
}

/// The third agent `cargo xtask test` builds: the verifier refuses its programs wherever they
/// read tasks, as a kernel that refuses those reads would.
///
/// # Panics
/// When it does not exist.
#[must_use]
pub fn refused_reads_variant_binary() -> PathBuf {
    target_binary(
        "imds-guard-refused-reads-variant",
        "IMDS_GUARD_REFUSED_READS_BIN",
    )
}

/// A binary of this workspace: `$env_var` if set, else `name` in the first ancestor directory
/// of the running executable that has it (`target/<profile>/` for `target/<profile>/deps/t`).
///
/// # Panics
/// When it does not exist.
#[must_use]
pub fn target_binary(name: &str, env_var: &str) -> PathBuf {
    let path = std::env::var_os(env_var).map_or_else(
        || {
            let exe = std::env::current_exe().expect("current exe");
            exe.ancestors()
                .skip(1)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
                .unwrap_or_else(|| PathBuf::from(name))
        },
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "{name} not found: run the tests with `cargo xtask test`, or build it first with \
         `cargo build --workspace` (or set {env_var})",
    );
    path
}

/// Gathers the JSON lines of `stdout` into `sink`, on a thread of its own.
fn collect_events(
    stdout: std::process::ChildStdout,
    sink: Arc<(Mutex<Vec<Value>>, Condvar)>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let value: Value = serde_json::from_str(&line)
                .unwrap_or_else(|err| panic!("agent printed a non-JSON line ({err}): {line}"));
            sink.0.lock().expect("events").push(value);
            sink.1.notify_all();
        }
    })
}

/// Gathers what `pipe` (the agent's stderr) says, on a thread of its own.
fn collect_log(mut pipe: std::process::ChildStderr) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&log);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .expect("stderr")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    log
}

/// A running `imds-guard run`, started with the given arguments; ready (programs attached)
/// once `start` returns. Its stdout events are collected as JSON values. Dropping it sends
/// SIGTERM (SIGKILL if it does not stop) to that one PID.
pub struct Agent {
    child: Child,
    stdout_reader: Option<std::thread::JoinHandle<()>>,
    events: Arc<(Mutex<Vec<Value>>, Condvar)>,
    stderr: Arc<Mutex<String>>,
    pid_file: PathBuf,
    /// Where its maps and links are pinned.
    pin_dir: PathBuf,
    _notify_dir: TempDir,
    /// Dropped after the agent has stopped (fields drop after `Drop::drop`).
    pins: Option<crate::Pins>,
}

impl Agent {
    /// Starts the agent and waits for `READY=1` on its `NOTIFY_SOCKET`.
    ///
    /// # Panics
    /// When it exits or stays silent instead; the panic shows its stderr.
    #[must_use]
    pub fn start(args: &[&str]) -> Self {
        Self::start_binary(&agent_binary(), args)
    }

    /// As [`Agent::start`], with another build of the agent (an upgrade).
    ///
    /// # Panics
    /// As [`Agent::start`].
    #[must_use]
    pub fn start_binary(binary: &std::path::Path, args: &[&str]) -> Self {
        Self::start_wrapped(&[], binary, args)
    }

    /// As [`Agent::start_binary`], run through `wrapper` (e.g. `setpriv ...` or `strace ...`).
    ///
    /// # Panics
    /// As [`Agent::start`].
    #[must_use]
    pub fn start_wrapped(wrapper: &[&str], binary: &std::path::Path, args: &[&str]) -> Self {
        Self::launch(wrapper, binary, args, true)
    }

    /// As [`Agent::start`], with its events written to `/dev/null` (none are kept): what the
    /// agent itself can report, whatever reads its output.
    ///
    /// # Panics
    /// As [`Agent::start`].
    #[must_use]
    pub fn start_discarding_events(args: &[&str]) -> Self {
        Self::launch(&[], &agent_binary(), args, false)
    }

    fn launch(
        wrapper: &[&str],
        binary: &std::path::Path,
        args: &[&str],
        keep_events: bool,
    ) -> Self {
        let notify_dir = TempDir::new();
        let socket_path = notify_dir.0.join("notify");
        let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let pid_file = notify_dir.0.join("agent.pid");
        let mut command = match wrapper {
            [] => Command::new(binary),
            [program, rest @ ..] => {
                let mut command = Command::new(program);
                command.args(rest).arg(binary);
                command
            }
        };
        command.arg("run").args(args);
        if !args.contains(&"--pid-file") {
            command.arg("--pid-file").arg(&pid_file);
        }
        // Tests count attempts by their events: every attempt on its own line, unless the test
        // is about folding repeats (and says how).
        if !args.contains(&"--aggregate-window") {
            command.args(["--aggregate-window", "0"]);
        }
        // Enforcement outlives the agent: unless the test manages the pins, they are this
        // agent's, removed after it stops.
        let pins = (!args.contains(&"--pin-dir")).then(crate::Pins::new);
        if let Some(pins) = &pins {
            command.arg("--pin-dir").arg(pins.dir());
        }
        let pin_dir = pins.as_ref().map_or_else(
            || {
                let at = args.iter().position(|&arg| arg == "--pin-dir");
                PathBuf::from(at.and_then(|at| args.get(at + 1)).copied().unwrap_or(""))
            },
            |pins| pins.dir().to_owned(),
        );
        let mut child = command
            .env("NOTIFY_SOCKET", &socket_path)
            // The loader says at debug level how much each program cost the verifier.
            .env("IMDS_GUARD_LOG", "info,imds_guard::kernel::load=debug")
            .stdin(Stdio::null())
            .stdout(if keep_events {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn imds-guard");

        let events = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stdout_reader = child
            .stdout
            .take()
            .map(|stdout| collect_events(stdout, Arc::clone(&events)));
        let stderr = collect_log(child.stderr.take().expect("stderr"));

        let mut agent = Self {
            child,
            stdout_reader,
            events,
            stderr,
            pid_file,
            pin_dir,
            _notify_dir: notify_dir,
            pins,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut buf = [0u8; 256];
        loop {
            if let Ok(n) = socket.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
            {
                if std::env::var_os("IMDS_GUARD_TEST_AGENT_OFF").is_some() {
                    switch_enforcement_off(&agent, args);
                }
                return agent;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!(
                    "imds-guard exited ({status}) before READY=1:\n{}",
                    agent.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "imds-guard not ready in time:\n{}",
                agent.stderr()
            );
        }
    }

    /// Its process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pid file it was started with (unless the test gave its own).
    #[must_use]
    pub fn pid_file(&self) -> &std::path::Path {
        &self.pid_file
    }

    /// Its maps, read through their pins as `status` reads them.
    #[must_use]
    pub fn maps(&self) -> maps::Pinned {
        maps::Pinned::new(&PinDir::new(&self.pin_dir))
    }

    /// `CGROUP_RULESETS` entries of the policy in force.
    ///
    /// # Panics
    /// When the pinned maps cannot be read, or the generation not in force has entries left
    /// (a switch that did not clean up after itself).
    #[must_use]
    pub fn cgroup_entries(&self) -> usize {
        self.entries_in_force().1
    }

    /// `ALLOW` entries of the policy in force.
    ///
    /// # Panics
    /// As [`Agent::cgroup_entries`].
    #[must_use]
    pub fn allow_entries(&self) -> usize {
        self.entries_in_force().0
    }

    fn entries_in_force(&self) -> (usize, usize) {
        let mut maps = self.maps();
        let generation = maps::generation_in_force(&mut maps).expect("GENERATION");
        let left = maps::entries_of(&mut maps, generation ^ 1).expect("ALLOW and CGROUP_RULESETS");
        assert_eq!(
            left,
            (0, 0),
            "(ALLOW, CGROUP_RULESETS) entries left in generation {}:\n{}",
            generation ^ 1,
            self.stderr()
        );
        maps::entries_of(&mut maps, generation).expect("ALLOW and CGROUP_RULESETS")
    }

    /// Waits until the agent's log holds `text` (logs arrive on their own thread).
    ///
    /// # Panics
    /// When it does not within 10 s.
    pub fn wait_log(&self, text: &str) {
        self.wait_log_count(text, 1);
    }

    /// Waits until the agent's log holds `text` `count` times.
    ///
    /// # Panics
    /// When it does not within 10 s.
    pub fn wait_log_count(&self, text: &str, count: usize) {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while self.stderr().matches(text).count() < count {
            assert!(
                Instant::now() < deadline,
                "the agent did not log {text:?} {count} times:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// What the agent wrote to stderr so far.
    ///
    /// # Panics
    /// When the stderr reader thread panicked.
    #[must_use]
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr").clone()
    }

    /// A figure of the line the agent logs when it stops: its own accounting of where every
    /// denied or audited attempt went (`events_reported`, `events_aggregated`,
    /// `repeats_unreported`), beside the kernel's counters (which [`Agent::counter`] reads).
    ///
    /// # Panics
    /// When it has not logged that line, or the line lacks `name`.
    #[must_use]
    pub fn final_figure(&self, name: &str) -> u64 {
        let stderr = self.stderr();
        let stopped = stderr
            .lines()
            .find(|l| l.contains("enforcement stays in force"))
            .unwrap_or_else(|| panic!("no final counters:\n{stderr}"));
        stopped
            .split(&format!(" {name}="))
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in: {stopped}"))
    }

    /// Waits until every event of an attempt made before this call has arrived: a later
    /// denied attempt (uid 65534 in `cgroup`, which no test allows) is made and its event
    /// awaited. The ring buffer is FIFO, so once it is in, every earlier event is too, and
    /// counting or ruling out events is exact.
    ///
    /// # Panics
    /// When the marker is not denied, or its event does not arrive in time.
    pub fn barrier(&self, sandbox: &crate::Sandbox, cgroup: &crate::TestCgroup) {
        let marker = crate::Client::new(sandbox, cgroup, 65534, 65534).tcp(crate::IMDS_V4, 80);
        marker.assert_errno(crate::EPERM);
        let _ = self.wait_events_of(marker.pid, 1);
    }

    /// `imds-guard status --json` for this agent's pins and pid file: what an operator sees.
    ///
    /// # Panics
    /// When the output is not JSON.
    #[must_use]
    pub fn status(&self) -> Value {
        let out = crate::imds_guard(&[
            "status",
            "--json",
            "--pin-dir",
            &self.pin_dir.to_string_lossy(),
            "--pid-file",
            &self.pid_file.to_string_lossy(),
        ]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
            panic!(
                "status --json printed no JSON ({err}):\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// One of the kernel's counters (`allowed`, `denied`, `audited`, `folded`, `events_lost`)
    /// as `status --json` reads it from the pinned maps, running or stopped.
    ///
    /// # Panics
    /// When the status has no such counter.
    #[must_use]
    pub fn counter(&self, name: &str) -> u64 {
        let status = self.status();
        status["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in {status}"))
    }

    /// Waits until the agent has taken `taken` reloads and refused `refused` in all, as
    /// `status` counts them.
    ///
    /// # Panics
    /// When it has not within 10 s, or has counted more.
    pub fn wait_reloads(&self, taken: usize, refused: usize) {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        let (taken, refused) = (taken as u64, refused as u64);
        loop {
            let status = self.status();
            let counts = (
                status["agent"]["reloads"].as_u64().unwrap_or(0),
                status["agent"]["failed_reloads"].as_u64().unwrap_or(0),
            );
            if counts == (taken, refused) {
                return;
            }
            assert!(
                counts.0 <= taken && counts.1 <= refused && Instant::now() < deadline,
                "expected {taken} reloads taken and {refused} refused: {status}\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every event received so far.
    ///
    /// # Panics
    /// When the stdout reader thread panicked (the agent printed a non-JSON line).
    #[must_use]
    pub fn events(&self) -> Vec<Value> {
        self.events.0.lock().expect("events").clone()
    }

    /// Events the packet layer (`hook` `egress`, which names no process) reported for
    /// `cgroup`, once the event of `barrier`, a later denied attempt, is in: the ring is FIFO.
    /// Aggregates of repeats are left out.
    ///
    /// # Panics
    /// When the barrier's event does not come.
    #[must_use]
    pub fn packet_events_in(
        &self,
        cgroup: &crate::TestCgroup,
        barrier: &crate::Outcome,
    ) -> Vec<Value> {
        let _ = self.wait_events_of(barrier.pid, 1);
        self.events()
            .into_iter()
            .filter(|event| {
                event["hook"] == "egress"
                    && event["cgroup"] == cgroup.path.as_str()
                    && event["aggregated"] == false
            })
            .collect()
    }

    /// Events from process `pid`.
    #[must_use]
    pub fn events_of(&self, pid: u32) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["tgid"] == pid)
            .collect()
    }

    /// Waits until `count` events from process `pid` have arrived and returns them.
    ///
    /// # Panics
    /// When they do not arrive in time; the panic lists what did arrive.
    #[must_use]
    pub fn wait_events_of(&self, pid: u32, count: usize) -> Vec<Value> {
        self.wait_events_of_within(pid, count, EVENT_TIMEOUT)
    }

    /// As [`Agent::wait_events_of`], waiting up to `timeout` (a flood takes a while to report).
    ///
    /// # Panics
    /// As [`Agent::wait_events_of`].
    #[must_use]
    pub fn wait_events_of_within(&self, pid: u32, count: usize, timeout: Duration) -> Vec<Value> {
        let (lock, arrived) = &*self.events;
        let deadline = Instant::now() + timeout;
        let mut events = lock.lock().expect("events");
        loop {
            let mine: Vec<Value> = events
                .iter()
                .filter(|e| e["tgid"] == pid)
                .cloned()
                .collect();
            if mine.len() >= count {
                return mine;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let all: Vec<String> = events.iter().map(Value::to_string).collect();
                // Unlocked first: a panic holding the lock would poison it for the reader.
                drop(events);
                panic!(
                    "expected {count} event(s) from pid {pid}, got {}; all events:\n{}\nagent stderr:\n{}",
                    mine.len(),
                    all.join("\n"),
                    self.stderr()
                );
            }
            events = arrived.wait_timeout(events, left).expect("events").0;
        }
    }

    /// Sends SIGTERM and waits for the agent to exit.
    ///
    /// # Panics
    /// When it does not exit within 10 s.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with(Signal::SIGTERM)
    }

    /// Runs `client` in a thread: `clients` workloads that hold a connection open at the gate
    /// it is given ([`crate::Client::hold_at`]). Once they are all there, writes each of
    /// `policies` to `config` in turn, each taken by a reload (SIGHUP), then opens the gate:
    /// what the workloads got across the reloads. The agent has taken no reload before.
    ///
    /// A workload that ends before the gate (its connect refused, say) is waited for no
    /// longer than 30 s; the reloads are made all the same, and its outcome says what happened.
    ///
    /// # Panics
    /// When the client panics or a reload is not taken in time.
    pub fn across_reloads<T: Send>(
        &self,
        config: &crate::ConfigFile,
        policies: &[&str],
        clients: usize,
        client: impl FnOnce(&crate::Gate) -> T + Send,
    ) -> T {
        let gate = crate::Gate::new();
        std::thread::scope(|scope| {
            let client = scope.spawn(|| client(&gate));
            if !gate.wait_for(clients, Duration::from_secs(30), || client.is_finished()) {
                eprintln!(
                    "{} of {clients} held workload(s) reached the gate; reloading all the same",
                    gate.arrived()
                );
            }
            for (round, policy) in policies.iter().enumerate() {
                config.write(policy);
                self.signal(Signal::SIGHUP);
                self.wait_reloads(round + 1, 0);
            }
            gate.open();
            client.join().expect("client")
        })
    }

    /// Sends `signal` to the agent without waiting (`SIGSTOP`/`SIGCONT` to freeze and thaw it).
    ///
    /// # Panics
    /// When the signal cannot be sent (the agent is gone).
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, signal).expect("signal the agent");
    }

    /// Sends `signal` and waits for the agent to exit and for its last events to be read.
    ///
    /// # Panics
    /// When it does not exit within 10 s.
    pub fn stop_with(&mut self, signal: Signal) -> ExitStatus {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, signal);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait agent") {
                if let Some(reader) = self.stdout_reader.take() {
                    reader.join().expect("stdout reader");
                }
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("imds-guard ignored {signal}:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `IMDS_GUARD_TEST_AGENT_OFF=1`: every agent the tests start is left running, but its
/// programs are detached at once, to show that the tests fail without the protection.
fn switch_enforcement_off(agent: &Agent, args: &[&str]) {
    let pin_dir = args
        .iter()
        .position(|arg| *arg == "--pin-dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .or_else(|| agent.pins.as_ref().map(|pins| pins.dir().to_owned()))
        .expect("the agent's pin directory");
    for entry in std::fs::read_dir(pin_dir.join("links"))
        .expect("links")
        .flatten()
    {
        if let Ok(Some(link)) = imds_guard::kernel::sys::open_pinned(&entry.path()) {
            imds_guard::kernel::sys::link_detach(link.as_fd_borrowed()).expect("detach");
        }
    }
    eprintln!("IMDS_GUARD_TEST_AGENT_OFF: the agent runs, its programs are detached");
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
            let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
            for _ in 0..500 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A private temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(crate::unique_name("tmp"));
        std::fs::create_dir(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `imds-guard` with `args` to completion (for commands expected to fail at once),
/// behind `wrapper` (e.g. `setpriv ...`) when it is not empty.
///
/// # Panics
/// When it cannot be started.
#[must_use]
pub fn run_to_end(wrapper: &[&str], args: &[&str]) -> (ExitStatus, String) {
    let agent = agent_binary();
    let mut command = match wrapper {
        [] => Command::new(&agent),
        [program, wrapper_args @ ..] => {
            let mut command = Command::new(program);
            command.args(wrapper_args).arg(&agent);
            command
        }
    };
    command.args(args);
    // An agent that starts when the test expected a refusal must still leave nothing behind:
    // it gets pins and a pid file of its own, removed when this returns.
    let pins = (args.first() == Some(&"run")).then(crate::Pins::new);
    if let Some(pins) = &pins {
        if !args.contains(&"--pin-dir") {
            command.arg("--pin-dir").arg(pins.dir());
        }
        if !args.contains(&"--pid-file") {
            command.arg("--pid-file").arg(pins.pid_file());
        }
    }
    let out = command
        .stdin(Stdio::null())
        .output()
        .expect("run imds-guard");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `imds-guard ARGS...` (a command other than `run`) to the end and returns what it did.
///
/// # Panics
/// When it cannot be started.
#[must_use]
pub fn imds_guard(args: &[&str]) -> std::process::Output {
    Command::new(agent_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run imds-guard")
}
