//! Integration-test harness: a real OCI registry (`docker-registry`), in-memory
//! test images, a pushing client and a fault-injecting reverse proxy.
#![allow(dead_code)] // reason: shared by several test binaries, each uses a subset

pub mod cluster;
pub mod cri;
pub mod daemon;
pub mod etcd;
pub mod oci;
pub mod proxy;
pub mod push;
pub mod registry;
pub mod streaming;

use std::net::TcpListener;
use std::time::{Duration, Instant};

/// A loopback TCP port that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Polls `cond` every 20 ms until it holds; panics after `timeout`, naming `what`.
pub async fn wait_for<F: Fn() -> bool>(timeout: Duration, what: &str, cond: F) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
