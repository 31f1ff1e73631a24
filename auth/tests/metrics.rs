//! `/metrics` behind delegated authentication, against the test API server:
//! no token is 401, a user without RBAC is 403, a service account bound to a
//! role with `get` on `/metrics` is served, `/healthz` needs nothing, and an
//! unreachable API server is 503.

use std::sync::Arc;

use godwit_auth::{serve_metrics, Delegated, Render};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SCRAPER: &str = "system:serviceaccount:monitoring:prometheus";

/// One HTTP/1.1 request; returns the status code and the whole response.
async fn get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, response)
}

async fn create(client: &Client, kind: &str, plural: &str, object: serde_json::Value) {
    let gvk = GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", kind);
    let api: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    );
    let object: DynamicObject = serde_json::from_value(object).unwrap();
    api.create(&PostParams::default(), &object).await.unwrap();
}

async fn metrics_server(client: Client) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let render: Render = Arc::new(|| "# TYPE up gauge\nup 1\n# EOF\n".to_string());
    tokio::spawn(serve_metrics(
        listener,
        Arc::new(Delegated::new(client)),
        render,
    ));
    addr
}

#[tokio::test]
async fn metrics_need_a_token_whose_user_rbac_allows() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = godwit_apiserver::serve(listener).await.unwrap();
    let client = Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
    create(
        &client,
        "ClusterRole",
        "clusterroles",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "godwit-metrics-reader"},
               "rules": [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]}),
    )
    .await;
    create(
        &client,
        "ClusterRoleBinding",
        "clusterrolebindings",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "prometheus-godwit"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                           "name": "godwit-metrics-reader"},
               "subjects": [{"kind": "ServiceAccount", "name": "prometheus",
                             "namespace": "monitoring"}]}),
    )
    .await;
    let addr = metrics_server(client).await;

    let (code, text) = get(&addr, "/metrics", None).await;
    assert_eq!(code, 401, "{text}");
    assert!(
        text.contains("WWW-Authenticate: Bearer") || text.contains("www-authenticate: Bearer"),
        "{text}"
    );
    assert!(
        text.contains("godwit-metrics-reader"),
        "the refusal names the fix: {text}"
    );

    let (code, text) = get(&addr, "/metrics", Some("alice")).await;
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("\"alice\""), "{text}");
    assert!(!text.contains("up 1"), "{text}");

    let (code, text) = get(&addr, "/metrics", Some(SCRAPER)).await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("up 1\n"), "{text}");
    assert!(text.contains("application/openmetrics-text"), "{text}");

    // Same namespace, another account: not bound.
    let (code, _) = get(
        &addr,
        "/metrics",
        Some("system:serviceaccount:monitoring:other"),
    )
    .await;
    assert_eq!(code, 403);

    let (code, _) = get(&addr, "/healthz", None).await;
    assert_eq!(code, 200);
    let (code, _) = get(&addr, "/other", Some(SCRAPER)).await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn an_unreachable_api_server_is_503_not_an_open_door() {
    // A port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let client = Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let addr = metrics_server(client).await;
    let (code, text) = get(&addr, "/metrics", Some(SCRAPER)).await;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("tokenreviews"), "{text}");
    assert!(!text.contains("up 1"), "{text}");
}
