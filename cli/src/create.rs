//! `kubectl godwit create vm NAME --from-template T`: a VirtualMachine
//! manifest that takes everything from template `T` (its CPU, memory, boot,
//! networks and customization) and a root disk copied from its image, to be
//! piped into `kubectl apply -f -`. Nothing is created.

use godwit_crds::VMTemplate;
use kube::api::Api;
use serde_json::{json, Value};

use crate::{api_err, CliError};

/// The VirtualMachine `name` in `namespace` made from template `template`.
pub fn vm_from_template(name: &str, namespace: &str, template: &str) -> Value {
    json!({
        "apiVersion": "godwit.dev/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "templateRef": {"name": template},
            "disks": [{"name": "root", "source": {"template": {}}}],
        },
    })
}

/// Prints the manifest once template `template` is known to exist in
/// `namespace`.
pub async fn run(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    template: &str,
) -> Result<(), CliError> {
    let templates: Api<VMTemplate> = Api::namespaced(client.clone(), namespace);
    if templates
        .get_opt(template)
        .await
        .map_err(api_err(format!("read VMTemplate {template:?}")))?
        .is_none()
    {
        return Err(CliError::TemplateNotFound {
            name: template.into(),
            namespace: namespace.into(),
        });
    }
    let yaml = serde_saphyr::to_string(&vm_from_template(name, namespace, template))
        .expect("a JSON object is YAML");
    print!("{yaml}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use godwit_crds::VirtualMachine;

    #[test]
    fn the_manifest_is_a_vm_of_the_template_with_its_root_disk() {
        let v = vm_from_template("web", "prod", "testguest");
        let yaml = serde_saphyr::to_string(&v).unwrap();
        let vm: VirtualMachine = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(vm.metadata.name.as_deref(), Some("web"));
        assert_eq!(vm.metadata.namespace.as_deref(), Some("prod"));
        assert_eq!(vm.spec.template_ref.unwrap().name, "testguest");
        assert_eq!(vm.spec.disks.len(), 1);
        assert_eq!(vm.spec.disks[0].name, "root");
        assert!(vm.spec.disks[0].source.template.is_some());
        assert!(
            yaml.starts_with("apiVersion: godwit.dev/v1alpha1\nkind: VirtualMachine\n"),
            "{yaml}"
        );
    }
}
