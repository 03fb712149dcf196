//! What the agent keeps in force: the policy compiled for the cgroups that exist, written to
//! the kernel's maps, and kept current as cgroups come and go.

use imds_guard_common::{
    agent::{
        AgentInfo, POSTURE_TOKENS_OPTIONAL, POSTURE_TOKENS_REQUIRED, POSTURE_TOKENS_UNCHECKED,
        POSTURE_TOKENS_UNKNOWN, VERSION_LEN,
    },
    maps::{COUNTER_EVENTS_LOST, COUNTER_FOLDED},
    policy::{ALL_CGROUPS_SEEN, MAX_CGROUP_LEVEL, NO_ENTRY_LEVELS, entry_levels},
};
use tracing::{debug, error, info, warn};

use super::metrics::Metrics;
use crate::{
    cli::RunArgs,
    config::{Config, Setting},
    error::Result,
    events::accounting::Accounting,
    host::{
        cgroups::{CgroupDir, Hierarchy},
        clock::boot_time_ns,
        follow::{Changes, Watcher},
        posture::{HttpTokens, Posture},
    },
    kernel::{Counters, Kernel, KernelError},
    policy::{Policy, compile::Compiled},
};

/// The running agent's enforcement: the kernel side, the policy compiled for the cgroups that
/// exist, and what it needs to follow the cgroup tree and re-read its settings. A policy
/// switch goes through `serve::Running::switch_policy`, which reports what the old policy
/// judged first: `Enforcement::switch` is only ever called from there.
pub struct Enforcement<'a> {
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
    /// The kernel's count of lost events when it was last warned of.
    lost_warned: u64,
    failed_reloads: u32,
    reloads: u32,
    /// When it started (`CLOCK_BOOTTIME` ns).
    started_ns: u64,
    /// An incremental update failed part-way: the maps must be rewritten whole.
    maps_uncertain: bool,
    metrics: Metrics,
    /// The last posture check and when it ran (`CLOCK_BOOTTIME` ns).
    posture: Option<(Posture, u64)>,
}

impl<'a> Enforcement<'a> {
    /// The enforcement an agent started with: `compiled` in force in `kernel`, the programs
    /// attached at `attach`, whose scan found cgroups up to `newest_seen` and could not watch
    /// `unwatched` directories.
    #[must_use]
    #[expect(
        clippy::too_many_arguments,
        reason = "what the start put together, once"
    )]
    pub fn new(
        args: &'a RunArgs,
        attach_setting: Setting<String>,
        attach: String,
        hierarchy: Hierarchy,
        kernel: Kernel,
        compiled: Compiled,
        (newest_seen, unwatched): (u64, usize),
        metrics: Metrics,
    ) -> Self {
        Self {
            args,
            attach_setting,
            attach,
            hierarchy,
            kernel,
            unseen_after: compiled.unseen_after(),
            entry_levels: compiled.entry_levels(),
            compiled,
            rescan_hold: None,
            newest_seen,
            unwatched,
            lost_warned: 0,
            failed_reloads: 0,
            reloads: 0,
            maps_uncertain: false,
            started_ns: boot_time_ns(),
            metrics,
            posture: None,
        }
    }

    /// Re-reads and validates the settings, and resolves them into a policy.
    ///
    /// # Errors
    /// The config's or the policy's first error.
    pub fn read_policy(&self) -> Result<(Config, Policy)> {
        let config = Config::load(self.args.config.as_deref(), &self.args.overrides())?;
        let policy = Policy::resolve(&config, &self.hierarchy)?;
        warn_of_weak_rules(&policy);
        Ok((config, policy))
    }

    /// Logs and counts what came of a reload: the new config in force, or why the policy in
    /// force stays.
    pub fn reloaded(&mut self, result: Result<Config>) {
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
        // `status` says so at once, not at the next heartbeat.
        self.record(true);
    }

    /// Compiles `policy` for the cgroups that exist now as the inactive generation and
    /// switches to it.
    pub(super) fn switch(&mut self, watcher: &mut Watcher, policy: Policy) -> Result<()> {
        let generation = self.kernel.inactive_generation()?;
        let dirs = watcher.scan(&self.hierarchy, &self.attach);
        self.newest_seen = self.newest_seen.max(newest(&dirs));
        let (compiled, too_deep) = Compiled::new(policy, generation, &self.attach, &dirs);
        // The switch zeroes the slot the retired generation counted in.
        self.metrics.fold_retired(&mut self.kernel);
        self.kernel.switch_to(&compiled)?;
        warn_too_deep(&too_deep);
        warn_of_room(&compiled);
        self.unseen_after = compiled.unseen_after();
        self.entry_levels = compiled.entry_levels();
        // The old generation's connects are final now (no program can still count them); its
        // open connections' requests are added until its slot is reused.
        self.metrics.fold_generation(
            &mut self.kernel,
            self.compiled.generation(),
            &self.compiled.policy,
        );
        self.metrics
            .retire_generation(self.compiled.generation(), self.compiled.policy.clone());
        self.metrics.start_generation(
            &mut self.kernel,
            compiled.generation(),
            compiled.policy.rules.len(),
        );
        self.compiled = compiled;
        self.maps_uncertain = false;
        // The scan behind the new generation was complete.
        self.rescan_hold = None;
        self.update_unseen_after();
        Ok(())
    }

    /// Brings the entries of cgroups created or removed up to date. Returns `true` when the
    /// kernel dropped notifications: the caller must rescan the whole tree now.
    pub fn follow(&mut self, watcher: &mut Watcher, changes: &Changes) -> bool {
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
            return true;
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
        false
    }

    /// Whether an update of the maps failed part-way: they must be rewritten whole (a policy
    /// switch to the policy in force) before a scan can be trusted to repair them.
    #[must_use]
    pub fn maps_uncertain(&self) -> bool {
        self.maps_uncertain
    }

    /// The policy in force (to rewrite the maps with it).
    #[must_use]
    pub fn policy(&self) -> &Policy {
        &self.compiled.policy
    }

    /// The policy compiled for the cgroups that exist.
    #[must_use]
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    /// The kernel's total of folded repeats, if it can be read.
    pub fn folded_total(&mut self) -> Option<u64> {
        self.kernel.counter(COUNTER_FOLDED).ok()
    }

    /// The kernel's counters now.
    ///
    /// # Errors
    /// When they cannot be read.
    pub fn counters(&mut self) -> Result<Counters, KernelError> {
        self.kernel.counters()
    }

    /// Events the kernel could not queue are counted there; says so as soon as the count grows.
    pub fn warn_of_new_losses(&mut self) {
        match self.kernel.counter(COUNTER_EVENTS_LOST) {
            Ok(events_lost) if events_lost > self.lost_warned => {
                warn!(
                    events_lost,
                    "{} events did not fit in the ring buffer (verdicts stood; reports are missing)",
                    events_lost - self.lost_warned
                );
                self.lost_warned = events_lost;
            }
            Ok(_) => {}
            Err(err) => warn!("cannot read the counters: {err}"),
        }
    }

    /// The metrics now, with the reporter's `accounting`.
    pub fn scrape(&mut self, accounting: &Accounting) -> String {
        self.metrics.update(
            &mut self.kernel,
            &self.compiled,
            (
                accounting.reported(),
                accounting.aggregated_so_far(),
                accounting.unreported(),
            ),
            (self.reloads, self.failed_reloads),
            self.unseen_after != ALL_CGROUPS_SEEN,
        );
        self.metrics.encode()
    }

    /// Stopping: records that the agent is gone and logs where every attempt went.
    pub fn stopped(&mut self, counters: Result<&Counters, &KernelError>, accounting: &Accounting) {
        self.record(false);
        match counters {
            Ok(counters) => info!(
                allowed = counters.allowed,
                denied = counters.denied,
                audited = counters.audited,
                events_reported = accounting.reported(),
                events_aggregated = accounting.aggregated_so_far(),
                repeats_unreported = accounting.unreported(),
                folded = counters.folded,
                events_lost = counters.events_lost,
                reloads = self.reloads,
                failed_reloads = self.failed_reloads,
                "stopped; enforcement stays in force with the last policy (`imds-guard detach` \
                 removes it)"
            ),
            Err(err) => warn!("stopped; counters unreadable: {err}"),
        }
    }

    /// The safety net: a full scan, which finds nothing to change unless a notification was
    /// missed.
    pub fn rescan(&mut self, watcher: &mut Watcher) {
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

    /// Takes in what a posture check found: logged (a warning while IMDSv1 is answered or
    /// the check fails), in `status` and in the metrics.
    pub fn set_posture(&mut self, posture: Posture) {
        let hop_limit = posture
            .hop_limit
            .map_or("unknown".into(), |l| l.to_string());
        match posture.http_tokens {
            HttpTokens::Required => info!(
                http_tokens = "required",
                hop_limit, "posture: IMDS refuses tokenless requests (IMDSv2 only)"
            ),
            HttpTokens::Optional => warn!(
                http_tokens = "optional",
                hop_limit,
                "posture: IMDS answers tokenless (IMDSv1) requests: CIS AWS Foundations 5.6 \
                 fails; `imds-guard report` names the workloads that still use IMDSv1"
            ),
            HttpTokens::Unknown => warn!(
                http_tokens = "unknown",
                "posture: the check got no answer: {}",
                posture.problems.join("; ")
            ),
        }
        self.metrics.set_posture(&posture);
        self.posture = Some((posture, boot_time_ns()));
        self.record(true);
    }

    /// Forgets the last posture check (`posture` turned off by a reload).
    pub fn clear_posture(&mut self) {
        self.posture = None;
        self.metrics.clear_posture();
        self.record(true);
    }

    /// Records the agent's state in the pinned `AGENT` map, for `status`.
    pub fn record(&mut self, running: bool) {
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
            posture_checked_ns: self.posture.as_ref().map_or(0, |(_, at)| *at),
            posture_http_tokens: match self.posture.as_ref().map(|(p, _)| p.http_tokens) {
                None => POSTURE_TOKENS_UNCHECKED,
                Some(HttpTokens::Optional) => POSTURE_TOKENS_OPTIONAL,
                Some(HttpTokens::Required) => POSTURE_TOKENS_REQUIRED,
                Some(HttpTokens::Unknown) => POSTURE_TOKENS_UNKNOWN,
            },
            posture_hop_limit: (self.posture.as_ref())
                .and_then(|(p, _)| p.hop_limit)
                .map_or(0, u32::from),
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

/// Logs the rules a container or a local user could satisfy (as `check-config` lists them).
pub(super) fn warn_of_weak_rules(policy: &Policy) {
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
pub(super) fn newest(dirs: &[CgroupDir]) -> u64 {
    dirs.iter().map(|dir| dir.id).max().unwrap_or(0)
}

/// Says when cgroup entries found no room in the map.
pub(super) fn warn_of_room(compiled: &Compiled) {
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

pub(super) fn warn_too_deep(dirs: &[CgroupDir]) {
    for dir in dirs {
        warn!(
            cgroup = %dir.path,
            "a rule matches this cgroup, but it is {} levels deep and the kernel looks at most \
             {MAX_CGROUP_LEVEL}: tasks in it get the rules of its nearest ancestor that has some",
            dir.level()
        );
    }
}
