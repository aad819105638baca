//! `twosite-bench`: the controller's footprint and decision latency at scale, in one process,
//! on virtual time.
//!
//! It drives the code the controller runs (the heartbeat and Node watch handlers of
//! [`controller::heartbeats::Observed`], the pod index, the VM caches, the remediation pass,
//! the VM loop pass, leader election) against an in-process API server: a `tower` service that
//! stores what is written, answers reads from that store, and delivers every change to the
//! watch handlers at once (as a watch with no delay would). N nodes in two rooms, one agent
//! heartbeat Lease per node renewed every 2 s, 10 VMs and 20 pods per node; after a settle time
//! the agents of room A (or of `--lost-nodes` of its nodes) stop renewing, and the bench runs
//! until every lost node is fenced, tainted and released, and then a while longer (a lost room
//! staying tainted).
//!
//! It prints what the issue asks for: peak RSS, CPU per second of cluster time, the decision
//! latency from the moment a node may be fenced (the core's fence deadline) to its fence
//! commit request, and the API requests of the failover. Figures, not assertions: nothing here
//! fails on a slow machine.

use clap::Parser;
use controller::heartbeats::{AGENT_HEARTBEAT_LABEL, Observed, SharedObserved};
use controller::leader_lease::{LeaderLease, Leadership};
use controller::metrics::Metrics;
use controller::pod_index::PodIndex;
use controller::remediation::{RemediationContext, Remediator};
use controller::vm::watch::VmStores;
use controller::vm::{VmContext, VmLoop};
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::client::Body;
use kube::runtime::events::Reporter;
use kube::runtime::watcher::Event as W;
use node_health::{Clock, HealthTiming, LeaderConfig, MonoTime, NodeVerdict, Pairing};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

const NAMESPACE: &str = "twosite-system";
const ZONE: &str = "topology.kubernetes.io/zone";
const TICK_MS: u64 = 500;

#[derive(Parser, Debug)]
#[command(about = "Scale and footprint bench of the twosite controller (virtual time)")]
struct Args {
    /// Nodes in all, half in each room.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// VirtualMachines per node (each with its launcher pod on the node).
    #[arg(long, default_value_t = 10)]
    vms_per_node: usize,
    /// Pods per node in all (launcher pods included; one of them a DaemonSet's).
    #[arg(long, default_value_t = 20)]
    pods_per_node: usize,
    /// How many of room A's nodes lose power (default: all of them, a room loss). With 1, the
    /// decision latency of the common case: one node lost in a large cluster.
    #[arg(long)]
    lost_nodes: Option<usize>,
    /// Virtual seconds of calm before room A's agents stop renewing.
    #[arg(long, default_value_t = 30)]
    calm_secs: u64,
    /// Virtual seconds after the last node of room A was released (the room stays tainted).
    #[arg(long, default_value_t = 30)]
    tail_secs: u64,
    /// Without the pod index (as before it existed): a LIST of the node's pods on every pass
    /// for every fenced or tainted node. For comparison.
    #[arg(long)]
    no_pod_index: bool,
    /// Round-trip time of every API request, in ms (0: the in-process server answers at once;
    /// a real API server with etcd takes a few ms per write). With a latency the bench runs in
    /// real time: a virtual second lasts a second.
    #[arg(long, default_value_t = 0.0)]
    api_latency_ms: f64,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// The bench's virtual clock, shared with leader election and the VM loop.
#[derive(Debug, Default)]
struct VirtualClock(AtomicU64);

impl node_health::Clock for VirtualClock {
    fn now(&self) -> MonoTime {
        MonoTime(self.0.load(Ordering::Relaxed))
    }
}

/// The in-process API server: objects by path, and what it was asked.
struct Server {
    /// Kept serialized: as `Value`s the bench's own store was ~8 MiB of the RSS at 1,000 nodes,
    /// which is not the controller's.
    objects: Objects,
    rv: u64,
    observed: SharedObserved,
    pods: PodIndex,
    clock: Arc<VirtualClock>,
    timing: HealthTiming,
    /// Requests by kind (`METHOD resource`), since the last reset.
    requests: BTreeMap<String, u64>,
    /// Fence commits: node, virtual time, wall-clock time.
    commits: Vec<(String, MonoTime, Instant)>,
    /// Wall-clock time spent in this server (not the controller's work).
    own: Duration,
}

/// Objects by path, each as its JSON bytes.
#[derive(Default)]
struct Objects(HashMap<String, Box<[u8]>>);

impl Objects {
    fn insert(&mut self, path: String, obj: &Value) {
        self.0
            .insert(path, serde_json::to_vec(obj).unwrap_or_default().into());
    }
    fn get(&self, path: &str) -> Option<Value> {
        self.0
            .get(path)
            .and_then(|b| serde_json::from_slice(b).ok())
    }
    fn contains_key(&self, path: &str) -> bool {
        self.0.contains_key(path)
    }
}

#[derive(Clone)]
struct Shared(Arc<Mutex<Server>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Server> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn status(code: u16, reason: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": reason, "message": reason, "code": code}),
    )
}

/// What kind of request this is, for the counts: the method and the resource.
fn kind_of(method: &Method, path: &str) -> String {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let resource = parts
        .iter()
        .rev()
        .find(|p| {
            matches!(
                **p,
                "pods" | "nodes" | "leases" | "events" | "virtualmachines" | "status"
            )
        })
        .copied()
        .unwrap_or("other");
    let resource = if resource == "leases" && path.contains("/twosite-agent-") {
        "agent lease"
    } else if resource == "leases" {
        "leader lease"
    } else {
        resource
    };
    let method = if *method == Method::GET && path.ends_with("/pods") {
        "LIST"
    } else {
        method.as_str()
    };
    format!("{method} {resource}")
}

impl Server {
    fn store(&mut self, path: &str, mut obj: Value) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects.insert(path.to_string(), &obj);
        let now = self.clock.now();
        // The watches deliver the change at once.
        if path.starts_with("/api/v1/nodes/") {
            if let Ok(node) = serde_json::from_value::<Node>(obj.clone()) {
                self.observed.lock().apply_node(W::Apply(node), now);
            }
        } else if path.contains("/leases/twosite-agent-")
            && let Ok(lease) = serde_json::from_value::<Lease>(obj.clone())
        {
            let t = self.timing;
            self.observed
                .lock()
                .apply_agent_lease(W::Apply(lease), now, &t);
        }
        obj
    }

    fn handle(
        &mut self,
        method: &Method,
        path: &str,
        query: &str,
        ct: &str,
        body: Value,
    ) -> (u16, Value) {
        let mut kind = kind_of(method, path);
        if path.ends_with("/events") && *method == Method::POST {
            // Events by reason: a repeated one shows.
            if let Some(reason) = body["reason"].as_str() {
                kind = format!("{kind} {reason}");
            }
            *self.requests.entry(kind).or_default() += 1;
            return (201, body);
        }
        *self.requests.entry(kind).or_default() += 1;
        if *method == Method::GET && path == "/api/v1/pods" {
            let node = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("fieldSelector=spec.nodeName%3D"))
                .unwrap_or_default();
            let items = self.pods.pods_on(node).unwrap_or_default();
            return (
                200,
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"},
                       "items": items}),
            );
        }
        if *method == Method::DELETE && path.contains("/pods/") {
            let mut parts = path.rsplit('/');
            let (name, _, ns) = (parts.next(), parts.next(), parts.next());
            let pod: Pod =
                serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}}))
                    .unwrap_or_default();
            self.pods.apply(W::Delete(pod.clone()));
            return (200, serde_json::to_value(pod).unwrap_or_default());
        }
        match *method {
            Method::GET => match self.objects.get(path) {
                Some(o) => (200, o),
                None => status(404, "NotFound"),
            },
            Method::POST => {
                let name = body["metadata"]["name"].as_str().unwrap_or("x").to_string();
                let at = format!("{path}/{name}");
                if self.objects.contains_key(&at) {
                    return status(409, "AlreadyExists");
                }
                (201, self.store(&at, body))
            }
            Method::PUT => (200, self.store(path, body)),
            Method::PATCH => {
                let Some(mut obj) = self.objects.get(path) else {
                    return status(404, "NotFound");
                };
                if ct.contains("json-patch") {
                    let Ok(patch) = serde_json::from_value::<json_patch::Patch>(body) else {
                        return status(400, "BadRequest");
                    };
                    if json_patch::patch(&mut obj, &patch).is_err() {
                        return status(409, "Conflict");
                    }
                } else {
                    json_patch::merge(&mut obj, &body);
                }
                if path.contains("/leases/twosite-agent-")
                    && obj["metadata"]["annotations"]
                        .get("twosite.dev/fenced-boot-id")
                        .is_some()
                {
                    let node = path.rsplit("twosite-agent-").next().unwrap_or_default();
                    self.commits
                        .push((node.to_string(), self.clock.now(), Instant::now()));
                }
                (200, self.store(path, obj))
            }
            _ => status(405, "MethodNotAllowed"),
        }
    }
}

/// The `tower` service the controller's kube client talks to.
/// A client of the in-process API server; every answer comes `latency` after the request was
/// handled (a round trip to a real API server and etcd).
fn client(server: Shared, latency: Duration) -> kube::Client {
    let service = tower::service_fn(move |req: Request<Body>| {
        let server = server.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let started = Instant::now();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let ct = parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let (code, bytes) = {
                let mut s = server.lock();
                let (code, answer) = s.handle(
                    &parts.method,
                    parts.uri.path(),
                    parts.uri.query().unwrap_or_default(),
                    &ct,
                    body,
                );
                let bytes = serde_json::to_vec(&answer).unwrap_or_default();
                s.own += started.elapsed();
                (code, bytes)
            };
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let response = Response::builder()
                .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
                .header("content-type", "application/json")
                .body(Body::from(bytes))
                .unwrap_or_else(|_| Response::new(Body::empty()));
            Ok::<_, Infallible>(response)
        }
    });
    kube::Client::new(service, "default")
}

fn room_of(i: usize) -> &'static str {
    if i.is_multiple_of(2) {
        "room-a"
    } else {
        "room-b"
    }
}

fn node_name(i: usize) -> String {
    format!("{}-{}", if i.is_multiple_of(2) { "a" } else { "b" }, i / 2)
}

fn node_json(i: usize) -> Value {
    let name = node_name(i);
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "uid": format!("uid-{name}"),
                     "labels": {ZONE: room_of(i), "kubernetes.io/hostname": name}},
        "spec": {"taints": []},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "nodeInfo": {"bootID": format!("boot-{name}"), "machineID": "", "systemUUID": "",
                         "kernelVersion": "", "osImage": "", "containerRuntimeVersion": "",
                         "kubeletVersion": "", "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": "amd64"},
        },
    })
}

fn namespace_of(i: usize) -> String {
    format!("ns-{}", i % 50)
}

fn vm_name(node: &str, j: usize) -> String {
    format!("vm-{node}-{j}")
}

/// VM `j` of node `i`. Every other VM opts in (annotated, its template labelled as the
/// controller labels it) and boots from a container disk; the others are plain VMs with a PVC.
fn vm_json(i: usize, j: usize) -> Value {
    let vm = vm_name(&node_name(i), j);
    let ns = namespace_of(i);
    if j.is_multiple_of(2) {
        json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": vm, "namespace": ns, "uid": format!("uid-{vm}"),
                         "annotations": {"twosite.dev/ha": "true"}},
            "spec": {"runStrategy": "Always", "template": {
                "metadata": {"labels": {"twosite.dev/ha": "true"}},
                "spec": {"volumes": [{"name": "root", "containerDisk": {"image": "quay.io/containerdisks/fedora"}}]}}},
            "status": {"printableStatus": "Running"},
        })
    } else {
        json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": vm, "namespace": ns, "uid": format!("uid-{vm}")},
            "spec": {"runStrategy": "Always", "template": {"spec": {"volumes": [
                {"name": "root", "persistentVolumeClaim": {"claimName": format!("{vm}-root")}}]}}},
            "status": {"printableStatus": "Running"},
        })
    }
}

fn launcher_json(node: &str, ns: &str, j: usize) -> Value {
    let vm = vm_name(node, j);
    let mut pod = pod_json(
        node,
        ns,
        &format!("virt-launcher-{vm}"),
        ("VirtualMachineInstance", &vm),
        true,
    );
    if j.is_multiple_of(2) {
        // KubeVirt copies the template's labels to the launcher pod.
        pod["metadata"]["labels"]["twosite.dev/ha"] = json!("true");
    }
    pod
}

fn timestamp(ms: u64) -> String {
    // Virtual time as a wall-clock-looking renewTime: each renewal a distinct one.
    let ms = i64::try_from(ms).unwrap_or(i64::MAX / 2);
    jiff::Timestamp::from_millisecond(1_800_000_000_000 + ms)
        .unwrap_or_default()
        .to_string()
}

fn agent_json(name: &str, ms: u64) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": format!("twosite-agent-{name}"), "namespace": NAMESPACE,
                     "labels": {AGENT_HEARTBEAT_LABEL: "true"},
                     "annotations": {"twosite.dev/renew-failures": "0",
                                     "twosite.dev/watchdog": "enabled",
                                     "twosite.dev/boot-id": format!("boot-{name}")}},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 8,
                 "renewTime": timestamp(ms)},
    })
}

/// A pod as the API server returns it (containers, status: what a pod watch carries).
fn pod_json(node: &str, ns: &str, name: &str, owner: (&str, &str), launcher: bool) -> Value {
    let mut labels = json!({"app": name});
    if launcher {
        labels["kubevirt.io"] = json!("virt-launcher");
        labels["vm.kubevirt.io/name"] = json!(owner.1);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
                     "resourceVersion": "1", "labels": labels,
                     "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner.0,
                                          "name": owner.1, "uid": "u", "controller": true}]},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "registry.example/app:1.0",
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]},
        "status": {"phase": "Running", "podIP": "10.0.0.1",
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

/// Per-thread CPU time: the controller's work runs on this thread (a current-thread runtime).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A `/proc/self/status` figure in KiB (`VmHWM`: peak RSS, `VmRSS`: now).
fn proc_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(key)?
                    .trim()
                    .strip_suffix("kB")
                    .map(str::trim)
                    .map(str::to_string)
            })
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn decode<K: serde::de::DeserializeOwned>(v: Value) -> Result<K, String> {
    serde_json::from_value(v).map_err(|e| e.to_string())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: no runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(args: Args) -> Result<(), String> {
    let n = args.nodes.max(2);
    let rss_start = proc_kib("VmRSS:");
    let timing = HealthTiming::default();
    let clock = Arc::new(VirtualClock::default());
    let observed = SharedObserved::new(Observed::default());
    let pods = PodIndex::default();
    let server = Shared(Arc::new(Mutex::new(Server {
        objects: Objects::default(),
        rv: 100,
        observed: observed.clone(),
        pods: pods.clone(),
        clock: Arc::clone(&clock),
        timing,
        requests: BTreeMap::new(),
        commits: Vec::new(),
        own: Duration::ZERO,
    })));
    let client = client(
        server.clone(),
        Duration::from_micros((args.api_latency_ms * 1000.0) as u64),
    );
    let cpu_start = thread_cpu();

    // The initial listings, through the watch handlers (objects decoded from JSON, as a watch
    // delivers them).
    let now = MonoTime(0);
    {
        let mut s = server.lock();
        let mut o = observed.lock();
        o.apply_node(W::Init, now);
        o.apply_agent_lease(W::Init, now, &timing);
        for i in 0..n {
            let name = node_name(i);
            s.rv += 1;
            let mut node = node_json(i);
            node["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            s.objects.insert(format!("/api/v1/nodes/{name}"), &node);
            let node: Node = serde_json::from_value(node).map_err(|e| e.to_string())?;
            o.apply_node(W::InitApply(node), now);
            let mut lease = agent_json(&name, 0);
            s.rv += 1;
            lease["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            s.objects.insert(
                format!("/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/twosite-agent-{name}"),
                &lease,
            );
            let lease: Lease = serde_json::from_value(lease).map_err(|e| e.to_string())?;
            o.apply_agent_lease(W::InitApply(lease), now, &timing);
        }
        o.apply_node(W::InitDone, now);
        o.apply_agent_lease(W::InitDone, now, &timing);
        o.apply_kubelet_lease(W::Init, now);
        o.apply_kubelet_lease(W::InitDone, now);
    }
    // Pods and VMs: the launcher pods are in both caches (the VM caches' launcher watch and the
    // pod index), as in the controller. Every object is made, decoded and handed over one at a
    // time, as a watch delivers them: the bench keeps no list of its own that would count in
    // the RSS.
    pods.apply(W::Init);
    for i in 0..n {
        let node = node_name(i);
        let ns = namespace_of(i);
        for j in 0..args.pods_per_node {
            let json = if j < args.vms_per_node {
                launcher_json(&node, &ns, j)
            } else if j == args.vms_per_node {
                pod_json(
                    &node,
                    "kube-system",
                    &format!("ds-{node}"),
                    ("DaemonSet", "ds"),
                    false,
                )
            } else {
                pod_json(
                    &node,
                    &ns,
                    &format!("web-{node}-{j}"),
                    ("ReplicaSet", "web"),
                    false,
                )
            };
            let pod: Pod = serde_json::from_value(json).map_err(|e| e.to_string())?;
            pods.apply(W::InitApply(pod));
        }
    }
    pods.apply(W::InitDone);
    let per_node = args.vms_per_node;
    let vm_objects =
        (0..n).flat_map(|i| (0..per_node).filter_map(move |j| decode(vm_json(i, j)).ok()));
    let launcher_objects = (0..n).flat_map(|i| {
        (0..per_node)
            .filter_map(move |j| decode(launcher_json(&node_name(i), &namespace_of(i), j)).ok())
    });
    let stores = VmStores::from_objects(vm_objects, launcher_objects, Vec::new(), Vec::new());
    let rss_loaded = proc_kib("VmRSS:");
    let cpu_loaded = thread_cpu();

    // The controller's parts, as `twosite controller` wires them.
    let metrics = Arc::new(Metrics::new());
    let leadership = Leadership::with_clock(
        LeaderConfig::new("bench"),
        Arc::clone(&clock) as Arc<dyn node_health::Clock + Send + Sync>,
    )
    .map_err(|e| e.to_string())?;
    let lease = LeaderLease::new(
        client.clone(),
        NAMESPACE,
        leadership.clone(),
        Arc::clone(&metrics),
        Duration::from_secs(5),
    );
    let recorder = controller::events::EventSink::new(
        client.clone(),
        Reporter {
            controller: "twosite-controller".into(),
            instance: Some("bench".into()),
        },
    );
    let ctx = RemediationContext {
        nodes: kube::Api::all(client.clone()),
        agent_leases: kube::Api::namespaced(client.clone(), NAMESPACE),
        pods: kube::Api::all(client.clone()),
        recorder: recorder.clone(),
        leadership: leadership.clone(),
        metrics: Arc::clone(&metrics),
        api_timeout: Duration::from_secs(5),
        timing,
        max_dead_share_pct: 50,
        witness: None,
        vms: Some(stores.clone()),
        pod_index: (!args.no_pod_index).then(|| pods.clone()),
        dry_run: false,
        fence_commits: Default::default(),
    };
    let vm_ctx = VmContext {
        client: client.clone(),
        stores,
        recorder,
        leadership: leadership.clone(),
        metrics: Arc::clone(&metrics),
        api_timeout: Duration::from_secs(5),
        clock: Arc::clone(&clock) as Arc<dyn node_health::Clock + Send + Sync>,
        dry_run: false,
    };
    let facts = observed.lock().node_facts().unwrap_or_default();
    let pairing: Pairing =
        node_health::rooms::pair_nodes(&node_health::rooms::RoomConfig::default(), &facts, &[]);
    let room_a = n.div_ceil(2);
    let lost_count = args.lost_nodes.unwrap_or(room_a).min(room_a);
    let is_lost = |i: usize| i.is_multiple_of(2) && i / 2 < lost_count;
    let lost: Vec<String> = (0..n).filter(|i| is_lost(*i)).map(node_name).collect();

    let mut remediator = Remediator::default();
    let mut vm_loop = VmLoop::new();
    let loss_at = args.calm_secs * 1000;
    let mut deadlines: HashMap<String, MonoTime> = HashMap::new();
    let mut pass_started: Vec<(MonoTime, Instant)> = Vec::new();
    let mut released_at: Option<u64> = None;
    let mut controller_cpu = Duration::ZERO;
    let mut calm_cpu = Duration::ZERO;
    let mut early_passes = 0u64;
    // The split of the controller's CPU: remediation passes, VM passes, watch events.
    let mut remediation_cpu = Duration::ZERO;
    let mut vm_cpu = Duration::ZERO;
    let mut watch_cpu = Duration::ZERO;
    let mut pass_wall: Vec<f64> = Vec::new();
    let mut requests_calm = BTreeMap::new();
    let mut requests_failover = BTreeMap::new();
    let requests_tail;
    let limit_ms = loss_at + 600_000;
    let mut ms = 0u64;
    loop {
        let tick_started = Instant::now();
        clock.0.store(ms, Ordering::Relaxed);
        let now = MonoTime(ms);
        // The agents renew every 2 s, spread over the ticks; room A's stop at the loss.
        {
            let mut s = server.lock();
            for i in (0..n).filter(|i| (*i as u64 % 4) * TICK_MS == ms % 2000) {
                if ms >= loss_at && is_lost(i) {
                    continue;
                }
                let name = node_name(i);
                let path = format!(
                    "/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/twosite-agent-{name}"
                );
                let mut lease = s
                    .objects
                    .get(&path)
                    .unwrap_or_else(|| agent_json(&name, ms));
                lease["spec"]["renewTime"] = json!(timestamp(ms));
                s.rv += 1;
                lease["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                s.objects.insert(path, &lease);
                // The watch decodes the event, the handler applies it: the controller's work.
                let bytes = serde_json::to_vec(&lease).unwrap_or_default();
                let cpu_decode = thread_cpu();
                if let Ok(lease) = serde_json::from_slice::<Lease>(&bytes) {
                    observed
                        .lock()
                        .apply_agent_lease(W::Apply(lease), now, &timing);
                }
                let spent = thread_cpu().saturating_sub(cpu_decode);
                controller_cpu += spent;
                watch_cpu += spent;
            }
        }
        // During the failover: when may each lost node be fenced (outside the measured CPU).
        if ms >= loss_at && released_at.is_none() {
            let view = observed.lock().cluster_view(now, &timing);
            let a = node_health::assess::assess(&view, Some(&pairing), now, &timing, 50);
            for node in &a.nodes {
                if let NodeVerdict::Dead {
                    fence_deadline: Some(d),
                } = node.input.verdict
                {
                    deadlines.entry(node.name.clone()).or_insert(d);
                }
            }
        }
        let cpu1 = thread_cpu();
        let wall = Instant::now();
        if ms.is_multiple_of(2000) {
            let _ = lease.round().await;
        }
        pass_started.push((now, wall));
        let cpu_r = thread_cpu();
        let view = remediator.pass(&ctx, &observed, Some(&pairing), now).await;
        remediation_cpu += thread_cpu().saturating_sub(cpu_r);
        let cpu_v = thread_cpu();
        let _ = vm_loop.pass(&vm_ctx, view.as_ref()).await;
        vm_cpu += thread_cpu().saturating_sub(cpu_v);
        pass_wall.push(wall.elapsed().as_secs_f64() * 1000.0);
        let spent = thread_cpu().saturating_sub(cpu1);
        controller_cpu += spent;
        if ms < loss_at {
            calm_cpu += spent;
        }
        // As `run_remediation_loop` does: a pass before the next tick when a node becomes
        // fenceable then (the VM loop keeps its own tick).
        while let Some(at) = remediator.wake_at().filter(|at| at.0 < ms + TICK_MS) {
            clock.0.store(at.0, Ordering::Relaxed);
            let cpu_w = thread_cpu();
            pass_started.push((at, Instant::now()));
            let _ = remediator.pass(&ctx, &observed, Some(&pairing), at).await;
            let spent = thread_cpu().saturating_sub(cpu_w);
            remediation_cpu += spent;
            controller_cpu += spent;
            early_passes += 1;
        }

        // The pass's pod deletions run as tasks: let them run before the next tick. Without a
        // latency they finish at once; with one, the bench keeps to real time (a tick lasts
        // 500 ms), or the requests' round trips would not fit in the virtual ticks.
        for _ in 0..64 {
            tokio::task::yield_now().await;
        }
        if args.api_latency_ms > 0.0 {
            let tick = Duration::from_millis(TICK_MS);
            tokio::time::sleep(tick.saturating_sub(tick_started.elapsed())).await;
        }

        if ms + TICK_MS == loss_at {
            requests_calm = std::mem::take(&mut server.lock().requests);
        }
        if ms >= loss_at && released_at.is_none() {
            let done = lost.iter().all(|n| {
                remediator.phase(n) == Some(node_health::remediation::Phase::Tainted)
                    || remediator.phase(n) == Some(node_health::remediation::Phase::Fenced)
            }) && lost.iter().all(|n| {
                pods.pods_on(n).is_some_and(|ps| {
                    ps.iter().all(|p| {
                        !controller::remediation::releasable(p, &|k| {
                            controller::vm::opted_in(&vm_ctx.stores, k)
                        })
                    })
                })
            });
            if done {
                released_at = Some(ms);
                requests_failover = std::mem::take(&mut server.lock().requests);
            }
        }
        if let Some(r) = released_at
            && ms >= r + args.tail_secs * 1000
        {
            requests_tail = std::mem::take(&mut server.lock().requests);
            break;
        }
        if ms >= limit_ms {
            return Err(format!(
                "room A not released {} s after the loss",
                (limit_ms - loss_at) / 1000
            ));
        }
        ms += TICK_MS;
    }
    let cpu_end = thread_cpu();
    let released_at = released_at.unwrap_or(ms);

    // Decision latency: virtual time from the fence deadline to the pass that committed, plus
    // the wall-clock time within that pass until the commit request left.
    let s = server.lock();
    let mut virtual_ms = Vec::new();
    let mut in_pass_ms = Vec::new();
    for (node, at, wall) in &s.commits {
        let Some(deadline) = deadlines.get(node) else {
            continue;
        };
        let started = pass_started
            .iter()
            .rev()
            .find(|(t, _)| t == at)
            .map(|(_, w)| *w);
        let within = started.map_or(0.0, |w| wall.duration_since(w).as_secs_f64() * 1000.0);
        virtual_ms.push(at.since(*deadline).as_secs_f64() * 1000.0);
        in_pass_ms.push(within);
    }
    let sort = |v: &mut Vec<f64>| v.sort_by(|a, b| a.total_cmp(b));
    sort(&mut virtual_ms);
    sort(&mut in_pass_ms);
    let mut total_ms: Vec<f64> = virtual_ms.clone();
    total_ms
        .iter_mut()
        .zip(&in_pass_ms)
        .for_each(|(t, w)| *t += w);
    sort(&mut total_ms);
    sort(&mut pass_wall);
    let failover_requests: u64 = requests_failover.values().sum();
    let cluster_secs = ms as f64 / 1000.0;
    let figures = json!({
        "nodes": n,
        "api_latency_ms": args.api_latency_ms,
        "vms": n * args.vms_per_node,
        "pods": n * args.pods_per_node,
        "lost_nodes": lost.len(),
        "rss_start_mib": rss_start as f64 / 1024.0,
        "rss_loaded_mib": rss_loaded as f64 / 1024.0,
        "rss_end_mib": proc_kib("VmRSS:") as f64 / 1024.0,
        "peak_rss_mib": proc_kib("VmHWM:") as f64 / 1024.0,
        "load_cpu_s": cpu_loaded.saturating_sub(cpu_start).as_secs_f64(),
        "cluster_secs": cluster_secs,
        "controller_cpu_ms_per_cluster_s": controller_cpu.as_secs_f64() * 1000.0 / cluster_secs,
        "remediation_cpu_ms_per_cluster_s": remediation_cpu.as_secs_f64() * 1000.0 / cluster_secs,
        "vm_cpu_ms_per_cluster_s": vm_cpu.as_secs_f64() * 1000.0 / cluster_secs,
        "watch_cpu_ms_per_cluster_s": watch_cpu.as_secs_f64() * 1000.0 / cluster_secs,
        "calm_cpu_ms_per_cluster_s": calm_cpu.as_secs_f64() * 1000.0 / (loss_at as f64 / 1000.0).max(0.5),
        "bench_cpu_s": cpu_end.saturating_sub(cpu_start).as_secs_f64(),
        "mock_server_wall_s": s.own.as_secs_f64(),
        "pass_wall_ms_p50": percentile(&pass_wall, 0.5),
        "pass_wall_ms_p99": percentile(&pass_wall, 0.99),
        "pass_wall_ms_max": pass_wall.last().copied().unwrap_or(f64::NAN),
        "fences": s.commits.len(),
        "early_passes": early_passes,
        "decision_ms_p50": percentile(&total_ms, 0.5),
        "decision_ms_p99": percentile(&total_ms, 0.99),
        "decision_in_pass_ms_p50": percentile(&in_pass_ms, 0.5),
        "decision_in_pass_ms_p99": percentile(&in_pass_ms, 0.99),
        "decision_tick_wait_ms_p50": percentile(&virtual_ms, 0.5),
        "decision_tick_wait_ms_p99": percentile(&virtual_ms, 0.99),
        "failover_secs": (released_at - loss_at) as f64 / 1000.0,
        "requests_calm": requests_calm,
        "requests_failover": requests_failover,
        "requests_failover_total": failover_requests,
        "requests_failover_per_lost_node": failover_requests as f64 / lost.len().max(1) as f64,
        "requests_tail": requests_tail,
        "tail_secs": args.tail_secs,
    });
    drop(s);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&figures).unwrap_or_default()
        );
    } else {
        print_table(&figures);
    }
    Ok(())
}

fn print_table(f: &Value) {
    let num = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "twosite-bench: {} nodes (2 rooms), {} VMs, {} pods; {} nodes of room A lost after calm",
        f["nodes"], f["vms"], f["pods"], f["lost_nodes"]
    );
    println!(
        "  peak RSS (VmHWM)                 {:8.1} MiB",
        num("peak_rss_mib")
    );
    println!(
        "  RSS start / loaded / end         {:8.1} / {:.1} / {:.1} MiB",
        num("rss_start_mib"),
        num("rss_loaded_mib"),
        num("rss_end_mib")
    );
    println!(
        "  CPU per cluster second           {:8.2} ms (calm: {:.2} ms)",
        num("controller_cpu_ms_per_cluster_s"),
        num("calm_cpu_ms_per_cluster_s")
    );
    println!(
        "    remediation / VM loop / watches {:7.2} / {:.2} / {:.2} ms",
        num("remediation_cpu_ms_per_cluster_s"),
        num("vm_cpu_ms_per_cluster_s"),
        num("watch_cpu_ms_per_cluster_s")
    );
    println!(
        "  pass wall time p50 / p99 / max   {:8.2} / {:.2} / {:.2} ms",
        num("pass_wall_ms_p50"),
        num("pass_wall_ms_p99"),
        num("pass_wall_ms_max")
    );
    println!(
        "  decision latency p50 / p99       {:8.1} / {:.1} ms (fence deadline -> commit request)",
        num("decision_ms_p50"),
        num("decision_ms_p99")
    );
    println!(
        "    of which in the pass p50 / p99 {:8.2} / {:.2} ms; waiting for a pass p50 / p99 {:.0} / {:.0} ms",
        num("decision_in_pass_ms_p50"),
        num("decision_in_pass_ms_p99"),
        num("decision_tick_wait_ms_p50"),
        num("decision_tick_wait_ms_p99")
    );
    println!(
        "  failover: {} fences ({} passes woken before the tick), room released {:.1} s after the loss",
        f["fences"],
        f["early_passes"],
        num("failover_secs")
    );
    println!(
        "  API requests of the failover     {:8} ({:.1} per lost node): {}",
        f["requests_failover_total"],
        num("requests_failover_per_lost_node"),
        f["requests_failover"]
    );
    println!("  API requests, calm before        {}", f["requests_calm"]);
    println!(
        "  API requests, {} s tainted after {}",
        f["tail_secs"], f["requests_tail"]
    );
}
