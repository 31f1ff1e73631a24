//! The cloud-init NoCloud seed, read the way cloud-init reads it: the disk
//! whose FAT volume label is `cidata` (any case), its `meta-data`
//! (`local-hostname`) and `network-config` (version 2: the first ethernet's
//! `match.macaddress`, `dhcp4`, first IPv4 `addresses` entry, and the
//! gateway from a default route's `via` or from `gateway4`).
//!
//! YAML is read as the small block subset seeds use: `key: value` lines,
//! nesting by indentation, `- item` lists, values plain or quoted. Flow
//! collections (`[a, b]`) and anchors are not understood; a seed that uses
//! them for these keys is read as if the key were absent.

use alloc::string::String;
use alloc::vec::Vec;

use crate::cmdline::{parse_ipv4, parse_u64};
use crate::fat::{Fat, Sectors};

/// What the guest takes from a seed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seed {
    /// The volume label, lower case (`cidata`).
    pub label: String,
    /// The root directory's file names, in directory order.
    pub files: Vec<String>,
    /// `local-hostname` from meta-data.
    pub hostname: Option<String>,
    /// The first ethernet of network-config.
    pub net: Option<SeedNet>,
}

/// One ethernet of a version 2 network config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeedNet {
    /// `match.macaddress`, lower case.
    pub mac: Option<[u8; 6]>,
    pub dhcp4: bool,
    pub address: Option<([u8; 4], u8)>,
    pub gateway: Option<[u8; 4]>,
}

impl SeedNet {
    /// Whether this config is for the NIC with `mac` (a config without a
    /// MAC match is for any NIC).
    pub fn matches(&self, mac: [u8; 6]) -> bool {
        self.mac.is_none_or(|m| m == mac)
    }
}

/// Reads the seed on `dev`; `None` when `dev` holds no FAT volume labelled
/// `cidata`.
pub fn read(dev: &mut dyn Sectors) -> Option<Seed> {
    let fat = Fat::open(dev)?;
    let label = fat.label(dev);
    if !label.eq_ignore_ascii_case("cidata") {
        return None;
    }
    let entries = fat.entries(dev);
    let mut seed = Seed {
        label: label.to_ascii_lowercase(),
        files: entries.iter().map(|e| e.name.clone()).collect(),
        ..Default::default()
    };
    let text = |dev: &mut dyn Sectors, name: &str| -> Option<String> {
        let e = fat.find(dev, name)?;
        String::from_utf8(fat.read(dev, &e)?).ok()
    };
    if let Some(meta) = text(dev, "meta-data") {
        seed.hostname = meta_hostname(&meta);
    }
    if let Some(net) = text(dev, "network-config") {
        seed.net = network(&net);
    }
    Some(seed)
}

/// A YAML scalar without its quotes (and without a trailing comment when
/// plain).
fn scalar(v: &str) -> &str {
    let v = v.trim();
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner;
        }
    }
    match v.find(" #") {
        Some(i) => v[..i].trim_end(),
        None => v,
    }
}

/// One significant line: its indentation, whether it is a list item, its
/// key (if `key:` form) and value.
struct Line<'a> {
    indent: usize,
    item: bool,
    key: Option<&'a str>,
    value: &'a str,
}

fn lines(text: &str) -> impl Iterator<Item = Line<'_>> {
    text.lines().filter_map(|raw| {
        let body = raw.trim_start();
        if body.is_empty() || body.starts_with('#') || body == "---" {
            return None;
        }
        let mut indent = raw.len() - body.len();
        let (item, body) =
            match body
                .strip_prefix("- ")
                .or(if body == "-" { Some("") } else { None })
            {
                Some(rest) => {
                    indent += 2;
                    (true, rest.trim_start())
                }
                None => (false, body),
            };
        let (key, value) = match body.split_once(':') {
            Some((k, v)) if (v.is_empty() || v.starts_with(' ')) && !k.starts_with(['"', '\'']) => {
                (Some(k.trim()), v)
            }
            _ => (None, body),
        };
        Some(Line {
            indent,
            item,
            key,
            value: scalar(value),
        })
    })
}

/// `local-hostname` of a meta-data document.
pub fn meta_hostname(text: &str) -> Option<String> {
    lines(text)
        .find(|l| l.indent == 0 && l.key == Some("local-hostname") && !l.value.is_empty())
        .map(|l| String::from(l.value))
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for o in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn parse_cidr(s: &str) -> Option<([u8; 4], u8)> {
    let (a, p) = s.split_once('/')?;
    let p = parse_u64(p).filter(|p| *p <= 32)?;
    Some((parse_ipv4(a)?, p as u8))
}

/// `path` without a leading `network:` (which may wrap the whole config).
fn relative<'a>(path: &'a [&'a str]) -> &'a [&'a str] {
    match path.first() {
        Some(&"network") => &path[1..],
        _ => path,
    }
}

/// The first ethernet of a version 2 network config.
pub fn network(text: &str) -> Option<SeedNet> {
    // The keys from the root down to the current line, with their indents.
    let mut path: Vec<(usize, String)> = Vec::new();
    let mut first: Option<String> = None;
    let mut net = SeedNet::default();
    let mut version2 = false;
    let mut route_is_default = false;
    for l in lines(text) {
        let pure_item = l.item && l.key.is_none();
        while path
            .last()
            .is_some_and(|(i, _)| *i > l.indent || (*i == l.indent && !pure_item))
        {
            path.pop();
        }
        let keys: Vec<&str> = path.iter().map(|(_, k)| k.as_str()).collect();
        let rel = relative(&keys);
        if rel == ["ethernets"] && first.is_none() {
            first = l.key.map(String::from);
        }
        let ours = rel.len() >= 2 && rel[0] == "ethernets" && first.as_deref() == Some(rel[1]);
        if ours {
            match (&rel[2..], l.key) {
                ([], Some("dhcp4")) => net.dhcp4 = matches!(l.value, "true" | "yes" | "on"),
                ([], Some("gateway4")) => net.gateway = parse_ipv4(l.value),
                (["match"], Some("macaddress")) => {
                    net.mac = parse_mac(&l.value.to_ascii_lowercase())
                }
                (["addresses"], None) if pure_item && net.address.is_none() => {
                    net.address = parse_cidr(l.value)
                }
                (["routes"], Some("to")) => {
                    // Each `- to: ...` starts a route.
                    route_is_default = matches!(l.value, "0.0.0.0/0" | "default")
                }
                (["routes"], Some("via")) if route_is_default => net.gateway = parse_ipv4(l.value),
                _ => {}
            }
        }
        if let Some(key) = l.key {
            if rel.is_empty() && key == "version" && l.value == "2" {
                version2 = true;
            }
            if l.value.is_empty() {
                path.push((l.indent, String::from(key)));
            }
        }
    }
    (version2 && first.is_some()).then_some(net)
}
