//! Tests against the real kernel (root only): each test has its own bridge, subnet, NAT
//! table/chain names, state directory and network namespaces, all removed by a drop
//! guard even when the test fails. Host-wide settings the network changes (forwarding
//! sysctls) and the iptables nat tables iptables-nft creates are put back once the
//! last running test is done.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;

use super::*;

// ---------------------------------------------------------------------------------------
// Harness

struct HostState {
    users: usize,
    sysctls: Vec<(&'static str, String)>,
    absent_tables: Vec<&'static str>,
}

static HOST: Mutex<HostState> = Mutex::new(HostState {
    users: 0,
    sysctls: Vec::new(),
    absent_tables: Vec::new(),
});

const GLOBAL_SYSCTLS: [&str; 2] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];

fn host_acquire() {
    let mut h = HOST.lock().unwrap_or_else(|e| e.into_inner());
    if h.users == 0 {
        h.sysctls = GLOBAL_SYSCTLS
            .iter()
            .filter_map(|p| Some((*p, std::fs::read_to_string(p).ok()?.trim().to_string())))
            .collect();
        h.absent_tables = ["ip", "ip6"]
            .into_iter()
            .filter(|fam| {
                !Command::new("nft")
                    .args(["list", "table", fam, "nat"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .collect();
    }
    h.users += 1;
}

fn host_release() {
    let mut h = HOST.lock().unwrap_or_else(|e| e.into_inner());
    h.users -= 1;
    if h.users > 0 {
        return;
    }
    for (path, value) in &h.sysctls {
        let _ = std::fs::write(path, value);
    }
    // iptables-nft creates the nat tables on first use; drop them again if nobody else put
    // anything in them.
    for fam in &h.absent_tables {
        let listed = Command::new("nft").args(["-j", "list", "table", fam, "nat"]).output();
        let only_builtin = |out: &std::process::Output| {
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let items = json["nftables"].as_array().cloned().unwrap_or_default();
            items.iter().all(|i| {
                i.get("rule").is_none()
                    && i.get("chain").is_none_or(|c| {
                        matches!(
                            c["name"].as_str(),
                            Some("PREROUTING" | "INPUT" | "OUTPUT" | "POSTROUTING")
                        )
                    })
            })
        };
        if let Ok(out) = listed
            && out.status.success()
            && only_builtin(&out)
        {
            let _ = Command::new("nft").args(["delete", "table", fam, "nat"]).status();
        }
    }
}

fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("urandom");
    u64::from_le_bytes(buf)
}

fn sandbox_id() -> String {
    format!(
        "{:016x}{:016x}{:016x}{:016x}",
        random_u64(),
        random_u64(),
        random_u64(),
        random_u64()
    )
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipping: needs root");
    false
}

struct TestEnv {
    net: BuiltinNetwork,
    tag: String,
    netns: Vec<String>,
    host_links: Vec<String>,
}

impl TestEnv {
    fn new(backend: NatBackend, v6: bool) -> TestEnv {
        host_acquire();
        let r = random_u64();
        let tag = format!("{:04x}", r & 0xffff);
        let mut cfg = BuiltinConfig::new(std::env::temp_dir().join(format!("netbridge-test-{tag}")));
        cfg.bridge = format!("pvt{tag}");
        cfg.nat_name = format!("pvt{tag}");
        cfg.nat = backend;
        cfg.subnet_v4 = format!("10.{}.{}.0/24", 200 + (r >> 16) % 50, (r >> 24) % 256)
            .parse()
            .unwrap();
        if v6 {
            cfg.subnet_v6 = Some(
                format!("fd{:02x}:{:04x}::/64", (r >> 32) % 256, (r >> 40) % 65536)
                    .parse()
                    .unwrap(),
            );
        }
        TestEnv {
            net: BuiltinNetwork::new(cfg).expect("config"),
            tag,
            netns: Vec::new(),
            host_links: Vec::new(),
        }
    }

    fn add_netns(&mut self, suffix: &str) -> PathBuf {
        let name = format!("pvt{}{suffix}", self.tag);
        sh(&["ip", "netns", "add", &name]);
        self.netns.push(name.clone());
        PathBuf::from("/run/netns").join(name)
    }

    fn request(&self, id: &str, netns: &Path, ports: Vec<PortMapping>) -> AttachRequest {
        AttachRequest {
            sandbox_id: id.to_string(),
            netns: netns.to_path_buf(),
            ifname: "eth0".into(),
            port_mappings: ports,
        }
    }

    fn subnet(&self) -> Ipv4Net {
        self.net.config().subnet_v4
    }

    async fn veth_exists(&self, id: &str) -> bool {
        let host = Netlink::host().unwrap();
        host.link_by_name(&BuiltinNetwork::host_veth_name(id))
            .await
            .unwrap()
            .is_some()
    }

    async fn bridge_ports(&self) -> usize {
        let host = Netlink::host().unwrap();
        match host.link_by_name(&self.net.config().bridge).await.unwrap() {
            Some(br) => host.ports_of(br.index).await.unwrap().len(),
            None => 0,
        }
    }

    fn address_claims(&self, id: Option<&str>) -> usize {
        let claims = self.net.ipam.claims().unwrap();
        claims.values().filter(|o| id.is_none_or(|id| *o == id)).count()
    }

    async fn rules(&self, id: Option<&str>) -> usize {
        let nat = self.net.nat().await.unwrap();
        nat.count_tagged(&self.net.nat_base(), id).await.unwrap()
    }

    /// Asserts that nothing of sandbox `id` is left.
    async fn assert_gone(&self, id: &str) {
        assert!(!self.veth_exists(id).await, "veth of {id} left behind");
        assert_eq!(self.address_claims(Some(id)), 0, "address claims left behind");
        assert!(!self.net.ports.owned_by(id).unwrap(), "port claims left behind");
        assert_eq!(self.rules(Some(id)).await, 0, "NAT rules left behind");
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let net = &self.net;
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                if let Err(e) = rt.block_on(net.teardown_all()) {
                    eprintln!("teardown: {}", error_chain(&e));
                }
            });
        });
        for link in &self.host_links {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        host_release();
    }
}

/// Runs `f` on a thread inside the network namespace at `path`.
fn in_netns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = File::open(path).expect("open netns");
    std::thread::spawn(move || {
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// A TCP server answering each connection with "<name> <peer address>".
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(netns: Option<&Path>, bind: SocketAddr, name: &'static str) -> Server {
        let listen = move || {
            let l = TcpListener::bind(bind).expect("bind");
            l.set_nonblocking(true).expect("nonblocking");
            l
        };
        let listener = match netns {
            Some(p) => in_netns(p, listen),
            None => listen(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = writeln!(s, "{name} {}", peer.ip());
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                    Err(_) => break,
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
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects to `to` (from inside `netns` if given) and returns the server's line as
/// (name, peer address it saw).
fn fetch(netns: Option<&Path>, to: SocketAddr) -> io::Result<(String, IpAddr)> {
    let get = move || -> io::Result<String> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    let line = match netns {
        Some(p) => in_netns(p, get)?,
        None => get()?,
    };
    let mut words = line.split_whitespace();
    let name = words.next().unwrap_or_default().to_string();
    let peer = words
        .next()
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad reply {line:?}")))?;
    Ok((name, peer))
}

fn tcp(host_port: u16, container_port: u16, host_ip: &str) -> PortMapping {
    PortMapping {
        protocol: Protocol::Tcp,
        container_port,
        host_port,
        host_ip: host_ip.into(),
    }
}

fn random_port() -> u16 {
    20000 + (random_u64() % 30000) as u16
}

/// The host's source address towards the outside world, if it has one.
fn host_global_ipv4() -> Option<Ipv4Addr> {
    let out = Command::new("ip")
        .args(["-4", "-o", "route", "get", "1.1.1.1"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words.by_ref().find(|w| *w == "src")?;
    words.next()?.parse().ok()
}

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

// ---------------------------------------------------------------------------------------
// 1. Two pods talk to each other and to the host.

async fn two_pods(backend: NatBackend) {
    if !is_root() {
        return;
    }
    let mut env = TestEnv::new(backend, false);
    assert!(env.net.is_ready().await.is_err(), "not ready before ensure_ready");
    env.net.ensure_ready().await.unwrap();
    env.net.ensure_ready().await.unwrap();
    env.net.is_ready().await.unwrap();
    let (ns_a, ns_b) = (env.add_netns("a"), env.add_netns("b"));
    let (id_a, id_b) = (sandbox_id(), sandbox_id());
    let a = env.net.attach(&env.request(&id_a, &ns_a, vec![])).await.unwrap();
    let b = env.net.attach(&env.request(&id_b, &ns_b, vec![])).await.unwrap();
    let gw = env.net.gateway();
    assert_eq!(gw, Ipv4Addr::from(u32::from(env.subnet().network()) + 1));
    assert_ne!(a.ipv4, b.ipv4);
    assert!(env.subnet().contains(&a.ipv4) && env.subnet().contains(&b.ipv4));
    assert!(u32::from(a.ipv4) > u32::from(gw));
    assert_eq!(a.gateway, gw);
    assert_eq!(a.host_veth, BuiltinNetwork::host_veth_name(&id_a));
    assert_eq!(env.bridge_ports().await, 2);

    let _server = Server::start(Some(&ns_a), sock(a.ipv4, 8080), "A");
    let (name, peer) = fetch(Some(&ns_b), sock(a.ipv4, 8080)).unwrap();
    assert_eq!(
        (name.as_str(), peer),
        ("A", IpAddr::V4(b.ipv4)),
        "pod B -> pod A, not NAT'd"
    );
    let (name, peer) = fetch(None, sock(a.ipv4, 8080)).unwrap();
    assert_eq!((name.as_str(), peer), ("A", IpAddr::V4(gw)), "host -> pod A");

    let routes = sh(&["ip", "-n", &env.netns[0], "route", "show", "default"]);
    assert!(routes.contains(&format!("default via {gw} dev eth0")), "{routes}");
    let link = sh(&["ip", "-n", &env.netns[0], "link", "show", "eth0"]);
    assert!(link.contains(&a.mac) && link.contains("UP"), "{link}");
    let lo = sh(&["ip", "-n", &env.netns[0], "link", "show", "lo"]);
    assert!(lo.contains("UP"), "{lo}");
    let ser = serde_json::to_string(&a).unwrap();
    assert_eq!(serde_json::from_str::<Attachment>(&ser).unwrap(), a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nft_two_pods() {
    two_pods(NatBackend::Nft).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_two_pods() {
    two_pods(NatBackend::Iptables).await;
}

// ---------------------------------------------------------------------------------------
// 2. hostPorts: loopback, the host's address, hairpin from pods, host IP limits, conflicts.

async fn host_ports(backend: NatBackend) {
    if !is_root() {
        return;
    }
    let mut env = TestEnv::new(backend, false);
    let (ns_a, ns_b, ns_c, ns_d) = (
        env.add_netns("a"),
        env.add_netns("b"),
        env.add_netns("c"),
        env.add_netns("d"),
    );
    let (id_a, id_b, id_c, id_d) = (sandbox_id(), sandbox_id(), sandbox_id(), sandbox_id());
    let (hp, hp_lo) = (random_port(), random_port());
    let a = env
        .net
        .attach(&env.request(&id_a, &ns_a, vec![tcp(hp, 8080, "")]))
        .await
        .unwrap();
    let b = env.net.attach(&env.request(&id_b, &ns_b, vec![])).await.unwrap();
    let _server_a = Server::start(Some(&ns_a), sock(Ipv4Addr::UNSPECIFIED, 8080), "A");
    let gw = env.net.gateway();

    let (name, _) = fetch(None, sock(Ipv4Addr::LOCALHOST, hp)).unwrap();
    assert_eq!(name, "A", "host -> 127.0.0.1:hostPort");
    let (name, peer) = fetch(Some(&ns_b), sock(gw, hp)).unwrap();
    assert_eq!(
        (name.as_str(), peer),
        ("A", IpAddr::V4(gw)),
        "pod B -> gateway:hostPort (hairpin NAT)"
    );
    if let Some(host_ip) = host_global_ipv4() {
        let (name, _) = fetch(None, sock(host_ip, hp)).unwrap();
        assert_eq!(name, "A", "host -> {host_ip}:hostPort");
        let (name, peer) = fetch(Some(&ns_b), sock(host_ip, hp)).unwrap();
        assert_eq!(
            (name.as_str(), peer),
            ("A", IpAddr::V4(gw)),
            "pod B -> host address:hostPort"
        );
        let (name, _) = fetch(Some(&ns_a), sock(host_ip, hp)).unwrap();
        assert_eq!(name, "A", "pod A -> its own hostPort");
    } else {
        eprintln!("no global IPv4 address on the host; skipping those hostPort checks");
    }
    assert!(b.ipv4 != a.ipv4);

    // Limited to 127.0.0.1: reachable there only.
    let d = env
        .net
        .attach(&env.request(&id_d, &ns_d, vec![tcp(hp_lo, 8081, "127.0.0.1")]))
        .await
        .unwrap();
    let _server_d = Server::start(Some(&ns_d), sock(d.ipv4, 8081), "D");
    let (name, _) = fetch(None, sock(Ipv4Addr::LOCALHOST, hp_lo)).unwrap();
    assert_eq!(name, "D");
    assert!(
        fetch(None, sock(gw, hp_lo)).is_err(),
        "mapping limited to 127.0.0.1 answered on the gateway"
    );

    // The same hostPort for another sandbox: refused, nothing left behind.
    let before = env.rules(None).await;
    let err = env
        .net
        .attach(&env.request(&id_c, &ns_c, vec![tcp(hp, 80, "127.0.0.1")]))
        .await
        .unwrap_err();
    let msg = error_chain(&err);
    assert!(matches!(err, NetError::Conflict(_)) && msg.contains(&id_a), "{msg}");
    env.assert_gone(&id_c).await;
    assert_eq!(env.rules(None).await, before);
    assert!(!sh(&["ip", "-n", &env.netns[2], "link"]).contains("eth0"));
    // Still working for A.
    assert_eq!(fetch(None, sock(Ipv4Addr::LOCALHOST, hp)).unwrap().0, "A");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nft_host_ports() {
    host_ports(NatBackend::Nft).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_host_ports() {
    host_ports(NatBackend::Iptables).await;
}

// ---------------------------------------------------------------------------------------
// 3. Egress is masqueraded: a server in an "outside" namespace reached through a host veth
// (not the bridge) sees the host's address, and has no route back to the pod subnet.

async fn egress_masquerade(backend: NatBackend) {
    if !is_root() {
        return;
    }
    let mut env = TestEnv::new(backend, false);
    let ns_a = env.add_netns("a");
    let ns_out = env.add_netns("o");
    let out_name = env.netns[1].clone();
    let host_end = format!("pvo{}", env.tag);
    let k = random_u64() % 250;
    let (host_ip, out_ip) = (format!("198.18.{k}.1"), format!("198.18.{k}.2"));
    sh(&[
        "ip", "link", "add", &host_end, "type", "veth", "peer", "name", "out0", "netns", &out_name,
    ]);
    env.host_links.push(host_end.clone());
    sh(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &host_end]);
    sh(&["ip", "link", "set", &host_end, "up"]);
    sh(&[
        "ip",
        "-n",
        &out_name,
        "addr",
        "add",
        &format!("{out_ip}/30"),
        "dev",
        "out0",
    ]);
    sh(&["ip", "-n", &out_name, "link", "set", "out0", "up"]);

    let id = sandbox_id();
    let a = env.net.attach(&env.request(&id, &ns_a, vec![])).await.unwrap();
    let out_addr: Ipv4Addr = out_ip.parse().unwrap();
    let _server = Server::start(Some(&ns_out), sock(out_addr, 9000), "O");
    let (name, peer) = fetch(Some(&ns_a), sock(out_addr, 9000)).unwrap();
    assert_eq!(name, "O");
    assert_eq!(
        peer,
        host_ip.parse::<IpAddr>().unwrap(),
        "source rewritten to the host's address"
    );
    assert!(matches!(peer, IpAddr::V4(p) if !env.subnet().contains(&p)) && peer != IpAddr::V4(a.ipv4));

    if backend == NatBackend::Nft {
        let table = sh(&["nft", "list", "table", "ip", &env.net.config().nat_name]);
        let rule = format!(
            "ip saddr {0} ip daddr != {0} oifname != \"{1}\" masquerade",
            env.subnet(),
            env.net.config().bridge
        );
        assert!(table.contains(&rule), "{table}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nft_egress_masquerade() {
    egress_masquerade(NatBackend::Nft).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_egress_masquerade() {
    egress_masquerade(NatBackend::Iptables).await;
}

// ---------------------------------------------------------------------------------------
// 4. Detach cleans up, is idempotent, and needs only the sandbox id.

async fn detach_cleans_up(backend: NatBackend) {
    if !is_root() {
        return;
    }
    let mut env = TestEnv::new(backend, false);
    let (ns_a, ns_b, ns_c) = (env.add_netns("a"), env.add_netns("b"), env.add_netns("c"));
    let (id_a, id_b, id_c) = (sandbox_id(), sandbox_id(), sandbox_id());
    let ports = |p: u16| vec![tcp(p, 80, ""), tcp(p + 1, 81, "127.0.0.1")];

    let a = env
        .net
        .attach(&env.request(&id_a, &ns_a, ports(random_port())))
        .await
        .unwrap();
    assert!(env.veth_exists(&id_a).await);
    assert_eq!(env.address_claims(Some(&id_a)), 1);
    assert_eq!(env.rules(Some(&id_a)).await, 2);
    env.net.detach(&id_a, Some(&ns_a), Some(&a)).await.unwrap();
    env.assert_gone(&id_a).await;
    assert!(!sh(&["ip", "-n", &env.netns[0], "link"]).contains("eth0"));
    env.net.detach(&id_a, Some(&ns_a), Some(&a)).await.unwrap();
    env.net.detach(&id_a, None, None).await.unwrap();

    // The netns is gone before detach (which takes the veth with it).
    env.net
        .attach(&env.request(&id_b, &ns_b, ports(random_port())))
        .await
        .unwrap();
    sh(&["ip", "netns", "del", &env.netns[1]]);
    env.net.detach(&id_b, None, None).await.unwrap();
    env.assert_gone(&id_b).await;

    // After a "restart": a fresh instance, the sandbox id only, the netns still there.
    env.net
        .attach(&env.request(&id_c, &ns_c, ports(random_port())))
        .await
        .unwrap();
    let restarted = BuiltinNetwork::new(env.net.config().clone()).unwrap();
    restarted.detach(&id_c, None, None).await.unwrap();
    env.assert_gone(&id_c).await;
    assert_eq!(env.bridge_ports().await, 0);
    assert_eq!(env.rules(None).await, 0);
    assert_eq!(env.address_claims(None), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nft_detach_cleans_up() {
    detach_cleans_up(NatBackend::Nft).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_detach_cleans_up() {
    detach_cleans_up(NatBackend::Iptables).await;
}

// ---------------------------------------------------------------------------------------
// 5. Many cycles leave nothing behind; concurrent attaches never share an address.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_cycles_leave_nothing() {
    if !is_root() {
        return;
    }
    let mut env = TestEnv::new(NatBackend::Nft, false);
    let ns = env.add_netns("a");
    let mut ids = Vec::new();
    let mut seen = Vec::new();
    for i in 0..100u16 {
        let id = sandbox_id();
        let a = env
            .net
            .attach(&env.request(&id, &ns, vec![tcp(40000 + i, 80, "")]))
            .await
            .unwrap();
        seen.push(a.ipv4);
        env.net.detach(&id, Some(&ns), Some(&a)).await.unwrap();
        ids.push(id);
    }
    // Released addresses are not reused at once: 100 cycles in a /24 walk the range.
    assert!(
        seen.iter().collect::<HashSet<_>>().len() >= 100,
        "addresses reused too soon"
    );
    for id in &ids {
        assert!(!env.veth_exists(id).await);
    }
    assert_eq!(env.bridge_ports().await, 0);
    assert_eq!(env.address_claims(None), 0);
    assert_eq!(env.rules(None).await, 0);
    assert!(!env.net.ports.owned_by(&ids[0]).unwrap());
    assert_eq!(
        std::fs::read_dir(env.net.config().state_dir.join("ports"))
            .unwrap()
            .count(),
        0
    );
    assert!(!sh(&["ip", "-n", &env.netns[0], "link"]).contains("eth0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_attaches_get_distinct_addresses() {
    if !is_root() {
        return;
    }
    let mut env = TestEnv::new(NatBackend::Nft, false);
    let namespaces: Vec<PathBuf> = (0..20).map(|i| env.add_netns(&format!("{i}"))).collect();
    // Two instances share the state directory, as two processes would.
    let nets = [
        Arc::new(BuiltinNetwork::new(env.net.config().clone()).unwrap()),
        Arc::new(BuiltinNetwork::new(env.net.config().clone()).unwrap()),
    ];
    let mut tasks = Vec::new();
    for (i, ns) in namespaces.iter().enumerate() {
        let net = nets[i % 2].clone();
        let req = env.request(&sandbox_id(), ns, vec![tcp(41000 + i as u16, 80, "")]);
        tasks.push(tokio::spawn(async move {
            net.attach(&req).await.map(|a| (req.sandbox_id, a))
        }));
    }
    let mut attached = Vec::new();
    for t in tasks {
        attached.push(t.await.unwrap().unwrap());
    }
    let ips: HashSet<Ipv4Addr> = attached.iter().map(|(_, a)| a.ipv4).collect();
    assert_eq!(ips.len(), 20, "duplicate addresses handed out");
    assert_eq!(env.address_claims(None), 20);
    assert_eq!(env.rules(None).await, 20);
    assert_eq!(env.bridge_ports().await, 20);

    let mut tasks = Vec::new();
    for (i, (id, _)) in attached.into_iter().enumerate() {
        let net = nets[i % 2].clone();
        tasks.push(tokio::spawn(async move { net.detach(&id, None, None).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(env.address_claims(None), 0);
    assert_eq!(env.rules(None).await, 0);
    assert_eq!(env.bridge_ports().await, 0);
}

// ---------------------------------------------------------------------------------------
// 6. Failures are clear and leave nothing behind.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_leave_nothing() {
    if !is_root() {
        return;
    }
    let mut env = TestEnv::new(NatBackend::Nft, true);
    env.net.ensure_ready().await.unwrap();
    let ports = vec![tcp(random_port(), 80, "")];

    // A netns path that does not exist.
    let id = sandbox_id();
    let missing = std::env::temp_dir().join(format!("netbridge-no-such-netns-{}", env.tag));
    let err = env
        .net
        .attach(&env.request(&id, &missing, ports.clone()))
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::Netns { .. }), "{}", error_chain(&err));
    assert!(error_chain(&err).contains("No such file"), "{}", error_chain(&err));
    env.assert_gone(&id).await;

    // Not a network namespace.
    let not_ns = std::env::temp_dir().join(format!("netbridge-not-a-netns-{}", env.tag));
    std::fs::write(&not_ns, "").unwrap();
    let err = env
        .net
        .attach(&env.request(&id, &not_ns, ports.clone()))
        .await
        .unwrap_err();
    let _ = std::fs::remove_file(&not_ns);
    assert!(matches!(err, NetError::Netns { .. }), "{}", error_chain(&err));
    env.assert_gone(&id).await;

    // The interface name is taken inside the netns.
    let ns = env.add_netns("a");
    sh(&[
        "ip",
        "-n",
        &env.netns[0],
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0p",
    ]);
    let err = env.net.attach(&env.request(&id, &ns, ports.clone())).await.unwrap_err();
    assert!(
        matches!(err, NetError::Conflict(_)) && error_chain(&err).contains("eth0 already exists"),
        "{}",
        error_chain(&err)
    );
    env.assert_gone(&id).await;

    // A late failure, after the veth, addresses and port claims exist: IPv6 is disabled in
    // the pod, so adding its IPv6 address fails.
    let ns = env.add_netns("b");
    sh(&[
        "ip",
        "netns",
        "exec",
        &env.netns[1],
        "sysctl",
        "-qw",
        "net.ipv6.conf.default.disable_ipv6=1",
    ]);
    let err = env.net.attach(&env.request(&id, &ns, ports.clone())).await.unwrap_err();
    assert!(matches!(err, NetError::Netlink { .. }), "{}", error_chain(&err));
    env.assert_gone(&id).await;
    assert!(!sh(&["ip", "-n", &env.netns[1], "link"]).contains("eth0"));

    // Invalid requests.
    let bad = |ifname: &str, ports: Vec<PortMapping>| AttachRequest {
        sandbox_id: sandbox_id(),
        netns: ns.clone(),
        ifname: ifname.into(),
        port_mappings: ports,
    };
    for req in [
        bad("this-name-is-too-long", vec![]),
        bad("eth0", vec![tcp(1000, 0, "")]),
        bad("eth0", vec![tcp(1000, 80, "not-an-ip")]),
        bad("eth0", vec![tcp(1000, 80, ""), tcp(1000, 81, "127.0.0.1")]),
    ] {
        let err = env.net.attach(&req).await.unwrap_err();
        assert!(matches!(err, NetError::Invalid(_)), "{}", error_chain(&err));
        env.assert_gone(&req.sandbox_id).await;
    }
    assert!(matches!(
        env.net.detach("../x", None, None).await,
        Err(NetError::Invalid(_))
    ));
    assert_eq!(env.address_claims(None), 0);
    assert_eq!(env.bridge_ports().await, 0);
}

// ---------------------------------------------------------------------------------------
// The NAT ruleset removed behind our back: is_ready notices, attach and ensure_ready repair.

async fn nat_repair(backend: NatBackend) {
    if !is_root() {
        return;
    }
    let mut env = TestEnv::new(backend, false);
    let (ns_a, ns_b) = (env.add_netns("a"), env.add_netns("b"));
    env.net.ensure_ready().await.unwrap();
    env.net.is_ready().await.unwrap();
    let nat = env.net.nat().await.unwrap();

    nat.teardown(&env.net.nat_base()).await.unwrap();
    let hp = random_port();
    let a = env
        .net
        .attach(&env.request(&sandbox_id(), &ns_a, vec![tcp(hp, 8080, "")]))
        .await
        .unwrap();
    env.net.is_ready().await.unwrap();
    let _server = Server::start(Some(&ns_a), sock(a.ipv4, 8080), "A");
    assert_eq!(fetch(None, sock(Ipv4Addr::LOCALHOST, hp)).unwrap().0, "A");

    nat.teardown(&env.net.nat_base()).await.unwrap();
    assert!(env.net.is_ready().await.is_err());
    env.net.ensure_ready().await.unwrap();
    env.net.is_ready().await.unwrap();
    env.net
        .attach(&env.request(&sandbox_id(), &ns_b, vec![]))
        .await
        .unwrap();
    env.net.is_ready().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nft_nat_repair() {
    nat_repair(NatBackend::Nft).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_nat_repair() {
    nat_repair(NatBackend::Iptables).await;
}

// ---------------------------------------------------------------------------------------
// Dual stack, retries, config checks.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack() {
    if !is_root() {
        return;
    }
    let mut env = TestEnv::new(NatBackend::Nft, true);
    let (ns_a, ns_b) = (env.add_netns("a"), env.add_netns("b"));
    let (id_a, id_b) = (sandbox_id(), sandbox_id());
    let hp = random_port();
    let a = env
        .net
        .attach(&env.request(&id_a, &ns_a, vec![tcp(hp, 8080, "")]))
        .await
        .unwrap();
    let b = env.net.attach(&env.request(&id_b, &ns_b, vec![])).await.unwrap();
    let (a6, b6, gw6) = (a.ipv6.unwrap(), b.ipv6.unwrap(), a.gateway_v6.unwrap());
    assert_eq!(env.rules(Some(&id_a)).await, 2, "one DNAT rule per family");
    let _server = Server::start(Some(&ns_a), sock(Ipv6Addr::UNSPECIFIED, 8080), "A");
    let (name, peer) = fetch(Some(&ns_b), sock(a6, 8080)).unwrap();
    assert_eq!((name.as_str(), peer), ("A", IpAddr::V6(b6)));
    assert_eq!(fetch(None, sock(a6, 8080)).unwrap().0, "A");
    assert_eq!(fetch(None, sock(gw6, hp)).unwrap().0, "A", "host -> [gateway]:hostPort");
    assert_eq!(fetch(None, sock(a.ipv4, 8080)).unwrap().0, "A", "v4 still works");
    let routes = sh(&["ip", "-6", "-n", &env.netns[0], "route", "show", "default"]);
    assert!(routes.contains(&format!("default via {gw6} dev eth0")), "{routes}");
    env.net.detach(&id_a, None, None).await.unwrap();
    env.assert_gone(&id_a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_reuses_address() {
    if !is_root() {
        return;
    }
    let mut env = TestEnv::new(NatBackend::Nft, false);
    let ns = env.add_netns("a");
    let id = sandbox_id();
    let req = env.request(&id, &ns, vec![tcp(random_port(), 80, "")]);
    let first = env.net.attach(&req).await.unwrap();
    // The caller lost the result and tries again: same address, one veth, one rule.
    let second = env.net.attach(&req).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(env.address_claims(Some(&id)), 1);
    assert_eq!(env.rules(Some(&id)).await, 1);
    assert_eq!(env.bridge_ports().await, 1);
    env.net.detach(&id, None, None).await.unwrap();
    env.assert_gone(&id).await;
}

#[test]
fn config_validation_and_names() {
    let ok = BuiltinConfig::new("/tmp/x");
    let net = BuiltinNetwork::new(ok.clone()).unwrap();
    assert_eq!(net.gateway(), Ipv4Addr::new(10, 88, 0, 1));
    let mut bad = ok.clone();
    bad.bridge = "way-too-long-bridge".into();
    assert!(BuiltinNetwork::new(bad).is_err());
    let mut bad = ok.clone();
    bad.subnet_v4 = "10.0.0.0/31".parse().unwrap();
    assert!(BuiltinNetwork::new(bad).is_err());
    let mut bad = ok.clone();
    bad.nat_name = "Bad Name".into();
    assert!(BuiltinNetwork::new(bad).is_err());
    let mut sloppy = ok;
    sloppy.subnet_v4 = "10.1.2.3/24".parse().unwrap();
    assert_eq!(
        BuiltinNetwork::new(sloppy).unwrap().gateway(),
        Ipv4Addr::new(10, 1, 2, 1)
    );

    assert_eq!(BuiltinNetwork::host_veth_name("0123456789abcdef"), "pv0123456789a");
    let hashed = BuiltinNetwork::host_veth_name("pod-xyz");
    assert!(hashed.len() == 13 && hashed.starts_with("pv"), "{hashed}");
    assert_eq!(format_mac(mac_for(Ipv4Addr::new(10, 88, 0, 2))), "0a:58:0a:58:00:02");
}

// ---------------------------------------------------------------------------------------
// Timings (printed; run with --nocapture).

async fn timings(backend: NatBackend) {
    if !is_root() {
        return;
    }
    let mut env = TestEnv::new(backend, false);
    env.net.ensure_ready().await.unwrap();
    let ns = env.add_netns("a");
    let (mut attach, mut detach, mut attach_noports) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..50u16 {
        let id = sandbox_id();
        let req = env.request(&id, &ns, vec![tcp(42000 + i, 80, "")]);
        let t = Instant::now();
        let a = env.net.attach(&req).await.unwrap();
        attach.push(t.elapsed());
        let t = Instant::now();
        env.net.detach(&id, None, Some(&a)).await.unwrap();
        detach.push(t.elapsed());

        let req = env.request(&id, &ns, vec![]);
        let t = Instant::now();
        env.net.attach(&req).await.unwrap();
        attach_noports.push(t.elapsed());
        env.net.detach(&id, None, None).await.unwrap();
    }
    for v in [&mut attach, &mut detach, &mut attach_noports] {
        v.sort();
    }
    eprintln!(
        "{backend:?}: attach (1 hostPort) p50 {:?} p95 {:?}; attach (no ports) p50 {:?} p95 {:?}; detach p50 {:?} p95 {:?}",
        percentile(&attach, 50),
        percentile(&attach, 95),
        percentile(&attach_noports, 50),
        percentile(&attach_noports, 95),
        percentile(&detach, 50),
        percentile(&detach, 95),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nft_timings() {
    timings(NatBackend::Nft).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_timings() {
    timings(NatBackend::Iptables).await;
}
