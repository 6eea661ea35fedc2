//! SPDY/3.1 as spoken by the kubelet streaming clients (client-go over moby/spdystream).

pub mod frame;
pub mod session;

pub use frame::{Frame, Headers, StreamId};
pub use session::{
    IncomingStream, PeerWindow, RecvHalf, Role, SendHalf, Session, SessionConfig, SessionHandle, SpdyStream,
};
