//! `boot: {fromImage: {}}` on a local cluster: a template whose image (a GPT
//! disk built with `sfdisk` and `mkfs.ext4 -d`) holds the test guest ELF as
//! the newest `/boot/vmlinuz-<version>` boots and beats, with
//! `root=UUID=<blkid's UUID>` first on its command line; a template whose
//! image has no `/boot` leaves its VM Failed with a `BootImageInvalid`
//! condition and Event, and no VMM; and the API server refuses a boot with
//! both a kernel and fromImage (CEL).
//!
//! Needs the release binaries (as e2e/test.sh builds them), /dev/kvm and
//! e2fsprogs, fdisk (e2e/install-deps.sh).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use godwit_e2e::driver::ClusterDriver;
use godwit_testkit::guest::{guest_elf, parse_heartbeat};

const MIB: u64 = 1 << 20;

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program} (e2e/install-deps.sh): {e}"));
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A GPT disk at `disk` whose one partition (from 1 MiB) is an ext4
/// filesystem holding `tree`; returns the filesystem's UUID as `blkid`
/// reads it in the disk.
fn gpt_disk(disk: &Path, tree: &Path) -> String {
    let fs = disk.with_extension("fs");
    let fs_mib = 32;
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            &tree.display().to_string(),
            &fs.display().to_string(),
            &format!("{fs_mib}M"),
        ],
        None,
    );
    let f = std::fs::File::create(disk).unwrap();
    f.set_len((fs_mib + 2) * MIB).unwrap();
    run(
        "sfdisk",
        &["-q", &disk.display().to_string()],
        Some(&format!(
            "label: gpt\nstart=2048, size={}, type=linux\n",
            fs_mib * MIB / 512
        )),
    );
    f.write_all_at(&std::fs::read(&fs).unwrap(), MIB).unwrap();
    std::fs::remove_file(&fs).unwrap();
    run(
        "blkid",
        &[
            "-p",
            "-O",
            &MIB.to_string(),
            "-S",
            &(fs_mib * MIB).to_string(),
            "-s",
            "UUID",
            "-o",
            "value",
            &disk.display().to_string(),
        ],
        None,
    )
}

fn manifest(name: &str, image: &Path, run_strategy: &str) -> String {
    format!(
        r#"apiVersion: godwit.dev/v1alpha1
kind: VMTemplate
metadata:
  name: {name}
  namespace: default
spec:
  image:
    source: {image}
    format: raw
  boot:
    fromImage: {{}}
    cmdline: hb_ms=50
  cpu: 1
  memory: 128Mi
---
apiVersion: godwit.dev/v1alpha1
kind: VirtualMachine
metadata:
  name: {name}
  namespace: default
spec:
  templateRef:
    name: {name}
  disks:
    - name: root
      source:
        template: {{}}
  runStrategy: {run_strategy}
"#,
        image = image.display()
    )
}

fn node_index_of(g: &ClusterDriver, vm: &str) -> usize {
    let v = g.get("gvm", vm).unwrap().unwrap();
    let node = v["metadata"]["labels"]["godwit.dev/node"]
        .as_str()
        .or(v["status"]["nodeName"].as_str())
        .expect("the VM is placed")
        .to_string();
    g.node_index(&node).unwrap()
}

#[test]
fn templates_boot_their_images_kernel_or_say_what_is_missing() {
    let dir = std::env::temp_dir().join(format!("godwit-fromimage-{}", std::process::id()));
    let g = ClusterDriver::up(1, &dir).expect("local cluster with Godwit");
    // Inside the node's image directory ([`LocalCluster::image_dirs`]).
    let work = dir.join("images-root/images/fromimage");

    // The good image: the test guest is the newest kernel by version
    // (0.10.0 > 0.9.0; string order says otherwise, and 0.9.0 is no kernel).
    let tree = work.join("good-tree");
    std::fs::create_dir_all(tree.join("boot")).unwrap();
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/fstab"), "# root\n").unwrap();
    std::fs::copy(
        guest_elf().unwrap(),
        tree.join("boot/vmlinuz-0.10.0-godwit"),
    )
    .unwrap();
    std::fs::write(tree.join("boot/vmlinuz-0.9.0-godwit"), b"not a kernel").unwrap();
    let good = work.join("good.raw");
    let uuid = gpt_disk(&good, &tree);
    assert_eq!(uuid.len(), 36, "blkid: {uuid:?}");

    // The bad image: a root filesystem without /boot.
    let bare = work.join("bare-tree");
    std::fs::create_dir_all(bare.join("etc")).unwrap();
    std::fs::write(bare.join("etc/fstab"), "# root\n").unwrap();
    let bad = work.join("no-boot.raw");
    gpt_disk(&bad, &bare);

    // kernel and fromImage together: refused by the API server's CEL rule.
    let both = manifest("both", &good, "Always").replace(
        "    fromImage: {}\n",
        "    fromImage: {}\n    kernel: /var/lib/godwit/kernels/godwit-testguest.elf\n",
    );
    let refused = g
        .apply(&both)
        .expect_err("kernel and fromImage together must be refused");
    assert!(
        format!("{refused:#}").contains("set exactly one of boot.kernel and boot.fromImage"),
        "{refused:#}"
    );

    // The good template boots the guest from its image's /boot.
    g.apply(&manifest("from-image", &good, "Always")).unwrap();
    g.wait_running("from-image", Duration::from_secs(90))
        .unwrap();
    let vm_dir = g.vm_dir(node_index_of(&g, "from-image"), "default", "from-image");
    let console = || std::fs::read_to_string(vm_dir.join("console.log")).unwrap_or_default();
    g.wait(
        "heartbeats of the guest booted from its image",
        Duration::from_secs(30),
        || {
            Ok((console()
                .lines()
                .filter(|l| parse_heartbeat(l.trim_end()).is_some())
                .count()
                >= 3)
                .then_some(()))
        },
    )
    .unwrap();
    let text = console();
    let cmdline = text
        .lines()
        .find_map(|l| l.strip_prefix("CMDLINE "))
        .unwrap_or_else(|| panic!("no CMDLINE line on the console: {text}"));
    assert!(
        cmdline.starts_with(&format!("root=UUID={uuid} hb_ms=50")),
        "the command line starts with the root UUID blkid reads ({uuid}): {cmdline}"
    );

    // The node cached the template's image: the operator's status says so
    // (`kubectl get gvmt`: Ready and the digest), from the agent's report.
    let node = g.get("gvm", "from-image").unwrap().unwrap()["status"]["nodeName"]
        .as_str()
        .unwrap()
        .to_string();
    let t = g
        .wait(
            "the template's status to show it cached",
            Duration::from_secs(30),
            || {
                let t = g.get("gvmt", "from-image")?;
                Ok(t.filter(|t| t["status"]["imageDigest"].is_string()))
            },
        )
        .unwrap();
    let digest = t["status"]["imageDigest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{t}");
    assert_eq!(t["status"]["cachedNodes"][0], node.as_str(), "{t}");
    let table = g
        .kubectl(&["get", "gvmt", "from-image", "--no-headers"], None)
        .unwrap();
    let row: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(row[1], "True", "{table}");
    assert!(row.contains(&digest.as_str()), "{table}");

    // The template without /boot: BootImageInvalid, an Event, no VMM.
    g.apply(&manifest("no-boot", &bad, "Manual")).unwrap();
    let vm = g
        .wait("the no-boot VM to fail", Duration::from_secs(60), || {
            let vm = g.get("gvm", "no-boot")?;
            Ok(vm.filter(|v| {
                v["status"]["conditions"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["reason"] == "BootImageInvalid"))
            }))
        })
        .unwrap_or_else(|e| {
            // What the VM and its events said instead (the flake seen once).
            let vm = g.kubectl(&["get", "gvm", "no-boot", "-o", "json"], None);
            let events = g.kubectl(
                &[
                    "get",
                    "events",
                    "--field-selector",
                    "involvedObject.name=no-boot",
                ],
                None,
            );
            panic!("{e:#}\nthe VM: {vm:?}\nits events: {events:?}")
        });
    let ready = vm["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(ready["status"], "False", "{ready}");
    assert_eq!(ready["reason"], "BootImageInvalid", "{ready}");
    let message = ready["message"].as_str().unwrap();
    assert!(message.contains("has no /boot"), "{message}");
    assert!(message.contains(&bad.display().to_string()), "{message}");
    assert_eq!(vm["status"]["phase"], "Failed", "{vm}");
    let no_boot_dir = g.vm_dir(node_index_of(&g, "no-boot"), "default", "no-boot");
    assert!(
        !no_boot_dir.join("pid").exists(),
        "a VMM was started for an image without /boot"
    );
    let events = g
        .wait(
            "the BootImageInvalid event",
            Duration::from_secs(20),
            || {
                let events = g.kubectl(
                    &[
                        "get",
                        "events",
                        "--field-selector",
                        "involvedObject.name=no-boot",
                    ],
                    None,
                )?;
                Ok(events.contains("BootImageInvalid").then_some(events))
            },
        )
        .unwrap();
    assert!(events.contains("Warning"), "{events}");
}
