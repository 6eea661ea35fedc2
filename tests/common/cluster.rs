//! `podvisor up --foreground` in a temporary directory, driven by the real
//! `kubectl`: its own data dir, CRI socket, root, state, API port and builtin
//! network, all removed when the test ends (pass or fail).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::daemon::{remove_all_sandboxes, remove_test_network, test_network_config_for_nodes};

pub struct Cluster {
    child: Option<Child>,
    pub dir: TempDir,
    pub url: String,
    /// From spawning `podvisor up` to the API answering.
    pub ready_in: Duration,
    network: (String, String),
    extra_args: Vec<String>,
}

impl Cluster {
    pub fn start() -> Self {
        Self::start_with(&[], "")
    }

    /// `args` go to `podvisor up`; `daemon_config` is added to the daemon's TOML config.
    pub fn start_with(args: &[&str], daemon_config: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("podvisor-cluster-")
            .tempdir()
            .expect("tempdir");
        let nodes = args
            .iter()
            .position(|a| *a == "--nodes")
            .and_then(|i| args.get(i + 1)?.parse().ok())
            .unwrap_or(1);
        let (network, bridge, nat) = test_network_config_for_nodes(nodes);
        std::fs::write(dir.path().join("config.toml"), format!("{daemon_config}\n{network}")).unwrap();
        let mut cluster = Cluster {
            child: None,
            dir,
            url: String::new(),
            ready_in: Duration::ZERO,
            network: (bridge, nat),
            extra_args: args.iter().map(|a| a.to_string()).collect(),
        };
        cluster.launch();
        cluster
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("cluster")
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.dir.path().join("cri.sock").display())
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }

    fn launch(&mut self) {
        let started = Instant::now();
        let ready = self.data_dir().join("ready");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("up.log"))
            .unwrap();
        let path = |p: &str| self.dir.path().join(p);
        let mut command = Command::new(env!("CARGO_BIN_EXE_podvisor"));
        command
            .arg("up")
            .arg("--foreground")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(["--api-address", "127.0.0.1:0", "--listen", &self.endpoint()])
            .arg("--root")
            .arg(path("root"))
            .arg("--state")
            .arg(path("state"))
            .arg("--config")
            .arg(path("config.toml"))
            .arg("--pod-log-dir")
            .arg(path("pod-logs"))
            .args(&self.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("PODVISOR_TEST_LOG").unwrap_or_else(|_| "podvisor=debug,info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut child = command.spawn().expect("spawn podvisor up");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("podvisor up exited ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "podvisor up not ready:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(5));
        }
        self.ready_in = started.elapsed();
        self.url = std::fs::read_to_string(&ready).unwrap();
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9` of the cluster process (pods' monitors live on).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the cluster process to exit on its own (e.g. after `podvisor down`) and reaps it.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut command = Command::new("kubectl");
        command
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--cache-dir")
            .arg(self.dir.path().join("kubectl-cache"))
            .args(args)
            .stdin(Stdio::null());
        command
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run kubectl")
    }

    /// Runs kubectl, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs kubectl, asserts failure, returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(!out.status.success(), "kubectl {args:?} unexpectedly succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Writes `content` to a file in the test directory and returns its path.
    pub fn file(&self, name: &str, content: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    }

    /// Polls `kubectl args` until its output satisfies `cond`; returns that output.
    pub fn wait_output(&self, args: &[&str], timeout: Duration, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.kubectl(args);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && cond(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting on kubectl {args:?}; last output:\n{text}\n{}\nlog tail:\n{}",
                String::from_utf8_lossy(&out.stderr),
                tail(&self.log(), 40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Cluster {
    /// Removes the pods the cluster ran: its in-process CRI daemon is gone, so a
    /// short-lived `podvisor daemon` on the same directories does it.
    fn remove_pods(&self) {
        let path = |p: &str| self.dir.path().join(p);
        remove_pods_of(
            &self.endpoint(),
            &path("root"),
            &path("state"),
            &path("config.toml"),
            None,
        );
    }

    /// The extra nodes of `--nodes N` (`podvisor join` processes): killed, their
    /// pods removed and their networks deleted.
    fn remove_extra_nodes(&self) {
        let Ok(entries) = std::fs::read_dir(self.data_dir().join("nodes")) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = std::fs::read_to_string(dir.join("up.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                let deadline = Instant::now() + Duration::from_secs(5);
                while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let sibling = |p: &str| self.dir.path().join(format!("{p}-{name}"));
            let config = dir.join("config.toml");
            let endpoint = format!("unix://{}", dir.join("cri.sock").display());
            // The node's namespace, link and host table (`network` file, written by `up`).
            let network = std::fs::read_to_string(dir.join("network")).unwrap_or_default();
            let field = |key: &str| {
                network
                    .lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ').map(str::to_string))
            };
            let netns = field("netns").filter(|ns| std::path::Path::new("/run/netns").join(ns).exists());
            remove_pods_of(
                &endpoint,
                &sibling("root"),
                &sibling("state"),
                &config,
                netns.as_deref(),
            );
            let quiet = |program: &str, args: &[&str]| {
                let _ = Command::new(program)
                    .args(args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            };
            if let Some(ns) = &netns {
                quiet("ip", &["netns", "del", ns]);
            }
            if let Some(link) = field("host_link") {
                quiet("ip", &["link", "del", &link]);
            }
            if let Some(table) = field("table") {
                quiet("nft", &["delete", "table", "ip", &table]);
            }
            let text = std::fs::read_to_string(&config).unwrap_or_default();
            let value = |key: &str| {
                text.lines()
                    .find_map(|l| {
                        l.trim()
                            .strip_prefix(key)?
                            .trim()
                            .strip_prefix('=')
                            .map(|v| v.trim().trim_matches('"').to_string())
                    })
                    .unwrap_or_default()
            };
            remove_test_network(&value("bridge"), &value("nat_name"));
        }
    }
}

/// Removes every pod sandbox of a CRI daemon whose process is gone, through a short-lived daemon on its directories.
/// `netns`: the node's own network namespace, where its daemon's network lives.
fn remove_pods_of(
    endpoint: &str,
    root: &std::path::Path,
    state: &std::path::Path,
    config: &std::path::Path,
    netns: Option<&str>,
) {
    let socket = std::path::Path::new(endpoint.trim_start_matches("unix://"));
    // A dead daemon's socket file stays: the new daemon's socket is awaited below.
    let _ = std::fs::remove_file(socket);
    let mut command = match netns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_podvisor")]);
            command
        }
        None => Command::new(env!("CARGO_BIN_EXE_podvisor")),
    };
    let Ok(mut daemon) = command
        .arg("daemon")
        .args(["--listen", endpoint])
        .arg("--root")
        .arg(root)
        .arg("--state")
        .arg(state)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() && Instant::now() < deadline && matches!(daemon.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(10));
    }
    remove_all_sandboxes(endpoint.to_string());
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill();
        let table = podvisor::cluster::proxy::table_name(&self.data_dir());
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", &table])
            .stderr(Stdio::null())
            .status();
        self.remove_extra_nodes();
        self.remove_pods();
        let dir = self.dir.path().display().to_string();
        for pid in super::cri::processes_mentioning(&format!("monitor {dir}")) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        let mut mounts = super::cri::mounts_under(self.dir.path());
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in mounts {
            let _ = nix::mount::umount2(mount.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        remove_test_network(&self.network.0, &self.network.1);
    }
}
