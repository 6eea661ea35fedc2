//! The serial console relay: connects to the unix socket QEMU listens on for
//! the VM's serial port, writes what the guest prints to the container's CRI
//! log, and serves attach clients on a socket of its own (their input goes to
//! the serial port, the console's output to all of them).
//!
//! In podvisor it runs as a small per-VM process (like the container
//! monitor), so it keeps logging across daemon restarts; the daemon starts
//! the domain paused, starts the relay, and resumes the domain once the relay
//! is connected (see [`super::xml`]). Only one client can be connected to
//! QEMU's socket at a time, which is why attach goes through the relay.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use super::VmError;

/// Longest piece of a line written as one log line.
pub const MAX_LINE: usize = 16 * 1024;
/// A partial line (a prompt) is logged after this long without more output.
const PARTIAL_FLUSH: Duration = Duration::from_millis(500);
const POLL_INTERVAL_MS: i32 = 100;

#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// QEMU's serial socket.
    pub console_socket: PathBuf,
    /// The container's CRI log.
    pub log_path: PathBuf,
    /// Where attach clients connect; none: no attach.
    pub attach_socket: Option<PathBuf>,
    /// How long to keep trying to connect to QEMU's socket.
    pub connect_timeout: Duration,
}

/// Flags the relay checks between reads (set from signal handlers in the process).
#[derive(Debug, Default)]
pub struct RelayControl {
    pub stop: AtomicBool,
    /// ReopenContainerLog: open the log file again (it was rotated).
    pub reopen_log: AtomicBool,
    /// Set once connected to QEMU's socket (the daemon may resume the VM).
    pub connected: AtomicBool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// QEMU closed the socket: the VM stopped.
    ConsoleClosed,
    /// [`RelayControl::stop`] was set.
    Stopped,
}

/// RFC 3339 UTC time with nanoseconds, as CRI logs use.
pub fn rfc3339_nano(time: SystemTime) -> String {
    let since = time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, day_secs) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a proleptic Gregorian date, counting in
    // 400-year eras that start on March 1st (so leap days come last).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        day_secs / 3600,
        day_secs / 60 % 60,
        day_secs % 60,
        since.subsec_nanos()
    )
}

/// Splits console output into CRI log lines (`<time> stdout F|P <text>`);
/// the serial port's `\r\n` line ends become plain line ends.
#[derive(Debug, Default)]
pub struct CriLines {
    pending: Vec<u8>,
}

impl CriLines {
    pub fn feed(&mut self, data: &[u8], now: &str, out: &mut impl Write) -> io::Result<()> {
        for &byte in data {
            if byte == b'\n' {
                if self.pending.last() == Some(&b'\r') {
                    self.pending.pop();
                }
                self.emit(now, true, out)?;
            } else {
                self.pending.push(byte);
                if self.pending.len() == MAX_LINE {
                    self.emit(now, false, out)?;
                }
            }
        }
        Ok(())
    }

    /// Logs what is buffered as a partial line.
    pub fn flush_partial(&mut self, now: &str, out: &mut impl Write) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.emit(now, false, out)
    }

    fn emit(&mut self, now: &str, full: bool, out: &mut impl Write) -> io::Result<()> {
        let mut line = Vec::with_capacity(now.len() + self.pending.len() + 12);
        line.extend_from_slice(now.as_bytes());
        line.extend_from_slice(if full { b" stdout F " } else { b" stdout P " });
        line.extend_from_slice(&self.pending);
        line.push(b'\n');
        self.pending.clear();
        out.write_all(&line)
    }
}

fn open_log(path: &Path) -> Result<File, VmError> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map_err(VmError::io(format!("opening log {}", path.display())))
}

fn connect(config: &RelayConfig, control: &RelayControl) -> Result<UnixStream, VmError> {
    let deadline = Instant::now() + config.connect_timeout;
    loop {
        match UnixStream::connect(&config.console_socket) {
            Ok(stream) => return Ok(stream),
            Err(err) if Instant::now() < deadline && !control.stop.load(Ordering::Relaxed) => {
                tracing::trace!(error = %err, "console socket not ready");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(err) => {
                return Err(VmError::io(format!(
                    "connecting to {}",
                    config.console_socket.display()
                ))(err));
            }
        }
    }
}

fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<()> {
    // SAFETY: `fds` is a valid, exclusively borrowed slice of pollfd for the whole call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(())
}

fn pollfd(fd: &impl AsRawFd) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Runs the relay until the VM's console closes or `control.stop` is set.
pub fn run(config: &RelayConfig, control: &RelayControl) -> Result<RelayEnd, VmError> {
    let mut log = open_log(&config.log_path)?;
    let listener = match &config.attach_socket {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path).map_err(VmError::io(format!("binding {}", path.display())))?;
            // Attach means typing into the VM's console: root only.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(VmError::io(format!("restricting {}", path.display())))?;
            listener.set_nonblocking(true).map_err(VmError::io("attach socket"))?;
            Some(listener)
        }
        None => None,
    };
    let mut console = connect(config, control)?;
    // Input from a client must not stall the relay if the guest does not read.
    console
        .set_write_timeout(Some(Duration::from_secs(1)))
        .map_err(VmError::io("console socket"))?;
    control.connected.store(true, Ordering::SeqCst);
    let mut lines = CriLines::default();
    let mut clients: Vec<UnixStream> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_output = Instant::now();

    let end = loop {
        if control.stop.load(Ordering::Relaxed) {
            break RelayEnd::Stopped;
        }
        if control.reopen_log.swap(false, Ordering::Relaxed) {
            lines.flush_partial(&rfc3339_nano(SystemTime::now()), &mut log).ok();
            log = open_log(&config.log_path)?;
        }
        let mut fds = vec![pollfd(&console)];
        if let Some(listener) = &listener {
            fds.push(pollfd(listener));
        }
        let first_client = fds.len();
        fds.extend(clients.iter().map(pollfd));
        poll(&mut fds, POLL_INTERVAL_MS).map_err(VmError::io("polling console"))?;

        if fds[0].revents != 0 {
            let n = match console.read(&mut buf) {
                Ok(n) => n,
                Err(err) if matches!(err.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => continue,
                Err(err) if err.kind() == io::ErrorKind::ConnectionReset => 0,
                Err(err) => return Err(VmError::io("reading console")(err)),
            };
            if n == 0 {
                break RelayEnd::ConsoleClosed;
            }
            let data = &buf[..n];
            lines
                .feed(data, &rfc3339_nano(SystemTime::now()), &mut log)
                .map_err(VmError::io("writing log"))?;
            last_output = Instant::now();
            // Slow clients are dropped rather than stalling the console.
            clients.retain_mut(|client| client.write_all(data).is_ok());
        } else if last_output.elapsed() >= PARTIAL_FLUSH {
            lines
                .flush_partial(&rfc3339_nano(SystemTime::now()), &mut log)
                .map_err(VmError::io("writing log"))?;
        }

        let mut gone = Vec::new();
        for (i, client) in clients.iter_mut().enumerate() {
            if fds.get(first_client + i).is_none_or(|fd| fd.revents == 0) {
                continue;
            }
            match client.read(&mut buf) {
                Ok(0) => gone.push(i),
                Ok(n) => {
                    if let Err(err) = console.write_all(&buf[..n]) {
                        tracing::debug!(error = %err, "console input dropped");
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => gone.push(i),
            }
        }
        for i in gone.into_iter().rev() {
            clients.remove(i);
        }

        if let Some(listener) = &listener
            && fds[1].revents != 0
        {
            while let Ok((client, _)) = listener.accept() {
                if client.set_nonblocking(true).is_ok() {
                    clients.push(client);
                }
            }
        }
    };
    lines.flush_partial(&rfc3339_nano(SystemTime::now()), &mut log).ok();
    if let Some(path) = &config.attach_socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn formats_rfc3339_nano() {
        let at = |secs: u64, nanos: u32| rfc3339_nano(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(at(1_700_000_000, 123_456_789), "2023-11-14T22:13:20.123456789Z");
        assert_eq!(at(4_102_444_799, 0), "2099-12-31T23:59:59.000000000Z");
    }

    #[test]
    fn splits_console_lines() {
        let mut lines = CriLines::default();
        let mut out = Vec::new();
        lines.feed(b"Linux version 6.1\r\nsecond", "T", &mut out).unwrap();
        lines.feed(b" half\r\n\r\nlogin: ", "U", &mut out).unwrap();
        lines.flush_partial("V", &mut out).unwrap();
        lines.flush_partial("W", &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "T stdout F Linux version 6.1\nU stdout F second half\nU stdout F \nV stdout P login: \n"
        );
        let mut out = Vec::new();
        lines.feed(&vec![b'x'; MAX_LINE + 1], "T", &mut out).unwrap();
        assert_eq!(out.len(), "T stdout P ".len() + MAX_LINE + 1);
    }

    #[test]
    fn relays_output_to_log_and_clients_and_input_to_console() {
        let dir = std::env::temp_dir().join(format!("vmdomain-console-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let qemu = UnixListener::bind(dir.join("console.sock")).unwrap();
        let config = RelayConfig {
            console_socket: dir.join("console.sock"),
            log_path: dir.join("log"),
            attach_socket: Some(dir.join("attach.sock")),
            connect_timeout: Duration::from_secs(5),
        };
        let control = Arc::new(RelayControl::default());
        let relay = {
            let (config, control) = (config.clone(), control.clone());
            std::thread::spawn(move || run(&config, &control))
        };
        let (mut guest, _) = qemu.accept().unwrap();
        while !control.connected.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let mode = std::fs::metadata(dir.join("attach.sock")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut client = UnixStream::connect(dir.join("attach.sock")).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        guest.write_all(b"boot line\r\nlogin: ").unwrap();
        let mut seen = [0u8; 18];
        client.read_exact(&mut seen).unwrap();
        assert_eq!(&seen, b"boot line\r\nlogin: ");
        client.write_all(b"root\n").unwrap();
        let mut typed = [0u8; 5];
        guest.read_exact(&mut typed).unwrap();
        assert_eq!(&typed, b"root\n");
        std::thread::sleep(PARTIAL_FLUSH + Duration::from_millis(300));
        drop(guest);
        assert_eq!(relay.join().unwrap().unwrap(), RelayEnd::ConsoleClosed);
        let log = std::fs::read_to_string(dir.join("log")).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 2, "{log}");
        assert!(lines[0].ends_with(" stdout F boot line"), "{log}");
        assert!(lines[1].ends_with(" stdout P login: "), "{log}");
        assert!(!dir.join("attach.sock").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stops_when_asked_and_fails_without_socket() {
        let dir = std::env::temp_dir().join(format!("vmdomain-console-stop-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = RelayConfig {
            console_socket: dir.join("missing.sock"),
            log_path: dir.join("log"),
            attach_socket: None,
            connect_timeout: Duration::from_millis(200),
        };
        assert!(matches!(
            run(&config, &RelayControl::default()),
            Err(VmError::Io { .. })
        ));
        let _qemu = UnixListener::bind(dir.join("c.sock")).unwrap();
        config.console_socket = dir.join("c.sock");
        let control = RelayControl::default();
        control.stop.store(true, Ordering::SeqCst);
        assert_eq!(run(&config, &control).unwrap(), RelayEnd::Stopped);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
