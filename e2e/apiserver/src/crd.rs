//! The resource registry: the built-in kinds this server serves and the
//! kinds that `apiextensions.k8s.io/v1` CustomResourceDefinitions add.
//!
//! A CRD becomes live as soon as it is stored: its served versions appear in
//! discovery and its REST paths answer. All served versions share one
//! storage; reading through another version only rewrites `apiVersion`
//! (the `None` conversion strategy; conversion webhooks are not supported).

use std::sync::Arc;

use serde_json::{json, Value};

use super::store::ResourceId;

/// Column format of the Node Status column: the Ready condition shown as
/// `Ready`, `NotReady` or `Unknown`, plus `SchedulingDisabled` when cordoned.
pub const NODE_STATUS: &str = "node-status";
/// Column format of the CertificateSigningRequest Condition column:
/// `Approved,Issued`, `Denied` or `Pending`, as kubectl shows it.
pub const CSR_CONDITION: &str = "csr-condition";

/// A printer column for table output.
#[derive(Debug, Clone, PartialEq)]
pub struct PrinterColumn {
    /// Column header.
    pub name: String,
    /// Column type (`string`, `integer`, `number`, `boolean`, `date`).
    pub type_: String,
    /// Column format, e.g. `name`.
    pub format: String,
    /// JSONPath into the object.
    pub json_path: String,
    /// Priority (0 shows by default, higher only with `-o wide`).
    pub priority: i64,
    /// Column description.
    pub description: String,
}

impl PrinterColumn {
    fn new(name: &str, type_: &str, json_path: &str) -> Self {
        Self {
            name: name.to_string(),
            type_: type_.to_string(),
            format: String::new(),
            json_path: json_path.to_string(),
            priority: 0,
            description: String::new(),
        }
    }
}

/// One served resource in one group version.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceDef {
    /// API group, empty for the core group.
    pub group: String,
    /// API version, e.g. `v1`.
    pub version: String,
    /// Kind, e.g. `VirtualMachine`.
    pub kind: String,
    /// Plural resource name.
    pub plural: String,
    /// Singular resource name.
    pub singular: String,
    /// Short names for kubectl.
    pub short_names: Vec<String>,
    /// Categories for kubectl (e.g. `all`).
    pub categories: Vec<String>,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Whether `/status` is a subresource (then main writes ignore status).
    pub status_subresource: bool,
    /// Printer columns (besides Name).
    pub columns: Vec<PrinterColumn>,
    /// The version's `openAPIV3Schema`, for custom resources (shared: defs
    /// are cloned per request).
    pub schema: Option<Arc<Value>>,
    /// Whether this is a custom resource.
    pub custom: bool,
    /// Whether updates without `resourceVersion` are allowed.
    pub unconditional_update: bool,
    /// Group whose storage holds the objects (differs from `group` only for
    /// `events.k8s.io` Events, stored as core Events).
    pub storage_group: String,
}

impl ResourceDef {
    /// Storage identity (group and plural).
    pub fn id(&self) -> ResourceId {
        ResourceId::new(&self.storage_group, &self.plural)
    }

    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural.group` (or `plural`), as error messages name the resource.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `Kind.group` (or `Kind`), as validation errors name the kind.
    pub fn group_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    fn builtin(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        Self {
            group: group.to_string(),
            version: version.to_string(),
            kind: kind.to_string(),
            plural: plural.to_string(),
            singular: kind.to_lowercase(),
            short_names: Vec::new(),
            categories: Vec::new(),
            namespaced,
            status_subresource: false,
            columns: Vec::new(),
            schema: None,
            custom: false,
            unconditional_update: true,
            storage_group: group.to_string(),
        }
    }

    fn short(mut self, names: &[&str]) -> Self {
        self.short_names = names.iter().map(|n| n.to_string()).collect();
        self
    }

    fn stored_in(mut self, group: &str) -> Self {
        self.storage_group = group.to_string();
        self
    }

    fn with_status(mut self) -> Self {
        self.status_subresource = true;
        self
    }

    fn columns(mut self, columns: Vec<PrinterColumn>) -> Self {
        self.columns = columns;
        self
    }
}

fn age() -> PrinterColumn {
    PrinterColumn::new("Age", "date", ".metadata.creationTimestamp")
}

/// The built-in resources this server serves.
pub fn builtin_resources() -> Vec<ResourceDef> {
    vec![
        ResourceDef::builtin("", "v1", "Namespace", "namespaces", false)
            .short(&["ns"])
            .with_status()
            .columns(vec![
                PrinterColumn::new("Status", "string", ".status.phase"),
                age(),
            ]),
        ResourceDef::builtin("", "v1", "Node", "nodes", false)
            .short(&["no"])
            .with_status()
            .columns(vec![
                PrinterColumn {
                    format: NODE_STATUS.to_string(),
                    ..PrinterColumn::new(
                        "Status",
                        "string",
                        ".status.conditions[?(@.type==\"Ready\")].status",
                    )
                },
                age(),
                PrinterColumn::new("Version", "string", ".status.nodeInfo.kubeletVersion"),
            ]),
        ResourceDef::builtin("", "v1", "Event", "events", true)
            .short(&["ev"])
            .columns(vec![
                PrinterColumn::new("Type", "string", ".type"),
                PrinterColumn::new("Reason", "string", ".reason"),
                PrinterColumn::new("Object", "string", ".involvedObject.name"),
                PrinterColumn::new("Message", "string", ".message"),
            ]),
        // No kubelet runs them: a Pod is `Running` once stored.
        ResourceDef::builtin("", "v1", "Pod", "pods", true)
            .short(&["po"])
            .with_status()
            .columns(vec![
                PrinterColumn::new("Status", "string", ".status.phase"),
                PrinterColumn::new("Node", "string", ".spec.nodeName"),
                age(),
            ]),
        ResourceDef::builtin("", "v1", "ResourceQuota", "resourcequotas", true)
            .short(&["quota"])
            .with_status()
            .columns(vec![
                age(),
                PrinterColumn::new("Hard", "string", ".status.hard"),
                PrinterColumn::new("Used", "string", ".status.used"),
            ]),
        ResourceDef::builtin("", "v1", "Secret", "secrets", true)
            .columns(vec![PrinterColumn::new("Type", "string", ".type"), age()]),
        ResourceDef::builtin("", "v1", "ConfigMap", "configmaps", true)
            .short(&["cm"])
            .columns(vec![age()]),
        ResourceDef::builtin("", "v1", "ServiceAccount", "serviceaccounts", true)
            .short(&["sa"])
            .columns(vec![age()]),
        ResourceDef::builtin("", "v1", "Service", "services", true)
            .short(&["svc"])
            .with_status()
            .columns(vec![
                PrinterColumn::new("Type", "string", ".spec.type"),
                age(),
            ]),
        // The aggregation layer's registrations ([`crate::aggregator`]);
        // no controller writes their status.
        ResourceDef::builtin(
            "apiregistration.k8s.io",
            "v1",
            "APIService",
            "apiservices",
            false,
        )
        .with_status()
        .columns(vec![
            PrinterColumn::new("Service", "string", ".spec.service.name"),
            age(),
        ]),
        // Written by whoever plays the endpoints controller (the local
        // cluster, for the operator it runs); read by the aggregation layer.
        ResourceDef::builtin(
            "discovery.k8s.io",
            "v1",
            "EndpointSlice",
            "endpointslices",
            true,
        )
        .columns(vec![
            PrinterColumn::new("AddressType", "string", ".addressType"),
            age(),
        ]),
        // Stored only (no controllers act on them), so that the Helm chart's
        // manifests apply.
        ResourceDef::builtin("apps", "v1", "Deployment", "deployments", true)
            .short(&["deploy"])
            .with_status()
            .columns(vec![age()]),
        ResourceDef::builtin("apps", "v1", "DaemonSet", "daemonsets", true)
            .short(&["ds"])
            .with_status()
            .columns(vec![age()]),
        ResourceDef::builtin(
            "policy",
            "v1",
            "PodDisruptionBudget",
            "poddisruptionbudgets",
            true,
        )
        .short(&["pdb"])
        .with_status()
        .columns(vec![
            PrinterColumn::new("Min Available", "string", ".spec.minAvailable"),
            PrinterColumn::new("Max Unavailable", "string", ".spec.maxUnavailable"),
            age(),
        ]),
        ResourceDef::builtin("rbac.authorization.k8s.io", "v1", "Role", "roles", true)
            .columns(vec![age()]),
        ResourceDef::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "RoleBinding",
            "rolebindings",
            true,
        )
        .columns(vec![
            PrinterColumn::new("Role", "string", ".roleRef.name"),
            age(),
        ]),
        ResourceDef::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRole",
            "clusterroles",
            false,
        )
        .columns(vec![age()]),
        ResourceDef::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
        )
        .columns(vec![
            PrinterColumn::new("Role", "string", ".roleRef.name"),
            age(),
        ]),
        // Applied to every write (crate::admission_policy).
        ResourceDef::builtin(
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingAdmissionPolicy",
            "validatingadmissionpolicies",
            false,
        )
        .with_status()
        .columns(vec![age()]),
        ResourceDef::builtin(
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingAdmissionPolicyBinding",
            "validatingadmissionpolicybindings",
            false,
        )
        .columns(vec![
            PrinterColumn::new("Policy", "string", ".spec.policyName"),
            age(),
        ]),
        ResourceDef::builtin("coordination.k8s.io", "v1", "Lease", "leases", true).columns(vec![
            PrinterColumn::new("Holder", "string", ".spec.holderIdentity"),
            age(),
        ]),
        // Approved and signed by an external signer through `/approval` and
        // `/status` ([`crate::csr`]).
        ResourceDef::builtin(
            "certificates.k8s.io",
            "v1",
            "CertificateSigningRequest",
            "certificatesigningrequests",
            false,
        )
        .short(&["csr"])
        .with_status()
        .columns(vec![
            age(),
            PrinterColumn::new("SignerName", "string", ".spec.signerName"),
            PrinterColumn::new("Requestor", "string", ".spec.username"),
            PrinterColumn::new("RequestedDuration", "string", ".spec.expirationSeconds"),
            PrinterColumn {
                format: CSR_CONDITION.to_string(),
                ..PrinterColumn::new("Condition", "string", ".status.conditions[*].type")
            },
        ]),
        ResourceDef::builtin("events.k8s.io", "v1", "Event", "events", true)
            .short(&["ev"])
            .stored_in("")
            .columns(vec![
                PrinterColumn::new("Type", "string", ".type"),
                PrinterColumn::new("Reason", "string", ".reason"),
                PrinterColumn::new("Object", "string", ".regarding.name"),
                PrinterColumn::new("Note", "string", ".note"),
            ]),
        ResourceDef::builtin(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
        )
        .short(&["crd", "crds"])
        .with_status()
        .columns(vec![PrinterColumn::new(
            "Created At",
            "string",
            ".metadata.creationTimestamp",
        )]),
    ]
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The served resources a stored CRD defines, one per served version.
pub fn resources_of_crd(crd: &Value) -> Vec<ResourceDef> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = names["plural"].as_str().unwrap_or_default();
    let kind = names["kind"].as_str().unwrap_or_default();
    let singular = names["singular"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| kind.to_lowercase());
    let namespaced = spec["scope"].as_str() != Some("Cluster");
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    versions
        .iter()
        .filter(|v| v["served"].as_bool().unwrap_or(true))
        .map(|v| {
            let columns: Vec<PrinterColumn> = v["additionalPrinterColumns"]
                .as_array()
                .map(|cols| {
                    cols.iter()
                        .map(|c| PrinterColumn {
                            name: c["name"].as_str().unwrap_or_default().to_string(),
                            type_: c["type"].as_str().unwrap_or("string").to_string(),
                            format: c["format"].as_str().unwrap_or_default().to_string(),
                            json_path: c["jsonPath"].as_str().unwrap_or_default().to_string(),
                            priority: c["priority"].as_i64().unwrap_or(0),
                            description: c["description"].as_str().unwrap_or_default().to_string(),
                        })
                        .collect()
                })
                .unwrap_or_else(|| vec![age()]);
            ResourceDef {
                group: group.to_string(),
                version: v["name"].as_str().unwrap_or_default().to_string(),
                kind: kind.to_string(),
                plural: plural.to_string(),
                singular: singular.clone(),
                short_names: strings(names.get("shortNames")),
                categories: strings(names.get("categories")),
                namespaced,
                status_subresource: v.pointer("/subresources/status").is_some(),
                columns,
                schema: v.pointer("/schema/openAPIV3Schema").cloned().map(Arc::new),
                custom: true,
                unconditional_update: false,
                storage_group: group.to_string(),
            }
        })
        .collect()
}

/// The status a real server reports for an accepted CRD.
pub fn established_status(crd: &Value, now: &str) -> Value {
    let names = crd["spec"]["names"].clone();
    let condition = |type_: &str, reason: &str, message: &str| json!({"type": type_, "status": "True", "lastTransitionTime": now, "reason": reason, "message": message});
    let stored: Vec<Value> = crd["spec"]["versions"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .filter(|v| v["storage"].as_bool().unwrap_or(false))
                .map(|v| v["name"].clone())
                .collect()
        })
        .unwrap_or_default();
    json!({
        "acceptedNames": names,
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": stored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_yields_one_resource_per_served_version() {
        let crd = json!({
            "spec": {
                "group": "godwit.dev",
                "names": {"kind": "VirtualMachine", "plural": "virtualmachines", "singular": "virtualmachine", "shortNames": ["vm"]},
                "scope": "Namespaced",
                "versions": [
                    {"name": "v1alpha1", "served": true, "storage": true, "subresources": {"status": {}},
                     "additionalPrinterColumns": [{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}],
                     "schema": {"openAPIV3Schema": {"type": "object"}}},
                    {"name": "v0", "served": false, "storage": false}
                ]
            }
        });
        let defs = resources_of_crd(&crd);
        assert_eq!(defs.len(), 1);
        let vm = &defs[0];
        assert_eq!(vm.api_version(), "godwit.dev/v1alpha1");
        assert!(vm.namespaced && vm.status_subresource && vm.custom);
        assert_eq!(vm.short_names, vec!["vm"]);
        assert_eq!(vm.columns[0].json_path, ".status.phase");
        assert_eq!(vm.group_kind(), "VirtualMachine.godwit.dev");
    }
}
