//! Reporting the repeats the kernel folded.
//!
//! The programs queue the first attempt of a burst as an event (reported at once) and count the
//! identical attempts that follow within the fold window in the `FOLDS` map instead of queueing
//! them, so a loop on `connect()` cannot fill the ring buffer (see `FoldKey` for "identical").
//! Each entry's count only grows; the agent walks the map and reports what a count grew by as
//! one aggregate event, once the window it belongs to has closed.
//!
//! [`Folds`] is that bookkeeping, free of the kernel: what was reported of each entry, and the
//! event of the burst's first attempt, whose workload the aggregate repeats. It follows only the
//! entries the kernel has (at most `FOLDS_MAX_ENTRIES`), so its memory is bounded too: a walk
//! forgets the entries it did not meet, and between walks (a flood of distinct attempts opens
//! a burst per event, and walks come once a second) [`Folds::prune`] forgets the oldest first
//! attempts whose entries the kernel no longer has, asking it of each (a lookup per burst,
//! where walking the map to find them cost a read of every entry per 1,024 bursts).

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry},
    hash::Hash,
};

use imds_guard_common::{
    event::{FoldKey, FoldValue},
    maps::FOLDS_MAX_ENTRIES,
};

/// First attempts remembered beyond what the kernel's fold map holds before the oldest are
/// pruned (see [`Folds::prune`]).
const FOLDS_PRUNE_SLACK: usize = 1024;
/// Entries followed at most, but for those the kernel still has when pruning.
const FOLDS_FOLLOWED_MAX: usize = FOLDS_MAX_ENTRIES as usize + FOLDS_PRUNE_SLACK;
/// First attempts a prune asks the kernel about at most (a lookup each): a burst costs a few
/// lookups, never one per first attempt kept.
const PRUNE_ASKS_MAX: usize = 4;

/// Repeats to report: `repeats` more attempts like `first` (the burst's first attempt, when the
/// agent saw its event) between `window_start_ns` and `last_ns`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aggregate<V> {
    /// The attempt repeated.
    pub key: FoldKey,
    /// What the burst's first attempt was reported as; `None` when its event was lost or
    /// raised before this agent started.
    pub first: Option<V>,
    /// Repeats not reported before.
    pub repeats: u64,
    /// When the window opened (the first attempt, to the fold clock's resolution), in the
    /// fold clock's nanoseconds (see `FoldValue`).
    pub window_start_ns: u64,
    /// When the last repeat was made.
    pub last_ns: u64,
}

struct Known<V> {
    /// Boxed: the table stays small (a flood keeps thousands) and entries move cheaply.
    first: Option<Box<V>>,
    /// The entry's count when its repeats were last reported.
    reported: u64,
    /// The window the repeats not yet reported belong to, once the agent has seen it.
    window_start_ns: Option<u64>,
    /// The last walk that met the entry (0: none has).
    met: u64,
    /// The number of the first attempt kept (see `Folds::firsts`).
    first_number: u64,
}

impl<V> Known<V> {
    /// An entry the agent learns of from the kernel's map.
    fn unseen() -> Self {
        Self {
            first: None,
            reported: 0,
            window_start_ns: None,
            met: 0,
            first_number: 0,
        }
    }

    /// How many repeats the entry's count `value` holds that were not reported.
    fn unreported(&mut self, value: &FoldValue) -> u64 {
        // A smaller count: the entry was evicted and made anew since the last walk.
        if value.folded < self.reported {
            self.reported = 0;
        }
        value.folded - self.reported
    }

    /// `repeats` of `key`, counted in `value`, to report.
    fn aggregate(&self, key: &FoldKey, value: &FoldValue, repeats: u64) -> Aggregate<V>
    where
        V: Clone,
    {
        let window_start_ns = self.window_start_ns.unwrap_or(value.window_start_ns);
        Aggregate {
            key: *key,
            first: self.first.as_deref().cloned(),
            repeats,
            window_start_ns: window_start_ns.min(value.window_start_ns),
            last_ns: value.last_ns,
        }
    }
}

/// What the agent knows of each kernel fold entry.
pub struct Folds<V> {
    window_ns: u64,
    /// Keyed by what a workload chose (its uid, port, ...): the standard hasher's keyed
    /// `SipHash` keeps a hostile workload from making the agent's lookups collide.
    known: HashMap<FoldKey, Known<V>>,
    /// Walks so far, to mark the entries each met.
    walks: u64,
    /// The first attempts kept, oldest first, each with its number (a key may come again, for
    /// a later burst; then its older number is stale).
    firsts: VecDeque<(u64, FoldKey)>,
    /// First attempts kept so far.
    first_numbers: u64,
    /// `first_numbers` at the last walk: a prune calls for a walk only once as many more as
    /// the slack were kept since.
    first_numbers_walked: u64,
    /// The repeats of open windows the last walk left to report; `None` when it did not reach
    /// the map's end (more may wait).
    pending: Option<u64>,
}

impl<V: Clone> Folds<V> {
    /// Bookkeeping for a fold window of `window_ns`.
    #[must_use]
    pub fn new(window_ns: u64) -> Self {
        Self {
            window_ns,
            // What it holds at most before it is pruned: never grown, so a flood does not copy
            // it on its way there.
            known: HashMap::with_capacity(FOLDS_FOLLOWED_MAX + 1),
            walks: 0,
            firsts: VecDeque::new(),
            first_numbers: 0,
            first_numbers_walked: 0,
            pending: Some(0),
        }
    }

    /// Counts already in the map (folded before this agent started) are not this agent's to
    /// report: the agent before it did, or was killed first (the kernel's totals still hold
    /// them).
    pub fn baseline(&mut self, entries: &[(FoldKey, FoldValue)]) {
        for (key, value) in entries {
            self.known.insert(
                *key,
                Known {
                    first: None,
                    reported: value.folded,
                    window_start_ns: Some(value.window_start_ns),
                    met: 0,
                    first_number: 0,
                },
            );
        }
    }

    /// The event of an attempt that opened a window was reported as `first`.
    pub fn first(&mut self, key: FoldKey, first: V) {
        self.first_numbers += 1;
        let known = self.known.entry(key).or_insert_with(Known::unseen);
        known.first = Some(Box::new(first));
        known.first_number = self.first_numbers;
        self.firsts.push_back((self.first_numbers, key));
    }

    /// When more entries are followed than the kernel's map holds and the slack
    /// (`FOLDS_PRUNE_SLACK`), forgets the oldest first attempts whose entries the kernel no
    /// longer has (`held` asks it, of `PRUNE_ASKS_MAX` at most; an entry it still has is kept,
    /// as the newest) until they are few enough. An entry no walk met has nothing reported to
    /// remember: only its first attempt is lost with it, which was reported at once; one a
    /// walk met is a walk's to forget. A flood of distinct attempts thus costs a lookup per
    /// burst, not a walk.
    ///
    /// Returns whether as many are still followed and `FOLDS_PRUNE_SLACK` bursts came since
    /// the last walk: the kernel still has the oldest first attempts, and the entries it no
    /// longer has are ones a walk met (repeated bursts since evicted). Then a walk is due,
    /// which forgets every entry the kernel no longer has, where asking of every first
    /// attempt would cost a lookup each per burst. At most one per `FOLDS_PRUNE_SLACK`
    /// bursts, whatever a walk finds: under churn a walk can meet more entries than the map
    /// holds (a batch read goes bucket by bucket while bursts evict and add entries), all of
    /// them kept, and a walk per burst would then follow.
    #[must_use]
    pub fn prune(&mut self, mut held: impl FnMut(&FoldKey) -> bool) -> bool {
        let mut asks = PRUNE_ASKS_MAX;
        while self.known.len() > FOLDS_FOLLOWED_MAX && asks > 0 {
            let Some((number, key)) = self.firsts.pop_front() else {
                break;
            };
            // One hash of the key for the look and the removal.
            let Entry::Occupied(known) = self.known.entry(key) else {
                continue;
            };
            if known.get().first_number != number {
                continue;
            }
            if known.get().window_start_ns.is_some() {
                // Met by a walk: what was reported of it must not be forgotten while the
                // kernel has it. Its first attempt stays with it, no longer queued here.
                continue;
            }
            asks -= 1;
            if held(&key) {
                self.firsts.push_back((number, key));
            } else {
                known.remove();
            }
        }
        // Numbers gone stale (entries a walk forgot, keys that came again) are dropped once
        // they outnumber what is followed.
        if self.firsts.len() > 2 * FOLDS_FOLLOWED_MAX {
            let known = &self.known;
            self.firsts.retain(|(number, key)| {
                known.get(key).is_some_and(|known| {
                    known.first_number == *number && known.window_start_ns.is_none()
                })
            });
        }
        self.known.len() > FOLDS_FOLLOWED_MAX
            && self.first_numbers - self.first_numbers_walked >= FOLDS_PRUNE_SLACK as u64
    }

    /// Entries followed (call [`Folds::collect`] to drop those the kernel no longer has).
    #[must_use]
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Whether the last walk left repeats to report (or did not reach the map's end).
    #[must_use]
    pub fn pending(&self) -> bool {
        self.pending != Some(0)
    }

    /// How many repeats of open windows the last walk left to report, when it reached the
    /// map's end.
    #[must_use]
    pub fn pending_repeats(&self) -> Option<u64> {
        self.pending
    }

    /// Whether none is followed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Compares the kernel's entries now (`walk`, at `now_ns`, in the fold clock) with what was
    /// reported: returns the repeats to report, of closed windows only unless `all` (the agent
    /// is stopping), and forgets the entries the kernel no longer has. After a walk cut short,
    /// the entries it did not meet may still be there: they are kept (up to the kernel's
    /// `max_entries` in all), or their repeats would be reported again when next met.
    pub fn collect(
        &mut self,
        walk: &Walk<FoldKey, FoldValue>,
        now_ns: u64,
        all: bool,
    ) -> Vec<Aggregate<V>> {
        let mut due = Vec::new();
        let mut pending = 0;
        self.walks += 1;
        self.first_numbers_walked = self.first_numbers;
        let walk_id = self.walks;
        for (key, value) in &walk.entries {
            let known = self.known.entry(*key).or_insert_with(Known::unseen);
            known.met = walk_id;
            let repeats = known.unreported(value);
            let window_start_ns = *known.window_start_ns.get_or_insert(value.window_start_ns);
            let closed = all
                || now_ns.saturating_sub(value.window_start_ns) >= self.window_ns
                // Opened a window or more after now: timed by another clock than this agent's
                // (a predecessor's), which the kernel takes for closed too.
                || value.window_start_ns.saturating_sub(now_ns) >= self.window_ns
                // A window opened since: the repeats counted so far belong to earlier ones.
                || value.window_start_ns != window_start_ns;
            if repeats > 0 && closed {
                due.push(known.aggregate(key, value, repeats));
                known.reported = value.folded;
            }
            if repeats == 0 || closed {
                known.window_start_ns = Some(value.window_start_ns);
            } else {
                pending += repeats;
            }
        }
        self.pending = walk.complete.then_some(pending);
        // The entries the walk did not meet are gone from the kernel, unless it was cut short.
        let mut room = if walk.complete {
            0
        } else {
            (FOLDS_MAX_ENTRIES as usize).saturating_sub(walk.entries.len())
        };
        self.known.retain(|_, known| {
            let keep = known.met == walk_id || room > 0;
            if known.met != walk_id && keep {
                room -= 1;
            }
            keep
        });
        due
    }

    /// The `entries` of a generation no program judges by any more (the policy switched away
    /// from it and the grace period is over, so their counts are final): returns all their
    /// repeats not yet reported and forgets them. The caller deletes them from the kernel's
    /// map, so that the generation's slot, once reused by a later policy, starts bursts of its
    /// own instead of adding to bursts an earlier policy judged (the rule numbers of the two
    /// policies name different rules).
    pub fn retire(&mut self, entries: &[(FoldKey, FoldValue)]) -> Vec<Aggregate<V>> {
        let mut due = Vec::new();
        for (key, value) in entries {
            let mut known = self.known.remove(key).unwrap_or_else(Known::unseen);
            let repeats = known.unreported(value);
            if repeats > 0 {
                due.push(known.aggregate(key, value, repeats));
            }
        }
        due
    }
}

/// What a walk over a BPF hash map met: each entry once. A walk steps from each key to the
/// next; when the key it stands on is deleted (evicted) meanwhile, the kernel starts it over
/// from the first bucket, so entries can come again. Each is kept once, with the value read last
/// (the freshest): reporting an entry twice would report its repeats twice.
#[derive(Debug)]
pub struct Walk<K, V> {
    /// The entries met.
    pub entries: Vec<(K, V)>,
    /// Whether the walk reached the end of the map, so that an entry it did not meet is gone.
    pub complete: bool,
}

impl<K: Hash + Eq, V> Walk<K, V> {
    /// Takes the `steps` of a walk until the map's end, a failed step, or `limit` steps (under
    /// constant eviction a walk might never end).
    pub fn new<E>(steps: impl IntoIterator<Item = Result<(K, V), E>>, limit: usize) -> Self {
        let mut entries = HashMap::new();
        let mut steps = steps.into_iter();
        let mut complete = false;
        for _ in 0..limit {
            match steps.next() {
                Some(Ok((key, value))) => {
                    entries.insert(key, value);
                }
                Some(Err(_)) => break,
                None => {
                    complete = true;
                    break;
                }
            }
        }
        Self {
            entries: entries.into_iter().collect(),
            complete,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn key(cgroup_id: u64) -> FoldKey {
        FoldKey {
            cgroup_id,
            uid: 1000,
            gid: 1000,
            rule: 0,
            verdict: 1,
            generation: 0,
            hook: 1,
            family: 2,
            addr: [169, 254, 169, 254, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            tgid: 4242,
            port: 80,
            flags: 0,
            imds_version: 0,
        }
    }

    /// A walk that met `entries` and reached the map's end.
    fn complete(entries: &[(FoldKey, FoldValue)]) -> Walk<FoldKey, FoldValue> {
        Walk {
            entries: entries.to_vec(),
            complete: true,
        }
    }

    fn value(window_start_ns: u64, last_ns: u64, folded: u64) -> FoldValue {
        FoldValue {
            window_start_ns,
            last_ns,
            folded,
        }
    }

    #[test]
    fn repeats_are_reported_once_their_window_has_closed() {
        let mut folds = Folds::new(10 * SECOND);
        folds.first(key(1), "first");
        let entries = complete(&[(key(1), value(0, 2 * SECOND, 41))]);
        assert!(folds.collect(&entries, 5 * SECOND, false).is_empty());
        assert_eq!(
            folds.pending_repeats(),
            Some(41),
            "left for when the window closes"
        );
        let due = folds.collect(&entries, 10 * SECOND, false);
        assert_eq!(folds.pending_repeats(), Some(0));
        assert_eq!(
            due,
            [Aggregate {
                key: key(1),
                first: Some("first"),
                repeats: 41,
                window_start_ns: 0,
                last_ns: 2 * SECOND
            }]
        );
        // Reported once: the same count again is nothing new.
        assert!(folds.collect(&entries, 20 * SECOND, false).is_empty());
        // More repeats in a later window are reported as what the count grew by.
        folds.first(key(1), "second window");
        let later = [(key(1), value(30 * SECOND, 31 * SECOND, 50))];
        let due = folds.collect(&complete(&later), 31 * SECOND, false);
        assert_eq!(due.len(), 1, "a new window closes the old one's count");
        assert_eq!((due[0].repeats, due[0].first), (9, Some("second window")));
    }

    #[test]
    fn a_window_timed_by_another_clock_is_closed() {
        // A predecessor's window, opened an hour "after" now by its clock.
        let mut folds: Folds<&str> = Folds::new(10 * SECOND);
        let entries = complete(&[(key(1), value(3600 * SECOND, 3600 * SECOND, 4))]);
        let due = folds.collect(&entries, 5 * SECOND, false);
        assert_eq!(due.len(), 1, "reported, not left pending: {due:?}");
        assert_eq!(due[0].repeats, 4);
        // Within a window after now (another CPU opened it a little later): still open.
        let mut folds: Folds<&str> = Folds::new(10 * SECOND);
        let entries = complete(&[(key(1), value(6 * SECOND, 6 * SECOND, 4))]);
        assert!(folds.collect(&entries, 5 * SECOND, false).is_empty());
    }

    #[test]
    fn stopping_reports_open_windows_and_counts_from_before_are_not_reported() {
        let mut folds: Folds<&str> = Folds::new(10 * SECOND);
        folds.baseline(&[(key(1), value(0, 0, 7))]);
        let entries = [
            (key(1), value(0, SECOND, 10)),
            (key(2), value(0, SECOND, 3)),
        ];
        let due = folds.collect(&complete(&entries), SECOND, true);
        let repeats: Vec<(u64, u64, Option<&str>)> = due
            .iter()
            .map(|a| (a.key.cgroup_id, a.repeats, a.first))
            .collect();
        assert!(repeats.contains(&(1, 3, None)), "{repeats:?}");
        assert!(repeats.contains(&(2, 3, None)), "{repeats:?}");
    }

    #[test]
    fn a_walk_started_over_yields_each_entry_once_with_its_latest_value() {
        let steps = [(1, 10), (2, 20), (1, 11), (2, 21), (3, 30)].map(Ok::<_, ()>);
        let walk = Walk::new(steps, 10);
        let mut entries = walk.entries;
        entries.sort_unstable();
        assert_eq!(entries, [(1, 11), (2, 21), (3, 30)]);
        assert!(walk.complete);
        let endless = [(1, 10), (2, 20)].map(Ok::<_, ()>).into_iter().cycle();
        let walk = Walk::new(endless, 5);
        assert_eq!((walk.entries.len(), walk.complete), (2, false));
        let failed = Walk::new([Ok((1, 10)), Err("EIO"), Ok((2, 20))], 10);
        assert_eq!((failed.entries, failed.complete), (vec![(1, 10)], false));
    }

    #[test]
    fn a_walk_cut_short_forgets_no_entry_it_did_not_meet() {
        let mut folds = Folds::new(SECOND);
        folds.first(key(1), "a");
        folds.first(key(2), "b");
        let both = [(key(1), value(0, 0, 5)), (key(2), value(0, 0, 7))];
        assert_eq!(folds.collect(&complete(&both), 2 * SECOND, false).len(), 2);
        // Key 2 was not met: it is still known, with what was reported of it.
        let cut = Walk {
            entries: vec![(key(1), value(0, 0, 5))],
            complete: false,
        };
        assert!(folds.collect(&cut, 3 * SECOND, false).is_empty());
        assert_eq!(folds.len(), 2);
        assert_eq!(
            folds.pending_repeats(),
            None,
            "what waits unmet is not known"
        );
        let later = [(key(1), value(0, 0, 5)), (key(2), value(0, 0, 8))];
        let due = folds.collect(&complete(&later), 4 * SECOND, false);
        assert_eq!((due.len(), due[0].repeats), (1, 1), "{due:?}");
    }

    #[test]
    fn a_retired_generation_reports_all_its_repeats_and_is_forgotten() {
        let mut folds = Folds::new(10 * SECOND);
        folds.first(key(1), "first");
        // Part reported in a walk before the switch (a new window closed the old one's).
        let _ = folds.collect(
            &complete(&[(key(1), value(0, SECOND, 4))]),
            2 * SECOND,
            false,
        );
        let due = folds.collect(
            &complete(&[(key(1), value(3 * SECOND, 3 * SECOND, 6))]),
            4 * SECOND,
            false,
        );
        assert_eq!(due[0].repeats, 6);
        // Counted since, in a window still open: reported at once, as final.
        let due = folds.retire(&[(key(1), value(3 * SECOND, 5 * SECOND, 9))]);
        assert_eq!(
            due,
            [Aggregate {
                key: key(1),
                first: Some("first"),
                repeats: 3,
                window_start_ns: 3 * SECOND,
                last_ns: 5 * SECOND
            }]
        );
        assert!(folds.is_empty());
        // Nothing new: nothing to report.
        assert!(folds.retire(&[(key(2), value(0, 0, 0))]).is_empty());
    }

    #[test]
    fn a_flood_of_bursts_forgets_the_oldest_the_kernel_no_longer_has() {
        let mut folds = Folds::new(SECOND);
        // A walk met key 0 and reported its repeats: a walk's to forget, never a prune's.
        folds.first(key(0), 0);
        let walked = (key(0), value(0, 0, 5));
        let _ = folds.collect(&complete(&[walked]), 2 * SECOND, false);
        let flood = FOLDS_FOLLOWED_MAX as u64 + 2_000;
        // The kernel still has every third burst's entry, and key 0's.
        let held = |key: &FoldKey| key.cgroup_id.is_multiple_of(3);
        let kernel = |up_to: u64| -> Vec<(FoldKey, FoldValue)> {
            std::iter::once(walked)
                .chain(
                    (3..=up_to)
                        .step_by(3)
                        .map(|id| (key(id), value(2 * SECOND, 2 * SECOND, 0))),
                )
                .collect()
        };
        let (mut asked, mut walks) = (0, 0);
        for cgroup_id in 1..=flood {
            folds.first(key(cgroup_id), cgroup_id);
            let asked_before = asked;
            let held = |key: &FoldKey| {
                asked += 1;
                held(key)
            };
            if folds.prune(held) {
                // The reporter walks the map then.
                walks += 1;
                let due = folds.collect(&complete(&kernel(cgroup_id)), 2 * SECOND, false);
                assert!(due.is_empty(), "nothing was repeated: {due:?}");
            }
            assert!(asked - asked_before <= PRUNE_ASKS_MAX);
            assert!(
                folds.len() <= FOLDS_FOLLOWED_MAX,
                "{} followed",
                folds.len()
            );
        }
        // Mostly a lookup per burst (the kernel no longer has the oldest), few walks.
        assert!(
            asked < 2 * usize::try_from(flood).unwrap(),
            "{asked} lookups"
        );
        assert!(walks < flood / 1000, "{walks} walks");
        for cgroup_id in (3..=flood).step_by(3) {
            assert_eq!(
                folds
                    .known
                    .get(&key(cgroup_id))
                    .and_then(|known| known.first.as_deref().copied()),
                Some(cgroup_id),
                "the kernel still folds burst {cgroup_id}"
            );
        }
        assert!(!folds.known.contains_key(&key(1)), "the oldest gone first");
        assert!(folds.known.contains_key(&key(flood - 1)), "the newest kept");
        // The walked entry kept what was reported of it: the same count is nothing new.
        assert_eq!(folds.known[&key(0)].reported, 5);
        let due = folds.collect(&complete(&[walked]), 3 * SECOND, false);
        assert!(due.is_empty(), "{due:?}");
        // Stale queue entries do not pile up beyond twice what is followed.
        for _ in 0..3 {
            for cgroup_id in (1..=flood).filter(|id| !id.is_multiple_of(3)) {
                folds.first(key(cgroup_id), cgroup_id);
                let _ = folds.prune(held);
            }
        }
        assert!(folds.firsts.len() <= 2 * FOLDS_FOLLOWED_MAX + 1);
    }

    #[test]
    fn a_kernel_that_still_has_the_first_attempts_costs_a_few_lookups_then_a_walk() {
        // Repeated bursts a walk met, since evicted by newer bursts the kernel still has all
        // of: asking of every first attempt per burst would be thousands of lookups each.
        let mut folds = Folds::new(SECOND);
        let repeated: Vec<_> = (0..6_000)
            .map(|id| (key(1_000_000 + id), value(0, 0, 1)))
            .collect();
        let due = folds.collect(&complete(&repeated), 2 * SECOND, false);
        assert_eq!(due.len(), repeated.len());
        let mut kernel = Vec::new();
        let (mut asked, mut walks) = (0, 0);
        for cgroup_id in 0..5_000 {
            folds.first(key(cgroup_id), cgroup_id);
            kernel.push((key(cgroup_id), value(3 * SECOND, 3 * SECOND, 0)));
            let asked_before = asked;
            if folds.prune(|_| {
                asked += 1;
                true
            }) {
                walks += 1;
                let _ = folds.collect(&complete(&kernel), 3 * SECOND, false);
            }
            assert!(
                asked - asked_before <= PRUNE_ASKS_MAX,
                "{} lookups for burst {cgroup_id}",
                asked - asked_before
            );
            assert!(folds.len() <= FOLDS_FOLLOWED_MAX);
        }
        assert_eq!(walks, 1, "one walk forgot every evicted entry");
        // Every first attempt kept: the kernel has them all.
        assert_eq!(folds.len(), 5_000);
        assert!(
            (0..5_000).all(|id| folds.known[&key(id)].first == Some(Box::new(id))),
            "a first attempt lost"
        );
    }

    #[test]
    fn a_walk_that_met_more_than_the_map_holds_does_not_call_for_a_walk_per_burst() {
        // Under churn a batch read can meet more distinct entries than the map holds (bucket
        // by bucket, while bursts evict and add): all kept, so many are followed after it.
        let mut folds = Folds::new(SECOND);
        let churned: Vec<_> = (0..FOLDS_FOLLOWED_MAX as u64 + 1_000)
            .map(|id| (key(1_000_000 + id), value(0, 0, 1)))
            .collect();
        let _ = folds.collect(&complete(&churned), 2 * SECOND, false);
        assert!(folds.len() > FOLDS_FOLLOWED_MAX);
        let bursts = 3_000;
        let mut walks = 0;
        for cgroup_id in 0..bursts {
            folds.first(key(cgroup_id), cgroup_id);
            if folds.prune(|_| false) {
                walks += 1;
                // And the churn goes on.
                let _ = folds.collect(&complete(&churned), 2 * SECOND, false);
            }
        }
        assert!(
            walks <= bursts / FOLDS_PRUNE_SLACK as u64,
            "{walks} walks for {bursts} bursts"
        );
        assert!(folds.len() <= churned.len() + FOLDS_PRUNE_SLACK);
    }

    #[test]
    fn an_evicted_entry_is_forgotten_and_a_new_one_counts_from_zero() {
        let mut folds = Folds::new(SECOND);
        folds.first(key(1), "a");
        let _ = folds.collect(&complete(&[(key(1), value(0, 0, 5))]), 2 * SECOND, false);
        assert_eq!(folds.len(), 1);
        // Gone from the kernel: forgotten here (memory follows the kernel's bound).
        assert!(folds.collect(&complete(&[]), 3 * SECOND, false).is_empty());
        assert!(folds.is_empty());
        // Evicted and made anew with a smaller count while the agent was not looking.
        folds.first(key(1), "b");
        let _ = folds.collect(
            &complete(&[(key(1), value(4 * SECOND, 4 * SECOND, 9))]),
            9 * SECOND,
            false,
        );
        let due = folds.collect(
            &complete(&[(key(1), value(10 * SECOND, 10 * SECOND, 2))]),
            20 * SECOND,
            false,
        );
        assert_eq!(due[0].repeats, 2);
    }
}
