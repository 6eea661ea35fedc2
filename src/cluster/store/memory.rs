//! Shared store logic over a small key-value backend, and the in-memory backend used by unit tests.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::Value;

use super::hub::Hub;
use super::{
    DEFAULT_WINDOW, Event, EventType, Key, Object, Result, Rv, Scope, Store, StoreError, WatchOptions, WatchStream,
    rv_of, stamp,
};

/// A synchronous, atomic key-value backend. `commit` must be durable before it returns.
pub trait Kv: Send + Sync + 'static {
    fn get(&self, key: &str) -> Result<Option<Value>>;
    fn scan(&self, prefix: &str) -> Result<Vec<(String, Value)>>;
    /// Atomically puts (Some) or removes (None) `key` and records `rv` as the latest resourceVersion.
    fn commit(&self, key: &str, value: Option<&Value>, rv: Rv) -> Result<()>;
    fn load_rv(&self) -> Result<Rv>;
}

/// [`Store`] over any [`Kv`]: one writer at a time, events published in commit order.
pub struct KvStore<B: Kv> {
    kv: B,
    hub: Hub,
    writer: Mutex<()>,
}

impl<B: Kv> KvStore<B> {
    pub fn with_backend(kv: B, window: usize) -> Result<Self> {
        let rv = kv.load_rv()?;
        Ok(KvStore {
            kv,
            hub: Hub::new(rv, window),
            writer: Mutex::new(()),
        })
    }

    fn write(&self, key: &Key, expected: Option<Rv>, op: WriteOp) -> Result<Object> {
        let _guard = self.writer.lock().unwrap();
        let enc = key.encode();
        let prev = self.kv.get(&enc)?;
        if let (Some(want), Some(p)) = (expected, prev.as_ref())
            && rv_of(p) != want
        {
            return Err(StoreError::Conflict { current: rv_of(p) });
        }
        let rv = self.hub.current() + 1;
        let (kind, mut value) = match (op, &prev) {
            (WriteOp::Create(_), Some(_)) => return Err(StoreError::AlreadyExists),
            (WriteOp::Create(v), None) => (EventType::Added, v),
            (WriteOp::Update(_) | WriteOp::Delete, None) => return Err(StoreError::NotFound),
            (WriteOp::Update(v), Some(_)) => (EventType::Modified, v),
            (WriteOp::Delete, Some(p)) => (EventType::Deleted, p.clone()),
        };
        stamp(&mut value, rv);
        self.kv
            .commit(&enc, (kind != EventType::Deleted).then_some(&value), rv)?;
        let prev = if kind == EventType::Added { None } else { prev };
        self.hub.publish(Event {
            kind,
            rv,
            key: Some(key.clone()),
            object: value.clone(),
            prev,
        });
        Ok(Object {
            key: key.clone(),
            rv,
            value,
        })
    }
}

enum WriteOp {
    Create(Value),
    Update(Value),
    Delete,
}

#[async_trait::async_trait]
impl<B: Kv> Store for KvStore<B> {
    async fn get(&self, key: &Key) -> Result<Object> {
        let value = self.kv.get(&key.encode())?.ok_or(StoreError::NotFound)?;
        Ok(Object {
            key: key.clone(),
            rv: rv_of(&value),
            value,
        })
    }

    async fn list(&self, scope: &Scope) -> Result<(Vec<Object>, Rv)> {
        // Holding the writer lock gives a consistent snapshot together with the current resourceVersion.
        let _guard = self.writer.lock().unwrap();
        let rv = self.hub.current();
        let items = self
            .kv
            .scan(&scope.prefix())?
            .into_iter()
            .filter_map(|(k, value)| {
                Some(Object {
                    key: Key::decode(&k)?,
                    rv: rv_of(&value),
                    value,
                })
            })
            .collect();
        Ok((items, rv))
    }

    async fn create(&self, key: &Key, value: Value) -> Result<Object> {
        self.write(key, None, WriteOp::Create(value))
    }

    async fn update(&self, key: &Key, value: Value, expected: Option<Rv>) -> Result<Object> {
        self.write(key, expected, WriteOp::Update(value))
    }

    async fn delete(&self, key: &Key, expected: Option<Rv>) -> Result<Object> {
        self.write(key, expected, WriteOp::Delete)
    }

    fn watch(&self, scope: &Scope, from: Rv, opts: WatchOptions) -> Result<WatchStream> {
        self.hub.watch(scope, from, opts)
    }

    fn current_rv(&self) -> Rv {
        self.hub.current()
    }
}

/// In-memory backend (not durable).
#[derive(Default)]
pub struct MemKv {
    map: Mutex<(BTreeMap<String, Value>, Rv)>,
}

impl Kv for MemKv {
    fn get(&self, key: &str) -> Result<Option<Value>> {
        Ok(self.map.lock().unwrap().0.get(key).cloned())
    }

    fn scan(&self, prefix: &str) -> Result<Vec<(String, Value)>> {
        let map = self.map.lock().unwrap();
        Ok(map
            .0
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn commit(&self, key: &str, value: Option<&Value>, rv: Rv) -> Result<()> {
        let mut map = self.map.lock().unwrap();
        match value {
            Some(v) => map.0.insert(key.to_string(), v.clone()),
            None => map.0.remove(key),
        };
        map.1 = rv;
        Ok(())
    }

    fn load_rv(&self) -> Result<Rv> {
        Ok(self.map.lock().unwrap().1)
    }
}

pub type MemoryStore = KvStore<MemKv>;

impl MemoryStore {
    pub fn new() -> Self {
        Self::with_window(DEFAULT_WINDOW)
    }

    pub fn with_window(window: usize) -> Self {
        KvStore::with_backend(MemKv::default(), window).expect("memory backend cannot fail")
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}
