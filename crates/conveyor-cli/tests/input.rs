//! Bad input lines, rejects, and streaming from stdin.

mod common;

use std::io::Write;

use common::*;

#[test]
fn bad_lines_are_reported_copied_and_never_stop_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    let lines: Vec<String> = vec![
        r#"{"id":0}"#.into(),
        "{not json".into(),
        r#"{"id":1}"#.into(),
        String::new(),
        "[1, 2".into(),
        r#"{"id":2}"#.into(),
    ];
    let input = write_lines(dir.path(), "in.jsonl", &lines);
    let rejects = dir.path().join("rejects.jsonl");
    let (output, stderr) = send_rejecting(dir.path(), &input, &server.url(), &rejects);
    assert!(
        stderr.contains("line 2: rejected: not valid JSON"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 5: rejected: not valid JSON"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("line 4"),
        "a blank line is not an error: {stderr}"
    );
    assert_eq!(ids(&server.arrivals()), [0, 1, 2]);
    assert_eq!(
        std::fs::read_to_string(&rejects).unwrap(),
        "{not json\n[1, 2\n"
    );
    let summary = summary(&output);
    assert_eq!(
        (summary["delivered"].as_u64(), summary["rejected"].as_u64()),
        (Some(3), Some(2))
    );
}

/// `send_in_memory` with `--rejects REJECTS`, for a run that rejects lines (exit 1): its output
/// and its stderr.
fn send_rejecting(
    dir: &std::path::Path,
    input: &std::path::Path,
    url: &str,
    rejects: &std::path::Path,
) -> (std::process::Output, String) {
    let output = send_in_memory(dir, input, url, &["--rejects", rejects.to_str().unwrap()]);
    let (_, stderr) = expect_exit(&output, 1);
    (output, stderr)
}

#[test]
fn lines_without_the_key_field_are_rejected_in_keyed_mode() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    let lines: Vec<String> = vec![
        r#"{"id":0,"user":"a"}"#.into(),
        r#"{"id":1}"#.into(),
        r#"{"id":2,"user":"b"}"#.into(),
    ];
    let input = write_lines(dir.path(), "in.jsonl", &lines);
    let output = send_in_memory(
        dir.path(),
        &input,
        &server.url(),
        &["--ordering", "keyed:2", "--key", "user"],
    );
    let (_, stderr) = expect_exit(&output, 1);
    assert!(
        stderr.contains("line 2: rejected: no key field `user`"),
        "{stderr}"
    );
    let mut got = ids(&server.arrivals());
    got.sort_unstable();
    assert_eq!(got, [0, 2]);
}

/// A recording server, and `conveyor send - --to it --no-journal --json` running with its
/// stdin handed back to write the input to.
fn streaming_in_memory(
    dir: &std::path::Path,
) -> (Server, std::process::Child, std::process::ChildStdin) {
    let server = Server::start(|_| Reply::ok()).unwrap();
    let url = server.url();
    let mut child = spawn(dir, &["send", "-", "--to", &url, "--no-journal", "--json"]);
    let stdin = child.stdin.take().unwrap();
    (server, child, stdin)
}

#[test]
fn stdin_is_streamed_delivery_starts_before_input_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (server, child, mut stdin) = streaming_in_memory(dir.path());
    writeln!(stdin, r#"{{"id":0}}"#).unwrap();
    stdin.flush().unwrap();
    // The first line arrives while stdin is still open.
    wait_for("the first line to arrive", || server.count() == 1);
    for id in 1..50 {
        writeln!(stdin, r#"{{"id":{id}}}"#).unwrap();
    }
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    expect_exit(&output, 0);
    assert_eq!(ids(&server.arrivals()), (0..50).collect::<Vec<_>>());
    assert_eq!(summary(&output)["delivered"], 50);
}

#[test]
fn a_closed_stdout_is_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(5, 1));
    let url = server.url();
    let args = [
        "send",
        input.to_str().unwrap(),
        "--to",
        &url,
        "--no-journal",
    ];
    let mut child = spawn(dir.path(), &args);
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let (_, stderr) = expect_exit(&output, 0);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
    assert_eq!(server.count(), 5);
}

#[test]
fn an_input_that_cannot_be_read_creates_no_journal() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    std::fs::create_dir(dir.path().join("a-directory")).unwrap();
    for (input, why) in [
        ("mistyped.jsonl", "cannot open input mistyped.jsonl"),
        ("a-directory", "a-directory is a directory"),
    ] {
        let output = conveyor(dir.path())
            .args(["send", input, "--to", &server.url()])
            .output()
            .unwrap();
        let (_, stderr) = expect_exit(&output, 2);
        assert!(stderr.contains(why), "{stderr}");
    }
    assert!(
        !dir.path().join(".conveyor").exists(),
        "no journal for an input that was never read"
    );
    assert_eq!(server.count(), 0);
}

/// `--rejects` naming a file the run reads (the README's `--rejects bad.jsonl`, run on a
/// bad.jsonl) would be emptied or appended to before it is read: the run is refused, exit 2,
/// and the file is left as it was, rather than a run that sent nothing reporting success.
#[test]
fn a_rejects_file_that_the_run_reads_is_refused_and_left_whole() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(3, 1));
    let journal = dir.path().join("in.journal");
    let send = |rejects: &std::path::Path| {
        conveyor(dir.path())
            .args(["send", input.to_str().unwrap(), "--to", &server.url()])
            .args(["--journal", journal.to_str().unwrap()])
            .args(["--rejects", rejects.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let link = dir.path().join("link.jsonl");
    std::os::unix::fs::symlink(&input, &link).unwrap();
    let lines = std::fs::read(&input).unwrap();
    for (rejects, what) in [(&input, "the input"), (&link, "the input")] {
        let (_, stderr) = expect_exit(&send(rejects), 2);
        assert!(stderr.contains(&format!("is {what}")), "{stderr}");
        assert!(stderr.contains("name another file"), "{stderr}");
        assert_eq!(
            std::fs::read(&input).unwrap(),
            lines,
            "the input was changed"
        );
    }
    assert_eq!(server.count(), 0);
    // A journal, once it exists, is never appended to either.
    expect_exit(&send(&dir.path().join("rejects.jsonl")), 0);
    let kept = std::fs::read(&journal).unwrap();
    let (_, stderr) = expect_exit(&send(&journal), 2);
    assert!(stderr.contains("is the journal"), "{stderr}");
    assert_eq!(
        std::fs::read(&journal).unwrap(),
        kept,
        "the journal was changed"
    );
    assert_eq!(ids(&server.arrivals()), [0, 1, 2]);
}

#[test]
fn a_rerun_keeps_the_rejects_of_the_earlier_run() {
    let dir = tempfile::tempdir().unwrap();
    let (server, broken) = server_failing_id(1, || Reply::status(404));
    let lines: Vec<String> = vec![
        r#"{"id":0}"#.into(),
        "{bad".into(),
        r#"{"id":1}"#.into(),
        r#"{"id":2}"#.into(),
        "[oops".into(),
        r#"{"id":3}"#.into(),
    ];
    let input = write_lines(dir.path(), "in.jsonl", &lines);
    let rejects = dir.path().join("rejects.jsonl");
    let send = |extra: &[&str]| {
        conveyor(dir.path())
            .args(["send", input.to_str().unwrap(), "--to", &server.url()])
            .args(["--rejects", rejects.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    // The first run pauses at id 1, after reading (and rejecting) every bad line.
    expect_exit(&send(&["--on-failure", "pause", "--retries", "0"]), 3);
    assert_eq!(std::fs::read_to_string(&rejects).unwrap(), "{bad\n[oops\n");
    broken.store(false, std::sync::atomic::Ordering::SeqCst);
    expect_exit(&conveyor(dir.path()).args(["resume"]).output().unwrap(), 0);
    // The rerun reads no line again, so it rejects none: the earlier rejects stay.
    expect_exit(&send(&["--on-failure", "pause", "--retries", "0"]), 0);
    assert_eq!(ids(&server.arrivals()), [0, 1, 1, 2, 3]);
    assert_eq!(std::fs::read_to_string(&rejects).unwrap(), "{bad\n[oops\n");
    // A run that reads the file from its first line writes the file afresh, without doubles.
    expect_exit(&send(&["--no-journal"]), 1);
    assert_eq!(std::fs::read_to_string(&rejects).unwrap(), "{bad\n[oops\n");
    // Stdin is a new stream each time: its rejects are added to the earlier ones.
    let from_stdin = conveyor(dir.path())
        .args(["send", "-", "--to", &server.url(), "--no-journal"])
        .args(["--rejects", rejects.to_str().unwrap()])
        .write_stdin("nope\n")
        .output()
        .unwrap();
    expect_exit(&from_stdin, 1);
    assert_eq!(
        std::fs::read_to_string(&rejects).unwrap(),
        "{bad\n[oops\nnope\n"
    );
}

#[test]
fn a_stream_stopped_with_lines_left_says_the_rerun_reads_it_anew() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _broken) = server_failing_id(1, || Reply::status(404));
    let lines: String = items(4, 1).iter().map(|l| format!("{l}\n")).collect();
    let run = |input: &str| {
        let mut cmd = conveyor(dir.path());
        cmd.args(["send", input, "--to", &server.url()]).args([
            "--on-failure",
            "pause",
            "--retries",
            "0",
        ]);
        if input == "-" {
            cmd.write_stdin(lines.clone());
        }
        cmd.output().unwrap()
    };
    // Rerunning `producer | conveyor send -` feeds it the whole stream again: the lines this
    // run took would go out a second time, as new lines the receiver cannot tell apart.
    let (stdout, _) = expect_exit(&run("-"), 3);
    assert!(
        stdout.contains("left in the journal") && stdout.contains("reads its input stream anew"),
        "{stdout}"
    );
    assert!(stdout.contains("conveyor status"), "{stdout}");
    // A file is read on from where the run stopped: the rerun of the same command resumes.
    write_lines(dir.path(), "in.jsonl", &items(4, 1));
    let (stdout, _) = expect_exit(&run("in.jsonl"), 3);
    assert!(
        stdout.contains("rerun the same command to resume") && !stdout.contains("anew"),
        "{stdout}"
    );
}

#[test]
fn a_byte_order_mark_before_the_first_line_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    // As editors on Windows save UTF-8. A mark later in the input is data, and not JSON.
    let input = write_lines(
        dir.path(),
        "in.jsonl",
        &[
            "\u{feff}{\"id\":0}".into(),
            "{\"id\":1}".into(),
            "\u{feff}{\"id\":2}".into(),
        ],
    );
    let output = send_in_memory(dir.path(), &input, &server.url(), &[]);
    let (_, stderr) = expect_exit(&output, 1);
    assert!(
        stderr.contains("line 3:") && !stderr.contains("line 1:"),
        "{stderr}"
    );
    let arrivals = server.arrivals();
    assert_eq!(ids(&arrivals), [0, 1]);
    assert_eq!(arrivals[0].body, "{\"id\":0}");
}

#[test]
fn a_named_pipe_read_again_is_a_new_stream_sent_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    // As `conveyor send <(producer)` or a named pipe gives it: a path, but no file to read again.
    let pipe = dir.path().join("events.pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&pipe)
        .status()
        .unwrap();
    assert!(made.success());
    for run in 0..2_u64 {
        let writer = {
            let pipe = pipe.clone();
            std::thread::spawn(move || {
                let lines: Vec<String> = (0..3)
                    .map(|i| format!("{{\"id\":{}}}\n", run * 3 + i))
                    .collect();
                std::fs::write(pipe, lines.concat()).unwrap();
            })
        };
        // With the default journal, as an operator reruns the same command.
        let output = conveyor(dir.path())
            .args([
                "send",
                pipe.to_str().unwrap(),
                "--to",
                &server.url(),
                "--json",
            ])
            .output()
            .unwrap();
        writer.join().unwrap();
        expect_exit(&output, 0);
        let summary = summary(&output);
        assert_eq!(
            (
                summary["delivered"].as_u64(),
                summary["resumed_after_line"].as_u64()
            ),
            (Some(3), Some(0)),
            "run {run}: {summary}"
        );
    }
    // The second stream's lines were not skipped as if they were the first one's.
    assert_eq!(ids(&server.arrivals()), [0, 1, 2, 3, 4, 5]);
}

#[test]
fn an_empty_key_field_is_refused_before_any_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(3, 1));
    let output = send_in_memory(
        dir.path(),
        &input,
        &server.url(),
        &["--ordering", "keyed:2", "--key", ""],
    );
    let (_, stderr) = expect_exit(&output, 2);
    // One error that says what to give, not a rejection per line.
    assert!(
        stderr.contains("--key needs a field name") && !stderr.contains("line 1"),
        "{stderr}"
    );
    assert_eq!(server.count(), 0);
}

/// The longest line `send` takes, as its --help says (128 MiB).
const MAX_LINE: usize = 128 * 1024 * 1024;

/// Writes `{"id":ID,"pad":"xxx…"}`, `len` bytes long, without a line ending.
fn write_padded(out: &mut impl Write, id: u64, len: usize) -> std::io::Result<()> {
    let head = format!(r#"{{"id":{id},"pad":""#);
    let tail = br#""}"#;
    out.write_all(head.as_bytes())?;
    let chunk = vec![b'x'; 1 << 20];
    let mut left = len - head.len() - tail.len();
    while left > 0 {
        let n = left.min(chunk.len());
        out.write_all(&chunk[..n])?;
        left -= n;
    }
    out.write_all(tail)
}

/// Waits for `child` (its stdout and stderr read meanwhile) and returns its output with the
/// most memory it ever held (its peak resident set size), in bytes.
fn wait_with_peak_memory(mut child: std::process::Child) -> (std::process::Output, u64) {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                pipe.read_to_end(&mut bytes).unwrap();
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4(2) writes into the two valid places given; the child is ours, and waited
    // for here only (std's `Child` does not reap it on drop).
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(reaped, pid, "wait4: {}", std::io::Error::last_os_error());
    let output = std::process::Output {
        status: std::process::ExitStatus::from_raw(status),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    // Linux gives the peak in KiB.
    (output, u64::try_from(usage.ru_maxrss).unwrap() * 1024)
}

#[test]
fn a_line_over_the_limit_is_rejected_without_being_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (server, child, mut stdin) = streaming_in_memory(dir.path());
    let long = MAX_LINE * 5 / 2;
    // Written from a thread of its own, so a run that stops reading cannot hold the test up.
    let writer = std::thread::spawn(move || {
        writeln!(stdin, r#"{{"id":0}}"#)?;
        write_padded(&mut stdin, 1, long)?;
        writeln!(stdin)?;
        writeln!(stdin, r#"{{"id":2}}"#)
    });
    let (output, peak) = wait_with_peak_memory(child);
    let _ = writer.join().unwrap();
    let (_, stderr) = expect_exit(&output, 1);
    assert!(
        stderr.contains(&format!(
            "line 2: rejected: {long} bytes, longer than the {MAX_LINE} bytes a line may have"
        )),
        "{stderr}"
    );
    assert_eq!(ids(&server.arrivals()), [0, 2]);
    let summary = summary(&output);
    assert_eq!(
        (summary["delivered"].as_u64(), summary["rejected"].as_u64()),
        (Some(2), Some(1))
    );
    // At most about the limit is ever held (the line was 2.5 times that).
    assert!(
        peak < 2 * MAX_LINE as u64,
        "conveyor held {} MiB at its peak",
        peak >> 20
    );
}

#[test]
fn a_line_over_the_limit_is_rejected_alike_with_the_journal_and_copied_whole() {
    use std::io::{Read, Seek, SeekFrom};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    let input = dir.path().join("in.jsonl");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
    writeln!(file, r#"{{"id":0}}"#).unwrap();
    // One byte too many; its `\r\n` does not count.
    write_padded(&mut file, 1, MAX_LINE + 1).unwrap();
    write!(file, "\r\n{{\"id\":2}}\n").unwrap();
    file.into_inner().unwrap().sync_all().unwrap();
    let rejects = dir.path().join("rejects.jsonl");
    let url = server.url();
    let run = || {
        conveyor(dir.path())
            .args(["send", input.to_str().unwrap(), "--to", &url, "--json"])
            .args(["--rejects", rejects.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let output = run();
    let (_, stderr) = expect_exit(&output, 1);
    assert!(
        stderr.contains(&format!(
            "line 2: rejected: {} bytes, longer than the {MAX_LINE} bytes",
            MAX_LINE + 1
        )),
        "{stderr}"
    );
    assert_eq!(ids(&server.arrivals()), [0, 2]);
    assert_eq!(summary(&output)["rejected"].as_u64(), Some(1));
    // The whole line is in the rejects file, as other bad lines are, ended by `\n`.
    let mut copied = std::fs::File::open(&rejects).unwrap();
    assert_eq!(copied.metadata().unwrap().len(), MAX_LINE as u64 + 2);
    let mut head = [0; 8];
    copied.read_exact(&mut head).unwrap();
    assert_eq!(&head, br#"{"id":1,"#);
    copied.seek(SeekFrom::End(-4)).unwrap();
    let mut end = [0; 4];
    copied.read_exact(&mut end).unwrap();
    assert_eq!(&end, b"x\"}\n");
    // The rerun resumes after it: nothing is sent or rejected again.
    let output = run();
    expect_exit(&output, 0);
    assert_eq!(server.count(), 2);
    assert_eq!(summary(&output)["rejected"].as_u64(), Some(0));
}

/// A rejects file holds whole lines only: an input failing in the middle of an overlong line,
/// whose bytes were being copied as they were read, leaves no half line behind.
#[test]
fn an_input_failing_within_an_overlong_line_leaves_no_half_line_in_rejects() {
    use std::net::{TcpListener, TcpStream};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    let rejects = dir.path().join("rejects.jsonl");
    // Conveyor's stdin is one end of a TCP connection; the test writes into the other, whose
    // close with data it has not read is a reset: conveyor's next read fails (ECONNRESET).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (theirs, _) = listener.accept().unwrap();
    (&theirs).write_all(b"unread").unwrap();
    let child = std::process::Command::new(conveyor_path())
        .current_dir(dir.path())
        .args(["send", "-", "--no-journal", "--json", "--to", &server.url()])
        .args(["--rejects", rejects.to_str().unwrap()])
        .stdin(std::os::fd::OwnedFd::from(theirs))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    ours.write_all(b"{bad\n").unwrap();
    let writer = std::thread::spawn(move || {
        // Never ended: the reset cuts it short (a write after it fails).
        let _ = write_padded(&mut ours, 1, MAX_LINE + (64 << 20));
        ours
    });
    let copying = || std::fs::metadata(&rejects).map_or(0, |m| m.len()) > 5;
    wait_for("the overlong line to be copied", copying);
    drop(writer.join().unwrap());
    let output = child.wait_with_output().unwrap();
    let (_, stderr) = expect_exit(&output, 2);
    assert!(
        stderr.contains("cannot read input after line 1"),
        "{stderr}"
    );
    let len = std::fs::metadata(&rejects).unwrap().len();
    assert_eq!(len, 5, "only the whole line `{{bad` is kept");
    assert_eq!(std::fs::read_to_string(&rejects).unwrap(), "{bad\n");
}

/// A rejects file holds whole lines only: a disk that fills while a line is copied keeps the
/// lines before it (the run goes on, saying that it copies no more).
#[test]
fn a_rejects_file_on_a_full_disk_keeps_whole_lines_only() {
    let dir = tempfile::tempdir().unwrap();
    let disk = TinyDisk::new("64k");
    let server = Server::start(|_| Reply::ok()).unwrap();
    // 100 bytes a line: 4096 is no multiple of it, so the disk fills within a line.
    let bad: Vec<String> = (0..2000).map(|i| format!("{{bad {i:094}")).collect();
    let input = write_lines(dir.path(), "in.jsonl", &bad);
    let rejects = disk.dir.path().join("rejects.jsonl");
    let (output, stderr) = send_rejecting(dir.path(), &input, &server.url(), &rejects);
    assert_eq!(summary(&output)["rejected"], 2000);
    assert!(
        stderr.contains("cannot write to the rejects file"),
        "{stderr}"
    );
    let copied = std::fs::read_to_string(&rejects).unwrap();
    assert!(copied.ends_with('\n'), "ends with a half line: {copied:?}");
    let copied: Vec<&str> = copied.lines().collect();
    assert!(
        !copied.is_empty() && copied.len() < 2000,
        "{}",
        copied.len()
    );
    assert_eq!(copied, bad[..copied.len()]);
}

/// A run killed while it copied an overlong line leaves half of it in the rejects file: the
/// next run that appends to the file ends that line first, rather than glue its lines to it,
/// and cuts nothing (the file may be the user's own).
#[test]
fn a_half_line_left_in_rejects_by_a_killed_run_is_ended_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    let rejects = dir.path().join("rejects.jsonl");
    std::fs::write(&rejects, "{old\n{\"pad\":\"xxxx").unwrap();
    let output = conveyor(dir.path())
        .args(["send", "-", "--no-journal", "--json", "--to", &server.url()])
        .args(["--rejects", rejects.to_str().unwrap()])
        .write_stdin("nope\n{\"id\":0}\n")
        .output()
        .unwrap();
    let (_, stderr) = expect_exit(&output, 1);
    assert_eq!(
        std::fs::read_to_string(&rejects).unwrap(),
        "{old\n{\"pad\":\"xxxx\nnope\n"
    );
    assert!(
        stderr.contains("did not end with a line ending"),
        "{stderr}"
    );
}

/// `--rejects` may name a device or a pipe (`/dev/null`, `/dev/stderr`, `>(gzip > r.gz)`): it
/// is written to as it is, never emptied nor cut (which it does not allow).
#[test]
fn a_rejects_path_that_is_no_file_is_written_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &["nope".into(), "{}".into()]);
    let devnull = std::path::Path::new("/dev/null");
    let (output, stderr) = send_rejecting(dir.path(), &input, &server.url(), devnull);
    assert!(!stderr.contains("rejects file"), "{stderr}");
    assert_eq!(summary(&output)["rejected"], 1);
}
