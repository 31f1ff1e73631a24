//! The customization config disk: a small raw disk image that carries a
//! VM's first-boot settings (hostname, network, SSH keys, extra command
//! line) to the guest, next to the same settings on the kernel command
//! line (`godwit.hostname=`, `godwit.ip=`, ... written by the operator).
//! A guest that cannot see its command line, or needs more than fits there
//! (SSH keys), reads this disk.
//!
//! # Format (version 1)
//!
//! All integers little-endian. The disk is attached read-only.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 10 | magic, ASCII `GODWITCFG1` (the `1` is the format version) |
//! | 10 | 2 | zero |
//! | 12 | 4 | body length `N` in bytes (at most 1 MiB) |
//! | 16 | `N` | body: UTF-8 text, `key=value` lines, each ending in `\n` |
//! | 16 + `N` | | zero up to the end of the image |
//!
//! The image size is `16 + N` rounded up to a multiple of 4096 bytes, so it
//! is a whole number of 512-byte sectors; a guest reads sector 0, then as
//! many more as `16 + N` needs.
//!
//! Keys, in this order when present (a reader must ignore keys it does not
//! know, and a value never contains `\n` or NUL):
//!
//! | key | value | repeat |
//! | --- | --- | --- |
//! | `hostname` | an RFC 1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, ≤ 63) | once |
//! | `dhcp` | `1`: configure the first NIC by DHCP | once |
//! | `ip` | static IPv4 address in CIDR form, `10.0.0.5/24` | once |
//! | `gw` | default gateway, `10.0.0.1` | once |
//! | `dns` | comma-separated IPv4 name servers | once |
//! | `ssh_key` | one OpenSSH public key line | once per key |
//! | `cmdline` | extra kernel command line (already on the cmdline; for information) | once |
//!
//! `dhcp` and `ip` exclude each other. Example body:
//!
//! ```text
//! hostname=web-1
//! ip=10.0.0.5/24
//! gw=10.0.0.1
//! dns=10.0.0.2,10.0.0.3
//! ssh_key=ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG... alice@laptop
//! ```

use std::net::Ipv4Addr;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{io_error, StorageError};

/// The magic at offset 0.
pub const CONFIG_MAGIC: &[u8; 10] = b"GODWITCFG1";
/// Header size; the body starts here.
pub const CONFIG_HEADER: usize = 16;
/// Largest body.
pub const CONFIG_MAX_BODY: usize = 1 << 20;

/// A VM's first-boot customization (the node's copy of the template's
/// `customization`, hostname resolved).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customization {
    /// Host name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Configure the first NIC by DHCP.
    #[serde(default)]
    pub dhcp: bool,
    /// Static IPv4 address, CIDR form.
    #[serde(default)]
    pub ip: Option<String>,
    /// Default gateway.
    #[serde(default)]
    pub gateway: Option<String>,
    /// Name servers.
    #[serde(default)]
    pub dns: Vec<String>,
    /// SSH public keys.
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
    /// Extra kernel command line.
    #[serde(default)]
    pub extra_cmdline: Option<String>,
}

fn bad(msg: String) -> StorageError {
    StorageError::Customization(msg)
}

fn valid_hostname(h: &str) -> bool {
    let b = h.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn valid_cidr(s: &str) -> bool {
    s.split_once('/').is_some_and(|(a, p)| {
        a.parse::<Ipv4Addr>().is_ok() && p.parse::<u8>().is_ok_and(|p| p <= 32)
    })
}

impl Customization {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), StorageError> {
        if let Some(h) = &self.hostname {
            if !valid_hostname(h) {
                return Err(bad(format!(
                    "hostname {h:?} is not a DNS label (lower-case letters, digits, '-', at most 63)"
                )));
            }
        }
        if self.dhcp && self.ip.is_some() {
            return Err(bad("set either dhcp or a static ip, not both".into()));
        }
        if let Some(ip) = &self.ip {
            if !valid_cidr(ip) {
                return Err(bad(format!(
                    "ip {ip:?} is not an IPv4 address in CIDR form (10.0.0.5/24)"
                )));
            }
        }
        for (what, a) in self
            .gateway
            .iter()
            .map(|g| ("gateway", g))
            .chain(self.dns.iter().map(|d| ("dns", d)))
        {
            if a.parse::<Ipv4Addr>().is_err() {
                return Err(bad(format!("{what} {a:?} is not an IPv4 address")));
            }
        }
        for v in self
            .ssh_authorized_keys
            .iter()
            .chain(self.extra_cmdline.iter())
        {
            if v.contains(['\n', '\r', '\0']) {
                return Err(bad(format!(
                    "{:?}... contains a line break or NUL",
                    v.chars().take(20).collect::<String>()
                )));
            }
        }
        Ok(())
    }

    /// The body text (see the module docs).
    pub fn body(&self) -> String {
        let mut s = String::new();
        let mut line = |k: &str, v: &str| {
            s.push_str(k);
            s.push('=');
            s.push_str(v);
            s.push('\n');
        };
        if let Some(h) = &self.hostname {
            line("hostname", h);
        }
        if self.dhcp {
            line("dhcp", "1");
        }
        if let Some(ip) = &self.ip {
            line("ip", ip);
        }
        if let Some(gw) = &self.gateway {
            line("gw", gw);
        }
        if !self.dns.is_empty() {
            line("dns", &self.dns.join(","));
        }
        for k in &self.ssh_authorized_keys {
            line("ssh_key", k);
        }
        if let Some(c) = &self.extra_cmdline {
            line("cmdline", c);
        }
        s
    }

    /// Parses a body (unknown keys are ignored).
    pub fn parse_body(text: &str) -> Customization {
        let mut c = Customization::default();
        for l in text.lines() {
            let Some((k, v)) = l.split_once('=') else {
                continue;
            };
            match k {
                "hostname" => c.hostname = Some(v.into()),
                "dhcp" => c.dhcp = v == "1",
                "ip" => c.ip = Some(v.into()),
                "gw" => c.gateway = Some(v.into()),
                "dns" => {
                    c.dns = v
                        .split(',')
                        .filter(|d| !d.is_empty())
                        .map(Into::into)
                        .collect()
                }
                "ssh_key" => c.ssh_authorized_keys.push(v.into()),
                "cmdline" => c.extra_cmdline = Some(v.into()),
                _ => {}
            }
        }
        c
    }
}

/// Writes the config disk for `c` at `dst` (which must not exist). Nothing
/// is left behind on failure.
pub fn config_disk(c: &Customization, dst: &Path) -> Result<(), StorageError> {
    c.validate()?;
    let body = c.body();
    if body.len() > CONFIG_MAX_BODY {
        return Err(bad(format!(
            "{} bytes of settings; at most {CONFIG_MAX_BODY}",
            body.len()
        )));
    }
    let mut img = vec![0u8; (CONFIG_HEADER + body.len()).div_ceil(4096) * 4096];
    img[..10].copy_from_slice(CONFIG_MAGIC);
    img[12..16].copy_from_slice(&(body.len() as u32).to_le_bytes());
    img[CONFIG_HEADER..CONFIG_HEADER + body.len()].copy_from_slice(body.as_bytes());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                StorageError::Exists(dst.display().to_string())
            } else {
                io_error(dst, "create", e)
            }
        })?;
    if let Err(e) = f.write_all_at(&img, 0).and_then(|_| f.sync_all()) {
        let _ = std::fs::remove_file(dst);
        return Err(io_error(dst, "write", e));
    }
    Ok(())
}

/// Reads a config disk back (for the agent and the tests).
pub fn read_config_disk(path: &Path) -> Result<Customization, StorageError> {
    let data = std::fs::read(path).map_err(|e| io_error(path, "read", e))?;
    if data.len() < CONFIG_HEADER || &data[..10] != CONFIG_MAGIC {
        return Err(bad(format!(
            "{} is not a Godwit config disk",
            path.display()
        )));
    }
    let n = u32::from_le_bytes(data[12..16].try_into().expect("4 bytes")) as usize;
    let body = data.get(CONFIG_HEADER..CONFIG_HEADER + n).ok_or_else(|| {
        bad(format!(
            "{}: body length {n} beyond the image",
            path.display()
        ))
    })?;
    let text = std::str::from_utf8(body)
        .map_err(|_| bad(format!("{}: body is not UTF-8", path.display())))?;
    Ok(Customization::parse_body(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Customization {
        Customization {
            hostname: Some("web-1".into()),
            dhcp: false,
            ip: Some("10.0.0.5/24".into()),
            gateway: Some("10.0.0.1".into()),
            dns: vec!["10.0.0.2".into(), "10.0.0.3".into()],
            ssh_authorized_keys: vec!["ssh-ed25519 AAAA alice".into(), "ssh-rsa BBBB bob".into()],
            extra_cmdline: Some("hb_ms=50".into()),
        }
    }

    #[test]
    fn round_trips_through_the_documented_layout() {
        let p = std::env::temp_dir().join(format!("godwit-cfg-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        config_disk(&sample(), &p).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), 4096);
        assert_eq!(&data[..10], b"GODWITCFG1");
        let n = u32::from_le_bytes(data[12..16].try_into().unwrap()) as usize;
        assert!(std::str::from_utf8(&data[16..16 + n]).unwrap().starts_with(
            "hostname=web-1\nip=10.0.0.5/24\ngw=10.0.0.1\ndns=10.0.0.2,10.0.0.3\nssh_key="
        ));
        assert_eq!(read_config_disk(&p).unwrap(), sample());
        assert!(matches!(
            config_disk(&sample(), &p),
            Err(StorageError::Exists(_))
        ));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn bad_settings_are_named() {
        let cases = [
            Customization {
                hostname: Some("Web_1".into()),
                ..Default::default()
            },
            Customization {
                dhcp: true,
                ip: Some("10.0.0.5/24".into()),
                ..Default::default()
            },
            Customization {
                ip: Some("10.0.0.5".into()),
                ..Default::default()
            },
            Customization {
                gateway: Some("x".into()),
                ..Default::default()
            },
            Customization {
                ssh_authorized_keys: vec!["a\nb".into()],
                ..Default::default()
            },
        ];
        for c in cases {
            assert!(
                matches!(c.validate(), Err(StorageError::Customization(_))),
                "{c:?}"
            );
        }
    }
}
