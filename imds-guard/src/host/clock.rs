//! The clocks: the kernel stamps events with `CLOCK_BOOTTIME` and times fold windows with
//! the coarse clock where the kernel has it ([`Clock`]); people read Unix time.

/// `CLOCK_BOOTTIME` now, in nanoseconds (the clock of the kernel's event times); 0 if it cannot
/// be read.
#[must_use]
pub fn boot_time_ns() -> u64 {
    Clock::Boot.now_ns()
}

/// Nanoseconds to add to a `CLOCK_BOOTTIME` reading to get Unix time, sampled now.
///
/// # Errors
/// When a clock cannot be read.
pub fn boot_to_unix_ns() -> nix::Result<i128> {
    let real = read_ns(nix::time::ClockId::CLOCK_REALTIME)?;
    let boot = read_ns(nix::time::ClockId::CLOCK_BOOTTIME)?;
    Ok(real - boot)
}

/// Clock `id` now, in nanoseconds.
fn read_ns(id: nix::time::ClockId) -> nix::Result<i128> {
    let time = nix::time::clock_gettime(id)?;
    Ok(i128::from(time.tv_sec()) * 1_000_000_000 + i128::from(time.tv_nsec()))
}

/// A clock the programs read: events' times are `Boot`; fold windows (`FoldValue`'s times,
/// `FOLD_CLOCK_*`) either, as the agent chose at load, which reads the same one to tell a window
/// closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// `CLOCK_BOOTTIME` (kernels before 5.11).
    Boot,
    /// `CLOCK_MONOTONIC_COARSE`: the time at the last tick.
    MonotonicCoarse,
}

impl Clock {
    /// The value of the programs' `FOLD_CLOCK` global that times fold windows with this clock.
    #[must_use]
    pub const fn fold_clock_global(self) -> u32 {
        match self {
            Self::Boot => imds_guard_common::event::FOLD_CLOCK_BOOT,
            Self::MonotonicCoarse => imds_guard_common::event::FOLD_CLOCK_COARSE,
        }
    }

    fn id(self) -> nix::time::ClockId {
        match self {
            Self::Boot => nix::time::ClockId::CLOCK_BOOTTIME,
            Self::MonotonicCoarse => nix::time::ClockId::CLOCK_MONOTONIC_COARSE,
        }
    }

    /// Now, in this clock's nanoseconds; 0 if it cannot be read.
    #[must_use]
    pub fn now_ns(self) -> u64 {
        read_ns(self.id()).map_or(0, |ns| u64::try_from(ns).unwrap_or(0))
    }

    /// What it is, for the log.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Boot => "CLOCK_BOOTTIME",
            Self::MonotonicCoarse => "CLOCK_MONOTONIC_COARSE",
        }
    }
}

/// Suspensions remembered (one entry each; a machine hibernated more often within a fold window
/// has its oldest windows' times read with a later suspension's length).
const SUSPENSIONS_KEPT: usize = 64;

/// Turns the times of fold windows ([`Clock`]'s readings) into Unix time. The boot clock's
/// by its offset now. `CLOCK_MONOTONIC_COARSE` stops while the machine is suspended (an EC2
/// instance's hibernation), so its readings go through the boot clock: plus how long the
/// machine had been suspended when each was taken (`CLOCK_BOOTTIME` less `CLOCK_MONOTONIC`,
/// [`FoldTimes::sample`]d at every walk of the fold map, once a second at least), then the boot
/// clock's offset now. (With the monotonic clock's offset now, a window that was open across a
/// hibernation would be reported as late as the machine slept.) A reading between the last
/// sample before a resume and the first after it is taken as before the suspension.
pub struct FoldTimes {
    clock: Clock,
    /// (`CLOCK_MONOTONIC` ns, how long suspended then), one per change, oldest first.
    suspended: std::collections::VecDeque<(u64, i128)>,
}

impl FoldTimes {
    /// For readings of `clock`.
    #[must_use]
    pub fn new(clock: Clock) -> Self {
        let mut times = Self {
            clock,
            suspended: std::collections::VecDeque::new(),
        };
        times.sample();
        times
    }

    /// The clock of the readings.
    #[must_use]
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Notes how long the machine has been suspended, now (nothing for the boot clock).
    pub fn sample(&mut self) {
        if self.clock == Clock::Boot {
            return;
        }
        let (Ok(monotonic), Ok(boot)) = (
            read_ns(nix::time::ClockId::CLOCK_MONOTONIC),
            read_ns(nix::time::ClockId::CLOCK_BOOTTIME),
        ) else {
            return;
        };
        self.note(u64::try_from(monotonic).unwrap_or(0), boot - monotonic);
    }

    /// Notes that the machine had been suspended for `suspended` ns at `monotonic`.
    fn note(&mut self, monotonic: u64, suspended: i128) {
        // Two readings of one suspension differ by the time between the two clocks' reads.
        const SAME: i128 = 1_000_000;
        if self
            .suspended
            .back()
            .is_some_and(|&(_, last)| (suspended - last).abs() < SAME)
        {
            return;
        }
        if self.suspended.len() == SUSPENSIONS_KEPT {
            self.suspended.pop_front();
        }
        self.suspended.push_back((monotonic, suspended));
    }

    /// The Unix time of `reading`, a time of a fold window, where `boot_to_unix_ns` is the boot
    /// clock's offset to Unix time now ([`boot_to_unix_ns`]).
    #[must_use]
    pub fn unix_ns(&self, reading: u64, boot_to_unix_ns: i128) -> i128 {
        let suspended = match self.clock {
            Clock::Boot => 0,
            // The last change noted at or before the reading; before the first, the first.
            Clock::MonotonicCoarse => self
                .suspended
                .iter()
                .rev()
                .find(|&&(at, _)| at <= reading)
                .or(self.suspended.front())
                .map_or(0, |&(_, suspended)| suspended),
        };
        i128::from(reading) + suspended + boot_to_unix_ns
    }
}

#[cfg(test)]
mod tests {
    use nix::time::{ClockId, clock_getres};

    use super::*;

    fn unix_now() -> i128 {
        read_ns(ClockId::CLOCK_REALTIME).expect("the real-time clock")
    }

    #[test]
    fn a_reading_of_each_clock_becomes_the_unix_time_it_was_read_at() {
        let tick = clock_getres(ClockId::CLOCK_MONOTONIC_COARSE).expect("its resolution");
        let tick = i128::from(tick.tv_sec()) * 1_000_000_000 + i128::from(tick.tv_nsec());
        // A busy (virtual) machine takes its ticks late: a few ticks' slack, not one.
        for (clock, early) in [(Clock::Boot, 0), (Clock::MonotonicCoarse, 5 * tick)] {
            let times = FoldTimes::new(clock);
            let before = unix_now();
            let read = clock.now_ns();
            let unix = times.unix_ns(read, boot_to_unix_ns().expect("the clocks"));
            let after = unix_now();
            // A coarse reading is its last tick's time: a tick early or so, never late. (The
            // offset's two readings are apart by what it takes to read a clock: a millisecond's
            // slack covers that.)
            assert!(
                before - early - 1_000_000 <= unix && unix <= after,
                "{}: {unix} not in [{before} - {early}, {after}]",
                clock.name()
            );
        }
    }

    #[test]
    fn a_coarse_reading_keeps_the_suspension_it_was_taken_after() {
        const HOUR: i128 = 3_600_000_000_000;
        let mut times = FoldTimes {
            clock: Clock::MonotonicCoarse,
            suspended: std::collections::VecDeque::new(),
        };
        times.note(1_000, 5);
        // The same suspension read again, a little apart: nothing new.
        times.note(2_000, 7);
        // An hour's hibernation, seen at the next sample after the resume.
        times.note(10_000, HOUR + 5);
        let boot_to_unix = 1_000_000;
        // A window opened before the hibernation keeps its time; one after is an hour later.
        assert_eq!(times.unix_ns(9_000, boot_to_unix), 9_000 + 5 + boot_to_unix);
        assert_eq!(
            times.unix_ns(10_500, boot_to_unix),
            10_500 + HOUR + 5 + boot_to_unix
        );
        // Before the first sample: the first's.
        assert_eq!(times.unix_ns(10, boot_to_unix), 10 + 5 + boot_to_unix);
        // The boot clock's readings need none of this.
        let boot = FoldTimes::new(Clock::Boot);
        assert_eq!(boot.unix_ns(9_000, boot_to_unix), 9_000 + boot_to_unix);
    }

    #[test]
    fn suspensions_kept_are_bounded() {
        let mut times = FoldTimes {
            clock: Clock::MonotonicCoarse,
            suspended: std::collections::VecDeque::new(),
        };
        for n in 0..1_000u64 {
            times.note(n * 10, i128::from(n) * 1_000_000_000);
        }
        assert_eq!(times.suspended.len(), SUSPENSIONS_KEPT);
        assert_eq!(times.suspended.back(), Some(&(9_990, 999_000_000_000)));
    }
}
