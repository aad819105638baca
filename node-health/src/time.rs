//! Monotonic time as the core sees it.
//!
//! Every deadline in twosite is judged on the observer's own monotonic clock, from the moment
//! the observer last saw a record change (as client-go does). Remote timestamps are never
//! compared with local ones. The core takes `now` as an argument, so the controller passes a
//! reading of `std::time::Instant` and the simulation passes its virtual, drifting clock.

use serde::{Deserialize, Serialize};
use std::ops::{Add, Sub};
use std::time::Duration;

/// A reading of one observer's monotonic clock, in milliseconds since an arbitrary origin.
/// Readings of two different observers are not comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MonoTime(pub u64);

impl MonoTime {
    pub const ZERO: MonoTime = MonoTime(0);

    pub fn from_millis(ms: u64) -> Self {
        MonoTime(ms)
    }

    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// Time elapsed since `earlier`, zero if `earlier` is in the future.
    pub fn since(self, earlier: MonoTime) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for MonoTime {
    type Output = MonoTime;
    fn add(self, d: Duration) -> MonoTime {
        MonoTime(self.0.saturating_add(duration_ms(d)))
    }
}

impl Sub<Duration> for MonoTime {
    type Output = MonoTime;
    fn sub(self, d: Duration) -> MonoTime {
        MonoTime(self.0.saturating_sub(duration_ms(d)))
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The largest rate difference assumed between any two clocks, in parts per million.
/// 1% by default (the brief's suggestion): generous for real quartz, and it covers VMs whose
/// clocks are slowed while paused.
pub const DEFAULT_DRIFT_PPM: u64 = 10_000;

/// Stretch a duration by the drift bound: an observer that waits `stretch(d)` on its own
/// clock is sure at least `d` of real time has passed, even if its clock runs fast.
pub fn stretch(d: Duration, drift_ppm: u64) -> Duration {
    let ms = duration_ms(d);
    Duration::from_millis(ms.saturating_add(ms.saturating_mul(drift_ppm).div_ceil(1_000_000)))
}

/// Shrink a duration by the drift bound: an actor that stops after `shrink(d)` on its own
/// clock is sure at most `d` of real time has passed, even if its clock runs slow.
pub fn shrink(d: Duration, drift_ppm: u64) -> Duration {
    let ms = duration_ms(d);
    Duration::from_millis(ms.saturating_sub(ms.saturating_mul(drift_ppm).div_ceil(1_000_000)))
}

/// A source of monotonic time, injected wherever a component reads the clock itself.
pub trait Clock {
    fn now(&self) -> MonoTime;
}

/// The process's real monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: std::time::Instant,
}

impl SystemClock {
    pub fn new() -> Self {
        SystemClock {
            origin: std::time::Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> MonoTime {
        MonoTime(duration_ms(self.origin.elapsed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stretch_and_shrink_bound_real_time() {
        let d = Duration::from_secs(10);
        assert_eq!(stretch(d, DEFAULT_DRIFT_PPM), Duration::from_millis(10_100));
        assert_eq!(shrink(d, DEFAULT_DRIFT_PPM), Duration::from_millis(9_900));
        assert_eq!(stretch(d, 0), d);
    }

    #[test]
    fn since_never_underflows() {
        assert_eq!(MonoTime(5).since(MonoTime(10)), Duration::ZERO);
        assert_eq!(MonoTime(10).since(MonoTime(4)), Duration::from_millis(6));
    }
}
