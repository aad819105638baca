//! Who this node's partner is, and where its agent answers.
//!
//! The pairing is the controller's: the cluster-scoped `TwoSite` object `default`
//! (`twosite.dev/v1alpha1`), whose `status.pairs` lists `{a, b}` node names. It is read as
//! untyped JSON (the controller owns the type). The partner's address is its Node's
//! `InternalIP`. Both are refreshed while the API server answers and kept otherwise: vouching
//! matters exactly when the API server is gone.

use super::SharedCore;
use super::error::{Result, report, with_timeout};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::Value;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The zone label that names a node's room.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The TwoSite object the controller maintains.
pub const TWOSITE_NAME: &str = "default";

/// The partner of `node` in a TwoSite object's `status.pairs`, if any.
pub fn partner_in_twosite(twosite: &Value, node: &str) -> Option<String> {
    let pairs = twosite.get("status")?.get("pairs")?.as_array()?;
    pairs.iter().find_map(|pair| {
        let a = pair.get("a")?.as_str()?;
        let b = pair.get("b")?.as_str()?;
        if a == node {
            Some(b.to_string())
        } else if b == node {
            Some(a.to_string())
        } else {
            None
        }
    })
}

/// A Node's first `InternalIP`.
pub fn internal_ip(node: &Node) -> Option<IpAddr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

/// A Node's room (its zone label).
pub fn zone(node: &Node) -> Option<String> {
    node.metadata
        .labels
        .as_ref()?
        .get(ZONE_LABEL)
        .map(|z| z.trim().to_string())
        .filter(|z| !z.is_empty())
}

/// Where the pairing and the nodes' addresses come from.
pub trait PairingSource: Send + Sync {
    /// The partner of `node` as the TwoSite object says; `None` when it has none (or there is
    /// no TwoSite object).
    fn partner_of(&self, node: &str) -> impl Future<Output = Result<Option<String>>> + Send;
    /// The Node `node`, `None` when it does not exist.
    fn node(&self, node: &str) -> impl Future<Output = Result<Option<Node>>> + Send;
}

/// [`PairingSource`] over the Kubernetes API, every call with a timeout.
#[derive(Clone)]
pub struct KubePairing {
    twosites: Api<DynamicObject>,
    nodes: Api<Node>,
    timeout: Duration,
}

impl KubePairing {
    pub fn new(client: kube::Client, timeout: Duration) -> Self {
        let gvk = GroupVersionKind::gvk("twosite.dev", "v1alpha1", "TwoSite");
        let resource = ApiResource::from_gvk_with_plural(&gvk, "twosites");
        KubePairing {
            twosites: Api::all_with(client.clone(), &resource),
            nodes: Api::all(client),
            timeout,
        }
    }
}

impl PairingSource for KubePairing {
    async fn partner_of(&self, node: &str) -> Result<Option<String>> {
        let twosite = with_timeout(
            "get TwoSite",
            self.timeout,
            self.twosites.get_opt(TWOSITE_NAME),
        )
        .await?;
        Ok(twosite.and_then(|t| partner_in_twosite(&t.data, node)))
    }

    async fn node(&self, node: &str) -> Result<Option<Node>> {
        with_timeout("get node", self.timeout, self.nodes.get_opt(node)).await
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Known {
    partner: Option<String>,
    addr: Option<SocketAddr>,
}

/// The last known partner and its agent's address; shared between the refresh and the probes.
#[derive(Debug, Clone, Default)]
pub struct PartnerCache {
    known: Arc<Mutex<Known>>,
}

impl PartnerCache {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn partner(&self) -> Option<String> {
        self.lock().partner.clone()
    }

    /// The partner agent's address, when both the partner and its address are known.
    pub fn partner_addr(&self) -> Option<SocketAddr> {
        let known = self.lock();
        known.partner.as_ref().and(known.addr)
    }

    /// Sets the address directly (tests, or a partner found some other way).
    pub fn set(&self, partner: Option<String>, addr: Option<SocketAddr>) {
        *self.lock() = Known { partner, addr };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reads the pairing and the partner's address once. What cannot be read is kept from before.
pub async fn refresh_partner<S: PairingSource>(
    source: &S,
    node: &str,
    peer_port: u16,
    cache: &PartnerCache,
    core: &SharedCore,
) -> Result<()> {
    let partner = source.partner_of(node).await?;
    let changed = {
        let mut known = cache.lock();
        let changed = known.partner != partner;
        if changed {
            known.partner = partner.clone();
            known.addr = None;
        }
        changed
    };
    if changed {
        tracing::info!(partner = ?partner, "partner changed");
        core.lock().set_partner(partner.clone());
    }
    let Some(partner) = partner else {
        return Ok(());
    };
    let Some(partner_node) = source.node(&partner).await? else {
        tracing::warn!(partner, "the partner's Node does not exist");
        return Ok(());
    };
    match internal_ip(&partner_node) {
        Some(ip) => {
            let mut known = cache.lock();
            // The pairing may have changed while we read the Node.
            if known.partner.as_deref() == Some(partner.as_str()) {
                known.addr = Some(SocketAddr::new(ip, peer_port));
            }
        }
        None => tracing::warn!(partner, "the partner's Node has no InternalIP"),
    }
    Ok(())
}

/// Refreshes the partner every `every`; failures keep the cached partner and address.
pub async fn run_partner_refresh<S: PairingSource>(
    source: S,
    node: String,
    peer_port: u16,
    cache: PartnerCache,
    core: SharedCore,
    every: Duration,
) -> Result<()> {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(err) = refresh_partner(&source, &node, peer_port, &cache, &core).await {
            tracing::debug!(
                error = %report(&err),
                partner = ?cache.partner(),
                "could not refresh the partner; keeping the cached one"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::AgentCore;
    use crate::agentd::error::Error;
    use crate::verdict::HealthTiming;
    use serde_json::json;
    use std::sync::Mutex;

    fn node(name: &str, ip: Option<&str>) -> Node {
        let mut n: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {ZONE_LABEL: "room-b"}},
            "status": {"addresses": [{"type": "Hostname", "address": name}]},
        }))
        .expect("node");
        if let (Some(ip), Some(status)) = (ip, n.status.as_mut()) {
            status.addresses.get_or_insert_with(Vec::new).push(
                k8s_openapi::api::core::v1::NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.into(),
                },
            );
        }
        n
    }

    #[test]
    fn the_partner_is_read_from_either_side_of_a_pair() {
        let twosite =
            json!({"status": {"pairs": [{"a": "a-1", "b": "b-1"}, {"a": "a-2", "b": "b-2"}]}});
        assert_eq!(partner_in_twosite(&twosite, "a-2").as_deref(), Some("b-2"));
        assert_eq!(partner_in_twosite(&twosite, "b-1").as_deref(), Some("a-1"));
        assert_eq!(partner_in_twosite(&twosite, "a-3"), None);
        for malformed in [
            json!({}),
            json!({"status": {}}),
            json!({"status": {"pairs": "a-1"}}),
            json!({"status": {"pairs": [{"a": "a-1", "b": 7}]}}),
        ] {
            assert_eq!(partner_in_twosite(&malformed, "a-1"), None, "{malformed}");
        }
    }

    #[test]
    fn addresses_and_zones() {
        assert_eq!(
            internal_ip(&node("b-1", Some("10.0.2.1"))),
            Some([10, 0, 2, 1].into())
        );
        assert_eq!(internal_ip(&node("b-1", None)), None);
        assert_eq!(internal_ip(&node("b-1", Some("not an ip"))), None);
        assert_eq!(zone(&node("b-1", None)).as_deref(), Some("room-b"));
    }

    /// A pairing source whose answers the test sets; `None` means the API server is gone.
    #[derive(Default)]
    struct Source(Mutex<Option<(Option<String>, Option<Node>)>>);

    impl PairingSource for Source {
        async fn partner_of(&self, _node: &str) -> Result<Option<String>> {
            let s = self.0.lock().expect("lock").clone();
            s.map(|(p, _)| p).ok_or(Error::TaskEnded("api down"))
        }
        async fn node(&self, _node: &str) -> Result<Option<Node>> {
            let s = self.0.lock().expect("lock").clone();
            s.map(|(_, n)| n).ok_or(Error::TaskEnded("api down"))
        }
    }

    #[tokio::test]
    async fn the_partner_and_its_address_are_cached_while_the_api_is_gone() {
        let core = SharedCore::new(AgentCore::new("a-1", "room-a", HealthTiming::default()));
        let cache = PartnerCache::new();
        let source = Source::default();
        *source.0.lock().expect("lock") =
            Some((Some("b-1".into()), Some(node("b-1", Some("10.0.2.1")))));
        refresh_partner(&source, "a-1", 9477, &cache, &core)
            .await
            .expect("refreshed");
        let addr: SocketAddr = ([10, 0, 2, 1], 9477).into();
        assert_eq!(cache.partner_addr(), Some(addr));
        assert_eq!(core.lock().partner(), Some("b-1"));

        *source.0.lock().expect("lock") = None;
        assert!(
            refresh_partner(&source, "a-1", 9477, &cache, &core)
                .await
                .is_err()
        );
        assert_eq!(cache.partner_addr(), Some(addr), "kept through the outage");
        assert_eq!(core.lock().partner(), Some("b-1"));

        // Re-paired with b-2 whose Node has no address yet: no probes to the old partner.
        *source.0.lock().expect("lock") = Some((Some("b-2".into()), Some(node("b-2", None))));
        refresh_partner(&source, "a-1", 9477, &cache, &core)
            .await
            .expect("refreshed");
        assert_eq!(cache.partner_addr(), None);
        assert_eq!(core.lock().partner(), Some("b-2"));
    }
}
