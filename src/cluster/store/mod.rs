//! Versioned object store: a global monotonic resourceVersion, compare-and-swap updates and watch streams.
//!
//! Objects are JSON values keyed by group/resource/namespace/name. The store writes `metadata.resourceVersion`
//! into every value it returns. Watchers get events from a bounded in-memory window; a watch from a version older
//! than the window fails with [`StoreError::Gone`], so clients relist (the Kubernetes 410 semantics).

pub mod etcd_store;
mod hub;
pub mod memory;
pub mod redb_store;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use serde_json::Value;

pub use etcd_store::EtcdStore;
pub use memory::MemoryStore;
pub use redb_store::RedbStore;

/// A resourceVersion. Global across all resources, strictly increasing with every write.
pub type Rv = u64;

/// Default number of events kept for watchers that resume from an older resourceVersion.
pub const DEFAULT_WINDOW: usize = 4096;

/// Where an object lives. Cluster-scoped objects have an empty namespace; the core group is "".
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub group: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(group: &str, resource: &str, namespace: &str, name: &str) -> Self {
        Key {
            group: group.into(),
            resource: resource.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The storage key. Group, resource, namespace and name never contain '/'.
    pub fn encode(&self) -> String {
        format!("{}/{}/{}/{}", self.group, self.resource, self.namespace, self.name)
    }

    pub fn decode(s: &str) -> Option<Key> {
        let mut it = s.splitn(4, '/');
        Some(Key::new(it.next()?, it.next()?, it.next()?, it.next()?))
    }
}

/// A set of keys: one resource, optionally one namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub group: String,
    pub resource: String,
    pub namespace: Option<String>,
}

impl Scope {
    pub fn new(group: &str, resource: &str, namespace: Option<&str>) -> Self {
        Scope {
            group: group.into(),
            resource: resource.into(),
            namespace: namespace.map(Into::into),
        }
    }

    pub fn prefix(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{}/{}/", self.group, self.resource, ns),
            None => format!("{}/{}/", self.group, self.resource),
        }
    }

    pub fn contains(&self, key: &Key) -> bool {
        key.group == self.group
            && key.resource == self.resource
            && self.namespace.as_ref().is_none_or(|ns| *ns == key.namespace)
    }
}

/// A stored object and its resourceVersion (also present as `metadata.resourceVersion` in `value`).
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    pub key: Key,
    pub rv: Rv,
    pub value: Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
    /// No object change: tells the watcher that everything up to `rv` has been delivered.
    Bookmark,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
            EventType::Bookmark => "BOOKMARK",
        }
    }
}

/// One change. For `Deleted`, `object` is the last state with the deletion's resourceVersion; `prev` is the
/// state before a modification or deletion (useful for selector transitions and controllers).
#[derive(Clone, Debug)]
pub struct Event {
    pub kind: EventType,
    pub rv: Rv,
    pub key: Option<Key>,
    pub object: Value,
    pub prev: Option<Value>,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    AlreadyExists,
    #[error("resourceVersion conflict (current {current})")]
    Conflict { current: Rv },
    #[error("resourceVersion {requested} is too old (oldest available {oldest})")]
    Gone { requested: Rv, oldest: Rv },
    #[error("storage error: {0}")]
    Backend(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<Arc<Event>>> + Send>>;

#[derive(Clone, Debug, Default)]
pub struct WatchOptions {
    /// Emit a BOOKMARK after this much idle time.
    pub bookmark_interval: Option<Duration>,
}

/// The storage contract the API server, scheduler, node agent and controllers rely on. An etcd backend implements
/// the same trait.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &Key) -> Result<Object>;
    /// All objects in scope, sorted by key, and the resourceVersion the list is consistent with.
    async fn list(&self, scope: &Scope) -> Result<(Vec<Object>, Rv)>;
    /// Fails with `AlreadyExists` if the key is taken.
    async fn create(&self, key: &Key, value: Value) -> Result<Object>;
    /// Replaces the object. With `expected`, fails with `Conflict` unless the current resourceVersion matches.
    async fn update(&self, key: &Key, value: Value, expected: Option<Rv>) -> Result<Object>;
    /// Removes the object and returns its last state carrying the deletion's resourceVersion.
    async fn delete(&self, key: &Key, expected: Option<Rv>) -> Result<Object>;
    /// Events in scope with a resourceVersion greater than `from`, in order. `Gone` if `from` has left the window.
    fn watch(&self, scope: &Scope, from: Rv, opts: WatchOptions) -> Result<WatchStream>;
    /// The latest resourceVersion handed out.
    fn current_rv(&self) -> Rv;
}

/// Writes the resourceVersion into `metadata.resourceVersion`.
pub(crate) fn stamp(value: &mut Value, rv: Rv) {
    if let Some(obj) = value.as_object_mut() {
        let meta = obj
            .entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(meta) = meta.as_object_mut() {
            meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
    }
}

pub(crate) fn rv_of(value: &Value) -> Rv {
    value
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
