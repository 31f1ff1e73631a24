//! The migration CA's Secret against the in-process API test server: the
//! operator makes it when it is missing, keeps it afterwards (the same
//! bytes), and keeps a Secret the user brought.

mod common;

use godwit_operator::migration_ca::{ensure, CaSecret, Outcome};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};

use common::*;

fn ca(name: &str) -> CaSecret {
    CaSecret {
        namespace: LEASE_NS.into(),
        name: name.into(),
        validity_days: 365,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_secret_is_made_once_and_a_users_own_is_kept() {
    let (_server, client) = start().await;
    cluster(&client, &["node-1"]).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), LEASE_NS);

    assert_eq!(
        ensure(&client, &ca("made")).await.unwrap(),
        Outcome::Created
    );
    let made = secrets.get("made").await.unwrap();
    let data = made.data.clone().unwrap();
    let crt = String::from_utf8(data["ca.crt"].0.clone()).unwrap();
    let key = String::from_utf8(data["ca.key"].0.clone()).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(crt.as_bytes()).unwrap();
    assert!(pem.parse_x509().unwrap().is_ca());
    assert!(key.contains("PRIVATE KEY"));
    // A second operator (or a restart) keeps it as it is.
    assert_eq!(ensure(&client, &ca("made")).await.unwrap(), Outcome::Kept);
    assert_eq!(secrets.get("made").await.unwrap().data, made.data);

    // A user's own CA, made before the operator runs, is never replaced.
    let own = Secret {
        metadata: ObjectMeta {
            name: Some("own".into()),
            namespace: Some(LEASE_NS.into()),
            ..Default::default()
        },
        data: Some(
            [
                ("ca.crt".to_string(), ByteString(b"MY CERT".to_vec())),
                ("ca.key".to_string(), ByteString(b"MY KEY".to_vec())),
            ]
            .into(),
        ),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &own).await.unwrap();
    assert_eq!(ensure(&client, &ca("own")).await.unwrap(), Outcome::Kept);
    let kept = secrets.get("own").await.unwrap().data.unwrap();
    assert_eq!(kept["ca.key"].0, b"MY KEY");
}
