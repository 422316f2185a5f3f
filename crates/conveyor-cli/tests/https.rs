//! `--to https://...` with `--cacert`: a server whose certificate a private CA signed.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use common::{conveyor, expect_exit, items, send_in_memory, write_lines};

#[path = "../../conveyor/tests/fixtures/tls/server.rs"]
mod tls;

/// An HTTPS server on 127.0.0.1 answering 200 to every request; returns its URL and the bodies
/// it received, in arrival order.
fn serve_tls() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}/in", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&bodies);
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Some(stream) = tcp.ok().and_then(tls::accept) else {
                continue;
            };
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                // Requests one after another on a kept-alive connection, until it ends (or its
                // handshake fails: the client did not trust the certificate).
                loop {
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':') {
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap();
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    seen.lock().unwrap().push(String::from_utf8(body).unwrap());
                    let stream = reader.get_mut();
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .and_then(|()| stream.flush());
                }
            });
        }
    });
    (url, bodies)
}

#[test]
fn a_private_ca_is_trusted_with_cacert() {
    let dir = tempfile::tempdir().unwrap();
    let lines = items(3, 1);
    let input = write_lines(dir.path(), "in.jsonl", &lines);
    let (url, bodies) = serve_tls();

    // Without the CA: the lines fail, and the error says what to do.
    let output = send_in_memory(dir.path(), &input, &url, &["--retries", "0"]);
    let (_, stderr) = expect_exit(&output, 1);
    assert!(
        stderr.contains("UnknownIssuer") && stderr.contains("--cacert"),
        "{stderr}"
    );
    assert!(bodies.lock().unwrap().is_empty());

    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, tls::CA_PEM).unwrap();
    let output = send_in_memory(
        dir.path(),
        &input,
        &url,
        &["--cacert", ca.to_str().unwrap()],
    );
    expect_exit(&output, 0);
    assert_eq!(*bodies.lock().unwrap(), lines);
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
