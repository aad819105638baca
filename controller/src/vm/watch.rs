//! The watch-fed caches the VM loop and the webhook read: VirtualMachines, launcher pods, PVCs
//! and disk Leases, all namespaces. Nothing is listed per pass: a room loss costs the writes it
//! needs, not a LIST per VM.

use super::types::{VirtualMachine, vm_resource};
use crate::admin::LoopGuard;
use crate::error::Result;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use node_health::vm::{DISK_LABEL, LAUNCHER_LABEL};

/// Read handles on the four caches.
#[derive(Clone)]
pub struct VmStores {
    pub vms: Store<VirtualMachine>,
    pub launchers: Store<Pod>,
    pub claims: Store<PersistentVolumeClaim>,
    pub disk_leases: Store<Lease>,
}

impl VmStores {
    /// Whether every cache has had its first full list (before that, an empty cache would read
    /// as "the old pod is gone").
    pub fn ready(&self) -> bool {
        listed(&self.vms)
            && listed(&self.launchers)
            && listed(&self.claims)
            && listed(&self.disk_leases)
    }
}

impl VmStores {
    /// Caches filled with these objects and marked listed: for tests and benches that drive
    /// the VM loop and the webhook without an API server.
    pub fn from_objects(
        vms: impl IntoIterator<Item = VirtualMachine>,
        launchers: impl IntoIterator<Item = Pod>,
        claims: impl IntoIterator<Item = PersistentVolumeClaim>,
        disk_leases: impl IntoIterator<Item = Lease>,
    ) -> VmStores {
        // Stripped as the watches strip them, so tests and the bench see what production keeps.
        // One object at a time, as a watch delivers them: a caller may pass a lazy iterator.
        fn fill<K>(
            mut w: reflector::store::Writer<K>,
            objs: impl IntoIterator<Item = K>,
            strip: fn(&mut K),
        ) -> Store<K>
        where
            K: kube::Resource + Clone + 'static,
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            w.apply_watcher_event(&watcher::Event::Init);
            for mut o in objs {
                strip(&mut o);
                w.apply_watcher_event(&watcher::Event::InitApply(o));
            }
            w.apply_watcher_event(&watcher::Event::InitDone);
            w.as_reader()
        }
        VmStores {
            vms: fill(reflector::store::Writer::new(vm_resource()), vms, strip_vm),
            launchers: fill(
                reflector::store::Writer::default(),
                launchers,
                strip_launcher,
            ),
            claims: fill(reflector::store::Writer::default(), claims, strip_claim),
            disk_leases: fill(reflector::store::Writer::default(), disk_leases, |_| {}),
        }
    }
}

// The caches keep only what the VM loop and the webhook read (a launcher pod as stored by the
// API server is several KiB: containers, volumes, managed fields; at 10,000 VMs the whole
// objects were most of the controller's memory).

fn strip_meta(m: &mut kube::api::ObjectMeta) {
    m.managed_fields = None;
    if let Some(a) = m.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// A VM keeps its metadata (annotations: the opt-in) and the partial spec it was read into.
pub fn strip_vm(vm: &mut VirtualMachine) {
    strip_meta(&mut vm.metadata);
}

/// A launcher pod keeps its name, uid, labels, owners, the gate annotation, creation and
/// deletion times, node, scheduling gates and phase.
pub fn strip_launcher(pod: &mut Pod) {
    strip_meta(&mut pod.metadata);
    if let Some(a) = pod.metadata.annotations.as_mut() {
        a.retain(|k, _| k == super::types::GATED_ANNOTATION);
    }
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: spec.node_name,
            scheduling_gates: spec.scheduling_gates,
            ..Default::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase,
            ..Default::default()
        });
    }
}

/// A claim keeps its access modes and volume mode.
pub fn strip_claim(pvc: &mut PersistentVolumeClaim) {
    strip_meta(&mut pvc.metadata);
    pvc.metadata.annotations = None;
    if let Some(spec) = pvc.spec.take() {
        pvc.spec = Some(k8s_openapi::api::core::v1::PersistentVolumeClaimSpec {
            access_modes: spec.access_modes,
            volume_mode: spec.volume_mode,
            ..Default::default()
        });
    }
    pvc.status = None;
}

/// Starts the four watches; the returned future runs them (it ends only if one ends).
pub fn start(
    client: &Client,
    guard: LoopGuard,
) -> (VmStores, futures::future::BoxFuture<'static, Result<()>>) {
    let vms_api: Api<VirtualMachine> = Api::all_with(client.clone(), &vm_resource());
    let pods_api: Api<Pod> = Api::all(client.clone());
    let claims_api: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let leases_api: Api<Lease> = Api::all(client.clone());

    let vm_writer = reflector::store::Writer::new(vm_resource());
    let vms = vm_writer.as_reader();
    let (launchers, launcher_writer) = reflector::store();
    let (claims, claim_writer) = reflector::store();
    let (disk_leases, lease_writer) = reflector::store();

    let launcher_selector = format!("{}={}", LAUNCHER_LABEL.0, LAUNCHER_LABEL.1);
    let streams = vec![
        drive(
            "VirtualMachine",
            reflector::reflector(
                vm_writer,
                watcher(vms_api, watcher::Config::default()).modify(strip_vm),
            )
            .default_backoff()
            .map(|e| e.map(|_| ()))
            .boxed(),
        ),
        drive(
            "launcher pod",
            reflector::reflector(
                launcher_writer,
                watcher(
                    pods_api,
                    watcher::Config::default().labels(&launcher_selector),
                )
                .modify(strip_launcher),
            )
            .default_backoff()
            .map(|e| e.map(|_| ()))
            .boxed(),
        ),
        drive(
            "PersistentVolumeClaim",
            reflector::reflector(
                claim_writer,
                watcher(claims_api, watcher::Config::default()).modify(strip_claim),
            )
            .default_backoff()
            .map(|e| e.map(|_| ()))
            .boxed(),
        ),
        drive(
            "disk Lease",
            reflector::reflector(
                lease_writer,
                watcher(leases_api, watcher::Config::default().labels(DISK_LABEL)),
            )
            .default_backoff()
            .map(|e| e.map(|_| ()))
            .boxed(),
        ),
    ];
    let stores = VmStores {
        vms,
        launchers,
        claims,
        disk_leases,
    };
    (stores, drive_all(streams, guard))
}

/// Drives `watches` together until they all end, beating `guard` every 5 s meanwhile.
pub(crate) fn drive_all(
    watches: Vec<impl std::future::Future<Output = ()> + Send + 'static>,
    guard: LoopGuard,
) -> futures::future::BoxFuture<'static, Result<()>> {
    Box::pin(async move {
        let all = futures::future::join_all(watches);
        tokio::pin!(all);
        let mut beat = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = &mut all => return Ok(()),
                _ = beat.tick() => guard.beat(),
            }
        }
    })
}

/// Whether a cache has had its first full list.
pub(crate) fn listed<K: kube::Resource + Clone + 'static>(s: &Store<K>) -> bool
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    use futures::FutureExt;
    s.wait_until_ready()
        .now_or_never()
        .is_some_and(|r| r.is_ok())
}

/// Runs one watch to its end, logging its errors (a missing KubeVirt CRD shows up here, with
/// backoff, until KubeVirt is installed).
pub(crate) async fn drive(
    what: &'static str,
    mut stream: futures::stream::BoxStream<'static, std::result::Result<(), watcher::Error>>,
) {
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(()) => {
                if failing {
                    tracing::info!(watch = what, "watch recovered");
                    failing = false;
                }
            }
            Err(err) => {
                if !failing {
                    tracing::warn!(watch = what, error = %err, "watch failing; retrying with backoff");
                }
                failing = true;
            }
        }
    }
}
