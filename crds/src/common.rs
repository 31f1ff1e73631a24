//! Types shared by the three kinds: boot settings, the migration policy, and the
//! parsing of Kubernetes quantities that the operator and node agents need.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The pattern every memory or size quantity must match: a whole or decimal number
/// with an optional binary (`Ki`..`Ei`) or decimal (`k`..`E`) suffix, as in
/// Kubernetes resource quantities (`512Mi`, `2Gi`, `1.5G`, `1073741824`).
pub const QUANTITY_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";

/// A MAC address in the usual colon-separated hex form.
pub const MAC_PATTERN: &str = r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$";

/// A DNS-1123 label, as Kubernetes names for nodes, networks and disks.
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";

/// The CEL rule every node path in a spec passes: absolute, without `.`,
/// `..` or empty segments. What a node then accepts is its own business (the
/// node daemon's image directories, `--image-dir`); this refuses at once
/// what could never pass.
pub const NODE_PATH_RULE: &str = "self.startsWith('/') && !self.contains('/../') && !self.endsWith('/..') && !self.contains('/./') && !self.endsWith('/.') && !self.contains('//')";
/// The message of [`NODE_PATH_RULE`].
pub const NODE_PATH_MESSAGE: &str = "must be an absolute path without `.`, `..` or `//`, under one of the node's image directories (by default /var/lib/godwit/images and /var/lib/godwit/kernels)";
/// The CEL rule that refuses the node's system directories outright: no
/// node serves images from them.
pub const SYSTEM_PATH_RULE: &str = "!['/proc/', '/sys/', '/dev/', '/etc/', '/run/', '/var/run/', '/root/', '/home/', '/boot/', '/var/lib/kubelet/'].exists(p, self.startsWith(p))";
/// The message of [`SYSTEM_PATH_RULE`].
pub const SYSTEM_PATH_MESSAGE: &str = "names a system directory of the node; images come only from the node's image directories (by default /var/lib/godwit/images and /var/lib/godwit/kernels)";

/// The schema of `status.machine`: an object kept as written (its fields
/// are `contract::Machine`'s, checked by the operator that writes it).
pub fn resolved_machine_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "The machine the VM runs as: its spec with its template applied and every source made concrete, written by the operator when it schedules the VM.",
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// The schema of a Kubernetes label selector, as the API server checks it:
/// `operator` is one of `In`, `NotIn`, `Exists`, `DoesNotExist` (an enum, so
/// an unknown one is refused at admission instead of silently matching
/// nothing), and `values` is non-empty exactly for `In` and `NotIn`.
pub fn label_selector_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "A label query over VMs: every matchLabels pair and every matchExpressions requirement must hold (ANDed); an empty selector matches every VM.",
        "type": "object",
        "x-kubernetes-map-type": "atomic",
        "properties": {
            "matchLabels": {
                "description": "Labels a VM must have, key and value.",
                "type": "object",
                "additionalProperties": {"type": "string"}
            },
            "matchExpressions": {
                "description": "Requirements on a VM's labels.",
                "type": "array",
                "maxItems": 32,
                "items": {
                    "type": "object",
                    "required": ["key", "operator"],
                    "properties": {
                        "key": {
                            "description": "The label key the requirement is about.",
                            "type": "string",
                            "maxLength": 317
                        },
                        "operator": {
                            "description": "In, NotIn (with values), Exists or DoesNotExist (without).",
                            "type": "string",
                            "enum": ["In", "NotIn", "Exists", "DoesNotExist"]
                        },
                        "values": {
                            "description": "The values for In and NotIn.",
                            "type": "array",
                            "maxItems": 64,
                            "items": {"type": "string", "maxLength": 63}
                        }
                    },
                    "x-kubernetes-validations": [{
                        "rule": "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : (!has(self.values) || size(self.values) == 0)",
                        "message": "In and NotIn need values; Exists and DoesNotExist take none"
                    }]
                }
            }
        }
    })
}

/// How the guest is started: either a kernel file on the node (a Linux bzImage
/// or a PVH ELF) with an optional initrd, or the newest kernel and initrd in
/// the root disk image's own `/boot` (`fromImage`); and the kernel command line.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.kernel) != has(self.fromImage)").message("set exactly one of boot.kernel and boot.fromImage"))]
#[x_kube(validation = Rule::new("!has(self.initrd) || has(self.kernel)").message("boot.initrd goes with boot.kernel; fromImage takes the initrd from the image's /boot"))]
#[serde(rename_all = "camelCase")]
pub struct BootSpec {
    /// Path of the kernel on the node (bzImage or PVH ELF), in one of the
    /// node's image directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new(NODE_PATH_RULE).message(NODE_PATH_MESSAGE))]
    #[x_kube(validation = Rule::new(SYSTEM_PATH_RULE).message(SYSTEM_PATH_MESSAGE))]
    pub kernel: Option<String>,
    /// Boot the newest `vmlinuz-<version>` (and its initrd) found in `/boot`
    /// of the root disk's image (ext2/3/4, on a GPT or MBR disk or the whole
    /// disk), with `root=UUID=<root filesystem>` before `cmdline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_image: Option<FromImage>,
    /// Path of an initial ramdisk on the node (only with `kernel`), in one
    /// of the node's image directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new(NODE_PATH_RULE).message(NODE_PATH_MESSAGE))]
    #[x_kube(validation = Rule::new(SYSTEM_PATH_RULE).message(SYSTEM_PATH_MESSAGE))]
    pub initrd: Option<String>,
    /// Kernel command line. Godwit appends the customization's `extraCmdline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// Options of `boot.fromImage` (none yet: `{}`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct FromImage {}

/// The most user-data a VM may carry inline (`customization.userData`); more
/// belongs in a Secret (`customization.userDataSecretRef`).
pub const MAX_INLINE_USER_DATA: usize = 32 * 1024;

/// First-boot customization. It reaches the guest as a cloud-init NoCloud
/// seed: a read-only vfat disk labelled `cidata` with `meta-data`,
/// `user-data` and `network-config`, which the node agent writes before the
/// VMM starts (and rebuilds identically on a migration's target). Only
/// `extraCmdline` goes on the kernel command line.
///
/// A template's customization applies to its VMs; a VM's own customization
/// overrides it field by field (`userData` and `userDataSecretRef` count as
/// one field).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!(has(self.userData) && has(self.userDataSecretRef))").message("set userData or userDataSecretRef, not both"))]
#[serde(rename_all = "camelCase")]
pub struct Customization {
    /// Host name (`local-hostname` in the seed's meta-data); the VM's name when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub hostname: Option<String>,
    /// Address configuration of the first interface (the seed's
    /// `network-config`, version 2, matched by the interface's MAC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
    /// Public keys allowed to log in (`ssh_authorized_keys` of the generated
    /// `#cloud-config`, or added to the user's own `#cloud-config`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// cloud-init user-data, inline (at most 32 KiB; larger belongs in a
    /// Secret). Used as the seed's `user-data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32768))]
    pub user_data: Option<String>,
    /// cloud-init user-data from a Secret in the VM's namespace, read by the
    /// node agent each time it writes the seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_secret_ref: Option<SecretKeyRef>,
    /// Appended to the kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_cmdline: Option<String>,
}

/// A key of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key in the Secret's `data` (default `userdata`).
    #[serde(default = "SecretKeyRef::default_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

impl SecretKeyRef {
    /// The key used when none is given.
    pub const DEFAULT_KEY: &'static str = "userdata";

    fn default_key() -> String {
        Self::DEFAULT_KEY.to_string()
    }
}

/// DHCP, or a static IPv4 address.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("(has(self.dhcp) && self.dhcp) ? !has(self.address) : has(self.address)").message("set either dhcp: true or a static address, not both"))]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    /// Ask for an address by DHCP.
    #[serde(default)]
    pub dhcp: bool,
    /// Static IPv4 address in CIDR form (`10.0.0.5/24`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$"))]
    pub address: Option<String>,
    /// Default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^([0-9]{1,3}\.){3}[0-9]{1,3}$"))]
    pub gateway: Option<String>,
    /// DNS servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
}

/// How a live migration may proceed. Every field is optional; the operator fills in
/// the defaults documented on each field.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.maxDowntimeMs) || !has(self.completionTimeoutSeconds) || self.maxDowntimeMs < self.completionTimeoutSeconds * 1000").message("maxDowntimeMs must be shorter than completionTimeoutSeconds"))]
#[serde(rename_all = "camelCase")]
pub struct MigrationPolicy {
    /// Longest pause the guest may see at switch-over, in milliseconds (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 60000))]
    pub max_downtime_ms: Option<u32>,
    /// Bandwidth cap for the migration stream in megabits per second; absent means
    /// no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 400000))]
    pub bandwidth_mbps: Option<u32>,
    /// Allow switching to post-copy when pre-copy rounds stop shrinking (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_post_copy: Option<bool>,
    /// Allow throttling the vCPUs when pre-copy rounds stop shrinking (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_auto_converge: Option<bool>,
    /// Give up (and keep the VM on the source) after this many seconds (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub completion_timeout_seconds: Option<u32>,
}

impl MigrationPolicy {
    /// Default maximum downtime in milliseconds.
    pub const DEFAULT_MAX_DOWNTIME_MS: u32 = 50;
    /// Default completion timeout in seconds.
    pub const DEFAULT_COMPLETION_TIMEOUT_SECONDS: u32 = 600;

    /// This policy with the fields it leaves open taken from `base` (a VM's
    /// override applied over the cluster default, or a migration's over a VM's).
    pub fn or(&self, base: &MigrationPolicy) -> MigrationPolicy {
        MigrationPolicy {
            max_downtime_ms: self.max_downtime_ms.or(base.max_downtime_ms),
            bandwidth_mbps: self.bandwidth_mbps.or(base.bandwidth_mbps),
            allow_post_copy: self.allow_post_copy.or(base.allow_post_copy),
            allow_auto_converge: self.allow_auto_converge.or(base.allow_auto_converge),
            completion_timeout_seconds: self
                .completion_timeout_seconds
                .or(base.completion_timeout_seconds),
        }
    }
}

/// Why a quantity string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// The text is not a number with an optional suffix.
    #[error("Quantity {0:?} is not a number with an optional suffix such as Mi or Gi")]
    Malformed(String),
    /// The value does not fit in 64 bits of bytes.
    #[error("Quantity {0:?} is too large")]
    Overflow(String),
}

/// `bytes` as the shortest exact binary quantity (`2Gi`, `512Mi`, `1536Ki`,
/// or plain bytes), which [`parse_quantity`] reads back.
pub fn format_quantity(bytes: u64) -> String {
    for (suffix, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Parses a Kubernetes quantity (`512Mi`, `1Gi`, `1.5G`, `4096`) into bytes,
/// rounding a fractional result up.
pub fn parse_quantity(text: &str) -> Result<u64, QuantityError> {
    let malformed = || QuantityError::Malformed(text.to_string());
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: u128 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return Err(malformed()),
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() || (number.contains('.') && fraction.is_empty()) || fraction.len() > 18 {
        return Err(malformed());
    }
    let whole: u128 = whole.parse().map_err(|_| malformed())?;
    let mut bytes = whole
        .checked_mul(multiplier)
        .ok_or_else(|| QuantityError::Overflow(text.to_string()))?;
    if !fraction.is_empty() {
        let digits: u128 = fraction.parse().map_err(|_| malformed())?;
        let scale = 10u128.pow(fraction.len() as u32);
        bytes += (digits * multiplier).div_ceil(scale);
    }
    u64::try_from(bytes).map_err(|_| QuantityError::Overflow(text.to_string()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn quantities_format_exactly_and_read_back() {
        for (bytes, text) in [
            (2u64 << 30, "2Gi"),
            (512 << 20, "512Mi"),
            (1536 << 10, "1536Ki"),
            (1000, "1000"),
            (0, "0"),
            (3 << 40, "3Ti"),
        ] {
            assert_eq!(super::format_quantity(bytes), text);
            assert_eq!(super::parse_quantity(text).unwrap(), bytes);
        }
    }

    use super::*;

    #[test]
    fn quantities_parse_to_bytes() {
        assert_eq!(parse_quantity("64Mi"), Ok(64 << 20));
        assert_eq!(parse_quantity("1Gi"), Ok(1 << 30));
        assert_eq!(parse_quantity("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_quantity("2G"), Ok(2_000_000_000));
        assert_eq!(parse_quantity("4096"), Ok(4096));
        assert_eq!(parse_quantity("0.5k"), Ok(500));
    }

    #[test]
    fn bad_quantities_are_refused() {
        for bad in ["", "Mi", "1.Gi", "1GB", "-1Gi", "1..2", "1 Gi"] {
            assert!(parse_quantity(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(matches!(
            parse_quantity("100Ei"),
            Err(QuantityError::Overflow(_))
        ));
    }

    #[test]
    fn policy_override_takes_set_fields_only() {
        let base = MigrationPolicy {
            max_downtime_ms: Some(50),
            allow_post_copy: Some(true),
            ..Default::default()
        };
        let over = MigrationPolicy {
            max_downtime_ms: Some(10),
            ..Default::default()
        };
        let merged = over.or(&base);
        assert_eq!(merged.max_downtime_ms, Some(10));
        assert_eq!(merged.allow_post_copy, Some(true));
        assert_eq!(merged.bandwidth_mbps, None);
    }
}
