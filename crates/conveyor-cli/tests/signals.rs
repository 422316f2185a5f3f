//! Ctrl-C / SIGTERM: stop reading, drain within --drain-timeout, summarise, documented exit codes.

mod common;

use std::process::Child;
use std::time::Duration;

use common::*;

fn spawn_send(dir: &std::path::Path, server: &Server, lines: u64, drain: &str) -> Child {
    let input = write_lines(dir, "in.jsonl", &items(lines, 1));
    let input = input.to_str().unwrap();
    let url = server.url();
    let args = [
        "send",
        input,
        "--to",
        &url,
        "--no-journal",
        "--json",
        "--drain-timeout",
        drain,
    ];
    spawn(dir, &args)
}

fn interrupted_run(signal_name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok().delay(Duration::from_millis(200))).unwrap();
    let child = spawn_send(dir.path(), &server, 40, "700ms");
    wait_for("deliveries to start", || server.count() >= 2);
    let arrived_at_signal = server.count() as u64;
    signal(&child, signal_name);
    let output = child.wait_with_output().unwrap();
    let (_, stderr) = expect_exit(&output, 3);
    assert!(stderr.contains("interrupted"), "{stderr}");
    let summary = summary(&output);
    assert_eq!(summary["interrupted"], true);
    let delivered = summary["delivered"].as_u64().unwrap();
    let left = summary["left"].as_u64().unwrap();
    let accepted = summary["accepted"].as_u64().unwrap();
    // The request under way at the signal was let finish; not everything was sent.
    assert!(delivered >= arrived_at_signal - 1, "{summary}");
    assert!(delivered < 40 && left > 0, "{summary}");
    assert_eq!(
        delivered + summary["failed"].as_u64().unwrap() + left,
        accepted,
        "{summary}"
    );
    // At most one request was cut off by the drain deadline.
    assert!(server.count() as u64 <= delivered + 1, "{summary}");
    // Nothing queued was started after the signal: only the request in flight then (or the
    // next one, if it began between the count above and the signal) arrived.
    assert!(
        server.count() as u64 <= arrived_at_signal + 1,
        "{} arrived, {arrived_at_signal} before the signal",
        server.count()
    );
    // What arrived is a prefix of the input, in order.
    assert_eq!(
        ids(&server.arrivals()),
        (0..server.count() as u64).collect::<Vec<_>>()
    );
}

#[test]
fn sigint_drains_then_exits_3_with_a_summary() {
    interrupted_run("INT");
}

#[test]
fn sigterm_is_handled_like_ctrl_c() {
    interrupted_run("TERM");
}

#[test]
fn a_second_ctrl_c_exits_at_once_with_130() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok().delay(Duration::from_millis(400))).unwrap();
    let child = spawn_send(dir.path(), &server, 20, "60s");
    wait_for("deliveries to start", || server.count() >= 1);
    let output = interrupt_twice(child);
    expect_exit(&output, 130);
    assert!(server.count() < 20);
}

#[test]
fn a_second_ctrl_c_still_names_the_failed_lines_held_back_as_repeats() {
    let dir = tempfile::tempdir().unwrap();
    // Lines 1 to 3 fail alike at once; line 4 hangs, so the first Ctrl-C's drain waits.
    let server = Server::start(|a| match a.json().unwrap()["id"].as_u64().unwrap() {
        0..=2 => Reply::status(500),
        _ => Reply::ok().delay(Duration::from_secs(60)),
    })
    .unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(6, 1));
    let url = server.url();
    let args = [
        "send",
        input.to_str().unwrap(),
        "--to",
        &url,
        "--no-journal",
        "--retries",
        "0",
        "--drain-timeout",
        "60s",
    ];
    let child = spawn(dir.path(), &args);
    wait_for("the hanging line to arrive", || server.count() >= 4);
    let output = interrupt_twice(child);
    let (_, stderr) = expect_exit(&output, 130);
    assert!(
        stderr.contains("line 1: failed after 1 attempt(s)"),
        "{stderr}"
    );
    // Held back until the end of the run, which a second Ctrl-C cuts short.
    let held = stderr
        .find("lines 2 to 3 failed after 1 attempt(s) with the same error as line 1")
        .unwrap_or_else(|| panic!("the held-back failures are not named: {stderr}"));
    assert!(held < stderr.find("interrupted again").unwrap(), "{stderr}");
}
