//! Records core/v1 Events about objects, as `kubectl describe` and
//! `kubectl get events` show them. Repeats of the same event (object, type,
//! reason, message) bump `count` and `lastTimestamp` instead of adding one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::{Metadata, Resource};

use super::client::Client;

/// At most this many distinct events are remembered for aggregation.
const AGGREGATE_CACHE: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// An event already written: (name, namespace, count), by aggregation key.
type Recorded = (String, String, i32);

#[derive(Clone)]
pub struct Recorder {
    client: Client,
    component: String,
    host: Option<String>,
    seen: Arc<Mutex<HashMap<String, Recorded>>>,
}

/// A reference to `object` for `involvedObject`.
pub fn reference<K: Resource + Metadata<Ty = ObjectMeta>>(object: &K) -> ObjectReference {
    let meta = object.metadata();
    ObjectReference {
        api_version: Some(K::API_VERSION.to_string()),
        kind: Some(K::KIND.to_string()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        field_path: None,
    }
}

/// The current time with nanoseconds (k8s-openapi's jiff has no clock).
pub fn now() -> Timestamp {
    let elapsed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::new(elapsed.as_secs() as i64, elapsed.subsec_nanos() as i32).unwrap_or(Timestamp::UNIX_EPOCH)
}

impl Recorder {
    /// `component` is e.g. `kubelet` or `default-scheduler`; `host` the node name for node components.
    pub fn new(client: Client, component: &str, host: Option<&str>) -> Self {
        Recorder {
            client,
            component: component.to_string(),
            host: host.map(str::to_string),
            seen: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Records an event in the background; failures are logged, never returned.
    pub fn emit(&self, object: ObjectReference, kind: EventType, reason: &str, message: impl Into<String>) {
        let recorder = self.clone();
        let (reason, message) = (reason.to_string(), message.into());
        tokio::spawn(async move {
            if let Err(err) = recorder.record(object, kind, &reason, &message).await {
                tracing::debug!(reason, error = %err, "recording an event");
            }
        });
    }

    pub async fn record(
        &self,
        object: ObjectReference,
        kind: EventType,
        reason: &str,
        message: &str,
    ) -> Result<(), super::client::ClientError> {
        let namespace = object
            .namespace
            .clone()
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| "default".into());
        let key = format!(
            "{}/{}/{}/{}/{}/{}",
            namespace,
            object.name.as_deref().unwrap_or_default(),
            object.uid.as_deref().unwrap_or_default(),
            kind.as_str(),
            reason,
            message
        );
        let now = now();
        let previous = self.seen.lock().unwrap().get(&key).cloned();
        if let Some((name, ns, count)) = previous {
            let patch = serde_json::json!({"count": count + 1, "lastTimestamp": Time(now)});
            if self
                .client
                .merge_patch::<Event>(Some(&ns), &name, None, &patch)
                .await
                .is_ok()
            {
                self.seen.lock().unwrap().insert(key, (name, ns, count + 1));
                return Ok(());
            }
        }
        let object_name = object.name.clone().unwrap_or_default();
        let name = format!("{object_name}.{:x}", now.as_nanosecond());
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            involved_object: object,
            type_: Some(kind.as_str().to_string()),
            reason: Some(reason.to_string()),
            message: Some(message.to_string()),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: self.host.clone(),
            }),
            reporting_component: Some(self.component.clone()),
            reporting_instance: Some(self.host.clone().unwrap_or_else(|| self.component.clone())),
            action: Some(reason.to_string()),
            ..Default::default()
        };
        self.client.create(Some(&namespace), &event).await?;
        let mut seen = self.seen.lock().unwrap();
        if seen.len() >= AGGREGATE_CACHE {
            seen.clear();
        }
        seen.insert(key, (name, namespace, 1));
        Ok(())
    }
}
