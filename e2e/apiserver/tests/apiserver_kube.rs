//! kube-rs clients against the in-memory API test server: `Api` verbs,
//! `watcher`, `Controller` (with a finalizer), recovery after forced watch
//! expiry, Lease-based leader election, the event `Recorder`, and
//! server-side apply by two field managers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use godwit_apiserver::{serve, serve_with, ApiServerHandle, ServerConfig};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::core::{ApiResource, GroupVersionKind, ObjectMeta};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as RecordedEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::watcher::{self, watcher, Event};
use kube::{Client, Config};
use serde_json::json;
use tokio::net::TcpListener;

async fn start() -> (ApiServerHandle, Client) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = serve(listener).await.unwrap();
    let config = Config::new(server.url().parse().unwrap());
    let client = Client::try_from(config).unwrap();
    (server, client)
}

fn configmap(name: &str, value: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([("app".to_string(), "test".to_string())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("v".to_string(), value.to_string())])),
        ..Default::default()
    }
}

fn value_of(cm: &ConfigMap) -> String {
    cm.data
        .as_ref()
        .and_then(|d| d.get("v").cloned())
        .unwrap_or_default()
}

async fn expire_watches(client: &Client) {
    let request = http::Request::post("/debug/expire-watches")
        .body(Vec::new())
        .unwrap();
    client.request_text(request).await.expect("expire watches");
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn widget_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("test.godwit.dev", "v1", "Widget"),
        "widgets",
    )
}

async fn install_widget_crd(client: &Client) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/widget-crd.yaml"
    );
    let crd: CustomResourceDefinition =
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &crd)
        .await
        .unwrap();
}

fn widget(name: &str, cpu: i64) -> DynamicObject {
    DynamicObject::new(name, &widget_resource())
        .data(json!({"spec": {"cpu": cpu, "image": "base"}}))
}

fn api_code(error: kube::Error) -> u16 {
    match error {
        kube::Error::Api(status) => status.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_verbs_status_subresource_and_conflicts() {
    let (_server, client) = start().await;
    install_widget_crd(&client).await;
    let widgets: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &widget_resource());

    // A CRD must be named plural.group.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/widget-crd.yaml"
    );
    let mut misnamed: CustomResourceDefinition =
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    misnamed.metadata.name = Some("widgets.example.com".into());
    let error = Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &misnamed)
        .await
        .unwrap_err();
    assert_eq!(api_code(error), 422);

    let created = widgets
        .create(&PostParams::default(), &widget("w1", 2))
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());

    // A stale resourceVersion conflicts.
    let mut stale = created.clone();
    widgets
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cpu": 3}})),
        )
        .await
        .unwrap();
    stale.data["spec"]["cpu"] = json!(5);
    let error = widgets
        .replace("w1", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert_eq!(api_code(error), 409);

    // Status goes through the subresource only; spec changes bump generation.
    let patched = widgets
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data["status"]["phase"], "Running");
    assert_eq!(patched.metadata.generation, Some(2));
    let current = widgets.get("w1").await.unwrap();
    let mut replaced = current.clone();
    replaced.data["status"] = json!({"phase": "Ignored"});
    replaced.data["spec"]["cpu"] = json!(6);
    let replaced = widgets
        .replace("w1", &PostParams::default(), &replaced)
        .await
        .unwrap();
    assert_eq!(replaced.data["status"]["phase"], "Running");
    assert_eq!(replaced.metadata.generation, Some(3));

    // Invalid objects are refused with the field named.
    let error = widgets
        .create(&PostParams::default(), &widget("bad", 0))
        .await
        .unwrap_err();
    match error {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 422);
            assert!(status.message.contains("spec.cpu"), "{}", status.message);
        }
        other => panic!("unexpected {other:?}"),
    }

    // Dry-run creates nothing; server-side apply creates, then merges what
    // it sets and removes what the same manager stopped setting.
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    widgets.create(&dry, &widget("dry", 1)).await.unwrap();
    assert!(widgets.get_opt("dry").await.unwrap().is_none());
    let apply = PatchParams::apply("godwit-test").force();
    let mut applied = widget("w2", 1);
    applied.metadata.labels = Some(BTreeMap::from([("tier".to_string(), "web".to_string())]));
    widgets
        .patch("w2", &apply, &Patch::Apply(&applied))
        .await
        .unwrap();
    let applied = widgets
        .patch(
            "w2",
            &apply,
            &Patch::Apply(json!({
                "apiVersion": "test.godwit.dev/v1", "kind": "Widget",
                "metadata": {"labels": {"tier": "web"}},
                "spec": {"cpu": 4},
            })),
        )
        .await
        .unwrap();
    assert_eq!(applied.data["spec"]["cpu"], 4);
    assert!(applied.data["spec"].get("image").is_none(), "{applied:?}");

    let listed = widgets
        .list(&ListParams::default().labels("tier=web"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].metadata.name.as_deref(), Some("w2"));

    // generateName.
    let mut generated = widget("", 1);
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let generated = widgets
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    assert!(generated.metadata.name.unwrap().starts_with("gen-"));

    widgets
        .delete("w1", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(api_code(widgets.get("w1").await.unwrap_err()), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_sees_changes_in_order() {
    let (_server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut stream = watcher(api.clone(), watcher::Config::default().labels("app=test")).boxed();
    loop {
        if let Event::InitDone = stream.try_next().await.unwrap().unwrap() {
            break;
        }
    }
    api.create(&PostParams::default(), &configmap("x", "1"))
        .await
        .unwrap();
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "2"}})),
    )
    .await
    .unwrap();
    api.delete("x", &DeleteParams::default()).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
            .await
            .expect("watch event in time")
            .unwrap()
            .unwrap();
        match event {
            Event::Apply(cm) => seen.push(format!("apply {}", value_of(&cm))),
            Event::Delete(cm) => seen.push(format!("delete {}", value_of(&cm))),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["apply 1", "apply 2", "delete 2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_recovers_after_forced_expiry() {
    let (server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &configmap("a", "1"))
        .await
        .unwrap();

    let cache: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let inits = Arc::new(Mutex::new(0usize));
    let (task_cache, task_inits) = (cache.clone(), inits.clone());
    let task = tokio::spawn(async move {
        let mut stream = watcher(api_for(&client), watcher::Config::default()).boxed();
        let mut buffer = BTreeMap::new();
        while let Some(event) = stream.next().await {
            let Ok(event) = event else { continue };
            let mut cache = task_cache.lock().unwrap();
            match event {
                Event::Init => {
                    *task_inits.lock().unwrap() += 1;
                    buffer.clear();
                }
                Event::InitApply(cm) => {
                    buffer.insert(cm.metadata.name.clone().unwrap(), value_of(&cm));
                }
                Event::InitDone => *cache = std::mem::take(&mut buffer),
                Event::Apply(cm) => {
                    cache.insert(cm.metadata.name.clone().unwrap(), value_of(&cm));
                }
                Event::Delete(cm) => {
                    cache.remove(cm.metadata.name.as_deref().unwrap());
                }
            }
        }
    });
    let snapshot = |cache: &Arc<Mutex<BTreeMap<String, String>>>| cache.lock().unwrap().clone();
    eventually("initial list", || async {
        snapshot(&cache).get("a").map(String::as_str) == Some("1")
    })
    .await;

    let client = Client::try_from(Config::new(server.url().parse().unwrap())).unwrap();
    expire_watches(&client).await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "2"}})),
    )
    .await
    .unwrap();
    api.create(&PostParams::default(), &configmap("b", "1"))
        .await
        .unwrap();
    eventually("changes after expiry", || async {
        let view = snapshot(&cache);
        view.get("a").map(String::as_str) == Some("2") && view.contains_key("b")
    })
    .await;
    api.delete("b", &DeleteParams::default()).await.unwrap();
    eventually("delete after expiry", || async {
        !snapshot(&cache).contains_key("b")
    })
    .await;
    assert!(
        *inits.lock().unwrap() >= 2,
        "the watcher did not re-list after 410"
    );
    task.abort();
}

fn api_for(client: &Client) -> Api<ConfigMap> {
    Api::namespaced(client.clone(), "default")
}

struct Ctx {
    api: Api<ConfigMap>,
    seen: Mutex<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
#[error("Finalizer failed")]
struct ReconcileError(#[source] kube::runtime::finalizer::Error<kube::Error>);

async fn reconcile(cm: Arc<ConfigMap>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    let recorder = ctx.clone();
    finalizer(
        &ctx.api,
        "test.godwit.dev/cleanup",
        cm,
        |event| async move {
            let entry = match &event {
                Finalizer::Apply(cm) => format!(
                    "apply {} {}",
                    cm.metadata.name.as_deref().unwrap_or(""),
                    value_of(cm)
                ),
                Finalizer::Cleanup(cm) => {
                    format!("cleanup {}", cm.metadata.name.as_deref().unwrap_or(""))
                }
            };
            let mut seen = recorder.seen.lock().unwrap();
            if seen.last() != Some(&entry) {
                seen.push(entry);
            }
            Ok::<_, kube::Error>(Action::await_change())
        },
    )
    .await
    .map_err(ReconcileError)
}

fn error_policy(_: Arc<ConfigMap>, _: &ReconcileError, _: Arc<Ctx>) -> Action {
    Action::requeue(Duration::from_millis(100))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_with_finalizer_sees_create_update_delete_across_expiry() {
    let (_server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let ctx = Arc::new(Ctx {
        api: api.clone(),
        seen: Mutex::new(Vec::new()),
    });
    let controller = tokio::spawn(
        Controller::new(api.clone(), watcher::Config::default().labels("app=test"))
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|_| async {}),
    );
    let seen = || ctx.seen.lock().unwrap().clone();
    let has = |entry: &str| {
        let entry = entry.to_string();
        async move { seen().contains(&entry) }
    };
    api.create(&PostParams::default(), &configmap("x", "1"))
        .await
        .unwrap();
    eventually("apply 1", || has("apply x 1")).await;
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "2"}})),
    )
    .await
    .unwrap();
    eventually("apply 2", || has("apply x 2")).await;

    expire_watches(&client).await;
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "3"}})),
    )
    .await
    .unwrap();
    eventually("apply 3 after expiry", || has("apply x 3")).await;
    let held = api.get("x").await.unwrap();
    assert_eq!(
        held.metadata.finalizers,
        Some(vec!["test.godwit.dev/cleanup".to_string()])
    );

    api.delete("x", &DeleteParams::default()).await.unwrap();
    eventually("cleanup", || has("cleanup x")).await;
    eventually("object gone", || {
        let api = api.clone();
        async move { api.get_opt("x").await.unwrap().is_none() }
    })
    .await;
    assert_eq!(seen(), ["apply x 1", "apply x 2", "apply x 3", "cleanup x"]);
    controller.abort();
}

fn lease(holder: &str, duration: i32) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some("godwit-operator".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(duration),
            acquire_time: Some(MicroTime(Timestamp::now())),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    }
}

/// One round of a minimal leader election: take the lease when absent,
/// held by us, or expired; a conflict means someone else won the round.
async fn try_lead(api: &Api<Lease>, me: &str) -> bool {
    match api.get_opt("godwit-operator").await.unwrap() {
        None => api
            .create(&PostParams::default(), &lease(me, 1))
            .await
            .is_ok(),
        Some(current) => {
            let spec = current.spec.clone().unwrap_or_default();
            let renewed = spec
                .renew_time
                .map(|t| t.0)
                .unwrap_or(Timestamp::UNIX_EPOCH);
            let expired = Timestamp::now().duration_since(renewed).as_secs_f64()
                > f64::from(spec.lease_duration_seconds.unwrap_or(1));
            if spec.holder_identity.as_deref() != Some(me) && !expired {
                return false;
            }
            let mut next = lease(me, 1);
            next.metadata = current.metadata.clone();
            match api
                .replace("godwit-operator", &PostParams::default(), &next)
                .await
            {
                Ok(_) => true,
                Err(kube::Error::Api(status)) if status.code == 409 => false,
                Err(other) => panic!("lease update failed: {other}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_leader_election_with_conflicts() {
    let (_server, client) = start().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    assert!(try_lead(&leases, "a").await);
    assert!(!try_lead(&leases, "b").await, "b took a held lease");
    assert!(try_lead(&leases, "a").await, "a could not renew");
    let error = leases
        .create(&PostParams::default(), &lease("b", 1))
        .await
        .unwrap_err();
    assert_eq!(api_code(error), 409);

    // Two contenders read the same version; only the first write wins.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let seen_by_a = leases.get("godwit-operator").await.unwrap();
    let seen_by_b = seen_by_a.clone();
    let mut take_a = lease("a", 1);
    take_a.metadata = seen_by_a.metadata;
    let mut take_b = lease("b", 1);
    take_b.metadata = seen_by_b.metadata;
    leases
        .replace("godwit-operator", &PostParams::default(), &take_b)
        .await
        .unwrap();
    let error = leases
        .replace("godwit-operator", &PostParams::default(), &take_a)
        .await
        .unwrap_err();
    assert_eq!(api_code(error), 409);
    assert!(!try_lead(&leases, "a").await);
    let holder = leases
        .get("godwit-operator")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert_eq!(holder.as_deref(), Some("b"));

    // After b stops renewing, a takes over.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(try_lead(&leases, "a").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorder_publishes_events() {
    let (server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm = api
        .create(&PostParams::default(), &configmap("subject", "1"))
        .await
        .unwrap();
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("ConfigMap".into()),
        name: cm.metadata.name.clone(),
        namespace: cm.metadata.namespace.clone(),
        uid: cm.metadata.uid.clone(),
        ..Default::default()
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "godwit-test".into(),
            instance: Some("test-0".into()),
        },
    );
    let event = RecordedEvent {
        type_: EventType::Normal,
        reason: "Provisioned".into(),
        note: Some("disk ready".into()),
        action: "Provision".into(),
        secondary: None,
    };
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap();
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "default");
    let listed = events.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        listed.items.len(),
        1,
        "the repeat should update the same event"
    );
    let published = &listed.items[0];
    assert_eq!(published.reason.as_deref(), Some("Provisioned"));
    assert_eq!(
        published.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("subject")
    );
    assert!(server
        .requests()
        .iter()
        .any(|r| r.api_group == "events.k8s.io" && r.verb == "create" && r.code == 201));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_godwit_kinds_from_the_crds_crate() {
    use godwit_crds::VirtualMachine;

    let (_server, client) = start().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in godwit_crds::crds() {
        crds.create(&PostParams::default(), &crd).await.unwrap();
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/vm.yaml");
    let vm: VirtualMachine =
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let created = vms.create(&PostParams::default(), &vm).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let patched = vms
        .patch_status(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Scheduled", "nodeName": "node-1"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&patched).unwrap()["status"]["nodeName"],
        "node-1"
    );
    let listed = vms
        .list(&ListParams::default().labels("app=demo"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
}

/// Server-side apply by two field managers to one VM's conditions
/// (`x-kubernetes-list-type: map` keyed on `type`): each keeps its own, a
/// manager that stops applying a condition removes only one it owned, and
/// changing the other's condition is a conflict unless forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_field_managers_apply_their_own_conditions() {
    use godwit_crds::VirtualMachine;

    let (_server, client) = start().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in godwit_crds::crds() {
        crds.create(&PostParams::default(), &crd).await.unwrap();
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/vm.yaml");
    let vm: VirtualMachine =
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    vms.create(&PostParams::default(), &vm).await.unwrap();
    let apply = |manager: &'static str, conditions: serde_json::Value| {
        let vms = vms.clone();
        async move {
            let config = json!({
                "apiVersion": "godwit.dev/v1alpha1", "kind": "VirtualMachine",
                "metadata": {"name": "demo"},
                "status": {"conditions": conditions},
            });
            vms.patch_status("demo", &PatchParams::apply(manager), &Patch::Apply(config))
                .await
                .unwrap()
        }
    };
    let condition = |kind: &str, status: &str| {
        json!({"type": kind, "status": status, "reason": "Test", "message": "",
               "lastTransitionTime": "2026-01-01T00:00:00Z"})
    };
    let types = |vm: &VirtualMachine| -> Vec<String> {
        let status = vm.status.as_ref().expect("status");
        status.conditions.iter().map(|c| c.type_.clone()).collect()
    };

    apply("a", json!([condition("Scheduled", "True")])).await;
    let both = apply("b", json!([condition("Ready", "False")])).await;
    assert_eq!(types(&both), ["Scheduled", "Ready"]);
    let managers: Vec<(String, Option<String>)> = both
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .map(|entry| (entry.manager.unwrap_or_default(), entry.subresource))
        .collect();
    assert_eq!(
        managers,
        [
            ("a".to_string(), Some("status".to_string())),
            ("b".to_string(), Some("status".to_string()))
        ]
    );

    // a changes its own condition: b's stays as it was.
    let changed = apply("a", json!([condition("Scheduled", "False")])).await;
    assert_eq!(types(&changed), ["Scheduled", "Ready"]);
    assert_eq!(changed.status.unwrap().conditions[0].status, "False");
    // a applies without Ready, which b owns: nothing of b's goes.
    let kept = apply("a", json!([condition("Scheduled", "False")])).await;
    assert_eq!(types(&kept), ["Scheduled", "Ready"]);
    // a applies without its Scheduled: only Scheduled goes.
    let dropped = apply("a", json!([])).await;
    assert_eq!(types(&dropped), ["Ready"]);
    // The spec was never touched by the status applies.
    assert_eq!(dropped.spec, vm.spec);

    // a setting b's Ready to another status conflicts, unless forced.
    let config = json!({
        "apiVersion": "godwit.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "demo"},
        "status": {"conditions": [condition("Ready", "True")]},
    });
    let refused = vms
        .patch_status("demo", &PatchParams::apply("a"), &Patch::Apply(&config))
        .await
        .unwrap_err();
    match refused {
        kube::Error::Api(status) => {
            assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
            assert!(
                status
                    .message
                    .contains(r#"conflict with "b": .status.conditions[type="Ready"].status"#),
                "{}",
                status.message
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let forced = vms
        .patch_status(
            "demo",
            &PatchParams::apply("a").force(),
            &Patch::Apply(&config),
        )
        .await
        .unwrap();
    assert_eq!(forced.status.unwrap().conditions[0].status, "True");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_watch_bookmarks_timeout_and_gone() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = ServerConfig {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let server = serve_with(listener, config).await.unwrap();
    let client = Client::try_from(Config::new(server.url().parse().unwrap())).unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let created = api
        .create(&PostParams::default(), &configmap("w", "1"))
        .await
        .unwrap();
    let rv = created.metadata.resource_version.clone().unwrap();

    // Bookmarks arrive, and the watch ends after timeoutSeconds.
    let started = std::time::Instant::now();
    let params = WatchParams::default().timeout(1);
    let events: Vec<_> = api.watch(&params, &rv).await.unwrap().collect().await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let bookmarks = events
        .iter()
        .filter(|e| matches!(e, Ok(WatchEvent::Bookmark(b)) if b.metadata.resource_version == rv))
        .count();
    assert!(bookmarks >= 2, "{events:?}");

    // Resuming from a version older than the history is 410 Gone.
    server.expire_watches();
    let mut stream = api
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Error(status)) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected 410, got {other:?}"),
    }

    // A streaming list (sendInitialEvents) ends its initial events with a
    // bookmark, and kube's watcher can use it.
    let mut stream = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut initial = Vec::new();
    loop {
        match stream.try_next().await.unwrap().unwrap() {
            Event::InitApply(cm) => initial.push(cm.metadata.name.unwrap()),
            Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(initial, ["w"]);
}

/// Protobuf is not served: a client that accepts only protobuf gets 406
/// Not Acceptable (client-go lists JSON too, and gets JSON).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_only_accept_is_not_acceptable() {
    let (_server, client) = start().await;
    let path = "/api/v1/namespaces/default/configmaps";
    let only_protobuf = http::Request::get(path)
        .header("accept", "application/vnd.kubernetes.protobuf")
        .body(Vec::new())
        .unwrap();
    match client.request_text(only_protobuf).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 406, "{status:?}");
            assert_eq!(status.reason, "NotAcceptable");
        }
        other => panic!("expected 406, got {other:?}"),
    }
    let either = http::Request::get(path)
        .header(
            "accept",
            "application/vnd.kubernetes.protobuf,application/json",
        )
        .body(Vec::new())
        .unwrap();
    let list: serde_json::Value =
        serde_json::from_str(&client.request_text(either).await.unwrap()).unwrap();
    assert_eq!(list["kind"], "ConfigMapList");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_only_get_list_and_watch() {
    let (_server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &configmap("m", "1"))
        .await
        .unwrap();
    let meta = api.get_metadata("m").await.unwrap();
    assert_eq!(meta.metadata.name.as_deref(), Some("m"));
    let listed = api
        .list_metadata(&ListParams::default().labels("app=test"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    let metadata: Api<kube::core::PartialObjectMeta<ConfigMap>> =
        Api::namespaced(client.clone(), "default");
    let mut stream = watcher(metadata, watcher::Config::default()).boxed();
    let mut names = Vec::new();
    loop {
        match stream.try_next().await.unwrap().unwrap() {
            Event::InitApply(m) => names.push(m.metadata.name.unwrap()),
            Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(names, ["m"]);
    api.delete("m", &DeleteParams::default()).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), stream.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(Event::Delete(m)) => assert_eq!(m.metadata.name.as_deref(), Some("m")),
        other => panic!("expected a delete, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_and_background_cascading_deletion() {
    let (_server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let owned = |name: &str, owner: &ConfigMap, finalizer: bool| {
        let mut cm = configmap(name, "1");
        cm.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: owner.metadata.name.clone().unwrap(),
                uid: owner.metadata.uid.clone().unwrap(),
                ..Default::default()
            },
        ]);
        if finalizer {
            cm.metadata.finalizers = Some(vec!["test.godwit.dev/hold".into()]);
        }
        cm
    };

    // Foreground: the owner waits for its dependents.
    let parent = api
        .create(&PostParams::default(), &configmap("parent", "1"))
        .await
        .unwrap();
    api.create(&PostParams::default(), &owned("held", &parent, true))
        .await
        .unwrap();
    api.create(&PostParams::default(), &owned("free", &parent, false))
        .await
        .unwrap();
    api.delete("parent", &DeleteParams::foreground())
        .await
        .unwrap();
    let waiting = api.get("parent").await.unwrap();
    assert!(waiting.metadata.deletion_timestamp.is_some());
    assert_eq!(
        waiting.metadata.finalizers,
        Some(vec!["foregroundDeletion".to_string()])
    );
    assert!(api.get_opt("free").await.unwrap().is_none());
    assert!(api
        .get("held")
        .await
        .unwrap()
        .metadata
        .deletion_timestamp
        .is_some());
    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(api.get_opt("held").await.unwrap().is_none());
    assert!(
        api.get_opt("parent").await.unwrap().is_none(),
        "the owner outlived its dependents"
    );

    // Background: the owner goes at once, dependents follow.
    let parent = api
        .create(&PostParams::default(), &configmap("parent2", "1"))
        .await
        .unwrap();
    api.create(&PostParams::default(), &owned("child", &parent, false))
        .await
        .unwrap();
    api.delete("parent2", &DeleteParams::background())
        .await
        .unwrap();
    assert!(api.get_opt("parent2").await.unwrap().is_none());
    eventually("dependent collected", || {
        let api = api.clone();
        async move { api.get_opt("child").await.unwrap().is_none() }
    })
    .await;
}
