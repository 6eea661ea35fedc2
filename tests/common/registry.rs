//! A private `docker-registry` (distribution 2.8) instance per test.

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const PORT_ATTEMPTS: usize = 5;

/// A running registry with filesystem storage in its own temp dir; killed on drop.
pub struct Registry {
    child: Child,
    host: String,
    dir: TempDir,
}

impl Registry {
    /// Starts an anonymous registry (pull and push open to everyone).
    pub async fn start() -> Registry {
        Self::spawn(None).await
    }

    /// Starts a registry that requires HTTP basic auth (bcrypt htpasswd file).
    /// Distribution 2.8 accepts htpasswd auth over plain HTTP.
    pub async fn start_with_htpasswd(user: &str, pass: &str) -> Registry {
        Self::spawn(Some((user, pass))).await
    }

    /// "127.0.0.1:PORT"
    pub fn host(&self) -> &str {
        &self.host
    }

    /// "http://127.0.0.1:PORT"
    pub fn url(&self) -> String {
        format!("http://{}", self.host)
    }

    /// Where the registry keeps a blob's bytes, e.g. to corrupt it on purpose.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    async fn spawn(auth: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("registry-")
            .tempdir()
            .expect("create registry temp dir");
        if let Some((user, pass)) = auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .expect("run htpasswd (apache2-utils)");
            assert!(
                out.status.success(),
                "htpasswd failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            fs::write(dir.path().join("htpasswd"), &out.stdout).expect("write htpasswd");
        }
        let host = format!("127.0.0.1:{}", super::free_port());
        let child = spawn_child(&dir, &host, auth.is_some());
        let mut registry = Registry { child, host, dir };
        // The port may be taken by a parallel test between `free_port` and
        // the registry's bind: retry on a fresh port then.
        let mut attempt = 1;
        loop {
            match registry.wait_ready().await {
                Ok(()) => return registry,
                Err(log) if log.contains("address already in use") && attempt < PORT_ATTEMPTS => {
                    attempt += 1;
                    registry.stop();
                    registry.host = format!("127.0.0.1:{}", super::free_port());
                    registry.child = spawn_child(&registry.dir, &registry.host, auth.is_some());
                }
                Err(log) => panic!("docker-registry on {} did not become ready: {log}", registry.host),
            }
        }
    }

    /// Waits until `GET /v2/` is answered by *this* instance (identified by a
    /// response header, in case another server took the port). Err carries the log.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let client = reqwest::Client::new();
        let url = format!("{}/v2/", self.url());
        let id = self.dir.path().display().to_string();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}; log:\n{}", self.log()));
            }
            if let Ok(resp) = client.get(&url).timeout(Duration::from_secs(1)).send().await
                && resp.headers().get("x-harness-registry").map(|v| v.as_bytes()) == Some(id.as_bytes())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("no answer after {READY_TIMEOUT:?}; log:\n{}", self.log()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The registry's combined stdout/stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_child(dir: &TempDir, host: &str, htpasswd: bool) -> Child {
    let root = dir.path();
    let auth = if htpasswd {
        format!(
            "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
            root.join("htpasswd").display()
        )
    } else {
        String::new()
    };
    let config = format!(
        "version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {host}
  headers:
    X-Harness-Registry: [\"{id}\"]
{auth}",
        storage = root.join("storage").display(),
        id = root.display(),
    );
    let config_path = root.join("config.yml");
    fs::write(&config_path, config).expect("write registry config");
    let log = File::create(root.join("registry.log")).expect("create registry log");
    Command::new("docker-registry")
        .arg("serve")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log fd"))
        .stderr(log)
        .spawn()
        .expect("spawn docker-registry (apt install docker-registry)")
}
