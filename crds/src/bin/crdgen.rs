//! Writes the CRD YAML of every Godwit kind, one file per kind, into `crds/`
//! and into the Helm chart's `charts/godwit/crds/` (Helm installs that
//! directory before the templates), or only into the directory given as the
//! first argument.

use std::path::PathBuf;

fn main() {
    let dirs = match std::env::args().nth(1) {
        Some(dir) => vec![PathBuf::from(dir)],
        None => {
            let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            let chart = crate_dir.join("../charts/godwit/crds");
            vec![crate_dir, chart]
        }
    };
    for dir in dirs {
        for (file, crd) in godwit_crds::crds() {
            let path = dir.join(file);
            if let Err(e) = std::fs::write(&path, godwit_crds::crd_yaml(&crd)) {
                eprintln!("crdgen: cannot write {}: {e}", path.display());
                std::process::exit(1);
            }
            println!("{}", path.display());
        }
    }
}
