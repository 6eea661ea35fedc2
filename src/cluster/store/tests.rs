use futures_util::StreamExt;
use serde_json::json;

use super::*;

fn key(name: &str) -> Key {
    Key::new("", "pods", "default", name)
}

fn pods() -> Scope {
    Scope::new("", "pods", Some("default"))
}

async fn cas_and_crud(s: &dyn Store) {
    let a = s.create(&key("a"), json!({"metadata": {"name": "a"}})).await.unwrap();
    assert_eq!(a.value["metadata"]["resourceVersion"], json!(a.rv.to_string()));
    assert_eq!(s.create(&key("a"), json!({})).await, Err(StoreError::AlreadyExists));
    let b = s
        .update(&key("a"), json!({"metadata": {"name": "a"}, "x": 1}), Some(a.rv))
        .await
        .unwrap();
    assert!(b.rv > a.rv);
    assert_eq!(
        s.update(&key("a"), json!({}), Some(a.rv)).await,
        Err(StoreError::Conflict { current: b.rv })
    );
    assert_eq!(
        s.delete(&key("a"), Some(a.rv)).await,
        Err(StoreError::Conflict { current: b.rv })
    );
    assert_eq!(s.update(&key("zz"), json!({}), None).await, Err(StoreError::NotFound));
    s.create(&Key::new("", "pods", "other", "c"), json!({})).await.unwrap();
    s.create(&Key::new("", "podsx", "default", "d"), json!({}))
        .await
        .unwrap();
    let (items, rv) = s.list(&pods()).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(rv, s.current_rv());
    assert_eq!(s.list(&Scope::new("", "pods", None)).await.unwrap().0.len(), 2);
    let d = s.delete(&key("a"), Some(b.rv)).await.unwrap();
    assert!(d.rv > b.rv);
    assert_eq!(s.get(&key("a")).await, Err(StoreError::NotFound));
}

#[tokio::test]
async fn memory_crud_and_cas() {
    cas_and_crud(&MemoryStore::new()).await;
}

#[tokio::test]
async fn redb_crud_and_cas() {
    let dir = tempfile::tempdir().unwrap();
    cas_and_crud(&RedbStore::open(&dir.path().join("db")).unwrap()).await;
}

#[tokio::test]
async fn watch_orders_and_filters() {
    let s = MemoryStore::new();
    s.create(&key("before"), json!({})).await.unwrap();
    let start = s.current_rv();
    let mut w = s.watch(&pods(), start, WatchOptions::default()).unwrap();
    s.create(&key("a"), json!({})).await.unwrap();
    s.create(&Key::new("", "pods", "other", "x"), json!({})).await.unwrap();
    s.update(&key("a"), json!({"v": 2}), None).await.unwrap();
    s.delete(&key("a"), None).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let ev = w.next().await.unwrap().unwrap();
        got.push((ev.kind, ev.rv));
    }
    assert_eq!(
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        [EventType::Added, EventType::Modified, EventType::Deleted]
    );
    assert!(got.windows(2).all(|w| w[0].1 < w[1].1));
    // Replay from the window: a late watcher from `start` sees the same events.
    let late: Vec<_> = s
        .watch(&pods(), start, WatchOptions::default())
        .unwrap()
        .take(3)
        .collect()
        .await;
    assert_eq!(
        late.iter().map(|e| e.as_ref().unwrap().rv).collect::<Vec<_>>(),
        got.iter().map(|g| g.1).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn watch_too_old_is_gone() {
    let s = MemoryStore::with_window(2);
    for i in 0..5 {
        s.create(&key(&format!("p{i}")), json!({})).await.unwrap();
    }
    assert!(matches!(
        s.watch(&pods(), 1, WatchOptions::default()),
        Err(StoreError::Gone { .. })
    ));
    assert!(s.watch(&pods(), s.current_rv() - 2, WatchOptions::default()).is_ok());
}

#[tokio::test]
async fn watch_bookmarks_when_idle() {
    let s = MemoryStore::new();
    s.create(&key("a"), json!({})).await.unwrap();
    let opts = WatchOptions {
        bookmark_interval: Some(std::time::Duration::from_millis(20)),
    };
    let mut w = s.watch(&pods(), s.current_rv(), opts).unwrap();
    let ev = w.next().await.unwrap().unwrap();
    assert_eq!(ev.kind, EventType::Bookmark);
    assert_eq!(
        ev.object["metadata"]["resourceVersion"],
        json!(s.current_rv().to_string())
    );
}

#[tokio::test]
async fn redb_durable_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let rv = {
        let s = RedbStore::open(&path).unwrap();
        s.create(&key("a"), json!({"data": 1})).await.unwrap();
        let o = s.create(&key("b"), json!({"data": 2})).await.unwrap();
        o.rv
        // Dropped without any explicit close or flush.
    };
    let s = RedbStore::open(&path).unwrap();
    assert_eq!(s.current_rv(), rv);
    assert_eq!(s.get(&key("b")).await.unwrap().value["data"], json!(2));
    assert!(s.create(&key("c"), json!({})).await.unwrap().rv > rv);
    // The replay window restarts empty: a watch from before the restart must relist.
    assert!(matches!(
        s.watch(&pods(), rv - 1, WatchOptions::default()),
        Err(StoreError::Gone { .. })
    ));
}
