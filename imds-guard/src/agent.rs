//! `imds-guard run`: settings → policy → maps → attached programs, then events until a signal.

use std::{
    collections::HashMap,
    io::{self, Write as _},
};

use aya::maps::{MapData, RingBuf};
use imds_guard_common::maps::EVENTS_RING_BYTES;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};

use crate::{
    cgroups::Hierarchy,
    cli::RunArgs,
    config::{Config, Setting},
    ebpf::{self, Kernel},
    error::{Error, Result},
    events::{self, Record},
    policy::Policy,
};

/// Cgroup paths remembered for events; cleared when it grows past this many entries.
const CGROUP_CACHE_ENTRIES: usize = 4096;
/// Records one drain takes from the ring at most: what the ring can hold at once (an 80-byte
/// event plus the 8-byte record header each). Bounded so a flood cannot starve signals, and
/// large enough that, the ring being FIFO, one drain takes everything present when it began.
const DRAIN_BATCH_RECORDS: usize =
    (EVENTS_RING_BYTES as usize).div_ceil(size_of::<imds_guard_common::event::Event>() + 8);
/// How often the agent checks the kernel's lost-event counter.
const LOSS_CHECK_INTERVAL_SECS: u64 = 10;

/// Runs the agent until SIGTERM or SIGINT.
///
/// Everything is validated and resolved before the first program is attached: bad settings,
/// missing capabilities or kernel features fail here with nothing changed on the host.
///
/// # Errors
/// Any [`Error`]; when it happens after attaching, the programs are detached on the way out.
pub fn run(args: &RunArgs) -> Result<()> {
    let config = Config::load(args.config.as_deref(), &args.overrides())?;
    let hierarchy = Hierarchy::discover()?;
    let attach = hierarchy.resolve(&config.attach.origin, &config.attach.value)?;
    let policy = Policy::resolve(&config, &hierarchy)?;
    ebpf::preflight()?;

    let mut kernel = Kernel::load()?;
    kernel.install(&policy)?;
    let events = kernel.take_events()?;
    kernel.attach(&attach)?;
    info!(
        cgroup = %attach.path,
        mode = %policy.mode,
        rules = policy.rules.len(),
        protected = ?policy.protect,
        "imds-guard is enforcing"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Runtime { source })?;
    let running = Running {
        args,
        attach: config.attach,
        failed_reloads: 0,
    };
    runtime.block_on(serve(kernel, events, policy, &hierarchy, running))
}

/// What the agent needs to re-read its settings while it runs.
struct Running<'a> {
    args: &'a RunArgs,
    /// Where the programs are attached: a reload cannot move them.
    attach: Setting<String>,
    failed_reloads: u64,
}

impl Running<'_> {
    /// Re-reads and validates the settings; on success the kernel switches to the new policy
    /// (see [`Kernel::switch_to`]) and its generation is returned with it. On any failure the
    /// policy in force stays, and the failure is logged and counted.
    fn reload(&mut self, kernel: &mut Kernel, hierarchy: &Hierarchy) -> Option<(u32, Policy)> {
        let result = Config::load(self.args.config.as_deref(), &self.args.overrides())
            .and_then(|config| {
                let policy = Policy::resolve(&config, hierarchy)?;
                Ok((config, policy))
            })
            .and_then(|(config, policy)| {
                let generation = kernel.switch_to(&policy)?;
                Ok((config, generation, policy))
            });
        match result {
            Ok((config, generation, policy)) => {
                if config.attach.value != self.attach.value {
                    warn!(
                        "the attach point stays {} until a restart ({} asks for {})",
                        self.attach.value, config.attach.origin, config.attach.value
                    );
                }
                info!(generation, mode = %policy.mode, rules = policy.rules.len(), "policy reloaded");
                Some((generation, policy))
            }
            Err(err) => {
                self.failed_reloads += 1;
                error!(
                    failed_reloads = self.failed_reloads,
                    "reload refused, the policy in force stays: {}",
                    crate::error::report(&err)
                );
                None
            }
        }
    }
}

/// Reports events until a signal, then detaches, drains what is left and reports counters.
async fn serve(
    mut kernel: Kernel,
    events: RingBuf<MapData>,
    policy: Policy,
    hierarchy: &Hierarchy,
    mut running: Running<'_>,
) -> Result<()> {
    let listen = |kind| signal(kind).map_err(|source| Error::Runtime { source });
    let mut sigterm = listen(SignalKind::terminate())?;
    let mut sigint = listen(SignalKind::interrupt())?;
    let mut sighup = listen(SignalKind::hangup())?;
    // SAFETY: the ring buffer owns its map descriptor, which stays open and unchanged until the
    // `AsyncFd` (and the ring inside it) is dropped.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }.map_err(|err| {
            Error::Events {
                source: err.into_parts().1,
            }
        })?;
    let mut reporter = Reporter::new(policy, hierarchy);

    // Programs attached, policy in the maps: only now may systemd start what depends on us.
    if let Err(err) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        warn!("could not notify systemd of readiness: {err}");
    }

    let mut loss_check =
        tokio::time::interval(std::time::Duration::from_secs(LOSS_CHECK_INTERVAL_SECS));
    let mut lost_so_far = 0;
    let outcome = loop {
        tokio::select! {
            _ = sigterm.recv() => break Ok("SIGTERM"),
            _ = sigint.recv() => break Ok("SIGINT"),
            _ = loss_check.tick() => warn_of_new_losses(&kernel, &mut lost_so_far),
            _ = sighup.recv() => {
                // Report what the current policies judged before a generation slot is reused:
                // one batch holds everything already in the ring, so this needs no loop.
                let _ = reporter.drain(ring.get_mut());
                if let Some((generation, policy)) = running.reload(&mut kernel, hierarchy) {
                    reporter.set_policy(generation, policy);
                }
            }
            ready = ring.readable_mut() => match ready {
                Ok(mut guard) => {
                    if reporter.drain(guard.get_inner_mut()) {
                        guard.clear_ready();
                    } else {
                        // More is waiting: let the runtime poll its drivers (signals, timers)
                        // before the next batch, or a flood would starve them.
                        drop(guard);
                        tokio::task::yield_now().await;
                    }
                }
                Err(source) => break Err(Error::Events { source }),
            },
        }
    };
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let detached = kernel.detach();
    // Events raised before the programs were detached are still in the ring: report them all
    // (none can arrive any more, so this ends).
    while !reporter.drain(ring.get_mut()) {}
    match kernel.counters() {
        Ok(counters) => info!(
            allowed = counters.allowed,
            denied = counters.denied,
            audited = counters.audited,
            events_lost = counters.events_lost,
            "detached"
        ),
        Err(err) => warn!("detached; counters unreadable: {err}"),
    }
    let signal = outcome?;
    detached?;
    info!("stopped on {signal}");
    Ok(())
}

/// Events the kernel could not queue are counted there; say so as soon as the count grows.
fn warn_of_new_losses(kernel: &Kernel, lost_so_far: &mut u64) {
    match kernel.counters() {
        Ok(counters) if counters.events_lost > *lost_so_far => {
            warn!(
                events_lost = counters.events_lost,
                "{} events did not fit in the ring buffer (verdicts stood; reports are missing)",
                counters.events_lost - *lost_so_far
            );
            *lost_so_far = counters.events_lost;
        }
        Ok(_) => {}
        Err(err) => warn!("cannot read the counters: {err}"),
    }
}

/// Turns ring-buffer records into JSON lines on stdout.
struct Reporter<'a> {
    /// The policy of each generation, to name the rule that decided an event.
    policies: [Option<Policy>; 2],
    hierarchy: &'a Hierarchy,
    cgroup_paths: HashMap<u64, Option<String>>,
    stdout_failed: bool,
}

impl<'a> Reporter<'a> {
    fn new(policy: Policy, hierarchy: &'a Hierarchy) -> Self {
        Self {
            policies: [Some(policy), None],
            hierarchy,
            cgroup_paths: HashMap::new(),
            stdout_failed: false,
        }
    }

    fn set_policy(&mut self, generation: u32, policy: Policy) {
        self.policies[usize::from(generation != 0)] = Some(policy);
    }

    fn rule_name(&self, generation: u8, rule: u32) -> &str {
        self.policies[usize::from(generation != 0)]
            .as_ref()
            .map_or("default", |policy| policy.rule_name(rule))
    }

    /// Reports the records in the ring, at most [`DRAIN_BATCH_RECORDS`], then flushes stdout
    /// once. Returns whether the ring is now empty.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> bool {
        let offset = events::boot_to_unix_ns().unwrap_or_else(|err| {
            warn!("cannot read the clocks ({err}): event times are since boot");
            0
        });
        let stdout = io::stdout();
        let mut out = io::BufWriter::new(stdout.lock());
        let mut empty = false;
        for _ in 0..DRAIN_BATCH_RECORDS {
            let Some(item) = ring.next() else {
                empty = true;
                break;
            };
            let event = match events::decode(&item) {
                Ok(event) => event,
                Err(err) => {
                    warn!("dropping a malformed event: {err}");
                    continue;
                }
            };
            drop(item);
            let cgroup = self.cgroup_path(event.raw.cgroup_id);
            let rule = self.rule_name(event.raw.generation, event.raw.rule);
            let record = Record::new(&event, offset, cgroup, rule);
            let written = serde_json::to_writer(&mut out, &record)
                .map_err(io::Error::from)
                .and_then(|()| out.write_all(b"\n"));
            self.note_output(written);
        }
        let flushed = out.flush();
        self.note_output(flushed);
        empty
    }

    fn cgroup_path(&mut self, id: u64) -> Option<String> {
        if self.cgroup_paths.len() >= CGROUP_CACHE_ENTRIES {
            self.cgroup_paths.clear();
        }
        self.cgroup_paths
            .entry(id)
            .or_insert_with(|| self.hierarchy.path_of(id))
            .clone()
    }

    /// Enforcement goes on when stdout fails; say so once, loudly.
    fn note_output(&mut self, result: io::Result<()>) {
        if let Err(err) = result
            && !self.stdout_failed
        {
            self.stdout_failed = true;
            error!("cannot write events to stdout ({err}); still enforcing, events are lost");
        }
    }
}
