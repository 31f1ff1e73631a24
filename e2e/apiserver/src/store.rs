//! The versioned in-memory object store and its watch fan-out.
//!
//! Owns every stored object, the global `resourceVersion` counter and the
//! retained event history that watches resume from. Objects are kept as JSON
//! values keyed by storage resource (group and plural, independent of the
//! served version) and by namespace and name.
//!
//! Simplifications versus etcd behind a real API server: one process-wide
//! lock, a bounded history of events (older resume points get `410 Gone`),
//! and compaction on demand ([`Store::expire_watches`]) so tests can force
//! reflectors to re-list.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;
use tokio::sync::{broadcast, watch};

/// How many events the store keeps for watches to resume from.
const HISTORY_LIMIT: usize = 10_000;
/// Capacity of the live event channel; a watcher that falls further behind is
/// expired with `410 Gone`.
const CHANNEL_CAPACITY: usize = 8_192;

/// Errors of store operations.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The object does not exist.
    #[error("Object not found")]
    NotFound,
    /// An object with that name already exists.
    #[error("Object already exists")]
    AlreadyExists,
    /// The caller's `resourceVersion` precondition does not hold.
    #[error("Object has been modified")]
    Conflict,
    /// The requested resume point is older than the retained history.
    #[error("Resource version {0} is too old")]
    Expired(u64),
}

/// Storage identity of a resource: API group and plural name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId {
    /// API group, empty for the core group.
    pub group: String,
    /// Plural resource name, e.g. `virtualmachines`.
    pub resource: String,
}

impl ResourceId {
    /// Builds a resource id.
    pub fn new(group: &str, resource: &str) -> Self {
        Self {
            group: group.to_string(),
            resource: resource.to_string(),
        }
    }
}

/// Namespace (empty for cluster-scoped objects) and name of an object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// Namespace, empty for cluster-scoped objects.
    pub namespace: String,
    /// Object name.
    pub name: String,
}

impl ObjectKey {
    /// Builds an object key.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

/// Kind of a change, as a watch reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// The object was created.
    Added,
    /// The object was changed.
    Modified,
    /// The object was removed.
    Deleted,
}

impl EventType {
    /// The wire name of the event type.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change to one object.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// Resource version the change produced.
    pub rv: u64,
    /// What happened.
    pub kind: EventType,
    /// Resource the object belongs to.
    pub resource: ResourceId,
    /// The object after the change (before it, for deletions).
    pub object: Value,
    /// The object before the change, for modifications.
    pub previous: Option<Value>,
}

/// What a [`Store::mutate`] closure wants done with the object.
#[derive(Debug)]
pub enum Mutation {
    /// Store this value (create or replace).
    Put(Value),
    /// Remove the object.
    Delete,
    /// Change nothing; return this value to the caller.
    Keep(Value),
}

/// A watch's starting point: the events to replay and the live channel.
pub struct WatchStart {
    /// Events after the requested version, or synthetic ADDED events for the
    /// current objects when the watch started without a version.
    pub backlog: Vec<Arc<StoredEvent>>,
    /// Live events from here on.
    pub live: broadcast::Receiver<Arc<StoredEvent>>,
    /// Changes when watches are force-expired.
    pub expiry: watch::Receiver<u64>,
    /// The global resource version when the watch started; live events are
    /// all newer.
    pub rv: u64,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// Smallest resource version a watch may resume from.
    oldest_resumable: u64,
    objects: HashMap<ResourceId, BTreeMap<ObjectKey, Value>>,
    history: VecDeque<Arc<StoredEvent>>,
}

/// The in-memory object store.
pub struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<StoredEvent>>,
    expiry: watch::Sender<u64>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store at resource version 1.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(CHANNEL_CAPACITY);
        let (expiry, _) = watch::channel(0);
        Self {
            inner: Mutex::new(Inner {
                rv: 1,
                oldest_resumable: 0,
                ..Default::default()
            }),
            events,
            expiry,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current global resource version.
    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// One object.
    pub fn get(&self, res: &ResourceId, key: &ObjectKey) -> Option<Value> {
        self.lock()
            .objects
            .get(res)
            .and_then(|objects| objects.get(key))
            .cloned()
    }

    /// All objects of a resource, in one namespace when given, with the
    /// resource version the list is consistent at.
    pub fn list(&self, res: &ResourceId, namespace: Option<&str>) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let items = inner
            .objects
            .get(res)
            .map(|objects| {
                objects
                    .iter()
                    .filter(|(key, _)| namespace.is_none_or(|ns| key.namespace == ns))
                    .map(|(_, obj)| obj.clone())
                    .collect()
            })
            .unwrap_or_default();
        (items, inner.rv)
    }

    /// Every resource that currently has objects.
    pub fn resources(&self) -> Vec<ResourceId> {
        self.lock().objects.keys().cloned().collect()
    }

    /// Reads, decides and writes one object atomically.
    ///
    /// The closure sees the current object (if any) and the resource version
    /// a write would get; what it returns is applied, recorded as an event
    /// and returned. A `Put` gets its `metadata.resourceVersion` set here.
    pub fn mutate<E, F>(&self, res: &ResourceId, key: &ObjectKey, decide: F) -> Result<Value, E>
    where
        F: FnOnce(Option<&Value>, u64) -> Result<Mutation, E>,
    {
        let mut inner = self.lock();
        let next_rv = inner.rv + 1;
        let current = inner.objects.get(res).and_then(|objects| objects.get(key));
        let previous = current.cloned();
        let mutation = decide(current, next_rv)?;
        let (kind, object) = match mutation {
            Mutation::Keep(value) => return Ok(value),
            Mutation::Put(mut value) => {
                set_rv(&mut value, next_rv);
                let kind = if previous.is_some() {
                    EventType::Modified
                } else {
                    EventType::Added
                };
                inner
                    .objects
                    .entry(res.clone())
                    .or_default()
                    .insert(key.clone(), value.clone());
                (kind, value)
            }
            Mutation::Delete => {
                let Some(mut value) = previous.clone() else {
                    return Ok(Value::Null);
                };
                if let Some(objects) = inner.objects.get_mut(res) {
                    objects.remove(key);
                }
                set_rv(&mut value, next_rv);
                (EventType::Deleted, value)
            }
        };
        inner.rv = next_rv;
        let event = Arc::new(StoredEvent {
            rv: next_rv,
            kind,
            resource: res.clone(),
            object: object.clone(),
            previous: if kind == EventType::Modified {
                previous
            } else {
                None
            },
        });
        inner.history.push_back(event.clone());
        while inner.history.len() > HISTORY_LIMIT {
            if let Some(dropped) = inner.history.pop_front() {
                inner.oldest_resumable = dropped.rv;
            }
        }
        // Sent under the lock so watchers see events in resource-version order.
        let _ = self.events.send(event);
        Ok(object)
    }

    /// Starts a watch of one resource.
    ///
    /// With `since` the watch replays retained events after that version (or
    /// fails with [`StoreError::Expired`]); without it, the current objects
    /// are replayed as ADDED events.
    pub fn watch(&self, res: &ResourceId, since: Option<u64>) -> Result<WatchStart, StoreError> {
        let inner = self.lock();
        let backlog = match since {
            Some(rv) if rv < inner.oldest_resumable => return Err(StoreError::Expired(rv)),
            Some(rv) => inner
                .history
                .iter()
                .filter(|event| event.rv > rv && &event.resource == res)
                .cloned()
                .collect(),
            None => inner
                .objects
                .get(res)
                .map(|objects| {
                    objects
                        .values()
                        .map(|obj| {
                            Arc::new(StoredEvent {
                                rv: inner.rv,
                                kind: EventType::Added,
                                resource: res.clone(),
                                object: obj.clone(),
                                previous: None,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        Ok(WatchStart {
            backlog,
            live: self.events.subscribe(),
            expiry: self.expiry.subscribe(),
            rv: inner.rv,
        })
    }

    /// Closes every open watch and drops the history, so that resuming from
    /// any version handed out so far fails with `410 Gone`.
    ///
    /// The global version moves one step so a fresh list hands out a version
    /// that can be resumed from.
    pub fn expire_watches(&self) -> u64 {
        let mut inner = self.lock();
        inner.rv += 1;
        inner.oldest_resumable = inner.rv;
        inner.history.clear();
        let rv = inner.rv;
        self.expiry.send_modify(|generation| *generation += 1);
        rv
    }
}

fn set_rv(value: &mut Value, rv: u64) {
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn put(store: &Store, name: &str) -> Value {
        store
            .mutate::<StoreError, _>(
                &ResourceId::new("", "configmaps"),
                &ObjectKey::new("default", name),
                |_, _| Ok(Mutation::Put(json!({"metadata": {"name": name}}))),
            )
            .unwrap()
    }

    #[test]
    fn writes_bump_the_global_version() {
        let store = Store::new();
        let a = put(&store, "a");
        let b = put(&store, "b");
        assert_eq!(a["metadata"]["resourceVersion"], "2");
        assert_eq!(b["metadata"]["resourceVersion"], "3");
        assert_eq!(store.current_rv(), 3);
    }

    #[test]
    fn watch_replays_history_after_version() {
        let store = Store::new();
        let res = ResourceId::new("", "configmaps");
        put(&store, "a");
        put(&store, "b");
        let start = store.watch(&res, Some(2)).unwrap();
        assert_eq!(start.backlog.len(), 1);
        assert_eq!(start.backlog[0].object["metadata"]["name"], "b");
    }

    #[test]
    fn expired_versions_are_refused_after_compaction() {
        let store = Store::new();
        let res = ResourceId::new("", "configmaps");
        put(&store, "a");
        let rv = store.current_rv();
        store.expire_watches();
        assert_eq!(
            store.watch(&res, Some(rv)).err(),
            Some(StoreError::Expired(rv))
        );
        assert!(store.watch(&res, Some(store.current_rv())).is_ok());
    }
}
