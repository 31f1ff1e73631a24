//! Finished migrations are history: each VM keeps its newest
//! `--finished-migrations-kept` (default 5, as KubeVirt keeps), and the
//! operator deletes the older ones whenever another one of the VM's
//! migrations finishes (its finalizer released).
//!
//! Finished means a final phase (`Succeeded`, `Failed`, `Cancelled`) with
//! the operator's finalizer gone: a migration still being wound up is
//! never deleted. Newest by `status.endTime`, then by creation.

use godwit_crds::VMMigration;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams};
use kube::ResourceExt;
use tracing::info;

use super::decide::has_finalizer;
use crate::view::migration_phase;

/// Of `migrations`, the finished ones of VM `vm` in namespace `namespace`
/// beyond the newest `keep`, newest first.
pub fn beyond_kept<'a>(
    migrations: &'a [VMMigration],
    namespace: &str,
    vm: &str,
    keep: usize,
) -> Vec<&'a VMMigration> {
    let ended = |m: &VMMigration| -> Option<Timestamp> {
        m.status
            .as_ref()
            .and_then(|s| s.end_time.as_ref())
            .map(|t| t.0)
            .or_else(|| m.metadata.creation_timestamp.as_ref().map(|t| t.0))
    };
    let mut finished: Vec<&VMMigration> = migrations
        .iter()
        .filter(|m| m.namespace().as_deref() == Some(namespace) && m.spec.vm_name == vm)
        .filter(|m| migration_phase(m).is_final() && !has_finalizer(m))
        .filter(|m| m.metadata.deletion_timestamp.is_none())
        .collect();
    // Newest first; the name breaks ties so the order is stable.
    finished.sort_by(|a, b| {
        ended(b)
            .cmp(&ended(a))
            .then_with(|| b.name_any().cmp(&a.name_any()))
    });
    finished.into_iter().skip(keep).collect()
}

/// Deletes the finished migrations of `vm` in `namespace` beyond the newest
/// `keep`. One that is gone already is no error.
pub async fn collect(
    client: &kube::Client,
    namespace: &str,
    vm: &str,
    keep: usize,
) -> Result<(), kube::Error> {
    let api: Api<VMMigration> = Api::namespaced(client.clone(), namespace);
    let all = api.list(&ListParams::default()).await?.items;
    for m in beyond_kept(&all, namespace, vm, keep) {
        let name = m.name_any();
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                info!(migration = %name, vm, keep, "finished migration deleted (older than the newest kept)")
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use godwit_crds::{MigrationPhase, VMMigrationStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::fixtures::{at, migration, MigrationFixture};

    fn ended(name: &str, vm: &str, phase: MigrationPhase, secs: i64) -> VMMigration {
        migration(name, vm).with_status(VMMigrationStatus {
            phase,
            end_time: Some(Time(at(secs))),
            ..Default::default()
        })
    }

    fn names(ms: Vec<&VMMigration>) -> Vec<String> {
        ms.into_iter().map(|m| m.name_any()).collect()
    }

    #[test]
    fn only_finished_migrations_of_the_vm_beyond_the_newest_kept_go() {
        use MigrationPhase::*;
        let all = vec![
            ended("a1", "a", Succeeded, 10),
            ended("a2", "a", Failed, 20),
            ended("a3", "a", Cancelled, 30),
            ended("a4", "a", Succeeded, 40),
            // Running, or final but still being wound up: never.
            migration("a5", "a").phase(PreCopy),
            ended("a6", "a", Succeeded, 5).finalized(),
            // Another VM's, and the same name in another namespace.
            ended("b1", "b", Succeeded, 1),
            {
                let mut m = ended("a0", "a", Succeeded, 1);
                m.metadata.namespace = Some("other".into());
                m
            },
        ];
        assert_eq!(names(beyond_kept(&all, "default", "a", 2)), ["a2", "a1"]);
        assert_eq!(
            names(beyond_kept(&all, "default", "a", 4)),
            Vec::<String>::new()
        );
        assert_eq!(
            names(beyond_kept(&all, "default", "a", 1)),
            ["a3", "a2", "a1"]
        );
        assert_eq!(names(beyond_kept(&all, "other", "a", 0)), ["a0"]);
    }

    #[test]
    fn without_an_end_time_the_creation_time_orders() {
        let mut old = migration("old", "a").phase(MigrationPhase::Failed);
        old.metadata.creation_timestamp = Some(Time(at(1)));
        let new = ended("new", "a", MigrationPhase::Succeeded, 50);
        let all = vec![old, new];
        assert_eq!(names(beyond_kept(&all, "default", "a", 1)), ["old"]);
    }
}
