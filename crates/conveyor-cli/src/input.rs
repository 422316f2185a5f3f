//! Reading JSON lines: validation, key extraction, line numbers.

use std::io::{self, BufRead};

use serde::{Deserialize, Serialize};
use serde_json::Value;

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
}

/// Reads and checks JSON lines one at a time, so a bad line never stops the others.
#[derive(Debug)]
pub(crate) struct LineReader<R> {
    inner: R,
    /// Lines consumed so far, blank and bad ones included: the resume position.
    line_no: u64,
    buf: Vec<u8>,
    key: Option<KeySpec>,
}

impl<R: BufRead> LineReader<R> {
    pub(crate) fn new(inner: R, key: Option<KeySpec>) -> Self {
        Self {
            inner,
            line_no: 0,
            buf: Vec::with_capacity(1024),
            key,
        }
    }

    /// Lines consumed so far.
    pub(crate) fn position(&self) -> u64 {
        self.line_no
    }

    /// Skips the first `lines` lines (those a previous run already took), returning how many
    /// there were (fewer if the input is shorter).
    pub(crate) fn skip(&mut self, lines: u64) -> io::Result<u64> {
        while self.line_no < lines {
            self.buf.clear();
            if self.inner.read_until(b'\n', &mut self.buf)? == 0 {
                break;
            }
            self.line_no += 1;
        }
        Ok(self.line_no)
    }

    /// The next line, `None` at the end of the input.
    ///
    /// # Errors
    ///
    /// Only I/O errors of the input; bad lines are [`Parsed::Rejected`].
    pub(crate) fn next_line(&mut self) -> io::Result<Option<Parsed>> {
        self.buf.clear();
        if self.inner.read_until(b'\n', &mut self.buf)? == 0 {
            return Ok(None);
        }
        self.line_no += 1;
        let line = self.line_no;
        let mut raw = self.buf.as_slice();
        raw = raw.strip_suffix(b"\n").unwrap_or(raw);
        raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line == 1 {
            // A byte order mark, as some editors (Notepad) start a UTF-8 file with: it marks
            // the file, not the line, which would not be JSON with it.
            raw = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
        }
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(Some(Parsed::Blank));
        }
        let reject = |reason: String| Parsed::Rejected {
            line,
            raw: raw.to_vec(),
            reason,
        };
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
        std::iter::from_fn(|| reader.next_line().unwrap()).collect()
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
                Parsed::Blank => panic!("blank"),
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
        match reader.next_line().unwrap() {
            Some(Parsed::Item { line, .. }) => assert_eq!(line.line, 4),
            other => panic!("{other:?}"),
        }
        assert_eq!(reader.next_line().unwrap(), None);
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
            reader.next_line().unwrap(),
            Some(Parsed::Rejected { line: 1, .. })
        ));
        assert!(matches!(
            reader.next_line().unwrap(),
            Some(Parsed::Item { .. })
        ));
    }
}
