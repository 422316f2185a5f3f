//! The conveyor handle: accepting items, waiting for them, shutting down.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::builder::{Backpressure, Builder, Config};
use crate::error::{BuildError, DeliveryError, SendError};
use crate::queue::State;
use crate::receipt::{Node, Receipt};
use crate::retry::random_u64;
use crate::stats::{CloseReport, Stats};
use crate::worker::{async_worker, thread_worker, Sink};

/// State shared by the handle and its workers.
///
/// One mutex guards all scheduling state: every operation touches the lanes and the
/// counters together, and one lock keeps `stats()` an exact snapshot. Each kind of
/// waiting has a condvar for threads and a `Notify` for tasks; the `Waiters` counts
/// in the state let a change skip the wake-up syscall when nobody waits.
pub(crate) struct Shared<T, R> {
    state: Mutex<State<T, R>>,
    /// Idle worker threads wait here for items.
    pub(crate) work: Condvar,
    /// Idle worker tasks wait here for items.
    pub(crate) work_async: Notify,
    /// Senders blocked by `Backpressure::Block` wait here for room.
    space: Condvar,
    space_async: Notify,
    /// `flush` and `close` wait here for settlements and worker exits.
    pub(crate) settled: Condvar,
    pub(crate) settled_async: Notify,
    pub(crate) config: Config,
    /// Prefix of every `Delivery::idempotency_key`, unique per conveyor.
    pub(crate) id_prefix: Arc<str>,
}

impl<T, R> Shared<T, R> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State<T, R>> {
        // State transitions never call user code under the lock, so a panic cannot
        // leave it half-updated; recover the guard instead of cascading the panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn wait<'a>(
        &self,
        cv: &Condvar,
        guard: MutexGuard<'a, State<T, R>>,
    ) -> MutexGuard<'a, State<T, R>> {
        cv.wait(guard).unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_until<'a>(
        &self,
        cv: &Condvar,
        guard: MutexGuard<'a, State<T, R>>,
        deadline: Option<Instant>,
    ) -> (MutexGuard<'a, State<T, R>>, bool) {
        match deadline {
            None => (self.wait(cv, guard), false),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return (guard, true);
                }
                let (guard, res) = cv
                    .wait_timeout(guard, left)
                    .unwrap_or_else(PoisonError::into_inner);
                (guard, res.timed_out() && Instant::now() >= deadline)
            }
        }
    }

    /// Wakes an idle worker for new work, unless enough workers were already woken
    /// for what is queued: an awake worker takes every runnable item before it
    /// sleeps again, so a burst of sends costs one wake-up, not one per item.
    fn wake_worker(&self, st: &mut State<T, R>) {
        let runnable = st.runnable();
        let w = &mut st.waiters;
        if w.idle_threads > w.woken_threads && runnable > w.woken_threads as u64 {
            w.woken_threads += 1;
            self.work.notify_one();
        }
        if w.idle_tasks > w.woken_tasks && runnable > w.woken_tasks as u64 {
            w.woken_tasks += 1;
            self.work_async.notify_one();
        }
    }

    fn wake_all(&self) {
        self.work.notify_all();
        self.work_async.notify_waiters();
        self.space.notify_all();
        self.space_async.notify_waiters();
        self.settled.notify_all();
        self.settled_async.notify_waiters();
    }

    pub(crate) fn wake_one_sender(&self, st: &State<T, R>) {
        if st.waiters.blocked_senders > 0 {
            self.space.notify_one();
        }
        if st.waiters.async_senders > 0 {
            self.space_async.notify_one();
        }
    }

    pub(crate) fn wake_flushers(&self, st: &State<T, R>) {
        if st.waiters.flushers > 0 && st.unsettled_unpaused() == 0 {
            self.settled.notify_all();
            self.settled_async.notify_waiters();
        }
    }
}

/// How a send may wait for room.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Block the thread (`send` under `Backpressure::Block`).
    Thread,
    /// Return to the caller to await (`send_async`).
    Task,
    /// Never wait (`try_send`).
    Never,
}

/// Why a send did not complete now.
enum Refused<T, R> {
    Send(SendError<Arc<Node<T, R>>>),
    /// `send_async` must await room; it is registered as an async sender.
    MustWait(Arc<Node<T, R>>),
}

/// Delivers items to a sink strictly in order, on workers it owns, without making
/// the producer wait for the sink.
///
/// Build one with [`Conveyor::builder`]. Every method takes `&self`; share a
/// conveyor between threads with an [`Arc`]. Dropping it closes it, draining for at
/// most the configured [`drain_timeout`](Builder::drain_timeout).
///
/// # Examples
///
/// ```
/// use conveyor::{Conveyor, Ordering};
/// use std::sync::{Arc, Mutex};
///
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let log = seen.clone();
/// let c: Conveyor<u32> = Conveyor::builder()
///     .ordering(Ordering::Strict)
///     .build(move |d| {
///         log.lock().unwrap().push(*d.item()); // a slow network call in real life
///         Ok(())
///     })?;
/// for i in 0..100 {
///     c.send(i).unwrap(); // returns at once
/// }
/// c.flush();
/// assert_eq!(*seen.lock().unwrap(), (0..100).collect::<Vec<_>>());
/// # Ok::<(), conveyor::BuildError>(())
/// ```
#[must_use = "dropping a conveyor closes it: items sent later are refused"]
pub struct Conveyor<T: Send + Sync + 'static, R: Send + 'static = ()> {
    shared: Arc<Shared<T, R>>,
    /// The runtime for async sinks when built outside one; shut down in the
    /// background on drop so that dropping never blocks or panics inside async code.
    runtime: Option<tokio::runtime::Runtime>,
}

impl<T: Send + Sync + 'static, R: Send + 'static> Conveyor<T, R> {
    /// Starts configuring a conveyor; see [`Builder`] for the settings and defaults.
    pub fn builder() -> Builder<T, R> {
        Builder::default()
    }

    pub(crate) fn start(config: Config, sink: Sink<T, R>) -> Result<Self, BuildError> {
        let workers = config.ordering.workers();
        let state = State::new(
            config.ordering,
            config.capacity,
            config.on_failure,
            config.rate_limit,
            1,
        );
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            work: Condvar::new(),
            work_async: Notify::new(),
            space: Condvar::new(),
            space_async: Notify::new(),
            settled: Condvar::new(),
            settled_async: Notify::new(),
            config,
            id_prefix: Arc::from(format!("{:016x}", random_u64())),
        });
        let mut conveyor = Conveyor {
            shared: shared.clone(),
            runtime: None,
        };
        match sink {
            Sink::Blocking(f) => {
                for worker in 0..workers {
                    let (shared, f) = (shared.clone(), f.clone());
                    let spawned = std::thread::Builder::new()
                        .name(format!("conveyor-{worker}"))
                        .spawn(move || thread_worker(shared, f, worker));
                    if let Err(e) = spawned {
                        // Workers not started will never exit: account for them so the
                        // close below does not wait for them.
                        let mut st = conveyor.shared.lock();
                        st.live_workers -= workers - worker;
                        drop(st);
                        return Err(BuildError::Spawn(e));
                    }
                }
            }
            Sink::Async(f) => {
                let handle = match tokio::runtime::Handle::try_current() {
                    Ok(handle) => handle,
                    Err(_) => {
                        let rt = tokio::runtime::Builder::new_multi_thread()
                            .worker_threads(2)
                            .thread_name("conveyor-async")
                            .enable_time()
                            .build()?;
                        let handle = rt.handle().clone();
                        conveyor.runtime = Some(rt);
                        handle
                    }
                };
                for worker in 0..workers {
                    handle.spawn(async_worker(shared.clone(), f.clone(), worker));
                }
            }
        }
        Ok(conveyor)
    }

    fn attempt_limit(&self) -> u32 {
        self.shared.config.retry.attempts()
    }

    /// The one path every send variant takes. `was_waiting` says this async sender
    /// registered itself as waiting on its previous try.
    fn submit(
        &self,
        node: Arc<Node<T, R>>,
        wait: Wait,
        was_waiting: bool,
    ) -> Result<Receipt<R>, Refused<T, R>> {
        let shared = &*self.shared;
        let mut st = shared.lock();
        if was_waiting {
            st.waiters.async_senders -= 1;
        }
        let mut evicted = None;
        loop {
            if st.closed {
                return Err(Refused::Send(SendError::Closed(node)));
            }
            if !st.is_full() {
                break;
            }
            match (shared.config.backpressure, wait) {
                (Backpressure::Block, Wait::Thread) => {
                    st.waiters.blocked_senders += 1;
                    st = shared.wait(&shared.space, st);
                    st.waiters.blocked_senders -= 1;
                }
                (Backpressure::Block, Wait::Task) => {
                    st.waiters.async_senders += 1;
                    return Err(Refused::MustWait(node));
                }
                (Backpressure::Block | Backpressure::Reject, _) => {
                    return Err(Refused::Send(SendError::Full(node)));
                }
                (Backpressure::DropOldest, _) if evicted.is_none() => {
                    evicted = st.drop_oldest();
                    if evicted.is_none() {
                        return Ok(self.accept_dropped(st, node));
                    }
                }
                (Backpressure::DropNewest | Backpressure::DropOldest, _) => {
                    return Ok(self.accept_dropped(st, node));
                }
            }
        }
        let receipt = Receipt::new(node.clone());
        if st.accept(node, self.attempt_limit()) {
            shared.wake_worker(&mut st);
        }
        drop(st);
        if let Some(old) = evicted {
            old.settle(Err(DeliveryError::Dropped));
        }
        Ok(receipt)
    }

    fn accept_dropped(
        &self,
        mut st: MutexGuard<'_, State<T, R>>,
        node: Arc<Node<T, R>>,
    ) -> Receipt<R> {
        st.accept_dropped(&node);
        drop(st);
        tracing::debug!(seq = node.seq(), "queue full: item dropped by policy");
        node.settle(Err(DeliveryError::Dropped));
        Receipt::new(node)
    }

    fn send_with(
        &self,
        key: Option<Arc<str>>,
        item: T,
        wait: Wait,
    ) -> Result<Receipt<R>, SendError<T>> {
        match self.submit(Arc::new(Node::new(key, item)), wait, false) {
            Ok(receipt) => Ok(receipt),
            Err(Refused::Send(e)) => Err(give_back(e)),
            Err(Refused::MustWait(_)) => unreachable!("only async sends are told to wait"),
        }
    }

    /// Accepts an item for delivery and returns at once with its [`Receipt`].
    ///
    /// It waits only when the queue is full and the policy is
    /// [`Backpressure::Block`] (the default); the sink's speed never matters
    /// otherwise. In async code use [`Conveyor::send_async`] instead, which awaits
    /// room rather than blocking the runtime's thread.
    ///
    /// # Errors
    ///
    /// [`SendError::Closed`] after [`close`](Conveyor::close); [`SendError::Full`]
    /// when full under [`Backpressure::Reject`]. The item is handed back in both.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    ///
    /// let c: Conveyor<String> = Conveyor::builder().build(|d| {
    ///     println!("sending {}", d.item());
    ///     Ok(())
    /// })?;
    /// let receipt = c.send("hello".to_owned()).unwrap();
    /// receipt.wait().unwrap();
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn send(&self, item: T) -> Result<Receipt<R>, SendError<T>> {
        self.send_with(None, item, Wait::Thread)
    }

    /// Like [`Conveyor::send`], with a key: under [`Ordering::Keyed`](crate::Ordering::Keyed)
    /// items with the same key are delivered strictly in order, and different keys in
    /// parallel. In the other modes the key is only passed on to the sink.
    ///
    /// # Errors
    ///
    /// As for [`Conveyor::send`].
    pub fn send_keyed(&self, key: impl Into<String>, item: T) -> Result<Receipt<R>, SendError<T>> {
        self.send_with(Some(Arc::from(key.into())), item, Wait::Thread)
    }

    /// Accepts an item only if that needs no waiting, whatever the policy.
    ///
    /// # Errors
    ///
    /// [`SendError::Full`] when the queue is full and the policy would have to wait
    /// or reject; [`SendError::Closed`] after close.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, SendError};
    ///
    /// let (gate_tx, gate) = std::sync::mpsc::channel::<()>();
    /// let gate = std::sync::Mutex::new(gate);
    /// let c: Conveyor<u32> = Conveyor::builder().capacity(1).build(move |_d| {
    ///     gate.lock().unwrap().recv().ok(); // stalls until released
    ///     Ok(())
    /// })?;
    /// let mut full = false;
    /// for i in 0..3 {
    ///     full |= matches!(c.try_send(i), Err(SendError::Full(_)));
    /// }
    /// assert!(full, "one item in flight and one queued fill a capacity of 1");
    /// drop(gate_tx);
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn try_send(&self, item: T) -> Result<Receipt<R>, SendError<T>> {
        self.send_with(None, item, Wait::Never)
    }

    /// [`Conveyor::try_send`] with a key.
    ///
    /// # Errors
    ///
    /// As for [`Conveyor::try_send`].
    pub fn try_send_keyed(
        &self,
        key: impl Into<String>,
        item: T,
    ) -> Result<Receipt<R>, SendError<T>> {
        self.send_with(Some(Arc::from(key.into())), item, Wait::Never)
    }

    async fn submit_async(
        &self,
        key: Option<Arc<str>>,
        item: T,
    ) -> Result<Receipt<R>, SendError<T>> {
        let mut node = Arc::new(Node::new(key, item));
        let mut was_waiting = false;
        loop {
            let notified = self.shared.space_async.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.submit(node, Wait::Task, was_waiting) {
                Ok(receipt) => return Ok(receipt),
                Err(Refused::Send(e)) => return Err(give_back(e)),
                Err(Refused::MustWait(back)) => {
                    node = back;
                    was_waiting = true;
                    notified.await;
                }
            }
        }
    }

    /// Accepts an item, awaiting room in the queue if needed (never delivery).
    ///
    /// # Errors
    ///
    /// As for [`Conveyor::send`].
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), conveyor::BuildError> {
    /// use conveyor::Conveyor;
    ///
    /// let c: Conveyor<u32> = Conveyor::builder().build_async(|_d| async { Ok(()) })?;
    /// for i in 0..10 {
    ///     c.send_async(i).await.unwrap();
    /// }
    /// c.flush_async().await;
    /// assert_eq!(c.stats().delivered, 10);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn send_async(&self, item: T) -> Result<Receipt<R>, SendError<T>> {
        self.submit_async(None, item).await
    }

    /// [`Conveyor::send_async`] with a key (see [`Conveyor::send_keyed`]).
    ///
    /// # Errors
    ///
    /// As for [`Conveyor::send`].
    pub async fn send_keyed_async(
        &self,
        key: impl Into<String>,
        item: T,
    ) -> Result<Receipt<R>, SendError<T>> {
        self.submit_async(Some(Arc::from(key.into())), item).await
    }

    fn flush_until(&self, deadline: Option<Instant>) -> bool {
        blocking_section(|| {
            let shared = &*self.shared;
            let mut st = shared.lock();
            st.waiters.flushers += 1;
            let mut timed_out = false;
            while st.unsettled_unpaused() > 0 && !timed_out {
                (st, timed_out) = shared.wait_until(&shared.settled, st, deadline);
            }
            st.waiters.flushers -= 1;
            st.unsettled_unpaused() == 0
        })
    }

    /// Blocks until every accepted item has settled, except items held in paused
    /// lanes. With producers still sending, it waits until the queue is empty at
    /// some moment; use [`Conveyor::flush_timeout`] to bound the wait.
    pub fn flush(&self) {
        self.flush_until(None);
    }

    /// [`Conveyor::flush`] for at most `timeout`; returns whether everything settled.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    /// use std::time::Duration;
    ///
    /// let c: Conveyor<u32> = Conveyor::builder().build(|_d| {
    ///     std::thread::sleep(Duration::from_millis(200));
    ///     Ok(())
    /// })?;
    /// c.send(1).unwrap();
    /// assert!(!c.flush_timeout(Duration::from_millis(1)));
    /// assert!(c.flush_timeout(Duration::from_secs(30)));
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn flush_timeout(&self, timeout: Duration) -> bool {
        self.flush_until(Some(Instant::now() + timeout))
    }

    /// Awaits what [`Conveyor::flush`] waits for, without blocking the runtime.
    pub async fn flush_async(&self) {
        let shared = &*self.shared;
        loop {
            let notified = shared.settled_async.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = shared.lock();
                if st.unsettled_unpaused() == 0 {
                    return;
                }
                st.waiters.flushers += 1;
            }
            notified.await;
            shared.lock().waiters.flushers -= 1;
        }
    }

    /// Stops accepting items and drains, waiting at most the configured
    /// [`drain_timeout`](Builder::drain_timeout); see [`Conveyor::close_timeout`].
    pub fn close(&self) -> CloseReport {
        self.close_timeout(self.shared.config.drain_timeout)
    }

    /// Stops accepting items (later sends return [`SendError::Closed`]), lets the
    /// workers deliver what is queued, and waits for them for at most `timeout`.
    ///
    /// Items still unsettled at the deadline, and items held in paused lanes, are
    /// reported in the [`CloseReport`] and their receipts settle as
    /// [`DeliveryError::Closed`]. A sink call still running at the deadline is left
    /// to finish on its own thread; it never makes `close` wait longer.
    pub fn close_timeout(&self, timeout: Duration) -> CloseReport {
        let deadline = Instant::now().checked_add(timeout);
        blocking_section(|| {
            let shared = &*self.shared;
            let mut st = shared.lock();
            st.closed = true;
            shared.wake_all();
            st.waiters.flushers += 1;
            let mut timed_out = false;
            // Idle workers need not have exited: on a single-threaded runtime they
            // could not until this call returns. What matters is that nothing
            // deliverable is left (or that no worker is left to deliver it).
            while st.unsettled_unpaused() > 0 && st.live_workers > 0 && !timed_out {
                (st, timed_out) = shared.wait_until(&shared.settled, st, deadline);
            }
            st.waiters.flushers -= 1;
            // Workers exit when they next look at the state; one still inside a sink
            // call past the deadline finishes that call on its own.
            st.abandoned = true;
            shared.wake_all();
            let left = st.unsettled_nodes();
            let report = CloseReport {
                stats: st.stats(),
                left: st.unsettled(),
                drained: st.unsettled() == 0,
            };
            drop(st);
            for node in left {
                node.settle(Err(DeliveryError::Closed));
            }
            report
        })
    }

    /// Restarts a lane paused by [`OnFailure::Pause`](crate::OnFailure::Pause): its
    /// held item is tried again with a fresh retry budget, then the rest follow in
    /// order. The lane is the item's key under keyed ordering, `""` otherwise.
    /// Returns whether the lane was paused.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, OnFailure, SinkError};
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::sync::Arc;
    ///
    /// let healthy = Arc::new(AtomicBool::new(false));
    /// let h = healthy.clone();
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .on_failure(OnFailure::Pause)
    ///     .build(move |_d| {
    ///         if h.load(Ordering::SeqCst) { Ok(()) } else { Err(SinkError::permanent("down")) }
    ///     })?;
    /// c.send(1).unwrap();
    /// c.flush(); // returns: the held item does not count
    /// assert_eq!(c.paused(), vec![String::new()]);
    /// healthy.store(true, Ordering::SeqCst);
    /// assert!(c.resume(""));
    /// c.flush();
    /// assert_eq!(c.stats().delivered, 1);
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn resume(&self, lane: &str) -> bool {
        let shared = &*self.shared;
        let mut st = shared.lock();
        let resumed = st.resume(lane, self.attempt_limit());
        if resumed {
            // A pipelined lane may now run several items: wake every idle worker.
            shared.work.notify_all();
            shared.work_async.notify_waiters();
        }
        resumed
    }

    /// The lanes paused by [`OnFailure::Pause`](crate::OnFailure::Pause), sorted.
    pub fn paused(&self) -> Vec<String> {
        self.shared.lock().paused_lanes()
    }

    /// A consistent snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats()
    }
}

fn give_back<T, R>(e: SendError<Arc<Node<T, R>>>) -> SendError<T> {
    // The node never left this call, so this is its only reference.
    let unwrap = |node: Arc<Node<T, R>>| match Arc::try_unwrap(node) {
        Ok(node) => node.into_item(),
        Err(_) => unreachable!("a refused node is not shared"),
    };
    match e {
        SendError::Full(node) => SendError::Full(unwrap(node)),
        SendError::Closed(node) => SendError::Closed(unwrap(node)),
    }
}

/// Runs a blocking wait; inside a multi-threaded Tokio runtime it tells the runtime
/// first, so that other tasks (an async sink among them) keep running meanwhile.
fn blocking_section<O>(f: impl FnOnce() -> O) -> O {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl<T: Send + Sync + 'static, R: Send + 'static> Drop for Conveyor<T, R> {
    fn drop(&mut self) {
        let report = self.close_timeout(self.shared.config.drain_timeout);
        if !report.drained {
            tracing::warn!(
                left = report.left,
                delivered = report.stats.delivered,
                failed = report.stats.failed,
                "conveyor dropped with items not delivered"
            );
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl<T: Send + Sync + 'static, R: Send + 'static> fmt::Debug for Conveyor<T, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conveyor")
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish()
    }
}
