//! A podvisor daemon under test: its own socket, root, state and config in a
//! temporary directory; killed (and waited for) on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use podvisor::cri::proto::runtime::image_service_client::ImageServiceClient;
use podvisor::cri::proto::runtime::runtime_service_client::RuntimeServiceClient;
use podvisor::cri::proto::runtime::{ImageSpec, PullImageRequest};
use tempfile::TempDir;
use tonic::transport::Channel;

pub struct Daemon {
    dir: TempDir,
    child: Option<Child>,
    config: Option<PathBuf>,
    /// The built-in network's bridge and NAT table names, removed on drop.
    network: Option<(String, String)>,
}

/// A built-in network of the test's own (bridge, subnet, NAT table), so that
/// daemons under test run side by side without touching the node's.
pub fn test_network_config() -> (String, String, String) {
    test_network_config_for_nodes(1)
}

/// As [`test_network_config`], keeping the next `nodes - 1` subnets free for the
/// extra nodes of `podvisor up --nodes`, which take the subnets after this one.
pub fn test_network_config_for_nodes(nodes: u32) -> (String, String, String) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(nodes.max(1), std::sync::atomic::Ordering::Relaxed);
    let pid = std::process::id();
    let bridge = format!("pvt{:04}{:02}", pid % 10000, n % 100);
    let nat = format!("pvt_{pid}_{n}");
    let text = format!(
        "[network]\nmode = \"builtin\"\n[network.builtin]\nbridge = \"{bridge}\"\nsubnet = \"10.{}.{}.0/24\"\nnat_name = \"{nat}\"\n",
        100 + pid % 100,
        n % 256
    );
    (text, bridge, nat)
}

impl Daemon {
    pub async fn start() -> Daemon {
        Self::start_with_config(None).await
    }

    pub async fn start_with_config(config: Option<&str>) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("podvisor-test-")
            .tempdir()
            .expect("tempdir");
        let mut text = config.unwrap_or_default().to_string();
        let mut network = None;
        if !text.contains("[network") {
            let (section, bridge, nat) = test_network_config();
            text.push_str(&section);
            network = Some((bridge, nat));
        }
        if !text.contains("[vm]") {
            // No KVM test domain at every test daemon's start: the VM tests choose their own.
            text.push_str("[vm]\nhypervisor = \"tcg\"\n");
        }
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).expect("write config");
        let mut daemon = Daemon {
            dir,
            child: None,
            config: Some(path),
            network,
        };
        daemon.launch().await;
        daemon
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("podvisor.sock")
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// The command line a daemon on this test's directories runs with.
    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_podvisor"));
        command
            .arg("daemon")
            .arg("--listen")
            .arg(self.endpoint())
            .arg("--root")
            .arg(self.root())
            .arg("--state")
            .arg(self.state())
            .env(
                "RUST_LOG",
                std::env::var("PODVISOR_TEST_LOG").unwrap_or_else(|_| "podvisor=debug,info".into()),
            );
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        command
    }

    async fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("open daemon log");
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn podvisor daemon");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("daemon exited with {status} during start:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start in time:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("daemon is running")
    }

    /// `kill -9`, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let status = child.wait().expect("wait for daemon");
            assert!(status.success(), "daemon exited with {status}:\n{}", self.log());
        }
    }

    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    pub async fn channel(&self) -> Channel {
        podvisor::cri::socket::connect(&self.endpoint())
            .await
            .expect("connect to daemon")
    }

    pub async fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel().await)
    }

    pub async fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel().await)
    }

    /// PullImage without credentials.
    pub async fn pull(&self, image: &str) -> Result<String, tonic::Status> {
        let request = PullImageRequest {
            image: Some(spec(image)),
            ..Default::default()
        };
        Ok(self.images().await.pull_image(request).await?.into_inner().image_ref)
    }

    /// Files and directories directly under `dir` inside the daemon root.
    pub fn entries(&self, dir: &str) -> Vec<String> {
        list_dir(&self.root().join(dir))
    }
}

pub fn spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

impl Daemon {
    /// Removes every sandbox through the CRI, as a kubelet would on its way out.
    fn remove_all_sandboxes(&self) {
        remove_all_sandboxes(self.endpoint());
    }

    /// Last resort for what a failed test left: monitors and mounts under our directory.
    fn sweep(&self) {
        let dir = self.dir.path().display().to_string();
        for pid in super::cri::processes_mentioning(&format!("monitor {dir}")) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        let mut mounts = super::cri::mounts_under(self.dir.path());
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in mounts {
            let _ = nix::mount::umount2(mount.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.remove_all_sandboxes();
        }
        self.kill();
        self.sweep();
        if let Some((bridge, nat)) = &self.network {
            remove_test_network(bridge, nat);
        }
    }
}

/// Deletes a test network's bridge and NAT tables (what a daemon leaves for the next run).
pub fn remove_test_network(bridge: &str, nat: &str) {
    let quiet = |program: &str, args: &[&str]| {
        let _ = Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    };
    quiet("ip", &["link", "del", bridge]);
    quiet("nft", &["delete", "table", "ip", nat]);
    quiet("nft", &["delete", "table", "ip6", nat]);
}

/// Removes every pod sandbox a daemon at `endpoint` has (best effort, for cleanup).
pub fn remove_all_sandboxes(endpoint: String) {
    let cleanup = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        runtime.block_on(async move {
            let Ok(channel) = podvisor::cri::socket::connect(&endpoint).await else {
                return;
            };
            let mut client = RuntimeServiceClient::new(channel);
            let Ok(pods) = client
                .list_pod_sandbox(podvisor::cri::proto::runtime::ListPodSandboxRequest { filter: None })
                .await
            else {
                return;
            };
            for pod in pods.into_inner().items {
                let _ = client
                    .remove_pod_sandbox(podvisor::cri::proto::runtime::RemovePodSandboxRequest {
                        pod_sandbox_id: pod.id,
                    })
                    .await;
            }
        });
    });
    let _ = cleanup.join();
}
