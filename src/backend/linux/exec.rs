//! `podvisor exec-helper CONFIG`: runs one more process inside a running
//! container (ExecSync and Exec). It joins the container's cgroup and
//! namespaces, forks into its PID namespace, applies the process config and
//! execs; it exits with the process's exit code (128 + signal when killed).
//! The process leads a process group of its own (a session with a terminal),
//! which is what the daemon kills to end it.
//!
//! With `process.tty` the helper opens a terminal inside the container (its
//! devpts, after joining the mount namespace) and sends the master side to the
//! daemon over the socket at [`CONSOLE_FD`].

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::ForkResult;
use serde::{Deserialize, Serialize};

use super::process::{self, ProcessConfig};

/// Exit code when the process could not be started at all.
pub const EXIT_CANNOT_START: i32 = 126;

/// With a terminal: the socket on which the helper sends the terminal's master side.
pub const CONSOLE_FD: RawFd = 3;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExecConfig {
    /// The container's init, whose namespaces are joined.
    pub target_pid: i32,
    /// `CLONE_NEW*` flags of the namespaces to join, in order (mount last).
    pub namespaces: Vec<i32>,
    pub cgroup_procs: Vec<PathBuf>,
    pub process: ProcessConfig,
    /// The terminal's initial size as (rows, columns), with `process.tty`.
    #[serde(default)]
    pub terminal_size: Option<(u16, u16)>,
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
    let terminal = if config.process.tty {
        // SAFETY: with a terminal the daemon passes the console socket at CONSOLE_FD; it is ours.
        let console = unsafe { OwnedFd::from_raw_fd(CONSOLE_FD) };
        Some(open_terminal(console, config.terminal_size)?)
    } else {
        None
    };
    // SAFETY: this helper is single-threaded, so the child may run any code.
    match unsafe { nix::unistd::fork() }.map_err(|e| process::step_error("forking", e))? {
        ForkResult::Child => {
            // Die with the helper whatever kills it.
            // SAFETY: plain prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
            if let Err(message) = own_group(terminal) {
                eprintln!("podvisor exec: {message}");
                // SAFETY: ends the child without running the parent's exit handlers.
                unsafe { libc::_exit(EXIT_CANNOT_START) }
            }
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
            drop(terminal);
            // The daemon kills the process through this on timeout, then waits for us to reap it.
            let _ = std::io::Write::write_all(&mut pid_file, child.as_raw().to_string().as_bytes());
            drop(pid_file);
            wait_for(child)
        }
    }
}

/// Opens a terminal in the container's devpts (the mount namespace is joined),
/// sends its master side over `console` and returns the terminal itself.
fn open_terminal(console: OwnedFd, size: Option<(u16, u16)>) -> Result<OwnedFd, String> {
    let terminal = super::monitor::open_terminal(console.as_raw_fd())?;
    drop(console);
    if let Some((rows, cols)) = size {
        set_window_size(terminal.as_raw_fd(), rows, cols);
    }
    Ok(terminal)
}

/// Sets a terminal's window size (either side of it), best effort.
pub fn set_window_size(fd: RawFd, rows: u16, cols: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize that lives for the call.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &size) };
}

/// In the forked child: a process group of its own, or with a terminal a
/// session whose controlling terminal and stdio it is.
fn own_group(terminal: Option<OwnedFd>) -> Result<(), String> {
    let Some(terminal) = terminal else {
        return nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))
            .map_err(|e| process::step_error("creating process group", e));
    };
    nix::unistd::setsid().map_err(|e| process::step_error("creating session", e))?;
    for to in 0..3 {
        // SAFETY: dup2 on fds that are open in this process.
        if unsafe { libc::dup2(terminal.as_raw_fd(), to) } < 0 {
            return Err(process::step_error(
                "setting up the terminal",
                std::io::Error::last_os_error(),
            ));
        }
    }
    drop(terminal);
    // SAFETY: TIOCSCTTY on our new session's terminal, with an integer argument.
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
        return Err(process::step_error(
            "taking the terminal",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
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
