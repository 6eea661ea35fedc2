//! remotecommand: the exec/attach protocol family (`channel.k8s.io` … `v5.channel.k8s.io`).
//!
//! Streams (SPDY) or channels (WebSocket): `stdin` 0, `stdout` 1, `stderr` 2, `error` 3, `resize` 4. The server
//! reports the outcome on the error stream: v4+ as a JSON `metav1.Status`, v1–v3 as plain text (nothing on
//! success). `resize` (v3+, tty only) carries a stream of JSON `{"Width":w,"Height":h}` values. v5 adds the
//! stdin close signal, which only matters for WebSocket (channel 255 message naming the closed channel); over
//! SPDY a closed stdin is simply the stream's half-close.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::spdy::frame::rst;
use super::spdy::{SendHalf, Session, SpdyStream};
use super::websocket::{ChannelMux, Encoding};
use super::{AttachRequest, BoxRead, BoxWrite, ExecRequest, StdioFlags, StreamIo, StreamingRuntime, TerminalSize};

/// SPDY stream header naming the stream's role (lowercase on the wire).
pub const STREAM_TYPE_HEADER: &str = "streamtype";
/// HTTP header carrying the offered / negotiated protocol versions on SPDY upgrades.
pub const PROTOCOL_VERSION_HEADER: &str = "X-Stream-Protocol-Version";
/// HTTP header listing our protocols when negotiation fails.
pub const ACCEPTED_VERSIONS_HEADER: &str = "X-Accepted-Stream-Protocol-Versions";

/// WebSocket channel numbers.
pub mod channel {
    pub const STDIN: u8 = 0;
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    pub const ERROR: u8 = 3;
    pub const RESIZE: u8 = 4;
    /// v5 close signal: `[255, channel]`.
    pub const CLOSE: u8 = 255;
}

const MAX_RESIZE_MESSAGE: usize = 4096;

/// The client offered protocol versions, none of which we speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no common remotecommand protocol version")]
pub struct NoCommonProtocol;

/// A remotecommand protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    V1,
    V2,
    V3,
    V4,
    V5,
}

impl Protocol {
    /// Supported versions, most preferred first.
    pub const ALL: [Protocol; 5] = [Protocol::V5, Protocol::V4, Protocol::V3, Protocol::V2, Protocol::V1];

    /// Protocol name as used in `X-Stream-Protocol-Version`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::V1 => "channel.k8s.io",
            Protocol::V2 => "v2.channel.k8s.io",
            Protocol::V3 => "v3.channel.k8s.io",
            Protocol::V4 => "v4.channel.k8s.io",
            Protocol::V5 => "v5.channel.k8s.io",
        }
    }

    /// Parses a protocol name.
    pub fn from_name(name: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether the error stream carries a JSON `Status` (v4+) rather than text.
    pub fn json_status(self) -> bool {
        self >= Protocol::V4
    }

    /// Whether the client opens a resize stream for tty sessions (v3+).
    pub fn supports_resize(self) -> bool {
        self >= Protocol::V3
    }

    /// Picks the highest version the client offered. No offer at all means the legacy `channel.k8s.io`
    /// (`Ok(None)`: answer without a version header); offers without overlap are an error.
    pub fn negotiate<'a>(offers: impl IntoIterator<Item = &'a str>) -> Result<Option<Protocol>, NoCommonProtocol> {
        let offered: Vec<&str> = offers.into_iter().flat_map(|v| v.split(',')).map(str::trim).collect();
        if offered.iter().all(|o| o.is_empty()) {
            return Ok(None);
        }
        Protocol::ALL
            .into_iter()
            .find(|p| offered.contains(&p.name()))
            .map(Some)
            .ok_or(NoCommonProtocol)
    }
}

/// The operation behind a remotecommand session.
#[derive(Debug, Clone)]
pub enum Command {
    Exec(ExecRequest),
    Attach(AttachRequest),
}

impl Command {
    pub(crate) fn flags(&self) -> StdioFlags {
        match self {
            Command::Exec(r) => StdioFlags {
                stdin: r.stdin,
                stdout: r.stdout,
                stderr: r.stderr,
                tty: r.tty,
            },
            Command::Attach(r) => StdioFlags {
                stdin: r.stdin,
                stdout: r.stdout,
                stderr: r.stderr,
                tty: r.tty,
            },
        }
    }
}

/// How the command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    ExitCode(i32),
    Error(String),
}

#[derive(Serialize)]
struct Meta {}

#[derive(Serialize)]
struct Cause {
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    message: String,
}

#[derive(Serialize)]
struct Details {
    causes: Vec<Cause>,
}

#[derive(Serialize)]
struct Status {
    metadata: Meta,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Details>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<u16>,
}

/// Clients parse the exit code as an unsigned byte; map anything else into 1..=255.
fn wire_exit_code(code: i32) -> i32 {
    if (0..=255).contains(&code) {
        return code;
    }
    match code.rem_euclid(256) {
        0 => 255,
        c => c,
    }
}

impl Outcome {
    /// The v4+ JSON `metav1.Status` for this outcome.
    pub fn to_json(&self) -> Vec<u8> {
        let status = match self {
            Outcome::Success | Outcome::ExitCode(0) => Status {
                metadata: Meta {},
                status: "Success",
                message: None,
                reason: None,
                details: None,
                code: None,
            },
            Outcome::ExitCode(code) => {
                let code = wire_exit_code(*code);
                Status {
                    metadata: Meta {},
                    status: "Failure",
                    message: Some(format!(
                        "command terminated with non-zero exit code: exit status {code}"
                    )),
                    reason: Some("NonZeroExitCode"),
                    details: Some(Details {
                        causes: vec![Cause {
                            reason: Some("ExitCode"),
                            message: code.to_string(),
                        }],
                    }),
                    code: None,
                }
            }
            Outcome::Error(msg) => Status {
                metadata: Meta {},
                status: "Failure",
                message: Some(format!("Internal error occurred: {msg}")),
                reason: Some("InternalError"),
                details: Some(Details {
                    causes: vec![Cause {
                        reason: None,
                        message: msg.clone(),
                    }],
                }),
                code: Some(500),
            },
        };
        serde_json::to_vec(&status).unwrap_or_default()
    }

    /// The v1–v3 plain-text error, or `None` on success.
    pub fn to_text(&self) -> Option<String> {
        match self {
            Outcome::Success | Outcome::ExitCode(0) => None,
            Outcome::ExitCode(code) => Some(format!(
                "command terminated with non-zero exit code: exit status {}",
                wire_exit_code(*code)
            )),
            Outcome::Error(msg) => Some(format!("Internal error occurred: {msg}")),
        }
    }

    fn encode(&self, protocol: Protocol) -> Vec<u8> {
        if protocol.json_status() {
            self.to_json()
        } else {
            self.to_text().map(String::into_bytes).unwrap_or_default()
        }
    }
}

/// Transport-neutral streams of one session.
pub(crate) struct Channels {
    pub stdin: Option<BoxRead>,
    pub stdout: Option<BoxWrite>,
    pub stderr: Option<BoxWrite>,
    pub resize: Option<BoxRead>,
}

/// Decodes the resize stream (a sequence of JSON values) into `tx`. Stops on malformed input.
async fn decode_resizes(mut rd: BoxRead, tx: mpsc::Sender<TerminalSize>) {
    let mut buf: Vec<u8> = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut consumed = 0;
        let mut values = serde_json::Deserializer::from_slice(&buf).into_iter::<TerminalSize>();
        loop {
            match values.next() {
                Some(Ok(size)) => {
                    consumed = values.byte_offset();
                    // A runtime that does not keep up loses intermediate sizes rather than stalling the session.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(size) {
                        return;
                    }
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "malformed resize message");
                    return;
                }
                None => {
                    consumed = buf.len();
                    break;
                }
            }
        }
        buf.drain(..consumed);
        if buf.len() > MAX_RESIZE_MESSAGE {
            tracing::debug!("oversized resize message");
            return;
        }
    }
}

/// Runs the command with the given channels and returns its outcome. The runtime future is dropped (cancelling
/// the command or detaching) if `gone` resolves first, i.e. when the client connection is lost.
pub(crate) async fn run(
    runtime: &Arc<dyn StreamingRuntime>,
    cmd: Command,
    ch: Channels,
    gone: impl Future<Output = ()>,
) -> Outcome {
    let flags = cmd.flags();
    let resize = match ch.resize {
        Some(rd) if flags.tty => {
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(decode_resizes(rd, tx));
            Some(rx)
        }
        _ => None,
    };
    let io = StreamIo {
        stdin: ch.stdin,
        stdout: ch.stdout,
        stderr: ch.stderr,
        resize,
    };
    let fut = async {
        match cmd {
            Command::Exec(req) => match runtime.exec(req, io).await {
                Ok(0) => Outcome::Success,
                Ok(code) => Outcome::ExitCode(code),
                Err(e) => Outcome::Error(format!("error executing command in container: {e}")),
            },
            Command::Attach(req) => match runtime.attach(req, io).await {
                Ok(()) => Outcome::Success,
                Err(e) => Outcome::Error(format!("error attaching to container: {e}")),
            },
        }
    };
    tokio::select! {
        outcome = fut => outcome,
        _ = gone => Outcome::Error("client connection lost".into()),
    }
}

/// Serves exec/attach on an upgraded SPDY session.
pub(crate) async fn serve_spdy(
    mut session: Session,
    runtime: Arc<dyn StreamingRuntime>,
    cmd: Command,
    protocol: Protocol,
    creation_timeout: Duration,
) {
    let flags = cmd.flags();
    let mut wanted = vec!["error"];
    if flags.stdin {
        wanted.push("stdin");
    }
    if flags.stdout {
        wanted.push("stdout");
    }
    if flags.stderr && !flags.tty {
        wanted.push("stderr");
    }
    if flags.tty && protocol.supports_resize() {
        wanted.push("resize");
    }
    let mut streams: HashMap<&'static str, SpdyStream> = HashMap::new();
    let deadline = Instant::now() + creation_timeout;
    while !wanted.iter().all(|w| streams.contains_key(w)) {
        let incoming = match tokio::time::timeout_at(deadline, session.accept()).await {
            Ok(Some(incoming)) => incoming,
            Ok(None) => {
                tracing::debug!("client closed the session before creating all streams");
                session.close().await;
                return;
            }
            Err(_) => {
                tracing::warn!(?wanted, "timed out waiting for client to create streams");
                session.close().await;
                return;
            }
        };
        let kind = match incoming.headers.get(STREAM_TYPE_HEADER).unwrap_or_default() {
            "error" => "error",
            "stdin" => "stdin",
            "stdout" => "stdout",
            "stderr" => "stderr",
            "resize" => "resize",
            other => {
                tracing::debug!(stream_type = other, "rejecting unknown stream type");
                incoming.stream.reset(rst::PROTOCOL_ERROR);
                continue;
            }
        };
        if streams.contains_key(kind) {
            incoming.stream.reset(rst::PROTOCOL_ERROR);
            continue;
        }
        streams.insert(kind, incoming.stream);
    }

    // Directions we do not use stay open until the end: the client treats a closed stdin as the end of input.
    let mut keep: Vec<SendHalf> = Vec::new();
    let mut input = |name: &str, keep: &mut Vec<SendHalf>| -> Option<BoxRead> {
        let (rd, wr) = streams.remove(name)?.into_split();
        keep.push(wr);
        Some(Box::new(rd) as BoxRead)
    };
    let stdin = if flags.stdin { input("stdin", &mut keep) } else { None };
    let resize = input("resize", &mut keep);
    let mut output = |name: &str, used: bool, keep: &mut Vec<SendHalf>| -> Option<BoxWrite> {
        let (_rd, wr) = streams.remove(name)?.into_split();
        if used {
            Some(Box::new(wr) as BoxWrite)
        } else {
            keep.push(wr);
            None
        }
    };
    let stdout = output("stdout", flags.stdout, &mut keep);
    let stderr = output("stderr", flags.stderr && !flags.tty, &mut keep);
    let Some((_error_rd, mut error_wr)) = streams.remove("error").map(SpdyStream::into_split) else {
        session.close().await;
        return;
    };
    // Unrequested streams the client opened anyway (e.g. stdin without the flag).
    for (_, s) in streams.drain() {
        keep.push(s.into_split().1);
    }

    let handle = session.handle();
    let gone = async move { handle.closed().await };
    let channels = Channels {
        stdin,
        stdout,
        stderr,
        resize,
    };
    let outcome = run(&runtime, cmd, channels, gone).await;
    let status = outcome.encode(protocol);
    if !status.is_empty() {
        let _ = error_wr.write_all(&status).await;
    }
    let _ = error_wr.shutdown().await;
    drop(keep);
    session.close().await;
}

/// A negotiated remotecommand WebSocket subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsProtocol {
    pub name: &'static str,
    pub version: Protocol,
    pub encoding: Encoding,
}

/// Remotecommand WebSocket subprotocols, most preferred first. The unversioned ones use v1 semantics.
pub const WS_PROTOCOLS: [WsProtocol; 6] = [
    WsProtocol {
        name: "v5.channel.k8s.io",
        version: Protocol::V5,
        encoding: Encoding::Binary,
    },
    WsProtocol {
        name: "v5.base64.channel.k8s.io",
        version: Protocol::V5,
        encoding: Encoding::Base64,
    },
    WsProtocol {
        name: "v4.channel.k8s.io",
        version: Protocol::V4,
        encoding: Encoding::Binary,
    },
    WsProtocol {
        name: "v4.base64.channel.k8s.io",
        version: Protocol::V4,
        encoding: Encoding::Base64,
    },
    WsProtocol {
        name: "channel.k8s.io",
        version: Protocol::V1,
        encoding: Encoding::Binary,
    },
    WsProtocol {
        name: "base64.channel.k8s.io",
        version: Protocol::V1,
        encoding: Encoding::Base64,
    },
];

/// Serves exec/attach over WebSocket channels.
pub(crate) async fn serve_websocket(
    mut mux: ChannelMux,
    runtime: Arc<dyn StreamingRuntime>,
    cmd: Command,
    protocol: WsProtocol,
) {
    let flags = cmd.flags();
    let stdin = flags.stdin.then(|| mux.input(channel::STDIN));
    let resize = flags.tty.then(|| mux.input(channel::RESIZE));
    mux.start_reading(protocol.version == Protocol::V5);
    // Tell the client the connection is established: an empty message on the lowest writable channel.
    let first = if flags.stdout {
        channel::STDOUT
    } else if flags.stderr && !flags.tty {
        channel::STDERR
    } else {
        channel::ERROR
    };
    mux.send(first, &[]).await;
    let stdout = flags.stdout.then(|| mux.output(channel::STDOUT));
    let stderr = (flags.stderr && !flags.tty).then(|| mux.output(channel::STDERR));
    let channels = Channels {
        stdin,
        stdout,
        stderr,
        resize,
    };
    let gone = mux.gone();
    let outcome = run(&runtime, cmd, channels, async move { gone.cancelled().await }).await;
    mux.flush_outputs().await;
    let status = outcome.encode(protocol.version);
    if !status.is_empty() {
        mux.send(channel::ERROR, &status).await;
    }
    mux.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_highest_common_version() {
        assert_eq!(
            Protocol::negotiate(["v4.channel.k8s.io", "v5.channel.k8s.io", "v2.channel.k8s.io"]),
            Ok(Some(Protocol::V5))
        );
        assert_eq!(
            Protocol::negotiate(["v3.channel.k8s.io, channel.k8s.io"]),
            Ok(Some(Protocol::V3))
        );
        assert_eq!(Protocol::negotiate(["channel.k8s.io"]), Ok(Some(Protocol::V1)));
        assert_eq!(Protocol::negotiate([]), Ok(None));
        assert_eq!(Protocol::negotiate(["v9.channel.k8s.io"]), Err(NoCommonProtocol));
    }

    #[test]
    fn status_json_matches_metav1() {
        assert_eq!(Outcome::Success.to_json(), br#"{"metadata":{},"status":"Success"}"#);
        let v: serde_json::Value = serde_json::from_slice(&Outcome::ExitCode(3).to_json()).unwrap();
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .starts_with("command terminated with non-zero exit code")
        );
        let v: serde_json::Value = serde_json::from_slice(&Outcome::ExitCode(-9).to_json()).unwrap();
        assert_eq!(v["details"]["causes"][0]["message"], "247");
        let v: serde_json::Value = serde_json::from_slice(&Outcome::Error("boom".into()).to_json()).unwrap();
        assert_eq!(v["reason"], "InternalError");
        assert_eq!(v["code"], 500);
        assert_eq!(Outcome::Success.to_text(), None);
        assert!(Outcome::ExitCode(2).to_text().unwrap().contains("exit status 2"));
    }

    #[tokio::test]
    async fn resize_stream_is_decoded_across_chunks() {
        let (mut w, r) = tokio::io::duplex(64);
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(decode_resizes(Box::new(r), tx));
        w.write_all(br#"{"Width":80,"Height":24}"#).await.unwrap();
        w.write_all(b"\n{\"Width\":1").await.unwrap();
        assert_eq!(rx.recv().await, Some(TerminalSize { width: 80, height: 24 }));
        w.write_all(b"20,\"Height\":40}\n").await.unwrap();
        assert_eq!(rx.recv().await, Some(TerminalSize { width: 120, height: 40 }));
        w.write_all(b"garbage").await.unwrap();
        task.await.unwrap();
        assert_eq!(rx.recv().await, None);
    }
}
