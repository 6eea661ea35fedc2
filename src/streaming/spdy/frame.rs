//! SPDY/3 frame layout and header-block compression.
//!
//! Every frame starts with an 8-byte header. Control frames: `1 | version(15) | type(16) | flags(8) | length(24)`;
//! data frames: `0 | stream-id(31) | flags(8) | length(24)`. Name/value header blocks are zlib-compressed with the
//! SPDY/3 dictionary, using one compression context per direction for the whole session, so an [`Encoder`] and a
//! [`Decoder`] must each see every frame of their direction, in order.

use std::sync::LazyLock;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// SPDY protocol version spoken here.
pub const VERSION: u16 = 3;
/// Size of every frame header.
pub const HEADER_LEN: usize = 8;
/// Largest payload the 24-bit length field can describe.
pub const MAX_PAYLOAD_LEN: usize = (1 << 24) - 1;
/// Default cap on an incoming frame's payload (a policy limit, well below the protocol maximum).
pub const DEFAULT_MAX_FRAME_LEN: usize = 1 << 20;
/// Default cap on a decompressed header block.
pub const DEFAULT_MAX_HEADER_BLOCK: usize = 256 * 1024;

/// FIN flag (data and control frames).
pub const FLAG_FIN: u8 = 0x01;
/// UNIDIRECTIONAL flag of SYN_STREAM.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// CLEAR_SETTINGS flag of SETTINGS.
pub const FLAG_SETTINGS_CLEAR: u8 = 0x01;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// Stream identifier (31 bits).
pub type StreamId = u32;

/// RST_STREAM status codes (SPDY/3 section 2.6.3).
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const UNSUPPORTED_VERSION: u32 = 4;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    pub const STREAM_IN_USE: u32 = 8;
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// GOAWAY status codes.
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INTERNAL_ERROR: u32 = 2;
}

/// SETTINGS identifiers used here.
pub mod settings {
    pub const MAX_CONCURRENT_STREAMS: u32 = 4;
    pub const INITIAL_WINDOW_SIZE: u32 = 7;
}

/// Words of the SPDY/3 header dictionary, each stored with a 4-byte big-endian length prefix.
const DICTIONARY_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

/// Raw tail of the SPDY/3 header dictionary (status codes, reason phrases, dates, common values).
const DICTIONARY_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized",
    "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable",
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,",
    "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

/// The SPDY/3 zlib dictionary (1423 bytes), built from its published structure.
pub fn dictionary() -> &'static [u8] {
    static DICT: LazyLock<Vec<u8>> = LazyLock::new(|| {
        let mut d = Vec::with_capacity(1423);
        for word in DICTIONARY_WORDS {
            d.extend_from_slice(&(word.len() as u32).to_be_bytes());
            d.extend_from_slice(word.as_bytes());
        }
        d.extend_from_slice(DICTIONARY_TAIL.as_bytes());
        d
    });
    &DICT
}

/// A decoding or encoding failure. Any of these is fatal for the session: the header compression contexts can no
/// longer be trusted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("unsupported SPDY version {0}")]
    UnsupportedVersion(u16),
    #[error("frame payload of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("invalid {kind} frame: {reason}")]
    Invalid { kind: &'static str, reason: &'static str },
    #[error("malformed header block: {0}")]
    HeaderBlock(&'static str),
    #[error("header compression failed: {0}")]
    Compression(String),
}

fn invalid(kind: &'static str, reason: &'static str) -> FrameError {
    FrameError::Invalid { kind, reason }
}

/// A SPDY name/value header block. Names are lowercase; a name appears once, several values are NUL-joined.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// An empty block.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a value; the name is lowercased and a repeated name gets the value NUL-appended.
    pub fn insert(&mut self, name: &str, value: &str) {
        let name = name.to_ascii_lowercase();
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => {
                v.push('\0');
                v.push_str(value);
            }
            None => self.0.push((name, value.to_string())),
        }
    }

    /// Builder-style [`insert`](Self::insert).
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.insert(name, value);
        self
    }

    /// The first value for `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split('\0').next().unwrap_or_default())
    }

    /// All (name, raw value) pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of distinct names.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when the block has no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.0.iter().map(|(n, v)| 8 + n.len() + v.len()).sum::<usize>());
        out.put_u32(self.0.len() as u32);
        for (n, v) in &self.0 {
            out.put_u32(n.len() as u32);
            out.extend_from_slice(n.as_bytes());
            out.put_u32(v.len() as u32);
            out.extend_from_slice(v.as_bytes());
        }
        out
    }

    fn parse(mut block: &[u8]) -> Result<Self, FrameError> {
        if block.len() < 4 {
            return Err(FrameError::HeaderBlock("missing pair count"));
        }
        let count = block.get_u32() as usize;
        // Each pair needs at least 8 bytes, which bounds the allocation below.
        if count > block.len() / 8 {
            return Err(FrameError::HeaderBlock("pair count exceeds block size"));
        }
        let mut headers = Headers(Vec::with_capacity(count));
        for _ in 0..count {
            let name = take_string(&mut block)?;
            let value = take_string(&mut block)?;
            if name.is_empty() {
                return Err(FrameError::HeaderBlock("empty header name"));
            }
            let name = name.to_ascii_lowercase();
            if headers.0.iter().any(|(n, _)| *n == name) {
                return Err(FrameError::HeaderBlock("duplicate header name"));
            }
            headers.0.push((name, value));
        }
        if !block.is_empty() {
            return Err(FrameError::HeaderBlock("trailing bytes"));
        }
        Ok(headers)
    }
}

fn take_string(block: &mut &[u8]) -> Result<String, FrameError> {
    if block.len() < 4 {
        return Err(FrameError::HeaderBlock("truncated length"));
    }
    let len = block.get_u32() as usize;
    if len > block.len() {
        return Err(FrameError::HeaderBlock("truncated string"));
    }
    let s = String::from_utf8_lossy(&block[..len]).into_owned();
    block.advance(len);
    Ok(s)
}

/// One SETTINGS entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    pub id: u32,
    pub value: u32,
}

/// A decoded SPDY/3 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream_id: StreamId,
        fin: bool,
        data: Bytes,
    },
    SynStream {
        stream_id: StreamId,
        associated_id: StreamId,
        priority: u8,
        slot: u8,
        fin: bool,
        unidirectional: bool,
        headers: Headers,
    },
    SynReply {
        stream_id: StreamId,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream_id: StreamId,
        status: u32,
    },
    Settings {
        clear: bool,
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: StreamId,
        status: u32,
    },
    Headers {
        stream_id: StreamId,
        fin: bool,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: StreamId,
        delta: u32,
    },
    /// A control frame of a type this implementation ignores (e.g. CREDENTIAL); the spec says to skip it.
    Unknown {
        frame_type: u16,
    },
}

/// Serializes frames; owns the outgoing header compression context.
pub struct Encoder {
    deflate: Compress,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    /// A fresh encoder whose compressor is primed with the SPDY/3 dictionary.
    pub fn new() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        // Priming a fresh zlib stream with a dictionary cannot fail.
        let _ = deflate.set_dictionary(dictionary());
        Self { deflate }
    }

    /// Appends the wire form of `frame` to `dst`.
    pub fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        match frame {
            Frame::Data { stream_id, fin, data } => {
                if data.len() > MAX_PAYLOAD_LEN {
                    return Err(FrameError::TooLarge(data.len()));
                }
                dst.reserve(HEADER_LEN + data.len());
                dst.put_u32(stream_id & 0x7fff_ffff);
                put_flags_len(dst, u8::from(*fin) * FLAG_FIN, data.len());
                dst.extend_from_slice(data);
            }
            Frame::SynStream {
                stream_id,
                associated_id,
                priority,
                slot,
                fin,
                unidirectional,
                headers,
            } => {
                let block = self.compress(&headers.serialize())?;
                let flags = (u8::from(*fin) * FLAG_FIN) | (u8::from(*unidirectional) * FLAG_UNIDIRECTIONAL);
                put_control(dst, TYPE_SYN_STREAM, flags, 10 + block.len())?;
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.put_u32(associated_id & 0x7fff_ffff);
                dst.put_u8((priority & 0x07) << 5);
                dst.put_u8(*slot);
                dst.extend_from_slice(&block);
            }
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            }
            | Frame::Headers {
                stream_id,
                fin,
                headers,
            } => {
                let ty = if matches!(frame, Frame::SynReply { .. }) {
                    TYPE_SYN_REPLY
                } else {
                    TYPE_HEADERS
                };
                let block = self.compress(&headers.serialize())?;
                put_control(dst, ty, u8::from(*fin) * FLAG_FIN, 4 + block.len())?;
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.extend_from_slice(&block);
            }
            Frame::RstStream { stream_id, status } => {
                put_control(dst, TYPE_RST_STREAM, 0, 8)?;
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.put_u32(*status);
            }
            Frame::Settings { clear, entries } => {
                put_control(
                    dst,
                    TYPE_SETTINGS,
                    u8::from(*clear) * FLAG_SETTINGS_CLEAR,
                    4 + 8 * entries.len(),
                )?;
                dst.put_u32(entries.len() as u32);
                for e in entries {
                    dst.put_u32((u32::from(e.flags) << 24) | (e.id & 0x00ff_ffff));
                    dst.put_u32(e.value);
                }
            }
            Frame::Ping { id } => {
                put_control(dst, TYPE_PING, 0, 4)?;
                dst.put_u32(*id);
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                put_control(dst, TYPE_GOAWAY, 0, 8)?;
                dst.put_u32(last_good_stream_id & 0x7fff_ffff);
                dst.put_u32(*status);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                put_control(dst, TYPE_WINDOW_UPDATE, 0, 8)?;
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.put_u32(delta & 0x7fff_ffff);
            }
            Frame::Unknown { .. } => return Err(invalid("unknown", "cannot encode an unknown frame")),
        }
        Ok(())
    }

    /// Compresses one header block and sync-flushes, so the peer can inflate it without later input.
    fn compress(&mut self, input: &[u8]) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::with_capacity(input.len() + 64);
        let mut pos = 0;
        loop {
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(&input[pos..], &mut out, FlushCompress::Sync)
                .map_err(|e| FrameError::Compression(e.to_string()))?;
            pos += (self.deflate.total_in() - before) as usize;
            // The flush is complete once all input is consumed and the output buffer was not filled up.
            if pos == input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            out.reserve(out.capacity().max(256));
        }
    }
}

fn put_flags_len(dst: &mut BytesMut, flags: u8, len: usize) {
    dst.put_u32((u32::from(flags) << 24) | (len as u32 & 0x00ff_ffff));
}

fn put_control(dst: &mut BytesMut, ty: u16, flags: u8, len: usize) -> Result<(), FrameError> {
    if len > MAX_PAYLOAD_LEN {
        return Err(FrameError::TooLarge(len));
    }
    dst.reserve(HEADER_LEN + len);
    dst.put_u16(0x8000 | VERSION);
    dst.put_u16(ty);
    put_flags_len(dst, flags, len);
    Ok(())
}

/// Parses frames from a byte buffer; owns the incoming header decompression context.
pub struct Decoder {
    inflate: Decompress,
    max_frame_len: usize,
    max_header_block: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder with the default size limits.
    pub fn new() -> Self {
        Self::with_limits(DEFAULT_MAX_FRAME_LEN, DEFAULT_MAX_HEADER_BLOCK)
    }

    /// A decoder rejecting payloads above `max_frame_len` and header blocks inflating beyond `max_header_block`.
    pub fn with_limits(max_frame_len: usize, max_header_block: usize) -> Self {
        Self {
            inflate: Decompress::new(true),
            max_frame_len: max_frame_len.min(MAX_PAYLOAD_LEN),
            max_header_block,
        }
    }

    /// Removes and returns one complete frame from the front of `src`, or `None` if more bytes are needed.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = (u32::from_be_bytes([0, src[5], src[6], src[7]])) as usize;
        if len > self.max_frame_len {
            return Err(FrameError::TooLarge(len));
        }
        if src.len() < HEADER_LEN + len {
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        let mut head = src.split_to(HEADER_LEN);
        let payload = src.split_to(len).freeze();
        let first = head.get_u32();
        let flags = head.get_u8();
        if first & 0x8000_0000 == 0 {
            let stream_id = first & 0x7fff_ffff;
            if stream_id == 0 {
                return Err(invalid("DATA", "stream id 0"));
            }
            return Ok(Some(Frame::Data {
                stream_id,
                fin: flags & FLAG_FIN != 0,
                data: payload,
            }));
        }
        let version = ((first >> 16) & 0x7fff) as u16;
        let ty = (first & 0xffff) as u16;
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        self.control(ty, flags, payload).map(Some)
    }

    fn control(&mut self, ty: u16, flags: u8, mut p: Bytes) -> Result<Frame, FrameError> {
        let fin = flags & FLAG_FIN != 0;
        match ty {
            TYPE_SYN_STREAM => {
                if p.len() < 10 {
                    return Err(invalid("SYN_STREAM", "too short"));
                }
                let stream_id = p.get_u32() & 0x7fff_ffff;
                let associated_id = p.get_u32() & 0x7fff_ffff;
                let priority = p.get_u8() >> 5;
                let slot = p.get_u8();
                let headers = self.header_block(&p)?;
                if stream_id == 0 {
                    return Err(invalid("SYN_STREAM", "stream id 0"));
                }
                Ok(Frame::SynStream {
                    stream_id,
                    associated_id,
                    priority,
                    slot,
                    fin,
                    unidirectional: flags & FLAG_UNIDIRECTIONAL != 0,
                    headers,
                })
            }
            TYPE_SYN_REPLY | TYPE_HEADERS => {
                let kind = if ty == TYPE_SYN_REPLY { "SYN_REPLY" } else { "HEADERS" };
                if p.len() < 4 {
                    return Err(invalid(kind, "too short"));
                }
                let stream_id = p.get_u32() & 0x7fff_ffff;
                let headers = self.header_block(&p)?;
                if stream_id == 0 {
                    return Err(invalid(kind, "stream id 0"));
                }
                Ok(if ty == TYPE_SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        fin,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        fin,
                        headers,
                    }
                })
            }
            TYPE_RST_STREAM => {
                if p.len() != 8 {
                    return Err(invalid("RST_STREAM", "length must be 8"));
                }
                let stream_id = p.get_u32() & 0x7fff_ffff;
                let status = p.get_u32();
                if stream_id == 0 {
                    return Err(invalid("RST_STREAM", "stream id 0"));
                }
                Ok(Frame::RstStream { stream_id, status })
            }
            TYPE_SETTINGS => {
                if p.len() < 4 {
                    return Err(invalid("SETTINGS", "too short"));
                }
                let n = p.get_u32() as usize;
                if n.checked_mul(8) != Some(p.len()) {
                    return Err(invalid("SETTINGS", "entry count does not match length"));
                }
                let entries = (0..n)
                    .map(|_| {
                        let word = p.get_u32();
                        Setting {
                            flags: (word >> 24) as u8,
                            id: word & 0x00ff_ffff,
                            value: p.get_u32(),
                        }
                    })
                    .collect();
                Ok(Frame::Settings {
                    clear: flags & FLAG_SETTINGS_CLEAR != 0,
                    entries,
                })
            }
            TYPE_PING => {
                if p.len() != 4 {
                    return Err(invalid("PING", "length must be 4"));
                }
                Ok(Frame::Ping { id: p.get_u32() })
            }
            TYPE_GOAWAY => {
                if p.len() != 8 {
                    return Err(invalid("GOAWAY", "length must be 8"));
                }
                Ok(Frame::GoAway {
                    last_good_stream_id: p.get_u32() & 0x7fff_ffff,
                    status: p.get_u32(),
                })
            }
            TYPE_WINDOW_UPDATE => {
                if p.len() != 8 {
                    return Err(invalid("WINDOW_UPDATE", "length must be 8"));
                }
                let stream_id = p.get_u32() & 0x7fff_ffff;
                let delta = p.get_u32() & 0x7fff_ffff;
                if delta == 0 {
                    return Err(invalid("WINDOW_UPDATE", "zero delta"));
                }
                Ok(Frame::WindowUpdate { stream_id, delta })
            }
            other => Ok(Frame::Unknown { frame_type: other }),
        }
    }

    /// Inflates one header block (continuing the session-wide zlib stream) and parses it.
    fn header_block(&mut self, input: &[u8]) -> Result<Headers, FrameError> {
        let mut out: Vec<u8> = Vec::with_capacity((input.len() * 4).clamp(256, self.max_header_block + 1));
        let mut pos = 0;
        loop {
            if out.len() == out.capacity() {
                if out.len() > self.max_header_block {
                    return Err(FrameError::HeaderBlock("decompressed block exceeds the limit"));
                }
                out.reserve(out.capacity().min(self.max_header_block + 1 - out.len()).max(256));
            }
            let (in_before, out_before) = (self.inflate.total_in(), out.len());
            let res = self
                .inflate
                .decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync);
            pos += (self.inflate.total_in() - in_before) as usize;
            let progressed = self.inflate.total_in() != in_before || out.len() != out_before;
            match res {
                Ok(Status::StreamEnd) => return Err(FrameError::Compression("peer ended the zlib stream".into())),
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(dictionary())
                        .map_err(|_| FrameError::Compression("peer uses an unknown dictionary".into()))?;
                    continue;
                }
                Err(e) => return Err(FrameError::Compression(e.to_string())),
            }
            if out.len() > self.max_header_block {
                return Err(FrameError::HeaderBlock("decompressed block exceeds the limit"));
            }
            if pos == input.len() && out.len() < out.capacity() {
                break;
            }
            if !progressed {
                return Err(FrameError::Compression("truncated or corrupt header block".into()));
            }
        }
        Headers::parse(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(frames: &[Frame]) {
        let mut enc = Encoder::new();
        let mut dec = Decoder::new();
        let mut buf = BytesMut::new();
        for f in frames {
            enc.encode(f, &mut buf).unwrap();
        }
        for f in frames {
            assert_eq!(dec.decode(&mut buf).unwrap().as_ref(), Some(f));
        }
        assert!(buf.is_empty());
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
    }

    fn hdrs(pairs: &[(&str, &str)]) -> Headers {
        pairs.iter().fold(Headers::new(), |h, (n, v)| h.with(n, v))
    }

    #[test]
    fn dictionary_matches_published_size_and_checksum() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert_eq!(&d[..11], b"\0\0\0\x07options");
        assert!(d.ends_with(b",*,enq=0."));
        // Adler-32 of the dictionary is the DICTID zlib writes into the stream header.
        let (mut a, mut b) = (1u32, 0u32);
        for &x in d {
            a = (a + u32::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        let mut buf = BytesMut::new();
        Encoder::new()
            .encode(
                &Frame::SynReply {
                    stream_id: 1,
                    fin: false,
                    headers: Headers::new(),
                },
                &mut buf,
            )
            .unwrap();
        // zlib header (2 bytes) then DICTID, right after the 12-byte SYN_REPLY prefix.
        assert_eq!(&buf[14..18], &((b << 16) | a).to_be_bytes());
    }

    #[test]
    fn every_frame_type_round_trips() {
        roundtrip(&[
            Frame::SynStream {
                stream_id: 1,
                associated_id: 0,
                priority: 3,
                slot: 0,
                fin: false,
                unidirectional: true,
                headers: hdrs(&[("streamType", "error"), ("port", "80"), ("requestID", "0")]),
            },
            Frame::SynReply {
                stream_id: 1,
                fin: true,
                headers: Headers::new(),
            },
            Frame::RstStream {
                stream_id: 3,
                status: rst::CANCEL,
            },
            Frame::Settings {
                clear: true,
                entries: vec![Setting {
                    flags: 1,
                    id: settings::INITIAL_WINDOW_SIZE,
                    value: 1 << 20,
                }],
            },
            Frame::Ping { id: 7 },
            Frame::GoAway {
                last_good_stream_id: 5,
                status: goaway::PROTOCOL_ERROR,
            },
            Frame::Headers {
                stream_id: 5,
                fin: false,
                headers: hdrs(&[("a", "1"), ("a", "2")]),
            },
            Frame::WindowUpdate {
                stream_id: 0,
                delta: 65536,
            },
            Frame::Data {
                stream_id: 9,
                fin: true,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream_id: 9,
                fin: false,
                data: Bytes::new(),
            },
        ]);
    }

    #[test]
    fn header_compression_context_spans_frames() {
        // The second identical block compresses to far fewer bytes: the context is shared across frames.
        let h = hdrs(&[
            ("streamtype", "stdout"),
            ("x-some-long-header-name", "some long header value here"),
        ]);
        let mut enc = Encoder::new();
        let mut sizes = vec![];
        let mut all = BytesMut::new();
        for id in [1, 3, 5, 7] {
            let mut buf = BytesMut::new();
            let f = Frame::SynStream {
                stream_id: id,
                associated_id: 0,
                priority: 0,
                slot: 0,
                fin: false,
                unidirectional: false,
                headers: h.clone(),
            };
            enc.encode(&f, &mut buf).unwrap();
            sizes.push(buf.len());
            all.extend_from_slice(&buf);
        }
        assert!(sizes[1] < sizes[0] / 2, "{sizes:?}");
        let mut dec = Decoder::new();
        for _ in 0..4 {
            match dec.decode(&mut all).unwrap() {
                Some(Frame::SynStream { headers, .. }) => assert_eq!(headers, h),
                other => panic!("unexpected {other:?}"),
            }
        }
        // A fresh decoder cannot inflate a block that depends on earlier context.
        let mut enc2 = Encoder::new();
        let mut first = BytesMut::new();
        let f = Frame::Headers {
            stream_id: 1,
            fin: false,
            headers: h.clone(),
        };
        enc2.encode(&f, &mut first).unwrap();
        let mut second = BytesMut::new();
        enc2.encode(&f, &mut second).unwrap();
        assert!(Decoder::new().decode(&mut second).is_err());
    }

    #[test]
    fn partial_input_waits_for_more() {
        let mut enc = Encoder::new();
        let mut full = BytesMut::new();
        enc.encode(
            &Frame::SynStream {
                stream_id: 1,
                associated_id: 0,
                priority: 0,
                slot: 0,
                fin: false,
                unidirectional: false,
                headers: hdrs(&[("streamtype", "data")]),
            },
            &mut full,
        )
        .unwrap();
        let mut dec = Decoder::new();
        let mut buf = BytesMut::new();
        for (i, b) in full.iter().enumerate() {
            buf.put_u8(*b);
            let r = dec.decode(&mut buf).unwrap();
            assert_eq!(r.is_some(), i == full.len() - 1);
        }
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let cases: Vec<Vec<u8>> = vec![
            // bad version
            vec![0x80, 0x02, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1],
            // RST_STREAM with wrong length
            vec![0x80, 0x03, 0, 3, 0, 0, 0, 4, 0, 0, 0, 1],
            // RST_STREAM stream 0
            vec![0x80, 0x03, 0, 3, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1],
            // SETTINGS claiming 2 entries with room for 1
            vec![0x80, 0x03, 0, 4, 0, 0, 0, 12, 0, 0, 0, 2, 0, 0, 0, 7, 0, 0, 0, 1],
            // SETTINGS with an absurd count
            vec![0x80, 0x03, 0, 4, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff],
            // PING too long
            vec![0x80, 0x03, 0, 6, 0, 0, 0, 5, 0, 0, 0, 1, 0],
            // WINDOW_UPDATE with zero delta
            vec![0x80, 0x03, 0, 9, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0],
            // SYN_STREAM too short
            vec![0x80, 0x03, 0, 1, 0, 0, 0, 2, 0, 0],
            // SYN_STREAM with garbage instead of a zlib block
            vec![0x80, 0x03, 0, 1, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4],
            // DATA on stream 0
            vec![0, 0, 0, 0, 0, 0, 0, 1, 9],
            // frame larger than the limit
            vec![0, 0, 0, 1, 0, 0xff, 0xff, 0xff],
        ];
        for case in cases {
            let mut buf = BytesMut::from(&case[..]);
            assert!(Decoder::new().decode(&mut buf).is_err(), "{case:?} decoded");
        }
        // Unknown control types are skipped, not errors.
        let mut buf = BytesMut::from(&[0x80, 0x03, 0, 10, 0, 0, 0, 1, 0][..]);
        assert_eq!(
            Decoder::new().decode(&mut buf).unwrap(),
            Some(Frame::Unknown { frame_type: 10 })
        );
    }

    #[test]
    fn malformed_header_blocks_are_rejected() {
        // Valid zlib, invalid SPDY block contents.
        for raw in [
            vec![0u8, 0, 0],                                      // truncated count
            vec![0, 0, 0, 1, 0, 0, 0, 9, b'a'],                   // count ok, name truncated
            vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],             // empty name
            vec![0, 0, 0, 0, 1],                                  // trailing bytes
            vec![0, 0, 0, 2, 0, 0, 0, 1, b'a', 0, 0, 0, 0, 0, 0], // truncated second pair
        ] {
            let mut enc = Encoder::new();
            let block = enc.compress(&raw).unwrap();
            let mut buf = BytesMut::new();
            put_control(&mut buf, TYPE_HEADERS, 0, 4 + block.len()).unwrap();
            buf.put_u32(1);
            buf.extend_from_slice(&block);
            assert!(Decoder::new().decode(&mut buf).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn header_block_bomb_is_bounded() {
        let mut enc = Encoder::new();
        let mut raw = vec![0, 0, 0, 1, 0, 0, 0, 1, b'a'];
        let big = 1 << 20;
        raw.extend_from_slice(&(big as u32).to_be_bytes());
        raw.extend(std::iter::repeat_n(b'x', big));
        let block = enc.compress(&raw).unwrap();
        assert!(block.len() < 8192);
        let mut buf = BytesMut::new();
        put_control(&mut buf, TYPE_HEADERS, 0, 4 + block.len()).unwrap();
        buf.put_u32(1);
        buf.extend_from_slice(&block);
        assert_eq!(
            Decoder::new().decode(&mut buf),
            Err(FrameError::HeaderBlock("decompressed block exceeds the limit"))
        );
    }

    #[test]
    fn random_garbage_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        // Valid frames to mutate.
        let mut enc = Encoder::new();
        let mut valid = BytesMut::new();
        enc.encode(
            &Frame::SynStream {
                stream_id: 1,
                associated_id: 0,
                priority: 0,
                slot: 0,
                fin: false,
                unidirectional: false,
                headers: hdrs(&[("streamtype", "stdin")]),
            },
            &mut valid,
        )
        .unwrap();
        for _ in 0..3000 {
            let mut bytes = valid.to_vec();
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(0..bytes.len());
                bytes[i] = rng.random();
            }
            bytes.truncate(rng.random_range(0..=bytes.len()));
            let mut buf = BytesMut::from(&bytes[..]);
            let mut dec = Decoder::new();
            while let Ok(Some(_)) = dec.decode(&mut buf) {}
            let mut junk = vec![0u8; rng.random_range(0..64)];
            rng.fill(&mut junk[..]);
            let mut buf = BytesMut::from(&junk[..]);
            while let Ok(Some(_)) = dec.decode(&mut buf) {}
        }
    }
}
