//! `containerLogs`: reads a container's CRI log file (`<RFC3339Nano> <stream> <P|F> <text>` per record), strips the
//! prefix (or keeps the timestamp), joins partial records, and honours tailLines, sinceSeconds/sinceTime,
//! limitBytes and follow. Following polls the file, survives rotation and truncation, and ends once the container
//! is no longer running and everything it wrote has been sent.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use hyper::body::Frame;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::streaming::BoxFuture;

const READ_CHUNK: usize = 64 * 1024;
const FLUSH_AT: usize = 32 * 1024;
const POLL: Duration = Duration::from_millis(100);
const RUNNING_CHECK: Duration = Duration::from_secs(1);

/// The query of a `containerLogs` request (PodLogOptions).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<u64>,
    /// Only lines at or after this time (Unix nanoseconds).
    pub since_nanos: Option<i128>,
    pub limit_bytes: Option<u64>,
}

pub(crate) fn flag(q: &HashMap<String, String>, name: &str) -> bool {
    q.get(name).is_some_and(|v| v == "true" || v == "1")
}

impl LogOptions {
    pub fn from_query(q: &HashMap<String, String>) -> Result<Self, String> {
        let number = |name: &str, min: i64| -> Result<Option<i64>, String> {
            let Some(v) = q.get(name).filter(|v| !v.is_empty()) else {
                return Ok(None);
            };
            match v.parse::<i64>() {
                Ok(n) if n >= min => Ok(Some(n)),
                _ => Err(format!("{name}: must be an integer of at least {min}, got {v:?}")),
            }
        };
        let since_seconds = number("sinceSeconds", 1)?;
        let since_time = q.get("sinceTime").filter(|v| !v.is_empty());
        let since_nanos = match (since_seconds, since_time) {
            (Some(_), Some(_)) => return Err("at most one of sinceTime or sinceSeconds may be specified".into()),
            (Some(secs), None) => Some(now_nanos() - i128::from(secs) * 1_000_000_000),
            (None, Some(t)) => Some(parse_rfc3339_nanos(t).ok_or_else(|| format!("sinceTime: invalid time {t:?}"))?),
            (None, None) => None,
        };
        Ok(LogOptions {
            follow: flag(q, "follow"),
            previous: flag(q, "previous"),
            timestamps: flag(q, "timestamps"),
            tail_lines: number("tailLines", 0)?.map(|n| n as u64),
            since_nanos,
            limit_bytes: number("limitBytes", 1)?.map(|n| n as u64),
        })
    }
}

fn now_nanos() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_index = (month + 9) % 12; // March = 0
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// `2024-05-01T12:00:00.123456789Z` or with a `±hh:mm` offset, as Unix nanoseconds.
pub fn parse_rfc3339_nanos(s: &str) -> Option<i128> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(range)?;
        part.bytes().all(|c| c.is_ascii_digit()).then(|| part.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[16] != b':' || !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos: i128 = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let kept = &frac[..digits.min(9)];
        nanos = kept.parse::<i128>().ok()? * 10i128.pow(9 - kept.len() as u32);
        rest = &frac[digits..];
    }
    let offset_secs: i64 = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[..1], "+" | "-") && &rest[3..4] == ":" => {
            let magnitude = rest[1..3].parse::<i64>().ok()? * 3600 + rest[4..6].parse::<i64>().ok()? * 60;
            if &rest[..1] == "-" { -magnitude } else { magnitude }
        }
        _ => return None,
    };
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(i128::from(secs) * 1_000_000_000 + nanos)
}

/// One logical log line: partial records joined, the text ending in `\n` unless the container is still writing it.
#[derive(Debug, PartialEq)]
struct LogLine {
    timestamp: String,
    text: Vec<u8>,
}

/// Splits raw CRI log bytes into records and joins partial (`P`) records into lines.
#[derive(Default)]
struct Decoder {
    /// Bytes of a record whose newline has not arrived yet.
    unterminated: Vec<u8>,
    /// A line assembled from partial records so far.
    pending: Option<LogLine>,
}

impl Decoder {
    fn feed(&mut self, mut data: &[u8], out: &mut Vec<LogLine>) {
        while let Some(newline) = data.iter().position(|&c| c == b'\n') {
            if self.unterminated.is_empty() {
                self.record(&data[..newline], out);
            } else {
                let mut record = std::mem::take(&mut self.unterminated);
                record.extend_from_slice(&data[..newline]);
                self.record(&record, out);
            }
            data = &data[newline + 1..];
        }
        self.unterminated.extend_from_slice(data);
    }

    fn record(&mut self, record: &[u8], out: &mut Vec<LogLine>) {
        let mut fields = record.splitn(4, |&c| c == b' ');
        let (timestamp, _stream, tag) = (fields.next(), fields.next(), fields.next());
        let parsed = match (timestamp.and_then(|t| std::str::from_utf8(t).ok()), tag) {
            (Some(ts), Some(tag)) if parse_rfc3339_nanos(ts).is_some() => Some((ts, tag, fields.next().unwrap_or(b""))),
            _ => None,
        };
        let Some((timestamp, tag, content)) = parsed else {
            // Not a CRI record: pass it through as a line of its own.
            out.extend(self.pending.take());
            let mut text = record.to_vec();
            text.push(b'\n');
            out.push(LogLine {
                timestamp: String::new(),
                text,
            });
            return;
        };
        let partial = tag.split(|&c| c == b':').any(|t| t == b"P");
        let line = self.pending.get_or_insert_with(|| LogLine {
            timestamp: timestamp.to_string(),
            text: Vec::new(),
        });
        line.text.extend_from_slice(content);
        if !partial {
            line.text.push(b'\n');
            out.extend(self.pending.take());
        }
    }

    /// What is left once no more data will come: an unterminated record and an unfinished line.
    fn finish(&mut self, out: &mut Vec<LogLine>) {
        if !self.unterminated.is_empty() {
            let record = std::mem::take(&mut self.unterminated);
            self.record(&record, out);
        }
        if let Some(mut line) = self.pending.take() {
            // A partial line stays without its newline, as the container wrote it.
            if line.text.last() == Some(&b'\n') {
                line.text.pop();
            }
            out.push(line);
        }
    }
}

/// Buffers output for the response body, enforcing limitBytes.
struct Output {
    tx: mpsc::Sender<Result<Frame<Bytes>, io::Error>>,
    buf: BytesMut,
    remaining: Option<u64>,
    timestamps: bool,
}

impl Output {
    /// Adds a line; false once limitBytes is reached.
    fn push(&mut self, line: &LogLine) -> bool {
        if self.timestamps && !line.timestamp.is_empty() {
            self.write(line.timestamp.as_bytes()) && self.write(b" ") && self.write(&line.text)
        } else {
            self.write(&line.text)
        }
    }

    fn write(&mut self, data: &[u8]) -> bool {
        let Some(remaining) = self.remaining.as_mut() else {
            self.buf.extend_from_slice(data);
            return true;
        };
        let take = (*remaining).min(data.len() as u64) as usize;
        self.buf.extend_from_slice(&data[..take]);
        *remaining -= take as u64;
        *remaining > 0
    }

    /// Sends what is buffered; false when the client went away.
    async fn flush(&mut self) -> bool {
        if self.buf.is_empty() {
            return !self.tx.is_closed();
        }
        let chunk = self.buf.split().freeze();
        self.tx.send(Ok(Frame::data(chunk))).await.is_ok()
    }
}

/// Tells whether the container still runs (to know when following ends).
pub type RunningCheck = Box<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

/// Streams the log at `path` into `tx` as `options` ask.
pub async fn stream_log(
    path: PathBuf,
    options: LogOptions,
    is_running: RunningCheck,
    tx: mpsc::Sender<Result<Frame<Bytes>, io::Error>>,
) {
    let mut out = Output {
        tx,
        buf: BytesMut::new(),
        remaining: options.limit_bytes,
        timestamps: options.timestamps,
    };
    if let Err(e) = copy_log(&path, &options, is_running, &mut out).await {
        tracing::debug!(path = %path.display(), error = %e, "reading a container log");
        let _ = out.flush().await;
        let _ = out.tx.send(Err(e)).await;
        return;
    }
    let _ = out.flush().await;
}

fn keep(line: &LogLine, since: Option<i128>) -> bool {
    match since {
        None => true,
        Some(since) => parse_rfc3339_nanos(&line.timestamp).is_none_or(|t| t >= since),
    }
}

async fn copy_log(
    path: &std::path::Path,
    options: &LogOptions,
    is_running: RunningCheck,
    out: &mut Output,
) -> io::Result<()> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        // No output yet (or none kept); following still waits for some.
        Err(e) if e.kind() == io::ErrorKind::NotFound && options.follow => {
            wait_for_file(path, &is_running, out).await?;
            match tokio::fs::File::open(path).await {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut inode = file.metadata().await?.ino();
    let mut position: u64 = 0;
    let mut decoder = Decoder::default();
    let mut lines = Vec::new();
    let mut buf = vec![0u8; READ_CHUNK];

    // What the file holds now, with tailLines applied.
    let mut tail: VecDeque<LogLine> = VecDeque::new();
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        position += n as u64;
        decoder.feed(&buf[..n], &mut lines);
        for line in lines.drain(..).filter(|l| keep(l, options.since_nanos)) {
            match options.tail_lines {
                Some(max) => {
                    tail.push_back(line);
                    if tail.len() as u64 > max {
                        tail.pop_front();
                    }
                }
                None => {
                    if !out.push(&line) {
                        return Ok(());
                    }
                }
            }
        }
        if out.buf.len() >= FLUSH_AT && !out.flush().await {
            return Ok(());
        }
    }
    if !options.follow {
        decoder.finish(&mut lines);
        let finished = lines.drain(..).filter(|l| keep(l, options.since_nanos));
        match options.tail_lines {
            Some(max) => {
                tail.extend(finished);
                while tail.len() as u64 > max {
                    tail.pop_front();
                }
            }
            None => tail.extend(finished),
        }
    }
    for line in tail.drain(..) {
        if !out.push(&line) {
            return Ok(());
        }
    }
    if !options.follow {
        return Ok(());
    }

    let mut last_check: Option<Instant> = None;
    let mut exited = false;
    loop {
        if !out.flush().await {
            return Ok(());
        }
        let n = file.read(&mut buf).await?;
        if n > 0 {
            position += n as u64;
            decoder.feed(&buf[..n], &mut lines);
            for line in lines.drain(..).filter(|l| keep(l, options.since_nanos)) {
                if !out.push(&line) {
                    return Ok(());
                }
            }
            continue;
        }
        // At the end of what the file holds.
        if exited {
            decoder.finish(&mut lines);
            for line in lines.drain(..) {
                if !out.push(&line) {
                    break;
                }
            }
            return Ok(());
        }
        match tokio::fs::metadata(path).await {
            // Rotated: the rest of the old file has been read; continue with the new one.
            Ok(meta) if meta.ino() != inode => {
                if let Ok(new) = tokio::fs::File::open(path).await {
                    file = new;
                    inode = meta.ino();
                    position = 0;
                    continue;
                }
            }
            // Truncated in place: start over at its beginning.
            Ok(meta) if meta.len() < position => {
                file = tokio::fs::File::open(path).await?;
                position = 0;
                continue;
            }
            _ => {}
        }
        if last_check.is_none_or(|t| t.elapsed() >= RUNNING_CHECK) {
            last_check = Some(Instant::now());
            // One more read after the container stopped picks up its last output.
            exited = !is_running().await;
            if exited {
                continue;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = out.tx.closed() => return Ok(()),
        }
    }
}

/// Waits until the log file appears, the container stops, or the client goes away.
async fn wait_for_file(path: &std::path::Path, is_running: &RunningCheck, out: &mut Output) -> io::Result<()> {
    let mut last_check = Instant::now();
    while tokio::fs::metadata(path).await.is_err() {
        if last_check.elapsed() >= RUNNING_CHECK {
            last_check = Instant::now();
            if !is_running().await {
                return Ok(());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = out.tx.closed() => return Ok(()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339_nanos("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_nanos("1970-01-01T00:00:01.5Z"), Some(1_500_000_000));
        assert_eq!(
            parse_rfc3339_nanos("2024-02-29T12:34:56.123456789Z"),
            Some(1_709_210_096_123_456_789)
        );
        assert_eq!(
            parse_rfc3339_nanos("2024-02-29T14:34:56.123456789+02:00"),
            parse_rfc3339_nanos("2024-02-29T12:34:56.123456789Z")
        );
        assert_eq!(
            parse_rfc3339_nanos("2024-02-29 12:34:56Z"),
            Some(1_709_210_096_000_000_000)
        );
        for bad in [
            "",
            "2024-02-29",
            "2024-13-01T00:00:00Z",
            "2024-02-29T12:34:56",
            "2024-02-29T12:34:56.Z",
        ] {
            assert_eq!(parse_rfc3339_nanos(bad), None, "{bad}");
        }
    }

    #[test]
    fn decoder_joins_partial_records_across_chunks() {
        let raw = b"2024-01-01T00:00:00.1Z stdout F one\n\
                    2024-01-01T00:00:01.1Z stderr P tw\n\
                    2024-01-01T00:00:02.1Z stderr F o\n\
                    not a record\n\
                    2024-01-01T00:00:03.1Z stdout F \n\
                    2024-01-01T00:00:04.1Z stdout P tail";
        for split in [1, 7, 40, raw.len()] {
            let mut decoder = Decoder::default();
            let mut lines = Vec::new();
            for chunk in raw.chunks(split) {
                decoder.feed(chunk, &mut lines);
            }
            decoder.finish(&mut lines);
            let texts: Vec<(&str, &[u8])> = lines.iter().map(|l| (l.timestamp.as_str(), &l.text[..])).collect();
            assert_eq!(
                texts,
                [
                    ("2024-01-01T00:00:00.1Z", &b"one\n"[..]),
                    ("2024-01-01T00:00:01.1Z", b"two\n"),
                    ("", b"not a record\n"),
                    ("2024-01-01T00:00:03.1Z", b"\n"),
                    ("2024-01-01T00:00:04.1Z", b"tail"),
                ],
                "chunks of {split}"
            );
        }
    }

    #[test]
    fn options_from_query() {
        let q = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let o = LogOptions::from_query(&q(&[("follow", "true"), ("tailLines", "3"), ("limitBytes", "10")])).unwrap();
        assert!(o.follow && !o.previous && o.tail_lines == Some(3) && o.limit_bytes == Some(10));
        let o = LogOptions::from_query(&q(&[("sinceTime", "2024-01-01T00:00:00Z")])).unwrap();
        assert_eq!(o.since_nanos, Some(1_704_067_200_000_000_000));
        assert!(LogOptions::from_query(&q(&[("tailLines", "-1")])).is_err());
        assert!(LogOptions::from_query(&q(&[("sinceSeconds", "0")])).is_err());
        assert!(LogOptions::from_query(&q(&[("sinceSeconds", "5"), ("sinceTime", "2024-01-01T00:00:00Z")])).is_err());
    }

    async fn read_log(path: &std::path::Path, options: LogOptions) -> String {
        let (tx, mut rx) = mpsc::channel(4);
        let running: RunningCheck = Box::new(|| Box::pin(async { false }));
        tokio::spawn(stream_log(path.to_path_buf(), options, running, tx));
        let mut text = Vec::new();
        while let Some(Ok(frame)) = rx.recv().await {
            text.extend_from_slice(&frame.into_data().unwrap_or_default());
        }
        String::from_utf8(text).unwrap()
    }

    #[tokio::test]
    async fn tail_since_timestamps_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        std::fs::write(
            &path,
            "2024-01-01T00:00:00Z stdout F a\n2024-01-01T00:00:10Z stdout F b\n2024-01-01T00:00:20Z stderr F c\n",
        )
        .unwrap();
        assert_eq!(read_log(&path, LogOptions::default()).await, "a\nb\nc\n");
        let tail = LogOptions {
            tail_lines: Some(2),
            ..Default::default()
        };
        assert_eq!(read_log(&path, tail).await, "b\nc\n");
        let since = LogOptions {
            since_nanos: parse_rfc3339_nanos("2024-01-01T00:00:10Z"),
            timestamps: true,
            ..Default::default()
        };
        assert_eq!(
            read_log(&path, since).await,
            "2024-01-01T00:00:10Z b\n2024-01-01T00:00:20Z c\n"
        );
        let limit = LogOptions {
            limit_bytes: Some(3),
            ..Default::default()
        };
        assert_eq!(read_log(&path, limit).await, "a\nb");
        let zero = LogOptions {
            tail_lines: Some(0),
            ..Default::default()
        };
        assert_eq!(read_log(&path, zero).await, "");
        // Following a stopped container returns what there is.
        let follow = LogOptions {
            follow: true,
            tail_lines: Some(1),
            ..Default::default()
        };
        assert_eq!(read_log(&path, follow).await, "c\n");
    }

    #[tokio::test]
    async fn follow_survives_rotation_and_truncation_and_ends_with_the_container() {
        use std::io::Write;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let append = |text: &str| {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap();
            writeln!(f, "2024-01-01T00:00:00Z stdout F {text}").unwrap();
        };
        append("a");
        let running = Arc::new(AtomicBool::new(true));
        let check = running.clone();
        let is_running: RunningCheck = Box::new(move || {
            let running = check.load(Ordering::SeqCst);
            Box::pin(async move { running })
        });
        let options = LogOptions {
            follow: true,
            ..Default::default()
        };
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(stream_log(path.clone(), options, is_running, tx));
        let mut next = async || {
            let frame = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
            frame.ok().flatten().map(|f| f.unwrap().into_data().unwrap())
        };
        assert_eq!(next().await.as_deref(), Some(&b"a\n"[..]));
        append("b");
        assert_eq!(next().await.as_deref(), Some(&b"b\n"[..]));
        std::fs::rename(&path, dir.path().join("c.log.1")).unwrap();
        append("c");
        assert_eq!(next().await.as_deref(), Some(&b"c\n"[..]));
        // Truncation in place is noticed once the file is shorter than what was read.
        std::fs::write(&path, "").unwrap();
        tokio::time::sleep(POLL * 3).await;
        append("d");
        assert_eq!(next().await.as_deref(), Some(&b"d\n"[..]));
        running.store(false, Ordering::SeqCst);
        assert_eq!(next().await, None);
        task.await.unwrap();
    }
}
