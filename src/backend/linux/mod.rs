//! The Linux container backend: pods as namespaces, containers as processes
//! set up by a per-container monitor, all from kernel syscalls.

pub mod attach;
pub mod container;
pub mod crilog;
pub mod exec;
pub mod monitor;
pub mod process;
pub mod rootfs;
pub mod sandbox;
pub mod seccomp;
pub mod stream;
pub mod users;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt};

use crate::cgroups::{CgroupPath, Hierarchy, Resources};
pub use container::{ContainerPlan, ContainerRuntime};
use monitor::ExitRecord;
pub use sandbox::SandboxRuntime;

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Sys(&'static str, #[source] nix::errno::Errno),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup")]
    Cgroup(#[from] crate::cgroups::CgroupError),
    #[error("seccomp profile")]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("container failed to start: {0}")]
    StartFailed(String),
    #[error("exec timed out after {0:?}")]
    Timeout(Duration),
}

impl LinuxError {
    pub fn io(context: &str) -> impl FnOnce(std::io::Error) -> LinuxError + '_ {
        move |source| LinuxError::Io {
            context: context.to_string(),
            source,
        }
    }
}

/// Output cap per stream for ExecSync.
pub const EXEC_OUTPUT_LIMIT: usize = 16 << 20;

pub struct LinuxBackend {
    /// `/run/podvisor/linux`: bundles and namespace pins.
    state_dir: PathBuf,
    /// `<root>/containers`: writable layers.
    rw_root: PathBuf,
    hierarchy: Option<Hierarchy>,
    /// This binary, re-executed as monitor, exec helper and pod init.
    exe: PathBuf,
}

/// A container process the daemon started.
pub struct Started {
    pub pid: i32,
    pub monitor_pid: i32,
    /// The monitor, when it is our child (reaped by waiting on it).
    pub monitor: tokio::process::Child,
}

pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

impl LinuxBackend {
    pub fn new(root: &Path, state: &Path) -> Result<LinuxBackend, LinuxError> {
        let state_dir = state.join("linux");
        let rw_root = root.join("containers");
        for dir in [&state_dir, &rw_root] {
            crate::sys::fs::ensure_dir(dir, 0o711).map_err(LinuxError::io("creating backend directories"))?;
        }
        let hierarchy = match Hierarchy::discover() {
            Ok(hierarchy) => Some(hierarchy),
            Err(err) => {
                tracing::warn!(error = %crate::error_chain(&err), "no usable cgroup hierarchy; resources will not be enforced");
                None
            }
        };
        let exe = std::fs::read_link("/proc/self/exe").map_err(LinuxError::io("finding the podvisor binary"))?;
        Ok(LinuxBackend {
            state_dir,
            rw_root,
            hierarchy,
            exe,
        })
    }

    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("sandboxes").join(id)
    }

    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("containers").join(id)
    }

    pub fn rw_dir(&self, id: &str) -> PathBuf {
        self.rw_root.join(id)
    }

    fn cgroup(&self, path: &str) -> Option<crate::cgroups::Cgroup> {
        let hierarchy = self.hierarchy.as_ref()?;
        CgroupPath::new(path).ok().map(|p| hierarchy.open(&p))
    }

    /// The pod's cgroup: the one kubelet asked for, or one of podvisor's own.
    pub fn sandbox_cgroup_path(parent: &str, id: &str) -> String {
        if parent.is_empty() {
            format!("/podvisor/{id}")
        } else {
            parent.to_string()
        }
    }

    pub fn run_sandbox(&self, id: &str, spec: &crate::spec::SandboxSpec) -> Result<SandboxRuntime, LinuxError> {
        let dir = self.sandbox_dir(id);
        let cgroup_path = Self::sandbox_cgroup_path(&spec.cgroup_parent, id);
        let result = (|| {
            let mut runtime = sandbox::create(&dir, spec, &self.exe)?;
            if let Some(hierarchy) = &self.hierarchy {
                let path = CgroupPath::new(&cgroup_path).map_err(LinuxError::Cgroup)?;
                let cgroup = hierarchy.create(&path)?;
                cgroup.apply(&spec.resources)?;
                // Processes may only sit in leaf cgroups (cgroup2): the pod init gets its own.
                if let Some(pid) = runtime.pod_init_pid {
                    let init_path = CgroupPath::new(format!("{cgroup_path}/init")).map_err(LinuxError::Cgroup)?;
                    hierarchy.create(&init_path)?.add_process(pid)?;
                }
            }
            runtime.cgroup_path = cgroup_path.clone();
            runtime.owns_cgroup = spec.cgroup_parent.is_empty();
            Ok(runtime)
        })();
        if result.is_err() {
            self.remove_sandbox(&SandboxRuntime {
                dir,
                owns_cgroup: spec.cgroup_parent.is_empty(),
                cgroup_path,
                ..Default::default()
            });
        }
        result
    }

    pub fn stop_sandbox(&self, runtime: &SandboxRuntime) {
        sandbox::stop(runtime);
    }

    /// Removes namespaces, files and the pod cgroup (podvisor's own only). Idempotent.
    pub fn remove_sandbox(&self, runtime: &SandboxRuntime) {
        if !runtime.dir.as_os_str().is_empty()
            && let Err(err) = sandbox::remove(runtime)
        {
            tracing::warn!(error = %crate::error_chain(&err), "removing sandbox files");
        }
        // A cgroup parent given by kubelet is kubelet's: only what podvisor put in it goes.
        let path = if runtime.owns_cgroup {
            runtime.cgroup_path.clone()
        } else {
            format!("{}/init", runtime.cgroup_path)
        };
        if let Some(cgroup) = self.cgroup(&path) {
            let _ = cgroup.kill_all();
            if let Err(err) = cgroup.delete() {
                tracing::warn!(error = %crate::error_chain(&err), "removing pod cgroup");
            }
        }
    }

    /// Prepares a container: writable layer, cgroup, seccomp filter, bundle.
    pub fn create_container(&self, plan: &ContainerPlan<'_>) -> Result<ContainerRuntime, LinuxError> {
        let result = self.create_container_steps(plan);
        if result.is_err() {
            self.remove_container_files(&plan.bundle, &plan.rw_dir, &plan.cgroup_path);
        }
        result
    }

    fn create_container_steps(&self, plan: &ContainerPlan<'_>) -> Result<ContainerRuntime, LinuxError> {
        let config = container::init_config(plan)?;
        for dir in [
            plan.rw_dir.join("upper"),
            plan.rw_dir.join("work"),
            plan.bundle.join("rootfs"),
        ] {
            crate::sys::fs::ensure_dir(&dir, 0o755).map_err(LinuxError::io("creating container directories"))?;
        }
        if let Some(user) = plan.sandbox.namespaces.user {
            // The writable layer's root is the container root's "/": owned by the pod's root.
            let owner = (user.uids.to_host(0), user.gids.to_host(0));
            for dir in [plan.rw_dir.join("upper"), plan.rw_dir.join("work")] {
                nix::unistd::chown(
                    &dir,
                    owner.0.map(nix::unistd::Uid::from_raw),
                    owner.1.map(nix::unistd::Gid::from_raw),
                )
                .map_err(|e| LinuxError::Sys("handing the writable layer to the pod's root", e))?;
            }
        }
        if let Some(filter) = &config.process.seccomp_filter {
            let policy = match &plan.spec.security.seccomp {
                Some(crate::spec::SeccompProfile::Localhost(path)) => seccomp::Policy::Localhost(path.clone()),
                _ => seccomp::Policy::RuntimeDefault,
            };
            if let Some(compiled) = seccomp::compile(&policy, &config.process.capabilities.bounding)? {
                std::fs::write(filter, &compiled.bpf).map_err(LinuxError::io("writing seccomp filter"))?;
            }
        }
        if let Some(hierarchy) = &self.hierarchy {
            let path = CgroupPath::new(&plan.cgroup_path).map_err(LinuxError::Cgroup)?;
            let cgroup = hierarchy.create(&path)?;
            cgroup.apply(&plan.spec.resources)?;
            if !plan.spec.security.privileged {
                cgroup.restrict_devices(&container::device_rules(&config.rootfs.devices))?;
            }
        }
        crate::sys::fs::atomic_write_json(&monitor::config_path(&plan.bundle), &config)
            .map_err(LinuxError::io("writing container config"))?;
        Ok(ContainerRuntime {
            bundle: plan.bundle.clone(),
            rw_dir: plan.rw_dir.clone(),
            cgroup_path: plan.cgroup_path.clone(),
            log_path: plan.log_path.clone(),
            uid: config.process.uid,
            gid: config.process.gid,
            groups: config.process.additional_gids.clone(),
        })
    }

    /// `cgroup.procs` files of a container cgroup, for the monitor config.
    pub fn cgroup_procs(&self, path: &str) -> Vec<PathBuf> {
        self.cgroup(path)
            .map(|c| c.dirs().into_iter().map(|d| d.join("cgroup.procs")).collect())
            .unwrap_or_default()
    }

    /// Starts the monitor, which starts the workload; returns once it runs.
    pub async fn start_container(&self, runtime: &ContainerRuntime) -> Result<Started, LinuxError> {
        let _ = std::fs::remove_file(monitor::exit_path(&runtime.bundle));
        let (sync_read, sync_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| LinuxError::Sys("creating pipe", e))?;
        let monitor_log = std::fs::File::create(runtime.bundle.join("monitor.log"))
            .map_err(LinuxError::io("creating monitor log"))?;
        let mut command = tokio::process::Command::new(&self.exe);
        command
            .arg("monitor")
            .arg(&runtime.bundle)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(monitor_log)
            .process_group(0)
            .kill_on_drop(false);
        use std::os::fd::AsRawFd;
        let sync_fd = sync_write.as_raw_fd();
        // SAFETY: dup2 is async-signal-safe; it only moves the pipe to fd 3.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(sync_fd, monitor::SYNC_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(LinuxError::io("starting container monitor"))?;
        drop(sync_write);
        let monitor_pid = child.id().unwrap_or_default() as i32;
        let mut report = String::new();
        let sync = tokio::fs::File::from_std(std::fs::File::from(sync_read));
        let mut sync = tokio::io::BufReader::new(sync);
        // One line: "ok PID" or "error MESSAGE" (or nothing, if the monitor died).
        let read = tokio::time::timeout(Duration::from_secs(60), sync.read_line(&mut report)).await;
        if read.is_err() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(monitor_pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(LinuxError::StartFailed(
                "the container did not start within 60 s".into(),
            ));
        }
        let report = report.trim();
        if let Some(pid) = report.strip_prefix("ok ") {
            let pid = pid
                .parse()
                .map_err(|_| LinuxError::StartFailed(format!("bad monitor report {report:?}")))?;
            return Ok(Started {
                pid,
                monitor_pid,
                monitor: child,
            });
        }
        let message = report.strip_prefix("error ").unwrap_or(report);
        let message = if message.is_empty() {
            std::fs::read_to_string(runtime.bundle.join("monitor.log")).unwrap_or_else(|_| "monitor exited".into())
        } else {
            message.to_string()
        };
        Err(LinuxError::StartFailed(message))
    }

    pub fn exit_record(&self, runtime: &ContainerRuntime) -> Option<ExitRecord> {
        monitor::read_exit(&runtime.bundle)
    }

    /// OOM kills seen in the container's cgroup.
    pub fn oom_killed(&self, runtime: &ContainerRuntime) -> bool {
        self.cgroup(&runtime.cgroup_path)
            .and_then(|c| c.oom_kills().ok())
            .unwrap_or(0)
            > 0
    }

    pub fn kill_all(&self, runtime: &ContainerRuntime) {
        if let Some(cgroup) = self.cgroup(&runtime.cgroup_path) {
            let _ = cgroup.kill_all();
        }
    }

    pub fn update_resources(&self, runtime: &ContainerRuntime, resources: &Resources) -> Result<(), LinuxError> {
        if let Some(cgroup) = self.cgroup(&runtime.cgroup_path) {
            cgroup.apply(resources)?;
        }
        Ok(())
    }

    pub fn update_sandbox_resources(&self, cgroup_path: &str, resources: &Resources) -> Result<(), LinuxError> {
        if let Some(cgroup) = self.cgroup(cgroup_path) {
            cgroup.apply(resources)?;
        }
        Ok(())
    }

    pub fn stats(&self, cgroup_path: &str) -> Option<crate::cgroups::Stats> {
        self.cgroup(cgroup_path).and_then(|c| c.stats().ok())
    }

    /// Asks the monitor to reopen the log file (after kubelet rotated it).
    pub fn reopen_log(&self, monitor_pid: i32) -> Result<(), LinuxError> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(monitor_pid),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .map_err(|e| LinuxError::Sys("signalling the container monitor", e))
    }

    /// Sandbox directories whose ids no record knows (a crash between making a
    /// sandbox and recording it), as (id, directory).
    pub fn orphan_sandboxes(&self, sandboxes: &HashSet<String>) -> Vec<(String, PathBuf)> {
        dir_entries(&self.state_dir.join("sandboxes"))
            .into_iter()
            .filter(|id| !sandboxes.contains(id))
            .map(|id| {
                let dir = self.sandbox_dir(&id);
                (id, dir)
            })
            .collect()
    }

    /// Removes an orphaned sandbox's namespaces, files and podvisor's own pod cgroup.
    pub fn remove_orphan_sandbox(&self, id: &str) {
        tracing::info!(sandbox = %id, "removing a sandbox left without a record");
        let dir = self.sandbox_dir(id);
        self.remove_sandbox(&SandboxRuntime {
            shm: Some(dir.join("shm")),
            dir,
            cgroup_path: Self::sandbox_cgroup_path("", id),
            owns_cgroup: true,
            ..Default::default()
        });
    }

    /// Removes container bundles and writable layers whose ids no record knows.
    pub fn remove_orphan_containers(&self, containers: &HashSet<String>) {
        let mut ids = dir_entries(&self.state_dir.join("containers"));
        ids.extend(dir_entries(&self.rw_root));
        ids.sort();
        ids.dedup();
        for id in ids.into_iter().filter(|id| !containers.contains(id)) {
            tracing::info!(container = %id, "removing a container left without a record");
            self.remove_container_files(&self.bundle_dir(&id), &self.rw_dir(&id), "");
        }
    }

    pub fn remove_container(&self, runtime: &ContainerRuntime) {
        self.remove_container_files(&runtime.bundle, &runtime.rw_dir, &runtime.cgroup_path);
    }

    fn remove_container_files(&self, bundle: &Path, rw_dir: &Path, cgroup_path: &str) {
        if let Some(cgroup) = self.cgroup(cgroup_path).filter(|_| !cgroup_path.is_empty()) {
            let _ = cgroup.kill_all();
            if let Err(err) = cgroup.delete() {
                tracing::warn!(error = %crate::error_chain(&err), "removing container cgroup");
            }
        }
        for dir in [bundle, rw_dir] {
            if let Err(err) = crate::sys::fs::remove_tree(dir) {
                tracing::warn!(dir = %dir.display(), error = %err, "removing container files");
            }
        }
    }

    /// Writes the exec helper's config for one more process in a running
    /// container into its bundle; returns the file's path.
    fn write_exec_config(
        &self,
        runtime: &ContainerRuntime,
        container_pid: i32,
        process: process::ProcessConfig,
        terminal_size: Option<(u16, u16)>,
    ) -> Result<PathBuf, LinuxError> {
        let namespaces = exec::JOIN_ORDER
            .iter()
            .filter(|(_, name)| differs_from_ours(container_pid, name))
            .map(|(flag, _)| *flag)
            .collect();
        let config = exec::ExecConfig {
            target_pid: container_pid,
            namespaces,
            cgroup_procs: self.cgroup_procs(&runtime.cgroup_path),
            process,
            terminal_size,
        };
        let config_path = runtime.bundle.join(format!("exec-{:016x}.json", rand::random::<u64>()));
        crate::sys::fs::atomic_write_json(&config_path, &config).map_err(LinuxError::io("writing exec config"))?;
        Ok(config_path)
    }

    /// The exec helper for a config, in a process group of its own, killed if dropped.
    fn exec_helper_command(&self, config_path: &Path) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.exe);
        command
            .arg("exec-helper")
            .arg(config_path)
            .process_group(0)
            .kill_on_drop(true);
        command
    }

    /// Runs a command in a running container and collects its output.
    pub async fn exec_sync(
        &self,
        runtime: &ContainerRuntime,
        container_pid: i32,
        process: process::ProcessConfig,
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, LinuxError> {
        let config_path = self.write_exec_config(runtime, container_pid, process, None)?;
        let result = self.run_exec_helper(&config_path, timeout).await;
        stream::remove_exec_files(&config_path);
        result
    }

    async fn run_exec_helper(&self, config_path: &Path, timeout: Option<Duration>) -> Result<ExecOutput, LinuxError> {
        let mut child = self
            .exec_helper_command(config_path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(LinuxError::io("starting exec helper"))?;
        let pgid = nix::unistd::Pid::from_raw(child.id().unwrap_or_default() as i32);
        let stdout = tokio::spawn(read_capped(child.stdout.take().expect("stdout is piped")));
        let stderr = tokio::spawn(read_capped(child.stderr.take().expect("stderr is piped")));
        let finished = match timeout {
            Some(limit) => tokio::time::timeout(limit, child.wait()).await.ok(),
            None => Some(child.wait().await),
        };
        let Some(status) = finished else {
            // Kill the process and its group; the helper reaps it (so it cannot
            // linger as a zombie inside the container) and exits. Then the helper, to be sure.
            stream::kill_exec_process(config_path);
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait().await;
            }
            stdout.abort();
            stderr.abort();
            return Err(LinuxError::Timeout(timeout.unwrap_or_default()));
        };
        let status = status.map_err(LinuxError::io("waiting for exec helper"))?;
        let stdout = stdout.await.unwrap_or_default();
        let stderr = stderr.await.unwrap_or_default();
        use std::os::unix::process::ExitStatusExt;
        let exit_code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        Ok(ExecOutput {
            stdout,
            stderr,
            exit_code,
        })
    }
}

/// Names of the entries of `dir` (none when it cannot be read).
fn dir_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn differs_from_ours(pid: i32, ns: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/{ns}")).map(|m| m.ino());
    let ours = std::fs::metadata(format!("/proc/self/ns/{ns}")).map(|m| m.ino());
    match (theirs, ours) {
        (Ok(theirs), Ok(ours)) => theirs != ours,
        _ => true,
    }
}

/// Reads a stream to its end, keeping at most [`EXEC_OUTPUT_LIMIT`] bytes.
async fn read_capped(mut reader: impl tokio::io::AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = EXEC_OUTPUT_LIMIT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}
