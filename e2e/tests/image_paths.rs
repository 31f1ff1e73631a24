//! The tenant boundary on disks and boot files, on one node of a local
//! cluster with the operator and the node agent: a VM names files only in
//! the node's image directories (the agent's `--image-dir`; here
//! `<cluster>/images-root/{images,kernels}`, as `/var/lib/godwit/{images,
//! kernels}` on a real node).
//!
//! - `..` and the node's system directories are refused at admission by the
//!   CRD's CEL rules (`kubectl apply` says why);
//! - a VM whose initrd is the node's migration key, whose disk is another VM's
//!   disk, or either through a symlink planted in an image directory, gets
//!   Ready False with reason `ImagePathRefused`, phase Failed and an Event,
//!   and no VMM starts;
//! - the same VM naming allowed files runs;
//! - a `ClusterVMTemplate` may name files outside the image directories
//!   (only cluster administrators make one): a VM from it runs, while a
//!   namespaced `VMTemplate` naming the same files is refused, and so are
//!   they once the `ClusterVMTemplate` is deleted (the node learns the paths
//!   from the API server, not from the VM).
//!
//! Needs the release binaries (`cargo build --release -p godwit-node
//! -p godwit-operator --bins`, as e2e/test.sh does), the test guest
//! (e2e/testguest/build.sh) and /dev/kvm.

use std::time::Duration;

use godwit_e2e::driver::ClusterDriver;
use serde_json::Value;

/// A VM of the test guest with `initrd` and a data disk at `disk`.
fn vm(g: &ClusterDriver, name: &str, initrd: &str, disk: &str) -> String {
    g.example(&format!(
        r#"apiVersion: godwit.dev/v1alpha1
kind: VirtualMachine
metadata:
  name: {name}
  namespace: default
spec:
  cpu: 1
  memory: 128Mi
  runStrategy: Manual
  boot:
    kernel: /var/lib/godwit/kernels/godwit-testguest.elf
    initrd: {initrd}
    cmdline: hb_ms=50
  disks:
    - name: data
      source:
        image:
          path: {disk}
"#
    ))
}

fn ready(vm: &Value) -> Option<&Value> {
    vm["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
}

/// Waits for `name` to fail with `ImagePathRefused`, and checks what it says
/// (`says`), its Event, and that no VMM was started for it.
fn refused(g: &ClusterDriver, name: &str, says: &str) {
    let vm = g
        .wait(&format!("{name} refused"), Duration::from_secs(60), || {
            let vm = g.get("gvm", name)?;
            Ok(vm.filter(|v| ready(v).is_some_and(|c| c["reason"] == "ImagePathRefused")))
        })
        .unwrap_or_else(|e| {
            let vm = g.kubectl(&["get", "gvm", name, "-o", "json"], None);
            panic!("{e:#}\nthe VM: {vm:?}")
        });
    let c = ready(&vm).unwrap();
    assert_eq!(c["status"], "False", "{c}");
    let message = c["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{name}: {message}");
    assert_eq!(vm["status"]["phase"], "Failed", "{vm}");
    assert!(
        !g.vm_dir(0, "default", name).join("pid").exists(),
        "{name}: a VMM was started"
    );
    g.wait(
        &format!("the ImagePathRefused Event of {name}"),
        Duration::from_secs(20),
        || {
            let events = g.kubectl(
                &[
                    "get",
                    "events",
                    "--field-selector",
                    &format!("involvedObject.name={name}"),
                ],
                None,
            )?;
            Ok((events.contains("ImagePathRefused") && events.contains("Warning")).then_some(()))
        },
    )
    .unwrap();
}

#[test]
fn vms_name_files_only_in_the_image_directories() {
    let dir = std::env::temp_dir().join(format!("godwit-imagepaths-{}", std::process::id()));
    let g = ClusterDriver::up(1, &dir).expect("local cluster with Godwit");
    let [images, kernels] = g.cluster.image_dirs();
    let initrd = kernels.join("initrd.img");
    std::fs::write(&initrd, vec![0x5a; 4096]).unwrap();
    let data = images.join("data.raw");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let s = |p: &std::path::Path| p.display().to_string();

    // Admission refuses the obvious forms at once.
    let dotdot = vm(
        &g,
        "dotdot",
        &format!("{}/../../ca/ca.key", s(&kernels)),
        &s(&data),
    );
    let e = g.apply(&dotdot).expect_err("`..` must be refused");
    assert!(format!("{e:#}").contains("without `.`, `..`"), "{e:#}");
    let shadow = vm(&g, "shadow", &s(&initrd), "/etc/shadow");
    let e = g.apply(&shadow).expect_err("/etc/shadow must be refused");
    assert!(format!("{e:#}").contains("system directory"), "{e:#}");

    // The allowed files: the VM runs (with a disk of its own too).
    let allowed = vm(&g, "allowed", &s(&initrd), &s(&data)).replace(
        "  disks:\n",
        "  disks:\n    - name: scratch\n      source:\n        blank:\n          size: 1Mi\n",
    );
    g.apply(&allowed).unwrap();
    g.wait_running("allowed", Duration::from_secs(60)).unwrap();

    // The node refuses the rest, and says why.
    // The node's migration key (no node holds the CA key any more).
    let node_key = g.cluster.node_state_dir(0).join("tls/node.key");
    assert!(node_key.exists(), "{}", node_key.display());
    g.apply(&vm(&g, "ca-initrd", &s(&node_key), &s(&data)))
        .unwrap();
    refused(
        &g,
        "ca-initrd",
        "not under any of the node's image directories",
    );

    let other = g.vm_dir(0, "default", "allowed").join("disks/scratch.raw");
    assert!(other.exists(), "{}", other.display());
    g.apply(&vm(&g, "other-vm", &s(&initrd), &s(&other)))
        .unwrap();
    refused(
        &g,
        "other-vm",
        "not under any of the node's image directories",
    );

    std::os::unix::fs::symlink(&node_key, images.join("planted.img")).unwrap();
    g.apply(&vm(
        &g,
        "planted",
        &s(&images.join("planted.img")),
        &s(&data),
    ))
    .unwrap();
    refused(&g, "planted", "symbolic link");

    // A ClusterVMTemplate names an image and an initrd outside the image
    // directories: a VM from it runs. A VMTemplate naming the same files is
    // refused.
    let admin = dir.join("admin-images");
    std::fs::create_dir_all(&admin).unwrap();
    let (golden, admin_initrd) = (admin.join("golden.raw"), admin.join("initrd.img"));
    std::fs::File::create(&golden)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::fs::write(&admin_initrd, vec![0x5a; 4096]).unwrap();
    let template = |kind: &str, name: &str| {
        let ns = if kind == "VMTemplate" {
            "\n  namespace: default"
        } else {
            ""
        };
        g.example(&format!(
            r#"apiVersion: godwit.dev/v1alpha1
kind: {kind}
metadata:
  name: {name}{ns}
spec:
  image:
    source: {}
  cpu: 1
  memory: 128Mi
  boot:
    kernel: /var/lib/godwit/kernels/godwit-testguest.elf
    initrd: {}
    cmdline: hb_ms=50
"#,
            s(&golden),
            s(&admin_initrd)
        ))
    };
    let from = |name: &str, kind: &str, template: &str| {
        format!(
            r#"apiVersion: godwit.dev/v1alpha1
kind: VirtualMachine
metadata:
  name: {name}
  namespace: default
spec:
  runStrategy: Manual
  templateRef:
    kind: {kind}
    name: {template}
  disks:
    - name: root
      source:
        template: {{}}
"#
        )
    };
    g.apply(&template("ClusterVMTemplate", "golden")).unwrap();
    g.apply(&from("from-cluster", "ClusterVMTemplate", "golden"))
        .unwrap();
    g.wait_running("from-cluster", Duration::from_secs(60))
        .unwrap();
    // Its root disk is a copy of the template's image, which the node
    // caches; the operator writes the ClusterVMTemplate's status from the
    // node's cache report, as for a VMTemplate.
    g.wait("golden Ready", Duration::from_secs(60), || {
        let t = g.get("gcvmt", "golden")?;
        Ok(t.filter(|t| {
            t["status"]["imageDigest"]
                .as_str()
                .is_some_and(|d| d.starts_with("sha256:"))
                && t["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
        }))
    })
    .unwrap_or_else(|e| {
        let t = g.kubectl(&["get", "gcvmt", "golden", "-o", "json"], None);
        panic!("{e:#}\nthe template: {t:?}")
    });
    g.apply(&template("VMTemplate", "copied")).unwrap();
    g.apply(&from("from-namespaced", "VMTemplate", "copied"))
        .unwrap();
    refused(
        &g,
        "from-namespaced",
        "not under any of the node's image directories",
    );
    // The node learns the paths from the API server: once the
    // ClusterVMTemplate is gone, its initrd is refused like any other file.
    g.kubectl(&["delete", "gcvmt", "golden"], None).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    g.apply(&vm(&g, "after-delete", &s(&admin_initrd), &s(&data)))
        .unwrap();
    refused(&g, "after-delete", "boot.initrd");
}
