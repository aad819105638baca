//! The volume lease's timing ([`VolumeTiming`]) and the check that it is safe.

use crate::time::{DEFAULT_DRIFT_PPM, shrink, stretch};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use thiserror::Error;

/// The volume lease's timing. Every guard and taker of one volume must use the same figures;
/// takers also honour a longer `duration` written on the Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeTiming {
    /// How often the holder renews.
    pub renew: Duration,
    /// The lease duration: a holder has stopped writing within it (holder's clock, shrunk).
    pub duration: Duration,
    /// The holder demotes when it has not sent a successful write for this long.
    pub demote_after: Duration,
    /// How long stop + sync + unmount may take after the demote deadline before the node is
    /// fenced.
    pub stop_budget: Duration,
    /// How long the node agent may take, after the fence deadline, to stop the node writing.
    pub fence_delay: Duration,
    /// Extra wait of a taker beyond the lease duration.
    pub margin: Duration,
    /// Clock-rate drift bound, parts per million.
    pub drift_ppm: u64,
}

impl Default for VolumeTiming {
    /// The brief's figures: renew 2 s, duration 10 s, demote after 6 s.
    fn default() -> Self {
        VolumeTiming {
            renew: Duration::from_secs(2),
            duration: Duration::from_secs(10),
            demote_after: Duration::from_secs(6),
            stop_budget: Duration::from_millis(2_500),
            fence_delay: Duration::from_secs(1),
            margin: Duration::from_secs(2),
            drift_ppm: DEFAULT_DRIFT_PPM,
        }
    }
}

/// A timing under which a holder could still write when a taker may take over, or that
/// demotes on a single lost renewal.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VolumeTimingError {
    #[error("the renew interval must not be zero")]
    ZeroRenew,
    #[error(
        "renewals every {renew:?} are too sparse for a demote deadline of {demote_after:?}: two must fit before it"
    )]
    RenewTooSparse {
        renew: Duration,
        demote_after: Duration,
    },
    #[error(
        "a holder may write for {holder_bound:?} of its own clock after its last renewal (demote + stop budget + fence delay), more than the lease duration {duration:?} less the drift bound ({allowed:?})"
    )]
    HolderOutlivesLease {
        holder_bound: Duration,
        duration: Duration,
        allowed: Duration,
    },
    #[error("the takeover margin must not be zero")]
    NoMargin,
}

impl VolumeTiming {
    /// Refuses any timing under which the argument in the [`volume`](super) module documentation
    /// fails.
    pub fn validate(&self) -> Result<(), VolumeTimingError> {
        if self.renew.is_zero() {
            return Err(VolumeTimingError::ZeroRenew);
        }
        if self.renew.saturating_mul(2) >= self.demote_after {
            return Err(VolumeTimingError::RenewTooSparse {
                renew: self.renew,
                demote_after: self.demote_after,
            });
        }
        // The holder's clock may run slow: its local bound, read in real time, must still end
        // within the lease duration. The taker's fast clock is covered in `may_take` (stretch).
        let holder_bound = self.holder_bound();
        let allowed = shrink(self.duration, self.drift_ppm);
        if holder_bound > allowed {
            return Err(VolumeTimingError::HolderOutlivesLease {
                holder_bound,
                duration: self.duration,
                allowed,
            });
        }
        if self.margin.is_zero() {
            return Err(VolumeTimingError::NoMargin);
        }
        Ok(())
    }

    /// How long, on the holder's clock after its last successful write was sent, its app may
    /// still write: demote deadline + stop budget + fence delay.
    pub fn holder_bound(&self) -> Duration {
        self.demote_after
            .saturating_add(self.stop_budget)
            .saturating_add(self.fence_delay)
    }

    /// How long a taker waits, on its own clock, for a record written with `lease_duration`.
    pub fn takeover_after(&self, lease_duration: Duration) -> Duration {
        stretch(
            self.duration
                .max(lease_duration)
                .saturating_add(self.margin),
            self.drift_ppm,
        )
    }
}
