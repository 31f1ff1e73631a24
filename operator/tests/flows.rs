//! The operator against the in-process API test server, with the node agents
//! simulated by the test (they renew their Leases and write what an agent
//! would): scheduling, a live migration from admission to the VM's move, a
//! migration held back by the per-node slot limit and cancelled by deleting
//! it, a failed migration, a restart by runStrategy, a missing template,
//! and leader election.

mod common;

use std::time::Duration;

use godwit_crds::contract::{Machine, MIGRATION_FINALIZER, SOURCE_LABEL, TARGET_LABEL};
use godwit_crds::{MigrationPhase, VMMigration, VmPhase};
use godwit_operator::{MigrationLimits, OperatorConfig};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, PostParams};
use kube::ResourceExt;
use serde_json::json;

use common::*;

fn config(id: &str) -> OperatorConfig {
    OperatorConfig {
        lease_namespace: LEASE_NS.into(),
        id: id.into(),
        migrations: MigrationLimits {
            per_node: 1,
            per_cluster: 5,
        },
        lease_duration: Duration::from_secs(3),
        renew_period: Duration::from_secs(1),
        requeue: Duration::from_secs(1),
        ..OperatorConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_migrate_cancel_fail_and_restart() {
    let (_server, client) = start().await;
    let nodes = ["node-1", "node-2"];
    cluster(&client, &nodes).await;
    let _agents = agents_renew(&client, &nodes);
    let operator = tokio::spawn(godwit_operator::run(client.clone(), config("op-test")));

    // Scheduling: spread puts the two VMs on different nodes.
    template(&client).await;
    create_vm(&client, "a", "base").await;
    let node_a = settled(&client, "a", VmPhase::Scheduled).await;
    create_vm(&client, "b", "base").await;
    let node_b = settled(&client, "b", VmPhase::Scheduled).await;
    assert_ne!(node_a, node_b, "spread");
    let a = vm(&client, "a").await;
    let machine: Machine = godwit_crds::contract::resolved_machine(&a).unwrap();
    assert_eq!(machine.memory_bytes, 512 << 20);
    assert_eq!(machine.networks[0].bridge, "godwit0");
    let scheduled = a.status.unwrap().conditions;
    assert!(scheduled
        .iter()
        .any(|c| c.type_ == "Scheduled" && c.status == "True"));
    let spread = format!("Scheduled on {node_a} (spread");
    event(&client, "a", "Scheduled", |n| n.starts_with(&spread)).await;
    assert_eq!(
        Api::<Lease>::namespaced(client.clone(), LEASE_NS)
            .get("godwit-operator")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("op-test")
    );

    // The agents start them.
    agent_sets_vm(&client, "a", VmPhase::Running).await;
    agent_sets_vm(&client, "b", VmPhase::Running).await;

    // m1 moves a: admitted to the only other node.
    create_migration(&client, "m1", "a", None).await;
    let m1 = eventually("m1 PreparingTarget", || async {
        let m = migration(&client, "m1").await?;
        (m.status.as_ref()?.phase == MigrationPhase::PreparingTarget
            && m.labels().contains_key(TARGET_LABEL))
        .then_some(m)
    })
    .await;
    let status = m1.status.clone().unwrap();
    assert_eq!(status.source_node.as_deref(), Some(node_a.as_str()));
    assert_eq!(status.target_node.as_deref(), Some(node_b.as_str()));
    assert!(status.start_time.is_some());
    assert_eq!(m1.labels().get(SOURCE_LABEL), Some(&node_a));
    assert_eq!(m1.labels().get(TARGET_LABEL), Some(&node_b));
    assert!(m1.finalizers().iter().any(|f| f == MIGRATION_FINALIZER));
    let a = vm(&client, "a").await;
    assert_eq!(phase_of(&a), VmPhase::Migrating);
    assert_eq!(a.status.unwrap().migration.as_deref(), Some("m1"));

    // m2 for b: node_b is m1's target and a node allows one migration.
    create_migration(&client, "m2", "b", None).await;
    eventually("m2 waiting for a slot", || async {
        let m = migration(&client, "m2").await?;
        let s = m.status?;
        (s.phase == MigrationPhase::Pending
            && s.conditions.iter().any(|c| {
                c.type_ == "Admitted" && c.status == "False" && c.reason == "WaitingForSlot"
            }))
        .then_some(())
    })
    .await;
    // Deleted while Pending: Cancelled, then gone; b untouched.
    Api::<VMMigration>::namespaced(client.clone(), NS)
        .delete("m2", &DeleteParams::default())
        .await
        .unwrap();
    eventually("m2 gone", || async {
        migration(&client, "m2").await.is_none().then_some(())
    })
    .await;
    let b = vm(&client, "b").await;
    assert_eq!(phase_of(&b), VmPhase::Running);
    assert_eq!(node_of(&b), Some(node_b.clone()));
    event(&client, "m2", "Cancelled", |_| true).await;

    // The source agent migrates a and reports success.
    agent_sets_migration(
        &client,
        "m1",
        json!({"phase": "PreCopy", "targetAddress": "10.88.0.2:7000"}),
    )
    .await;
    agent_sets_migration(
        &client,
        "m1",
        json!({
            "phase": "Succeeded",
            "endTime": "2030-01-01T00:00:00Z",
            "result": {"totalTimeMs": 812, "downtimeMs": 9, "transferredBytes": 1, "rounds": 3, "modeUsed": "PreCopy"},
        }),
    )
    .await;
    let moved_to = settled(&client, "a", VmPhase::Running).await;
    assert_eq!(moved_to, node_b, "a runs on m1's target");
    eventually("m1's finalizer released", || async {
        migration(&client, "m1")
            .await?
            .finalizers()
            .is_empty()
            .then_some(())
    })
    .await;
    let migrated = format!(
        "Live-migrated from {node_a} to {node_b} in 812 ms, downtime 9 ms (VMMigration m1)"
    );
    event(&client, "a", "Migrated", |n| n == migrated).await;

    // m3 moves b to node_a (slots are free again); the agent reports failure.
    create_migration(&client, "m3", "b", Some(&node_a)).await;
    eventually("m3 admitted", || async {
        let m = migration(&client, "m3").await?;
        (m.status?.phase == MigrationPhase::PreparingTarget).then_some(())
    })
    .await;
    agent_sets_migration(
        &client,
        "m3",
        json!({"phase": "Failed", "failureReason": "target closed the connection"}),
    )
    .await;
    // Until the target's agent says its incoming VMM is gone, the VM stays
    // with the migration: nothing may start it on the source meanwhile.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let held = vm(&client, "b").await.status.unwrap_or_default();
    assert_eq!(
        held.migration.as_deref(),
        Some("m3"),
        "the VM is given back before the target released it: {held:?}"
    );
    agent_sets_migration(&client, "m3", json!({"targetReleased": true})).await;
    let stayed = settled(&client, "b", VmPhase::Running).await;
    assert_eq!(
        stayed, node_b,
        "a failed migration leaves the VM on its source"
    );
    event(&client, "b", "MigrationFailed", |n| {
        n.ends_with("target closed the connection")
    })
    .await;

    // runStrategy Always: a failed VM is started again on its node.
    agent_sets_vm(&client, "b", VmPhase::Failed).await;
    let restarted_on = settled(&client, "b", VmPhase::Scheduled).await;
    assert_eq!(restarted_on, node_b);
    event(&client, "b", "Restarting", |_| true).await;

    // A VM whose template does not exist waits and says why.
    create_vm(&client, "c", "missing").await;
    eventually("c held for its template", || async {
        let v = vm(&client, "c").await;
        let s = v.status?;
        (s.phase == VmPhase::Pending
            && node_of(&vm(&client, "c").await).is_none()
            && s.conditions
                .iter()
                .any(|c| c.type_ == "Scheduled" && c.reason == "TemplateMissing"))
        .then_some(())
    })
    .await;

    operator.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time() {
    let (_server, client) = start().await;
    let nodes = ["node-1"];
    cluster(&client, &nodes).await;
    let _agents = agents_renew(&client, &nodes);
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NS);
    let holder = || async {
        leases
            .get_opt("godwit-operator")
            .await
            .unwrap()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
    };

    let first = tokio::spawn(godwit_operator::run(client.clone(), config("first")));
    eventually("first leads", || async {
        (holder().await.as_deref() == Some("first")).then_some(())
    })
    .await;
    let second = tokio::spawn(godwit_operator::run(client.clone(), config("second")));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        holder().await.as_deref(),
        Some("first"),
        "no takeover of a live lease"
    );

    // The first dies without releasing: the second takes over once the
    // lease runs out, and its controllers work.
    first.abort();
    eventually("second leads", || async {
        (holder().await.as_deref() == Some("second")).then_some(())
    })
    .await;
    template(&client).await;
    create_vm(&client, "a", "base").await;
    assert_eq!(settled(&client, "a", VmPhase::Scheduled).await, "node-1");

    // Someone else writes the Lease: the second stops with an error.
    let mut lease = leases.get("godwit-operator").await.unwrap();
    lease.spec.as_mut().unwrap().holder_identity = Some("intruder".into());
    lease.spec.as_mut().unwrap().renew_time = Some(MicroTime(Timestamp::now()));
    leases
        .replace("godwit-operator", &PostParams::default(), &lease)
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the second stops")
        .unwrap();
    let error = ended.unwrap_err();
    assert!(
        matches!(
            error,
            godwit_operator::OperatorError::Leadership(godwit_operator::leader::LeaderError::Lost(ref h)) if h == "intruder"
        ),
        "{error:?}"
    );
}
