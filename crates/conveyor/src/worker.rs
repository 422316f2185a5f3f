//! Delivery workers: one loop per allowed concurrent sink call, as an OS thread for a
//! blocking sink or a Tokio task for an async one.
//!
//! A worker settles the job it just finished and takes the next one under a single
//! acquisition of the state lock, so in steady state a strict conveyor costs one lock
//! round trip per item and no context switch between items. When the lanes have nothing
//! for it, it moves every item the producers left in the intake into the lanes at once (a
//! paced worker at most every [`LEASE_DRAIN`], spinning until then: see
//! `Shared::drain_out_of_work`).

use std::cell::Cell;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::builder::OnFailure;
use crate::conveyor::Shared;
use crate::durable::{Durable, Op};
use crate::error::{panic_message, SinkError};
use crate::intake::Wake;
use crate::journal::Settlement as Settled;
use crate::queue::{Job, Leased, Outcome, Settlement, State};
use crate::receipt::{settle_and_release, Delivery, Panic};
use crate::receipt::{Node, NodeRef};
use crate::slab::{Counted, Returns};

type BlockingFn<T, R> = dyn Fn(Delivery<T>) -> Result<R, SinkError> + Send + Sync;
pub(crate) type BoxFuture<R> = Pin<Box<dyn Future<Output = Result<R, SinkError>> + Send>>;
type AsyncFn<T, R> = dyn Fn(Delivery<T>) -> BoxFuture<R> + Send + Sync;

/// The user's sink, in one of its two shapes.
pub(crate) enum Sink<T, R> {
    Blocking(Arc<BlockingFn<T, R>>),
    Async(Arc<AsyncFn<T, R>>),
}

/// How often a worker waiting for its item's journal commit looks for a shutdown.
const WRITTEN_CHECK: Duration = Duration::from_millis(50);

/// What a worker does next.
pub(crate) enum Step<T, R> {
    /// Run this job, after waking the idle workers named (outside the state lock).
    Run(Job<T, R>, Wake),
    /// Run the leased items, after waking the idle workers named.
    Lease(Wake),
    Wait,
    Exit,
}

/// A worker thread's part in the lookout (see `IntakeLine::lookout` in `conveyor.rs`).
#[derive(Default)]
pub(crate) struct Lookout {
    /// This thread holds the lookout.
    pub(crate) held: bool,
    /// It held the lookout since it last took a job (and may have slept since, woken by a
    /// send that found it asleep).
    looked: bool,
    /// It found the job it runs while looking out, and other workers sleep: it takes the
    /// lookout back once that job is done, if nobody else holds it and no items wait in the
    /// intake (see `Shared::retake_lookout`).
    retake: bool,
}

/// A job back from the sink, on its way to `step`.
struct Finished<T, R> {
    job: Job<T, R>,
    outcome: Outcome<R>,
    /// The failure's text for the journal, made before taking the state lock: an error's
    /// `Display` is user code, which may take long or even ask the conveyor for its stats.
    journal_error: Option<String>,
}

/// Most items a worker runs per turn of the state lock (see `State::lease`), for a sink fast
/// enough that [`LEASE_TIME`] allows more. Each turn costs a lease some fixed work (the
/// state lock, a drain of the intake, two clock reads, the lane's bookkeeping), shared by its
/// items: at 32 items that was about 15% of an instant sink's strict end-to-end time (see
/// BENCHMARKS.md). `stats()` does not lag behind a lease (it reads the worker's claims), and
/// the delivered items a lease keeps in its lane until it ends are what its sink ran in about
/// [`LEASE_TIME`].
const LEASE: usize = 256;

/// How often a leasing worker moves the intake's items into the lanes, at most, where it
/// could do so after every lease (see `Leasing::drain_due`): after leases that keep the
/// lookout, and, for a paced worker, whenever it runs out of work. It is also how long an item
/// may wait in the intake for that, at most, while its worker keeps busy.
const LEASE_DRAIN: Duration = Duration::from_micros(50);

/// About how long a lease may last (see `State::lease_size`). A sender blocked on a full queue is
/// woken when a lease ends, not as each of its items is delivered, and the delivered items stay
/// in the lane until then: a lease must stay short. Only a sink whose calls take well under
/// this gains from leases (a turn of the lock costs a fraction of a microsecond); a slower one
/// runs one item per turn of the lock, as before leases.
const LEASE_TIME: Duration = Duration::from_micros(20);

/// A worker thread's side of its leases (see `State::lease`).
struct Leasing<T, R> {
    /// The items of the current lease, in order.
    items: Vec<Leased<T, R>>,
    /// How the last lease ended, for `step` to record.
    ended: Option<LeaseEnd<R>>,
    /// Nodes of delivered items taken off the lane, to drop outside the state lock (an item's
    /// drop is user code).
    release: Vec<NodeRef<T, R>>,
    /// The lease size this worker's last sink calls measured (see `measured`), for `step` to
    /// make the conveyor's (see `State::lease_size`).
    fit: Option<usize>,
    /// When this worker last moved the intake's items into the lanes, where that is rate
    /// limited (see `drain_due`).
    drained_at: Option<Instant>,
}

impl<T, R> Leasing<T, R> {
    fn new() -> Self {
        Self {
            items: Vec::with_capacity(LEASE),
            ended: None,
            release: Vec::with_capacity(LEASE),
            fit: None,
            drained_at: None,
        }
    }

    /// Until when this worker holds back its next drain of the intake: [`LEASE_DRAIN`] after
    /// its last one (see `drained`), if that has not passed. Every drain meets the producers on
    /// the intake lock and on the lines of the items they just wrote: draining after every
    /// lease slowed a busy key's producer by ~10%, and a lone worker that kept pace with its
    /// producer drained every few dozen items, which cost several times a send's own work on
    /// a machine whose cores were far apart (see `Shared::drain_out_of_work`).
    fn held_back_until(&self) -> Option<Instant> {
        let until = self.drained_at? + LEASE_DRAIN;
        (Instant::now() < until).then_some(until)
    }

    /// Whether the worker may drain the intake now (see `held_back_until`).
    fn drain_due(&self) -> bool {
        self.held_back_until().is_none()
    }

    /// Records a rate-limited drain that moved items.
    fn drained(&mut self) {
        self.drained_at = Some(Instant::now());
    }

    /// Sizes the next lease from `calls` sink calls (with their receipts) that took `took`: as
    /// many items as they say fit in [`LEASE_TIME`], at most [`LEASE`].
    fn measured(&mut self, calls: usize, took: Duration) {
        let Some(per_call) = u32::try_from(calls).ok().and_then(|n| took.checked_div(n)) else {
            return;
        };
        let fit = LEASE_TIME.as_nanos() / per_call.as_nanos().max(1);
        self.fit = Some(usize::try_from(fit).unwrap_or(LEASE).clamp(1, LEASE));
    }
}

/// Whether a worker paces its drains of the intake when it runs out of work (see
/// `Shared::drain_out_of_work`): when it runs every lane (see `State::lone_worker`), or the
/// sink is quick enough for leases of several items (see `State::lease_size`), so that a
/// worker may keep pace with its producer. A slower sink's workers drain at once: their items
/// wait for the calls, not the other way round.
fn paced<T, R>(st: &State<T, R>) -> bool {
    st.lone_worker() || st.lease_size > 1
}

/// How many items of a lease were delivered, and the reply of the last if its receipt is not
/// settled yet (it settles after `step` counts it, as a job's receipt does).
struct LeaseEnd<R> {
    done: usize,
    last: Option<R>,
}

/// How a lease's run ended.
enum LeaseRan<R> {
    Ended(LeaseEnd<R>),
    /// After `done` items, the next one's first attempt failed: it goes on as a job.
    Failed {
        done: usize,
        error: SinkError,
    },
}

/// After a failed attempt: try again at this instant, or stop with this outcome.
enum Next<R> {
    RetryAt(Instant),
    Done(Outcome<R>),
}

impl<T: Send + Sync + 'static, R: Send + 'static> Shared<T, R> {
    /// Records the finished job (if any) and picks the next step, under the lock. A worker
    /// holding the lookout gives it up before it runs a job.
    fn step(
        &self,
        st: &mut State<T, R>,
        worker: usize,
        finished: Option<Finished<T, R>>,
        settle: &mut Vec<Settlement<T, R>>,
        lookout: &mut Lookout,
        mut leasing: Option<&mut Leasing<T, R>>,
    ) -> Step<T, R> {
        if let Some(Finished {
            job,
            outcome,
            journal_error,
        }) = finished
        {
            if let Some(durable) = &self.durable {
                self.journal_outcome(durable, st, &job, &outcome, journal_error);
            }
            match st.finish(worker, job, outcome) {
                Some(settlement) => {
                    // Counted until its receipt is settled outside the lock, so `flush`
                    // returns only after receipts and their callbacks are done.
                    st.settling_by[worker] += 1;
                    settle.push(settlement);
                }
                // Back in its lane: the intake's copy of the lanes' count is now low.
                None => self.intake().set_lanes_queued(st.queued()),
            }
            self.wake_flushers(st);
        }
        if let Some(LeaseEnd { done, last }) = leasing.as_mut().and_then(|l| l.ended.take()) {
            let leasing = leasing.as_deref_mut().expect("it ended a lease");
            self.end_lease(st, worker, done, &mut leasing.release);
            if let Some(reply) = last {
                let node = leasing
                    .release
                    .pop()
                    .expect("the lease's last item was delivered");
                settle.push((node, Ok(reply)));
            }
        }
        // Whatever this step does changes what the others can do.
        self.wake_waiting_inside(st);
        if st.abandoned || st.stopping {
            return Step::Exit;
        }
        // Its lease, if it kept the lookout through one, is over. The items sent meanwhile
        // woke nobody: they join the lanes before the next lease (at most every
        // `LEASE_DRAIN`), so that `took_work` wakes a worker for another key's. Left in the
        // intake, they would wait until this worker ran out of leases, which a busy key's
        // backlog may take long, or until the worker standing by next looked.
        if st.lookout_lease_over(worker) && self.intake_filled() {
            if let Some(leasing) = leasing.as_deref_mut().filter(|l| l.drain_due()) {
                self.drain(st);
                leasing.drained();
            }
        }
        if let Some(size) = leasing.as_deref_mut().and_then(|l| l.fit.take()) {
            st.lease_size = size;
        }
        if let Some(leasing) = leasing.as_deref_mut().filter(|_| st.lease_size > 1) {
            let size = st.lease_size;
            if st.lease(worker, size, &mut leasing.items)
                || (self.drain_out_of_work(st, Some(&mut *leasing))
                    && st.lease(worker, size, &mut leasing.items))
            {
                // Under the state lock, which a shutdown closing the lease holds too.
                self.lease_claims[worker].store(0, AtomicOrdering::Relaxed);
                // See `IntakeLine::lookout`. (The lookout a worker standing by took away is
                // not this worker's any more.)
                let keep = st.lease_may_keep_lookout(worker)
                    && ((lookout.held && self.holds_lookout(worker)) || self.claim_lookout(worker));
                lookout.held |= keep;
                if keep {
                    st.lookout_leaser = Some(worker);
                }
                // Other lanes' items left to this worker are watched: through the lookout it
                // keeps, by the worker standing by; or by the worker holding the lookout, which
                // takes them at its next step if this one has not yet (it is awake, or runs a
                // lease it keeps the lookout through, which a worker stands by in turn).
                let alone = st.runs_ready_lanes_alone() && (keep || self.lookout_elsewhere(worker));
                return Step::Lease(self.took_work(st, worker, lookout, keep, alone));
            }
        }
        let next = match st.next_job(worker) {
            Some(job) => Some(job),
            None if self.drain_out_of_work(st, leasing) => st.next_job(worker),
            None => None,
        };
        if let Some(job) = next {
            return Step::Run(job, self.took_work(st, worker, lookout, false, false));
        }
        // A journal replay still loading items keeps the workers for them, even after close,
        // as do items held behind a retry, and a lease of the pipelined lane: if a call in it
        // gets stuck, a worker standing by cuts it, and the others deliver the items after it
        // (see `Shared::stand_by`).
        if st.closed && !st.replaying && !st.retry_pending() && st.watched_lease().is_none() {
            return Step::Exit;
        }
        Step::Wait
    }

    /// Moves the intake's items into the lanes for a worker out of work; returns whether it
    /// moved any. A paced worker (see `paced`) holds this back until [`LEASE_DRAIN`]
    /// after its last drain (see `Leasing::held_back_until`), spinning meanwhile as the
    /// lookout (see `thread_worker`), so that its producer fills a batch undisturbed.
    /// Otherwise, once such a worker kept pace with its producer, the two met at every few
    /// dozen items, on the intake lock and on the lines of the items just sent, and stayed
    /// that way: on stretches of time where every handoff between the machine's cores was
    /// slow, strict end to end took 10-20 ms per 100k items instead of 2. Drains every 50 us
    /// made such stretches 30-40% faster and the best ones ~3% slower (see BENCHMARKS.md).
    /// Pipelined and keyed workers fell into the same once a one-word `SinkError` made them
    /// as fast as their producer (thousands of leases of a few dozen items a round instead of
    /// ~400 of 256). The price is latency: an item sent less than [`LEASE_DRAIN`] after the
    /// last drain waits for the rest of it.
    fn drain_out_of_work(&self, st: &mut State<T, R>, leasing: Option<&mut Leasing<T, R>>) -> bool {
        let Some(leasing) = leasing.filter(|_| paced(st)) else {
            return self.drain(st);
        };
        // `filled` may be stale: the worker then looks out for the items it missed, or finds
        // them under the intake lock before it sleeps (`register_idle`).
        if !self.intake_filled() || !leasing.drain_due() {
            return false;
        }
        let moved = self.drain(st);
        if moved {
            leasing.drained();
        }
        moved
    }

    /// Bookkeeping for a worker that took a job or a lease: it gives up the lookout (unless it
    /// `keep`s it through a lease, see `IntakeLine::lookout`) and wakes
    /// a sender for the room it made; returns the idle workers to wake for what is left
    /// (none if it runs the other ready lanes `alone`, see `State::runs_ready_lanes_alone`),
    /// and for a watched lease nobody stands by (see `Shared::stand_by`).
    fn took_work(
        &self,
        st: &mut State<T, R>,
        worker: usize,
        lookout: &mut Lookout,
        keep: bool,
        alone: bool,
    ) -> Wake {
        if !keep && std::mem::take(&mut lookout.held) {
            self.release_lookout(st, worker);
        }
        // A worker that was looking out goes on looking out after this work, while other
        // workers sleep: sends during its sink calls then need not wake one of them.
        // (One that keeps it through a lease holds it still.)
        lookout.retake = std::mem::take(&mut lookout.looked) && st.idle_workers > 0 && !keep;
        self.wake_one_sender(st);
        let mut wake = if alone {
            Wake::default()
        } else {
            self.pass_work_on(st)
        };
        // A watched lease wants a worker standing by (see `Shared::stand_by`): one of the idle
        // ones, if none does yet. Checked for every job too: in keyed mode the worker standing
        // by, or the one woken to, may take another key's item instead, and the lease keeps
        // the lookout, so sends wake nobody who could stand by in its place.
        if !wake.thread && !st.standby && st.wants_standby() {
            wake.thread = self.intake().wake_another().thread;
        }
        wake
    }

    /// Tells the journal how a job ended, under the state lock so it follows the job's append.
    fn journal_outcome(
        &self,
        durable: &Durable<T>,
        st: &State<T, R>,
        job: &Job<T, R>,
        outcome: &Outcome<R>,
        error: Option<String>,
    ) {
        let seq = job.node.seq();
        let error = || error.expect("made for every failure (see `Shared::finished`)");
        let mark = match outcome {
            Outcome::Delivered(_) => Settled::Delivered(seq),
            Outcome::Failed(_) => Settled::Failed {
                seq,
                error: error(),
                attempts: job.attempts,
            },
            // The item stays pending at the head of its lane.
            Outcome::Paused => Settled::Paused {
                lane: st.lane_id(job.node.key()).to_string(),
                error: error(),
            },
            Outcome::Interrupted => return,
        };
        durable.push(Op::Settle(mark));
    }

    /// A job back from the sink, with what `step` needs made outside the state lock.
    fn finished(&self, job: Job<T, R>, outcome: Outcome<R>) -> Finished<T, R> {
        let (outcome, journal_error) = match outcome {
            Outcome::Failed(error) if self.config.on_failure == OnFailure::Pause => {
                // The item stays unsettled, so no receipt reports this error: the log does.
                // Its `Display` and its drop are user code, which must not run under the state
                // lock (it may be slow, or ask this conveyor for its stats).
                let text = error.to_string();
                drop(error);
                let lane = match job.node.key() {
                    Some(key) if self.config.ordering.is_keyed() => &**key,
                    _ => "",
                };
                tracing::warn!(
                    lane,
                    seq = job.node.seq(),
                    attempts = job.attempts,
                    error = %text,
                    "item failed; its lane is paused until resume(lane)"
                );
                (Outcome::Paused, self.durable.is_some().then_some(text))
            }
            Outcome::Failed(error) if self.durable.is_some() => {
                let text = error.to_string();
                (Outcome::Failed(error), Some(text))
            }
            outcome => (outcome, None),
        };
        Finished {
            job,
            outcome,
            journal_error,
        }
    }

    /// Records receipts this worker settled since it last held the lock.
    fn settled_outside(&self, st: &mut State<T, R>, worker: usize, done: u64) {
        if done > 0 {
            st.settling_by[worker] -= done;
            self.wake_flushers(st);
        }
    }

    /// Bookkeeping for a worker that leaves; `close` waits for the last one.
    fn exit(&self, st: &mut State<T, R>) {
        st.live_workers -= 1;
        self.wake_waiting_inside(st);
        self.settled.notify_all();
        self.settled_async.notify_waiters();
    }

    /// Turns a failed attempt into a retry time or a final outcome.
    fn after_failure(&self, worker: usize, job: &Job<T, R>, error: SinkError) -> Next<R> {
        if !error.is_retryable() || job.attempts >= job.attempt_limit {
            return Next::Done(Outcome::Failed(error));
        }
        let delay = self.config.retry.backoff(job.attempts, error.retry_after());
        // Before the state lock: the subscriber's writing and the error's `Display` (user
        // code) would hold up every worker and sender that needs the lock.
        tracing::debug!(seq = job.node.seq(), attempt = job.attempts, ?delay, %error, "retrying");
        let mut st = self.lock();
        if st.abandoned {
            return Next::Done(Outcome::Interrupted);
        }
        st.schedule_retry(worker);
        Next::RetryAt(later(delay))
    }

    /// A retry's rate-limit slot, reserved once its backoff is over (see
    /// `State::schedule_retry`), if it must wait for it; none once a shutdown refuses the
    /// retry. The items behind it in a pipelined lane are still held, so they reserve later
    /// slots and start after it.
    fn retry_slot(&self) -> Option<Instant> {
        let mut st = self.lock();
        if st.start_refused(true) {
            return None;
        }
        st.reserve_start().filter(|&slot| slot > Instant::now())
    }

    /// After waiting for a rate-limit slot or a backoff: whether the job may start (see
    /// `State::attempt_begins`). A retry lets the items behind it start, on idle workers too.
    fn may_start(&self, worker: usize, retry: bool) -> bool {
        let mut st = self.lock();
        let go = st.attempt_begins(worker, retry);
        let wake = if retry {
            self.pass_work_on(&st)
        } else {
            Wake::default()
        };
        drop(st);
        self.notify_workers(wake);
        go
    }

    /// Waits until `at` for a rate-limit slot or (`retry`) a backoff, or until a shutdown
    /// refuses the start: a server's hour-long `Retry-After` must not keep the worker, and
    /// with it the sink, alive for an hour after the conveyor closed.
    fn wait_to_start(&self, at: Instant, retry: bool) {
        let mut st = self.lock();
        let mut timed_out = false;
        while !timed_out && !st.start_refused(retry) {
            (st, timed_out) = self.wait_until(&self.shutdown, st, Some(at));
        }
    }

    async fn wait_to_start_async(&self, at: Instant, retry: bool) {
        let sleep = tokio::time::sleep_until(at.into());
        tokio::pin!(sleep);
        loop {
            // Enabled before the state is read: a shutdown after the read still wakes it.
            let shutdown = self.shutdown_async.notified();
            tokio::pin!(shutdown);
            shutdown.as_mut().enable();
            if self.lock().start_refused(retry) {
                return;
            }
            tokio::select! {
                () = &mut sleep => return,
                () = &mut shutdown => {}
            }
        }
    }

    /// With a journal: waits until the append of `seq` is committed, so that nothing reaches
    /// the sink before it is on disk (see `durable.rs`). Returns false if the conveyor was
    /// abandoned, or its journal writer stopped, first: the item is not delivered.
    fn wait_written(&self, seq: u64) -> bool {
        let Some(durable) = self.uncommitted(seq) else {
            return true;
        };
        loop {
            if let Some(written) = self.written(durable, seq) {
                if !written {
                    // A writer that stopped on a bug, while the conveyor goes on, never
                    // commits the item: it waits for the shutdown (which reports it as left)
                    // here, rather than back in its lane, where a worker would take it again
                    // at once, and again. (After a shutdown this returns at once.)
                    self.wait_to_start(later(Duration::MAX), false);
                }
                return written;
            }
            // In slices, to notice a shutdown while commits fail (a full disk).
            durable.wait_committed(seq, Some(Instant::now() + WRITTEN_CHECK));
        }
    }

    /// `wait_written` for an async worker, which must not block its runtime's thread.
    async fn wait_written_async(&self, seq: u64) -> bool {
        let Some(durable) = self.uncommitted(seq) else {
            return true;
        };
        loop {
            // Enabled before the check: a commit right after it still wakes this task.
            let commit = durable.commits.notified();
            tokio::pin!(commit);
            commit.as_mut().enable();
            if let Some(written) = self.written(durable, seq) {
                if !written {
                    // As in `wait_written`.
                    self.wait_to_start_async(later(Duration::MAX), false).await;
                }
                return written;
            }
            // A shutdown wakes nobody here: look again now and then.
            let _ = tokio::time::timeout(WRITTEN_CHECK, commit).await;
        }
    }

    /// The journal, if the append of `seq` is not committed yet: its writer is asked to commit
    /// at once rather than when its window ends.
    fn uncommitted(&self, seq: u64) -> Option<&Durable<T>> {
        let durable = self.durable.as_ref().filter(|d| !d.is_committed(seq))?;
        durable.commit_soon();
        Some(durable)
    }

    /// How a wait for the commit of `seq` ends: written, or given up (`false`) because the
    /// writer stopped, or a shutdown refuses new starts (the item was not started: under
    /// `stop_timeout` it stays queued, as one waiting for a rate-limit slot); `None` while it
    /// goes on.
    fn written(&self, durable: &Durable<T>, seq: u64) -> Option<bool> {
        if durable.is_committed(seq) {
            Some(true)
        } else if durable.stopped() || self.lock().start_refused(false) {
            Some(false)
        } else {
            None
        }
    }

    /// What a sink call's result means for its job: the outcome it ends with, or `None` to
    /// try again at `job.start_at` (a retry, which `retry` records).
    fn attempt_ended(
        &self,
        worker: usize,
        job: &mut Job<T, R>,
        result: Result<R, SinkError>,
        retry: &mut bool,
    ) -> Option<Outcome<R>> {
        match result {
            Ok(reply) => Some(Outcome::Delivered(reply)),
            Err(error) => match self.after_failure(worker, job, error) {
                Next::RetryAt(at) => {
                    job.start_at = Some(at);
                    *retry = true;
                    None
                }
                Next::Done(outcome) => Some(outcome),
            },
        }
    }

    /// Ends `worker`'s lease after its first `done` items (see `State::end_lease`), their nodes
    /// into `release`.
    fn end_lease(
        &self,
        st: &mut State<T, R>,
        worker: usize,
        done: usize,
        release: &mut Vec<NodeRef<T, R>>,
    ) {
        st.end_lease(worker, done, release);
        self.after_lease(st, worker, done, release);
    }

    /// What ending `worker`'s lease after `done` items (whose nodes are in `release`) asks of
    /// the others.
    fn after_lease(
        &self,
        st: &mut State<T, R>,
        worker: usize,
        done: usize,
        release: &[NodeRef<T, R>],
    ) {
        // The lease's items leave the queue only now, all at once: every sender waiting for
        // room looks again. Not only the next job or lease wakes one: after a failure the
        // worker may take none for long (a backoff, a paused lane).
        if done > 0 && (st.waiters.blocked_senders > 0 || st.waiters.async_senders > 0) {
            self.wake_all_senders();
        }
        // As for a job: counted until settled (the last one's receipt, maybe) and dropped
        // outside the lock (`settle_all`), so that `flush` returns after the items' drops, as
        // it did before leases.
        st.settling_by[worker] += release.len() as u64;
        self.wake_flushers(st);
    }

    /// Runs a lease's items one after another (see `State::lease`), settling each receipt
    /// before the next call, but the last one's.
    fn run_lease(
        &self,
        sink: &BlockingFn<T, R>,
        worker: usize,
        items: &[Leased<T, R>],
    ) -> LeaseRan<R> {
        // The item before was not marked delivered: its claim of this one marks it so.
        let mut unmarked = false;
        for (i, item) in items.iter().enumerate() {
            // Claimed before its call (see `queue::lease_progress`): a shutdown that closed the
            // lease first (see `Shared::close_lease`) reports it, unstarted, as closed; one that
            // closes it later sees the claim, and reports it as possibly called.
            let claim = self.lease_claims[worker].compare_exchange(
                2 * i - usize::from(std::mem::take(&mut unmarked)),
                2 * i + 1,
                AtomicOrdering::AcqRel,
                AtomicOrdering::Acquire,
            );
            if claim.is_err() {
                return LeaseRan::Ended(LeaseEnd {
                    done: i,
                    last: None,
                });
            }
            // SAFETY: the lane keeps a claimed item, and its node, until the worker ends the
            // lease (`State::end_lease`); only the items before it may leave the lane earlier
            // (`State::close_lease`).
            let node = unsafe { Counted::borrow_raw(item.node) };
            let attempt = item.attempts + 1;
            // Lent on its first attempt only: an item resumed after a pause was lent before,
            // and a delivery kept from that call may still live (see `Delivery::lend`).
            let lent = attempt == 1;
            let delivery = if lent {
                // SAFETY: the lane keeps the node past the call, as above; never lent before,
                // as this is its first attempt; taken back below.
                unsafe { Delivery::lend(&node, attempt, item.attempt_limit) }
            } else {
                Delivery::new(&node, attempt, item.attempt_limit)
            };
            // The thread runs as this worker's sink call throughout (see `thread_worker`).
            let result = catch_unwind(AssertUnwindSafe(|| sink(delivery)))
                .unwrap_or_else(|panic| Err(SinkError::from_panic(&*panic)));
            if lent {
                Delivery::take_back(&node);
            }
            match result {
                Ok(reply) if i + 1 == items.len() => {
                    return LeaseRan::Ended(LeaseEnd {
                        done: i + 1,
                        last: (!Node::unheeded(&node)).then_some(reply),
                    })
                }
                // Nobody would learn of the settlement, and no user code runs before the next
                // claim: that claim marks this item delivered too, one atomic operation for
                // two (until then it counts as in flight, as the last item of a lease does).
                Ok(_) if Node::unheeded(&node) => unmarked = true,
                Ok(reply) => {
                    // Delivered, before its receipt settles (see `queue::lease_progress`): a
                    // close from the receipt's callback, or from another thread meanwhile,
                    // counts it so and leaves its receipt to this worker. The closed flag
                    // stays, as the counter never reaches it.
                    self.lease_claims[worker].fetch_add(1, AtomicOrdering::AcqRel);
                    settle_leased(self, worker, &node, reply);
                }
                Err(error) => return LeaseRan::Failed { done: i, error },
            }
        }
        unreachable!("a lease is never empty, and its last item returns")
    }

    /// After a lease's item failed its first attempt: ends the lease after the `done` items
    /// delivered before it, and takes the failed item as the worker's job, so that it is
    /// retried, fails or pauses its lane as any job does. The lookout, if the worker kept it
    /// through the lease, is given up: a job may take long (a backoff, a stuck retry), and
    /// no worker stands by a job to take the lookout away.
    fn job_after_lease(
        &self,
        worker: usize,
        done: usize,
        release: &mut Vec<NodeRef<T, R>>,
        lookout: &mut Lookout,
    ) -> Job<T, R> {
        let mut st = self.lock();
        let job = st.job_after_lease(worker, done, release);
        self.after_lease(&mut st, worker, done, release);
        st.lookout_lease_over(worker);
        if std::mem::take(&mut lookout.held) {
            self.release_lookout(&mut st, worker);
        }
        // In keyed mode, other keys' items (those sent during the lease, which woke nobody,
        // among them) go to idle workers now rather than when the worker standing by next
        // looks. A pipelined lane's items after the failed one wait until its failure is
        // recorded (see `queue::InFlight::holding`), and whoever lets them start then wakes a
        // worker for them: `pass_work_on` finds none startable.
        let wake = self.pass_work_on(&st);
        drop(st);
        self.notify_workers(wake);
        job
    }

    fn delivery(&self, job: &mut Job<T, R>) -> Delivery<T> {
        job.attempts += 1;
        Delivery::new(&job.node, job.attempts, job.attempt_limit)
    }

    /// Runs `job` until it ends; `made`: the result of an attempt made already.
    fn run_blocking(
        &self,
        sink: &BlockingFn<T, R>,
        worker: usize,
        job: &mut Job<T, R>,
        mut made: Option<Result<R, SinkError>>,
    ) -> Outcome<R> {
        // A retry is scheduled (see `State::schedule_retry`), not a rate-limit slot.
        let mut retry = false;
        // With a journal, the first attempt waits for the item to be on disk.
        let mut unwritten = self.durable.is_some() && made.is_none();
        loop {
            if let Some(result) = made.take() {
                if let Some(outcome) = self.attempt_ended(worker, job, result, &mut retry) {
                    return outcome;
                }
            }
            let check_written = std::mem::take(&mut unwritten);
            if job.start_at.is_some() || check_written {
                if let Some(at) = job.start_at.take() {
                    self.wait_to_start(at, retry);
                    if let Some(slot) = retry.then(|| self.retry_slot()).flatten() {
                        self.wait_to_start(slot, retry);
                    }
                }
                if check_written && !self.wait_written(job.node.seq()) {
                    return Outcome::Interrupted;
                }
                if !self.may_start(worker, std::mem::take(&mut retry)) {
                    return Outcome::Interrupted;
                }
            }
            let delivery = self.delivery(job);
            // The thread runs as this worker's sink call throughout (see `thread_worker`).
            let result = catch_unwind(AssertUnwindSafe(|| sink(delivery)))
                .unwrap_or_else(|panic| Err(SinkError::from_panic(&*panic)));
            if let Some(outcome) = self.attempt_ended(worker, job, result, &mut retry) {
                return outcome;
            }
        }
    }

    async fn run_async(
        &self,
        sink: &AsyncFn<T, R>,
        worker: usize,
        job: &mut Job<T, R>,
    ) -> Outcome<R> {
        let mut retry = false;
        let mut unwritten = self.durable.is_some();
        loop {
            let check_written = std::mem::take(&mut unwritten);
            if job.start_at.is_some() || check_written {
                if let Some(at) = job.start_at.take() {
                    self.wait_to_start_async(at, retry).await;
                    if let Some(slot) = retry.then(|| self.retry_slot()).flatten() {
                        self.wait_to_start_async(slot, retry).await;
                    }
                }
                if check_written && !self.wait_written_async(job.node.seq()).await {
                    return Outcome::Interrupted;
                }
                if !self.may_start(worker, std::mem::take(&mut retry)) {
                    return Outcome::Interrupted;
                }
            }
            let delivery = self.delivery(job);
            let made = {
                let _here = self.entering_sink(worker);
                catch_unwind(AssertUnwindSafe(|| sink(delivery)))
            };
            let result = match made {
                Ok(future) => {
                    SinkCall {
                        future,
                        shared: self,
                        worker,
                    }
                    .await
                }
                Err(panic) => Err(SinkError::from_panic(&*panic)),
            };
            if let Some(outcome) = self.attempt_ended(worker, job, result, &mut retry) {
                return outcome;
            }
        }
    }
}

/// The loop of a blocking-sink worker thread.
pub(crate) fn thread_worker<T: Send + Sync + 'static, R: Send + 'static>(
    shared: Arc<Shared<T, R>>,
    sink: Arc<BlockingFn<T, R>>,
    worker: usize,
) {
    // Whatever calls the conveyor from this thread is the user code this worker runs (its
    // sink, a receipt callback, an item's drop): marked once, not around every sink call.
    let _here = shared.entering_sink(worker);
    let mut finished = None;
    let mut settle = Vec::new();
    let mut done = 0;
    let mut lookout = Lookout::default();
    // A worker thread runs a lane's head items several per turn of the state lock.
    let mut leasing = shared.may_lease().then(Leasing::new);
    loop {
        // With the idle workers to wake once the state lock is released.
        let (step, wake) = {
            let mut st = shared.lock();
            shared.settled_outside(&mut st, worker, std::mem::take(&mut done));
            let mut step = shared.step(
                &mut st,
                worker,
                finished.take(),
                &mut settle,
                &mut lookout,
                leasing.as_mut(),
            );
            let mut spun = false;
            // Settle what just finished before sleeping: its receipt must not wait
            // for the next item to arrive, nor its item's drop.
            // Receipts to settle, and nodes of delivered lease items to release.
            let to_settle = |settle: &Vec<_>, leasing: &Option<Leasing<T, R>>| {
                (
                    !settle.is_empty(),
                    leasing.as_ref().is_some_and(|l| !l.release.is_empty()),
                )
            };
            while matches!(step, Step::Wait) && to_settle(&settle, &leasing) == (false, false) {
                // Items a paced worker holds back (see `drain_out_of_work`) are waited for
                // spinning, however often it comes here meanwhile.
                let held_back = leasing
                    .as_ref()
                    .filter(|_| paced(&st) && shared.intake_filled())
                    .and_then(Leasing::held_back_until);
                if (!std::mem::replace(&mut spun, true) || held_back.is_some())
                    && (lookout.held || shared.claim_lookout(worker))
                {
                    lookout.held = true;
                    lookout.looked = true;
                    drop(st);
                    shared.spin_for_items(held_back);
                    st = shared.lock();
                } else if shared.register_idle(&mut st, worker, true, &mut lookout.held) {
                    // Registered under the state lock, which this thread holds until `wait`
                    // releases it: a send that sees the registration cannot notify too early.
                    st = match leasing.as_mut() {
                        Some(leasing) => shared.stand_by(st, worker, &mut leasing.release),
                        None => shared.wait(&shared.work, st),
                    };
                    shared.unregister_idle(&mut st, true);
                }
                step = shared.step(
                    &mut st,
                    worker,
                    None,
                    &mut settle,
                    &mut lookout,
                    leasing.as_mut(),
                );
            }
            // A job was taken with the lookout already given up (see `step`).
            let (settling, releasing) = to_settle(&settle, &leasing);
            let wake = match &step {
                Step::Run(_, wake) | Step::Lease(wake) => *wake,
                Step::Exit => {
                    if std::mem::take(&mut lookout.held) {
                        shared.release_lookout(&mut st, worker);
                    }
                    shared.exit(&mut st);
                    Wake::default()
                }
                // Settling may run user code (callbacks, wakers, the item's and the reply's
                // drops), which may take long or panic: give the lookout up first, and wake a
                // worker for what it had. Not for the nodes of a lease's unheeded items with
                // no drop of their own: a worker keeping pace with its producer ends every
                // lease that way, and, without the lookout for that moment, its producer's
                // next send woke an idle worker, which took the next lease on another thread
                // (pipelined:16, with the faster worker of a one-word `SinkError`, went from
                // 1.7 to 3 ms for 100k items, see BENCHMARKS.md).
                Step::Wait
                    if runs_user_code::<T, R>(settling, releasing)
                        && std::mem::take(&mut lookout.held) =>
                {
                    shared.release_lookout(&mut st, worker);
                    shared.pass_work_on(&st)
                }
                Step::Wait => Wake::default(),
            };
            (step, wake)
        };
        // Whom this step passed work on to is woken before settling, which runs user code:
        // meanwhile the wake-up counts as pending, and sends wake nobody.
        shared.notify_workers(wake);
        // An exiting worker stopped counting as live before it settles what it has left.
        let release = leasing.as_mut().map(|l| &mut l.release);
        done = settle_all(
            &shared,
            worker,
            &mut settle,
            release,
            !matches!(step, Step::Exit),
        );
        match step {
            Step::Run(mut job, _) => {
                let started = leasing.is_some().then(Instant::now);
                let outcome = shared.run_blocking(&*sink, worker, &mut job, None);
                if let (Some(leasing), Some(started)) = (leasing.as_mut(), started) {
                    leasing.measured(1, started.elapsed());
                }
                finished = Some(shared.finished(job, outcome));
            }
            Step::Lease(_) => {
                let leasing = leasing.as_mut().expect("only a leasing worker leases");
                let started = Instant::now();
                match shared.run_lease(&*sink, worker, &leasing.items) {
                    LeaseRan::Ended(end) => {
                        leasing.measured(end.done, started.elapsed());
                        leasing.ended = Some(end);
                    }
                    LeaseRan::Failed {
                        done: delivered,
                        error,
                    } => {
                        leasing.measured(delivered + 1, started.elapsed());
                        let release = &mut leasing.release;
                        let mut job =
                            shared.job_after_lease(worker, delivered, release, &mut lookout);
                        let release = Some(&mut leasing.release);
                        done += settle_all(&shared, worker, &mut settle, release, true);
                        let made = Some(Err(error));
                        let outcome = shared.run_blocking(&*sink, worker, &mut job, made);
                        finished = Some(shared.finished(job, outcome));
                    }
                }
            }
            Step::Wait => {}
            Step::Exit => return shared.settled_outside(&mut shared.lock(), worker, done),
        }
        // Set only by a step that took work (see `Shared::took_work`), now done.
        if std::mem::take(&mut lookout.retake) {
            lookout.held = shared.retake_lookout(worker);
            lookout.looked = lookout.held;
        }
    }
}

/// An async-sink worker task, to spawn.
pub(crate) fn async_worker<T: Send + Sync + 'static, R: Send + 'static>(
    shared: Arc<Shared<T, R>>,
    sink: Arc<AsyncFn<T, R>>,
    worker: usize,
) -> impl Future<Output = ()> + Send + 'static {
    // Made now, not when the task first runs: a task its runtime drops before it ever ran
    // must leave too.
    let task = TaskPresence {
        shared,
        worker,
        idle: false,
        done: 0,
        exited: false,
    };
    async_worker_loop(task, sink)
}

/// The loop of an async-sink worker task.
async fn async_worker_loop<T: Send + Sync + 'static, R: Send + 'static>(
    mut task: TaskPresence<T, R>,
    sink: Arc<AsyncFn<T, R>>,
) {
    let (shared, worker) = (task.shared.clone(), task.worker);
    let mut finished = None;
    let mut settle = Vec::new();
    loop {
        // Enabled only right before the worker registers idle (under the state lock): a
        // Notified left enabled while running a job would be first in line for
        // `notify_one` and swallow a wake-up meant for an idle worker.
        let notified = shared.work_async.notified();
        tokio::pin!(notified);
        let step = {
            let mut st = shared.lock();
            task.report(&mut st);
            // Tasks never hold the lookout: they do not spin.
            let lookout = &mut Lookout::default();
            let mut step =
                shared.step(&mut st, worker, finished.take(), &mut settle, lookout, None);
            while matches!(step, Step::Wait) && !task.idle {
                notified.as_mut().enable();
                task.idle = shared.register_idle(&mut st, worker, false, &mut lookout.held);
                if !task.idle {
                    // Items arrived since the step looked: take them.
                    step = shared.step(&mut st, worker, None, &mut settle, lookout, None);
                }
            }
            if let Step::Exit = step {
                task.exited = true;
                shared.exit(&mut st);
            }
            step
        };
        if matches!(step, Step::Run(..)) {
            // Not waiting: a notification it got goes on to another waiter.
            notified.set(shared.work_async.notified());
        }
        // As in `thread_worker`: wake whom this step passed work on to before settling.
        if let Step::Run(_, wake) = &step {
            shared.notify_workers(*wake);
        }
        task.done = settle_all(
            &shared,
            worker,
            &mut settle,
            None,
            !matches!(step, Step::Exit),
        );
        match step {
            Step::Run(mut job, _) => {
                let outcome = shared.run_async(&*sink, worker, &mut job).await;
                finished = Some(shared.finished(job, outcome));
            }
            // Report fresh settlements before sleeping: a flush may be waiting for them.
            Step::Lease(_) => unreachable!("tasks lease nothing"),
            Step::Wait if task.done > 0 => {}
            Step::Wait => notified.await,
            Step::Exit => return task.report(&mut shared.lock()),
        }
    }
}

/// An async worker's standing in the state. Its task can be dropped at any `.await` when its
/// runtime shuts down, or before it ever ran; the drop then leaves as `exit` would, so that `flush` and `close` see
/// no worker is left instead of waiting for one that will never run again.
struct TaskPresence<T: Send + Sync + 'static, R: Send + 'static> {
    shared: Arc<Shared<T, R>>,
    worker: usize,
    /// Registered idle in the intake.
    idle: bool,
    /// Receipts settled since the state lock was last held.
    done: u64,
    exited: bool,
}

impl<T: Send + Sync + 'static, R: Send + 'static> TaskPresence<T, R> {
    /// Back at the state lock: no longer idle, and the settlements made outside reported.
    fn report(&mut self, st: &mut State<T, R>) {
        if std::mem::take(&mut self.idle) {
            self.shared.unregister_idle(st, false);
        }
        self.shared
            .settled_outside(st, self.worker, std::mem::take(&mut self.done));
    }
}

impl<T: Send + Sync + 'static, R: Send + 'static> Drop for TaskPresence<T, R> {
    fn drop(&mut self) {
        if !self.exited {
            // Its job, if one was running, stays in flight: `close` reports it as left.
            let shared = self.shared.clone();
            let mut st = shared.lock();
            self.report(&mut st);
            shared.exit(&mut st);
            if st.live_workers == 0 && !st.closed {
                shared.orphaned(st);
            }
        }
    }
}

/// Where this thread runs user code for one of a conveyor's workers: the sink call, or the
/// receipts it settles (callbacks, wakers, the item's and the reply's drops). A call that such
/// code makes into its own conveyor (a blocking send, a flush, a close) must not wait for what
/// only this worker could do: it counts as a worker waiting inside
/// (see `State::others_can_progress`).
#[derive(Clone, Copy)]
struct WorkerHere {
    /// The conveyor's `Shared`, by address.
    conveyor: usize,
    worker: usize,
    /// Receipts it is settling, which count in `State::settling_by` until reported.
    receipts: u64,
    /// In the worker's sink call: for a worker thread, its whole life (see `thread_worker`).
    in_sink: bool,
    /// The worker is still counted in `live_workers` (a worker that is exiting settles what it
    /// has left after it stopped counting).
    live_worker: bool,
}

const NOWHERE: WorkerHere = WorkerHere {
    conveyor: 0,
    worker: 0,
    receipts: 0,
    in_sink: false,
    live_worker: false,
};

thread_local! {
    static WORKER_HERE: Cell<WorkerHere> = const { Cell::new(NOWHERE) };
}

/// The conveyor (its `Shared`, by address) for whose worker the calling thread may be running
/// user code, if any: a cheap first look for receipts, which do not know the conveyor's types
/// (`Shared::worker_here` tells for sure).
pub(crate) fn conveyor_here() -> Option<usize> {
    let here = WORKER_HERE.with(Cell::get);
    (here.conveyor != 0).then_some(here.conveyor)
}

impl<T, R> Shared<T, R> {
    /// What this thread is doing for this conveyor's workers, if anything.
    fn here(&self) -> Option<WorkerHere> {
        let here = WORKER_HERE.with(Cell::get);
        (here.conveyor == std::ptr::from_ref(self) as usize && (here.receipts > 0 || here.in_sink))
            .then_some(here)
    }

    /// How many receipts of this conveyor the calling thread is settling right now.
    pub(crate) fn settling_here(&self) -> u64 {
        self.here().map_or(0, |here| here.receipts)
    }

    /// The worker of this conveyor, still counted in `live_workers`, whose sink call or receipt
    /// callback the calling thread is running: nothing it waits for can count on that worker.
    pub(crate) fn worker_here(&self) -> Option<usize> {
        self.here()
            .filter(|here| here.live_worker)
            .map(|here| here.worker)
    }

    /// Marks the calling thread as running `worker`'s sink call until the guard drops (a
    /// worker thread's whole life, or one poll of an async sink's future).
    fn entering_sink(&self, worker: usize) -> RestoreHere {
        RestoreHere(WORKER_HERE.with(|h| {
            h.replace(WorkerHere {
                conveyor: std::ptr::from_ref(self) as usize,
                worker,
                receipts: 0,
                in_sink: true,
                live_worker: true,
            })
        }))
    }
}

/// Puts back what an enclosing sink call or `settle_all` set (a callback's conveyor may be
/// another one's sink), even if the user code unwinds.
struct RestoreHere(WorkerHere);

impl Drop for RestoreHere {
    fn drop(&mut self) {
        WORKER_HERE.with(|h| h.set(self.0));
    }
}

/// Whether a worker's settling (see `settle_all`) may run user code: settling receipts
/// (their callbacks and wakers), or dropping the nodes of delivered lease items (`releasing`)
/// whose item or reply type has a drop of its own. A released node's receipt is settled or
/// unheeded, so nothing else of it runs.
fn runs_user_code<T, R>(settling: bool, releasing: bool) -> bool {
    settling || (releasing && (std::mem::needs_drop::<T>() || std::mem::needs_drop::<R>()))
}

/// Settles receipts outside the state lock (their callbacks are user code), then drops the
/// nodes of lease items in `release`; returns how many of both, for `Shared::settled_outside`.
/// `live_worker`: the worker still counts as live.
fn settle_all<T, R>(
    shared: &Shared<T, R>,
    worker: usize,
    settle: &mut Vec<Settlement<T, R>>,
    release: Option<&mut Vec<NodeRef<T, R>>>,
    live_worker: bool,
) -> u64 {
    let release = release.filter(|r| !r.is_empty());
    let n = (settle.len() + release.as_ref().map_or(0, |r| r.len())) as u64;
    if n == 0 {
        return 0;
    }
    let here = WorkerHere {
        conveyor: std::ptr::from_ref(shared) as usize,
        worker,
        receipts: n,
        in_sink: false,
        live_worker,
    };
    let _restore = RestoreHere(WORKER_HERE.with(|h| h.replace(here)));
    for (node, result) in settle.drain(..) {
        // A panic in the receipt's callback or waker, or in the item's or the reply's drop
        // (the worker may hold the last reference), must not end the worker, or its conveyor
        // would stall.
        let [settled, dropped] = settle_and_release(node, result);
        settled.unwrap_or_else(log_settling_panic);
        dropped.unwrap_or_else(log_settling_panic);
    }
    // The last reference drops the item: user code, as above.
    let mut returns = Returns::new();
    for node in release.into_iter().flat_map(|r| r.drain(..)) {
        catch_unwind(AssertUnwindSafe(|| node.drop_into(&mut returns)))
            .unwrap_or_else(log_settling_panic);
    }
    n
}

/// Settles the receipt of a lease's item right after its sink call, outside the state lock,
/// as `settle_all` does (the lane keeps the node: see `State::lease`).
fn settle_leased<T, R>(shared: &Shared<T, R>, worker: usize, node: &Node<T, R>, reply: R) {
    let here = WorkerHere {
        conveyor: std::ptr::from_ref(shared) as usize,
        worker,
        receipts: 1,
        in_sink: false,
        live_worker: true,
    };
    let _restore = RestoreHere(WORKER_HERE.with(|h| h.replace(here)));
    catch_unwind(AssertUnwindSafe(|| node.settle(Ok(reply)))).unwrap_or_else(log_settling_panic);
}

#[cold]
fn log_settling_panic(panic: Panic) {
    tracing::error!(
        panic = %panic_message(&*panic),
        "a receipt callback or an item's drop panicked while settling; the worker goes on"
    );
}

/// `now + delay`, saturating far in the future instead of overflowing.
pub(crate) fn later(delay: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(delay)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// An async sink's future as its worker awaits it. Each poll runs as the worker's sink call
/// (see `WorkerHere`: only while polled, as the task may move between threads), and a panic
/// in it becomes a permanent failure of the item, as `catch_unwind` makes it for blocking
/// sinks.
struct SinkCall<'a, T, R> {
    future: BoxFuture<R>,
    shared: &'a Shared<T, R>,
    worker: usize,
}

impl<T, R> Future for SinkCall<'_, T, R> {
    type Output = Result<R, SinkError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let _here = this.shared.entering_sink(this.worker);
        let future = this.future.as_mut();
        catch_unwind(AssertUnwindSafe(|| future.poll(cx)))
            .unwrap_or_else(|panic| Poll::Ready(Err(SinkError::from_panic(&*panic))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_settling_that_may_run_user_code_gives_the_lookout_up() {
        assert!(!runs_user_code::<u64, ()>(false, true), "plain nodes");
        assert!(!runs_user_code::<u64, ()>(false, false));
        assert!(
            runs_user_code::<u64, ()>(true, false),
            "a receipt to settle"
        );
        assert!(runs_user_code::<String, ()>(false, true), "an item's drop");
        assert!(
            runs_user_code::<u64, Vec<u8>>(false, true),
            "a reply's drop"
        );
        assert!(
            !runs_user_code::<String, ()>(false, false),
            "nothing to drop"
        );
    }

    #[test]
    fn later_saturates_instead_of_overflowing() {
        let far = later(Duration::MAX);
        assert!(far > Instant::now() + Duration::from_secs(365 * 86_400));
        let soon = later(Duration::from_millis(5));
        assert!(soon <= Instant::now() + Duration::from_millis(5));
    }

    #[test]
    fn a_worker_paces_its_drains_when_alone_or_its_sink_is_quick() {
        use crate::Ordering;
        let lone = State::<u64, ()>::new(Ordering::Strict, 10, None);
        let mut pipelined = State::<u64, ()>::new(Ordering::Pipelined { in_flight: 4 }, 10, None);
        let mut keyed = State::<u64, ()>::new(Ordering::Keyed { concurrency: 4 }, 10, None);
        assert!(paced(&lone), "a lone worker, whatever its sink");
        assert!(!paced(&pipelined), "a slow sink's items wait for its calls");
        assert!(!paced(&keyed));
        pipelined.lease_size = 20;
        keyed.lease_size = 20;
        assert!(
            paced(&pipelined),
            "a quick sink may keep pace with its producer"
        );
        assert!(paced(&keyed));
    }

    #[test]
    fn a_lease_fits_lease_time_of_the_last_calls() {
        let mut leasing = Leasing::<u64, ()>::new();
        assert_eq!(leasing.fit, None, "nothing measured yet");
        leasing.measured(10, Duration::from_micros(10));
        assert_eq!(leasing.fit, Some(20), "calls of 1 us");
        leasing.measured(1, Duration::from_millis(1));
        assert_eq!(leasing.fit, Some(1), "a slow call: jobs");
        leasing.measured(1000, Duration::from_micros(1));
        assert_eq!(leasing.fit, Some(LEASE), "at most LEASE");
    }

    #[test]
    fn a_drain_holds_the_next_back_for_lease_drain() {
        let mut leasing = Leasing::<u64, ()>::new();
        assert_eq!(
            leasing.held_back_until(),
            None,
            "never drained: due at once"
        );
        assert!(leasing.drain_due());
        let before = Instant::now();
        leasing.drained();
        let until = leasing
            .held_back_until()
            .expect("held back right after a drain");
        assert!(!leasing.drain_due());
        assert!(until >= before + LEASE_DRAIN);
        assert!(until <= Instant::now() + LEASE_DRAIN);
        // Once the time is up, due again.
        leasing.drained_at = Some(Instant::now() - LEASE_DRAIN);
        assert!(leasing.drain_due());
    }
}
