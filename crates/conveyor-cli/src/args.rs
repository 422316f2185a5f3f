//! Command-line arguments. The doc comments are the `--help` text.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The exit codes' help, a literal for `concat!`.
macro_rules! exit_codes_help {
    () => {
        "\
Exit codes:
  0    every line was delivered
  1    some lines failed (see `conveyor dead list` with a journal) or were rejected as bad input
  2    usage or configuration error, or the input could not be read
  3    stopped with work left: interrupted (Ctrl-C, SIGTERM), a lane paused, or the journal could
       not be written (a full disk); rerun the same command to resume from the journal, after
       `conveyor resume KEY` for a paused lane or freeing space
  130  a second Ctrl-C: exited at once, the journal intact"
    };
}

/// Exit codes, shown at the end of `conveyor --help`.
pub(crate) const EXIT_CODES_HELP: &str = exit_codes_help!();

/// `send --help`'s examples, then the exit codes. A test parses each example, so that none
/// goes stale when an option changes.
const SEND_LONG_AFTER_HELP: &str = concat!(
    "\
Examples:
  conveyor send events.jsonl --to https://api.example.com/events -H 'Authorization: Bearer TOKEN'
  producer | conveyor send - --to http://127.0.0.1:8080/ingest --ordering keyed:16 --key user
  conveyor send events.jsonl --to http://127.0.0.1:8080/ --rate 20/s --rejects rejected.jsonl
  conveyor send jobs.jsonl --retries 2 --exec ./handle-one.sh --verbose    # --exec comes last
  conveyor status                      # then `conveyor dead list`, `conveyor resume KEY`

",
    // `concat!` takes literals only: the exit codes are spelled out once, in this macro.
    exit_codes_help!()
);

/// Deliver JSON lines in order to an HTTP endpoint or a program, resumably, with progress.
///
/// Start with `conveyor demo`, then e.g.
/// `conveyor send events.jsonl --to https://api.example.com/events --header 'Authorization: Bearer …'`.
#[derive(Debug, Parser)]
#[command(name = "conveyor", version, after_help = EXIT_CODES_HELP)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Send JSON lines from a file or stdin, one HTTP request (or program run) per line.
    #[command(
        after_help = EXIT_CODES_HELP,
        after_long_help = SEND_LONG_AFTER_HELP,
        override_usage = SEND_USAGE,
        mut_arg("json", |a| a.long_help(JSON_SEND_HELP))
    )]
    Send(Box<SendArgs>),
    /// Run a local demo: an embedded 50 ms HTTP service receives generated items in order.
    Demo(DemoArgs),
    /// Show what a journal holds (also during a send): pending per lane, paused lanes, dead letters.
    #[command(mut_arg("json", |a| a.help(JSON_STATUS_HELP)))]
    Status(JournalOpts),
    /// List, retry or discard lines that failed for good (dead letters, kept in the journal).
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Resume a paused lane, then rerun the `send` command to deliver what it holds.
    #[command(override_usage = RESUME_USAGE, mut_arg("json", |a| a.help(JSON_RESUME_HELP)))]
    Resume(ResumeArgs),
}

// The usage lines of the commands with an optional positional, as clap writes them for --help.
// In an error, clap shows a positional that was given as if it were required (`<INPUT>`), so the
// usage line would contradict the help's `[INPUT]`; a test checks these against clap's own.
const SEND_USAGE: &str = "conveyor send [OPTIONS] <--to <URL>|--exec <PROGRAM>...> [INPUT]";
const RESUME_USAGE: &str = "conveyor resume [OPTIONS] [KEY]";

/// Which journal an operating command works on.
#[derive(Debug, Args)]
pub(crate) struct JournalOpts {
    /// The journal file (default: the only journal under ./.conveyor/).
    #[arg(long, value_name = "PATH")]
    pub(crate) journal: Option<PathBuf>,

    /// Print JSON instead of text.
    // Each command says what it prints (the `JSON_*_HELP`s below): their outputs differ.
    #[arg(long)]
    pub(crate) json: bool,
}

/// What `--json` prints, for each command that operates on a journal.
const JSON_STATUS_HELP: &str = "Print one JSON object instead of text: pending per lane, paused \
     lanes, dead letters, size, in_use and in_use_by (a send's PID).";
const JSON_DEAD_LIST_HELP: &str =
    "Print one JSON object a line instead of text, one per dead letter, with the original body.";
const JSON_RETRY_HELP: &str =
    "Print {\"retried\": [SEQ, …], \"new_seqs\": [SEQ, …]} instead of text; new_seqs gives each its \
     new SEQ, in the same order.";
const JSON_DISCARD_HELP: &str = "Print {\"discarded\": [SEQ, …]} instead of text.";
const JSON_RESUME_HELP: &str =
    "Print {\"resumed\": \"KEY\"} instead of text (KEY is \"\" for strict and pipelined).";

/// The `--json` long help of `dead retry` and `dead discard`: their short `help`, then what the
/// object holds when an error stops them part way (`done`: `retried` or `discarded`, the word
/// its keys use).
fn json_stopped_part_way_help(help: &str, done: &str) -> String {
    format!(
        "{help}\n\nOn an error part way (a full disk), those {done} until then stay {done}: the \
         object lists them, adds \"not_{done}\": [SEQ, …] and \"error\", and the exit code is 2."
    )
}

#[derive(Debug, Subcommand)]
pub(crate) enum DeadCommand {
    /// List dead letters, oldest first (also during a send).
    #[command(mut_arg("json", |a| a.help(JSON_DEAD_LIST_HELP)))]
    List(JournalOpts),
    /// Put dead letters back at the end of their lane; the next `send` run delivers them.
    ///
    /// Each is retried in a commit of its own, in seq order. On an error part way (a full disk),
    /// those done stay done and are listed with the ones left; exit code 2, and running it again
    /// with --all retries the rest.
    #[command(mut_arg("json", |a| {
        a.help(JSON_RETRY_HELP)
            .long_help(json_stopped_part_way_help(JSON_RETRY_HELP, "retried"))
    }))]
    Retry(DeadTarget),
    /// Delete dead letters for good.
    ///
    /// Each is discarded in a commit of its own, in seq order. On an error part way (a full
    /// disk), those done stay done and are listed with the ones left; exit code 2, and running it
    /// again with --all discards the rest.
    #[command(mut_arg("json", |a| {
        a.help(JSON_DISCARD_HELP)
            .long_help(json_stopped_part_way_help(JSON_DISCARD_HELP, "discarded"))
    }))]
    Discard(DeadTarget),
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["seq", "all"]))]
pub(crate) struct DeadTarget {
    /// The dead letter's SEQ, as `conveyor dead list` shows it.
    pub(crate) seq: Option<u64>,

    /// Every dead letter.
    #[arg(long)]
    pub(crate) all: bool,

    #[command(flatten)]
    pub(crate) journal: JournalOpts,
}

#[derive(Debug, Args)]
pub(crate) struct ResumeArgs {
    /// The paused lane: the key in keyed mode; omit it for strict and pipelined (one lane).
    #[arg(default_value = "")]
    pub(crate) key: String,

    #[command(flatten)]
    pub(crate) journal: JournalOpts,
}

/// How items are ordered, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OrderingArg {
    /// One at a time, in input order.
    Strict,
    /// Started in input order, up to N at once.
    Pipelined(usize),
    /// In order within a key, up to N keys at once.
    Keyed(usize),
}

impl std::fmt::Display for OrderingArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Strict => f.write_str("strict"),
            Self::Pipelined(n) => write!(f, "pipelined:{n}"),
            Self::Keyed(n) => write!(f, "keyed:{n}"),
        }
    }
}

/// Parses `strict`, `pipelined:N` or `keyed:N`.
pub(crate) fn parse_ordering(text: &str) -> Result<OrderingArg, String> {
    let usage = "expected `strict`, `pipelined:N` or `keyed:N` (N at least 1)";
    let (mode, n) = match text.split_once(':') {
        Some((mode, n)) => (
            mode,
            Some(
                n.parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("`{n}` is not a positive number: {usage}"))?,
            ),
        ),
        None => (text, None),
    };
    match (mode, n) {
        ("strict", None) => Ok(OrderingArg::Strict),
        ("pipelined", Some(n)) => Ok(OrderingArg::Pipelined(n)),
        ("keyed", Some(n)) => Ok(OrderingArg::Keyed(n)),
        ("pipelined" | "keyed", None) => Err(format!("`{text}` needs a number: {usage}")),
        _ => Err(usage.to_owned()),
    }
}

/// Parses `20/s` or `20` into calls per second.
pub(crate) fn parse_rate(text: &str) -> Result<u32, String> {
    let number = text.strip_suffix("/s").unwrap_or(text);
    number
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("`{text}` is not a rate: expected requests per second like `20/s`"))
}

/// Parses `100ms`, `2s`, `1m 30s`.
///
/// A duration longer than a century (`--timeout 1000000000000y`, a way of saying "no limit")
/// counts as a century: the clock cannot hold some of them, and a deadline that far would
/// overflow.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map(|duration| duration.min(CENTURY))
        .map_err(|e| format!("`{text}` is not a duration ({e}): expected e.g. `250ms`, `2s`, `1m`"))
}

/// The longest duration the CLI passes on (see [`parse_duration`]).
const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses `--timeout`: a duration, but not zero, which would fail every request (or program
/// run) at once.
pub(crate) fn parse_timeout(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        zero if zero.is_zero() => Err(format!(
            "`{text}` leaves no time: every request would time out at once; give e.g. `30s`"
        )),
        timeout => Ok(timeout),
    }
}

/// Parses `Name: value`. The value is a secret: never echo it in errors.
pub(crate) fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once(':') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err("a header must look like `Name: value`".to_owned()),
    }
}

/// The arguments after `--exec PROGRAM` that are spelled like one of `send`'s own long options
/// (`--ordering`, `--key=user`): they belong to the program, which is easy to forget when adding
/// an option at the end of a command line, and then the run silently goes without it.
pub(crate) fn send_options_given_to_program(exec: &[String]) -> Vec<String> {
    use clap::CommandFactory;
    let cli = Cli::command();
    let Some(send) = cli.find_subcommand("send") else {
        return Vec::new();
    };
    let ours: Vec<&str> = send
        .get_arguments()
        .filter_map(clap::Arg::get_long)
        .filter(|&long| long != "help")
        .collect();
    exec.iter()
        .skip(1)
        .filter_map(|arg| {
            let name = arg.strip_prefix("--")?;
            let name = name.split_once('=').map_or(name, |(name, _)| name);
            ours.contains(&name).then(|| format!("--{name}"))
        })
        .collect()
}

/// What to tell someone whose run reads stdin from a terminal: it waits for typed lines, which
/// looks like a hang when INPUT was meant to be a file but was put after `--exec PROGRAM`, where
/// it became the program's argument.
pub(crate) fn terminal_stdin_note(exec: &[String]) -> String {
    let mut note = "conveyor: reading JSON lines from the terminal; type them, then Ctrl-D to \
                    end the input"
        .to_owned();
    let file = exec
        .iter()
        .skip(1)
        .find(|arg| !arg.starts_with('-') && std::path::Path::new(arg).is_file());
    if let Some(file) = file {
        note.push_str(&format!(
            ". `{file}` comes after --exec, so it is the program's argument, not conveyor's \
             INPUT; put INPUT before --exec PROGRAM"
        ));
    }
    note
}

/// What to do with an item that failed all its attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum FailurePolicy {
    /// Record the failure (a dead letter with a journal) and go on with the next line.
    Skip,
    /// Stop the item's lane until `conveyor resume KEY`; needs the journal. Other keys go on;
    /// once nothing else can move (the queue holds only paused lines), the run stops reading
    /// and exits 3, and after `conveyor resume` a rerun goes on where it stopped.
    Pause,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("target").required(true).args(["to", "exec"]))]
pub(crate) struct SendArgs {
    /// JSON-lines input: a file, or `-` for stdin.
    ///
    /// Stdin, a named pipe or `<(producer)` is streamed (delivery starts before the input ends) and read once: a rerun delivers what its
    /// journal holds, then reads the new stream from its start. A line may be up to 128 MiB
    /// (134217728 bytes, without its line ending); a longer one is bad input, like a line that
    /// is not JSON: reported with its line number, counted, copied to --rejects, and the run
    /// goes on.
    #[arg(default_value = "-")]
    pub(crate) input: String,

    /// Send each line as the body of an HTTP request to this URL.
    ///
    /// 2xx is success. Connection errors, timeouts, 408, 425, 429 and 5xx but 501 and 505 are
    /// retried (up to --retries, honouring Retry-After); any other status (4xx, 501, 505, and
    /// 3xx: redirects are not followed) fails the line at once.
    #[arg(long, value_name = "URL")]
    pub(crate) to: Option<String>,

    /// Run PROGRAM [ARGS...] per line (no shell), the line on its stdin; must come last.
    ///
    /// Exit 0 is success, 75 (EX_TEMPFAIL) is retried, anything else fails the line. Everything
    /// after --exec PROGRAM belongs to the program, conveyor's own options included
    /// (`--exec ./p --json` gives `--json` to ./p). The program also gets CONVEYOR_SEQ,
    /// CONVEYOR_LINE, CONVEYOR_ATTEMPT, CONVEYOR_IDEMPOTENCY_KEY and, when keyed, CONVEYOR_KEY in
    /// its environment. Its stdout is passed through (to stderr under --json); its stderr is
    /// shown only to explain a failure. --timeout kills it and whatever it started. It runs in
    /// its own process group: Ctrl-C stops conveyor, not the program, which may finish within
    /// --drain-timeout. Killed by SIGTERM, SIGKILL, SIGINT or SIGHUP, it is retried; by another
    /// signal (a crash), the line fails.
    #[arg(long, value_name = "PROGRAM", num_args = 1.., allow_hyphen_values = true, conflicts_with = "to")]
    pub(crate) exec: Vec<String>,

    /// An HTTP header for every request, `Name: value` (repeatable).
    ///
    /// Values are never printed, and in server text quoted in errors each value, and each word of one, of 6 characters or
    /// more is replaced with <redacted>.
    /// `Idempotency-Key` and the `Conveyor-*` headers are set per line and cannot be given.
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE", value_parser = parse_header)]
    pub(crate) headers: Vec<(String, String)>,

    /// The HTTP method (default: POST); only for --to.
    #[arg(long)]
    pub(crate) method: Option<String>,

    /// Also trust the certificate authorities in this PEM file, for an https --to URL.
    ///
    /// For a server whose certificate a private (company) CA signed. The file holds one or more
    /// `-----BEGIN CERTIFICATE-----` blocks. The built-in roots (Mozilla's) stay trusted.
    #[arg(long, value_name = "FILE")]
    pub(crate) cacert: Option<std::path::PathBuf>,

    /// Time limit for one request (or one program run), above zero; running out is retried.
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    pub(crate) timeout: Duration,

    /// `strict` (one at a time, in order), `pipelined:N` (started in order, N at once) or
    /// `keyed:N` (in order per `--key`, N keys at once).
    #[arg(long, default_value = "strict", value_parser = parse_ordering)]
    pub(crate) ordering: OrderingArg,

    /// The field that names a line's lane for `--ordering keyed:N`.
    ///
    /// A top-level field name (`user`) or a JSON pointer (`/user/id`). Lines without it are
    /// rejected. Its value is sent
    /// as the Conveyor-Key header, percent-encoded: bytes that are not visible ASCII, and `%`,
    /// become `%XX` (`a b` is sent as `a%20b`).
    #[arg(long, value_name = "FIELD")]
    pub(crate) key: Option<String>,

    /// Retries after the first attempt of a line.
    #[arg(long, default_value_t = 5)]
    pub(crate) retries: u32,

    /// First wait before a retry; doubles each time (at most 30 s).
    ///
    /// Each wait is jittered between half and all of it. A server's Retry-After wins when longer, up to an hour (or up to
    /// --backoff, when that is longer): a server asking for days holds its lane for an hour.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    pub(crate) backoff: Duration,

    /// At most N requests started per second, e.g. `20/s`.
    #[arg(long, value_name = "N/s", value_parser = parse_rate)]
    pub(crate) rate: Option<u32>,

    /// What to do with a line that failed all its attempts.
    #[arg(long, value_enum, default_value = "skip")]
    pub(crate) on_failure: FailurePolicy,

    /// How many lines may wait in memory; reading pauses while it is full.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) capacity: usize,

    /// Copy lines rejected as bad input (not JSON, no key field, longer than 128 MiB) here.
    ///
    /// A run that reads a file from its first line empties it first; a resumed run (which skips the lines read
    /// before) and a run on stdin or a pipe append, so the rejects of earlier runs are kept. A
    /// file the run reads (the input, the journal) is refused: it would be emptied first.
    ///
    /// Its lines are never glued together: a line whose copy cannot be finished (the input
    /// fails within an overlong line, the disk fills) is cut off; a half line left by a killed
    /// run is ended by the next run (nothing is cut: the file may be your own); a rerun that
    /// reads that line again copies it whole. A bad line is copied when it is read, before the journal records the input position
    /// past it: after a crash, a kill or a journal that could not be written (a full disk), the
    /// rerun reads the last few lines again, and copies the bad ones among them again. Like
    /// deliveries, rejects are at least once: a line may be there twice.
    #[arg(long, value_name = "FILE")]
    pub(crate) rejects: Option<PathBuf>,

    #[command(flatten)]
    pub(crate) journal: JournalArgs,

    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct JournalArgs {
    /// The journal file that makes a rerun resume where this one stopped.
    ///
    /// By default a file under ./.conveyor/ named after the input, the target (the --to URL, or
    /// the --exec program and all its arguments) and whether the ordering is keyed: a rerun that
    /// changes any of them starts a new journal and sends the input from its first line, and
    /// says so when the old journal still holds pending lines (give --journal to keep one
    /// journal across such changes). A rerun reads a file on after the lines taken before, if
    /// it grew since; one that was rewritten or cut short is refused (give it a new journal).
    #[arg(long, value_name = "PATH", conflicts_with = "no_journal")]
    pub(crate) journal: Option<PathBuf>,

    /// Keep everything in memory: nothing to resume after a crash or Ctrl-C.
    #[arg(long)]
    pub(crate) no_journal: bool,

    /// Commit each line to the journal before reading the next (slower).
    ///
    /// Stdin (or a pipe) is then read a line at a time, so a crash loses at most the one line being read or
    /// submitted. By default lines are committed in groups every 5 ms and a stream is read ahead
    /// (64 KiB): after a crash a file input reads those lines again, but the lines read from a
    /// stream and not yet committed (the last 5 ms, and what was read ahead) are lost.
    #[arg(long, conflicts_with = "no_journal")]
    pub(crate) sync: bool,
}

/// `send --json`'s details under --help; `demo` shares the option but has no --exec.
const JSON_SEND_HELP: &str = "Print the summary as one JSON object on stdout, and nothing else \
     there.\n\nThe output of `--exec` programs then goes to stderr.";

#[derive(Debug, Clone, Args)]
pub(crate) struct OutputArgs {
    /// On Ctrl-C or SIGTERM: how long the sends in flight may finish before the exit.
    ///
    /// Nothing new is taken or started after the signal. A second Ctrl-C exits at once.
    // Shared with `demo`, which keeps no journal: what `send` keeps for a rerun is said by
    // --journal, --no-journal and the exit codes.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) drain_timeout: Duration,

    /// Print the summary as one JSON object on stdout, and nothing else there.
    // One paragraph: `demo` has no --exec, and `send` adds its details (see `JSON_SEND_HELP`).
    #[arg(long)]
    pub(crate) json: bool,

    /// No progress bar and no summary (errors are still printed; `--json` still prints).
    #[arg(long, short = 'q')]
    pub(crate) quiet: bool,
}

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// How many items to send (at least 1).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) items: u64,

    /// `strict`, `pipelined:N` or `keyed:N` (items are keyed by their `user` field, 16 users).
    #[arg(long, default_value = "strict", value_parser = parse_ordering)]
    pub(crate) ordering: OrderingArg,

    /// How long the embedded service takes per request.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub(crate) latency: Duration,

    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// `send --help` shows examples, and each one parses as it is written there.
    #[test]
    fn send_help_examples_parse() {
        let mut cli = Cli::command();
        let help = cli.find_subcommand_mut("send").unwrap().render_long_help();
        let help = help.to_string();
        let examples = &help[help.find("Examples:").expect("examples in send --help")..];
        let examples: Vec<&str> = examples
            .lines()
            .skip(1)
            .take_while(|line| !line.is_empty())
            .collect();
        assert!(examples.len() >= 4, "{help}");
        assert!(help.contains("Exit codes:"), "{help}");
        for example in examples {
            let command = &example[example.find("conveyor ").unwrap()..];
            let command = command.split(" #").next().unwrap();
            // Quoted words hold one space at most here: rejoin them.
            let mut words: Vec<String> = Vec::new();
            let mut quoted = false;
            for word in command.split_whitespace() {
                if quoted {
                    let last = words.last_mut().unwrap();
                    last.push(' ');
                    last.push_str(word.trim_end_matches('\''));
                } else {
                    words.push(word.trim_start_matches('\'').to_owned());
                }
                quoted ^= word.matches('\'').count() % 2 == 1;
            }
            assert!(!quoted, "{example}");
            if let Err(e) = Cli::try_parse_from(&words) {
                panic!("`{example}` does not parse: {e}");
            }
        }
    }

    #[test]
    fn send_help_states_the_line_limit() {
        let mut cli = Cli::command();
        let send = cli.find_subcommand_mut("send").unwrap();
        let help = send.render_long_help().to_string();
        let mib = crate::input::MAX_LINE >> 20;
        assert_eq!(mib << 20, crate::input::MAX_LINE);
        assert!(help.contains(&format!("up to {mib} MiB")), "{help}");
        assert!(help.contains(&crate::input::MAX_LINE.to_string()), "{help}");
    }

    /// `demo` shares `send`'s output options, not its --exec: its --help must not describe it.
    #[test]
    fn demo_help_names_no_option_it_does_not_have() {
        let mut cli = Cli::command();
        let demo = cli.find_subcommand_mut("demo").unwrap().render_long_help();
        assert!(!demo.to_string().contains("--exec"), "{demo}");
        let send = cli.find_subcommand_mut("send").unwrap().render_long_help();
        let json = send.to_string();
        let json = &json[json.find("      --json").unwrap()..];
        assert!(
            json[..json.find("  -q").unwrap()].contains("--exec"),
            "{json}"
        );
    }

    /// `-h` is a summary, one short line per option (the details are for `--help`): an
    /// option's first paragraph must stay short.
    #[test]
    fn short_help_is_one_line_per_option() {
        let cli = Cli::command();
        for command in cli.get_subcommands() {
            for arg in command.get_arguments() {
                let short = arg.get_help().map(ToString::to_string).unwrap_or_default();
                assert!(
                    short.len() <= 140,
                    "`{} --{}`: {} characters in -h, put details after a blank line: {short}",
                    command.get_name(),
                    arg.get_id(),
                    short.len()
                );
            }
        }
    }

    /// The journal commands share `--json`, but each prints something else: each one's help
    /// says what it prints, and none describes another's output (`resume --help` used to
    /// describe the lines of `dead list`).
    #[test]
    fn json_help_says_what_each_journal_command_prints() {
        let cli = Cli::command();
        let json_help = |path: &[&str]| {
            let command = path
                .iter()
                .fold(&cli, |command, name| command.find_subcommand(name).unwrap());
            let json = command.get_arguments().find(|a| a.get_id() == "json");
            json.and_then(|a| a.get_help()).unwrap().to_string()
        };
        let prints: [(&[&str], &str); 5] = [
            (&["status"], "one JSON object instead"),
            (&["dead", "list"], "one JSON object a line"),
            (&["dead", "retry"], "{\"retried\""),
            (&["dead", "discard"], "{\"discarded\""),
            (&["resume"], "{\"resumed\""),
        ];
        for (path, _) in prints {
            let help = json_help(path);
            for (other, output) in prints {
                assert_eq!(
                    help.contains(output),
                    other == path,
                    "`{}`'s --json help, about {output:?}: {help}",
                    path.join(" ")
                );
            }
        }
    }

    #[test]
    fn orderings_parse() {
        assert_eq!(parse_ordering("strict"), Ok(OrderingArg::Strict));
        assert_eq!(parse_ordering("pipelined:8"), Ok(OrderingArg::Pipelined(8)));
        assert_eq!(parse_ordering("keyed:16"), Ok(OrderingArg::Keyed(16)));
        for bad in ["keyed", "keyed:0", "keyed:x", "fifo", "strict:2", ""] {
            assert!(parse_ordering(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates_durations_headers_parse() {
        assert_eq!(parse_rate("20/s"), Ok(20));
        assert_eq!(parse_rate("7"), Ok(7));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("fast").is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("500000000000years"), Ok(CENTURY));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_timeout("1ms"), Ok(Duration::from_millis(1)));
        assert!(parse_timeout("0s").unwrap_err().contains("no time"));
        assert_eq!(
            parse_header("Authorization: Bearer a:b"),
            Ok(("Authorization".into(), "Bearer a:b".into()))
        );
        let err = parse_header("no-colon-secret").unwrap_err();
        assert!(!err.contains("secret"));
    }

    #[test]
    fn exec_takes_the_rest_of_the_line() {
        let cli = Cli::try_parse_from([
            "conveyor",
            "send",
            "in.jsonl",
            "--retries",
            "2",
            "--exec",
            "prog",
            "-x",
            "--flag",
        ])
        .unwrap();
        let Command::Send(send) = cli.command else {
            panic!("not send")
        };
        assert_eq!(send.exec, ["prog", "-x", "--flag"]);
        assert_eq!(send.retries, 2);
        assert_eq!(send.input, "in.jsonl");
    }

    #[test]
    fn usage_lines_show_an_optional_input_as_optional() {
        let cases = [
            (&["conveyor", "send", "in.jsonl"][..], "[INPUT]", "<INPUT>"),
            (
                &["conveyor", "resume", "u1", "--bogus"][..],
                "[KEY]",
                "<KEY>",
            ),
        ];
        for (args, optional, required) in cases {
            let error = Cli::try_parse_from(args).unwrap_err().to_string();
            assert!(
                error.contains(optional) && !error.contains(required),
                "{error}"
            );
        }
        // The fixed usage lines are the ones clap writes for --help, kept up to date.
        let mut cli = Cli::command();
        cli.build();
        for name in ["send", "resume"] {
            let fixed = cli.find_subcommand(name).unwrap();
            let generated = fixed.clone().override_usage(None::<&str>);
            assert_eq!(
                fixed.clone().render_usage().to_string(),
                generated.clone().render_usage().to_string()
            );
        }
    }

    #[test]
    fn send_options_after_exec_are_spotted() {
        let exec: Vec<String> = ["./deliver.sh", "--ordering", "keyed:16", "--key=user", "-q"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            send_options_given_to_program(&exec),
            ["--ordering", "--key"]
        );
        // The program's own name and its other options are its business.
        let exec: Vec<String> = ["--json", "--verbose", "--help"].map(String::from).to_vec();
        assert!(send_options_given_to_program(&exec).is_empty());
    }

    #[test]
    fn a_file_after_exec_is_named_when_stdin_is_a_terminal() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        std::fs::write(&input, "{}\n").unwrap();
        let input = input.to_str().unwrap().to_owned();
        let note = terminal_stdin_note(&["./deliver.sh".to_owned(), input.clone()]);
        assert!(note.contains("Ctrl-D"), "{note}");
        assert!(
            note.contains(&format!("`{input}` comes after --exec")),
            "{note}"
        );
        // Options and words that are no file are the program's business.
        let note = terminal_stdin_note(&["./deliver.sh".to_owned(), "--fast".to_owned()]);
        assert!(!note.contains("comes after --exec"), "{note}");
    }
}
