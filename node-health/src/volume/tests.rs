//! Unit tests of the timing rule, `may_take` and `handover`; fixtures shared with `guard_tests`.

use super::*;
use crate::time::MonoTime;
use std::time::Duration;

pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub(super) fn lease(holder: Option<&str>, epoch: u64, rv: &str) -> VolumeLease {
    VolumeLease {
        held_for_node: None,
        holder: holder.map(str::to_string),
        epoch,
        resource_version: rv.into(),
        preferred_holder: None,
        released: false,
        handover: None,
        duration: Duration::from_secs(10),
    }
}

fn seen(lease: VolumeLease, at: u64) -> LeaseView {
    LeaseView {
        lease,
        changed_at: MonoTime(at),
    }
}

#[test]
fn default_timing_is_valid_and_the_brief_s() {
    let t = VolumeTiming::default();
    assert_eq!(t.validate(), Ok(()));
    assert_eq!(
        (t.renew, t.duration, t.demote_after),
        (ms(2_000), ms(10_000), ms(6_000))
    );
    assert_eq!(t.holder_bound(), ms(9_500));
    assert_eq!(t.takeover_after(Duration::ZERO), ms(12_120));
}

#[test]
fn refuses_timing_under_which_a_holder_may_write_after_a_takeover() {
    let d = VolumeTiming::default();
    let cases: Vec<(&str, VolumeTiming, bool)> = vec![
        ("defaults", d, true),
        (
            // 6 + 2.9 + 1 = 9.9 s = 10 s shrunk by 1 %: done within the lease on a slow clock.
            "holder bound exactly at the drift bound",
            VolumeTiming {
                stop_budget: ms(2_900),
                ..d
            },
            true,
        ),
        (
            "holder bound 1 ms beyond the drift bound",
            VolumeTiming {
                stop_budget: ms(2_901),
                ..d
            },
            false,
        ),
        (
            "demote deadline too long",
            VolumeTiming {
                demote_after: ms(7_000),
                ..d
            },
            false,
        ),
        (
            "drift bound 5 %: 9.5 s fits 10 s shrunk",
            VolumeTiming {
                drift_ppm: 50_000,
                ..d
            },
            true,
        ),
        (
            "drift bound 6 %: 9.5 s does not fit 9.4 s",
            VolumeTiming {
                drift_ppm: 60_000,
                ..d
            },
            false,
        ),
        (
            "drift bound beyond 100 %",
            VolumeTiming {
                drift_ppm: 2_000_000,
                ..d
            },
            false,
        ),
        (
            "the fence takes too long (a plain 5 s watchdog wait)",
            VolumeTiming {
                fence_delay: ms(5_000),
                ..d
            },
            false,
        ),
        (
            "renewals too sparse: a single lost one would demote",
            VolumeTiming {
                renew: ms(3_000),
                ..d
            },
            false,
        ),
        (
            "no renewals",
            VolumeTiming {
                renew: Duration::ZERO,
                ..d
            },
            false,
        ),
        (
            "no margin",
            VolumeTiming {
                margin: Duration::ZERO,
                ..d
            },
            false,
        ),
        (
            "huge figures do not overflow",
            VolumeTiming {
                demote_after: Duration::MAX,
                ..d
            },
            false,
        ),
    ];
    for (name, t, ok) in cases {
        assert_eq!(t.validate().is_ok(), ok, "{name}: {:?}", t.validate());
        assert_eq!(VolumeGuard::new("g", t).is_ok(), ok, "{name}");
    }
    assert!(matches!(
        VolumeTiming {
            demote_after: ms(7_000),
            ..d
        }
        .validate(),
        Err(VolumeTimingError::HolderOutlivesLease { .. })
    ));
    assert_eq!(
        VolumeGuard::new(" ", d).err(),
        Some(GuardConfigError::EmptyIdentity)
    );
}

/// Every unsafe take refused, and the boundaries on the accepting side.
#[test]
fn may_take_table() {
    let t = VolumeTiming::default();
    let held = lease(Some("x"), 4, "40");
    let with = |f: &dyn Fn(&mut VolumeLease)| {
        let mut l = held.clone();
        f(&mut l);
        l
    };
    let ok = |basis, epoch| {
        Ok(Take {
            basis,
            epoch,
            expected_rv: "40".into(),
        })
    };
    type Case = (
        &'static str,
        Option<VolumeLease>,
        Option<u64>,
        u64,
        Result<Take, TakeRefusal>,
    );
    // The record was seen changing at t = 1000; 12.12 s is (10 s + 2 s margin) stretched.
    let cases: Vec<Case> = vec![
        (
            "holder may still write: unchanged for exactly the stretched duration",
            Some(held.clone()),
            None,
            1_000 + 12_120,
            Err(TakeRefusal::Held {
                holder: "x".into(),
                unchanged: ms(12_120),
                needed: ms(12_120),
            }),
        ),
        (
            "expired on my clock",
            Some(held.clone()),
            None,
            1_000 + 12_121,
            ok(TakeBasis::Expired, 5),
        ),
        (
            "the holder wrote a longer duration",
            Some(with(&|l| l.duration = Duration::from_secs(20))),
            None,
            1_000 + 12_121,
            Err(TakeRefusal::Held {
                holder: "x".into(),
                unchanged: ms(12_121),
                needed: ms(22_220),
            }),
        ),
        (
            "released",
            Some(with(&|l| l.released = true)),
            None,
            1_000,
            ok(TakeBasis::Released, 5),
        ),
        (
            "no holder",
            Some(with(&|l| l.holder = Some(String::new()))),
            None,
            1_000,
            ok(TakeBasis::Released, 5),
        ),
        (
            "released for a switchover to another",
            Some(with(&|l| {
                l.released = true;
                l.preferred_holder = Some("y".into());
            })),
            None,
            1_000,
            Err(TakeRefusal::PreferredOther {
                preferred: "y".into(),
            }),
        ),
        (
            "released for a switchover to me",
            Some(with(&|l| {
                l.released = true;
                l.preferred_holder = Some("me".into());
            })),
            None,
            1_000,
            ok(TakeBasis::Released, 5),
        ),
        (
            "preferred, but the holder has not released",
            Some(with(&|l| l.preferred_holder = Some("me".into()))),
            None,
            5_000,
            Err(TakeRefusal::Held {
                holder: "x".into(),
                unchanged: ms(4_000),
                needed: ms(12_120),
            }),
        ),
        (
            "switchover to another that never came: expiry still applies",
            Some(with(&|l| l.preferred_holder = Some("y".into()))),
            None,
            1_000 + 12_121,
            ok(TakeBasis::Expired, 5),
        ),
        (
            "my own lease (no app running)",
            Some(with(&|l| l.holder = Some("me".into()))),
            None,
            1_000,
            ok(TakeBasis::OwnLease, 5),
        ),
        (
            "my own lease, but a switchover to another is under way",
            Some(with(&|l| {
                l.holder = Some("me".into());
                l.preferred_holder = Some("y".into());
            })),
            None,
            1_000,
            Err(TakeRefusal::PreferredOther {
                preferred: "y".into(),
            }),
        ),
        (
            "acquire without resourceVersion",
            Some(with(&|l| {
                l.released = true;
                l.resource_version = String::new();
            })),
            None,
            1_000 + 60_000,
            Err(TakeRefusal::NoResourceVersion),
        ),
        ("no Lease", None, None, 60_000, Err(TakeRefusal::NoLease)),
        (
            "stale read: epoch below one already seen",
            Some(with(&|l| l.released = true)),
            Some(6),
            1_000,
            Err(TakeRefusal::StaleEpoch { seen: 4, known: 6 }),
        ),
        (
            "handed over to me with a higher epoch",
            Some(with(&|l| {
                l.handover = Some(Handover {
                    to: "me".into(),
                    epoch: 5,
                })
            })),
            Some(4),
            1_000,
            ok(TakeBasis::HandedOver, 5),
        ),
        (
            "handed over to me with the holder's epoch",
            Some(with(&|l| {
                l.handover = Some(Handover {
                    to: "me".into(),
                    epoch: 4,
                })
            })),
            None,
            1_000,
            Err(TakeRefusal::StaleHandover {
                offered: 4,
                floor: 4,
            }),
        ),
        (
            "handed over to me with a lower epoch",
            Some(with(&|l| {
                l.handover = Some(Handover {
                    to: "me".into(),
                    epoch: 2,
                })
            })),
            None,
            1_000,
            Err(TakeRefusal::StaleHandover {
                offered: 2,
                floor: 4,
            }),
        ),
        (
            "handed over to another",
            Some(with(&|l| {
                l.handover = Some(Handover {
                    to: "y".into(),
                    epoch: 5,
                })
            })),
            None,
            1_000 + 12_120,
            Err(TakeRefusal::HandedToOther { to: "y".into() }),
        ),
        (
            "handed over to another who never took it: above its epoch",
            Some(with(&|l| {
                l.handover = Some(Handover {
                    to: "y".into(),
                    epoch: 9,
                })
            })),
            None,
            1_000 + 12_121,
            ok(TakeBasis::Expired, 10),
        ),
        (
            "the epoch cannot rise",
            Some(with(&|l| {
                l.released = true;
                l.epoch = u64::MAX;
            })),
            None,
            1_000,
            Err(TakeRefusal::EpochExhausted),
        ),
    ];
    for (name, l, known, now, want) in cases {
        let v = l.map(|l| seen(l, 1_000));
        let got = may_take("me", v.as_ref(), known, MonoTime(now), &t);
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn the_takers_clock_restarts_only_on_a_new_resource_version() {
    let v = LeaseView::track(None, lease(Some("x"), 1, "7"), MonoTime(100));
    let again = LeaseView::track(Some(&v), lease(Some("x"), 1, "7"), MonoTime(9_000));
    assert_eq!(again.changed_at, MonoTime(100));
    let renewed = LeaseView::track(Some(&again), lease(Some("x"), 1, "8"), MonoTime(9_100));
    assert_eq!(renewed.changed_at, MonoTime(9_100));
}

#[test]
fn the_controllers_handover_rises_above_every_epoch() {
    let mut l = lease(Some("x"), 4, "40");
    let (rv, h) = handover(&l, "y").expect("handover");
    assert_eq!((rv.as_str(), h.epoch), ("40", 5));
    l.handover = Some(Handover {
        to: "z".into(),
        epoch: 7,
    });
    assert_eq!(handover(&l, "y").map(|(_, h)| h.epoch), Ok(8));
    l.resource_version.clear();
    assert_eq!(handover(&l, "y"), Err(TakeRefusal::NoResourceVersion));
}
