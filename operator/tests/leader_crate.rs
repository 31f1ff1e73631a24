//! Why the operator keeps its own leader election (`leader.rs`) rather than
//! `kube-lease-manager` (0.13, on kube 5), as issue 24 asks it to show.
//!
//! A leader must stop leading once it has not renewed its Lease for a lease
//! duration: by then a follower may take the Lease over, and two operators
//! would decide at once (two targets for one migration, a VM started twice).
//! This matters exactly when the leader cannot reach the API server, which
//! is when it cannot learn of the takeover either. `Elector::hold` returns
//! `RenewTimedOut` then, and the process exits. The crate's watch loop
//! logs the failed renewals and retries; the holder it last read stays in
//! its state, so its channel keeps saying `true` well past the expiry.
//!
//! If the crate learns to step down, the second assertion fails: then it
//! can replace `leader.rs`.

use std::time::Duration;

use godwit_apiserver::serve;
use godwit_operator::leader::{Elector, LeaderError};
use godwit_operator::OperatorConfig;
use kube::{Client, Config};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::net::TcpListener;

const DURATION_SECONDS: u64 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_server_steps_down_only_with_ours() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = serve(listener).await.unwrap();
    let client = Client::try_from(Config::new(server.url().parse().unwrap())).unwrap();

    // Both lead, each on its own Lease in `default`, for 2 s per renewal.
    let manager = LeaseManagerBuilder::new(client.clone(), "crate-lease")
        .with_namespace("default")
        .with_identity("crate")
        .with_duration(DURATION_SECONDS)
        .with_grace(1)
        .build()
        .await
        .expect("the crate's lease manager");
    let (mut leading, _task) = manager.watch().await;
    tokio::time::timeout(Duration::from_secs(10), leading.wait_for(|l| *l))
        .await
        .expect("the crate's manager leads within 10 s")
        .expect("its channel stays open");
    let config = OperatorConfig {
        lease_namespace: "default".into(),
        id: "ours".into(),
        lease_duration: Duration::from_secs(DURATION_SECONDS),
        renew_period: Duration::from_millis(500),
        ..OperatorConfig::default()
    };
    let elector = Elector::new(client, &config);
    tokio::time::timeout(Duration::from_secs(10), elector.acquire())
        .await
        .expect("ours leads within 10 s");
    let ours = tokio::spawn(async move { elector.hold().await });

    // The API server goes away: no renewal can succeed any more.
    server.shutdown().await;

    let lost = tokio::time::timeout(Duration::from_secs(4 * DURATION_SECONDS), ours)
        .await
        .expect("ours steps down within a few lease durations")
        .unwrap();
    assert!(
        matches!(lost, LeaderError::RenewTimedOut(..)),
        "ours: {lost:?}"
    );
    // Three lease durations after the last renewal, the crate still leads.
    tokio::time::sleep(Duration::from_secs(3 * DURATION_SECONDS)).await;
    assert!(
        *leading.borrow(),
        "kube-lease-manager now steps down when it cannot renew: it may replace leader.rs"
    );
}
