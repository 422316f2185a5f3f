//! Journal storage benchmarks: append throughput in batches against a plain "one SQLite
//! transaction per item" baseline, and reopening a journal that holds 1,000,000 pending items.
//!
//! Run: `cargo bench -p conveyor --bench journal`. Set `JOURNAL_BENCH_DIR` to put the files on a
//! particular disk (default: the system temp dir).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

// The storage layer's engine operations are crate-private; the bench compiles the module itself
// rather than widening the public API for it.
#[allow(unreachable_pub)]
#[path = "../src/journal.rs"]
mod journal;

use journal::{Journal, Record, Settlement, WriteBatch};

/// A payload of the size of a small JSON event.
fn payload(seq: u64) -> Vec<u8> {
    format!(
        r#"{{"id":{seq},"kind":"order.created","customer":"c-{}","amount_cents":{}}}"#,
        seq % 977,
        seq * 7
    )
    .into_bytes()
}

fn record(seq: u64) -> Record {
    Record {
        seq,
        lane: String::new(),
        key: None,
        payload: payload(seq),
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
                |(records, cursor)| j.append(&records, Some(cursor)).unwrap(),
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
        let records: Vec<Record> = (start..start + 10_000).map(record).collect();
        j.append(&records, None).unwrap();
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

criterion_group!(benches, append, reopen);
criterion_main!(benches);
