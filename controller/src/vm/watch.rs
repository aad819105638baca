//! The watch-fed caches the VM loop and the webhook read: VirtualMachines, launcher pods, PVCs
//! and disk Leases, all namespaces. Nothing is listed per pass: a room loss costs the writes it
//! needs, not a LIST per VM.

use super::types::{LauncherPod, VirtualMachine};
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
    pub launchers: Store<LauncherPod>,
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
            // VMs and launcher pods are cut down as they are read (their `Deserialize`).
            vms: fill(reflector::store::Writer::default(), vms, |_| {}),
            launchers: fill(
                reflector::store::Writer::default(),
                launchers.into_iter().map(LauncherPod::from),
                |_| {},
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
    m.finalizers = None;
    if let Some(a) = m.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
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
    let vms_api: Api<VirtualMachine> = Api::all(client.clone());
    let pods_api: Api<LauncherPod> = Api::all(client.clone());
    let claims_api: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let leases_api: Api<Lease> = Api::all(client.clone());

    let vm_writer = reflector::store::Writer::default();
    let vms = vm_writer.as_reader();
    let (launchers, launcher_writer) = reflector::store();
    let (claims, claim_writer) = reflector::store();
    let (disk_leases, lease_writer) = reflector::store();

    let launcher_selector = format!("{}={}", LAUNCHER_LABEL.0, LAUNCHER_LABEL.1);
    let streams = vec![
        drive(
            "VirtualMachine",
            reflector::reflector(vm_writer, watcher(vms_api, watcher::Config::default()))
                .map(progress)
                .boxed(),
        ),
        drive(
            "launcher pod",
            reflector::reflector(
                launcher_writer,
                watcher(
                    pods_api,
                    watcher::Config::default().labels(&launcher_selector),
                ),
            )
            .map(crate::vm::watch::progress)
            .boxed(),
        ),
        drive(
            "PersistentVolumeClaim",
            reflector::reflector(
                claim_writer,
                watcher(claims_api, watcher::Config::default()).modify(strip_claim),
            )
            .map(crate::vm::watch::progress)
            .boxed(),
        ),
        drive(
            "disk Lease",
            reflector::reflector(
                lease_writer,
                watcher(leases_api, watcher::Config::default().labels(DISK_LABEL)),
            )
            .map(crate::vm::watch::progress)
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

/// A watch event as [`drive`] reads it: `Ok(true)` when the watch made progress (a listed or
/// changed object, the end of a listing), `Ok(false)` for the start of a listing.
pub(crate) fn progress<K>(
    event: std::result::Result<watcher::Event<K>, watcher::Error>,
) -> std::result::Result<bool, watcher::Error> {
    event.map(|e| !matches!(e, watcher::Event::Init))
}

/// Runs one watch to its end, logging its errors (a missing KubeVirt CRD shows up here until
/// KubeVirt is installed) and waiting between retries: 0.5 s doubling to 10 s, reset only when
/// the watch makes progress. Not kube's `default_backoff`: it resets on any event, and the
/// watcher announces every listing it starts (`Init`) before the LIST fails, so a missing CRD
/// was retried every 0.8 s, most of a calm controller's requests.
pub(crate) async fn drive(
    what: &'static str,
    mut stream: futures::stream::BoxStream<'static, std::result::Result<bool, watcher::Error>>,
) {
    let mut failing = false;
    let mut backoff = crate::heartbeats::restart_backoff();
    while let Some(event) = stream.next().await {
        match event {
            Ok(false) => {}
            Ok(true) => {
                if failing {
                    tracing::info!(watch = what, "watch recovered");
                    failing = false;
                    backoff = crate::heartbeats::restart_backoff();
                }
            }
            Err(err) => {
                if !failing {
                    tracing::warn!(watch = what, error = %err, "watch failing; retrying with backoff");
                }
                failing = true;
                let delay = backoff.next().unwrap_or(std::time::Duration::from_secs(10));
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::types;
    use serde_json::json;

    #[test]
    fn a_cut_down_launcher_pod_and_vm_read_as_the_whole_ones() {
        // As KubeVirt makes them: many labels, annotations, owners and finalizers.
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "virt-launcher-db-x", "namespace": "plant", "uid": "u1",
                "labels": {"kubevirt.io": "virt-launcher", "vm.kubevirt.io/name": "db",
                           "kubevirt.io/created-by": "vmi-uid", "kubevirt.io/nodeName": "a-1",
                           "twosite.dev/ha": "true", "app": "db"},
                "annotations": {types::GATED_ANNOTATION: "x", "kubevirt.io/domain": "db",
                                "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "finalizers": ["foregroundDeleteVirtualMachine"],
                "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                                     "name": "db", "uid": "vmi-uid"}]},
            "spec": {"nodeName": "a-1", "containers": [{"name": "compute", "image": "i"}],
                     "schedulingGates": [{"name": node_health::vm::GATE}]},
            "status": {"phase": "Pending"}
        });
        let whole: Pod = serde_json::from_value(pod.clone()).expect("pod");
        let slim: LauncherPod = serde_json::from_value(pod).expect("slim");
        assert_eq!(types::launcher(&slim), types::launcher(&whole));
        assert_eq!(types::launcher_vm(&slim), Some("db"));
        assert!(types::is_launcher(&slim) && types::has_gate(&slim));
        let m = &slim.metadata;
        assert!(m.labels.is_none() && m.annotations.is_none() && m.owner_references.is_none());
        assert!(m.finalizers.is_none() && m.managed_fields.is_none());
        assert_eq!(
            crate::vm::io::ungate_patch(&slim).map(|p| serde_json::to_value(p).ok()),
            crate::vm::io::ungate_patch(&whole).map(|p| serde_json::to_value(p).ok())
        );
        // Not a launcher, no VM, no gate: read as such.
        let plain: LauncherPod = serde_json::from_value(json!({
            "metadata": {"name": "web", "labels": {"kubevirt.io": "virt-handler"}},
            "spec": {"containers": []}
        }))
        .expect("plain");
        assert!(!types::is_launcher(&plain) && !types::has_gate(&plain));
        assert_eq!(types::launcher_vm(&plain), None);

        let vm: VirtualMachine = serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "db", "namespace": "plant", "uid": "vm-uid",
                "labels": {"app": "db"},
                "annotations": {"twosite.dev/ha": "true", "kubevirt.io/latest-observed-api-version": "v1"}},
            "spec": {"runStrategy": "Always", "template": {"metadata": {"labels":
                {"twosite.dev/ha": "true", "kubevirt.io/domain": "db"}}}}
        }))
        .expect("vm");
        assert_eq!(types::vm_opt_in(&vm), node_health::vm::OptIn::In);
        assert!(types::template_labelled(&vm));
        assert_eq!(types::vm_key(&vm), "plant/db");
        assert!(vm.metadata.labels.is_none() && vm.metadata.annotations.is_none());
    }

    /// A watch whose resource does not exist (KubeVirt not installed) is retried with backoff:
    /// over two minutes about a dozen LISTs, not the ~150 of a backoff that every listing's
    /// start resets.
    #[tokio::test(start_paused = true)]
    async fn a_watch_of_a_missing_resource_backs_off() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let lists = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = std::sync::Arc::clone(&lists);
        let service = tower::service_fn(move |_req: http::Request<kube::client::Body>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "reason": "NotFound", "code": 404,
                    "message": "the server could not find the requested resource"});
                let body = serde_json::to_vec(&status).expect("json");
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .status(404)
                        .header("content-type", "application/json")
                        .body(kube::client::Body::from(body))
                        .expect("response"),
                )
            }
        });
        let api: Api<VirtualMachine> = Api::all(kube::Client::new(service, "default"));
        let stream = reflector::reflector(
            reflector::store::Writer::default(),
            watcher(api, watcher::Config::default()),
        )
        .map(progress)
        .boxed();
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(120),
            drive("VirtualMachine", stream),
        )
        .await;
        assert!(ended.is_err(), "the watch keeps retrying");
        let n = lists.load(Ordering::SeqCst);
        assert!((3..=25).contains(&n), "{n} LISTs in 120 s");
    }
}
