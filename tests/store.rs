//! The store contract (CRUD, CAS, list consistency, watch from a resourceVersion, deletions carrying the last
//! state, bookmarks), run alike on the embedded store (redb) and on a real etcd (Debian's etcd-server, started per
//! test on free ports); etcd alone: Gone after compaction, prefixes keeping clusters apart, a watch that survives
//! losing members one after another, and `podvisor up --store etcd://...` with the real kubectl.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::cluster::Cluster;
use common::etcd::Etcd;
use common::oci::{Flavour, TestImage};
use common::push::push_image;
use common::registry::Registry;
use futures_util::StreamExt;
use podvisor::cluster::store::{
    EtcdStore, Event, EventType, Key, RedbStore, Rv, Scope, Store, StoreError, WatchOptions, WatchStream,
};
use serde_json::json;

fn key(name: &str) -> Key {
    Key::new("", "pods", "default", name)
}

fn pods() -> Scope {
    Scope::new("", "pods", Some("default"))
}

/// A prefix of its own for every store, as clusters sharing an etcd would have.
fn prefix() -> String {
    format!("/test-{}/", uuid::Uuid::new_v4())
}

async fn store(etcd: &Etcd) -> EtcdStore {
    EtcdStore::connect(&etcd.endpoints(), &prefix())
        .await
        .expect("connect to etcd")
}

async fn next_event(w: &mut WatchStream) -> Arc<Event> {
    tokio::time::timeout(Duration::from_secs(30), w.next())
        .await
        .expect("a watch event within 30s")
        .expect("the watch stream open")
        .expect("an event, not an error")
}

async fn crud_and_compare_and_swap(s: &dyn Store) {
    let a = s.create(&key("a"), json!({"metadata": {"name": "a"}})).await.unwrap();
    assert_eq!(a.value["metadata"]["resourceVersion"], json!(a.rv.to_string()));
    assert_eq!(s.get(&key("a")).await.unwrap(), a);
    assert_eq!(s.create(&key("a"), json!({})).await, Err(StoreError::AlreadyExists));
    let b = s
        .update(&key("a"), json!({"metadata": {"name": "a"}, "x": 1}), Some(a.rv))
        .await
        .unwrap();
    assert!(b.rv > a.rv);
    assert_eq!(s.get(&key("a")).await.unwrap().value["x"], json!(1));
    assert_eq!(
        s.update(&key("a"), json!({}), Some(a.rv)).await,
        Err(StoreError::Conflict { current: b.rv })
    );
    assert_eq!(
        s.delete(&key("a"), Some(a.rv)).await,
        Err(StoreError::Conflict { current: b.rv })
    );
    assert_eq!(s.update(&key("zz"), json!({}), None).await, Err(StoreError::NotFound));
    assert_eq!(
        s.update(&key("zz"), json!({}), Some(b.rv)).await,
        Err(StoreError::NotFound)
    );
    assert_eq!(s.delete(&key("zz"), None).await, Err(StoreError::NotFound));
    let c = s.update(&key("a"), json!({"x": 2}), None).await.unwrap();
    assert!(c.rv > b.rv);
    let d = s.delete(&key("a"), Some(c.rv)).await.unwrap();
    assert!(d.rv > c.rv);
    assert_eq!(d.value["x"], json!(2), "delete returns the last state");
    assert_eq!(d.value["metadata"]["resourceVersion"], json!(d.rv.to_string()));
    assert_eq!(s.get(&key("a")).await, Err(StoreError::NotFound));
    assert_eq!(s.current_rv(), d.rv);
}

async fn list_is_scoped_sorted_and_consistent(s: &dyn Store) {
    for name in ["c", "a", "b"] {
        s.create(&key(name), json!({"metadata": {"name": name}})).await.unwrap();
    }
    s.create(&Key::new("", "pods", "other", "x"), json!({})).await.unwrap();
    s.create(&Key::new("", "podsx", "default", "y"), json!({}))
        .await
        .unwrap();
    s.create(&Key::new("", "nodes", "", "n1"), json!({})).await.unwrap();
    let (items, rv) = s.list(&pods()).await.unwrap();
    let names: Vec<&str> = items.iter().map(|o| o.key.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert!(
        items
            .iter()
            .all(|o| o.value["metadata"]["resourceVersion"] == json!(o.rv.to_string()))
    );
    assert_eq!(rv, s.current_rv());
    assert_eq!(s.list(&Scope::new("", "pods", None)).await.unwrap().0.len(), 4);
    let (nodes, _) = s.list(&Scope::new("", "nodes", None)).await.unwrap();
    assert_eq!(nodes[0].key, Key::new("", "nodes", "", "n1"));

    // A watch from the list's resourceVersion sees exactly what came after it.
    let mut w = s.watch(&pods(), rv, WatchOptions::default()).unwrap();
    let d = s.create(&key("d"), json!({})).await.unwrap();
    let ev = next_event(&mut w).await;
    assert_eq!(
        (ev.kind, ev.rv, ev.key.clone()),
        (EventType::Added, d.rv, Some(key("d")))
    );
}

async fn watch_from_a_version_orders_filters_and_carries_previous_state(s: &dyn Store) {
    s.create(&key("before"), json!({})).await.unwrap();
    let start = s.current_rv();
    let mut w = s.watch(&pods(), start, WatchOptions::default()).unwrap();
    let a = s.create(&key("a"), json!({"v": 1})).await.unwrap();
    s.create(&Key::new("", "pods", "other", "x"), json!({})).await.unwrap();
    let m = s.update(&key("a"), json!({"v": 2}), None).await.unwrap();
    let d = s.delete(&key("a"), None).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_event(&mut w).await);
    }
    let kinds: Vec<EventType> = got.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventType::Added, EventType::Modified, EventType::Deleted]);
    assert_eq!(got.iter().map(|e| e.rv).collect::<Vec<_>>(), [a.rv, m.rv, d.rv]);
    assert!(got[0].prev.is_none());
    assert_eq!(got[0].object["v"], json!(1));
    assert_eq!(got[1].object["v"], json!(2));
    assert_eq!(got[1].prev.as_ref().unwrap()["v"], json!(1));
    // The deletion carries the last state stamped with the deletion's version, and that state as `prev`.
    assert_eq!(got[2].object["v"], json!(2));
    assert_eq!(got[2].object["metadata"]["resourceVersion"], json!(d.rv.to_string()));
    let prev = got[2].prev.as_ref().unwrap();
    assert_eq!(prev["metadata"]["resourceVersion"], json!(m.rv.to_string()));

    // A late watcher from `start` replays the same events.
    let late: Vec<Rv> = s
        .watch(&pods(), start, WatchOptions::default())
        .unwrap()
        .take(3)
        .map(|e| e.unwrap().rv)
        .collect()
        .await;
    assert_eq!(late, [a.rv, m.rv, d.rv]);
    // A watch of the whole resource sees the other namespace too.
    let all: Vec<Key> = s
        .watch(&Scope::new("", "pods", None), start, WatchOptions::default())
        .unwrap()
        .take(4)
        .map(|e| e.unwrap().key.clone().unwrap())
        .collect()
        .await;
    assert_eq!(all[1], Key::new("", "pods", "other", "x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_crud_and_compare_and_swap() {
    let etcd = Etcd::single();
    crud_and_compare_and_swap(&store(&etcd).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_crud_and_compare_and_swap() {
    let dir = tempfile::tempdir().unwrap();
    crud_and_compare_and_swap(&RedbStore::open(&dir.path().join("store.redb")).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_from_a_version_orders_filters_and_carries_previous_state() {
    let etcd = Etcd::single();
    watch_from_a_version_orders_filters_and_carries_previous_state(&store(&etcd).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_watch_from_a_version_orders_filters_and_carries_previous_state() {
    let dir = tempfile::tempdir().unwrap();
    watch_from_a_version_orders_filters_and_carries_previous_state(
        &RedbStore::open(&dir.path().join("store.redb")).unwrap(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_idle_watch_gets_bookmarks() {
    let etcd = Etcd::single();
    idle_watch_gets_bookmarks(&store(&etcd).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_idle_watch_gets_bookmarks() {
    let dir = tempfile::tempdir().unwrap();
    idle_watch_gets_bookmarks(&RedbStore::open(&dir.path().join("store.redb")).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_list_is_scoped_sorted_and_consistent() {
    let etcd = Etcd::single();
    list_is_scoped_sorted_and_consistent(&store(&etcd).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_list_is_scoped_sorted_and_consistent() {
    let dir = tempfile::tempdir().unwrap();
    list_is_scoped_sorted_and_consistent(&RedbStore::open(&dir.path().join("store.redb")).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_prefixes_keep_clusters_apart() {
    let etcd = Etcd::single();
    let one = store(&etcd).await;
    one.create(&key("a"), json!({})).await.unwrap();
    // Another store under another prefix on the same etcd sees none of it.
    let other = store(&etcd).await;
    assert!(other.list(&pods()).await.unwrap().0.is_empty());
    assert_eq!(other.get(&key("a")).await, Err(StoreError::NotFound));
    other.create(&key("a"), json!({"mine": true})).await.unwrap();
    assert_eq!(one.get(&key("a")).await.unwrap().value.get("mine"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_compacted_version_is_gone() {
    let etcd = Etcd::single();
    let s = store(&etcd).await;
    let first = s.create(&key("p0"), json!({})).await.unwrap().rv;
    for i in 1..5 {
        s.create(&key(&format!("p{i}")), json!({})).await.unwrap();
    }
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    let compacted = s.current_rv();
    client.compact(compacted as i64, None).await.unwrap();
    let mut w = s.watch(&pods(), first, WatchOptions::default()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), w.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(result, Err(StoreError::Gone { requested, oldest }) if requested == first && oldest == compacted),
        "{result:?}"
    );
    assert!(w.next().await.is_none(), "the stream ends after Gone");
    // From the compaction revision on, watching works.
    let mut w = s.watch(&pods(), compacted, WatchOptions::default()).unwrap();
    let p5 = s.create(&key("p5"), json!({})).await.unwrap();
    assert_eq!(next_event(&mut w).await.rv, p5.rv);
}

async fn idle_watch_gets_bookmarks(s: &dyn Store) {
    s.create(&key("a"), json!({})).await.unwrap();
    let opts = WatchOptions {
        bookmark_interval: Some(Duration::from_millis(200)),
    };
    let mut w = s.watch(&pods(), s.current_rv(), opts).unwrap();
    let ev = next_event(&mut w).await;
    assert_eq!(ev.kind, EventType::Bookmark);
    assert!(ev.rv >= s.current_rv());
    assert_eq!(ev.object["metadata"]["resourceVersion"], json!(ev.rv.to_string()));
    // Writes elsewhere move the bookmark on; a change in scope still arrives as itself.
    s.create(&Key::new("", "pods", "other", "x"), json!({})).await.unwrap();
    let later = s.current_rv();
    let ev = loop {
        let ev = next_event(&mut w).await;
        if ev.rv >= later {
            break ev;
        }
    };
    assert_eq!(ev.kind, EventType::Bookmark);
    let b = s.create(&key("b"), json!({})).await.unwrap();
    let ev = loop {
        let ev = next_event(&mut w).await;
        if ev.kind != EventType::Bookmark {
            break ev;
        }
    };
    assert_eq!((ev.kind, ev.rv), (EventType::Added, b.rv));
}

/// Creates `n` more pods named after their position, recording name and resourceVersion.
async fn create_some(s: &EtcdStore, written: &mut Vec<(String, Rv)>, n: usize) {
    for _ in 0..n {
        let name = format!("p{}", written.len());
        let o = s
            .create(&key(&name), json!({}))
            .await
            .expect("a write with one member down");
        written.push((name, o.rv));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_and_writes_survive_losing_members() {
    let mut etcd = Etcd::cluster(3);
    let s = store(&etcd).await;
    let mut w = s.watch(&pods(), s.current_rv(), WatchOptions::default()).unwrap();
    let mut written = Vec::new();
    create_some(&s, &mut written, 5).await;
    // Every member goes down once (the others keep quorum), so the watch's own member is lost at some point.
    for member in 0..3 {
        etcd.kill(member);
        create_some(&s, &mut written, 5).await;
        tokio::task::block_in_place(|| etcd.restart(member));
        create_some(&s, &mut written, 2).await;
    }
    let mut seen = Vec::new();
    while seen.len() < written.len() {
        let ev = next_event(&mut w).await;
        assert_eq!(ev.kind, EventType::Added);
        seen.push((ev.key.clone().unwrap().name, ev.rv));
    }
    assert_eq!(seen, written, "every write exactly once, in order");
    // Nothing more (no duplicates) arrives.
    assert!(tokio::time::timeout(Duration::from_secs(1), w.next()).await.is_err());
    let names: BTreeSet<String> = s
        .list(&pods())
        .await
        .unwrap()
        .0
        .into_iter()
        .map(|o| o.key.name)
        .collect();
    assert_eq!(names.len(), written.len());
}

#[test]
fn up_on_etcd_keeps_objects_across_kill_and_restart() {
    let etcd = Etcd::single();
    let store_prefix = prefix();
    let store_url = etcd.store_url();
    let mut c = Cluster::start_with(&["--store", &store_url, "--store-prefix", &store_prefix], "");
    c.ok(&["create", "configmap", "settings", "--from-literal=colour=blue"]);
    assert_eq!(
        c.ok(&["get", "configmap", "settings", "-o", "jsonpath={.data.colour}"]),
        "blue"
    );
    assert!(
        !c.data_dir().join("apiserver/store.redb").exists(),
        "no embedded store next to etcd"
    );
    c.restart();
    assert_eq!(
        c.ok(&["get", "configmap", "settings", "-o", "jsonpath={.data.colour}"]),
        "blue"
    );
    c.ok(&["delete", "configmap", "settings"]);
    // The objects live under the prefix in etcd.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let keys = runtime.block_on(async {
        let mut client = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
        let options = etcd_client::GetOptions::new().with_prefix().with_keys_only();
        let resp = client.get(store_prefix.as_str(), Some(options)).await.unwrap();
        resp.kvs()
            .iter()
            .map(|kv| kv.key_str().unwrap().to_string())
            .collect::<Vec<_>>()
    });
    assert!(keys.iter().any(|k| k.contains("/namespaces//default")), "{keys:?}");
    assert!(
        !keys.iter().any(|k| k.ends_with("/configmaps/default/settings")),
        "{keys:?}"
    );
}

#[test]
fn up_with_unreachable_etcd_fails_naming_the_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (common::free_port(), common::free_port());
    let url = format!("etcd://127.0.0.1:{p1},127.0.0.1:{p2}");
    let out = Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .args([
            "up",
            "--foreground",
            "--control-plane-only",
            "--api-address",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("cluster"))
        .arg("--kubeconfig")
        .arg(dir.path().join("kubeconfig"))
        .args(["--store", &url])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot reach etcd at http://127.0.0.1:{p1}, http://127.0.0.1:{p2}"
        )),
        "{stderr}"
    );
}

#[test]
fn up_on_three_etcd_members_keeps_working_without_one() {
    let mut etcd = Etcd::cluster(3);
    let registry = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let registry = Registry::start().await;
            let image = TestImage::busybox();
            push_image(&registry.url(), "test/busybox", "latest", &image, Flavour::Oci).await;
            registry
        });
    let store_url = etcd.store_url();
    let store_prefix = prefix();
    let c = Cluster::start_with(&["--store", &store_url, "--store-prefix", &store_prefix], "");
    let image = format!("{}/test/busybox:latest", registry.host());
    c.ok(&[
        "create",
        "deployment",
        "sleeper",
        "--image",
        &image,
        "--replicas",
        "2",
        "--",
        "sleep",
        "3600",
    ]);
    let ready = |c: &Cluster| {
        c.wait_output(
            &["get", "deployment", "sleeper", "-o", "jsonpath={.status.readyReplicas}"],
            Duration::from_secs(90),
            |out| out == "2",
        );
    };
    ready(&c);
    // The member the API server happens to talk to may be this one; the others keep quorum.
    etcd.kill(0);
    c.ok(&["create", "configmap", "after-loss", "--from-literal=k=v"]);
    let victim = c.ok(&[
        "get",
        "pods",
        "-l",
        "app=sleeper",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    c.ok(&["delete", "pod", &victim, "--wait=false"]);
    // The controllers' watches carry on: the deleted replica is replaced.
    let names = c.wait_output(
        &[
            "get",
            "pods",
            "-l",
            "app=sleeper",
            "-o",
            "jsonpath={range .items[?(@.status.phase=='Running')]}{.metadata.name} {end}",
        ],
        Duration::from_secs(90),
        |out| out.split_whitespace().count() == 2 && !out.contains(victim.as_str()),
    );
    assert!(!names.contains(&victim), "{names}");
    ready(&c);
    assert_eq!(
        c.ok(&["get", "configmap", "after-loss", "-o", "jsonpath={.data.k}"]),
        "v"
    );
    c.ok(&["delete", "deployment", "sleeper"]);
}
