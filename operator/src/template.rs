//! Resolving a VM against its template: the template supplies what the VM
//! leaves out, the VM's own fields win, and the template's customization
//! becomes kernel command-line entries the guest reads at boot.
//!
//! Customization on the command line (documented in the README): `godwit.hostname=`,
//! `godwit.ip=<cidr>` and `godwit.gw=<ip>` (or `godwit.dhcp=1`), `godwit.dns=<ip,...>`,
//! then the template's `extraCmdline` verbatim. SSH keys are too long for a
//! command line and go on the config disk only.

use godwit_crds::template::Customization;
use godwit_crds::vm::{Disk, Network};
use godwit_crds::{parse_quantity, BootSpec, VMTemplateSpec, VirtualMachineSpec};

/// What a VM runs with, after its template is applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// vCPUs.
    pub cpu: u32,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Kernel, initrd, and the command line with the customization appended.
    pub boot: BootSpec,
    /// Disks (a `template` source refers to the template's root image).
    pub disks: Vec<Disk>,
    /// NICs.
    pub networks: Vec<Network>,
    /// The hostname the guest gets.
    pub hostname: String,
    /// The template's customization, for the config disk.
    pub customization: Option<Customization>,
}

/// Why a VM cannot be resolved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The VM names a template that does not exist (yet).
    #[error("VMTemplate {0:?} not found; create it or fix spec.templateRef")]
    TemplateMissing(String),
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
            return Err(ResolveError::TemplateMissing(r.name.clone()));
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
    let customization = template.and_then(|t| t.customization.clone());
    let hostname = customization
        .as_ref()
        .and_then(|c| c.hostname.clone())
        .unwrap_or_else(|| vm_name.to_string());
    boot.cmdline = Some(cmdline(
        boot.cmdline.as_deref(),
        &hostname,
        customization.as_ref(),
    ));
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

/// The boot command line with the customization entries appended.
pub fn cmdline(base: Option<&str>, hostname: &str, c: Option<&Customization>) -> String {
    let mut parts: Vec<String> = base
        .map(|b| b.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    parts.push(format!("godwit.hostname={hostname}"));
    if let Some(net) = c.and_then(|c| c.network.as_ref()) {
        if net.dhcp {
            parts.push("godwit.dhcp=1".into());
        }
        if let Some(ip) = &net.address {
            parts.push(format!("godwit.ip={ip}"));
        }
        if let Some(gw) = &net.gateway {
            parts.push(format!("godwit.gw={gw}"));
        }
        if !net.dns.is_empty() {
            parts.push(format!("godwit.dns={}", net.dns.join(",")));
        }
    }
    if let Some(extra) = c.and_then(|c| c.extra_cmdline.as_deref()) {
        parts.extend(extra.split_whitespace().map(str::to_string));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use godwit_crds::template::{ImageSource, NetworkConfig};
    use godwit_crds::vm::{DiskSource, TemplateDiskSource, TemplateRef};

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
        assert_eq!(
            r.boot.cmdline.as_deref(),
            Some("hb_ms=100 godwit.hostname=demo godwit.ip=10.0.0.5/24 godwit.gw=10.0.0.1 tcp_port=7777")
        );
    }

    #[test]
    fn missing_pieces_are_named() {
        assert_eq!(
            resolve("demo", &vm(), None),
            Err(ResolveError::TemplateMissing("base".into()))
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
