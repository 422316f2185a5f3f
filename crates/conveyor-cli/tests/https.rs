//! `--to https://...` with `--cacert`: a server whose certificate a private CA signed.

mod common;

use common::{conveyor, expect_exit, items, send_in_memory, write_lines};

#[path = "../../conveyor/tests/fixtures/server.rs"]
mod server;

/// The bodies of the requests received, as text.
fn bodies(requests: &server::Requests) -> Vec<String> {
    let requests = requests.lock().unwrap();
    requests
        .iter()
        .map(|r| String::from_utf8(r.body.clone()).unwrap())
        .collect()
}

#[test]
fn a_private_ca_is_trusted_with_cacert() {
    let dir = tempfile::tempdir().unwrap();
    let lines = items(3, 1);
    let input = write_lines(dir.path(), "in.jsonl", &lines);
    let (url, requests) = server::serve_tls(server::reply("200 OK", "", b""));

    // Without the CA: the lines fail, and the error says what to do.
    let output = send_in_memory(dir.path(), &input, &url, &["--retries", "0"]);
    let (_, stderr) = expect_exit(&output, 1);
    assert!(
        stderr.contains("UnknownIssuer") && stderr.contains("--cacert"),
        "{stderr}"
    );
    assert!(bodies(&requests).is_empty());

    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, server::CA_PEM).unwrap();
    let output = send_in_memory(
        dir.path(),
        &input,
        &url,
        &["--cacert", ca.to_str().unwrap()],
    );
    expect_exit(&output, 0);
    assert_eq!(bodies(&requests), lines);
}

#[test]
fn a_cacert_that_cannot_be_used_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(1, 1));
    let not_pem = dir.path().join("ca.txt");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let missing = dir.path().join("missing.pem");
    let url = "https://127.0.0.1:9/in";
    for (cacert, says) in [
        (&not_pem, "BEGIN CERTIFICATE"),
        (&missing, "cannot read --cacert"),
    ] {
        let output = send_in_memory(
            dir.path(),
            &input,
            url,
            &["--cacert", cacert.to_str().unwrap()],
        );
        let (_, stderr) = expect_exit(&output, 2);
        assert!(
            stderr.contains("--cacert") && stderr.contains(says),
            "{stderr}"
        );
    }
    let output = conveyor(dir.path())
        .args(["send", input.to_str().unwrap(), "--no-journal", "--cacert"])
        .arg(&not_pem)
        .args(["--exec", "true"])
        .output()
        .unwrap();
    let (_, stderr) = expect_exit(&output, 2);
    assert!(stderr.contains("--cacert only applies"), "{stderr}");
}
