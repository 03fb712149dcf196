//! Folding repeats: an attempt identical to one reported less than a window ago (same
//! workload, destination and verdict) is counted instead of reported, and the count is reported
//! as one event when the window closes. The first attempt of a burst is reported at once.
//!
//! Memory is bounded: at most `max_keys` bursts are open; a new one beyond that closes them all
//! early (their counts are reported, nothing is lost, only folded less).

use std::{collections::HashMap, hash::Hash};

/// A burst of repeats of one attempt, closed: report `value` with these figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed<V> {
    /// What the first attempt of the burst reported.
    pub value: V,
    /// Repeats folded (the first attempt, reported on its own, not included).
    pub repeats: u64,
    /// When the first repeat happened (`CLOCK_BOOTTIME` ns).
    pub first_ns: u64,
    /// When the last repeat happened.
    pub last_ns: u64,
}

struct Burst<V> {
    started_ns: u64,
    closed: Closed<V>,
}

/// Open bursts by attempt.
pub struct Aggregator<K, V> {
    window_ns: u64,
    max_keys: usize,
    bursts: HashMap<K, Burst<V>>,
}

impl<K: Hash + Eq, V> Aggregator<K, V> {
    /// Folds repeats within `window_ns` of a burst's first attempt (0: folds nothing), with at
    /// most `max_keys` bursts open.
    #[must_use]
    pub fn new(window_ns: u64, max_keys: usize) -> Self {
        Self {
            window_ns,
            max_keys: max_keys.max(1),
            bursts: HashMap::new(),
        }
    }

    /// Counts an attempt made at `at_ns` as a repeat if a burst of `key` is open and its window
    /// has not passed; `false` means it starts a burst: report it, then [`Aggregator::start`].
    pub fn repeat(&mut self, key: &K, at_ns: u64) -> bool {
        let Some(burst) = self.bursts.get_mut(key) else {
            return false;
        };
        // Events of different CPUs may arrive slightly out of order: earlier counts as within.
        if at_ns.saturating_sub(burst.started_ns) >= self.window_ns {
            return false;
        }
        let closed = &mut burst.closed;
        if closed.repeats == 0 {
            closed.first_ns = at_ns;
        }
        closed.repeats += 1;
        closed.first_ns = closed.first_ns.min(at_ns);
        closed.last_ns = closed.last_ns.max(at_ns);
        true
    }

    /// Opens a burst of `key` at `at_ns`, reported as `value`. Returns the bursts this closes
    /// (the previous burst of `key`, or all of them when too many are open) that have repeats
    /// to report.
    pub fn start(&mut self, key: K, at_ns: u64, value: V) -> Vec<Closed<V>> {
        let mut closed = Vec::new();
        if self.window_ns == 0 {
            return closed;
        }
        if !self.bursts.contains_key(&key) && self.bursts.len() >= self.max_keys {
            closed = self.close_all();
        }
        let burst = Burst {
            started_ns: at_ns,
            closed: Closed {
                value,
                repeats: 0,
                first_ns: 0,
                last_ns: 0,
            },
        };
        if let Some(previous) = self.bursts.insert(key, burst)
            && previous.closed.repeats > 0
        {
            closed.push(previous.closed);
        }
        closed
    }

    /// Closes the bursts whose window has passed at `now_ns`; returns those with repeats.
    pub fn expire(&mut self, now_ns: u64) -> Vec<Closed<V>> {
        let window_ns = self.window_ns;
        self.bursts
            .extract_if(|_, burst| now_ns.saturating_sub(burst.started_ns) >= window_ns)
            .map(|(_, burst)| burst.closed)
            .filter(|closed| closed.repeats > 0)
            .collect()
    }

    /// Closes every burst (the agent is stopping); returns those with repeats.
    pub fn close_all(&mut self) -> Vec<Closed<V>> {
        self.bursts
            .drain()
            .map(|(_, burst)| burst.closed)
            .filter(|closed| closed.repeats > 0)
            .collect()
    }

    /// Bursts open.
    #[must_use]
    pub fn open(&self) -> usize {
        self.bursts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    /// Feeds attempts (key, time) as the reporter does; returns what it would print: `(key, 1)`
    /// for an attempt reported at once, `(key, n)` for a closed burst of n repeats.
    fn feed(aggregator: &mut Aggregator<u32, u32>, attempts: &[(u32, u64)]) -> Vec<(u32, u64)> {
        let mut printed = Vec::new();
        for &(key, at) in attempts {
            if !aggregator.repeat(&key, at) {
                for closed in aggregator.start(key, at, key) {
                    printed.push((closed.value, closed.repeats));
                }
                printed.push((key, 1));
            }
        }
        printed
    }

    #[test]
    fn first_at_once_repeats_folded_until_the_window_closes() {
        let mut aggregator = Aggregator::new(10 * SECOND, 16);
        let printed = feed(&mut aggregator, &[(1, 0), (1, SECOND), (2, SECOND), (1, 2 * SECOND)]);
        assert_eq!(printed, [(1, 1), (2, 1)]);
        assert!(aggregator.expire(9 * SECOND).is_empty());
        let closed = aggregator.expire(10 * SECOND);
        assert_eq!(closed.len(), 1, "key 2 had no repeats");
        assert_eq!(
            closed[0],
            Closed {
                value: 1,
                repeats: 2,
                first_ns: SECOND,
                last_ns: 2 * SECOND
            }
        );
        // Key 2's window closes a second later, with nothing to report.
        assert_eq!(aggregator.open(), 1);
        assert!(aggregator.expire(11 * SECOND).is_empty());
        assert_eq!(aggregator.open(), 0);
    }

    #[test]
    fn an_attempt_after_the_window_closes_the_burst_and_starts_another() {
        let mut aggregator = Aggregator::new(10 * SECOND, 16);
        let printed = feed(&mut aggregator, &[(1, 0), (1, 5 * SECOND), (1, 11 * SECOND)]);
        assert_eq!(printed, [(1, 1), (1, 1), (1, 1)]);
        // Out of order by a little: still within the burst.
        assert!(aggregator.repeat(&1, 10 * SECOND));
        assert_eq!(aggregator.close_all().len(), 1);
    }

    #[test]
    fn every_attempt_is_accounted_for_and_memory_is_bounded() {
        let mut aggregator = Aggregator::new(10 * SECOND, 8);
        let attempts: Vec<(u32, u64)> = (0..10_000u64).map(|i| ((i % 13) as u32, i * 1000)).collect();
        let mut total: u64 = feed(&mut aggregator, &attempts).iter().map(|(_, n)| n).sum();
        assert!(aggregator.open() <= 8);
        total += aggregator.close_all().iter().map(|c| c.repeats).sum::<u64>();
        assert_eq!(total, 10_000);
    }

    #[test]
    fn a_zero_window_folds_nothing() {
        let mut aggregator = Aggregator::new(0, 8);
        let printed = feed(&mut aggregator, &[(1, 0), (1, 0), (1, 1)]);
        assert_eq!(printed.len(), 3);
        assert_eq!(aggregator.open(), 0);
    }
}
