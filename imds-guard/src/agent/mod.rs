//! `imds-guard run`: settings → policy → maps → attached programs, then events until a signal.

pub mod metrics;

use std::{
    borrow::Cow,
    collections::HashMap,
    io::{self, Write as _},
};

use aya::maps::{MapData, MapError, RingBuf};
use imds_guard_common::{
    agent::{AgentInfo, HEARTBEAT_INTERVAL_SECS, VERSION_LEN},
    event::{FoldKey, FoldValue},
    maps::{EVENTS_RING_BYTES, FOLDS_MAX_ENTRIES},
    policy::{ALL_CGROUPS_SEEN, MAX_CGROUP_LEVEL, NO_ENTRY_LEVELS, RULE_DEFAULT, entry_levels},
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use tracing::{debug, error, info, warn};

use self::metrics::Metrics;
use crate::{
    cli::RunArgs,
    config::{Config, Setting},
    error::{Error, Result},
    events::enrich::Enricher,
    events::folds::{Aggregate, Folds, Walk},
    events::{self, Record},
    host::cgroups::Hierarchy,
    host::clock::{boot_time_ns, boot_to_unix_ns},
    host::follow::{Changes, Watcher},
    host::pidfile::PidFile,
    kernel::pins::PinDir,
    kernel::{self, Kernel},
    policy::Policy,
    policy::compile::{CgroupDir, Compiled},
};

/// Cgroup paths remembered for events; cleared when it grows past this many entries.
const CGROUP_CACHE_ENTRIES: usize = 4096;
/// Records one drain takes from the ring at most: what the ring can hold at once (an event
/// plus the 8-byte record header each). Bounded so a flood cannot starve signals, and
/// large enough that, the ring being FIFO, one drain takes everything present when it began.
const DRAIN_BATCH_RECORDS: usize =
    (EVENTS_RING_BYTES as usize).div_ceil(size_of::<imds_guard_common::event::Event>() + 8);
/// First attempts remembered beyond what the kernel's fold map holds before the agent walks
/// the map to forget those it no longer has (one walk per this many new bursts at most).
const FOLDS_PRUNE_SLACK: usize = 1024;
/// User database lookups one batch of events may spend; names not looked up are left unread.
const LOOKUP_BUDGET: std::time::Duration = std::time::Duration::from_millis(20);
/// Bytes of JSON lines gathered before they are written to stdout in one call.
const OUTPUT_FLUSH_BYTES: usize = 64 * 1024;
/// How often the agent reports the repeats the kernel folded whose window has closed.
const FOLDS_INTERVAL_MILLIS: u64 = 1000;
/// How often the agent checks the kernel's lost-event counter.
const LOSS_CHECK_INTERVAL_SECS: u64 = 10;
/// How often the whole cgroup tree is scanned, in case a change notification was missed.
const RESYNC_INTERVAL_SECS: u64 = 30;

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
    warn_of_weak_rules(&policy);
    kernel::preflight()?;
    let metrics_listener = args.metrics_addr.map(metrics::bind).transpose()?;
    let pid_file = PidFile::lock(&args.pid_file)?;
    let pins = PinDir::new(&args.pin_dir);
    pins.prepare()?;
    pins.check_takeover(&attach, &hierarchy)?;

    let mut watcher = Watcher::new().map_err(|source| Error::WatchCgroups { source })?;
    let fold_window_ns = u64::from(args.aggregate_window) * 1_000_000_000;
    let mut kernel = Kernel::load(&pins, fold_window_ns)?;
    // Events raised while no agent ran wait in the pinned ring: report them before a new
    // policy reuses their generation's slot (their rules are named by number).
    let mut events = kernel.take_events()?;
    let fold_map = fold_map(&mut kernel, fold_window_ns)?;
    // Before the walk that takes the map's counts as reported: what is folded after it is
    // this agent's to report.
    let folded_at_start = kernel.counters()?.folded;
    let mut reporter = Reporter::new(
        Hierarchy::at(hierarchy.mount().to_owned()),
        fold_map,
        fold_window_ns,
        folded_at_start,
    );
    let earlier = reporter.drain_all(&mut events);
    if earlier > 0 {
        info!(
            events = earlier,
            "reported the events raised while no agent ran"
        );
    }
    let generation = if kernel.adopted() {
        kernel.inactive_generation()?
    } else {
        0
    };
    let dirs = watcher.scan(&hierarchy, &attach.path);
    let newest_seen = newest(&dirs);
    let (compiled, too_deep) = Compiled::new(policy, generation, &attach.path, &dirs);
    warn_too_deep(&too_deep);
    warn_of_room(&compiled);
    if kernel.adopted() {
        // The previous agent's policy is in force: switch from it, as a reload does.
        kernel.switch_to(&compiled)?;
    } else {
        kernel.install(&compiled)?;
    }
    reporter.set_policy(generation, compiled.policy.clone());
    if kernel.adopted() {
        reporter.retire(generation ^ 1);
    }
    let mut metrics = Metrics::new(kernel.counters()?);
    metrics.start_generation(&mut kernel, generation, compiled.policy.rules.len());
    let links = kernel.attach(&attach)?;
    info!(
        cgroup = %attach.path,
        mode = %compiled.policy.mode,
        rules_from = %config.rules_source(),
        containers_by = kernel.container_detection(),
        rules = compiled.policy.rules.len(),
        protected = ?compiled.policy.protect,
        cgroup_entries = compiled.cgroup_entries(),
        watched_cgroups = watcher.watched(),
        pins = %pins.root().display(),
        links_created = links.created,
        links_updated = links.updated,
        links_moved = links.moved,
        adopted = kernel.adopted(),
        "imds-guard is enforcing"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Runtime { source })?;
    let agent = Agent {
        args,
        attach_setting: config.attach,
        attach: attach.path,
        hierarchy,
        kernel,
        // Read before `compiled` moves in.
        unseen_after: compiled.unseen_after(),
        entry_levels: compiled.entry_levels(),
        compiled,
        rescan_hold: None,
        newest_seen,
        unwatched: watcher.take_unwatched(),
        failed_reloads: 0,
        reloads: 0,
        maps_uncertain: false,
        switched: false,
        started_ns: boot_time_ns(),
        metrics,
    };
    runtime.block_on(serve(
        agent,
        reporter,
        events,
        watcher,
        pid_file,
        metrics_listener,
    ))
}

/// The running agent: the kernel side, the policy compiled for the cgroups that exist, and
/// what it needs to follow the cgroup tree and re-read its settings.
struct Agent<'a> {
    args: &'a RunArgs,
    /// Where the programs are attached, as set: a reload cannot move them.
    attach_setting: Setting<String>,
    /// The attach point's path.
    attach: String,
    hierarchy: Hierarchy,
    kernel: Kernel,
    /// The generation in force.
    compiled: Compiled,
    /// `Settings::unseen_after` as written in the generation in force.
    unseen_after: u64,
    /// `Settings::entry_levels` as written in the generation in force.
    entry_levels: u64,
    /// Change notifications were lost: cgroups newer than this are judged as unseen until a
    /// full scan has found them.
    rescan_hold: Option<u64>,
    /// The newest cgroup id a scan has found (cgroup ids only grow).
    newest_seen: u64,
    /// Directories the last full scan could not watch.
    unwatched: usize,
    failed_reloads: u32,
    reloads: u32,
    /// When it started (`CLOCK_BOOTTIME` ns).
    started_ns: u64,
    /// An incremental update failed part-way: the maps must be rewritten whole.
    maps_uncertain: bool,
    /// A new generation is in force since the reporter last learnt its policy.
    switched: bool,
    metrics: Metrics,
}

impl Agent<'_> {
    /// Re-reads and validates the settings; on success the kernel switches to the new policy
    /// (see [`Kernel::switch_to`]). On any failure the policy in force stays, and the failure
    /// is logged and counted.
    fn reload(&mut self, watcher: &mut Watcher) {
        let result = Config::load(self.args.config.as_deref(), &self.args.overrides())
            .and_then(|config| {
                let policy = Policy::resolve(&config, &self.hierarchy)?;
                warn_of_weak_rules(&policy);
                Ok((config, policy))
            })
            .and_then(|(config, policy)| {
                self.switch(watcher, policy)?;
                Ok(config)
            });
        match result {
            Ok(config) => {
                if config.attach.value != self.attach_setting.value {
                    warn!(
                        "the attach point stays {} until a restart ({} asks for {})",
                        self.attach_setting.value, config.attach.origin, config.attach.value
                    );
                }
                self.reloads += 1;
                info!(
                    generation = self.compiled.generation(),
                    mode = %self.compiled.policy.mode,
                    rules = self.compiled.policy.rules.len(),
                    cgroup_entries = self.compiled.cgroup_entries(),
                    "policy reloaded"
                );
            }
            Err(err) => {
                self.failed_reloads += 1;
                error!(
                    failed_reloads = self.failed_reloads,
                    "reload refused, the policy in force stays: {}",
                    crate::error::report(&err)
                );
            }
        }
    }

    /// Compiles `policy` for the cgroups that exist now as the inactive generation and
    /// switches to it.
    fn switch(&mut self, watcher: &mut Watcher, policy: Policy) -> Result<()> {
        let generation = self.kernel.inactive_generation()?;
        let dirs = watcher.scan(&self.hierarchy, &self.attach);
        self.newest_seen = self.newest_seen.max(newest(&dirs));
        let (compiled, too_deep) = Compiled::new(policy, generation, &self.attach, &dirs);
        self.kernel.switch_to(&compiled)?;
        warn_too_deep(&too_deep);
        warn_of_room(&compiled);
        self.unseen_after = compiled.unseen_after();
        self.entry_levels = compiled.entry_levels();
        // The old generation is final now (no program can still count in it).
        self.metrics.fold_generation(
            &mut self.kernel,
            self.compiled.generation(),
            &self.compiled.policy,
        );
        self.metrics.start_generation(
            &mut self.kernel,
            compiled.generation(),
            compiled.policy.rules.len(),
        );
        self.compiled = compiled;
        self.maps_uncertain = false;
        self.switched = true;
        // The scan behind the new generation was complete.
        self.rescan_hold = None;
        self.update_unseen_after();
        Ok(())
    }

    /// Brings the entries of cgroups created or removed up to date.
    fn follow(&mut self, watcher: &mut Watcher, changes: &Changes) {
        if changes.overflow {
            // Cgroups made since the last one known may be anywhere, a container's included:
            // they are judged as unseen until the scan has found them.
            // A lower hold (a failed map update) stays until the maps are rewritten.
            self.rescan_hold = Some(
                self.rescan_hold
                    .map_or(self.newest_seen, |hold| hold.min(self.newest_seen)),
            );
            self.update_unseen_after();
            warn!(
                unseen_after = self.newest_seen,
                "cgroup change notifications were dropped by the kernel: rescanning now; \
                 cgroups made meanwhile get only the rules that hold in every cgroup"
            );
            self.resync(watcher);
            return;
        }
        for path in &changes.paths {
            let found = watcher.scan(&self.hierarchy, path);
            self.newest_seen = self.newest_seen.max(newest(&found));
            warn_too_deep(&self.compiled.sync(path, &found));
        }
        let delta = self.compiled.take_delta();
        if !delta.is_empty() {
            debug!(
                paths = ?changes.paths,
                cgroup_entries = self.compiled.cgroup_entries(),
                rulesets = self.compiled.rulesets(),
                "cgroups changed"
            );
            self.apply(&delta);
        }
        self.update_unseen_after();
    }

    /// The safety net: a full scan, which finds nothing to change unless a notification was
    /// missed (or the maps must be rewritten after a failed update).
    fn resync(&mut self, watcher: &mut Watcher) {
        if self.maps_uncertain {
            let policy = self.compiled.policy.clone();
            match self.switch(watcher, policy) {
                Ok(()) => info!("policy maps rewritten whole after a failed update"),
                Err(err) => error!(
                    "rewriting the policy maps failed (retrying at the next scan): {}",
                    crate::error::report(&err)
                ),
            }
            return;
        }
        let _ = watcher.take_unwatched();
        let found = watcher.scan(&self.hierarchy, &self.attach);
        self.unwatched = watcher.take_unwatched();
        self.newest_seen = self.newest_seen.max(newest(&found));
        warn_too_deep(&self.compiled.sync(&self.attach, &found));
        let delta = self.compiled.take_delta();
        if !delta.is_empty() {
            warn!(
                added_or_changed = delta.cgroup_upsert.len(),
                removed = delta.cgroup_remove.len(),
                "the periodic cgroup scan found changes no notification reported"
            );
            self.apply(&delta);
        }
        if !self.maps_uncertain {
            self.rescan_hold = None;
        }
        warn_of_room(&self.compiled);
        self.update_unseen_after();
    }

    /// Writes `Settings::unseen_after` when what it should be changed: below the oldest cgroup
    /// whose entry found no room, and below what a lost notification may hide until a scan
    /// has found it.
    fn update_unseen_after(&mut self) {
        let wanted = self
            .compiled
            .unseen_after()
            .min(self.rescan_hold.unwrap_or(ALL_CGROUPS_SEEN));
        if wanted == self.unseen_after {
            return;
        }
        match self
            .kernel
            .set_unseen_after(self.compiled.generation(), wanted)
        {
            Ok(()) => {
                if wanted == ALL_CGROUPS_SEEN {
                    info!("every cgroup has its rules again: new cgroups are judged by theirs");
                } else {
                    warn!(
                        unseen_after = wanted,
                        "cgroups with a larger id get only the rules that hold in every cgroup \
                         until the agent catches up (see `imds-guard status`)"
                    );
                }
                self.unseen_after = wanted;
                self.record(true);
            }
            Err(err) => {
                self.maps_uncertain = true;
                error!(
                    "cannot write which cgroups are unseen; rewriting the policy maps at the \
                     next scan: {}",
                    crate::error::report(&err)
                );
            }
        }
    }

    /// Records the agent's state in the pinned `AGENT` map, for `status`.
    fn record(&mut self, running: bool) {
        let mut version = [0u8; VERSION_LEN];
        let text = env!("CARGO_PKG_VERSION").as_bytes();
        let len = text.len().min(VERSION_LEN);
        version[..len].copy_from_slice(&text[..len]);
        let info = AgentInfo {
            version,
            started_ns: self.started_ns,
            heartbeat_ns: boot_time_ns(),
            pid: if running { std::process::id() } else { 0 },
            reloads: self.reloads,
            failed_reloads: self.failed_reloads,
            rules: u32::try_from(self.compiled.policy.rules.len()).unwrap_or(u32::MAX),
            cgroup_entries: u32::try_from(self.compiled.cgroup_entries()).unwrap_or(u32::MAX),
            maps_uncertain: u32::from(self.maps_uncertain),
            cgroups_dropped: u32::try_from(self.compiled.dropped()).unwrap_or(u32::MAX),
            cgroups_unwatched: u32::try_from(self.unwatched).unwrap_or(u32::MAX),
            unseen_after: self.unseen_after,
        };
        if let Err(err) = self.kernel.set_agent_info(&info) {
            warn!("cannot record the agent's state for `status`: {err}");
        }
    }

    /// Applies `delta` to the generation in force. The walk's level range is widened before
    /// an entry at a new level is written and narrowed after the last one there is removed:
    /// a program never skips a level that has an entry.
    fn apply(&mut self, delta: &crate::policy::compile::Delta) {
        let generation = self.compiled.generation();
        let levels = self.compiled.entry_levels();
        let widened = widest(self.entry_levels, levels);
        if widened != self.entry_levels {
            match self.kernel.set_entry_levels(generation, widened) {
                Ok(()) => self.entry_levels = widened,
                Err(err) => {
                    self.maps_uncertain = true;
                    error!(
                        "cannot widen the cgroup levels the kernel looks at; rewriting the \
                         policy maps at the next scan: {}",
                        crate::error::report(&err)
                    );
                    return;
                }
            }
        }
        self.apply_delta(delta);
        if levels != self.entry_levels && !self.maps_uncertain {
            match self.kernel.set_entry_levels(generation, levels) {
                Ok(()) => self.entry_levels = levels,
                // The range stays wider than it needs: slower, never wrong.
                Err(err) => warn!("cannot narrow the cgroup levels the kernel looks at: {err}"),
            }
        }
    }

    fn apply_delta(&mut self, delta: &crate::policy::compile::Delta) {
        if let Err(err) = self.kernel.apply(delta) {
            self.maps_uncertain = true;
            // Until the maps are rewritten, a cgroup whose entry failed may have wider rules
            // than its own: judge the cgroups from the oldest of them on as unseen.
            if let Some(oldest) = delta
                .cgroup_upsert
                .iter()
                .map(|(key, _)| key.cgroup_id)
                .min()
            {
                self.rescan_hold = Some(
                    self.rescan_hold
                        .unwrap_or(ALL_CGROUPS_SEEN)
                        .min(oldest.saturating_sub(1)),
                );
            }
            error!(
                "updating the policy maps for changed cgroups failed; rewriting them at the \
                 next scan: {}",
                crate::error::report(&err)
            );
        }
    }
}

/// The kernel's fold map when repeats are folded (`fold_window_ns` > 0). When they are not,
/// what an earlier agent's programs folded is deleted, or the next agent that folds again could
/// count a later policy's attempts as repeats of those bursts.
fn fold_map(
    kernel: &mut Kernel,
    fold_window_ns: u64,
) -> Result<Option<aya::maps::HashMap<MapData, FoldKey, FoldValue>>> {
    let mut map = kernel.take_folds()?;
    if fold_window_ns > 0 {
        return Ok(Some(map));
    }
    for (key, _) in fold_entries(&map).entries {
        delete_fold(&mut map, &key);
    }
    Ok(None)
}

/// Logs the rules a container or a local user could satisfy (as `check-config` lists them).
fn warn_of_weak_rules(policy: &Policy) {
    for warning in policy.warnings() {
        warn!(
            rule = %warning.rule,
            at = %warning.origin,
            "{}",
            warning.message
        );
    }
}

/// The range of cgroup levels that holds both `a` and `b` (`Settings::entry_levels` form).
fn widest(a: u64, b: u64) -> u64 {
    #[expect(clippy::cast_possible_truncation, reason = "the halves of one word")]
    let halves = |levels: u64| (levels as u32, (levels >> 32) as u32);
    let ((a_low, a_high), (b_low, b_high)) = (halves(a), halves(b));
    match (a == NO_ENTRY_LEVELS, b == NO_ENTRY_LEVELS) {
        (true, _) => b,
        (_, true) => a,
        _ => entry_levels(a_low.min(b_low), a_high.max(b_high)),
    }
}

/// The largest cgroup id in `dirs` (0 for none).
fn newest(dirs: &[CgroupDir]) -> u64 {
    dirs.iter().map(|dir| dir.id).max().unwrap_or(0)
}

/// Says when cgroup entries found no room in the map.
fn warn_of_room(compiled: &Compiled) {
    if compiled.dropped() > 0 {
        warn!(
            cgroups = compiled.dropped(),
            "the cgroup map is full: cgroups whose rules would add to their parent's keep their \
             parent's (fail closed)"
        );
    }
    if compiled.unwritten() > 0 {
        warn!(
            cgroups = compiled.unwritten(),
            unseen_after = compiled.unseen_after(),
            "the cgroup map is full: cgroups whose rules take some away from their parent's \
             cannot be written; this one and every newer cgroup get only the rules that hold \
             in every cgroup"
        );
    }
}

fn warn_too_deep(dirs: &[CgroupDir]) {
    for dir in dirs {
        warn!(
            cgroup = %dir.path,
            "a rule matches this cgroup, but it is {} levels deep and the kernel looks at most \
             {MAX_CGROUP_LEVEL}: tasks in it get the rules of its nearest ancestor that has some",
            dir.level()
        );
    }
}

/// Reports events and follows the cgroup tree until a signal, then drains what is left and
/// reports counters. The programs stay attached: enforcement outlives the agent.
async fn serve(
    mut agent: Agent<'_>,
    mut reporter: Reporter,
    events: RingBuf<MapData>,
    watcher: Watcher,
    mut pid_file: PidFile,
    metrics_listener: Option<std::net::TcpListener>,
) -> Result<()> {
    let (scrape_sender, mut scrapes) = tokio::sync::mpsc::channel::<metrics::Scrape>(8);
    let metrics_on = metrics_listener.is_some();
    if let Some(listener) = metrics_listener {
        tokio::spawn(metrics::serve(listener, scrape_sender));
    }
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
    // SAFETY: the watcher owns its inotify descriptor, which stays open and unchanged until
    // the `AsyncFd` (and the watcher inside it) is dropped.
    let mut watcher = unsafe { AsyncFd::register_with_interest(watcher, Interest::READABLE) }
        .map_err(|err| Error::WatchCgroups {
            source: err.into_parts().1,
        })?;
    agent.record(true);
    // SIGHUP is handled from here on: `imds-guard reload` may find us now.
    pid_file.publish()?;
    // Programs attached, policy in the maps: only now may systemd start what depends on us.
    if let Err(err) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        warn!("could not notify systemd of readiness: {err}");
    }

    let mut loss_check =
        tokio::time::interval(std::time::Duration::from_secs(LOSS_CHECK_INTERVAL_SECS));
    let mut resync = tokio::time::interval(std::time::Duration::from_secs(RESYNC_INTERVAL_SECS));
    resync.reset();
    let mut heartbeat =
        tokio::time::interval(std::time::Duration::from_secs(HEARTBEAT_INTERVAL_SECS));
    let mut folds = tokio::time::interval(std::time::Duration::from_millis(FOLDS_INTERVAL_MILLIS));
    let mut lost_so_far = 0;
    let outcome = loop {
        tokio::select! {
            _ = sigterm.recv() => break Ok("SIGTERM"),
            _ = sigint.recv() => break Ok("SIGINT"),
            _ = loss_check.tick() => {
                warn_of_new_losses(&mut agent.kernel, &mut lost_so_far);
                reporter.warn_of_new_unreported();
            }
            _ = heartbeat.tick() => agent.record(true),
            _ = folds.tick() => {
                let folded = agent.kernel.counters().ok().map(|counters| counters.folded);
                reporter.report_folds(folded, false);
            }
            Some(scrape) = scrapes.recv(), if metrics_on => {
                agent.metrics.update(
                    &mut agent.kernel,
                    &agent.compiled,
                    (reporter.reported, reporter.aggregated, reporter.unreported),
                    (agent.reloads, agent.failed_reloads),
                    agent.unseen_after != ALL_CGROUPS_SEEN,
                );
                let _ = scrape.send(agent.metrics.encode());
            }
            _ = resync.tick() => {
                if agent.maps_uncertain {
                    // A rewrite reuses a generation slot: see SIGHUP.
                    reporter.before_switch(ring.get_mut());
                }
                agent.resync(watcher.get_mut());
            }
            _ = sighup.recv() => {
                reporter.before_switch(ring.get_mut());
                agent.reload(watcher.get_mut());
            }
            ready = watcher.readable_mut() => match ready {
                Ok(mut guard) => {
                    let changes = guard.get_inner_mut().changed();
                    guard.clear_ready();
                    match changes {
                        Ok(changes) => agent.follow(guard.get_inner_mut(), &changes),
                        Err(source) => break Err(Error::WatchCgroups { source }),
                    }
                }
                Err(source) => break Err(Error::WatchCgroups { source }),
            },
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
        if std::mem::take(&mut agent.switched) {
            let generation = agent.compiled.generation();
            reporter.set_policy(generation, agent.compiled.policy.clone());
            reporter.retire(generation ^ 1);
        }
    };
    finish(&mut agent, &mut reporter, ring.get_mut());
    let signal = outcome?;
    info!("stopped on {signal}");
    Ok(())
}

/// Stopping: reports the events still queued and records that the agent is gone. The programs
/// stay attached.
fn finish(agent: &mut Agent<'_>, reporter: &mut Reporter, ring: &mut RingBuf<MapData>) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // Every event raised so far is in the ring: report them all before going, and the
    // repeats folded so far.
    let _ = reporter.drain_all(ring);
    reporter.report_folds(None, true);
    agent.record(false);
    match agent.kernel.counters() {
        Ok(counters) => {
            // Every window was reported just now: what was not, was evicted. Exact now, so
            // at least what the walks found.
            let unreported = reporter.repeats_not_reported(counters.folded);
            reporter.unreported = reporter.unreported.max(unreported);
            reporter.warn_of_new_unreported();
            info!(
                allowed = counters.allowed,
                denied = counters.denied,
                audited = counters.audited,
                events_reported = reporter.reported,
                events_aggregated = reporter.aggregated,
                repeats_unreported = reporter.unreported,
                folded = counters.folded,
                events_lost = counters.events_lost,
                reloads = agent.reloads,
                failed_reloads = agent.failed_reloads,
                "stopped; enforcement stays in force with the last policy (`imds-guard detach` \
                 removes it)"
            );
        }
        Err(err) => warn!("stopped; counters unreadable: {err}"),
    }
}

/// Events the kernel could not queue are counted there; say so as soon as the count grows.
fn warn_of_new_losses(kernel: &mut Kernel, lost_so_far: &mut u64) {
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

/// Turns ring-buffer records into JSON lines on stdout, each enriched and reported at once, and
/// the kernel's counts of folded repeats into aggregate lines.
struct Reporter {
    /// The policy of each generation, to name the rule that decided an event.
    policies: [Option<Policy>; 2],
    /// Its own handle on the hierarchy, to name cgroups from their ids.
    hierarchy: Hierarchy,
    cgroup_paths: HashMap<u64, Option<String>>,
    enricher: Enricher,
    /// The kernel's fold entries (`None`: folding is off).
    fold_map: Option<aya::maps::HashMap<MapData, FoldKey, FoldValue>>,
    folds: Folds<Record>,
    /// The kernel's total of folded repeats when this agent started.
    folded_at_start: u64,
    /// Repeats the kernel folded whose entry was evicted before they were reported: a lower
    /// bound, from the last walk that reached the map's end (see [`Reporter::report_folds`]).
    unreported: u64,
    /// What of `unreported` was warned of.
    unreported_warned: u64,
    /// The kernel's total of folded repeats when the map was last walked.
    folded_seen: u64,
    /// JSON lines not yet written to stdout.
    out: Vec<u8>,
    stdout_failed: bool,
    /// Attempts reported at once, each on its own line.
    reported: u64,
    /// Repeats reported in aggregate lines.
    aggregated: u64,
}

impl Reporter {
    /// A reporter that knows no policy yet: events name rules by number until it does. The
    /// counts already in `fold_map` are not its to report.
    fn new(
        hierarchy: Hierarchy,
        fold_map: Option<aya::maps::HashMap<MapData, FoldKey, FoldValue>>,
        fold_window_ns: u64,
        folded_at_start: u64,
    ) -> Self {
        let mut folds = Folds::new(fold_window_ns);
        if let Some(map) = &fold_map {
            folds.baseline(&fold_entries(map).entries);
        }
        Self {
            policies: [None, None],
            hierarchy,
            cgroup_paths: HashMap::new(),
            enricher: Enricher::new(),
            fold_map,
            folds,
            folded_at_start,
            unreported: 0,
            unreported_warned: 0,
            folded_seen: 0,
            out: Vec::with_capacity(OUTPUT_FLUSH_BYTES),
            stdout_failed: false,
            reported: 0,
            aggregated: 0,
        }
    }

    fn set_policy(&mut self, generation: u32, policy: Policy) {
        self.policies[usize::from(generation != 0)] = Some(policy);
    }

    fn rule_name(&self, generation: u8, rule: u32) -> Cow<'_, str> {
        match &self.policies[usize::from(generation != 0)] {
            Some(policy) => Cow::Borrowed(policy.rule_name(rule)),
            None if rule == RULE_DEFAULT => Cow::Borrowed("default"),
            // Judged before this agent started, by a policy it never saw.
            None => Cow::Owned(format!("rule {rule} of an earlier policy")),
        }
    }

    /// Of the repeats the kernel folded since this agent started (`folded_total` now), those
    /// it has not reported: waiting for their window to close, or evicted from the LRU fold
    /// map first. Once all windows have been reported (the agent is stopping), this is what
    /// the kernel counted and no event says.
    fn repeats_not_reported(&self, folded_total: u64) -> u64 {
        folded_total
            .saturating_sub(self.folded_at_start)
            .saturating_sub(self.aggregated)
    }

    /// Warns of repeats found evicted unreported since the last warning.
    fn warn_of_new_unreported(&mut self) {
        if self.unreported > self.unreported_warned {
            warn!(
                repeats_unreported = self.unreported,
                "{} repeats the kernel counted will never be reported: their fold entry was \
                 evicted first (more distinct attempts repeated within one window than the map \
                 holds, {FOLDS_MAX_ENTRIES}), or they were made as the agent started; verdicts \
                 stood",
                self.unreported - self.unreported_warned
            );
            self.unreported_warned = self.unreported;
        }
    }

    /// Reports everything in the ring; returns how many events that was.
    fn drain_all(&mut self, ring: &mut RingBuf<MapData>) -> u64 {
        let before = self.reported;
        while !self.drain(ring) {}
        self.reported - before
    }

    /// Reports the records in the ring, at most [`DRAIN_BATCH_RECORDS`], then flushes stdout
    /// once. Returns whether the ring is now empty.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> bool {
        let offset = clock_offset();
        self.enricher.allow_lookups_for(LOOKUP_BUDGET);
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
            let raw = &event.raw;
            let cgroup = self.cgroup_path(raw.cgroup_id);
            let rule = self.rule_name(raw.generation, raw.rule);
            let mut record = Record::new(&event, offset, cgroup, &rule);
            record.enrich(&mut self.enricher, raw.boot_ns);
            self.emit(&record);
            self.reported += 1;
            if self.fold_map.is_some() {
                self.folds.first(FoldKey::of(raw), record);
                // The first attempts of bursts are remembered until the kernel forgets the
                // bursts: walk its entries (which prunes the others) before more pile up than
                // it holds.
                if self.folds.len() > FOLDS_MAX_ENTRIES as usize + FOLDS_PRUNE_SLACK {
                    self.report_folds(None, false);
                }
            }
        }
        self.flush();
        empty
    }

    /// Reports what the current policies judged before a generation slot is reused (events
    /// and repeats name their rule by its number in its generation): what is in the ring (one
    /// batch holds all of it, so this needs no loop), and every repeat counted so far.
    fn before_switch(&mut self, ring: &mut RingBuf<MapData>) {
        let _ = self.drain(ring);
        self.report_folds(None, true);
    }

    /// Reports the repeats the kernel folded whose window has closed (all of them when
    /// `all`). `folded_total`, the kernel's counter, spares the walk when nothing was folded
    /// since the last one and nothing was left waiting.
    fn report_folds(&mut self, folded_total: Option<u64>, all: bool) {
        let Some(map) = &self.fold_map else {
            return;
        };
        if !all && folded_total == Some(self.folded_seen) && !self.folds.pending() {
            return;
        }
        if let Some(total) = folded_total {
            self.folded_seen = total;
        }
        let walk = fold_entries(map);
        let due = self.folds.collect(&walk, boot_time_ns(), all);
        self.emit_aggregates(due);
        // Every repeat counted in `folded_total` (read before the walk) was reported, waits in
        // an open window, or was evicted unreported. Repeats counted after the read only
        // lower the figure, so it never says more than were evicted.
        if let (Some(total), Some(pending)) = (folded_total, self.folds.pending_repeats()) {
            let evicted = self.repeats_not_reported(total).saturating_sub(pending);
            self.unreported = self.unreported.max(evicted);
        }
    }

    /// Reports the repeats of `generation`, which the policy switched away from (they are
    /// final now), and deletes its entries from the kernel's map: when a later policy reuses
    /// the slot, its attempts open bursts of their own, reported at once and named by its
    /// rules, instead of adding to an earlier policy's.
    fn retire(&mut self, generation: u32) {
        let Some(map) = &mut self.fold_map else {
            return;
        };
        let retired: Vec<_> = fold_entries(map)
            .entries
            .into_iter()
            .filter(|(key, _)| u32::from(key.generation) == generation)
            .collect();
        for (key, _) in &retired {
            delete_fold(map, key);
        }
        let due = self.folds.retire(&retired);
        self.emit_aggregates(due);
    }

    /// Reports each aggregate as one line.
    fn emit_aggregates(&mut self, due: Vec<Aggregate<Record>>) {
        if due.is_empty() {
            return;
        }
        let offset = clock_offset();
        for aggregate in due {
            let Some(first) = aggregate
                .first
                .or_else(|| self.repeats_without_first(&aggregate.key, offset))
            else {
                continue;
            };
            self.aggregated += aggregate.repeats;
            self.emit(&first.aggregate(
                aggregate.repeats,
                aggregate.window_start_ns,
                aggregate.last_ns,
                offset,
            ));
        }
        self.flush();
    }

    /// What the repeats of `key` share, when the agent never saw the burst's first attempt.
    fn repeats_without_first(&mut self, key: &FoldKey, offset: i128) -> Option<Record> {
        let cgroup = self.cgroup_path(key.cgroup_id);
        let rule = self.rule_name(key.generation, key.rule).into_owned();
        match Record::of_repeats(key, offset, cgroup, &rule) {
            Ok(mut record) => {
                record.enrich(&mut self.enricher, 0);
                Some(record)
            }
            Err(err) => {
                warn!("dropping the repeats of a malformed attempt: {err}");
                None
            }
        }
    }

    /// Adds `record` to the output as a JSON line; writes out when enough has gathered.
    fn emit(&mut self, record: &Record) {
        // Serializing plain strings and numbers into memory cannot fail.
        if serde_json::to_writer(&mut self.out, record).is_ok() {
            self.out.push(b'\n');
        }
        if self.out.len() >= OUTPUT_FLUSH_BYTES {
            self.flush();
        }
    }

    /// Writes out what was emitted.
    fn flush(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let written = io::stdout().lock().write_all(&self.out);
        self.note_output(written);
        self.out.clear();
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

/// Nanoseconds from `CLOCK_BOOTTIME` to Unix time now (0, with a warning, if unreadable).
fn clock_offset() -> i128 {
    boot_to_unix_ns().unwrap_or_else(|err| {
        warn!("cannot read the clocks ({err}): event times are since boot");
        0
    })
}

/// Deletes the fold entry of `key`; gone already (evicted) is as good as deleted.
fn delete_fold(map: &mut aya::maps::HashMap<MapData, FoldKey, FoldValue>, key: &FoldKey) {
    if let Err(err) = map.remove(key)
        && !matches!(err, MapError::KeyNotFound)
    {
        warn!("cannot delete a fold entry: {err}");
    }
}

/// A walk over the kernel's fold entries (see [`Walk`]).
fn fold_entries(map: &aya::maps::HashMap<MapData, FoldKey, FoldValue>) -> Walk<FoldKey, FoldValue> {
    Walk::new(map.iter(), 2 * FOLDS_MAX_ENTRIES as usize)
}
