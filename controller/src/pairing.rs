//! The pairing reconciler: Node facts in, `TwoSite` status out.
//!
//! A pipeline of named stages: fetch the `default` TwoSite (create it when missing), build the
//! desired status (pure, [`crate::status`]), apply it with server-side apply on `/status` only
//! when it changed, then tell users about transitions with Events. Only the leader gets past
//! the first stage, and leadership is asked again right before the write.

use crate::admin::LoopGuard;
use crate::crd::{DEFAULT_NAME, LeaderStatus, TwoSite, TwoSiteSpec, TwoSiteStatus};
use crate::error::{Error, Result, report, with_timeout};
use crate::leader_lease::Leadership;
use crate::metrics::{Metrics, gauge_value};
use crate::status::{RemediationView, StatusInput, desired_status, transitions};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use node_health::{NodeFacts, Pair, Pairing, Room};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// The field manager of every write of the controller.
pub const FIELD_MANAGER: &str = "twosite-controller";

/// How often the pairing is recomputed even when nothing was seen to change.
pub const RESYNC: Duration = Duration::from_secs(30);

/// Everything a pairing reconciliation needs.
#[derive(Clone)]
pub struct Context {
    pub twosites: Api<TwoSite>,
    pub recorder: crate::events::EventSink,
    pub leadership: Leadership,
    pub metrics: Arc<Metrics>,
    pub api_timeout: Duration,
    /// Where the pairing this leader computed is published for the remediation loop (`None`
    /// while it does not lead).
    pub pairing_out: watch::Sender<Option<Pairing>>,
    /// The remediation loop's latest view, for the status.
    pub remediation: watch::Receiver<Option<RemediationView>>,
    /// The volume loop's latest view, for the status.
    pub volumes: watch::Receiver<Vec<crate::crd::VolumeStatus>>,
    pub vms: watch::Receiver<Vec<crate::crd::VmStatus>>,
}

impl Context {
    /// A context with fresh channels for the pairing and the remediation view.
    pub fn new(
        twosites: Api<TwoSite>,
        recorder: crate::events::EventSink,
        leadership: Leadership,
        metrics: Arc<Metrics>,
        api_timeout: Duration,
    ) -> Self {
        Context {
            twosites,
            recorder,
            leadership,
            metrics,
            api_timeout,
            pairing_out: watch::channel(None).0,
            remediation: watch::channel(None).1,
            volumes: watch::channel(Vec::new()).1,
            vms: watch::channel(Vec::new()).1,
        }
    }
}

/// The pairing a status describes: its rooms and pairs.
pub fn pairing_of(status: &TwoSiteStatus) -> Pairing {
    Pairing {
        rooms: status
            .rooms
            .as_ref()
            .map(|r| (Room(r.a.clone()), Room(r.b.clone()))),
        pairs: status
            .pairs
            .iter()
            .map(|p| Pair {
                a: p.a.clone(),
                b: p.b.clone(),
            })
            .collect(),
        ..Pairing::default()
    }
}

fn publish_pairing(ctx: &Context, pairing: Option<Pairing>) {
    ctx.pairing_out.send_if_modified(|p| {
        if *p == pairing {
            false
        } else {
            *p = pairing;
            true
        }
    });
}

/// What a reconciliation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// This replica does not lead: nothing was read or written.
    NotLeader,
    /// The status is already what it should be.
    Unchanged,
    /// The status was written.
    Written,
    /// This replica leads but its remediation loop has not made a pass as leader yet.
    WaitingForView,
}

/// The wall-clock time, to the second, RFC 3339 (as Kubernetes writes `metav1.Time`).
pub fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

/// Brings the `default` TwoSite's status in line with `nodes`.
pub async fn reconcile_pairing(ctx: &Context, nodes: &[NodeFacts]) -> Result<Outcome> {
    let outcome = reconcile_pairing_inner(ctx, nodes).await;
    if matches!(outcome, Ok(Outcome::NotLeader)) {
        publish_pairing(ctx, None);
    }
    outcome
}

async fn reconcile_pairing_inner(ctx: &Context, nodes: &[NodeFacts]) -> Result<Outcome> {
    if !ctx.leadership.is_leader() {
        return Ok(Outcome::NotLeader);
    }
    let Some(obj) = fetch_or_create(ctx).await? else {
        return Ok(Outcome::NotLeader);
    };
    let remediation = ctx.remediation.borrow().clone();
    // A new leader writes its first status once its remediation loop has made a pass (well
    // under a second): an apply without `nodes` and `witness` would drop them for a moment.
    // Without a remediation loop (its sender gone) the status simply lists no nodes.
    if remediation.is_none() && ctx.remediation.has_changed().is_ok() {
        return Ok(Outcome::WaitingForView);
    }

    let leader = LeaderStatus {
        identity: ctx.leadership.identity().to_string(),
        epoch: ctx
            .leadership
            .epoch()
            .map_or(0, |e| i64::try_from(e).unwrap_or(i64::MAX)),
    };
    let now = now_rfc3339();
    let volumes = ctx.volumes.borrow().clone();
    let vms = ctx.vms.borrow().clone();
    let desired = desired_status(
        &StatusInput::for_object(&obj, nodes, leader, &now)
            .with_remediation(remediation.as_ref())
            .with_volumes(&volumes)
            .with_vms(&vms),
    );
    ctx.metrics.pairs.set(gauge_value(desired.pairs.len()));
    ctx.metrics
        .unpaired_nodes
        .set(gauge_value(desired.unpaired.len()));
    if obj.status.as_ref() == Some(&desired) {
        publish_pairing(ctx, Some(pairing_of(&desired)));
        return Ok(Outcome::Unchanged);
    }

    if !ctx.leadership.is_leader() {
        return Ok(Outcome::NotLeader);
    }
    apply_status(ctx, &desired).await?;
    publish_pairing(ctx, Some(pairing_of(&desired)));
    ctx.metrics.status_writes.inc();
    tracing::info!(
        pairs = desired.pairs.len(),
        unpaired = desired.unpaired.len(),
        "TwoSite status written"
    );
    publish_transitions(ctx, &obj, obj.status.as_ref(), &desired).await;
    Ok(Outcome::Written)
}

/// Stage 1: the `default` TwoSite, created with an empty spec (automatic rooms) when missing.
/// `None` when leadership was lost meanwhile.
async fn fetch_or_create(ctx: &Context) -> Result<Option<TwoSite>> {
    let t = ctx.api_timeout;
    if let Some(obj) = with_timeout("get twosite", t, ctx.twosites.get_opt(DEFAULT_NAME)).await? {
        return Ok(Some(obj));
    }
    if !ctx.leadership.is_leader() {
        return Ok(None);
    }
    let fresh = TwoSite::new(DEFAULT_NAME, TwoSiteSpec::default());
    match with_timeout(
        "create twosite",
        t,
        ctx.twosites.create(&PostParams::default(), &fresh),
    )
    .await
    {
        Ok(created) => {
            tracing::info!("created TwoSite {DEFAULT_NAME:?} with automatic rooms");
            Ok(Some(created))
        }
        // Someone created it meanwhile: read theirs.
        Err(err) if err.is_already_exists() || err.is_conflict() => {
            with_timeout("get twosite", t, ctx.twosites.get_opt(DEFAULT_NAME)).await
        }
        Err(err) => Err(err),
    }
}

/// Stage 3: server-side apply of the whole status, as [`FIELD_MANAGER`].
async fn apply_status(ctx: &Context, status: &TwoSiteStatus) -> Result<()> {
    let patch = serde_json::json!({
        "apiVersion": TwoSite::api_version(&()),
        "kind": TwoSite::kind(&()),
        "status": status,
    });
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    with_timeout(
        "apply twosite status",
        ctx.api_timeout,
        ctx.twosites
            .patch_status(DEFAULT_NAME, &pp, &Patch::Apply(&patch)),
    )
    .await?;
    Ok(())
}

/// Stage 4: Events for user-visible transitions. Best effort: a lost Event is logged, never
/// retried through the status write.
async fn publish_transitions(
    ctx: &Context,
    obj: &TwoSite,
    old: Option<&TwoSiteStatus>,
    new: &TwoSiteStatus,
) {
    let reference = obj.object_ref(&());
    for t in transitions(old, new) {
        let event = Event {
            type_: if t.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: t.reason.to_string(),
            note: Some(t.note),
            action: "Pair".to_string(),
            secondary: None,
        };
        if let Err(err) = with_timeout(
            "publish event",
            ctx.api_timeout,
            ctx.recorder.publish(&event, &reference),
        )
        .await
        {
            tracing::warn!(reason = t.reason, error = %report(&err), "could not publish event");
        }
    }
}

/// Per-object retry delays: exponential from 1 s to 30 s with jitter; reset on success.
pub fn retry_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(30))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Reconciles whenever the Node facts, the TwoSite object, the leadership or the remediation
/// view change, at least every [`RESYNC`], and after a failure once its backoff has passed.
pub async fn run_pairing_loop(
    ctx: Context,
    mut facts: watch::Receiver<Option<Vec<NodeFacts>>>,
    twosite_changed: Arc<Notify>,
    mut leading: watch::Receiver<bool>,
    guard: LoopGuard,
) -> Result<()> {
    let mut backoff = retry_backoff();
    let mut retry_at: Option<Instant> = None;
    let mut remediation = ctx.remediation.clone();
    let mut remediation_open = true;
    let mut volumes = ctx.volumes.clone();
    let mut volumes_open = true;
    let mut vms = ctx.vms.clone();
    let mut vms_open = true;
    loop {
        guard.beat();
        if let Some(at) = retry_at.take() {
            // Back off first: changes seen meanwhile stay pending in the channels.
            tokio::time::sleep_until(at).await;
        } else {
            tokio::select! {
                changed = facts.changed() => {
                    if changed.is_err() {
                        return Err(Error::LoopEnded("node watch"));
                    }
                }
                () = twosite_changed.notified() => {},
                changed = remediation.changed(), if remediation_open => {
                    // Without a remediation loop the status simply lists no nodes.
                    remediation_open = changed.is_ok();
                }
                changed = volumes.changed(), if volumes_open => {
                    volumes_open = changed.is_ok();
                }
                changed = vms.changed(), if vms_open => {
                    vms_open = changed.is_ok();
                }
                changed = leading.changed() => {
                    if changed.is_err() {
                        return Err(Error::LoopEnded("leader election"));
                    }
                }
                () = tokio::time::sleep(RESYNC) => {},
            }
        }
        guard.beat();
        leading.borrow_and_update();
        remediation.borrow_and_update();
        volumes.borrow_and_update();
        vms.borrow_and_update();
        // Never pair from a partial view: wait for the Node watch's first listing.
        let Some(nodes) = facts.borrow_and_update().clone() else {
            continue;
        };
        match reconcile_pairing(&ctx, &nodes).await {
            Ok(outcome) => {
                tracing::debug!(?outcome, "pairing reconciled");
                backoff = retry_backoff();
            }
            Err(err) => {
                ctx.metrics.reconcile_failed(err.metric_label());
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(error = %report(&err), retry_in = ?delay, "pairing reconcile failed");
                retry_at = Some(Instant::now() + delay);
            }
        }
    }
}

/// Watches the `default` TwoSite and signals every change (spec edits, deletion).
pub async fn run_twosite_watch(
    api: Api<TwoSite>,
    changed: Arc<Notify>,
    guard: LoopGuard,
) -> Result<()> {
    let config = watcher::Config::default().fields(&format!("metadata.name={DEFAULT_NAME}"));
    let stream = watcher(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        guard.beat();
        match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                changed.notify_one();
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(error = %report(&err), "TwoSite watch error; retrying with backoff");
            }
        }
    }
    Err(Error::LoopEnded("TwoSite watch"))
}
