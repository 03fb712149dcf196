//! The running agent: events reported and the cgroup tree followed until a signal, a reload
//! on SIGHUP, the metrics on request. Every policy switch (a reload, a rewrite after a failed
//! update) goes through `Running::switch_policy`, which keeps the one order that is safe:
//! report what the old policy judged, switch, retire the old generation's repeats.

use aya::maps::{MapData, RingBuf};
use imds_guard_common::agent::HEARTBEAT_INTERVAL_SECS;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

use super::{enforcement::Enforcement, metrics};
use crate::{
    error::{CgroupError, Error, EventsError, Result},
    events::reporter::Reporter,
    host::{
        follow::Watcher,
        pidfile::PidFile,
        posture::{self, Posture},
    },
    policy::Policy,
};

/// How often the agent reports the repeats the kernel folded whose window has closed.
const FOLDS_INTERVAL_MILLIS: u64 = 1000;
/// How long the loop lets events gather after it emptied the ring: the ring wakes it for the
/// next event whenever it has caught up, so under a flood it would wake (and poll everything
/// it waits on) for every few events; this way at most a thousand times a second, an event
/// reported a millisecond later at most.
const EVENTS_GATHER: std::time::Duration = std::time::Duration::from_millis(1);
/// How often the agent checks the kernel's lost-event counter.
const LOSS_CHECK_INTERVAL_SECS: u64 = 10;
/// How often the whole cgroup tree is scanned, in case a change notification was missed.
const RESYNC_INTERVAL_SECS: u64 = 30;
/// How often the instance's posture is checked (`posture = true`), after the check at start.
const POSTURE_INTERVAL: std::time::Duration = std::time::Duration::from_hours(1);
/// How soon a check that got no answer is tried again: the agent starts before the network is
/// up at boot, and an hour of `unknown` would hide the answer.
const POSTURE_RETRY: std::time::Duration = std::time::Duration::from_mins(1);

/// The agent's two halves, which every policy switch must change together.
pub struct Running<'a> {
    /// The policy in force and the cgroup tree.
    pub enforcement: Enforcement<'a>,
    /// The event output.
    pub reporter: Reporter,
}

impl Running<'_> {
    /// Switches to `policy`: what the policy in force judged is reported first (events and
    /// repeats name their rule by its number in its generation, whose slot the switch reuses),
    /// then the kernel switches, then the old generation's repeats are reported and its fold
    /// entries deleted.
    fn switch_policy(
        &mut self,
        ring: &mut RingBuf<MapData>,
        watcher: &mut Watcher,
        policy: Policy,
    ) -> Result<()> {
        self.reporter.before_switch(ring);
        self.enforcement.switch(watcher, policy)?;
        let compiled = self.enforcement.compiled();
        let generation = compiled.generation();
        self.reporter
            .set_policy(generation, compiled.policy.clone());
        self.reporter.retire(generation ^ 1);
        Ok(())
    }

    /// SIGHUP: the settings read again and, when valid, put in force. Returns the new
    /// `posture` setting when they were.
    fn reload(&mut self, ring: &mut RingBuf<MapData>, watcher: &mut Watcher) -> Option<bool> {
        let result = self.enforcement.read_policy().and_then(|(config, policy)| {
            self.switch_policy(ring, watcher, policy)?;
            Ok(config)
        });
        let posture = result.as_ref().ok().map(|config| config.posture);
        self.enforcement.reloaded(result);
        posture
    }

    /// The full scan: the maps rewritten whole when an update failed, else the tree scanned
    /// for what notifications missed.
    fn resync(&mut self, ring: &mut RingBuf<MapData>, watcher: &mut Watcher) {
        if !self.enforcement.maps_uncertain() {
            self.enforcement.rescan(watcher);
            return;
        }
        let policy = self.enforcement.policy().clone();
        match self.switch_policy(ring, watcher, policy) {
            Ok(()) => info!("policy maps rewritten whole after a failed update"),
            Err(err) => error!(
                "rewriting the policy maps failed (retrying at the next scan): {}",
                crate::error::report(&err)
            ),
        }
    }
}

/// What woke the loop.
enum Wake {
    Stop(&'static str),
    LossCheck,
    Heartbeat,
    Folds,
    Scrape(metrics::Scrape),
    Resync,
    Reload,
    /// The cgroup tree changed; `true` when notifications were lost and it must be rescanned.
    Cgroups(bool),
    /// Events were reported (the ring handler ran).
    Events,
    /// A posture check finished.
    Posture(Posture),
}

/// Reports events and follows the cgroup tree until a signal, then reports what is left. The
/// programs stay attached: enforcement outlives the agent.
///
/// # Errors
/// When a signal, the ring buffer or the cgroup watcher cannot be used.
pub async fn serve(
    mut running: Running<'_>,
    events: RingBuf<MapData>,
    watcher: Watcher,
    mut pid_file: PidFile,
    metrics_listener: Option<std::net::TcpListener>,
    posture: bool,
) -> Result<()> {
    let mut wakers = Wakers::new(events, watcher, metrics_listener, posture)?;
    running.enforcement.record(true);
    // SIGHUP is handled from here on: `imds-guard reload` may find us now.
    pid_file.publish()?;
    // Programs attached, policy in the maps: only now may systemd start what depends on us.
    if let Err(err) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        warn!("could not notify systemd of readiness: {err}");
    }
    let outcome = loop {
        match wakers.next(&mut running).await {
            Ok(Wake::Stop(signal)) => break Ok(signal),
            Ok(wake) => handle(
                &mut running,
                wake,
                wakers.ring.get_mut(),
                wakers.watcher.get_mut(),
                &wakers.posture_enabled,
            ),
            Err(err) => break Err(err),
        }
    };
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    running.reporter.finish(wakers.ring.get_mut());
    // One reading of the kernel's counters, after everything was reported: the figures of the
    // stop line add up.
    let counters = running.enforcement.counters();
    if let Ok(counters) = &counters {
        running.reporter.at_stop(counters.folded);
    }
    running
        .enforcement
        .stopped(counters.as_ref(), running.reporter.accounting());
    info!("stopped on {}", outcome?);
    Ok(())
}

/// Everything that wakes the agent: signals, timers, scrapes, events, cgroup changes.
struct Wakers {
    signals: Signals,
    timers: Timers,
    /// Scrapes from the metrics endpoint, when it serves.
    scrapes: Option<tokio::sync::mpsc::Receiver<metrics::Scrape>>,
    ring: AsyncFd<RingBuf<MapData>>,
    watcher: AsyncFd<Watcher>,
    /// Whether posture checks run (`posture`, changed by a reload).
    posture_enabled: watch::Sender<bool>,
    /// What they found.
    postures: mpsc::Receiver<Posture>,
}

impl Wakers {
    fn new(
        events: RingBuf<MapData>,
        watcher: Watcher,
        metrics_listener: Option<std::net::TcpListener>,
        posture: bool,
    ) -> Result<Self> {
        let scrapes = metrics_listener.map(|listener| {
            let (sender, scrapes) = mpsc::channel::<metrics::Scrape>(8);
            tokio::spawn(metrics::serve(listener, sender));
            scrapes
        });
        let (posture_enabled, enabled) = watch::channel(posture);
        let (found, postures) = mpsc::channel(1);
        tokio::spawn(check_posture(enabled, found));
        Ok(Self {
            signals: Signals::new()?,
            timers: Timers::new(),
            scrapes,
            posture_enabled,
            postures,
            ring: pollable(events, |source| EventsError::Ring { source }.into())?,
            watcher: pollable(watcher, |source| CgroupError::Watch { source }.into())?,
        })
    }

    /// Waits for the next thing to do. Events and cgroup changes are handled here, while their
    /// descriptor is known readable: reported, and followed in the maps.
    async fn next(&mut self, running: &mut Running<'_>) -> Result<Wake> {
        let scrape = async {
            match &mut self.scrapes {
                Some(scrapes) => scrapes.recv().await,
                None => std::future::pending().await,
            }
        };
        Ok(tokio::select! {
            _ = self.signals.term.recv() => Wake::Stop("SIGTERM"),
            _ = self.signals.int.recv() => Wake::Stop("SIGINT"),
            _ = self.signals.hup.recv() => Wake::Reload,
            _ = self.timers.loss_check.tick() => Wake::LossCheck,
            _ = self.timers.heartbeat.tick() => Wake::Heartbeat,
            _ = self.timers.folds.tick() => Wake::Folds,
            _ = self.timers.resync.tick() => Wake::Resync,
            Some(scrape) = scrape => Wake::Scrape(scrape),
            Some(posture) = self.postures.recv() => Wake::Posture(posture),
            ready = self.watcher.readable_mut() => {
                let mut guard = ready.map_err(|source| CgroupError::Watch { source })?;
                let changes = guard.get_inner_mut().changed();
                guard.clear_ready();
                let changes = changes.map_err(|source| CgroupError::Watch { source })?;
                Wake::Cgroups(running.enforcement.follow(guard.get_inner_mut(), &changes))
            }
            ready = self.ring.readable_mut() => {
                let mut guard = ready.map_err(|source| EventsError::Ring { source })?;
                if running.reporter.drain(guard.get_inner_mut()) {
                    guard.clear_ready();
                    drop(guard);
                    tokio::time::sleep(EVENTS_GATHER).await;
                } else {
                    // More is waiting: let the runtime poll its drivers (signals, timers)
                    // before the next batch, or a flood would starve them.
                    drop(guard);
                    tokio::task::yield_now().await;
                }
                Wake::Events
            }
        })
    }
}

/// Does what `wake` asks.
fn handle(
    running: &mut Running<'_>,
    wake: Wake,
    ring: &mut RingBuf<MapData>,
    watcher: &mut Watcher,
    posture_enabled: &watch::Sender<bool>,
) {
    match wake {
        Wake::Stop(_) | Wake::Events | Wake::Cgroups(false) => {}
        Wake::LossCheck => {
            running.enforcement.warn_of_new_losses();
            running.reporter.warn_of_new_unreported();
        }
        Wake::Heartbeat => running.enforcement.record(true),
        Wake::Folds => {
            let folded = running.enforcement.folded_total();
            running.reporter.report_folds(folded, false);
        }
        Wake::Scrape(scrape) => {
            let _ = scrape.send(running.enforcement.scrape(running.reporter.accounting()));
        }
        Wake::Resync | Wake::Cgroups(true) => running.resync(ring, watcher),
        Wake::Reload => {
            if let Some(posture) = running.reload(ring, watcher) {
                // Turned on: a check at once; off: none from now on, and the last one's answer
                // is no longer shown as current.
                let changed = posture_enabled
                    .send_if_modified(|enabled| std::mem::replace(enabled, posture) != posture);
                if changed && !posture {
                    running.enforcement.clear_posture();
                }
            }
        }
        Wake::Posture(posture) => {
            // A check that was under way when `posture` was turned off is not shown.
            if *posture_enabled.borrow() {
                running.enforcement.set_posture(posture);
            }
        }
    }
}

/// Checks the instance's posture while `enabled` says so: at once, then every
/// [`POSTURE_INTERVAL`] ([`POSTURE_RETRY`] after no answer), and at once again when turned
/// back on. The check blocks (two HTTP
/// requests, each within `posture::TIMEOUT`), so it runs on a blocking thread, never in the
/// agent's loop. Ends when the agent's loop is gone.
async fn check_posture(mut enabled: watch::Receiver<bool>, found: mpsc::Sender<Posture>) {
    loop {
        if !*enabled.borrow_and_update() {
            if enabled.changed().await.is_err() {
                return;
            }
            continue;
        }
        let checked =
            tokio::task::spawn_blocking(|| posture::check(posture::IMDS_ADDR, posture::TIMEOUT))
                .await;
        let next = match checked {
            Ok(posture) => {
                // No answer: soon again, unless a policy refused it (it would again).
                let answered = posture.http_tokens != posture::HttpTokens::Unknown
                    || posture.refused_by_policy;
                if found.send(posture).await.is_err() {
                    return;
                }
                if answered {
                    POSTURE_INTERVAL
                } else {
                    POSTURE_RETRY
                }
            }
            Err(err) => {
                warn!("the posture check failed: {err}");
                POSTURE_RETRY
            }
        };
        tokio::select! {
            () = tokio::time::sleep(next) => {}
            changed = enabled.changed() => if changed.is_err() { return },
        }
    }
}

/// The signals the agent handles.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        let listen = |kind| signal(kind).map_err(|source| Error::Runtime { source });
        Ok(Self {
            term: listen(SignalKind::terminate())?,
            int: listen(SignalKind::interrupt())?,
            hup: listen(SignalKind::hangup())?,
        })
    }
}

/// The agent's periodic work.
struct Timers {
    loss_check: tokio::time::Interval,
    heartbeat: tokio::time::Interval,
    folds: tokio::time::Interval,
    resync: tokio::time::Interval,
}

impl Timers {
    fn new() -> Self {
        let every = |duration| tokio::time::interval(duration);
        let mut resync = every(std::time::Duration::from_secs(RESYNC_INTERVAL_SECS));
        // The start scanned the tree just now.
        resync.reset();
        Self {
            loss_check: every(std::time::Duration::from_secs(LOSS_CHECK_INTERVAL_SECS)),
            heartbeat: every(std::time::Duration::from_secs(HEARTBEAT_INTERVAL_SECS)),
            folds: every(std::time::Duration::from_millis(FOLDS_INTERVAL_MILLIS)),
            resync,
        }
    }
}

/// `inner` registered with the runtime, to be woken when its descriptor is readable.
fn pollable<T: std::os::fd::AsRawFd>(
    inner: T,
    error: impl FnOnce(std::io::Error) -> Error,
) -> Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its descriptor, which stays open and unchanged until the `AsyncFd`
    // (and `inner` inside it) is dropped.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|err| error(err.into_parts().1))
}
