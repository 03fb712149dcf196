//! Where every denied or audited attempt went, so that
//!
//! ```text
//! events reported at once + repeats reported in aggregates + repeats unreported + events lost
//!   = attempts
//! ```
//!
//! holds exactly when the agent stops, and from below while it runs. The kernel counts the
//! attempts, the lost events (ring full) and the repeats it folded; the agent counts what it
//! reported. A repeat that is neither reported nor waiting in an open window was evicted from
//! the LRU fold map first: unreported.

/// The agent's side of the sum (the kernel's totals come in as arguments).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accounting {
    /// The kernel's total of folded repeats when this agent started: not its to report (the
    /// agent before it did, or was killed first).
    folded_at_start: u64,
    /// Attempts reported at once, each on its own line.
    reported: u64,
    /// Repeats reported in aggregate lines.
    aggregated: u64,
    /// Repeats found evicted unreported: a lower bound while the agent runs, exact after
    /// [`Accounting::at_stop`].
    unreported: u64,
    /// What of `unreported` was warned of.
    warned: u64,
}

impl Accounting {
    /// The bookkeeping of an agent that starts when the kernel has folded `folded_at_start`.
    #[must_use]
    pub fn new(folded_at_start: u64) -> Self {
        Self {
            folded_at_start,
            ..Self::default()
        }
    }

    /// One attempt reported at once.
    pub fn reported_one(&mut self) {
        self.reported += 1;
    }

    /// `repeats` reported in an aggregate.
    pub fn aggregated(&mut self, repeats: u64) {
        self.aggregated += repeats;
    }

    /// Of the repeats the kernel folded since this agent started (`folded_total` now), those
    /// it has not reported: waiting for their window to close, or evicted from the LRU fold
    /// map first.
    #[must_use]
    pub fn not_reported(&self, folded_total: u64) -> u64 {
        folded_total
            .saturating_sub(self.folded_at_start)
            .saturating_sub(self.aggregated)
    }

    /// After a walk of the fold map that reached its end: `folded_total` (read before the
    /// walk) minus what was reported and what waits in open windows (`pending`) was evicted.
    /// Repeats counted after the read only lower the figure, so it never says more than were
    /// evicted.
    pub fn after_walk(&mut self, folded_total: u64, pending: u64) {
        let evicted = self.not_reported(folded_total).saturating_sub(pending);
        self.unreported = self.unreported.max(evicted);
    }

    /// When the agent stops, every window having been reported: whatever the kernel folded and
    /// no aggregate said was evicted. Exact now.
    pub fn at_stop(&mut self, folded_total: u64) {
        self.unreported = self.unreported.max(self.not_reported(folded_total));
    }

    /// Unreported repeats found since the last call, if any (to warn of).
    pub fn newly_unreported(&mut self) -> Option<u64> {
        let new = self
            .unreported
            .checked_sub(self.warned)
            .filter(|&new| new > 0)?;
        self.warned = self.unreported;
        Some(new)
    }

    /// Attempts reported at once so far.
    #[must_use]
    pub fn reported(&self) -> u64 {
        self.reported
    }

    /// Repeats reported in aggregates so far.
    #[must_use]
    pub fn aggregated_so_far(&self) -> u64 {
        self.aggregated
    }

    /// Repeats found evicted unreported so far.
    #[must_use]
    pub fn unreported(&self) -> u64 {
        self.unreported
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use imds_guard_common::event::{FoldKey, FoldValue};

    use super::*;
    use crate::events::folds::{Folds, Walk};

    /// A small, seeded generator: the same scenarios every run.
    struct Xorshift(u64);

    impl Xorshift {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }

        fn index(&mut self, n: u64) -> usize {
            usize::try_from(self.below(n)).expect("a small number")
        }
    }

    fn key(workload: u64) -> FoldKey {
        FoldKey {
            cgroup_id: workload,
            uid: 1000,
            gid: 1000,
            rule: 0,
            verdict: 1,
            generation: 0,
            hook: 1,
            family: 2,
            addr: [169, 254, 169, 254, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            tgid: 1,
            port: 80,
            flags: 0,
            imds_version: 0,
        }
    }

    /// The kernel's side, simulated: an LRU fold map of `capacity` entries, a ring of
    /// `ring` events, and its totals.
    struct Kernel {
        capacity: usize,
        map: HashMap<FoldKey, (FoldValue, u64)>,
        clock: u64,
        ring: Vec<FoldKey>,
        ring_capacity: usize,
        attempts: u64,
        lost: u64,
        folded: u64,
    }

    impl Kernel {
        const WINDOW: u64 = 10;

        /// One attempt by `workload` at time `now`: folded as a repeat, queued, or lost.
        fn attempt(&mut self, workload: u64, now: u64) {
            self.attempts += 1;
            self.clock += 1;
            let key = key(workload);
            if let Some((value, used)) = self.map.get_mut(&key)
                && now.saturating_sub(value.window_start_ns) < Self::WINDOW
            {
                value.folded += 1;
                value.last_ns = now;
                *used = self.clock;
                self.folded += 1;
                return;
            }
            if let Some((value, used)) = self.map.get_mut(&key) {
                value.window_start_ns = now;
                *used = self.clock;
            } else {
                if self.map.len() >= self.capacity {
                    // Least recently used goes, its unreported repeats with it.
                    let oldest = self.map.iter().min_by_key(|(_, (_, used))| *used);
                    let oldest = oldest.map(|(key, _)| *key).expect("an entry");
                    self.map.remove(&oldest);
                }
                let value = FoldValue {
                    window_start_ns: now,
                    last_ns: now,
                    folded: 0,
                };
                self.map.insert(key, (value, self.clock));
            }
            if self.ring.len() < self.ring_capacity {
                self.ring.push(key);
            } else {
                self.lost += 1;
            }
        }

        fn walk(&self) -> Walk<FoldKey, FoldValue> {
            let entries = (self.map.iter()).map(|(key, (value, _))| Ok::<_, ()>((*key, *value)));
            Walk::new(entries, usize::MAX)
        }
    }

    /// The agent's side: drains the ring, walks the map now and then, stops.
    fn run(seed: u64) -> (u64, u64) {
        let mut random = Xorshift(seed | 1);
        let mut kernel = Kernel {
            capacity: 1 + random.index(8),
            map: HashMap::new(),
            clock: 0,
            ring: Vec::new(),
            ring_capacity: 1 + random.index(16),
            attempts: 0,
            lost: 0,
            folded: 0,
        };
        let mut folds: Folds<u64> = Folds::new(Kernel::WINDOW);
        let mut accounting = Accounting::new(0);
        let workloads = 1 + random.below(12);
        let mut now = 0;
        for _ in 0..random.below(400) {
            now += random.below(4);
            match random.below(10) {
                0 => {
                    for key in std::mem::take(&mut kernel.ring) {
                        accounting.reported_one();
                        folds.first(key, 0);
                    }
                }
                1 => {
                    let total = kernel.folded;
                    for aggregate in folds.collect(&kernel.walk(), now, false) {
                        accounting.aggregated(aggregate.repeats);
                    }
                    if let Some(pending) = folds.pending_repeats() {
                        accounting.after_walk(total, pending);
                    }
                    // While it runs the figure is a lower bound: never more than the truth.
                    assert!(accounting.unreported() <= kernel.folded - accounting.aggregated);
                }
                _ => kernel.attempt(random.below(workloads), now),
            }
        }
        // Stopping: everything in the ring, every window reported, the rest was evicted.
        for key in std::mem::take(&mut kernel.ring) {
            accounting.reported_one();
            folds.first(key, 0);
        }
        for aggregate in folds.collect(&kernel.walk(), now, true) {
            accounting.aggregated(aggregate.repeats);
        }
        accounting.at_stop(kernel.folded);
        let sum = accounting.reported()
            + accounting.aggregated_so_far()
            + accounting.unreported()
            + kernel.lost;
        (sum, kernel.attempts)
    }

    #[test]
    fn every_attempt_is_reported_aggregated_unreported_or_lost_exactly_once() {
        for seed in 1..2000_u64 {
            let (sum, attempts) = run(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            assert_eq!(sum, attempts, "seed {seed}");
        }
    }

    #[test]
    fn new_unreported_repeats_are_warned_of_once() {
        let mut accounting = Accounting::new(5);
        accounting.aggregated(10);
        assert_eq!(accounting.not_reported(20), 5);
        accounting.after_walk(20, 2);
        assert_eq!(accounting.newly_unreported(), Some(3));
        assert_eq!(accounting.newly_unreported(), None);
        accounting.at_stop(20);
        assert_eq!(
            (accounting.unreported(), accounting.newly_unreported()),
            (5, Some(2))
        );
    }
}
