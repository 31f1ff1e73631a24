//! The cloud-init NoCloud seed checked by the tools that judge it outside
//! Godwit: `fsck.fat` finds the FAT clean, mtools (`minfo`, `mlabel`,
//! `mdir`, `mcopy`) read the label `CIDATA` and every file back as meant,
//! Debian's cloud-init (22.4) accepts the generated `user-data`
//! (`cloud-init schema`) and converts the `network-config` into networkd
//! and netplan files that say the address, gateway, name servers and MAC.
//! The same seed gives the same bytes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::Scratch;
use godwit_node::storage::{self, NoCloudSeed, SeedNetwork};

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {cmd}: {e}; install dosfstools, mtools and cloud-init")
        })
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed: {text}");
    text
}

fn seeds() -> Vec<(&'static str, NoCloudSeed)> {
    let keys = vec![
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGodwitTestKeyOne alice@laptop".to_string(),
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCgodwit bob@desk".to_string(),
    ];
    vec![
        (
            "static",
            NoCloudSeed {
                instance_id: "6f1c2a4e-0b5c-4d1e-9a77-2f0d6b1c3e11".into(),
                hostname: "web-1".into(),
                user_data: None,
                ssh_authorized_keys: keys.clone(),
                network: Some(SeedNetwork {
                    mac: Some("52:54:00:12:34:56".into()),
                    dhcp: false,
                    address: Some("10.0.0.5/24".into()),
                    gateway: Some("10.0.0.1".into()),
                    dns: vec!["10.0.0.2".into(), "10.0.0.3".into()],
                }),
            },
        ),
        (
            "dhcp-cloud-config",
            NoCloudSeed {
                instance_id: "uid-2".into(),
                hostname: "db".into(),
                user_data: Some(
                    b"#cloud-config\npackages: [postgresql]\nruncmd:\n  - [touch, /run/seeded]\n"
                        .to_vec(),
                ),
                ssh_authorized_keys: keys[..1].to_vec(),
                network: Some(SeedNetwork {
                    mac: Some("52:54:00:aa:bb:cc".into()),
                    dhcp: true,
                    ..Default::default()
                }),
            },
        ),
        (
            "script",
            NoCloudSeed {
                instance_id: "uid-3".into(),
                hostname: "batch-7".into(),
                user_data: Some(b"#!/bin/sh\necho seeded > /run/seeded\n".to_vec()),
                ..Default::default()
            },
        ),
        (
            "minimal",
            NoCloudSeed {
                instance_id: "uid-4".into(),
                hostname: "a".into(),
                ..Default::default()
            },
        ),
    ]
}

fn image(dir: &Scratch, name: &str, seed: &NoCloudSeed) -> PathBuf {
    let path = dir.path(&format!("{name}.img"));
    storage::write_seed(seed, &path).unwrap();
    path
}

/// The files of `img`, as `mdir` lists them (long names).
fn listed(img: &Path) -> Vec<String> {
    let text = ok("mdir", &["-b", "-i", img.to_str().unwrap(), "::"]);
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("::/"))
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

#[test]
fn fsck_and_mtools_read_the_seed_as_written() {
    let dir = Scratch::new("nocloud-mtools");
    for (name, seed) in seeds() {
        let img = image(&dir, name, &seed);
        let i = img.to_str().unwrap();
        let fsck = ok("fsck.fat", &["-n", "-v", i]);
        assert!(!fsck.contains("Dirty bit"), "{name}: {fsck}");
        let label = ok("mlabel", &["-s", "-i", i, "::"]);
        assert!(label.contains("Volume label is CIDATA"), "{name}: {label}");
        let info = ok("minfo", &["-i", i, "::"]);
        assert!(
            info.contains("disk label=\"CIDATA     \""),
            "{name}: {info}"
        );
        // The fixed volume id: the same seed is the same bytes everywhere.
        assert!(info.contains("serial number: 67647769"), "{name}: {info}");
        let mut expected: Vec<String> = seed.files().iter().map(|(n, _)| n.to_string()).collect();
        expected.sort();
        assert_eq!(listed(&img), expected, "{name}");
        for (file, want) in seed.files() {
            let out = dir.path(&format!("{name}.{file}"));
            ok(
                "mcopy",
                &["-n", "-i", i, &format!("::{file}"), out.to_str().unwrap()],
            );
            assert_eq!(std::fs::read(&out).unwrap(), want, "{name}: {file}");
        }
    }
}

#[test]
fn the_files_say_what_the_customization_says() {
    let all = seeds();
    let (_, s) = &all[0];
    let files = s.files();
    let meta = String::from_utf8(files[0].1.clone()).unwrap();
    assert!(
        meta.contains("instance-id: \"6f1c2a4e-0b5c-4d1e-9a77-2f0d6b1c3e11\"\n"),
        "{meta}"
    );
    assert!(meta.contains("local-hostname: \"web-1\"\n"), "{meta}");
    assert!(meta.contains("  - \"ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCgodwit bob@desk\"\n"));
    // The user's user-data stays as given (keys go through meta-data).
    let (_, script) = &all[2];
    assert_eq!(
        script.files()[1].1,
        b"#!/bin/sh\necho seeded > /run/seeded\n"
    );
    assert!(script.network_config().is_none());
    let (_, cc) = &all[1];
    assert!(cc.meta_data().contains("public-keys:\n  - \"ssh-ed25519"));
}

#[test]
fn cloud_init_accepts_the_user_data() {
    let dir = Scratch::new("nocloud-schema");
    for (name, seed) in seeds() {
        let ud = seed.user_data();
        if !ud.starts_with(b"#cloud-config") {
            continue;
        }
        let path = dir.path(&format!("{name}.user-data"));
        std::fs::write(&path, &ud).unwrap();
        let text = ok(
            "cloud-init",
            &["schema", "--config-file", path.to_str().unwrap()],
        );
        assert!(text.contains("Valid cloud-config"), "{name}: {text}");
    }
    // The oracle can say no: a config with a wrongly typed key fails.
    let bad = dir.path("bad.user-data");
    std::fs::write(&bad, "#cloud-config\nssh_authorized_keys: 5\n").unwrap();
    let out = run(
        "cloud-init",
        &["schema", "--config-file", bad.to_str().unwrap()],
    );
    assert!(!out.status.success(), "cloud-init accepted a bad config");
}

#[test]
fn cloud_init_converts_the_network_config() {
    let dir = Scratch::new("nocloud-net");
    let all = seeds();
    // Static address: networkd says address, gateway, DNS, matched by MAC.
    let (_, s) = &all[0];
    let nc = dir.path("static.network-config");
    std::fs::write(&nc, s.network_config().unwrap()).unwrap();
    let out = dir.path("static-networkd");
    ok(
        "cloud-init",
        &[
            "devel",
            "net-convert",
            "-p",
            nc.to_str().unwrap(),
            "-k",
            "yaml",
            "-d",
            out.to_str().unwrap(),
            "-D",
            "debian",
            "-O",
            "networkd",
        ],
    );
    let units = out.join("etc/systemd/network");
    let text: String = std::fs::read_dir(&units)
        .unwrap_or_else(|e| panic!("{}: {e}", units.display()))
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    for want in [
        "MACAddress=52:54:00:12:34:56",
        "Address=10.0.0.5/24",
        "Gateway=10.0.0.1",
        "DNS=10.0.0.2 10.0.0.3",
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
    // DHCP, rendered as netplan.
    let (_, d) = &all[1];
    let nc = dir.path("dhcp.network-config");
    std::fs::write(&nc, d.network_config().unwrap()).unwrap();
    let out = dir.path("dhcp-netplan");
    ok(
        "cloud-init",
        &[
            "devel",
            "net-convert",
            "-p",
            nc.to_str().unwrap(),
            "-k",
            "yaml",
            "-d",
            out.to_str().unwrap(),
            "-D",
            "ubuntu",
            "-O",
            "netplan",
        ],
    );
    let plan = std::fs::read_to_string(out.join("etc/netplan/50-cloud-init.yaml")).unwrap();
    assert!(plan.contains("dhcp4: true"), "{plan}");
    assert!(plan.contains("macaddress: 52:54:00:aa:bb:cc"), "{plan}");
}

#[test]
fn the_same_seed_gives_the_same_bytes() {
    let dir = Scratch::new("nocloud-same");
    for (name, seed) in seeds() {
        let a = image(&dir, &format!("{name}-a"), &seed);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let b = image(&dir, &format!("{name}-b"), &seed.clone());
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{name}: rebuilt seed differs"
        );
    }
    let mut other = seeds()[0].1.clone();
    other.hostname = "web-2".into();
    assert_ne!(other.image().unwrap(), seeds()[0].1.image().unwrap());
}
