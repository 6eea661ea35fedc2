//! Port forwarding (`portforward.k8s.io`).
//!
//! SPDY (also when tunnelled through WebSocket as `SPDY/3.1+portforward.k8s.io`): for every forwarded connection
//! the client opens an `error` stream and then a `data` stream, both with headers `port` and `requestID`. The
//! server connects to the port, pipes the data stream both ways and writes connection failures as text to the
//! error stream; any number of ports and concurrent request ids share one session.
//!
//! WebSocket channels (`v4.channel.k8s.io`, `v4.base64.channel.k8s.io`, none): the ports come from the `port`
//! query parameter (repeated or comma-separated); port *i* uses channel 2i for data and 2i+1 for errors, and the
//! first message the server sends on each of them is the port as 2 bytes little-endian. One connection per port.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::spdy::frame::rst;
use super::spdy::{Headers, Session, SpdyStream};
use super::websocket::{ChannelMux, Encoding};
use super::{PortForwardRequest, StreamingRuntime, forward_connection};

/// SPDY protocol name, also accepted as a WebSocket subprotocol meaning binary channels.
pub const PROTOCOL: &str = "portforward.k8s.io";
/// WebSocket subprotocol for SPDY tunnelled over WebSocket.
pub const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
/// Stream header with the target port.
pub const PORT_HEADER: &str = "port";
/// Stream header pairing the error and data streams of one connection.
pub const REQUEST_ID_HEADER: &str = "requestid";
/// Most ports one WebSocket session may forward (two channels each).
pub const MAX_WS_PORTS: usize = 64;
const MAX_PENDING_PAIRS: usize = 1024;

/// How a port-forward WebSocket is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsMode {
    /// SPDY bytes in binary messages.
    Tunnel,
    /// Data/error channel pairs per port.
    Channels(Encoding),
}

/// Port-forward WebSocket subprotocols, most preferred first.
pub const WS_PROTOCOLS: [(&str, WsMode); 4] = [
    (TUNNEL_PROTOCOL, WsMode::Tunnel),
    ("v4.channel.k8s.io", WsMode::Channels(Encoding::Binary)),
    ("v4.base64.channel.k8s.io", WsMode::Channels(Encoding::Base64)),
    (PROTOCOL, WsMode::Channels(Encoding::Binary)),
];

/// Whether the registered request allows forwarding to `port` (an empty port list allows any).
pub(crate) fn port_allowed(req: &PortForwardRequest, port: u16) -> bool {
    req.ports.is_empty() || req.ports.contains(&i32::from(port))
}

/// Parses a port header or query value: 1..=65535.
pub(crate) fn parse_port(s: &str) -> Option<u16> {
    s.trim().parse::<u16>().ok().filter(|p| *p > 0)
}

#[derive(Default)]
struct Pair {
    error: Option<SpdyStream>,
    data: Option<(SpdyStream, Headers)>,
    since: Option<Instant>,
}

/// Serves port forwarding on a SPDY session until the client goes away.
pub(crate) async fn serve_spdy(
    mut session: Session,
    runtime: Arc<dyn StreamingRuntime>,
    req: PortForwardRequest,
    creation_timeout: Duration,
) {
    let req = Arc::new(req);
    let mut pending: HashMap<String, Pair> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            incoming = session.accept() => {
                let Some(incoming) = incoming else { break };
                let headers = incoming.headers;
                let stream = incoming.stream;
                let is_error = match headers.get(super::remotecommand::STREAM_TYPE_HEADER) {
                    Some("error") => true,
                    Some("data") => false,
                    other => {
                        tracing::debug!(stream_type = ?other, "rejecting port-forward stream");
                        stream.reset(rst::PROTOCOL_ERROR);
                        continue;
                    }
                };
                // Old clients send no request id; their streams come in consecutive (error, data) id pairs.
                let request_id = match headers.get(REQUEST_ID_HEADER) {
                    Some(id) => id.to_string(),
                    None if is_error => stream.id().to_string(),
                    None => stream.id().saturating_sub(2).to_string(),
                };
                if !pending.contains_key(&request_id) && pending.len() >= MAX_PENDING_PAIRS {
                    stream.reset(rst::REFUSED_STREAM);
                    continue;
                }
                let pair = pending.entry(request_id.clone()).or_default();
                pair.since.get_or_insert_with(Instant::now);
                let duplicate = if is_error { pair.error.is_some() } else { pair.data.is_some() };
                if duplicate {
                    stream.reset(rst::PROTOCOL_ERROR);
                    continue;
                }
                if is_error {
                    pair.error = Some(stream);
                } else {
                    pair.data = Some((stream, headers));
                }
                if pair.error.is_some() && pair.data.is_some()
                    && let Some(Pair { error: Some(error), data: Some((data, headers)), .. }) = pending.remove(&request_id)
                {
                    tasks.spawn(forward_pair(runtime.clone(), req.clone(), error, data, headers));
                }
            }
            _ = sweep.tick() => {
                let now = Instant::now();
                let expired: Vec<String> = pending
                    .iter()
                    .filter(|(_, p)| p.since.is_some_and(|t| now - t > creation_timeout))
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in expired {
                    if let Some(pair) = pending.remove(&id) {
                        tracing::debug!(request_id = %id, "timed out waiting for port-forward streams");
                        if let Some(error) = pair.error {
                            let (_, mut w) = error.into_split();
                            let _ = w.write_all(format!("timed out waiting for streams of request {id}").as_bytes()).await;
                        }
                        if let Some((data, _)) = pair.data {
                            data.reset(rst::CANCEL);
                        }
                    }
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    drop(pending);
    while tasks.join_next().await.is_some() {}
    session.close().await;
}

async fn forward_pair(
    runtime: Arc<dyn StreamingRuntime>,
    req: Arc<PortForwardRequest>,
    error: SpdyStream,
    data: SpdyStream,
    headers: Headers,
) {
    let (_error_rd, mut error_wr) = error.into_split();
    let (data_rd, mut data_wr) = data.into_split();
    let sandbox = &req.pod_sandbox_id;
    let failure = match headers.get(PORT_HEADER).and_then(parse_port) {
        None => Some(format!(
            "invalid port {:?}",
            headers.get(PORT_HEADER).unwrap_or_default()
        )),
        Some(port) if !port_allowed(&req, port) => Some(format!(
            "error forwarding port {port} to pod {sandbox}: port is not allowed"
        )),
        Some(port) => match runtime.port_forward(sandbox, port).await {
            Err(e) => Some(format!("error forwarding port {port} to pod {sandbox}: {e}")),
            Ok(conn) => {
                // I/O errors after the connection was made are only logged: an error message makes client-go
                // tear down the whole session, including other forwarded connections.
                if let Err(e) = forward_connection(data_rd, &mut data_wr, conn).await {
                    tracing::debug!(port, error = %e, "port-forward connection ended with an error");
                }
                None
            }
        },
    };
    if let Some(msg) = failure {
        tracing::debug!(%msg, "port forward failed");
        let _ = error_wr.write_all(msg.as_bytes()).await;
    }
    let _ = data_wr.shutdown().await;
    let _ = error_wr.shutdown().await;
}

/// Serves port forwarding over WebSocket data/error channel pairs, one connection per port.
pub(crate) async fn serve_websocket(
    mut mux: ChannelMux,
    runtime: Arc<dyn StreamingRuntime>,
    req: PortForwardRequest,
    ports: Vec<u16>,
) {
    let inputs: Vec<_> = (0..ports.len()).map(|i| mux.input_pipe((2 * i) as u8)).collect();
    mux.start_reading(false);
    for (i, port) in ports.iter().enumerate() {
        mux.send((2 * i) as u8, &port.to_le_bytes()).await;
        mux.send((2 * i + 1) as u8, &port.to_le_bytes()).await;
    }
    let mut tasks = JoinSet::new();
    for (i, (port, input)) in ports.iter().copied().zip(inputs).enumerate() {
        let mut data_out = mux.output_pipe((2 * i) as u8);
        let mut error_out = mux.output_pipe((2 * i + 1) as u8);
        let runtime = runtime.clone();
        let sandbox = req.pod_sandbox_id.clone();
        tasks.spawn(async move {
            match runtime.port_forward(&sandbox, port).await {
                Err(e) => {
                    let msg = format!("error forwarding port {port} to pod {sandbox}: {e}");
                    let _ = error_out.write_all(msg.as_bytes()).await;
                }
                Ok(conn) => {
                    let (input_rd, _input_wr) = tokio::io::split(input);
                    if let Err(e) = forward_connection(input_rd, &mut data_out, conn).await {
                        tracing::debug!(port, error = %e, "port-forward connection ended with an error");
                    }
                }
            }
        });
    }
    let gone = mux.gone();
    tokio::select! {
        _ = async { while tasks.join_next().await.is_some() {} } => {}
        _ = gone.cancelled() => tasks.abort_all(),
    }
    mux.close().await;
}
