//! The shape of the code base, checked: dependencies flow one way, files
//! stay readable, and the VMM control protocol has one client.
//!
//! - No two source files import each other (a file's module path comes from
//!   its place under `src/`; a reference is a `crate::`, `super::`, `self::`
//!   or child-relative path in the code before its `#[cfg(test)]` module).
//! - Nothing in `node-daemon/src/migration` reaches into `crate::vmm`: the
//!   direction is `vmm -> migration -> storage`.
//! - No source file has more than 900 lines before its `#[cfg(test)]`
//!   module (integration tests under `tests/` and unit-test files declared
//!   `#[cfg(test)] mod name;` aside).
//!
//! The crates checked are the workspace's members; the `no_std` test guest
//! and the fuzz targets are outside it.
//! - No control request is built by hand (a `json!` object or a `Value`
//!   given a `"v"` field) outside the control protocol crate.
//! - The operator's tests build no KVM crate, and the node daemon's tests do
//!   not build `godwit-e2e` (`cargo tree`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use regex::Regex;

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e is inside the workspace")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, skipping build outputs.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            if p.is_dir() {
                if name != "target" && name != ".git" {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The crates of the workspace: directories with a `Cargo.toml` and a
/// `src/`, without the two the workspace excludes (the `no_std` test guest
/// and the fuzz targets, each built on its own).
fn crates() -> Vec<PathBuf> {
    let outside = [root().join("e2e/testguest"), root().join("fuzz")];
    let mut out: Vec<PathBuf> = rust_files(&root())
        .into_iter()
        .filter(|f| !outside.iter().any(|o| f.starts_with(o)))
        .filter_map(|f| {
            let src = f.ancestors().find(|a| a.ends_with("src"))?;
            let krate = src.parent()?;
            krate
                .join("Cargo.toml")
                .exists()
                .then(|| krate.to_path_buf())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The files of `krate`'s `src/` that only tests build: modules declared
/// `#[cfg(test)] mod name;` (a unit-test file such as `migration/tests.rs`,
/// or a fixture module).
fn test_only_files(krate: &Path) -> BTreeSet<PathBuf> {
    let declared =
        Regex::new(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;").unwrap();
    let mut out = BTreeSet::new();
    for f in rust_files(&krate.join("src")) {
        let text = std::fs::read_to_string(&f).unwrap();
        let name = f.file_stem().unwrap().to_string_lossy().into_owned();
        let dir = if matches!(name.as_str(), "lib" | "main" | "mod") {
            f.parent().unwrap().to_path_buf()
        } else {
            f.with_extension("")
        };
        for c in declared.captures_iter(&text) {
            out.insert(dir.join(format!("{}.rs", &c[1])));
            out.insert(dir.join(&c[1]).join("mod.rs"));
        }
    }
    out
}

/// The code of `text` before its unit tests, without line comments.
fn code_part(text: &str) -> String {
    let before = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    before
        .lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

type Module = Vec<String>;

/// The file modules of a crate's `src/` (binaries aside), by module path.
fn modules(krate: &Path) -> BTreeMap<Module, PathBuf> {
    let src = krate.join("src");
    let tests = test_only_files(krate);
    let mut out = BTreeMap::new();
    for f in rust_files(&src).into_iter().filter(|f| !tests.contains(f)) {
        let rel = f.strip_prefix(&src).unwrap().with_extension("");
        let mut path: Module = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if path[0] == "bin" || path == ["main"] && src.join("lib.rs").exists() {
            continue;
        }
        if matches!(
            path.last().map(String::as_str),
            Some("lib" | "main" | "mod")
        ) {
            path.pop();
        }
        out.insert(path, f);
    }
    out
}

/// The deepest file module that `path` names.
fn resolve(path: &[String], mods: &BTreeMap<Module, PathBuf>) -> Option<Module> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| mods.contains_key(p))
}

/// The file modules `module`'s code refers to.
fn references(module: &Module, code: &str, mods: &BTreeMap<Module, PathBuf>) -> BTreeSet<Module> {
    let absolute =
        Regex::new(r"\b(crate|super|self)((?:::\w+)+)(?:::\{([^{}]*)\})?").expect("regex");
    let relative = Regex::new(r"(?:^|[^:\w])(\w+)((?:::\w+)*)::").expect("regex");
    let mut out = BTreeSet::new();
    let mut add = |path: Vec<String>| {
        if let Some(r) = resolve(&path, mods) {
            if &r != module {
                out.insert(r);
            }
        }
    };
    for c in absolute.captures_iter(code) {
        let mut parts: Vec<String> = c[2]
            .split("::")
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect();
        let mut base: Vec<String> = match &c[1] {
            "crate" => Vec::new(),
            "self" => module.clone(),
            _ => module[..module.len().saturating_sub(1)].to_vec(),
        };
        if &c[1] == "super" {
            while parts.first().is_some_and(|p| p == "super") {
                base.pop();
                parts.remove(0);
            }
        }
        base.extend(parts);
        match c.get(3) {
            Some(group) => {
                for item in group.as_str().split(',') {
                    let first = item.trim().split("::").next().unwrap_or("").to_string();
                    let mut p = base.clone();
                    if !first.is_empty() && first != "self" && first != "*" {
                        p.push(first);
                    }
                    add(p);
                }
            }
            None => add(base),
        }
    }
    for c in relative.captures_iter(code) {
        let first = &c[1];
        if matches!(first, "crate" | "super" | "self" | "std" | "core" | "alloc") {
            continue;
        }
        let mut child = module.clone();
        child.push(first.to_string());
        if mods.contains_key(&child) {
            child.extend(c[2].split("::").filter(|p| !p.is_empty()).map(String::from));
            add(child);
        }
    }
    out
}

fn shown(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

#[test]
fn no_two_files_import_each_other() {
    let mut pairs = Vec::new();
    let mut checked = 0;
    for krate in crates() {
        let mods = modules(&krate);
        let graph: BTreeMap<&Module, BTreeSet<Module>> = mods
            .iter()
            .map(|(m, f)| {
                let text = std::fs::read_to_string(f).unwrap();
                (m, references(m, &code_part(&text), &mods))
            })
            .collect();
        for (a, refs) in &graph {
            checked += refs.len();
            for b in refs {
                if a < &b && graph.get(b).is_some_and(|r| r.contains(*a)) {
                    pairs.push(format!(
                        "{}: {} <-> {}",
                        krate.strip_prefix(root()).unwrap().display(),
                        shown(a),
                        shown(b)
                    ));
                }
            }
        }
    }
    assert!(
        checked > 100,
        "found only {checked} references: is the scan broken?"
    );
    assert!(
        pairs.is_empty(),
        "files that import each other (move what both need into a leaf module):\n{}",
        pairs.join("\n")
    );
}

#[test]
fn the_scan_finds_a_pair_that_imports_each_other() {
    let dir = std::env::temp_dir().join(format!("godwit-structure-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("src/a")).unwrap();
    std::fs::write(dir.join("src/lib.rs"), "mod a;\nmod b;\n").unwrap();
    std::fs::write(
        dir.join("src/a/mod.rs"),
        "use crate::b::B;\npub struct A;\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("src/b.rs"),
        "use crate::a::{A, self};\npub struct B;\n",
    )
    .unwrap();
    let mods = modules(&dir);
    let a = vec!["a".to_string()];
    let b = vec!["b".to_string()];
    let refs = |m: &Module| references(m, &std::fs::read_to_string(&mods[m]).unwrap(), &mods);
    assert!(refs(&a).contains(&b));
    assert!(refs(&b).contains(&a));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn migration_does_not_reach_into_the_vmm() {
    let dir = root().join("node-daemon/src/migration");
    let files = rust_files(&dir);
    assert!(!files.is_empty(), "{} has no files", dir.display());
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| std::fs::read_to_string(f).unwrap().contains("crate::vmm"))
        .map(|f| f.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "the migration engine must not use crate::vmm (the VMM calls the engine, not the other way): {offenders:?}"
    );
}

#[test]
fn no_source_file_is_over_900_lines_before_its_tests() {
    let mut long = Vec::new();
    for krate in crates() {
        let tests = test_only_files(&krate);
        for f in rust_files(&krate.join("src")) {
            if tests.contains(&f) {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap();
            let before = match text.find("#[cfg(test)]") {
                Some(i) => &text[..i],
                None => &text,
            };
            let n = before.lines().count();
            if n > 900 {
                long.push(format!(
                    "{} ({n})",
                    f.strip_prefix(root()).unwrap().display()
                ));
            }
        }
    }
    assert!(long.is_empty(), "split these files by concern: {long:?}");
}

#[test]
fn control_requests_are_built_by_the_control_crate_only() {
    let hand_built = Regex::new(r#"json!\(\s*\{\s*"v"\s*:|\["v"\]\s*=\s*json!\("#).unwrap();
    let control = root().join("node-daemon/control");
    let offenders: Vec<String> = rust_files(&root())
        .into_iter()
        .filter(|f| !f.starts_with(&control))
        .filter(|f| hand_built.is_match(&std::fs::read_to_string(f).unwrap()))
        .map(|f| f.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "use godwit_vmm_control::ControlClient instead of hand-built requests: {offenders:?}"
    );
}

/// `cargo tree -p PACKAGE -e normal,dev` (the packages a crate's tests build).
fn dev_tree(package: &str) -> String {
    tree(package, "normal,dev")
}

fn tree(package: &str, edges: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root())
        .args([
            "tree",
            "--offline",
            "-p",
            package,
            "-e",
            edges,
            "--prefix",
            "none",
        ])
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The API types build without a Kubernetes client: users who only need
/// the types (a controller of their own, a CLI) get no HTTP or TLS stack.
#[test]
fn the_crds_crate_builds_no_client() {
    let tree = tree("godwit-crds", "normal");
    assert!(tree.contains("kube-derive"), "{tree}");
    for krate in ["kube-client", "hyper ", "tokio ", "rustls ", "kube-runtime"] {
        assert!(!tree.contains(krate), "godwit-crds builds {krate}:\n{tree}");
    }
}

#[test]
fn the_operators_tests_build_no_vmm() {
    let tree = dev_tree("godwit-operator");
    assert!(tree.contains("godwit-apiserver"), "{tree}");
    for krate in [
        "kvm-ioctls",
        "kvm-bindings",
        "vm-memory",
        "godwit-node ",
        "godwit-e2e ",
    ] {
        assert!(
            !tree.contains(krate),
            "godwit-operator's tests build {krate}"
        );
    }
}

#[test]
fn the_node_daemons_tests_build_only_the_test_kit() {
    let tree = dev_tree("godwit-node");
    assert!(tree.contains("godwit-testkit"), "{tree}");
    for krate in ["godwit-e2e ", "godwit-apiserver "] {
        assert!(!tree.contains(krate), "godwit-node's tests build {krate}");
    }
}
