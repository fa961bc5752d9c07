//! The committed CRD YAML must be exactly what `crdgen` writes today.

use std::path::PathBuf;

#[test]
fn committed_crds_match_the_types() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(silo_crds::CRD_DIR);
    for crd in silo_crds::all() {
        let path = dir.join(silo_crds::file_name(&crd));
        let expected = silo_crds::to_yaml(&crd).expect("serialize CRD");
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == expected,
            "{} is out of date with the Rust types; regenerate it with `cargo run -p silo-crds --bin crdgen`",
            path.display()
        );
    }
}
