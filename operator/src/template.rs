//! Resolving a VM against its template: the template supplies what the VM
//! leaves out, the VM's own fields win, and the VM's customization is merged
//! field by field over the template's ([`merge_customization`]).
//!
//! The customization reaches the guest as a cloud-init NoCloud seed that the
//! node agent writes ([`crate::machine`] carries its inputs); only
//! `extraCmdline` is appended to the kernel command line.

use godwit_crds::vm::{Disk, Network};
use godwit_crds::Customization;
use godwit_crds::{parse_quantity, BootSpec, VMTemplateSpec, VirtualMachineSpec};

/// What a VM runs with, after its template is applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// vCPUs.
    pub cpu: u32,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Kernel, initrd, and the command line with `extraCmdline` appended.
    pub boot: BootSpec,
    /// Disks (a `template` source refers to the template's root image).
    pub disks: Vec<Disk>,
    /// NICs.
    pub networks: Vec<Network>,
    /// The hostname the guest gets.
    pub hostname: String,
    /// The VM's customization merged over its template's, for the seed.
    pub customization: Option<Customization>,
}

/// Why a VM cannot be resolved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The VM names a template that does not exist (yet).
    #[error("{1:?} {0:?} not found; create it or fix spec.templateRef")]
    TemplateMissing(String, godwit_crds::TemplateKind),
    /// Neither the VM nor its template sets a field.
    #[error("spec.{0} is not set on the VM nor on its template")]
    Missing(&'static str),
    /// A disk uses the template's image but the VM has no template.
    #[error("disk {0:?} uses source.template but the VM has no templateRef")]
    TemplateDiskWithoutTemplate(String),
    /// A quantity does not parse.
    #[error("spec.memory: {0}")]
    Memory(String),
}

/// Applies `template` (the one the VM's `templateRef` names, if found) to `vm`.
pub fn resolve(
    vm_name: &str,
    vm: &VirtualMachineSpec,
    template: Option<&VMTemplateSpec>,
) -> Result<Resolved, ResolveError> {
    if let Some(r) = &vm.template_ref {
        if template.is_none() {
            return Err(ResolveError::TemplateMissing(r.name.clone(), r.kind));
        }
    }
    let cpu = vm
        .cpu
        .or(template.and_then(|t| t.cpu))
        .ok_or(ResolveError::Missing("cpu"))?;
    let memory_text = vm
        .memory
        .clone()
        .or(template.and_then(|t| t.memory.clone()))
        .ok_or(ResolveError::Missing("memory"))?;
    let memory = parse_quantity(&memory_text).map_err(|e| ResolveError::Memory(e.to_string()))?;
    let mut boot = vm
        .boot
        .clone()
        .or(template.and_then(|t| t.boot.clone()))
        .ok_or(ResolveError::Missing("boot"))?;
    let networks = if vm.networks.is_empty() {
        template.map(|t| t.networks.clone()).unwrap_or_default()
    } else {
        vm.networks.clone()
    };
    for d in &vm.disks {
        if d.source.template.is_some() && template.is_none() {
            return Err(ResolveError::TemplateDiskWithoutTemplate(d.name.clone()));
        }
    }
    let customization = merge_customization(
        template.and_then(|t| t.customization.as_ref()),
        vm.customization.as_ref(),
    );
    let hostname = customization
        .as_ref()
        .and_then(|c| c.hostname.clone())
        .unwrap_or_else(|| vm_name.to_string());
    boot.cmdline = Some(cmdline(boot.cmdline.as_deref(), customization.as_ref()));
    Ok(Resolved {
        cpu,
        memory,
        boot,
        disks: vm.disks.clone(),
        networks,
        hostname,
        customization,
    })
}

/// The VM's customization `vm` over its template's `template`, field by
/// field: each field the VM sets wins, the others come from the template.
/// `userData` and `userDataSecretRef` are one field (a VM that gives either
/// replaces the template's user-data, whichever way the template gave it), as
/// are the `network` settings and the list of SSH keys. `None` when neither
/// has a customization.
pub fn merge_customization(
    template: Option<&Customization>,
    vm: Option<&Customization>,
) -> Option<Customization> {
    let (t, v) = match (template, vm) {
        (None, None) => return None,
        (Some(t), None) => return Some(t.clone()),
        (None, Some(v)) => return Some(v.clone()),
        (Some(t), Some(v)) => (t, v),
    };
    let vm_user_data = v.user_data.is_some() || v.user_data_secret_ref.is_some();
    let user_data_from = if vm_user_data { v } else { t };
    Some(Customization {
        hostname: v.hostname.clone().or_else(|| t.hostname.clone()),
        network: v.network.clone().or_else(|| t.network.clone()),
        ssh_authorized_keys: if v.ssh_authorized_keys.is_empty() {
            t.ssh_authorized_keys.clone()
        } else {
            v.ssh_authorized_keys.clone()
        },
        user_data: user_data_from.user_data.clone(),
        user_data_secret_ref: user_data_from.user_data_secret_ref.clone(),
        extra_cmdline: v.extra_cmdline.clone().or_else(|| t.extra_cmdline.clone()),
    })
}

/// The boot command line with the customization's `extraCmdline` appended.
pub fn cmdline(base: Option<&str>, c: Option<&Customization>) -> String {
    let mut parts: Vec<&str> = base
        .map(|b| b.split_whitespace().collect())
        .unwrap_or_default();
    if let Some(extra) = c.and_then(|c| c.extra_cmdline.as_deref()) {
        parts.extend(extra.split_whitespace());
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use godwit_crds::template::ImageSource;
    use godwit_crds::vm::{DiskSource, TemplateDiskSource, TemplateRef};
    use godwit_crds::{NetworkConfig, SecretKeyRef};

    fn template() -> VMTemplateSpec {
        VMTemplateSpec {
            image: ImageSource {
                source: "/images/base.raw".into(),
                ..Default::default()
            },
            boot: Some(BootSpec {
                kernel: Some("/k/guest.elf".into()),
                initrd: None,
                from_image: None,
                cmdline: Some("hb_ms=100".into()),
            }),
            cpu: Some(2),
            memory: Some("512Mi".into()),
            networks: vec![Network {
                name: "net0".into(),
                bridge: "godwit0".into(),
                mac: None,
            }],
            customization: Some(Customization {
                network: Some(NetworkConfig {
                    address: Some("10.0.0.5/24".into()),
                    gateway: Some("10.0.0.1".into()),
                    ..Default::default()
                }),
                extra_cmdline: Some("tcp_port=7777".into()),
                ..Default::default()
            }),
        }
    }

    fn vm() -> VirtualMachineSpec {
        VirtualMachineSpec {
            template_ref: Some(TemplateRef {
                name: "base".into(),
                ..Default::default()
            }),
            memory: Some("256Mi".into()),
            disks: vec![Disk {
                name: "root".into(),
                source: DiskSource {
                    template: Some(TemplateDiskSource {}),
                    ..Default::default()
                },
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn template_fills_in_and_vm_wins() {
        let r = resolve("demo", &vm(), Some(&template())).unwrap();
        assert_eq!(r.cpu, 2);
        assert_eq!(r.memory, 256 << 20);
        assert_eq!(r.networks.len(), 1);
        assert_eq!(r.hostname, "demo");
        assert_eq!(r.boot.cmdline.as_deref(), Some("hb_ms=100 tcp_port=7777"));
        let c = r.customization.unwrap();
        assert_eq!(c.network, template().customization.unwrap().network);
    }

    #[test]
    fn a_vm_customization_wins_field_by_field() {
        let mut v = vm();
        v.customization = Some(Customization {
            hostname: Some("web-1".into()),
            extra_cmdline: Some("tcp_port=8000".into()),
            ..Default::default()
        });
        let r = resolve("demo", &v, Some(&template())).unwrap();
        assert_eq!(r.hostname, "web-1");
        assert_eq!(r.boot.cmdline.as_deref(), Some("hb_ms=100 tcp_port=8000"));
        let c = r.customization.unwrap();
        assert_eq!(c.hostname.as_deref(), Some("web-1"));
        // Left out by the VM: the template's.
        assert_eq!(
            c.network.and_then(|n| n.address).as_deref(),
            Some("10.0.0.5/24")
        );
    }

    #[test]
    fn merge_takes_user_data_and_keys_as_a_whole() {
        let t = Customization {
            hostname: Some("t".into()),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAA t".into()],
            user_data: Some("#cloud-config\n".into()),
            network: Some(NetworkConfig {
                dhcp: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let secret = SecretKeyRef {
            name: "ud".into(),
            key: "userdata".into(),
        };
        let v = Customization {
            user_data_secret_ref: Some(secret.clone()),
            ssh_authorized_keys: vec!["ssh-ed25519 BBBB v".into()],
            ..Default::default()
        };
        let m = merge_customization(Some(&t), Some(&v)).unwrap();
        // The VM's Secret replaces the template's inline user-data: never both.
        assert_eq!(m.user_data, None);
        assert_eq!(m.user_data_secret_ref, Some(secret));
        assert_eq!(
            m.ssh_authorized_keys,
            vec!["ssh-ed25519 BBBB v".to_string()]
        );
        assert_eq!(m.hostname.as_deref(), Some("t"));
        assert!(m.network.unwrap().dhcp);
        // A VM without user-data keeps the template's.
        let v = Customization {
            hostname: Some("v".into()),
            ..Default::default()
        };
        let m = merge_customization(Some(&t), Some(&v)).unwrap();
        assert_eq!(m.user_data.as_deref(), Some("#cloud-config\n"));
        assert_eq!(m.ssh_authorized_keys, t.ssh_authorized_keys);
        assert_eq!(m.hostname.as_deref(), Some("v"));
        // Only one side, or none.
        assert_eq!(merge_customization(Some(&t), None), Some(t.clone()));
        assert_eq!(merge_customization(None, Some(&v)), Some(v.clone()));
        assert_eq!(merge_customization(None, None), None);
    }

    #[test]
    fn missing_pieces_are_named() {
        assert_eq!(
            resolve("demo", &vm(), None),
            Err(ResolveError::TemplateMissing(
                "base".into(),
                godwit_crds::TemplateKind::VMTemplate
            ))
        );
        let mut bare = vm();
        bare.template_ref = None;
        bare.disks.clear();
        assert_eq!(
            resolve("demo", &bare, None),
            Err(ResolveError::Missing("cpu"))
        );
        bare.cpu = Some(1);
        bare.disks = vm().disks;
        bare.boot = Some(BootSpec {
            kernel: Some("/k".into()),
            ..Default::default()
        });
        assert_eq!(
            resolve("demo", &bare, None),
            Err(ResolveError::TemplateDiskWithoutTemplate("root".into()))
        );
    }
}
