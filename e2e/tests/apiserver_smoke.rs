//! The real-API-server tier, first step: kube-apiserver 1.20.2 starts, and kube (k8s-openapi
//! v1_33) talks to it: a Namespace and a Lease are created, a replace with a stale
//! resourceVersion gets 409, and a ServiceAccount identity without bindings is forbidden.
//!
//! Needs the binary from `e2e/apiserver/build-kube-apiserver.sh`; without it the test prints a
//! "skipped" line and passes, unless `TWOSITE_REQUIRE_APISERVER=1` (CI), where it fails.

use e2e::apiserver::{self, Options};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use std::path::Path;
use std::time::Instant;

async fn client(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("read the kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig to client config");
    Client::try_from(config).expect("build the client")
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[tokio::test]
async fn apiserver_smoke() {
    let t0 = Instant::now();
    let Some(server) = apiserver::require_or_skip("apiserver_smoke", Options::default()) else {
        return;
    };
    println!(
        "kube-apiserver ready at {} in {:?}",
        server.url(),
        t0.elapsed()
    );

    let admin = client(server.admin_kubeconfig()).await;
    let version = admin.apiserver_version().await.expect("GET /version");
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "20"),
        "{version:?}"
    );
    assert_eq!(version.git_version, format!("v{}", apiserver::KUBE_VERSION));

    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some("twosite-smoke".into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("create a Namespace");

    let leases: Api<Lease> = Api::namespaced(admin.clone(), "twosite-smoke");
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("smoke".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("first".into()),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        }),
    };
    let created = leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create a Lease");
    let stale_rv = created.metadata.resource_version.clone();
    assert!(stale_rv.is_some(), "a created Lease has a resourceVersion");

    // A replace with the current resourceVersion succeeds and moves it on...
    let mut second = created.clone();
    second.spec.as_mut().expect("spec").holder_identity = Some("second".into());
    let replaced = leases
        .replace("smoke", &PostParams::default(), &second)
        .await
        .expect("replace with the current resourceVersion");
    assert_ne!(replaced.metadata.resource_version, stale_rv);

    // ...and one with the stale resourceVersion is refused with 409 Conflict.
    let mut third = created.clone();
    third.spec.as_mut().expect("spec").holder_identity = Some("third".into());
    let err = leases
        .replace("smoke", &PostParams::default(), &third)
        .await
        .expect_err("a replace with a stale resourceVersion must fail");
    assert_eq!(status_code(&err), Some(409), "{err:?}");
    let now = leases.get("smoke").await.expect("get the Lease");
    assert_eq!(
        now.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("second")
    );

    // A ServiceAccount identity authenticates, and without RBAC bindings it is forbidden.
    let controller_kc = server
        .service_account_kubeconfig(apiserver::CONTROLLER_SA.0, apiserver::CONTROLLER_SA.1)
        .expect("the controller's kubeconfig");
    let unbound = client(controller_kc).await;
    let nodes: Api<Node> = Api::all(unbound);
    let err = nodes
        .list(&ListParams::default())
        .await
        .expect_err("an unbound ServiceAccount must not list Nodes");
    assert_eq!(status_code(&err), Some(403), "{err:?}");

    println!("apiserver_smoke passed in {:?}", t0.elapsed());
}
