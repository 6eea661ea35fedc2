//! Attaching to a container's main process. The monitor listens on
//! `attach.sock` in the bundle and the daemon connects once per attach session,
//! so attaching works the same after a daemon restart. Frames in both
//! directions are a kind byte, a big-endian u32 length and the payload:
//!
//! * daemon → monitor: [`HELLO`] first (one byte of `WANT_*` flags), then
//!   [`STDIN`] data, [`STDIN_CLOSE`] and [`RESIZE`] (rows, columns: u16 each);
//! * monitor → daemon: [`STDOUT`] and [`STDERR`] output (a terminal's is stdout).
//!
//! The monitor hands every output chunk it reads from then on to each attacher
//! that wants it and never waits for one: an attacher with more than
//! [`MAX_PENDING_OUTPUT`] unsent bytes is disconnected. Input waits in a small
//! buffer until the container reads it; attachers are not read while it is full.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::LinuxError;
use crate::streaming::{BoxRead, StreamIo, TerminalSize};

pub const SOCKET_NAME: &str = "attach.sock";

pub const HELLO: u8 = 0;
pub const STDIN: u8 = 1;
pub const STDIN_CLOSE: u8 = 2;
pub const RESIZE: u8 = 3;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;

pub const WANT_STDIN: u8 = 1;
pub const WANT_STDOUT: u8 = 2;
pub const WANT_STDERR: u8 = 4;

const HEADER: usize = 5;
const MAX_FRAME: usize = 64 * 1024;
/// Unsent output an attacher may have before it is disconnected.
pub const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// Input the monitor holds for the container before it stops reading attachers.
const MAX_PENDING_INPUT: usize = 64 * 1024;
const MAX_ATTACHERS: usize = 32;

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    push_frame(&mut out, kind, payload);
    out
}

fn push_frame(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// The socket's path through an open fd of the bundle: bundles can be deeper
/// than the 107 bytes a socket address holds.
fn short_path(bundle: &std::fs::File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{SOCKET_NAME}", bundle.as_raw_fd()))
}

/// Monitor side: the listening socket and the attached clients, driven by the
/// monitor's poll loop.
pub struct AttachServer {
    listener: Option<UnixListener>,
    bundle: PathBuf,
    attachers: Vec<Attacher>,
    /// Where input goes: the container's stdin pipe or its terminal (only if it has stdin).
    stdin: Option<OwnedFd>,
    /// The terminal's master side, for resizes.
    terminal: Option<OwnedFd>,
    input: Vec<u8>,
    /// Close `stdin` once `input` is written.
    closing_stdin: bool,
    stdin_once: bool,
}

struct Attacher {
    socket: UnixStream,
    /// `WANT_*` flags, from its hello.
    wants: u8,
    inbox: Vec<u8>,
    outbox: Vec<u8>,
    gone: bool,
}

impl AttachServer {
    /// Listens on the bundle's `attach.sock`. Without it the container runs
    /// unattachable (the reason goes to the monitor's log).
    pub fn bind(bundle: &Path, stdin: Option<OwnedFd>, terminal: Option<OwnedFd>, stdin_once: bool) -> AttachServer {
        let listener = match listen(bundle) {
            Ok(listener) => Some(listener),
            Err(err) => {
                eprintln!("podvisor monitor: no attach socket: {err}");
                None
            }
        };
        for fd in stdin.iter().chain(terminal.iter()) {
            let _ = set_nonblocking(fd);
        }
        AttachServer {
            listener,
            bundle: bundle.to_path_buf(),
            attachers: Vec::new(),
            stdin,
            terminal,
            input: Vec::new(),
            closing_stdin: false,
            stdin_once,
        }
    }

    /// Adds what to wait for to a poll set.
    pub fn register(&self, fds: &mut Vec<libc::pollfd>) {
        let mut add = |fd: i32, events: i16| {
            fds.push(libc::pollfd { fd, events, revents: 0 });
        };
        if let Some(listener) = &self.listener
            && self.attachers.len() < MAX_ATTACHERS
        {
            add(listener.as_raw_fd(), libc::POLLIN);
        }
        if let Some(stdin) = &self.stdin
            && !self.input.is_empty()
        {
            add(stdin.as_raw_fd(), libc::POLLOUT);
        }
        let readable = self.input.len() < MAX_PENDING_INPUT;
        for attacher in &self.attachers {
            let mut events = if readable { libc::POLLIN } else { 0 };
            if !attacher.outbox.is_empty() {
                events |= libc::POLLOUT;
            }
            add(attacher.socket.as_raw_fd(), events);
        }
    }

    /// Handles what poll reported.
    pub fn handle(&mut self, fds: &[libc::pollfd]) {
        let revents = |fd: i32| fds.iter().find(|p| p.fd == fd).map_or(0, |p| p.revents);
        if self.stdin.as_ref().is_some_and(|s| revents(s.as_raw_fd()) != 0) {
            self.write_input();
        }
        for i in 0..self.attachers.len() {
            let ready = revents(self.attachers[i].socket.as_raw_fd());
            if ready & libc::POLLOUT != 0 {
                self.attachers[i].send();
            }
            if ready & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                self.receive(i);
            }
        }
        self.write_input();
        self.drop_gone();
        let accept = self
            .listener
            .as_ref()
            .is_some_and(|l| revents(l.as_raw_fd()) & libc::POLLIN != 0);
        if accept {
            self.accept();
        }
    }

    /// Hands an output chunk to every attacher that wants it.
    pub fn broadcast(&mut self, kind: u8, data: &[u8]) {
        let want = if kind == STDERR { WANT_STDERR } else { WANT_STDOUT };
        for attacher in self.attachers.iter_mut().filter(|a| a.wants & want != 0) {
            if attacher.outbox.len() + HEADER + data.len() > MAX_PENDING_OUTPUT {
                attacher.gone = true;
                continue;
            }
            push_frame(&mut attacher.outbox, kind, data);
            attacher.send();
        }
        self.drop_gone();
    }

    /// Whether some attacher still has output to be sent.
    pub fn sending(&self) -> bool {
        self.attachers.iter().any(|a| !a.outbox.is_empty())
    }

    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        while self.attachers.len() < MAX_ATTACHERS {
            match listener.accept() {
                Ok((socket, _)) => {
                    if socket.set_nonblocking(true).is_ok() {
                        self.attachers.push(Attacher {
                            socket,
                            wants: 0,
                            inbox: Vec::new(),
                            outbox: Vec::new(),
                            gone: false,
                        });
                    }
                }
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads what an attacher sent and acts on its complete frames.
    fn receive(&mut self, i: usize) {
        let mut buf = [0u8; 16 * 1024];
        let attacher = &mut self.attachers[i];
        match attacher.socket.read(&mut buf) {
            Ok(0) => attacher.gone = true,
            Ok(n) => attacher.inbox.extend_from_slice(&buf[..n]),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(_) => attacher.gone = true,
        }
        let mut used = 0;
        loop {
            let attacher = &mut self.attachers[i];
            let rest = &attacher.inbox[used..];
            if rest.len() < HEADER {
                break;
            }
            let kind = rest[0];
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            if len > MAX_FRAME {
                attacher.gone = true;
                break;
            }
            if rest.len() < HEADER + len {
                break;
            }
            let payload = &rest[HEADER..HEADER + len];
            let wants_stdin = attacher.wants & WANT_STDIN != 0;
            match kind {
                HELLO if payload.len() == 1 => attacher.wants = payload[0],
                STDIN if wants_stdin => {
                    if self.stdin.is_some() && !self.closing_stdin {
                        self.input.extend_from_slice(payload);
                    }
                }
                STDIN_CLOSE if wants_stdin => {
                    // Its input ended: with stdin_once, so does the container's.
                    attacher.wants &= !WANT_STDIN;
                    if self.stdin_once {
                        self.closing_stdin = true;
                    }
                }
                RESIZE if payload.len() == 4 => {
                    if let Some(terminal) = &self.terminal {
                        let rows = u16::from_be_bytes([payload[0], payload[1]]);
                        let cols = u16::from_be_bytes([payload[2], payload[3]]);
                        super::exec::set_window_size(terminal.as_raw_fd(), rows, cols);
                    }
                }
                _ => {
                    attacher.gone = true;
                    break;
                }
            }
            used += HEADER + len;
        }
        let inbox = &mut self.attachers[i].inbox;
        inbox.drain(..used.min(inbox.len()));
    }

    /// Writes pending input without blocking; closes stdin when asked to and done.
    fn write_input(&mut self) {
        let Some(stdin) = &self.stdin else {
            self.input.clear();
            return;
        };
        while !self.input.is_empty() {
            match nix::unistd::write(stdin, &self.input) {
                Ok(n) => {
                    self.input.drain(..n);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(_) => {
                    // The container closed its stdin.
                    self.input.clear();
                    self.stdin = None;
                    return;
                }
            }
        }
        shrink(&mut self.input);
        if self.input.is_empty() && self.closing_stdin {
            self.stdin = None;
        }
    }

    fn drop_gone(&mut self) {
        let stdin_once = self.stdin_once;
        let mut close_stdin = false;
        self.attachers.retain(|a| {
            if a.gone && a.wants & WANT_STDIN != 0 && stdin_once {
                close_stdin = true;
            }
            !a.gone
        });
        if close_stdin {
            self.closing_stdin = true;
            self.write_input();
        }
    }
}

impl Drop for AttachServer {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(self.bundle.join(SOCKET_NAME));
        }
    }
}

impl Attacher {
    /// Sends pending output without blocking.
    fn send(&mut self) {
        while !self.outbox.is_empty() {
            match self.socket.write(&self.outbox) {
                Ok(0) => {
                    self.gone = true;
                    return;
                }
                Ok(n) => {
                    self.outbox.drain(..n);
                }
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.gone = true;
                    return;
                }
            }
        }
        shrink(&mut self.outbox);
    }
}

/// Gives back a drained buffer's memory: the monitor stays small between bursts.
fn shrink(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > 64 * 1024 {
        *buf = Vec::new();
    }
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(|_| ())
}

fn listen(bundle: &Path) -> std::io::Result<UnixListener> {
    let dir = std::fs::File::open(bundle)?;
    let _ = std::fs::remove_file(bundle.join(SOCKET_NAME));
    let listener = UnixListener::bind(short_path(&dir))?;
    // Only root may attach (connecting takes write permission).
    std::fs::set_permissions(
        bundle.join(SOCKET_NAME),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Daemon side: attaches `io` to the container whose bundle is given, until the
/// container ends or, when the client's stdin ends, the session detaches
/// (except with `stdin_once` and no terminal, where the container's stdin is
/// closed and output goes on to its end, as kubectl expects).
pub async fn attach(bundle: &Path, tty: bool, stdin_once: bool, io: StreamIo) -> Result<(), LinuxError> {
    let socket = connect(bundle).map_err(LinuxError::io("connecting to the container's attach socket"))?;
    let (mut from_monitor, mut to_monitor) = socket.into_split();
    let StreamIo {
        stdin,
        mut stdout,
        mut stderr,
        resize,
    } = io;
    let mut wants = 0;
    for (present, flag) in [
        (stdin.is_some(), WANT_STDIN),
        (stdout.is_some(), WANT_STDOUT),
        (stderr.is_some(), WANT_STDERR),
    ] {
        if present {
            wants |= flag;
        }
    }
    to_monitor
        .write_all(&frame(HELLO, &[wants]))
        .await
        .map_err(LinuxError::io("attaching to the container"))?;
    let output = async {
        let mut header = [0u8; HEADER];
        let mut payload = Vec::new();
        // Ends when the monitor closes: the container ended or this attacher was too slow.
        while from_monitor.read_exact(&mut header).await.is_ok() {
            let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
            payload.resize(len.min(MAX_FRAME), 0);
            if len > MAX_FRAME || from_monitor.read_exact(&mut payload).await.is_err() {
                break;
            }
            let to = match header[0] {
                STDOUT => stdout.as_mut(),
                STDERR => stderr.as_mut(),
                _ => None,
            };
            if let Some(to) = to
                && to.write_all(&payload).await.is_err()
            {
                break;
            }
        }
        for to in [stdout.as_mut(), stderr.as_mut()].into_iter().flatten() {
            let _ = to.shutdown().await;
        }
    };
    let input = forward_input(stdin, resize, &mut to_monitor);
    tokio::pin!(output, input);
    tokio::select! {
        () = &mut output => {}
        () = &mut input => {
            if stdin_once && !tty {
                output.await;
            }
        }
    }
    Ok(())
}

/// Sends the client's input and resizes to the monitor; returns when its stdin ended (or the monitor is gone).
async fn forward_input(
    mut stdin: Option<BoxRead>,
    mut resize: Option<tokio::sync::mpsc::Receiver<TerminalSize>>,
    to_monitor: &mut tokio::net::unix::OwnedWriteHalf,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let message = tokio::select! {
            read = async {
                match stdin.as_mut() {
                    Some(stdin) => stdin.read(&mut buf).await,
                    None => std::future::pending().await,
                }
            } => match read {
                Ok(n) if n > 0 => frame(STDIN, &buf[..n]),
                _ => {
                    let _ = to_monitor.write_all(&frame(STDIN_CLOSE, &[])).await;
                    return;
                }
            },
            size = async {
                match resize.as_mut() {
                    Some(resize) => resize.recv().await,
                    None => std::future::pending().await,
                }
            } => match size {
                Some(size) => {
                    let mut payload = size.height.to_be_bytes().to_vec();
                    payload.extend_from_slice(&size.width.to_be_bytes());
                    frame(RESIZE, &payload)
                }
                None => {
                    resize = None;
                    continue;
                }
            },
        };
        if to_monitor.write_all(&message).await.is_err() {
            return;
        }
    }
}

fn connect(bundle: &Path) -> std::io::Result<tokio::net::UnixStream> {
    let dir = std::fs::File::open(bundle)?;
    let socket = UnixStream::connect(short_path(&dir))?;
    socket.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One round of the monitor's poll loop, for the attach part.
    fn poll_once(server: &mut AttachServer) {
        let mut fds = Vec::new();
        server.register(&mut fds);
        // SAFETY: fds is a valid array of pollfd of the given length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        server.handle(&fds);
    }

    fn read_frame(client: &mut UnixStream) -> (u8, Vec<u8>) {
        let mut header = [0u8; HEADER];
        client.read_exact(&mut header).unwrap();
        let mut payload = vec![0u8; u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize];
        client.read_exact(&mut payload).unwrap();
        (header[0], payload)
    }

    #[test]
    fn attachers_get_wanted_output_and_feed_stdin_once() {
        let dir = tempfile::tempdir().unwrap();
        let (stdin_read, stdin_write) = nix::unistd::pipe().unwrap();
        let mut server = AttachServer::bind(dir.path(), Some(stdin_write), None, true);
        let mut client = UnixStream::connect(dir.path().join(SOCKET_NAME)).unwrap();
        client.write_all(&frame(HELLO, &[WANT_STDIN | WANT_STDOUT])).unwrap();
        client.write_all(&frame(STDIN, b"typed")).unwrap();
        poll_once(&mut server); // accepted
        poll_once(&mut server); // hello and input
        let mut stdin = std::fs::File::from(stdin_read);
        let mut typed = [0u8; 5];
        stdin.read_exact(&mut typed).unwrap();
        assert_eq!(&typed, b"typed");

        server.broadcast(STDERR, b"unwanted");
        server.broadcast(STDOUT, b"out");
        assert_eq!(read_frame(&mut client), (STDOUT, b"out".to_vec()));

        // stdin_once: the attacher's end of input is the container's.
        client.write_all(&frame(STDIN_CLOSE, &[])).unwrap();
        poll_once(&mut server);
        let mut rest = Vec::new();
        stdin.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        drop(server);
        assert!(!dir.path().join(SOCKET_NAME).exists());
    }

    #[test]
    fn an_attacher_that_does_not_read_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = AttachServer::bind(dir.path(), None, None, false);
        let mut stalled = UnixStream::connect(dir.path().join(SOCKET_NAME)).unwrap();
        stalled.write_all(&frame(HELLO, &[WANT_STDOUT])).unwrap();
        poll_once(&mut server);
        poll_once(&mut server);
        let chunk = vec![b'x'; 32 * 1024];
        let mut sent = 0;
        while server.attachers.len() == 1 {
            server.broadcast(STDOUT, &chunk);
            sent += chunk.len();
            assert!(sent < 64 << 20, "never dropped");
        }
        let mut received = Vec::new();
        stalled.read_to_end(&mut received).unwrap();
        // What the socket held; the rest was never sent.
        assert!(!received.is_empty() && received.len() < sent - MAX_PENDING_OUTPUT / 2);
    }
}
