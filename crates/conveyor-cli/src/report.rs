//! What the user sees: the progress bar (stderr, terminals only), notes, and the final summary
//! (stdout, human or `--json`).

use std::io::{self, IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

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
    pub(crate) journal: Option<String>,
    /// The input was stdin or a pipe, which a rerun reads anew from its first line: rerunning
    /// the same command does not pick up where this run stopped reading.
    #[serde(skip)]
    pub(crate) stream: bool,
    /// Why the journal could not be written at the end of the run, if it could not: it then
    /// still holds lines that were delivered.
    pub(crate) journal_error: Option<String>,
    pub(crate) exit_code: u8,
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
        if self.paused_lanes == [""] {
            // The one lane of a strict or pipelined run: resumed without a key.
            text.push_str("\nthe lane is paused (fix the cause, then `conveyor resume`)");
        } else if !self.paused_lanes.is_empty() {
            text.push_str(&format!(
                "\npaused lanes: {} (fix the cause, then `conveyor resume KEY`)",
                self.paused_lanes
                    .iter()
                    .map(|k| format!("{k:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if self.left > 0 {
            let (items, were) = match self.left {
                1 => ("1 item".to_owned(), "was not delivered and is"),
                n => (format!("{n} items"), "were not delivered and are"),
            };
            match &self.journal {
                Some(path) if self.stream => text.push_str(&format!(
                    "\n{items} left in the journal {path}: rerun the same command to deliver \
                     them. The rerun reads its input stream anew from the first line: feed it \
                     only the lines this run did not read (`conveyor status` shows how far it \
                     read), or those read are sent again as new lines"
                )),
                Some(path) => text.push_str(&format!(
                    "\n{items} left in the journal {path}: rerun the same command to resume"
                )),
                None => text.push_str(&format!("\n{items} {were} lost (run without a journal)")),
            }
        }
        if let Some(error) = &self.journal_error {
            text.push_str(&format!(
                "\nthe journal could not record the end of this run ({error}): lines delivered \
                 meanwhile may be sent again when the command is rerun"
            ));
        }
        if self.failed > 0 && self.journal.is_some() {
            text.push_str("\nfailed lines are kept as dead letters: `conveyor dead list`");
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
            journal: None,
            stream: false,
            journal_error: None,
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
            many.contains("\"u1\" (fix the cause, then `conveyor resume KEY`)"),
            "{many}"
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
