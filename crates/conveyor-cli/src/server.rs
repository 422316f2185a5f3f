//! A recording HTTP/1.1 server on 127.0.0.1, for `conveyor demo`, tests and benchmarks.
//!
//! Every request is recorded (in arrival order) before its handler's delay starts, so the record
//! shows the order in which deliveries *started* arriving, which is what ordering modes promise.
//!
//! ```no_run
//! use conveyor_cli::server::{Reply, Server};
//! use std::time::Duration;
//!
//! let server = Server::start(|_arrival| Reply::ok().delay(Duration::from_millis(50)))?;
//! println!("listening on {}", server.url());
//! # Ok::<(), std::io::Error>(())
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// 0-based position in arrival order.
    pub index: usize,
    /// When the request's body had been read.
    pub at: Instant,
    /// The method, e.g. `POST`.
    pub method: String,
    /// The request path.
    pub path: String,
    /// All headers, names lowercased, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body as text (lossy for non-UTF-8 bodies).
    pub body: String,
}

impl Arrival {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `Conveyor-Seq` header, parsed.
    pub fn seq(&self) -> Option<u64> {
        self.header("conveyor-seq")?.parse().ok()
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.body).ok()
    }
}

/// What the server answers to one request.
#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    delay: Duration,
}

impl Reply {
    /// `200 OK` with body `ok`, at once.
    pub fn ok() -> Self {
        Self::status(200)
    }

    /// An empty-bodied answer with this status.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: if status == 200 {
                "ok".into()
            } else {
                String::new()
            },
            delay: Duration::ZERO,
        }
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the response body.
    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }

    /// Waits this long before answering (without blocking other requests).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Handler = dyn Fn(&Arrival) -> Reply + Send + Sync;

struct Shared {
    handler: Box<Handler>,
    /// A plain mutex: requests only push, and readers copy the record out.
    arrivals: Mutex<Vec<Arrival>>,
}

/// A running server; dropping it stops it.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Starts a server on a free port of 127.0.0.1, answering every request with `handler`.
    ///
    /// # Errors
    ///
    /// If the runtime cannot start or no port can be bound.
    pub fn start(
        handler: impl Fn(&Arrival) -> Reply + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0", handler)
    }

    /// Like [`Server::start`], on a given address (e.g. `127.0.0.1:8080`).
    ///
    /// # Errors
    ///
    /// If the runtime cannot start or the address cannot be bound.
    pub fn start_on(
        addr: &str,
        handler: impl Fn(&Arrival) -> Reply + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind(addr))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            handler: Box::new(handler),
            arrivals: Mutex::new(Vec::new()),
        });
        let (stop, mut stopped) = oneshot::channel::<()>();
        let serving = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("conveyor-demo-server".into())
            .spawn(move || {
                runtime.block_on(async move {
                    loop {
                        let stream = tokio::select! {
                            accepted = listener.accept() => match accepted {
                                Ok((stream, _)) => stream,
                                Err(_) => continue,
                            },
                            _ = &mut stopped => break,
                        };
                        let _ = stream.set_nodelay(true);
                        let shared = Arc::clone(&serving);
                        tokio::spawn(async move {
                            let service = service_fn(move |req| handle(req, Arc::clone(&shared)));
                            // A client hanging up mid-request is its business, not an error here.
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                });
                // Stop without waiting for replies still sleeping in the blocking pool (a plain
                // drop would wait for them), so dropping a server is immediate.
                runtime.shutdown_background();
            })?;
        Ok(Self {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// A copy of every request received so far, in arrival order.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.shared
            .arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many requests arrived so far.
    pub fn count(&self) -> usize {
        self.shared
            .arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn handle(
    request: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    let reply = {
        let mut arrivals = shared
            .arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let arrival = Arrival {
            index: arrivals.len(),
            at: Instant::now(),
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        // The handler runs under the lock so that its view (e.g. "nth request") matches the record.
        let reply = (shared.handler)(&arrival);
        arrivals.push(arrival);
        reply
    };
    if !reply.delay.is_zero() {
        // Tokio's timer rounds up to whole milliseconds (a 50 ms delay takes ~51 ms), which
        // would blur the demo's comparison with N × latency; a thread sleep is exact to tens of
        // microseconds, and the blocking pool grows with the concurrency the demo asks for.
        let delay = reply.delay;
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(delay)).await;
    }
    let mut response = Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        response = response.header(name.as_str(), value.as_str());
    }
    Ok(response
        .body(Full::new(Bytes::from(reply.body)))
        .unwrap_or_else(|_| {
            let mut broken = Response::new(Full::new(Bytes::from_static(b"bad reply")));
            *broken.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            broken
        }))
}
