//! `imds-guard run`: settings → policy → maps → attached programs, then events until a signal.

use std::{
    collections::HashMap,
    io::{self, Write as _},
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};

use crate::{
    cgroups::Hierarchy,
    cli::RunArgs,
    config::Config,
    ebpf::{self, Kernel},
    error::{Error, Result},
    events::{self, Record},
    policy::Policy,
};

/// Cgroup paths remembered for events; cleared when it grows past this many entries.
const CGROUP_CACHE_ENTRIES: usize = 4096;
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
    kernel.install(&policy.compile(0), 0)?;
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
    runtime.block_on(serve(kernel, events, &policy, &hierarchy))
}

/// Reports events until a signal, then detaches, drains what is left and reports counters.
async fn serve(
    mut kernel: Kernel,
    events: RingBuf<MapData>,
    policy: &Policy,
    hierarchy: &Hierarchy,
) -> Result<()> {
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|source| Error::Runtime { source })?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|source| Error::Runtime { source })?;
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
            ready = ring.readable_mut() => match ready {
                Ok(mut guard) => {
                    reporter.drain(guard.get_inner_mut());
                    guard.clear_ready();
                }
                Err(source) => break Err(Error::Events { source }),
            },
        }
    };
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let detached = kernel.detach();
    // Events raised before the programs were detached are still in the ring: report them.
    reporter.drain(ring.get_mut());
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
    policy: &'a Policy,
    hierarchy: &'a Hierarchy,
    cgroup_paths: HashMap<u64, Option<String>>,
    stdout_failed: bool,
}

impl<'a> Reporter<'a> {
    fn new(policy: &'a Policy, hierarchy: &'a Hierarchy) -> Self {
        Self {
            policy,
            hierarchy,
            cgroup_paths: HashMap::new(),
            stdout_failed: false,
        }
    }

    /// Reports every record in the ring, then flushes stdout once.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        let offset = events::boot_to_unix_ns().unwrap_or_else(|err| {
            warn!("cannot read the clocks ({err}): event times are since boot");
            0
        });
        let stdout = io::stdout();
        let mut out = io::BufWriter::new(stdout.lock());
        while let Some(item) = ring.next() {
            let event = match events::decode(&item) {
                Ok(event) => event,
                Err(err) => {
                    warn!("dropping a malformed event: {err}");
                    continue;
                }
            };
            drop(item);
            let cgroup = self.cgroup_path(event.raw.cgroup_id);
            let record = Record::new(
                &event,
                offset,
                cgroup,
                self.policy.rule_name(event.raw.rule),
            );
            let written = serde_json::to_writer(&mut out, &record)
                .map_err(io::Error::from)
                .and_then(|()| out.write_all(b"\n"));
            self.note_output(written);
        }
        let flushed = out.flush();
        self.note_output(flushed);
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
