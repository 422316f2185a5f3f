//! Journal benchmarks, side by side in one run:
//! - storage: append throughput in batches against a plain "one SQLite transaction per item"
//!   baseline, and reopening a journal that holds 1,000,000 pending items;
//! - engine: items accepted per second by `send` with `Durability::Batched` (default) against
//!   the in-memory engine, `Durability::Sync` with 1 and 8 producers, and building a conveyor on
//!   a journal holding 1,000,000 pending items until its first delivery.
//!
//! Run: `cargo bench -p conveyor --bench journal`. Set `JOURNAL_BENCH_DIR` to put the files on a
//! particular disk (default: the system temp dir).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde::{Deserialize, Serialize};

use conveyor::{Conveyor, Durability};

// The storage layer's engine operations are crate-private; the bench compiles the module itself
// rather than widening the public API for it.
#[allow(dead_code, unreachable_pub)]
#[path = "../src/journal.rs"]
mod journal;
// The journal's lock file, which the module above uses as `crate::fork`. Its unit tests are
// compiled here without the harness that would run them, so what only they use goes unused.
#[allow(dead_code, unused_imports)]
#[path = "../src/fork.rs"]
mod fork;

use journal::{Journal, Record, Settlement, WriteBatch};

/// A small JSON event, as a conveyor of `Event`s journals it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Event {
    id: u64,
    kind: String,
    customer: String,
    amount_cents: u64,
}

fn event(seq: u64) -> Event {
    Event {
        id: seq,
        kind: "order.created".to_owned(),
        customer: format!("c-{}", seq % 977),
        amount_cents: seq * 7,
    }
}

fn payload(seq: u64) -> Vec<u8> {
    serde_json::to_vec(&event(seq)).unwrap()
}

fn record(seq: u64) -> Record {
    Record {
        seq,
        lane: Arc::from(""),
        key: None,
        payload: payload(seq),
        cursor: None,
        replaces_dead: None,
    }
}

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("JOURNAL_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

/// Appends: the engine's writer commits whatever accumulated in one transaction. The baseline is
/// what a hand-rolled durable queue does: one autocommit INSERT per item, same durability
/// (WAL, synchronous=FULL) so both pay for a durable commit.
fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("journal_append");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    for batch in [1usize, 64, 1024] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("batched/{batch}"), |b| {
            let dir = bench_dir();
            let mut j = Journal::open(dir.path().join("bench.journal")).unwrap();
            let mut seq = 0u64;
            b.iter_batched(
                || {
                    let records: Vec<Record> =
                        (0..batch as u64).map(|i| record(seq + 1 + i)).collect();
                    seq += batch as u64;
                    (records, seq)
                },
                |(appends, cursor)| {
                    j.write(&WriteBatch {
                        appends,
                        settlements: Vec::new(),
                        cursor: Some(cursor),
                        ..WriteBatch::default()
                    })
                    .unwrap()
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.throughput(Throughput::Elements(1));
    group.bench_function("baseline_txn_per_item", |b| {
        let dir = bench_dir();
        let conn = baseline_db(&dir.path().join("baseline.db"));
        let mut insert = conn
            .prepare("INSERT INTO items (seq, payload) VALUES (?1, ?2)")
            .unwrap();
        let mut seq = 0i64;
        b.iter(|| {
            seq += 1;
            insert
                .execute(rusqlite::params![seq, payload(seq as u64)])
                .unwrap();
        });
    });
    // Steady state of a keeping-up sink: each commit appends a batch and settles the one before.
    group.throughput(Throughput::Elements(1024));
    group.bench_function("append_and_settle/1024", |b| {
        let dir = bench_dir();
        let mut j = Journal::open(dir.path().join("bench.journal")).unwrap();
        let mut seq = 0u64;
        let mut batch = WriteBatch::default();
        b.iter(|| {
            batch.clear();
            batch.settlements.extend(
                (seq.saturating_sub(1023)..=seq)
                    .filter(|s| *s > 0)
                    .map(Settlement::Delivered),
            );
            batch.appends.extend((seq + 1..=seq + 1024).map(record));
            seq += 1024;
            j.write(&batch).unwrap();
        });
    });
    group.finish();
}

fn baseline_db(path: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))
        .unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.execute_batch("CREATE TABLE items (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        .unwrap();
    conn
}

const RECOVERY_ITEMS: u64 = 1_000_000;
const PAGE: usize = 1024;

fn filled_journal(dir: &Path) -> PathBuf {
    let path = dir.join("million.journal");
    let mut j = Journal::open(&path).unwrap();
    let started = Instant::now();
    for start in (1..=RECOVERY_ITEMS).step_by(10_000) {
        let appends: Vec<Record> = (start..start + 10_000).map(record).collect();
        j.write(&WriteBatch {
            appends,
            ..WriteBatch::default()
        })
        .unwrap();
    }
    let status = j.status().unwrap();
    eprintln!(
        "filled {} pending items, {} MB, in {:.1?}",
        status.pending,
        status.file_bytes / 1_000_000,
        started.elapsed()
    );
    path
}

/// Recovery reads pending items page by page, so memory stays at one page whatever the backlog.
fn reopen(c: &mut Criterion) {
    let dir = bench_dir();
    let path = filled_journal(dir.path());
    let mut group = c.benchmark_group("journal_reopen_1m");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(15))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(RECOVERY_ITEMS));
    group.bench_function("open_and_page_through", |b| {
        b.iter(|| {
            let j = Journal::open(&path).unwrap();
            let (mut after, mut n, mut bytes) = (0u64, 0u64, 0usize);
            loop {
                let page = j.pending_after(after, PAGE).unwrap();
                let Some(last) = page.last() else { break };
                after = last.seq;
                n += page.len() as u64;
                bytes += page.iter().map(|r| r.payload.len()).sum::<usize>();
            }
            assert_eq!(n, RECOVERY_ITEMS);
            bytes
        });
    });
    group.bench_function("open_and_first_page", |b| {
        b.iter(|| {
            let j = Journal::open(&path).unwrap();
            let first = j.pending_after(0, PAGE).unwrap();
            assert_eq!(first.len(), PAGE);
            j.max_seq().unwrap()
        });
    });
    group.finish();
}

/// A conveyor whose sink holds its first item until the returned sender is dropped: every
/// accepted item stays pending, so the journal must write each one. The sink reports the seq
/// of the first item it sees on `first`.
fn stalled_conveyor(
    builder: conveyor::Builder<Event>,
    first: Option<std::sync::mpsc::SyncSender<u64>>,
) -> (Conveyor<Event>, std::sync::mpsc::Sender<()>) {
    let (gate_tx, gate) = std::sync::mpsc::channel::<()>();
    let gate = std::sync::Mutex::new(gate);
    let first = std::sync::Mutex::new(first);
    let c = builder
        .drain_timeout(Duration::from_millis(10))
        .build(move |d| {
            if let Some(tx) = first.lock().unwrap().take() {
                let _ = tx.send(d.seq());
            }
            let _ = gate.lock().unwrap().recv();
            Ok(())
        })
        .unwrap();
    (c, gate_tx)
}

/// Accepted items per second. Each sample sends a number of items to a fresh conveyor and, with a
/// journal, waits until they are committed (`cursor()` commits what was queued), so the cost of
/// durability is inside the measurement, not deferred.
fn send(c: &mut Criterion) {
    let mut group = c.benchmark_group("journal_send");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    let run = |journal: Option<Durability>, producers: u64, stalled: bool, sends: u64| {
        move |b: &mut criterion::Bencher| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let dir = bench_dir();
                    let mut builder = Conveyor::<Event>::builder().capacity(sends as usize * 2);
                    if let Some(durability) = journal {
                        builder = builder
                            .journal(dir.path().join("send.journal"))
                            .durability(durability);
                    }
                    let (conveyor, gate) = if stalled {
                        stalled_conveyor(builder, None)
                    } else {
                        (
                            builder.build(|_d| Ok(())).unwrap(),
                            std::sync::mpsc::channel().0,
                        )
                    };
                    let events: Vec<Vec<Event>> = (0..producers)
                        .map(|p| {
                            (0..sends / producers)
                                .map(|i| event(p * sends + i))
                                .collect()
                        })
                        .collect();
                    let started = Instant::now();
                    std::thread::scope(|s| {
                        for batch in events {
                            let conveyor = &conveyor;
                            s.spawn(move || {
                                for e in batch {
                                    drop(conveyor.send(e).unwrap());
                                }
                            });
                        }
                    });
                    if journal.is_some() {
                        conveyor.cursor().unwrap();
                    }
                    total += started.elapsed();
                    drop(conveyor);
                    drop(gate);
                }
                total
            });
        }
    };
    let batched = Some(Durability::default());
    let sync = Some(Durability::Sync);
    // (name, journal, producers, sink stalled so every item is written, sends per sample)
    let cases = [
        ("in_memory/instant_sink", None, 1, false, 20_000),
        ("batched_5ms/instant_sink", batched, 1, false, 20_000),
        ("in_memory/stalled_sink", None, 1, true, 20_000),
        ("batched_5ms/stalled_sink", batched, 1, true, 20_000),
        ("sync/1_producer/stalled_sink", sync, 1, true, 2_000),
        ("sync/8_producers/stalled_sink", sync, 8, true, 8_000),
    ];
    for (name, journal, producers, stalled, sends) in cases {
        group.throughput(Throughput::Elements(sends));
        group.bench_function(name, run(journal, producers, stalled, sends));
    }
    group.finish();
}

/// A conveyor built on a journal with 1,000,000 pending items, until the first item reaches the
/// sink. Replay streams pages, so memory stays at the capacity (default 10,000). The item is
/// held and the conveyor abandoned, so the journal keeps its items for the next sample.
fn engine_reopen(c: &mut Criterion) {
    let dir = bench_dir();
    let path = filled_journal(dir.path());
    let mut group = c.benchmark_group("journal_reopen_1m");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    group.bench_function("conveyor_build_to_first_delivery", |b| {
        b.iter(|| {
            let (first_tx, first) = std::sync::mpsc::sync_channel::<u64>(1);
            let (conveyor, gate) =
                stalled_conveyor(Conveyor::builder().journal(&path), Some(first_tx));
            let seq = first.recv().unwrap();
            assert_eq!(seq, 1);
            drop(conveyor);
            drop(gate);
            seq
        });
    });
    group.finish();
}

criterion_group!(benches, append, reopen, send, engine_reopen);
criterion_main!(benches);
