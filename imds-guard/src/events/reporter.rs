//! The agent's event output: ring-buffer records turned into JSON lines (decoded, named,
//! enriched), and the kernel's counts of folded repeats into aggregate lines, with the
//! accounting that says where every attempt went.

use std::{borrow::Cow, collections::HashMap, sync::Arc};

use aya::maps::{MapData, MapError, RingBuf};
use imds_guard_common::{
    event::{Event, FoldKey, FoldValue},
    maps::{EVENTS_RING_BYTES, FOLDS_MAX_ENTRIES},
    policy::RULE_DEFAULT,
};
use tracing::warn;

use crate::{
    events::{
        self, CgroupFacts, Record, UnixTime,
        accounting::Accounting,
        enrich::{Enricher, Now},
        folds::{Aggregate, Folds, Walk},
        output::Output,
    },
    host::{
        cgroups::Hierarchy,
        clock::{Clock, FoldTimes, boot_to_unix_ns},
    },
    kernel::sys,
    policy::Policy,
};

/// Cgroups remembered for events (their paths and what those tell); cleared when it grows past this many entries.
const CGROUP_CACHE_ENTRIES: usize = 4096;
/// Records one drain takes from the ring at most: what the ring can hold at once (an event
/// plus the 8-byte record header each). Bounded so a flood cannot starve signals, and
/// large enough that, the ring being FIFO, one drain takes everything present when it began.
const DRAIN_BATCH_RECORDS: usize = (EVENTS_RING_BYTES as usize).div_ceil(size_of::<Event>() + 8);
/// What user and group database lookups may spend per second (a tenth of a CPU); names not
/// looked up are left unread.
const LOOKUP_BUDGET: std::time::Duration = std::time::Duration::from_millis(100);

/// The kernel's fold map, as the agent holds it.
pub type FoldMap = aya::maps::HashMap<MapData, FoldKey, FoldValue>;

/// Turns ring-buffer records into JSON lines on stdout, each enriched and reported at once, and
/// the kernel's counts of folded repeats into aggregate lines.
pub struct Reporter {
    /// The policy of each generation, to name the rule that decided an event.
    policies: [Option<Policy>; 2],
    /// The names of each generation's rules by id (`default` first), shared by the events
    /// that name them.
    rule_names: [Vec<Arc<str>>; 2],
    /// Its own handle on the hierarchy, to name cgroups from their ids.
    hierarchy: Hierarchy,
    cgroups: HashMap<u64, Arc<CgroupFacts>>,
    enricher: Enricher,
    /// The kernel's fold entries (`None`: folding is off).
    fold_map: Option<FoldMap>,
    /// Their times, as Unix time.
    fold_times: FoldTimes,
    folds: Folds<Record>,
    /// The kernel's total of folded repeats when the map was last walked.
    folded_seen: u64,
    accounting: Accounting,
    output: Output,
}

impl Reporter {
    /// A reporter that knows no policy yet: events name rules by number until it does. The
    /// counts already in `fold_map` are not its to report, nor is anything the kernel had
    /// folded when it started (`folded_at_start`).
    #[must_use]
    pub fn new(
        hierarchy: Hierarchy,
        fold_map: Option<FoldMap>,
        fold_window_ns: u64,
        fold_clock: Clock,
        folded_at_start: u64,
    ) -> Self {
        let mut folds = Folds::new(fold_window_ns);
        if let Some(map) = &fold_map {
            folds.baseline(&fold_entries(map).entries);
        }
        let mut enricher = Enricher::new();
        enricher.limit_lookups(LOOKUP_BUDGET);
        Self {
            policies: [None, None],
            rule_names: [Vec::new(), Vec::new()],
            hierarchy,
            cgroups: HashMap::new(),
            enricher,
            fold_map,
            fold_times: FoldTimes::new(fold_clock),
            folds,
            folded_seen: 0,
            accounting: Accounting::new(folded_at_start),
            output: Output::default(),
        }
    }

    /// Where every attempt went, so far.
    #[must_use]
    pub fn accounting(&self) -> &Accounting {
        &self.accounting
    }

    /// The policy `generation` is of, to name its rules.
    pub fn set_policy(&mut self, generation: u32, policy: Policy) {
        let slot = usize::from(generation != 0);
        self.rule_names[slot] = (0..=policy.rules.len())
            .map(|id| u32::try_from(id).map_or("default", |id| policy.rule_name(id)))
            .map(Arc::from)
            .collect();
        self.policies[slot] = Some(policy);
    }

    /// The name of rule `rule` of `generation`'s policy.
    fn rule_name_of(&self, generation: u8, rule: u32) -> Arc<str> {
        let names = &self.rule_names[usize::from(generation != 0)];
        usize::try_from(rule)
            .ok()
            .and_then(|id| names.get(id))
            .map_or_else(
                || Arc::from(Self::rule_name(&self.policies, generation, rule)),
                Arc::clone,
            )
    }

    fn rule_name(policies: &[Option<Policy>; 2], generation: u8, rule: u32) -> Cow<'_, str> {
        match &policies[usize::from(generation != 0)] {
            Some(policy) => Cow::Borrowed(policy.rule_name(rule)),
            None if rule == RULE_DEFAULT => Cow::Borrowed("default"),
            // Judged before this agent started, by a policy it never saw.
            None => Cow::Owned(format!("rule {rule} of an earlier policy")),
        }
    }

    /// Warns of repeats found evicted unreported since the last warning.
    pub fn warn_of_new_unreported(&mut self) {
        if let Some(new) = self.accounting.newly_unreported() {
            warn!(
                repeats_unreported = self.accounting.unreported(),
                "{new} repeats the kernel counted will never be reported: their fold entry was \
                 evicted first (more distinct attempts repeated within one window than the map \
                 holds, {FOLDS_MAX_ENTRIES}), or they were made as the agent started; verdicts \
                 stood"
            );
        }
    }

    /// Reports everything in the ring; returns how many events that was.
    pub fn drain_all(&mut self, ring: &mut RingBuf<MapData>) -> u64 {
        let before = self.accounting.reported();
        while !self.drain(ring) {}
        self.accounting.reported() - before
    }

    /// Reports the records in the ring, at most `DRAIN_BATCH_RECORDS`, then flushes stdout
    /// once. Returns whether the ring is now empty.
    pub fn drain(&mut self, ring: &mut RingBuf<MapData>) -> bool {
        let offset = clock_offset();
        let now = Now::read();
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
            let rule = self.rule_name_of(raw.generation, raw.rule);
            let cgroup = cgroup_facts(&mut self.cgroups, &self.hierarchy, raw.cgroup_id);
            let mut record = Record::new(&event, offset, cgroup, &rule);
            record.enrich(&mut self.enricher, raw.boot_ns, &now);
            self.output.emit(&record);
            self.accounting.reported_one();
            if let Some(map) = &self.fold_map {
                // The first attempts of bursts are remembered until the kernel forgets the
                // bursts: asked of the oldest, or, when it still has them, found by a walk.
                self.folds.first(FoldKey::of(raw), record);
                if self.folds.prune(|key| fold_held(map, key)) {
                    self.report_folds(None, false);
                }
            }
        }
        self.output.flush();
        empty
    }

    /// Reports what the current policies judged before a generation slot is reused (events
    /// and repeats name their rule by its number in its generation): what is in the ring (one
    /// batch holds all of it, so this needs no loop), and every repeat counted so far.
    pub fn before_switch(&mut self, ring: &mut RingBuf<MapData>) {
        let _ = self.drain(ring);
        self.report_folds(None, true);
    }

    /// Reports the repeats the kernel folded whose window has closed (all of them when
    /// `all`). `folded_total`, the kernel's counter, spares the walk when nothing was folded
    /// since the last one and nothing was left waiting.
    pub fn report_folds(&mut self, folded_total: Option<u64>, all: bool) {
        let Some(map) = &self.fold_map else {
            return;
        };
        // Every second, whether the map is walked or not: a hibernation is noted before the
        // windows opened after it are reported.
        self.fold_times.sample();
        if !all && folded_total == Some(self.folded_seen) && !self.folds.pending() {
            return;
        }
        if let Some(total) = folded_total {
            self.folded_seen = total;
        }
        let walk = fold_entries(map);
        let due = self
            .folds
            .collect(&walk, self.fold_times.clock().now_ns(), all);
        self.emit_aggregates(due);
        if let (Some(total), Some(pending)) = (folded_total, self.folds.pending_repeats()) {
            self.accounting.after_walk(total, pending);
        }
    }

    /// Reports the repeats of `generation`, which the policy switched away from (they are
    /// final now), and deletes its entries from the kernel's map: when a later policy reuses
    /// the slot, its attempts open bursts of their own, reported at once and named by its
    /// rules, instead of adding to an earlier policy's.
    pub fn retire(&mut self, generation: u32) {
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

    /// Stopping: reports what is left, every event in the ring and every repeat counted so
    /// far. Then read the kernel's total of folded repeats and settle with [`Reporter::at_stop`].
    pub fn finish(&mut self, ring: &mut RingBuf<MapData>) {
        let _ = self.drain_all(ring);
        self.report_folds(None, true);
    }

    /// Settles the accounting with the kernel's total of folded repeats, read after
    /// [`Reporter::finish`]: whatever no aggregate said was evicted unreported.
    pub fn at_stop(&mut self, folded_total: u64) {
        self.accounting.at_stop(folded_total);
        self.warn_of_new_unreported();
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
            self.accounting.aggregated(aggregate.repeats);
            // The fold clock's times (the first attempt's identity, from its event, is the
            // event's own).
            let unix = |ns| UnixTime(self.fold_times.unix_ns(ns, offset));
            self.output.emit(&first.aggregate(
                aggregate.repeats,
                unix(aggregate.window_start_ns),
                unix(aggregate.last_ns),
            ));
        }
        self.output.flush();
    }

    /// What the repeats of `key` share, when the agent never saw the burst's first attempt.
    fn repeats_without_first(&mut self, key: &FoldKey, offset: i128) -> Option<Record> {
        let rule = self.rule_name_of(key.generation, key.rule);
        let cgroup = cgroup_facts(&mut self.cgroups, &self.hierarchy, key.cgroup_id);
        match Record::of_repeats(key, offset, cgroup, &rule) {
            Ok(mut record) => {
                record.enrich(&mut self.enricher, 0, &Now::read());
                Some(record)
            }
            Err(err) => {
                warn!("dropping the repeats of a malformed attempt: {err}");
                None
            }
        }
    }
}

/// What the cgroup `id` tells, from `cache` or worked out from its path in `hierarchy`.
fn cgroup_facts<'a>(
    cache: &'a mut HashMap<u64, Arc<CgroupFacts>>,
    hierarchy: &Hierarchy,
    id: u64,
) -> &'a Arc<CgroupFacts> {
    if cache.len() >= CGROUP_CACHE_ENTRIES && !cache.contains_key(&id) {
        cache.clear();
    }
    cache
        .entry(id)
        .or_insert_with(|| Arc::new(CgroupFacts::of(hierarchy.path_of(id))))
}

/// Nanoseconds from `CLOCK_BOOTTIME` to Unix time now (0, with a warning, if unreadable).
fn clock_offset() -> i128 {
    boot_to_unix_ns().unwrap_or_else(|err| {
        warn!("cannot read the clocks ({err}): event times are since boot");
        0
    })
}

/// Whether the kernel's fold map has an entry for `key`. A failed lookup says no: the agent's
/// memory stays bounded, at the cost of a first attempt's details on an aggregate.
fn fold_held(map: &FoldMap, key: &FoldKey) -> bool {
    map.get(key, 0).is_ok()
}

/// Deletes the fold entry of `key`; gone already (evicted) is as good as deleted.
pub fn delete_fold(map: &mut FoldMap, key: &FoldKey) {
    if let Err(err) = map.remove(key)
        && !matches!(err, MapError::KeyNotFound)
    {
        warn!("cannot delete a fold entry: {err}");
    }
}

/// Fold entries the kernel hands over per call of a batch read.
const FOLDS_BATCH_ENTRIES: usize = 1024;

/// The kernel's fold entries: read in batches (a call per 1,024 entries), or, where the kernel
/// refuses that, walked key by key (two calls per entry; see [`Walk`]).
#[must_use]
pub fn fold_entries(map: &FoldMap) -> Walk<FoldKey, FoldValue> {
    match sys::map_entries(map, FOLDS_BATCH_ENTRIES) {
        Ok(entries) => Walk {
            entries,
            complete: true,
        },
        Err(err) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                warn!(
                    "the kernel refused a batch read of the fold map ({err}): walking it key by key"
                );
            });
            Walk::new(map.iter(), 2 * FOLDS_MAX_ENTRIES as usize)
        }
    }
}
