//! The test guest's FAT reader (`e2e/testguest/src/fat.rs`) and NoCloud seed
//! reader (`seed.rs`), compiled here for the host and run on volumes the real
//! tools make: `mkfs.fat` (dosfstools) formats FAT12, FAT16 and FAT32 with
//! the label `CIDATA`, `mcopy` (mtools) writes files with long names (one
//! spanning several clusters, so the FAT chain is followed), and the node
//! agent's own seed writer (`godwit_node::storage::write_seed`) makes the
//! seed the guest meets in a VM. What the reader returns must equal what the
//! tools wrote.

#![allow(dead_code)]

extern crate alloc;

#[path = "../testguest/src/cmdline.rs"]
mod cmdline;
#[path = "../testguest/src/fat.rs"]
mod fat;
#[path = "../testguest/src/seed.rs"]
mod seed;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use fat::{Fat, FatType, Sectors, SECTOR};
use godwit_node::storage::{self, NoCloudSeed, SeedNetwork};
use godwit_testkit::qemu::ScratchDir;

/// An image file as a sector device.
struct Image(File);

impl Sectors for Image {
    fn read(&mut self, lba: u64, buf: &mut [u8; SECTOR]) -> bool {
        self.0.read_exact_at(buf, lba * SECTOR as u64).is_ok()
    }
}

fn open(path: &Path) -> Image {
    Image(File::open(path).unwrap())
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}; install dosfstools and mtools"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Formats a `size_mib` image as FAT`bits` labelled `label` and copies
/// `files` into its root directory with mcopy.
fn mkfs(
    dir: &Path,
    bits: u32,
    size_mib: u64,
    label: &str,
    files: &[(&str, Vec<u8>)],
) -> std::path::PathBuf {
    let img = dir.join(format!("fat{bits}.img"));
    let f = File::create(&img).unwrap();
    f.set_len(size_mib << 20).unwrap();
    drop(f);
    let mut args = vec![
        "-F".to_string(),
        bits.to_string(),
        "-n".into(),
        label.into(),
    ];
    if bits == 32 {
        // Small FAT32 volumes need one sector per cluster to have enough clusters.
        args.extend(["-s".into(), "1".into()]);
    }
    args.push(img.display().to_string());
    run(
        "mkfs.fat",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    for (name, data) in files {
        let src = dir.join(format!("src-{name}"));
        std::fs::write(&src, data).unwrap();
        run(
            "mcopy",
            &[
                "-i",
                img.to_str().unwrap(),
                src.to_str().unwrap(),
                &format!("::{name}"),
            ],
        );
    }
    img
}

fn big_file() -> Vec<u8> {
    (0..40_000u32)
        .flat_map(|i| (i * 2_654_435_761).to_le_bytes())
        .collect()
}

#[test]
fn reads_label_and_long_names_on_fat12_16_32_made_by_mkfs_fat() {
    let dir = ScratchDir::new("guestfat").unwrap();
    let files = [
        (
            "meta-data",
            b"instance-id: i-1\nlocal-hostname: fat-host\n".to_vec(),
        ),
        ("a-rather-long-file-name.yaml", big_file()),
        ("SHORT.TXT", b"short".to_vec()),
        ("empty-file", Vec::new()),
    ];
    for (bits, size, kind) in [
        (12, 2, FatType::Fat12),
        (16, 32, FatType::Fat16),
        (32, 64, FatType::Fat32),
    ] {
        let img = mkfs(dir.path(), bits, size, "CIDATA", &files);
        let mut dev = open(&img);
        let fat = Fat::open(&mut dev).unwrap_or_else(|| panic!("FAT{bits} not recognised"));
        assert_eq!(fat.kind, kind);
        assert_eq!(fat.label(&mut dev), "CIDATA", "FAT{bits}");
        let names: Vec<String> = fat.entries(&mut dev).into_iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [
                "meta-data",
                "a-rather-long-file-name.yaml",
                "short.txt",
                "empty-file"
            ],
            "FAT{bits}"
        );
        for (name, data) in &files {
            let e = fat
                .find(&mut dev, name)
                .unwrap_or_else(|| panic!("FAT{bits}: {name} not found"));
            assert_eq!(&fat.read(&mut dev, &e).unwrap(), data, "FAT{bits}: {name}");
        }
        assert!(fat.find(&mut dev, "missing").is_none());
        let s = seed::read(&mut dev).unwrap();
        assert_eq!(s.hostname.as_deref(), Some("fat-host"));
    }
}

#[test]
fn a_volume_with_another_label_or_no_fat_is_no_seed() {
    let dir = ScratchDir::new("guestfat-other").unwrap();
    let img = mkfs(
        dir.path(),
        12,
        2,
        "DATA",
        &[("meta-data", b"local-hostname: x\n".to_vec())],
    );
    assert_eq!(seed::read(&mut open(&img)), None);
    let raw = dir.path().join("zeros.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    assert!(Fat::open(&mut open(&raw)).is_none());
    // A lower-case label is what cloud-localds writes: still a seed.
    let img = mkfs(
        dir.path(),
        16,
        32,
        "cidata",
        &[("meta-data", b"local-hostname: y\n".to_vec())],
    );
    let s = seed::read(&mut open(&img)).unwrap();
    assert_eq!(
        (s.label.as_str(), s.hostname.as_deref()),
        ("cidata", Some("y"))
    );
}

#[test]
fn reads_the_seed_the_node_agent_writes() {
    let dir = ScratchDir::new("guestfat-seed").unwrap();
    let seed = NoCloudSeed {
        instance_id: "uid-9".into(),
        hostname: "web-9".into(),
        ssh_authorized_keys: vec!["ssh-ed25519 AAAA k".into()],
        network: Some(SeedNetwork {
            mac: Some("52:54:00:AB:cd:09".into()),
            address: Some("10.9.0.5/16".into()),
            gateway: Some("10.9.0.1".into()),
            dns: vec!["10.9.0.2".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let img = dir.path().join("cidata.img");
    storage::write_seed(&seed, &img).unwrap();
    let s = seed::read(&mut open(&img)).unwrap();
    assert_eq!(s.label, "cidata");
    assert_eq!(s.files, ["meta-data", "user-data", "network-config"]);
    assert_eq!(s.hostname.as_deref(), Some("web-9"));
    let n = s.net.unwrap();
    assert_eq!(n.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0x09]));
    assert_eq!(n.address, Some(([10, 9, 0, 5], 16)));
    assert_eq!(n.gateway, Some([10, 9, 0, 1]));
    assert!(!n.dhcp4);
    assert!(n.matches([0x52, 0x54, 0, 0xab, 0xcd, 0x09]));
    assert!(!n.matches([0x52, 0x54, 0, 0xab, 0xcd, 0x0a]));
}

#[test]
fn network_config_subset() {
    // The shapes people write by hand: a `network:` wrapper, `gateway4`,
    // list items at the key's indentation, comments, a second ethernet.
    let text = "# written by hand\nnetwork:\n  version: 2\n  ethernets:\n    eth0:\n      match:\n        macaddress: 52:54:00:00:00:01 # the NIC\n      addresses:\n      - 192.168.1.10/24\n      - 192.168.1.11/24\n      gateway4: 192.168.1.1\n      nameservers:\n        addresses: [1.1.1.1]\n    eth1:\n      addresses:\n        - 172.16.0.2/24\n";
    let n = seed::network(text).unwrap();
    assert_eq!(n.mac, Some([0x52, 0x54, 0, 0, 0, 1]));
    assert_eq!(n.address, Some(([192, 168, 1, 10], 24)));
    assert_eq!(n.gateway, Some([192, 168, 1, 1]));
    let dhcp = seed::network("version: 2\nethernets:\n  any:\n    dhcp4: true\n").unwrap();
    assert!(dhcp.dhcp4 && dhcp.mac.is_none() && dhcp.address.is_none());
    // Version 1 is not what this reader understands.
    assert_eq!(seed::network("version: 1\nconfig: []\n"), None);
    // A non-default route's via is no gateway.
    let r = seed::network("version: 2\nethernets:\n  e:\n    addresses: [\"10.0.0.2/24\"]\n    routes:\n      - to: 10.1.0.0/16\n        via: 10.0.0.9\n").unwrap();
    assert_eq!(r.gateway, None);
    assert_eq!(
        seed::meta_hostname("instance-id: 'x'\nlocal-hostname: 'h-1'\n").as_deref(),
        Some("h-1")
    );
}
