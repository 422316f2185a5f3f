//! Process-level crash tests: a child process sends numbered items through a slow sink with a
//! journal and is killed with SIGKILL at random moments; restarts resume from the journal. At
//! the end one more child drains what is left, and the log of everything the children tried,
//! sent and delivered is checked against the journal's promises.
//!
//! The child is this test binary, run again on the same test with `CHILD_DIR` set.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use conveyor::{Conveyor, Durability, Journal, Ordering};

const CHILD_DIR: &str = "CONVEYOR_CRASH_DIR";
const CHILD_START: &str = "CONVEYOR_CRASH_START";
const CHILD_DRAIN: &str = "CONVEYOR_CRASH_DRAIN";
const LANES: u64 = 3;

/// Appends one line with one `write` call on an O_APPEND file: lines from the producer and the
/// sink threads never interleave, and a SIGKILL loses nothing already written.
///
/// A write that crosses a page boundary of the file is copied a page at a time, and a SIGKILL
/// between the two stops it halfway. The line is therefore written after a line break, so that
/// a torn last line never runs into the next child's first one, and ends with `;`, so that
/// `read_log` can tell a torn line from a whole one and drop it.
fn log_line(log: &std::fs::File, line: String) {
    let mut out = log;
    out.write_all(format!("\n{};", line.trim_end()).as_bytes())
        .unwrap();
}

/// The child: sends items `start..` (forever, until killed), or only drains the journal.
fn child(dir: &Path, durability: Durability) {
    let start: u64 = std::env::var(CHILD_START).unwrap().parse().unwrap();
    let drain = std::env::var_os(CHILD_DRAIN).is_some();
    let log = Arc::new(
        OpenOptions::new()
            .append(true)
            .create(true)
            .open(dir.join("log"))
            .unwrap(),
    );
    let sink_log = log.clone();
    let c: Conveyor<u64> = Conveyor::builder()
        .journal(dir.join("journal"))
        .durability(durability)
        .ordering(Ordering::Keyed {
            concurrency: LANES as usize,
        })
        .capacity(32)
        .build(move |d| {
            std::thread::sleep(Duration::from_micros(300)); // the slow service
            log_line(
                &sink_log,
                format!("d {} {} {}\n", d.seq(), d.item(), d.key().unwrap()),
            );
            Ok(())
        })
        .unwrap();
    log_line(&log, "r\n".to_owned());
    println!("ready");
    if drain {
        c.flush();
        assert!(c.close().drained);
        println!("done");
        return;
    }
    for n in start.. {
        log_line(&log, format!("t {n}\n"));
        // The input position after this item, stored with it: the parent checks it after
        // every kill.
        let _receipt = c
            .send_keyed_and_set_cursor(format!("k{}", n % LANES), n, n + 1)
            .unwrap();
        log_line(&log, format!("s {n}\n"));
    }
}

/// A small xorshift generator: kill times vary from run to run, and the seed is printed so a
/// failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
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
static FORK_GUARD: Mutex<()> = Mutex::new(());

/// Runs `read` on the journal in `dir`, opened and closed with no child being spawned meanwhile
/// (see `FORK_GUARD`).
fn with_journal<X>(dir: &Path, read: impl FnOnce(&Journal) -> X) -> X {
    let _no_spawn = FORK_GUARD.lock().unwrap_or_else(PoisonError::into_inner);
    // A local, not a temporary of the tail expression: locals drop in reverse order, so the
    // journal closes before the guard is released (a tail expression's temporaries would
    // outlive it, and a child spawned meanwhile would inherit the journal's lock).
    let journal = Journal::open(dir.join("journal")).unwrap();
    read(&journal)
}

fn spawn_child(test: &str, dir: &Path, start: u64, drain: bool) -> std::process::Child {
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
fn await_line(child: &mut std::process::Child, word: &str) {
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

/// What the log says, trial by trial.
#[derive(Default)]
struct Trial {
    tried: Vec<u64>,
    sent: Vec<u64>,
}

struct Delivered {
    seq: u64,
    item: u64,
    lane: String,
}

fn read_log(dir: &Path) -> (Vec<Trial>, Vec<Delivered>) {
    let text = std::fs::read_to_string(dir.join("log")).unwrap();
    let (mut trials, mut delivered) = (Vec::<Trial>::new(), Vec::new());
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    for (n, line) in lines.iter().enumerate() {
        let Some(line) = line.strip_suffix(';') else {
            // Torn by a kill (see `log_line`): only ever a child's last line. A torn "d" line
            // was written inside the sink call the kill cut short, so its item is still
            // pending and comes again.
            let next = lines.get(n + 1);
            assert!(
                next.map_or(true, |next| *next == "r;"),
                "a damaged log line {line:?} before {next:?}"
            );
            continue;
        };
        let parts: Vec<&str> = line.split(' ').collect();
        match parts[0] {
            "r" => trials.push(Trial::default()),
            "t" => trials
                .last_mut()
                .unwrap()
                .tried
                .push(parts[1].parse().unwrap()),
            "s" => trials
                .last_mut()
                .unwrap()
                .sent
                .push(parts[1].parse().unwrap()),
            "d" => delivered.push(Delivered {
                seq: parts[1].parse().unwrap(),
                item: parts[2].parse().unwrap(),
                lane: parts[3].to_owned(),
            }),
            other => panic!("unexpected log line {other:?}"),
        }
    }
    (trials, delivered)
}

/// After a kill, the stored input position never points past an item the journal lost (it is
/// at most one past the last item tried), and under `Sync` never before one it kept (at least
/// one past the last item whose send returned): a rerun resuming from it neither skips nor
/// repeats an item. It is past every item the sink saw: an item reaches the sink only once
/// its append, with its position, is committed, so a rerun never reads a delivered item again
/// (it would get a new seq, and no receiver could tell it was a repeat).
fn check_cursor(
    dir: &Path,
    logged: &[Trial],
    delivered: &[Delivered],
    durability: Durability,
    ctx: &str,
) {
    let cursor = with_journal(dir, |j| j.cursor().unwrap().unwrap_or(0));
    let last = logged.last().expect("a trial was logged");
    let tried = logged.iter().flat_map(|t| t.tried.iter()).max();
    assert!(
        cursor <= tried.map_or(0, |n| n + 1),
        "cursor {cursor} points past every item tried ({tried:?}); {ctx}"
    );
    if let Some(seen) = delivered.iter().map(|d| d.item).max() {
        assert!(
            cursor > seen,
            "item {seen} reached the sink, but the cursor ({cursor}) is still before it; {ctx}"
        );
    }
    if durability == Durability::Sync {
        if let Some(sent) = last.sent.last() {
            assert!(
                cursor > *sent,
                "item {sent} was committed but the cursor ({cursor}) is still before it; {ctx}"
            );
        }
    }
}

/// Kills a sending child `trials` times, drains, and checks the log.
/// `max_lost_tail`: how many of a trial's last sent items may be lost (`Batched`: those accepted
/// in the last commit window; `Sync`: none). `max_duplicates`: redeliveries allowed per crash.
fn crash_and_check(
    test: &str,
    durability: Durability,
    trials: usize,
    max_lost_tail: usize,
    max_duplicates: usize,
) {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        child(Path::new(&dir), durability);
        return;
    }
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut next = 0u64;
    for _ in 0..trials {
        let mut c = spawn_child(test, dir.path(), next, false);
        await_line(&mut c, "ready");
        std::thread::sleep(Duration::from_millis(5 + rng.next(60)));
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
        let (logged, delivered) = read_log(dir.path());
        check_cursor(
            dir.path(),
            &logged,
            &delivered,
            durability,
            &format!("seed {seed}"),
        );
        next = logged
            .iter()
            .flat_map(|t| t.tried.iter())
            .max()
            .map_or(next, |m| m + 1);
    }
    let mut c = spawn_child(test, dir.path(), next, true);
    await_line(&mut c, "done");
    assert!(c.wait().unwrap().success());

    let ctx = format!("seed {seed}, {trials} kills");
    let (logged, delivered) = read_log(dir.path());
    let tried: BTreeSet<u64> = logged
        .iter()
        .flat_map(|t| t.tried.iter().copied())
        .collect();
    let sent: usize = logged.iter().map(|t| t.sent.len()).sum();
    assert!(
        sent > trials * 5,
        "the children sent too little to test anything ({sent}); {ctx}"
    );

    // Nothing delivered that was never sent, and one seq per item, in its own lane.
    let mut seq_of: HashMap<u64, u64> = HashMap::new();
    for d in &delivered {
        assert!(
            tried.contains(&d.item),
            "item {} delivered but never sent; {ctx}",
            d.item
        );
        assert_eq!(d.lane, format!("k{}", d.item % LANES), "{ctx}");
        let seq = *seq_of.entry(d.item).or_insert(d.seq);
        assert_eq!(
            seq, d.seq,
            "item {} delivered under two seqs; {ctx}",
            d.item
        );
    }
    let distinct_seqs: BTreeSet<u64> = seq_of.values().copied().collect();
    assert_eq!(
        distinct_seqs.len(),
        seq_of.len(),
        "two items share a seq; {ctx}"
    );

    // Per lane, dropping every delivery at or below the highest seq already seen leaves each
    // delivered item exactly once, in the order sent.
    let mut lanes: BTreeMap<&str, (u64, Vec<u64>)> = BTreeMap::new();
    for d in &delivered {
        let (highest, kept) = lanes.entry(&d.lane).or_default();
        if d.seq > *highest {
            *highest = d.seq;
            kept.push(d.item);
        }
    }
    for (lane, (_, kept)) in &lanes {
        let all: BTreeSet<u64> = delivered
            .iter()
            .filter(|d| d.lane == *lane)
            .map(|d| d.item)
            .collect();
        assert!(
            kept.windows(2).all(|w| w[0] < w[1]),
            "lane {lane} out of order; {ctx}"
        );
        assert_eq!(
            kept.len(),
            all.len(),
            "lane {lane}: an item was first delivered after a later one; {ctx}"
        );
    }

    // Losses: only among each trial's last sent items (none under Sync).
    let delivered_items: BTreeSet<u64> = seq_of.keys().copied().collect();
    for (i, trial) in logged.iter().enumerate() {
        let lost: Vec<usize> = trial
            .sent
            .iter()
            .enumerate()
            .filter(|(_, n)| !delivered_items.contains(n))
            .map(|(at, _)| at)
            .collect();
        if let Some(first) = lost.first() {
            let from_end = trial.sent.len() - first;
            assert!(
                from_end <= max_lost_tail,
                "trial {i} lost {} sent items, the first {from_end} sends before the kill \
                 (allowed {max_lost_tail}); {ctx}",
                lost.len()
            );
        }
    }

    // Duplicates: at most what was in flight or settled in the last window before each kill.
    let duplicates = delivered.len() - seq_of.len();
    assert!(
        duplicates <= trials * max_duplicates,
        "{duplicates} redeliveries; {ctx}"
    );

    let status = with_journal(dir.path(), |j| j.status().unwrap());
    assert_eq!(
        (status.pending, status.dead_letters),
        (0, 0),
        "the drain left items; {ctx}"
    );
    eprintln!(
        "{ctx}: {sent} sent, {} delivered, {duplicates} redeliveries",
        seq_of.len()
    );
}

#[test]
fn batched_journal_survives_sigkill() {
    // 5 ms window at ~8k items/s: some 40 items per window; 300 leaves room for a slow disk.
    crash_and_check(
        "batched_journal_survives_sigkill",
        Durability::default(),
        40,
        300,
        200,
    );
}

#[test]
fn sync_journal_loses_nothing_whose_send_returned() {
    crash_and_check(
        "sync_journal_loses_nothing_whose_send_returned",
        Durability::Sync,
        40,
        0,
        200,
    );
}
