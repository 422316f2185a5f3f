//! How steady end-to-end throughput is from one conveyor to the next.
//!
//! Criterion's `end_to_end_100k` (in `engine.rs`) measures one conveyor per mode, and a
//! conveyor tends to keep the pace it fell into: a producer and a worker that got in each
//! other's way early on may stay that way for the whole run. This bench builds a fresh
//! conveyor (or a fresh crossbeam channel and thread) for every trial, interleaving the
//! implementations so that whatever else the machine does falls on all of them alike, and
//! prints each implementation's trials: sorted medians, their median, and how many came within
//! 1.5x of the implementation's best trial.
//!
//! `cargo bench -p conveyor --bench steady` (15 trials), or `-- TRIALS` for another count.

use std::hint::black_box;
use std::time::{Duration, Instant};

use conveyor::{Conveyor, Delivery, Ordering};

mod baselines;

/// Items per round, as in `end_to_end_100k`.
const ITEMS: u64 = 100_000;
/// Rounds per trial; the first few warm the trial up and are not counted.
const ROUNDS: usize = 30;
const WARM_UP: usize = 5;

/// One trial: the median time of a round (sends of `ITEMS` items, then waiting for them all).
type Trial = fn() -> Duration;

fn median(mut rounds: Vec<Duration>) -> Duration {
    rounds.drain(..WARM_UP);
    rounds.sort();
    rounds[rounds.len() / 2]
}

fn conveyor_trial(ordering: Ordering) -> Duration {
    let conveyor: Conveyor<u64> = Conveyor::builder()
        .ordering(ordering)
        .capacity(baselines::CAPACITY)
        .build(|d: Delivery<u64>| {
            black_box(d.item());
            Ok(())
        })
        .expect("valid configuration");
    let rounds = (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            for i in 0..ITEMS {
                conveyor.send(i).expect("open, with room");
            }
            conveyor.flush();
            started.elapsed()
        })
        .collect();
    median(rounds)
}

/// Crossbeam bounded + a consumer thread, as in `engine.rs`.
fn crossbeam_trial() -> Duration {
    let mut baseline = baselines::crossbeam();
    let rounds = (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            for i in 0..ITEMS {
                (baseline.send)(i);
            }
            (baseline.drain)();
            started.elapsed()
        })
        .collect();
    median(rounds)
}

fn main() {
    // `cargo bench` passes `--bench`; a number is the count of trials.
    let trials = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(15);
    let implementations: [(&str, Trial); 4] = [
        ("conveyor_strict", || conveyor_trial(Ordering::Strict)),
        ("conveyor_pipelined_16", || {
            conveyor_trial(Ordering::Pipelined { in_flight: 16 })
        }),
        ("conveyor_keyed_16", || {
            conveyor_trial(Ordering::Keyed { concurrency: 16 })
        }),
        ("crossbeam_bounded", crossbeam_trial),
    ];
    let mut results = vec![Vec::new(); implementations.len()];
    for _ in 0..trials {
        for ((_, trial), result) in implementations.iter().zip(&mut results) {
            result.push(trial());
        }
    }
    let ms = |d: &Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
    println!("end to end, {ITEMS} items, instant sink: median of a trial's rounds, in ms");
    for ((name, _), mut result) in implementations.iter().zip(results) {
        result.sort();
        let best = result[0];
        let steady = result
            .iter()
            .filter(|d| d.as_secs_f64() <= best.as_secs_f64() * 1.5)
            .count();
        println!(
            "{name:22} median {:>6}  within 1.5x of best: {steady:>2}/{}  trials: {}",
            ms(&result[result.len() / 2]),
            result.len(),
            result.iter().map(ms).collect::<Vec<_>>().join(" "),
        );
    }
}
