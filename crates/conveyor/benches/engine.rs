//! Conveyor against the channels and threads a user would otherwise wire up, side by
//! side in one run. Ratios, not absolute times, are what `BENCHMARKS.md` reports.
//!
//! `cargo bench -p conveyor --bench engine`

use std::hint::black_box;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};

use conveyor::{Conveyor, Delivery, Ordering};

mod baselines;
use baselines::{crossbeam, thread_baseline, Baseline, CAPACITY};

/// The ordering modes compared against the channel baselines, and whether items are sent
/// with keys (in turn from [`KEYS`]); without one, a keyed conveyor's items share the lane
/// `""`.
const MODES: [(&str, Ordering, bool); 4] = [
    ("conveyor_strict", Ordering::Strict, false),
    (
        "conveyor_pipelined_16",
        Ordering::Pipelined { in_flight: 16 },
        false,
    ),
    (
        "conveyor_keyed_16",
        Ordering::Keyed { concurrency: 16 },
        false,
    ),
    (
        "conveyor_keyed_16_with_16_keys",
        Ordering::Keyed { concurrency: 16 },
        true,
    ),
];

/// The keys of keyed sends, one after the other: what a user's ids look like.
const KEYS: [&str; 16] = [
    "user-00", "user-01", "user-02", "user-03", "user-04", "user-05", "user-06", "user-07",
    "user-08", "user-09", "user-10", "user-11", "user-12", "user-13", "user-14", "user-15",
];

/// Item `i`'s key.
fn key_of(i: u64) -> &'static str {
    KEYS[(i % KEYS.len() as u64) as usize]
}

/// Sends item `i`, with its key if `keyed`.
fn send_to(conveyor: &Conveyor<u64>, keyed: bool, i: u64) -> conveyor::Receipt<()> {
    let sent = if keyed {
        conveyor.send_keyed(key_of(i), i)
    } else {
        conveyor.send(i)
    };
    sent.unwrap()
}

fn conveyor_with(ordering: Ordering, sink_sleep: Option<Duration>) -> Conveyor<u64> {
    Conveyor::builder()
        .ordering(ordering)
        .capacity(CAPACITY)
        .build(move |d: Delivery<u64>| {
            if let Some(pause) = sink_sleep {
                std::thread::sleep(pause);
            }
            black_box(d.item());
            Ok(())
        })
        .expect("valid configuration")
}

fn std_mpsc() -> Baseline {
    let (tx, rx) = mpsc::sync_channel::<u64>(CAPACITY);
    thread_baseline(move |i| tx.send(i).unwrap(), rx.into_iter())
}

/// What a user who needs each item's outcome writes with a channel: a reply channel per item,
/// answered by the consumer (and dropped at once by the producer, as conveyor's receipts are
/// in these groups).
fn crossbeam_with_replies() -> Baseline {
    let (tx, rx) = crossbeam_channel::bounded::<(u64, mpsc::SyncSender<()>)>(CAPACITY);
    let items = rx.into_iter().map(|(item, reply)| {
        let _ = reply.send(());
        item
    });
    let send = move |i| {
        let (reply_tx, reply_rx) = mpsc::sync_channel::<()>(1);
        tx.send((i, reply_tx)).unwrap();
        drop(black_box(reply_rx));
    };
    thread_baseline(send, items)
}

/// What a user who needs each item's key at the consumer sends through a channel: the key
/// as a `String` with the item, as `send_keyed` takes it.
fn crossbeam_with_keys() -> Baseline {
    let (tx, rx) = crossbeam_channel::bounded::<(String, u64)>(CAPACITY);
    let items = rx.into_iter().map(|(key, item)| {
        black_box(key);
        item
    });
    thread_baseline(move |i| tx.send((key_of(i).to_owned(), i)).unwrap(), items)
}

fn tokio_mpsc() -> Baseline {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<u64>(CAPACITY);
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<()>();
    rt.spawn(async move {
        while let Some(item) = rx.recv().await {
            if item == u64::MAX {
                let _ = done_tx.send(());
            } else {
                black_box(item);
            }
        }
    });
    let marker = tx.clone();
    Baseline::new(
        move |i| {
            let _keep_runtime = &rt;
            tx.blocking_send(i).unwrap()
        },
        move || {
            marker.blocking_send(u64::MAX).unwrap();
            done_rx.recv().unwrap();
        },
    )
}

/// Builds a fresh baseline (its consumer thread included).
type MakeBaseline = fn() -> Baseline;

/// The channel-and-thread baselines every instant-sink group compares against.
const BASELINES: [(&str, MakeBaseline); 4] = [
    ("std_mpsc_sync_channel", std_mpsc),
    ("crossbeam_bounded", crossbeam),
    ("crossbeam_bounded_with_16_keys", crossbeam_with_keys),
    ("tokio_mpsc_blocking_send", tokio_mpsc),
];

/// How a send-cost group times `iters` sends, given how to send item `i` and how to wait
/// (untimed) until the consumer has seen every item sent.
trait TimeSends {
    fn time(&self, iters: u64, send: impl FnMut(u64), drain: impl FnMut()) -> Duration;
}

/// One row per conveyor mode, then one per channel baseline, each timed by `timing`.
fn send_rows(g: &mut BenchmarkGroup<'_, WallTime>, timing: &impl TimeSends) {
    for (name, ordering, keyed) in MODES {
        let conveyor = conveyor_with(ordering, None);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                timing.time(
                    iters,
                    |i| drop(black_box(send_to(&conveyor, keyed, i))),
                    || conveyor.flush(),
                )
            })
        });
    }
    for (name, make) in BASELINES {
        let mut base = make();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| timing.time(iters, |i| (base.send)(i), || (base.drain)()))
        });
    }
}

/// Sends back to back, in chunks far below the capacity, draining (untimed) between
/// chunks: the producer's cost when there is room, never backpressure.
struct BackToBack;

impl TimeSends for BackToBack {
    fn time(&self, iters: u64, mut send: impl FnMut(u64), mut drain: impl FnMut()) -> Duration {
        const CHUNK: u64 = 1 << 16;
        let mut elapsed = Duration::ZERO;
        let mut done = 0;
        while done < iters {
            let n = CHUNK.min(iters - done);
            let start = Instant::now();
            for i in done..done + n {
                send(i);
            }
            elapsed += start.elapsed();
            drain();
            done += n;
        }
        elapsed
    }
}

/// Producer-side cost of one send, with a consumer draining concurrently.
fn send_cost(c: &mut Criterion) {
    let mut g = c.benchmark_group("send_cost");
    g.throughput(Throughput::Elements(1));
    send_rows(&mut g, &BackToBack);
    // What a receipt would cost if it were a fresh channel per item.
    let mut base = crossbeam();
    g.bench_function("crossbeam_plus_sync_channel_per_item", |b| {
        b.iter_custom(|iters| {
            BackToBack.time(
                iters,
                |i| {
                    let (reply_tx, reply_rx) = mpsc::sync_channel::<()>(1);
                    black_box((reply_tx, reply_rx));
                    (base.send)(i);
                },
                || (base.drain)(),
            )
        })
    });
    g.finish();
}

/// Busy work standing in for what a real producer does between sends (no syscalls, no
/// memory traffic), `units` rounds of it.
fn busy(units: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..units {
        x = black_box(x.rotate_left(5).wrapping_mul(0x2545_f491_4f6c_dd1d));
    }
    x
}

/// How many rounds of [`busy`] take about `target`, measured on this machine now.
fn busy_units_for(target: Duration) -> u64 {
    let probe = 1_000_000;
    let start = Instant::now();
    busy(probe);
    let per_unit = start.elapsed().as_secs_f64() / probe as f64;
    ((target.as_secs_f64() / per_unit) as u64).max(1)
}

/// `units` rounds of [`busy`] before each send; each chunk times the same loop with and
/// without the sends and counts the difference.
struct Paced {
    units: u64,
}

impl TimeSends for Paced {
    fn time(&self, iters: u64, mut send: impl FnMut(u64), mut drain: impl FnMut()) -> Duration {
        const ITEMS: u64 = 2_000;
        let mut cost = Duration::ZERO;
        let mut done = 0;
        while done < iters {
            let n = ITEMS.min(iters - done);
            let start = Instant::now();
            for _ in 0..n {
                black_box(busy(self.units));
            }
            let alone = start.elapsed();
            let start = Instant::now();
            for i in 0..n {
                black_box(busy(self.units));
                send(i);
            }
            cost += start.elapsed().saturating_sub(alone);
            drain();
            done += n;
        }
        cost
    }
}

/// Producer-side cost of one send when the producer does ~2 µs of its own work between
/// sends, as real producers do: the consumer is usually idle when an item arrives, so this
/// includes waking it.
fn send_cost_paced(c: &mut Criterion) {
    let units = busy_units_for(Duration::from_micros(2));
    let mut g = c.benchmark_group("send_cost_paced_2us");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    send_rows(&mut g, &Paced { units });
    g.finish();
}

/// Items per second from first send to last delivery, with an instant sink.
fn end_to_end(c: &mut Criterion) {
    const N: u64 = 100_000;
    let mut g = c.benchmark_group("end_to_end_100k");
    g.throughput(Throughput::Elements(N));
    g.sample_size(10);
    for (name, ordering, keyed) in MODES {
        let conveyor = conveyor_with(ordering, None);
        g.bench_function(name, |b| {
            b.iter(|| {
                for i in 0..N {
                    send_to(&conveyor, keyed, i);
                }
                conveyor.flush();
            })
        });
    }
    let with_replies: (&str, MakeBaseline) = (
        "crossbeam_bounded_plus_reply_channel_per_item",
        crossbeam_with_replies,
    );
    for (name, make) in BASELINES.into_iter().chain([with_replies]) {
        let mut base = make();
        g.bench_function(name, |b| {
            b.iter(|| {
                for i in 0..N {
                    (base.send)(i);
                }
                (base.drain)();
            })
        });
    }
    g.finish();

    // Awaiting spawn_blocking per item is ordered but pays a thread hand-off per item.
    const M: u64 = 10_000;
    let mut g = c.benchmark_group("end_to_end_10k_spawn_blocking");
    g.throughput(Throughput::Elements(M));
    g.sample_size(10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    g.bench_function("tokio_await_spawn_blocking_per_item", |b| {
        b.iter(|| {
            rt.block_on(async {
                for i in 0..M {
                    tokio::task::spawn_blocking(move || black_box(i))
                        .await
                        .unwrap();
                }
            })
        })
    });
    let conveyor = conveyor_with(Ordering::Strict, None);
    g.bench_function("conveyor_strict", |b| {
        b.iter(|| {
            for i in 0..M {
                conveyor.send(i).unwrap();
            }
            conveyor.flush();
        })
    });
    g.finish();
}

/// Total time with a 1 ms sink: strict against its floor of N x 1 ms, and 16-way
/// keyed and pipelined against N x 1 ms / 16.
fn latency_bound(c: &mut Criterion) {
    const N: u64 = 320;
    let mut g = c.benchmark_group("sleep_1ms_sink_320_items");
    g.sample_size(10);
    for (name, ordering) in [
        ("strict", Ordering::Strict),
        ("keyed_16", Ordering::Keyed { concurrency: 16 }),
        ("pipelined_16", Ordering::Pipelined { in_flight: 16 }),
    ] {
        let conveyor = conveyor_with(ordering, Some(Duration::from_millis(1)));
        g.bench_with_input(BenchmarkId::new("conveyor", name), &ordering, |b, _| {
            b.iter(|| {
                for i in 0..N {
                    conveyor.send_keyed(format!("k{}", i % 16), i).unwrap();
                }
                conveyor.flush();
            })
        });
    }
    // The floor itself: N sleeps of 1 ms in a loop, as the plain blocking loop does.
    g.bench_function("floor_plain_loop", |b| {
        b.iter(|| {
            for _ in 0..N {
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    send_cost,
    send_cost_paced,
    end_to_end,
    latency_bound
);
criterion_main!(benches);
