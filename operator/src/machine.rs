//! The [`Machine`] the operator hands to a node: a VM resolved against its
//! template ([`crate::template::resolve`]) with every source made concrete, so
//! the agent needs neither the template nor any defaulting rule.
//!
//! - a `template` disk becomes a clone of the template image (the node makes
//!   a copy-on-write overlay on its cached copy);
//! - an `image` disk is used in place; a `blank` disk gets its size in bytes;
//! - `boot.fromImage` becomes the first disk's image ([`Machine::boot_image`]),
//!   whose `/boot` the node reads; `boot.kernel` is passed as it is;
//! - each NIC gets its MAC (the spec's, else [`stable_mac`] of the VM's uid)
//!   and the first NIC the customization's static address;
//! - a customization (the VM's merged over its template's) becomes the
//!   inputs of the cloud-init NoCloud seed ([`MachineSeed`]), with the VM's
//!   uid as the instance-id; a VM without customization gets no seed disk.

use godwit_crds::contract::{
    stable_mac, BootImage, Machine, MachineDisk, MachineDiskSource, MachineNic, MachineSeed,
};
use godwit_crds::{parse_quantity, VMTemplate};

use crate::template::Resolved;

/// Why a resolved VM cannot become a machine.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MachineError {
    /// A blank disk's size is not a quantity.
    #[error("disk {0:?}: source.blank.size: {1}")]
    BlankSize(String, String),
    /// A disk has no source (the API server's schema normally refuses it).
    #[error("disk {0:?} sets none of source.template, source.image, source.blank")]
    NoSource(String),
    /// A disk uses the template image but there is no template.
    #[error("disk {0:?} uses source.template but the VM has no template")]
    NoTemplate(String),
    /// The boot settings name neither a kernel nor `fromImage` (the API
    /// server's schema normally refuses it).
    #[error("boot sets neither kernel nor fromImage")]
    NoKernel,
    /// `boot.fromImage` needs a first (root) disk made from an image.
    #[error("boot.fromImage reads the root disk's image, but the first disk ({0}) is not from the template or an image; put the root disk first, or set boot.kernel")]
    FromImageWithoutImage(String),
}

/// The machine for the VM with uid `uid`, resolved as `resolved` from
/// `template` (the one its `templateRef` names, if any).
pub fn build(
    uid: &str,
    resolved: &Resolved,
    template: Option<&VMTemplate>,
) -> Result<Machine, MachineError> {
    let mut uses_template = false;
    let mut disks = Vec::with_capacity(resolved.disks.len());
    for d in &resolved.disks {
        let source = if d.source.template.is_some() {
            let t = template.ok_or_else(|| MachineError::NoTemplate(d.name.clone()))?;
            uses_template = true;
            MachineDiskSource::Clone {
                path: t.spec.image.source.clone(),
                format: t.spec.image.format,
            }
        } else if let Some(image) = &d.source.image {
            MachineDiskSource::Image {
                path: image.path.clone(),
                format: image.format,
            }
        } else if let Some(blank) = &d.source.blank {
            let size_bytes = parse_quantity(&blank.size)
                .map_err(|e| MachineError::BlankSize(d.name.clone(), e.to_string()))?;
            MachineDiskSource::Blank { size_bytes }
        } else {
            return Err(MachineError::NoSource(d.name.clone()));
        };
        disks.push(MachineDisk {
            name: d.name.clone(),
            source,
            storage: d.storage,
            read_only: d.read_only,
        });
    }
    let static_ip = resolved
        .customization
        .as_ref()
        .and_then(|c| c.network.as_ref())
        .and_then(|n| n.address.clone());
    let networks = resolved
        .networks
        .iter()
        .enumerate()
        .map(|(i, n)| MachineNic {
            name: n.name.clone(),
            bridge: n.bridge.clone(),
            mac: n.mac.clone().unwrap_or_else(|| stable_mac(uid, i)),
            ip: if i == 0 { static_ip.clone() } else { None },
        })
        .collect();
    let (kernel, boot_image) = boot_source(resolved, &disks)?;
    let seed = resolved.customization.as_ref().map(|c| {
        Box::new(MachineSeed {
            instance_id: uid.to_string(),
            hostname: resolved.hostname.clone(),
            user_data: c.user_data.clone(),
            user_data_secret_ref: c.user_data_secret_ref.clone(),
            ssh_authorized_keys: c.ssh_authorized_keys.clone(),
            network: c.network.clone(),
        })
    });
    Ok(Machine {
        // The placement names the VM's ClusterVMTemplate, if it has one.
        cluster_template: None,
        cpu: resolved.cpu,
        memory_bytes: resolved.memory,
        kernel,
        boot_image,
        initrd: resolved.boot.initrd.clone(),
        cmdline: resolved.boot.cmdline.clone().unwrap_or_default(),
        hostname: resolved.hostname.clone(),
        disks,
        networks,
        template_digest: if uses_template {
            template
                .and_then(|t| t.status.as_ref())
                .and_then(|s| s.image_digest.clone())
        } else {
            None
        },
        seed,
    })
}

/// The kernel file, or (`boot.fromImage`) the image whose `/boot` the node
/// reads: the first disk's, a template image or an image used in place.
fn boot_source(
    resolved: &Resolved,
    disks: &[MachineDisk],
) -> Result<(String, Option<BootImage>), MachineError> {
    if let Some(kernel) = &resolved.boot.kernel {
        return Ok((kernel.clone(), None));
    }
    if resolved.boot.from_image.is_none() {
        return Err(MachineError::NoKernel);
    }
    let root = disks.first();
    match root.map(|d| &d.source) {
        Some(MachineDiskSource::Clone { path, format })
        | Some(MachineDiskSource::Image { path, format }) => Ok((
            String::new(),
            Some(BootImage {
                path: path.clone(),
                format: *format,
            }),
        )),
        _ => Err(MachineError::FromImageWithoutImage(
            root.map_or_else(|| "none".to_string(), |d| format!("{:?}", d.name)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use godwit_crds::vm::{BlankDiskSource, Disk, DiskSource, ImageDiskSource, TemplateDiskSource};
    use godwit_crds::{ImageFormat, StorageKind};

    use super::*;
    use crate::fixtures::{template, vm};
    use crate::template::resolve;

    fn disk(name: &str, source: DiskSource) -> Disk {
        Disk {
            name: name.into(),
            source,
            storage: StorageKind::Local,
            read_only: false,
        }
    }

    #[test]
    fn every_source_becomes_concrete() {
        let t = template();
        let mut v = vm("demo");
        v.spec.disks = vec![
            disk(
                "root",
                DiskSource {
                    template: Some(TemplateDiskSource {}),
                    ..Default::default()
                },
            ),
            Disk {
                read_only: true,
                storage: StorageKind::Shared,
                ..disk(
                    "data",
                    DiskSource {
                        image: Some(ImageDiskSource {
                            path: "/shared/data.raw".into(),
                            format: ImageFormat::Raw,
                        }),
                        ..Default::default()
                    },
                )
            },
            disk(
                "scratch",
                DiskSource {
                    blank: Some(BlankDiskSource { size: "1Gi".into() }),
                    ..Default::default()
                },
            ),
        ];
        let r = resolve("demo", &v.spec, Some(&t.spec)).unwrap();
        let m = build("uid-demo", &r, Some(&t)).unwrap();
        assert_eq!(m.cpu, 1);
        assert_eq!(m.memory_bytes, 1 << 30);
        assert_eq!(m.kernel, "/k/guest.elf");
        assert_eq!(m.cmdline, "hb_ms=100");
        let seed = m.seed.as_ref().unwrap();
        assert_eq!(seed.instance_id, "uid-demo");
        assert_eq!(seed.hostname, "demo");
        assert_eq!(
            seed.network.as_ref().and_then(|n| n.address.as_deref()),
            Some("10.0.0.5/24")
        );
        assert_eq!(m.template_digest.as_deref(), Some("sha256:abc"));
        assert_eq!(
            m.disks[0].source,
            MachineDiskSource::Clone {
                path: "/images/base.qcow2".into(),
                format: ImageFormat::Qcow2
            }
        );
        assert!(m.disks[1].read_only);
        assert_eq!(m.disks[1].storage, StorageKind::Shared);
        assert_eq!(
            m.disks[2].source,
            MachineDiskSource::Blank {
                size_bytes: 1 << 30
            }
        );
        assert_eq!(m.networks[0].mac, stable_mac("uid-demo", 0));
        assert_eq!(m.networks[0].ip.as_deref(), Some("10.0.0.5/24"));
    }

    #[test]
    fn a_spec_mac_is_kept_and_no_template_no_digest() {
        let mut v = vm("demo");
        v.spec.template_ref = None;
        v.spec.cpu = Some(1);
        v.spec.memory = Some("64Mi".into());
        v.spec.boot = Some(godwit_crds::BootSpec {
            kernel: Some("/k".into()),
            ..Default::default()
        });
        v.spec.networks = vec![godwit_crds::vm::Network {
            name: "n".into(),
            bridge: "br".into(),
            mac: Some("52:54:00:00:00:01".into()),
        }];
        let r = resolve("demo", &v.spec, None).unwrap();
        let m = build("uid", &r, None).unwrap();
        assert_eq!(m.networks[0].mac, "52:54:00:00:00:01");
        assert_eq!(m.networks[0].ip, None);
        assert_eq!(m.template_digest, None);
        // No customization anywhere: no seed disk.
        assert_eq!(m.seed, None);
    }

    #[test]
    fn the_seed_carries_the_merged_customization() {
        let t = template();
        let mut v = vm("demo");
        v.spec.customization = Some(godwit_crds::Customization {
            hostname: Some("web-1".into()),
            user_data_secret_ref: Some(godwit_crds::SecretKeyRef {
                name: "demo-userdata".into(),
                key: "userdata".into(),
            }),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAA alice".into()],
            ..Default::default()
        });
        let r = resolve("demo", &v.spec, Some(&t.spec)).unwrap();
        let m = build("uid-7", &r, Some(&t)).unwrap();
        let seed = m.seed.unwrap();
        assert_eq!(seed.instance_id, "uid-7");
        assert_eq!(seed.hostname, "web-1");
        assert_eq!(m.hostname, "web-1");
        assert_eq!(
            seed.user_data_secret_ref.map(|r| r.name).as_deref(),
            Some("demo-userdata")
        );
        assert_eq!(seed.user_data, None);
        assert_eq!(seed.ssh_authorized_keys, vec!["ssh-ed25519 AAAA alice"]);
        // The template's network, which the VM left out.
        assert_eq!(
            seed.network.and_then(|n| n.address).as_deref(),
            Some("10.0.0.5/24")
        );
        assert_eq!(m.networks[0].ip.as_deref(), Some("10.0.0.5/24"));
    }

    #[test]
    fn from_image_reads_the_root_disks_image() {
        let mut t = template();
        t.spec.boot = Some(godwit_crds::BootSpec {
            from_image: Some(godwit_crds::FromImage {}),
            cmdline: Some("console=ttyS0".into()),
            ..Default::default()
        });
        let mut v = vm("demo");
        v.spec.disks = vec![disk(
            "root",
            DiskSource {
                template: Some(TemplateDiskSource {}),
                ..Default::default()
            },
        )];
        let r = resolve("demo", &v.spec, Some(&t.spec)).unwrap();
        let m = build("uid-demo", &r, Some(&t)).unwrap();
        assert_eq!(m.kernel, "");
        assert_eq!(
            m.boot_image,
            Some(BootImage {
                path: "/images/base.qcow2".into(),
                format: ImageFormat::Qcow2
            })
        );
        assert!(m.cmdline.starts_with("console=ttyS0"), "{}", m.cmdline);

        v.spec.disks = vec![disk(
            "scratch",
            DiskSource {
                blank: Some(BlankDiskSource { size: "1Gi".into() }),
                ..Default::default()
            },
        )];
        let r = resolve("demo", &v.spec, Some(&t.spec)).unwrap();
        assert_eq!(
            build("uid-demo", &r, Some(&t)),
            Err(MachineError::FromImageWithoutImage("\"scratch\"".into()))
        );
    }
}
