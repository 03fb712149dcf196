//! The clocks: the kernel stamps events with `CLOCK_BOOTTIME`; people read Unix time.

/// `CLOCK_BOOTTIME` now, in nanoseconds (the clock of the kernel's event times); 0 if it cannot
/// be read.
#[must_use]
pub fn boot_time_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).map_or(0, |time| {
        u64::try_from(time.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(time.tv_nsec()).unwrap_or(0)
    })
}

/// Nanoseconds to add to a `CLOCK_BOOTTIME` reading to get Unix time, sampled now.
///
/// # Errors
/// When a clock cannot be read.
pub fn boot_to_unix_ns() -> nix::Result<i128> {
    use nix::time::{ClockId, clock_gettime};
    let nanos = |t: nix::sys::time::TimeSpec| {
        i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec())
    };
    let real = nanos(clock_gettime(ClockId::CLOCK_REALTIME)?);
    let boot = nanos(clock_gettime(ClockId::CLOCK_BOOTTIME)?);
    Ok(real - boot)
}
