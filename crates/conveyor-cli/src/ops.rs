//! Operating a journal offline: `status`, `dead list|retry|discard`, `resume`.
//!
//! These open the journal file directly ([`conveyor::Journal`]). `status` and `dead list` only
//! read it, without its lock, so they also read one a `send` is running on (as far as it has
//! committed) and never keep a `send` from starting; the commands that change it need its lock,
//! and fail naming the process holding it while a `send` runs on it.

use std::path::{Path, PathBuf};

use conveyor::{DeadLetter, Holder, Journal, JournalError};
use serde::Serialize;
use serde_json::json;

use crate::args::{DeadCommand, DeadTarget, JournalOpts, ResumeArgs};
use crate::input::Line;
use crate::journal::JOURNAL_DIR;
use crate::report::print_out;
use crate::{exit, CliError};

/// The journal named by `--journal`, or the only one under `./.conveyor/`.
fn find_journal(given: &Option<PathBuf>) -> Result<PathBuf, CliError> {
    if let Some(path) = given {
        if !path.exists() {
            return Err(CliError::usage(format!(
                "no journal at {}: pass the --journal PATH that `conveyor send` used",
                path.display()
            )));
        }
        return Ok(path.clone());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(JOURNAL_DIR)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|ext| ext == "journal"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(CliError::usage(format!(
            "no journal under ./{JOURNAL_DIR}/: run this where `conveyor send` ran, or pass --journal PATH"
        ))),
        _ => Err(CliError::usage(format!(
            "several journals under ./{JOURNAL_DIR}/, pass one with --journal PATH: {}",
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// What a command named in a hint needs after it to work on `journal` where the user runs it:
/// nothing when it is the only journal under ./.conveyor/ (the one found by default), else
/// ` --journal PATH`. Every hint that names a journal command ends with it, or the command
/// it names fails, or reads another journal, once a second input or target has one too.
pub(crate) fn journal_option(journal: &Path) -> String {
    let found = find_journal(&None)
        .ok()
        .and_then(|p| std::fs::canonicalize(p).ok());
    if found.is_some() && found == std::fs::canonicalize(journal).ok() {
        String::new()
    } else {
        format!(" --journal {}", shell_word(&journal.display().to_string()))
    }
}

/// Opens the journal to change it: only while no `send` runs on it.
fn open(opts: &JournalOpts) -> Result<Journal, CliError> {
    let path = find_journal(&opts.journal)?;
    // Never creates one: these commands only read or repair one that `send` made.
    Journal::open_existing(&path).map_err(open_error)
}

/// Opens the journal to read it, also while a `send` runs on it, without its lock (a `send`
/// starting meanwhile is not refused for it).
fn open_to_read(opts: &JournalOpts) -> Result<Journal, CliError> {
    let path = find_journal(&opts.journal)?;
    Journal::open_read_only(&path).map_err(open_error)
}

fn open_error(e: JournalError) -> CliError {
    CliError::usage(match e {
        // The engine's advice suits a program that wants the journal for itself; these
        // commands wait their turn instead.
        JournalError::Locked { path, pid } => {
            let journal = journal_option(&path);
            format!(
                "journal {} is in use by {} (a `conveyor send` running on it, most likely): \
                 let it finish, or stop it (Ctrl-C), then run this again (`conveyor \
                 status{journal}` and `conveyor dead list{journal}` work meanwhile)",
                path.display(),
                process(pid)
            )
        }
        JournalError::NotAJournal { path } => format!(
            "{} is not a journal (it does not start like a SQLite database, which a journal \
             is): pass the --journal PATH that `conveyor send` used",
            path.display()
        ),
        // `find_journal` saw a file: an empty one, or a journal whose creation was interrupted.
        JournalError::Missing { path } => format!(
            "{} is empty, not a journal (it was left as it is): pass the --journal PATH that \
             `conveyor send` used",
            path.display()
        ),
        JournalError::IsADirectory { path } => format!(
            "{} is a directory: pass the --journal PATH that `conveyor send` used, a file",
            path.display()
        ),
        other => other.to_string(),
    })
}

/// The process holding a journal, as messages name it: its PID may not be written yet.
fn process(pid: Option<u32>) -> String {
    pid.map_or("another process".to_owned(), |pid| format!("process {pid}"))
}

/// What a reader of a journal in use is told: the figures move while it reads them.
fn in_use_note(holder: Holder) -> String {
    format!(
        "in use by {} (a running `conveyor send`, most likely): as committed so far",
        process(holder.pid)
    )
}

fn journal_error(e: conveyor::JournalError) -> CliError {
    CliError::usage(e.to_string())
}

pub(crate) fn status(opts: &JournalOpts) -> Result<u8, CliError> {
    let journal = open_to_read(opts)?;
    let in_use_by = journal.holder();
    let status = journal.status().map_err(journal_error)?;
    let journal_option = journal_option(journal.path());
    let path = journal.path().display().to_string();
    if opts.json {
        let lanes: Vec<_> = status
            .lanes
            .iter()
            .map(|l| json!({"lane": l.lane, "pending": l.pending, "paused": l.paused}))
            .collect();
        let value = json!({
            "journal": path,
            "id": status.id,
            "pending": status.pending,
            "dead_letters": status.dead_letters,
            "lanes": lanes,
            "input_position": status.cursor,
            "file_bytes": status.file_bytes,
            "in_use": in_use_by.is_some(),
            "in_use_by": in_use_by.and_then(|holder| holder.pid),
        });
        print_out(&value.to_string()).map_err(CliError::io)?;
        return Ok(exit::OK);
    }
    let in_use = in_use_by.map_or(String::new(), |holder| format!(", {}", in_use_note(holder)));
    let mut text = format!(
        "journal {path} ({} bytes on disk){in_use}\npending: {}",
        status.file_bytes, status.pending
    );
    if let Some(cursor) = status.cursor {
        text.push_str(&format!(" (input read up to line {cursor})"));
    }
    for lane in &status.lanes {
        let name = if lane.lane.is_empty() {
            "(single lane)".to_owned()
        } else {
            format!("{:?}", lane.lane)
        };
        text.push_str(&format!("\n  {name}: {} pending", lane.pending));
        if let Some(error) = &lane.paused {
            text.push_str(&format!(
                ", PAUSED by: {error} (fix it, then `{}`)",
                resume_command(&lane.lane, &journal_option)
            ));
        }
    }
    text.push_str(&format!("\ndead letters: {}", status.dead_letters));
    if status.dead_letters > 0 {
        text.push_str(&format!(" (`conveyor dead list{journal_option}`)"));
    }
    print_out(&text).map_err(CliError::io)?;
    Ok(exit::OK)
}

/// The command that resumes `lane`: the single lane of strict and pipelined runs takes no key,
/// and a key that looks like an option follows `--`. `journal_option` is what
/// [`journal_option`] gives for its journal.
pub(crate) fn resume_command(lane: &str, journal_option: &str) -> String {
    let key = match lane {
        "" => String::new(),
        option if option.starts_with('-') => format!(" -- {}", shell_word(lane)),
        _ => format!(" {}", shell_word(lane)),
    };
    format!("conveyor resume{journal_option}{key}")
}

/// A lane name or a path as the user would type it.
fn shell_word(lane: &str) -> String {
    if lane.is_empty() {
        String::new()
    } else if lane
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:/@".contains(c))
    {
        lane.to_owned()
    } else {
        format!("'{}'", lane.replace('\'', r"'\''"))
    }
}

/// A dead letter as `dead list --json` prints it: the original line is recoverable.
#[derive(Debug, Serialize)]
struct DeadView {
    seq: u64,
    line: Option<u64>,
    lane: String,
    key: Option<String>,
    attempts: u32,
    failed_at: String,
    error: String,
    body: String,
}

impl From<DeadLetter> for DeadView {
    fn from(dead: DeadLetter) -> Self {
        // The CLI stores `Line`s; a journal written by another program may hold anything.
        let (line, body) = match serde_json::from_slice::<Line>(&dead.payload) {
            Ok(l) => (Some(l.line), l.body),
            Err(_) => (None, String::from_utf8_lossy(&dead.payload).into_owned()),
        };
        Self {
            seq: dead.seq,
            line,
            lane: dead.lane,
            key: dead.key,
            attempts: dead.attempts,
            failed_at: humantime::format_rfc3339_seconds(dead.failed_at).to_string(),
            error: dead.error,
            body,
        }
    }
}

pub(crate) fn dead(command: &DeadCommand) -> Result<u8, CliError> {
    match command {
        DeadCommand::List(opts) => dead_list(opts),
        DeadCommand::Retry(target) => dead_each(target, "retried", |j, seq| {
            j.retry_dead(seq).map(|new| {
                (
                    format!("dead letter {seq} queued again as {new} (a new Idempotency-Key)"),
                    Some(new),
                )
            })
        }),
        DeadCommand::Discard(target) => dead_each(target, "discarded", |j, seq| {
            j.discard_dead(seq)
                .map(|()| (format!("dead letter {seq} discarded"), None))
        }),
    }
}

fn dead_list(opts: &JournalOpts) -> Result<u8, CliError> {
    let journal = open_to_read(opts)?;
    let in_use_by = journal.holder();
    let dead = journal.dead_letters().map_err(journal_error)?;
    if let Some(holder) = in_use_by {
        // Not on stdout, which lists dead letters only (one JSON object per line with --json).
        eprintln!(
            "journal {}: {}",
            journal.path().display(),
            in_use_note(holder)
        );
    }
    if !opts.json && dead.is_empty() {
        print_out("no dead letters").map_err(CliError::io)?;
    }
    for view in dead.into_iter().map(DeadView::from) {
        let text = if opts.json {
            serde_json::to_string(&view).expect("a dead letter serializes")
        } else {
            format!(
                "seq {} line {} lane {:?}: {} attempt(s), {} — {}\n    {}",
                view.seq,
                view.line.map_or("?".into(), |l| l.to_string()),
                view.lane,
                view.attempts,
                view.failed_at,
                view.error,
                view.body
            )
        };
        print_out(&text).map_err(CliError::io)?;
    }
    Ok(exit::OK)
}

/// Retries or discards the target's dead letters, one commit each, stopping at the first that
/// fails. Each one done is done for good, so what went through is printed even then (in --json
/// with `not_VERB` and `error`), then the error ends the command: a rerun of `--all` finds only
/// the rest, and one of a listed SEQ would fail on a dead letter already gone.
fn dead_each(
    target: &DeadTarget,
    verb: &str,
    // The message for a human, and the seq the dead letter was given back, if any.
    mut act: impl FnMut(&mut Journal, u64) -> Result<(String, Option<u64>), JournalError>,
) -> Result<u8, CliError> {
    let mut journal = open(&target.journal)?;
    let json = target.journal.json;
    let seqs: Vec<u64> = match target.seq {
        Some(seq) => vec![seq],
        None => journal
            .dead_letters()
            .map_err(journal_error)?
            .iter()
            .map(|d| d.seq)
            .collect(),
    };
    let mut new_seqs = Vec::new();
    let mut done = 0;
    let mut failed = None;
    for &seq in &seqs {
        match act(&mut journal, seq) {
            Ok((message, new_seq)) => {
                done += 1;
                new_seqs.extend(new_seq);
                if !json {
                    print_out(&message).map_err(CliError::io)?;
                }
            }
            Err(e) => {
                let hint = match e {
                    JournalError::NoSuchDeadLetter { .. } => format!(
                        ": `conveyor dead list{}` shows them",
                        journal_option(journal.path())
                    ),
                    _ => String::new(),
                };
                failed = Some(CliError::usage(format!("{e}{hint}")));
                break;
            }
        }
    }
    let (went, left) = seqs.split_at(done);
    if json {
        let mut value = json!({ verb: went });
        if !new_seqs.is_empty() {
            // In the order of the old ones: old seqs[i] is delivered again as new_seqs[i].
            value["new_seqs"] = json!(new_seqs);
        }
        if let Some(error) = &failed {
            value[format!("not_{verb}")] = json!(left);
            value["error"] = json!(error.message);
        }
        print_out(&value.to_string()).map_err(CliError::io)?;
    } else if target.all {
        let text = if failed.is_some() {
            let left: Vec<String> = left.iter().map(u64::to_string).collect();
            format!(
                "{done} of {} dead letter(s) {verb}; not {verb}: seq {}",
                seqs.len(),
                left.join(", ")
            )
        } else {
            format!("{done} dead letter(s) {verb}")
        };
        print_out(&text).map_err(CliError::io)?;
    }
    match failed {
        Some(error) => Err(error),
        None => journal_close(journal),
    }
}

pub(crate) fn resume(args: &ResumeArgs) -> Result<u8, CliError> {
    let mut journal = open(&args.journal)?;
    let resumed = journal.resume(&args.key).map_err(journal_error)?;
    let lane = if args.key.is_empty() {
        "the lane".to_owned()
    } else {
        format!("lane {:?}", args.key)
    };
    if !resumed {
        // A mistyped key, or no key for a keyed run's lane: name the lanes that are paused, as
        // the commands that resume them.
        let option = journal_option(journal.path());
        let paused: Vec<String> = journal
            .status()
            .map_err(journal_error)?
            .lanes
            .iter()
            .filter(|l| l.paused.is_some())
            .map(|l| format!("`{}`", resume_command(&l.lane, &option)))
            .collect();
        let hint = if paused.is_empty() {
            "no lane is paused there".to_owned()
        } else {
            format!("the paused ones resume with {}", paused.join(", "))
        };
        return Err(CliError::usage(format!(
            "{lane} is not paused in {}: {hint}",
            journal.path().display()
        )));
    }
    let text = if args.journal.json {
        json!({ "resumed": args.key }).to_string()
    } else {
        format!("{lane} resumed: rerun the `conveyor send` command to deliver what it holds")
    };
    print_out(&text).map_err(CliError::io)?;
    journal_close(journal)
}

fn journal_close(journal: Journal) -> Result<u8, CliError> {
    journal.close().map_err(journal_error)?;
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_names_are_quoted_for_the_shell() {
        assert_eq!(shell_word("user-3"), "user-3");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "");
    }

    #[test]
    fn the_single_lane_is_resumed_without_a_key() {
        assert_eq!(resume_command("", ""), "conveyor resume");
        assert_eq!(resume_command("a b", ""), "conveyor resume 'a b'");
        assert_eq!(
            resume_command("u1", " --journal j.journal"),
            "conveyor resume --journal j.journal u1"
        );
        assert_eq!(resume_command("-1", ""), "conveyor resume -- -1");
    }
}
