//! The Helm chart through real Helm: `e2e/helm/chart.py` drives Helm's Go SDK
//! (the `helm-python-sdk` package, installed by `e2e/install-deps.sh`) to lint,
//! render and validate `charts/godwit` and to run a release's lifecycle on a
//! cluster; these functions run it and return what
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

/// [`render`] as release `name` (rather than `godwit`), with `helm --set`
/// expressions.
pub fn render_release(namespace: &str, name: &str, sets: &[&str]) -> Result<String, HelmError> {
    let mut extra = vec!["--namespace", namespace, "--name", name];
    for s in sets {
        extra.extend(["--set", s]);
    }
    run("render", None, &extra)
}

/// One step of a release's lifecycle (`install`, `upgrade`, `rollback` or
/// `uninstall`) on the cluster of `kubeconfig`, through Helm's SDK (Helm v4:
/// server-side apply, release Secrets); `sets` are `helm --set` expressions
/// for install and upgrade. Returns the release's JSON summary (name,
/// revision, status).
pub fn release(
    command: &str,
    kubeconfig: &Path,
    namespace: &str,
    name: &str,
    sets: &[&str],
) -> Result<String, HelmError> {
    let kubeconfig = kubeconfig.to_string_lossy();
    let mut extra = vec![
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        namespace,
        "--name",
        name,
    ];
    for s in sets {
        extra.extend(["--set", s]);
    }
    run(command, None, &extra)
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
pub fn documents(stream: &str) -> Result<Vec<serde_json::Value>, serde_saphyr::Error> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(stream)?;
    Ok(docs.into_iter().filter(|doc| !doc.is_null()).collect())
}

/// The chart's objects of the given kinds, rendered with its defaults into
/// the operator's namespace, as one multi-document YAML stream (the whole
/// chart is rendered once per process).
pub fn chart_objects(kinds: &[&str]) -> Result<String, HelmError> {
    static RENDERED: std::sync::OnceLock<Vec<serde_json::Value>> = std::sync::OnceLock::new();
    let docs = match RENDERED.get() {
        Some(docs) => docs,
        None => {
            let stream = render(None, godwit_crds::contract::DEFAULT_LEASE_NAMESPACE)?;
            let docs = documents(&stream).map_err(|e| HelmError::Failed {
                command: "render".into(),
                output: format!("the rendered chart is not YAML: {e}"),
            })?;
            RENDERED.get_or_init(|| docs)
        }
    };
    Ok(docs
        .iter()
        .filter(|d| kinds.contains(&d["kind"].as_str().unwrap_or("")))
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n---\n"))
}

/// The chart's node restriction (its ValidatingAdmissionPolicy and binding).
pub fn node_restriction() -> Result<String, HelmError> {
    chart_objects(&[
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ])
}
