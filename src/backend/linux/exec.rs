//! `podvisor exec-helper CONFIG`: runs one more process inside a running
//! container (ExecSync, and Exec later). It joins the container's cgroup and
//! namespaces, forks into its PID namespace, applies the process config and
//! execs; it exits with the process's exit code (128 + signal when killed).

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::ForkResult;
use serde::{Deserialize, Serialize};

use super::process::{self, ProcessConfig};

/// Exit code when the process could not be started at all.
pub const EXIT_CANNOT_START: i32 = 126;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExecConfig {
    /// The container's init, whose namespaces are joined.
    pub target_pid: i32,
    /// `CLONE_NEW*` flags of the namespaces to join, in order (mount last).
    pub namespaces: Vec<i32>,
    pub cgroup_procs: Vec<PathBuf>,
    pub process: ProcessConfig,
}

/// Namespace flags and their `/proc/PID/ns` names; mount comes late because
/// joining it changes what paths mean, the user namespace last because after it
/// the process has no privileges over the others.
pub const JOIN_ORDER: [(i32, &str); 7] = [
    (libc::CLONE_NEWIPC, "ipc"),
    (libc::CLONE_NEWUTS, "uts"),
    (libc::CLONE_NEWNET, "net"),
    (libc::CLONE_NEWPID, "pid"),
    (libc::CLONE_NEWCGROUP, "cgroup"),
    (libc::CLONE_NEWNS, "mnt"),
    (libc::CLONE_NEWUSER, "user"),
];

pub fn run(config_path: &Path) -> ! {
    let code = match exec(config_path) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("podvisor exec: {message}");
            EXIT_CANNOT_START
        }
    };
    std::process::exit(code)
}

fn exec(config_path: &Path) -> Result<i32, String> {
    let bytes = std::fs::read(config_path).map_err(|e| process::step_error("reading exec config", e))?;
    let config: ExecConfig =
        serde_json::from_slice(&bytes).map_err(|e| process::step_error("parsing exec config", e))?;
    let seccomp = match &config.process.seccomp_filter {
        Some(path) => Some(std::fs::read(path).map_err(|e| process::step_error("reading seccomp filter", e))?),
        None => None,
    };
    let pid = std::process::id().to_string();
    for procs in &config.cgroup_procs {
        std::fs::write(procs, &pid)
            .map_err(|e| process::step_error(&format!("joining cgroup {}", procs.display()), e))?;
    }
    // Opened before joining the mount namespace, after which host paths mean nothing.
    let mut pid_file = File::create(pid_path(config_path)).map_err(|e| process::step_error("creating pid file", e))?;
    // Open every namespace first: after joining the mount namespace /proc is the container's.
    let mut files = Vec::new();
    for (flag, name) in JOIN_ORDER {
        if config.namespaces.contains(&flag) {
            let path = format!("/proc/{}/ns/{name}", config.target_pid);
            let file = File::open(&path).map_err(|e| process::step_error(&format!("opening {path}"), e))?;
            files.push((flag, file));
        }
    }
    for (flag, file) in &files {
        // Namespaces identical to ours (the node's) are skipped: setns would refuse some.
        nix::sched::setns(file, nix::sched::CloneFlags::from_bits_truncate(*flag))
            .map_err(|e| process::step_error("joining container namespace", e))?;
    }
    drop(files);
    // SAFETY: this helper is single-threaded, so the child may run any code.
    match unsafe { nix::unistd::fork() }.map_err(|e| process::step_error("forking", e))? {
        ForkResult::Child => {
            // Stay in the helper's process group (the daemon kills the group on
            // timeout), and die with the helper whatever kills it.
            // SAFETY: plain prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
            let message = process::exec_process(&config.process, seccomp.as_deref());
            eprintln!("podvisor exec: {message}");
            let code = if message.contains("not found") {
                127
            } else {
                EXIT_CANNOT_START
            };
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            // The daemon kills the process through this on timeout, then waits for us to reap it.
            let _ = std::io::Write::write_all(&mut pid_file, child.as_raw().to_string().as_bytes());
            drop(pid_file);
            wait_for(child)
        }
    }
}

/// Where the helper records the PID of the process it started.
pub fn pid_path(config_path: &Path) -> PathBuf {
    config_path.with_extension("pid")
}

fn wait_for(child: nix::unistd::Pid) -> Result<i32, String> {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(128 + signal as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => return Err(process::step_error("waiting for the process", err)),
        }
    }
}
