//! A VM's cloud-init NoCloud seed on this node ([`crate::storage::nocloud`]):
//! made from the machine's [`MachineSeed`] (and the user-data Secret it may
//! name), written to `<vm dir>/cidata.img` and attached read-only as the
//! VM's last disk.
//!
//! The seed is written again before every start and before a live
//! migration's target VMM starts: the same inputs give the same bytes, so it
//! is rebuilt identically on the target rather than copied (a cold
//! migration's VM gets it at its next start). A Secret changed meanwhile
//! shows at the next start, as cloud-init would see a new seed.

use std::path::PathBuf;

use godwit_crds::contract::{Machine, MachineSeed};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::Client;

use super::vm_dir::{VmDir, VmDirError};
use crate::storage::{self, NoCloudSeed, SeedNetwork, StorageError};

/// The seed's file in the VM's directory.
pub const SEED_FILE: &str = "cidata.img";

/// Why a VM's seed could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The user-data Secret could not be read.
    #[error("Cannot read Secret {namespace}/{name} (customization.userDataSecretRef); create it in the VM's namespace and let the node agent get it")]
    SecretGet {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The Secret has no such key.
    #[error("Secret {namespace}/{name} has no key {key:?} (customization.userDataSecretRef.key); add it or name the right key")]
    SecretKey {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The key.
        key: String,
    },
    /// The VM's directory could not be made.
    #[error(transparent)]
    Dir(#[from] VmDirError),
    /// The image could not be written.
    #[error("Cannot write the cloud-init seed of the VM")]
    Write(#[source] StorageError),
    /// The blocking writer did not finish.
    #[error("The seed writer stopped")]
    Join(#[source] tokio::task::JoinError),
}

/// Where VM `dir`'s seed is, when `machine` has one.
pub fn seed_path(dir: &VmDir, machine: &Machine) -> Option<PathBuf> {
    machine.seed.as_ref().map(|_| dir.file(SEED_FILE))
}

/// The seed's contents: the machine's seed inputs with the first NIC's MAC,
/// and `user_data` (read from the Secret, when the seed names one).
pub fn contents(machine: &Machine, seed: &MachineSeed, user_data: Option<Vec<u8>>) -> NoCloudSeed {
    NoCloudSeed {
        instance_id: seed.instance_id.clone(),
        hostname: seed.hostname.clone(),
        user_data: user_data.or_else(|| seed.user_data.clone().map(String::into_bytes)),
        ssh_authorized_keys: seed.ssh_authorized_keys.clone(),
        network: seed.network.as_ref().map(|n| SeedNetwork {
            mac: machine.networks.first().map(|nic| nic.mac.clone()),
            dhcp: n.dhcp,
            address: n.address.clone(),
            gateway: n.gateway.clone(),
            dns: n.dns.clone(),
        }),
    }
}

/// Reads the user-data Secret `seed` names, if any.
async fn secret_user_data(
    client: &Client,
    namespace: &str,
    seed: &MachineSeed,
) -> Result<Option<Vec<u8>>, SeedError> {
    let Some(r) = &seed.user_data_secret_ref else {
        return Ok(None);
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get(&r.name)
        .await
        .map_err(|source| SeedError::SecretGet {
            namespace: namespace.into(),
            name: r.name.clone(),
            source,
        })?;
    let from_data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|b| b.0.clone());
    let from_string = || {
        secret
            .string_data
            .as_ref()
            .and_then(|d| d.get(&r.key))
            .map(|s| s.clone().into_bytes())
    };
    match from_data.or_else(from_string) {
        Some(bytes) => Ok(Some(bytes)),
        None => Err(SeedError::SecretKey {
            namespace: namespace.into(),
            name: r.name.clone(),
            key: r.key.clone(),
        }),
    }
}

/// Writes VM `dir`'s seed for `machine` (or removes a stale one when the
/// machine has none). Called before its VMM starts, on every start and on a
/// migration's target.
pub async fn write(client: &Client, dir: &VmDir, machine: &Machine) -> Result<(), SeedError> {
    let Some(seed) = &machine.seed else {
        let _ = std::fs::remove_file(dir.file(SEED_FILE));
        return Ok(());
    };
    let user_data = secret_user_data(client, &dir.namespace, seed).await?;
    let contents = contents(machine, seed, user_data);
    dir.create()?;
    let path = dir.file(SEED_FILE);
    tokio::task::spawn_blocking(move || storage::write_seed(&contents, &path))
        .await
        .map_err(SeedError::Join)?
        .map_err(SeedError::Write)
}

#[cfg(test)]
mod tests {
    use godwit_crds::contract::MachineNic;
    use godwit_crds::NetworkConfig;

    use super::*;

    #[test]
    fn the_first_nic_mac_and_secret_user_data_go_into_the_seed() {
        let machine = Machine {
            networks: vec![MachineNic {
                name: "net0".into(),
                bridge: "br".into(),
                mac: "52:54:00:01:02:03".into(),
                ip: None,
            }],
            ..Default::default()
        };
        let seed = MachineSeed {
            instance_id: "uid".into(),
            hostname: "h".into(),
            user_data: Some("#cloud-config\n".into()),
            network: Some(NetworkConfig {
                dhcp: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = contents(&machine, &seed, None);
        assert_eq!(c.user_data.as_deref(), Some(&b"#cloud-config\n"[..]));
        let n = c.network.unwrap();
        assert_eq!(n.mac.as_deref(), Some("52:54:00:01:02:03"));
        assert!(n.dhcp);
        let c = contents(&machine, &seed, Some(b"from secret".to_vec()));
        assert_eq!(c.user_data.as_deref(), Some(&b"from secret"[..]));
        let dir = VmDir::new("/s".as_ref(), "/sh".as_ref(), "ns", "vm");
        assert_eq!(
            seed_path(&dir, &Machine::default()),
            None,
            "no seed, no disk"
        );
    }
}
