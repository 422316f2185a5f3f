//! Retryable and permanent HTTP failures, and secrets kept out of every output.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

#[test]
fn a_503_with_retry_after_is_retried_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let failures = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&failures);
    let server = Server::start(move |a| {
        let id = a.json().unwrap()["id"].as_u64().unwrap();
        if id == 3 && seen.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::status(503).header("Retry-After", "1")
        } else {
            Reply::ok()
        }
    })
    .unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(8, 1));
    let output = send_in_memory(
        dir.path(),
        &input,
        &server.url(),
        &["--retries", "3", "--backoff", "10ms"],
    );
    expect_exit(&output, 0);
    let arrivals = server.arrivals();
    // Line 4 (id 3) arrives twice, back to back: nothing overtakes a retried item.
    assert_eq!(ids(&arrivals), [0, 1, 2, 3, 3, 4, 5, 6, 7]);
    let (first, second) = (&arrivals[3], &arrivals[4]);
    assert_eq!(
        first.header("idempotency-key"),
        second.header("idempotency-key")
    );
    assert_eq!(first.seq(), second.seq());
    assert_eq!(first.header("conveyor-attempt"), Some("1"));
    assert_eq!(second.header("conveyor-attempt"), Some("2"));
    // Retry-After (1 s) wins over the 10 ms backoff.
    let waited = second.at.duration_since(first.at);
    assert!(
        waited >= Duration::from_millis(900),
        "retried after {waited:?}"
    );
    let summary = summary(&output);
    assert_eq!(summary["delivered"], 8);
    assert_eq!(summary["retried"], 1);
}

#[test]
fn a_4xx_fails_the_line_at_once_and_the_rest_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|a| {
        if a.json().unwrap()["id"] == 2 {
            Reply::status(422).body("field `x` is missing")
        } else {
            Reply::ok()
        }
    })
    .unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(6, 1));
    let output = send_in_memory(
        dir.path(),
        &input,
        &server.url(),
        &["--retries", "3", "--backoff", "10ms"],
    );
    let (_, stderr) = expect_exit(&output, 1);
    assert_eq!(
        ids(&server.arrivals()),
        [0, 1, 2, 3, 4, 5],
        "a 422 is not retried"
    );
    assert!(
        stderr.contains("line 3: failed after 1 attempt"),
        "{stderr}"
    );
    assert!(
        stderr.contains("422") && stderr.contains("field `x` is missing"),
        "{stderr}"
    );
    let summary = summary(&output);
    assert_eq!(
        (summary["delivered"].as_u64(), summary["failed"].as_u64()),
        (Some(5), Some(1))
    );
}

#[test]
fn the_help_says_how_long_a_retry_after_may_hold_a_line() {
    let output = conveyor(std::path::Path::new("."))
        .args(["send", "--help"])
        .output()
        .unwrap();
    let (stdout, _) = expect_exit(&output, 0);
    // Help text is wrapped to the terminal's width: compare it as one line.
    let help = stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        help.contains("A server's Retry-After wins when longer, up to an hour"),
        "{help}"
    );
}

#[test]
fn a_request_over_timeout_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let slow_once = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&slow_once);
    let server = Server::start(move |_| {
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::ok().delay(Duration::from_secs(3))
        } else {
            Reply::ok()
        }
    })
    .unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(2, 1));
    let output = send_in_memory(
        dir.path(),
        &input,
        &server.url(),
        &["--timeout", "300ms", "--retries", "1", "--backoff", "10ms"],
    );
    expect_exit(&output, 0);
    assert_eq!(ids(&server.arrivals()), [0, 0, 1]);
    let summary = summary(&output);
    assert_eq!(
        (summary["delivered"].as_u64(), summary["retried"].as_u64()),
        (Some(2), Some(1))
    );
}

#[test]
fn a_zero_timeout_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(2, 1));
    let url = server.url();
    // Every request, or program run, would run out of time at once.
    for target in [&["--to", url.as_str()][..], &["--exec", "true"][..]] {
        for zero in ["0s", "0ms"] {
            let output = conveyor(dir.path())
                .args(["send", input.to_str().unwrap(), "--no-journal"])
                .args(["--timeout", zero])
                .args(target)
                .output()
                .unwrap();
            let (stdout, stderr) = expect_exit(&output, 2);
            assert!(stdout.is_empty(), "{stdout}");
            assert!(stderr.contains("--timeout"), "{stderr}");
        }
    }
    assert!(server.arrivals().is_empty());
}

#[test]
fn a_dead_server_is_retried_then_reported() {
    let dir = tempfile::tempdir().unwrap();
    // Bind and drop a listener: the port is then (almost certainly) closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let input = write_lines(dir.path(), "in.jsonl", &items(3, 1));
    let output = conveyor(dir.path())
        .args(["send", input.to_str().unwrap(), "--no-journal", "--json"])
        .args([
            "--to",
            &format!("http://127.0.0.1:{port}/"),
            "--retries",
            "2",
            "--backoff",
            "10ms",
        ])
        .output()
        .unwrap();
    let (_, stderr) = expect_exit(&output, 1);
    // Said once, naming the host and why, not once per line.
    assert!(
        stderr.contains(&format!(
            "line 1: failed after 3 attempt(s): cannot connect to 127.0.0.1:{port}: connection \
             refused"
        )),
        "{stderr}"
    );
    assert_eq!(stderr.matches("cannot connect").count(), 1, "{stderr}");
    assert!(
        stderr.contains("lines 2 to 3 failed after 3 attempt(s) with the same error as line 1"),
        "{stderr}"
    );
    let summary = summary(&output);
    assert_eq!(summary["failed"], 3);
    assert_eq!(summary["retried"], 6);
}

#[test]
fn header_values_never_appear_in_any_output() {
    const SECRET: &str = "s3cr3t-t0ken-value";
    let dir = tempfile::tempdir().unwrap();
    // The server echoes the Authorization header in its error body, as some do.
    let server = Server::start(|a| {
        let auth = a.header("authorization").unwrap_or("").to_owned();
        if a.json().unwrap()["id"] == 1 {
            Reply::status(401).body(format!("bad credentials: {auth}"))
        } else {
            Reply::ok()
        }
    })
    .unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(3, 1));
    let auth = format!("Authorization: Bearer {SECRET}");
    let key = format!("X-Api-Key:{SECRET}-2");
    for extra in [&["--json"][..], &[][..]] {
        let output = conveyor(dir.path())
            .args([
                "send",
                input.to_str().unwrap(),
                "--to",
                &server.url(),
                "--no-journal",
            ])
            .args(["-H", &auth, "--header", &key])
            .args(extra)
            .output()
            .unwrap();
        let (stdout, stderr) = expect_exit(&output, 1);
        assert!(stderr.contains("401"), "{stderr}");
        assert!(
            !stdout.contains(SECRET) && !stderr.contains(SECRET),
            "{stdout}\n{stderr}"
        );
    }
    // The headers were really sent.
    let arrivals = server.arrivals();
    assert_eq!(
        arrivals[0].header("authorization"),
        Some(&*format!("Bearer {SECRET}"))
    );
    assert_eq!(
        arrivals[0].header("x-api-key"),
        Some(&*format!("{SECRET}-2"))
    );

    // An unreachable target and a malformed header value: still no secret in the messages.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable = conveyor(dir.path())
        .args([
            "send",
            input.to_str().unwrap(),
            "--no-journal",
            "--retries",
            "0",
        ])
        .args(["--to", &format!("http://127.0.0.1:{port}/"), "-H", &auth])
        .output()
        .unwrap();
    let bad_value = conveyor(dir.path())
        .args([
            "send",
            input.to_str().unwrap(),
            "--no-journal",
            "--to",
            &server.url(),
        ])
        .args(["-H", &format!("X-Bad: {SECRET}\u{7f}")])
        .output()
        .unwrap();
    assert_eq!(bad_value.status.code(), Some(2));
    for output in [unreachable, bad_value] {
        let (stdout, stderr) = texts(&output);
        assert!(!stderr.is_empty());
        assert!(
            !stdout.contains(SECRET) && !stderr.contains(SECRET),
            "{stdout}\n{stderr}"
        );
    }
}
