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
    Clock::Boot.to_unix_ns()
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
        nix::time::clock_gettime(self.id()).map_or(0, |time| {
            u64::try_from(time.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(time.tv_nsec()).unwrap_or(0)
        })
    }

    /// Nanoseconds to add to a reading of this clock to get Unix time, sampled now. A coarse
    /// reading is the monotonic clock's at the last tick: it is turned into the Unix time of
    /// that tick (at most a tick before the moment read), by the offset of the precise clock
    /// (the coarse one's own, read between two ticks too, would add a random part of a tick).
    ///
    /// # Errors
    /// When a clock cannot be read.
    pub fn to_unix_ns(self) -> nix::Result<i128> {
        use nix::time::{ClockId, clock_gettime};
        let nanos = |t: nix::sys::time::TimeSpec| {
            i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec())
        };
        let precise = match self {
            Self::Boot => ClockId::CLOCK_BOOTTIME,
            Self::MonotonicCoarse => ClockId::CLOCK_MONOTONIC,
        };
        let real = nanos(clock_gettime(ClockId::CLOCK_REALTIME)?);
        let this = nanos(clock_gettime(precise)?);
        Ok(real - this)
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

#[cfg(test)]
mod tests {
    use nix::time::{ClockId, clock_getres, clock_gettime};

    use super::*;

    fn unix_now() -> i128 {
        let now = clock_gettime(ClockId::CLOCK_REALTIME).expect("the real-time clock");
        i128::from(now.tv_sec()) * 1_000_000_000 + i128::from(now.tv_nsec())
    }

    #[test]
    fn a_reading_of_each_clock_becomes_the_unix_time_it_was_read_at() {
        let tick = clock_getres(ClockId::CLOCK_MONOTONIC_COARSE).expect("its resolution");
        let tick = i128::from(tick.tv_sec()) * 1_000_000_000 + i128::from(tick.tv_nsec());
        for (clock, early) in [(Clock::Boot, 0), (Clock::MonotonicCoarse, tick)] {
            let before = unix_now();
            let read = i128::from(clock.now_ns());
            let offset = clock.to_unix_ns().expect("the clocks");
            let after = unix_now();
            // A coarse reading is its last tick's time: at most a tick early, never late. (The
            // offset's two readings are apart by what it takes to read a clock: a millisecond's
            // slack covers that.)
            let unix = read + offset;
            assert!(
                before - early - 1_000_000 <= unix && unix <= after,
                "{}: {unix} not in [{before} - {early}, {after}]",
                clock.name()
            );
        }
    }
}
