//! The CRI container log format: one line per chunk,
//! `<RFC3339Nano time> <stdout|stderr> <P|F> <text>`. `F` ends a line of the
//! container's output, `P` marks a piece of a longer line (or of output not
//! yet ended by a newline when the stream closes).

use std::io::{self, Write};

/// Longest piece of one line written as a single log line; longer lines are split.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Buffers one stream's bytes until a newline (or the size cap) and writes log lines.
#[derive(Debug)]
pub struct LineSplitter {
    stream: Stream,
    pending: Vec<u8>,
}

impl LineSplitter {
    pub fn new(stream: Stream) -> Self {
        LineSplitter {
            stream,
            pending: Vec::new(),
        }
    }

    /// Feeds output bytes; complete lines (and full-size pieces) are written to `out`.
    pub fn feed(&mut self, mut data: &[u8], now: &str, out: &mut impl Write) -> io::Result<()> {
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(newline) if self.pending.len() + newline <= MAX_LINE_BYTES => {
                    self.pending.extend_from_slice(&data[..newline]);
                    write_line(out, now, self.stream, true, &self.pending)?;
                    self.pending.clear();
                    data = &data[newline + 1..];
                }
                _ => {
                    let room = MAX_LINE_BYTES - self.pending.len();
                    let take = room.min(data.len());
                    self.pending.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.pending.len() == MAX_LINE_BYTES {
                        write_line(out, now, self.stream, false, &self.pending)?;
                        self.pending.clear();
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes what is left when the stream ends, as a partial line.
    pub fn finish(&mut self, now: &str, out: &mut impl Write) -> io::Result<()> {
        if !self.pending.is_empty() {
            write_line(out, now, self.stream, false, &self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }
}

fn write_line(out: &mut impl Write, now: &str, stream: Stream, full: bool, text: &[u8]) -> io::Result<()> {
    let mut line = Vec::with_capacity(now.len() + text.len() + 12);
    line.extend_from_slice(now.as_bytes());
    line.push(b' ');
    line.extend_from_slice(stream.as_str().as_bytes());
    line.extend_from_slice(if full { b" F " } else { b" P " });
    line.extend_from_slice(text);
    line.push(b'\n');
    out.write_all(&line)
}

/// The current time as RFC 3339 with nanoseconds, in UTC: `2026-11-22T03:04:05.123456789Z`.
pub fn rfc3339_nano_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339_nano(now.as_secs() as i64, now.subsec_nanos())
}

pub fn rfc3339_nano(unix_seconds: i64, nanos: u32) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let seconds_of_day = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        seconds_of_day / 3600,
        seconds_of_day % 3600 / 60,
        seconds_of_day % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-11-22T00:00:00.000000000Z";

    fn lines(chunks: &[&[u8]], finish: bool) -> String {
        let mut out = Vec::new();
        let mut splitter = LineSplitter::new(Stream::Stdout);
        for chunk in chunks {
            splitter.feed(chunk, NOW, &mut out).unwrap();
        }
        if finish {
            splitter.finish(NOW, &mut out).unwrap();
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn complete_lines_across_chunks() {
        assert_eq!(
            lines(&[b"hel", b"lo\nwor", b"ld\n"], false),
            format!("{NOW} stdout F hello\n{NOW} stdout F world\n")
        );
        assert_eq!(lines(&[b"\n"], false), format!("{NOW} stdout F \n"));
    }

    #[test]
    fn unterminated_output_is_partial_at_the_end() {
        assert_eq!(lines(&[b"no newline"], true), format!("{NOW} stdout P no newline\n"));
        assert_eq!(lines(&[b"no newline"], false), "");
    }

    #[test]
    fn long_lines_are_split_into_partials() {
        let long = vec![b'x'; MAX_LINE_BYTES * 2 + 5];
        let mut input = long.clone();
        input.push(b'\n');
        let text = lines(&[&input], false);
        let tags: Vec<&str> = text.lines().map(|l| l.split(' ').nth(2).unwrap()).collect();
        assert_eq!(tags, ["P", "P", "F"]);
        let rebuilt: usize = text.lines().map(|l| l.splitn(4, ' ').nth(3).unwrap().len()).sum();
        assert_eq!(rebuilt, long.len());
    }

    #[test]
    fn formats_rfc3339_nano() {
        assert_eq!(rfc3339_nano(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339_nano(1_795_305_845, 123_456_789),
            "2026-11-22T00:04:05.123456789Z"
        );
        assert_eq!(rfc3339_nano(951_782_400, 1), "2000-02-29T00:00:00.000000001Z");
    }
}
