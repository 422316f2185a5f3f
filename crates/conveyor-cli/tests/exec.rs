//! `--exec PROGRAM ARGS...`: the line on stdin, no shell; exit 0 ok, 75 retried, else failed.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

const SCRIPT: &str = r#"line=$(cat)
echo "$CONVEYOR_LINE $CONVEYOR_ATTEMPT [$1] $line" >> "$CONVEYOR_TEST_LOG"
case "$line" in
  *fail*) echo "cannot handle line $CONVEYOR_LINE" >&2; exit 1 ;;
  *flaky*) if [ "$CONVEYOR_ATTEMPT" = 1 ]; then exit 75; fi ;;
esac
exit 0
"#;

#[test]
fn exit_codes_0_75_and_1() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("handler.sh");
    std::fs::write(&script, SCRIPT).unwrap();
    let log = dir.path().join("log.txt");
    let lines: Vec<String> = vec![
        r#"{"id":0}"#.into(),
        r#"{"id":1,"flaky":true}"#.into(),
        r#"{"id":2,"fail":true}"#.into(),
        r#"{"id":3}"#.into(),
    ];
    let input = write_lines(dir.path(), "in.jsonl", &lines);
    let output = conveyor(dir.path())
        .env("CONVEYOR_TEST_LOG", &log)
        .args([
            "send",
            input.to_str().unwrap(),
            "--no-journal",
            "--json",
            "--backoff",
            "10ms",
        ])
        // One argument with a space and a `$`: no shell touches it.
        .args(["--exec", "sh", script.to_str().unwrap(), "two words $HOME"])
        .output()
        .unwrap();
    let (_, stderr) = expect_exit(&output, 1);
    assert!(
        stderr.contains("line 3: failed after 1 attempt(s)")
            && stderr.contains("exited with 1")
            && stderr.contains("cannot handle line 3"),
        "{stderr}"
    );
    let log = std::fs::read_to_string(&log).unwrap();
    let runs: Vec<&str> = log.lines().collect();
    assert_eq!(
        runs,
        [
            r#"1 1 [two words $HOME] {"id":0}"#,
            r#"2 1 [two words $HOME] {"id":1,"flaky":true}"#,
            r#"2 2 [two words $HOME] {"id":1,"flaky":true}"#,
            r#"3 1 [two words $HOME] {"id":2,"fail":true}"#,
            r#"4 1 [two words $HOME] {"id":3}"#,
        ]
    );
    let summary = summary(&output);
    assert_eq!(
        (
            summary["delivered"].as_u64(),
            summary["failed"].as_u64(),
            summary["retried"].as_u64()
        ),
        (Some(3), Some(1), Some(1))
    );
}

#[test]
fn a_missing_program_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(1, 1));
    let output = conveyor(dir.path())
        .args([
            "send",
            input.to_str().unwrap(),
            "--no-journal",
            "--exec",
            "no-such-program-xyz",
        ])
        .output()
        .unwrap();
    let (_, stderr) = expect_exit(&output, 2);
    assert!(
        stderr.contains("no-such-program-xyz") && stderr.contains("PATH"),
        "{stderr}"
    );
}

/// `conveyor send INPUT --no-journal --json EXTRA... --exec PROGRAM`, run to completion, with
/// how long it took.
fn send_exec(dir: &Path, input: &Path, extra: &[&str], program: &Path) -> (Output, Duration) {
    let started = Instant::now();
    let output = conveyor(dir)
        .args(["send", input.to_str().unwrap(), "--no-journal", "--json"])
        .args(extra)
        .args(["--exec", program.to_str().unwrap()])
        .output()
        .unwrap();
    (output, started.elapsed())
}

#[test]
fn a_program_that_is_not_executable_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(3, 1));
    let plain = dir.path().join("plain.sh");
    std::fs::write(&plain, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let folder = dir.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    for program in [&plain, &folder] {
        let (output, _) = send_exec(dir.path(), &input, &[], program);
        let (stdout, stderr) = expect_exit(&output, 2);
        // One error before any line, not a failure per line.
        assert!(stdout.is_empty() && !stderr.contains("line 1"), "{stderr}");
        assert!(stderr.contains(program.to_str().unwrap()), "{stderr}");
    }
    let (_, stderr) = texts(&send_exec(dir.path(), &input, &[], &plain).0);
    assert!(stderr.contains("chmod +x"), "{stderr}");
}

/// Writes `body` as an executable `sh` script `dir/name` and returns its path.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// One line far bigger than a pipe's buffer (64 KiB on Linux).
fn big_line() -> Vec<String> {
    vec![format!(r#"{{"id":0,"pad":"{}"}}"#, "x".repeat(1 << 20))]
}

#[test]
fn the_timeout_holds_for_a_line_bigger_than_a_pipe_that_is_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &big_line());
    // Neither reads its stdin nor exits before 20 s.
    let program = script(dir.path(), "stuck.sh", "exec sleep 20\n");
    let (output, elapsed) = send_exec(
        dir.path(),
        &input,
        &["--timeout", "1s", "--retries", "0"],
        &program,
    );
    let (_, stderr) = expect_exit(&output, 1);
    assert!(stderr.contains("did not finish within 1s"), "{stderr}");
    assert_eq!(summary(&output)["failed"].as_u64(), Some(1));
    assert!(elapsed < Duration::from_secs(12), "took {elapsed:?}");
}

#[test]
fn a_program_may_fill_its_stderr_before_reading_a_big_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &big_line());
    // 200 KB of stderr before a byte of stdin is read: both pipes are full at once.
    let program = script(
        dir.path(),
        "chatty.sh",
        "head -c 200000 /dev/zero | tr '\\0' e >&2\ncat >/dev/null\nexit 0\n",
    );
    let (output, elapsed) = send_exec(dir.path(), &input, &["--timeout", "20s"], &program);
    expect_exit(&output, 0);
    assert_eq!(summary(&output)["delivered"].as_u64(), Some(1));
    assert!(elapsed < Duration::from_secs(12), "took {elapsed:?}");
}

#[test]
fn a_background_process_left_behind_does_not_hold_up_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(3, 1));
    // The orphan keeps the stderr pipe open for 15 s (its stdout goes elsewhere, so only
    // conveyor's pipe is held, not the test's).
    let program = script(
        dir.path(),
        "forks.sh",
        "cat >/dev/null\necho \"oops $CONVEYOR_LINE\" >&2\nsleep 15 >/dev/null &\n\
         [ \"$CONVEYOR_LINE\" = 2 ] && exit 1\nexit 0\n",
    );
    let (output, elapsed) = send_exec(
        dir.path(),
        &input,
        &["--timeout", "30s", "--retries", "0"],
        &program,
    );
    let (_, stderr) = expect_exit(&output, 1);
    let summary = summary(&output);
    assert_eq!(
        (summary["delivered"].as_u64(), summary["failed"].as_u64()),
        (Some(2), Some(1)),
        "{summary}"
    );
    // What the program wrote before it exited still explains its failure.
    assert!(
        stderr.contains("exited with 1") && stderr.contains("oops 2"),
        "{stderr}"
    );
    // Each line ended when its program did, not when the orphan let go of the pipe.
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}
