//! Process-level crash tests: a child process sends numbered items through a slow sink with a
//! journal and is killed with SIGKILL at random moments; restarts resume from the journal. At
//! the end one more child drains what is left, and the log of everything the children tried,
//! sent and delivered is checked against the journal's promises.
//!
//! The child is this test binary, run again on the same test with `CHILD_DIR` set.

#[path = "common/crash.rs"]
mod crash;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use conveyor::{Conveyor, Durability, Ordering};
use crash::*;
const LANES: u64 = 3;

/// The child: sends items `start..` (forever, until killed), or only drains the journal.
fn child(dir: &Path, durability: Durability) {
    let (start, drain, log) = child_args(dir);
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
    let (mut trials, mut delivered) = (Vec::<Trial>::new(), Vec::new());
    // A torn "d" line (see `whole_lines`) was written inside the sink call the kill cut short,
    // so its item is still pending and comes again.
    for line in whole_lines(dir) {
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
) -> u64 {
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
    cursor
}

/// Kills a sending child `trials` times, drains, and checks the log. `max_duplicates`:
/// redeliveries allowed per crash.
fn crash_and_check(test: &str, durability: Durability, trials: usize, max_duplicates: usize) {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        child(Path::new(&dir), durability);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut next = 0u64;
    let mut kept = Kept::default();
    let seed = crash_children(test, dir.path(), trials, 60, |seed| {
        let (logged, delivered) = read_log(dir.path());
        let cursor = check_cursor(
            dir.path(),
            &logged,
            &delivered,
            durability,
            &format!("seed {seed}"),
        );
        let tried = logged.iter().flat_map(|t| t.tried.iter()).max().copied();
        kept.record(tried, cursor);
        next = tried.map_or(next, |m| m + 1);
        next
    });

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

    // Losses: only what the journal had not committed at a kill (see `Kept`; none under Sync).
    let delivered_items: BTreeSet<u64> = seq_of.keys().copied().collect();
    for trial in &logged {
        for &item in trial.sent.iter().filter(|n| !delivered_items.contains(n)) {
            kept.assert_may_lose(item, &ctx);
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
    crash_and_check(
        "batched_journal_survives_sigkill",
        Durability::default(),
        40,
        200,
    );
}

#[test]
fn sync_journal_loses_nothing_whose_send_returned() {
    crash_and_check(
        "sync_journal_loses_nothing_whose_send_returned",
        Durability::Sync,
        40,
        200,
    );
}
