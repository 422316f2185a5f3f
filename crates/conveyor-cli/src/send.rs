//! `conveyor send`: read lines on one thread, deliver through the engine, watch signals and
//! progress on the main thread, and summarise.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use conveyor::{Conveyor, DeliveryError, OnFailure, Ordering, Retry, SendError, Stats};

use crate::args::{FailurePolicy, OrderingArg, OutputArgs, SendArgs};
use crate::input::{overlong_reason, KeySpec, Line, LineReader, Parsed, MAX_LINE};
use crate::rejects::Rejects;
use crate::report::{millis, print_out, FailureNotes, Progress, Recorded, Summary};
use crate::sink::{sink_fn, ExecSink, Latencies, Target};
use crate::{exit, journal, ops, CliError};

/// The longest wait between two retries, whatever `--backoff` doubles up to.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long nothing may move, with a lane paused, nothing in flight and the reader done or
/// waiting for room in the queue, before the run stops waiting and leaves the paused lane to
/// `conveyor resume`.
const PAUSED_STALL: Duration = Duration::from_secs(2);
/// How long the end of the run waits for the reader thread to see the close and stop: it is
/// then either woken from a send at once, or blocked reading stdin, where waiting is useless.
const READER_GRACE: Duration = Duration::from_millis(500);
/// How much of a 2xx reply's body is read, only to be dropped: a usual reply ends within it, which
/// frees its connection for the next line, while a huge or endless one is left unread (and its
/// connection closed) rather than held in memory whole.
const REPLY_BODY_READ: usize = 64 * 1024;
/// How often the main thread refreshes progress and looks at signals.
const TICK: Duration = Duration::from_millis(100);
/// How often the end of a close is checked; short, since the run ends right after it.
const CLOSE_POLL: Duration = Duration::from_millis(10);

/// Where the lines come from.
#[derive(Debug)]
pub(crate) enum Input {
    Stdin,
    /// A regular file: it can be counted up front and read again from a journal's position.
    File(PathBuf),
    /// A path that is no regular file: a named pipe, `<(producer)`, `/dev/stdin`, a device.
    /// Like stdin, it can be read only once: counting its lines for the bar would consume them,
    /// and a rerun reads a new stream, whose first lines are not the ones an earlier run took.
    Stream(PathBuf),
    /// Generated lines (the demo).
    Memory(Vec<u8>),
}

impl Input {
    pub(crate) fn from_arg(arg: &str) -> Self {
        if arg == "-" {
            return Self::Stdin;
        }
        let path = PathBuf::from(arg);
        // A directory stays a `File`, for `open` to refuse; a missing path too, for `open` to
        // report.
        match std::fs::metadata(&path) {
            Ok(meta) if !meta.is_file() && !meta.is_dir() => Self::Stream(path),
            _ => Self::File(path),
        }
    }

    /// Opens the input; a file that cannot be read (missing, a directory) is refused here,
    /// before anything else (the journal above all) is created for it.
    ///
    /// Without `read_ahead`, stdin (or another stream) is read a byte at a time, never past the
    /// line being taken (`--sync`: each line is committed before the next is read, so a crash
    /// loses at most that line; what a buffer read ahead could not be read again). A syscall per
    /// byte is cheap next to a commit per line. A file can be read again from the journal's
    /// position: always buffered.
    fn open(&self, read_ahead: bool) -> Result<Box<dyn BufRead + Send>, CliError> {
        // What a stream reads ahead without `--sync`, and a file always.
        const READ_AHEAD: usize = 64 * 1024;
        Ok(match self {
            Self::Stdin if read_ahead => {
                Box::new(BufReader::with_capacity(READ_AHEAD, io::stdin()))
            }
            Self::Stdin => {
                // A handle of its own on fd 0: `io::stdin()` would buffer 8 KiB behind ours.
                let fd = io::stdin()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| CliError::usage(format!("cannot read stdin: {e}")))?;
                Box::new(BufReader::with_capacity(1, File::from(fd)))
            }
            Self::File(path) | Self::Stream(path) => {
                let file = File::open(path).map_err(|e| {
                    CliError::usage(format!("cannot open input {}: {e}", path.display()))
                })?;
                if file.metadata().is_ok_and(|m| m.is_dir()) {
                    return Err(CliError::usage(format!(
                        "the input {} is a directory: give a JSON-lines file, or `-` for stdin",
                        path.display()
                    )));
                }
                let stream = matches!(self, Self::Stream(_));
                let capacity = if stream && !read_ahead { 1 } else { READ_AHEAD };
                Box::new(BufReader::with_capacity(capacity, file))
            }
            Self::Memory(bytes) => Box::new(io::Cursor::new(bytes.clone())),
        })
    }

    /// Line count for the progress bar, when it can be known up front.
    fn count_lines(&self) -> Option<u64> {
        let count = |r: &mut dyn BufRead| -> io::Result<u64> {
            let mut lines = 0;
            loop {
                let buf = r.fill_buf()?;
                if buf.is_empty() {
                    return Ok(lines);
                }
                lines += buf.iter().filter(|&&b| b == b'\n').count() as u64;
                let n = buf.len();
                r.consume(n);
            }
        };
        match self {
            Self::Stdin | Self::Stream(_) => None,
            Self::File(path) => File::open(path)
                .ok()
                .and_then(|f| count(&mut BufReader::new(f)).ok()),
            Self::Memory(bytes) => count(&mut bytes.as_slice()).ok(),
        }
    }

    /// Resuming by line position only makes sense when a rerun reads the same bytes again.
    fn is_replayable(&self) -> bool {
        matches!(self, Self::File(_) | Self::Memory(_))
    }

    fn identity(&self) -> String {
        match self {
            Self::Stdin => "stdin".into(),
            Self::File(path) | Self::Stream(path) => std::fs::canonicalize(path)
                .unwrap_or_else(|_| path.clone())
                .display()
                .to_string(),
            Self::Memory(_) => "memory".into(),
        }
    }
}

/// Everything `send` needs, whether it came from the command line or the demo.
#[derive(Debug)]
pub(crate) struct SendPlan {
    pub(crate) target: Target,
    pub(crate) ordering: OrderingArg,
    pub(crate) key: Option<KeySpec>,
    pub(crate) retries: u32,
    pub(crate) backoff: Duration,
    pub(crate) rate: Option<u32>,
    pub(crate) on_failure: FailurePolicy,
    pub(crate) capacity: usize,
    pub(crate) rejects: Option<PathBuf>,
    pub(crate) journal: Option<PathBuf>,
    /// Whether `journal` is the default one, named after the input, the target and the kind of
    /// ordering (no `--journal`).
    pub(crate) default_journal: bool,
    /// Commit every line before the next (`--sync`).
    pub(crate) sync: bool,
    pub(crate) output: OutputArgs,
}

impl SendPlan {
    /// Checks the arguments together and sets up the target.
    pub(crate) fn from_args(args: SendArgs, input: &Input) -> Result<Self, CliError> {
        let key =
            match (args.ordering, &args.key) {
                (OrderingArg::Keyed(_), Some(field)) if field.is_empty() => return Err(CliError::usage(
                    "--key needs a field name (`user`) or a JSON pointer (`/user/id`), not an empty one",
                )),
                (OrderingArg::Keyed(_), Some(field)) => Some(KeySpec::parse(field)),
                (OrderingArg::Keyed(_), None) => return Err(CliError::usage(
                    "--ordering keyed:N needs --key FIELD to say which field names a line's lane",
                )),
                (_, Some(_)) => return Err(CliError::usage(
                    "--key only applies to --ordering keyed:N (strict and pipelined have one lane)",
                )),
                (_, None) => None,
            };
        if args.capacity == 0 {
            return Err(CliError::usage("--capacity must be at least 1"));
        }
        let target = if let Some(url) = &args.to {
            let mut builder = conveyor::HttpSink::builder(url.as_str())
                .timeout(args.timeout)
                .max_reply_body(REPLY_BODY_READ);
            if let Some(method) = &args.method {
                builder = builder.method(method.as_str());
            }
            for (name, value) in &args.headers {
                builder = builder.header(name.as_str(), value.as_str());
            }
            if let Some(path) = &args.cacert {
                let pem = std::fs::read(path).map_err(|e| {
                    CliError::usage(format!("cannot read --cacert {}: {e}", path.display()))
                })?;
                builder = builder.root_certificates(pem);
            }
            Target::Http(Box::new(builder.build().map_err(|e| {
                match (e, &args.cacert) {
                    (e @ conveyor::HttpBuildError::InvalidRootCertificates(_), Some(path)) => {
                        CliError::usage(format!("--cacert {}: {e}", path.display()))
                    }
                    (e, _) => CliError::usage(e.to_string()),
                }
            })?))
        } else {
            // The HTTP options, refused rather than silently unused; the first given is named.
            let http_only = [
                (!args.headers.is_empty(), "--header", "--to URL"),
                (args.method.is_some(), "--method", "--to URL"),
                (args.cacert.is_some(), "--cacert", "an https --to URL"),
            ];
            if let Some((_, option, target)) = http_only.iter().find(|(given, ..)| *given) {
                return Err(CliError::usage(format!(
                    "{option} only applies to {target}, not --exec"
                )));
            }
            Target::Exec(
                ExecSink::new(&args.exec, args.timeout, args.output.json)
                    .map_err(CliError::usage)?,
            )
        };
        let (journal, default_journal) = match (args.journal.no_journal, args.journal.journal) {
            (true, _) => (None, false),
            (false, Some(path)) => (Some(path), false),
            (false, None) => {
                let path = default_journal_path(
                    Path::new(journal::JOURNAL_DIR),
                    input,
                    &args.to,
                    &args.exec,
                    matches!(args.ordering, OrderingArg::Keyed(_)),
                );
                (Some(path), true)
            }
        };
        if let Some(rejects) = &args.rejects {
            let input_path = match input {
                Input::File(path) | Input::Stream(path) => Some(path.as_path()),
                Input::Stdin | Input::Memory(_) => None,
            };
            let read = [
                ("the input", input_path),
                ("the journal", journal.as_deref()),
                ("the --cacert file", args.cacert.as_deref()),
                ("the --exec program", target.program()),
            ];
            check_rejects_path(rejects, &read)?;
        }
        if args.on_failure == FailurePolicy::Pause && journal.is_none() {
            return Err(CliError::usage(
                "--on-failure pause needs the journal (a paused lane is resumed from it): drop --no-journal",
            ));
        }
        Ok(Self {
            target,
            ordering: args.ordering,
            key,
            retries: args.retries,
            backoff: args.backoff,
            rate: args.rate,
            on_failure: args.on_failure,
            capacity: args.capacity,
            rejects: args.rejects,
            journal,
            default_journal,
            sync: args.journal.sync,
            output: args.output,
        })
    }

    fn retry(&self) -> Retry {
        if self.retries == 0 {
            Retry::none()
        } else {
            Retry::exponential(self.backoff)
                .max_delay(MAX_BACKOFF.max(self.backoff))
                .max_attempts(self.retries.saturating_add(1))
        }
    }

    fn engine_ordering(&self) -> Ordering {
        match self.ordering {
            OrderingArg::Strict => Ordering::Strict,
            OrderingArg::Pipelined(n) => Ordering::Pipelined { in_flight: n },
            OrderingArg::Keyed(n) => Ordering::Keyed { concurrency: n },
        }
    }
}

/// Refuses a `--rejects FILE` that is one of the files the run reads (`read`: what each is, and
/// its path): it is emptied or appended to before they are read, so the run would destroy the
/// input it was asked to send (and report that it sent nothing as a success), or the journal.
fn check_rejects_path(rejects: &Path, read: &[(&str, Option<&Path>)]) -> Result<(), CliError> {
    use std::os::unix::fs::MetadataExt;
    // Only a regular file is emptied or changed: a device (`/dev/stderr`) is written as it is.
    let meta = match std::fs::metadata(rejects) {
        Ok(meta) if meta.is_file() => meta,
        _ => return Ok(()),
    };
    let clash = read.iter().find(|(_, path)| {
        path.and_then(|path| std::fs::metadata(path).ok())
            .is_some_and(|other| (other.dev(), other.ino()) == (meta.dev(), meta.ino()))
    });
    match clash {
        Some((what, _)) => Err(CliError::usage(format!(
            "--rejects {} is {what} of this run: copying bad lines there would overwrite it; \
             name another file for them, e.g. --rejects rejects.jsonl",
            rejects.display()
        ))),
        None => Ok(()),
    }
}

/// The journal `send` keeps without `--journal`, in `dir` (`.conveyor/`):
/// `<input name>-<hash>.journal` for strict and pipelined runs, `<input name>-keyed-<hash>.journal`
/// for keyed ones, the hash covering the input and the target. The same command finds the same
/// journal; another input or target gets its own, and so does the other kind of ordering: keyed
/// lanes and the one lane of strict and pipelined ordering cannot share pending lines (and
/// strict and pipelined runs can, so a rerun may switch between them and resume).
///
/// Keyed runs of earlier versions kept their journal under the strict name: one that the journal
/// tells was keyed is used as it is, so that rerunning after an upgrade resumes it.
fn default_journal_path(
    dir: &Path,
    input: &Input,
    to: &Option<String>,
    exec: &[String],
    keyed: bool,
) -> PathBuf {
    // The strict name hashes what every name did before keyed runs got their own, so that an
    // upgraded binary finds yesterday's journal.
    let identity = format!(
        "{}\n{}\n{}",
        input.identity(),
        to.as_deref().unwrap_or(""),
        exec.join("\0")
    );
    let stem = journal_stem(input);
    let single_lane = dir.join(format!(
        "{stem}-{:016x}.journal",
        journal::fnv1a(identity.as_bytes())
    ));
    if !keyed {
        return single_lane;
    }
    let hash = journal::fnv1a(format!("{identity}\nkeyed").as_bytes());
    let path = dir.join(format!("{stem}-keyed-{hash:016x}.journal"));
    if !path.exists() && single_lane.exists() && journal::written_keyed(&single_lane) {
        return single_lane;
    }
    path
}

/// What the name of every default journal of `input` starts with: its file name without the
/// extension (`stdin` for stdin), made safe for a file name and cut to 40 characters.
fn journal_stem(input: &Input) -> String {
    match input {
        Input::File(path) | Input::Stream(path) => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        _ => "stdin".into(),
    }
    .chars()
    .map(|c| {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            c
        } else {
            '_'
        }
    })
    .take(40)
    .collect()
}

/// The default journals under `dir` that earlier runs on `input` kept with another target
/// (`--to`, or `--exec` and its arguments) or kind of ordering, and that still hold pending
/// lines, with how many. The default name covers all of those, so a run that changes one starts
/// a journal of its own and never delivers what the other holds: [`run`] says so as it starts
/// a new one.
///
/// A journal is taken for one of `input`'s by its name (see [`default_journal_path`]) and, for
/// a file, by the start of the file it was begun with: another file of the same name elsewhere
/// has its own. One that cannot be read is left out: this is only a note.
fn journals_left_pending(dir: &Path, input: &Input, ours: &Path) -> Vec<(PathBuf, u64)> {
    let prefix = format!("{}-", journal_stem(input));
    let is_default_name = |name: &str| {
        name.strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".journal"))
            .map(|rest| rest.strip_prefix("keyed-").unwrap_or(rest))
            .is_some_and(|hash| hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(PathBuf, u64)> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path != ours)
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(is_default_name)
        })
        .filter(|path| match input {
            Input::File(file) => journal::started_with(path, file),
            _ => true,
        })
        .filter_map(|path| {
            let pending = journal::pending(&path)?;
            (pending > 0).then_some((path, pending))
        })
        .collect();
    found.sort();
    found
}

/// The note for a journal that [`journals_left_pending`] found.
fn left_pending_note(other: &Path, pending: u64, ours: &Path) -> String {
    let other = other.display();
    format!(
        "conveyor: {other} still holds {pending} pending line(s) of an earlier run on this input \
         with another target (--to, or --exec and its arguments) or kind of ordering. This run \
         keeps its own journal, {}, and does not deliver them. To deliver them instead, stop \
         this run (Ctrl-C) and rerun it with --journal {other} (`conveyor status --journal \
         {other}` shows what it holds)",
        ours.display()
    )
}

/// The input, line by line.
type Reader = LineReader<Box<dyn BufRead + Send>>;

/// Opens the input and the rejects file, and skips what an earlier run took; all before the
/// journal is opened, so that a mistyped input path leaves no journal behind.
fn open_input(plan: &SendPlan, input: &Input) -> Result<(Reader, Option<Rejects>), CliError> {
    let mut reader = LineReader::new(input.open(!plan.sync)?, plan.key.clone());
    // Where a rerun picks up: the position stored with the last items a previous run accepted.
    // Only a file reads the same lines again; on stdin or a pipe the journal still replays what
    // was pending, but the new stream is read from its start. Checked before the conveyor starts
    // delivering what the journal holds, so an input that no longer fits is refused untouched.
    let resume_after = match &plan.journal {
        Some(path) if input.is_replayable() => {
            let taken = journal::stored_cursor(path)?.unwrap_or(0);
            // A shorter file is said to be one; then one whose start changed.
            skip_taken(&mut reader, taken, input, path)?;
            if let (Input::File(file), true) = (input, taken > 0) {
                journal::check_input(path, file, taken)?;
            }
            taken
        }
        _ => 0,
    };
    let rejects = match &plan.rejects {
        // A run that reads a file from its first line rejects every bad line again: start
        // afresh. A resumed run skips the lines it rejected before, and stdin or a pipe is a new
        // stream each time: keep what earlier runs wrote.
        Some(path) => Some(Rejects::open(
            path,
            input.is_replayable() && resume_after == 0,
        )?),
        None => None,
    };
    Ok((reader, rejects))
}

/// Skips the lines an earlier run `taken` from the input. A file with fewer lines was replaced
/// or cut short since: reading on from that position would send nothing, silently, so it is an
/// error. (A file rewritten with at least as many lines is caught by its start, see
/// `journal::check_input`.)
fn skip_taken(
    reader: &mut Reader,
    taken: u64,
    input: &Input,
    journal: &Path,
) -> Result<(), CliError> {
    let lines = reader
        .skip(taken)
        .map_err(|e| CliError::usage(format!("cannot read input: {e}")))?;
    if lines >= taken {
        return Ok(());
    }
    let journal = journal.display();
    Err(CliError::usage(format!(
        "the input {} has {lines} lines, but the journal {journal} says an earlier run already \
         took the first {taken}: the file was replaced or cut short since. To send it as a new \
         input, pass a new --journal PATH, or delete {journal} once `conveyor status --journal \
         {journal}` shows nothing pending",
        input.identity()
    )))
}

/// Messages from the reader thread and the signal handler to the main thread.
#[derive(Debug)]
pub(crate) enum Event {
    /// First Ctrl-C or SIGTERM.
    Interrupt,
    /// The input is exhausted (or unreadable, or the conveyor closed).
    InputDone(ReadOutcome),
}

#[derive(Debug, Default)]
pub(crate) struct ReadOutcome {
    error: Option<String>,
    /// The error is the journal's (it could not store a line): the input is fine, and a rerun
    /// goes on from the line that was refused.
    journal_failed: bool,
    submit_elapsed: Duration,
}

/// Counters the reader thread updates and the main thread shows.
#[derive(Debug, Default)]
struct ReadCounters {
    accepted: AtomicU64,
    rejected: AtomicU64,
    /// Lines of this run whose failure was reported as it happened (the rest of the failures
    /// are of lines an earlier run left in the journal).
    failed_noted: AtomicU64,
    /// The line being handed to the conveyor, 0 between lines. The main thread reads it to
    /// tell a reader blocked on a full queue (the same line for seconds) from one that is
    /// reading: line numbers only grow, so an unchanged non-zero value is one waiting send.
    submitting: AtomicU64,
    /// The notes for the lines of this run that failed, which the main thread's ticks and the
    /// end of the run report too.
    failures: FailureNotes,
}

/// Runs a whole `send`, returning its summary (already printed unless quiet).
pub(crate) fn run(
    plan: SendPlan,
    input: Input,
    events_tx: Sender<Event>,
    events: &Receiver<Event>,
) -> Result<Summary, CliError> {
    let started = Instant::now();
    let sync = plan.sync;
    let output = plan.output.clone();
    let target_name = plan.target.describe();
    let ordering_name = plan.ordering.to_string();
    let latencies = Arc::new(Latencies::new());
    let (mut reader, rejects) = open_input(&plan, &input)?;
    if let (Some(path), true) = (&plan.journal, plan.default_journal) {
        if !path.exists() {
            let dir = path.parent().unwrap_or(Path::new(""));
            for (other, pending) in journals_left_pending(dir, &input, path) {
                eprintln!("{}", left_pending_note(&other, pending, path));
            }
        }
    }

    let builder = Conveyor::<Line>::builder()
        .ordering(plan.engine_ordering())
        .capacity(plan.capacity)
        .retry(plan.retry())
        .on_failure(match plan.on_failure {
            FailurePolicy::Skip => OnFailure::Skip,
            FailurePolicy::Pause => OnFailure::Pause,
        })
        .drain_timeout(output.drain_timeout);
    let builder = match plan.rate {
        Some(rate) => builder.rate_limit(rate),
        None => builder,
    };
    let builder = match &plan.journal {
        Some(path) => journal::attach(builder, path, plan.sync)?,
        None => builder,
    };
    let conveyor = Arc::new(
        builder
            .build(sink_fn(plan.target, Arc::clone(&latencies)))
            .map_err(journal::build_error)?,
    );
    let skipped = reader.position();
    if let (Some(path), Input::File(file), 0) = (&plan.journal, &input, skipped) {
        journal::remember_input(path, file)?;
    }
    // Lines a previous run left pending in the journal are delivered first; count them in.
    let backlog = {
        let stats = conveyor.stats();
        stats.queued + stats.in_flight
    };
    let progress = Progress::new(!output.quiet, || {
        input
            .count_lines()
            .map(|n| n.saturating_sub(skipped) + backlog)
    });

    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(ReadCounters::default());
    let _last_words = {
        let counters = Arc::clone(&counters);
        let progress = progress.clone();
        LastWords::set(move || counters.failures.finish_now(&progress))
    };
    {
        let conveyor = Arc::clone(&conveyor);
        let journaled = plan.journal.is_some();
        let stop = Arc::clone(&stop);
        let counters = Arc::clone(&counters);
        let progress = progress.clone();
        thread::Builder::new()
            .name("conveyor-reader".into())
            .spawn(move || {
                let outcome = read_and_submit(
                    &mut reader,
                    &conveyor,
                    journaled,
                    &stop,
                    &counters,
                    rejects,
                    &progress,
                );
                let _ = events_tx.send(Event::InputDone(outcome));
            })
            .map_err(|e| CliError::usage(format!("cannot start the reader thread: {e}")))?;
    }

    let mut read_outcome: Option<ReadOutcome> = None;
    let mut interrupted = false;
    let mut stall = Stall::new(Instant::now());
    loop {
        let event = if read_outcome.is_some() {
            events.try_recv().ok()
        } else {
            match events.recv_timeout(TICK) {
                Ok(event) => Some(event),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    // The signal sender lives in main; its loss is a bug, not a reason to spin.
                    read_outcome.get_or_insert_with(ReadOutcome::default);
                    None
                }
            }
        };
        match event {
            Some(Event::Interrupt) => {
                interrupted = true;
                stop.store(true, AtomicOrdering::SeqCst);
                if !output.quiet {
                    progress.note(&format!(
                        "interrupted: stopped reading; letting the sends in flight finish (at most {}); \
                         the rest {}; a second Ctrl-C or SIGTERM exits now",
                        humantime::format_duration(output.drain_timeout),
                        if plan.journal.is_some() {
                            "stays in the journal for the rerun"
                        } else {
                            "is lost (run without a journal)"
                        }
                    ));
                }
                break;
            }
            Some(Event::InputDone(outcome)) => {
                progress.set_total(counters.accepted.load(AtomicOrdering::Relaxed) + backlog);
                read_outcome = Some(outcome);
            }
            None => {}
        }
        let (stats, settled) = show_progress(&conveyor, &progress, &counters);
        // Under --sync a send waits for its commit while the writer retries, so the reader
        // never sees the journal refuse a line: stop it here, as a refused line would.
        if sync && read_outcome.is_none() {
            if let Some(cause) = conveyor.journal_error() {
                stop.store(true, AtomicOrdering::SeqCst);
                progress.note(&format!(
                    "error: {cause}; stopped reading at line {}: rerun the same command to go \
                     on from there",
                    counters.submitting.load(AtomicOrdering::SeqCst)
                ));
                break;
            }
        }
        // While the journal cannot be written (a full disk), what it has not committed cannot
        // be delivered either (nothing reaches the target before it is on disk): stop, and
        // leave it for the rerun.
        if read_outcome.is_some()
            && (conveyor.flush_timeout(TICK) || conveyor.journal_error().is_some())
        {
            break;
        }
        let submitting = counters.submitting.load(AtomicOrdering::SeqCst);
        if stall.stuck(
            Instant::now(),
            &stats,
            settled,
            submitting,
            read_outcome.is_some(),
        ) {
            if read_outcome.is_none() {
                stop.store(true, AtomicOrdering::SeqCst);
                progress.note(&if input.is_replayable() {
                    format!(
                        "a paused lane fills the queue: stopped reading at line {submitting}; \
                         after `conveyor resume{}`, a rerun reads on from there",
                        journal_option(&plan.journal)
                    )
                } else {
                    format!(
                        "a paused lane fills the queue: stopped reading the stream at line \
                         {submitting}; that line and the rest of the stream are not sent"
                    )
                });
            }
            break;
        }
    }

    let paused_lanes = conveyor.paused();
    let close_within = if interrupted {
        output.drain_timeout
    } else {
        // Everything that can settle has; don't wait on paused lanes.
        TICK
    };
    // Close on a helper thread so the bar keeps moving while an interrupted run drains.
    let report = thread::scope(|scope| {
        let closing = scope.spawn(|| {
            if interrupted {
                // Ctrl-C: finish what is in flight, start nothing more.
                conveyor.stop_timeout(close_within)
            } else {
                conveyor.close_timeout(close_within)
            }
        });
        while !closing.is_finished() {
            show_progress(&conveyor, &progress, &counters);
            thread::sleep(CLOSE_POLL);
        }
        closing.join()
    })
    .map_err(|_| CliError::usage("closing the conveyor panicked; please report this bug"))?;
    counters.failures.finish(&progress);
    progress.finish();
    // The close woke a reader waiting for room; let it finish, so its counts are final.
    let read_outcome = read_outcome
        .or_else(|| wait_for_reader(events))
        .unwrap_or_default();
    if let Some(error) = &read_outcome.error {
        progress.note(&format!("error: {error}"));
    }

    // After the close: whether the journal's last commit failed too. Then what it says was left
    // is not what is left: lines delivered meanwhile are still pending in it.
    let journal_error = conveyor.journal_error().map(|e| e.to_string());
    // Then the journal holds less than what was left: the lines read after its last commit are
    // in none. Said as `conveyor status` would say it (nothing is said if it cannot be read).
    // Read once, for that and for the causes of the paused lanes (see `paused_by`).
    let journal_failed = journal_error.is_some() || read_outcome.journal_failed;
    let status = plan
        .journal
        .as_deref()
        .filter(|_| journal_failed || !paused_lanes.is_empty())
        .and_then(|path| conveyor::Journal::open_read_only(path).ok())
        .and_then(|journal| journal.status().ok());
    let recorded = status
        .as_ref()
        .filter(|_| journal_failed)
        .map(|status| Recorded {
            pending: status.pending,
            input_position: status.cursor.unwrap_or(0),
        });
    let stats = report.stats;
    // Lines an earlier run left in the journal have no receipt here to report their failure as
    // it happens (nor has one that cannot even be read back as a line): say so once.
    let earlier = stats
        .failed
        .saturating_sub(counters.failed_noted.load(AtomicOrdering::Relaxed));
    if earlier > 0 {
        progress.note(&format!(
            "{earlier} line(s) left in the journal by an earlier run failed: `conveyor dead \
             list{}` shows them and why",
            journal_option(&plan.journal)
        ));
    }
    let rejected = counters.rejected.load(AtomicOrdering::Relaxed);
    let elapsed = started.elapsed();
    let exit_code = if interrupted
        || !paused_lanes.is_empty()
        || report.left > 0
        || read_outcome.journal_failed
        || journal_error.is_some()
    {
        exit::INTERRUPTED
    } else if read_outcome.error.is_some() {
        exit::USAGE
    } else if stats.failed > 0 || stats.dropped > 0 || rejected > 0 {
        exit::SOME_FAILED
    } else {
        exit::OK
    };
    let percentiles = latencies.percentiles();
    let summary = Summary {
        target: target_name,
        ordering: ordering_name,
        accepted: counters.accepted.load(AtomicOrdering::Relaxed),
        delivered: stats.delivered,
        failed: stats.failed,
        retried: stats.retried,
        rejected,
        left: report.left,
        resumed_after_line: skipped,
        elapsed_secs: elapsed.as_secs_f64(),
        items_per_sec: stats.delivered as f64 / elapsed.as_secs_f64().max(1e-9),
        submit_secs: read_outcome.submit_elapsed.as_secs_f64(),
        latency_p50_ms: percentiles.map(|(p50, _)| millis(p50)),
        latency_p99_ms: percentiles.map(|(_, p99)| millis(p99)),
        interrupted,
        paused_by: paused_by(status.filter(|_| !paused_lanes.is_empty())),
        paused_lanes,
        journal: plan.journal.as_ref().map(|p| p.display().to_string()),
        journal_option: journal_option(&plan.journal),
        stream: !input.is_replayable(),
        journal_error,
        recorded,
        exit_code,
    };
    if output.json {
        print_out(&summary.json()).map_err(CliError::io)?;
    } else if !output.quiet {
        print_out(&summary.human()).map_err(CliError::io)?;
    }
    Ok(summary)
}

/// The error that paused each lane, as the journal's `status` recorded it (none if it could
/// not be read: the summary then names the lanes without it).
fn paused_by(status: Option<conveyor::JournalStatus>) -> BTreeMap<String, String> {
    status.map_or_else(BTreeMap::new, |status| {
        let lanes = status.lanes.into_iter();
        lanes.filter_map(|l| Some((l.lane, l.paused?))).collect()
    })
}

/// What the journal commands named in hints need to find the run's journal (see
/// [`ops::journal_option`]); nothing without one.
fn journal_option(journal: &Option<PathBuf>) -> String {
    journal
        .as_deref()
        .map(ops::journal_option)
        .unwrap_or_default()
}

/// Tells when a run can make no more progress because of a paused lane. Such a lane never
/// drains by itself, and once the queue is full of its lines the reader waits for room that
/// never comes. Once nothing moves for [`PAUSED_STALL`] (no settlement, nothing in flight, the
/// reader done or stuck on one line), the run stops waiting. Not before: in keyed mode the
/// other keys go on, and a reader waiting on stdin may bring lines for them.
struct Stall {
    /// What moves while the run makes progress: settlements, and the line being submitted.
    mark: (u64, u64),
    since: Instant,
}

impl Stall {
    fn new(now: Instant) -> Self {
        Self {
            mark: (u64::MAX, u64::MAX),
            since: now,
        }
    }

    /// `submitting` is the line the reader is handing over (0 between lines).
    fn stuck(
        &mut self,
        now: Instant,
        stats: &Stats,
        settled: u64,
        submitting: u64,
        read_all: bool,
    ) -> bool {
        let mark = (settled, submitting);
        let reader_waits = read_all || submitting != 0;
        if stats.paused == 0 || stats.in_flight > 0 || !reader_waits || mark != self.mark {
            self.mark = mark;
            self.since = now;
            return false;
        }
        now.duration_since(self.since) >= PAUSED_STALL
    }
}

/// The reader's outcome, if it ends within [`READER_GRACE`]; later signals are ignored, since the
/// run is ending anyway (a second Ctrl-C still exits at once).
fn wait_for_reader(events: &Receiver<Event>) -> Option<ReadOutcome> {
    let deadline = Instant::now() + READER_GRACE;
    loop {
        match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Event::InputDone(outcome)) => return Some(outcome),
            Ok(Event::Interrupt) => {}
            Err(_) => return None,
        }
    }
}

/// Refreshes the bar from the engine's counters; returns them and the settled count.
fn show_progress(
    conveyor: &Conveyor<Line>,
    progress: &Progress,
    counters: &ReadCounters,
) -> (Stats, u64) {
    counters.failures.tick(progress);
    let stats = conveyor.stats();
    let settled = stats.delivered + stats.failed + stats.dropped;
    progress.update(
        settled,
        stats.failed,
        stats.retried,
        counters.rejected.load(AtomicOrdering::Relaxed),
    );
    (stats, settled)
}

/// The reader thread: every line is submitted, rejected or skipped; nothing stops the loop but
/// the end of input, an unreadable input, an interrupt, or a closed conveyor.
fn read_and_submit(
    reader: &mut Reader,
    conveyor: &Conveyor<Line>,
    journaled: bool,
    stop: &AtomicBool,
    counters: &Arc<ReadCounters>,
    // Dropped when the input fails within an overlong line: that cuts off the part copied.
    mut rejects: Option<Rejects>,
    progress: &Progress,
) -> ReadOutcome {
    let started = Instant::now();
    let mut error = None;
    let mut journal_failed = false;
    while !stop.load(AtomicOrdering::Relaxed) {
        // An overlong line's bytes are copied as they are read, never held whole.
        let parsed = match reader
            .next_line(&mut |bytes| copy_rejected(&mut rejects, progress, |file| file.part(bytes)))
        {
            Ok(Some(parsed)) => parsed,
            Ok(None) => break,
            Err(e) => {
                error = Some(format!(
                    "cannot read input after line {}: {e}",
                    reader.position()
                ));
                break;
            }
        };
        // Whether this line is done with without an item in the journal to carry its position.
        let mut skipped = !matches!(parsed, Parsed::Item { .. });
        match parsed {
            Parsed::Blank => {}
            Parsed::Rejected { line, raw, reason } => {
                reject(counters, progress, &mut rejects, line, &raw, &reason);
            }
            Parsed::Overlong { line, size } => {
                // Its bytes are in the rejects file already: this ends its line there.
                let reason = overlong_reason(size, MAX_LINE);
                reject(counters, progress, &mut rejects, line, &[], &reason);
            }
            Parsed::Item { line, key } => {
                let number = line.line;
                // With a journal the position after this line is committed with the line
                // itself: a crash never leaves the line journaled and the position before it
                // (a rerun would send it twice, under two idempotency keys).
                let after = reader.position();
                counters.submitting.store(number, AtomicOrdering::SeqCst);
                let sent = match (key, journaled) {
                    (Some(key), true) => conveyor.send_keyed_and_set_cursor(key, line, after),
                    (None, true) => conveyor.send_and_set_cursor(line, after),
                    (Some(key), false) => conveyor.send_keyed(key, line),
                    (None, false) => conveyor.send(line),
                };
                counters.submitting.store(0, AtomicOrdering::SeqCst);
                match sent {
                    Ok(receipt) => {
                        counters.accepted.fetch_add(1, AtomicOrdering::Relaxed);
                        let progress = progress.clone();
                        let counters = Arc::clone(counters);
                        receipt.on_settled(move |result| {
                            if let Err(DeliveryError::Failed { attempts, error }) = result {
                                counters.failed_noted.fetch_add(1, AtomicOrdering::Relaxed);
                                counters.failures.failed(
                                    &progress,
                                    number,
                                    attempts,
                                    &error.to_string(),
                                );
                            }
                        });
                    }
                    // Closed: the run is shutting down; what was not accepted is not lost, it
                    // is simply not read (the journal's position says where to resume).
                    Err(SendError::Closed(_)) => break,
                    // No journal can ever store it: bad input, like a line that is not JSON.
                    // Lines within `MAX_LINE` always fit SQLite's usual limit; this is for a
                    // SQLite built with a lower one.
                    Err(SendError::TooLarge { item, size, limit }) => {
                        let reason = format!(
                            "{size} bytes, more than the {limit} a journal entry may take: split \
                             it, or send it with --no-journal"
                        );
                        reject(
                            counters,
                            progress,
                            &mut rejects,
                            number,
                            item.body.as_bytes(),
                            &reason,
                        );
                        skipped = true;
                    }
                    // Anything else (the journal cannot store the line: a full disk): stop before
                    // the input position moves past it. A rerun starts after the position the
                    // journal last committed: this very line under --sync, maybe an earlier one
                    // otherwise (lines accepted since that commit are in no journal).
                    Err(_) => {
                        let cause = conveyor.journal_error().map_or_else(
                            || "the journal could not be written".to_owned(),
                            |e| e.to_string(),
                        );
                        error = Some(format!(
                            "line {number} was not accepted: {cause}; stopped reading: rerun \
                             the same command to go on after the last line the journal \
                             recorded (`conveyor status` shows which)"
                        ));
                        journal_failed = true;
                        break;
                    }
                }
            }
        }
        if journaled && skipped {
            // Committed with the items accepted before it: a rerun starts after this line.
            match journal::set_cursor(conveyor, reader.position()) {
                Ok(true) => {}
                // Shutting down, as for `SendError::Closed` above.
                Ok(false) => break,
                Err(e) => {
                    error = Some(format!("cannot record the input position: {e}"));
                    break;
                }
            }
        }
    }
    ReadOutcome {
        error,
        journal_failed,
        submit_elapsed: started.elapsed(),
    }
}

/// Counts a bad line, reports it, and copies it to `--rejects FILE` (none after a failed write).
fn reject(
    counters: &ReadCounters,
    progress: &Progress,
    rejects: &mut Option<Rejects>,
    line: u64,
    raw: &[u8],
    reason: &str,
) {
    counters.rejected.fetch_add(1, AtomicOrdering::Relaxed);
    copy_rejected(rejects, progress, |file| file.end_line(raw));
    progress.note(&format!("line {line}: rejected: {reason}"));
}

/// Copies to `--rejects FILE` with `write`, if given (and no write to it failed before).
fn copy_rejected(
    rejects: &mut Option<Rejects>,
    progress: &Progress,
    write: impl FnOnce(&mut Rejects) -> io::Result<()>,
) {
    if let Some(file) = rejects {
        if let Err(e) = write(file) {
            progress.note(&format!(
                "cannot write to the rejects file: {e}; it keeps the lines copied before, and \
                 no more are copied in this run"
            ));
            *rejects = None;
        }
    }
}

/// What a second signal reports before it exits at once: the failures of the running `send`
/// held back as repeats of the one before them. Without a journal their note is the only record
/// of which lines failed. Set for the length of a run by [`LastWords`].
static LAST_WORDS: Mutex<Option<Box<dyn Fn() + Send>>> = Mutex::new(None);

/// Keeps a [`LAST_WORDS`] report in place while it lives.
struct LastWords;

impl LastWords {
    fn set(report: impl Fn() + Send + 'static) -> Self {
        *LAST_WORDS.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::new(report));
        LastWords
    }
}

impl Drop for LastWords {
    fn drop(&mut self) {
        *LAST_WORDS.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// Installs the Ctrl-C / SIGTERM handler: the first signal becomes an [`Event::Interrupt`], the
/// second exits at once (the journal is crash-safe, so nothing accepted is lost), after saying
/// which failed lines were not reported yet.
pub(crate) fn install_signals(events: Sender<Event>) -> Result<(), CliError> {
    let count = AtomicU64::new(0);
    ctrlc::set_handler(move || {
        if count.fetch_add(1, AtomicOrdering::SeqCst) == 0 {
            let _ = events.send(Event::Interrupt);
        } else {
            // Not waited for: whoever holds it reports the failures itself.
            if let Ok(words) = LAST_WORDS.try_lock() {
                if let Some(report) = words.as_ref() {
                    report();
                }
            }
            let _ = writeln!(io::stderr(), "interrupted again: exiting now");
            crate::sink::stop_running_programs();
            std::process::exit(i32::from(exit::ABORTED));
        }
    })
    .map_err(|e| CliError::usage(format!("cannot install the Ctrl-C handler: {e}")))
}

/// A channel for [`Event`]s with the signal handler attached.
pub(crate) fn events() -> Result<(Sender<Event>, Receiver<Event>), CliError> {
    let (tx, rx) = mpsc::channel();
    install_signals(tx.clone())?;
    Ok((tx, rx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor::Journal;

    #[test]
    fn a_run_is_stuck_only_when_a_paused_lane_holds_everything_still() {
        let start = Instant::now();
        let later = start + PAUSED_STALL;
        let mut paused = Stats::default();
        paused.paused = 1;
        // Reader done, nothing moving, a lane paused: stuck once the stall has lasted.
        let mut stall = Stall::new(start);
        assert!(!stall.stuck(start, &paused, 5, 0, true));
        assert!(stall.stuck(later, &paused, 5, 0, true));
        // The reader blocked on one line (a full queue) counts as still.
        let mut stall = Stall::new(start);
        assert!(!stall.stuck(start, &paused, 5, 9, false));
        assert!(stall.stuck(later, &paused, 5, 9, false));
        // Each of these is progress, or may bring some: never stuck.
        let mut stall = Stall::new(start);
        assert!(!stall.stuck(start, &paused, 5, 0, false), "reading stdin");
        assert!(!stall.stuck(later, &paused, 5, 0, false), "reading stdin");
        let mut in_flight = paused;
        in_flight.in_flight = 1;
        assert!(
            !stall.stuck(later, &in_flight, 5, 0, true),
            "a call running"
        );
        assert!(
            !stall.stuck(later, &Stats::default(), 5, 0, true),
            "no lane paused"
        );
        let mut stall = Stall::new(start);
        assert!(!stall.stuck(start, &paused, 5, 9, false));
        assert!(!stall.stuck(later, &paused, 6, 9, false), "an item settled");
        assert!(
            !stall.stuck(later + PAUSED_STALL / 2, &paused, 6, 10, false),
            "a new line"
        );
    }

    /// The default journal for `in.jsonl` and `--to URL` in `dir`.
    fn default_for(dir: &Path, url: &str, keyed: bool) -> PathBuf {
        let input = Input::File("in.jsonl".into());
        default_journal_path(dir, &input, &Some(url.into()), &[], keyed)
    }

    #[test]
    fn default_journal_depends_on_input_target_and_kind_of_ordering() {
        let dir = Path::new(journal::JOURNAL_DIR);
        let a = default_for(dir, "http://a/", false);
        assert_ne!(a, default_for(dir, "http://b/", false));
        assert_eq!(a, default_for(dir, "http://a/", false));
        // The strict name is the one earlier versions gave every run: an upgrade finds it.
        assert_eq!(a, dir.join("in-2bd7251a11037ebe.journal"));
        let keyed = default_for(dir, "http://a/", true);
        assert_ne!(a, keyed, "keyed and strict runs keep separate journals");
        assert!(
            keyed.to_string_lossy().contains("in-keyed-"),
            "{}",
            keyed.display()
        );
    }

    #[test]
    fn a_keyed_journal_kept_under_the_old_name_is_found_after_an_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let old = default_for(dir.path(), "http://a/", false);
        // An earlier version's keyed run, stopped with a line pending in lane "u1".
        let (gate, stalled) = mpsc::channel::<()>();
        let stalled = std::sync::Mutex::new(stalled);
        let c: Conveyor<Line> = Conveyor::builder()
            .journal(&old)
            .ordering(Ordering::Keyed { concurrency: 1 })
            .drain_timeout(Duration::ZERO)
            .build(move |_d| {
                let _ = stalled.lock().unwrap().recv();
                Ok(())
            })
            .unwrap();
        let line = Line {
            line: 1,
            body: "{}".into(),
        };
        c.send_keyed("u1", line).unwrap();
        drop(c);
        drop(gate);
        assert_eq!(default_for(dir.path(), "http://a/", true), old);
        assert_eq!(default_for(dir.path(), "http://a/", false), old);
        // Another input's strict journal is not taken for a keyed one.
        let other = Input::File("other.jsonl".into());
        let strict = default_journal_path(dir.path(), &other, &None, &[], false);
        Journal::open(&strict).unwrap();
        let keyed = default_journal_path(dir.path(), &other, &None, &[], true);
        assert_ne!(keyed, strict);
    }

    #[test]
    fn lines_are_counted_for_progress() {
        assert_eq!(Input::Memory(b"{}\n{}\n".to_vec()).count_lines(), Some(2));
        assert_eq!(Input::Stdin.count_lines(), None);
    }

    /// Makes a named pipe `dir/name` and writes `text` into it from a thread of its own (the
    /// write waits for a reader).
    fn pipe_with(dir: &Path, name: &str, text: &'static str) -> PathBuf {
        let path = dir.join(name);
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        let writer = path.clone();
        thread::spawn(move || std::fs::write(writer, text));
        path
    }

    #[test]
    fn a_named_pipe_is_a_stream_never_counted_nor_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let pipe = pipe_with(dir.path(), "fifo", "{}\n{}\n");
        let input = Input::from_arg(pipe.to_str().unwrap());
        // Counting for the bar would read the lines out of the pipe, leaving none to send.
        assert_eq!(input.count_lines(), None);
        assert!(!input.is_replayable());
        let mut reader = LineReader::new(input.open(true).unwrap(), None);
        for _ in 0..2 {
            let line = reader.next_line(&mut |_| panic!("not overlong"));
            assert!(matches!(line, Ok(Some(Parsed::Item { .. }))));
        }
        // A regular file stays one.
        let file = dir.path().join("in.jsonl");
        std::fs::write(&file, "{}\n").unwrap();
        let input = Input::from_arg(file.to_str().unwrap());
        assert_eq!(input.count_lines(), Some(1));
        assert!(input.is_replayable());
    }
}
