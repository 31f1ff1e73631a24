//! `kubectl godwit version`: the plugin's own version and what it talks to,
//! the API server's `/version` and the image of the operator Deployment the
//! chart installed (found by the chart's labels, in any namespace).

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ListParams};
use kube::ResourceExt;

use crate::{api_err, CliError};

/// The labels the chart puts on the operator's Deployment
/// (`charts/godwit/templates/operator.yaml`).
pub const OPERATOR_SELECTOR: &str =
    "app.kubernetes.io/name=godwit,app.kubernetes.io/component=operator";

/// The plugin's version line: the crate's version, and `git describe` of the
/// checkout when it was built from one.
pub fn client_line() -> String {
    let described = env!("GODWIT_GIT_DESCRIBE");
    let git = if described.is_empty() {
        String::new()
    } else {
        format!(" (git {described})")
    };
    format!("client: kubectl-godwit {}{git}", env!("CARGO_PKG_VERSION"))
}

/// The operator line for the Deployments found with [`OPERATOR_SELECTOR`].
pub fn operator_line(found: &[Deployment]) -> String {
    if found.is_empty() {
        return format!(
            "operator: not found (no Deployment labelled {OPERATOR_SELECTOR}; is the chart installed?)"
        );
    }
    let each: Vec<String> = found
        .iter()
        .map(|d| {
            let images: Vec<&str> = d
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .map(|p| {
                    p.containers
                        .iter()
                        .filter_map(|c| c.image.as_deref())
                        .collect()
                })
                .unwrap_or_default();
            let image = if images.is_empty() {
                "<no image>".to_string()
            } else {
                images.join(",")
            };
            format!(
                "{image} (deployment {}/{})",
                d.namespace().unwrap_or_default(),
                d.name_any()
            )
        })
        .collect();
    format!("operator: {}", each.join("; "))
}

/// Prints the server's lines (the caller printed the client's).
pub async fn run(client: &kube::Client) -> Result<(), CliError> {
    let info = client
        .apiserver_version()
        .await
        .map_err(api_err("read the API server's /version"))?;
    println!("server: Kubernetes {}", info.git_version);
    let deployments: Api<Deployment> = Api::all(client.clone());
    let found = deployments
        .list(&ListParams::default().labels(OPERATOR_SELECTOR))
        .await
        .map_err(api_err("list the operator's Deployment"))?;
    println!("{}", operator_line(&found.items));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DeploymentSpec;
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};

    #[test]
    fn the_operator_line_names_the_image_or_says_it_is_missing() {
        assert!(operator_line(&[]).starts_with("operator: not found"));
        let mut d = Deployment {
            spec: Some(DeploymentSpec {
                template: PodTemplateSpec {
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "operator".into(),
                            image: Some("ghcr.io/godwit/godwit:0.1.0".into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        d.metadata.name = Some("godwit-operator".into());
        d.metadata.namespace = Some("godwit-system".into());
        assert_eq!(
            operator_line(&[d]),
            "operator: ghcr.io/godwit/godwit:0.1.0 (deployment godwit-system/godwit-operator)"
        );
        assert!(client_line().starts_with(&format!(
            "client: kubectl-godwit {}",
            env!("CARGO_PKG_VERSION")
        )));
    }
}
