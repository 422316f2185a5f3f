//! The HTTP sink against raw-socket servers on 127.0.0.1, which can answer what no well-behaved
//! server would: tokens echoed back, terminal escapes, bodies of any size.
#![cfg(feature = "http")]

use std::io::Write;
use std::net::TcpListener;
use std::time::Duration;

use conveyor::{
    Conveyor, DeliveryError, HttpBuildError, HttpReply, HttpSink, HttpSinkBuilder, Ordering,
};

#[path = "fixtures/server.rs"]
mod server;

use server::{header, headers, huge_body, reply, serve, serve_tls, CA_PEM};

/// A sink builder for a new server that answers every request with this response.
fn answering(status: &str, headers: &str, body: &[u8]) -> HttpSinkBuilder {
    HttpSink::builder(serve(reply(status, headers, body)).0)
}

/// Sends one item through a conveyor using `sink` (one attempt) and returns its outcome.
fn outcome(sink: HttpSinkBuilder) -> Result<HttpReply, DeliveryError> {
    let c: Conveyor<String, HttpReply> = Conveyor::builder()
        .build(sink.build().unwrap().into_sink())
        .unwrap();
    c.send("{}".to_owned()).unwrap().wait()
}

/// [`outcome`], which must be a failure: the sink's error.
fn failure(sink: HttpSinkBuilder) -> conveyor::SinkError {
    match outcome(sink) {
        Err(DeliveryError::Failed { error, .. }) => error,
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// [`outcome`], which must be a delivery: the sink's reply.
fn delivered(sink: HttpSinkBuilder) -> HttpReply {
    outcome(sink).expect("delivered")
}

/// Some APIs (GitHub's, say) refuse a request without a `User-Agent`, and every item would
/// then fail for good; a `User-Agent` given as a header is sent instead, alone.
#[test]
fn requests_carry_a_user_agent_that_a_header_replaces() {
    let (url, heads) = serve(reply("200 OK", "", b""));
    delivered(HttpSink::builder(url.as_str()));
    delivered(HttpSink::builder(url.as_str()).header("user-agent", "mine/1.0"));
    let heads = heads.lock().unwrap();
    let agents: Vec<Vec<&str>> = heads
        .iter()
        .map(|r| headers(&r.head, "user-agent").collect())
        .collect();
    let ours = format!("conveyor/{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(agents, [vec![ours.as_str()], vec!["mine/1.0"]]);
}

#[test]
fn a_token_echoed_without_its_scheme_is_scrubbed() {
    let error = failure(
        answering(
            "401 Unauthorized",
            "",
            br#"{"error":"invalid_token","token":"s3cr3t-t0ken"}"#,
        )
        .header("Authorization", "Bearer s3cr3t-t0ken"),
    );
    assert_eq!(
        error.to_string(),
        r#"HTTP 401 Unauthorized: {"error":"invalid_token","token":"<redacted>"}"#
    );
}

#[test]
fn short_header_values_leave_messages_alone() {
    let error = failure(
        answering("503 Busy", "", b"shard 0 of 10 in eu is busy")
            .header("X-Shard", "0")
            .header("X-Region", "eu")
            // Words a status line holds: scrubbed in the body, never in the status line.
            .header("X-Note", "Service Unavailable"),
    );
    assert_eq!(
        error.to_string(),
        "HTTP 503 Service Unavailable: shard 0 of 10 in eu is busy"
    );
}

#[test]
fn control_characters_in_a_body_become_spaces_on_one_line() {
    let page = b"<html>\r\n<head><title>502</title></head>\r\n\
                 <body>\x1b[31mRED\x1b[0m\x07\t</body>\r\n</html>\r\n";
    let error = failure(answering("502 Bad Gateway", "", page));
    assert_eq!(
        error.to_string(),
        "HTTP 502 Bad Gateway: <html> <head><title>502</title></head> <body> [31mRED [0m </body> </html>"
    );
}

#[test]
fn only_the_start_of_a_huge_error_body_is_read() {
    let (url, read_whole) = huge_body("503 Busy");
    let error = failure(HttpSink::builder(url));
    assert!(
        error.to_string().starts_with(&format!(
            "HTTP 503 Service Unavailable: {}…",
            "x".repeat(200)
        )),
        "{error}"
    );
    assert!(!read_whole(), "the whole body was read");
}

#[test]
fn a_reply_body_is_kept_up_to_max_reply_body() {
    let url = serve(reply("200 OK", "", b"0123456789")).0;
    let whole = delivered(HttpSink::builder(url.as_str()));
    assert_eq!(
        (whole.body, whole.truncated),
        (b"0123456789".to_vec(), false)
    );
    let exact = delivered(HttpSink::builder(url.as_str()).max_reply_body(10));
    assert_eq!(
        (exact.body, exact.truncated),
        (b"0123456789".to_vec(), false)
    );
    let cut = delivered(HttpSink::builder(url.as_str()).max_reply_body(4));
    assert_eq!(
        (cut.status, cut.body, cut.truncated),
        (200, b"0123".to_vec(), true)
    );
    let none = delivered(HttpSink::builder(url.as_str()).max_reply_body(0));
    assert_eq!((none.body, none.truncated), (Vec::new(), true));
}

/// A 2xx body past the limit is never read: a server streaming one without end costs no
/// memory, and the request ends as soon as the limit is reached.
#[test]
fn a_huge_reply_body_is_not_read_past_max_reply_body() {
    let (url, read_whole) = huge_body("200 OK");
    let reply = delivered(HttpSink::builder(url).max_reply_body(1000));
    assert_eq!((reply.body.len(), reply.truncated), (1000, true));
    assert!(!read_whole(), "the whole body was read");
}

/// A 2xx whose `Content-Length` claims far more than it sends (here 8 EiB, then two bytes
/// and the end of the connection) is a body cut short, a retryable failure: the claim is the
/// server's word, not memory to set aside before a byte has come (that panicked, or aborted
/// the process for a claim the machine could not hold), with or without a limit.
#[test]
fn a_reply_claiming_a_huge_length_sets_no_memory_aside_for_it() {
    let (url, _) = serve(|stream| {
        let _ =
            stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 9223372036854775808\r\n\r\nok");
        let _ = stream.shutdown(std::net::Shutdown::Both);
    });
    for sink in [
        HttpSink::builder(url.as_str()),
        HttpSink::builder(url.as_str()).max_reply_body(usize::MAX),
    ] {
        let error = failure(sink.timeout(Duration::from_secs(30)));
        assert!(error.is_retryable(), "{error}");
        assert!(
            error.to_string().contains("reading the response failed"),
            "{error}"
        );
    }
}

/// Left at its default, a sink still bounds what it keeps of a reply: a server answering with
/// a huge or endless body cannot make the process grow until the request times out.
#[test]
fn a_huge_reply_body_is_cut_at_the_default_limit() {
    let (url, read_whole) = huge_body("200 OK");
    let reply = delivered(HttpSink::builder(url));
    assert_eq!(
        (reply.body.len(), reply.truncated),
        (HttpSinkBuilder::DEFAULT_MAX_REPLY_BODY, true)
    );
    assert!(!read_whole(), "the whole body was read");
}

#[test]
fn every_key_arrives_percent_encoded() {
    let (url, heads) = serve(reply("200 OK", "", b""));
    let c: Conveyor<String, HttpReply> = Conveyor::builder()
        .ordering(Ordering::Keyed { concurrency: 1 })
        .build(HttpSink::builder(url).build().unwrap().into_sink())
        .unwrap();
    let keys = [
        ("user-42", "user-42"),
        ("a b", "a%20b"),
        ("café", "caf%C3%A9"),
        ("50%", "50%25"),
        ("line\nbreak", "line%0Abreak"),
        (" padded ", "%20padded%20"),
        ("", ""),
    ];
    for (key, _) in keys {
        c.send_keyed(key, "{}".to_owned()).unwrap();
    }
    c.flush();
    // Lanes run one at a time here, but which lane goes next is not promised: compare sorted.
    let heads = heads.lock().unwrap();
    let mut sent: Vec<Option<&str>> = heads
        .iter()
        .map(|r| header(&r.head, "conveyor-key"))
        .collect();
    let mut expected: Vec<Option<&str>> = keys.iter().map(|(_, encoded)| Some(*encoded)).collect();
    sent.sort_unstable();
    expected.sort_unstable();
    assert_eq!(sent, expected);
}

#[test]
fn a_url_that_does_not_parse_hides_its_password() {
    for (url, shown) in [
        (
            "http://user:hunter2@exa mple.com/",
            "http://user:redacted@exa mple.com/",
        ),
        // A stray `/` or `#` in a password, a likely reason for the failure, ends no userinfo.
        (
            "http://user:hun/ter#2@exa mple.com/",
            "http://user:redacted@exa mple.com/",
        ),
        ("user:hunter2@exa mple.com", "user:redacted@exa mple.com"),
    ] {
        let error = HttpSink::builder(url).build().unwrap_err().to_string();
        assert!(error.contains(&format!("`{shown}`")), "{error}");
        assert!(
            !error.contains("hunter2") && !error.contains("ter#2"),
            "{error}"
        );
    }
}

#[test]
fn a_retry_after_too_large_to_count_asks_for_the_longest_wait() {
    let error = failure(answering(
        "503 Busy",
        "Retry-After: 99999999999999999999\r\n",
        b"",
    ));
    assert_eq!(error.retry_after(), Some(Duration::MAX));
}

/// A server that never answers, or stops halfway through a body: the error names the limit
/// and how to raise it.
#[test]
fn a_timeout_says_how_long_and_how_to_raise_it() {
    let silent = serve(|_| std::thread::sleep(Duration::from_secs(30))).0;
    let halfway = serve(|stream| {
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234");
        std::thread::sleep(Duration::from_secs(30));
    })
    .0;
    for url in [silent, halfway] {
        let error = failure(HttpSink::builder(url).timeout(Duration::from_millis(300)));
        assert!(error.is_retryable(), "{error}");
        let message = error.to_string();
        assert!(
            message.contains("timed out")
                && message.contains("within 300ms")
                && message.contains("--timeout"),
            "{message}"
        );
    }
}

/// A body that trickles in, a byte at a time well within the timeout each, still has to end
/// within the request's timeout: a server cannot hold a lane for as long as it keeps talking.
#[test]
fn a_trickling_body_runs_out_of_time() {
    for status in ["200 OK", "503 Service Unavailable"] {
        let url = serve(move |stream| {
            let head = format!("HTTP/1.1 {status}\r\ncontent-length: 200\r\n\r\n");
            let _ = stream.write_all(head.as_bytes());
            // 10 s in all, far past the timeout below.
            for _ in 0..200 {
                if stream
                    .write_all(b"x")
                    .and_then(|()| stream.flush())
                    .is_err()
                {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .0;
        let error = failure(HttpSink::builder(url).timeout(Duration::from_millis(300)));
        let message = error.to_string();
        assert!(error.is_retryable(), "{status}: {message}");
        assert!(!message.contains(&"x".repeat(200)), "read whole: {message}");
        if status == "200 OK" {
            assert!(message.contains("within 300ms"), "{message}");
        } else {
            // The status is the failure; its body is quoted as far as it came in time.
            assert!(
                message.starts_with("HTTP 503 Service Unavailable"),
                "{message}"
            );
        }
    }
}

/// A timeout too long for the clock (`Duration::MAX`, or a front's "forever") waits without a
/// deadline instead of failing every request with a panic.
#[test]
fn a_timeout_too_long_for_the_clock_means_no_deadline() {
    for timeout in [Duration::MAX, Duration::from_secs(u64::MAX / 2)] {
        let reply = delivered(answering("200 OK", "", b"fine").timeout(timeout));
        assert_eq!((reply.status, &reply.body[..]), (200, &b"fine"[..]));
    }
}

#[test]
fn a_zero_timeout_is_refused() {
    let error = HttpSink::builder("http://127.0.0.1:9/")
        .timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(error, HttpBuildError::ZeroTimeout);
    assert!(error.to_string().contains("timeout"), "{error}");
}

#[test]
fn a_redirect_says_where_it_points() {
    let error = failure(answering(
        "301 Moved Permanently",
        "Location: https://user:pw-in-location@example.com/new\r\n",
        b"",
    ));
    assert_eq!(
        error.to_string(),
        "HTTP 301 Moved Permanently (Location: https://user:redacted@example.com/new)"
    );
    let error = failure(answering(
        "308 Permanent Redirect",
        "Location: /v2/in\r\n",
        b"moved",
    ));
    assert_eq!(
        error.to_string(),
        "HTTP 308 Permanent Redirect (Location: /v2/in): moved"
    );
}

/// A failure carries its status as an `HttpError`, for code that branches on it; a request
/// that got no response carries none.
#[test]
fn a_failure_carries_its_status() {
    let status = |error: &conveyor::SinkError| {
        error
            .get_ref()
            .downcast_ref::<conveyor::HttpError>()
            .expect("the sink's errors are HttpErrors")
            .status
    };
    assert_eq!(
        status(&failure(answering("404 Not Found", "", b"no"))),
        Some(404)
    );
    let busy = failure(answering("503 Service Unavailable", "", b""));
    assert_eq!(status(&busy), Some(503));
    assert_eq!(busy.to_string(), "HTTP 503 Service Unavailable");
    // A port nobody listens on: the listener is dropped before the request.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let refused = failure(HttpSink::builder(format!("http://127.0.0.1:{port}/")));
    assert_eq!(status(&refused), None);
}

/// A host that cannot be reached is named, with the reason in plain words and what to check,
/// ahead of the client's own text, which stays for the detail.
#[test]
fn an_unreachable_host_is_named_with_the_reason() {
    // A port nobody listens on: the listener is dropped before the request.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let refused = failure(HttpSink::builder(format!(
        "http://user:pa55word@127.0.0.1:{port}/in"
    )))
    .to_string();
    assert!(
        refused.starts_with(&format!(
            "cannot connect to 127.0.0.1:{port}: connection refused; check that the server is \
             running"
        )),
        "{refused}"
    );
    assert!(refused.contains("(os error"), "keeps the detail: {refused}");
    assert!(!refused.contains("pa55word"), "{refused}");

    // `.invalid` never resolves (RFC 6761).
    let unknown = failure(HttpSink::builder("http://no-such-host.invalid/in")).to_string();
    assert!(
        unknown.starts_with(
            "cannot connect to no-such-host.invalid:80: the host name could not be resolved"
        ),
        "{unknown}"
    );
}

/// A server whose certificate a private CA signed: refused until the CA is trusted, then
/// delivered to.
#[test]
fn https_to_a_private_ca_needs_its_root_certificate() {
    let (url, heads) = serve_tls(reply("200 OK", "", b"ok"));
    let error = failure(HttpSink::builder(url.as_str()));
    assert!(error.is_retryable(), "a connection failure: {error}");
    assert!(
        error.to_string().contains("UnknownIssuer") && error.to_string().contains("--cacert"),
        "says what is wrong and what to do: {error}"
    );
    assert!(heads.lock().unwrap().is_empty(), "no request got through");

    // As a Windows editor saves it, with a byte order mark.
    let sink = HttpSink::builder(url.as_str())
        .root_certificates([b"\xEF\xBB\xBF", CA_PEM].concat())
        .build()
        .unwrap();
    let c: Conveyor<String, HttpReply> = Conveyor::builder().build(sink.into_sink()).unwrap();
    let reply = c.send("{}".to_owned()).unwrap().wait().unwrap();
    assert_eq!((reply.status, reply.body), (200, b"ok".to_vec()));
    assert_eq!(heads.lock().unwrap().len(), 1);
}

#[test]
fn root_certificates_that_are_not_pem_certificates_are_refused() {
    let key = include_bytes!("fixtures/tls/server.key").to_vec();
    for (given, why) in [
        (b"not a certificate".to_vec(), "no certificate found"),
        (key, "no certificate found"),
        (
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n".to_vec(),
            "does not hold a valid certificate (BadEncoding)",
        ),
    ] {
        let err = HttpSink::builder("https://127.0.0.1:1/in")
            .root_certificates(given)
            .build()
            .unwrap_err();
        assert!(
            matches!(&err, HttpBuildError::InvalidRootCertificates(reason) if reason.contains(why)),
            "{err:?}"
        );
        assert!(err.to_string().contains("BEGIN CERTIFICATE"), "{err}");
    }
}
