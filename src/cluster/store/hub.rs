//! Fan-out of committed events to watchers, with a bounded replay window.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use tokio::sync::broadcast;

use super::{Event, EventType, Rv, Scope, StoreError, WatchOptions, WatchStream};

pub(crate) struct Hub {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<Event>>,
}

struct Inner {
    window: VecDeque<Arc<Event>>,
    /// Every event with rv > covered is in `window`.
    covered: Rv,
    current: Rv,
    cap: usize,
}

impl Hub {
    pub(crate) fn new(current: Rv, cap: usize) -> Self {
        let (tx, _) = broadcast::channel(cap.max(16));
        Hub {
            inner: Mutex::new(Inner {
                window: VecDeque::new(),
                covered: current,
                current,
                cap: cap.max(1),
            }),
            tx,
        }
    }

    pub(crate) fn current(&self) -> Rv {
        self.inner.lock().unwrap().current
    }

    /// Publishes a committed event. Callers serialize writes, so events arrive in resourceVersion order.
    pub(crate) fn publish(&self, ev: Event) {
        let ev = Arc::new(ev);
        let mut inner = self.inner.lock().unwrap();
        inner.current = inner.current.max(ev.rv);
        if inner.window.len() == inner.cap
            && let Some(old) = inner.window.pop_front()
        {
            inner.covered = old.rv;
        }
        inner.window.push_back(ev.clone());
        // No receivers is fine.
        let _ = self.tx.send(ev);
    }

    pub(crate) fn watch(&self, scope: &Scope, from: Rv, opts: WatchOptions) -> Result<WatchStream, StoreError> {
        let inner = self.inner.lock().unwrap();
        if from < inner.covered {
            return Err(StoreError::Gone {
                requested: from,
                oldest: inner.covered,
            });
        }
        let backlog: Vec<Arc<Event>> = inner
            .window
            .iter()
            .filter(|e| e.rv > from && e.key.as_ref().is_some_and(|k| scope.contains(k)))
            .cloned()
            .collect();
        let rx = self.tx.subscribe();
        let current = inner.current;
        drop(inner);
        let scope = scope.clone();
        let last = backlog.last().map_or(from.max(current), |e| e.rv.max(current));
        let live = futures_util::stream::unfold(
            (rx, scope, last, opts.bookmark_interval, false),
            |(mut rx, scope, mut last, bm, done)| async move {
                if done {
                    return None;
                }
                loop {
                    let recv = async {
                        match bm {
                            Some(d) => tokio::time::timeout(d, rx.recv()).await.ok(),
                            None => Some(rx.recv().await),
                        }
                    };
                    match recv.await {
                        None => {
                            let ev = Event {
                                kind: EventType::Bookmark,
                                rv: last,
                                key: None,
                                object: bookmark(last),
                                prev: None,
                            };
                            return Some((Ok(Arc::new(ev)), (rx, scope, last, bm, false)));
                        }
                        Some(Ok(ev)) => {
                            if ev.rv <= last && ev.kind != EventType::Bookmark {
                                continue;
                            }
                            last = last.max(ev.rv);
                            if ev.key.as_ref().is_some_and(|k| scope.contains(k)) {
                                return Some((Ok(ev), (rx, scope, last, bm, false)));
                            }
                        }
                        Some(Err(broadcast::error::RecvError::Lagged(_))) => {
                            let err = StoreError::Gone {
                                requested: last,
                                oldest: last + 1,
                            };
                            return Some((Err(err), (rx, scope, last, bm, true)));
                        }
                        Some(Err(broadcast::error::RecvError::Closed)) => return None,
                    }
                }
            },
        );
        Ok(futures_util::stream::iter(backlog.into_iter().map(Ok))
            .chain(live)
            .boxed())
    }
}

fn bookmark(rv: Rv) -> serde_json::Value {
    serde_json::json!({"metadata": {"resourceVersion": rv.to_string()}})
}
