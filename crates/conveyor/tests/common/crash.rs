//! Helpers of the process-level crash tests (`journal_crash*.rs`): a child process, this
//! test binary run again on the same test with `CHILD_DIR` set, works on a journal and logs
//! what it does until the parent kills it with SIGKILL.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use conveyor::Journal;

pub const CHILD_DIR: &str = "CONVEYOR_CRASH_DIR";
pub const CHILD_START: &str = "CONVEYOR_CRASH_START";
pub const CHILD_DRAIN: &str = "CONVEYOR_CRASH_DRAIN";

/// Appends one line with one `write` call on an O_APPEND file: lines from the producer and the
/// sink threads never interleave, and a SIGKILL loses nothing already written.
///
/// A write that crosses a page boundary of the file is copied a page at a time, and a SIGKILL
/// between the two stops it halfway. The line is therefore written after a line break, so that
/// a torn last line never runs into the next child's first one, and ends with `;`, so that
/// `read_log` can tell a torn line from a whole one and drop it.
pub fn log_line(log: &std::fs::File, line: String) {
    let mut out = log;
    out.write_all(format!("\n{};", line.trim_end()).as_bytes())
        .unwrap();
}

/// A small xorshift generator: kill times vary from run to run, and the seed is printed so a
/// failing run can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// Held while the parent has a journal open, and while it spawns a child. The two tests run on
/// parallel threads of one process: a child forked by one test while the other holds its
/// journal's lock inherits the lock's file until it execs (the fd is close-on-exec, but `flock`
/// lasts while any copy is open). Descheduled in between on a busy machine, that child kept the
/// lock held past the parent's close, and the other test's next child found its journal
/// `Locked` by the parent. `Command::spawn` returns only once the child has exec'd.
pub static FORK_GUARD: Mutex<()> = Mutex::new(());

/// Runs `read` on the journal in `dir`, opened and closed with no child being spawned meanwhile
/// (see `FORK_GUARD`).
pub fn with_journal<X>(dir: &Path, read: impl FnOnce(&Journal) -> X) -> X {
    let _no_spawn = FORK_GUARD.lock().unwrap_or_else(PoisonError::into_inner);
    // A local, not a temporary of the tail expression: locals drop in reverse order, so the
    // journal closes before the guard is released (a tail expression's temporaries would
    // outlive it, and a child spawned meanwhile would inherit the journal's lock).
    let journal = Journal::open(dir.join("journal")).unwrap();
    read(&journal)
}

pub fn spawn_child(test: &str, dir: &Path, start: u64, drain: bool) -> std::process::Child {
    let _no_journal_open = FORK_GUARD.lock().unwrap_or_else(PoisonError::into_inner);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .env(CHILD_START, start.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if drain {
        cmd.env(CHILD_DRAIN, "1");
    }
    cmd.spawn().unwrap()
}

/// Reads the child's stdout up to `word`; panics with its stderr if it exits first.
pub fn await_line(child: &mut std::process::Child, word: &str) {
    let mut out = BufReader::new(child.stdout.as_mut().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the child exited before saying {word:?}:\n{err}");
        }
        // libtest prints "test NAME ... " without a newline just before.
        if line.trim().ends_with(word) {
            return;
        }
    }
}

/// A seed for `Rng`: from `CRASH_SEED` to replay a failing run, else from the clock.
pub fn seed() -> u64 {
    std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

/// The whole lines of a log `log_line` wrote, without their `;`. A line torn by a kill (see
/// `log_line`) is dropped: only ever a child's last one, followed by the next child's "r".
pub fn whole_lines(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("log")).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let mut whole = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        match line.strip_suffix(';') {
            Some(line) => whole.push(line.to_owned()),
            None => {
                let next = lines.get(n + 1);
                assert!(
                    next.map_or(true, |next| *next == "r;"),
                    "a damaged log line {line:?} before {next:?}"
                );
            }
        }
    }
    whole
}

/// Runs the child of `test` on `dir` `trials` times, each killed with SIGKILL 5 to
/// `5 + wait_ms` ms after it is ready (unless it finished on its own first), then one child
/// that drains the journal. After each kill, `after_kill(seed)` checks what it can and returns
/// the first item the next child sends. Returns the seed the kill times came from.
pub fn crash_children(
    test: &str,
    dir: &Path,
    trials: usize,
    wait_ms: u64,
    mut after_kill: impl FnMut(u64) -> u64,
) -> u64 {
    let seed = seed();
    let mut rng = Rng(seed);
    let mut next = 0u64;
    for _ in 0..trials {
        let mut c = spawn_child(test, dir, next, false);
        await_line(&mut c, "ready");
        std::thread::sleep(std::time::Duration::from_millis(5 + rng.next(wait_ms)));
        let _ = c.kill(); // SIGKILL
        let status = c.wait().unwrap();
        if status.code().is_some_and(|code| code != 0) {
            let mut err = String::new();
            std::io::Read::read_to_string(c.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the child failed ({status}): {err}; seed {seed}");
        }
        next = after_kill(seed);
    }
    let mut c = spawn_child(test, dir, next, true);
    await_line(&mut c, "done");
    assert!(c.wait().unwrap().success(), "the drain failed; seed {seed}");
    seed
}

/// What a child was started with (see `spawn_child`): the first item to send (or to drain
/// only), and its log, opened for appending.
pub fn child_args(dir: &Path) -> (u64, bool, std::sync::Arc<std::fs::File>) {
    let start: u64 = std::env::var(CHILD_START).unwrap().parse().unwrap();
    let drain = std::env::var_os(CHILD_DRAIN).is_some();
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("log"))
        .unwrap();
    (start, drain, std::sync::Arc::new(log))
}

/// The input position the journal kept (`Journal::cursor`) after each kill, with the last item
/// tried before that kill. A kill may lose what the journal had not committed, and nothing else:
/// a child sends with `send_*_and_set_cursor`, which commits an item's input position with it,
/// so the items before the position kept were committed and those after it may be lost (under
/// `Sync` that is none whose send returned). Checking that rather than a count of items lost at
/// a trial's end holds however long the journal's writer was kept from committing.
#[derive(Default)]
pub struct Kept(Vec<(u64, u64)>);

impl Kept {
    /// Records the position `cursor` kept after a kill, the last item tried before it `tried`.
    pub fn record(&mut self, tried: Option<u64>, cursor: u64) {
        if let Some(tried) = tried {
            self.0.push((tried, cursor));
        }
    }

    /// Panics unless the journal may have lost `item`: it was sent before a kill after which
    /// the journal kept an input position at or before it.
    pub fn assert_may_lose(&self, item: u64, ctx: &str) {
        // Trials send increasing items: the first kill after the item was tried ended its trial.
        let Some(&(_, kept)) = self.0.iter().find(|(tried, _)| *tried >= item) else {
            panic!("item {item} lost, though no kill came after it; {ctx}");
        };
        assert!(
            item >= kept,
            "item {item} lost, though the journal kept the input position {kept} past it \
             (committed) at the kill after it; {ctx}"
        );
    }
}
