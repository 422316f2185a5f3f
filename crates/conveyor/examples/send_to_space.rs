//! The seed scenario: a loop must call a blocking, ~50 ms `send_to_space` once per
//! item, in order, without waiting for it.
//!
//! Run with `cargo run --example send_to_space`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conveyor::{Conveyor, Delivery, Retry, SinkError};

/// Stands in for the real, unmodifiable call (a `requests.post` to a slow service).
fn send_to_space(item: &str, arrivals: &Mutex<Vec<String>>) -> Result<(), SinkError> {
    std::thread::sleep(Duration::from_millis(50));
    arrivals.lock().unwrap().push(item.to_owned());
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let items: Vec<String> = (1..=10).map(|i| format!("sub_item-{i}")).collect();
    let arrivals = Arc::new(Mutex::new(Vec::new()));

    let space = arrivals.clone();
    let c: Conveyor<String> = Conveyor::builder()
        .retry(Retry::exponential(Duration::from_millis(100)).max_attempts(5))
        .build(move |d: Delivery<String>| send_to_space(d.item(), &space))?;

    let started = Instant::now();
    for item in &items {
        c.send(item.clone())?; // returns at once
    }
    let loop_time = started.elapsed();
    println!("producer loop: {} items sent in {loop_time:?}", items.len());

    let report = c.close_timeout(Duration::from_secs(10));
    let total = started.elapsed();
    let arrived = arrivals.lock().unwrap().clone();
    println!(
        "delivered {} of {} in {total:?} (strict floor: {} x 50 ms = {:?})",
        report.stats.delivered,
        items.len(),
        items.len(),
        Duration::from_millis(50) * items.len() as u32
    );
    println!("arrival order matches send order: {}", arrived == items);
    if !report.drained || arrived != items {
        return Err("not every item arrived in order".into());
    }
    Ok(())
}
