//! `deploy/crd.yaml` must be exactly what `twosite crd` prints.

#[test]
fn deploy_crd_yaml_matches_the_generated_crd() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crd.yaml");
    let checked_in = std::fs::read_to_string(path).expect("deploy/crd.yaml is readable");
    let generated = controller::crd::crd_yaml().expect("the CRD renders as YAML");
    assert!(
        checked_in == generated,
        "deploy/crd.yaml drifted from the TwoSite type; regenerate it with\n  \
         cargo run -p twosite-controller -- crd > deploy/crd.yaml"
    );
}

#[test]
fn crd_names_and_columns() {
    use kube::CustomResourceExt;
    let crd = controller::crd::TwoSite::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("twosites.twosite.dev"));
    assert_eq!(crd.spec.scope, "Cluster");
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    let columns: Vec<&str> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        ["Room A", "Room B", "Pairs", "Unpaired", "Leader", "Age"]
    );
    assert!(
        version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some(),
        "status subresource"
    );
}
