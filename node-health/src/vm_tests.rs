use super::*;
use crate::volume::{LeaseView, TakeRefusal, VolumeTiming, may_take};

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn lease(holder: Option<&str>, epoch: u64, node: Option<&str>) -> VolumeLease {
    VolumeLease {
        held_for_node: node.map(str::to_string),
        holder: holder.map(str::to_string),
        epoch,
        resource_version: format!("rv{epoch}"),
        preferred_holder: None,
        released: false,
        handover: None,
        duration: Duration::from_secs(10),
    }
}

fn launcher(
    uid: &str,
    node: Option<&str>,
    phase: LauncherPhase,
    gated: bool,
    created: &str,
) -> Launcher {
    Launcher {
        uid: uid.into(),
        name: format!("virt-launcher-vm-{uid}"),
        node: node.map(str::to_string),
        gated,
        phase,
        deleting: false,
        created: created.into(),
    }
}

fn rwx_block() -> ClaimFacts {
    ClaimFacts {
        access_modes: vec!["ReadWriteMany".into()],
        volume_mode: Some("Block".into()),
    }
}

struct World {
    opt_in: OptIn,
    run: RunStrategy,
    disks: Vec<Disk>,
    leases: BTreeMap<String, VolumeLease>,
    launchers: Vec<Launcher>,
    fenced: BTreeSet<String>,
    live: BTreeSet<String>,
}

impl World {
    /// An opted-in VM with one RWX block disk, its instance on a-1 holding the lease.
    fn running_on_a1() -> World {
        let disk = classify_disk("vm-disk", Some(&rwx_block()));
        let name = disk.protection.clone().expect("protected");
        World {
            opt_in: OptIn::In,
            run: RunStrategy::Always,
            disks: vec![disk],
            leases: BTreeMap::from([(name, lease(Some("old"), 3, Some("a-1")))]),
            launchers: vec![launcher(
                "old",
                Some("a-1"),
                LauncherPhase::Running,
                false,
                "t1",
            )],
            fenced: set(&[]),
            live: set(&["a-1", "b-1"]),
        }
    }

    fn step(&self, p: &mut VmProtection, secs: u64) -> (Vec<VmAction>, VmReport) {
        p.step(
            &VmFacts {
                opt_in: &self.opt_in,
                run_strategy: &self.run,
                template_labelled: true,
                disks: &self.disks,
                leases: &self.leases,
                launchers: &self.launchers,
                fenced_nodes: &self.fenced,
                live_nodes: &self.live,
            },
            MonoTime::from_millis(secs * 1000),
        )
    }

    /// a-1 died: the old launcher pod is still in the API, a new gated one exists.
    fn a1_lost(&mut self) {
        self.live.remove("a-1");
        self.launchers
            .push(launcher("new", None, LauncherPhase::Pending, true, "t2"));
    }
}

fn reasons(actions: &[VmAction]) -> Vec<VmEventReason> {
    actions
        .iter()
        .filter_map(|a| match a {
            VmAction::Event { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

fn has_ungate(actions: &[VmAction]) -> bool {
    actions.iter().any(|a| matches!(a, VmAction::Ungate { .. }))
}

fn grants(actions: &[VmAction]) -> Vec<&VmAction> {
    actions
        .iter()
        .filter(|a| matches!(a, VmAction::Grant { .. }))
        .collect()
}

#[test]
fn only_true_opts_in() {
    assert_eq!(opt_in(Some("true")), OptIn::In);
    assert_eq!(opt_in(None), OptIn::Out);
    assert_eq!(opt_in(Some("True")), OptIn::Invalid("True".into()));
    assert_eq!(opt_in(Some("yes")), OptIn::Invalid("yes".into()));
    assert_eq!(opt_in(Some("")), OptIn::Invalid(String::new()));
}

#[test]
fn run_strategies_and_which_restart() {
    assert_eq!(
        RunStrategy::parse(Some("Always"), None),
        RunStrategy::Always
    );
    assert_eq!(RunStrategy::parse(None, Some(true)), RunStrategy::Always);
    assert_eq!(RunStrategy::parse(None, Some(false)), RunStrategy::Halted);
    assert_eq!(RunStrategy::parse(None, None), RunStrategy::Halted);
    assert!(RunStrategy::RerunOnFailure.restarts_after_loss());
    assert!(!RunStrategy::Manual.restarts_after_loss());
    assert!(!RunStrategy::Halted.restarts_after_loss());
    assert!(!RunStrategy::parse(Some("Sometimes"), None).restarts_after_loss());
}

#[test]
fn only_rwx_block_disks_get_a_lease() {
    assert_eq!(
        classify_disk("d", Some(&rwx_block())).protection,
        Ok("twosite-disk-d".to_string())
    );
    let rwo = ClaimFacts {
        access_modes: vec!["ReadWriteOnce".into()],
        volume_mode: Some("Block".into()),
    };
    assert!(matches!(
        classify_disk("d", Some(&rwo)).protection,
        Err(Unprotected::NotReadWriteMany { .. })
    ));
    let fs = ClaimFacts {
        access_modes: vec!["ReadWriteMany".into()],
        volume_mode: None,
    };
    assert!(matches!(
        classify_disk("d", Some(&fs)).protection,
        Err(Unprotected::FilesystemMode { .. })
    ));
    assert!(matches!(
        classify_disk("d", None).protection,
        Err(Unprotected::ClaimMissing { .. })
    ));
}

#[test]
fn long_claim_names_give_distinct_valid_lease_names() {
    let a = "a".repeat(253);
    let b = format!("{}b", "a".repeat(252));
    let (la, lb) = (disk_lease_name(&a), disk_lease_name(&b));
    assert!(
        la.len() <= 253 && lb.len() <= 253,
        "{} {}",
        la.len(),
        lb.len()
    );
    assert_ne!(la, lb);
    assert_eq!(la, disk_lease_name(&a));
}

#[test]
fn a_fence_releases_launcher_pods_of_opted_in_vms_only() {
    assert!(release_when_fenced(PodOwner::Plain));
    assert!(release_when_fenced(PodOwner::Launcher(Some(true))));
    assert!(!release_when_fenced(PodOwner::Launcher(Some(false))));
    assert!(!release_when_fenced(PodOwner::Launcher(None)));
}

#[test]
fn admission_gates_only_launcher_pods_of_opted_in_vms() {
    let live = set(&["b-1"]);
    let fenced = set(&["a-1"]);
    fn admission<'a>(
        vm: Option<&'a OptIn>,
        is_launcher: bool,
        live: &'a BTreeSet<String>,
        fenced: &'a BTreeSet<String>,
    ) -> AdmissionFacts<'a> {
        AdmissionFacts {
            is_launcher,
            vm_name: Some("vm"),
            vm,
            last_node: Some("a-1"),
            partner: Some("b-1"),
            live_nodes: live,
            fenced_nodes: fenced,
        }
    }
    let facts = |vm, l| admit(&admission(vm, l, &live, &fenced));
    assert_eq!(
        facts(Some(&OptIn::In), true),
        Admission::Gate {
            prefer_node: Some("b-1".into()),
            warning: None,
        }
    );
    assert_eq!(
        facts(Some(&OptIn::Out), true),
        Admission::Allow { warning: None }
    );
    let invalid = OptIn::Invalid("yes".into());
    assert!(matches!(
        facts(Some(&invalid), true),
        Admission::Allow { warning: Some(_) }
    ));
    assert!(matches!(
        facts(None, true),
        Admission::Gate { prefer_node: None, warning: Some(w) } if w.contains("not known")
    ));
    assert!(matches!(
        facts(Some(&OptIn::In), false),
        Admission::Allow { warning: Some(_) }
    ));
}

#[test]
fn the_partner_is_preferred_only_when_the_last_node_is_lost() {
    let live = set(&["a-1", "b-1"]);
    let none = set(&[]);
    assert_eq!(preferred_node(Some("a-1"), Some("b-1"), &live, &none), None);
    let fenced = set(&["a-1"]);
    assert_eq!(
        preferred_node(Some("a-1"), Some("b-1"), &live, &fenced),
        Some("b-1".into())
    );
    assert_eq!(
        preferred_node(Some("a-1"), Some("b-1"), &set(&["b-2"]), &fenced),
        None,
        "a partner that is not live is not preferred"
    );
    assert_eq!(preferred_node(None, Some("b-1"), &live, &fenced), None);
}

#[test]
fn a_new_launcher_pod_stays_gated_while_the_old_instance_is_not_proven_fenced() {
    let mut w = World::running_on_a1();
    let mut p = VmProtection::new();
    w.a1_lost();
    let (actions, report) = w.step(&mut p, 10);
    assert!(grants(&actions).is_empty(), "{actions:?}");
    assert!(!has_ungate(&actions));
    assert_eq!(reasons(&actions), vec![VmEventReason::VMFailoverBlocked]);
    assert_eq!(report.state, "Gated");
    assert!(
        report
            .blocked
            .as_deref()
            .is_some_and(|b| b.contains("not proven fenced"))
    );
    // Reported once, not on every pass.
    let (again, _) = w.step(&mut p, 11);
    assert!(reasons(&again).is_empty(), "{again:?}");
}

#[test]
fn once_the_old_node_is_fenced_the_lease_moves_then_the_gate_lifts() {
    let mut w = World::running_on_a1();
    let mut p = VmProtection::new();
    w.step(&mut p, 0);
    w.a1_lost();
    w.fenced.insert("a-1".into());
    let (actions, _) = w.step(&mut p, 20);
    assert_eq!(reasons(&actions), vec![VmEventReason::VMFailoverStarted]);
    let gi = actions
        .iter()
        .position(|a| matches!(a, VmAction::Grant { .. }))
        .expect("a grant");
    let ui = actions
        .iter()
        .position(|a| matches!(a, VmAction::Ungate { .. }))
        .expect("ungate");
    assert!(gi < ui, "the grant must come before the gate is lifted");
    assert_eq!(
        actions[gi],
        VmAction::Grant {
            lease: "twosite-disk-vm-disk".into(),
            expected_rv: "rv3".into(),
            to: "new".into(),
            node: None,
            epoch: 4,
        }
    );
    // The grant is in; the pod is scheduled to b-1 and runs: the node is recorded and the
    // failover completes with its duration.
    w.leases.insert(
        "twosite-disk-vm-disk".into(),
        lease(Some("new"), 4, Some("")),
    );
    w.launchers.retain(|l| l.uid != "old");
    w.launchers[0] = launcher("new", Some("b-1"), LauncherPhase::Running, false, "t2");
    let (actions, report) = w.step(&mut p, 28);
    assert!(actions.contains(&VmAction::RecordNode {
        lease: "twosite-disk-vm-disk".into(),
        expected_rv: "rv4".into(),
        node: "b-1".into(),
    }));
    assert!(actions.contains(&VmAction::FailoverCompleted {
        duration: Duration::from_secs(8)
    }));
    assert_eq!(reasons(&actions), vec![VmEventReason::VMFailoverCompleted]);
    assert_eq!(report.state, "Running");
    assert!(!p.failing_over());
}

#[test]
fn a_gone_holder_on_a_node_neither_live_nor_fenced_keeps_the_lease() {
    let mut w = World::running_on_a1();
    let mut p = VmProtection::new();
    w.a1_lost();
    w.launchers.retain(|l| l.uid != "old");
    let (actions, report) = w.step(&mut p, 10);
    assert!(
        grants(&actions).is_empty() && !has_ungate(&actions),
        "{actions:?}"
    );
    assert!(
        report
            .blocked
            .is_some_and(|b| b.contains("neither live nor proven fenced"))
    );
    // Proven fenced: now it moves.
    w.fenced.insert("a-1".into());
    let (actions, _) = w.step(&mut p, 20);
    assert_eq!(grants(&actions).len(), 1);
    assert!(has_ungate(&actions));
}

#[test]
fn a_gone_holder_on_a_live_node_stopped_and_its_lease_moves() {
    // A restart on a live node: the kubelet removed the old pod after stopping it.
    let mut w = World::running_on_a1();
    let mut p = VmProtection::new();
    w.launchers = vec![launcher("new", None, LauncherPhase::Pending, true, "t2")];
    let (actions, _) = w.step(&mut p, 10);
    assert_eq!(grants(&actions).len(), 1);
    assert!(has_ungate(&actions));
}

#[test]
fn a_terminal_old_pod_has_stopped_and_a_guard_holder_must_release_itself() {
    let mut w = World::running_on_a1();
    let mut p = VmProtection::new();
    w.launchers[0].phase = LauncherPhase::Terminal;
    w.launchers
        .push(launcher("new", None, LauncherPhase::Pending, true, "t2"));
    let (actions, _) = w.step(&mut p, 10);
    assert_eq!(grants(&actions).len(), 1);

    // A pod consumer with a guard holds it (no held-for-node): the VM waits for its release.
    let mut w = World::running_on_a1();
    w.leases.insert(
        "twosite-disk-vm-disk".into(),
        lease(Some("repair-pod"), 5, None),
    );
    w.launchers = vec![launcher("new", None, LauncherPhase::Pending, true, "t2")];
    let (actions, report) = w.step(&mut VmProtection::new(), 10);
    assert!(
        grants(&actions).is_empty() && !has_ungate(&actions),
        "{actions:?}"
    );
    assert!(report.blocked.is_some_and(|b| b.contains("repair-pod")));
}

#[test]
fn a_missing_disk_lease_is_created_and_keeps_the_gate() {
    let mut w = World::running_on_a1();
    w.leases.clear();
    w.launchers = vec![launcher("new", None, LauncherPhase::Pending, true, "t1")];
    let (actions, _) = w.step(&mut VmProtection::new(), 1);
    assert!(actions.contains(&VmAction::CreateLease {
        lease: "twosite-disk-vm-disk".into(),
        pvc: "vm-disk".into()
    }));
    assert!(!has_ungate(&actions));
}

#[test]
fn an_unprotected_disk_is_reported_once_and_does_not_hold_the_vm_back() {
    let mut w = World::running_on_a1();
    w.disks = vec![classify_disk("fs-disk", None)];
    w.leases.clear();
    w.launchers = vec![launcher("new", None, LauncherPhase::Pending, true, "t1")];
    let mut p = VmProtection::new();
    let (actions, report) = w.step(&mut p, 1);
    assert_eq!(reasons(&actions), vec![VmEventReason::UnprotectedVolume]);
    assert!(has_ungate(&actions));
    assert_eq!(report.unprotected.len(), 1);
    let (again, _) = w.step(&mut p, 2);
    assert!(reasons(&again).is_empty());
}

#[test]
fn a_vm_that_did_not_opt_in_is_never_touched() {
    let mut w = World::running_on_a1();
    w.opt_in = OptIn::Out;
    w.a1_lost();
    let mut p = VmProtection::new();
    let (actions, report) = w.step(&mut p, 1);
    // Its template still carries the label from an earlier opt-in: only that comes off.
    assert_eq!(actions, vec![VmAction::SetTemplateLabel { on: false }]);
    assert_eq!(report.state, "NotOptedIn");
}

#[test]
fn a_malformed_annotation_is_reported_once_and_changes_nothing_else() {
    let mut w = World::running_on_a1();
    w.opt_in = OptIn::Invalid("yes".into());
    w.a1_lost();
    w.fenced.insert("a-1".into());
    let mut p = VmProtection::new();
    let (actions, report) = w.step(&mut p, 1);
    assert_eq!(reasons(&actions), vec![VmEventReason::InvalidAnnotation]);
    assert!(grants(&actions).is_empty() && !has_ungate(&actions));
    assert_eq!(report.state, "InvalidAnnotation");
    let (again, _) = w.step(&mut p, 2);
    assert!(reasons(&again).is_empty());
}

#[test]
fn a_manual_vm_is_not_restarted_and_gives_its_lease_back_once_stopped() {
    let mut w = World::running_on_a1();
    w.run = RunStrategy::Manual;
    let mut p = VmProtection::new();
    w.live.remove("a-1");
    w.fenced.insert("a-1".into());
    let (actions, _) = w.step(&mut p, 1);
    assert_eq!(reasons(&actions), vec![VmEventReason::VMFailoverStarted]);
    assert!(!p.failing_over(), "Manual VMs do not restart");
    // The fence deleted its pod: the lease is released for other consumers.
    w.launchers.clear();
    let (actions, report) = w.step(&mut p, 2);
    assert!(actions.contains(&VmAction::Release {
        lease: "twosite-disk-vm-disk".into(),
        expected_rv: "rv3".into()
    }));
    assert_eq!(report.state, "Stopped");
}

#[test]
fn nobody_takes_a_vm_held_lease_by_expiry() {
    let timing = VolumeTiming::default();
    let held = lease(Some("launcher-uid"), 3, Some("a-1"));
    let view = LeaseView {
        lease: held,
        changed_at: MonoTime::from_millis(0),
    };
    let late = MonoTime::from_millis(3_600_000);
    assert!(matches!(
        may_take("guard-uid", Some(&view), None, late, &timing),
        Err(TakeRefusal::Held { .. })
    ));
    // A guard's own lease (no held-for-node) does expire: the rule is specific to VM leases.
    let mut guard_lease = view.clone();
    guard_lease.lease.held_for_node = None;
    assert!(may_take("guard-uid", Some(&guard_lease), None, late, &timing).is_ok());
}

#[test]
fn a_failover_starts_even_when_the_fence_deleted_the_old_pod_in_the_same_pass() {
    // The remediation's release deleted the old launcher pod in the pass that proved the fence:
    // only the disk Lease held for a-1 remembers where the VM ran.
    let mut w = World::running_on_a1();
    let mut p = VmProtection::new();
    w.step(&mut p, 0);
    w.live.remove("a-1");
    w.fenced.insert("a-1".into());
    w.launchers = vec![launcher("new", None, LauncherPhase::Pending, true, "t2")];
    let (actions, _) = w.step(&mut p, 15);
    assert_eq!(reasons(&actions), vec![VmEventReason::VMFailoverStarted]);
    assert!(p.failing_over());
    w.leases.insert(
        "twosite-disk-vm-disk".into(),
        lease(Some("new"), 4, Some("")),
    );
    w.launchers = vec![launcher(
        "new",
        Some("b-1"),
        LauncherPhase::Running,
        false,
        "t2",
    )];
    let (actions, _) = w.step(&mut p, 21);
    assert!(actions.contains(&VmAction::FailoverCompleted {
        duration: Duration::from_secs(6)
    }));
    // Reported once: the next pass says nothing more.
    let (again, _) = w.step(&mut p, 22);
    assert!(reasons(&again).is_empty(), "{again:?}");
}

#[test]
fn a_vm_that_does_not_restart_is_reported_lost_once() {
    let mut w = World::running_on_a1();
    w.run = RunStrategy::Halted;
    let mut p = VmProtection::new();
    w.live.remove("a-1");
    w.fenced.insert("a-1".into());
    w.launchers.clear();
    // The lease is still held for a-1 until the release (which the shell may fail to write).
    let (first, _) = w.step(&mut p, 1);
    assert_eq!(reasons(&first), vec![VmEventReason::VMFailoverStarted]);
    let (second, _) = w.step(&mut p, 2);
    assert!(reasons(&second).is_empty(), "{second:?}");
}
