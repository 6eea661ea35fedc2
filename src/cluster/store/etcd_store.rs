//! Store on etcd v3: objects are JSON values under a key prefix, the resourceVersion is etcd's mod_revision.
//!
//! Writes are single-key transactions guarded by create_revision/mod_revision, so several API servers (or several
//! clusters under different prefixes) can share one etcd. Watches are etcd watches that reconnect on stream errors
//! and resume after the last delivered revision, so losing one member of an etcd cluster loses no events.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType as EtcdEventType, GetOptions, KeyValue,
    KvClient, ResponseHeader, Txn, TxnOp, TxnOpResponse, WatchResponse,
};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Event, EventType, Key, Object, Result, Rv, Scope, Store, StoreError, WatchOptions, WatchStream, stamp};

/// Key prefix used when none is configured.
pub const DEFAULT_PREFIX: &str = "/podvisor/";

/// How long one request may take before it is retried on another member.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long transient failures (a member down, a leader election) are retried before an operation fails.
const RETRY_BUDGET: Duration = Duration::from_secs(20);

pub struct EtcdStore {
    client: Client,
    prefix: String,
    /// The highest etcd revision seen in any response.
    current: Arc<AtomicU64>,
}

/// Parses `etcd://HOST:PORT[,HOST:PORT...]` into client endpoints.
pub fn parse_url(url: &str) -> std::result::Result<Vec<String>, String> {
    let rest = url
        .strip_prefix("etcd://")
        .ok_or_else(|| format!("{url:?}: an etcd store is given as etcd://HOST:PORT[,HOST:PORT...]"))?;
    let endpoints: Vec<String> = rest
        .trim_end_matches('/')
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| format!("http://{e}"))
        .collect();
    if endpoints.is_empty() {
        return Err(format!("{url:?} names no etcd endpoint"));
    }
    Ok(endpoints)
}

fn backend<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Failures another attempt (possibly on another member) may fix.
fn transient(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Unknown
                | Code::Aborted
                | Code::Internal
                | Code::Cancelled
        ),
        _ => false,
    }
}

fn revision(header: Option<&ResponseHeader>) -> Rv {
    header.map_or(0, |h| h.revision().max(0) as Rv)
}

impl EtcdStore {
    /// Connects to all `endpoints` and checks that etcd answers.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let unreachable = |e: &dyn std::fmt::Display| {
            StoreError::Backend(format!("cannot reach etcd at {}: {e}", endpoints.join(", ")))
        };
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| unreachable(&e))?;
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let store = EtcdStore {
            client,
            prefix,
            current: Arc::new(AtomicU64::new(0)),
        };
        let probe_key = store.prefix.clone();
        let probe = store.call_within(Duration::from_secs(6), move |mut kv| {
            let key = probe_key.clone();
            async move { kv.get(key, Some(GetOptions::new().with_count_only())).await }
        });
        let resp = probe.await.map_err(|e| match e {
            StoreError::Backend(msg) => unreachable(&msg),
            other => other,
        })?;
        store.saw(revision(resp.header()));
        Ok(store)
    }

    fn saw(&self, rv: Rv) {
        self.current.fetch_max(rv, Ordering::Relaxed);
    }

    fn etcd_key(&self, key: &Key) -> String {
        format!("{}{}", self.prefix, key.encode())
    }

    /// Runs one KV request, retrying transient failures within the retry budget.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnMut(KvClient) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.call_within(RETRY_BUDGET, op).await
    }

    async fn call_within<T, F, Fut>(&self, budget: Duration, mut op: F) -> Result<T>
    where
        F: FnMut(KvClient) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + budget;
        let mut pause = Duration::from_millis(50);
        loop {
            let err = match tokio::time::timeout(REQUEST_TIMEOUT, op(self.client.kv_client())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if transient(&e) => e.to_string(),
                Ok(Err(e)) => return Err(backend(e)),
                Err(_) => format!("no answer within {REQUEST_TIMEOUT:?}"),
            };
            if Instant::now() + pause > deadline {
                return Err(StoreError::Backend(format!("etcd: {err}")));
            }
            tracing::debug!(error = %err, "etcd request failed, retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    fn object(&self, key: &Key, kv: &KeyValue) -> Result<Object> {
        let rv = kv.mod_revision() as Rv;
        let mut value: Value = serde_json::from_slice(kv.value()).map_err(backend)?;
        stamp(&mut value, rv);
        Ok(Object {
            key: key.clone(),
            rv,
            value,
        })
    }

    /// A guarded single-key write: `op` runs if the key exists (or, for create, does not) and its mod_revision
    /// matches `expected`; otherwise the key is read to tell NotFound/AlreadyExists/Conflict apart. `written` is
    /// what a put stores: when an attempt failed ambiguously (the connection broke) and the retry finds exactly
    /// that value, the first attempt took effect.
    async fn guarded(
        &self,
        key: &Key,
        create: bool,
        expected: Option<Rv>,
        op: TxnOp,
        written: Option<&[u8]>,
    ) -> Result<(Rv, Vec<KeyValue>)> {
        let k = self.etcd_key(key);
        let mut when = vec![Compare::create_revision(
            k.clone(),
            if create { CompareOp::Equal } else { CompareOp::Greater },
            0,
        )];
        if let Some(want) = expected {
            when.push(Compare::mod_revision(k.clone(), CompareOp::Equal, want as i64));
        }
        let txn = Txn::new()
            .when(when)
            .and_then(vec![op])
            .or_else(vec![TxnOp::get(k.clone(), None)]);
        let mut attempts = 0;
        let resp = self
            .call(|mut kv| {
                attempts += 1;
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await?;
        let rv = revision(resp.header());
        self.saw(rv);
        let responses = resp.op_responses();
        if resp.succeeded() {
            let prev = match responses.into_iter().next() {
                Some(TxnOpResponse::Delete(mut d)) => d.take_prev_kvs(),
                _ => Vec::new(),
            };
            return Ok((rv, prev));
        }
        let current = match responses.into_iter().next() {
            Some(TxnOpResponse::Get(mut g)) => g.take_kvs().into_iter().next(),
            _ => None,
        };
        if let (true, Some(kv), Some(bytes)) = (attempts > 1, &current, written)
            && kv.value() == bytes
            && (!create || kv.create_revision() == kv.mod_revision())
        {
            return Ok((kv.mod_revision() as Rv, Vec::new()));
        }
        Err(match (create, current) {
            (true, _) => StoreError::AlreadyExists,
            (false, None) => StoreError::NotFound,
            (false, Some(kv)) => StoreError::Conflict {
                current: kv.mod_revision() as Rv,
            },
        })
    }

    async fn put(&self, key: &Key, mut value: Value, create: bool, expected: Option<Rv>) -> Result<Object> {
        let bytes = serde_json::to_vec(&value).map_err(backend)?;
        let (rv, _) = self
            .guarded(
                key,
                create,
                expected,
                TxnOp::put(self.etcd_key(key), bytes.clone(), None),
                Some(&bytes),
            )
            .await?;
        stamp(&mut value, rv);
        Ok(Object {
            key: key.clone(),
            rv,
            value,
        })
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &Key) -> Result<Object> {
        let k = self.etcd_key(key);
        let resp = self
            .call(|mut kv| {
                let k = k.clone();
                async move { kv.get(k, None).await }
            })
            .await?;
        self.saw(revision(resp.header()));
        let kv = resp.kvs().first().ok_or(StoreError::NotFound)?;
        self.object(key, kv)
    }

    async fn list(&self, scope: &Scope) -> Result<(Vec<Object>, Rv)> {
        let p = format!("{}{}", self.prefix, scope.prefix());
        let resp = self
            .call(|mut kv| {
                let p = p.clone();
                async move { kv.get(p, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let rv = revision(resp.header());
        self.saw(rv);
        // etcd returns a range sorted by key.
        let items = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = Key::decode(kv.key_str().ok()?.strip_prefix(&self.prefix)?)?;
                Some(self.object(&key, kv))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((items, rv))
    }

    async fn create(&self, key: &Key, value: Value) -> Result<Object> {
        self.put(key, value, true, None).await
    }

    async fn update(&self, key: &Key, value: Value, expected: Option<Rv>) -> Result<Object> {
        self.put(key, value, false, expected).await
    }

    async fn delete(&self, key: &Key, expected: Option<Rv>) -> Result<Object> {
        let op = TxnOp::delete(self.etcd_key(key), Some(DeleteOptions::new().with_prev_key()));
        let (rv, prev) = self.guarded(key, false, expected, op, None).await?;
        let prev = prev.first().ok_or(StoreError::NotFound)?;
        let mut last = self.object(key, prev)?;
        stamp(&mut last.value, rv);
        last.rv = rv;
        Ok(last)
    }

    fn watch(&self, scope: &Scope, from: Rv, opts: WatchOptions) -> Result<WatchStream> {
        let (tx, rx) = mpsc::channel(256);
        let watcher = Watcher {
            client: self.client.clone(),
            prefix: self.prefix.clone(),
            range: format!("{}{}", self.prefix, scope.prefix()),
            next: from + 1,
            bookmark_interval: opts.bookmark_interval,
            current: self.current.clone(),
            tx,
        };
        tokio::spawn(watcher.run());
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    fn current_rv(&self) -> Rv {
        self.current.load(Ordering::Relaxed)
    }
}

/// Feeds one store watch from etcd, reconnecting as needed.
struct Watcher {
    client: Client,
    prefix: String,
    range: String,
    /// The first revision not yet delivered.
    next: Rv,
    bookmark_interval: Option<Duration>,
    current: Arc<AtomicU64>,
    tx: mpsc::Sender<Result<Arc<Event>>>,
}

/// Why one etcd watch stream ended.
enum Ended {
    /// The consumer is gone or a final error was delivered.
    Done,
    /// The connection failed: reconnect and resume.
    Broken(String),
}

impl Watcher {
    async fn run(mut self) {
        let mut failing_since: Option<Instant> = None;
        let mut pause = Duration::from_millis(50);
        loop {
            let before = self.next;
            let err = match self.stream_once().await {
                Ended::Done => return,
                Ended::Broken(err) => err,
            };
            if self.next > before {
                failing_since = None;
                pause = Duration::from_millis(50);
            }
            let since = *failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() > RETRY_BUDGET {
                let _ = self
                    .tx
                    .send(Err(StoreError::Backend(format!("etcd watch: {err}"))))
                    .await;
                return;
            }
            tracing::debug!(error = %err, next = self.next, "etcd watch interrupted, resuming");
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.tx.closed() => return,
            }
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    async fn stream_once(&mut self) -> Ended {
        let options = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(self.next as i64);
        let mut watch_client = self.client.watch_client();
        let open = watch_client.watch(self.range.clone(), Some(options));
        let opened = tokio::select! {
            opened = tokio::time::timeout(REQUEST_TIMEOUT, open) => opened,
            _ = self.tx.closed() => return Ended::Done,
        };
        let mut stream = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Ended::Broken(e.to_string()),
            Err(_) => return Ended::Broken("no answer when opening the watch".into()),
        };
        let mut progress_requested = false;
        loop {
            let idle = async {
                match self.bookmark_interval {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let message = tokio::select! {
                m = stream.message() => m,
                _ = idle => {
                    // Ask etcd which revision everything has been delivered up to; if it did not answer the last
                    // request, bookmark what was delivered.
                    if progress_requested && !self.bookmark(self.next - 1).await {
                        return Ended::Done;
                    }
                    progress_requested = stream.request_progress().await.is_ok();
                    continue;
                }
                _ = self.tx.closed() => return Ended::Done,
            };
            let resp = match message {
                Ok(Some(resp)) => resp,
                Ok(None) => return Ended::Broken("watch stream closed".into()),
                Err(e) => return Ended::Broken(e.to_string()),
            };
            if resp.compact_revision() > 0 {
                let gone = StoreError::Gone {
                    requested: self.next - 1,
                    oldest: resp.compact_revision() as Rv,
                };
                let _ = self.tx.send(Err(gone)).await;
                return Ended::Done;
            }
            if resp.canceled() {
                return Ended::Broken(format!("watch canceled: {}", resp.cancel_reason()));
            }
            let header_rv = revision(resp.header());
            self.current.fetch_max(header_rv, Ordering::Relaxed);
            if resp.created() {
                continue;
            }
            if resp.events().is_empty() {
                // A progress notification: every event up to the header revision has been delivered.
                if progress_requested {
                    progress_requested = false;
                    self.next = self.next.max(header_rv + 1);
                    if !self.bookmark(self.next - 1).await {
                        return Ended::Done;
                    }
                }
                continue;
            }
            if !self.deliver(&resp).await {
                return Ended::Done;
            }
        }
    }

    /// Sends the events of one response not delivered before; false when the consumer is gone.
    async fn deliver(&mut self, resp: &WatchResponse) -> bool {
        let resume_from = self.next;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let rv = kv.mod_revision() as Rv;
            if rv < resume_from {
                continue;
            }
            self.next = self.next.max(rv + 1);
            let Some(event) = self.convert(ev.event_type(), kv, ev.prev_kv()) else {
                continue;
            };
            if self.tx.send(Ok(Arc::new(event))).await.is_err() {
                return false;
            }
        }
        true
    }

    fn convert(&self, kind: EtcdEventType, kv: &KeyValue, prev: Option<&KeyValue>) -> Option<Event> {
        let key = Key::decode(kv.key_str().ok()?.strip_prefix(&self.prefix)?)?;
        let rv = kv.mod_revision() as Rv;
        let decode = |kv: &KeyValue, rv: Rv| -> Option<Value> {
            let mut v: Value = serde_json::from_slice(kv.value()).ok()?;
            stamp(&mut v, rv);
            Some(v)
        };
        let prev_value = prev.and_then(|p| decode(p, p.mod_revision() as Rv));
        let (kind, object, prev) = match kind {
            EtcdEventType::Put if kv.create_revision() == kv.mod_revision() => {
                (EventType::Added, decode(kv, rv)?, None)
            }
            EtcdEventType::Put => (EventType::Modified, decode(kv, rv)?, prev_value),
            EtcdEventType::Delete => {
                // The last state, stamped with the deletion's revision; a bare stub if etcd no longer has it.
                let mut last = prev_value
                    .clone()
                    .unwrap_or_else(|| serde_json::json!({"metadata": {"name": key.name, "namespace": key.namespace}}));
                stamp(&mut last, rv);
                (EventType::Deleted, last, prev_value)
            }
        };
        Some(Event {
            kind,
            rv,
            key: Some(key),
            object,
            prev,
        })
    }

    async fn bookmark(&self, rv: Rv) -> bool {
        let event = Event {
            kind: EventType::Bookmark,
            rv,
            key: None,
            object: serde_json::json!({"metadata": {"resourceVersion": rv.to_string()}}),
            prev: None,
        };
        self.tx.send(Ok(Arc::new(event))).await.is_ok()
    }
}
