//! Writes every Silo CRD as YAML into `charts/silo/files/crds/` (or the folder given as the first
//! argument), where the Helm chart includes it.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(silo_crds::CRD_DIR));
    std::fs::create_dir_all(&dir)?;
    for crd in silo_crds::all() {
        let path = dir.join(silo_crds::file_name(&crd));
        std::fs::write(&path, silo_crds::to_yaml(&crd)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
