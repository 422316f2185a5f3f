//! The blocking HTTP sink (cargo feature `http`).
//!
//! One [`HttpSink`] owns one `reqwest` blocking client, so every delivery reuses the same pool of
//! keep-alive connections whatever thread the conveyor runs it on. The sink classifies each outcome
//! for the engine's retry policy: 2xx succeeds; connection errors, timeouts, 408, 425, 429 and
//! 5xx but 501 and 505 are retryable (honouring `Retry-After`); every other status is permanent.
//!
//! Header values are treated as secrets (they usually carry tokens): they are marked sensitive for
//! `reqwest`, never appear in `Debug` output, and are scrubbed from error messages that quote
//! what a server sent back (the rule is on [`HttpSink`]).

use std::fmt;
use std::io::{self, ErrorKind, Read};
use std::time::{Duration, Instant, SystemTime};

use reqwest::blocking::{Client, Response};
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER, USER_AGENT,
};
use reqwest::{Method, StatusCode, Url};

use crate::{Delivery, SinkError};

/// Header carrying [`Delivery::idempotency_key`], stable across retries (and restarts with a journal).
pub(crate) const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";
/// Header carrying [`Delivery::seq`], so a receiver can drop anything at or below the last seq seen
/// (under strict ordering; per key under keyed ordering; not under pipelined ordering, where
/// items overlap).
pub(crate) const SEQ_HEADER: &str = "Conveyor-Seq";
/// Header carrying [`Delivery::attempt`] (1 on the first try).
pub(crate) const ATTEMPT_HEADER: &str = "Conveyor-Attempt";
/// Header carrying [`Delivery::key`], for items sent with a key, percent-encoded ([`encode_key`]).
const KEY_HEADER: &str = "Conveyor-Key";
/// Set per delivery: a user value would be sent next to it, and a receiver reading the first
/// value (a fixed `Idempotency-Key`, say) would take every item for a duplicate.
const PER_DELIVERY_HEADERS: [&str; 4] = [
    IDEMPOTENCY_KEY_HEADER,
    SEQ_HEADER,
    ATTEMPT_HEADER,
    KEY_HEADER,
];

/// Sent unless the user gives a `User-Agent`: some APIs (GitHub's, say) refuse a request
/// without one, which would fail every item for good, and a receiver's logs can then tell
/// conveyor's requests apart.
const DEFAULT_USER_AGENT: &str = concat!("conveyor/", env!("CARGO_PKG_VERSION"));
/// How much of an error response's body goes into the error message.
const ERROR_BODY_CHARS: usize = 200;
/// How much of an error response's body is read: plenty to quote [`ERROR_BODY_CHARS`] of it
/// after control characters are dropped, and to scrub whole secrets from, while a huge error
/// page (a 1 GiB 503) costs no more memory than this.
const ERROR_BODY_BYTES: u64 = 64 * 1024;
/// Header values and words shorter than this are not scrubbed: they are too short to be
/// secrets, and replacing every `0` or `eu` in a message would make it unreadable.
const MIN_SECRET_CHARS: usize = 6;
/// Added to a failure because no trusted root signed the server's certificate: most often a
/// company's private CA, which each front takes in its own way. (Still retryable: the fix is
/// made outside, and an item paused or kept meanwhile is then delivered.)
const UNKNOWN_ISSUER: &str = " (no trusted certificate authority signed the server's \
    certificate: if a private CA did, trust it with --cacert FILE in the CLI, cafile= in Python, \
    or HttpSinkBuilder::root_certificates in Rust)";
/// Added to a failure because the server's certificate is a CA's (`CA:TRUE`), which rustls
/// refuses as a server's own even when it is trusted: `openssl req -x509` makes such a
/// certificate unless told otherwise, the usual way to a self-signed one, and rustls names the
/// problem in words no one searches for.
const CA_USED_AS_END_ENTITY: &str = " (the server's certificate is a certificate authority's \
    (basicConstraints CA:TRUE), which is refused as a server's own certificate even when \
    trusted: make it again with `-addext basicConstraints=critical,CA:FALSE` added to `openssl \
    req -x509`, or sign a server certificate with that CA and trust the CA)";
/// The most room set aside for a 2xx body before it arrives, whatever its `Content-Length`
/// says; a longer body grows the buffer as it comes.
const PREALLOCATED_REPLY_BODY: u64 = 64 * 1024;
/// What a scrubbed secret becomes.
const REDACTED: &str = "<redacted>";

/// Delivers items as HTTP requests, one request per delivery.
///
/// The item's bytes (`T: AsRef<[u8]>`) are the request body. Every request carries
/// `Idempotency-Key` ([`Delivery::idempotency_key`]), `Conveyor-Seq` ([`Delivery::seq`]) and
/// `Conveyor-Attempt` ([`Delivery::attempt`]) so receivers can drop duplicates, and
/// `Conveyor-Key` ([`Delivery::key`]) for items sent with a key. These four are the
/// conveyor's: [`HttpSinkBuilder::build`] refuses a user header with one of their names.
///
/// `Conveyor-Key` is percent-encoded, so that every key arrives, and arrives as it was sent
/// (a header value cannot hold a line break, and servers trim spaces and mangle non-ASCII):
/// each byte of the key's UTF-8 that is not visible ASCII (`!` to `~`), and `%` itself, is
/// written `%XX`. `user-42` is sent as it is, `a b` as `a%20b`, `café` as `caf%C3%A9` and
/// `50%` as `50%25`; decode it as a URL path segment is decoded.
///
/// | outcome | result |
/// |---|---|
/// | 2xx | `Ok(HttpReply)` |
/// | connect error, timeout, broken connection | retryable [`SinkError`]; a connect error's message names the host and port and says why (`cannot connect to 127.0.0.1:9: connection refused; ...`) |
/// | 408, 425, 429, 5xx but 501 and 505 | retryable, with `Retry-After` as [`SinkError::with_retry_after`] |
/// | any other status (3xx: redirects are not followed; 501 Not Implemented and 505 HTTP Version Not Supported, which no retry changes) | permanent; a 3xx says its `Location` |
///
/// # Secrets
///
/// Header values are treated as secrets: they never appear in `Debug` output, and error
/// messages that quote what a server sent back have them replaced with `<redacted>`. Each value,
/// and each whitespace-separated word of one, that is at least 6 characters long is replaced, so
/// a token that a server echoes without its `Bearer` is hidden too. Shorter values and words
/// (`X-Shard: 0`, `X-Region: eu`) are left alone: they are too short to be secrets, and
/// replacing every `0` would garble every message. The scheme word of an `Authorization` value
/// (`Bearer`, `Digest`) is not a secret either, and the status line (`HTTP 503 Service
/// Unavailable`), which is the client's own text, is never touched.
///
/// The sink uses a blocking client, so run it with [`Builder::build`](crate::Builder::build),
/// not `build_async`: the conveyor's own threads make the calls. It may be built and dropped
/// anywhere, inside an async runtime too.
///
/// # Examples
///
/// ```no_run
/// use conveyor::{Conveyor, HttpSink};
///
/// let sink = HttpSink::builder("https://example.com/events")
///     .header("Authorization", "Bearer s3cret")
///     .build()?;
/// let c: Conveyor<String, conveyor::HttpReply> = Conveyor::builder().build(sink.into_sink())?;
/// c.send(r#"{"n":1}"#.to_string())?;
/// c.flush();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct HttpSink {
    client: Client,
    url: Url,
    method: Method,
    /// User headers, marked sensitive. Kept whole so each request clones one map.
    headers: HeaderMap,
    /// What to scrub out of server text quoted in errors: header values and their words (see
    /// [`secrets_of`]), longest first, so the longest one matching at a place is replaced.
    secrets: Vec<String>,
    /// How much of a 2xx body [`HttpReply::body`] keeps ([`HttpSinkBuilder::max_reply_body`]).
    max_reply_body: u64,
    /// The request timeout, for the message of a request that ran out of it.
    timeout: Duration,
}

impl fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSink")
            .field("method", &self.method)
            .field("url", &redact_url(&self.url))
            .field("headers", &RedactedHeaders(&self.headers))
            .finish_non_exhaustive()
    }
}

/// Shows header names only.
struct RedactedHeaders<'a>(&'a HeaderMap);

impl fmt::Debug for RedactedHeaders<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k.as_str(), "<redacted>")))
            .finish()
    }
}

/// A URL for display: any password in it replaced.
fn redact_url(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        // Only fails for URLs that cannot have credentials, which this one has.
        let _ = shown.set_password(Some("redacted"));
    }
    shown.to_string()
}

/// A URL that may not parse, for display: any password in it replaced, as [`redact_url`] does.
///
/// The userinfo is taken to end at the last `@`, not at the first `/`, `?` or `#` as in a
/// valid URL: a password holding one of those unescaped, a likely reason why the URL did not
/// parse, is hidden too. A path with an `@` after a `:` (`host:8080/a@b`) is then shown
/// redacted as well, which costs a little of the detail of a URL that is wrong anyway.
fn redact_raw_url(raw: &str) -> String {
    let start = raw.find("://").map_or(0, |scheme| scheme + 3);
    let Some(at) = raw[start..].rfind('@').map(|i| start + i) else {
        return raw.to_owned();
    };
    match raw[start..at].find(':') {
        Some(colon) => format!("{}:redacted{}", &raw[..start + colon], &raw[at..]),
        None => raw.to_owned(),
    }
}

/// A `Location` header's value for display, with any password in it replaced. A relative one
/// does not parse as a URL, and is shown as given.
fn shown_location(location: &str) -> String {
    match Url::parse(location) {
        Ok(url) => redact_url(&url),
        Err(_) => redact_raw_url(location),
    }
}

/// Why an [`HttpSink`] delivery failed: the source of its [`SinkError`], so that code reading
/// a failure can tell a status apart without parsing the message.
///
/// # Examples
///
/// ```
/// use conveyor::{DeliveryError, HttpError};
///
/// fn status_of(error: &DeliveryError) -> Option<u16> {
///     match error {
///         DeliveryError::Failed { error, .. } => {
///             error.get_ref().downcast_ref::<HttpError>()?.status
///         }
///         _ => None,
///     }
/// }
/// # assert_eq!(status_of(&DeliveryError::Closed), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HttpError {
    /// The response's status code, or `None` when no response came back (the connection
    /// failed, or the request timed out).
    pub status: Option<u16>,
    /// What went wrong, as [`Display`](fmt::Display) shows it: the status line and the start
    /// of the body, with header values scrubbed (see [`HttpSink`]).
    pub message: String,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HttpError {}

/// The successful response of an [`HttpSink`] delivery.
///
/// # Examples
///
/// ```no_run
/// use conveyor::{Conveyor, HttpReply, HttpSink};
///
/// let sink = HttpSink::builder("https://example.com/events").build()?;
/// let c: Conveyor<String, HttpReply> = Conveyor::builder().build(sink.into_sink())?;
/// let reply = c.send(r#"{"n":1}"#.to_owned())?.wait()?;
/// assert!((200..300).contains(&reply.status));
/// println!("the server said {}", String::from_utf8_lossy(&reply.body));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HttpReply {
    /// The HTTP status code (2xx).
    pub status: u16,
    /// The response body, read in full (so the connection can be reused) unless it is longer
    /// than [`HttpSinkBuilder::max_reply_body`] (by default
    /// [`DEFAULT_MAX_REPLY_BODY`](HttpSinkBuilder::DEFAULT_MAX_REPLY_BODY), 16 MiB): then its
    /// start, up to that limit.
    pub body: Vec<u8>,
    /// Whether the server sent more than [`HttpSinkBuilder::max_reply_body`]: `body` then holds
    /// only the start, the rest was never read, and the connection was closed rather than
    /// reused. The item counts as delivered all the same: its status said so.
    pub truncated: bool,
}

/// Builds an [`HttpSink`]; see [`HttpSink::builder`].
///
/// | setting | default |
/// |---|---|
/// | method | `POST` |
/// | `Content-Type` | `application/json` (override with [`header`](Self::header)) |
/// | `User-Agent` | `conveyor/` and the crate's version, e.g. `conveyor/0.1.0` (override with [`header`](Self::header)) |
/// | timeout per request | 30 s |
/// | redirects | not followed (a 3xx is a permanent failure) |
/// | reply body kept ([`HttpReply::body`]) | its first 16 MiB ([`DEFAULT_MAX_REPLY_BODY`](Self::DEFAULT_MAX_REPLY_BODY)); change it with [`max_reply_body`](Self::max_reply_body) |
/// | trusted certificate authorities (`https`) | Mozilla's roots, compiled in (not the system's store, nor `SSL_CERT_FILE`); add a private CA with [`root_certificates`](Self::root_certificates) |
/// | proxies | from the environment: `HTTP_PROXY` (http URLs), `HTTPS_PROXY` (https), `ALL_PROXY` (both), lowercase too; `NO_PROXY` hosts are reached directly |
///
/// # Examples
///
/// ```
/// use conveyor::HttpSink;
/// use std::time::Duration;
///
/// let builder = HttpSink::builder("https://example.com/hooks")
///     .header("Authorization", "Bearer s3cret-token")
///     .timeout(Duration::from_secs(5));
/// assert!(!format!("{builder:?}").contains("s3cret"), "header values are not shown");
/// let sink = builder.build()?;
/// assert_eq!(sink.display_url(), "https://example.com/hooks");
/// # Ok::<(), conveyor::HttpBuildError>(())
/// ```
#[must_use = "call .build() to get the sink"]
pub struct HttpSinkBuilder {
    url: String,
    method: String,
    headers: Vec<(String, String)>,
    timeout: Duration,
    /// See [`HttpSinkBuilder::max_reply_body`].
    max_reply_body: usize,
    /// PEM texts given to `root_certificates`, parsed by `build`.
    roots: Vec<Vec<u8>>,
}

impl fmt::Debug for HttpSinkBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSinkBuilder")
            .field("method", &self.method)
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(name, _)| (name.as_str(), "<redacted>"))
                    .collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .field("max_reply_body", &self.max_reply_body)
            .field("root_certificates", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl HttpSinkBuilder {
    /// How many bytes of a 2xx body a sink keeps unless
    /// [`max_reply_body`](Self::max_reply_body) says otherwise: 16 MiB, far more than an API's
    /// answer to one item usually holds, while a server answering with a huge or endless body
    /// costs no more memory than this per request in flight.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::HttpSinkBuilder;
    ///
    /// assert_eq!(HttpSinkBuilder::DEFAULT_MAX_REPLY_BODY, 16 * 1024 * 1024);
    /// ```
    pub const DEFAULT_MAX_REPLY_BODY: usize = 16 << 20;

    /// Adds a header sent with every request (repeatable). Its value is treated as a secret.
    /// A `Content-Type` replaces the default `application/json`, a `User-Agent` the default
    /// `conveyor/VERSION`; the headers the conveyor sets per item (`Idempotency-Key`,
    /// `Conveyor-Seq`, `Conveyor-Attempt`, `Conveyor-Key`) are refused by
    /// [`build`](HttpSinkBuilder::build).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{HttpBuildError, HttpSink};
    ///
    /// let url = "https://example.com/hooks";
    /// let sink = HttpSink::builder(url)
    ///     .header("Content-Type", "text/plain") // replaces application/json
    ///     .header("X-Api-Key", "k-123456")
    ///     .build()?;
    /// let refused = HttpSink::builder(url).header("Idempotency-Key", "fixed").build();
    /// assert_eq!(refused.unwrap_err(), HttpBuildError::ReservedHeader("Idempotency-Key".into()));
    /// # Ok::<(), HttpBuildError>(())
    /// ```
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the HTTP method (default `POST`).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{HttpBuildError, HttpSink};
    ///
    /// let url = "https://example.com/items/1";
    /// let sink = HttpSink::builder(url).method("put").build()?; // sent as PUT
    /// let refused = HttpSink::builder(url).method("SEND NOW").build();
    /// assert_eq!(refused.unwrap_err(), HttpBuildError::InvalidMethod("SEND NOW".into()));
    /// # Ok::<(), HttpBuildError>(())
    /// ```
    pub fn method(mut self, method: impl Into<String>) -> Self {
        self.method = method.into();
        self
    }

    /// Sets the timeout of one request, from connecting to reading the whole response (default 30 s).
    /// A timeout is a retryable failure, whose message says the limit. (The body's last read
    /// may start just before the limit and wait up to the timeout again: a request never holds
    /// its lane for more than twice the timeout, however slowly a server sends.) Zero is refused by [`build`](HttpSinkBuilder::build):
    /// every request would time out.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{HttpBuildError, HttpSink};
    /// use std::time::Duration;
    ///
    /// let url = "https://example.com/hooks";
    /// let sink = HttpSink::builder(url).timeout(Duration::from_secs(5)).build()?;
    /// let refused = HttpSink::builder(url).timeout(Duration::ZERO).build();
    /// assert_eq!(refused.unwrap_err(), HttpBuildError::ZeroTimeout);
    /// # Ok::<(), HttpBuildError>(())
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Keeps at most `bytes` of a successful (2xx) response's body in [`HttpReply::body`]
    /// (default [`DEFAULT_MAX_REPLY_BODY`](Self::DEFAULT_MAX_REPLY_BODY), 16 MiB). The rest is
    /// not read at all, so a server that answers with a huge or endless body costs no more
    /// memory than this (the timeout bounds how long it may talk); the reply says it was cut
    /// ([`HttpReply::truncated`]), and its connection is closed rather than reused. The item is
    /// delivered all the same. Zero keeps nothing, for a caller that only needs the status.
    ///
    /// Raise it for replies known to be larger; `usize::MAX` keeps every body whole, however
    /// large, which trusts the server not to send more than the process can hold.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::HttpSink;
    ///
    /// // Only the status matters here; a chatty answer is not kept.
    /// let sink = HttpSink::builder("https://example.com/hooks")
    ///     .max_reply_body(64 * 1024)
    ///     .build()?;
    /// // A trusted server's large exports, kept whole.
    /// let sink = HttpSink::builder("https://example.com/export")
    ///     .max_reply_body(usize::MAX)
    ///     .build()?;
    /// # Ok::<(), conveyor::HttpBuildError>(())
    /// ```
    pub fn max_reply_body(mut self, bytes: usize) -> Self {
        self.max_reply_body = bytes;
        self
    }

    /// Also trusts the certificate authorities in `pem` for `https` URLs: for a server whose
    /// certificate a private (company) CA signed, which the built-in roots do not know.
    /// `pem` holds one or more certificates (`-----BEGIN CERTIFICATE-----`), as a `ca.pem` or a
    /// CA bundle does; repeatable. The built-in roots stay trusted.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let sink = conveyor::HttpSink::builder("https://hooks.internal.example/in")
    ///     .root_certificates(std::fs::read("/etc/company/ca.pem")?)
    ///     .build()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.roots.push(pem.into());
        self
    }

    /// Builds the sink and its connection pool.
    ///
    /// # Errors
    ///
    /// [`HttpBuildError`] if the URL, the method, a header or the root certificates are
    /// invalid, the timeout is zero, or the HTTP client (TLS) cannot be set up.
    ///
    /// Works inside an async runtime too: the client is started on a thread of its own.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{HttpBuildError, HttpSink};
    ///
    /// let sink = HttpSink::builder("https://example.com/hooks").build()?;
    ///
    /// let err = HttpSink::builder("ftp://bot:hunter2@example.com/in").build().unwrap_err();
    /// assert!(matches!(err, HttpBuildError::InvalidUrl { .. }));
    /// assert!(err.to_string().contains("is not http or https"), "{err}");
    /// assert!(!err.to_string().contains("hunter2"), "the password is not shown");
    /// # Ok::<(), HttpBuildError>(())
    /// ```
    pub fn build(self) -> Result<HttpSink, HttpBuildError> {
        // Shown as given, but for a password: a URL that does not parse may still hold one.
        let url = Url::parse(&self.url).map_err(|e| HttpBuildError::InvalidUrl {
            url: redact_raw_url(&self.url),
            reason: e.to_string(),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(HttpBuildError::InvalidUrl {
                url: redact_raw_url(&self.url),
                reason: format!("scheme `{}` is not http or https", url.scheme()),
            });
        }
        if self.timeout.is_zero() {
            return Err(HttpBuildError::ZeroTimeout);
        }
        let method = Method::from_bytes(self.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| HttpBuildError::InvalidMethod(self.method.clone()))?;

        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(USER_AGENT, HeaderValue::from_static(DEFAULT_USER_AGENT));
        let mut secrets = Vec::with_capacity(self.headers.len());
        let mut user_set = Vec::new();
        for (name, value) in &self.headers {
            let header_name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
                HttpBuildError::InvalidHeader {
                    name: name.clone(),
                    reason: "not a valid header name".into(),
                }
            })?;
            if let Some(own) = PER_DELIVERY_HEADERS
                .iter()
                .find(|own| header_name.as_str().eq_ignore_ascii_case(own))
            {
                return Err(HttpBuildError::ReservedHeader((*own).to_owned()));
            }
            let mut header_value =
                HeaderValue::from_str(value.trim()).map_err(|_| HttpBuildError::InvalidHeader {
                    name: name.clone(),
                    reason: "the value has characters not allowed in a header".into(),
                })?;
            header_value.set_sensitive(true);
            secrets.extend(secrets_of(&header_name, value));
            // A repeated name adds a value; the first user value replaces a default.
            if user_set.contains(&header_name) {
                headers.append(header_name, header_value);
            } else {
                headers.insert(header_name.clone(), header_value);
                user_set.push(header_name);
            }
        }
        secrets.sort_unstable_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        let roots = self
            .roots
            .iter()
            .map(|pem| parse_roots(pem))
            .collect::<Result<Vec<_>, _>>()?
            .concat();

        // On a thread of its own: reqwest's blocking client waits for its runtime thread as it
        // starts, which panics on a thread that runs async code (a Tokio worker).
        // None (no limit) for a timeout too long for the clock: reqwest adds it to the time
        // of every request, which would overflow and panic.
        let timeout = self.timeout;
        let limit = Instant::now().checked_add(timeout).map(|_| timeout);
        let client = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    roots
                        .into_iter()
                        .fold(Client::builder(), |client, root| {
                            client.add_root_certificate(root)
                        })
                        .timeout(limit)
                        .redirect(reqwest::redirect::Policy::none())
                        .build()
                })
                .join()
        })
        .map_err(|_| HttpBuildError::Client("the HTTP client panicked while starting".into()))?
        .map_err(|e| HttpBuildError::Client(error_chain(&e.without_url())))?;
        Ok(HttpSink {
            client,
            url,
            method,
            headers,
            secrets,
            max_reply_body: u64::try_from(self.max_reply_body).unwrap_or(u64::MAX),
            timeout,
        })
    }
}

/// Why an [`HttpSink`] could not be built. Header values are never part of the message.
///
/// # Examples
///
/// ```
/// use conveyor::{HttpBuildError, HttpSink};
///
/// let err = HttpSink::builder("https://example.com/hooks")
///     .header("X-Token", "abc\ndef-secret") // a line break cannot be sent
///     .build()
///     .unwrap_err();
/// assert!(matches!(&err, HttpBuildError::InvalidHeader { name, .. } if name == "X-Token"));
/// assert!(!err.to_string().contains("secret"), "header values are never shown: {err}");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpBuildError {
    /// The URL does not parse or is not http(s).
    InvalidUrl {
        /// The URL as given, with any password in it replaced.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A header name or value is not valid HTTP.
    InvalidHeader {
        /// The header's name as given (its value is never shown).
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A header the conveyor sets on every request itself, with a value per item
    /// (`Idempotency-Key`, `Conveyor-Seq`, `Conveyor-Attempt`, `Conveyor-Key`).
    ReservedHeader(String),
    /// The method is not a valid HTTP method token.
    InvalidMethod(String),
    /// The timeout is zero: every request would time out before it started.
    ZeroTimeout,
    /// A text given to [`HttpSinkBuilder::root_certificates`] holds no certificate, or one
    /// that does not parse.
    InvalidRootCertificates(String),
    /// The HTTP client could not be created (for example TLS setup failed).
    Client(String),
}

impl fmt::Display for HttpBuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidUrl { url, reason } => write!(
                f,
                "invalid URL `{url}`: {reason} (expected something like http://host:port/path)"
            ),
            Self::InvalidHeader { name, reason } => write!(
                f,
                "invalid header `{name}`: {reason} (expected `Name: value`)"
            ),
            Self::ReservedHeader(name) => write!(
                f,
                "header `{name}` is set by conveyor itself, with a value per item; remove it"
            ),
            Self::InvalidMethod(m) => {
                write!(f, "invalid HTTP method `{m}` (expected e.g. POST or PUT)")
            }
            Self::ZeroTimeout => f.write_str(
                "the request timeout is zero, so every request would time out: give it more \
                 time (the default is 30 s)",
            ),
            Self::InvalidRootCertificates(reason) => write!(
                f,
                "invalid root certificates: {reason} (expected PEM text with one or more \
                 -----BEGIN CERTIFICATE----- blocks, as in a CA's ca.pem)"
            ),
            Self::Client(e) => write!(f, "cannot create the HTTP client: {e}"),
        }
    }
}

impl std::error::Error for HttpBuildError {}

impl HttpSink {
    /// Starts building a sink that sends to `url`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// let sink = conveyor::HttpSink::builder("http://127.0.0.1:8080/ingest")
    ///     .method("PUT")
    ///     .header("X-Api-Key", "k")
    ///     .timeout(Duration::from_secs(5))
    ///     .build()?;
    /// # Ok::<(), conveyor::HttpBuildError>(())
    /// ```
    pub fn builder(url: impl Into<String>) -> HttpSinkBuilder {
        HttpSinkBuilder {
            url: url.into(),
            method: "POST".into(),
            headers: Vec::new(),
            timeout: Duration::from_secs(30),
            max_reply_body: HttpSinkBuilder::DEFAULT_MAX_REPLY_BODY,
            roots: Vec::new(),
        }
    }

    /// The target URL, with any password in it replaced, for display.
    ///
    /// # Examples
    ///
    /// ```
    /// let sink = conveyor::HttpSink::builder("https://bot:s3cret@example.com/in").build()?;
    /// assert_eq!(sink.display_url(), "https://bot:redacted@example.com/in");
    /// # Ok::<(), conveyor::HttpBuildError>(())
    /// ```
    pub fn display_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Sends one delivery and classifies the outcome (see the table on [`HttpSink`]).
    ///
    /// # Errors
    ///
    /// A retryable [`SinkError`] for connection errors, timeouts, 408, 425, 429 and 5xx but 501
    /// and 505 (with the `Retry-After` hint when the server gave one), a permanent one for any
    /// other non-2xx status.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use conveyor::{Conveyor, HttpSink};
    ///
    /// // A sink of your own around the HTTP call: here it keeps only the status.
    /// let sink = HttpSink::builder("https://example.com/events").build()?;
    /// let c: Conveyor<Vec<u8>, u16> =
    ///     Conveyor::builder().build(move |d| Ok(sink.send(&d)?.status))?;
    /// let status = c.send(br#"{"n":1}"#.to_vec())?.wait()?;
    /// assert!((200..300).contains(&status));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn send<T: AsRef<[u8]>>(&self, d: &Delivery<T>) -> Result<HttpReply, SinkError> {
        let deadline = crate::worker::later(self.timeout);
        let mut request = self
            .client
            .request(self.method.clone(), self.url.clone())
            .headers(self.headers.clone())
            .header(IDEMPOTENCY_KEY_HEADER, d.idempotency_key())
            .header(SEQ_HEADER, d.seq())
            .header(ATTEMPT_HEADER, d.attempt());
        if let Some(key) = d.key() {
            request = request.header(KEY_HEADER, encode_key(key));
        }
        let response = request
            .body(d.item().as_ref().to_vec())
            .send()
            // Connect errors, timeouts and connections cut mid-request: the request may or may
            // not have arrived, which is what the idempotency key is for.
            .map_err(|e| {
                SinkError::retryable(HttpError {
                    status: None,
                    message: self.no_response_message(e),
                })
            })?;
        self.classify(response, deadline)
    }

    /// Turns the sink into the closure [`Builder::build`](crate::Builder::build) takes.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use conveyor::{Conveyor, HttpReply, HttpSink, Retry};
    /// use std::time::Duration;
    ///
    /// let sink = HttpSink::builder("https://example.com/events").build()?;
    /// let c: Conveyor<String, HttpReply> = Conveyor::builder()
    ///     .retry(Retry::exponential(Duration::from_millis(200)))
    ///     .build(sink.into_sink())?;
    /// for n in 1..=3 {
    ///     c.send(format!(r#"{{"n":{n}}}"#))?;
    /// }
    /// assert_eq!(c.close().stats.delivered, 3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn into_sink<T: AsRef<[u8]>>(
        self,
    ) -> impl Fn(Delivery<T>) -> Result<HttpReply, SinkError> + Send + Sync + 'static {
        move |d| self.send(&d)
    }

    /// A 2xx's reply: its body, up to `max_reply_body` and within the request's `deadline`.
    fn reply(
        &self,
        status: StatusCode,
        response: Response,
        deadline: Instant,
    ) -> Result<HttpReply, SinkError> {
        let limit = self.max_reply_body;
        // Room for what the server says it sends, but never more than may be kept, nor
        // more than `PREALLOCATED_REPLY_BODY`: the length is the server's word, and a false
        // one must not make the process set aside memory it cannot have (an abort).
        let expected = response
            .content_length()
            .unwrap_or(0)
            .min(limit)
            .min(PREALLOCATED_REPLY_BODY);
        let mut body = Vec::with_capacity(usize::try_from(expected).unwrap_or(0));
        // One byte past the limit tells a body cut at it from one that ends there.
        match Deadline::new(response, deadline)
            .take(limit.saturating_add(1))
            .read_to_end(&mut body)
        {
            Ok(_) => {
                let truncated = u64::try_from(body.len()).map_or(true, |read| read > limit);
                if truncated {
                    body.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
                }
                Ok(HttpReply {
                    status: status.as_u16(),
                    body,
                    truncated,
                })
            }
            Err(e) => {
                // The blocking body reader wraps reqwest's error in an io::Error.
                let timed_out = e.kind() == ErrorKind::TimedOut
                    || e.get_ref()
                        .and_then(|inner| inner.downcast_ref::<reqwest::Error>())
                        .is_some_and(reqwest::Error::is_timeout);
                let mut message = format!(
                    "HTTP {status}, but reading the response failed: {}",
                    self.scrub(&error_chain(&e))
                );
                if timed_out {
                    message.push_str(&self.timeout_hint());
                }
                Err(SinkError::retryable(HttpError {
                    status: Some(status.as_u16()),
                    message,
                }))
            }
        }
    }

    fn classify(&self, response: Response, deadline: Instant) -> Result<HttpReply, SinkError> {
        let status = response.status();
        if status.is_success() {
            return self.reply(status, response, deadline);
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        // Redirects are not followed, so say where one points: the fix is often a new URL.
        let location = response
            .headers()
            .get(LOCATION)
            .filter(|_| status.is_redirection())
            .map(|v| shown_location(&String::from_utf8_lossy(v.as_bytes())));
        // An error body only explains the error: read the start of it. A body that ends within
        // the limit is read to its end, which frees the connection for reuse; a longer one is
        // left unread, and dropping the response then closes its connection instead.
        let mut body = Vec::new();
        // A body that breaks off is quoted as far as it came.
        let _ = Deadline::new(response, deadline)
            .take(ERROR_BODY_BYTES)
            .read_to_end(&mut body);
        let message = HttpError {
            status: Some(status.as_u16()),
            message: self.status_message(status, location.as_deref(), &body),
        };
        if is_retryable_status(status) {
            let error = SinkError::retryable(message);
            Err(match retry_after {
                Some(wait) => error.with_retry_after(wait),
                None => error,
            })
        } else {
            Err(SinkError::permanent(message))
        }
    }

    /// Why a request got no response. reqwest's own text ("error sending request: client error
    /// (Connect): tcp connect error: Connection refused (os error 111)") names neither the host
    /// nor, in plain words, what went wrong, and one of these per line is what a run against a
    /// server that is down shows. A failure to connect therefore leads with the host and port
    /// tried and the reason ("cannot connect to 127.0.0.1:9: connection refused; check ..."); the
    /// client's text follows in parentheses, for the detail.
    fn no_response_message(&self, error: reqwest::Error) -> String {
        let connect = error.is_connect();
        let timed_out = error.is_timeout();
        let reason = connect_failure_reason(&error);
        let chain = self.scrub(&error_chain(&error.without_url()));
        let mut message = if connect {
            // The URL's host and port, never its userinfo (which may hold a password).
            let host = self.url.host_str().unwrap_or_default();
            let port = self
                .url
                .port_or_known_default()
                .map_or_else(String::new, |port| format!(":{port}"));
            match reason {
                Some(reason) => format!("cannot connect to {host}{port}: {reason} ({chain})"),
                None => format!("cannot connect to {host}{port} ({chain})"),
            }
        } else {
            chain
        };
        if let Some(hint) = certificate_hint(&message) {
            message.push_str(hint);
        }
        if timed_out {
            message.push_str(&self.timeout_hint());
        }
        message
    }

    /// Added to a failure because the request ran out of time: reqwest says only "operation
    /// timed out", which names neither the limit nor the setting, each front having its own.
    fn timeout_hint(&self) -> String {
        format!(
            " (no complete answer within {:?}, the request timeout: if the server is slow \
             rather than stuck, raise it with --timeout in the CLI, timeout= in Python, or \
             HttpSinkBuilder::timeout in Rust)",
            self.timeout
        )
    }

    /// A failure message: the status line, where a redirect points, then the start of the
    /// body. The status line is the client's own text (the code and its standard reason, not
    /// the server's reason phrase), so it is left as it is; what the server wrote is quoted.
    fn status_message(&self, status: StatusCode, location: Option<&str>, body: &[u8]) -> String {
        let mut message = format!("HTTP {status}");
        if let Some(location) = location {
            message.push_str(&format!(" (Location: {})", self.quote(location)));
        }
        let body = self.quote(&String::from_utf8_lossy(body));
        if !body.is_empty() {
            message.push_str(": ");
            message.push_str(&body);
        }
        message
    }

    /// Server text as a message may show it: on one line, scrubbed, and cut to
    /// [`ERROR_BODY_CHARS`]. Scrubbed before it is cut: a secret across the cut would
    /// otherwise show its first half.
    fn quote(&self, text: &str) -> String {
        let text = self.scrub(&one_line(text));
        let mut quoted: String = text.chars().take(ERROR_BODY_CHARS).collect();
        if quoted.len() < text.len() {
            quoted.push('…');
        }
        quoted
    }

    /// Replaces the header values and words a server echoed back, in one pass over `text`:
    /// at each place the longest secret that matches is replaced, and the text goes on after
    /// it, so a `<redacted>` just written is never matched again (by a secret `dacted`, say).
    fn scrub(&self, text: &str) -> String {
        let mut scrubbed = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            match self.secrets.iter().find(|s| rest.starts_with(s.as_str())) {
                Some(secret) => {
                    scrubbed.push_str(REDACTED);
                    rest = &rest[secret.len()..];
                }
                None => {
                    scrubbed.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        scrubbed
    }
}

/// What to add to a connection failure that a certificate caused, to say what to do.
fn certificate_hint(message: &str) -> Option<&'static str> {
    if message.contains("UnknownIssuer") {
        Some(UNKNOWN_ISSUER)
    } else if message.contains("CaUsedAsEndEntity") {
        Some(CA_USED_AS_END_ENTITY)
    } else {
        None
    }
}

/// A response body that ends with a timeout error once the request's deadline has passed.
///
/// The blocking client's reader applies its timeout to each read, not to the body: a server
/// sending a byte now and then would hold the lane for as long as it kept talking. The
/// deadline is checked before each read, which itself waits at most the timeout, so a body
/// ends within twice the timeout of the request's start, as it did when read whole.
struct Deadline<R> {
    inner: R,
    at: Instant,
}

impl<R> Deadline<R> {
    fn new(inner: R, at: Instant) -> Self {
        Self { inner, at }
    }
}

impl<R: Read> Read for Deadline<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if Instant::now() >= self.at {
            return Err(io::Error::new(ErrorKind::TimedOut, "operation timed out"));
        }
        self.inner.read(buf)
    }
}

/// What to scrub for one header: its value, and each whitespace-separated word of it, that is
/// long enough to be a secret ([`MIN_SECRET_CHARS`]). Words count on their own because servers
/// often echo the token without its scheme. The first word of an `Authorization` value with
/// more words is its scheme (`Bearer`, `Digest`): a public name, kept readable.
///
/// Words are split where [`one_line`] splits, and the value is kept with single spaces between
/// them, as it appears in the text it is looked for in.
fn secrets_of(name: &HeaderName, value: &str) -> Vec<String> {
    let words: Vec<&str> = value.split(is_break).filter(|w| !w.is_empty()).collect();
    let scheme =
        matches!(name.as_str(), "authorization" | "proxy-authorization") && words.len() > 1;
    std::iter::once(words.join(" "))
        .chain(
            words
                .iter()
                .skip(usize::from(scheme))
                .map(|w| (*w).to_owned()),
        )
        .filter(|s| s.chars().count() >= MIN_SECRET_CHARS)
        .collect()
}

/// A key as the value of `Conveyor-Key`: every byte that is not visible ASCII, and `%`, as
/// `%XX`. The result is always a valid header value, and servers leave it as it is.
fn encode_key(key: &str) -> String {
    let mut encoded = String::with_capacity(key.len());
    for &byte in key.as_bytes() {
        if (0x21..=0x7E).contains(&byte) && byte != b'%' {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Server text made safe to show on one line: control characters (CR and LF, the ESC that
/// starts a terminal escape sequence, BEL) and bidirectional-text overrides become spaces, and
/// each run of spaces one space. A failure then stays one line on a terminal and in the
/// journal, and cannot move the cursor, recolour the terminal or reorder the text after it.
fn one_line(text: &str) -> String {
    text.split(is_break)
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether [`one_line`] turns `c` into a space: whitespace, control characters, and the marks
/// that reorder bidirectional text.
fn is_break(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(
            c,
            '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

/// 425 Too Early is a server declining a request it might see twice (sent as TLS early data);
/// RFC 8470 §5.2 has the client retry it. 501 Not Implemented (the method) and 505 HTTP
/// Version Not Supported say what the server is, not how it is doing: a retry gets the same
/// answer, and would only hold the lane through every attempt before the item fails anyway.
fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_EARLY
        || status == StatusCode::TOO_MANY_REQUESTS
        || (status.is_server_error()
            && status != StatusCode::NOT_IMPLEMENTED
            && status != StatusCode::HTTP_VERSION_NOT_SUPPORTED)
}

/// `Retry-After` is either delay-seconds or an HTTP date (RFC 9110 §10.2.3).
///
/// Seconds too many for a `u64` ask for the longest wait there is, not none: the engine caps
/// any hint ([`Retry::MAX_HINT`](crate::Retry::MAX_HINT)), whereas ignoring it would retry a
/// server that asked to be left alone at once.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(value.parse().map_or(Duration::MAX, Duration::from_secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The certificates in one PEM text given to [`HttpSinkBuilder::root_certificates`]: at least
/// one, so that a wrong file is told at build time, not at the first request.
fn parse_roots(pem: &[u8]) -> Result<Vec<reqwest::Certificate>, HttpBuildError> {
    let invalid = HttpBuildError::InvalidRootCertificates;
    // Editors on Windows save a byte order mark, which the PEM reader would take for text
    // before the first block, and then find no certificate.
    let pem = pem.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(pem);
    let roots = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| invalid(error_chain(&e)))?;
    if roots.is_empty() {
        return Err(invalid("no certificate found".into()));
    }
    // A PEM block whose contents are not a certificate is only found out when a client takes
    // it, and the blocking client's error would not say which setting was wrong. The async
    // client checks it the same way, without starting a thread of its own.
    roots
        .iter()
        .fold(reqwest::Client::builder(), |client, root| {
            client.add_root_certificate(root.clone())
        })
        .tls_built_in_root_certs(false)
        .build()
        .map_err(|e| {
            // rustls calls every certificate a peer's: only its last word (`BadEncoding`) fits.
            let chain = error_chain(&e);
            let why = chain.rsplit(": ").next().unwrap_or(&chain);
            invalid(format!(
                "a certificate block does not hold a valid certificate ({why})"
            ))
        })?;
    Ok(roots)
}

/// Why a connection could not be made, in plain words and with what to check, read from the
/// error's chain of causes; `None` when no cause says (a TLS failure: the chain then speaks for
/// itself).
///
/// The causes are types of reqwest's dependencies: hyper-util's connect error, which is not
/// public and says "dns error" when the host name did not resolve, and the operating system's
/// [`std::io::Error`] for the rest.
fn connect_failure_reason(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.to_string() == "dns error" {
            return Some("the host name could not be resolved; check the host in the URL".into());
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => Some(
                    "connection refused; check that the server is running and that the URL's \
                     port is right"
                        .into(),
                ),
                std::io::ErrorKind::TimedOut => Some(
                    "timed out; check the host in the URL, and that no firewall drops the \
                     connection"
                        .into(),
                ),
                // The system's own words ("No route to host (os error 113)"), as a reason.
                _ if io.raw_os_error().is_some() => {
                    let text = io.to_string();
                    let text = text.split(" (os error").next().unwrap_or(&text);
                    let mut chars = text.chars();
                    chars
                        .next()
                        .map(|first| first.to_lowercase().chain(chars).collect())
                }
                _ => None,
            };
        }
        cause = e.source();
    }
    None
}

/// reqwest's Display is terse ("error sending request"); the cause is in the source chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        let later = SystemTime::now() + Duration::from_secs(120);
        let wait = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(wait > Duration::from_secs(100) && wait <= Duration::from_secs(120));
        let past = httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(1));
        assert_eq!(parse_retry_after(&past), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("+5"), None);
        assert_eq!(
            parse_retry_after("18446744073709551615"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            parse_retry_after("99999999999999999999"),
            Some(Duration::MAX)
        );
    }

    #[test]
    fn certificate_failures_say_what_to_do() {
        let unknown = "client error (Connect): invalid peer certificate: UnknownIssuer";
        assert!(certificate_hint(unknown).is_some_and(|hint| hint.contains("--cacert")));
        // As rustls words a self-signed certificate that `openssl req -x509` made.
        let ca = "client error (Connect): invalid peer certificate: \
                  Other(OtherError(CaUsedAsEndEntity))";
        assert!(certificate_hint(ca).is_some_and(|hint| hint.contains("CA:FALSE")));
        assert_eq!(
            certificate_hint("tcp connect error: Connection refused"),
            None
        );
    }

    #[test]
    fn statuses_are_classified() {
        for code in [408, 425, 429, 500, 502, 503, 504, 599] {
            assert!(
                is_retryable_status(StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
        for code in [301, 400, 401, 403, 404, 409, 422, 501, 505] {
            assert!(
                !is_retryable_status(StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
    }

    #[test]
    fn header_values_never_shown() {
        let builder = HttpSink::builder("http://user:pw@127.0.0.1:9/x")
            .header("Authorization", "Bearer top-secret-token");
        assert!(!format!("{builder:?}").contains("top-secret-token"));
        let sink = builder.build().unwrap();
        let shown = format!("{sink:?}");
        assert!(shown.contains("authorization"), "{shown}");
        assert!(!shown.contains("top-secret-token"), "{shown}");
        assert!(!shown.contains(":pw@"), "{shown}");
        assert_eq!(
            sink.scrub("echo: Bearer top-secret-token"),
            "echo: <redacted>"
        );

        let bad = HttpSink::builder("http://127.0.0.1:9/")
            .header("X-Key", "line\nbreak-secret")
            .build()
            .unwrap_err();
        assert!(!bad.to_string().contains("break-secret"), "{bad}");
        assert!(bad.to_string().contains("X-Key"), "{bad}");
    }

    #[test]
    fn scrubbing_replaces_long_values_and_words_once() {
        let sink = HttpSink::builder("http://127.0.0.1:9/")
            .header("Authorization", "Bearer s3cr3t-t0ken")
            .header("X-Api-Key", "token-abc")
            .header("X-Short", "0")
            .header("X-Word", "dacted")
            .header("X-Prefix", "s3cr3t")
            .build()
            .unwrap();
        assert_eq!(
            sink.scrub("Bearer s3cr3t-t0ken / s3cr3t-t0ken / token-abc / 0"),
            "<redacted> / <redacted> / <redacted> / 0"
        );
        // The longest match wins, and a marker written is never scrubbed again.
        assert_eq!(
            sink.scrub("s3cr3t-t0ken! s3cr3t!"),
            "<redacted>! <redacted>!"
        );
        assert_eq!(sink.scrub("token-abc dacted"), "<redacted> <redacted>");
        // The scheme of an Authorization value is a public word.
        assert_eq!(sink.scrub("expected Bearer"), "expected Bearer");
    }

    #[test]
    fn server_text_is_shown_on_one_line() {
        assert_eq!(
            one_line("\r\n a\tb\x1b[2J\u{7}c \u{202E}d\u{2069}\u{85}e\r\n"),
            "a b [2J c d e"
        );
        // A value with a tab (or a bidi mark) is looked for as the one line it becomes.
        let sink = HttpSink::builder("http://127.0.0.1:9/")
            .header("X-Pair", "abc\tdef")
            .header("X-Marked", "ghi\u{202E}jkl")
            .build()
            .unwrap();
        assert_eq!(sink.scrub(&one_line("ghi\u{202E}jkl")), "<redacted>");
        assert_eq!(
            sink.status_message(StatusCode::BAD_REQUEST, None, b"got abc\r\ndef"),
            "HTTP 400 Bad Request: got <redacted>"
        );
    }

    #[test]
    fn keys_are_percent_encoded() {
        for (key, encoded) in [
            ("user-42", "user-42"),
            ("a b", "a%20b"),
            ("café", "caf%C3%A9"),
            ("50%", "50%25"),
            ("\t\r\n\u{7f}", "%09%0D%0A%7F"),
            ("!~", "!~"),
        ] {
            assert_eq!(encode_key(key), encoded, "{key:?}");
            assert!(HeaderValue::from_str(&encode_key(key)).is_ok());
        }
    }

    #[test]
    fn passwords_are_hidden_in_urls_that_do_not_parse() {
        for (raw, shown) in [
            ("http://u:pw@h/", "http://u:redacted@h/"),
            ("http://u:p/w#?@h x/", "http://u:redacted@h x/"),
            ("//u:pw@h/", "//u:redacted@h/"),
            ("u:pw@h", "u:redacted@h"),
            ("http://u@h/", "http://u@h/"),
            ("http://h:80/path", "http://h:80/path"),
            ("http://h/a@b", "http://h/a@b"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_raw_url(raw), shown, "{raw}");
        }
    }

    #[test]
    fn bad_configuration_is_rejected() {
        assert!(matches!(
            HttpSink::builder("not a url").build(),
            Err(HttpBuildError::InvalidUrl { .. })
        ));
        assert!(matches!(
            HttpSink::builder("ftp://127.0.0.1/").build(),
            Err(HttpBuildError::InvalidUrl { .. })
        ));
        assert!(matches!(
            HttpSink::builder("http://127.0.0.1/")
                .method("GE T")
                .build(),
            Err(HttpBuildError::InvalidMethod(_))
        ));
    }

    #[test]
    fn headers_set_per_delivery_are_refused() {
        for name in [
            "Idempotency-Key",
            "idempotency-key",
            "Conveyor-Seq",
            "CONVEYOR-KEY",
        ] {
            let err = HttpSink::builder("http://127.0.0.1/")
                .header(name, "mine")
                .build()
                .unwrap_err();
            assert!(
                matches!(&err, HttpBuildError::ReservedHeader(n) if n.eq_ignore_ascii_case(name)),
                "{err}"
            );
            assert!(err.to_string().contains("remove it"), "{err}");
        }
    }
}

#[cfg(test)]
mod runtime_tests {
    use super::*;
    use std::io::{Read, Write};

    /// A server that answers every request on one connection with 200 and an empty body.
    fn ok_server() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 {
                            return;
                        }
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                    }
                });
            }
        });
        format!("http://{addr}/")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sink_can_be_built_used_and_dropped_inside_a_runtime() {
        let sink = HttpSink::builder(ok_server()).build().unwrap();
        let c: crate::Conveyor<String, HttpReply> =
            crate::Conveyor::builder().build(sink.into_sink()).unwrap();
        let receipt = c.send("{}".to_owned()).unwrap();
        assert_eq!(receipt.await.unwrap().status, 200);
        c.flush_async().await;
        drop(c);
        // A sink never used is dropped here, on the runtime's thread.
        drop(HttpSink::builder(ok_server()).build().unwrap());
    }
}
