//! Streaming sessions, daemon side: an exec wired to the client's stdio (pipes,
//! or a terminal made inside the container), and TCP connections made inside a
//! pod's network namespace for port forwarding. Attach is in `attach.rs`.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::process::ProcessConfig;
use super::{ContainerRuntime, LinuxBackend, LinuxError, exec};
use crate::streaming::{BoxWrite, StreamIo};

/// How long output may still come once the process ended (background children can hold it open).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);
/// How long a terminal session waits for the client's first size before the process starts.
const INITIAL_SIZE_WAIT: Duration = Duration::from_secs(1);
/// How long the helper may take to reap a killed process.
const REAP_GRACE: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl LinuxBackend {
    /// Runs a process in a running container with the client's stdio and
    /// returns its exit code. Dropping the future kills the process's group.
    pub async fn exec_stream(
        &self,
        runtime: &ContainerRuntime,
        container_pid: i32,
        process: ProcessConfig,
        mut io: StreamIo,
    ) -> Result<i32, LinuxError> {
        let tty = process.tty;
        let mut terminal_size = None;
        if let (true, Some(resize)) = (tty, io.resize.as_mut()) {
            terminal_size = tokio::time::timeout(INITIAL_SIZE_WAIT, resize.recv())
                .await
                .ok()
                .flatten()
                .map(|size| (size.height, size.width));
        }
        let config_path = self.write_exec_config(runtime, container_pid, process, terminal_size)?;
        let status = if tty {
            self.exec_terminal(config_path, io).await?
        } else {
            self.exec_pipes(config_path, io).await?
        };
        use std::os::unix::process::ExitStatusExt;
        Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
    }

    async fn exec_pipes(&self, config_path: PathBuf, io: StreamIo) -> Result<ExitStatus, LinuxError> {
        let piped = |wanted: bool| if wanted { Stdio::piped() } else { Stdio::null() };
        let mut command = self.exec_helper_command(&config_path);
        command
            .stdin(piped(io.stdin.is_some()))
            .stdout(piped(io.stdout.is_some()))
            .stderr(Stdio::piped());
        let mut helper = Helper::spawn(command, config_path)?;
        let child = helper.child();
        let (to_process, from_stdout, from_stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let input = async move {
            if let (Some(mut from), Some(mut to)) = (io.stdin, to_process) {
                let _ = tokio::io::copy(&mut from, &mut to).await;
                // Dropping the pipe ends the process's input.
            }
        };
        let outputs = async move {
            tokio::join!(relay(from_stdout, io.stdout), relay(from_stderr, io.stderr));
        };
        helper.run(input, outputs).await
    }

    async fn exec_terminal(&self, config_path: PathBuf, io: StreamIo) -> Result<ExitStatus, LinuxError> {
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(LinuxError::io("creating the console socket"))?;
        let mut command = self.exec_helper_command(&config_path);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let console = theirs.as_raw_fd();
        // SAFETY: the closure only calls dup2/fcntl (async-signal-safe) to place the socket at CONSOLE_FD.
        unsafe {
            command.pre_exec(move || place_fd(console, exec::CONSOLE_FD));
        }
        let mut helper = Helper::spawn(command, config_path)?;
        drop(theirs);
        let mut errors = helper.child().stderr.take();
        let ours = OwnedFd::from(ours);
        // The helper sends the master side, or exits (closing its end) if it cannot.
        let master = tokio::task::spawn_blocking(move || super::monitor::receive_fd(&ours))
            .await
            .ok()
            .flatten();
        let Some(master) = master else {
            let mut message = String::new();
            if let Some(errors) = errors.as_mut() {
                let _ = errors.read_to_string(&mut message).await;
            }
            let _ = helper.run(async {}, async {}).await;
            let message = message.trim().trim_start_matches("podvisor exec: ");
            return Err(LinuxError::StartFailed(message.to_string()));
        };
        let resize_fd = master.try_clone().map_err(LinuxError::io("duplicating the terminal"))?;
        let master = PtyMaster::new(master).map_err(LinuxError::io("watching the terminal"))?;
        let (from_terminal, mut to_terminal) = tokio::io::split(master);
        let StreamIo {
            stdin, stdout, resize, ..
        } = io;
        let input = async move {
            let resizes = async {
                if let Some(mut resize) = resize {
                    while let Some(size) = resize.recv().await {
                        exec::set_window_size(resize_fd.as_raw_fd(), size.height, size.width);
                    }
                }
                std::future::pending::<()>().await
            };
            let typing = async {
                if let Some(mut stdin) = stdin {
                    let _ = copy_flushing(&mut stdin, &mut to_terminal).await;
                }
                std::future::pending::<()>().await
            };
            tokio::join!(resizes, typing);
        };
        let outputs = async move {
            tokio::join!(relay(Some(from_terminal), stdout), relay(errors, None));
        };
        helper.run(input, outputs).await
    }

    /// Opens a TCP connection to `127.0.0.1:port` in a pod's network namespace
    /// (`None`: the node's, for host-network pods).
    pub async fn connect_in_pod(&self, netns: Option<PathBuf>, port: u16) -> Result<tokio::net::TcpStream, LinuxError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // setns moves only the calling thread: one of its own, which then ends.
        // A socket stays in the namespace it was made in.
        std::thread::Builder::new()
            .name("pv-port-forward".into())
            .spawn(move || {
                let _ = tx.send(connect_on_this_thread(netns.as_deref(), port));
            })
            .map_err(LinuxError::io("starting a port-forward thread"))?;
        let stream = rx
            .await
            .map_err(|_| LinuxError::Invalid("the port-forward thread ended without an answer".into()))??;
        tokio::net::TcpStream::from_std(stream).map_err(LinuxError::io("registering the forwarded connection"))
    }
}

fn connect_on_this_thread(netns: Option<&Path>, port: u16) -> Result<std::net::TcpStream, LinuxError> {
    if let Some(path) = netns {
        let file = std::fs::File::open(path).map_err(LinuxError::io("opening the pod's network namespace"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| LinuxError::Sys("joining the pod's network namespace", e))?;
    }
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let stream = std::net::TcpStream::connect_timeout(&address, CONNECT_TIMEOUT).map_err(|source| LinuxError::Io {
        context: format!("connecting to {address} in the pod"),
        source,
    })?;
    stream
        .set_nonblocking(true)
        .map_err(LinuxError::io("configuring the forwarded connection"))?;
    Ok(stream)
}

/// In a forked child before exec: puts `fd` at `target`, inherited by the program.
fn place_fd(fd: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: fcntl/dup2 on fds open in this process; no memory is involved.
    let placed = unsafe {
        if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, target)
        }
    };
    if placed < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Copies a process's output to the client (to nowhere without one) until it
/// ends. A client that stops taking it does not stall the process.
async fn relay(from: Option<impl AsyncRead + Unpin>, to: Option<BoxWrite>) {
    let Some(mut from) = from else {
        return;
    };
    if let Some(mut to) = to
        && copy_flushing(&mut from, &mut to).await.is_ok()
    {
        let _ = to.shutdown().await;
        return;
    }
    let _ = tokio::io::copy(&mut from, &mut tokio::io::sink()).await;
}

/// Copies to the end, passing each chunk on at once. Read errors other than
/// the end count as the end; write errors are returned.
async fn copy_flushing(from: &mut (impl AsyncRead + Unpin), to: &mut (impl AsyncWrite + Unpin)) -> io::Result<()> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return Ok(()),
            Ok(n) => n,
        };
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
    }
}

/// A running exec helper. Dropped before the process ended (the client went
/// away), it kills the process's group and lets the helper reap it.
struct Helper {
    child: Option<tokio::process::Child>,
    config_path: PathBuf,
    ended: bool,
}

impl Helper {
    fn spawn(mut command: tokio::process::Command, config_path: PathBuf) -> Result<Helper, LinuxError> {
        match command.spawn() {
            Ok(child) => Ok(Helper {
                child: Some(child),
                config_path,
                ended: false,
            }),
            Err(err) => {
                remove_exec_files(&config_path);
                Err(LinuxError::io("starting exec helper")(err))
            }
        }
    }

    fn child(&mut self) -> &mut tokio::process::Child {
        self.child.as_mut().expect("the helper is running")
    }

    /// Feeds input while waiting for the end, then lets the output finish
    /// (briefly, if something still holds it open).
    async fn run(
        &mut self,
        input: impl Future<Output = ()>,
        outputs: impl Future<Output = ()>,
    ) -> Result<ExitStatus, LinuxError> {
        let input = async {
            input.await;
            std::future::pending::<()>().await
        };
        tokio::pin!(input, outputs);
        let child = self.child.as_mut().expect("the helper is running");
        let wait = child.wait();
        tokio::pin!(wait);
        let mut drained = false;
        let status = tokio::select! {
            status = &mut wait => status,
            () = &mut outputs => {
                drained = true;
                tokio::select! {
                    status = &mut wait => status,
                    () = &mut input => unreachable!("input never ends"),
                }
            }
            () = &mut input => unreachable!("input never ends"),
        };
        // The helper reaped the process: its PID may be reused from now on.
        self.ended = true;
        let status = status.map_err(LinuxError::io("waiting for exec helper"))?;
        if !drained {
            let _ = tokio::time::timeout(OUTPUT_GRACE, outputs).await;
        }
        Ok(status)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let config_path = std::mem::take(&mut self.config_path);
        let Some(mut child) = self.child.take() else {
            return;
        };
        if self.ended {
            remove_exec_files(&config_path);
            return;
        }
        if !kill_exec_process(&config_path) {
            // Not started yet: the helper goes, and the process with it (parent-death signal).
            let _ = child.start_kill();
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Without a runtime, kill_on_drop ends the helper.
            remove_exec_files(&config_path);
            return;
        };
        runtime.spawn(async move {
            if tokio::time::timeout(REAP_GRACE, child.wait()).await.is_err() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
            remove_exec_files(&config_path);
        });
    }
}

/// Kills an exec's process and its process group (SIGKILL), through the PID
/// its helper recorded. False when no PID was recorded yet.
pub(super) fn kill_exec_process(config_path: &Path) -> bool {
    let pid = std::fs::read_to_string(exec::pid_path(config_path))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        .filter(|pid| *pid > 0);
    let Some(pid) = pid else {
        return false;
    };
    let pid = Pid::from_raw(pid);
    let _ = killpg(pid, Signal::SIGKILL);
    let _ = kill(pid, Signal::SIGKILL);
    true
}

pub(super) fn remove_exec_files(config_path: &Path) {
    let _ = std::fs::remove_file(config_path);
    let _ = std::fs::remove_file(exec::pid_path(config_path));
}

/// A terminal's master side under the tokio reactor. EIO (nothing has the
/// terminal open any more) reads as the end.
struct PtyMaster(AsyncFd<OwnedFd>);

impl PtyMaster {
    fn new(fd: OwnedFd) -> io::Result<PtyMaster> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open (and the same fd) until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(PtyMaster(fd))
    }
}

impl AsyncRead for PtyMaster {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(err)) if err.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PtyMaster {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
