//! What every handler shares: the object store, the served kinds (built-in
//! and from stored CRDs), the request log, and the server's uids, random
//! name suffixes and clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};

use crate::audit::AuditLog;
use crate::crd::{builtin_resources, resources_of_crd, ResourceDef};
use crate::front_proxy::FrontProxy;
use crate::store::{ResourceId, Store};

/// The current time as the API server writes it (RFC 3339, seconds).
pub(crate) fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Everything the handlers share.
pub struct ServerState {
    pub(crate) store: Store,
    builtins: Vec<ResourceDef>,
    custom: RwLock<Vec<ResourceDef>>,
    pub(crate) audit: AuditLog,
    pub(crate) address: RwLock<String>,
    uid_counter: AtomicU64,
    uid_seed: u64,
    pub(crate) bookmark_interval: Duration,
    /// Held from a Pod's quota admission until it is stored, so that two
    /// Pods cannot both take the last room of a quota.
    pub(crate) quota_lock: std::sync::Mutex<()>,
    /// The aggregation layer's client identity ([`crate::aggregator`]).
    pub(crate) front_proxy: FrontProxy,
}

impl ServerState {
    /// State with the built-in kinds and no objects (the standard
    /// namespaces are created by [`super::new_state`]).
    pub(crate) fn empty(audit: AuditLog, bookmark_interval: Duration) -> Self {
        let seed = Utc::now().timestamp_nanos_opt().unwrap_or(0) as u64;
        Self {
            store: Store::new(),
            builtins: builtin_resources(),
            custom: RwLock::new(Vec::new()),
            audit,
            address: RwLock::new(String::new()),
            uid_counter: AtomicU64::new(1),
            uid_seed: seed,
            bookmark_interval,
            quota_lock: std::sync::Mutex::new(()),
            front_proxy: FrontProxy::generate().expect("a front-proxy CA (ring key generation)"),
        }
    }

    /// Every served kind: the built-in ones, then those of stored CRDs.
    pub(crate) fn defs(&self) -> Vec<ResourceDef> {
        let mut defs = self.builtins.clone();
        defs.extend(self.custom.read().map(|c| c.clone()).unwrap_or_default());
        defs
    }

    /// The kind served at `group`/`version` under `plural`.
    pub(crate) fn def(&self, group: &str, version: &str, plural: &str) -> Option<ResourceDef> {
        self.defs()
            .into_iter()
            .find(|d| d.group == group && d.version == version && d.plural == plural)
    }

    /// A kind whose objects are stored under `res` (any served version).
    pub(crate) fn defs_of(&self, res: &ResourceId) -> Option<ResourceDef> {
        self.defs()
            .into_iter()
            .find(|d| d.group == res.group && d.plural == res.resource)
    }

    /// A fresh, unique `metadata.uid`.
    pub(crate) fn new_uid(&self) -> String {
        let n = self.uid_counter.fetch_add(1, Ordering::Relaxed);
        let mixed = self
            .uid_seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(n);
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (mixed >> 32) as u32,
            (mixed >> 16) as u16,
            (n >> 12) & 0xfff,
            n & 0xfff,
            (mixed ^ n.rotate_left(17)) & 0xffff_ffff_ffff
        )
    }

    /// Five random characters for a `generateName` (as the real server).
    pub(crate) fn random_suffix(&self) -> String {
        const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let n = self.uid_counter.fetch_add(1, Ordering::Relaxed);
        let mut x = self.uid_seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (0..5)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                CHARS[(x % CHARS.len() as u64) as usize] as char
            })
            .collect()
    }

    /// Rebuilds the custom resources from the stored CRDs.
    pub(crate) fn refresh_crds(&self) {
        let (crds, _) = self.store.list(
            &ResourceId::new("apiextensions.k8s.io", "customresourcedefinitions"),
            None,
        );
        let defs: Vec<ResourceDef> = crds.iter().flat_map(resources_of_crd).collect();
        if let Ok(mut custom) = self.custom.write() {
            *custom = defs;
        }
    }
}
