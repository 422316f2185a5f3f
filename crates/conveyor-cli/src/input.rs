//! Reading JSON lines: validation, key extraction, line numbers.

use std::io::{self, BufRead, ErrorKind};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The longest line `send` takes, in bytes without its line ending: a longer one is bad input.
/// Four times it still fits a journal entry (SQLite's limit of about 1 GB): the journal stores
/// the line as a JSON string (where a `"` takes two bytes) and its key twice, so every line
/// within the limit fits, and a line is taken or refused alike with and without `--no-journal`.
/// A longer line is never held in memory whole.
pub(crate) const MAX_LINE: usize = 128 * 1024 * 1024;

/// One input line on its way to the sink. Serializable so the journal can hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Line {
    /// 1-based line number in the input, for messages and dead letters.
    pub(crate) line: u64,
    /// The line as read, without its line ending: the request body.
    pub(crate) body: String,
}

impl AsRef<[u8]> for Line {
    fn as_ref(&self) -> &[u8] {
        self.body.as_bytes()
    }
}

/// Where a line's lane key comes from (`--key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeySpec {
    /// A top-level field name.
    Field(String),
    /// A JSON pointer (starts with `/`).
    Pointer(String),
}

impl KeySpec {
    pub(crate) fn parse(text: &str) -> Self {
        if text.starts_with('/') {
            Self::Pointer(text.to_owned())
        } else {
            Self::Field(text.to_owned())
        }
    }

    fn name(&self) -> &str {
        match self {
            Self::Field(name) | Self::Pointer(name) => name,
        }
    }

    /// The key of one JSON value: strings as they are, numbers and booleans as their JSON text.
    fn extract(&self, value: &Value) -> Result<String, String> {
        let found = match self {
            Self::Field(name) => value.get(name),
            Self::Pointer(pointer) => value.pointer(pointer),
        };
        match found {
            // An `--exec` program gets the key in its environment, which cannot hold a NUL: every
            // attempt would fail. Refused here as bad input, for every target alike.
            Some(Value::String(s)) if s.contains('\0') => Err(format!(
                "key field `{}` contains a NUL character (\\u0000), which a key cannot hold",
                self.name()
            )),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(v.to_string()),
            Some(Value::Null) | None => Err(format!("no key field `{}`", self.name())),
            Some(_) => Err(format!(
                "key field `{}` is an object or array; it must be a string, number or boolean",
                self.name()
            )),
        }
    }
}

/// The outcome of reading one line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A valid line, with its key when `--key` is given.
    Item { line: Line, key: Option<String> },
    /// An empty or all-whitespace line: skipped silently, as JSON-lines readers do.
    Blank,
    /// Bad input, to report and copy to `--rejects`.
    Rejected {
        line: u64,
        raw: Vec<u8>,
        reason: String,
    },
    /// A line longer than the limit: bad input too, whose bytes (without the line ending) went
    /// to the `overlong` callback of [`LineReader::next_line`] as they were read.
    Overlong { line: u64, size: u64 },
}

/// What the reason of an overlong line says.
pub(crate) fn overlong_reason(size: u64, limit: usize) -> String {
    format!(
        "{size} bytes, longer than the {limit} bytes a line may have: split it into smaller lines"
    )
}

/// How a line was read into the reader's buffer.
enum Fill {
    /// The end of the input: no line.
    End,
    /// The line is in the buffer, with its line ending.
    Line,
    /// The line was longer than the limit; this many bytes of it went to the callback.
    Overlong(u64),
}

/// Passes the bytes of an overlong line on, without its line ending: the last `\r` seen is held
/// back until the next byte shows whether it is the line's end (`\r\n`) or part of it.
struct Spill<'a> {
    out: &'a mut dyn FnMut(&[u8]),
    held_cr: bool,
    size: u64,
}

impl Spill<'_> {
    /// `piece` is the next part of the line; `last` when it ends with the `\n` (if any) that ends
    /// the line.
    fn push(&mut self, piece: &[u8], last: bool) {
        let mut piece = if last {
            piece.strip_suffix(b"\n").unwrap_or(piece)
        } else {
            piece
        };
        if self.held_cr && !(last && piece.is_empty()) {
            self.emit(b"\r");
        }
        self.held_cr = false;
        if let Some(rest) = piece.strip_suffix(b"\r") {
            self.held_cr = !last;
            piece = rest;
        }
        self.emit(piece);
    }

    fn emit(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            (self.out)(bytes);
            self.size += bytes.len() as u64;
        }
    }
}

/// What the line buffer starts with: most JSON lines fit.
const INITIAL_BUF: usize = 1024;

/// The UTF-8 byte order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reads and checks JSON lines one at a time, so a bad line never stops the others.
#[derive(Debug)]
pub(crate) struct LineReader<R> {
    inner: R,
    /// Lines consumed so far, blank and bad ones included: the resume position.
    line_no: u64,
    buf: Vec<u8>,
    key: Option<KeySpec>,
    /// The longest line taken ([`MAX_LINE`], less in tests).
    max_line: usize,
}

impl<R: BufRead> LineReader<R> {
    pub(crate) fn new(inner: R, key: Option<KeySpec>) -> Self {
        Self {
            inner,
            line_no: 0,
            buf: Vec::with_capacity(INITIAL_BUF),
            key,
            max_line: MAX_LINE,
        }
    }

    /// The same reader with another line limit, for tests that do not allocate 128 MiB.
    #[cfg(test)]
    fn with_max_line(self, max_line: usize) -> Self {
        Self { max_line, ..self }
    }

    /// Reads the next line into `buf`, line ending included, unless it is longer than the limit:
    /// then its bytes go to `overlong` as they are read, and only about the limit is ever held.
    fn read_line(&mut self, overlong: &mut dyn FnMut(&[u8])) -> io::Result<Fill> {
        self.buf.clear();
        // A line within the limit takes at most this much, with its `\r\n` (and a byte order
        // mark on the first line); `next_line` refuses what is longer but less than this.
        let most = self.max_line.saturating_add(BOM.len() + 2);
        let mut spill: Option<Spill<'_>> = None;
        loop {
            let available = match self.inner.fill_buf() {
                Ok(available) => available,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                break;
            }
            let end = available.iter().position(|&b| b == b'\n');
            let piece = &available[..end.map_or(available.len(), |i| i + 1)];
            let last = end.is_some();
            match &mut spill {
                Some(spill) => spill.push(piece, last),
                None => {
                    self.buf.extend_from_slice(piece);
                    if self.buf.len() > most {
                        let mut head = self.buf.as_slice();
                        if self.line_no == 0 {
                            head = head.strip_prefix(BOM).unwrap_or(head);
                        }
                        let mut started = Spill {
                            out: &mut *overlong,
                            held_cr: false,
                            size: 0,
                        };
                        started.push(head, last);
                        // What the line took is not kept for the rest of the run.
                        self.buf.clear();
                        self.buf.shrink_to(INITIAL_BUF);
                        spill = Some(started);
                    }
                }
            }
            let used = piece.len();
            self.inner.consume(used);
            if last {
                break;
            }
        }
        // Every piece read is at least a byte, and went to the buffer when it was not spilled.
        Ok(match spill {
            Some(spill) => Fill::Overlong(spill.size),
            None if self.buf.is_empty() => Fill::End,
            None => Fill::Line,
        })
    }

    /// Lines consumed so far.
    pub(crate) fn position(&self) -> u64 {
        self.line_no
    }

    /// Skips the first `lines` lines (those a previous run already took), returning how many
    /// there were (fewer if the input is shorter).
    pub(crate) fn skip(&mut self, lines: u64) -> io::Result<u64> {
        while self.line_no < lines {
            if matches!(self.read_line(&mut |_| {})?, Fill::End) {
                break;
            }
            self.line_no += 1;
        }
        Ok(self.line_no)
    }

    /// The next line, `None` at the end of the input. The bytes of a line longer than the limit
    /// go to `overlong` as they are read (for `--rejects`), and it comes back as
    /// [`Parsed::Overlong`].
    ///
    /// # Errors
    ///
    /// Only I/O errors of the input; bad lines are [`Parsed::Rejected`] or [`Parsed::Overlong`].
    pub(crate) fn next_line(
        &mut self,
        overlong: &mut dyn FnMut(&[u8]),
    ) -> io::Result<Option<Parsed>> {
        let read = self.read_line(overlong)?;
        if matches!(read, Fill::End) {
            return Ok(None);
        }
        self.line_no += 1;
        let line = self.line_no;
        if let Fill::Overlong(size) = read {
            return Ok(Some(Parsed::Overlong { line, size }));
        }
        let mut raw = self.buf.as_slice();
        raw = raw.strip_suffix(b"\n").unwrap_or(raw);
        raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line == 1 {
            // A byte order mark, as some editors (Notepad) start a UTF-8 file with: it marks
            // the file, not the line, which would not be JSON with it.
            raw = raw.strip_prefix(BOM).unwrap_or(raw);
        }
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(Some(Parsed::Blank));
        }
        let reject = |reason: String| Parsed::Rejected {
            line,
            raw: raw.to_vec(),
            reason,
        };
        // Just over the limit: not worth spilling, but refused all the same.
        if raw.len() > self.max_line {
            return Ok(Some(reject(overlong_reason(
                raw.len() as u64,
                self.max_line,
            ))));
        }
        let Ok(text) = std::str::from_utf8(raw) else {
            return Ok(Some(reject("not valid UTF-8".into())));
        };
        let key = match &self.key {
            None => match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => None,
                Err(e) => return Ok(Some(reject(format!("not valid JSON: {e}")))),
            },
            Some(spec) => match serde_json::from_str::<Value>(text) {
                Ok(value) => match spec.extract(&value) {
                    Ok(key) => Some(key),
                    Err(why) => return Ok(Some(reject(why))),
                },
                Err(e) => return Ok(Some(reject(format!("not valid JSON: {e}")))),
            },
        };
        Ok(Some(Parsed::Item {
            line: Line {
                line,
                body: text.to_owned(),
            },
            key,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &str, key: Option<&str>) -> Vec<Parsed> {
        let mut reader = LineReader::new(input.as_bytes(), key.map(KeySpec::parse));
        std::iter::from_fn(|| reader.next_line(&mut |_| panic!("not overlong")).unwrap()).collect()
    }

    #[test]
    fn good_bad_and_blank_lines_keep_their_numbers() {
        let parsed = read_all("{\"a\":1}\r\nnope\n\n  \n[1,2]", None);
        assert_eq!(parsed.len(), 5);
        assert_eq!(
            parsed[0],
            Parsed::Item {
                line: Line {
                    line: 1,
                    body: "{\"a\":1}".into()
                },
                key: None
            }
        );
        match &parsed[1] {
            Parsed::Rejected { line, raw, reason } => {
                assert_eq!((*line, raw.as_slice()), (2, &b"nope"[..]));
                assert!(reason.contains("not valid JSON"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parsed[2], Parsed::Blank);
        assert_eq!(parsed[3], Parsed::Blank);
        assert!(matches!(&parsed[4], Parsed::Item { line, .. } if line.line == 5));
    }

    #[test]
    fn keys_from_fields_and_pointers() {
        let input =
            "{\"u\":\"ann\",\"n\":{\"id\":7}}\n{\"u\":3}\n{\"n\":1}\n{\"u\":[1]}\n{\"u\":null}\n";
        let keys: Vec<Result<String, String>> = read_all(input, Some("u"))
            .into_iter()
            .map(|p| match p {
                Parsed::Item { key, .. } => Ok(key.unwrap()),
                Parsed::Rejected { reason, .. } => Err(reason),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(keys[0], Ok("ann".into()));
        assert_eq!(keys[1], Ok("3".into()));
        assert!(keys[2].as_ref().unwrap_err().contains("no key field `u`"));
        assert!(keys[3].as_ref().unwrap_err().contains("object or array"));
        assert!(keys[4].is_err());

        let nul = read_all("{\"u\":\"a\\u0000b\"}\n", Some("u"));
        assert!(
            matches!(&nul[0], Parsed::Rejected { reason, .. } if reason.contains("NUL")),
            "{nul:?}"
        );

        let pointer = read_all("{\"n\":{\"id\":7}}\n", Some("/n/id"));
        assert!(matches!(&pointer[0], Parsed::Item { key: Some(k), .. } if k == "7"));
    }

    #[test]
    fn skip_counts_every_line() {
        let mut reader = LineReader::new("{}\nbad\n\n{\"x\":1}\n".as_bytes(), None);
        assert_eq!(reader.skip(3).unwrap(), 3);
        match reader.next_line(&mut |_| panic!("not overlong")).unwrap() {
            Some(Parsed::Item { line, .. }) => assert_eq!(line.line, 4),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            reader.next_line(&mut |_| panic!("not overlong")).unwrap(),
            None
        );
        assert_eq!(reader.position(), 4);
        let mut short = LineReader::new("{}\n".as_bytes(), None);
        assert_eq!(short.skip(10).unwrap(), 1);
    }

    #[test]
    fn a_byte_order_mark_is_dropped_from_the_first_line_only() {
        let parsed = read_all("\u{feff}{\"a\":1}\n\u{feff}{}\n", None);
        assert!(
            matches!(&parsed[0], Parsed::Item { line, .. } if line.body == "{\"a\":1}"),
            "{parsed:?}"
        );
        assert!(
            matches!(&parsed[1], Parsed::Rejected { line: 2, .. }),
            "{parsed:?}"
        );
        assert_eq!(read_all("\u{feff}\n{}", None)[0], Parsed::Blank);
    }

    #[test]
    fn invalid_utf8_is_rejected_not_fatal() {
        let mut reader = LineReader::new(&b"\xff\xfe\n{}\n"[..], None);
        assert!(matches!(
            reader.next_line(&mut |_| panic!("not overlong")).unwrap(),
            Some(Parsed::Rejected { line: 1, .. })
        ));
        assert!(matches!(
            reader.next_line(&mut |_| panic!("not overlong")).unwrap(),
            Some(Parsed::Item { .. })
        ));
    }

    /// Reads `input` with a limit of `max_line`, returning each line's outcome and the bytes that
    /// were spilled for it, and the most the reader's buffer ever held.
    fn read_limited(input: &[u8], max_line: usize) -> (Vec<(Parsed, Vec<u8>)>, usize) {
        let mut reader =
            LineReader::new(io::BufReader::with_capacity(64, input), None).with_max_line(max_line);
        let mut lines = Vec::new();
        let mut held = 0;
        loop {
            let mut spilled = Vec::new();
            let parsed = reader
                .next_line(&mut |bytes| spilled.extend_from_slice(bytes))
                .unwrap();
            held = held.max(reader.buf.capacity());
            match parsed {
                Some(parsed) => lines.push((parsed, spilled)),
                None => return (lines, held),
            }
        }
    }

    #[test]
    fn a_line_over_the_limit_is_passed_on_never_held_whole() {
        let long = format!("{{\"pad\":\"{}\"}}", "x".repeat(100_000));
        let input = format!("{{\"a\":1}}\n{long}\r\n{{\"b\":2}}\n{long}");
        let (lines, held) = read_limited(input.as_bytes(), 1000);
        assert!(held < 4096, "the reader held {held} bytes");
        assert_eq!(lines.len(), 4);
        assert!(matches!(&lines[0].0, Parsed::Item { line, .. } if line.line == 1));
        for i in [1, 3] {
            let (parsed, spilled) = &lines[i];
            assert_eq!(
                *parsed,
                Parsed::Overlong {
                    line: i as u64 + 1,
                    size: long.len() as u64
                }
            );
            // Every byte, and no line ending.
            assert!(spilled == long.as_bytes(), "line {}", i + 1);
        }
        assert!(matches!(&lines[2].0, Parsed::Item { line, .. } if line.line == 3));
    }

    #[test]
    fn the_limit_counts_the_line_without_its_ending() {
        let at = |n: usize, ending: &str| format!("\"{}\"{ending}", "x".repeat(n - 2));
        for ending in ["\n", "\r\n", ""] {
            let (lines, _) = read_limited(at(100, ending).as_bytes(), 100);
            assert!(
                matches!(&lines[0].0, Parsed::Item { .. }),
                "{ending:?}: {lines:?}"
            );
            for over in [101, 102, 103, 5000] {
                let (lines, _) = read_limited(at(over, ending).as_bytes(), 100);
                let size = match &lines[0] {
                    (Parsed::Overlong { size, .. }, spilled) => {
                        assert_eq!(spilled.len() as u64, *size);
                        *size
                    }
                    (Parsed::Rejected { raw, reason, .. }, _) => {
                        assert!(reason.contains("longer than the 100 bytes"), "{reason}");
                        raw.len() as u64
                    }
                    other => panic!("{over} {ending:?}: {other:?}"),
                };
                assert_eq!(size, over as u64, "{ending:?}");
            }
        }
        // A `\r` inside the line is kept, and the one of its `\r\n` is not, though each ends
        // one of the reader's 64-byte reads; a byte order mark is not kept either.
        let inside = format!("\u{feff}{}\r{}\r\n", "a".repeat(60), "b".repeat(63));
        let (lines, _) = read_limited(inside.as_bytes(), 50);
        let expected = format!("{}\r{}", "a".repeat(60), "b".repeat(63));
        assert!(lines[0].1 == expected.as_bytes(), "{:?}", lines[0]);
    }

    #[test]
    fn skipping_holds_no_overlong_line() {
        let input = format!("{}\n{{}}\n", "x".repeat(100_000));
        let mut reader = LineReader::new(io::BufReader::with_capacity(64, input.as_bytes()), None)
            .with_max_line(1000);
        assert_eq!(reader.skip(1).unwrap(), 1);
        assert!(reader.buf.capacity() < 4096, "{}", reader.buf.capacity());
        let next = reader.next_line(&mut |_| panic!("not overlong")).unwrap();
        assert!(matches!(next, Some(Parsed::Item { line, .. }) if line.line == 2));
    }
}
