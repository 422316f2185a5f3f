//! The journal from the command line: resume after `kill -9`, dead letters, paused lanes.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

#[test]
fn kill_9_mid_run_then_rerun_resumes_without_resending_delivered_lines() {
    kill_9_then_rerun(&[]);
}

#[test]
fn kill_9_then_rerun_with_sync_commits() {
    kill_9_then_rerun(&["--sync"]);
}

/// The line the first run is killed on: its request is left unanswered, so it is in flight.
const KILLED_AT: u64 = 30;

fn kill_9_then_rerun(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    // The first request for line KILLED_AT hangs, so the first run is killed at a known point
    // rather than wherever a timer happens to fall; its resend in the rerun is answered.
    let server = Server::start(|a| {
        let first_time = a.index as u64 == KILLED_AT;
        if first_time && a.json().unwrap()["id"] == KILLED_AT {
            Reply::ok().delay(Duration::from_secs(600))
        } else {
            Reply::ok().delay(Duration::from_millis(10))
        }
    })
    .unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(120, 1));
    let url = server.url();
    let mut args = vec!["send", input.to_str().unwrap(), "--to", &url, "--json"];
    args.extend_from_slice(extra);
    let mut child = Command::new(conveyor_path())
        .current_dir(dir.path())
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the hanging request", || server.count() as u64 > KILLED_AT);
    // Lines before KILLED_AT are settled (strict mode started it only after them); the kill
    // waits until their settlements are on disk, which takes a commit window or more.
    wait_for("the settled lines on disk", || {
        settled_on_disk(dir.path()).is_some_and(|settled| settled >= KILLED_AT)
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let first_run = server.count();
    assert_eq!(
        first_run as u64,
        KILLED_AT + 1,
        "nothing runs past a hung line"
    );

    let output = conveyor(dir.path()).args(&args).output().unwrap();
    expect_exit(&output, 0);
    let arrivals = server.arrivals();
    let all = ids(&arrivals);
    let (before, after) = all.split_at(first_run);
    // The rerun sends again exactly the line that was in flight at the kill, then the rest:
    // every settled line stayed settled, nothing was skipped, and order held.
    assert_eq!(before, (0..=KILLED_AT).collect::<Vec<_>>());
    assert_eq!(after, (KILLED_AT..120).collect::<Vec<_>>());
    // A resent line carries the same idempotency key as the first time.
    let keys: HashMap<u64, &str> = arrivals[..first_run]
        .iter()
        .map(|a| {
            (
                a.json().unwrap()["id"].as_u64().unwrap(),
                a.header("idempotency-key").unwrap(),
            )
        })
        .collect();
    for a in &arrivals[first_run..] {
        let id = a.json().unwrap()["id"].as_u64().unwrap();
        if let Some(key) = keys.get(&id) {
            assert_eq!(
                Some(*key),
                a.header("idempotency-key"),
                "line {id} resent under a new key"
            );
        }
    }
    let journals: Vec<_> = std::fs::read_dir(dir.path().join(".conveyor"))
        .unwrap()
        .collect();
    assert!(
        !journals.is_empty(),
        "the default journal lives under ./.conveyor/"
    );
}

/// How many lines the journal under `dir/.conveyor/` records as taken and settled, as it is
/// on disk while a `send` still holds it (and its lock). It is read from a copy of the database
/// and its WAL taken while the WAL did not change, so the copy holds what was committed (a
/// checkpoint meanwhile only copies committed pages that the WAL still holds). `None` when no
/// such copy could be taken or read this time.
fn settled_on_disk(dir: &std::path::Path) -> Option<u64> {
    let journal = std::fs::read_dir(dir.join(".conveyor"))
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|ext| ext == "journal"))?;
    let with_suffix = |path: &std::path::Path, suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        std::path::PathBuf::from(name)
    };
    let wal = std::fs::read(with_suffix(&journal, "-wal")).ok()?;
    let database = std::fs::read(&journal).ok()?;
    if std::fs::read(with_suffix(&journal, "-wal")).ok()? != wal {
        return None;
    }
    let copy = tempfile::tempdir().ok()?;
    let snapshot = copy.path().join("snapshot.journal");
    std::fs::write(&snapshot, database).ok()?;
    std::fs::write(with_suffix(&snapshot, "-wal"), wal).ok()?;
    let status = conveyor::Journal::open(&snapshot).ok()?.status().ok()?;
    // Every line taken is journaled with the cursor past it; those not pending are settled.
    status.cursor?.checked_sub(status.pending)
}

#[test]
fn failed_lines_become_dead_letters_and_dead_retry_delivers_them() {
    let dir = tempfile::tempdir().unwrap();
    let (server, broken) = server_failing_id(2, || Reply::status(422).body("not today"));
    let input = write_lines(dir.path(), "in.jsonl", &items(5, 1));
    let journal = dir.path().join("j.journal");
    let send = |dir: &std::path::Path| {
        conveyor(dir)
            .args(["send", input.to_str().unwrap(), "--to", &server.url()])
            .args(["--journal", journal.to_str().unwrap(), "--json"])
            .output()
            .unwrap()
    };
    let first = send(dir.path());
    expect_exit(&first, 1);
    assert_eq!(summary(&first)["failed"], 1);

    let dead = dead_list(dir.path(), &journal);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["line"], 3);
    assert_eq!(dead[0]["body"], r#"{"id":2,"user":"u0"}"#);
    assert!(dead[0]["error"].as_str().unwrap().contains("422"));

    broken.store(false, Ordering::SeqCst);
    // The default journal is found when it is the only one under ./.conveyor/; here it is named.
    let retry = conveyor(dir.path())
        .args(["dead", "retry", "--all", "--json"])
        .args(["--journal", journal.to_str().unwrap()])
        .output()
        .unwrap();
    let (out, _) = expect_exit(&retry, 0);
    let out: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(out["retried"], serde_json::json!([dead[0]["seq"]]));
    let new_seq = out["new_seqs"][0].as_u64().expect("the new seq is listed");
    assert!(new_seq > dead[0]["seq"].as_u64().unwrap(), "{out}");
    let again = conveyor(dir.path())
        .args(["dead", "retry", &dead[0]["seq"].to_string()])
        .args(["--journal", journal.to_str().unwrap()])
        .output()
        .unwrap();
    let (_, err) = expect_exit(&again, 2);
    // The journal is not under ./.conveyor/, where a bare `conveyor dead list` looks.
    let list = format!("`conveyor dead list --journal {}`", journal.display());
    assert!(
        err.contains("no dead letter with seq") && err.contains(&list),
        "{err}"
    );

    let second = send(dir.path());
    expect_exit(&second, 0);
    // Only the retried line was sent again: the input position kept the rest from repeating.
    assert_eq!(ids(&server.arrivals()), [0, 1, 2, 3, 4, 2]);

    let status = conveyor(dir.path())
        .args(["status", "--json", "--journal", journal.to_str().unwrap()])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(texts(&status).0.trim()).unwrap();
    assert_eq!(
        (status["pending"].as_u64(), status["dead_letters"].as_u64()),
        (Some(0), Some(0))
    );
}

#[test]
fn a_paused_lane_waits_for_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (server, broken) = server_failing_id(2, || Reply::status(500));
    let input = write_lines(dir.path(), "in.jsonl", &items(6, 1));
    let send = || {
        conveyor(dir.path())
            .args(["send", input.to_str().unwrap(), "--to", &server.url()])
            .args(["--on-failure", "pause", "--retries", "0", "--json"])
            .output()
            .unwrap()
    };
    let first = send();
    expect_exit(&first, 3);
    assert_eq!(summary(&first)["paused_lanes"], serde_json::json!([""]));
    assert_eq!(ids(&server.arrivals()), [0, 1, 2]);

    let status = conveyor(dir.path()).args(["status"]).output().unwrap();
    let (text, _) = texts(&status);
    assert!(
        text.contains("PAUSED") && text.contains("4 pending"),
        "{text}"
    );
    assert!(
        text.contains("then `conveyor resume`)"),
        "the one lane is resumed without a key: {text}"
    );

    broken.store(false, Ordering::SeqCst);
    let resume = conveyor(dir.path())
        .args(["resume", "--json"])
        .output()
        .unwrap();
    let (out, _) = expect_exit(&resume, 0);
    let out: serde_json::Value = serde_json::from_str(out.trim()).expect("resume --json is JSON");
    assert_eq!(out, serde_json::json!({"resumed": ""}));
    let second = send();
    expect_exit(&second, 0);
    assert_eq!(ids(&server.arrivals()), [0, 1, 2, 2, 3, 4, 5]);
}

#[test]
fn ctrl_c_keeps_the_rest_in_the_journal_for_the_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok().delay(Duration::from_millis(100))).unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(30, 1));
    let input = input.to_str().unwrap();
    let url = server.url();
    let args = [
        "send",
        input,
        "--to",
        &url,
        "--json",
        "--drain-timeout",
        "150ms",
    ];
    let child = spawn(dir.path(), &args);
    wait_for("deliveries to start", || server.count() >= 3);
    signal(&child, "INT");
    let first = child.wait_with_output().unwrap();
    expect_exit(&first, 3);
    let first_summary = summary(&first);
    assert!(
        first_summary["left"].as_u64().unwrap() > 0,
        "{first_summary}"
    );
    assert!(first_summary["journal"]
        .as_str()
        .unwrap()
        .contains(".conveyor"));
    let first_run = server.count();

    let second = conveyor(dir.path()).args(args).output().unwrap();
    expect_exit(&second, 0);
    let all = ids(&server.arrivals());
    // Everything arrived, in order, with at most the request cut off by the drain deadline sent
    // twice.
    let mut unique = all.clone();
    unique.dedup();
    assert_eq!(unique, (0..30).collect::<Vec<_>>(), "{all:?}");
    assert!(all.len() <= 31, "{all:?}");
    assert!(first_run < 30);
}

#[test]
fn a_second_ctrl_c_exits_at_once_and_the_rerun_finishes_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok().delay(Duration::from_millis(150))).unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(20, 1));
    let input = input.to_str().unwrap();
    let url = server.url();
    let args = ["send", input, "--to", &url, "--drain-timeout", "60s"];
    let child = spawn(dir.path(), &args);
    wait_for("deliveries to start", || server.count() >= 2);
    let first = interrupt_twice(child);
    expect_exit(&first, 130);
    let second = conveyor(dir.path()).args(args).output().unwrap();
    expect_exit(&second, 0);
    let mut unique = ids(&server.arrivals());
    unique.dedup();
    assert_eq!(unique, (0..20).collect::<Vec<_>>());
}

#[test]
fn dead_discard_drops_a_dead_letter_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|a| {
        if a.json().unwrap()["id"] == 1 {
            Reply::status(400)
        } else {
            Reply::ok()
        }
    })
    .unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(3, 1));
    let send = || {
        send_json(dir.path(), &input, &server.url())
            .output()
            .unwrap()
    };
    expect_exit(&send(), 1);
    let listed = conveyor(dir.path())
        .args(["dead", "list"])
        .output()
        .unwrap();
    let (text, _) = expect_exit(&listed, 0);
    assert!(text.contains("line 2") && text.contains("400"), "{text}");
    let seq = text.split_whitespace().nth(1).unwrap().to_owned();
    let discard = conveyor(dir.path())
        .args(["dead", "discard", &seq])
        .output()
        .unwrap();
    expect_exit(&discard, 0);
    let (status, _) = expect_exit(&conveyor(dir.path()).args(["status"]).output().unwrap(), 0);
    assert!(
        status.contains("dead letters: 0") && status.contains("pending: 0"),
        "{status}"
    );
    expect_exit(&send(), 0);
    assert_eq!(ids(&server.arrivals()), [0, 1, 2], "nothing was sent again");
    let missing = conveyor(dir.path())
        .args(["dead", "discard", &seq])
        .output()
        .unwrap();
    expect_exit(&missing, 2);
}

#[test]
fn operating_commands_explain_a_missing_journal() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["status"][..], &["dead", "list"], &["resume", "k"]] {
        let output = conveyor(dir.path()).args(args).output().unwrap();
        let (_, stderr) = texts(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(stderr.contains("--journal"), "{stderr}");
    }
}

/// `send INPUT --to URL --on-failure pause --retries 0 --capacity 5 --json [EXTRA...]`.
fn send_pausing(
    dir: &std::path::Path,
    input: &std::path::Path,
    url: &str,
    extra: &[&str],
) -> std::process::Output {
    conveyor(dir)
        .args(["send", input.to_str().unwrap(), "--to", url, "--json"])
        .args(["--on-failure", "pause", "--retries", "0", "--capacity", "5"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn a_paused_lane_with_more_lines_than_the_queue_holds_stops_reading_and_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let (server, broken) = server_failing_id(2, || Reply::status(404));
    let input = write_lines(dir.path(), "in.jsonl", &items(20, 1));
    let first = send_pausing(dir.path(), &input, &server.url(), &[]);
    let (_, stderr) = expect_exit(&first, 3);
    assert_eq!(summary(&first)["paused_lanes"], serde_json::json!([""]));
    assert!(stderr.contains("stopped reading"), "{stderr}");
    assert_eq!(ids(&server.arrivals()), [0, 1, 2]);

    // What was read waits in the journal, the rest in the file: after a resume, the rerun
    // delivers every line once, in order (the paused one again).
    broken.store(false, Ordering::SeqCst);
    expect_exit(&conveyor(dir.path()).args(["resume"]).output().unwrap(), 0);
    let second = send_pausing(dir.path(), &input, &server.url(), &[]);
    expect_exit(&second, 0);
    let mut expected = vec![0, 1, 2];
    expected.extend(2..20);
    assert_eq!(ids(&server.arrivals()), expected);
}

#[test]
fn a_paused_key_stops_the_run_only_once_the_other_keys_are_done() {
    let dir = tempfile::tempdir().unwrap();
    let (server, broken) = server_failing_id(2, || Reply::status(404));
    // Four keys; id 2 is the first line of key u2, whose lane pauses.
    let input = write_lines(dir.path(), "in.jsonl", &items(60, 4));
    let keyed = ["--ordering", "keyed:4", "--key", "user"];
    let first = send_pausing(dir.path(), &input, &server.url(), &keyed);
    expect_exit(&first, 3);
    assert_eq!(summary(&first)["paused_lanes"], serde_json::json!(["u2"]));
    let first_run = ids(&server.arrivals());
    // The other keys went on while u2 was paused: u2's lines fill the queue only after more
    // than the queue's worth of lines was read.
    assert!(first_run.len() > 5, "{first_run:?}");
    assert_eq!(first_run.iter().filter(|&&id| id % 4 == 2).count(), 1);

    broken.store(false, Ordering::SeqCst);
    expect_exit(
        &conveyor(dir.path())
            .args(["resume", "u2"])
            .output()
            .unwrap(),
        0,
    );
    let second = send_pausing(dir.path(), &input, &server.url(), &keyed);
    expect_exit(&second, 0);
    let all = ids(&server.arrivals());
    // Every line arrived exactly once, but the paused one twice; in order within each key.
    let mut sorted = all.clone();
    sorted.sort_unstable();
    let mut expected: Vec<u64> = (0..60).collect();
    expected.insert(2, 2);
    assert_eq!(sorted, expected, "{all:?}");
    for key in 0..4 {
        let lane: Vec<u64> = all.iter().copied().filter(|id| id % 4 == key).collect();
        let mut unique = lane.clone();
        unique.dedup();
        assert!(
            unique.windows(2).all(|w| w[0] < w[1]),
            "key u{key}: {lane:?}"
        );
    }
}

/// The journal commands (`status`, `dead ...`, `resume ...`) quoted in backticks in `text`, as
/// argument lists without the leading `conveyor`.
fn hinted_journal_commands(text: &str) -> Vec<Vec<String>> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|quoted| quoted.strip_prefix("conveyor "))
        .filter(|command| !command.starts_with("send"))
        .map(|command| command.split_whitespace().map(String::from).collect())
        .collect()
}

/// Every input and target gets a journal of its own under ./.conveyor/, so there are soon
/// several, and a bare `conveyor dead list` there asks which one: the journal commands that
/// hints name (the summary's, `status`'s) must run as written, on the run's own journal.
#[test]
fn the_journal_commands_that_hints_name_run_as_written_beside_other_journals() {
    let dir = tempfile::tempdir().unwrap();
    let (server, broken) = server_failing_id(2, || Reply::status(404));
    let other = write_lines(dir.path(), "other.jsonl", &items(1, 1));
    expect_exit(
        &send_json(dir.path(), &other, &server.url())
            .output()
            .unwrap(),
        0,
    );
    let input = write_lines(dir.path(), "in.jsonl", &items(4, 2));
    let send = |extra: &[&str]| {
        conveyor(dir.path())
            .args(["send", input.to_str().unwrap(), "--to", &server.url()])
            .args(["--retries", "0"])
            .args(extra)
            .output()
            .unwrap()
    };
    let run = |command: &[String]| {
        let output = conveyor(dir.path()).args(command).output().unwrap();
        let (stdout, stderr) = texts(&output);
        assert_eq!(
            output.status.code(),
            Some(0),
            "`conveyor {}`: {stderr}",
            command.join(" ")
        );
        stdout
    };
    // A line that fails for good: the summary points at its dead letter.
    let (failed, _) = expect_exit(&send(&[]), 1);
    let hinted = hinted_journal_commands(&failed);
    assert_eq!(hinted.len(), 1, "{failed}");
    assert!(run(&hinted[0]).contains(r#"{"id":2,"#), "{hinted:?}");

    // A paused lane (another journal: keyed): `status` says how to resume it.
    let keyed = [
        "--ordering",
        "keyed:2",
        "--key",
        "user",
        "--on-failure",
        "pause",
    ];
    let paused = send(&[&keyed[..], &["--json"]].concat());
    expect_exit(&paused, 3);
    let journal = summary(&paused)["journal"].as_str().unwrap().to_owned();
    let status = run(&["status".into(), "--journal".into(), journal]);
    let hinted = hinted_journal_commands(&status);
    assert_eq!(hinted.len(), 1, "{status}");
    assert_eq!(hinted[0][0], "resume", "{status}");
    broken.store(false, Ordering::SeqCst);
    run(&hinted[0]);
    expect_exit(&send(&keyed), 0);
    // The resumed rerun sent the paused line, and only it, again.
    let arrivals = ids(&server.arrivals());
    assert_eq!(
        (arrivals.len(), arrivals.last()),
        (10, Some(&2)),
        "{arrivals:?}"
    );
}

/// A run that stops on a paused lane says, for each one, why it paused and the command that
/// resumes it, rather than "fix the cause" with the cause left to `conveyor status`.
#[test]
fn a_paused_run_names_each_lane_with_its_cause_and_resume_command() {
    let dir = tempfile::tempdir().unwrap();
    let (server, broken) = server_failing_id(2, || Reply::status(404).body("no such user"));
    let input = write_lines(dir.path(), "in.jsonl", &items(6, 2));
    let send = || {
        conveyor(dir.path())
            .args(["send", input.to_str().unwrap(), "--to", &server.url()])
            .args(["--ordering", "keyed:2", "--key", "user"])
            .args(["--on-failure", "pause", "--retries", "0"])
            .output()
            .unwrap()
    };
    for _run in 0..2 {
        // The rerun, which finds the lane paused by the first run, says it alike.
        let (summary, _) = expect_exit(&send(), 3);
        let paused =
            "\n  \"u0\": `conveyor resume u0`, paused by: HTTP 404 Not Found: no such user";
        assert!(summary.contains(paused), "{summary}");
    }
    broken.store(false, Ordering::SeqCst);
    expect_exit(
        &conveyor(dir.path())
            .args(["resume", "u0"])
            .output()
            .unwrap(),
        0,
    );
    expect_exit(&send(), 0);
    assert_eq!(ids(&server.arrivals()).len(), 7);
}

#[test]
fn resuming_a_lane_that_is_not_paused_names_the_commands_for_those_that_are() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _broken) = server_failing_id(2, || Reply::status(404));
    let input = write_lines(dir.path(), "in.jsonl", &items(8, 4));
    let keyed = ["--ordering", "keyed:4", "--key", "user"];
    expect_exit(&send_pausing(dir.path(), &input, &server.url(), &keyed), 3);
    let resume = |args: &[&str]| conveyor(dir.path()).args(args).output().unwrap();

    // No key, as for a strict run, and a mistyped key: both say how to resume the paused lane.
    for args in [&["resume"][..], &["resume", "u9"]] {
        let (_, stderr) = expect_exit(&resume(args), 2);
        assert!(
            stderr.contains("is not paused") && stderr.contains("`conveyor resume u2`"),
            "{args:?}: {stderr}"
        );
    }
    expect_exit(&resume(&["resume", "u2"]), 0);
    let (_, stderr) = expect_exit(&resume(&["resume", "u2"]), 2);
    assert!(stderr.contains("no lane is paused"), "{stderr}");
}

#[test]
fn an_input_shorter_than_the_journal_position_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(4, 1));
    let send = || {
        send_json(dir.path(), &input, &server.url())
            .output()
            .unwrap()
    };
    expect_exit(&send(), 0);
    // The file is rewritten, shorter: the journal's position (4 lines taken) cannot be in it.
    write_lines(dir.path(), "in.jsonl", &items(2, 1));
    let (_, stderr) = expect_exit(&send(), 2);
    assert!(
        stderr.contains("has 2 lines") && stderr.contains("first 4"),
        "{stderr}"
    );
    assert!(stderr.contains("--journal"), "says what to do: {stderr}");
    assert_eq!(server.count(), 4, "nothing was sent again");
}

#[test]
fn an_input_rewritten_with_as_many_lines_is_refused_and_one_that_grew_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(3, 1));
    let send = || {
        send_json(dir.path(), &input, &server.url())
            .output()
            .unwrap()
    };
    expect_exit(&send(), 0);
    // Appended to (a growing log): the first lines are the same, the run sends the new ones.
    write_lines(dir.path(), "in.jsonl", &items(5, 1));
    expect_exit(&send(), 0);
    assert_eq!(ids(&server.arrivals()), [0, 1, 2, 3, 4]);
    // Rewritten with other lines, more of them: resuming at line 5 would skip four new lines.
    let other: Vec<String> = (10..16).map(|i| format!(r#"{{"id":{i}}}"#)).collect();
    write_lines(dir.path(), "in.jsonl", &other);
    let (_, stderr) = expect_exit(&send(), 2);
    assert!(
        stderr.contains("is not the file") && stderr.contains("first 5 lines"),
        "{stderr}"
    );
    assert!(stderr.contains("--journal"), "says what to do: {stderr}");
    assert_eq!(
        server.count(),
        5,
        "nothing of the new file was sent or skipped"
    );
}

#[test]
fn sync_never_reads_stdin_ahead_of_the_journal() {
    use std::io::Seek;
    let dir = tempfile::tempdir().unwrap();
    // Nothing is ever answered: the lines pile up in the queue, then the reader waits for room.
    let server = Server::start(|_| Reply::ok().delay(Duration::from_secs(600))).unwrap();
    let lines = items(100, 1);
    let path = write_lines(dir.path(), "in.jsonl", &lines);
    // The child's stdin shares this file's offset: it shows how much of the input was read.
    let stdin = std::fs::File::open(&path).unwrap();
    let mut offset = stdin.try_clone().unwrap();
    let journal = dir.path().join("j.journal");
    let url = server.url();
    let mut child = Command::new(conveyor_path())
        .current_dir(dir.path())
        .args(["send", "-", "--to", &url, "--sync", "--capacity", "2", "-q"])
        .args(["--journal", journal.to_str().unwrap()])
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the first request", || server.count() >= 1);
    // Whenever the kill falls, a line read from stdin is in the journal, but the one being read
    // or submitted: that is all a crash may lose.
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let read = offset.stream_position().unwrap() as usize;

    let status = conveyor(dir.path())
        .args(["status", "--json", "--journal", journal.to_str().unwrap()])
        .output()
        .unwrap();
    let (status, _) = expect_exit(&status, 0);
    let status: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    let pending = status["pending"].as_u64().unwrap() as usize;
    let journaled: usize = lines[..pending].iter().map(|l| l.len() + 1).sum();
    assert!(
        read <= journaled + lines[pending].len() + 1,
        "{read} bytes of stdin read, {journaled} bytes ({pending} lines) in the journal"
    );
}

/// `conveyor send INPUT --to URL --json`, for more arguments.
fn send_json(dir: &std::path::Path, input: &std::path::Path, url: &str) -> assert_cmd::Command {
    let mut command = conveyor(dir);
    command.args(["send", input.to_str().unwrap(), "--to", url, "--json"]);
    command
}

#[test]
fn keyed_and_strict_runs_of_the_same_input_keep_separate_journals() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _broken) = server_failing_id(2, || Reply::status(404));
    let input = write_lines(dir.path(), "in.jsonl", &items(8, 4));
    let keyed = ["--ordering", "keyed:4", "--key", "user"];
    let first = send_pausing(dir.path(), &input, &server.url(), &keyed);
    expect_exit(&first, 3);
    assert_eq!(summary(&first)["paused_lanes"], serde_json::json!(["u2"]));
    let keyed_journal = summary(&first)["journal"].as_str().unwrap().to_owned();
    let keyed_run = server.count();

    // A strict run of the same command must not take over the paused key's lines: it keeps a
    // journal of its own, and sends the input from its start (line 3 fails again, once).
    let strict = send_json(dir.path(), &input, &server.url())
        .output()
        .unwrap();
    expect_exit(&strict, 1);
    assert_ne!(summary(&strict)["journal"].as_str().unwrap(), keyed_journal);
    assert_eq!(
        ids(&server.arrivals()[keyed_run..]),
        (0..8).collect::<Vec<_>>()
    );
    let status = conveyor(dir.path())
        .args(["status", "--json", "--journal", &keyed_journal])
        .output()
        .unwrap();
    let (status, _) = expect_exit(&status, 0);
    let status: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    assert_eq!(status["lanes"][0]["lane"], "u2", "{status}");
    assert!(!status["lanes"][0]["paused"].is_null(), "{status}");
}

#[test]
fn a_strict_run_on_a_keyed_journal_holding_a_pause_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _broken) = server_failing_id(2, || Reply::status(404));
    let input = write_lines(dir.path(), "in.jsonl", &items(8, 4));
    let journal = dir.path().join("j.journal");
    let journal = ["--journal", journal.to_str().unwrap()];
    let keyed = [&["--ordering", "keyed:4", "--key", "user"][..], &journal].concat();
    expect_exit(&send_pausing(dir.path(), &input, &server.url(), &keyed), 3);
    let sent = server.count();

    let strict = send_pausing(dir.path(), &input, &server.url(), &journal);
    let (_, stderr) = expect_exit(&strict, 2);
    assert!(
        stderr.contains("--ordering keyed:N --key FIELD")
            && stderr.contains("conveyor resume")
            && stderr.contains("another --journal PATH"),
        "{stderr}"
    );
    assert_eq!(server.count(), sent, "the strict run sent nothing");
}

/// Leaves two items of another program pending in a journal at `path`, of `kind` if given.
fn leave_foreign_items(path: &std::path::Path, kind: Option<&str>) {
    let (gate, stalled) = std::sync::mpsc::channel::<()>();
    let stalled = std::sync::Mutex::new(stalled);
    let mut builder = conveyor::Conveyor::<serde_json::Value>::builder()
        .journal(path)
        .drain_timeout(Duration::ZERO);
    if let Some(kind) = kind {
        builder = builder.journal_kind(kind);
    }
    let c = builder
        .build(move |_d| {
            let _ = stalled.lock().unwrap().recv();
            Ok(())
        })
        .unwrap();
    c.send(serde_json::json!({"order": 1})).unwrap();
    c.send(serde_json::json!("two")).unwrap();
    drop(c);
    drop(gate);
}

#[test]
fn a_journal_of_another_program_is_refused_or_its_unreadable_lines_counted_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Reply::ok()).unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(3, 1));
    let send = |journal: &std::path::Path| {
        send_json(dir.path(), &input, &server.url())
            .args(["--journal", journal.to_str().unwrap()])
            .output()
            .unwrap()
    };

    // Marked as another program's: refused, untouched.
    let theirs = dir.path().join("theirs.journal");
    leave_foreign_items(&theirs, Some("conveyor-python"));
    let (_, stderr) = expect_exit(&send(&theirs), 2);
    assert!(
        stderr.contains("another program") && stderr.contains("--journal PATH"),
        "{stderr}"
    );
    assert_eq!(server.count(), 0);
    let status = conveyor::Journal::open(&theirs).unwrap().status().unwrap();
    assert_eq!(status.pending, 2, "left untouched");

    // Unmarked (an older journal): its items cannot be read as lines, and count as failed.
    let old = dir.path().join("old.journal");
    leave_foreign_items(&old, None);
    let output = send(&old);
    let (_, stderr) = expect_exit(&output, 1);
    let summary = summary(&output);
    assert_eq!(
        (summary["delivered"].as_u64(), summary["failed"].as_u64()),
        (Some(3), Some(2))
    );
    assert!(
        stderr.contains("2 line(s) left in the journal by an earlier run failed")
            && stderr.contains("conveyor dead list"),
        "{stderr}"
    );
    assert_eq!(ids(&server.arrivals()), [0, 1, 2]);
}

#[test]
fn a_full_disk_stops_the_run_with_its_cause_and_exit_3_and_the_rerun_resumes() {
    full_disk_run(false);
}

/// Under --sync a send waits for its own commit, which a full disk never lets happen: the run
/// still stops with the cause and exit 3 (it used to wait until interrupted).
#[test]
fn a_full_disk_stops_a_sync_run_too() {
    full_disk_run(true);
}

fn full_disk_run(sync: bool) {
    let dir = tempfile::tempdir().unwrap();
    let disk = TinyDisk::new("256k");
    // Each line is a commit of its own (the reader waits for room), each commit grows the
    // write-ahead log by a few pages: the disk fills within the first hundred lines.
    let server = Server::start(|_| Reply::ok().delay(Duration::from_millis(5))).unwrap();
    let lines: Vec<String> = (0..300)
        .map(|i| format!(r#"{{"id":{i},"pad":"{}"}}"#, "x".repeat(2000)))
        .collect();
    let input = write_lines(dir.path(), "in.jsonl", &lines);
    let journal = disk.dir.path().join("j.journal");
    let send = || {
        send_json(dir.path(), &input, &server.url())
            .args(["--journal", journal.to_str().unwrap(), "--capacity", "2"])
            .args(sync.then_some("--sync"))
            .output()
            .unwrap()
    };
    let first = send();
    let (_, stderr) = expect_exit(&first, 3);
    assert!(
        (sync || stderr.contains("was not accepted"))
            && stderr.contains("the disk is full")
            && stderr.contains("free some space")
            && stderr.contains("rerun the same command"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("Conveyor::"),
        "no Rust API in the CLI: {stderr}"
    );
    let summary = summary(&first);
    assert_eq!(summary["exit_code"], 3);
    let sent = server.count();
    assert!(
        sent < 300,
        "the disk filled before the end: {sent} lines sent"
    );

    disk.grow("64m");
    expect_exit(&send(), 0);
    // The rerun goes on from the first line the journal does not know as delivered: the line
    // refused, or earlier ones whose delivery it could not record. Those it says so of.
    let all = ids(&server.arrivals());
    let (before, after) = all.split_at(sent);
    assert_eq!(before, (0..sent as u64).collect::<Vec<_>>());
    let resumed_at = after[0];
    assert_eq!(after, (resumed_at..300).collect::<Vec<_>>(), "in order");
    if resumed_at < sent as u64 {
        let error = summary["journal_error"].as_str().unwrap_or_default();
        assert!(
            error.contains("the disk is full"),
            "lines {resumed_at}.. were sent again unannounced: {summary}"
        );
    }
}

#[test]
fn operating_commands_on_what_is_no_journal_say_so_and_leave_it_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(3, 1));
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    let folder = dir.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    let cases = [
        (&input, "is not a journal"),
        (&empty, "is empty, not a journal"),
        (&folder, "is a directory"),
    ];
    for (path, says) in cases {
        let before = std::fs::read(path).ok();
        for command in [
            &["status"][..],
            &["dead", "list"],
            &["dead", "discard", "--all"],
            &["resume"],
        ] {
            let output = conveyor(dir.path())
                .args(command)
                .args(["--journal", path.to_str().unwrap()])
                .output()
                .unwrap();
            let (_, stderr) = expect_exit(&output, 2);
            assert!(
                stderr.contains(says)
                    && stderr.contains("the --journal PATH that `conveyor send` used"),
                "{command:?} on {}: {stderr}",
                path.display()
            );
            assert!(!stderr.contains("move it aside"), "{stderr}");
        }
        assert_eq!(
            std::fs::read(path).ok(),
            before,
            "{} was changed",
            path.display()
        );
        for suffix in ["-lock", "-wal"] {
            let mut sidecar = path.as_os_str().to_owned();
            sidecar.push(suffix);
            assert!(
                !std::path::Path::new(&sidecar).exists(),
                "{sidecar:?} was left behind"
            );
        }
    }
    // `send` with a directory for its journal: told to give a file, nothing created beside it.
    let server = Server::start(|_| Reply::ok()).unwrap();
    let output = send_json(dir.path(), &input, &server.url())
        .args(["--journal", folder.to_str().unwrap()])
        .output()
        .unwrap();
    let (_, stderr) = expect_exit(&output, 2);
    assert!(
        stderr.contains("is a directory") && stderr.contains("give the path of a file"),
        "{stderr}"
    );
    assert!(!dir.path().join("folder-lock").exists());
    assert_eq!(server.count(), 0);
}

#[test]
fn a_journal_in_use_can_be_read_but_changes_wait_for_the_send() {
    let dir = tempfile::tempdir().unwrap();
    // Line 1 (id 0) fails for good; line 2 hangs, holding lines 2 and 3 pending.
    let server = Server::start(|a| match a.json().unwrap()["id"].as_u64() {
        Some(0) => Reply::status(422).body("bad line"),
        _ => Reply::ok().delay(Duration::from_secs(600)),
    })
    .unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(3, 1));
    let journal = dir.path().join("j.journal");
    let url = server.url();
    let mut child = spawn(
        dir.path(),
        &[
            "send",
            input.to_str().unwrap(),
            "--to",
            &url,
            "--journal",
            journal.to_str().unwrap(),
        ],
    );
    let run = |command: &[&str]| {
        conveyor(dir.path())
            .args(command)
            .args(["--journal", journal.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let read = |command: &[&str]| expect_exit(&run(command), 0);
    // What the running send has committed: read while it holds the journal.
    wait_for(
        "the status to show the dead letter and two pending lines",
        || {
            let output = run(&["status", "--json"]);
            if !output.status.success() {
                // The send has not made the journal yet.
                return false;
            }
            let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            assert_eq!(status["in_use"], true, "{status}");
            assert_eq!(status["in_use_by"], child.id(), "{status}");
            status["dead_letters"] == 1 && status["pending"] == 2
        },
    );
    let (stdout, _) = read(&["status"]);
    assert!(
        stdout.contains(&format!("in use by process {}", child.id()))
            && stdout.contains("pending: 2"),
        "{stdout}"
    );
    let (stdout, stderr) = read(&["dead", "list", "--json"]);
    let dead: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        (dead["seq"].as_u64(), dead["line"].as_u64()),
        (Some(1), Some(1)),
        "{dead}"
    );
    assert!(
        stderr.contains(&format!("in use by process {}", child.id())),
        "{stderr}"
    );

    // Changes wait for the send, and say so.
    for command in [
        &["dead", "retry", "1"][..],
        &["dead", "discard", "--all"],
        &["resume"],
    ] {
        let (_, stderr) = expect_exit(&run(command), 2);
        assert!(
            stderr.contains(&format!("in use by process {}", child.id()))
                && stderr.contains("let it finish, or stop it")
                && stderr.contains(&format!(
                    "`conveyor status --journal {0}` and `conveyor dead list --journal {0}` \
                     work meanwhile",
                    journal.display()
                )),
            "{command:?}: {stderr}"
        );
        assert!(!stderr.contains("another journal file"), "{stderr}");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (stdout, _) = read(&["dead", "list", "--json"]);
    assert_eq!(stdout.lines().count(), 1, "nothing was discarded: {stdout}");
}

/// Four dead letters (the third one large) in a journal on a disk with about 200 KiB left: a
/// retry of the small ones fits, the large one's does not. Returns the disk, the journal and the
/// dead letters' seqs, oldest first.
fn dead_letters_on_an_almost_full_disk(
    dir: &std::path::Path,
) -> (TinyDisk, std::path::PathBuf, Vec<u64>) {
    let disk = TinyDisk::new("8m");
    let server = Server::start(|_| Reply::status(422).body("not today")).unwrap();
    let mut lines = items(4, 1);
    lines[2] = format!(r#"{{"id":2,"pad":"{}"}}"#, "x".repeat(1_000_000));
    let input = write_lines(dir, "in.jsonl", &lines);
    let journal = disk.dir.path().join("j.journal");
    let sent = send_json(dir, &input, &server.url())
        .args(["--journal", journal.to_str().unwrap()])
        .output()
        .unwrap();
    expect_exit(&sent, 1);
    let seqs = dead_seqs(dir, &journal);
    assert_eq!(seqs.len(), 4, "{seqs:?}");

    // Fills the disk, then gives back about 200 KiB.
    let filler = disk.dir.path().join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while std::io::Write::write_all(&mut file, &chunk).is_ok() {}
    let len = file.metadata().unwrap().len();
    file.set_len(len.saturating_sub(200 * 1024)).unwrap();
    (disk, journal, seqs)
}

/// What `dead list --json` shows, oldest first.
fn dead_list(dir: &std::path::Path, journal: &std::path::Path) -> Vec<serde_json::Value> {
    let list = conveyor(dir)
        .args(["dead", "list", "--json", "--journal"])
        .arg(journal)
        .output()
        .unwrap();
    let (out, _) = expect_exit(&list, 0);
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The seqs of [`dead_list`].
fn dead_seqs(dir: &std::path::Path, journal: &std::path::Path) -> Vec<u64> {
    let dead = dead_list(dir, journal);
    dead.iter().map(|d| d["seq"].as_u64().unwrap()).collect()
}

/// A `dead retry --all` the disk stops part way says which dead letters went through and which
/// did not (in --json too, with the error), so that nobody retries the first ones twice.
#[test]
fn dead_retry_all_stopped_part_way_says_what_went_through() {
    for json in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (disk, journal, seqs) = dead_letters_on_an_almost_full_disk(dir.path());
        let retry = conveyor(dir.path())
            .args([
                "dead",
                "retry",
                "--all",
                "--journal",
                journal.to_str().unwrap(),
            ])
            .args(json.then_some("--json"))
            .output()
            .unwrap();
        let (out, err) = expect_exit(&retry, 2);
        assert!(err.contains("the disk is full"), "{err}");
        if json {
            let out: serde_json::Value = serde_json::from_str(out.trim())
                .unwrap_or_else(|e| panic!("not one JSON object ({e}): {out:?}"));
            assert_eq!(out["retried"], serde_json::json!(seqs[..2]), "{out}");
            assert_eq!(out["new_seqs"].as_array().map(Vec::len), Some(2), "{out}");
            assert_eq!(out["not_retried"], serde_json::json!(seqs[2..]), "{out}");
            assert!(
                out["error"].as_str().unwrap().contains("the disk is full"),
                "{out}"
            );
        } else {
            for seq in &seqs[..2] {
                assert!(
                    out.contains(&format!("dead letter {seq} queued again")),
                    "{out}"
                );
            }
            let rest = format!("seq {}, {}", seqs[2], seqs[3]);
            assert!(
                out.contains("2 of 4 dead letter(s) retried") && out.contains(&rest),
                "{out}"
            );
        }
        disk.grow("64m");
        assert_eq!(dead_seqs(dir.path(), &journal), seqs[2..]);
    }
}

/// A dead letter that is not there: with --json, stdout still says what was done (nothing).
#[test]
fn dead_discard_of_a_missing_seq_prints_its_error_in_json_too() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j.journal");
    let server = Server::start(|_| Reply::ok()).unwrap();
    let input = write_lines(dir.path(), "in.jsonl", &items(1, 1));
    let sent = send_json(dir.path(), &input, &server.url())
        .args(["--journal", journal.to_str().unwrap()])
        .output()
        .unwrap();
    expect_exit(&sent, 0);
    for (verb, done) in [("discard", "discarded"), ("retry", "retried")] {
        let output = conveyor(dir.path())
            .args([
                "dead",
                verb,
                "7",
                "--json",
                "--journal",
                journal.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let (out, err) = expect_exit(&output, 2);
        assert!(err.contains("no dead letter with seq 7"), "{err}");
        let out: serde_json::Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {out:?}"));
        assert_eq!(out[done], serde_json::json!([]), "{out}");
        assert_eq!(out[format!("not_{done}")], serde_json::json!([7]), "{out}");
        assert!(
            out["error"]
                .as_str()
                .unwrap()
                .contains("no dead letter with seq 7"),
            "{out}"
        );
    }
}

/// The default journal's name covers `--exec` and its arguments: a rerun that changes them
/// starts a journal of its own, and says which journal still holds the earlier run's pending
/// lines and how to deliver them.
#[test]
fn a_rerun_with_other_exec_arguments_names_the_journal_it_leaves_pending() {
    let dir = tempfile::tempdir().unwrap();
    let send = |input: &std::path::Path, exit: u8| {
        conveyor(dir.path())
            .args(["send", input.to_str().unwrap(), "--json"])
            .args(["--on-failure", "pause", "--retries", "0"])
            .args([
                "--exec",
                "sh",
                "-c",
                &format!("cat >/dev/null; exit {exit}"),
            ])
            .output()
            .unwrap()
    };
    let input = write_lines(dir.path(), "in.jsonl", &items(3, 1));
    let first = send(&input, 1);
    expect_exit(&first, 3);
    let paused = summary(&first)["journal"].as_str().unwrap().to_owned();

    // Another file of the same name is another input: nothing to say about that journal.
    std::fs::create_dir(dir.path().join("other")).unwrap();
    let other = write_lines(&dir.path().join("other"), "in.jsonl", &items(2, 1));
    let (_, stderr) = expect_exit(&send(&other, 0), 0);
    assert!(!stderr.contains("pending line(s)"), "{stderr}");

    let second = send(&input, 0);
    let (_, stderr) = expect_exit(&second, 0);
    assert_ne!(summary(&second)["journal"], paused.as_str());
    assert!(
        stderr.contains(&format!("{paused} still holds 3 pending line(s)"))
            && stderr.contains(&format!("rerun it with --journal {paused}")),
        "{stderr}"
    );
    // The rerun resumes its own journal, which exists now: said once, when it was started.
    let (_, stderr) = expect_exit(&send(&input, 0), 0);
    assert!(!stderr.contains("pending line(s)"), "{stderr}");
}

/// A full disk stops a run that read its stream faster than the journal committed it: the
/// lines read after the journal's last commit are in no journal. The summary said all the
/// lines not delivered were "left in the journal" (716 where it held 590): it says what the
/// journal holds, and where to feed the stream from, as `conveyor status` does.
#[test]
fn a_full_disk_summary_says_what_the_journal_holds_and_where_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    let disk = TinyDisk::new("256k");
    let server = Server::start(|_| Reply::ok().delay(Duration::from_millis(5))).unwrap();
    let lines: String = (0..3000)
        .map(|i| format!("{{\"id\":{i},\"pad\":\"{}\"}}\n", "x".repeat(300)))
        .collect();
    let journal = disk.dir.path().join("j.journal");
    let journal = journal.to_str().unwrap();
    let first = conveyor(dir.path())
        .args(["send", "-", "--to", &server.url(), "--journal", journal])
        .write_stdin(lines)
        .output()
        .unwrap();
    let (stdout, _) = expect_exit(&first, 3);
    let status = conveyor(dir.path())
        .args(["status", "--json", "--journal", journal])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    // No position at all when the disk filled before the first one was committed: the stream
    // is then fed again from its first line.
    let pending = &status["pending"];
    let read = status["input_position"].as_u64().unwrap_or(0);
    assert!(
        stdout.contains(&format!("it holds {pending} pending line(s)"))
            && stdout.contains(&format!("from line {}", read + 1)),
        "the journal holds {pending} pending, read up to line {read}: {stdout}"
    );
}
