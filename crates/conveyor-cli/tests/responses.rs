//! What `conveyor send` does with what a server answers, beyond its status.

mod common;

use common::{expect_exit, items, send_in_memory, write_lines};

#[path = "../../conveyor/tests/fixtures/server.rs"]
mod server;

/// The CLI drops a reply's body, so a huge (or endless) one is not read: memory stays flat
/// and the line is delivered once its status says so.
#[test]
fn a_huge_reply_body_is_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(1, 1));
    let (url, read_whole) = server::huge_body("200 OK");
    let output = send_in_memory(dir.path(), &input, &url, &["--retries", "0"]);
    expect_exit(&output, 0);
    assert!(!read_whole(), "the whole body was read");
}
