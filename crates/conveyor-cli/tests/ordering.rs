//! Order of arrival at a real HTTP server under each `--ordering` mode.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

#[test]
fn strict_delivers_every_line_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(200, 1));
    let output = send_in_memory(dir.path(), &input, &server.url(), &[]);
    expect_exit(&output, 0);
    let arrivals = server.arrivals();
    assert_eq!(ids(&arrivals), (0..200).collect::<Vec<_>>());
    // Seq headers increase with input order, and every request has an idempotency key.
    let seqs: Vec<u64> = arrivals
        .iter()
        .map(|a| a.seq().expect("Conveyor-Seq"))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(arrivals
        .iter()
        .all(|a| a.header("idempotency-key").is_some_and(|k| !k.is_empty())));
    assert!(arrivals
        .iter()
        .all(|a| a.method == "POST" && a.header("content-type") == Some("application/json")));
    let summary = summary(&output);
    assert_eq!(summary["delivered"], 200);
    assert_eq!(summary["failed"], 0);
    assert!(summary["latency_p50_ms"].as_f64().is_some());
}

#[test]
fn pipelined_starts_in_order_and_delivers_each_line_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok().delay(Duration::from_millis(5))).unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(100, 1));
    let output = send_in_memory(
        dir.path(),
        &input,
        &server.url(),
        &["--ordering", "pipelined:4", "--method", "PUT"],
    );
    expect_exit(&output, 0);
    let arrivals = server.arrivals();
    let mut got = ids(&arrivals);
    got.sort_unstable();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    assert!(arrivals.iter().all(|a| a.method == "PUT"));
}

#[test]
fn keyed_keeps_order_within_each_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok().delay(Duration::from_millis(2))).unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(160, 8));
    let output = send_in_memory(
        dir.path(),
        &input,
        &server.url(),
        &["--ordering", "keyed:8", "--key", "user"],
    );
    expect_exit(&output, 0);
    let arrivals = server.arrivals();
    assert_eq!(arrivals.len(), 160);
    let mut per_user: HashMap<String, Vec<u64>> = HashMap::new();
    for a in &arrivals {
        let json = a.json().unwrap();
        per_user
            .entry(json["user"].as_str().unwrap().to_owned())
            .or_default()
            .push(json["id"].as_u64().unwrap());
        assert_eq!(a.header("conveyor-key"), json["user"].as_str());
    }
    assert_eq!(per_user.len(), 8);
    for (user, got) in per_user {
        let expected: Vec<u64> = got
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(got, expected, "lane {user} out of order");
        assert_eq!(got.len(), 20);
    }
}

#[test]
fn keyed_accepts_a_json_pointer_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    let lines: Vec<String> = (0..20)
        .map(|i| format!(r#"{{"id":{i},"who":{{"team":{}}}}}"#, i % 3))
        .collect();
    let input = write_lines(dir.path(), "in.jsonl", &lines);
    let output = send_in_memory(
        dir.path(),
        &input,
        &server.url(),
        &["--ordering", "keyed:3", "--key", "/who/team"],
    );
    expect_exit(&output, 0);
    let arrivals = server.arrivals();
    assert_eq!(arrivals.len(), 20);
    let mut keys: Vec<&str> = arrivals
        .iter()
        .filter_map(|a| a.header("conveyor-key"))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys, ["0", "1", "2"]);
}

#[test]
fn usage_errors_exit_2_and_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(1, 1));
    let cases: [&[&str]; 4] = [
        &["--to", "http://127.0.0.1:9/", "--ordering", "keyed:4"],
        &["--to", "http://127.0.0.1:9/", "--key", "user"],
        &["--to", "not a url"],
        &["--to", "http://127.0.0.1:9/", "--ordering", "sideways"],
    ];
    for args in cases {
        let output = conveyor(dir.path())
            .args(["send", input.to_str().unwrap(), "--no-journal"])
            .args(args)
            .output()
            .unwrap();
        let (_, stderr) = texts(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(!stderr.trim().is_empty(), "{args:?}");
    }
    let missing = conveyor(dir.path())
        .args([
            "send",
            "no-such-file.jsonl",
            "--to",
            "http://127.0.0.1:9/",
            "--no-journal",
        ])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(texts(&missing).1.contains("no-such-file.jsonl"));
}
