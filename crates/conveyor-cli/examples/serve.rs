//! A local HTTP sink to try `conveyor send` against, and the benchmark's server.
//!
//! ```text
//! cargo run --release -p conveyor-cli --example serve -- [ADDR] [LATENCY_MS]
//! ```
//! Answers every request with `200 ok` after LATENCY_MS (default 0) and prints the number of
//! requests received every second while it changes. Stop it with Ctrl-C.

use std::time::Duration;

use conveyor_cli::server::{Reply, Server};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".into());
    let latency = Duration::from_millis(args.next().and_then(|ms| ms.parse().ok()).unwrap_or(0));
    let server = Server::start_on(&addr, move |_| Reply::ok().delay(latency))?;
    println!("{}", server.url());
    let mut last = 0;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let count = server.count();
        if count != last {
            eprintln!("{count} requests");
            last = count;
        }
    }
}
