//! The Krew manifest (`cli/krew/godwit.yaml`) read as Krew reads it: the
//! plugin's name, the binary it installs and the linux/amd64 platform.

use serde_json::Value;

const MANIFEST: &str = include_str!("../krew/godwit.yaml");

fn manifest() -> Value {
    serde_saphyr::from_str(MANIFEST).expect("cli/krew/godwit.yaml is YAML")
}

#[test]
fn the_krew_manifest_installs_kubectl_godwit_on_linux_amd64() {
    let m = manifest();
    assert_eq!(
        m["apiVersion"].as_str(),
        Some("krew.googlecontainertools.github.com/v1alpha2")
    );
    assert_eq!(m["kind"].as_str(), Some("Plugin"));
    // `kubectl krew install godwit` gives `kubectl godwit`.
    assert_eq!(m["metadata"]["name"].as_str(), Some("godwit"));
    let version = m["spec"]["version"].as_str().expect("spec.version");
    assert!(version.starts_with('v'), "{version}");
    assert!(m["spec"]["shortDescription"]
        .as_str()
        .is_some_and(|d| !d.is_empty()));
    let platforms = m["spec"]["platforms"].as_array().expect("platforms");
    let linux = platforms
        .iter()
        .find(|p| {
            p["selector"]["matchLabels"]["os"].as_str() == Some("linux")
                && p["selector"]["matchLabels"]["arch"].as_str() == Some("amd64")
        })
        .expect("a linux/amd64 platform");
    // The binary Cargo builds (`[[bin]]` in cli/Cargo.toml).
    assert_eq!(linux["bin"].as_str(), Some("kubectl-godwit"));
    let files = linux["files"].as_array().expect("files");
    assert!(files
        .iter()
        .any(|f| f["from"].as_str() == Some("kubectl-godwit")));
    let uri = linux["uri"].as_str().expect("uri");
    assert!(
        uri.starts_with("https://") && uri.ends_with("-linux-amd64.tar.gz"),
        "{uri}"
    );
    assert!(
        uri.contains(&format!("/{version}/")),
        "{uri} is not {version}'s"
    );
    let sha = linux["sha256"].as_str().expect("sha256");
    assert_eq!(sha.len(), 64, "{sha}");
    assert!(sha.bytes().all(|b| b.is_ascii_hexdigit()), "{sha}");
    assert!(
        MANIFEST.contains("FILLED IN BY THE RELEASE"),
        "the placeholder sha256 must say who fills it in"
    );
}
