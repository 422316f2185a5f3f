//! `--exec PROGRAM ARGS...`: the line on stdin, no shell; exit 0 ok, 75 retried, else failed.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
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

/// The summary's counts named by `fields`, in that order.
fn counts(summary: &serde_json::Value, fields: &[&str]) -> Vec<u64> {
    fields
        .iter()
        .map(|f| {
            summary[*f]
                .as_u64()
                .unwrap_or_else(|| panic!("no {f}: {summary}"))
        })
        .collect()
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
        counts(&summary, &["delivered", "failed"]),
        [2, 1],
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

#[test]
fn a_program_stopped_by_a_termination_signal_is_retried_a_crash_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.txt");
    let lines: Vec<String> = vec![r#"{"sig":"TERM"}"#.into(), r#"{"sig":"SEGV"}"#.into()];
    let input = write_lines(dir.path(), "in.jsonl", &lines);
    // The first attempt of each line dies by the signal its line names.
    let program = script(
        dir.path(),
        "dies.sh",
        "line=$(cat)\necho \"$CONVEYOR_LINE $CONVEYOR_ATTEMPT\" >> \"$CONVEYOR_TEST_LOG\"\n\
         if [ \"$CONVEYOR_ATTEMPT\" = 1 ]; then\n\
           case \"$line\" in *TERM*) kill -TERM $$ ;; *SEGV*) kill -SEGV $$ ;; esac\n\
         fi\nexit 0\n",
    );
    let output = conveyor(dir.path())
        .env("CONVEYOR_TEST_LOG", &log)
        .args(["send", input.to_str().unwrap(), "--no-journal", "--json"])
        .args(["--backoff", "10ms", "--exec", program.to_str().unwrap()])
        .output()
        .unwrap();
    let (_, stderr) = expect_exit(&output, 1);
    assert!(
        stderr.contains("line 2: failed after 1 attempt(s)") && stderr.contains("SIGSEGV"),
        "{stderr}"
    );
    let summary = summary(&output);
    assert_eq!(
        counts(&summary, &["delivered", "failed", "retried"]),
        [1, 1, 1],
        "{summary}"
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(log.lines().collect::<Vec<_>>(), ["1 1", "1 2", "2 1"]);
}

/// `conveyor send INPUT --json --drain-timeout DRAIN --exec PROGRAM`, with the default journal,
/// and `log` in the program's CONVEYOR_TEST_LOG, to be started by a test that interrupts it.
fn journaled_run(
    dir: &Path,
    input: &Path,
    drain: &str,
    program: &Path,
    log: &Path,
) -> std::process::Command {
    let mut command = std::process::Command::new(conveyor_path());
    command
        .current_dir(dir)
        .env("CONVEYOR_TEST_LOG", log)
        .args([
            "send",
            input.to_str().unwrap(),
            "--json",
            "--drain-timeout",
            drain,
        ])
        .args(["--exec", program.to_str().unwrap()])
        .stdin(Stdio::null());
    command
}

#[test]
fn ctrl_c_at_a_terminal_lets_the_running_program_finish_and_starts_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.txt");
    let input = write_lines(dir.path(), "in.jsonl", &items(5, 1));
    let program = script(
        dir.path(),
        "slow.sh",
        "cat >/dev/null\necho \"start $CONVEYOR_LINE\" >> \"$CONVEYOR_TEST_LOG\"\nsleep 3\n\
         echo \"done $CONVEYOR_LINE\" >> \"$CONVEYOR_TEST_LOG\"\n",
    );
    // In its own process group, as a shell puts a foreground job: a terminal's Ctrl-C goes to
    // the whole group.
    let child = journaled_run(dir.path(), &input, "30s", &program, &log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the first line to start", || read_log().contains("start 1"));
    let status = std::process::Command::new("kill")
        .args(["-INT", "--", &format!("-{}", child.id())])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let (_, stderr) = expect_exit(&output, 3);
    assert_eq!(
        read_log().lines().collect::<Vec<_>>(),
        ["start 1", "done 1"]
    );
    let summary = summary(&output);
    assert_eq!(
        counts(&summary, &["delivered", "failed", "left"]),
        [1, 0, 4],
        "{summary}\n{stderr}"
    );
}

/// Runs `program` (which writes the pid of the process to watch to $CONVEYOR_TEST_LOG) on two
/// lines with a 1 s drain, interrupts conveyor once the program has started, waits until that
/// process has stopped, and checks that both lines stay pending for the rerun.
fn interrupted_program_stops(program_body: &str) {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let out_file = dir.path().join("out.json");
    let input = write_lines(dir.path(), "in.jsonl", &items(2, 1));
    let program = script(dir.path(), "program.sh", program_body);
    let mut child = journaled_run(dir.path(), &input, "1s", &program, &pid_file)
        // A file, not a pipe: a program that outlived conveyor would hold a pipe open.
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let read_pid = || std::fs::read_to_string(&pid_file).unwrap_or_default();
    wait_for("the program to start its work", || {
        read_pid().ends_with('\n')
    });
    signal(&child, "INT");
    assert_eq!(child.wait().unwrap().code(), Some(3));
    // Gone, or a zombie waiting for a reaper (a container's init may not reap).
    let stat = format!("/proc/{}/stat", read_pid().trim());
    wait_for("the program's work to stop", || {
        std::fs::read_to_string(&stat).map_or(true, |s| s.contains(") Z "))
    });
    let out = std::fs::read_to_string(&out_file).unwrap();
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        counts(&summary, &["delivered", "left"]),
        [0, 2],
        "{summary}"
    );
}

#[test]
fn a_program_still_running_at_the_drain_deadline_does_not_outlive_conveyor() {
    // The work is a child of the script, as most real programs have: both must stop.
    interrupted_program_stops(
        "cat >/dev/null\nsleep 60 &\necho $! > \"$CONVEYOR_TEST_LOG\"\nwait\n",
    );
}

#[test]
fn a_program_that_ignores_sigterm_is_killed_when_conveyor_exits() {
    // Left running, it would go on with its line while a rerun sends the same line again.
    interrupted_program_stops(
        "trap '' TERM\ncat >/dev/null\necho $$ > \"$CONVEYOR_TEST_LOG\"\nsleep 60\n",
    );
}

#[test]
fn with_json_stdout_holds_the_summary_alone() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(2, 1));
    // Output without a final newline, as `printf` gives: it would run into the summary's line.
    let program = script(dir.path(), "chatty.sh", "cat >/dev/null\nprintf 'ok'\n");
    let (output, _) = send_exec(dir.path(), &input, &[], &program);
    let (stdout, stderr) = expect_exit(&output, 0);
    let summary: serde_json::Value = serde_json::from_str(stdout.trim_end())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"));
    assert_eq!(summary["delivered"], 2);
    // The program's output is not lost: it is on stderr.
    assert!(stderr.contains("okok"), "{stderr}");
}

#[test]
fn conveyor_options_after_exec_are_pointed_out() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(2, 2));
    // As the README once showed it: the ordering meant for conveyor went to the program.
    let output = conveyor(dir.path())
        .args(["send", input.to_str().unwrap(), "--no-journal"])
        .args([
            "--exec",
            "sh",
            "-c",
            "cat >/dev/null",
            "--ordering",
            "keyed:16",
        ])
        .args(["--key", "user"])
        .output()
        .unwrap();
    let (_, stderr) = expect_exit(&output, 0);
    for option in ["--ordering", "--key"] {
        assert!(
            stderr.contains(&format!("`{option}` comes after --exec")),
            "{stderr}"
        );
    }
}

#[test]
fn http_options_are_refused_with_exec() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(1, 1));
    for option in [["--method", "PUT"], ["--header", "X-A: b"]] {
        let output = conveyor(dir.path())
            .args(["send", input.to_str().unwrap(), "--no-journal"])
            .args(option)
            .args(["--exec", "true"])
            .output()
            .unwrap();
        let (_, stderr) = expect_exit(&output, 2);
        assert!(
            stderr.contains(&format!("{} only applies to --to URL", option[0])),
            "{stderr}"
        );
    }
}

/// How many threads the process `pid` runs now.
fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(Iterator::count)
        .unwrap_or(0)
}

/// Kills the processes whose ids are listed in a file (one a line) when dropped, so that the
/// background processes a test's program leaves behind do not outlive the test.
struct KillListed(PathBuf);

impl Drop for KillListed {
    fn drop(&mut self) {
        let pids = std::fs::read_to_string(&self.0).unwrap_or_default();
        for pid in pids.split_whitespace() {
            let _ = std::process::Command::new("kill").arg(pid).status();
        }
    }
}

#[test]
fn a_program_exiting_without_reading_a_big_line_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let done = dir.path().join("done");
    let _orphans = KillListed(dir.path().join("orphans"));
    // Exits 0 without reading its line, leaving a process behind that holds its stdin (but not
    // its stdout or stderr) and never reads it.
    let program = script(
        dir.path(),
        "leaves.sh",
        "exec 3<&0\nsleep 60 <&3 >/dev/null 2>&1 &\necho $! >> orphans\necho x >> done\nexit 0\n",
    );
    let mut child = spawn(
        dir.path(),
        &[
            "send",
            "-",
            "--no-journal",
            "--json",
            "--exec",
            program.to_str().unwrap(),
        ],
    );
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let big = &big_line()[0];
    let runs = || {
        std::fs::read_to_string(&done)
            .unwrap_or_default()
            .lines()
            .count()
    };
    writeln!(stdin, "{big}").unwrap();
    wait_for("the first run", || runs() == 1);
    let before = threads_of(pid);
    for _ in 0..10 {
        writeln!(stdin, "{big}").unwrap();
    }
    wait_for("the other runs", || runs() == 11);
    // Before, each line left a thread behind, blocked writing to the orphan's full pipe.
    wait_for("no thread left per line", || threads_of(pid) <= before + 3);
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    expect_exit(&output, 0);
    let summary = summary(&output);
    assert_eq!(
        counts(&summary, &["delivered", "failed"]),
        [11, 0],
        "{summary}"
    );
}

/// A `--timeout` too long for the clock (a way of saying "no limit") runs the program without
/// a deadline, as it does for HTTP, instead of failing every line with a panic.
#[test]
fn a_timeout_too_long_for_the_clock_means_no_limit() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &[r#"{"id":0}"#.to_owned()]);
    let output = conveyor(dir.path())
        .args(["send", input.to_str().unwrap(), "--no-journal", "--json"])
        .args(["--timeout", "500000000000years", "--exec", "cat"])
        .output()
        .unwrap();
    let (stdout, stderr) = expect_exit(&output, 0);
    assert!(stdout.contains("\"delivered\":1"), "{stdout}\n{stderr}");
}
