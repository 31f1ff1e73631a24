//! Writes the CRD YAML of every Godwit kind into `crds/` (or the directory given
//! as the first argument), one file per kind.

use std::path::PathBuf;

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for (file, crd) in godwit_crds::crds() {
        let path = dir.join(file);
        if let Err(e) = std::fs::write(&path, godwit_crds::crd_yaml(&crd)) {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
        println!("{}", path.display());
    }
}
