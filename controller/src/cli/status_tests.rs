use super::*;
use serde_json::json;

fn now() -> jiff::Timestamp {
    "2026-12-07T02:10:42Z".parse().expect("a timestamp")
}

fn lease(holder: &str, annotations: serde_json::Value) -> Lease {
    serde_json::from_value(json!({
        "metadata": {"name": "block-data", "namespace": "block-demo",
                     "labels": {"twosite.dev/volume": "block-data"},
                     "annotations": annotations},
        "spec": {"holderIdentity": holder, "leaseTransitions": 4,
                 "acquireTime": "2026-12-07T02:10:00.123456Z", "leaseDurationSeconds": 10}
    }))
    .expect("a lease")
}

fn pod(ns: &str, name: &str, volume: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                     "labels": {"twosite.dev/volume": volume}},
        "spec": {"nodeName": node, "containers": []},
        "status": {"phase": "Running"}
    }))
    .expect("a pod")
}

fn pods() -> Vec<Pod> {
    vec![
        pod("block-demo", "block-b", "block-data", "b-1"),
        pod("block-demo", "block-a", "block-data", "a-1"),
        // Same label value, other namespace: not a consumer of block-demo/block-data.
        pod("other", "block-c", "block-data", "a-2"),
    ]
}

fn cluster() -> TwoSiteStatus {
    serde_json::from_value(json!({
        "rooms": {"a": "room-a", "b": "room-b", "source": "Automatic"},
        "pairs": [{"a": "a-1", "b": "b-1"}], "pairCount": 1,
        "unpaired": [], "unpairedCount": 0,
        "leader": {"identity": "twosite-controller-0", "epoch": 2},
        "nodes": [
            {"name": "a-1", "room": "room-a", "partner": "b-1", "phase": "Healthy", "verdict": "Alive"},
            {"name": "b-1", "room": "room-b", "partner": "a-1", "phase": "Healthy", "verdict": "Alive"}
        ],
        "witness": {"configured": true, "reachable": true, "grant": {"room": "room-a", "epoch": 3}},
        "conditions": [{"type": "Paired", "status": "True", "reason": "AllPaired",
                        "message": "every worker has a partner", "lastTransitionTime": "2026-12-07T02:00:00Z"}]
    }))
    .expect("a status")
}

#[test]
fn a_volume_names_its_holder_pod_node_epoch_and_last_switch() {
    let r = report(Ok(None), &[lease("uid-block-a", json!({}))], &pods(), now());
    assert_eq!(r.cluster_note.as_deref(), Some(NO_STATUS));
    let v = &r.volumes[0];
    assert_eq!(
        (v.namespace.as_str(), v.name.as_str()),
        ("block-demo", "block-data")
    );
    assert_eq!(
        v.holder,
        Some(ConsumerRef {
            identity: "uid-block-a".into(),
            pod: Some("block-a".into()),
            node: Some("a-1".into()),
        })
    );
    assert_eq!(v.epoch, 4);
    assert_eq!(v.last_switch.as_deref(), Some("2026-12-07T02:10:00Z"));
    assert_eq!(v.last_switch_seconds_ago, Some(42));
    assert_eq!(v.preferred_holder, None);
    assert_eq!(v.handover, None);
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    let names: Vec<(&str, bool)> = v
        .consumers
        .iter()
        .map(|c| (c.pod.as_str(), c.holder))
        .collect();
    assert_eq!(names, vec![("block-a", true), ("block-b", false)]);
}

#[test]
fn a_switchover_and_a_handover_under_way_are_shown() {
    let l = lease(
        "uid-block-a",
        json!({"twosite.dev/preferred-holder": "uid-block-b",
               "twosite.dev/handover": "{\"to\": \"uid-block-b\", \"epoch\": 5}"}),
    );
    let r = report(Ok(Some(cluster())), &[l], &pods(), now());
    let v = &r.volumes[0];
    assert_eq!(
        v.preferred_holder.as_ref().and_then(|p| p.pod.as_deref()),
        Some("block-b")
    );
    let h = v.handover.as_ref().expect("a handover");
    assert_eq!((h.to.pod.as_deref(), h.epoch), (Some("block-b"), 5));
    let text = render(&r);
    assert!(
        text.contains("Switchover:   under way, to block-b on b-1 (uid uid-block-b)"),
        "{text}"
    );
    assert!(
        text.contains("Handover:     to block-b on b-1 (uid uid-block-b), epoch 5"),
        "{text}"
    );
}

#[test]
fn a_released_lease_a_stranger_holder_and_a_bad_annotation_are_reported_not_fatal() {
    let released = report(Ok(None), &[lease("", json!({}))], &pods(), now());
    let v = &released.volumes[0];
    assert_eq!((v.holder.as_ref(), v.last_switch.as_ref()), (None, None));
    assert!(v.consumers.iter().all(|c| !c.holder));
    assert!(render(&released).contains("Holder:       nobody (released)"));

    let bad = lease("uid-x", json!({"twosite.dev/handover": "block-b"}));
    let r = report(Ok(None), &[bad], &pods(), now());
    let v = &r.volumes[0];
    assert_eq!(v.holder.as_ref().map(|h| h.pod.clone()), Some(None));
    assert_eq!(v.epoch, 4);
    assert_eq!(v.problems.len(), 2, "{:?}", v.problems);
    let text = render(&r);
    assert!(
        text.contains("Holder:       uid-x (no consumer pod has this UID)"),
        "{text}"
    );
    assert!(
        text.contains("Problem:      the annotation twosite.dev/handover"),
        "{text}"
    );
}

#[test]
fn the_text_report_has_aligned_sections() {
    let r = report(
        Ok(Some(cluster())),
        &[lease("uid-block-a", json!({}))],
        &pods(),
        now(),
    );
    let text = render(&r);
    let expected = "\
Cluster (TwoSite default)
  Rooms:    room-a and room-b (automatic)
  Leader:   twosite-controller-0 (epoch 2)
  Witness:  reachable, grant to room-a (epoch 3)
  Pairs:    1 paired, 0 unpaired

  Pairs:
    ROOM A       ROOM B
    a-1     <->  b-1

  Nodes:
    NODE  ROOM    PARTNER  PHASE    VERDICT  WAITING FOR
    a-1   room-a  b-1      Healthy  Alive    -
    b-1   room-b  a-1      Healthy  Alive    -

  Conditions:
    TYPE    STATUS  REASON     MESSAGE
    Paired  True    AllPaired  every worker has a partner

Volumes (1)

  block-demo/block-data
    Holder:       block-a on a-1 (uid uid-block-a)
    Epoch:        4
    Last switch:  2026-12-07T02:10:00Z (42s ago)
    Consumers:
      POD      NODE  ROLE     PHASE    UID
      block-a  a-1   holder   Running  uid-block-a
      block-b  b-1   standby  Running  uid-block-b

Virtual machines (0)
  none (no VirtualMachine annotated twosite.dev/ha)
";
    assert_eq!(text, expected, "\n{text}");
}

#[test]
fn without_a_status_or_volumes_the_report_says_so() {
    let r = report(Ok(None), &[], &[], now());
    assert_eq!(
        render(&r),
        "Cluster (TwoSite default)\n  controller has not written a status yet\n\nVolumes (0)\n  none (no Lease labelled twosite.dev/volume)\n\nVirtual machines (0)\n  none (no VirtualMachine annotated twosite.dev/ha)\n"
    );
    let r = report(Err("forbidden".into()), &[], &[], now());
    assert!(render(&r).contains("could not read the TwoSite default: forbidden"));
}

#[test]
fn vms_and_pods_at_the_gate_are_shown_with_why() {
    let mut status = cluster();
    status.vms = vec![crate::crd::VmStatus {
        namespace: "plant".into(),
        name: "db".into(),
        state: "Gated".into(),
        node: None,
        printable_status: Some("Starting".into()),
        conditions: vec![crate::crd::VmCondition {
            type_: "FailoverReady".into(),
            status: "False".into(),
            reason: "VMFailoverBlocked".into(),
            message: "the node a-1 is not proven fenced".into(),
        }],
    }];
    let mut r = report(Ok(Some(status)), &[], &[], now());
    let launcher: Pod = serde_json::from_value(json!({
        "metadata": {"name": "virt-launcher-db-x", "namespace": "plant",
                     "creationTimestamp": "2026-12-07T02:10:00Z",
                     "labels": {"kubevirt.io": "virt-launcher", "twosite.dev/ha": "true"},
                     "annotations": {"twosite.dev/gated": "waits"},
                     "ownerReferences": [{"apiVersion": "kubevirt.io/v1",
                        "kind": "VirtualMachineInstance", "name": "db", "uid": "u"}]},
        "spec": {"containers": []}
    }))
    .expect("pod");
    let ungated: Pod = serde_json::from_value(json!({
        "metadata": {"name": "virt-launcher-web-y", "namespace": "plant"},
        "spec": {"containers": []}
    }))
    .expect("pod");
    r.gated_pods = gated_pods(&[launcher, ungated], now());
    assert_eq!(r.gated_pods.len(), 1);
    assert_eq!(r.gated_pods[0].waiting_seconds, Some(42));
    let text = render(&r);
    assert!(text.contains("Virtual machines (1)"), "{text}");
    assert!(text.contains("plant/db"), "{text}");
    assert!(
        text.contains("VMFailoverBlocked: the node a-1 is not proven fenced"),
        "{text}"
    );
    assert!(text.contains("Launcher pods at the gate (1)"), "{text}");
    assert!(text.contains("plant/virt-launcher-db-x"), "{text}");
    let j = serde_json::to_value(&r).expect("json");
    assert_eq!(j["gatedPods"][0]["vm"], "db");
    assert_eq!(j["cluster"]["vms"][0]["state"], "Gated");
}

#[test]
fn the_json_report_carries_the_same_content() {
    let r = report(
        Ok(Some(cluster())),
        &[lease("uid-block-a", json!({}))],
        &pods(),
        now(),
    );
    let j = serde_json::to_value(&r).expect("json");
    assert_eq!(j["cluster"]["leader"]["identity"], "twosite-controller-0");
    assert_eq!(j["cluster"]["nodes"][0]["phase"], "Healthy");
    let v = &j["volumes"][0];
    assert_eq!(v["holder"]["pod"], "block-a");
    assert_eq!(v["holder"]["node"], "a-1");
    assert_eq!(v["epoch"], 4);
    assert_eq!(v["lastSwitch"], "2026-12-07T02:10:00Z");
    assert_eq!(v["lastSwitchSecondsAgo"], 42);
    assert_eq!(v["consumers"][1]["pod"], "block-b");
    assert_eq!(v["consumers"][1]["holder"], false);
    assert!(j.get("clusterNote").is_none());
}

#[test]
fn ages_read_like_a_person_would_say_them() {
    assert_eq!(ago(-3), "0s");
    assert_eq!(ago(42), "42s");
    assert_eq!(ago(303), "5m 3s");
    assert_eq!(ago(7440), "2h 4m");
    assert_eq!(ago(266400), "3d 2h");
}
