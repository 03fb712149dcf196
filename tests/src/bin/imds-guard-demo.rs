//! `cargo xtask demo`: imds-guard at work in a sandbox of its own, in a few seconds.
//!
//! A network namespace with a mock IMDS on 169.254.169.254 and `fd00:ec2::254`, a cgroup of its
//! own, the agent attached there with the default policy (enforce, allow uid 0 on the host), one
//! request as root, one as root in a container's namespaces, one as an unprivileged uid, a loop of denied connects folded into one event with a
//! count, a destination rewritten to IMDS by NAT in the namespace (refused at the packet layer),
//! and `imds-guard report` on what the agent printed. Everything is removed on the way out.

use std::time::Instant;

use imds_guard_tests::{Agent, Client, IMDS_V4, IMDS_V6, Pins, Sandbox, TestCgroup, agent_binary};

const NOBODY: u32 = 65534;

fn main() -> std::process::ExitCode {
    let sandbox = Sandbox::new();
    let cgroup = TestCgroup::new("demo");
    println!(
        "sandbox: network namespace {} with a mock IMDS, cgroup {}",
        sandbox.name, cgroup.path
    );
    // Pins and pid file of the demo's own, so nothing clashes with a real installation.
    let pins = Pins::new();
    let pid_file = pins.pid_file().to_string_lossy().into_owned();
    println!(
        "\n$ {} run --cgroup {} --pin-dir {} --pid-file {pid_file} --aggregate-window 10",
        agent_binary().display(),
        cgroup.path,
        pins.arg()
    );
    let started = Instant::now();
    let mut agent = Agent::start(&[
        "--cgroup",
        &cgroup.path,
        "--pin-dir",
        &pins.arg(),
        "--pid-file",
        &pid_file,
        "--aggregate-window",
        "10",
    ]);
    println!(
        "  enforcing after {} ms (default policy: enforce, allow uid 0 on the host, never in a \
         container)",
        started.elapsed().as_millis()
    );

    println!("\n1. root asks IMDS for a token, then the instance id (IMDSv2):");
    let started = Instant::now();
    let root = Client::new(&sandbox, &cgroup, 0, 0).imds(IMDS_V4, 80);
    match root.errno {
        None => println!(
            "   allowed: {:?} ({} ms)",
            root.detail,
            started.elapsed().as_millis()
        ),
        Some(_) => println!("   unexpectedly refused: {}", root.detail),
    }

    if !container_root(&sandbox, &cgroup, &agent) {
        return std::process::ExitCode::FAILURE;
    }

    for (step, addr) in [(3, std::net::IpAddr::from(IMDS_V4)), (4, IMDS_V6.into())] {
        println!("\n{step}. uid {NOBODY} (nobody) tries the same at {addr}:");
        // It lingers a second after its attempt, as a service would: the agent then finds its
        // executable and command line too.
        let denied = Client::new(&sandbox, &cgroup, NOBODY, NOBODY)
            .linger(1)
            .timings(0)
            .imds(addr, 80);
        // How long the attempt took, as the client measured it (without the lingering).
        let elapsed = denied.timings.map_or(0, |t| t.elapsed_ns / 1_000_000);
        match denied.errno {
            Some(libc::EPERM) => println!(
                "   denied at once: {} ({elapsed} ms, no timeout)",
                denied.detail
            ),
            _ => println!("   unexpected outcome: {denied:?}"),
        }
        for event in agent.wait_events_of(denied.pid, 1) {
            println!("   event: {event}");
        }
    }

    let worker = cgroup.child("worker.service");
    println!(
        "\n5. uid {NOBODY} in {} loops: 1000 connects in a row.",
        worker.path
    );
    let flood = Client::new(&sandbox, &worker, NOBODY, NOBODY)
        .repeat(1000)
        .tcp(IMDS_V4, 80);
    println!(
        "   {} of 1000 denied; the first is reported at once, the kernel counts the repeats:",
        flood.eperm
    );
    for event in agent.wait_events_of(flood.pid, 1) {
        println!("   event: {event}");
    }

    if !rewritten_to_imds(&sandbox, &cgroup, &agent) {
        return std::process::ExitCode::FAILURE;
    }

    println!(
        "\nstopping the agent (SIGTERM): it reports the repeats still counted; enforcement stays \
         pinned in the kernel; the demo then runs `imds-guard detach --pin-dir {}` and removes \
         its sandbox",
        pins.arg()
    );
    let status = agent.stop();
    if !status.success() {
        eprintln!("agent exited with {status}:\n{}", agent.stderr());
        return std::process::ExitCode::FAILURE;
    }
    for event in agent.events_of(flood.pid).iter().skip(1) {
        println!("   event: {event}");
    }
    if !report(&agent) {
        return std::process::ExitCode::FAILURE;
    }
    // Returning drops the guards: `Pins` detaches and unmounts, the sandbox and cgroup go.
    std::process::ExitCode::SUCCESS
}

/// Step 2: root in a container's namespaces is host uid 0, but not the host's root: the
/// default policy refuses it. Whether it did.
fn container_root(sandbox: &Sandbox, cgroup: &TestCgroup, agent: &Agent) -> bool {
    println!(
        "\n2. root in a container (new pid and cgroup namespaces, as Docker makes them) tries \
         the same:"
    );
    let container = Client::new(sandbox, cgroup, 0, 0)
        .namespaces("pid,cgroup")
        .imds(IMDS_V4, 80);
    if container.errno != Some(libc::EPERM) {
        println!("   unexpected outcome: {container:?}");
        return false;
    }
    println!(
        "   denied at once: {} (container root is host uid 0, but not the host's root)",
        container.detail
    );
    for event in agent.wait_events_of(container.pid, 1) {
        println!("   event: {event}");
    }
    true
}

/// Step 6: NAT in the workload's own namespace rewrites a harmless destination to IMDS after
/// the socket hooks judged it; the packet layer refuses it all the same. Whether it did.
fn rewritten_to_imds(sandbox: &Sandbox, cgroup: &TestCgroup, agent: &Agent) -> bool {
    let workload = cgroup.child("rewriter");
    println!(
        "\n6. a workload with CAP_NET_ADMIN in its own network namespace rewrites 127.0.0.1:5353 \
         to IMDS:\n   $ iptables -t nat -A OUTPUT -p udp -d 127.0.0.1 --dport 5353 -j DNAT \
         --to-destination 169.254.169.254:53"
    );
    sandbox.dnat("iptables", "udp", "127.0.0.1", 5353, "169.254.169.254:53");
    println!(
        "   then uid {NOBODY} in {} sends a datagram to 127.0.0.1:5353:",
        workload.path
    );
    let rewritten = Client::new(sandbox, &workload, NOBODY, NOBODY).route(
        "connected-udp",
        std::net::Ipv4Addr::LOCALHOST,
        5353,
    );
    if rewritten.errno != Some(libc::EPERM) {
        println!("   unexpected outcome: {rewritten:?}");
        return false;
    }
    println!(
        "   denied at once, after the rewrite: {} (the packet layer judged the packet)",
        rewritten.detail
    );
    // A packet event names no process: a denied connect from the same cgroup marks the point
    // by which it is in (the ring is FIFO).
    let marker = Client::new(sandbox, &workload, NOBODY, NOBODY).tcp(IMDS_V4, 80);
    for event in agent.packet_events_in(&workload, &marker) {
        println!("   event: {event}");
    }
    true
}

/// `imds-guard report` on the events the agent printed; whether it succeeded.
fn report(agent: &Agent) -> bool {
    let events: Vec<String> = agent.events().iter().map(ToString::to_string).collect();
    println!("\n$ imds-guard report < events.jsonl");
    let child = std::process::Command::new(agent_binary())
        .args(["report", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn();
    let status = child.and_then(|mut child| {
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, (events.join("\n") + "\n").as_bytes())?;
        }
        child.wait()
    });
    match status {
        Ok(status) if status.success() => true,
        Ok(status) => {
            eprintln!("imds-guard report exited with {status}");
            false
        }
        Err(err) => {
            eprintln!("cannot run imds-guard report: {err}");
            false
        }
    }
}
