//! Discovery documents (`/api`, `/apis`, group and group-version resource
//! lists, `/version`) and the minimal OpenAPI v3 documents kubectl reads.
//!
//! Only the legacy (unaggregated) discovery format is served; kubectl falls
//! back to it when the aggregated form is not returned. The OpenAPI v3
//! documents list, for every resource, the write operations and the
//! `fieldValidation` parameter, so kubectl leaves field validation to this
//! server instead of validating against a downloaded schema. They carry the
//! schemas of custom resources (so `kubectl explain vm.spec` works) but not
//! of built-in kinds. `/openapi/v2` is not served.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::crd::ResourceDef;

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// `/api`.
pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

/// Group name to its versions, the preferred (first declared) version first.
fn groups(defs: &[ResourceDef]) -> BTreeMap<String, Vec<String>> {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for def in defs.iter().filter(|d| !d.group.is_empty()) {
        let versions = groups.entry(def.group.clone()).or_default();
        if !versions.contains(&def.version) {
            versions.push(def.version.clone());
        }
    }
    groups
}

fn group_document(name: &str, versions: &[String]) -> Value {
    let entries: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": name,
        "versions": entries,
        "preferredVersion": entries.first().cloned().unwrap_or(Value::Null),
    })
}

/// `/apis`.
pub fn api_group_list(defs: &[ResourceDef]) -> Value {
    let groups: Vec<Value> = groups(defs)
        .iter()
        .map(|(name, versions)| {
            let mut doc = group_document(name, versions);
            if let Some(map) = doc.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            doc
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`, if the group exists.
pub fn api_group(defs: &[ResourceDef], group: &str) -> Option<Value> {
    groups(defs)
        .get(group)
        .map(|versions| group_document(group, versions))
}

/// `/api/v1` or `/apis/<group>/<version>`, if the group version exists.
pub fn resource_list(defs: &[ResourceDef], group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for def in defs
        .iter()
        .filter(|d| d.group == group && d.version == version)
    {
        resources.push(json!({
            "name": def.plural,
            "singularName": def.singular,
            "namespaced": def.namespaced,
            "kind": def.kind,
            "verbs": VERBS,
            "shortNames": def.short_names,
            "categories": def.categories,
        }));
        if def.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", def.plural),
                "singularName": "",
                "namespaced": def.namespaced,
                "kind": def.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if crate::csr::is_csr(&def.group, &def.plural) {
            resources.push(json!({
                "name": format!("{}/approval", def.plural),
                "singularName": "",
                "namespaced": false,
                "kind": def.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// `/version`.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-godwit-apiserver",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: the index of group-version documents.
pub fn openapi_v3_root(defs: &[ResourceDef]) -> Value {
    let mut paths = serde_json::Map::new();
    for def in defs {
        let path = gv_path(&def.group, &def.version);
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}")}),
        );
    }
    json!({"paths": paths})
}

/// `/openapi/v3/<api|apis/group>/<version>`: operations, no schemas.
pub fn openapi_v3_group_version(defs: &[ResourceDef], group: &str, version: &str) -> Option<Value> {
    let selected: Vec<&ResourceDef> = defs
        .iter()
        .filter(|d| d.group == group && d.version == version)
        .collect();
    if selected.is_empty() {
        return None;
    }
    let field_validation = json!({
        "name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true},
        "description": "Strict, Warn or Ignore"
    });
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    for def in &selected {
        if let Some(schema) = def.custom.then_some(def.schema.as_ref()).flatten() {
            let mut schema = Value::clone(schema);
            schema["x-kubernetes-group-version-kind"] =
                json!([{"group": def.group, "version": def.version, "kind": def.kind}]);
            let reversed: Vec<&str> = def.group.split('.').rev().collect();
            schemas.insert(
                format!("{}.{}.{}", reversed.join("."), def.version, def.kind),
                schema,
            );
        }
    }
    for def in selected {
        let gvk = json!({"group": def.group, "version": def.version, "kind": def.kind});
        let operation = |action: &str| {
            json!({
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": [field_validation],
                "responses": {"200": {"description": "OK"}},
            })
        };
        let base = format!("/{}", gv_path(&def.group, &def.version));
        let collection = if def.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}", def.plural)
        } else {
            format!("{base}/{}", def.plural)
        };
        paths.insert(collection.clone(), json!({"post": operation("post")}));
        paths.insert(
            format!("{collection}/{{name}}"),
            json!({"put": operation("put"), "patch": operation("patch")}),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "godwit-apiserver", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

#[cfg(test)]
mod tests {
    use super::super::crd::builtin_resources;
    use super::*;

    #[test]
    fn core_list_has_status_subresources_and_short_names() {
        let list = resource_list(&builtin_resources(), "", "v1").unwrap();
        let names: Vec<&str> = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"namespaces") && names.contains(&"namespaces/status"));
        assert!(!names.contains(&"leases"));
        assert!(resource_list(&builtin_resources(), "nope", "v1").is_none());
    }

    #[test]
    fn group_list_prefers_first_version() {
        let groups = api_group_list(&builtin_resources());
        let coordination = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == "coordination.k8s.io")
            .unwrap();
        assert_eq!(
            coordination["preferredVersion"]["groupVersion"],
            "coordination.k8s.io/v1"
        );
    }
}
