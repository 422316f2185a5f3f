//! `conveyor demo`: a slow embedded HTTP service, generated items through the real `send` path,
//! and the service's own record of arrival order checked against the input.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use conveyor::HttpSink;
use conveyor_cli::server::{Arrival, Reply, Server};
use serde::Serialize;

use crate::args::{DemoArgs, FailurePolicy, OrderingArg};
use crate::input::KeySpec;
use crate::report::{millis, print_out, Summary};
use crate::send::{self, Input, SendPlan};
use crate::sink::Target;
use crate::{exit, CliError};

/// Users the generated items are spread over; the lanes of `--ordering keyed:N`.
const USERS: u64 = 16;

/// What the demo checked, next to the `send` summary.
#[derive(Debug, Serialize)]
struct DemoReport {
    items: u64,
    latency_ms: f64,
    /// The service's record matched the input order (per user for keyed ordering).
    in_order: bool,
    /// Requests the service received, retries included.
    received: usize,
    /// Microseconds the producer loop took to hand every item over.
    producer_micros: f64,
    /// N × latency: the best strict ordering can do.
    strict_floor_secs: f64,
    /// The best this ordering can do: rounds of parallel requests × latency.
    floor_secs: f64,
    total_secs: f64,
    summary: Summary,
}

pub(crate) fn run(args: DemoArgs) -> Result<u8, CliError> {
    let latency = args.latency;
    let server = Server::start(move |_| Reply::ok().delay(latency))
        .map_err(|e| CliError::usage(format!("cannot start the demo service on 127.0.0.1: {e}")))?;
    let talk = !args.output.quiet && !args.output.json;
    // Ctrl-C is handled from the first line printed on.
    let (tx, rx) = send::events()?;
    if talk {
        print_out(&format!(
            "A pretend slow service is listening on {} and takes {} per request.\n\
             Sending {} items ({} users) with --ordering {} through `conveyor send`…",
            server.url(),
            humantime::format_duration(latency),
            args.items,
            USERS,
            args.ordering,
        ))
        .map_err(CliError::io)?;
    }

    let lines = (0..args.items).fold(String::new(), |mut text, id| {
        let _ = writeln!(
            text,
            r#"{{"id":{id},"user":"user-{:02}","text":"item {id} of {}"}}"#,
            id % USERS,
            args.items
        );
        text
    });
    let sink = HttpSink::builder(server.url())
        .build()
        .map_err(|e| CliError::usage(e.to_string()))?;
    let mut inner_output = args.output.clone();
    // The demo prints its own report around the summary.
    inner_output.json = false;
    inner_output.quiet |= args.output.json;
    let plan = SendPlan {
        target: Target::Http(Box::new(sink)),
        ordering: args.ordering,
        key: matches!(args.ordering, OrderingArg::Keyed(_)).then(|| KeySpec::parse("user")),
        retries: 5,
        backoff: Duration::from_millis(200),
        rate: None,
        on_failure: FailurePolicy::Skip,
        capacity: 10_000,
        rejects: None,
        journal: None,
        default_journal: false,
        sync: false,
        output: inner_output,
    };
    let summary = send::run(plan, Input::Memory(lines.into_bytes()), tx, &rx)?;

    let arrivals = server.arrivals();
    let in_order = check_order(&arrivals, args.ordering);
    let floor_items = floor_rounds(args.items, args.ordering);
    let strict_floor = latency.as_secs_f64() * args.items as f64;
    let report = DemoReport {
        items: args.items,
        latency_ms: millis(latency),
        in_order,
        received: arrivals.len(),
        producer_micros: summary.submit_secs * 1e6,
        strict_floor_secs: strict_floor,
        floor_secs: latency.as_secs_f64() * floor_items as f64,
        total_secs: summary.elapsed_secs,
        summary,
    };

    if args.output.json {
        print_out(&serde_json::to_string(&report).expect("the report serializes"))
            .map_err(CliError::io)?;
    } else if talk {
        print_out(&describe(&report, &arrivals, args.ordering)).map_err(CliError::io)?;
    }
    Ok(if !report.in_order {
        exit::SOME_FAILED
    } else {
        report.summary.exit_code
    })
}

/// How many back-to-back requests the longest chain has: N for strict; N / in-flight (rounded
/// up) for pipelined; for keyed, at least the busiest user's items (users are `id % USERS`) and at
/// least N / concurrency.
fn floor_rounds(items: u64, ordering: OrderingArg) -> u64 {
    match ordering {
        OrderingArg::Strict => items,
        OrderingArg::Pipelined(n) => items.div_ceil(n as u64),
        OrderingArg::Keyed(n) => items.div_ceil(USERS).max(items.div_ceil(n as u64)),
    }
}

/// The service's record against the input: strict order for one lane, per-user order for keyed.
/// Pipelined starts requests in order but they race on separate connections, so only the set
/// of items is checked there.
fn check_order(arrivals: &[Arrival], ordering: OrderingArg) -> bool {
    let ids: Vec<(u64, String)> = arrivals
        .iter()
        .filter_map(|a| {
            let json = a.json()?;
            Some((json["id"].as_u64()?, json["user"].as_str()?.to_owned()))
        })
        .collect();
    let mut first_seen: Vec<u64> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (id, _) in &ids {
        // A retried request arrives twice; order is about first arrivals.
        if seen.insert(*id) {
            first_seen.push(*id);
        }
    }
    match ordering {
        OrderingArg::Strict => first_seen.windows(2).all(|w| w[0] < w[1]),
        OrderingArg::Pipelined(_) => true,
        OrderingArg::Keyed(_) => {
            let mut last_per_user: HashMap<&str, u64> = HashMap::new();
            let mut ok = true;
            let mut seen = std::collections::HashSet::new();
            for (id, user) in &ids {
                if !seen.insert(*id) {
                    continue;
                }
                if let Some(previous) = last_per_user.insert(user.as_str(), *id) {
                    ok &= previous < *id;
                }
            }
            ok
        }
    }
}

fn describe(report: &DemoReport, arrivals: &[Arrival], ordering: OrderingArg) -> String {
    let mut text = String::new();
    // Not `report.items`: an interrupted run hands over fewer.
    let handed_over = report.summary.accepted;
    let per_item = if handed_over > 0 {
        report.producer_micros / handed_over as f64
    } else {
        0.0
    };
    let _ = writeln!(
        text,
        "\nproducer loop: handed over {handed_over} items in {:.0} µs ({per_item:.1} µs per item) — it never waited for the service",
        report.producer_micros
    );
    let first: Vec<String> = arrivals
        .iter()
        .take(12)
        .filter_map(|a| {
            a.json()
                .and_then(|j| j["id"].as_u64())
                .map(|id| id.to_string())
        })
        .collect();
    let _ = writeln!(
        text,
        "service's record: {} requests, first arrivals by id: {}{}",
        report.received,
        first.join(" "),
        if arrivals.len() > first.len() {
            " …"
        } else {
            ""
        }
    );
    let check = match ordering {
        OrderingArg::Strict => "arrival order = input order",
        OrderingArg::Pipelined(_) => {
            "every item arrived (pipelined requests start in order but may overtake on the wire)"
        }
        OrderingArg::Keyed(_) => "arrival order = input order within each user",
    };
    let _ = writeln!(
        text,
        "order check: {check}: {}",
        if report.in_order { "OK" } else { "FAILED" }
    );
    let _ = write!(
        text,
        "total {:.2}s; strict floor {} × {:.0} ms = {:.2}s",
        report.total_secs, report.items, report.latency_ms, report.strict_floor_secs
    );
    if report.summary.interrupted {
        text.push_str(" (interrupted: not all items were sent, no comparison)");
    } else if report.floor_secs <= 0.0 {
        // No latency: no floor to be over.
    } else if report.floor_secs < report.strict_floor_secs {
        let _ = write!(
            text,
            "; floor for --ordering {ordering} = {:.2}s ({:+.1}% over it, {:.1}x faster than the strict floor)",
            report.floor_secs,
            (report.total_secs / report.floor_secs - 1.0) * 100.0,
            report.strict_floor_secs / report.total_secs.max(1e-9)
        );
    } else {
        let _ = write!(
            text,
            " ({:+.1}% over the floor); try `conveyor demo --ordering keyed:16`",
            (report.total_secs / report.strict_floor_secs - 1.0) * 100.0
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn arrivals(items: &[(u64, &str)]) -> Vec<Arrival> {
        items
            .iter()
            .enumerate()
            .map(|(index, (id, user))| Arrival {
                index,
                at: Instant::now(),
                method: "POST".into(),
                path: "/".into(),
                headers: Vec::new(),
                body: format!(r#"{{"id":{id},"user":"{user}"}}"#),
            })
            .collect()
    }

    #[test]
    fn strict_order_check_catches_a_swap_and_allows_a_retry() {
        let good = arrivals(&[(0, "a"), (1, "b"), (1, "b"), (2, "a")]);
        assert!(check_order(&good, OrderingArg::Strict));
        let swapped = arrivals(&[(0, "a"), (2, "a"), (1, "b")]);
        assert!(!check_order(&swapped, OrderingArg::Strict));
    }

    #[test]
    fn floors_count_the_longest_chain() {
        assert_eq!(floor_rounds(100, OrderingArg::Strict), 100);
        assert_eq!(floor_rounds(100, OrderingArg::Pipelined(8)), 13);
        // 100 items over 16 users: the busiest user has 7.
        assert_eq!(floor_rounds(100, OrderingArg::Keyed(16)), 7);
        assert_eq!(floor_rounds(100, OrderingArg::Keyed(64)), 7);
        assert_eq!(floor_rounds(100, OrderingArg::Keyed(4)), 25);
    }

    #[test]
    fn keyed_order_check_is_per_user() {
        let interleaved = arrivals(&[(1, "b"), (0, "a"), (3, "b"), (2, "a")]);
        assert!(check_order(&interleaved, OrderingArg::Keyed(2)));
        assert!(!check_order(&interleaved, OrderingArg::Strict));
        let swapped_in_lane = arrivals(&[(2, "a"), (0, "a")]);
        assert!(!check_order(&swapped_in_lane, OrderingArg::Keyed(2)));
    }
}
