//! Garbage collection by `ownerReferences`, inside the API server (it sees every resource type in its store).
//!
//! - A dependent whose owners are all gone (no object with that uid under the owner's name) is deleted in the
//!   background; an owner that is gone is dropped from a dependent that has others.
//! - An owner deleted with `propagationPolicy: Foreground` keeps the `foregroundDeletion` finalizer while its
//!   dependents are deleted (foreground too); it goes when none with `blockOwnerDeletion` is left.
//! - `Orphan` strips the owner from its dependents before the owner goes (see `orphan_dependents`).
//!
//! A pass runs shortly after every delete and otherwise every [`SWEEP_INTERVAL`], which also catches
//! dependents created by a controller that had not yet seen their owner's deletion.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::State;
use super::handlers::{DeleteOpts, Propagation, delete_object};
use super::registry::{RESOURCES, ResourceInfo, by_kind};
use super::table::{now, rfc3339};
use crate::cluster::store::{Key, Object, Scope, StoreError};

pub const FOREGROUND: &str = "foregroundDeletion";
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// Lets the write that triggered a pass land first, and batches bursts of deletes.
const SETTLE: Duration = Duration::from_millis(100);

fn uid(v: &Value) -> &str {
    v.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("")
}

fn owner_refs(v: &Value) -> &[Value] {
    v.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn foreground_deleting(v: &Value) -> bool {
    v.pointer("/metadata/deletionTimestamp").is_some()
        && v.pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| f.iter().any(|x| x == FOREGROUND))
}

/// Every object of every type: in one namespace (plus nothing cluster-scoped), or everywhere.
async fn all_objects(state: &State, namespace: Option<&str>) -> Vec<(&'static ResourceInfo, Object)> {
    let mut out = Vec::new();
    for info in RESOURCES {
        if namespace.is_some() && !info.namespaced {
            continue;
        }
        let scope = Scope::new(info.group, info.resource, namespace);
        if let Ok((items, _)) = state.store.list(&scope).await {
            out.extend(items.into_iter().map(|o| (info, o)));
        }
    }
    out
}

/// Objects naming `owner` (by uid) in their ownerReferences.
async fn dependents(state: &State, owner: &Value) -> Vec<(&'static ResourceInfo, Object)> {
    let owner_uid = uid(owner);
    if owner_uid.is_empty() {
        return Vec::new();
    }
    let ns = owner.pointer("/metadata/namespace").and_then(Value::as_str);
    all_objects(state, ns)
        .await
        .into_iter()
        .filter(|(_, o)| owner_refs(&o.value).iter().any(|r| r["uid"] == owner_uid))
        .collect()
}

pub(super) async fn has_dependents(state: &State, owner: &Value) -> bool {
    !dependents(state, owner).await.is_empty()
}

/// Removes the ownerReferences with one of `uids` from `key` (compare-and-swap, retried on conflicts).
async fn drop_refs(state: &State, key: &Key, uids: &HashSet<String>) {
    for _ in 0..8 {
        let Ok(cur) = state.store.get(key).await else { return };
        let mut v = cur.value.clone();
        let Some(refs) = v.pointer_mut("/metadata/ownerReferences").and_then(Value::as_array_mut) else {
            return;
        };
        let before = refs.len();
        refs.retain(|r| !r["uid"].as_str().is_some_and(|u| uids.contains(u)));
        if refs.len() == before {
            return;
        }
        if refs.is_empty()
            && let Some(m) = v["metadata"].as_object_mut()
        {
            m.remove("ownerReferences");
        }
        match state.store.update(key, v, Some(cur.rv)).await {
            Err(StoreError::Conflict { .. }) => continue,
            _ => return,
        }
    }
}

/// `propagationPolicy: Orphan`: the dependents of `owner` stop naming it.
pub(super) async fn orphan_dependents(state: &State, owner: &Value) {
    let uids = HashSet::from([uid(owner).to_string()]);
    for (_, dep) in dependents(state, owner).await {
        drop_refs(state, &dep.key, &uids).await;
    }
}

/// `propagationPolicy: Foreground` on an owner with dependents: mark it deleting with the `foregroundDeletion`
/// finalizer and let the collector delete the dependents, then the owner.
pub(super) async fn start_foreground(state: &Arc<State>, old: &Object) -> Result<Value, StoreError> {
    if foreground_deleting(&old.value) {
        return Ok(old.value.clone());
    }
    let mut v = old.value.clone();
    let meta = v["metadata"].as_object_mut().expect("metadata object");
    meta.entry("deletionTimestamp").or_insert(json!(rfc3339(now())));
    meta.entry("deletionGracePeriodSeconds").or_insert(json!(0));
    let finalizers = meta.entry("finalizers").or_insert(json!([]));
    if let Some(f) = finalizers.as_array_mut() {
        f.push(json!(FOREGROUND));
    }
    let stored = state.store.update(&old.key, v, Some(old.rv)).await?;
    state.gc.notify_one();
    Ok(stored.value)
}

/// Whether the owner named by `r` (in `dependent`'s namespace, or cluster-scoped) no longer exists with that uid.
async fn owner_gone(state: &State, dependent: &Object, r: &Value) -> bool {
    let (Some(api_version), Some(kind), Some(name), Some(owner_uid)) = (
        r["apiVersion"].as_str(),
        r["kind"].as_str(),
        r["name"].as_str(),
        r["uid"].as_str().filter(|u| !u.is_empty()),
    ) else {
        return false;
    };
    let Some(info) = by_kind(api_version, kind) else {
        return false;
    };
    let ns = if info.namespaced {
        dependent.key.namespace.as_str()
    } else {
        ""
    };
    match state.store.get(&Key::new(info.group, info.resource, ns, name)).await {
        Ok(o) => uid(&o.value) != owner_uid,
        Err(StoreError::NotFound) => true,
        Err(_) => false,
    }
}

/// One collection pass; true when it changed something (so another pass may find more to do).
async fn collect(state: &Arc<State>) -> bool {
    let all = all_objects(state, None).await;
    let by_uid: HashMap<&str, &Value> = all.iter().map(|(_, o)| (uid(&o.value), &o.value)).collect();
    let mut acted = false;
    let mut referenced: HashSet<&str> = HashSet::new();
    for (info, dep) in &all {
        let refs = owner_refs(&dep.value);
        if refs.is_empty() {
            continue;
        }
        let mut gone = HashSet::new();
        let mut foreground_owner = false;
        for r in refs {
            let owner_uid = r["uid"].as_str().unwrap_or("");
            // A foreground deletion waits only for dependents that say they block it.
            if r["blockOwnerDeletion"] == json!(true) {
                referenced.insert(owner_uid);
            }
            match by_uid.get(owner_uid) {
                Some(owner) => foreground_owner |= foreground_deleting(owner),
                None if owner_gone(state, dep, r).await => _ = gone.insert(owner_uid.to_string()),
                None => {}
            }
        }
        let deleting = dep.value.pointer("/metadata/deletionTimestamp").is_some();
        if !gone.is_empty() && gone.len() == refs.len() {
            if !deleting {
                tracing::debug!(key = %dep.key.encode(), "deleting a dependent whose owner is gone");
                let _ = delete_object(state, info, dep, &DeleteOpts::default()).await;
                acted = true;
            }
        } else if !gone.is_empty() {
            drop_refs(state, &dep.key, &gone).await;
            acted = true;
        }
        if foreground_owner && !deleting {
            let opts = DeleteOpts {
                propagation: Propagation::Foreground,
                ..Default::default()
            };
            let _ = delete_object(state, info, dep, &opts).await;
            acted = true;
        }
    }
    for (_, owner) in all.iter().filter(|(_, o)| foreground_deleting(&o.value)) {
        if referenced.contains(uid(&owner.value)) {
            continue;
        }
        finish_foreground(state, &owner.key).await;
        acted = true;
    }
    acted
}

/// Drops the `foregroundDeletion` finalizer; the object goes when no finalizer is left.
async fn finish_foreground(state: &State, key: &Key) {
    for _ in 0..8 {
        let Ok(cur) = state.store.get(key).await else { return };
        let mut v = cur.value.clone();
        let mut left = 0;
        if let Some(f) = v.pointer_mut("/metadata/finalizers").and_then(Value::as_array_mut) {
            f.retain(|x| x != FOREGROUND);
            left = f.len();
        }
        let res = if left == 0 {
            state.store.delete(key, Some(cur.rv)).await.map(|_| ())
        } else {
            state.store.update(key, v, Some(cur.rv)).await.map(|_| ())
        };
        match res {
            Err(StoreError::Conflict { .. }) => continue,
            _ => return,
        }
    }
}

/// The collector: a pass after each delete (debounced) and every [`SWEEP_INTERVAL`].
pub(super) fn spawn(state: Arc<State>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let woken = tokio::select! {
                _ = state.gc.notified() => true,
                _ = tokio::time::sleep(SWEEP_INTERVAL) => false,
            };
            if woken {
                tokio::time::sleep(SETTLE).await;
            }
            // Deleting a level of dependents uncovers the next; go on while passes find work.
            for _ in 0..20 {
                if !collect(&state).await {
                    break;
                }
                tokio::time::sleep(SETTLE).await;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreground_marker() {
        let v = json!({"metadata": {"deletionTimestamp": "x", "finalizers": [FOREGROUND]}});
        assert!(foreground_deleting(&v));
        assert!(!foreground_deleting(&json!({"metadata": {"finalizers": [FOREGROUND]}})));
        assert_eq!(owner_refs(&json!({"metadata": {}})).len(), 0);
    }
}
