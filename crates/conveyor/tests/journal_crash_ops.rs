//! Process-level crash tests beyond plain sends: retries with backoff, items that fail for good
//! (dead letters under `Skip`, paused lanes under `Pause`), operator calls (`retry_dead`,
//! `resume`) and `close`, each of which a SIGKILL may cut short. A child process (this test
//! binary, run again with `CHILD_DIR` set) does all of it on one journal; restarts resume from
//! the journal, and a last child drains it. The log of what the children tried, sent and
//! delivered is then checked against the journal's promises.

#[path = "common/crash.rs"]
mod crash;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use conveyor::{Conveyor, Durability, OnFailure, Ordering, Retry, SinkError};
use crash::*;

const LANES: u64 = 3;
/// Items that fail for good once per process (then succeed when retried or resumed).
const POISON: u64 = 23;
/// Items whose first attempt fails and is retried after a backoff.
const FLAKY: u64 = 7;
/// A child closes its conveyor after this many sends (unless killed first).
const SENDS_BEFORE_CLOSE: u64 = 400;

#[derive(Clone, Copy)]
struct Setup {
    ordering: Ordering,
    on_failure: OnFailure,
    durability: Durability,
}

fn child(dir: &Path, setup: Setup) {
    let (start, drain, log) = child_args(dir);
    let sink_log = log.clone();
    let failed_here = Mutex::new(HashSet::new());
    let c: Conveyor<u64> = Conveyor::builder()
        .journal(dir.join("journal"))
        .durability(setup.durability)
        .ordering(setup.ordering)
        .on_failure(setup.on_failure)
        .retry(Retry::fixed(Duration::from_millis(3)).max_attempts(2))
        .capacity(32)
        .build(move |d| {
            let n = *d.item();
            log_line(&sink_log, format!("b {} {} {}", d.seq(), n, d.attempt()));
            std::thread::sleep(Duration::from_micros(300)); // the slow service
            if n % POISON == 0 && failed_here.lock().unwrap().insert(n) {
                return Err(SinkError::permanent("poison"));
            }
            if n % FLAKY == 0 && d.attempt() == 1 {
                return Err(SinkError::retryable("flaky"));
            }
            log_line(
                &sink_log,
                format!("d {} {} {}", d.seq(), n, d.key().unwrap()),
            );
            Ok(())
        })
        .unwrap();
    log_line(&log, "r".to_owned());
    println!("ready");
    let operate = |c: &Conveyor<u64>| {
        for lane in c.paused() {
            c.resume(&lane);
        }
        for dead in c.dead_letters().unwrap() {
            let receipt = c.retry_dead(dead.seq).unwrap();
            let item: u64 = String::from_utf8(dead.payload).unwrap().parse().unwrap();
            log_line(&log, format!("x {} {} {}", dead.seq, item, receipt.seq()));
        }
    };
    if drain {
        for _ in 0..20 {
            operate(&c);
            c.flush();
            let left = c.dead_letters().unwrap().len() + c.paused().len();
            if left == 0 {
                break;
            }
        }
        assert!(c.close().drained);
        println!("done");
        return;
    }
    // The operator, beside the producer: a paused lane holds the producer's sends once it
    // fills the queue.
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                operate(&c);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        for n in start..start + SENDS_BEFORE_CLOSE {
            log_line(&log, format!("t {n}"));
            let receipt = c
                .send_keyed_and_set_cursor(format!("k{}", n % LANES), n, n + 1)
                .unwrap();
            log_line(&log, format!("s {n} {}", receipt.seq()));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    log_line(&log, "c".to_owned());
    let report = c.close_timeout(Duration::from_secs(30));
    log_line(&log, format!("e {}", report.left));
    println!("closed");
}

#[derive(Default)]
struct Trial {
    tried: Vec<u64>,
    /// (item, seq)
    sent: Vec<(u64, u64)>,
    /// Its `close` returned ("e"): every item it sent was committed by then. Not merely begun
    /// ("c"): a kill during the close is a crash, and under `Batched` a crash loses what was
    /// accepted since the last commit, which `Kept` checks as for any other kill.
    closed: bool,
}

#[derive(Default)]
struct Log {
    trials: Vec<Trial>,
    /// (seq, item, lane)
    delivered: Vec<(u64, u64, String)>,
    /// (seq, item, attempt), in the order calls started
    began: Vec<(u64, u64, u32)>,
    /// dead seq -> (item, new seq)
    retried: Vec<(u64, u64, u64)>,
}

fn read_log(dir: &Path) -> Log {
    let mut log = Log::default();
    for line in whole_lines(dir) {
        let p: Vec<&str> = line.split(' ').collect();
        let num = |i: usize| p[i].parse::<u64>().unwrap();
        match p[0] {
            "r" => log.trials.push(Trial::default()),
            "t" => log.trials.last_mut().unwrap().tried.push(num(1)),
            "s" => log.trials.last_mut().unwrap().sent.push((num(1), num(2))),
            "c" => {}
            "e" => log.trials.last_mut().unwrap().closed = true,
            "b" => log.began.push((num(1), num(2), num(3) as u32)),
            "d" => log.delivered.push((num(1), num(2), p[3].to_owned())),
            "x" => log.retried.push((num(1), num(2), num(3))),
            other => panic!("unexpected log line {other:?}"),
        }
    }
    log
}

fn crash_and_check(test: &str, setup: Setup, trials: usize) {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        child(Path::new(&dir), setup);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut next = 0u64;
    let mut kept = Kept::default();
    let seed = crash_children(test, dir.path(), trials, 150, |seed| {
        let log = read_log(dir.path());
        let cursor = with_journal(dir.path(), |j| j.cursor().unwrap().unwrap_or(0));
        let tried = log.trials.iter().flat_map(|t| t.tried.iter()).max();
        assert!(
            cursor <= tried.map_or(0, |n| n + 1),
            "cursor {cursor} past every item tried; seed {seed}"
        );
        if setup.durability == Durability::Sync {
            if let Some((sent, _)) = log.trials.last().unwrap().sent.last() {
                assert!(
                    cursor > *sent,
                    "cursor {cursor} before item {sent}; seed {seed}"
                );
            }
        }
        kept.record(tried.copied(), cursor);
        next = tried.map_or(next, |m| m + 1);
        next
    });

    let ctx = format!("seed {seed}, {trials} kills");
    let log = read_log(dir.path());
    let sent: Vec<(u64, u64)> = log
        .trials
        .iter()
        .flat_map(|t| t.sent.iter().copied())
        .collect();
    assert!(
        sent.len() > trials * 5,
        "too little sent ({}); {ctx}",
        sent.len()
    );

    // Seqs handed out by sends and by retries of dead letters: never one for two items.
    let mut item_of_seq: HashMap<u64, u64> = HashMap::new();
    let handed = sent
        .iter()
        .copied()
        .chain(log.retried.iter().map(|&(_, item, seq)| (item, seq)));
    for (item, seq) in handed {
        if let Some(other) = item_of_seq.insert(seq, item) {
            assert_eq!(
                other, item,
                "seq {seq} handed to items {other} and {item}; {ctx}"
            );
        }
    }
    for &(seq, item, _) in log.delivered.iter() {
        match item_of_seq.get(&seq) {
            Some(&known) => assert_eq!(known, item, "seq {seq} delivered as {item}; {ctx}"),
            // Sent by a child killed before it logged the send.
            None => {
                item_of_seq.insert(seq, item);
            }
        }
    }
    for &(seq, item, _) in &log.began {
        if let Some(&known) = item_of_seq.get(&seq) {
            assert_eq!(known, item, "seq {seq} began as {item}; {ctx}");
        }
    }

    // Every item delivered was sent, in its own lane, and every item sent was delivered,
    // unless the journal had not committed it when its trial was killed (see `Kept`).
    let tried: BTreeSet<u64> = log
        .trials
        .iter()
        .flat_map(|t| t.tried.iter().copied())
        .collect();
    let delivered: BTreeSet<u64> = log.delivered.iter().map(|d| d.1).collect();
    for (seq, item, lane) in &log.delivered {
        assert!(
            tried.contains(item),
            "{item} (seq {seq}) never tried; {ctx}"
        );
        let _ = lane;
    }
    for (i, trial) in log.trials.iter().enumerate() {
        for &(item, _) in trial.sent.iter().filter(|(n, _)| !delivered.contains(n)) {
            assert!(
                !trial.closed,
                "trial {i} closed its conveyor, yet item {item} it sent was lost; {ctx}"
            );
            kept.assert_may_lose(item, &ctx);
        }
    }

    // Order: per lane, the first attempts of the items that never failed for good start in
    // the order they were sent. (Pipelined calls start in order too, but on several threads,
    // whose log lines may come in another order.)
    let strict = !matches!(setup.ordering, Ordering::Pipelined { .. });
    let keyed = matches!(setup.ordering, Ordering::Keyed { .. });
    let mut seen: HashSet<u64> = HashSet::new();
    let mut lanes: BTreeMap<u64, u64> = BTreeMap::new();
    for &(seq, item, _) in &log.began {
        if !strict || item % POISON == 0 || !seen.insert(item) {
            continue;
        }
        let lane = if keyed { item % LANES } else { 0 };
        let last = lanes.entry(lane).or_insert(0);
        assert!(
            item >= *last,
            "lane {lane}: item {item} (seq {seq}) began first after item {last}; {ctx}"
        );
        *last = item;
    }

    let status = with_journal(dir.path(), |j| j.status().unwrap());
    assert_eq!(
        (status.pending, status.dead_letters, status.lanes.len()),
        (0, 0, 0),
        "the drain left items; {ctx}"
    );
    eprintln!(
        "{ctx}: {} sent, {} delivered, {} retried dead letters",
        sent.len(),
        delivered.len(),
        log.retried.len()
    );
}

macro_rules! crash_test {
    ($name:ident, $ordering:expr, $on_failure:expr, $durability:expr) => {
        #[test]
        fn $name() {
            crash_and_check(
                stringify!($name),
                Setup {
                    ordering: $ordering,
                    on_failure: $on_failure,
                    durability: $durability,
                },
                25,
            );
        }
    };
}

crash_test!(
    strict_skip_batched,
    Ordering::Strict,
    OnFailure::Skip,
    Durability::default()
);
crash_test!(
    strict_skip_sync,
    Ordering::Strict,
    OnFailure::Skip,
    Durability::Sync
);
crash_test!(
    pipelined_skip_batched,
    Ordering::Pipelined { in_flight: 4 },
    OnFailure::Skip,
    Durability::default()
);
crash_test!(
    keyed_pause_batched,
    Ordering::Keyed { concurrency: 3 },
    OnFailure::Pause,
    Durability::default()
);
crash_test!(
    keyed_pause_sync,
    Ordering::Keyed { concurrency: 3 },
    OnFailure::Pause,
    Durability::Sync
);
crash_test!(
    pipelined_pause_sync,
    Ordering::Pipelined { in_flight: 4 },
    OnFailure::Pause,
    Durability::Sync
);
