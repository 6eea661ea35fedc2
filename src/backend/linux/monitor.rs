//! The per-container monitor: `podvisor monitor BUNDLE`, a small
//! single-threaded process started by the daemon. It forks the container's
//! init (which joins the pod's namespaces, builds the rootfs and execs the
//! workload), writes its output to the CRI log, reaps it, and records how it
//! ended in `exit.json`. It does not depend on the daemon staying alive.
//! Attach sessions connect to it (see `attach.rs`).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};
use serde::{Deserialize, Serialize};

use super::attach::{self, AttachServer};
use super::crilog::{LineSplitter, Stream, rfc3339_nano_now};
use super::process::{self, ProcessConfig};
use super::rootfs::RootfsSpec;

/// The fd on which the monitor tells the daemon how the start went.
pub const SYNC_FD: RawFd = 3;

/// How the container's PID namespace is set up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PidNamespace {
    /// A namespace of its own, the workload is PID 1.
    New,
    /// An existing namespace (the pod's, or a target container's).
    Join(PathBuf),
    /// The node's.
    Host,
}

/// Written by the daemon into the bundle: everything the monitor and the
/// container init need.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InitConfig {
    pub id: String,
    /// Namespace files to join (net, ipc, uts), as (`CLONE_NEW*` flag, path).
    pub join_namespaces: Vec<(i32, PathBuf)>,
    /// The pod's user namespace, entered last, once the rootfs is set up.
    #[serde(default)]
    pub user_namespace: Option<PathBuf>,
    pub pid_namespace: PidNamespace,
    /// `cgroup.procs` files of the container's cgroup, one per hierarchy.
    pub cgroup_procs: Vec<PathBuf>,
    /// The container's cgroup, for killing what is left when the workload ends.
    pub cgroup_path: String,
    pub rootfs: RootfsSpec,
    pub process: ProcessConfig,
    pub log_path: PathBuf,
    pub stdin: bool,
    /// Close the container's stdin when the first attacher with stdin leaves or ends its input.
    #[serde(default)]
    pub stdin_once: bool,
}

/// What the monitor records when the workload ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub exit_code: i32,
    /// The terminating signal, if any.
    pub signal: Option<i32>,
    pub finished_at: i64,
    /// Set when the workload never started.
    pub start_error: Option<String>,
}

pub fn config_path(bundle: &Path) -> PathBuf {
    bundle.join("config.json")
}

pub fn exit_path(bundle: &Path) -> PathBuf {
    bundle.join("exit.json")
}

pub fn read_exit(bundle: &Path) -> Option<ExitRecord> {
    let bytes = std::fs::read(exit_path(bundle)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

fn report(sync: &mut Option<File>, line: &str) {
    if let Some(mut file) = sync.take() {
        let _ = file.write_all(line.as_bytes());
    }
}

/// The monitor process's main. Never returns.
pub fn run(bundle: &Path) -> ! {
    // SAFETY: fd 3 is the sync pipe the daemon handed over; it is ours to own.
    let mut sync = Some(unsafe { File::from_raw_fd(SYNC_FD) });
    // Nothing else the daemon had open may reach the container.
    // SAFETY: close_range only closes fds; none above the sync pipe is in use here.
    unsafe { libc::syscall(libc::SYS_close_range, SYNC_FD as u32 + 1, u32::MAX, 0) };
    // The workload must not inherit it, or the daemon would wait for it to close.
    // SAFETY: fcntl on an fd number; no memory is involved.
    unsafe { libc::fcntl(SYNC_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    let code = match monitor(bundle, &mut sync) {
        Ok(()) => 0,
        Err(message) => {
            report(&mut sync, &format!("error {message}\n"));
            let record = ExitRecord {
                exit_code: 128,
                signal: None,
                finished_at: now_nanos(),
                start_error: Some(message),
            };
            let _ = crate::sys::fs::atomic_write_json(&exit_path(bundle), &record);
            1
        }
    };
    std::process::exit(code)
}

fn monitor(bundle: &Path, sync: &mut Option<File>) -> Result<(), String> {
    let bytes = std::fs::read(config_path(bundle)).map_err(|e| process::step_error("reading config", e))?;
    let config: InitConfig = serde_json::from_slice(&bytes).map_err(|e| process::step_error("parsing config", e))?;
    let seccomp = match &config.process.seccomp_filter {
        Some(path) => Some(std::fs::read(path).map_err(|e| process::step_error("reading seccomp filter", e))?),
        None => None,
    };
    // Orphans of the workload (outside a private PID namespace) come to us.
    // SAFETY: plain prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };

    let mut signals = SigSet::empty();
    signals.add(Signal::SIGCHLD);
    signals.add(Signal::SIGUSR1);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .map_err(|e| process::step_error("blocking signals", e))?;
    let signal_fd = SignalFd::with_flags(
        &signals,
        nix::sys::signalfd::SfdFlags::SFD_CLOEXEC | nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
    )
    .map_err(|e| process::step_error("creating signalfd", e))?;

    let (out_read, out_write) = pipe()?;
    let (err_read, err_write) = pipe()?;
    let (stdin_read, stdin_write) = if config.stdin {
        pipe().map(|(r, w)| (Some(r), Some(w)))?
    } else {
        (None, None)
    };
    let (error_read, error_write) = pipe()?;
    // With a tty the container's init opens its terminal inside the container
    // (its own devpts) and hands the master side back over this socket.
    let console = if config.process.tty {
        Some(
            nix::sys::socket::socketpair(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                None,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            )
            .map_err(|e| process::step_error("creating console socket", e))?,
        )
    } else {
        None
    };

    match &config.pid_namespace {
        PidNamespace::New => nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
            .map_err(|e| process::step_error("creating pid namespace", e))?,
        PidNamespace::Join(path) => setns_path(path, libc::CLONE_NEWPID)?,
        PidNamespace::Host => {}
    }

    // SAFETY: the monitor is single-threaded, so the child may run any code.
    let child = match unsafe { nix::unistd::fork() }.map_err(|e| process::step_error("forking container init", e))? {
        ForkResult::Child => {
            drop((out_read, err_read, error_read, stdin_write));
            let stdin = stdin_read.as_ref().map(AsRawFd::as_raw_fd);
            let stdio = Stdio {
                stdin,
                stdout: out_write.as_raw_fd(),
                stderr: err_write.as_raw_fd(),
                console: console.as_ref().map(|(_, child_end)| child_end.as_raw_fd()),
            };
            let message = init_child(&config, seccomp.as_deref(), stdio);
            process::fail(error_write.as_raw_fd(), &message)
        }
        ForkResult::Parent { child } => child,
    };
    drop((out_write, err_write, error_write, stdin_read));
    // The terminal's master side, once the init sent it (nothing if it failed before).
    let terminal = console.and_then(|(ours, theirs)| {
        drop(theirs);
        receive_fd(&ours)
    });

    // EOF on the error pipe means exec happened; bytes mean it failed.
    let mut start_error = String::new();
    let _ = File::from(error_read).read_to_string(&mut start_error);
    if !start_error.is_empty() {
        let _ = waitpid(child, None);
        return Err(start_error);
    }
    // Attachers write to the stdin pipe (kept open here, so the container's stdin
    // stays open while nobody is attached) or to the terminal.
    let dup = |fd: &OwnedFd| fd.try_clone().ok();
    let attach_input = match &terminal {
        Some(terminal) if config.stdin => dup(terminal),
        Some(_) => None,
        None => stdin_write,
    };
    let mut attach = AttachServer::bind(bundle, attach_input, terminal.as_ref().and_then(dup), config.stdin_once);
    report(sync, &format!("ok {}\n", child.as_raw()));
    *sync = None;
    crate::sys::memory::release_startup_pages();

    let mut log = open_log(&config.log_path);
    let mut pumps = vec![Pump::new(out_read, Stream::Stdout), Pump::new(err_read, Stream::Stderr)];
    if let Some(terminal) = terminal {
        // A terminal merges both streams; CRI logs record them as stdout.
        pumps.push(Pump::new(terminal, Stream::Stdout));
    }
    let mut exit: Option<ExitRecord> = None;
    loop {
        let mut fds: Vec<libc::pollfd> = vec![libc::pollfd {
            fd: signal_fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        for pump in pumps.iter().filter(|p| p.open()) {
            fds.push(libc::pollfd {
                fd: pump.fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if exit.is_some() && fds.len() == 1 && !attach.sending() {
            break;
        }
        attach.register(&mut fds);
        // Once the workload is gone, wait only briefly for leftover output.
        let timeout = if exit.is_some() { 2000 } else { -1 };
        // SAFETY: fds is a valid array of pollfd of the given length.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if ready == 0 {
            break;
        }
        if ready < 0 {
            continue; // EINTR
        }
        if fds[0].revents != 0 {
            while let Ok(Some(info)) = signal_fd.read_signal() {
                match info.ssi_signo as i32 {
                    libc::SIGUSR1 => log = open_log(&config.log_path),
                    libc::SIGCHLD => {
                        if let Some(record) = reap(child) {
                            exit.get_or_insert(record);
                            kill_leftovers(&config.cgroup_path);
                        }
                    }
                    _ => {}
                }
            }
        }
        for pump in pumps.iter_mut().filter(|p| p.open()) {
            if fds.iter().any(|f| f.fd == pump.fd() && f.revents != 0) {
                pump.pump(&mut log, &mut attach);
            }
        }
        attach.handle(&fds);
    }
    drop(attach);
    let now = rfc3339_nano_now();
    for pump in &mut pumps {
        let _ = pump.splitter.finish(&now, &mut log);
    }
    let mut record = match exit {
        Some(record) => record,
        None => loop {
            if let Some(record) = reap(child) {
                break record;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        },
    };
    record.finished_at = now_nanos();
    crate::sys::fs::atomic_write_json(&exit_path(bundle), &record)
        .map_err(|e| process::step_error("writing exit record", e))?;
    Ok(())
}

/// Reaps every ended child; returns the workload's end when it is among them.
fn reap(workload: Pid) -> Option<ExitRecord> {
    let mut found = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == workload => {
                found = Some(ExitRecord {
                    exit_code: code,
                    ..Default::default()
                });
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == workload => {
                found = Some(ExitRecord {
                    exit_code: 128 + signal as i32,
                    signal: Some(signal as i32),
                    ..Default::default()
                });
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return found,
            Ok(_) => {}
        }
    }
}

/// When the workload ends, the container ends: kill what it left running.
fn kill_leftovers(cgroup_path: &str) {
    if cgroup_path.is_empty() {
        return;
    }
    if let Ok(hierarchy) = crate::cgroups::Hierarchy::discover()
        && let Ok(path) = crate::cgroups::CgroupPath::new(cgroup_path)
    {
        let _ = hierarchy.open(&path).kill_all();
    }
}

/// Opens the CRI log for appending; without a log path (or when it cannot be
/// opened) output is discarded. Never creates anything but the log itself.
fn open_log(path: &Path) -> File {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = if path.as_os_str().is_empty() {
        None
    } else {
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
            .ok()
    };
    opened.unwrap_or_else(|| {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .expect("/dev/null can be opened")
    })
}

struct Pump {
    fd: Option<OwnedFd>,
    splitter: LineSplitter,
    /// The attach frame kind of this output.
    kind: u8,
}

impl Pump {
    fn new(fd: OwnedFd, stream: Stream) -> Pump {
        let kind = match stream {
            Stream::Stdout => attach::STDOUT,
            Stream::Stderr => attach::STDERR,
        };
        Pump {
            fd: Some(fd),
            splitter: LineSplitter::new(stream),
            kind,
        }
    }

    fn open(&self) -> bool {
        self.fd.is_some()
    }

    fn fd(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }

    fn pump(&mut self, log: &mut File, attach: &mut AttachServer) {
        let mut buf = [0u8; 32 * 1024];
        // SAFETY: reading into a valid buffer from an fd we own.
        let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            let errno = std::io::Error::last_os_error().raw_os_error();
            // A terminal is non-blocking (attachers write to it too).
            if n == 0 || !matches!(errno, Some(libc::EINTR | libc::EAGAIN)) {
                self.fd = None;
            }
            return;
        }
        let data = &buf[..n as usize];
        let _ = self.splitter.feed(data, &rfc3339_nano_now(), log);
        attach.broadcast(self.kind, data);
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| process::step_error("creating pipe", e))
}

fn setns_path(path: &Path, flag: i32) -> Result<(), String> {
    let file =
        File::open(path).map_err(|e| process::step_error(&format!("opening namespace {}", path.display()), e))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::from_bits_truncate(flag))
        .map_err(|e| process::step_error(&format!("joining namespace {}", path.display()), e))
}

/// The container's init, in the forked child: namespaces, cgroup, rootfs,
/// stdio, then the process itself. Returns only an error message.
/// Where the container's standard streams come from.
struct Stdio {
    stdin: Option<RawFd>,
    stdout: RawFd,
    stderr: RawFd,
    /// Set for tty containers: the socket to send the terminal's master side on.
    console: Option<RawFd>,
}

fn init_child(config: &InitConfig, seccomp: Option<&[u8]>, stdio: Stdio) -> String {
    match init_steps(config, stdio) {
        Ok(()) => process::exec_process(&config.process, seccomp),
        Err(message) => message,
    }
}

fn init_steps(config: &InitConfig, stdio: Stdio) -> Result<(), String> {
    // Signals blocked for the signalfd must not stay blocked in the workload.
    let _ = SigSet::all().thread_unblock();
    nix::unistd::setsid().map_err(|e| process::step_error("creating session", e))?;
    let pid = std::process::id().to_string();
    for procs in &config.cgroup_procs {
        std::fs::write(procs, &pid)
            .map_err(|e| process::step_error(&format!("joining cgroup {}", procs.display()), e))?;
    }
    for (flag, path) in &config.join_namespaces {
        setns_path(path, *flag)?;
    }
    // Opened before pivot_root hides the path.
    let userns = match &config.user_namespace {
        Some(path) => Some(File::open(path).map_err(|e| process::step_error("opening the pod user namespace", e))?),
        None => None,
    };
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| process::step_error("creating mount namespace", e))?;
    super::rootfs::setup_rootfs(&config.rootfs).map_err(|e| crate::error_chain(&e))?;
    // The mounts were made by the node's root; from here on the process is the
    // pod's root (with every capability there, to be reduced by the process setup).
    if let Some(userns) = userns {
        nix::sched::setns(&userns, nix::sched::CloneFlags::CLONE_NEWUSER)
            .map_err(|e| process::step_error("joining the pod user namespace", e))?;
    }
    if let Some(console) = stdio.console {
        let terminal = open_terminal(console)?;
        for to in 0..3 {
            // SAFETY: dup2 on fds that are open in this process.
            if unsafe { libc::dup2(terminal.as_raw_fd(), to) } < 0 {
                return Err(process::step_error(
                    "setting up the terminal",
                    std::io::Error::last_os_error(),
                ));
            }
        }
        // SAFETY: TIOCSCTTY on our new session's terminal, with an integer argument.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(process::step_error(
                "taking the terminal",
                std::io::Error::last_os_error(),
            ));
        }
        return Ok(());
    }
    let null = nix::fcntl::open("/dev/null", nix::fcntl::OFlag::O_RDWR, nix::sys::stat::Mode::empty())
        .map_err(|e| process::step_error("opening /dev/null", e))?;
    let stdin = stdio.stdin.unwrap_or(null.as_raw_fd());
    for (from, to) in [(stdin, 0), (stdio.stdout, 1), (stdio.stderr, 2)] {
        // SAFETY: dup2 on fds that are open in this process.
        if unsafe { libc::dup2(from, to) } < 0 {
            return Err(process::step_error("setting up stdio", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Opens a terminal in the container's own devpts, sends its master side
/// over `console`, and returns the terminal itself.
pub(super) fn open_terminal(console: RawFd) -> Result<OwnedFd, String> {
    use nix::fcntl::OFlag;
    let master = nix::fcntl::open(
        "/dev/ptmx",
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| process::step_error("opening /dev/ptmx", e))?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from a valid pointer; TIOCGPTPEER returns a new fd or -1.
    let terminal = unsafe {
        libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock);
        libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY)
    };
    if terminal < 0 {
        return Err(process::step_error(
            "opening the terminal",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: the kernel just returned this fd; it is ours.
    let terminal = unsafe { OwnedFd::from_raw_fd(terminal) };
    let fds = [master.as_raw_fd()];
    let message = [std::io::IoSlice::new(b"t")];
    nix::sys::socket::sendmsg::<()>(
        console,
        &message,
        &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map_err(|e| process::step_error("handing over the terminal", e))?;
    Ok(terminal)
}

/// Receives one fd sent with SCM_RIGHTS; None when the peer closed without sending.
pub(super) fn receive_fd(socket: &OwnedFd) -> Option<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(RawFd);
    let message = nix::sys::socket::recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .ok()?;
    for control in message.cmsgs().ok()? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = control
            && let Some(fd) = fds.first()
        {
            // SAFETY: SCM_RIGHTS gave us this fd; we own it now.
            return Some(unsafe { OwnedFd::from_raw_fd(*fd) });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_exit(dir.path()), None);
        let record = ExitRecord {
            exit_code: 137,
            signal: Some(9),
            finished_at: 5,
            start_error: None,
        };
        crate::sys::fs::atomic_write_json(&exit_path(dir.path()), &record).unwrap();
        assert_eq!(read_exit(dir.path()), Some(record));
    }
}
