//! A list+watch cache of one resource type: the pattern every controller uses.
//! It lists, then watches from the list's resourceVersion; on 410 Gone or a
//! broken stream it lists again. Subscribers get each change and a `Resynced`
//! after every list (their cue to reconcile everything).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, WatchEvent};
use k8s_openapi::{ListableResource, Metadata};
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, watch};

use super::client::{Client, ListParams};

/// How long one watch request lasts before it is renewed.
const WATCH_TIMEOUT_SECONDS: u32 = 290;

#[derive(Clone, Debug)]
pub enum Change<K> {
    Applied(K),
    Deleted(K),
    /// The cache was rebuilt from a fresh list.
    Resynced,
}

/// `namespace/name` (or `name` for cluster-scoped objects).
pub fn object_key(meta: &ObjectMeta) -> String {
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{}", meta.name.as_deref().unwrap_or_default()),
        _ => meta.name.clone().unwrap_or_default(),
    }
}

/// A subscriber's end of an informer's changes. The channel holds `Arc`s: its
/// slots are allocated up front, and a slot as large as a Pod times the
/// capacity cost megabytes per informer.
pub struct Changes<K> {
    rx: broadcast::Receiver<Arc<Change<K>>>,
}

impl<K: Clone> Changes<K> {
    pub async fn recv(&mut self) -> Result<Change<K>, broadcast::error::RecvError> {
        self.rx.recv().await.map(Arc::unwrap_or_clone)
    }

    pub fn try_recv(&mut self) -> Result<Change<K>, broadcast::error::TryRecvError> {
        self.rx.try_recv().map(Arc::unwrap_or_clone)
    }
}

pub struct Informer<K> {
    cache: Arc<RwLock<BTreeMap<String, K>>>,
    changes: broadcast::Sender<Arc<Change<K>>>,
    synced: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Drop for Informer<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<K> Informer<K>
where
    K: ListableResource + Metadata<Ty = ObjectMeta> + DeserializeOwned + Clone + Send + Sync + 'static,
{
    pub fn spawn(client: Client, namespace: Option<String>, params: ListParams) -> Self {
        let cache = Arc::new(RwLock::new(BTreeMap::new()));
        let (changes, _) = broadcast::channel(1024);
        let (synced_tx, synced) = watch::channel(false);
        let task = tokio::spawn(run(
            client,
            namespace,
            params,
            cache.clone(),
            changes.clone(),
            synced_tx,
        ));
        Informer {
            cache,
            changes,
            synced,
            task,
        }
    }

    /// Waits for the first list to land in the cache.
    pub async fn wait_synced(&self) {
        let mut synced = self.synced.clone();
        let _ = synced.wait_for(|s| *s).await;
    }

    pub fn subscribe(&self) -> Changes<K> {
        Changes {
            rx: self.changes.subscribe(),
        }
    }

    pub fn get(&self, key: &str) -> Option<K> {
        self.cache.read().unwrap().get(key).cloned()
    }

    pub fn list(&self) -> Vec<K> {
        self.cache.read().unwrap().values().cloned().collect()
    }
}

async fn run<K>(
    client: Client,
    namespace: Option<String>,
    params: ListParams,
    cache: Arc<RwLock<BTreeMap<String, K>>>,
    changes: broadcast::Sender<Arc<Change<K>>>,
    synced: watch::Sender<bool>,
) where
    K: ListableResource + Metadata<Ty = ObjectMeta> + DeserializeOwned + Clone + Send + Sync + 'static,
{
    let mut resource_version: Option<String> = None;
    loop {
        let rv = match resource_version.take() {
            Some(rv) => rv,
            None => match client.list::<K>(namespace.as_deref(), &params).await {
                Ok(list) => {
                    let fresh: BTreeMap<String, K> = list
                        .items
                        .into_iter()
                        .map(|item| (object_key(item.metadata()), item))
                        .collect();
                    *cache.write().unwrap() = fresh;
                    synced.send_replace(true);
                    let _ = changes.send(Arc::new(Change::Resynced));
                    list.resource_version
                }
                Err(err) => {
                    tracing::debug!(resource = K::URL_PATH_SEGMENT, error = %err, "list failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
        };
        let stream = match client
            .watch::<K>(namespace.as_deref(), &params, &rv, WATCH_TIMEOUT_SECONDS)
            .await
        {
            Ok(stream) => stream,
            Err(err) => {
                tracing::debug!(resource = K::URL_PATH_SEGMENT, error = %err, "watch failed; relisting");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        resource_version = consume(stream, rv, &cache, &changes).await;
    }
}

/// Applies watch events to the cache; returns the version to resume from, or
/// None when the next step is a fresh list.
async fn consume<K>(
    mut stream: super::client::WatchStream<K>,
    mut rv: String,
    cache: &RwLock<BTreeMap<String, K>>,
    changes: &broadcast::Sender<Arc<Change<K>>>,
) -> Option<String>
where
    K: Metadata<Ty = ObjectMeta> + Clone,
{
    while let Some(event) = stream.next().await {
        let (object, deleted) = match event {
            Ok(WatchEvent::Added(object)) | Ok(WatchEvent::Modified(object)) => (object, false),
            Ok(WatchEvent::Deleted(object)) => (object, true),
            Ok(WatchEvent::Bookmark { resource_version, .. }) => {
                rv = resource_version;
                continue;
            }
            Ok(WatchEvent::ErrorStatus(_) | WatchEvent::ErrorOther(_)) => return None,
            Err(err) => {
                tracing::debug!(error = %err, "watch stream ended with an error");
                return if err.is_gone() { None } else { Some(rv) };
            }
        };
        if let Some(version) = &object.metadata().resource_version {
            rv = version.clone();
        }
        let key = object_key(object.metadata());
        if deleted {
            cache.write().unwrap().remove(&key);
            let _ = changes.send(Arc::new(Change::Deleted(object)));
        } else {
            cache.write().unwrap().insert(key, object.clone());
            let _ = changes.send(Arc::new(Change::Applied(object)));
        }
    }
    Some(rv)
}
