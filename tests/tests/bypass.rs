//! Adversarial routes to a protected address beyond a plain `connect()`. For each, as a denied
//! workload: in enforce mode the attempt fails with `EPERM` and is reported exactly once; in
//! audit mode it goes through and is reported exactly once. Root, allowed, takes the same
//! route to show that it really reaches the mock IMDS.

use std::net::IpAddr;

use imds_guard_tests::{Agent, Client, EPERM, IMDS_V4, IMDS_V6, setup};
use serde_json::json;

const USER: u32 = 1000;

/// A route, what judges it, and how many attempts it makes when nothing stops it.
struct Route {
    name: &'static str,
    protocol: &'static str,
    /// The hook that must judge it over IPv4 and over IPv6.
    hooks: [&'static str; 2],
    port: u16,
    /// Attempts when allowed: `sendmmsg` sends two datagrams, each judged on its own. In enforce
    /// mode the first refusal ends the call, so there is one.
    attempts: usize,
}

const ROUTES: &[Route] = &[
    Route {
        name: "nonblocking-connect",
        protocol: "tcp",
        hooks: ["connect4", "connect6"],
        port: 80,
        attempts: 1,
    },
    Route {
        name: "fastopen-sendto",
        protocol: "tcp",
        hooks: ["connect4", "connect6"],
        port: 80,
        attempts: 1,
    },
    Route {
        name: "fastopen-connect",
        protocol: "tcp",
        hooks: ["connect4", "connect6"],
        port: 80,
        attempts: 1,
    },
    Route {
        name: "connected-udp",
        protocol: "udp",
        hooks: ["connect4", "connect6"],
        port: 53,
        attempts: 1,
    },
    Route {
        name: "sendmmsg",
        protocol: "udp",
        hooks: ["sendmsg4", "sendmsg6"],
        port: 53,
        attempts: 2,
    },
    Route {
        name: "io-uring-connect",
        protocol: "tcp",
        hooks: ["connect4", "connect6"],
        port: 80,
        attempts: 1,
    },
    // The same from an io-wq worker thread: io_uring runs it outside the submitting task.
    Route {
        name: "io-uring-connect-async",
        protocol: "tcp",
        hooks: ["connect4", "connect6"],
        port: 80,
        attempts: 1,
    },
    Route {
        name: "io-uring-sendmsg",
        protocol: "udp",
        hooks: ["sendmsg4", "sendmsg6"],
        port: 53,
        attempts: 1,
    },
    Route {
        name: "thread-connect",
        protocol: "tcp",
        hooks: ["connect4", "connect6"],
        port: 80,
        attempts: 1,
    },
    Route {
        name: "child-connect",
        protocol: "tcp",
        hooks: ["connect4", "connect6"],
        port: 80,
        attempts: 1,
    },
];

fn run_routes(mode: &str) {
    let Some((sandbox, attach)) = setup("test") else {
        return;
    };
    let agent = Agent::start(&["--cgroup", &attach.path, "--mode", mode]);
    let denied = Client::new(&sandbox, &attach, USER, USER);
    let root = Client::new(&sandbox, &attach, 0, 0);
    let mut checked = Vec::new();
    for &Route {
        name: route,
        protocol,
        hooks,
        port,
        attempts,
    } in ROUTES
    {
        for (addr, hook) in [
            (IpAddr::from(IMDS_V4), hooks[0]),
            (IMDS_V6.into(), hooks[1]),
        ] {
            let outcome = root.route(route, addr, port);
            assert!(
                outcome.errno.is_none(),
                "{route} to {addr} fails even for root: {outcome:?}"
            );
            let outcome = denied.route(route, addr, port);
            match mode {
                "enforce" => assert_eq!(
                    outcome.errno,
                    Some(EPERM),
                    "{route} to {addr} was not refused: {outcome:?}"
                ),
                _ => assert!(
                    outcome.errno.is_none(),
                    "{route} to {addr} refused in audit: {outcome:?}"
                ),
            }
            let reports = if mode == "enforce" { 1 } else { attempts };
            checked.push((route, addr, hook, protocol, port, reports, outcome.pid));
        }
    }
    // A last denied attempt: once its event is in, every earlier one is (the ring is FIFO).
    let marker = denied.tcp(IMDS_V4, 80);
    let _ = agent.wait_events_of(marker.pid, 1);
    let verdict = if mode == "enforce" { "deny" } else { "audit" };
    for (route, addr, hook, protocol, port, reports, pid) in checked {
        // The routes' own attempts; a request a route then writes on an allowed connection is
        // the message layer's (`hook` `http`), tested in `http.rs`.
        let events: Vec<_> = (agent.events_of(pid).into_iter())
            .filter(|event| event["hook"] != "http")
            .collect();
        assert_eq!(
            events.len(),
            reports,
            "{route} to {addr}: one event per attempt: {events:?}"
        );
        for event in &events {
            imds_guard_tests::assert_fields(
                event,
                &[
                    ("verdict", json!(verdict)),
                    ("hook", json!(hook)),
                    ("protocol", json!(protocol)),
                    ("port", json!(port)),
                    ("dst", json!(addr.to_string())),
                    ("uid", json!(USER)),
                ],
            );
        }
    }
}

#[test]
fn other_routes_are_refused_and_reported_once_in_enforce_mode() {
    run_routes("enforce");
}

#[test]
fn other_routes_are_reported_once_in_audit_mode() {
    run_routes("audit");
}
