//! The Helm chart through real Helm: `e2e/helm/chart.py` drives Helm's Go SDK
//! (the `helm-python-sdk` package, installed by `e2e/install-deps.sh`) to lint,
//! render and validate `charts/godwit`; these functions run it and return what
//! it printed.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors of driving Helm.
#[derive(Debug, thiserror::Error)]
pub enum HelmError {
    /// `python3` could not be run.
    #[error("Cannot run python3 e2e/helm/chart.py (run e2e/install-deps.sh for helm-python-sdk)")]
    Spawn(#[source] std::io::Error),
    /// Helm refused: lint findings, a render error or values the schema refuses.
    #[error("helm {command} failed: {output}")]
    Failed {
        /// `lint`, `render` or `validate`.
        command: String,
        /// What the script printed (stdout and stderr).
        output: String,
    },
}

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

/// The chart's directory, `charts/godwit`.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/godwit")
}

fn run(command: &str, values: Option<&Path>, extra: &[&str]) -> Result<String, HelmError> {
    let mut cmd = Command::new("python3");
    cmd.arg(repo_root().join("e2e/helm/chart.py"))
        .arg(command)
        .arg(chart_dir());
    if let Some(v) = values {
        cmd.arg(v);
    }
    let out = cmd.args(extra).output().map_err(HelmError::Spawn)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(HelmError::Failed {
            command: command.to_string(),
            output: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(stdout)
}

/// Helm's strict lint with `values` (the chart's defaults when `None`); its
/// findings (info level only: warnings and errors fail).
pub fn lint(values: Option<&Path>) -> Result<String, HelmError> {
    run("lint", values, &[])
}

/// The CRDs and the rendered templates of release `godwit` in `namespace`,
/// as one YAML stream.
pub fn render(values: Option<&Path>, namespace: &str) -> Result<String, HelmError> {
    run("render", values, &["--namespace", namespace])
}

/// [`render`] with `helm --set` expressions on top of `values`.
pub fn render_with_sets(
    values: Option<&Path>,
    namespace: &str,
    sets: &[String],
) -> Result<String, HelmError> {
    let mut extra = vec!["--namespace", namespace];
    for s in sets {
        extra.extend(["--set", s.as_str()]);
    }
    run("render", values, &extra)
}

/// Checks `values` against the chart's `values.schema.json`.
pub fn validate(values: &Path) -> Result<(), HelmError> {
    run("validate", Some(values), &[]).map(drop)
}

/// The documents of a YAML stream, empty ones left out.
pub fn documents(stream: &str) -> Result<Vec<serde_json::Value>, serde_yaml::Error> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(stream) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The chart's node restriction (its ValidatingAdmissionPolicy and binding,
/// rendered with the default values in `godwit-system`) as a YAML stream
/// of JSON documents, rendered once per process: the local cluster enforces it as a cluster
/// with the chart installed does.
pub fn node_restriction() -> Result<String, HelmError> {
    static RENDERED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(list) = RENDERED.get() {
        return Ok(list.clone());
    }
    let stream = render(None, godwit_crds::contract::DEFAULT_LEASE_NAMESPACE)?;
    let docs = documents(&stream).map_err(|e| HelmError::Failed {
        command: "render".into(),
        output: format!("the rendered chart is not YAML: {e}"),
    })?;
    let items: Vec<serde_json::Value> = docs
        .into_iter()
        .filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some("ValidatingAdmissionPolicy" | "ValidatingAdmissionPolicyBinding")
            )
        })
        .collect();
    let stream = items
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n---\n");
    Ok(RENDERED.get_or_init(|| stream).clone())
}
