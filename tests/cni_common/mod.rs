//! Fixtures for the integration tests: network namespaces, per-test
//! networks (unique bridge, subnet and host-local data dir), TCP probes run
//! inside namespaces, and guards that clean up even when a test fails.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use podvisor::network::cni::{Attachment, CapabilityArgs, CniResult, CniRuntime, NetworkConfigList};
use serde_json::{Value, json};

/// Numbers unique within this test process.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A random number per test process, so names and subnets differ between runs.
pub fn process_random() -> u32 {
    static RANDOM: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *RANDOM.get_or_init(|| {
        let mut bytes = [0u8; 4];
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .expect("read /dev/urandom");
        u32::from_ne_bytes(bytes)
    })
}

pub fn unique() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Runs a command, returning whether it succeeded and its stdout + stderr.
pub fn run(args: &[&str]) -> (bool, String) {
    match Command::new(args[0]).args(&args[1..]).output() {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (false, format!("{}: {e}", args[0])),
    }
}

/// Runs a command that must succeed and returns its stdout.
pub fn must(args: &[&str]) -> String {
    let (ok, out) = run(args);
    assert!(ok, "{args:?} failed: {out}");
    out
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
    pub path: PathBuf,
    deleted: bool,
}

impl Netns {
    pub fn new() -> Netns {
        let name = format!("pvcni-test-{:08x}-{}", process_random(), unique());
        must(&["ip", "netns", "add", &name]);
        Netns {
            path: PathBuf::from("/run/netns").join(&name),
            name,
            deleted: false,
        }
    }

    pub fn delete(&mut self) {
        if !self.deleted {
            run(&["ip", "netns", "del", &self.name]);
            self.deleted = true;
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

/// Runs `f` on a thread that entered `netns`.
pub fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(netns).expect("open netns");
    std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// A TCP server answering "hello" to every connection, listening inside a
/// namespace (the socket is made there; it is served from a host thread).
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(netns: &Path, port: u16) -> Server {
        let listener = in_netns(netns, move || TcpListener::bind(("0.0.0.0", port))).expect("bind in netns");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.write_all(b"hello");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Connects to `addr` and returns what the server said.
pub fn fetch(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// The host's source address towards the outside (not loopback, not a test bridge).
pub fn host_ip() -> String {
    let out = must(&["ip", "-4", "-o", "route", "get", "1.1.1.1"]);
    let mut words = out.split_whitespace();
    while let Some(word) = words.next() {
        if word == "src" {
            return words.next().expect("address after src").to_string();
        }
    }
    panic!("no src in {out}");
}

/// One test's network: a unique name, bridge and /24, config and host-local
/// state in a tempdir. Removes the bridge and leftover portmap rules on drop.
pub struct TestNet {
    pub dir: tempfile::TempDir,
    pub name: String,
    pub bridge: String,
    /// e.g. "10.123.4" (the /24 is `{prefix}.0/24`).
    pub prefix: String,
    pub conf_dir: PathBuf,
    pub data_dir: PathBuf,
    pub bin_dir: PathBuf,
    container_ids: Mutex<Vec<String>>,
}

impl TestNet {
    pub fn new() -> TestNet {
        let n = unique();
        let random = process_random();
        let dir = tempfile::tempdir().expect("tempdir");
        let net = TestNet {
            name: format!("pvtest-{random:08x}-{n}"),
            bridge: format!("pvbr{:04x}{n}", random & 0xffff),
            prefix: format!("10.{}.{}", 100 + random % 100, n % 250),
            conf_dir: dir.path().join("net.d"),
            data_dir: dir.path().join("ipam"),
            bin_dir: dir.path().join("bin"),
            dir,
            container_ids: Mutex::new(Vec::new()),
        };
        std::fs::create_dir_all(&net.conf_dir).expect("mkdir net.d");
        std::fs::create_dir_all(&net.bin_dir).expect("mkdir bin");
        net
    }

    pub fn subnet(&self) -> String {
        format!("{}.0/24", self.prefix)
    }

    /// The bridge plugin with host-local IPAM on this test's subnet.
    pub fn bridge_plugin(&self) -> Value {
        json!({
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.subnet()}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.data_dir,
            }
        })
    }

    /// Writes a config file and loads the network back through the loader.
    pub fn write_config(&self, file_name: &str, config: &Value) -> NetworkConfigList {
        std::fs::write(self.conf_dir.join(file_name), config.to_string()).expect("write config");
        podvisor::network::cni::load_network(&self.conf_dir)
            .expect("load config")
            .expect("a network")
    }

    /// A conflist of `plugins` in `version`.
    pub fn conflist(&self, version: &str, plugins: Vec<Value>) -> NetworkConfigList {
        self.write_config(
            "10-test.conflist",
            &json!({"cniVersion": version, "name": self.name, "plugins": plugins}),
        )
    }

    /// A runtime looking in this test's bin dir, then the system plugin dirs.
    pub fn runtime(&self) -> CniRuntime {
        let mut runtime = CniRuntime::default();
        runtime.plugin_dirs.insert(0, self.bin_dir.clone());
        runtime
    }

    /// Writes an executable shell script plugin.
    pub fn script_plugin(&self, name: &str, body: &str) {
        let path = self.bin_dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write plugin");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod plugin");
    }

    /// An attachment of `netns` with a fresh container id.
    pub fn attachment(&self, netns: &Netns) -> Attachment {
        let id = format!("pvcid{:08x}{}", process_random(), unique());
        self.container_ids.lock().expect("lock").push(id.clone());
        Attachment {
            container_id: id,
            netns: netns.path.clone(),
            ifname: "eth0".into(),
            pod_namespace: "default".into(),
            pod_name: format!("pod-{}", netns.name),
            pod_uid: format!("uid-{}", unique()),
            capabilities: CapabilityArgs::default(),
        }
    }

    /// Files host-local keeps for allocated addresses.
    pub fn allocated_ips(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.data_dir.join(&self.name)) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(&self.prefix))
            .collect()
    }

    /// Interfaces enslaved to the bridge (host ends of veths).
    pub fn bridge_ports(&self) -> String {
        run(&["ip", "-o", "link", "show", "master", &self.bridge]).1
    }
}

/// nat-table rules mentioning `needle` (portmap comments carry the container id).
pub fn nat_rules_mentioning(needle: &str) -> Vec<String> {
    run(&["iptables-save", "-t", "nat"])
        .1
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Deletes nat rules mentioning `needle` (by nft handle) and the chains they
/// jump to: the fallback for a test that died before its DEL.
fn remove_nat_rules_mentioning(needle: &str) {
    let listing = run(&["nft", "-a", "list", "table", "ip", "nat"]).1;
    let mut chain = String::new();
    let mut targets = Vec::new();
    for line in listing.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("chain ") {
            chain = rest.trim_end_matches(" {").to_string();
        } else if line.contains(needle)
            && let Some((_, handle)) = line.rsplit_once("# handle ")
        {
            run(&["nft", "delete", "rule", "ip", "nat", &chain, "handle", handle.trim()]);
            if let Some((_, target)) = line.split_once("jump ") {
                targets.extend(target.split_whitespace().next().map(str::to_string));
            }
        }
    }
    for target in targets {
        run(&["iptables", "-t", "nat", "-F", &target]);
        run(&["iptables", "-t", "nat", "-X", &target]);
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        run(&["ip", "link", "del", &self.bridge]);
        let ids = self.container_ids.lock().map(|ids| ids.clone()).unwrap_or_default();
        for id in ids {
            if !nat_rules_mentioning(&id).is_empty() {
                remove_nat_rules_mentioning(&id);
            }
        }
    }
}

/// An ADDed attachment that is DELeted on drop unless the test did it.
pub struct Attached {
    pub runtime: CniRuntime,
    pub net: NetworkConfigList,
    pub at: Attachment,
    pub result: Option<CniResult>,
    pub deleted: bool,
}

impl Attached {
    pub async fn add(runtime: &CniRuntime, net: &NetworkConfigList, at: &Attachment) -> Attached {
        let mut attached = Attached {
            runtime: runtime.clone(),
            net: net.clone(),
            at: at.clone(),
            result: None,
            deleted: false,
        };
        attached.result = Some(runtime.add(net, at).await.expect("CNI ADD"));
        attached
    }

    pub fn result(&self) -> &CniResult {
        self.result.as_ref().expect("added")
    }

    pub fn pod_ip(&self) -> String {
        self.result().pod_ips().first().cloned().expect("a pod IP")
    }

    /// The host end of the pod's veth.
    pub fn host_veth(&self) -> String {
        self.result()
            .interfaces()
            .iter()
            .find(|i| i.sandbox.is_none() && i.name.starts_with("veth"))
            .map(|i| i.name.clone())
            .expect("host veth in result")
    }

    pub async fn del(&mut self) -> Result<(), podvisor::network::cni::CniError> {
        let outcome = self.runtime.del(&self.net, &self.at, self.result.as_ref()).await;
        self.deleted = true;
        outcome
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        let (runtime, net, at, result) = (
            self.runtime.clone(),
            self.net.clone(),
            self.at.clone(),
            self.result.take(),
        );
        // Drop may run inside the test's runtime: DEL on a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let _ = rt.block_on(runtime.del(&net, &at, result.as_ref()));
            Ok::<(), std::io::Error>(())
        })
        .join();
    }
}
