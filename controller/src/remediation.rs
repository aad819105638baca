//! The remediation loop: every node's verdict, and the fencing, pod deletion and out-of-service
//! taint that follow once the core proves a dead node stopped.
//!
//! A pipeline of named stages, every [`INTERVAL`], on the leader only:
//! 1. assess (pure, [`assess`]): judge every node on this process's clock, find who may vouch
//!    for it and since when they all are clear, and whether remediation is paused;
//! 2. count the pods bound to the nodes that are (or are about to be) fenced or tainted;
//! 3. step each node's [`NodeRemediation`] (the core) and execute its actions: delete pods with
//!    grace period 0, apply or remove the taint (conflict-safe JSON Patch, [`crate::taint`]),
//!    publish Events on the Node;
//! 4. publish what users see: the nodes for the status, the metrics.
//!
//! With a witness ([`crate::witness_link`]), stage 1 is followed by the claims: for every room
//! with a dead node, the opposite room is claimed at the witness, and a node may only be fenced
//! while the controller holds a valid grant for the room opposite its own.
//!
//! Leadership is asked right before every write. A replica that does not lead forgets every
//! node's remediation state, and picks tainted nodes up again from their annotation when it
//! leads again.

use crate::crd::NodeStatus;
use crate::error::{Error, Result, report, with_timeout};
use crate::fence_marker::{clear_fence, commit_fence};
use crate::heartbeats::SharedObserved;
use crate::leader_lease::Leadership;
use crate::metrics::Metrics;
use crate::status::RemediationView;
use crate::taint::{TaintChange, TaintOutcome, change_taint};
use crate::witness_link::WitnessLink;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Preconditions};
use node_health::assess::{NodeAssessment, apply_witness, assess, needs_pod_count, rooms_to_claim};
use node_health::remediation::Phase;
use node_health::{Action, HealthTiming, MonoTime, NodeRemediation, Pairing};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// How often the loop runs.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// Pause reasons (the `RemediationPaused` condition's reason): the core's.
pub use node_health::assess::pause;

/// Everything a remediation pass needs.
#[derive(Clone)]
pub struct RemediationContext {
    pub nodes: Api<Node>,
    /// The agents' heartbeat Leases (the controller's namespace), for the fence marker.
    pub agent_leases: Api<Lease>,
    /// Pods of every namespace.
    pub pods: Api<Pod>,
    pub recorder: crate::events::EventSink,
    pub leadership: Leadership,
    pub metrics: Arc<Metrics>,
    pub api_timeout: Duration,
    pub timing: HealthTiming,
    /// Dead nodes in both rooms beyond this share of all workers pause remediation.
    pub max_dead_share_pct: u8,
    /// The witness, if one is configured: then a node is fenced only while the controller holds
    /// the witness's grant for the room opposite the node's.
    pub witness: Option<Arc<WitnessLink>>,
    /// The VM caches, when VM protection is on: a fenced node's launcher pods are deleted only
    /// for VMs that opted in. Without them every launcher pod is left to Kubernetes.
    pub vms: Option<crate::vm::watch::VmStores>,
    /// The pods bound to each node, from a watch: a pass counts a fenced or tainted node's
    /// pods from memory instead of listing them. `None`, or while not listed: a LIST per pass.
    pub pod_index: Option<crate::pod_index::PodIndex>,
    /// `--dry-run`: the decisions run, but no fence is committed and no pod deleted; only the
    /// early `twosite.dev/unresponsive:NoSchedule` taint (which evicts nothing) and Events are
    /// written, so that the log shows what a real run would do and when.
    pub dry_run: bool,
    /// The fence commits in flight, which pod deletions give way to.
    pub fence_commits: FenceCommits,
}

/// The fence commits in flight. A fenced node's pod deletions wait while there are any (up to
/// the API timeout): when a room is lost each commit unblocks a node's release, and on a loaded
/// API server the next nodes' commits otherwise queue behind the earlier nodes' deletions, 19
/// per node. Waiting only delays deletions that come after a fence: never unsafe.
#[derive(Clone, Default)]
pub struct FenceCommits(Arc<(std::sync::atomic::AtomicUsize, tokio::sync::Notify)>);

impl FenceCommits {
    /// Counts a commit as in flight until the returned guard drops.
    fn start(&self) -> CommitInFlight {
        self.0.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        CommitInFlight(self.clone())
    }

    /// Returns once no commit is in flight.
    async fn idle(&self) {
        loop {
            let notified = self.0.1.notified();
            tokio::pin!(notified);
            // Registered before the count is read: a commit ending in between still wakes it.
            notified.as_mut().enable();
            if self.0.0.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct CommitInFlight(FenceCommits);

impl Drop for CommitInFlight {
    fn drop(&mut self) {
        let (count, idle) = &*self.0.0;
        if count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            idle.notify_waiters();
        }
    }
}

impl RemediationContext {
    /// Whether the VM `key` opted in (`None`: unknown, or VM protection is off).
    fn vm_opted_in(&self, key: &str) -> Option<bool> {
        self.vms.as_ref().and_then(|s| crate::vm::opted_in(s, key))
    }
}

/// The actions `--dry-run` does not carry out: everything but Events and the early NoSchedule
/// taint (without which the core never reaches the fence it is to report).
fn dry_run_skips(action: &Action) -> bool {
    !matches!(
        action,
        Action::Event { .. } | Action::MarkUnschedulable | Action::ClearUnschedulable
    )
}

/// Whether `pod` belongs to a DaemonSet (it is never deleted: it would come back at once and
/// belongs to the node).
pub fn owned_by_daemonset(pod: &Pod) -> bool {
    pod.metadata
        .owner_references
        .as_ref()
        .is_some_and(|os| os.iter().any(|o| o.kind == "DaemonSet"))
}

/// Whether the release after a fence deletes `pod`: not a DaemonSet pod, and not a launcher pod
/// of a VM that did not opt in (the core's [`node_health::vm::release_when_fenced`]; those are
/// left to Kubernetes' out-of-service handling). `opted_in` looks a VM up by `namespace/name`.
pub fn releasable(pod: &Pod, opted_in: &dyn Fn(&str) -> Option<bool>) -> bool {
    !owned_by_daemonset(pod)
        && node_health::vm::release_when_fenced(crate::vm::types::pod_owner(pod, opted_in))
}

/// Stage 2 (pure): the core's pod counts for the pods bound to one node: the pods a release
/// would delete ([`releasable`]), and pods that are terminating.
pub fn pod_counts(pods: &[Pod], opted_in: &dyn Fn(&str) -> Option<bool>) -> (usize, usize) {
    let deletable = pods.iter().filter(|p| releasable(p, opted_in)).count();
    let terminating = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some())
        .count();
    (deletable, terminating)
}

/// The reference of a Node for its Events.
fn node_reference(name: &str, uid: Option<&str>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_string()),
        kind: Some("Node".to_string()),
        name: Some(name.to_string()),
        uid: uid.map(str::to_string),
        ..ObjectReference::default()
    }
}

/// The status entry of one node.
fn node_status(node: &NodeAssessment, state: &NodeRemediation) -> NodeStatus {
    let waiting_for = match state.phase {
        Phase::FenceWaiting(why) => Some(format!("{why:?}")),
        _ => None,
    };
    NodeStatus {
        name: node.name.clone(),
        room: node.room.clone(),
        partner: node.partner.clone(),
        phase: state.phase.name().to_string(),
        waiting_for,
        verdict: node.input.verdict.name().to_string(),
        boot_id: node.input.boot_id.clone(),
    }
}

/// The last change of `node`'s heartbeat the controller saw (its agent's Lease; its kubelet's
/// without an agent), on the controller's clock.
fn last_heartbeat(view: &node_health::ClusterView, node: &str) -> Option<MonoTime> {
    let n = view.nodes.iter().find(|n| n.record.facts.name == node)?;
    n.heartbeats
        .agent
        .as_ref()
        .or(n.heartbeats.kubelet.as_ref())
        .map(|h| h.seen_at)
}

/// The earliest moment the core's judge could let `input`'s node be fenced, as far as time
/// alone decides: the latest of its self-fence deadline, its vouchers' clear time plus the
/// settle time, and the scheduler's head start after the `NoSchedule` taint was seen. `None`
/// when something other than time holds it (paused, no agent, a voucher not clear, no witness
/// grant, the taint not seen yet): then a watch event changes it, and the next tick looks.
/// This mirrors the core's conditions only to choose *when to look again*; the core still
/// decides. A wrong time costs one extra pass, or leaves the node to the next tick.
fn fence_possible_at(input: &node_health::RemediationInput, t: &HealthTiming) -> Option<MonoTime> {
    let node_health::NodeVerdict::Dead {
        fence_deadline: Some(deadline),
    } = input.verdict
    else {
        return None;
    };
    if input.paused || input.excluded || !input.witness_ok {
        return None;
    }
    let settle =
        node_health::time::stretch(t.vouch_validity + t.watchdog + t.fence_margin, t.drift_ppm);
    let clear = input.vouchers_clear_since? + settle;
    let scheduled = input.unschedulable_since? + node_health::remediation::UNSCHEDULABLE_HEAD_START;
    Some(deadline.max(clear).max(scheduled))
}

/// Per-node retry after a failed action: 1 s, 2 s, ... up to 30 s.
fn retry_delay(failures: u32) -> Duration {
    Duration::from_secs(1 << failures.min(5)).min(Duration::from_secs(30))
}

/// The loop's memory between passes.
#[derive(Debug)]
pub struct Remediator {
    states: BTreeMap<String, NodeRemediation>,
    /// When each node was first judged dead in its current spell, for the time-to-taint metric.
    dead_since: BTreeMap<String, MonoTime>,
    /// For each node in `dead_since`: the last change of its heartbeat the controller saw
    /// before the verdict, for the time-to-release metric; removed once measured.
    silent_since: BTreeMap<String, MonoTime>,
    /// Nodes whose last action failed: not stepped again before the time given.
    retry: BTreeMap<String, (MonoTime, u32)>,
    /// Nodes with a `twosite_node_phase` series.
    reported: BTreeSet<String>,
    /// `--dry-run`: the nodes whose "would fence" was logged in this spell.
    dry_run_logged: BTreeSet<String>,
    /// Pod deletions of fenced and tainted nodes under way, by task, and their nodes: at most
    /// one per node (the core asks again at its next step while the node has pods), at most
    /// [`CONCURRENT_RELEASES`] deleting at once.
    releases: tokio::task::JoinSet<(String, Result<()>, Option<MonoTime>)>,
    releasing: BTreeMap<tokio::task::Id, String>,
    release_slots: Arc<tokio::sync::Semaphore>,
    /// The earliest moment after the last pass at which a node waiting for its fence may
    /// become fenceable: the loop runs a pass then instead of at the next tick.
    wake_at: Option<MonoTime>,
}

impl Default for Remediator {
    fn default() -> Self {
        Remediator {
            states: BTreeMap::new(),
            dead_since: BTreeMap::new(),
            silent_since: BTreeMap::new(),
            retry: BTreeMap::new(),
            reported: BTreeSet::new(),
            dry_run_logged: BTreeSet::new(),
            releases: tokio::task::JoinSet::new(),
            releasing: BTreeMap::new(),
            release_slots: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_RELEASES)),
            wake_at: None,
        }
    }
}

impl Remediator {
    /// When the loop should run its next pass, if before the next tick: the earliest moment a
    /// node waiting for its fence may become fenceable ([`fence_possible_at`]). Without it the
    /// fence waited for the tick after its deadline: up to [`INTERVAL`] for nothing.
    pub fn wake_at(&self) -> Option<MonoTime> {
        self.wake_at
    }

    /// The remediation phase of `node`, as this replica last stepped it.
    pub fn phase(&self, node: &str) -> Option<Phase> {
        self.states.get(node).map(|s| s.phase)
    }

    /// One pass at `now`. Returns the view for the status, or `None` when this replica does
    /// not lead (and then nothing was read or written).
    pub async fn pass(
        &mut self,
        ctx: &RemediationContext,
        observed: &SharedObserved,
        pairing: Option<&Pairing>,
        now: MonoTime,
    ) -> Option<RemediationView> {
        if !ctx.leadership.is_leader() {
            self.forget_all(ctx);
            return None;
        }
        self.finish_releases(ctx, now);
        let view = observed.lock().cluster_view(now, &ctx.timing);
        let mut assessment = assess(&view, pairing, now, &ctx.timing, ctx.max_dead_share_pct);
        ctx.metrics
            .remediation_paused
            .set(i64::from(assessment.pause.is_some()));
        if let Some(witness) = &ctx.witness {
            witness
                .claim_rooms(&rooms_to_claim(&assessment, pairing))
                .await;
            // The grant must outlast the fence commit, which may take one API timeout.
            apply_witness(&mut assessment, pairing, |room| {
                witness.grant_valid(room, ctx.api_timeout)
            });
        }
        let present: BTreeSet<&str> = assessment.nodes.iter().map(|n| n.name.as_str()).collect();
        self.states.retain(|n, _| present.contains(n.as_str()));
        self.dead_since.retain(|n, _| present.contains(n.as_str()));
        self.silent_since
            .retain(|n, _| self.dead_since.contains_key(n));
        self.retry.retain(|n, _| present.contains(n.as_str()));
        for gone in self
            .reported
            .iter()
            .filter(|n| !present.contains(n.as_str()))
        {
            ctx.metrics.forget_node(gone);
        }
        self.reported.retain(|n| present.contains(n.as_str()));

        // Each node's step and writes run concurrently with the other nodes' (each node's own
        // actions stay in order): a lost room's last fence must not queue behind every other
        // node's requests. Fences first; the follow-ups of the fences committed in this pass
        // (taint, release) after all of them.
        let started = std::time::Instant::now();
        let mut jobs = Vec::new();
        for node in &assessment.nodes {
            if node.input.verdict.is_dead() && !self.dead_since.contains_key(&node.name) {
                self.dead_since.insert(node.name.clone(), now);
                if let Some(at) = last_heartbeat(&view, &node.name) {
                    self.silent_since.insert(node.name.clone(), at);
                }
            }
            let waiting = self.retry.get(&node.name).is_some_and(|(at, _)| now < *at);
            if !waiting {
                jobs.push(self.take_job(ctx, node));
            }
        }
        // Each future is made when it starts (one per node made up front would hold several
        // KiB each), in a loop rather than by a closure, which would not be general enough
        // over the jobs' lifetimes for the loop's `Send` future.
        let mut done: Vec<(NodeJob<'_>, Result<()>)> = Vec::with_capacity(jobs.len());
        let mut pending = jobs.into_iter();
        let mut running = futures::stream::FuturesUnordered::new();
        loop {
            while running.len() < CONCURRENT_NODES {
                let Some(job) = pending.next() else { break };
                running.push(step_node(ctx, job, now, started));
            }
            match running.next().await {
                Some(d) => done.push(d),
                None => break,
            }
        }
        let mut deferred = Vec::new();
        let mut releases = Vec::new();
        for (mut job, outcome) in done {
            if let Some(follow_ups) = job.deferred.take() {
                deferred.push((job.node, follow_ups));
            }
            if let Some(pods) = job.release.take() {
                releases.push((job.node.name.clone(), pods, job.silent_since.take()));
            }
            let name = self.put_back(job);
            self.record(ctx, &name, now, outcome);
        }
        let mut done: Vec<(NodeJob<'_>, Result<()>)> = Vec::with_capacity(deferred.len());
        let mut pending = deferred.into_iter();
        let mut running = futures::stream::FuturesUnordered::new();
        loop {
            while running.len() < CONCURRENT_NODES {
                let Some((node, (actions, pods))) = pending.next() else {
                    break;
                };
                let job = self.take_job(ctx, node);
                running.push(follow_up(ctx, job, actions, pods, now, started));
            }
            match running.next().await {
                Some(d) => done.push(d),
                None => break,
            }
        }
        for (mut job, outcome) in done {
            if let Some(pods) = job.release.take() {
                releases.push((job.node.name.clone(), pods, job.silent_since.take()));
            }
            let name = self.put_back(job);
            self.record(ctx, &name, now, outcome);
        }
        self.start_releases(ctx, releases, now, started);

        let mut statuses = Vec::with_capacity(assessment.nodes.len());
        for node in &assessment.nodes {
            let state = self.states.entry(node.name.clone()).or_default();
            if state.phase == Phase::Healthy && !node.input.verdict.is_dead() {
                self.dead_since.remove(&node.name);
                self.silent_since.remove(&node.name);
            }
            ctx.metrics.set_node_phase(&node.name, state.phase.name());
            self.reported.insert(node.name.clone());
            statuses.push(node_status(node, state));
        }
        self.wake_at = assessment
            .nodes
            .iter()
            .filter(|n| {
                matches!(
                    self.states.get(&n.name).map(|s| s.phase),
                    Some(Phase::FenceWaiting(_))
                )
            })
            .filter_map(|n| fence_possible_at(&n.input, &ctx.timing))
            .filter(|at| *at > now)
            .min();
        let (fenced, live) = node_health::volume::switch::node_sets(
            assessment.nodes.iter().map(|n| (&n.name, &n.input.verdict)),
            self.states.iter(),
        );
        Some(RemediationView {
            nodes: statuses,
            pause: assessment.pause,
            witness: ctx.witness.as_ref().map(|w| w.view()),
            fenced,
            live,
        })
    }

    /// Records how a node's actions went: a failure delays the node's next step.
    fn record(&mut self, ctx: &RemediationContext, node: &str, now: MonoTime, outcome: Result<()>) {
        match outcome {
            Ok(()) => {
                self.retry.remove(node);
            }
            Err(err) => {
                ctx.metrics.remediation_failed(err.metric_label());
                let failures = self.retry.get(node).map_or(0, |(_, f)| *f);
                let delay = retry_delay(failures);
                tracing::warn!(node, error = %report(&err), retry_in = ?delay, "remediation action failed");
                self.retry
                    .insert(node.to_string(), (now + delay, failures.saturating_add(1)));
            }
        }
    }

    fn forget_all(&mut self, ctx: &RemediationContext) {
        if let Some(witness) = &ctx.witness {
            witness.forget_grants();
        }
        // A former leader deletes nothing more (each deletion also checks the leadership).
        self.releases.abort_all();
        self.releasing.clear();
        self.states.clear();
        self.dead_since.clear();
        self.silent_since.clear();
        self.retry.clear();
        ctx.metrics.remediation_paused.set(0);
        for n in std::mem::take(&mut self.reported) {
            ctx.metrics.forget_node(&n);
        }
    }

    /// Starts the deletion of the pods of each node in `releases` (with the last heartbeat
    /// change seen before its verdict, for `time_to_release`), unless one is under way for it.
    fn start_releases(
        &mut self,
        ctx: &RemediationContext,
        releases: Vec<(String, Vec<PodToDelete>, Option<MonoTime>)>,
        now: MonoTime,
        started: std::time::Instant,
    ) {
        for (node, pods, silent) in releases {
            if self.releasing.values().any(|n| *n == node) {
                // Asked again by the next step while the node has pods; measured then.
                if let Some(at) = silent {
                    self.silent_since.insert(node, at);
                }
                continue;
            }
            let ctx = ctx.clone();
            let name = node.clone();
            let slots = Arc::clone(&self.release_slots);
            let handle = self.releases.spawn(async move {
                // Never closed: a permit always comes.
                let _slot = slots.acquire_owned().await;
                let outcome = delete_pods(&ctx, &name, &pods).await;
                // The fence, the taint and the deletions all succeeded: released. Measured
                // once per spell; kept for the next attempt otherwise.
                let silent = match (&outcome, silent) {
                    (Ok(()), Some(at)) => {
                        let spent = now.since(at) + started.elapsed();
                        ctx.metrics.time_to_release.observe(spent.as_secs_f64());
                        None
                    }
                    (_, s) => s,
                };
                (name, outcome, silent)
            });
            self.releasing.insert(handle.id(), node);
        }
    }

    /// Takes in the pod deletions that ended since the last pass.
    fn finish_releases(&mut self, ctx: &RemediationContext, now: MonoTime) {
        while let Some(done) = self.releases.try_join_next_with_id() {
            match done {
                Ok((id, (node, outcome, silent))) => {
                    self.releasing.remove(&id);
                    if let Some(at) = silent {
                        self.silent_since.entry(node.clone()).or_insert(at);
                    }
                    self.record(ctx, &node, now, outcome);
                }
                Err(err) => {
                    if let Some(node) = self.releasing.remove(&err.id()) {
                        tracing::warn!(node, error = %err, "pod deletion task ended abnormally");
                    }
                }
            }
        }
    }

    /// Takes `node`'s state and bookkeeping out of the remediator for a concurrent step.
    fn take_job<'a>(&mut self, ctx: &RemediationContext, node: &'a NodeAssessment) -> NodeJob<'a> {
        NodeJob {
            node,
            state: self.states.remove(&node.name).unwrap_or_default(),
            dry_run_logged: self.dry_run_logged.contains(&node.name),
            dead_since: self.dead_since.get(&node.name).copied(),
            silent_since: self.silent_since.remove(&node.name),
            deferred: None,
            possible_at: fence_possible_at(&node.input, &ctx.timing),
            release: None,
        }
    }

    /// Puts a stepped node's state and bookkeeping back; returns its name.
    fn put_back(&mut self, job: NodeJob<'_>) -> String {
        let name = job.node.name.clone();
        if job.dry_run_logged {
            self.dry_run_logged.insert(name.clone());
        } else {
            self.dry_run_logged.remove(&name);
        }
        if let Some(at) = job.silent_since {
            self.silent_since.insert(name.clone(), at);
        }
        self.states.insert(name.clone(), job.state);
        name
    }
}

/// How many nodes a pass steps and writes for at once. Each node's own actions stay in order.
const CONCURRENT_NODES: usize = 32;

/// How many nodes' pods are being deleted at once (each node's one after another).
const CONCURRENT_RELEASES: usize = 16;

/// One node's part of a pass: its state and bookkeeping, taken out of the [`Remediator`] so
/// that the nodes of a pass run concurrently.
struct NodeJob<'a> {
    node: &'a NodeAssessment,
    state: NodeRemediation,
    /// `--dry-run`: its "would fence" was logged in this spell.
    dry_run_logged: bool,
    dead_since: Option<MonoTime>,
    silent_since: Option<MonoTime>,
    /// The follow-ups of a fence committed in this pass, with the pods counted for them.
    deferred: Option<(std::collections::VecDeque<Action>, Option<Vec<PodToDelete>>)>,
    /// From when the node could be fenced, for `twosite_fence_decision_seconds`.
    possible_at: Option<MonoTime>,
    /// The pods to delete, once the node's fence and taint are written.
    release: Option<Vec<PodToDelete>>,
}

/// Stages 2 and 3 for one node.
async fn step_node<'a>(
    ctx: &RemediationContext,
    mut job: NodeJob<'a>,
    now: MonoTime,
    started: std::time::Instant,
) -> (NodeJob<'a>, Result<()>) {
    let node = job.node;
    let mut input = node.input.clone();
    let mut pods = None;
    if needs_pod_count(&job.state, &input) {
        match pods_on(ctx, &node.name).await {
            Ok(listed) => {
                (input.pods, input.terminating_pods) =
                    pod_counts(&listed, &|k: &str| ctx.vm_opted_in(k));
                // Only what the deletion needs is kept: a lost room's pods, whole, would be
                // tens of MiB at once.
                pods = Some(to_delete(ctx, &listed));
            }
            Err(err) => return (job, Err(err)),
        }
    }
    let before = job.state.phase;
    let actions = job.state.step(&input, now, &ctx.timing);
    if job.state.phase != before {
        tracing::info!(
            node = node.name,
            from = before.name(),
            to = job.state.phase.name(),
            verdict = input.verdict.name(),
            "remediation phase changed"
        );
    }
    if job.state.phase == Phase::Healthy {
        job.dry_run_logged = false;
    }
    let outcome = execute(ctx, &mut job, actions.into(), pods, now, true, started).await;
    (job, outcome)
}

/// The deferred follow-ups of a fence committed in this pass.
async fn follow_up<'a>(
    ctx: &RemediationContext,
    mut job: NodeJob<'a>,
    actions: std::collections::VecDeque<Action>,
    pods: Option<Vec<PodToDelete>>,
    now: MonoTime,
    started: std::time::Instant,
) -> (NodeJob<'a>, Result<()>) {
    let outcome = execute(ctx, &mut job, actions, pods, now, false, started).await;
    (job, outcome)
}

/// Executes `actions` for the node of `job`, in order; the first failure ends them (`?`): a
/// failed taint write must delete nothing. A committed fence's follow-ups (taint, release) run
/// in this same pass: right away, or with `defer_release`, once every node of the pass had its
/// fence committed ([`NodeJob::deferred`]), so that when a room is lost the last node's fence
/// does not wait for every other node's taint and deletions.
async fn execute(
    ctx: &RemediationContext,
    job: &mut NodeJob<'_>,
    mut actions: std::collections::VecDeque<Action>,
    mut pods: Option<Vec<PodToDelete>>,
    now: MonoTime,
    defer_release: bool,
    started: std::time::Instant,
) -> Result<()> {
    let node = job.node;
    while let Some(action) = actions.pop_front() {
        if !ctx.leadership.is_leader() {
            return Ok(());
        }
        if ctx.dry_run && dry_run_skips(&action) {
            if matches!(action, Action::CommitFence { .. }) {
                if !std::mem::replace(&mut job.dry_run_logged, true) {
                    tracing::warn!(
                        node = node.name,
                        "dry-run: would commit the fence, apply the out-of-service taint and delete the node's pods"
                    );
                }
                // As if the heartbeat had changed: the node is never shown fenced.
                let _ = job.state.commit_result(false); // false: no follow-ups
            } else {
                tracing::info!(node = node.name, ?action, "dry-run: would write");
            }
            continue;
        }
        match action {
            Action::CommitFence {
                heartbeat,
                fenced_boot_id,
            } => {
                if let Some(at) = job.possible_at {
                    let waited = now.since(at) + started.elapsed();
                    ctx.metrics.fence_decision.observe(waited.as_secs_f64());
                }
                let in_flight = ctx.fence_commits.start();
                let committed = commit_fence(
                    &ctx.agent_leases,
                    &ctx.leadership,
                    &node.agent_lease,
                    &heartbeat,
                    fenced_boot_id.as_deref(),
                    ctx.api_timeout,
                )
                .await;
                drop(in_flight);
                let ok = matches!(committed, Ok(true));
                actions.extend(job.state.commit_result(ok));
                if ok {
                    ctx.metrics.remediations.inc();
                    tracing::info!(node = node.name, heartbeat, "fence committed");
                    if defer_release {
                        job.deferred = Some((actions, pods));
                        return Ok(());
                    }
                } else {
                    tracing::info!(
                        node = node.name,
                        heartbeat,
                        "fence not committed: the heartbeat Lease changed"
                    );
                }
                committed?;
            }
            Action::ClearFence => {
                clear_fence(
                    &ctx.agent_leases,
                    &ctx.leadership,
                    &node.agent_lease,
                    ctx.api_timeout,
                )
                .await?;
            }
            Action::DeletePods => {
                let listed = match pods.take() {
                    Some(p) => p,
                    None => to_delete(ctx, &pods_on(ctx, &node.name).await?),
                };
                // Deleted in the background ([`Remediator::start_releases`]): when a room is
                // lost, its thousands of pod deletions must not hold up the next pass's fences.
                // The fence and the taint were written: the core orders the deletion last.
                job.release = Some(listed);
            }
            Action::ApplyTaint { fenced_boot_id } => {
                let change = TaintChange::Apply { fenced_boot_id };
                let outcome = change_taint(
                    &ctx.nodes,
                    &ctx.leadership,
                    &node.name,
                    &change,
                    ctx.api_timeout,
                )
                .await?;
                if outcome == TaintOutcome::Written {
                    tracing::info!(node = node.name, "out-of-service taint applied");
                    if let Some(since) = job.dead_since {
                        ctx.metrics
                            .time_to_taint
                            .observe(now.since(since).as_secs_f64());
                    }
                }
            }
            Action::RemoveTaint | Action::MarkUnschedulable | Action::ClearUnschedulable => {
                let change = match action {
                    Action::RemoveTaint => TaintChange::Remove,
                    Action::MarkUnschedulable => TaintChange::MarkUnschedulable,
                    _ => TaintChange::ClearUnschedulable,
                };
                let outcome = change_taint(
                    &ctx.nodes,
                    &ctx.leadership,
                    &node.name,
                    &change,
                    ctx.api_timeout,
                )
                .await?;
                if outcome == TaintOutcome::Written {
                    tracing::info!(node = node.name, change = change.what(), "taint written");
                }
            }
            Action::Event { reason, message } => {
                publish_event(ctx, node, reason, message).await;
            }
        }
    }
    Ok(())
}

/// The pods bound to `node`, in every namespace: from the pod index once it has listed, else
/// listed from the API server (an index that has not listed would read "no pods").
async fn pods_on(ctx: &RemediationContext, node: &str) -> Result<Vec<Pod>> {
    match ctx.pod_index.as_ref().and_then(|i| i.pods_on(node)) {
        Some(pods) => Ok(pods),
        None => list_pods(ctx, node).await,
    }
}

/// The pods bound to `node`, in every namespace, listed from the API server.
async fn list_pods(ctx: &RemediationContext, node: &str) -> Result<Vec<Pod>> {
    let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
    Ok(
        with_timeout("list pods", ctx.api_timeout, ctx.pods.list(&lp))
            .await?
            .items,
    )
}

/// A pod to delete: namespace, name, uid (a whole Pod per deletion waiting would cost a lost
/// room's thousands of pods several KiB each).
type PodToDelete = (String, String, Option<String>);

/// The [`releasable`] pods of `pods`.
fn to_delete(ctx: &RemediationContext, pods: &[Pod]) -> Vec<PodToDelete> {
    let opted_in = |k: &str| ctx.vm_opted_in(k);
    pods.iter()
        .filter(|p| releasable(p, &opted_in))
        .filter_map(|p| {
            Some((
                p.metadata.namespace.clone()?,
                p.metadata.name.clone()?,
                p.metadata.uid.clone(),
            ))
        })
        .collect()
}

/// Deletes `pods` (from [`to_delete`]) with grace period 0, each only if it is still the same
/// pod (uid precondition: a StatefulSet pod recreated under the same name elsewhere is left
/// alone). Safe only because the core proved the node fenced.
async fn delete_pods(ctx: &RemediationContext, node: &str, pods: &[PodToDelete]) -> Result<()> {
    for (namespace, name, uid) in pods {
        let _ = tokio::time::timeout(ctx.api_timeout, ctx.fence_commits.idle()).await;
        if !ctx.leadership.is_leader() {
            return Ok(());
        }
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: uid.clone().map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let api: Api<Pod> = Api::namespaced(ctx.pods.clone().into_client(), namespace);
        match with_timeout("delete pod", ctx.api_timeout, api.delete(name, &dp)).await {
            Ok(_) => tracing::info!(node, pod = name, namespace, "deleted pod of a fenced node"),
            // Gone already, or replaced by a new pod of the same name: nothing to do.
            Err(Error::Kube {
                source: kube::Error::Api(s),
                ..
            }) if s.code == 404 || s.code == 409 => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Publishes one of the core's Events on the Node. Best effort: a lost Event is logged.
async fn publish_event(
    ctx: &RemediationContext,
    node: &NodeAssessment,
    reason: node_health::EventReason,
    message: String,
) {
    let reference = node_reference(&node.name, node.uid.as_deref());
    crate::error::publish_event(
        &ctx.recorder,
        ctx.api_timeout,
        &reference,
        (reason.as_str(), reason.is_warning(), "Remediate"),
        message,
    )
    .await;
}

/// Runs a pass every [`INTERVAL`] forever, on every replica (a non-leader's pass does
/// nothing), publishing the status view on `view` when it changes. Marks the process ready once
/// every watch has synced.
pub async fn run_remediation_loop(
    ctx: RemediationContext,
    observed: SharedObserved,
    pairing: tokio::sync::watch::Receiver<Option<Pairing>>,
    view: tokio::sync::watch::Sender<Option<RemediationView>>,
    health: Arc<crate::admin::Health>,
    clock: Arc<dyn node_health::Clock + Send + Sync>,
    guard: crate::admin::LoopGuard,
) -> Result<()> {
    let mut remediator = Remediator::default();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The next tick, or earlier when a node becomes fenceable before it.
        let wake = remediator.wake_at().map(|at| at.since(clock.now()));
        tokio::select! {
            _ = tick.tick() => {}
            () = async {
                match wake {
                    Some(after) => tokio::time::sleep(after).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        guard.beat();
        if !health.is_ready() && observed.lock().synced() {
            tracing::info!("every watch synced");
            health.set_nodes_synced();
        }
        let current = pairing.borrow().clone();
        let next = remediator
            .pass(&ctx, &observed, current.as_ref(), clock.now())
            .await;
        view.send_if_modified(|v| {
            if *v == next {
                false
            } else {
                *v = next;
                true
            }
        });
    }
}

#[cfg(test)]
#[path = "remediation_tests.rs"]
mod tests;
