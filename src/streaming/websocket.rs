//! WebSocket plumbing: the RFC 6455 upgrade, the Kubernetes channel framing, and SPDY-over-WebSocket tunnelling.
//!
//! Channel framing: every data message starts with a channel byte. Binary protocols carry raw bytes; `base64.*`
//! protocols use text messages whose first character is the ASCII digit of the channel and whose rest is base64.
//! v5 protocols add the close signal: a binary message `[255, channel]` half-closes the client's input channel.

use std::collections::HashMap;

use std::pin::Pin;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use super::{BoxRead, BoxWrite};

/// Largest WebSocket message or frame accepted from a client.
pub const MAX_MESSAGE: usize = 1 << 20;
const PIPE_CAPACITY: usize = 64 * 1024;
const CHUNK: usize = 32 * 1024;
const LINGER: Duration = Duration::from_secs(5);

/// Payload encoding of a channel protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Binary,
    Base64,
}

fn has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// True for an RFC 6455 upgrade request.
pub fn is_websocket_request(headers: &HeaderMap) -> bool {
    has_token(headers, UPGRADE, "websocket") && has_token(headers, CONNECTION, "upgrade")
}

/// The subprotocols offered in `Sec-WebSocket-Protocol`, in client order.
pub fn offered_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Builds the `101 Switching Protocols` answer, or explains why the request is not a valid handshake.
pub fn handshake_response(headers: &HeaderMap, protocol: Option<&str>) -> Result<Response<Full<Bytes>>, &'static str> {
    if headers.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err("unsupported Sec-WebSocket-Version");
    }
    let key = headers.get(SEC_WEBSOCKET_KEY).ok_or("missing Sec-WebSocket-Key")?;
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, "websocket")
        .header(SEC_WEBSOCKET_ACCEPT, derive_accept_key(key.as_bytes()));
    if let Some(p) = protocol {
        resp = resp.header(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(p).map_err(|_| "bad protocol")?,
        );
    }
    resp.body(Full::default()).map_err(|_| "cannot build response")
}

/// Wraps an upgraded connection as a server-side WebSocket with bounded message sizes.
pub async fn server_socket<S: AsyncRead + AsyncWrite + Unpin>(io: S) -> WebSocketStream<S> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await
}

fn normal_close() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
}

fn encode(ch: u8, data: &[u8], encoding: Encoding) -> Message {
    match encoding {
        Encoding::Binary => {
            let mut v = Vec::with_capacity(1 + data.len());
            v.push(ch);
            v.extend_from_slice(data);
            Message::Binary(v.into())
        }
        Encoding::Base64 => {
            Message::Text(format!("{}{}", char::from(b'0'.wrapping_add(ch)), STANDARD.encode(data)).into())
        }
    }
}

type WsRead = Pin<Box<dyn Stream<Item = Result<Message, tungstenite::Error>> + Send + Sync>>;

/// Multiplexes numbered channels over one WebSocket: input channels become readable pipes, output channels
/// writable pipes pumped into messages. A single writer task owns the sink, so messages keep their order.
pub struct ChannelMux {
    tx: Option<mpsc::Sender<Message>>,
    encoding: Encoding,
    reader: Option<WsRead>,
    inputs: HashMap<u8, DuplexStream>,
    reader_task: Option<JoinHandle<()>>,
    writer_task: JoinHandle<()>,
    pumps: Vec<JoinHandle<()>>,
    gone: CancellationToken,
}

impl ChannelMux {
    /// Takes over a WebSocket; call [`input`](Self::input) for each input channel, then
    /// [`start_reading`](Self::start_reading).
    pub fn new<S>(ws: WebSocketStream<S>, encoding: Encoding) -> Self
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sink, stream) = ws.split();
        let (tx, mut rx) = mpsc::channel::<Message>(16);
        let gone = CancellationToken::new();
        let writer_gone = gone.clone();
        let writer_task = tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                if sink.send(msg).await.is_err() {
                    writer_gone.cancel();
                    return;
                }
            }
            let _ = sink.send(normal_close()).await;
            let _ = sink.flush().await;
        });
        ChannelMux {
            tx: Some(tx),
            encoding,
            reader: Some(Box::pin(stream)),
            inputs: HashMap::new(),
            reader_task: None,
            writer_task,
            pumps: Vec::new(),
            gone,
        }
    }

    /// Registers an input channel and returns its readable end (EOF when the client closes it or goes away).
    pub fn input(&mut self, ch: u8) -> BoxRead {
        Box::new(self.input_pipe(ch))
    }

    /// Registers an input channel and returns the application end of its pipe.
    pub(crate) fn input_pipe(&mut self, ch: u8) -> DuplexStream {
        let (app, pipe) = tokio::io::duplex(PIPE_CAPACITY);
        self.inputs.insert(ch, pipe);
        app
    }

    /// Starts dispatching client messages to the input channels.
    pub fn start_reading(&mut self, close_signals: bool) {
        let Some(reader) = self.reader.take() else { return };
        let inputs = std::mem::take(&mut self.inputs);
        let task = read_loop(reader, inputs, self.encoding, close_signals, self.gone.clone());
        self.reader_task = Some(tokio::spawn(task));
    }

    /// Sends one message on a channel.
    pub async fn send(&self, ch: u8, data: &[u8]) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(encode(ch, data, self.encoding)).await;
        }
    }

    /// Creates an output channel; everything written to it is sent as messages on `ch`.
    pub fn output(&mut self, ch: u8) -> BoxWrite {
        Box::new(self.output_pipe(ch))
    }

    pub(crate) fn output_pipe(&mut self, ch: u8) -> DuplexStream {
        let (app, mut pipe) = tokio::io::duplex(PIPE_CAPACITY);
        if let Some(tx) = self.tx.clone() {
            let encoding = self.encoding;
            self.pumps.push(tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let n = match pipe.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if tx.send(encode(ch, &buf[..n], encoding)).await.is_err() {
                        break;
                    }
                }
            }));
        }
        app
    }

    /// Cancelled once the client closed the connection or it failed.
    pub fn gone(&self) -> CancellationToken {
        self.gone.clone()
    }

    /// Waits until every output channel's writer is gone and its data has been queued; gives up (dropping
    /// pending output) once the client is gone.
    pub async fn flush_outputs(&mut self) {
        let gone = self.gone.clone();
        for mut p in self.pumps.drain(..) {
            tokio::select! {
                _ = &mut p => {}
                _ = gone.cancelled() => p.abort(),
            }
        }
    }

    /// Sends a normal close after all queued messages and waits (bounded) for the client to close too.
    pub async fn close(mut self) {
        self.flush_outputs().await;
        self.tx = None;
        let _ = tokio::time::timeout(LINGER, &mut self.writer_task).await;
        self.writer_task.abort();
        if let Some(mut reader) = self.reader_task.take() {
            if tokio::time::timeout(LINGER, &mut reader).await.is_err() {
                reader.abort();
            }
        } else if let Some(mut stream) = self.reader.take() {
            // Reading was never started: drain until the close handshake completes.
            let _ = tokio::time::timeout(LINGER, async { while let Some(Ok(_)) = stream.next().await {} }).await;
        }
    }
}

async fn read_loop(
    mut rd: WsRead,
    mut inputs: HashMap<u8, DuplexStream>,
    encoding: Encoding,
    close_signals: bool,
    gone: CancellationToken,
) {
    while let Some(Ok(msg)) = rd.next().await {
        let (ch, payload): (u8, Bytes) = match msg {
            Message::Binary(b) if !b.is_empty() => {
                if close_signals && b[0] == super::remotecommand::channel::CLOSE {
                    if b.len() != 2 {
                        tracing::debug!("malformed close signal");
                        break;
                    }
                    inputs.remove(&b[1]);
                    continue;
                }
                if encoding != Encoding::Binary {
                    continue;
                }
                (b[0], b.slice(1..))
            }
            Message::Text(t) if encoding == Encoding::Base64 && !t.is_empty() => {
                let raw = t.as_bytes();
                match STANDARD.decode(&raw[1..]) {
                    Ok(data) => (raw[0].wrapping_sub(b'0'), Bytes::from(data)),
                    Err(_) => {
                        tracing::debug!("malformed base64 message");
                        break;
                    }
                }
            }
            Message::Close(_) => break,
            _ => continue,
        };
        if payload.is_empty() {
            continue;
        }
        if let Some(w) = inputs.get_mut(&ch)
            && w.write_all(&payload).await.is_err()
        {
            inputs.remove(&ch);
        }
    }
    gone.cancel();
}

/// Turns a WebSocket carrying a raw byte stream in binary messages (SPDY tunnelling) into an `AsyncRead` +
/// `AsyncWrite`. Shutting down the returned stream's write side sends a normal close.
pub fn tunnel<S>(ws: WebSocketStream<S>) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (local, remote) = tokio::io::duplex(PIPE_CAPACITY);
    let (mut remote_rd, mut remote_wr) = tokio::io::split(remote);
    let (mut sink, mut stream) = ws.split();
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match remote_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink
                        .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = sink.send(normal_close()).await;
        let _ = sink.flush().await;
    });
    tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            let data = match msg {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                Message::Text(_) => {
                    tracing::debug!("text message in a SPDY tunnel");
                    break;
                }
                _ => continue,
            };
            if remote_wr.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = remote_wr.shutdown().await;
    });
    local
}
