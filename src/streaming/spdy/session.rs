//! A SPDY/3.1 session: multiplexed streams over one connection.
//!
//! One task reads and dispatches frames, another writes them from a single FIFO queue (so a stream's FIN or the
//! session's GOAWAY never overtakes data queued before it). Streams are exposed as [`SpdyStream`]s implementing
//! `AsyncRead` + `AsyncWrite`, splittable into [`RecvHalf`] / [`SendHalf`].
//!
//! Flow control: every stream starts with a 64 KiB window in each direction (SETTINGS_INITIAL_WINDOW_SIZE from the
//! peer changes ours, also for open streams); we send WINDOW_UPDATE as the application consumes data, per stream
//! and for the session (stream 0, SPDY/3.1). moby/spdystream — the SPDY stack of client-go and thus of kubectl,
//! crictl and the kubelet — implements no flow control at all: it never sends WINDOW_UPDATE and ignores ours.
//! Hence [`PeerWindow::Adaptive`] (the default) only blocks on the peer's window once the peer has shown that it
//! does flow control (sent a WINDOW_UPDATE or an INITIAL_WINDOW_SIZE setting). For incoming data, a peer that
//! overruns its window is not reset; instead each stream buffers at most [`SessionConfig::recv_buffer`] bytes and
//! the session stops reading the connection until the application catches up (bounded memory, TCP backpressure).

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::frame::{Decoder, Encoder, Frame, Headers, Setting, StreamId, goaway, rst, settings};

/// Default per-stream window (both directions), fixed by the SPDY/3 spec.
pub const DEFAULT_WINDOW: u32 = 64 * 1024;
/// Largest DATA payload we send in one frame.
pub const MAX_DATA_CHUNK: usize = 16 * 1024;
const MAX_WINDOW: i64 = 0x7fff_ffff;
/// Frames queued for writing beyond which a peer that keeps sending but does not read is disconnected.
const MAX_QUEUED_FRAMES: usize = 16 * 1024;

/// Which side of the connection this session is; decides stream-id and ping-id parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts odd (client-initiated) streams.
    Server,
    /// Opens odd streams.
    Client,
}

/// When to honour the peer's flow-control window for data we send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerWindow {
    /// Always stop sending when the peer's window is exhausted.
    Enforce,
    /// Enforce once the peer has sent WINDOW_UPDATE or SETTINGS_INITIAL_WINDOW_SIZE (see module docs).
    Adaptive,
}

/// Session tuning.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Receive window we grant per stream; announced with SETTINGS when not the 64 KiB default.
    pub initial_window: u32,
    /// Peer-initiated streams open at once; more are refused with RST_STREAM(REFUSED_STREAM).
    pub max_streams: usize,
    /// Bytes buffered per stream before the session stops reading the connection.
    pub recv_buffer: usize,
    /// Data bytes queued for writing before stream writers wait.
    pub send_queue: usize,
    /// Flow-control policy for sending.
    pub peer_window: PeerWindow,
    /// Largest accepted frame payload.
    pub max_frame_len: usize,
    /// After [`SessionHandle::close`], how long to keep reading (and discarding) until the peer closes.
    pub linger: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            initial_window: DEFAULT_WINDOW,
            max_streams: 1000,
            recv_buffer: 256 * 1024,
            send_queue: 512 * 1024,
            peer_window: PeerWindow::Adaptive,
            max_frame_len: super::frame::DEFAULT_MAX_FRAME_LEN,
            linger: Duration::from_secs(5),
        }
    }
}

/// A stream opened by the peer: its SYN_STREAM headers and the stream itself (already answered with SYN_REPLY).
#[derive(Debug)]
pub struct IncomingStream {
    pub headers: Headers,
    pub stream: SpdyStream,
}

enum Outgoing {
    Frame(Frame),
    /// Write everything queued before, then GOAWAY, then shut the write side down and report back.
    Close(u32, Option<oneshot::Sender<()>>),
}

#[derive(Default)]
struct StreamState {
    recv_buf: VecDeque<Bytes>,
    recv_buffered: usize,
    recv_fin: bool,
    recv_waker: Option<Waker>,
    /// Consumed bytes not yet returned to the peer with WINDOW_UPDATE.
    recv_unacked: u32,
    /// What the peer may still send on this stream according to the windows we granted.
    recv_window: i64,
    send_window: i64,
    send_fin: bool,
    send_waker: Option<Waker>,
    reset: bool,
    has_recv_handle: bool,
    has_send_handle: bool,
}

impl StreamState {
    fn wake(&mut self) {
        if let Some(w) = self.recv_waker.take() {
            w.wake();
        }
        if let Some(w) = self.send_waker.take() {
            w.wake();
        }
    }

    fn finished(&self) -> bool {
        !self.has_recv_handle && !self.has_send_handle && (self.reset || (self.recv_fin && self.send_fin))
    }
}

struct State {
    streams: HashMap<StreamId, StreamState>,
    peer_initial_window: i64,
    session_send_window: i64,
    session_recv_unacked: u32,
    session_recv_window: i64,
    /// DATA frames that exceeded a window we granted (the peer ignores flow control).
    window_violations: u64,
    enforce_window: bool,
    queued_bytes: usize,
    send_waiters: Vec<Waker>,
    reader_waker: Option<Waker>,
    last_peer_stream: StreamId,
    next_local_stream: StreamId,
    closed: bool,
    goaway_sent: bool,
    peer_goaway: bool,
}

struct Shared {
    state: Mutex<State>,
    out: mpsc::UnboundedSender<Outgoing>,
    queued_frames: AtomicUsize,
    config: SessionConfig,
    role: Role,
    abort: CancellationToken,
    done: CancellationToken,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, frame: Frame) {
        self.queued_frames.fetch_add(1, Ordering::Relaxed);
        let _ = self.out.send(Outgoing::Frame(frame));
    }

    /// Marks the connection as gone and wakes everybody waiting on it.
    fn shut(&self) {
        let mut st = self.lock();
        st.closed = true;
        for s in st.streams.values_mut() {
            s.wake();
        }
        for w in st.send_waiters.drain(..) {
            w.wake();
        }
        if let Some(w) = st.reader_waker.take() {
            w.wake();
        }
    }

    fn is_peer_stream(&self, id: StreamId) -> bool {
        (id % 2 == 1) == (self.role == Role::Server)
    }

    /// Queues WINDOW_UPDATEs for `n` consumed bytes of stream `id` when enough has accumulated.
    fn ack(&self, st: &mut State, id: StreamId, n: usize) {
        let half = (self.config.initial_window / 2).max(1);
        let n = n as u32;
        if let Some(s) = st.streams.get_mut(&id) {
            s.recv_unacked = s.recv_unacked.saturating_add(n);
            if s.recv_unacked >= half && !s.recv_fin && !s.reset {
                let delta = std::mem::take(&mut s.recv_unacked);
                s.recv_window += i64::from(delta);
                self.send(Frame::WindowUpdate { stream_id: id, delta });
            }
        }
        st.session_recv_unacked = st.session_recv_unacked.saturating_add(n);
        if st.session_recv_unacked >= DEFAULT_WINDOW / 2 {
            let delta = std::mem::take(&mut st.session_recv_unacked);
            st.session_recv_window += i64::from(delta);
            self.send(Frame::WindowUpdate { stream_id: 0, delta });
        }
    }

    fn remove_if_finished(st: &mut State, id: StreamId) {
        if st.streams.get(&id).is_some_and(StreamState::finished) {
            st.streams.remove(&id);
        }
    }
}

/// The accepting end of a session plus a [`SessionHandle`].
pub struct Session {
    handle: SessionHandle,
    incoming: mpsc::Receiver<IncomingStream>,
}

/// Cloneable control handle of a session.
#[derive(Clone)]
pub struct SessionHandle {
    shared: Arc<Shared>,
}

impl Session {
    /// Starts a session over `io`, spawning its reader and writer tasks on the current tokio runtime.
    pub fn new<T>(io: T, role: Role, config: SessionConfig) -> Session
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (in_tx, in_rx) = mpsc::channel(64);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                streams: HashMap::new(),
                peer_initial_window: i64::from(DEFAULT_WINDOW),
                session_send_window: i64::from(DEFAULT_WINDOW),
                session_recv_unacked: 0,
                session_recv_window: i64::from(DEFAULT_WINDOW),
                window_violations: 0,
                enforce_window: config.peer_window == PeerWindow::Enforce,
                queued_bytes: 0,
                send_waiters: Vec::new(),
                reader_waker: None,
                last_peer_stream: 0,
                next_local_stream: if role == Role::Client { 1 } else { 2 },
                closed: false,
                goaway_sent: false,
                peer_goaway: false,
            }),
            out: out_tx,
            queued_frames: AtomicUsize::new(0),
            config,
            role,
            abort: CancellationToken::new(),
            done: CancellationToken::new(),
        });
        if shared.config.initial_window != DEFAULT_WINDOW {
            shared.send(Frame::Settings {
                clear: false,
                entries: vec![Setting {
                    flags: 0,
                    id: settings::INITIAL_WINDOW_SIZE,
                    value: shared.config.initial_window,
                }],
            });
        }
        let writer = tokio::spawn(write_loop(shared.clone(), wr, out_rx));
        let reader_shared = shared.clone();
        tokio::spawn(async move {
            let abort = reader_shared.abort.clone();
            tokio::select! {
                res = read_loop(reader_shared.clone(), rd, in_tx) => {
                    if let Err(e) = res {
                        tracing::debug!(error = %e, "spdy session read loop ended");
                    }
                }
                _ = abort.cancelled() => {}
            }
            reader_shared.shut();
            // Make sure the writer finishes (flushing what is queued) even if nobody called close(), but do not
            // wait forever for a peer that stopped reading.
            let _ = reader_shared.out.send(Outgoing::Close(goaway::OK, None));
            let mut writer = writer;
            if tokio::time::timeout(reader_shared.config.linger, &mut writer)
                .await
                .is_err()
            {
                writer.abort();
            }
            reader_shared.done.cancel();
        });
        Session {
            handle: SessionHandle { shared },
            incoming: in_rx,
        }
    }

    /// The next stream opened by the peer; `None` once the peer sent GOAWAY or the connection ended.
    pub async fn accept(&mut self) -> Option<IncomingStream> {
        self.incoming.recv().await
    }

    /// A control handle usable from other tasks.
    pub fn handle(&self) -> SessionHandle {
        self.handle.clone()
    }
}

impl std::ops::Deref for Session {
    type Target = SessionHandle;
    fn deref(&self) -> &SessionHandle {
        &self.handle
    }
}

impl SessionHandle {
    /// Opens a stream (sends SYN_STREAM). Mostly for clients; a server may use it for pushed streams.
    pub fn open_stream(&self, headers: Headers) -> io::Result<SpdyStream> {
        let mut st = self.shared.lock();
        if st.closed || st.goaway_sent || st.peer_goaway {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "session is closing"));
        }
        let id = st.next_local_stream;
        if id > 0x7fff_fffd {
            return Err(io::Error::other("stream ids exhausted"));
        }
        st.next_local_stream += 2;
        let window = st.peer_initial_window;
        st.streams.insert(
            id,
            StreamState {
                send_window: window,
                recv_window: i64::from(self.shared.config.initial_window),
                has_recv_handle: true,
                has_send_handle: true,
                ..Default::default()
            },
        );
        self.shared.send(Frame::SynStream {
            stream_id: id,
            associated_id: 0,
            priority: 0,
            slot: 0,
            fin: false,
            unidirectional: false,
            headers,
        });
        Ok(SpdyStream::new(self.shared.clone(), id))
    }

    /// Sends a PING with the given id (odd for clients, even for servers).
    pub fn ping(&self, id: u32) {
        self.shared.send(Frame::Ping { id });
    }

    /// Starts a graceful close without waiting: GOAWAY after all queued frames, then the write side is shut down
    /// and the connection is read (and discarded) until the peer closes it or [`SessionConfig::linger`] passes.
    pub fn start_close(&self) {
        self.close_inner(goaway::OK, None);
    }

    /// Graceful close; returns once everything queued has been written and the write side is shut down.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        self.close_inner(goaway::OK, Some(tx));
        let _ = rx.await;
    }

    fn close_inner(&self, status: u32, done: Option<oneshot::Sender<()>>) {
        {
            let mut st = self.shared.lock();
            if st.goaway_sent {
                drop(st);
                if let Some(done) = done {
                    // Already closing: report once the connection is gone.
                    let finished = self.shared.done.clone();
                    tokio::spawn(async move {
                        finished.cancelled().await;
                        let _ = done.send(());
                    });
                }
                return;
            }
            st.goaway_sent = true;
        }
        let _ = self.shared.out.send(Outgoing::Close(status, done));
        let abort = self.shared.abort.clone();
        let done = self.shared.done.clone();
        let linger = self.shared.config.linger;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(linger) => abort.cancel(),
                _ = done.cancelled() => {}
            }
        });
    }

    /// Resolves once both session tasks have ended.
    pub async fn closed(&self) {
        self.shared.done.cancelled().await;
    }

    /// True once the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// Number of DATA frames the peer sent beyond the window we granted (moby/spdystream peers do this).
    pub fn window_violations(&self) -> u64 {
        self.shared.lock().window_violations
    }
}

async fn write_loop<W: AsyncWrite>(
    shared: Arc<Shared>,
    wr: tokio::io::WriteHalf<W>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut wr = wr;
    let mut enc = Encoder::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut closing: Option<(u32, Option<oneshot::Sender<()>>)> = None;
    'outer: while let Some(first) = rx.recv().await {
        let mut data_bytes = 0usize;
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Outgoing::Frame(frame) => {
                    shared.queued_frames.fetch_sub(1, Ordering::Relaxed);
                    if let Frame::Data { data, .. } = &frame {
                        data_bytes += data.len();
                    }
                    if let Err(e) = enc.encode(&frame, &mut buf) {
                        tracing::warn!(error = %e, "dropping unencodable spdy frame");
                    }
                }
                Outgoing::Close(status, done) => {
                    closing = Some((status, done));
                    break;
                }
            }
            if buf.len() < 64 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        if let Some((status, _)) = &closing {
            let last = shared.lock().last_peer_stream;
            let _ = enc.encode(
                &Frame::GoAway {
                    last_good_stream_id: last,
                    status: *status,
                },
                &mut buf,
            );
        }
        let res = async {
            wr.write_all(&buf).await?;
            wr.flush().await
        }
        .await;
        buf.clear();
        if data_bytes > 0 {
            let mut st = shared.lock();
            st.queued_bytes = st.queued_bytes.saturating_sub(data_bytes);
            for w in st.send_waiters.drain(..) {
                w.wake();
            }
        }
        if let Err(e) = res {
            tracing::debug!(error = %e, "spdy session write failed");
            break 'outer;
        }
        if closing.is_some() {
            break;
        }
    }
    let _ = wr.shutdown().await;
    shared.shut();
    if let Some((_, Some(done))) = closing {
        let _ = done.send(());
    }
    // Anyone else waiting on close() learns about it through `done`.
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Frame(#[from] super::frame::FrameError),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

async fn read_loop<R: AsyncRead>(
    shared: Arc<Shared>,
    mut rd: tokio::io::ReadHalf<R>,
    in_tx: mpsc::Sender<IncomingStream>,
) -> Result<(), SessionError> {
    let mut dec = Decoder::with_limits(shared.config.max_frame_len, super::frame::DEFAULT_MAX_HEADER_BLOCK);
    let mut buf = BytesMut::with_capacity(32 * 1024);
    let mut in_tx = Some(in_tx);
    loop {
        loop {
            let frame = match dec.decode(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    shared.close_with(goaway::PROTOCOL_ERROR);
                    return Err(e.into());
                }
            };
            if let Err(e) = handle_frame(&shared, frame, &mut in_tx).await {
                shared.close_with(goaway::PROTOCOL_ERROR);
                return Err(e);
            }
            if shared.queued_frames.load(Ordering::Relaxed) > MAX_QUEUED_FRAMES {
                return Err(SessionError::Protocol("peer does not read what it asks for"));
            }
        }
        if rd.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

impl Shared {
    fn close_with(self: &Arc<Self>, status: u32) {
        SessionHandle { shared: self.clone() }.close_inner(status, None);
    }
}

async fn handle_frame(
    shared: &Arc<Shared>,
    frame: Frame,
    in_tx: &mut Option<mpsc::Sender<IncomingStream>>,
) -> Result<(), SessionError> {
    match frame {
        Frame::SynStream {
            stream_id,
            fin,
            unidirectional,
            headers,
            ..
        } => {
            let accept = {
                let mut st = shared.lock();
                if !shared.is_peer_stream(stream_id) || stream_id <= st.last_peer_stream {
                    return Err(SessionError::Protocol("invalid or non-increasing stream id"));
                }
                st.last_peer_stream = stream_id;
                let can_accept = shared.role == Role::Server
                    && !st.goaway_sent
                    && in_tx.is_some()
                    && st.streams.len() < shared.config.max_streams;
                if can_accept {
                    let window = st.peer_initial_window;
                    st.streams.insert(
                        stream_id,
                        StreamState {
                            send_window: window,
                            recv_window: i64::from(shared.config.initial_window),
                            recv_fin: fin,
                            send_fin: unidirectional,
                            has_recv_handle: true,
                            has_send_handle: true,
                            ..Default::default()
                        },
                    );
                    shared.send(Frame::SynReply {
                        stream_id,
                        fin: false,
                        headers: Headers::new(),
                    });
                }
                can_accept
            };
            if !accept {
                shared.send(Frame::RstStream {
                    stream_id,
                    status: rst::REFUSED_STREAM,
                });
                return Ok(());
            }
            let incoming = IncomingStream {
                headers,
                stream: SpdyStream::new(shared.clone(), stream_id),
            };
            if let Some(tx) = in_tx
                && let Err(e) = tx.try_send(incoming)
            {
                // Dropping the stream handles resets it.
                let incoming = match e {
                    mpsc::error::TrySendError::Full(i) | mpsc::error::TrySendError::Closed(i) => i,
                };
                incoming.stream.reset(rst::REFUSED_STREAM);
            }
        }
        Frame::SynReply { .. } | Frame::Unknown { .. } => {}
        Frame::Headers { stream_id, fin, .. } => {
            if fin {
                let mut st = shared.lock();
                if let Some(s) = st.streams.get_mut(&stream_id) {
                    s.recv_fin = true;
                    s.wake();
                }
                Shared::remove_if_finished(&mut st, stream_id);
            }
        }
        Frame::Data { stream_id, fin, data } => {
            // Wait (bounded buffer) until the stream's reader has room; the connection is not read meanwhile.
            poll_fn(|cx| {
                let mut st = shared.lock();
                let limit = shared.config.recv_buffer;
                match st.streams.get(&stream_id) {
                    Some(s) if s.has_recv_handle && !s.reset && s.recv_buffered >= limit && !st.closed => {
                        st.reader_waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                    _ => Poll::Ready(()),
                }
            })
            .await;
            let mut st = shared.lock();
            let len = data.len();
            let Some(s) = st.streams.get_mut(&stream_id) else {
                drop(st);
                shared.send(Frame::RstStream {
                    stream_id,
                    status: rst::INVALID_STREAM,
                });
                return Ok(());
            };
            if s.recv_fin {
                drop(st);
                shared.send(Frame::RstStream {
                    stream_id,
                    status: rst::STREAM_ALREADY_CLOSED,
                });
                return Ok(());
            }
            s.recv_window -= len as i64;
            let overrun = s.recv_window < 0;
            let discard = s.reset || !s.has_recv_handle;
            if !discard && len > 0 {
                s.recv_buf.push_back(data);
                s.recv_buffered += len;
            }
            if fin {
                s.recv_fin = true;
            }
            s.wake();
            st.session_recv_window -= len as i64;
            if overrun || st.session_recv_window < 0 {
                st.window_violations += 1;
            }
            if discard && len > 0 {
                shared.ack(&mut st, stream_id, len);
            }
            Shared::remove_if_finished(&mut st, stream_id);
        }
        Frame::RstStream { stream_id, .. } => {
            let mut st = shared.lock();
            if let Some(s) = st.streams.get_mut(&stream_id) {
                s.reset = true;
                s.recv_buf.clear();
                s.recv_buffered = 0;
                s.wake();
            }
            Shared::remove_if_finished(&mut st, stream_id);
            if let Some(w) = st.reader_waker.take() {
                w.wake();
            }
        }
        Frame::Settings { entries, .. } => {
            let mut st = shared.lock();
            for e in entries {
                if e.id == settings::INITIAL_WINDOW_SIZE && i64::from(e.value) <= MAX_WINDOW {
                    let delta = i64::from(e.value) - st.peer_initial_window;
                    st.peer_initial_window = i64::from(e.value);
                    st.enforce_window = true;
                    for s in st.streams.values_mut() {
                        s.send_window = (s.send_window + delta).min(MAX_WINDOW);
                        s.wake();
                    }
                }
            }
        }
        Frame::Ping { id } => {
            // Pings with the peer's parity are answered; ours coming back need no action.
            let peer_parity = if shared.role == Role::Server { 1 } else { 0 };
            if id % 2 == peer_parity {
                shared.send(Frame::Ping { id });
            }
        }
        Frame::GoAway { .. } => {
            shared.lock().peer_goaway = true;
            *in_tx = None;
        }
        Frame::WindowUpdate { stream_id, delta } => {
            let mut st = shared.lock();
            st.enforce_window = true;
            if stream_id == 0 {
                st.session_send_window = (st.session_send_window + i64::from(delta)).min(MAX_WINDOW);
                for s in st.streams.values_mut() {
                    s.wake();
                }
            } else if let Some(s) = st.streams.get_mut(&stream_id) {
                s.send_window = (s.send_window + i64::from(delta)).min(MAX_WINDOW);
                s.wake();
            }
        }
    }
    Ok(())
}

/// A bidirectional SPDY stream.
#[derive(Debug)]
pub struct SpdyStream {
    recv: RecvHalf,
    send: SendHalf,
}

/// Reading side of a stream. Dropping it discards (and acknowledges) further incoming data.
#[derive(Debug)]
pub struct RecvHalf {
    shared: Arc<Shared>,
    id: StreamId,
}

/// Writing side of a stream. `shutdown` (or dropping it) sends FIN.
#[derive(Debug)]
pub struct SendHalf {
    shared: Arc<Shared>,
    id: StreamId,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("role", &self.role).finish()
    }
}

impl SpdyStream {
    fn new(shared: Arc<Shared>, id: StreamId) -> Self {
        SpdyStream {
            recv: RecvHalf {
                shared: shared.clone(),
                id,
            },
            send: SendHalf { shared, id },
        }
    }

    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.send.id
    }

    /// Splits into independently owned halves.
    pub fn into_split(self) -> (RecvHalf, SendHalf) {
        (self.recv, self.send)
    }

    /// Aborts the stream with RST_STREAM.
    pub fn reset(self, status: u32) {
        self.send.reset(status);
    }
}

impl RecvHalf {
    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.id
    }
}

impl SendHalf {
    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Aborts the stream (both directions) with RST_STREAM.
    pub fn reset(&self, status: u32) {
        let mut st = self.shared.lock();
        if let Some(s) = st.streams.get_mut(&self.id)
            && !s.reset
        {
            s.reset = true;
            s.recv_buf.clear();
            s.recv_buffered = 0;
            s.wake();
            self.shared.send(Frame::RstStream {
                stream_id: self.id,
                status,
            });
            if let Some(w) = st.reader_waker.take() {
                w.wake();
            }
        }
    }
}

impl AsyncRead for RecvHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let shared = self.shared.clone();
        let mut guard = shared.lock();
        let st = &mut *guard;
        let closed = st.closed;
        let limit = shared.config.recv_buffer;
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(Ok(()));
        };
        if s.reset {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "stream reset")));
        }
        if let Some(front) = s.recv_buf.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front.split_to(n));
            if front.is_empty() {
                s.recv_buf.pop_front();
            }
            let was_full = s.recv_buffered >= limit;
            s.recv_buffered -= n;
            if was_full
                && s.recv_buffered < limit
                && let Some(w) = st.reader_waker.take()
            {
                w.wake();
            }
            shared.ack(st, self.id, n);
            return Poll::Ready(Ok(()));
        }
        if s.recv_fin {
            return Poll::Ready(Ok(()));
        }
        if closed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "session closed")));
        }
        s.recv_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for RecvHalf {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let Some(s) = st.streams.get_mut(&self.id) else { return };
        s.has_recv_handle = false;
        let dropped = std::mem::take(&mut s.recv_buffered);
        s.recv_buf.clear();
        if dropped > 0 {
            self.shared.ack(&mut st, self.id, dropped);
        }
        if let Some(w) = st.reader_waker.take() {
            w.wake();
        }
        Shared::remove_if_finished(&mut st, self.id);
    }
}

impl AsyncWrite for SendHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let shared = &self.shared;
        let mut st = shared.lock();
        if st.closed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "session closed")));
        }
        if st.queued_bytes >= shared.config.send_queue {
            if !st.send_waiters.iter().any(|w| w.will_wake(cx.waker())) {
                st.send_waiters.push(cx.waker().clone());
            }
            return Poll::Pending;
        }
        let enforce = st.enforce_window;
        let session_window = st.session_send_window;
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")));
        };
        if s.reset {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "stream reset")));
        }
        if s.send_fin {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "write after shutdown")));
        }
        let mut n = buf.len().min(MAX_DATA_CHUNK);
        if enforce {
            let avail = s.send_window.min(session_window);
            if avail <= 0 {
                s.send_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            n = n.min(avail as usize);
        }
        s.send_window -= n as i64;
        st.session_send_window -= n as i64;
        st.queued_bytes += n;
        shared.send(Frame::Data {
            stream_id: self.id,
            fin: false,
            data: Bytes::copy_from_slice(&buf[..n]),
        });
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.finish();
        Poll::Ready(Ok(()))
    }
}

impl SendHalf {
    /// Sends FIN unless already sent or reset.
    fn finish(&self) {
        let mut st = self.shared.lock();
        if st.closed {
            return;
        }
        if let Some(s) = st.streams.get_mut(&self.id)
            && !s.send_fin
            && !s.reset
        {
            s.send_fin = true;
            self.shared.send(Frame::Data {
                stream_id: self.id,
                fin: true,
                data: Bytes::new(),
            });
        }
    }
}

impl Drop for SendHalf {
    fn drop(&mut self) {
        self.finish();
        let mut st = self.shared.lock();
        if let Some(s) = st.streams.get_mut(&self.id) {
            s.has_send_handle = false;
        }
        Shared::remove_if_finished(&mut st, self.id);
    }
}

impl AsyncRead for SpdyStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for SpdyStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.send).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    /// A raw peer speaking frames directly, to observe exactly what the session sends.
    struct RawPeer {
        io: DuplexStream,
        enc: Encoder,
        dec: Decoder,
        buf: BytesMut,
    }

    impl RawPeer {
        async fn send(&mut self, f: Frame) {
            let mut b = BytesMut::new();
            self.enc.encode(&f, &mut b).unwrap();
            self.io.write_all(&b).await.unwrap();
        }
        async fn recv(&mut self) -> Option<Frame> {
            loop {
                if let Some(f) = self.dec.decode(&mut self.buf).unwrap() {
                    return Some(f);
                }
                let r = tokio::time::timeout(Duration::from_millis(300), self.io.read_buf(&mut self.buf)).await;
                match r {
                    Ok(Ok(0)) | Err(_) => return None,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("{e}"),
                }
            }
        }
        async fn recv_data(&mut self, id: StreamId) -> (usize, bool) {
            let mut total = 0;
            while let Some(f) = self.recv().await {
                if let Frame::Data { stream_id, fin, data } = f
                    && stream_id == id
                {
                    total += data.len();
                    if fin {
                        return (total, true);
                    }
                }
            }
            (total, false)
        }
    }

    fn pair(config: SessionConfig) -> (Session, RawPeer) {
        let (a, b) = tokio::io::duplex(1 << 20);
        (
            Session::new(a, Role::Server, config),
            RawPeer {
                io: b,
                enc: Encoder::new(),
                dec: Decoder::new(),
                buf: BytesMut::new(),
            },
        )
    }

    fn syn(id: StreamId, ty: &str) -> Frame {
        Frame::SynStream {
            stream_id: id,
            associated_id: 0,
            priority: 0,
            slot: 0,
            fin: false,
            unidirectional: false,
            headers: Headers::new().with("streamType", ty),
        }
    }

    #[tokio::test]
    async fn accepts_streams_replies_and_answers_ping() {
        let (mut session, mut peer) = pair(SessionConfig::default());
        peer.send(syn(1, "stdout")).await;
        peer.send(Frame::Ping { id: 1 }).await;
        let inc = session.accept().await.unwrap();
        assert_eq!(inc.headers.get("streamtype"), Some("stdout"));
        assert!(matches!(peer.recv().await, Some(Frame::SynReply { stream_id: 1, .. })));
        assert_eq!(peer.recv().await, Some(Frame::Ping { id: 1 }));
        let mut s = inc.stream;
        s.write_all(b"hi").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(
            peer.recv().await,
            Some(Frame::Data {
                stream_id: 1,
                fin: false,
                data: Bytes::from_static(b"hi")
            })
        );
        assert!(matches!(peer.recv().await, Some(Frame::Data { fin: true, .. })));
        // Even-numbered (server-parity) and non-increasing ids are protocol errors.
        peer.send(syn(1, "x")).await;
        assert!(matches!(
            peer.recv().await,
            Some(Frame::GoAway {
                status: goaway::PROTOCOL_ERROR,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn send_window_is_enforced_once_peer_does_flow_control() {
        let (mut session, mut peer) = pair(SessionConfig::default());
        peer.send(Frame::Settings {
            clear: false,
            entries: vec![Setting {
                flags: 0,
                id: settings::INITIAL_WINDOW_SIZE,
                value: 1000,
            }],
        })
        .await;
        peer.send(syn(1, "data")).await;
        let mut s = session.accept().await.unwrap().stream;
        let writer = tokio::spawn(async move {
            s.write_all(&[7u8; 5000]).await.unwrap();
            s.shutdown().await.unwrap();
            s
        });
        let _reply = peer.recv().await;
        assert_eq!(peer.recv_data(1).await, (1000, false));
        peer.send(Frame::WindowUpdate {
            stream_id: 1,
            delta: 2500,
        })
        .await;
        assert_eq!(peer.recv_data(1).await, (2500, false));
        peer.send(Frame::WindowUpdate {
            stream_id: 1,
            delta: 5000,
        })
        .await;
        assert_eq!(peer.recv_data(1).await, (1500, true));
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn session_window_limits_all_streams() {
        let config = SessionConfig {
            peer_window: PeerWindow::Enforce,
            ..Default::default()
        };
        let (mut session, mut peer) = pair(config);
        peer.send(syn(1, "a")).await;
        let mut s = session.accept().await.unwrap().stream;
        tokio::spawn(async move {
            s.write_all(&vec![1u8; 100_000]).await.unwrap();
            s.shutdown().await.unwrap();
            std::future::pending::<()>().await;
        });
        let _reply = peer.recv().await;
        assert_eq!(peer.recv_data(1).await, (65536, false));
        // Stream window refreshed but the session window (3.1) still blocks.
        peer.send(Frame::WindowUpdate {
            stream_id: 1,
            delta: 65536,
        })
        .await;
        assert_eq!(peer.recv_data(1).await, (0, false));
        peer.send(Frame::WindowUpdate {
            stream_id: 0,
            delta: 65536,
        })
        .await;
        assert_eq!(peer.recv_data(1).await, (100_000 - 65536, true));
    }

    #[tokio::test]
    async fn adaptive_mode_does_not_block_peers_without_flow_control() {
        let (mut session, mut peer) = pair(SessionConfig::default());
        peer.send(syn(1, "a")).await;
        let mut s = session.accept().await.unwrap().stream;
        tokio::spawn(async move {
            s.write_all(&vec![1u8; 300_000]).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let _reply = peer.recv().await;
        assert_eq!(peer.recv_data(1).await, (300_000, true));
    }

    #[tokio::test]
    async fn window_updates_follow_consumption() {
        let (mut session, mut peer) = pair(SessionConfig::default());
        peer.send(syn(1, "stdin")).await;
        let mut s = session.accept().await.unwrap().stream;
        let _reply = peer.recv().await;
        for _ in 0..5 {
            peer.send(Frame::Data {
                stream_id: 1,
                fin: false,
                data: Bytes::from(vec![0u8; 10_000]),
            })
            .await;
        }
        // Nothing consumed yet: no WINDOW_UPDATE, and 50 KB fit in the 64 KiB window.
        assert_eq!(peer.recv().await, None);
        assert_eq!(session.window_violations(), 0);
        let mut got = vec![0u8; 50_000];
        s.read_exact(&mut got).await.unwrap();
        let mut stream_acked = 0;
        let mut session_acked = 0;
        while let Some(f) = peer.recv().await {
            if let Frame::WindowUpdate { stream_id, delta } = f {
                if stream_id == 0 {
                    session_acked += delta;
                } else {
                    stream_acked += delta;
                }
            }
        }
        // Acknowledged in chunks of at least half a window; the remainder stays pending.
        assert!((32768..=50_000).contains(&stream_acked), "{stream_acked}");
        assert!((32768..=50_000).contains(&session_acked), "{session_acked}");
    }

    #[tokio::test]
    async fn receive_buffer_is_bounded_by_backpressure() {
        let config = SessionConfig {
            recv_buffer: 20_000,
            ..Default::default()
        };
        let (mut session, mut peer) = pair(config);
        peer.send(syn(1, "stdin")).await;
        peer.send(syn(3, "other")).await;
        let mut s1 = session.accept().await.unwrap().stream;
        // 100 KB without reading: the session stops reading after ~20 KB.
        for _ in 0..10 {
            peer.send(Frame::Data {
                stream_id: 1,
                fin: false,
                data: Bytes::from(vec![0u8; 10_000]),
            })
            .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        {
            let h = session.handle();
            let st = h.shared.lock();
            assert!(st.streams[&1].recv_buffered <= 20_000);
        }
        let mut all = vec![0u8; 100_000];
        s1.read_exact(&mut all).await.unwrap();
        // The session resumed and delivered the second stream too.
        assert_eq!(session.accept().await.unwrap().headers.get("streamtype"), Some("other"));
    }

    #[tokio::test]
    async fn overrunning_peer_is_counted_not_reset() {
        let (mut session, mut peer) = pair(SessionConfig::default());
        peer.send(syn(1, "stdin")).await;
        let mut s = session.accept().await.unwrap().stream;
        for _ in 0..8 {
            peer.send(Frame::Data {
                stream_id: 1,
                fin: false,
                data: Bytes::from(vec![0u8; 10_000]),
            })
            .await;
        }
        let mut all = vec![0u8; 80_000];
        s.read_exact(&mut all).await.unwrap();
        assert!(session.window_violations() > 0);
        while let Some(f) = peer.recv().await {
            assert!(!matches!(f, Frame::RstStream { .. }), "{f:?}");
        }
    }

    #[tokio::test]
    async fn ping_flood_from_a_non_reading_peer_is_cut_off() {
        // Tiny pipe: our answers back up once the peer stops reading.
        let (a, mut b) = tokio::io::duplex(1024);
        let session = Session::new(a, Role::Server, SessionConfig::default());
        let mut enc = Encoder::new();
        let mut chunk = BytesMut::new();
        for _ in 0..1000 {
            enc.encode(&Frame::Ping { id: 1 }, &mut chunk).unwrap();
        }
        let flood = async {
            for _ in 0..40 {
                if b.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), flood).await;
        tokio::time::timeout(Duration::from_secs(10), session.closed())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn rst_and_fin_are_observed() {
        let (mut session, mut peer) = pair(SessionConfig::default());
        peer.send(syn(1, "a")).await;
        peer.send(syn(3, "b")).await;
        let mut a = session.accept().await.unwrap().stream;
        let mut b = session.accept().await.unwrap().stream;
        peer.send(Frame::Data {
            stream_id: 1,
            fin: true,
            data: Bytes::from_static(b"xyz"),
        })
        .await;
        peer.send(Frame::RstStream {
            stream_id: 3,
            status: rst::CANCEL,
        })
        .await;
        let mut v = vec![];
        a.read_to_end(&mut v).await.unwrap();
        assert_eq!(v, b"xyz");
        let mut w = vec![];
        assert_eq!(
            b.read_to_end(&mut w).await.unwrap_err().kind(),
            io::ErrorKind::ConnectionReset
        );
        assert!(b.write_all(b"x").await.is_err());
        // Data for an unknown stream is answered with RST_STREAM(INVALID_STREAM).
        peer.send(Frame::Data {
            stream_id: 99,
            fin: false,
            data: Bytes::from_static(b"?"),
        })
        .await;
        let mut saw = false;
        while let Some(f) = peer.recv().await {
            saw |= f
                == Frame::RstStream {
                    stream_id: 99,
                    status: rst::INVALID_STREAM,
                };
        }
        assert!(saw);
    }

    #[tokio::test]
    async fn close_sends_goaway_after_queued_data_and_ends_on_peer_eof() {
        let (mut session, mut peer) = pair(SessionConfig::default());
        peer.send(syn(1, "stdout")).await;
        let mut s = session.accept().await.unwrap().stream;
        s.write_all(b"last words").await.unwrap();
        drop(s);
        session.close().await;
        let mut frames = vec![];
        while let Some(f) = peer.recv().await {
            frames.push(f);
        }
        assert!(matches!(frames[0], Frame::SynReply { .. }));
        assert!(matches!(&frames[1], Frame::Data { data, .. } if &data[..] == b"last words"));
        assert!(matches!(frames[2], Frame::Data { fin: true, .. }));
        assert!(matches!(
            frames[3],
            Frame::GoAway {
                last_good_stream_id: 1,
                ..
            }
        ));
        drop(peer);
        tokio::time::timeout(Duration::from_secs(2), session.closed())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn garbage_input_closes_the_session_without_panicking() {
        let (mut session, mut peer) = pair(SessionConfig::default());
        peer.io
            .write_all(&[0x80, 0x03, 0x00, 0x01, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 3, 4])
            .await
            .unwrap();
        assert!(matches!(peer.recv().await, Some(Frame::GoAway { .. })));
        assert!(session.accept().await.is_none());
        tokio::time::timeout(Duration::from_secs(2), session.closed())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn client_and_server_sessions_interoperate() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut server = Session::new(a, Role::Server, SessionConfig::default());
        let client = Session::new(b, Role::Client, SessionConfig::default());
        let cs = client.open_stream(Headers::new().with("streamType", "data")).unwrap();
        let echo = tokio::spawn(async move {
            let inc = server.accept().await.unwrap();
            let (mut r, mut w) = inc.stream.into_split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
            server
        });
        let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let (mut r, mut w) = {
            let (r, w) = cs.into_split();
            (r, w)
        };
        let p2 = payload.clone();
        let wtask = tokio::spawn(async move {
            w.write_all(&p2).await.unwrap();
            w.shutdown().await.unwrap();
            w
        });
        let mut back = vec![];
        r.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, payload);
        wtask.await.unwrap();
        let server = echo.await.unwrap();
        server.close().await;
        tokio::time::timeout(Duration::from_secs(2), client.closed())
            .await
            .unwrap();
    }
}
