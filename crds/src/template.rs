//! `VMTemplate`: a golden image and the defaults of the VMs provisioned from it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::BootSpec;
pub use crate::common::{Customization, NetworkConfig, SecretKeyRef};
use crate::vm::{ImageFormat, Network};

/// A golden image with boot settings, defaults and guest customization.
// Each `printcolumn(...)` repeats `type_ = ...`, which clippy mistakes for a
// duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "godwit.dev",
    version = "v1alpha1",
    kind = "VMTemplate",
    namespaced,
    status = "VMTemplateStatus",
    shortname = "gvmt",
    category = "godwit",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.image.source"),
    printcolumn(name = "Digest", type_ = "string", json_path = ".status.imageDigest"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VMTemplateSpec {
    /// The root disk image.
    pub image: ImageSource,
    /// Kernel, initrd and command line of VMs from this template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootSpec>,
    /// Default number of vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub cpu: Option<u32>,
    /// Default guest memory (a quantity, at least 64Mi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    #[x_kube(validation = Rule::new("quantity(self).compareTo(quantity('64Mi')) >= 0").message("memory must be at least 64Mi"))]
    #[x_kube(validation = Rule::new("quantity(self).compareTo(quantity('4Ti')) <= 0").message("memory must be at most 4Ti"))]
    pub memory: Option<String>,
    /// Default network interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[x_kube(validation = Rule::new("self.all(n, !has(n.mac) || self.exists_one(e, has(e.mac) && e.mac.lowerAscii() == n.mac.lowerAscii()))").message("MAC addresses must be unique"))]
    pub networks: Vec<Network>,
    /// What each VM from this template is given at first boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customization: Option<Customization>,
}

/// A template every namespace may use: the same fields as a `VMTemplate`,
/// cluster-scoped, so that only those whom RBAC lets write cluster-scoped
/// Godwit objects (cluster administrators) make one. It is the one place
/// where a path outside the node daemons' image directories may be named
/// (`image.source`, `boot.kernel`, `boot.initrd`): a node agent allows such
/// a path only when a `ClusterVMTemplate` it reads from the API server
/// names exactly that path, never because a VM says so. VMs use one with
/// `templateRef: {kind: ClusterVMTemplate, name: ...}`.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "godwit.dev",
    version = "v1alpha1",
    kind = "ClusterVMTemplate",
    status = "VMTemplateStatus",
    shortname = "gcvmt",
    category = "godwit",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.image.source"),
    printcolumn(name = "Digest", type_ = "string", json_path = ".status.imageDigest"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct ClusterVMTemplateSpec {
    /// The template's fields, as in a `VMTemplate`.
    #[serde(flatten)]
    pub template: VMTemplateSpec,
}

impl ClusterVMTemplate {
    /// The template as a namespaced one, for provisioning.
    pub fn as_template(&self) -> VMTemplate {
        let mut t = VMTemplate::new(
            &self.metadata.name.clone().unwrap_or_default(),
            self.spec.template.clone(),
        );
        t.metadata = self.metadata.clone();
        t.status = self.status.clone();
        t
    }

    /// The node paths it names (image source, kernel, initrd), which node
    /// agents allow outside their image directories.
    pub fn node_paths(&self) -> Vec<String> {
        let spec = &self.spec.template;
        let mut paths = Vec::new();
        let source = spec
            .image
            .source
            .strip_prefix("file://")
            .unwrap_or(&spec.image.source);
        if source.starts_with('/') {
            paths.push(source.to_string());
        }
        if let Some(boot) = &spec.boot {
            paths.extend(boot.kernel.iter().cloned());
            paths.extend(boot.initrd.iter().cloned());
        }
        paths
    }
}

/// Where a template's root image comes from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    /// An absolute path in one of the node's image directories (the node
    /// daemon's `--image-dir`), or an `http://` / `https://` URL that each
    /// node downloads once into its image cache.
    #[schemars(pattern(r"^(/|https?://).+"), length(max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://') || (self.startsWith('/') && !self.contains('/../') && !self.endsWith('/..') && !self.contains('/./') && !self.endsWith('/.') && !self.contains('//'))").message(crate::common::NODE_PATH_MESSAGE))]
    #[x_kube(validation = Rule::new(crate::common::SYSTEM_PATH_RULE).message(crate::common::SYSTEM_PATH_MESSAGE))]
    pub source: String,
    /// Expected SHA-256 of the image, lower-case hex; downloads that do not match
    /// are discarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
    /// Image format (default `raw`).
    #[serde(default)]
    pub format: ImageFormat,
}

/// What the node agents found of a template.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VMTemplateStatus {
    /// `Ready` is true once the image is verified and cached on at least one node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// SHA-256 of the image as cached (`sha256:<hex>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// Nodes that hold a verified copy of the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cached_nodes: Vec<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
