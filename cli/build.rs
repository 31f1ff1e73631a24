//! Records `git describe` of the checkout the plugin is built from, for
//! `kubectl godwit version` (nothing when git or the repository is absent,
//! as in a source tarball).

use std::process::Command;

fn main() {
    let described = Command::new("git")
        .args(["describe", "--always", "--dirty", "--tags"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=GODWIT_GIT_DESCRIBE={described}");
}
