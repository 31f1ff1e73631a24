//! The watch verb: streams `ADDED`/`MODIFIED`/`DELETED` events as JSON
//! lines, with resource versions, `BOOKMARK`s (periodic and the
//! `sendInitialEvents` end marker), selectors applied to each event (an
//! object leaving the selection is a `DELETED`), and `410 Gone` for versions
//! older than the retained history.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use super::error::{expired, ApiError};
use super::request::{selectors, Query, Target};
use super::response::{partial_metadata, present, wants_metadata, Body};
use super::state::ServerState;
use crate::crd::ResourceDef;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{EventType, ResourceId, StoreError, StoredEvent};
use crate::table::{self, IncludeObject};

/// Filters and shapes watch events for one watcher.
struct WatchFilter {
    def: ResourceDef,
    res: ResourceId,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    table: Option<IncludeObject>,
    metadata_only: bool,
}

impl WatchFilter {
    fn matches(&self, object: &Value) -> bool {
        let ns_ok = self.namespace.as_deref().is_none_or(|ns| {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                == Some(ns)
        });
        ns_ok && self.labels.matches(object) && self.fields.matches(object)
    }

    /// The line to send for a store event, if this watcher should see it.
    fn line(&self, event: &StoredEvent) -> Option<Bytes> {
        if event.resource != self.res {
            return None;
        }
        let object = present(&self.def, &event.object);
        let now_matches = self.matches(&object);
        let kind = match (event.kind, &event.previous) {
            (EventType::Modified, Some(previous)) => {
                let before = self.matches(&present(&self.def, previous));
                match (before, now_matches) {
                    (true, true) => EventType::Modified,
                    (false, true) => EventType::Added,
                    (true, false) => EventType::Deleted,
                    (false, false) => return None,
                }
            }
            (kind, _) if now_matches => kind,
            _ => return None,
        };
        Some(self.encode(kind.as_str(), object))
    }

    fn encode(&self, kind: &str, object: Value) -> Bytes {
        let object = match self.table {
            Some(include) => {
                let rv = object
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                table::table(&self.def, &[object], rv, include)
            }
            None if self.metadata_only => partial_metadata(&object),
            None => object,
        };
        watch_line(kind, &object)
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        watch_line(
            "BOOKMARK",
            &json!({"kind": self.def.kind, "apiVersion": self.def.api_version(), "metadata": metadata}),
        )
    }
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn streaming_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// GET with `watch=true`: a stream of watch events, from the version
/// asked for (or the current objects) on, until the client goes, the
/// timeout passes or the history expires.
pub(crate) fn watch(
    state: &Arc<ServerState>,
    target: &Target,
    query: &Query,
    accept: &str,
) -> Result<Response<Body>, ApiError> {
    let (labels, mut fields) = selectors(query)?;
    if let Some(name) = &target.name {
        fields = FieldSelector::parse(&format!("metadata.name={name}")).unwrap_or(fields);
    }
    let send_initial = query.flag("sendInitialEvents");
    let since = match query.get("resourceVersion") {
        None | Some("") | Some("0") => None,
        Some(_) if send_initial => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?,
        ),
    };
    let filter = WatchFilter {
        def: target.def.clone(),
        res: target.def.id(),
        namespace: target.namespace.clone(),
        labels,
        fields,
        table: table::wants_table(accept).then(|| IncludeObject::parse(query.get("includeObject"))),
        metadata_only: wants_metadata(accept),
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let bookmarks = query.flag("allowWatchBookmarks");
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let start = state.store.watch(&filter.res, since);
    let interval = state.bookmark_interval;
    tokio::spawn(async move {
        let mut start = match start {
            Ok(start) => start,
            Err(StoreError::Expired(rv)) => {
                let _ = tx.send(watch_line("ERROR", &expired(rv).status())).await;
                return;
            }
            Err(_) => return,
        };
        // Everything up to the version at subscription is in the backlog (or
        // the current state); the live channel carries only newer events.
        let mut last_rv = since.unwrap_or(start.rv);
        for event in &start.backlog {
            last_rv = last_rv.max(event.rv);
            if let Some(line) = filter.line(event) {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
        }
        if send_initial && tx.send(filter.bookmark(last_rv, true)).await.is_err() {
            return;
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            let sleep_until = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                received = start.live.recv() => match received {
                    Ok(event) => {
                        if event.rv <= last_rv {
                            continue;
                        }
                        last_rv = event.rv;
                        if let Some(line) = filter.line(&event) {
                            if tx.send(line).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(watch_line("ERROR", &expired(last_rv).status())).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = ticker.tick(), if bookmarks => {
                    // Deliver anything already queued first, so the bookmark
                    // never runs ahead of an event this watcher still owes.
                    while let Ok(event) = start.live.try_recv() {
                        if event.rv <= last_rv {
                            continue;
                        }
                        last_rv = event.rv;
                        if let Some(line) = filter.line(&event) {
                            if tx.send(line).await.is_err() {
                                return;
                            }
                        }
                    }
                    if tx.send(filter.bookmark(last_rv, false)).await.is_err() {
                        return;
                    }
                }
                _ = start.expiry.changed() => return,
                _ = sleep_until => return,
                _ = tx.closed() => return,
            }
        }
    });
    Ok(streaming_response(rx))
}
