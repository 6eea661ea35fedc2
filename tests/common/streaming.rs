//! Clients of the streaming server: raw HTTP upgrades, SPDY sessions (with the
//! library's own SPDY implementation in client role), WebSocket channels, and
//! crictl run on a pty or in the background.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures_util::StreamExt;
use podvisor::streaming::spdy::{Headers, Role, Session, SessionConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_once('/').expect("URL with a path");
    (host.to_string(), format!("/{path}"))
}

/// Sends a raw HTTP/1.1 request and returns (status, header block, connection).
pub async fn raw_request(url: &str, method: &str, headers: &[(&str, &str)]) -> (u16, String, TcpStream) {
    let (host, path) = split_url(url);
    let mut tcp = TcpStream::connect(&host)
        .await
        .expect("connect to the streaming server");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    // Byte by byte, so nothing after the header block is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.expect("response header"));
    }
    let head = String::from_utf8(head).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, tcp)
}

pub const SPDY_UPGRADE: [(&str, &str); 2] = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")];

/// Upgrades to SPDY offering `protocols`; returns the response head and a client session.
pub async fn spdy_connect(url: &str, protocols: &[&str]) -> (String, Session) {
    let mut headers = SPDY_UPGRADE.to_vec();
    headers.extend(protocols.iter().map(|p| ("X-Stream-Protocol-Version", *p)));
    let (status, head, tcp) = raw_request(url, "POST", &headers).await;
    assert_eq!(status, 101, "{head}");
    (head, Session::new(tcp, Role::Client, SessionConfig::default()))
}

pub fn stream_type(kind: &str) -> Headers {
    Headers::new().with("streamType", kind)
}

/// Reads to the end, within 20 s.
pub async fn read_all(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut v = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut v))
        .await
        .expect("read timed out")
        .expect("read");
    v
}

/// Reads until the text seen so far contains `needle` (20 s at most); returns all of it.
pub async fn read_until(r: &mut (impl AsyncRead + Unpin), seen: &mut Vec<u8>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 64 * 1024];
    // What was seen, shortened for messages.
    let tail = |seen: &[u8]| {
        let text = String::from_utf8_lossy(&seen[seen.len().saturating_sub(300)..]).into_owned();
        format!("{} bytes, ending {text:?}", seen.len())
    };
    let found = |seen: &[u8], from: usize| {
        seen[from.saturating_sub(needle.len())..]
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    };
    let mut from = 0;
    while !found(seen, from) {
        from = seen.len();
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, r.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in {}", tail(seen)))
            .expect("read");
        assert!(n > 0, "stream ended without {needle:?}: {}", tail(seen));
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(seen).into_owned()
}

/// The exit code in a v4/v5 status (0 for Success).
pub fn exit_code_of(status: &[u8]) -> i32 {
    let status: serde_json::Value = serde_json::from_slice(status).expect("status JSON");
    if status["status"] == "Success" {
        return 0;
    }
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    status["details"]["causes"][0]["message"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

pub async fn ws_connect(url: &str, protocols: &str) -> (Ws, Option<String>) {
    let mut request = url.replace("http://", "ws://").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
    let (ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("websocket upgrade");
    let protocol = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .map(|v| v.to_str().unwrap().to_string());
    (ws, protocol)
}

/// Collects channel messages until the server closes; returns per-channel bytes and the raw messages.
pub async fn ws_collect(ws: &mut Ws) -> (BTreeMap<u8, Vec<u8>>, Vec<Vec<u8>>) {
    let mut channels = BTreeMap::new();
    let mut raw = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("websocket timed out");
        match message {
            Some(Ok(Message::Binary(b))) => {
                raw.push(b.to_vec());
                channels.entry(b[0]).or_insert_with(Vec::new).extend_from_slice(&b[1..]);
            }
            Some(Ok(Message::Text(t))) => {
                let t = t.as_bytes();
                raw.push(t.to_vec());
                let data = STANDARD.decode(&t[1..]).unwrap();
                channels
                    .entry(t[0] - b'0')
                    .or_insert_with(Vec::new)
                    .extend_from_slice(&data);
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    (channels, raw)
}

pub fn crictl_path() -> Option<PathBuf> {
    let path = PathBuf::from("/usr/local/bin/crictl");
    path.exists().then_some(path)
}

/// A crictl command against `endpoint`.
pub fn crictl(crictl: &Path, config_dir: &Path, endpoint: &str, args: &[&str]) -> std::process::Command {
    let config = config_dir.join("crictl.yaml");
    std::fs::write(
        &config,
        format!("runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\ntimeout: 20\n"),
    )
    .unwrap();
    let mut command = std::process::Command::new(crictl);
    command.env("CRI_CONFIG_FILE", &config).args(args);
    command
}

/// Runs a command off the async runtime with `stdin` as its input, killed after 60 s.
pub async fn run(mut command: std::process::Command, stdin: &[u8]) -> std::process::Output {
    let stdin = stdin.to_vec();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        use std::process::Stdio;
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn");
        let mut input = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            let _ = input.write_all(&stdin);
        });
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let (done, finished) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if finished.recv_timeout(Duration::from_secs(60)).is_err() {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        });
        let output = child.wait_with_output().unwrap();
        let _ = done.send(());
        output
    })
    .await
    .unwrap()
}

pub fn set_winsize(fd: &OwnedFd, rows: u16, cols: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize that lives for the call; the fd is open.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) };
}

/// A command on a fresh pty (its controlling terminal), with what it printed.
pub struct OnPty {
    child: std::process::Child,
    pub master: OwnedFd,
    output: Arc<Mutex<Vec<u8>>>,
}

impl OnPty {
    pub fn spawn(mut command: std::process::Command, rows: u16, cols: u16) -> OnPty {
        use std::os::unix::process::CommandExt;
        let size = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None).unwrap();
        command
            .stdin(pty.slave.try_clone().unwrap())
            .stdout(pty.slave.try_clone().unwrap())
            .stderr(pty.slave.try_clone().unwrap());
        // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        drop(command);
        drop(pty.slave);
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut reader = std::fs::File::from(pty.master.try_clone().unwrap());
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        OnPty {
            child,
            master: pty.master,
            output,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    pub async fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.text().contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} in {:?}", self.text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn type_keys(&self, keys: &[u8]) {
        use std::io::Write;
        std::fs::File::from(self.master.try_clone().unwrap())
            .write_all(keys)
            .unwrap();
    }

    pub async fn wait_exit(mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("command did not exit; output {:?}", self.text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A background process whose output is collected (crictl port-forward); killed on drop.
pub struct Background {
    child: std::process::Child,
    output: Arc<Mutex<String>>,
}

impl Background {
    pub fn spawn(mut command: std::process::Command) -> Background {
        use std::process::Stdio;
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let pipes: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for mut pipe in pipes {
            let sink = output.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Background { child, output }
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    pub async fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.output().contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} in {:?}", self.output());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `payload` on a TCP connection to 127.0.0.1:`port`, half-closes, returns what came back.
pub async fn round_trip(port: u16, payload: &[u8]) -> Vec<u8> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut r, mut w) = conn.split();
    let send = async {
        w.write_all(payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let recv = r.read_to_end(&mut back);
    let (_, result) = tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(send, recv) })
        .await
        .expect("round trip timed out");
    result.unwrap();
    back
}
