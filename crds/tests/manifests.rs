//! The committed CRD YAML matches the types, the examples are valid, and bad
//! manifests are rejected by the generated schema with the bad field named.
//!
//! Validation here works the way the Kubernetes API server does it: the CRD's
//! `openAPIV3Schema` checked by a JSON-schema validator (with `nullable` and
//! unknown-field pruning translated into JSON-schema terms), then the
//! `x-kubernetes-validations` CEL rules evaluated by kube's CEL validator.

use std::path::{Path, PathBuf};

use godwit_crds::{crd_yaml, crds, VMMigration, VMTemplate, VirtualMachine};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Map, Value};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The CRDs are committed twice: in `crds/` and in the Helm chart's `crds/`.
#[test]
fn committed_crd_yaml_matches_the_types() {
    for dir in ["crds", "charts/godwit/crds"] {
        for (file, crd) in crds() {
            let path = repo_root().join(dir).join(file);
            let committed = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            assert!(
                committed == crd_yaml(&crd),
                "{} is out of date: run `cargo run -p godwit-crds --bin crdgen` and commit the result",
                path.display()
            );
        }
    }
}

/// The chart holds exactly the generated CRDs, no stale file of a removed kind.
#[test]
fn chart_holds_only_the_generated_crds() {
    let dir = repo_root().join("charts/godwit/crds");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut expected: Vec<String> = crds().into_iter().map(|(f, _)| f.to_string()).collect();
    expected.sort();
    assert_eq!(found, expected, "{}", dir.display());
}

/// Turns an OpenAPI v3 structural schema into a JSON schema with the same meaning
/// for validation: `nullable` becomes a `null` type, int-or-string becomes a
/// union, and objects with declared properties refuse unknown fields (the API
/// server prunes them; `kubectl --validate=strict`, the default, refuses them).
fn to_json_schema(schema: &Value) -> Value {
    let Value::Object(map) = schema else {
        return schema.clone();
    };
    let mut out = Map::new();
    for (key, value) in map {
        match key.as_str() {
            "x-kubernetes-validations" | "nullable" | "x-kubernetes-int-or-string" => {}
            "properties" => {
                let props = value
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), to_json_schema(v)))
                    .collect();
                out.insert(key.clone(), Value::Object(props));
            }
            "items" | "additionalProperties" if value.is_object() => {
                out.insert(key.clone(), to_json_schema(value));
            }
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    if map.get("nullable") == Some(&Value::Bool(true)) {
        if let Some(Value::String(t)) = out.get("type").cloned() {
            out.insert("type".into(), serde_json::json!([t, "null"]));
        }
    }
    if map.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        out.remove("type");
        out.insert(
            "anyOf".into(),
            serde_json::json!([{"type": "integer"}, {"type": "string"}]),
        );
    }
    let preserves = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if map.contains_key("properties") && !map.contains_key("additionalProperties") && !preserves {
        out.insert("additionalProperties".into(), Value::Bool(false));
    }
    out.remove("x-kubernetes-preserve-unknown-fields");
    Value::Object(out)
}

/// `/spec/disks/0/source` as `spec.disks[0].source`, the way the API server names fields.
fn field_path(pointer: &str) -> String {
    let mut out = String::new();
    for part in pointer.split('/').filter(|p| !p.is_empty()) {
        if part.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

fn openapi_schema(crd: &CustomResourceDefinition) -> Value {
    let version = &crd.spec.versions[0];
    let schema = version
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    serde_json::to_value(schema).unwrap()
}

/// Validates `object` against its kind's CRD as the API server would and returns
/// one message per problem, each starting with the field's path.
fn validate(object: &Value, old: Option<&Value>) -> Vec<String> {
    let kind = object["kind"].as_str().expect("manifest has a kind");
    let (_, crd) = crds()
        .into_iter()
        .find(|(_, crd)| crd.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for kind {kind}"));
    let schema = openapi_schema(&crd);
    // The API server supplies the type meta and object meta of every kind.
    let mut root = to_json_schema(&schema);
    let props = root["properties"].as_object_mut().unwrap();
    props.insert("apiVersion".into(), serde_json::json!({"type": "string"}));
    props.insert("kind".into(), serde_json::json!({"type": "string"}));
    props.insert("metadata".into(), serde_json::json!({"type": "object"}));
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft4)
        .should_validate_formats(false)
        .build(&root)
        .expect("the generated schema compiles");
    let mut problems: Vec<String> = validator
        .iter_errors(object)
        .map(|e| {
            use jsonschema::error::ValidationErrorKind as Kind;
            let mut path = field_path(e.instance_path().as_str());
            match e.kind() {
                Kind::AdditionalProperties { unexpected } => {
                    path = format!("{path}.{}", unexpected.join(","));
                }
                Kind::Required { property } => {
                    path = format!("{path}.{}", property.as_str().unwrap_or_default());
                }
                _ => {}
            }
            format!("{}: {e}", path.trim_start_matches('.'))
        })
        .collect();
    list_map_duplicates(&schema, object, "", &mut problems);
    if problems.is_empty() {
        if let Err(errors) = kube::core::cel::Validator::new().validate(&schema, object, old) {
            problems.extend(errors.into_vec().iter().map(|e| e.to_string()));
        }
    }
    problems
}

/// Items of an `x-kubernetes-list-type: map` list must differ in their
/// keys; the API server refuses a repeated key as
/// `spec.disks[1]: Duplicate value: map[string]interface {}{"name":"data"}`.
fn list_map_duplicates(schema: &Value, value: &Value, path: &str, problems: &mut Vec<String>) {
    match value {
        Value::Object(fields) => {
            for (name, sub) in fields {
                if let Some(sub_schema) = schema.pointer(&format!("/properties/{name}")) {
                    let path = format!("{path}.{name}");
                    list_map_duplicates(sub_schema, sub, &path, problems);
                }
            }
        }
        Value::Array(items) => {
            let keys = schema["x-kubernetes-list-map-keys"].as_array();
            let mut seen = Vec::new();
            for (index, item) in items.iter().enumerate() {
                let path = format!("{path}[{index}]");
                if let Some(keys) = keys.filter(|_| schema["x-kubernetes-list-type"] == "map") {
                    let key: Vec<String> = keys
                        .iter()
                        .filter_map(|k| Some(format!("{k}:{}", item.get(k.as_str()?)?)))
                        .collect();
                    if seen.contains(&key) {
                        problems.push(format!(
                            "{}: Duplicate value: map[string]interface {{}}{{{}}}",
                            path.trim_start_matches('.'),
                            key.join(", ")
                        ));
                    }
                    seen.push(key);
                }
                list_map_duplicates(&schema["items"], item, &path, problems);
            }
        }
        _ => {}
    }
}

fn load_yaml(path: &Path) -> (String, Value) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let value: Value = serde_saphyr::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
    (text, value)
}

#[test]
fn examples_parse_into_the_types_and_pass_the_schema() {
    let dir = repo_root().join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let (_, value) = load_yaml(&path);
        let problems = validate(&value, None);
        assert!(problems.is_empty(), "{}: {problems:#?}", path.display());
        match value["kind"].as_str().unwrap() {
            "VirtualMachine" => drop(serde_json::from_value::<VirtualMachine>(value).unwrap()),
            "VMTemplate" => drop(serde_json::from_value::<VMTemplate>(value).unwrap()),
            "VMMigration" => drop(serde_json::from_value::<VMMigration>(value).unwrap()),
            other => panic!("{}: unexpected kind {other}", path.display()),
        }
        seen += 1;
    }
    assert!(
        seen >= 3,
        "expected the template, VM and migration examples, found {seen}"
    );
}

#[test]
fn bad_manifests_are_rejected_naming_the_field() {
    let dir = repo_root().join("crds/tests/invalid");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let (text, value) = load_yaml(&path);
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks its `# expect:` line", path.display()));
        let problems = validate(&value, None);
        println!("{}: {problems:?}", path.display());
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "{}: expected a problem naming {expect:?}, got {problems:#?}",
            path.display()
        );
        seen += 1;
    }
    assert!(seen >= 8, "only {seen} bad manifests found");
}

#[test]
fn migration_spec_is_immutable() {
    let (_, old) = load_yaml(&repo_root().join("examples/migration.yaml"));
    assert!(validate(&old, Some(&old)).is_empty());
    let mut new = old.clone();
    new["spec"]["vmName"] = Value::String("another".into());
    let problems = validate(&new, Some(&old));
    assert!(
        problems.iter().any(|p| p.contains("spec is immutable")),
        "{problems:#?}"
    );
}

#[test]
fn example_vm_memory_parses() {
    let (_, value) = load_yaml(&repo_root().join("examples/vm.yaml"));
    let vm: VirtualMachine = serde_json::from_value(value).unwrap();
    let memory = vm.spec.memory.as_deref().unwrap();
    assert_eq!(godwit_crds::parse_quantity(memory), Ok(256 << 20));
}

/// Our short names are our own: none is one of KubeVirt's (clusters run
/// both, and `kubectl get vm` would then be ambiguous), and each kind keeps
/// the `godwit` category.
#[test]
fn short_names_do_not_collide_with_kubevirt() {
    let text =
        std::fs::read_to_string(repo_root().join("crds/tests/kubevirt-short-names.txt")).unwrap();
    let theirs: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(
        theirs.contains(&"vm") && theirs.contains(&"vmim"),
        "{theirs:?}"
    );
    let mut ours = Vec::new();
    for (_, crd) in crds() {
        let names = &crd.spec.names;
        assert_eq!(
            names.categories.as_deref(),
            Some(&["godwit".to_string()][..]),
            "{}",
            names.kind
        );
        for short in names.short_names.iter().flatten() {
            assert!(
                !theirs.contains(&short.as_str()),
                "{}: short name {short:?} is KubeVirt's",
                names.kind
            );
            ours.push(short.clone());
        }
    }
    ours.sort();
    assert_eq!(ours, ["gcvmt", "gnode", "gvm", "gvmm", "gvmt"]);
}
