//! Finding plugin binaries and running one plugin command.

use std::ffi::OsString;
use std::future::Future;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Child;

use super::CniRuntime;
use super::config::validate_plugin_type;
use super::error::{CniError, Command, PluginFailure};

/// Results larger than this are refused.
const STDOUT_LIMIT: usize = 16 << 20;
/// How much of the end of stderr is kept for the log and the error.
const STDERR_LIMIT: usize = 16 << 10;
/// How long output pipes may stay open after the plugin exits (a background
/// child it left behind may hold them).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);
/// `PATH` for plugins when the daemon has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One plugin command: what to run and what to tell it.
pub(super) struct Invocation<'a> {
    pub command: Command,
    pub plugin_type: &'a str,
    pub plugin_path: &'a Path,
    /// `CNI_*` variables besides `CNI_COMMAND` and `CNI_PATH`.
    pub env: &'a [(&'static str, OsString)],
    pub stdin: Vec<u8>,
}

/// The error object a failing plugin prints on stdout.
#[derive(Deserialize)]
struct PluginErrorObject {
    code: u32,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

impl CniRuntime {
    /// The executable for `plugin_type`: the first regular, executable file of
    /// that name in [`CniRuntime::plugin_dirs`].
    pub fn find_plugin(&self, plugin_type: &str) -> Result<PathBuf, CniError> {
        validate_plugin_type(plugin_type).map_err(CniError::InvalidArgument)?;
        for dir in &self.plugin_dirs {
            let candidate = dir.join(plugin_type);
            match std::fs::metadata(&candidate) {
                Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(candidate),
                _ => continue,
            }
        }
        Err(CniError::PluginNotFound {
            plugin: plugin_type.to_string(),
            searched: self.cni_path().to_string_lossy().replace(':', ", "),
        })
    }

    /// `CNI_PATH`: the plugin directories joined by `:`.
    pub(super) fn cni_path(&self) -> OsString {
        let mut joined = OsString::new();
        for (i, dir) in self.plugin_dirs.iter().enumerate() {
            if i > 0 {
                joined.push(":");
            }
            joined.push(dir);
        }
        joined
    }

    /// Runs one plugin command and returns its stdout. A non-zero exit
    /// becomes [`CniError::Plugin`]; a plugin still running after
    /// [`CniRuntime::timeout`] is killed (with anything it started).
    pub(super) async fn invoke(&self, inv: Invocation<'_>) -> Result<Vec<u8>, CniError> {
        let started = Instant::now();
        let mut command = tokio::process::Command::new(inv.plugin_path);
        command
            .env_clear()
            .env("CNI_COMMAND", inv.command.as_str())
            .env("CNI_PATH", self.cni_path())
            .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()))
            .envs(inv.env.iter().map(|(k, v)| (k, v)))
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills what it started too.
            .process_group(0)
            .kill_on_drop(true);
        let spawn_error = |source| CniError::Spawn {
            plugin: inv.plugin_type.to_string(),
            command: inv.command,
            source,
        };
        // Host-side interfaces go to the node's network namespace.
        crate::sys::netns::enter_node(&mut command).map_err(spawn_error)?;
        // A plugin binary being installed (or written by a process that just
        // forked) is briefly busy for exec: retry that for a moment.
        let mut attempts = 0;
        let child = loop {
            match command.spawn() {
                Err(err) if err.raw_os_error() == Some(libc::ETXTBSY) && attempts < 50 => {
                    attempts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                result => break result.map_err(spawn_error)?,
            }
        };
        let mut process = PluginProcess::new(child);
        let (stdin, stdout, stderr) = (
            process.child.stdin.take(),
            process.child.stdout.take(),
            process.child.stderr.take(),
        );
        let mut out = Capture::head(STDOUT_LIMIT);
        let mut err = Capture::tail(STDERR_LIMIT);
        let outcome = {
            let io = async {
                let feed = async {
                    if let Some(mut stdin) = stdin {
                        // A plugin may exit without reading stdin; that is its business.
                        let _ = stdin.write_all(&inv.stdin).await;
                    }
                };
                tokio::join!(feed, out.drain(stdout), err.drain(stderr));
            };
            tokio::time::timeout(self.timeout, process.wait_with_io(io)).await
        };
        let status = match outcome {
            Ok(Ok(status)) => status,
            Ok(Err(source)) => return Err(spawn_error(source)),
            Err(_elapsed) => {
                process.kill().await;
                tracing::warn!(
                    plugin = inv.plugin_type,
                    command = %inv.command,
                    stderr = %err.text(),
                    "CNI plugin timed out after {:?}; killed",
                    self.timeout
                );
                return Err(CniError::Timeout {
                    plugin: inv.plugin_type.to_string(),
                    command: inv.command,
                    timeout: self.timeout,
                });
            }
        };
        tracing::debug!(
            plugin = inv.plugin_type,
            command = %inv.command,
            elapsed_ms = started.elapsed().as_millis() as u64,
            %status,
            "CNI plugin finished"
        );
        if out.truncated {
            return Err(CniError::InvalidResult {
                plugin: inv.plugin_type.to_string(),
                command: inv.command,
                reason: format!("output exceeds {STDOUT_LIMIT} bytes"),
            });
        }
        if status.success() {
            if !err.buf.is_empty() {
                tracing::debug!(
                    plugin = inv.plugin_type,
                    command = %inv.command,
                    stderr = %err.text(),
                    "CNI plugin stderr"
                );
            }
            return Ok(out.buf);
        }
        let failure = plugin_failure(inv.plugin_type, inv.command, status, &out.buf, err.text());
        if inv.command == Command::Status {
            // Polled; the caller reports readiness.
            tracing::debug!(error = %failure, stderr = %err.text(), "CNI plugin not ready");
        } else {
            tracing::warn!(error = %failure, stderr = %err.text(), "CNI plugin failed");
        }
        Err(failure)
    }
}

/// Builds [`CniError::Plugin`] from a failed plugin's output.
fn plugin_failure(plugin: &str, command: Command, status: ExitStatus, stdout: &[u8], stderr: String) -> CniError {
    let (code, msg, details) = match serde_json::from_slice::<PluginErrorObject>(stdout) {
        Ok(e) => (Some(e.code), e.msg, e.details),
        Err(_) => {
            let text = String::from_utf8_lossy(stdout);
            (None, truncate(text.trim(), 1024), String::new())
        }
    };
    CniError::Plugin(Box::new(PluginFailure {
        plugin: plugin.to_string(),
        command,
        code,
        msg,
        details,
        exit: status.to_string(),
        stderr,
    }))
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// A running plugin. Dropped before it was reaped (timeout, or the caller's
/// future cancelled), it takes its whole process group down.
struct PluginProcess {
    child: Child,
    /// The plugin's pid, which is its process group id; `None` once reaped.
    group: Option<Pid>,
}

impl PluginProcess {
    fn new(child: Child) -> Self {
        let group = child.id().and_then(|pid| i32::try_from(pid).ok()).map(Pid::from_raw);
        PluginProcess { child, group }
    }

    /// Waits for the plugin to exit while `io` feeds and drains its pipes;
    /// after the exit, `io` gets [`OUTPUT_GRACE`] to reach end of file.
    async fn wait_with_io(&mut self, io: impl Future<Output = ()>) -> std::io::Result<ExitStatus> {
        let mut io = pin!(io);
        let mut io_done = false;
        let status = loop {
            tokio::select! {
                () = &mut io, if !io_done => io_done = true,
                status = self.child.wait() => break status,
            }
        };
        if status.is_ok() {
            // Reaped: the group id may now be reused, never signal it again.
            self.group = None;
        }
        if !io_done && tokio::time::timeout(OUTPUT_GRACE, io).await.is_err() {
            tracing::debug!("CNI plugin exited but its output stayed open; ignoring the rest");
        }
        status
    }

    /// Kills the plugin's process group and reaps the plugin.
    async fn kill(&mut self) {
        self.kill_group();
        let _ = self.child.kill().await;
        self.group = None;
    }

    fn kill_group(&mut self) {
        if let Some(group) = self.group {
            // The leader is not reaped yet, so the group id is still ours.
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
}

impl Drop for PluginProcess {
    fn drop(&mut self) {
        // `kill_on_drop` then kills and reaps the leader.
        self.kill_group();
    }
}

/// A bounded copy of one output stream.
struct Capture {
    buf: Vec<u8>,
    limit: usize,
    /// Keep the end of the stream instead of its beginning.
    keep_tail: bool,
    truncated: bool,
}

impl Capture {
    fn head(limit: usize) -> Self {
        Capture {
            buf: Vec::new(),
            limit,
            keep_tail: false,
            truncated: false,
        }
    }

    fn tail(limit: usize) -> Self {
        Capture {
            keep_tail: true,
            ..Capture::head(limit)
        }
    }

    /// Reads `stream` to its end, keeping at most `limit` bytes.
    async fn drain(&mut self, stream: Option<impl AsyncRead + Unpin>) {
        let Some(mut stream) = stream else { return };
        let mut chunk = [0u8; 8192];
        loop {
            let n = match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if self.keep_tail {
                self.buf.extend_from_slice(&chunk[..n]);
                if self.buf.len() > self.limit {
                    let excess = self.buf.len() - self.limit;
                    self.buf.drain(..excess);
                    self.truncated = true;
                }
            } else {
                let room = self.limit - self.buf.len();
                self.buf.extend_from_slice(&chunk[..n.min(room)]);
                self.truncated |= n > room;
            }
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).trim().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;

    #[test]
    fn error_object_is_parsed() {
        let status = ExitStatus::from_raw(1 << 8);
        let err = plugin_failure(
            "bridge",
            Command::Add,
            status,
            br#"{"cniVersion":"1.0.0","code":7,"msg":"bad subnet","details":"10.0.0.0/33"}"#,
            String::new(),
        );
        assert_eq!(err.code(), Some(7));
        assert_eq!(
            err.to_string(),
            "CNI plugin \"bridge\" ADD failed (code 7): bad subnet; details: 10.0.0.0/33"
        );
    }

    #[test]
    fn garbage_output_falls_back_to_exit_status_and_stderr() {
        let status = ExitStatus::from_raw(2 << 8);
        let err = plugin_failure("x", Command::Del, status, b"panic!\n", "goroutine 1 [running]".into());
        assert_eq!(err.code(), None);
        assert_eq!(
            err.to_string(),
            "CNI plugin \"x\" DEL failed (exit status: 2): panic!; stderr: goroutine 1 [running]"
        );
    }

    #[test]
    fn plugin_lookup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let second = tempfile::tempdir().expect("tempdir");
        let write = |dir: &Path, name: &str, mode: u32| {
            let path = dir.join(name);
            std::fs::write(&path, "#!/bin/sh\n").expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        write(dir.path(), "plain", 0o644);
        write(second.path(), "plain", 0o755);
        write(dir.path(), "first", 0o755);
        std::fs::create_dir(dir.path().join("adir")).expect("mkdir");
        let runtime = CniRuntime::new(vec![dir.path().to_path_buf(), second.path().to_path_buf()]);
        assert_eq!(runtime.find_plugin("first").expect("found"), dir.path().join("first"));
        assert_eq!(
            runtime.find_plugin("plain").expect("found"),
            second.path().join("plain")
        );
        let err = runtime.find_plugin("adir").expect_err("directory");
        let text = err.to_string();
        assert!(
            text.contains("\"adir\"") && text.contains(&*second.path().to_string_lossy()),
            "{text}"
        );
        assert!(matches!(
            runtime.find_plugin("../first"),
            Err(CniError::InvalidArgument(_))
        ));
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h...");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
