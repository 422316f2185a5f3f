//! What the user sees: the progress bar (stderr, terminals only), notes, and the final summary
//! (stdout, human or `--json`).

use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Write};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::ops::resume_command;

/// Writes to stdout; a closed pipe (`conveyor send … | head`) is not an error.
pub(crate) fn print_out(text: &str) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Progress on stderr when it is a terminal, and per-line notes that do not tear the bar.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar when `show` and stderr is a terminal; `total` counts the lines when it can (only
    /// called when there is a bar to show, since counting reads the whole file).
    pub(crate) fn new(show: bool, total: impl FnOnce() -> Option<u64>) -> Self {
        if !show || !io::stderr().is_terminal() {
            return Self { bar: None };
        }
        let bar = match total() {
            Some(total) => ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
                .with_style(
                    ProgressStyle::with_template(
                        "{spinner} {elapsed_precise} [{wide_bar}] {pos}/{len} {rate} ETA {eta} {msg}",
                    )
                    .expect("valid template")
                    .with_key("rate", rate)
                    .progress_chars("=> "),
                ),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
                ProgressStyle::with_template("{spinner} {elapsed_precise} {pos} settled {rate} {msg}")
                    .expect("valid template")
                    .with_key("rate", rate),
            ),
        };
        bar.enable_steady_tick(Duration::from_millis(120));
        Self { bar: Some(bar) }
    }

    /// Shows `settled` lines done, and the failure counters.
    pub(crate) fn update(&self, settled: u64, failed: u64, retried: u64, rejected: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(settled);
            bar.set_message(format!(
                "failed {failed} retried {retried} rejected {rejected}"
            ));
        }
    }

    /// Sets the total once it becomes known.
    pub(crate) fn set_total(&self, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    /// A message on stderr, above the bar when there is one.
    pub(crate) fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => {
                let _ = writeln!(io::stderr().lock(), "{text}");
            }
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Items per second with one decimal (indicatif's own `{per_sec}` shows four).
fn rate(state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write) {
    let _ = write!(w, "{:.1}/s", state.per_sec());
}

/// How long failures like the one before them are held back before they are reported: a log
/// then still shows, every so often, that the run goes on failing.
const REPEATS_EVERY: Duration = Duration::from_secs(10);

/// The notes for lines that failed for good, where a failure like the one before it (the same
/// error after as many attempts) is not written out again: a server that is down fails every
/// line with the same long message. The first is shown in full; the ones like it after it are
/// reported together (`lines 2 to 40 failed after 6 attempt(s) with the same error as line 1`)
/// when a different failure comes, every [`REPEATS_EVERY`] (see [`FailureNotes::tick`]), and at
/// the end of the run ([`FailureNotes::finish`]).
#[derive(Debug, Default)]
pub(crate) struct FailureNotes {
    /// A mutex, since lines settle on the conveyor's threads and the main thread ticks: one
    /// short lock per failure. Notes are written holding it, so they keep the order of events.
    repeats: Mutex<Repeats>,
}

impl FailureNotes {
    /// Reports that `line` failed after `attempts` with `error`, or holds it back as a repeat.
    pub(crate) fn failed(&self, progress: &Progress, line: u64, attempts: u32, error: &str) {
        let mut repeats = self.lock();
        for note in repeats.failed(line, attempts, error, Instant::now()) {
            progress.note(&note);
        }
    }

    /// Reports the repeats held back for [`REPEATS_EVERY`] or longer.
    pub(crate) fn tick(&self, progress: &Progress) {
        if let Some(note) = self.lock().held_note_due(Instant::now()) {
            progress.note(&note);
        }
    }

    /// Reports what is held back; a line that fails after this (a send still running when the
    /// close gave up on it) is reported in full.
    pub(crate) fn finish(&self, progress: &Progress) {
        let mut repeats = self.lock();
        if let Some(note) = repeats.held_note() {
            progress.note(&note);
        }
        repeats.finished = true;
    }

    /// Reports what is held back, for a second Ctrl-C that exits at once: like
    /// [`FailureNotes::finish`], but it gives up rather than wait for a thread that holds the
    /// notes (one stuck writing to a full pipe must not keep the process from exiting).
    pub(crate) fn finish_now(&self, progress: &Progress) {
        let mut repeats = match self.repeats.try_lock() {
            Ok(repeats) => repeats,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if let Some(note) = repeats.held_note() {
            progress.note(&note);
        }
        repeats.finished = true;
    }

    /// A thread that panicked holding the lock left at worst a count off by one: used as it is.
    fn lock(&self) -> std::sync::MutexGuard<'_, Repeats> {
        self.repeats.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What [`FailureNotes`] showed last and holds back.
#[derive(Debug, Default)]
struct Repeats {
    /// The last failure shown in full: its line, attempts and error.
    shown: Option<(u64, u32, String)>,
    /// The lines that failed like it since, not reported yet. Each is named when they are
    /// reported: without a journal, this note is the only record of which lines to send again.
    held: Vec<u64>,
    /// When the first of them failed (`None` while none is held).
    held_since: Option<Instant>,
    /// Set by [`FailureNotes::finish`]: nothing is held any more, every failure is shown in full.
    finished: bool,
}

impl Repeats {
    /// The notes for a failure: none for a repeat, which is held; else what was held, then
    /// the failure in full.
    fn failed(&mut self, line: u64, attempts: u32, error: &str, now: Instant) -> Vec<String> {
        let full = || format!("line {line}: failed after {attempts} attempt(s): {error}");
        if self.finished {
            return vec![full()];
        }
        let repeat = matches!(&self.shown, Some((_, a, e)) if *a == attempts && e == error);
        if repeat {
            if self.held.is_empty() {
                self.held_since = Some(now);
            }
            self.held.push(line);
            return Vec::new();
        }
        let mut notes: Vec<String> = self.held_note().into_iter().collect();
        notes.push(full());
        self.shown = Some((line, attempts, error.to_owned()));
        notes
    }

    /// [`Repeats::held_note`], once the first failure held back is [`REPEATS_EVERY`] old.
    fn held_note_due(&mut self, now: Instant) -> Option<String> {
        let since = self.held_since?;
        if now.saturating_duration_since(since) < REPEATS_EVERY {
            return None;
        }
        self.held_note()
    }

    /// The note for the failures held back, if any; they are reported then, not held any more.
    fn held_note(&mut self) -> Option<String> {
        let (first, attempts, _) = self.shown.as_ref()?;
        if self.held.is_empty() {
            return None;
        }
        let mut held = std::mem::take(&mut self.held);
        let lines = match held.as_slice() {
            [line] => format!("line {line}"),
            _ => format!("lines {}", line_ranges(&mut held)),
        };
        self.held_since = None;
        Some(format!(
            "{lines} failed after {attempts} attempt(s) with the same error as line {first}"
        ))
    }
}

/// `lines` in order, runs of consecutive ones as ranges: `2 to 4, 7, 9 to 12`.
fn line_ranges(lines: &mut [u64]) -> String {
    lines.sort_unstable();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &line in lines.iter() {
        match ranges.last_mut() {
            Some((_, high)) if *high + 1 == line => *high = line,
            _ => ranges.push((line, line)),
        }
    }
    let ranges: Vec<String> = ranges
        .into_iter()
        .map(|(low, high)| match high - low {
            0 => low.to_string(),
            _ => format!("{low} to {high}"),
        })
        .collect();
    ranges.join(", ")
}

/// How many paused lanes the summary names one by one; `conveyor status` lists them all.
const PAUSED_NAMED: usize = 10;

/// The end-of-run summary; `--json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    /// The destination (URL without password, or program).
    pub(crate) target: String,
    pub(crate) ordering: String,
    /// Lines accepted in this run.
    pub(crate) accepted: u64,
    pub(crate) delivered: u64,
    pub(crate) failed: u64,
    pub(crate) retried: u64,
    pub(crate) rejected: u64,
    /// Items still pending when the run ended (kept in the journal when there is one).
    pub(crate) left: u64,
    /// Input lines a previous run had already taken (resume), skipped by this run.
    pub(crate) resumed_after_line: u64,
    pub(crate) elapsed_secs: f64,
    pub(crate) items_per_sec: f64,
    /// How long reading and submitting the input took (the producer's side).
    pub(crate) submit_secs: f64,
    pub(crate) latency_p50_ms: Option<f64>,
    pub(crate) latency_p99_ms: Option<f64>,
    pub(crate) interrupted: bool,
    pub(crate) paused_lanes: Vec<String>,
    /// The error that paused each paused lane, as the journal recorded it.
    #[serde(skip)]
    pub(crate) paused_by: BTreeMap<String, String>,
    pub(crate) journal: Option<String>,
    /// What the journal commands named in the text need to find the journal (` --journal
    /// PATH`, or nothing for the only one under ./.conveyor/: see `ops::journal_option`).
    #[serde(skip)]
    pub(crate) journal_option: String,
    /// The input was stdin or a pipe, which a rerun reads anew from its first line: rerunning
    /// the same command does not pick up where this run stopped reading.
    #[serde(skip)]
    pub(crate) stream: bool,
    /// Why the journal could not be written at the end of the run, if it could not: it then
    /// still holds lines that were delivered.
    pub(crate) journal_error: Option<String>,
    /// What the journal holds, read back from it after a run it could not record in full
    /// (a full disk): the lines read after its last commit are in no journal, so `left` is not
    /// what it holds, and a rerun resumes after its input position, not where this run stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) recorded: Option<Recorded>,
    pub(crate) exit_code: u8,
}

/// What a journal holds at the end of a run (see [`Summary::recorded`]).
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Recorded {
    /// Lines pending in it (some may have been delivered since: their delivery is not in it).
    pub(crate) pending: u64,
    /// The input line it has read up to: a rerun goes on after it.
    pub(crate) input_position: u64,
}

impl Summary {
    /// The human-readable form.
    pub(crate) fn human(&self) -> String {
        let mut text = format!(
            "delivered {}, failed {}, retried {}, rejected {} in {:.2}s ({:.1} items/s)",
            self.delivered,
            self.failed,
            self.retried,
            self.rejected,
            self.elapsed_secs,
            self.items_per_sec
        );
        // Measured over every sink call, failed ones too: after "delivered 0" it would read as
        // the latency of deliveries there were none of. (`--json` keeps it, as measured.)
        if let (Some(p50), Some(p99), 1..) =
            (self.latency_p50_ms, self.latency_p99_ms, self.delivered)
        {
            text.push_str(&format!("\nsend latency p50 {p50:.1}ms, p99 {p99:.1}ms"));
        }
        if self.resumed_after_line > 0 {
            let lines = match self.resumed_after_line {
                1 => "line".to_owned(),
                n => format!("{n} lines"),
            };
            text.push_str(&format!(
                "\nresumed: skipped the first {lines}, taken by an earlier run"
            ));
            // A rerun meant to send the same file again looks like it did nothing: say how. Not
            // after a rerun that delivered what a crash left: that one did what it was run for.
            let settled = self.delivered + self.failed + self.left;
            if let (0, 0, 0, Some(journal)) = (self.accepted, self.rejected, settled, &self.journal)
            {
                text.push_str(&format!(
                    "; nothing new to send. To send the input again from its first line, give \
                     another --journal PATH (or delete {journal})"
                ));
            }
        }
        if self.interrupted {
            text.push_str("\ninterrupted");
        }
        let journal = &self.journal_option;
        // Each paused lane with why it paused and the command that resumes it: "fix the cause"
        // alone left the cause to find out with `conveyor status`.
        let why = |lane: &str, before: &str| match self.paused_by.get(lane) {
            Some(error) if !error.is_empty() => format!("{before}by: {error}"),
            _ => String::new(),
        };
        if self.paused_lanes == [""] {
            // The one lane of a strict or pipelined run: resumed without a key.
            text.push_str(&format!(
                "\nthe lane is paused{} (fix the cause, then `{}`)",
                why("", " "),
                resume_command("", journal)
            ));
        } else if !self.paused_lanes.is_empty() {
            text.push_str("\npaused lanes (fix the cause, then resume each):");
            for lane in self.paused_lanes.iter().take(PAUSED_NAMED) {
                text.push_str(&format!(
                    "\n  {lane:?}: `{}`{}",
                    resume_command(lane, journal),
                    why(lane, ", paused ")
                ));
            }
            if let more @ 1.. = self.paused_lanes.len().saturating_sub(PAUSED_NAMED) {
                text.push_str(&format!(
                    "\n  and {more} more: `conveyor status{journal}` lists them"
                ));
            }
        }
        if self.left > 0 {
            let (items, were) = match self.left {
                1 => ("1 item".to_owned(), "was not delivered and is"),
                n => (format!("{n} items"), "were not delivered and are"),
            };
            match (&self.journal, self.recorded) {
                (Some(path), Some(held)) => {
                    let read = held.input_position;
                    let resume = if self.stream {
                        format!(
                            "rerun the same command to deliver them, feeding it the stream from \
                             line {} on: the lines this run read after line {read} are in no \
                             journal",
                            read + 1
                        )
                    } else {
                        format!("rerun the same command: it reads the input on after line {read}")
                    };
                    let were = if self.left == 1 { "was" } else { "were" };
                    text.push_str(&format!(
                        "\n{items} {were} not delivered, and the journal {path} could not \
                         record them all: it holds {} pending line(s) and the input read up to \
                         line {read}; {resume}",
                        held.pending
                    ));
                }
                (Some(path), None) if self.stream => text.push_str(&format!(
                    "\n{items} left in the journal {path}: rerun the same command to deliver \
                     them. The rerun reads its input stream anew from the first line: feed it \
                     only the lines this run did not read (`conveyor status{journal}` shows how \
                     far it read), or those read are sent again as new lines"
                )),
                (Some(path), None) => text.push_str(&format!(
                    "\n{items} left in the journal {path}: rerun the same command to resume"
                )),
                (None, _) => {
                    text.push_str(&format!("\n{items} {were} lost (run without a journal)"))
                }
            }
        }
        if let Some(error) = &self.journal_error {
            text.push_str(&format!(
                "\nthe journal could not record the end of this run ({error}): lines delivered \
                 meanwhile may be sent again when the command is rerun"
            ));
        }
        if self.failed > 0 && self.journal.is_some() {
            text.push_str(&format!(
                "\nfailed lines are kept as dead letters: `conveyor dead list{journal}`"
            ));
        }
        text
    }

    pub(crate) fn json(&self) -> String {
        serde_json::to_string(self).expect("a summary always serializes")
    }
}

/// Milliseconds rounded to the microsecond, for the summary. Computed from a whole number of
/// microseconds, so the JSON shows `1.308`, not the `1.3079999999999998` that seconds times
/// 1000 gives.
pub(crate) fn millis(d: Duration) -> f64 {
    (d.as_nanos() as f64 / 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> Summary {
        Summary {
            target: "http://127.0.0.1:1/".into(),
            ordering: "strict".into(),
            accepted: 10,
            delivered: 8,
            failed: 1,
            retried: 3,
            rejected: 1,
            left: 1,
            resumed_after_line: 0,
            elapsed_secs: 2.0,
            items_per_sec: 4.0,
            submit_secs: 0.001,
            latency_p50_ms: Some(50.0),
            latency_p99_ms: Some(99.0),
            interrupted: true,
            paused_lanes: vec![],
            paused_by: BTreeMap::new(),
            journal: None,
            journal_option: String::new(),
            stream: false,
            journal_error: None,
            recorded: None,
            exit_code: 3,
        }
    }

    #[test]
    fn human_summary_says_what_happened() {
        let text = summary().human();
        assert!(
            text.contains("delivered 8, failed 1, retried 3, rejected 1"),
            "{text}"
        );
        assert!(text.contains("p50 50.0ms, p99 99.0ms"), "{text}");
        assert!(
            text.contains("\n1 item was not delivered and is lost"),
            "{text}"
        );
        let kept = Summary {
            journal: Some("j.journal".into()),
            paused_lanes: vec![String::new()],
            ..summary()
        }
        .human();
        assert!(
            kept.contains("\n1 item left in the journal j.journal"),
            "{kept}"
        );
        assert!(kept.contains("then `conveyor resume`)"), "{kept}");
        let why = Summary {
            journal: Some("j.journal".into()),
            paused_lanes: vec![String::new()],
            paused_by: BTreeMap::from([(String::new(), "HTTP 404 Not Found".to_owned())]),
            ..summary()
        }
        .human();
        assert!(
            why.contains("the lane is paused by: HTTP 404 Not Found (fix the cause, then"),
            "{why}"
        );
        let many = Summary {
            left: 2,
            paused_lanes: vec!["u1".into()],
            ..summary()
        }
        .human();
        assert!(
            many.contains("2 items were not delivered and are lost"),
            "{many}"
        );
        assert!(
            many.contains(
                "paused lanes (fix the cause, then resume each):\n  \"u1\": `conveyor resume u1`\n"
            ),
            "{many}"
        );
        // Each lane with its cause, up to PAUSED_NAMED; `status` lists the rest.
        let lanes: Vec<String> = (0..PAUSED_NAMED + 2).map(|n| format!("u{n}")).collect();
        let paused_by = lanes.iter().map(|l| (l.clone(), format!("{l} broke")));
        let crowd = Summary {
            paused_lanes: lanes.clone(),
            paused_by: paused_by.collect(),
            journal_option: " --journal j".into(),
            ..summary()
        }
        .human();
        let named = "\"u0\": `conveyor resume --journal j u0`, paused by: u0 broke\n";
        assert!(crowd.contains(named), "{crowd}");
        let last = PAUSED_NAMED - 1;
        assert!(crowd.contains(&format!("u{last} broke")), "{crowd}");
        assert!(
            !crowd.contains(&format!("u{PAUSED_NAMED} broke")),
            "{crowd}"
        );
        assert!(
            crowd.contains("\n  and 2 more: `conveyor status --journal j` lists them"),
            "{crowd}"
        );
    }

    #[test]
    fn a_failure_like_the_one_before_is_held_and_reported_with_the_others() {
        let now = Instant::now();
        let mut repeats = Repeats::default();
        let down = "cannot connect to 127.0.0.1:9: connection refused";
        assert_eq!(
            repeats.failed(1, 6, down, now),
            [format!("line 1: failed after 6 attempt(s): {down}")]
        );
        for line in 2..=4 {
            assert!(repeats.failed(line, 6, down, now).is_empty());
        }
        assert_eq!(repeats.held_since, Some(now));
        // Reported every so often while they go on.
        let soon = now + REPEATS_EVERY - Duration::from_millis(1);
        assert_eq!(repeats.held_note_due(soon), None);
        assert_eq!(
            repeats.held_note_due(now + REPEATS_EVERY).unwrap(),
            "lines 2 to 4 failed after 6 attempt(s) with the same error as line 1"
        );
        assert_eq!(repeats.held_note_due(now + REPEATS_EVERY * 2), None);
        for line in 2..=4 {
            assert!(repeats.failed(line, 6, down, now).is_empty());
        }
        // Another error: the held ones first, then it in full.
        assert_eq!(
            repeats.failed(5, 6, "HTTP 500", now),
            [
                "lines 2 to 4 failed after 6 attempt(s) with the same error as line 1",
                "line 5: failed after 6 attempt(s): HTTP 500",
            ]
        );
        assert_eq!(repeats.held_since, None);
        // As many attempts count too: a permanent failure is no repeat of a retried one.
        assert_eq!(repeats.failed(6, 1, "HTTP 500", now).len(), 1);
        // Out of order (keyed lanes), with gaps: each line is named, as without a journal this
        // is the only record of which lines to send again.
        for line in [9, 7, 12, 8, 14, 15, 16] {
            assert!(repeats.failed(line, 1, "HTTP 500", now).is_empty());
        }
        assert_eq!(
            repeats.held_note().unwrap(),
            "lines 7 to 9, 12, 14 to 16 failed after 1 attempt(s) with the same error as line 6"
        );
        assert_eq!(repeats.held_note(), None);
        assert!(repeats.failed(13, 1, "HTTP 500", now).is_empty());
        assert_eq!(
            repeats.held_note().unwrap(),
            "line 13 failed after 1 attempt(s) with the same error as line 6"
        );
    }

    #[test]
    fn no_latency_line_when_nothing_was_delivered() {
        let none = Summary {
            delivered: 0,
            failed: 3,
            ..summary()
        };
        assert!(!none.human().contains("latency"), "{}", none.human());
        // The JSON summary keeps what was measured, failed calls included.
        let v: serde_json::Value = serde_json::from_str(&none.json()).unwrap();
        assert_eq!(v["latency_p50_ms"], 50.0);
    }

    #[test]
    fn a_rerun_with_nothing_new_says_how_to_send_again() {
        let done = Summary {
            accepted: 0,
            rejected: 0,
            left: 0,
            resumed_after_line: 1,
            journal: Some("j.journal".into()),
            ..summary()
        };
        let text = Summary {
            delivered: 0,
            failed: 0,
            ..done.clone()
        }
        .human();
        assert!(
            text.contains("skipped the first line, taken by an earlier run; nothing new to send")
                && text.contains("another --journal PATH (or delete j.journal)"),
            "{text}"
        );
        // A rerun after a crash delivered what the journal held: the advice would read as if
        // the resume had failed.
        let resumed = done.human();
        assert!(
            resumed.contains("skipped the first line, taken by an earlier run"),
            "{resumed}"
        );
        assert!(
            !resumed.contains("nothing new") && !resumed.contains("another --journal"),
            "{resumed}"
        );
        let grew = Summary {
            accepted: 2,
            resumed_after_line: 3,
            ..done
        }
        .human();
        assert!(grew.contains("skipped the first 3 lines"), "{grew}");
        assert!(!grew.contains("nothing new"), "{grew}");
    }

    #[test]
    fn a_journal_that_could_not_record_the_end_warns_of_lines_sent_again() {
        let text = Summary {
            journal_error: Some("journal j could not be written: the disk is full".into()),
            ..summary()
        }
        .human();
        assert!(
            text.contains("the disk is full") && text.contains("may be sent again"),
            "{text}"
        );
        assert!(!summary().human().contains("may be sent again"));
    }

    #[test]
    fn milliseconds_have_three_decimals_and_no_float_noise() {
        // 1.308 ms as seconds times 1000 is 1.3079999999999998.
        assert_eq!(millis(Duration::from_micros(1308)), 1.308);
        assert_eq!(millis(Duration::from_nanos(1_307_600)), 1.308);
        assert_eq!(millis(Duration::from_nanos(400)), 0.0);
        let text = Summary {
            latency_p50_ms: Some(millis(Duration::from_micros(1308))),
            latency_p99_ms: Some(millis(Duration::from_micros(2_000_100))),
            ..summary()
        }
        .json();
        assert!(
            text.contains(r#""latency_p50_ms":1.308,"latency_p99_ms":2000.1,"#),
            "{text}"
        );
    }

    #[test]
    fn json_summary_has_the_counters() {
        let v: serde_json::Value = serde_json::from_str(&summary().json()).unwrap();
        assert_eq!(v["delivered"], 8);
        assert_eq!(v["exit_code"], 3);
        assert_eq!(v["latency_p99_ms"], 99.0);
    }
}
