//! The cloud-init NoCloud seed: a small vfat image labelled `CIDATA` that
//! carries a VM's first-boot customization to the guest, in the format every
//! cloud image's cloud-init reads (its `NoCloud` datasource looks for a
//! file system labelled `cidata`, in either case).
//!
//! # Contents
//!
//! | file | what | when |
//! | --- | --- | --- |
//! | `meta-data` | YAML: `instance-id`, `local-hostname`, `public-keys` (the SSH keys) | always |
//! | `user-data` | the user's user-data, byte for byte; without one, a `#cloud-config` with `hostname` and `ssh_authorized_keys` | always |
//! | `network-config` | network config version 2: one ethernet matched by the first NIC's MAC, `dhcp4: true` or a static address, default route and name servers | when the customization has `network` |
//!
//! SSH keys and the user's own user-data: the user-data is never rewritten
//! (it may be a shell script, a MIME multi-part or gzip), so the keys go in
//! `meta-data`'s `public-keys`, which cloud-init's `ssh` module installs for
//! the default user together with any `ssh_authorized_keys` of the user's
//! `#cloud-config` (unless that config sets `allow_public_ssh_keys: false`).
//! Without user-data, the generated `#cloud-config` carries them too.
//!
//! Strings are written as double-quoted JSON strings, which YAML reads as
//! the same strings, so no value can break the YAML around it.
//!
//! # Determinism
//!
//! The same [`NoCloudSeed`] gives the same bytes on every node and at every
//! time: a fixed volume id ([`SEED_VOLUME_ID`]), every timestamp 1980-01-01
//! 00:00 (the FAT epoch), files written in a fixed order, an image size that
//! depends on the contents only. A live migration's target therefore
//! rebuilds the seed identically instead of receiving it (the disk is
//! read-only, so nothing in it changes while the VM runs).

use std::io::{Cursor, Write};
use std::net::Ipv4Addr;
use std::path::Path;

use fatfs::{Date, DateTime, FileSystem, FormatVolumeOptions, FsOptions, Time, TimeProvider};

use super::{io_error, StorageError};

/// The volume label cloud-init looks for (it matches `cidata` and `CIDATA`;
/// FAT labels are upper case by convention).
pub const SEED_LABEL: &[u8; 11] = b"CIDATA     ";
/// The FAT volume id (serial number) of every seed, fixed so that the image
/// bytes depend on the contents only.
pub const SEED_VOLUME_ID: u32 = 0x6764_7769; // "gdwi"
/// The smallest seed image.
const MIN_IMAGE: u64 = 1 << 20;
/// The largest user-data a seed takes (the most a Secret holds).
pub const MAX_USER_DATA: usize = 1 << 20;

/// What a seed says: the resolved customization of one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NoCloudSeed {
    /// `instance-id` (the VM's uid).
    pub instance_id: String,
    /// `local-hostname`: an RFC 1123 label.
    pub hostname: String,
    /// The user's user-data (inline or from a Secret), used verbatim.
    pub user_data: Option<Vec<u8>>,
    /// SSH public keys, one OpenSSH line each.
    pub ssh_authorized_keys: Vec<String>,
    /// The first NIC's address configuration.
    pub network: Option<SeedNetwork>,
}

/// The address configuration of one NIC.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeedNetwork {
    /// The NIC's MAC, which the `match` of the network config names; `None`
    /// matches any interface whose name starts with `e`.
    pub mac: Option<String>,
    /// Ask for an address by DHCP.
    pub dhcp: bool,
    /// Static IPv4 address in CIDR form.
    pub address: Option<String>,
    /// Default gateway.
    pub gateway: Option<String>,
    /// Name servers.
    pub dns: Vec<String>,
}

/// Every timestamp in a seed: 1980-01-01 00:00:00, the FAT epoch.
#[derive(Debug)]
struct FixedTime;

const FAT_EPOCH: Date = Date {
    year: 1980,
    month: 1,
    day: 1,
};

impl TimeProvider for FixedTime {
    fn get_current_date(&self) -> Date {
        FAT_EPOCH
    }
    fn get_current_date_time(&self) -> DateTime {
        DateTime {
            date: FAT_EPOCH,
            time: Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

static FIXED_TIME: FixedTime = FixedTime;

fn bad(what: String) -> StorageError {
    StorageError::Customization(what)
}

/// A YAML scalar: a double-quoted JSON string, which YAML reads unchanged.
fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn check_label(hostname: &str) -> Result<(), StorageError> {
    let ok = !hostname.is_empty()
        && hostname.len() <= 63
        && hostname
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !hostname.starts_with('-')
        && !hostname.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "hostname {hostname:?} is not a lower-case RFC 1123 label; fix customization.hostname"
        )))
    }
}

fn check_ipv4(field: &str, value: &str) -> Result<(), StorageError> {
    value.parse::<Ipv4Addr>().map(|_| ()).map_err(|_| {
        bad(format!(
            "customization.network.{field} {value:?} is not an IPv4 address"
        ))
    })
}

fn check_cidr(value: &str) -> Result<(), StorageError> {
    let ok = value.split_once('/').is_some_and(|(ip, len)| {
        ip.parse::<Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32)
    });
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "customization.network.address {value:?} is not an IPv4 address in CIDR form (10.0.0.5/24)"
        )))
    }
}

impl NoCloudSeed {
    /// Refuses what would make a seed cloud-init misreads.
    pub fn validate(&self) -> Result<(), StorageError> {
        if self.instance_id.is_empty() || self.instance_id.chars().any(char::is_control) {
            return Err(bad(format!(
                "instance-id {:?} must be non-empty text",
                self.instance_id
            )));
        }
        check_label(&self.hostname)?;
        for key in &self.ssh_authorized_keys {
            if key.trim().is_empty() || key.contains(['\n', '\r']) {
                return Err(bad(format!(
                    "SSH key {key:?} must be one non-empty line; fix customization.sshAuthorizedKeys"
                )));
            }
        }
        if let Some(ud) = &self.user_data {
            if ud.len() > MAX_USER_DATA {
                return Err(bad(format!(
                    "user-data is {} bytes, more than {MAX_USER_DATA}",
                    ud.len()
                )));
            }
        }
        if let Some(n) = &self.network {
            match (&n.address, n.dhcp) {
                (Some(a), false) => check_cidr(a)?,
                (None, true) => {}
                _ => {
                    return Err(bad(
                        "customization.network: set either dhcp: true or a static address".into(),
                    ))
                }
            }
            if let Some(gw) = &n.gateway {
                check_ipv4("gateway", gw)?;
            }
            for d in &n.dns {
                check_ipv4("dns", d)?;
            }
            if let Some(mac) = &n.mac {
                let ok = mac.len() == 17
                    && mac.split(':').count() == 6
                    && mac
                        .split(':')
                        .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok());
                if !ok {
                    return Err(bad(format!("MAC {mac:?} is not aa:bb:cc:dd:ee:ff")));
                }
            }
        }
        Ok(())
    }

    /// The `meta-data` file.
    pub fn meta_data(&self) -> String {
        let mut s = format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            quoted(&self.instance_id),
            quoted(&self.hostname)
        );
        if !self.ssh_authorized_keys.is_empty() {
            s.push_str("public-keys:\n");
            for k in &self.ssh_authorized_keys {
                s.push_str(&format!("  - {}\n", quoted(k.trim())));
            }
        }
        s
    }

    /// The `user-data` file: the user's, or a generated `#cloud-config`.
    pub fn user_data(&self) -> Vec<u8> {
        if let Some(ud) = &self.user_data {
            return ud.clone();
        }
        let mut s = format!("#cloud-config\nhostname: {}\n", quoted(&self.hostname));
        if !self.ssh_authorized_keys.is_empty() {
            s.push_str("ssh_authorized_keys:\n");
            for k in &self.ssh_authorized_keys {
                s.push_str(&format!("  - {}\n", quoted(k.trim())));
            }
        }
        s.into_bytes()
    }

    /// The `network-config` file (version 2), when the seed configures the
    /// network.
    pub fn network_config(&self) -> Option<String> {
        let n = self.network.as_ref()?;
        let mut s = String::from("version: 2\nethernets:\n  nic0:\n    match:\n");
        match &n.mac {
            Some(mac) => s.push_str(&format!(
                "      macaddress: {}\n",
                quoted(&mac.to_ascii_lowercase())
            )),
            None => s.push_str("      name: \"e*\"\n"),
        }
        if n.dhcp {
            s.push_str("    dhcp4: true\n");
        } else {
            s.push_str("    dhcp4: false\n");
        }
        if let Some(a) = &n.address {
            s.push_str(&format!("    addresses:\n      - {}\n", quoted(a)));
        }
        if let Some(gw) = &n.gateway {
            s.push_str(&format!(
                "    routes:\n      - to: \"0.0.0.0/0\"\n        via: {}\n",
                quoted(gw)
            ));
        }
        if !n.dns.is_empty() {
            s.push_str("    nameservers:\n      addresses:\n");
            for d in &n.dns {
                s.push_str(&format!("        - {}\n", quoted(d)));
            }
        }
        Some(s)
    }

    /// Every file of the seed, in the order they are written.
    pub fn files(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut files = vec![
            ("meta-data", self.meta_data().into_bytes()),
            ("user-data", self.user_data()),
        ];
        if let Some(n) = self.network_config() {
            files.push(("network-config", n.into_bytes()));
        }
        files
    }

    /// The seed as a vfat image (see the module docs), in memory.
    pub fn image(&self) -> Result<Vec<u8>, StorageError> {
        self.validate()?;
        let files = self.files();
        let content: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
        // Room for the file system's own structures and cluster slack, in
        // whole MiB: the size depends on the contents only.
        let size = (content * 2 + MIN_IMAGE).div_ceil(MIN_IMAGE) * MIN_IMAGE;
        let fat = |e: std::io::Error| bad(format!("cannot build the seed's FAT file system: {e}"));
        let mut disk = Cursor::new(vec![0u8; size as usize]);
        fatfs::format_volume(
            &mut disk,
            FormatVolumeOptions::new()
                .volume_id(SEED_VOLUME_ID)
                .volume_label(*SEED_LABEL),
        )
        .map_err(fat)?;
        disk.set_position(0);
        {
            let fs = FileSystem::new(&mut disk, FsOptions::new().time_provider(&FIXED_TIME))
                .map_err(fat)?;
            {
                let root = fs.root_dir();
                for (name, data) in &files {
                    let mut f = root.create_file(name).map_err(fat)?;
                    f.write_all(data).map_err(fat)?;
                    f.flush().map_err(fat)?;
                }
            }
            fs.unmount().map_err(fat)?;
        }
        Ok(disk.into_inner())
    }
}

/// Writes `seed` as a vfat image to `dst` (replacing what was there: the
/// file is written beside it and renamed over it).
pub fn write_seed(seed: &NoCloudSeed, dst: &Path) -> Result<(), StorageError> {
    let image = seed.image()?;
    let tmp = dst.with_extension("img.tmp");
    std::fs::write(&tmp, &image).map_err(|e| io_error(&tmp, "write", e))?;
    std::fs::rename(&tmp, dst).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error(dst, "write", e)
    })
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn sample() -> NoCloudSeed {
        NoCloudSeed {
            instance_id: "0b5c1f3e-uid".into(),
            hostname: "web-1".into(),
            user_data: None,
            ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3Nza alice@laptop".into()],
            network: Some(SeedNetwork {
                mac: Some("52:54:00:AA:bb:01".into()),
                dhcp: false,
                address: Some("10.0.0.5/24".into()),
                gateway: Some("10.0.0.1".into()),
                dns: vec!["10.0.0.2".into()],
            }),
        }
    }

    fn read_back(image: Vec<u8>) -> Vec<(String, Vec<u8>)> {
        let fs = FileSystem::new(Cursor::new(image), FsOptions::new()).unwrap();
        assert_eq!(
            fs.read_volume_label_from_root_dir().unwrap().as_deref(),
            Some("CIDATA")
        );
        assert_eq!(fs.volume_id(), SEED_VOLUME_ID);
        let root = fs.root_dir();
        let mut out = Vec::new();
        for e in root.iter() {
            let e = e.unwrap();
            let mut data = Vec::new();
            e.to_file().read_to_end(&mut data).unwrap();
            out.push((e.file_name(), data));
        }
        out
    }

    #[test]
    fn the_files_read_back_and_the_bytes_are_stable() {
        let s = sample();
        let a = s.image().unwrap();
        assert_eq!(a, s.image().unwrap());
        assert_eq!(a.len() % 512, 0);
        let files = read_back(a);
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["meta-data", "user-data", "network-config"]);
        let text = |i: usize| String::from_utf8(files[i].1.clone()).unwrap();
        assert_eq!(
            text(0),
            "instance-id: \"0b5c1f3e-uid\"\nlocal-hostname: \"web-1\"\npublic-keys:\n  - \"ssh-ed25519 AAAAC3Nza alice@laptop\"\n"
        );
        assert!(text(1).starts_with("#cloud-config\nhostname: \"web-1\"\n"));
        assert!(
            text(2).contains("macaddress: \"52:54:00:aa:bb:01\""),
            "{}",
            text(2)
        );
        assert!(text(2).contains("via: \"10.0.0.1\""), "{}", text(2));
    }

    #[test]
    fn user_data_is_kept_verbatim_and_a_different_seed_differs() {
        let mut s = sample();
        s.user_data = Some(b"#!/bin/sh\necho hi\n".to_vec());
        s.network = None;
        let files = read_back(s.image().unwrap());
        assert_eq!(files.len(), 2);
        assert_eq!(files[1].1, b"#!/bin/sh\necho hi\n");
        assert_ne!(s.image().unwrap(), sample().image().unwrap());
    }

    #[test]
    fn bad_input_is_refused_with_the_field_named() {
        let mut s = sample();
        s.hostname = "Web_1".into();
        assert!(s.validate().unwrap_err().to_string().contains("hostname"));
        let mut s = sample();
        s.network.as_mut().unwrap().address = Some("10.0.0.300/24".into());
        assert!(s.validate().unwrap_err().to_string().contains("address"));
        let mut s = sample();
        s.ssh_authorized_keys = vec!["a\nb".into()];
        assert!(s.validate().unwrap_err().to_string().contains("SSH key"));
        let mut s = sample();
        s.network.as_mut().unwrap().dhcp = true;
        assert!(s.validate().unwrap_err().to_string().contains("dhcp"));
    }
}
