//! The conveyor handle: accepting items, waiting for them, shutting down.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::alarm::Alarm;
use crate::builder::{Backpressure, Builder, Config, OnFailure};
use crate::durable::{Durable, JournalSettings, Op};
use crate::error::{BuildError, DeliveryError, SendError};
use crossbeam_utils::CachePadded;

use crate::intake::{Batch, Intake, Wake};
use crate::journal::{DeadLetter, Journal, JournalError, Record, Settlement as Settled};
use crate::keys;
use crate::queue::{LeaseClaims, Room, State, Waiters, Watch, LEASE_CLOSED};
use crate::receipt::{Awaited, Inside, NodeContext, NodeRef, OwnWorkers, Receipt};
use crate::retry::random_u64;
use crate::spin_lock::{SpinGuard, SpinLock};
use crate::stats::{CloseReport, Stats};
use crate::worker::{async_worker, later, thread_worker, Sink};

/// State shared by the handle and its workers.
///
/// One mutex guards all scheduling state: every operation touches the lanes and the
/// counters together, and one lock keeps `stats()` an exact snapshot. Sends that need no
/// scheduling decision only append to the intake, under a lock of its own (see
/// `intake.rs`); whoever needs the exact state moves the intake into the lanes first.
/// Each kind of waiting has a condvar for threads and a `Notify` for tasks; the waiter
/// counts let a change skip the wake-up syscall when nobody waits.
pub(crate) struct Shared<T, R> {
    /// On cache lines of its own: workers write it for every item, and sends read the
    /// settings beside it (sharing a line cost a cache miss per send).
    state: CachePadded<Mutex<State<T, R>>>,
    /// On cache lines of its own: producers write it on every send.
    intake: CachePadded<IntakeLine<T, R>>,
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
    /// Workers waiting out a backoff or a rate-limit slot wait here, so that a shutdown can
    /// cut the wait short (see `Shared::wait_to_start`).
    pub(crate) shutdown: Condvar,
    pub(crate) shutdown_async: Notify,
    pub(crate) config: Config,
    /// The journal and its writer, if one was configured. `None` costs the hot path one branch.
    pub(crate) durable: Option<Durable<T>>,
    /// How far each worker got through its lease (see `State::lease`): the items it claimed
    /// and delivered (see `queue::lease_progress`), with `queue::LEASE_CLOSED` set once a
    /// shutdown stops the worker between items. Claiming and closing are each one atomic
    /// operation, so that every item either starts before the close, and is reported as
    /// possibly called, or never starts. Each on a line of its own: its worker writes it for
    /// every item.
    pub(crate) lease_claims: LeaseClaims,
}

/// How long a worker standing by lets a watched lease go without a move before it takes the
/// lookout away and cuts a pipelined lease (see `Shared::stand_by`). Leases are made only of
/// calls measured to take well under `worker::LEASE_TIME`: one that takes this long is stuck,
/// or the sink has slowed down.
const STANDBY: Duration = Duration::from_millis(1);

/// How long the lookout spins for a send before it sleeps (see `Shared::spin_for_items`):
/// about what a few hundred `pause` instructions take.
const LOOKOUT_SPIN: Duration = Duration::from_micros(5);

/// The intake, and two flags that sends and the lookout worker share, on the same lines.
struct IntakeLine<T, R> {
    items: SpinLock<Intake<T, R>>,
    /// Whether the intake holds items: exact under the intake lock (set by every fast-path
    /// accept, cleared by every take). Read without the lock by the spinning lookout.
    filled: AtomicBool,
    /// The lookout: a worker thread is awake, not in a sink call, and will look at the
    /// intake before it runs one or sleeps, so a send need not wake anybody. At most one
    /// holds it: more would only take CPU from the producers and the busy workers. Taken by
    /// a worker that runs out of work (it spins for items, see `spin_for_items`), and again
    /// after the job it found while holding it, if other workers slept when it took that job
    /// and no items wait (see `worker::Lookout`). Given up under the intake lock (see
    /// `release_lookout`), so that a send sees either the flag or the worker's release.
    /// Never held while user code runs (a sink call, or a receipt's settling: callbacks,
    /// wakers, drops), but through a lease of several items of the pipelined lane or of a
    /// key's lane (of one only as `State::lease_may_keep_lookout` says): its
    /// calls are measured to take microseconds, and sends would otherwise wake an idle worker
    /// for items nobody else could start (the pipelined lane's, or, in keyed mode, most often
    /// the leased key's). Woken for nothing, such workers also took CPU from the producer,
    /// and the scheduler put some on the producer's CPU, where a keyed lease they took next
    /// ran only between its time slices. The worker standing by takes the lookout away if the
    /// lease stalls (see `Shared::stand_by`), and the items sent meanwhile, other keys' too,
    /// go on. Holds the worker that holds it, or `NO_LOOKOUT`.
    lookout: AtomicUsize,
}

/// The lookout flag's value while no worker holds it.
const NO_LOOKOUT: usize = usize::MAX;

impl<T, R> Shared<T, R> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State<T, R>> {
        // State transitions never call user code under the lock, so a panic cannot
        // leave it half-updated; recover the guard instead of cascading the panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A node for a new item, whose receipt knows where waiting for it would hang.
    pub(crate) fn node(&self, key: Option<Arc<str>>, item: T) -> NodeRef<T, R> {
        self.intake().alloc(key, item)
    }

    /// The fast path of a send (see `Intake::try_accept`): its receipt, or the item's node
    /// for the path under the state lock. Inlined: see `Conveyor::send_with`.
    #[inline(always)]
    fn try_accept(&self, key: Option<Arc<str>>, item: T) -> Result<Receipt<R>, NodeRef<T, R>>
    where
        T: Send + Sync + 'static,
        R: Send + 'static,
    {
        let mut ik = self.intake();
        // The lookout will see the item (see `IntakeLine::lookout`): no wake-up syscall.
        let lookout = self.intake.lookout.load(AtomicOrdering::Relaxed) != NO_LOOKOUT;
        let accepted = ik.try_accept(key, item, !lookout);
        if accepted.is_ok() && !self.intake_filled() {
            self.intake.filled.store(true, AtomicOrdering::Relaxed);
        }
        // The intake guard must be gone before `wake_after_send` locks the state.
        drop(ik);
        let (node, wake) = accepted?;
        self.wake_after_send(wake);
        Ok(Receipt::new(node))
    }

    /// The intake; take it after the state lock, never before (see `intake.rs`).
    pub(crate) fn intake(&self) -> SpinGuard<'_, Intake<T, R>> {
        self.intake.items.lock()
    }

    /// Moves what sends left in the intake into the lanes, in seq order, so that `st` is
    /// exact. Returns whether it moved anything.
    pub(crate) fn drain(&self, st: &mut State<T, R>) -> bool {
        // The intake counts the batch as queued before it is released, and the state lock
        // keeps every other accept out until the batch is in its lanes: sends need not wait
        // while the batch is sorted into lanes.
        let batch = self.take_batch(st, &mut self.intake());
        self.enqueue_drained(st, batch)
    }

    /// Whether the intake holds items, as `filled` says without its lock.
    pub(crate) fn intake_filled(&self) -> bool {
        self.intake.filled.load(AtomicOrdering::Relaxed)
    }

    /// [`Shared::drain`] for a caller that holds the intake lock already (and keeps it).
    fn drain_locked(&self, st: &mut State<T, R>, ik: &mut Intake<T, R>) -> bool {
        let batch = self.take_batch(st, ik);
        self.enqueue_drained(st, batch)
    }

    fn take_intake(&self, st: &State<T, R>, ik: &mut Intake<T, R>, batch: &mut Batch<T, R>) {
        ik.take(batch, st.queued());
        self.intake.filled.store(false, AtomicOrdering::Relaxed);
    }

    /// What the intake holds, for [`Shared::enqueue_drained`] under the same state lock; the
    /// intake counts it as queued from now on (see [`Shared::drain`]).
    fn take_batch(&self, st: &mut State<T, R>, ik: &mut Intake<T, R>) -> Batch<T, R> {
        let mut batch = std::mem::take(&mut st.drained);
        self.take_intake(st, ik, &mut batch);
        batch
    }

    fn enqueue_drained(&self, st: &mut State<T, R>, mut batch: Batch<T, R>) -> bool {
        let moved = !batch.items.is_empty();
        let attempt_limit = self.config.retry.attempts();
        // Without runs (not keyed), the whole batch goes to the one lane.
        let one_lane = [batch.items.len()];
        let runs = match (&batch.runs[..], moved) {
            ([], true) => &one_lane[..],
            (runs, _) => runs,
        };
        st.accept_all(batch.items.drain(..), runs, attempt_limit);
        // Kept for the next drain, which hands these buffers to the intake to cool off
        // before sends fill them again (see `intake.rs`).
        st.drained = batch;
        moved
    }

    /// Whether `flush` is done: the intake drained, every item settled but those held in
    /// paused lanes, and every receipt told.
    fn all_settled(&self, st: &mut State<T, R>) -> bool {
        self.drain(st);
        st.quiescent(self.settling_here())
    }

    /// Registers the calling worker as idle before it waits (under the state lock), unless
    /// the intake has items for it; a worker thread gives up the lookout (`lookout`) as it
    /// registers. Returns whether it registered.
    ///
    /// Items another worker holds the lookout for are not this one's: that worker looks at
    /// them before it sleeps or runs user code (see `IntakeLine::lookout`). While a pipelined
    /// or keyed lease kept the lookout, a worker that refused to sleep beside them stepped,
    /// found nothing it could start (the lane was leased), and asked again, taking the intake
    /// lock ~20,000 times in a round of 100k sends, each time pulling the lock's line away
    /// from the producer (pipelined:16 end to end 2.3 ms against 2.0, see BENCHMARKS.md).
    pub(crate) fn register_idle(
        &self,
        st: &mut State<T, R>,
        worker: usize,
        thread: bool,
        lookout: &mut bool,
    ) -> bool {
        let mut ik = self.intake();
        if !ik.is_empty() && !self.lookout_elsewhere(worker) {
            return false;
        }
        if std::mem::take(lookout) {
            self.let_go_of_lookout(worker);
        }
        if thread {
            ik.idle_threads += 1;
        } else {
            ik.idle_tasks += 1;
        }
        st.idle_workers += 1;
        true
    }

    /// Takes the lookout for worker thread `worker` if nobody holds it. Not with a journal:
    /// every send then takes the state lock and nobody reads the flag.
    pub(crate) fn claim_lookout(&self, worker: usize) -> bool {
        let flag = &self.intake.lookout;
        // Read first: an atomic write would pull the producers' cache line over for nothing.
        self.durable.is_none()
            && flag.load(AtomicOrdering::Relaxed) == NO_LOOKOUT
            && flag
                .compare_exchange(
                    NO_LOOKOUT,
                    worker,
                    AtomicOrdering::Relaxed,
                    AtomicOrdering::Relaxed,
                )
                .is_ok()
    }

    /// Whether `worker` holds the lookout: a worker standing by may have taken it from a
    /// worker stuck in a lease (see `stand_by`).
    pub(crate) fn holds_lookout(&self, worker: usize) -> bool {
        self.intake.lookout.load(AtomicOrdering::Relaxed) == worker
    }

    /// Whether a worker other than `worker` holds the lookout.
    pub(crate) fn lookout_elsewhere(&self, worker: usize) -> bool {
        let holder = self.intake.lookout.load(AtomicOrdering::Relaxed);
        holder != NO_LOOKOUT && holder != worker
    }

    /// Clears the lookout flag if `worker` holds it.
    fn let_go_of_lookout(&self, worker: usize) {
        let _ = self.intake.lookout.compare_exchange(
            worker,
            NO_LOOKOUT,
            AtomicOrdering::Relaxed,
            AtomicOrdering::Relaxed,
        );
    }

    /// Takes the lookout back after a job found while holding it (see `worker::Lookout`),
    /// unless items wait in the intake: the producers then outpace this worker, which would
    /// pay an intake lock per item to give the lookout up again before each job.
    pub(crate) fn retake_lookout(&self, worker: usize) -> bool {
        !self.intake_filled() && self.claim_lookout(worker)
    }

    /// For the lookout, before it sleeps: waits [`LOOKOUT_SPIN`] for a send, spinning. A
    /// worker about as fast as its producer would otherwise fall asleep between items and
    /// make every send pay for a wake-up (a syscall).
    ///
    /// It never yields its CPU. A lookout that yields to a producer on the same CPU stays
    /// runnable there, and the scheduler rarely moves a thread that keeps running a little
    /// (it counts as cache-hot): the lookout then ran only between the producer's time
    /// slices while the other CPU idled, and every send, seeing the lookout, woke nobody, so
    /// nothing was delivered while the producer kept sending (a keyed conveyor's worker
    /// threads, woken onto the producer's CPU by a flush, fell into this in up to 13 of 72
    /// bursts; see BENCHMARKS.md). Spinning, then sleeping, it leaves that CPU to the
    /// producer, and the next send's wake-up lets the scheduler place it on an idle one.
    ///
    /// A paced worker that holds back its drain until `held_back` (see
    /// `Shared::drain_out_of_work`) spins until then once items are there.
    pub(crate) fn spin_for_items(&self, held_back: Option<Instant>) {
        // Relaxed: what a send pushed is seen through the intake lock, which the
        // lookout's next step takes.
        let until = Instant::now() + LOOKOUT_SPIN;
        while !self.intake_filled() && Instant::now() < until {
            std::hint::spin_loop();
        }
        if let Some(held_back) = held_back.filter(|_| self.intake_filled()) {
            while Instant::now() < held_back {
                std::hint::spin_loop();
            }
        }
    }

    /// Makes `worker` give up the lookout, if it holds it, under the intake lock, after moving
    /// what the intake holds into the lanes: a send that saw the flag, and so woke nobody,
    /// pushed its item before this, and the caller's `pass_work_on` (next, under the same
    /// state lock) wakes a worker for it if it can run in parallel. A send after this wakes
    /// one itself. With no worker idle, nobody could be woken: the items stay in the intake
    /// until a worker runs out of work and drains it (it never sleeps with items there, see
    /// `register_idle`), which a paced worker does at its own pace (see
    /// `worker::LEASE_DRAIN`).
    pub(crate) fn release_lookout(&self, st: &mut State<T, R>, worker: usize) {
        let mut ik = self.intake();
        let batch = (!ik.is_empty() && st.idle_workers > 0).then(|| self.take_batch(st, &mut ik));
        self.let_go_of_lookout(worker);
        self.enqueue_unlocked(st, ik, batch);
    }

    /// Gives the intake lock up, then sorts a batch taken under it into the lanes, as `drain`
    /// does: sends spin on that lock, and a batch may be thousands of items.
    fn enqueue_unlocked(
        &self,
        st: &mut State<T, R>,
        ik: SpinGuard<'_, Intake<T, R>>,
        batch: Option<Batch<T, R>>,
    ) {
        drop(ik);
        if let Some(batch) = batch {
            self.enqueue_drained(st, batch);
        }
    }

    /// Undoes [`Shared::register_idle`] once the worker runs again.
    pub(crate) fn unregister_idle(&self, st: &mut State<T, R>, thread: bool) {
        st.idle_workers -= 1;
        let mut ik = self.intake();
        // Sends that found this worker's wake-up pending woke nobody for their items: move
        // them into the lanes, where this worker's `pass_work_on` sees them. (The worker may
        // take a job from the lanes without ever looking at the intake.)
        let batch = (!ik.is_empty()).then(|| self.take_batch(st, &mut ik));
        // Spurious wake-ups make `woken` an estimate; an extra notify is harmless.
        if thread {
            ik.idle_threads -= 1;
            ik.woken_threads = ik.woken_threads.saturating_sub(1);
        } else {
            ik.idle_tasks -= 1;
            ik.woken_tasks = ik.woken_tasks.saturating_sub(1);
        }
        self.enqueue_unlocked(st, ik, batch);
    }

    /// A worker that just took a job wakes one more idle worker while work is left that
    /// it cannot take itself (sends wake only one, see `Intake::try_accept`): wake-ups spread
    /// as far as there is work to run in parallel, and no further. Returns whom to notify,
    /// which the worker does after releasing the state lock: the idle worker registered
    /// under that lock and released it only by waiting, so the notify cannot be early.
    pub(crate) fn pass_work_on(&self, st: &State<T, R>) -> Wake {
        // Items in the intake are not counted: their send woke a worker, which drains them
        // as it wakes (`unregister_idle`), or the lookout has them (`release_lookout`).
        if st.idle_workers > 0 && st.startable() {
            self.intake().wake_another()
        } else {
            Wake::default()
        }
    }

    /// Notifies idle workers. A thread must be known to wait already (see the callers).
    pub(crate) fn notify_workers(&self, wake: Wake) {
        if wake.thread {
            self.work.notify_one();
        }
        if wake.task {
            self.work_async.notify_one();
        }
    }

    /// Whether worker threads run several items of a lane per turn of the state lock (see
    /// `State::lease`). Not with a journal (each item waits for its append's commit, and its
    /// settlement is journaled in order under the lock), a rate limit (each item needs its
    /// slot), nor `DropOldest` (which must not evict an item a worker holds, and would
    /// otherwise drop a later one instead).
    pub(crate) fn may_lease(&self) -> bool {
        self.durable.is_none()
            && self.config.rate_limit.is_none()
            && self.config.backpressure != Backpressure::DropOldest
    }

    /// Wakes the workers a fast-path send asked for, after it released the intake lock.
    #[inline(always)]
    fn wake_after_send(&self, wake: Wake) {
        if wake != Wake::default() {
            self.wake_idle(wake);
        }
    }

    /// Out of line: most sends wake nobody, and the inlined fast path stays small.
    #[inline(never)]
    fn wake_idle(&self, wake: Wake) {
        if wake.thread {
            // An idle thread registered itself and waits on `work` under the state lock:
            // taking that lock here means it is already waiting, so the notify is not lost.
            let _st = self.lock();
            self.work.notify_one();
        }
        if wake.task {
            // A task enables its `Notified` before it registers, and a `Notify` keeps one
            // permit: no lock needed.
            self.work_async.notify_one();
        }
        if wake.give_way {
            // After the notifies: what they woke may run meanwhile. See `Intake::try_accept`.
            std::thread::yield_now();
        }
    }

    pub(crate) fn wait<'a>(
        &self,
        cv: &Condvar,
        guard: MutexGuard<'a, State<T, R>>,
    ) -> MutexGuard<'a, State<T, R>> {
        cv.wait(guard).unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn wait_until<'a>(
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

    /// Wakes an idle worker for new work (the caller holds the state lock), unless enough
    /// workers were already woken for what is queued: an awake worker takes every runnable
    /// item before it sleeps again, so a burst of sends costs one wake-up, not one per item.
    fn wake_worker(&self, st: &State<T, R>, ik: &mut Intake<T, R>) {
        self.notify_workers(ik.wake_for(st.runnable()));
    }

    /// Closes the intake: every later send takes the state lock and sees `closed`; what was
    /// sent before joins the lanes, to be drained or reported like the rest.
    fn stop_accepting(&self, st: &mut State<T, R>) {
        st.closed = true;
        let mut ik = self.intake();
        ik.shut();
        self.drain_locked(st, &mut ik);
    }

    /// The first step of every shutdown: no more sends, and whoever waits looks again (under
    /// `stop_timeout`, not `drain`, workers start nothing more).
    fn stop_for_shut_down(&self, st: &mut State<T, R>, drain: bool) {
        self.stop_accepting(st);
        if !drain {
            st.stopping = true;
            // Workers stop between the items of their leases too.
            for worker in 0..self.lease_claims.len() {
                self.close_claims(st, worker);
            }
        }
        self.wake_all();
    }

    /// A shutdown's deadline passed, or nothing is left to wait for: workers exit when they
    /// next look at the state (one still inside a sink call finishes that call on its own).
    /// Returns the report, and what was left, to settle once the shutdown is over.
    fn abandon(&self, st: &mut State<T, R>) -> (CloseReport, Left<T, R>) {
        st.abandoned = true;
        // Settled already: they only drop, with what is left, once the shutdown is over.
        let mut delivered = Vec::new();
        self.close_leases(st, &mut delivered);
        self.wake_all();
        let report = CloseReport {
            stats: st.stats(),
            left: st.unsettled(),
            drained: st.unsettled() == 0,
        };
        let mut left = st.unsettled_nodes();
        left.extend(delivered.into_iter().map(|node| (node, false)));
        (report, Left(left))
    }

    /// Closes every worker's lease, for a shutdown that stops them between items (see
    /// `State::close_lease`); the delivered items it takes off the lanes go into `release`.
    pub(crate) fn close_leases(&self, st: &mut State<T, R>, release: &mut Vec<NodeRef<T, R>>) {
        for worker in 0..self.lease_claims.len() {
            if let Some(claim) = self.close_claims(st, worker) {
                st.close_lease(worker, claim, release);
            }
        }
    }

    /// Waits for work as an idle worker thread (registered as such, see `register_idle`), or,
    /// while a lease is watched (see `State::watched_lease`) and nobody else does, stands by:
    /// waits until the lease's worker has not moved on for [`STANDBY`], however often sends
    /// wake it meanwhile, and then takes the lookout from that worker if it kept it (see
    /// `IntakeLine::lookout`), moving the items sent since into the lanes, and cuts a pipelined
    /// lease (see `State::cut_lease`), the items it took off the lane going into `release`,
    /// counted as `worker`'s to settle. A call stuck in a lease then holds up only its own
    /// item, as it would outside a lease (in keyed mode, its key's items, which wait for it
    /// anyway).
    pub(crate) fn stand_by<'a>(
        &self,
        mut st: MutexGuard<'a, State<T, R>>,
        worker: usize,
        release: &mut Vec<NodeRef<T, R>>,
    ) -> MutexGuard<'a, State<T, R>> {
        let Some(lease) = st.watched_lease().filter(|_| !st.standby) else {
            return self.wait(&self.work, st);
        };
        let still = |st: &State<T, R>| {
            let claim = self.lease_claims[lease.0].load(AtomicOrdering::Acquire);
            let watch = st.watch.filter(|w| w.lease == lease && w.claim == claim);
            (st.watched_lease() == Some(lease)).then(|| watch.ok_or(claim))
        };
        // Since when the lease has stood where it is now, as the last look at it saw.
        let since = match still(&st) {
            Some(Ok(watch)) => watch.since,
            Some(Err(claim)) => {
                let since = Instant::now();
                st.watch = Some(Watch {
                    lease,
                    claim,
                    since,
                });
                since
            }
            None => unreachable!("the lease just found"),
        };
        st.standby = true;
        let (mut st, stalled) = self.wait_until(&self.work, st, Some(since + STANDBY));
        st.standby = false;
        if stalled && matches!(still(&st), Some(Ok(_))) {
            if st.lookout_lease_over(lease.0) {
                // Items sent since woke nobody: this worker moves them into the lanes, where
                // its next step finds them.
                self.release_lookout(&mut st, lease.0);
            }
            // A keyed lease holds up only its own key, which waits for the stuck call anyway:
            // it is not cut (nor its claims closed).
            let before = release.len();
            if st.pipelined() {
                if let Some(claim) = self.close_claims(&st, lease.0) {
                    st.cut_lease(lease.0, claim, release);
                }
            }
            st.settling_by[worker] += (release.len() - before) as u64;
        }
        st
    }

    /// If `worker` holds a lease, lets it start no item it has not claimed yet; returns how far
    /// it got (see `queue::lease_progress`).
    fn close_claims(&self, st: &State<T, R>, worker: usize) -> Option<usize> {
        st.leased(worker).then(|| {
            self.lease_claims[worker].fetch_or(LEASE_CLOSED, AtomicOrdering::AcqRel) & !LEASE_CLOSED
        })
    }

    /// The last worker left a conveyor that was not closed: the Tokio runtime its async sink
    /// ran on shut down and dropped the worker tasks. Nothing will deliver any more, so it
    /// shuts down as a close past its deadline does: later sends are refused as closed, and
    /// what was left settles as closed (or unconfirmed, for a call that was running) rather
    /// than waiting for good. With a journal, those items stay there for the next start.
    pub(crate) fn orphaned(&self, mut st: MutexGuard<'_, State<T, R>>) {
        self.stop_accepting(&mut st);
        let (_, left) = self.abandon(&mut st);
        drop(st);
        tracing::warn!(
            left = left.0.len(),
            "the Tokio runtime this conveyor's async sink ran on shut down while the conveyor \
             was open: it delivers nothing more, refuses sends, and reports what was left as \
             closed; build the conveyor outside that runtime (it then owns one), or close it \
             before the runtime ends"
        );
        drop(left);
    }

    fn wake_all(&self) {
        self.work.notify_all();
        self.work_async.notify_waiters();
        self.wake_all_senders();
        self.settled.notify_all();
        self.settled_async.notify_waiters();
        self.shutdown.notify_all();
        self.shutdown_async.notify_waiters();
    }

    /// Every sender waiting for room (blocking or async) looks again.
    pub(crate) fn wake_all_senders(&self) {
        self.space.notify_all();
        self.space_async.notify_waiters();
    }

    pub(crate) fn wake_one_sender(&self, st: &State<T, R>) {
        if st.replaying {
            // The replay thread waits on `space` too, next to senders that cannot proceed
            // until it is done: a single wake-up could pick one of them and be lost.
            self.space.notify_all();
        } else if st.waiters.blocked_senders > 0 {
            self.space.notify_one();
        }
        if st.waiters.async_senders > 0 {
            self.space_async.notify_one();
        }
    }

    /// After a worker's step: a worker waiting inside its own call checks whether the others
    /// can still do what it waits for (see `State::others_can_progress`).
    pub(crate) fn wake_waiting_inside(&self, st: &State<T, R>) {
        if st.any_waiting_inside() {
            self.wake_all_senders();
            self.settled.notify_all();
            self.settled_async.notify_waiters();
        }
    }

    pub(crate) fn wake_flushers(&self, st: &State<T, R>) {
        if st.waiters.flushers > 0 && st.flushers_may_go() {
            self.settled.notify_all();
            self.settled_async.notify_waiters();
        }
    }
}

/// A task registered in one of the `Waiters` counts while it awaits; if the future is
/// dropped (cancelled) there, the registration is undone so no wake-up is spent on it.
struct AsyncWaiter<'a, T, R> {
    shared: &'a Shared<T, R>,
    count: fn(&mut Waiters) -> &mut usize,
    registered: bool,
}

impl<'a, T, R> AsyncWaiter<'a, T, R> {
    fn new(shared: &'a Shared<T, R>, count: fn(&mut Waiters) -> &mut usize) -> Self {
        Self {
            shared,
            count,
            registered: false,
        }
    }

    /// Undoes the registration of the previous round, if any: the task is looking again.
    fn unregister(&mut self, st: &mut State<T, R>) {
        if std::mem::take(&mut self.registered) {
            *(self.count)(&mut st.waiters) -= 1;
        }
    }

    /// Registers the task for the wait it is about to start.
    fn register(&mut self, st: &mut State<T, R>) {
        *(self.count)(&mut st.waiters) += 1;
        self.registered = true;
    }
}

impl<T, R> Drop for AsyncWaiter<'_, T, R> {
    fn drop(&mut self) {
        if self.registered {
            *(self.count)(&mut self.shared.lock().waiters) -= 1;
        }
    }
}

impl<T, R> Shared<T, R> {
    /// Marks the calling thread's worker, if it is one of this conveyor's (and still live), as
    /// waiting inside; returns it. The others waiting inside look again: they may now wait for
    /// nobody.
    fn mark_waiting_inside(&self, st: &mut State<T, R>) -> Option<usize> {
        let worker = self.worker_here()?;
        st.set_waiting_inside(worker, true);
        self.wake_waiting_inside(st);
        Some(worker)
    }
}

/// A receipt waited for from inside one of this conveyor's workers (see `Receipt::wait`).
impl<T: Send + Sync, R: Send> OwnWorkers for Shared<T, R> {
    fn start_waiting_inside(&self, item: Awaited<'_>) -> Inside {
        // Without the lock on every thread but the workers' own.
        if self.worker_here().is_none() {
            return Inside::Elsewhere;
        }
        let mut st = self.lock();
        match self.mark_waiting_inside(&mut st) {
            Some(worker) if self.may_wait_inside(&mut st, worker, item) => Inside::Waiting(worker),
            Some(_) => Inside::Hopeless,
            None => Inside::Elsewhere,
        }
    }

    fn keep_waiting_inside(&self, worker: usize, item: Awaited<'_>) -> bool {
        self.may_wait_inside(&mut self.lock(), worker, item)
    }

    fn stop_waiting_inside(&self, worker: usize) {
        self.lock().set_waiting_inside(worker, false);
    }
}

impl<T, R> Shared<T, R> {
    /// Whether `worker`, marked as waiting inside for `item` to settle, may go on waiting:
    /// `item` does not wait for `worker`'s own job, and anything else can still settle an
    /// item. If not, it is unmarked.
    fn may_wait_inside(&self, st: &mut State<T, R>, worker: usize, item: Awaited<'_>) -> bool {
        // Items sent from the fast path may still be in the intake, where the lanes do not
        // show them: an idle worker was woken for them and would start them.
        self.drain(st);
        // Past a shutdown's deadline, the thread closing the conveyor settles every item left.
        // Otherwise, however busy the other workers are (with other keys, say), an item held up
        // by this worker's own job never settles while it waits: that must not wait for as
        // long as the others have work.
        let may =
            st.abandoned || (!st.held_by(worker, item.seq, item.key) && st.others_can_progress());
        if !may {
            st.set_waiting_inside(worker, false);
        }
        may
    }
}

/// A call into a conveyor made from inside one of its workers (its sink call or a receipt
/// callback, see `worker::WorkerHere`), while it waits: that worker delivers nothing meanwhile,
/// so it counts as waiting inside (see `State::others_can_progress`) until `stop`, or until the
/// guard drops (an async wait that was cancelled). Make it before taking the state lock: a drop
/// that has to unmark takes the lock.
struct InsideWait<'a, T, R> {
    shared: &'a Shared<T, R>,
    /// The worker, while marked.
    worker: Option<usize>,
}

impl<'a, T, R> InsideWait<'a, T, R> {
    fn new(shared: &'a Shared<T, R>) -> Self {
        Self {
            shared,
            worker: None,
        }
    }

    /// Marks the calling thread's worker, if it is one of this conveyor's and is not marked
    /// yet.
    fn start(&mut self, st: &mut State<T, R>) {
        if self.worker.is_none() {
            self.worker = self.shared.mark_waiting_inside(st);
        }
    }

    /// Whether it waits inside, for what none of the other workers can bring about.
    fn hopeless(&self, st: &State<T, R>) -> bool {
        self.worker.is_some() && !st.others_can_progress()
    }

    fn stop(&mut self, st: &mut State<T, R>) {
        if let Some(worker) = self.worker.take() {
            st.set_waiting_inside(worker, false);
        }
    }
}

impl<T, R> Drop for InsideWait<'_, T, R> {
    fn drop(&mut self) {
        if let Some(worker) = self.worker.take() {
            self.shared.lock().set_waiting_inside(worker, false);
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
    /// A dead letter sent again (`retry_dead`): block the thread whatever the policy, as it
    /// must not be refused or dropped on its way back into the queue, until the deadline if
    /// any (then refused as full: it stays a dead letter). Not refused while the journal
    /// fails either: it stays a dead letter there until its new append is committed.
    Requeue(Option<Instant>),
}

/// What a journaled send appends: the encoded item, an input position to store with it, and
/// the dead letter it replaces (`retry_dead`).
struct Entry {
    payload: Vec<u8>,
    cursor: Option<u64>,
    replaces_dead: Option<u64>,
}

/// Why a send did not complete now.
enum Refused<T, R> {
    Send(SendError<NodeRef<T, R>>),
    /// `send_async` must await room; it is registered as an async sender.
    MustWait(NodeRef<T, R>),
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
    /// The runtime for async sinks when not built inside a multi-threaded one (see
    /// `async_runtime`); shut down in the background on drop so that dropping never blocks or
    /// panics inside async code.
    runtime: Option<tokio::runtime::Runtime>,
    /// Blocking-sink worker threads, joined by `close` once they have exited.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl<T: Send + Sync + 'static, R: Send + 'static> Conveyor<T, R> {
    /// Starts configuring a conveyor; see [`Builder`] for the settings and defaults.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, Ordering};
    ///
    /// let c: Conveyor<String> = Conveyor::builder()
    ///     .ordering(Ordering::Keyed { concurrency: 4 })
    ///     .capacity(1_000)
    ///     .build(|d| {
    ///         println!("{}", d.item());
    ///         Ok(())
    ///     })?;
    /// c.send_keyed("user-42", "hello".to_owned()).unwrap();
    /// c.flush();
    /// assert_eq!(c.stats().delivered, 1);
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn builder() -> Builder<T, R> {
        Builder::default()
    }

    pub(crate) fn start(
        config: Config,
        sink: Sink<T, R>,
        journal: Option<JournalSettings<T>>,
    ) -> Result<Self, BuildError> {
        let workers = config.ordering.workers();
        // With a journal: seqs continue after the highest one it ever handed out, idempotency
        // keys use its id, and the lanes it remembers as paused start paused.
        let mut opened = None;
        let (mut first_seq, mut id_prefix) = (1, format!("{:016x}", random_u64()));
        let mut paused = Vec::new();
        if let Some(settings) = &journal {
            let mut j = Journal::open(&settings.path)?;
            j.claim(config.ordering.name(), config.journal_kind.as_deref())?;
            let last_seq = j.max_seq()?;
            first_seq = last_seq + 1;
            id_prefix = j.id().to_owned();
            paused = j.paused_lanes()?;
            opened = Some(Durable::start(
                j,
                settings,
                config.durability,
                last_seq,
                config.capacity,
            )?);
        }
        let mut state = State::new(config.ordering, config.capacity, config.rate_limit);
        for (lane, _) in &paused {
            state.restore_pause(lane);
        }
        // Said at start: nothing else tells why a lane delivers nothing after a restart (its
        // pause was logged by the run that paused it), and a strict one soon fills the queue.
        for (lane, error) in paused.iter().take(PAUSES_LOGGED) {
            tracing::warn!(
                ?lane, %error,
                "lane paused before this start stays paused: nothing in it is delivered until \
                 resume(lane) (conveyor resume KEY for the CLI)"
            );
        }
        if paused.len() > PAUSES_LOGGED {
            tracing::warn!(
                more = paused.len() - PAUSES_LOGGED,
                "more lanes paused before this start stay paused; Conveyor::paused lists them all"
            );
        }
        state.seq_limit = opened.as_ref().map(|d| d.seq_limit.clone());
        let lease_claims = state.lease_claims.clone();
        // Prefix of every `Delivery::idempotency_key`: the journal's id with a journal (stable
        // across restarts), else random per conveyor.
        // The nodes' context keeps a weak reference to the conveyor (see `NodeContext`).
        let shared = Arc::new_cyclic(|conveyor: &Weak<Shared<T, R>>| {
            let context = NodeContext {
                id_prefix: Arc::from(id_prefix),
                conveyor: conveyor.clone(),
            };
            // A journal's appends are queued under the state lock in seq order: no fast path.
            let intake = Intake::new(
                first_seq,
                config.capacity,
                opened.is_none(),
                config.ordering.is_keyed(),
                context,
            );
            Shared {
                state: CachePadded::new(Mutex::new(state)),
                intake: CachePadded::new(IntakeLine {
                    items: SpinLock::new(intake),
                    filled: AtomicBool::new(false),
                    lookout: AtomicUsize::new(NO_LOOKOUT),
                }),
                work: Condvar::new(),
                work_async: Notify::new(),
                space: Condvar::new(),
                space_async: Notify::new(),
                settled: Condvar::new(),
                settled_async: Notify::new(),
                shutdown: Condvar::new(),
                shutdown_async: Notify::new(),
                config,
                durable: opened,
                lease_claims,
            }
        });
        let mut conveyor = Conveyor {
            shared: shared.clone(),
            runtime: None,
            threads: Mutex::new(Vec::new()),
        };
        match sink {
            Sink::Blocking(f) => {
                for worker in 0..workers {
                    let (shared, f) = (shared.clone(), f.clone());
                    let spawned = std::thread::Builder::new()
                        .name(format!("conveyor-{worker}"))
                        .spawn(move || thread_worker(shared, f, worker));
                    match spawned {
                        Ok(handle) => conveyor
                            .threads
                            .get_mut()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(handle),
                        Err(e) => {
                            // Workers not started will never exit: account for them so
                            // the close on drop does not wait for them.
                            let mut st = conveyor.shared.lock();
                            st.live_workers -= workers - worker;
                            drop(st);
                            return Err(BuildError::Spawn(e));
                        }
                    }
                }
            }
            Sink::Async(f) => {
                let (handle, owned) = async_runtime()?;
                conveyor.runtime = owned;
                for worker in 0..workers {
                    handle.spawn(async_worker(shared.clone(), f.clone(), worker));
                }
            }
        }
        if let Some(durable) = &shared.durable {
            let weak = Arc::downgrade(&shared);
            durable.on_room(Box::new(move || {
                if let Some(shared) = weak.upgrade() {
                    shared.wake_all_senders();
                }
            }));
            start_replay(&shared)?;
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
        node: NodeRef<T, R>,
        entry: &mut Option<Entry>,
        wait: Wait,
        was_waiting: bool,
        inside: &mut InsideWait<'_, T, R>,
    ) -> Result<Receipt<R>, Refused<T, R>> {
        let shared = &*self.shared;
        let mut st = shared.lock();
        if was_waiting {
            st.waiters.async_senders -= 1;
        }
        let mut evicted = None;
        // The intake stays locked from its drain to this item's accept, so no item sent
        // meanwhile by the fast path can get a lower seq and land behind it.
        let mut ik = loop {
            if st.closed {
                inside.stop(&mut st);
                return Err(Refused::Send(SendError::Closed(node)));
            }
            // After `closed`: a closed conveyor says so, whatever its journal's state. Checked
            // on every round, so that a send that waited for room is refused as one made now
            // (the replay wakes those waiting behind it when it cannot read, see `next_page`).
            if !matches!(wait, Wait::Requeue(_)) && self.journal_blocked() {
                inside.stop(&mut st);
                return Err(Refused::Send(SendError::Journal(node)));
            }
            let mut ik = shared.intake();
            shared.drain_locked(&mut st, &mut ik);
            let room = match st.room(ik.next_seq()) {
                // A journal writer that fell behind holds new items back as a used-up seq
                // reservation does (it wakes senders, without the state lock, once it is no
                // longer behind): accepting one queues a write for a disk that may hang, and
                // evicting an item to make room would queue one more.
                Room::Free | Room::Full if shared.durable.as_ref().is_some_and(Durable::behind) => {
                    Room::Later
                }
                room => room,
            };
            if room == Room::Free {
                break ik;
            }
            // Only the workers free room in a full queue, or for a replay that is waiting for
            // room; a replay still loading, or the journal's seq reservation being extended,
            // runs on a thread of its own.
            let needs_workers = match room {
                Room::Full => true,
                Room::Later => st.replaying && !st.room_for_replay(),
                Room::Free => false,
            };
            let waits = matches!(
                (shared.config.backpressure, wait),
                (Backpressure::Block, Wait::Thread | Wait::Task) | (_, Wait::Requeue(_))
            );
            if waits && needs_workers {
                // From inside a sink call or a receipt callback, its own worker cannot make
                // room while it waits: only the others can.
                inside.start(&mut st);
                if inside.hopeless(&st) {
                    inside.stop(&mut st);
                    return Err(Refused::Send(SendError::Full(node)));
                }
            }
            match (shared.config.backpressure, wait) {
                (Backpressure::Block, Wait::Thread) | (_, Wait::Requeue(_)) => {
                    let until = match wait {
                        Wait::Requeue(until) => until,
                        _ => None,
                    };
                    if until.is_some_and(|until| Instant::now() >= until) {
                        inside.stop(&mut st);
                        return Err(Refused::Send(SendError::Full(node)));
                    }
                    drop(ik);
                    st.waiters.blocked_senders += 1;
                    // The journal's writer extends the seq reservation, or catches up with
                    // the ops queued for it, and wakes senders without the state lock (it
                    // must not take it: senders push to it under that lock), so its wake-up
                    // can fall between the check above and this wait: look again now and
                    // then. (An async sender enables its wake-up before the check.)
                    let recheck = (room == Room::Later && !st.replaying)
                        .then(|| Instant::now() + RESERVATION_CHECK);
                    let deadline = [recheck, until].into_iter().flatten().min();
                    #[cfg(test)]
                    if let Some(hook) = BEFORE_SPACE_WAIT.with(std::cell::Cell::take) {
                        hook();
                    }
                    // In an async sink or task, room may be made by a task on this thread.
                    st = blocking_section(|| shared.wait_until(&shared.space, st, deadline).0);
                    st.waiters.blocked_senders -= 1;
                }
                (Backpressure::Block, Wait::Task) => {
                    st.waiters.async_senders += 1;
                    return Err(Refused::MustWait(node));
                }
                (Backpressure::Block | Backpressure::Reject, _) => {
                    return Err(Refused::Send(SendError::Full(node)));
                }
                (Backpressure::DropOldest, _) if room == Room::Full => {
                    // Evicting makes room for exactly this item: accept it right away, so
                    // the eviction is always journaled and its receipt always settled.
                    evicted = st.drop_oldest();
                    if evicted.is_some() {
                        break ik;
                    }
                    return Ok(self.accept_dropped(st, ik, node, entry));
                }
                (Backpressure::DropNewest | Backpressure::DropOldest, _) => {
                    return Ok(self.accept_dropped(st, ik, node, entry));
                }
            }
        };
        inside.stop(&mut st);
        ik.number(&node);
        let receipt = Receipt::new(node.clone());
        // Journal ops are queued under the lock, so the writer sees appends in seq order and
        // before any settlement of the same item.
        let journal = shared.durable.as_ref().zip(entry.take());
        let record = journal
            .as_ref()
            .map(|_| (node.key().cloned(), st.lane_id(node.key())));
        if st.accept(node, self.attempt_limit()) {
            shared.wake_worker(&st, &mut ik);
        }
        ik.set_lanes_queued(st.queued());
        drop(ik);
        if let (Some((durable, entry)), Some((key, lane))) = (journal, record) {
            durable.push(Op::Append(Record {
                seq: receipt.seq(),
                lane,
                key,
                payload: entry.payload,
                cursor: entry.cursor,
                replaces_dead: entry.replaces_dead,
            }));
            if let Some(old) = &evicted {
                durable.push(Op::Settle(Settled::Delivered(old.seq())));
            }
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
        mut ik: SpinGuard<'_, Intake<T, R>>,
        node: NodeRef<T, R>,
        entry: &Option<Entry>,
    ) -> Receipt<R> {
        ik.number(&node);
        drop(ik);
        st.accept_dropped();
        if let Some(durable) = &self.shared.durable {
            durable.used_without_append(node.seq());
            // The item's fate is settled (dropped, and counted): a rerun resuming from the
            // cursor must not send it again, so its input position is stored all the same.
            if let Some(cursor) = entry.as_ref().and_then(|e| e.cursor) {
                durable.push(Op::Cursor(cursor));
            }
        }
        drop(st);
        tracing::debug!(seq = node.seq(), "queue full: item dropped by policy");
        node.settle(Err(DeliveryError::Dropped));
        Receipt::new(node)
    }

    /// With a journal: encodes the item (outside the state lock), with the input position to
    /// store with it. An item too large for a journal row is refused: SQLite would refuse its
    /// append, and the writer would retry that append for ever, refusing every later send
    /// meanwhile. Whether the journal takes items at all is `submit`'s to say, after whether
    /// the conveyor does.
    fn journal_entry(
        &self,
        key: Option<&str>,
        item: T,
        cursor: Option<u64>,
    ) -> Result<(T, Option<Entry>), SendError<T>> {
        let Some(durable) = &self.shared.durable else {
            return Ok((item, None));
        };
        match (durable.codec.encode)(&item) {
            Ok(payload) => {
                // The key is stored twice: as the key, and as the lane in keyed mode.
                let size = payload.len() + 2 * key.map_or(0, str::len);
                if size > durable.max_entry {
                    tracing::warn!(
                        size,
                        limit = durable.max_entry,
                        "item too large for the journal: refused"
                    );
                    return Err(SendError::TooLarge {
                        item,
                        size,
                        limit: durable.max_entry,
                    });
                }
                Ok((
                    item,
                    Some(Entry {
                        payload,
                        cursor,
                        replaces_dead: None,
                    }),
                ))
            }
            Err(reason) => Err(SendError::Encode { item, reason }),
        }
    }

    /// Under `Durability::Sync`, waits until the accepted item is committed. An item already
    /// settled (dropped by policy, or delivered meanwhile) has nothing left to lose.
    fn wait_durable(&self, receipt: &Receipt<R>) {
        if self.shared.durable.as_ref().is_some_and(|d| d.sync) {
            self.committed_by(receipt, None);
        }
    }

    /// `wait_durable` for `send_async`: awaits the commit instead of blocking the thread that
    /// polls the future, which on a current-thread runtime would stop every other task (for as
    /// long as the disk is full, say). No timer: the future may be polled outside Tokio.
    async fn wait_durable_async(&self, receipt: &Receipt<R>) {
        let Some(durable) = self.shared.durable.as_ref().filter(|d| d.sync) else {
            return;
        };
        if !receipt.is_settled() {
            durable.committed(receipt.seq()).await;
        }
    }

    /// Waits until `receipt`'s item is committed to the journal, at most until `deadline`;
    /// returns whether the wait is over.
    fn committed_by(&self, receipt: &Receipt<R>, deadline: Option<Instant>) -> bool {
        receipt.is_settled() || self.seq_committed_by(receipt.seq(), deadline)
    }

    /// `committed_by` for an item known by its sequence number only.
    fn seq_committed_by(&self, seq: u64, deadline: Option<Instant>) -> bool {
        match &self.shared.durable {
            Some(durable) => {
                if !durable.sync {
                    durable.commit_soon();
                }
                blocking_section(|| durable.wait_committed(seq, deadline))
            }
            None => true,
        }
    }

    /// The future behind `wait_committed_async` and `wait_committed_seq_async`: awaits the
    /// commit of `seq` in `shared`'s journal, or nothing for `None`.
    async fn commit_of(shared: Option<Arc<Shared<T, R>>>, seq: u64) {
        if let Some(durable) = shared.as_ref().and_then(|s| s.durable.as_ref()) {
            if !durable.sync {
                durable.commit_soon();
            }
            durable.committed(seq).await;
        }
    }

    /// Waits until the journal holds `receipt`'s item on disk, for at most `timeout`, and
    /// returns whether it does (false: the time ran out first).
    ///
    /// Sends under [`Durability::Sync`](crate::Durability::Sync) make this wait themselves.
    /// Under [`Durability::Batched`](crate::Durability::Batched) it lets one sender wait for
    /// one item, for example a server that acknowledges its client only once the item would
    /// survive a crash, while other sends return at once: it has the writer commit now rather
    /// than when its window ends. While the journal cannot be written (see
    /// [`Conveyor::journal_error`]) the writer keeps retrying and this keeps waiting. It
    /// returns `true` at once without a journal, for an item already settled (nothing is left
    /// to lose), and after [`close`](Conveyor::close) (what was not committed then is counted
    /// as left in its report).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    /// use std::time::Duration;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let c: Conveyor<String> = Conveyor::builder()
    ///     .journal(dir.path().join("events.journal"))
    ///     .build(|_d| Ok(()))?;
    /// let receipt = c.send("must survive a crash".to_owned()).unwrap();
    /// assert!(c.wait_committed(&receipt, Duration::from_secs(10)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use = "false means the item may not be on disk yet"]
    pub fn wait_committed(&self, receipt: &Receipt<R>, timeout: Duration) -> bool {
        self.committed_by(receipt, Some(later(timeout)))
    }

    /// [`Conveyor::wait_committed`] for async code: awaits until the journal holds `receipt`'s
    /// item on disk, without blocking the thread that polls it.
    ///
    /// It ends as `wait_committed` does, without a timeout: at once without a journal, for an
    /// item already settled, and after [`close`](Conveyor::close) (what was not committed then
    /// is counted as left in its report); while the journal cannot be written (see
    /// [`Conveyor::journal_error`]) the writer keeps retrying and this keeps waiting, so bound
    /// it with a timeout of your runtime's if the disk may fill. Under
    /// [`Durability::Batched`](crate::Durability::Batched) it has the writer commit now rather
    /// than when its window ends.
    ///
    /// The future borrows neither the conveyor nor the receipt: it can be spawned, or awaited
    /// after the receipt was handed on. It needs no runtime, only a waker, and dropping it
    /// changes nothing.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use conveyor::Conveyor;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let c: Conveyor<String> = Conveyor::builder()
    ///     .journal(dir.path().join("events.journal"))
    ///     .build_async(|_d| async { Ok(()) })?;
    /// let receipt = c.send_async("must survive a crash".to_owned()).await?;
    /// c.wait_committed_async(&receipt).await; // other tasks run meanwhile
    /// assert!(c.wait_committed(&receipt, std::time::Duration::ZERO));
    /// # Ok(())
    /// # }
    /// ```
    pub fn wait_committed_async(
        &self,
        receipt: &Receipt<R>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let shared = (!receipt.is_settled()).then(|| Arc::clone(&self.shared));
        Self::commit_of(shared, receipt.seq())
    }

    /// [`Conveyor::wait_committed`] for an item known by its sequence number
    /// ([`Receipt::seq`]), for code that no longer holds its receipt (it passed it to
    /// [`Receipt::on_settled`], say, or to a binding that did).
    ///
    /// It ends as `wait_committed` does, except that a number cannot say whether its item has
    /// settled: for an item dropped before it was written (by
    /// [`Backpressure::DropNewest`](crate::Backpressure::DropNewest)), or a number this
    /// conveyor has not handed out yet, it waits until a later item is committed, or the
    /// conveyor closes. Prefer `wait_committed` where you have the receipt. A number from
    /// another conveyor means nothing here.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    /// use std::time::Duration;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let c: Conveyor<String> = Conveyor::builder()
    ///     .journal(dir.path().join("events.journal"))
    ///     .build(|_d| Ok(()))?;
    /// let receipt = c.send("must survive a crash".to_owned()).unwrap();
    /// let seq = receipt.seq();
    /// receipt.on_settled(|_outcome| {}); // the receipt is gone, its number stays
    /// assert!(c.wait_committed_seq(seq, Duration::from_secs(10)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use = "false means the item may not be on disk yet"]
    pub fn wait_committed_seq(&self, seq: u64, timeout: Duration) -> bool {
        self.seq_committed_by(seq, Some(later(timeout)))
    }

    /// [`Conveyor::wait_committed_seq`] for async code, without a timeout: awaits as
    /// [`Conveyor::wait_committed_async`] does, for an item known by its sequence number.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use conveyor::Conveyor;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let c: Conveyor<String> = Conveyor::builder()
    ///     .journal(dir.path().join("events.journal"))
    ///     .build_async(|_d| async { Ok(()) })?;
    /// let seq = c.send_async("must survive a crash".to_owned()).await?.seq();
    /// c.wait_committed_seq_async(seq).await; // other tasks run meanwhile
    /// assert!(c.wait_committed_seq(seq, std::time::Duration::ZERO));
    /// # Ok(())
    /// # }
    /// ```
    pub fn wait_committed_seq_async(
        &self,
        seq: u64,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        Self::commit_of(Some(Arc::clone(&self.shared)), seq)
    }

    /// The synchronous send variants (`wait` says whether they may block); `cursor` is
    /// stored with the item (see [`Conveyor::send_and_set_cursor`]).
    ///
    /// The fast path is inlined into each variant, down to `Intake::try_accept`, and
    /// everything else is out of line: called, the fast path's prologues, epilogues and
    /// results passed through memory were 40% of a send's instructions (callgrind, the
    /// producer's loop: 210 an item before, 122 after; see BENCHMARKS.md).
    #[inline(always)]
    fn send_with(
        &self,
        key: Option<Arc<str>>,
        item: T,
        wait: Wait,
        cursor: Option<u64>,
    ) -> Result<Receipt<R>, SendError<T>> {
        // Without a journal, the fast path first, with nothing but the key and the item made
        // before it: an empty journal entry made first was copied through the stack on the
        // way in, in loads wider than the stores that made it, which waited for the last
        // send's stores to reach the cache.
        if self.shared.durable.is_none() {
            return match self.shared.try_accept(key, item) {
                Ok(receipt) => Ok(receipt),
                Err(node) => self.submit_sync(node, None, wait),
            };
        }
        self.send_journaled(key, item, wait, cursor)
    }

    /// A send with a journal (see `send_with`).
    #[inline(never)]
    fn send_journaled(
        &self,
        key: Option<Arc<str>>,
        item: T,
        wait: Wait,
        cursor: Option<u64>,
    ) -> Result<Receipt<R>, SendError<T>> {
        let (item, entry) = self.journal_entry(key.as_deref(), item, cursor)?;
        // With a journal every send takes the state lock (see `Intake::open`).
        let node = self.shared.node(key, item);
        self.submit_sync(node, entry, wait)
    }

    /// The rest of a synchronous send that the fast path did not accept.
    #[inline(never)]
    fn submit_sync(
        &self,
        node: NodeRef<T, R>,
        mut entry: Option<Entry>,
        wait: Wait,
    ) -> Result<Receipt<R>, SendError<T>> {
        match self.submit(
            node,
            &mut entry,
            wait,
            false,
            &mut InsideWait::new(&self.shared),
        ) {
            Ok(receipt) => {
                self.wait_durable(&receipt);
                Ok(receipt)
            }
            Err(Refused::Send(e)) => Err(give_back(e)),
            Err(Refused::MustWait(_)) => unreachable!("only async sends are told to wait"),
        }
    }

    /// Accepts an item for delivery and returns at once with its [`Receipt`].
    ///
    /// It waits only when the queue is full and the policy is
    /// [`Backpressure::Block`] (the default); the sink's speed never matters
    /// otherwise. In async code use [`Conveyor::send_async`] instead, which awaits
    /// room rather than blocking the task's thread (on a worker thread of a multi-threaded
    /// Tokio runtime, a blocking wait moves the runtime's other tasks to another thread first,
    /// so an async sink on that runtime still makes room).
    ///
    /// # Errors
    ///
    /// [`SendError::Closed`] after [`close`](Conveyor::close), even while the journal fails;
    /// [`SendError::Full`] when full under [`Backpressure::Reject`]. With a journal,
    /// [`SendError::Journal`] while it cannot be written or its old items read (see
    /// [`Conveyor::journal_error`]), [`SendError::Encode`] for an item that cannot be encoded,
    /// and [`SendError::TooLarge`]. The item is handed back in each.
    ///
    /// Called from this conveyor's own sink or a receipt callback, it waits for room only
    /// while another worker can still make some: its own worker delivers nothing until the
    /// call returns. Once none can (strict ordering, or the queue full behind its own item),
    /// it returns [`SendError::Full`] even under `Block`, instead of waiting for itself.
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
        self.send_with(None, item, Wait::Thread, None)
    }

    /// Like [`Conveyor::send`], with a key: under [`Ordering::Keyed`](crate::Ordering::Keyed)
    /// items with the same key are delivered strictly in order, and different keys in
    /// parallel. In the other modes the key is only passed on to the sink.
    ///
    /// # Errors
    ///
    /// As for [`Conveyor::send`].
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
    ///     .ordering(Ordering::Keyed { concurrency: 2 })
    ///     .build(move |d| {
    ///         log.lock().unwrap().push((d.key() == Some("ann"), *d.item()));
    ///         Ok(())
    ///     })?;
    /// for i in 0..3 {
    ///     c.send_keyed("ann", i).unwrap();
    ///     c.send_keyed("bob", i).unwrap();
    /// }
    /// c.flush();
    /// let seen = seen.lock().unwrap();
    /// let ann: Vec<u32> = seen.iter().filter(|(ann, _)| *ann).map(|(_, i)| *i).collect();
    /// assert_eq!(ann, [0, 1, 2], "in order within a key; bob's items ran alongside");
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn send_keyed(&self, key: impl Into<String>, item: T) -> Result<Receipt<R>, SendError<T>> {
        self.send_with(Some(keys::shared(&key.into())), item, Wait::Thread, None)
    }

    /// Accepts an item only if that needs no waiting, whatever the policy.
    ///
    /// # Errors
    ///
    /// [`SendError::Full`] when the queue is full and the policy would have to wait
    /// or reject; otherwise as for [`Conveyor::send`].
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
        self.send_with(None, item, Wait::Never, None)
    }

    /// [`Conveyor::try_send`] with a key.
    ///
    /// # Errors
    ///
    /// As for [`Conveyor::try_send`].
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, Ordering};
    ///
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .ordering(Ordering::Keyed { concurrency: 8 })
    ///     .build(|_d| Ok(()))?;
    /// assert!(c.try_send_keyed("sensor-3", 21).is_ok()); // room in the queue: accepted
    /// c.close();
    /// let refused = c.try_send_keyed("sensor-3", 22).unwrap_err();
    /// assert!(refused.is_closed());
    /// assert_eq!(refused.into_inner(), 22, "a refused item is handed back");
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn try_send_keyed(
        &self,
        key: impl Into<String>,
        item: T,
    ) -> Result<Receipt<R>, SendError<T>> {
        self.send_with(Some(keys::shared(&key.into())), item, Wait::Never, None)
    }

    async fn submit_async(
        &self,
        key: Option<Arc<str>>,
        item: T,
        cursor: Option<u64>,
    ) -> Result<Receipt<R>, SendError<T>> {
        let (item, mut entry) = self.journal_entry(key.as_deref(), item, cursor)?;
        let mut node = match self.shared.try_accept(key, item) {
            Ok(receipt) => return Ok(receipt),
            Err(node) => node,
        };
        // Before the waiter: dropped after it, as the registrations were made.
        let mut inside = InsideWait::new(&self.shared);
        let mut waiter = AsyncWaiter::new(&self.shared, |w| &mut w.async_senders);
        loop {
            let notified = self.shared.space_async.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // `submit` itself undoes a registration from the previous round.
            let was_waiting = std::mem::take(&mut waiter.registered);
            match self.submit(node, &mut entry, Wait::Task, was_waiting, &mut inside) {
                Ok(receipt) => {
                    self.wait_durable_async(&receipt).await;
                    return Ok(receipt);
                }
                Err(Refused::Send(e)) => return Err(give_back(e)),
                Err(Refused::MustWait(back)) => {
                    node = back;
                    waiter.registered = true;
                    notified.await;
                }
            }
        }
    }

    /// Accepts an item, awaiting room in the queue if needed (never delivery).
    ///
    /// Under [`Durability::Sync`](crate::Durability::Sync) it then awaits the item's commit to
    /// the journal, without blocking the thread that polls it. Dropped while it awaits room, the
    /// future has accepted nothing; dropped while it awaits the commit, the item is accepted
    /// (and delivered, as after a `send` that returned): only its receipt is lost.
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
        self.submit_async(None, item, None).await
    }

    /// [`Conveyor::send_async`] with a key (see [`Conveyor::send_keyed`]).
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
    /// use conveyor::{Conveyor, Ordering};
    /// use std::sync::{Arc, Mutex};
    ///
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let log = seen.clone();
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .ordering(Ordering::Keyed { concurrency: 4 })
    ///     .build_async(move |d| {
    ///         log.lock().unwrap().push((d.key().unwrap().to_owned(), *d.item()));
    ///         async { Ok(()) }
    ///     })?;
    /// for i in 0..6 {
    ///     c.send_keyed_async(if i % 2 == 0 { "ann" } else { "bob" }, i).await.unwrap();
    /// }
    /// c.flush_async().await;
    /// let seen = seen.lock().unwrap();
    /// let ann: Vec<u32> = seen.iter().filter(|(k, _)| k == "ann").map(|(_, i)| *i).collect();
    /// assert_eq!(ann, [0, 2, 4]); // in order within the key
    /// # Ok(())
    /// # }
    /// ```
    pub async fn send_keyed_async(
        &self,
        key: impl Into<String>,
        item: T,
    ) -> Result<Receipt<R>, SendError<T>> {
        self.submit_async(Some(keys::shared(&key.into())), item, None)
            .await
    }

    fn flush_until(&self, deadline: Option<Instant>) -> bool {
        blocking_section(|| {
            let shared = &*self.shared;
            let mut inside = InsideWait::new(shared);
            let mut st = shared.lock();
            st.waiters.flushers += 1;
            let mut timed_out = false;
            // From its sink call or a receipt callback, a worker cannot deliver anything
            // meanwhile: wait only for what the others can do.
            inside.start(&mut st);
            while !shared.all_settled(&mut st)
                && !st.stalled()
                && st.live_workers > 0
                && !inside.hopeless(&st)
                && !timed_out
                && !self.journal_blocked()
            {
                // With a journal, look again now and then: a commit that fails wakes nobody.
                let wake = match (&shared.durable, deadline) {
                    (Some(_), Some(d)) => Some(d.min(later(JOURNAL_CHECK))),
                    (Some(_), None) => Some(later(JOURNAL_CHECK)),
                    (None, _) => deadline,
                };
                (st, _) = shared.wait_until(&shared.settled, st, wake);
                timed_out = deadline.is_some_and(|d| Instant::now() >= d);
            }
            inside.stop(&mut st);
            st.waiters.flushers -= 1;
            st.quiescent(shared.settling_here())
        })
    }

    /// Blocks until every accepted item has settled, except items held in paused
    /// lanes. With producers still sending, it waits until the queue is empty at
    /// some moment; use [`Conveyor::flush_timeout`] to bound the wait. In async code,
    /// await [`Conveyor::flush_async`].
    ///
    /// Called from this conveyor's own sink or a receipt callback, it waits only for what
    /// the other workers can deliver: its own worker delivers nothing until the call returns
    /// (so under strict ordering it returns at once).
    ///
    /// While the journal cannot be written ([`Conveyor::journal_error`]), it returns without
    /// waiting on: items not committed yet are not delivered until the journal can be written
    /// again. So it does while the journal's items from before this start cannot be read.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    ///
    /// let c: Conveyor<u32> = Conveyor::builder().build(|_d| Ok(()))?;
    /// for i in 0..5 {
    ///     c.send(i).unwrap();
    /// }
    /// c.flush(); // returns once all five settled
    /// assert_eq!(c.stats().delivered, 5);
    /// c.send(5).unwrap(); // unlike `close`, it leaves the conveyor open
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn flush(&self) {
        self.flush_until(None);
        self.sync_journal(None);
    }

    /// With a journal, commits what was accepted and settled so far; returns whether that
    /// worked in time.
    fn sync_journal(&self, deadline: Option<Instant>) -> bool {
        match &self.shared.durable {
            Some(durable) => blocking_section(|| durable.sync(deadline)),
            None => true,
        }
    }

    /// [`Conveyor::flush`] for at most `timeout`; returns whether everything settled (and,
    /// with a journal, whether what the journal holds is committed: while it cannot be
    /// written, see [`Conveyor::journal_error`], this returns `false` without waiting on).
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
    #[must_use = "false means items were still unsettled (or uncommitted) at the deadline"]
    pub fn flush_timeout(&self, timeout: Duration) -> bool {
        // Saturated, as `Duration::MAX` cannot be added to the clock.
        let deadline = Some(later(timeout));
        self.flush_until(deadline) && self.sync_journal(deadline)
    }

    /// Awaits what [`Conveyor::flush`] waits for, without blocking the runtime. Awaited from
    /// this conveyor's own async sink, it waits only for what the other workers can deliver,
    /// and while the journal cannot be written ([`Conveyor::journal_error`]) it returns without
    /// waiting on, as `flush` does.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), conveyor::BuildError> {
    /// use conveyor::Conveyor;
    /// use std::time::Duration;
    ///
    /// let c: Conveyor<u32> = Conveyor::builder().build_async(|_d| async {
    ///     tokio::time::sleep(Duration::from_millis(1)).await;
    ///     Ok(())
    /// })?;
    /// for i in 0..3 {
    ///     c.send_async(i).await.unwrap();
    /// }
    /// c.flush_async().await; // other tasks on this thread keep running meanwhile
    /// assert_eq!((c.stats().delivered, c.stats().queued, c.stats().in_flight), (3, 0, 0));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn flush_async(&self) {
        let shared = &*self.shared;
        // As in `flush`: from inside its own async sink, wait only for the other workers.
        let mut inside = InsideWait::new(shared);
        let mut waiter = AsyncWaiter::new(shared, |w| &mut w.flushers);
        loop {
            let notified = shared.settled_async.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // As `flush` does, it stops waiting while the journal cannot be written (or read by
            // the replay): the writer tells of a failure here, as nothing settles meanwhile.
            let journal = shared.durable.as_ref().map(|d| d.commits.notified());
            tokio::pin!(journal);
            if let Some(journal) = journal.as_mut().as_pin_mut() {
                journal.enable();
            }
            let settled = {
                let mut st = shared.lock();
                waiter.unregister(&mut st);
                inside.start(&mut st);
                let settled = shared.all_settled(&mut st)
                    || st.stalled()
                    || inside.hopeless(&st)
                    || self.journal_blocked();
                if settled {
                    inside.stop(&mut st);
                } else {
                    waiter.register(&mut st);
                }
                settled
            };
            if settled {
                // The journal's commit is awaited, not waited for: the thread goes on with
                // its other tasks meanwhile.
                if let Some(durable) = &shared.durable {
                    durable.sync_async().await;
                }
                return;
            }
            match journal.as_mut().as_pin_mut() {
                Some(journal) => {
                    tokio::select! {
                        () = notified => {}
                        () = journal => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Stops accepting items and drains, waiting at most the configured
    /// [`drain_timeout`](Builder::drain_timeout); see [`Conveyor::close_timeout`].
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    /// use std::time::Duration;
    ///
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .drain_timeout(Duration::from_secs(10))
    ///     .build(|_d| Ok(()))?;
    /// c.send(1).unwrap();
    /// let report = c.close();
    /// assert!(report.drained);
    /// assert_eq!(report.stats.delivered, 1);
    /// assert!(c.send(2).unwrap_err().is_closed());
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn close(&self) -> CloseReport {
        self.close_timeout(self.shared.config.drain_timeout)
    }

    /// Stops accepting items (later sends return [`SendError::Closed`]), lets the
    /// workers deliver what is queued, and waits for them for at most `timeout`.
    ///
    /// Items still unsettled at the deadline, and items held in paused lanes, are
    /// reported in the [`CloseReport`] and their receipts settle as
    /// [`DeliveryError::Closed`]. A sink call still running at the deadline is left
    /// to finish on its own thread; it never makes `close` wait longer. Its receipt
    /// settles as [`DeliveryError::Unconfirmed`], and [`Conveyor::stats`] count the call's
    /// outcome once it ends. An item waiting out a retry's backoff (however long a
    /// `retry_after` the sink asked for) stops waiting at the deadline: it is reported, and its
    /// worker leaves at once.
    ///
    /// With a journal, the journal's last commit (of the settlements made before the deadline)
    /// is given up to 2 s more, so that the next start does not deliver those items again; a
    /// disk that hangs longer is given up on, and the journal is closed when its commit ends.
    ///
    /// Called (or dropped) from this conveyor's own sink or a receipt callback, it waits only
    /// for what the other workers can deliver, then reports the rest, the calling sink's own
    /// item included.
    ///
    /// It blocks the calling thread; in async code, await [`Conveyor::close_async`] instead.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, DeliveryError};
    /// use std::sync::{mpsc, Mutex};
    /// use std::time::Duration;
    ///
    /// let (release, gate) = mpsc::channel::<()>();
    /// let gate = Mutex::new(gate);
    /// let c: Conveyor<u32> = Conveyor::builder().build(move |_d| {
    ///     gate.lock().unwrap().recv().ok(); // a call that hangs until released
    ///     Ok(())
    /// })?;
    /// let hung = c.send(1).unwrap();
    /// let queued = c.send(2).unwrap();
    /// // Returns at the deadline, however long the call hangs.
    /// let report = c.close_timeout(Duration::from_millis(20));
    /// assert_eq!((report.drained, report.left), (false, 2));
    /// assert!(matches!(queued.wait(), Err(DeliveryError::Closed)));
    /// assert!(hung.wait().is_err(), "Unconfirmed, or Closed if it had not started yet");
    /// drop(release); // the hung call ends on its own thread
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn close_timeout(&self, timeout: Duration) -> CloseReport {
        self.shut_down(timeout, true)
    }

    /// [`Conveyor::close_timeout`] for async code: it awaits the drain instead of blocking the
    /// thread that polls it, so the other tasks of that thread's runtime go on meanwhile.
    ///
    /// It does what `close_timeout` does: later sends return [`SendError::Closed`] at once,
    /// what is queued is delivered for at most `timeout`, and what is left then is reported in
    /// the [`CloseReport`], its receipts settled as [`DeliveryError::Closed`] (or
    /// [`DeliveryError::Unconfirmed`] for a sink call still running). It waits for a blocking
    /// sink's worker threads to end and for the journal's last commit (given up to 2 s more, as
    /// there) by awaiting them, never by blocking: within its deadline, which follows the real
    /// clock (not a paused Tokio test clock). Any executor may poll it.
    ///
    /// On a current-thread runtime (`#[tokio::main(flavor = "current_thread")]`) this is the
    /// close to use: `close_timeout` blocks the runtime's only thread, so a task on that runtime
    /// that the sink needs (one that answers it over a channel, a connection made there) cannot
    /// run, and the drain waits out its whole deadline.
    ///
    /// Once a close has given up its wait, every later close (this one, `close`,
    /// `close_timeout`) and the conveyor's drop report at once. Dropped before it completes
    /// (a branch of `tokio::select!` that lost, a `tokio::time::timeout` that expired), it
    /// leaves the conveyor closed to new sends and still draining; the receipts of the items it
    /// had already given up on settle as closed, and a later close or the drop finishes the
    /// shutdown.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), conveyor::BuildError> {
    /// use conveyor::{Conveyor, SinkError};
    /// use std::time::Duration;
    /// use tokio::sync::{mpsc, oneshot};
    ///
    /// // A task on this runtime that the sink needs: it hands out access tokens.
    /// let (ask, mut asks) = mpsc::unbounded_channel::<oneshot::Sender<u64>>();
    /// tokio::spawn(async move {
    ///     let mut token = 0;
    ///     while let Some(reply) = asks.recv().await {
    ///         token += 1;
    ///         let _ = reply.send(token);
    ///     }
    /// });
    /// let c: Conveyor<u32> = Conveyor::builder().build_async(move |_d| {
    ///     let ask = ask.clone();
    ///     async move {
    ///         let (reply, token) = oneshot::channel();
    ///         ask.send(reply).map_err(|_| SinkError::permanent("token task gone"))?;
    ///         let _token = token.await.map_err(SinkError::retryable)?;
    ///         Ok(()) // the call to the service, with its token, in real life
    ///     }
    /// })?;
    /// for i in 0..3 {
    ///     c.send_async(i).await.unwrap();
    /// }
    /// // The token task runs while this awaits: everything is delivered, well before 30 s.
    /// let report = c.close_async(Duration::from_secs(30)).await;
    /// assert_eq!((report.drained, report.left, report.stats.delivered), (true, 0, 3));
    /// assert!(c.send(3).unwrap_err().is_closed());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn close_async(&self, timeout: Duration) -> CloseReport {
        let deadline = Instant::now().checked_add(timeout);
        let shared = &*self.shared;
        let mut alarm = Alarm::at(deadline);
        // As in `shut_down`: registered as a flusher while it waits, so that settlements wake
        // it; the registration is undone if the future is dropped.
        let mut waiter = AsyncWaiter::new(shared, |w| &mut w.flushers);
        // Awaited from its own async sink, it waits only for what the other workers can do.
        let mut inside = InsideWait::new(shared);
        let abandoned = {
            let mut st = shared.lock();
            shared.stop_for_shut_down(&mut st, true);
            st.abandoned
        };
        // A second close reports at once: the first one already waited its deadline.
        let timed_out = abandoned
            || self
                .await_state(&mut waiter, &mut inside, &mut alarm, |st, own, me| {
                    st.shutdown_ready(own) || st.live_workers <= me
                })
                .await;
        let (report, left) = shared.abandon(&mut shared.lock());
        // As in `shut_down`: the worker threads that can end in time are awaited, so that no
        // sink call or receipt callback of this conveyor is still running after this.
        if !timed_out && !self.threads_are_empty() {
            self.await_state(&mut waiter, &mut inside, &mut alarm, |st, _, me| {
                st.live_workers <= me
            })
            .await;
        }
        let all_exited = {
            let mut st = shared.lock();
            inside.stop(&mut st);
            st.live_workers <= usize::from(shared.worker_here().is_some())
        };
        if all_exited {
            self.join_threads_async(&mut alarm).await;
        }
        // What was accepted and not settled stays in the journal for the next start.
        if let Some(durable) = &shared.durable {
            durable
                .shut_down_async(journal_close_deadline(deadline))
                .await;
        }
        drop(left);
        report
    }

    /// Stops at once: accepts nothing more, starts no queued item, lets the sink calls in
    /// progress (with their retries) finish for at most `timeout`, and leaves the rest queued.
    ///
    /// This is the Ctrl-C of a conveyor: with a journal, everything not delivered stays
    /// there for the next start; without one, the [`CloseReport`] says how many items were
    /// left, and their receipts report [`DeliveryError::Closed`] (or
    /// [`DeliveryError::Unconfirmed`] for a call still running at the deadline).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, DeliveryError};
    /// use std::sync::{mpsc, Mutex};
    /// use std::time::Duration;
    ///
    /// // A service that hangs until released.
    /// let (release, hang) = mpsc::channel::<()>();
    /// let hang = Mutex::new(hang);
    /// let c: Conveyor<u32> = Conveyor::builder().build(move |_d| {
    ///     let _ = hang.lock().unwrap().recv();
    ///     Ok(())
    /// })?;
    /// let _first = c.send(1).unwrap();
    /// let second = c.send(2).unwrap();
    /// let report = c.stop_timeout(Duration::from_millis(50));
    /// // The first call ran past the deadline; the queued item was never started.
    /// assert_eq!((report.stats.delivered, report.left), (0, 2));
    /// assert!(matches!(second.wait(), Err(DeliveryError::Closed)));
    /// drop(release);
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn stop_timeout(&self, timeout: Duration) -> CloseReport {
        self.shut_down(timeout, false)
    }

    /// `close_timeout` (`drain`: deliver what is queued) and `stop_timeout` (only finish what
    /// is in flight).
    fn shut_down(&self, timeout: Duration, drain: bool) -> CloseReport {
        let deadline = Instant::now().checked_add(timeout);
        blocking_section(|| {
            let shared = &*self.shared;
            let mut inside = InsideWait::new(shared);
            let mut st = shared.lock();
            shared.stop_for_shut_down(&mut st, drain);
            st.waiters.flushers += 1;
            // A second close (or the drop after a close) reports at once: the first one
            // already waited its deadline, and the workers were told to leave.
            let mut timed_out = st.abandoned;
            // Idle workers need not have exited: what matters is that nothing deliverable is
            // left (or that no worker is left to deliver it).
            // Called from a sink call or a receipt callback, this thread is one of the
            // workers, and the receipts it settles are not settled yet: neither can be
            // waited for.
            let own = shared.settling_here();
            let me = usize::from(shared.worker_here().is_some());
            inside.start(&mut st);
            while !st.shutdown_ready(own)
                && st.live_workers > me
                && !inside.hopeless(&st)
                && !timed_out
            {
                (st, timed_out) = shared.wait_until(&shared.settled, st, deadline);
            }
            st.waiters.flushers -= 1;
            let (report, left) = shared.abandon(&mut st);
            // Join the worker threads that can finish in time: after this, no sink call
            // or receipt callback of this conveyor is still running (unless one is stuck).
            while st.live_workers > me
                && !inside.hopeless(&st)
                && !timed_out
                && !self.threads_are_empty()
            {
                (st, timed_out) = shared.wait_until(&shared.settled, st, deadline);
            }
            inside.stop(&mut st);
            let all_exited = st.live_workers <= me;
            drop(st);
            if all_exited {
                self.join_threads();
            }
            // What was accepted and not settled stays in the journal for the next start.
            if let Some(durable) = &shared.durable {
                durable.shut_down(journal_close_deadline(deadline));
            }
            drop(left);
            report
        })
    }

    /// For `close_async`: awaits `done(state, own, me)` (as `shut_down` waits for it: `own`
    /// receipts the caller settles itself, `me` the caller's worker if it is one) until the
    /// alarm rings, or until the caller's worker waits inside for what no other worker can do.
    /// Returns whether the alarm rang first.
    async fn await_state(
        &self,
        waiter: &mut AsyncWaiter<'_, T, R>,
        inside: &mut InsideWait<'_, T, R>,
        alarm: &mut Alarm,
        done: impl Fn(&State<T, R>, u64, usize) -> bool,
    ) -> bool {
        let shared = &*self.shared;
        loop {
            // Enabled before the check: a settlement or a worker's exit right after it still
            // wakes this task.
            let notified = shared.settled_async.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = shared.lock();
                waiter.unregister(&mut st);
                // Looked at on every poll: from an async sink, only a poll runs as its worker.
                let own = shared.settling_here();
                let me = usize::from(shared.worker_here().is_some());
                inside.start(&mut st);
                if done(&st, own, me) || inside.hopeless(&st) {
                    return false;
                }
                if alarm.passed() {
                    return true;
                }
                waiter.register(&mut st);
            }
            tokio::select! {
                () = notified => {}
                () = alarm.rung() => {}
            }
        }
    }

    /// `join_threads` for `close_async`, once every worker has left the state: a thread still
    /// ending (settling its last receipts, dropping the sink) is joined on a thread of its
    /// own, and awaited until the alarm rings.
    async fn join_threads_async(&self, alarm: &mut Alarm) {
        let (ended, ending): (Vec<_>, Vec<_>) = self
            .joinable_threads()
            .partition(std::thread::JoinHandle::is_finished);
        for handle in ended {
            let _ = handle.join();
        }
        if ending.is_empty() {
            return;
        }
        let (joined, all_joined) = tokio::sync::oneshot::channel();
        let joiner = std::thread::Builder::new()
            .name("conveyor-join".to_owned())
            .spawn(move || {
                for handle in ending {
                    let _ = handle.join();
                }
                let _ = joined.send(());
            });
        if joiner.is_err() {
            // The handles went with the closure: those threads end on their own, unjoined.
            return;
        }
        tokio::select! {
            biased;
            _ = all_joined => {}
            () = alarm.rung() => {}
        }
    }

    fn threads_are_empty(&self) -> bool {
        self.threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    fn join_threads(&self) {
        for handle in self.joinable_threads() {
            let _ = handle.join();
        }
    }

    /// Takes the worker threads' handles, but for the calling thread's own: a receipt callback
    /// that closes its own conveyor, or a close awaited on a worker thread (`block_on` in a
    /// blocking sink), runs on a worker thread, which cannot join itself.
    fn joinable_threads(&self) -> impl Iterator<Item = std::thread::JoinHandle<()>> {
        let handles =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        let me = std::thread::current().id();
        handles
            .into_iter()
            .filter(move |handle| handle.thread().id() != me)
    }

    /// Restarts a lane paused by [`OnFailure::Pause`](crate::OnFailure::Pause): its
    /// held item is tried again with a fresh retry budget (in pipelined mode, every held
    /// item that failed), then the rest follow in order. The lane is the item's key under
    /// keyed ordering, `""` otherwise. Returns whether the lane was paused and is resumed.
    ///
    /// A lane held by an item of its journal that no longer decodes as the item type (see
    /// [`Builder::journal`](crate::Builder::journal)) gives that item up instead: it becomes a
    /// dead letter ([`Conveyor::dead_letters`]), and the items after it follow. Resuming the
    /// lane offline ([`Journal::resume`](crate::Journal::resume)) does not: the next start holds
    /// the lane there again.
    ///
    /// Once [`close`](Conveyor::close) (or a drop) has returned, nothing delivers any more:
    /// it does nothing and returns `false`. Resume the lane in the journal instead
    /// ([`Journal::resume`](crate::Journal::resume), `conveyor resume`), or after the next
    /// start.
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
        // The journal's writer may be gone, and would drop the resume unseen.
        if st.abandoned {
            return false;
        }
        let Some(given_up) = st.resume(lane, self.attempt_limit()) else {
            return false;
        };
        let freed_room = given_up.is_some();
        if let Some(durable) = &shared.durable {
            // Under the lock, so the journal records these before anything the lane does next.
            if let Some(item) = given_up {
                durable.push(Op::Settle(Settled::Failed {
                    seq: item.seq,
                    error: item.error,
                    attempts: 0,
                }));
            }
            durable.push(Op::Settle(Settled::Resumed(lane.to_owned())));
        }
        if freed_room {
            // The item given up left the queue without a worker settling it, whose
            // settlement would have woken a send waiting for room.
            shared.wake_one_sender(&st);
        }
        // A pipelined lane may now run several items: wake every idle worker.
        shared.work.notify_all();
        shared.work_async.notify_waiters();
        true
    }

    /// The lanes paused by [`OnFailure::Pause`](crate::OnFailure::Pause), sorted.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, OnFailure, Ordering, SinkError};
    ///
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .ordering(Ordering::Keyed { concurrency: 4 })
    ///     .on_failure(OnFailure::Pause)
    ///     .build(|d| match d.key() {
    ///         Some("flaky") => Err(SinkError::permanent("rejected")),
    ///         _ => Ok(()),
    ///     })?;
    /// c.send_keyed("steady", 1).unwrap();
    /// c.send_keyed("flaky", 2).unwrap();
    /// c.flush(); // returns: the held item does not count
    /// assert_eq!(c.paused(), ["flaky"]);
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn paused(&self) -> Vec<String> {
        self.shared.lock().paused_lanes()
    }

    /// A consistent snapshot of the counters.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, SinkError};
    ///
    /// let c: Conveyor<u32> = Conveyor::builder().build(|d| match d.item() {
    ///     0 => Err(SinkError::permanent("zero is not a valid reading")),
    ///     _ => Ok(()),
    /// })?;
    /// for i in 0..4 {
    ///     c.send(i).unwrap();
    /// }
    /// c.flush();
    /// let s = c.stats();
    /// assert_eq!((s.accepted, s.delivered, s.failed, s.queued), (4, 3, 1, 0));
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn stats(&self) -> Stats {
        let mut st = self.shared.lock();
        self.shared.drain(&mut st);
        st.stats()
    }

    fn durable(&self) -> Result<&Durable<T>, JournalError> {
        self.shared.durable.as_ref().ok_or(JournalError::NoJournal)
    }

    /// The items that failed for good under [`OnFailure::Skip`](crate::OnFailure::Skip) and
    /// were kept in the journal, oldest first. Their payloads are the items as JSON.
    ///
    /// # Errors
    ///
    /// [`JournalError::NoJournal`] without a journal; a [`JournalError`] if it cannot be read
    /// or after `close`.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, SinkError};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .journal(dir.path().join("j"))
    ///     .build(|d| if *d.item() == 13 { Err(SinkError::permanent("unlucky")) } else { Ok(()) })?;
    /// for i in 10..15 {
    ///     c.send(i).unwrap();
    /// }
    /// c.flush();
    /// let dead = c.dead_letters()?;
    /// assert_eq!(dead.len(), 1);
    /// assert_eq!((dead[0].payload.as_slice(), dead[0].error.as_str()), (&b"13"[..], "unlucky"));
    /// c.discard_dead(dead[0].seq)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, JournalError> {
        let durable = self.durable()?;
        let removed = durable.operator();
        self.sync_journal(None);
        let mut dead = durable.with_journal(|j| j.dead_letters())?;
        // Removals not committed yet (the disk is full) are gone all the same.
        dead.retain(|d| !removed.contains(&d.seq));
        Ok(dead)
    }

    /// Sends dead letter `seq` again: it is enqueued at the end of its lane with a new seq
    /// (like a `send`, waiting for room if the queue is full) and leaves the dead letters in
    /// the same commit. Returns the new item's receipt.
    ///
    /// The new seq gives it a new [`Delivery::idempotency_key`](crate::Delivery::idempotency_key):
    /// a receiver that drops repeats by that key does not recognise the retried item as the one
    /// that failed. Retry only what the receiver did not take.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, SinkError};
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::sync::Arc;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let down = Arc::new(AtomicBool::new(true));
    /// let receiver_down = down.clone();
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .journal(dir.path().join("j"))
    ///     .build(move |_d| {
    ///         if receiver_down.load(Ordering::SeqCst) {
    ///             return Err(SinkError::permanent("down"));
    ///         }
    ///         Ok(())
    ///     })?;
    /// c.send(7).unwrap().wait().unwrap_err();
    /// down.store(false, Ordering::SeqCst);
    /// let dead = c.dead_letters()?;
    /// let again = c.retry_dead(dead[0].seq)?;
    /// assert!(again.seq() > dead[0].seq, "a new seq, and so a new idempotency key");
    /// again.wait().unwrap();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`JournalError::NoSuchDeadLetter`] if there is none with this seq,
    /// [`JournalError::NoJournal`] without a journal, [`JournalError::Closed`] after close,
    /// [`JournalError::Undecodable`] if the payload no longer decodes as the item type.
    pub fn retry_dead(&self, seq: u64) -> Result<Receipt<R>, JournalError> {
        self.requeue_dead(seq, None)
    }

    /// [`retry_dead`](Conveyor::retry_dead) that waits for room in a full queue for at most
    /// `timeout`. A caller that must stay responsive (to a shutdown, to Ctrl-C) calls it in
    /// slices: the dead letter stays where it was until it is accepted.
    ///
    /// # Errors
    ///
    /// [`JournalError::QueueFull`] if the queue stayed full for `timeout`; otherwise as
    /// [`retry_dead`](Conveyor::retry_dead).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, JournalError, SinkError};
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::sync::{mpsc, Arc, Mutex};
    /// use std::time::Duration;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let down = Arc::new(AtomicBool::new(true));
    /// let receiver_down = down.clone();
    /// let (release, gate) = mpsc::channel::<()>();
    /// let gate = Mutex::new(gate);
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .journal(dir.path().join("j"))
    ///     .capacity(1)
    ///     .build(move |d| match *d.item() {
    ///         0 if receiver_down.load(Ordering::SeqCst) => Err(SinkError::permanent("down")),
    ///         0 => Ok(()),
    ///         _ => Ok(gate.lock().unwrap().recv().unwrap_or(())), // slow until released
    ///     })?;
    /// c.send(0).unwrap().wait().unwrap_err();
    /// let seq = c.dead_letters()?[0].seq;
    /// c.send(1).unwrap(); // held in the sink
    /// c.send(2).unwrap(); // fills the queue
    /// # while c.stats().in_flight == 0 { std::thread::yield_now(); }
    /// let full = c.retry_dead_timeout(seq, Duration::from_millis(50));
    /// assert!(matches!(full, Err(JournalError::QueueFull { .. })));
    /// assert_eq!(c.dead_letters()?[0].seq, seq, "still a dead letter");
    /// down.store(false, Ordering::SeqCst);
    /// drop(release); // the sink goes on
    /// c.retry_dead_timeout(seq, Duration::from_secs(30))?.wait().unwrap();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn retry_dead_timeout(
        &self,
        seq: u64,
        timeout: Duration,
    ) -> Result<Receipt<R>, JournalError> {
        self.requeue_dead(seq, Some(later(timeout)))
    }

    fn requeue_dead(&self, seq: u64, until: Option<Instant>) -> Result<Receipt<R>, JournalError> {
        let durable = self.durable()?;
        let gone = || JournalError::NoSuchDeadLetter {
            path: durable.path.clone(),
            seq,
        };
        let dead = {
            let mut removed = durable.operator();
            if removed.contains(&seq) {
                return Err(gone());
            }
            self.sync_journal(None);
            let dead = durable
                .with_journal(|j| j.dead_letter(seq))?
                .ok_or_else(gone)?;
            // Claimed: other operator calls see it gone from now on, and none of them waits
            // while the send below waits for room.
            removed.insert(seq);
            dead
        };
        let unclaim = |error: JournalError| {
            durable.operator().remove(&seq);
            error
        };
        let item = (durable.codec.decode)(&dead.payload).map_err(|reason| {
            unclaim(JournalError::Undecodable {
                path: durable.path.clone(),
                seq,
                reason,
            })
        })?;
        let key = dead.key.map(Arc::from);
        let mut entry = Some(Entry {
            payload: dead.payload,
            cursor: None,
            replaces_dead: Some(seq),
        });
        let node = self.shared.node(key, item);
        let mut inside = InsideWait::new(&self.shared);
        let receipt = match self.submit(node, &mut entry, Wait::Requeue(until), false, &mut inside)
        {
            Ok(receipt) => receipt,
            Err(Refused::Send(SendError::Full(_))) => {
                let path = durable.path.clone();
                return Err(unclaim(match until {
                    Some(until) if Instant::now() >= until => JournalError::QueueFull { path },
                    _ => JournalError::WouldWaitForItself { path },
                }));
            }
            Err(_) => {
                return Err(unclaim(JournalError::Closed {
                    path: durable.path.clone(),
                }))
            }
        };
        self.wait_durable(&receipt);
        Ok(receipt)
    }

    /// Deletes dead letter `seq` for good.
    ///
    /// # Errors
    ///
    /// [`JournalError::NoSuchDeadLetter`] if there is none with this seq; see
    /// [`Conveyor::dead_letters`] for the others.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, JournalError, SinkError};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .journal(dir.path().join("j"))
    ///     .build(|_d| Err(SinkError::permanent("rejected")))?;
    /// c.send(1).unwrap().wait().unwrap_err();
    /// let seq = c.dead_letters()?[0].seq;
    /// c.discard_dead(seq)?;
    /// assert!(c.dead_letters()?.is_empty());
    /// assert!(matches!(c.discard_dead(seq), Err(JournalError::NoSuchDeadLetter { .. })));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn discard_dead(&self, seq: u64) -> Result<(), JournalError> {
        let durable = self.durable()?;
        let mut removed = durable.operator();
        if removed.contains(&seq) {
            return Err(JournalError::NoSuchDeadLetter {
                path: durable.path.clone(),
                seq,
            });
        }
        self.sync_journal(None);
        durable.with_journal(|j| j.discard_dead(seq))?;
        removed.insert(seq);
        Ok(())
    }

    /// Stores an opaque input position (e.g. the last input line read) in the journal. It is
    /// committed together with the items sent before it, so after a crash
    /// [`cursor`](Conveyor::cursor) never points past an item that was lost.
    ///
    /// For the position right after an item you send, use
    /// [`send_and_set_cursor`](Conveyor::send_and_set_cursor) instead: with `send` then
    /// `set_cursor` a crash between the two commits leaves the item journaled and the position
    /// before it, so a rerun would send it again. `set_cursor` is for input that sends nothing
    /// (a blank or rejected line).
    ///
    /// # Errors
    ///
    /// [`JournalError::NoJournal`] without a journal; [`JournalError::Closed`] once the
    /// conveyor is closed (its writer stored nothing more).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("j");
    /// let c: Conveyor<String> = Conveyor::builder().journal(&path).build(|_d| Ok(()))?;
    /// let start = c.cursor()?.unwrap_or(0); // resume after the last line stored
    /// for (n, line) in ["a", "", "c"].iter().enumerate().skip(start as usize) {
    ///     if line.is_empty() {
    ///         c.set_cursor(n as u64 + 1)?; // nothing to send, but read
    ///     } else {
    ///         c.send_and_set_cursor(line.to_string(), n as u64 + 1).unwrap();
    ///     }
    /// }
    /// c.close();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_cursor(&self, cursor: u64) -> Result<(), JournalError> {
        let durable = self.durable()?;
        // Under the state lock like appends, so it follows every item accepted before it.
        let st = self.shared.lock();
        if st.closed {
            // Like a send after close: the writer may be gone, and would drop it unseen.
            return Err(JournalError::Closed {
                path: durable.path.clone(),
            });
        }
        durable.push(Op::Cursor(cursor));
        drop(st);
        Ok(())
    }

    /// [`Conveyor::send`], and with a journal also [`set_cursor`](Conveyor::set_cursor) in
    /// the same commit as the item.
    ///
    /// With `send` then `set_cursor`, a crash can fall between the two commits (under
    /// [`Durability::Sync`](crate::Durability::Sync) it always can: `send` returns once the
    /// item is committed). The journal then holds the item while the cursor still points before
    /// it, and a rerun that resumes from the cursor sends the item again, as a new item with a
    /// new idempotency key, next to the replayed one. Here both are committed or neither is.
    /// An item a drop policy drops at once stores its position too: its fate is settled, and a
    /// rerun must not send it again. Without a journal the position is not stored anywhere.
    ///
    /// # Errors
    ///
    /// As for [`Conveyor::send`].
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("j");
    /// let c: Conveyor<String> = Conveyor::builder().journal(&path).build(|_d| Ok(()))?;
    /// let start = c.cursor()?.unwrap_or(0); // resume after the last line stored
    /// for (n, line) in ["a", "b", "c"].iter().enumerate().skip(start as usize) {
    ///     c.send_and_set_cursor(line.to_string(), n as u64 + 1).unwrap();
    /// }
    /// assert_eq!(c.cursor()?, Some(3));
    /// c.close();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn send_and_set_cursor(&self, item: T, cursor: u64) -> Result<Receipt<R>, SendError<T>> {
        self.send_with(None, item, Wait::Thread, Some(cursor))
    }

    /// [`Conveyor::send_keyed`], with the cursor stored as by
    /// [`send_and_set_cursor`](Conveyor::send_and_set_cursor).
    ///
    /// # Errors
    ///
    /// As for [`Conveyor::send`].
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, Ordering};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let c: Conveyor<String> = Conveyor::builder()
    ///     .ordering(Ordering::Keyed { concurrency: 4 })
    ///     .journal(dir.path().join("j"))
    ///     .build(|_d| Ok(()))?;
    /// // Input lines "user,event": the user is the key, the line number the cursor.
    /// for (n, line) in ["ann,login", "bob,login", "ann,logout"].iter().enumerate() {
    ///     let (user, event) = line.split_once(',').unwrap();
    ///     c.send_keyed_and_set_cursor(user, event.to_owned(), n as u64 + 1).unwrap();
    /// }
    /// assert_eq!(c.cursor()?, Some(3));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn send_keyed_and_set_cursor(
        &self,
        key: impl Into<String>,
        item: T,
        cursor: u64,
    ) -> Result<Receipt<R>, SendError<T>> {
        self.send_with(
            Some(keys::shared(&key.into())),
            item,
            Wait::Thread,
            Some(cursor),
        )
    }

    /// [`Conveyor::try_send`], with the cursor stored as by
    /// [`send_and_set_cursor`](Conveyor::send_and_set_cursor).
    ///
    /// # Errors
    ///
    /// As for [`Conveyor::try_send`].
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, Journal};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("j");
    /// let c: Conveyor<String> = Conveyor::builder().journal(&path).build(|_d| Ok(()))?;
    /// c.try_send_and_set_cursor("line 1".to_owned(), 1).unwrap();
    /// c.close();
    /// // A refused item stores no position: the next run reads its line again.
    /// assert!(c.try_send_and_set_cursor("line 2".to_owned(), 2).unwrap_err().is_closed());
    /// assert_eq!(Journal::open(&path)?.cursor()?, Some(1));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn try_send_and_set_cursor(
        &self,
        item: T,
        cursor: u64,
    ) -> Result<Receipt<R>, SendError<T>> {
        self.send_with(None, item, Wait::Never, Some(cursor))
    }

    /// [`Conveyor::try_send_keyed`], with the cursor stored as by
    /// [`send_and_set_cursor`](Conveyor::send_and_set_cursor).
    ///
    /// # Errors
    ///
    /// As for [`Conveyor::try_send`].
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, Ordering};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let c: Conveyor<String> = Conveyor::builder()
    ///     .ordering(Ordering::Keyed { concurrency: 4 })
    ///     .journal(dir.path().join("j"))
    ///     .build(|_d| Ok(()))?;
    /// c.try_send_keyed_and_set_cursor("ann", "login".to_owned(), 1).unwrap(); // room: accepted
    /// assert_eq!(c.cursor()?, Some(1));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn try_send_keyed_and_set_cursor(
        &self,
        key: impl Into<String>,
        item: T,
        cursor: u64,
    ) -> Result<Receipt<R>, SendError<T>> {
        self.send_with(
            Some(keys::shared(&key.into())),
            item,
            Wait::Never,
            Some(cursor),
        )
    }

    /// [`Conveyor::send_async`], with the cursor stored as by
    /// [`send_and_set_cursor`](Conveyor::send_and_set_cursor).
    ///
    /// # Errors
    ///
    /// As for [`Conveyor::send`].
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use conveyor::Conveyor;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let c: Conveyor<String> = Conveyor::builder()
    ///     .journal(dir.path().join("j"))
    ///     .build_async(|_d| async { Ok(()) })?;
    /// // Line 41 of the input: after a crash, reading resumes at line 42.
    /// c.send_async_and_set_cursor("line 41".to_owned(), 42).await?;
    /// assert_eq!(c.cursor()?, Some(42));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn send_async_and_set_cursor(
        &self,
        item: T,
        cursor: u64,
    ) -> Result<Receipt<R>, SendError<T>> {
        self.submit_async(None, item, Some(cursor)).await
    }

    /// [`Conveyor::send_keyed_async`], with the cursor stored as by
    /// [`send_and_set_cursor`](Conveyor::send_and_set_cursor).
    ///
    /// # Errors
    ///
    /// As for [`Conveyor::send`].
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use conveyor::{Conveyor, Ordering};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let c: Conveyor<String> = Conveyor::builder()
    ///     .ordering(Ordering::Keyed { concurrency: 4 })
    ///     .journal(dir.path().join("j"))
    ///     .build_async(|_d| async { Ok(()) })?;
    /// c.send_keyed_async_and_set_cursor("ann", "login".to_owned(), 7).await?;
    /// assert_eq!(c.cursor()?, Some(7));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn send_keyed_async_and_set_cursor(
        &self,
        key: impl Into<String>,
        item: T,
        cursor: u64,
    ) -> Result<Receipt<R>, SendError<T>> {
        self.submit_async(Some(keys::shared(&key.into())), item, Some(cursor))
            .await
    }

    /// The input position last stored with [`set_cursor`](Conveyor::set_cursor) or one of the
    /// `*_and_set_cursor` sends. The journal commits what was stored before it is read, so this
    /// is the latest position stored (while the journal cannot be written, the latest committed).
    ///
    /// # Errors
    ///
    /// [`JournalError::NoJournal`] without a journal; see [`Conveyor::dead_letters`].
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("j");
    /// let c: Conveyor<String> = Conveyor::builder().journal(&path).build(|_d| Ok(()))?;
    /// assert_eq!(c.cursor()?, None); // a new journal: start at the beginning
    /// c.set_cursor(42)?;
    /// drop(c);
    /// // The next run resumes from there.
    /// let c: Conveyor<String> = Conveyor::builder().journal(&path).build(|_d| Ok(()))?;
    /// assert_eq!(c.cursor()?, Some(42));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn cursor(&self) -> Result<Option<u64>, JournalError> {
        let durable = self.durable()?;
        self.sync_journal(None);
        durable.with_journal(|j| j.cursor())
    }

    /// Why sends fail with [`SendError::Journal`] right now: the journal's last write error,
    /// until a write succeeds again, or the error that holds the replay of its items at start
    /// (the items not loaded yet cannot be read), until a read succeeds again; for good,
    /// [`JournalError::WriterStopped`] if a bug stopped the journal's writer. `None` without
    /// a journal or when it is healthy. Meanwhile [`Conveyor::flush`] does not wait on.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, SendError};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let c: Conveyor<String> = Conveyor::builder()
    ///     .journal(dir.path().join("j"))
    ///     .build(|_d| Ok(()))?;
    /// match c.send("event".to_owned()) {
    ///     Ok(_receipt) => {}
    ///     Err(SendError::Journal(item)) => {
    ///         // The disk is full, say: the message says what to do, and the send can be retried.
    ///         let why = c.journal_error().map(|e| e.to_string()).unwrap_or_default();
    ///         eprintln!("not sent, try again later: {item}: {why}");
    ///     }
    ///     Err(e) => return Err(e.into()),
    /// }
    /// assert!(c.journal_error().is_none(), "a healthy journal");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn journal_error(&self) -> Option<Arc<JournalError>> {
        self.shared.durable.as_ref().and_then(|d| d.failure())
    }

    /// The journal cannot be written: what it has not committed waits for it, and cannot be
    /// delivered meanwhile. Or the replay cannot read it: what it holds waits for it. Sends are
    /// refused either way.
    fn journal_blocked(&self) -> bool {
        self.journal_error().is_some()
    }
}

/// The first and the longest wait before the replay reads its journal again after a failure.
const REPLAY_RETRY_FIRST: Duration = Duration::from_millis(10);
const REPLAY_RETRY_MAX: Duration = Duration::from_secs(2);
/// How many lanes restored paused from a journal are logged one by one at start.
const PAUSES_LOGGED: usize = 10;
/// How long `close` gives the journal's last commit even when its own deadline has passed:
/// settlements recorded then save the next start from delivering those items again.
const JOURNAL_CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How often a flush with a journal looks whether the journal can still be written.
const JOURNAL_CHECK: Duration = Duration::from_millis(100);
/// How often a send waiting for the journal's seq reservation looks whether it was extended.
const RESERVATION_CHECK: Duration = Duration::from_millis(10);

#[cfg(test)]
thread_local! {
    /// Run by a blocking send on this thread right before it waits for room, under the state
    /// lock: a test's stand-in for another thread that acts at that moment.
    static BEFORE_SPACE_WAIT: std::cell::Cell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::Cell::new(None) };
}

/// Loads the items a journal holds into the lanes, in seq order, on a thread of its own, as
/// room frees up: memory stays bounded by the capacity whatever the journal holds. New sends
/// wait until it is done (they count as a full queue), so they come after the old items.
fn start_replay<T: Send + Sync + 'static, R: Send + 'static>(
    shared: &Arc<Shared<T, R>>,
) -> Result<(), BuildError> {
    const PAGE: usize = 1024;
    let durable = shared.durable.as_ref().expect("replay needs a journal");
    let first = durable.with_journal(|j| j.pending_after(0, PAGE))?;
    if first.is_empty() {
        return Ok(());
    }
    shared.lock().replaying = true;
    let feeder = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("conveyor-replay".to_owned())
        .spawn(move || {
            let shared = feeder;
            let durable = shared.durable.as_ref().expect("replay needs a journal");
            let attempt_limit = shared.config.retry.attempts();
            let mut page = first;
            'pages: while let Some(last) = page.last().map(|r| r.seq) {
                for record in page {
                    let pause = shared.config.on_failure == OnFailure::Pause;
                    // Made before the state lock, as a send makes its node.
                    let decoded = (durable.codec.decode)(&record.payload).map(|item| {
                        let node = shared.node(record.key.clone(), item);
                        node.set_seq(record.seq);
                        node
                    });
                    if let Err(reason) = &decoded {
                        if pause {
                            tracing::error!(
                                seq = record.seq, lane = %record.lane, %reason,
                                "journaled item cannot be decoded: its lane pauses when it \
                                 reaches it; resume(lane) makes it a dead letter, or restart \
                                 with an item type that decodes it"
                            );
                        } else {
                            tracing::error!(seq = record.seq, %reason, "journaled item cannot be decoded");
                        }
                    }
                    let mut st = shared.lock();
                    // An item that becomes a dead letter at once takes no room.
                    let takes_room = decoded.is_ok() || pause;
                    // `close` drains the replay too; only its deadline stops it.
                    while takes_room && !st.room_for_replay() && !st.abandoned {
                        // Senders waiting behind the replay look again: one inside a sink call
                        // must not wait for a replay that now waits for its own worker.
                        shared.space.notify_all();
                        st.waiters.blocked_senders += 1;
                        st = shared.wait(&shared.space, st);
                        st.waiters.blocked_senders -= 1;
                    }
                    if st.abandoned {
                        break 'pages;
                    }
                    match decoded {
                        Ok(node) => {
                            if st.accept(node, attempt_limit) {
                                shared.wake_worker(&st, &mut shared.intake());
                            }
                        }
                        Err(reason) => {
                            let error =
                                format!("cannot be decoded as this conveyor's item type: {reason}");
                            if pause {
                                // Held in its place, as a failing item is: nothing after it in
                                // its lane overtakes it. A build that decodes it delivers it.
                                st.hold_undecodable(record.key.as_ref(), record.seq, error);
                            } else {
                                // Never silently lost, never blocking the rest: a dead letter,
                                // counted as failed so that `stats()` shows it.
                                durable.push(Op::Settle(Settled::Failed {
                                    seq: record.seq,
                                    error,
                                    attempts: 0,
                                }));
                                st.accept_failed();
                            }
                        }
                    }
                }
                page = match next_page(&shared, durable, last, PAGE) {
                    Some(page) => page,
                    None => break,
                };
            }
            shared.lock().replaying = false;
            // Senders wait for the end of replay, idle workers of a closed conveyor may now
            // exit, and flush/close waited for it.
            shared.wake_all();
        });
    if let Err(e) = spawned {
        shared.lock().replaying = false;
        return Err(BuildError::Spawn(e));
    }
    Ok(())
}

/// The replay's next page of items after `last`: read again until it can be, as the journal's
/// writer retries a commit. Giving up would end the replay, and new sends would then go ahead of
/// the items not loaded yet (the next start delivering those after them). `None` once a
/// shutdown ends the replay: what it did not load stays in the journal.
fn next_page<T: Send + Sync + 'static, R: Send + 'static>(
    shared: &Shared<T, R>,
    durable: &Durable<T>,
    last: u64,
    limit: usize,
) -> Option<Vec<Record>> {
    let mut wait = REPLAY_RETRY_FIRST;
    let mut failures = 0u32;
    loop {
        let error = match durable.with_journal(|j| j.pending_after(last, limit)) {
            Ok(page) => {
                if failures > 0 {
                    durable.set_unreadable(None);
                    tracing::warn!(failures, "replay goes on: the journal can be read again");
                }
                return Some(page);
            }
            // The conveyor is closing and its writer let the journal go.
            Err(JournalError::Closed { .. }) => return None,
            Err(e) => e,
        };
        failures += 1;
        // Said at once, then now and then: a disk that stays unreadable must not flood the log.
        if failures.is_power_of_two() {
            tracing::error!(
                error = %error, failures, retry_in = ?wait,
                "replay held: the journal cannot be read; new sends are refused until it can"
            );
        }
        // Shown by `journal_error()`, so that sends and `flush` do not wait on for a disk
        // that may never be readable again.
        durable.set_unreadable(Some(error));
        let mut st = shared.lock();
        // Sends waiting behind the replay look again, and are refused: they could only wait
        // for as long as the disk stays unreadable. Under the lock they check under, so none
        // misses it.
        shared.wake_all_senders();
        let deadline = Instant::now() + wait;
        while !st.abandoned && Instant::now() < deadline {
            (st, _) = shared.wait_until(&shared.shutdown, st, Some(deadline));
        }
        if st.abandoned {
            return None;
        }
        wait = (wait * 2).min(REPLAY_RETRY_MAX);
    }
}

fn give_back<T, R>(e: SendError<NodeRef<T, R>>) -> SendError<T> {
    // The node never left this call, so this is its only reference.
    let unwrap = |node: NodeRef<T, R>| match node.try_unwrap() {
        Ok(node) => node.into_item(),
        Err(_) => unreachable!("a refused node is not shared"),
    };
    match e {
        SendError::Full(node) => SendError::Full(unwrap(node)),
        SendError::Closed(node) => SendError::Closed(unwrap(node)),
        SendError::Journal(node) => SendError::Journal(unwrap(node)),
        SendError::Encode { item, reason } => SendError::Encode {
            item: unwrap(item),
            reason,
        },
        SendError::TooLarge { item, size, limit } => SendError::TooLarge {
            item: unwrap(item),
            size,
            limit,
        },
    }
}

/// Where an async sink's worker tasks run: on the multi-threaded Tokio runtime this is called
/// from, or else on a runtime the conveyor owns (returned, to shut down with the conveyor).
///
/// Never on a current-thread runtime: its tasks run only while some thread is inside its
/// `block_on`, so once that returns (or while its thread blocks in `flush`, `close`, a drop or
/// `Receipt::wait`) the workers would stop, and every wait for them would hang.
fn async_runtime() -> Result<(tokio::runtime::Handle, Option<tokio::runtime::Runtime>), BuildError>
{
    if let Ok(ambient) = tokio::runtime::Handle::try_current() {
        if ambient.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            return Ok((ambient, None));
        }
    }
    // I/O too: a sink may open sockets (an HTTP client, say) on the runtime it runs on.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("conveyor-async")
        .enable_all()
        .build()?;
    Ok((rt.handle().clone(), Some(rt)))
}

/// The items a shutdown left, each with whether a sink call was running for it, settled when
/// dropped: closed, or unconfirmed for a call that was running. Dropped at the end of the
/// shutdown, or when a `close_async` future is dropped before that end, so that no receipt
/// waits for a close that will not finish.
struct Left<T, R>(Vec<(NodeRef<T, R>, bool)>);

impl<T, R> Drop for Left<T, R> {
    fn drop(&mut self) {
        for (node, called) in self.0.drain(..) {
            node.settle(Err(if called {
                DeliveryError::Unconfirmed
            } else {
                DeliveryError::Closed
            }));
        }
    }
}

/// The deadline of a shutdown's last journal commit: the shutdown's own, or
/// `JOURNAL_CLOSE_GRACE` from now if that is later.
fn journal_close_deadline(deadline: Option<Instant>) -> Option<Instant> {
    deadline.map(|d| d.max(Instant::now() + JOURNAL_CLOSE_GRACE))
}

/// Runs a blocking wait; on a worker thread of a multi-threaded Tokio runtime it tells the
/// runtime first, so that the thread's other tasks (an async sink among them) keep running
/// meanwhile.
pub(crate) fn blocking_section<O>(f: impl FnOnce() -> O) -> O {
    match tokio::runtime::Handle::try_current() {
        Ok(h)
            if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
                && on_scheduler_thread() =>
        {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Whether the calling thread runs a Tokio scheduler (a worker of a multi-threaded runtime),
/// rather than merely having a runtime's handle.
///
/// Only a worker has tasks to hand over before blocking, and only there is `block_in_place`
/// sure not to panic: the thread driving a runtime's `block_on` has none, and while it drives
/// a `LocalSet` there, `block_in_place` panics. Tokio says which thread is which only through
/// `yield_now`, which hands its waker to the thread's scheduler if there is one and wakes it
/// at once otherwise: polled once here, a waker not woken means a scheduler took it. (The
/// scheduler wakes it later for nothing; `block_in_place` does so right away.) Should Tokio
/// ever wake it at once everywhere, this says no and blocking merely stops telling the runtime.
/// One case still looks like a worker: a current-thread runtime's thread inside its `block_on`
/// with a multi-threaded runtime's handle entered by hand.
fn on_scheduler_thread() -> bool {
    struct Woken(AtomicBool);
    impl std::task::Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.store(true, AtomicOrdering::Relaxed);
        }
    }
    let woken = Arc::new(Woken(AtomicBool::new(false)));
    let waker = std::task::Waker::from(woken.clone());
    let yielded = std::pin::pin!(tokio::task::yield_now());
    let pending = std::future::Future::poll(yielded, &mut std::task::Context::from_waker(&waker))
        .is_pending();
    pending && !woken.0.load(AtomicOrdering::Relaxed)
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

/// The bounded waits return whether they completed; a caller that drops the answer goes on as
/// if everything was delivered or on disk. Each line below must fail to compile
/// (`unused_must_use`), and compiles once its answer is used:
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// let c: conveyor::Conveyor<u32> = conveyor::Conveyor::builder().build(|_d| Ok(()))?;
/// c.flush_timeout(std::time::Duration::from_secs(1));
/// # Ok::<(), conveyor::BuildError>(())
/// ```
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// let dir = tempfile::tempdir()?;
/// let c: conveyor::Conveyor<u32> =
///     conveyor::Conveyor::builder().journal(dir.path().join("j")).build(|_d| Ok(()))?;
/// let receipt = c.send(1).unwrap();
/// c.wait_committed(&receipt, std::time::Duration::from_secs(1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// ```
/// #![deny(unused_must_use)]
/// let dir = tempfile::tempdir()?;
/// let c: conveyor::Conveyor<u32> =
///     conveyor::Conveyor::builder().journal(dir.path().join("j")).build(|_d| Ok(()))?;
/// let receipt = c.send(1).unwrap();
/// let _on_disk = c.wait_committed(&receipt, std::time::Duration::from_secs(1));
/// let _flushed = c.flush_timeout(std::time::Duration::from_secs(1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[cfg(doctest)]
struct MustUseAnswers;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::mpsc;

    /// A worker sleeps beside items in the intake only while another worker holds the lookout
    /// for them (see `Shared::register_idle`), and they are delivered once that one lets go.
    #[test]
    fn a_worker_sleeps_beside_items_only_while_another_holds_the_lookout() {
        let delivered = Arc::new(AtomicU64::new(0));
        let seen = delivered.clone();
        let c: Conveyor<u64> = Conveyor::builder()
            .ordering(crate::Ordering::Pipelined { in_flight: 2 })
            .build(move |d: crate::Delivery<u64>| {
                seen.fetch_add(*d.item(), AtomicOrdering::SeqCst);
                Ok(())
            })
            .unwrap();
        let shared = &*c.shared;
        let asleep = || loop {
            let st = shared.lock();
            if st.idle_workers == 2 {
                break st;
            }
            drop(st);
            std::thread::yield_now();
        };
        // Both workers asleep; worker 1 is made the lookout, so the send wakes nobody.
        drop(asleep());
        assert!(shared.claim_lookout(1));
        let first = c.send(7).unwrap();
        let mut st = shared.lock();
        assert!(!shared.intake().is_empty(), "the item waits in the intake");
        let mut held = true;
        assert!(
            !shared.register_idle(&mut st, 1, true, &mut held),
            "the lookout may not sleep beside the item"
        );
        assert!(held, "and keeps the lookout");
        let mut held = false;
        assert!(
            shared.register_idle(&mut st, 0, true, &mut held),
            "worker 0 may: worker 1 looks out for the item"
        );
        shared.unregister_idle(&mut st, true);
        // Worker 1 lets go, and a worker is woken for the item.
        shared.release_lookout(&mut st, 1);
        let wake = shared.pass_work_on(&st);
        drop(st);
        shared.notify_workers(wake);
        first.wait().unwrap();
        // Without a lookout, nobody may sleep beside an item.
        drop(asleep());
        assert!(shared.claim_lookout(1));
        let second = c.send(1).unwrap();
        let mut st = shared.lock();
        shared.let_go_of_lookout(1);
        assert!(!shared.intake().is_empty());
        assert!(!shared.register_idle(&mut st, 0, true, &mut held));
        shared.drain(&mut st);
        let wake = shared.pass_work_on(&st);
        drop(st);
        shared.notify_workers(wake);
        second.wait().unwrap();
        assert_eq!(delivered.load(AtomicOrdering::SeqCst), 8);
    }

    /// A keyed conveyor of `concurrency` workers whose sink, for the items `held` picks, says
    /// which item it entered on the receiver returned, then waits for a message on the
    /// sender returned; it returns the others at once.
    fn keyed_holding(
        concurrency: usize,
        held: fn(&crate::Delivery<u64>) -> bool,
    ) -> (Conveyor<u64>, mpsc::Receiver<u64>, mpsc::Sender<()>) {
        let (entered, entered_rx) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let released = std::sync::Mutex::new(released);
        let c = Conveyor::builder()
            .ordering(crate::Ordering::Keyed { concurrency })
            .build(move |d: crate::Delivery<u64>| {
                if held(&d) {
                    entered.send(*d.item()).unwrap();
                    let _ = released.lock().unwrap().recv();
                }
                Ok(())
            })
            .unwrap();
        (c, entered_rx, release)
    }

    /// Asserts that `others` are all delivered while a held call waits (within a generous
    /// 5 s in all, far more than the millisecond a worker standing by lets a lease stall),
    /// releasing the held call first, so that a failure does not wait for the drop's deadline.
    fn assert_delivered_while_held(
        c: &Conveyor<u64>,
        others: Vec<Receipt<()>>,
        release: &mpsc::Sender<()>,
        context: &str,
    ) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let outcomes: Vec<_> = others
            .into_iter()
            .map(|mut r| r.wait_timeout(deadline.saturating_duration_since(Instant::now())))
            .collect();
        let during = c.stats();
        release.send(()).unwrap();
        assert!(
            outcomes.iter().all(|o| matches!(o, Some(Ok(())))),
            "{context}{outcomes:?} ({during:?})"
        );
    }

    /// Keyed, with a quick sink: the worker woken for a burst leases its first key's item and
    /// leaves the other keys' items to itself (see `State::runs_ready_lanes_alone`), waking
    /// nobody for them but a worker to stand by. When that item's call is stuck, the other
    /// keys' items are delivered while it is, though no send comes after them.
    #[test]
    fn other_keys_left_to_a_worker_whose_call_is_stuck_are_delivered_while_it_is() {
        const KEYS: u64 = 8;
        let (c, stuck_entered, release) = keyed_holding(3, |d| d.key() == Some("stuck"));
        let key = |k: u64| format!("k{k}");
        // Quick calls measured, so that the workers lease.
        for i in 0..200 {
            c.send_keyed(key(i % KEYS), i).unwrap();
        }
        assert!(c.flush_timeout(Duration::from_secs(30)));
        let shared = &*c.shared;
        // Every worker asleep, none standing by (it would take the other keys' items when it
        // next looked, whatever the stuck call's worker did).
        loop {
            let st = shared.lock();
            if st.idle_workers == 3 && !st.standby {
                assert!(st.lease_size > 1, "the sink measured quick");
                break;
            }
            drop(st);
            std::thread::sleep(Duration::from_millis(1));
        }
        // Worker 0 is made the lookout, so the burst wakes nobody and is then moved into the
        // lanes at once: `stuck` first, then `k0` to `k7`.
        assert!(shared.claim_lookout(0));
        let stuck = c.send_keyed("stuck", 1000).unwrap();
        let others: Vec<_> = (0..KEYS)
            .map(|k| c.send_keyed(key(k), 2000 + k).unwrap())
            .collect();
        let mut st = shared.lock();
        shared.release_lookout(&mut st, 0);
        assert_eq!(st.queued(), KEYS + 1, "moved into the lanes");
        let wake = shared.pass_work_on(&st);
        drop(st);
        shared.notify_workers(wake);
        stuck_entered
            .recv_timeout(Duration::from_secs(30))
            .expect("the stuck call began");
        assert_delivered_while_held(&c, others, &release, "");
        assert!(stuck.wait().is_ok());
    }

    /// Keyed, with a quick sink: a lease of one item, with no other lane ready, keeps the
    /// lookout because a worker stands by already (see `State::lease_may_keep_lookout`), so
    /// the sends made during its call wake nobody. When that call is stuck, the worker
    /// standing by (which watched an earlier lease) watches this one too and takes the lookout
    /// away: other keys' items sent during the call are delivered while it is, those sent once
    /// the standby's first wait is over too.
    #[test]
    fn a_single_item_lease_kept_for_a_standby_does_not_hold_other_keys_up_when_stuck() {
        const GATE: u64 = u64::MAX - 1;
        const STUCK: u64 = u64::MAX;
        const KEYS: u64 = 8;
        let (c, entered_rx, release) = keyed_holding(2, |d| matches!(*d.item(), GATE | STUCK));
        let shared = &*c.shared;
        let key = |k: u64| format!("k{k}");
        // Both workers asleep, none standing by, the sink measured quick; the lease size.
        let settled = || loop {
            assert!(c.flush_timeout(Duration::from_secs(30)));
            let st = shared.lock();
            if st.idle_workers == 2 && !st.standby && st.lease_size > 1 {
                break st.lease_size as u64;
            }
            let warm = st.lease_size == 1;
            drop(st);
            if warm {
                for i in 0..200 {
                    c.send_keyed(key(i % KEYS), i).unwrap();
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        // Which of the attempts made the stuck call's lease keep the lookout for the
        // standby: the workers' timing decides it (the worker standing by must not have left
        // its first wait before the lease is made).
        let mut kept = false;
        for _ in 0..20 {
            let size = settled();
            // With the lookout held here, the burst wakes nobody. A lease of `size` items of
            // `gate` (the first one's call waits), then `stuck` alone in that lane.
            assert!(shared.claim_lookout(0));
            let gate: Vec<_> = (0..size)
                .map(|i| c.send_keyed("gate", if i == 0 { GATE } else { i }).unwrap())
                .collect();
            let stuck = c.send_keyed("gate", STUCK).unwrap();
            let mut st = shared.lock();
            shared.release_lookout(&mut st, 0);
            let wake = shared.pass_work_on(&st);
            drop(st);
            shared.notify_workers(wake);
            let first = entered_rx.recv_timeout(Duration::from_secs(30));
            assert_eq!(first, Ok(GATE));
            // The other worker, woken to stand by that lease, stands by it: the gate opens
            // under the state lock, so that the standby cannot leave its wait before that.
            let st = loop {
                let st = shared.lock();
                if st.standby {
                    break st;
                }
                drop(st);
                std::thread::yield_now();
            };
            release.send(()).unwrap();
            drop(st);
            let next = entered_rx.recv_timeout(Duration::from_secs(30));
            assert_eq!(next, Ok(STUCK));
            let st = shared.lock();
            let leaser = st.lookout_leaser;
            drop(st);
            kept = leaser.is_some_and(|w| shared.holds_lookout(w));
            // Other keys' items, sent during the stuck call, and after the standby's first
            // wait is over (whatever lease it watched).
            let mut others: Vec<_> = (0..KEYS / 2)
                .map(|k| c.send_keyed(key(k), 2000 + k).unwrap())
                .collect();
            std::thread::sleep(Duration::from_millis(5));
            others.extend((KEYS / 2..KEYS).map(|k| c.send_keyed(key(k), 2000 + k).unwrap()));
            assert_delivered_while_held(&c, others, &release, &format!("kept: {kept}, "));
            assert!(stuck.wait().is_ok());
            assert!(gate.into_iter().all(|r| r.wait().is_ok()));
            if kept {
                break;
            }
        }
        assert!(
            kept,
            "no attempt's single-item lease kept the lookout for the standby"
        );
    }

    #[test]
    fn a_dead_letter_is_retried_once_while_its_removal_cannot_be_committed() {
        use crate::SinkError;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as O};
        let dir = tempfile::tempdir().unwrap();
        let failing = Arc::new(AtomicBool::new(true));
        let calls = Arc::new(AtomicUsize::new(0));
        let (f, n) = (failing.clone(), calls.clone());
        // The retried item's append (200 KB) must be written, and its commit fails; the item
        // is delivered only once that commit succeeds, and then stays in flight until released.
        let (release, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let c: Conveyor<String> = Conveyor::builder()
            .journal(dir.path().join("j"))
            .build(move |_d: crate::Delivery<String>| {
                if f.load(O::SeqCst) {
                    return Err(SinkError::permanent("down"));
                }
                n.fetch_add(1, O::SeqCst);
                let _ = gate.lock().unwrap().recv();
                Ok(())
            })
            .unwrap();
        c.send("x".repeat(200_000)).unwrap().wait().unwrap_err();
        failing.store(false, O::SeqCst);
        let seq = c.dead_letters().unwrap()[0].seq;
        // From now on the file may not grow: commits fail as on a full disk.
        let durable = c.shared.durable.as_ref().unwrap();
        durable
            .with_journal(|j| {
                j.compact()?;
                j.limit_pages(1);
                Ok(())
            })
            .unwrap();
        let first = c.retry_dead(seq).unwrap();
        let gone =
            |r: Result<_, JournalError>| matches!(r, Err(JournalError::NoSuchDeadLetter { .. }));
        assert!(gone(c.retry_dead(seq).map(|_| ())), "retried twice");
        assert!(gone(c.discard_dead(seq)), "discarded after its retry");
        assert!(c.dead_letters().unwrap().is_empty());
        assert!(
            c.journal_error().is_some(),
            "the commits did fail meanwhile"
        );
        assert_eq!(
            calls.load(O::SeqCst),
            0,
            "not delivered before its append is on disk"
        );
        durable
            .with_journal(|j| {
                j.limit_pages(1 << 30);
                Ok(())
            })
            .unwrap();
        drop(release);
        first.wait().unwrap();
        c.flush();
        assert_eq!(calls.load(O::SeqCst), 1);
    }

    /// SQLite refuses a row longer than its length limit (about 1 GB), and the writer used to
    /// retry such an append for ever, refusing every later send. The limit is lowered for the
    /// journals this thread opens, so the test needs no gigabyte.
    #[test]
    fn an_item_too_large_for_the_journal_is_refused_at_send_and_the_journal_goes_on() {
        use crate::SinkError;
        const LIMIT: usize = 200_000;
        let dir = tempfile::tempdir().unwrap();
        let (release, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        crate::journal::TEST_LENGTH_LIMIT.with(|l| l.set(Some(LIMIT as i32)));
        let built = Conveyor::builder().journal(dir.path().join("j")).build(
            move |d: crate::Delivery<String>| {
                let _ = gate.lock().unwrap().recv();
                if d.item().len() > 100 {
                    // The error is kept with the item as a dead letter: the row grows by it.
                    return Err(SinkError::permanent("e".repeat(LIMIT)));
                }
                Ok(())
            },
        );
        crate::journal::TEST_LENGTH_LIMIT.with(|l| l.set(None));
        let c: Conveyor<String> = built.unwrap();

        let big = "x".repeat(LIMIT); // as JSON, longer than SQLite's limit itself
        let max = match c.send(big.clone()) {
            Err(SendError::TooLarge { item, size, limit }) => {
                assert_eq!(item, big, "the refused item is handed back");
                assert_eq!(size, LIMIT + 2, "the JSON string's length");
                assert!(limit < LIMIT, "{limit}");
                let message = SendError::TooLarge { item, size, limit }.to_string();
                assert!(
                    message.contains(&size.to_string()) && message.contains(&limit.to_string()),
                    "{message}"
                );
                limit
            }
            other => panic!("expected TooLarge, got {other:?}"),
        };
        let key_too = c.send_keyed("k".repeat(10), "y".repeat(max - 2 - 19));
        assert!(
            matches!(key_too, Err(SendError::TooLarge { size, .. }) if size == max + 1),
            "the key counts too: {key_too:?}"
        );

        // The largest item that fits is stored (the sink holds it until it is committed), and
        // becomes a dead letter with its long error; the journal goes on.
        let fits = c.send("y".repeat(max - 2)).unwrap();
        assert!(c.wait_committed(&fits, Duration::from_secs(30)));
        let small = c.send("small".to_owned()).unwrap();
        drop(release);
        assert!(c.flush_timeout(Duration::from_secs(30)));
        small.wait().unwrap();
        assert!(c.journal_error().is_none(), "{:?}", c.journal_error());
        let dead = c.dead_letters().unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].payload.len(), max);
        assert!(dead[0].error.len() < LIMIT, "the error is cut short to fit");
    }

    /// The journal's writer extends the seq reservation, and wakes the senders waiting for it,
    /// without the state lock: a wake-up that came after a blocking send found the reservation
    /// used up, but before it waited, was lost, and the send waited for the next item to settle,
    /// for ever if none was left.
    #[test]
    fn a_send_waiting_for_the_seq_reservation_sees_an_extension_made_just_before_it_waits() {
        let dir = tempfile::tempdir().unwrap();
        let c: Conveyor<u64> = Conveyor::builder()
            .journal(dir.path().join("j"))
            .build(|_d| Ok(()))
            .unwrap();
        c.send(0).unwrap();
        c.flush();
        let limit = c.shared.durable.as_ref().unwrap().seq_limit.clone();
        let reserved = limit.load(AtomicOrdering::SeqCst);
        // As when sends outpace the writer: every reserved seq is used.
        limit.store(0, AtomicOrdering::SeqCst);
        let extended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        BEFORE_SPACE_WAIT.with(|hook| {
            let (shared, extended) = (c.shared.clone(), extended.clone());
            hook.set(Some(Box::new(move || {
                // What the writer does once its extension is committed, from its own thread.
                limit.store(reserved, AtomicOrdering::SeqCst);
                shared.space.notify_all();
                extended.store(true, AtomicOrdering::SeqCst);
            })));
        });
        let by_watchdog = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let (done, finished) = mpsc::channel::<()>();
            let (shared, by_watchdog) = (&c.shared, &by_watchdog);
            scope.spawn(move || {
                if finished.recv_timeout(Duration::from_secs(20)).is_err() {
                    by_watchdog.store(true, AtomicOrdering::SeqCst);
                    // Under the lock, so that this wake-up is not lost too.
                    while finished.try_recv().is_err() {
                        let _st = shared.lock();
                        shared.space.notify_all();
                        drop(_st);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            });
            c.send(1).unwrap();
            done.send(()).unwrap();
        });
        assert!(
            extended.load(AtomicOrdering::SeqCst),
            "the send waited for the reservation"
        );
        assert!(
            !by_watchdog.load(AtomicOrdering::SeqCst),
            "the send missed the extension's wake-up"
        );
        assert!(c.flush_timeout(Duration::from_secs(20)));
        assert_eq!(c.stats().delivered, 2);
    }

    /// A journaled conveyor whose file may not grow any more (commits fail as on a full
    /// disk), holding one 200 KB item that waits for its commit; counts the sink's calls.
    fn with_a_full_disk(dir: &std::path::Path) -> (Conveyor<String>, Arc<AtomicU64>) {
        let calls = Arc::new(AtomicU64::new(0));
        let n = calls.clone();
        let c: Conveyor<String> = Conveyor::builder()
            .journal(dir.join("j"))
            .drain_timeout(Duration::from_secs(30))
            .build(move |_d: crate::Delivery<String>| {
                n.fetch_add(1, AtomicOrdering::SeqCst);
                Ok(())
            })
            .unwrap();
        c.shared
            .durable
            .as_ref()
            .unwrap()
            .with_journal(|j| {
                j.compact()?;
                j.limit_pages(1);
                Ok(())
            })
            .unwrap();
        c.send("x".repeat(200_000)).unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        while c.journal_error().is_none() {
            assert!(Instant::now() < until, "the commit never failed");
            std::thread::sleep(Duration::from_millis(5));
        }
        (c, calls)
    }

    /// While the journal cannot be written, an item waiting for its commit was never started:
    /// `stop_timeout` does not wait for it (it used to sit out its whole deadline), and
    /// `flush_timeout` says at once that not everything settled, as documented.
    #[test]
    fn stop_and_flush_do_not_wait_for_items_waiting_for_a_failed_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (c, calls) = with_a_full_disk(dir.path());
        let started = Instant::now();
        assert!(!c.flush_timeout(Duration::from_secs(10)));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "flush_timeout waited {:?}",
            started.elapsed()
        );
        let started = Instant::now();
        let report = c.stop_timeout(Duration::from_secs(10));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "stop_timeout waited {:?}",
            started.elapsed()
        );
        assert_eq!(report.left, 1, "{report:?}");
        assert_eq!(calls.load(AtomicOrdering::SeqCst), 0, "never delivered");
    }

    /// A closed conveyor says so, whatever else is wrong: a send after `close` used to be
    /// refused with `SendError::Journal` while the journal could not be written, which tells
    /// the caller to try again later, when no later send can ever succeed.
    #[test]
    fn every_send_after_close_is_refused_as_closed_while_the_journal_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _calls) = with_a_full_disk(dir.path());
        c.close_timeout(Duration::ZERO);
        assert!(
            c.journal_error().is_some(),
            "the journal still cannot be written"
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let late = || "late".to_owned();
        let refusals = [
            c.send(late()),
            c.send_keyed("k", late()),
            c.try_send(late()),
            c.try_send_keyed("k", late()),
            c.send_and_set_cursor(late(), 1),
            c.send_keyed_and_set_cursor("k", late(), 1),
            c.try_send_and_set_cursor(late(), 1),
            c.try_send_keyed_and_set_cursor("k", late(), 1),
            runtime.block_on(c.send_async(late())),
            runtime.block_on(c.send_keyed_async("k", late())),
            runtime.block_on(c.send_async_and_set_cursor(late(), 1)),
            runtime.block_on(c.send_keyed_async_and_set_cursor("k", late(), 1)),
        ];
        for (variant, refusal) in refusals.into_iter().enumerate() {
            assert!(
                matches!(&refusal, Err(SendError::Closed(item)) if item == "late"),
                "send variant {variant}: {refusal:?}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_async_waiters_unregister() {
        let (release, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let c: Conveyor<u32> = Conveyor::builder()
            .capacity(1)
            .build(move |_d| {
                let _ = gate.lock().unwrap().recv();
                Ok(())
            })
            .unwrap();
        c.send_async(0).await.unwrap(); // in flight, stalls
        while c.stats().in_flight == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        c.send_async(1).await.unwrap(); // fills the queue
        let short = Duration::from_millis(20);
        assert!(tokio::time::timeout(short, c.send_async(2)).await.is_err());
        assert!(tokio::time::timeout(short, c.flush_async()).await.is_err());
        let w = &c.shared.lock().waiters;
        assert_eq!((w.async_senders, w.flushers), (0, 0));
        drop(release);
    }

    /// Under `Durability::Sync`, `send_async` waited for its commit by blocking the thread that
    /// polled it: on a current-thread runtime, every other task stopped until the commit, and
    /// while the disk was full (the writer retrying) the whole runtime stood still.
    #[test]
    fn a_sync_send_async_awaits_its_commit_without_stopping_its_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let c = on_a_full_disk(&dir.path().join("j"), crate::Durability::Sync);
        let free = || limit_pages(&c, 1 << 30);
        let stood_still = freed_by_watchdog(&free, async {
            let send = c.send_async("x".repeat(100_000));
            let operator = async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                free();
            };
            let (sent, ()) = tokio::join!(send, operator);
            let receipt = sent.unwrap();
            assert!(c.wait_committed(&receipt, Duration::ZERO), "committed");
        });
        assert!(
            !stood_still,
            "the other task on the runtime ran only once the send returned"
        );
    }

    /// `wait_committed_async` awaits a held-back commit while the runtime's other tasks run: the
    /// one that frees the disk here runs only while the wait is pending. Its future borrows
    /// neither the conveyor nor the receipt, so it can be spawned.
    #[test]
    fn wait_committed_async_awaits_a_held_back_commit_without_stopping_its_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let c = on_a_full_disk(&dir.path().join("j"), crate::Durability::default());
        let free = || limit_pages(&c, 1 << 30);
        let stood_still = freed_by_watchdog(&free, async {
            let receipt = c.send("x".repeat(100_000)).unwrap();
            let committed = tokio::spawn(c.wait_committed_async(&receipt));
            // The item's commit failed: only freeing the disk lets the wait end.
            while c.journal_error().is_none() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(!committed.is_finished(), "the wait ended before its commit");
            free();
            committed.await.unwrap();
            assert!(c.wait_committed(&receipt, Duration::ZERO), "committed");
        });
        assert!(
            !stood_still,
            "the other task on the runtime ran only once the wait ended"
        );
    }

    /// `wait_committed_seq` and its async form wait for a held-back commit as the receipt
    /// forms do, for code that handed its receipt on (to `on_settled` here); without a journal
    /// there is nothing to wait for.
    #[test]
    fn wait_committed_seq_waits_for_a_held_back_commit_without_the_receipt() {
        let dir = tempfile::tempdir().unwrap();
        let c = on_a_full_disk(&dir.path().join("j"), crate::Durability::default());
        let free = || limit_pages(&c, 1 << 30);
        let receipt = c.send("x".repeat(100_000)).unwrap();
        let seq = receipt.seq();
        receipt.on_settled(|_outcome| {});
        let stood_still = freed_by_watchdog(&free, async {
            let committed = tokio::spawn(c.wait_committed_seq_async(seq));
            while c.journal_error().is_none() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(!c.wait_committed_seq(seq, Duration::from_millis(20)));
            assert!(!committed.is_finished(), "the wait ended before its commit");
            free();
            committed.await.unwrap();
            assert!(c.wait_committed_seq(seq, Duration::ZERO), "committed");
        });
        assert!(!stood_still, "the other task ran only once the wait ended");
        let unjournaled: Conveyor<u32> = Conveyor::builder().build(|_d| Ok(())).unwrap();
        assert!(unjournaled.wait_committed_seq(1, Duration::ZERO));
    }

    /// Runs `task` on a current-thread runtime while a watchdog waits for it: if it has not
    /// ended within 20 s (the runtime stands still, waiting for a full disk that only a task on
    /// it would free), the watchdog calls `free`, so that the test fails instead of hanging.
    /// Returns whether it had to.
    fn freed_by_watchdog(
        free: &(dyn Fn() + Sync),
        task: impl std::future::Future<Output = ()>,
    ) -> bool {
        use std::sync::atomic::AtomicBool;
        let by_watchdog = &AtomicBool::new(false);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        std::thread::scope(|scope| {
            let (done, finished) = mpsc::channel::<()>();
            scope.spawn(move || {
                let waited = finished.recv_timeout(Duration::from_secs(20));
                if waited == Err(mpsc::RecvTimeoutError::Timeout) {
                    by_watchdog.store(true, AtomicOrdering::SeqCst);
                    free();
                }
            });
            runtime.block_on(task);
            drop(done);
        });
        by_watchdog.load(AtomicOrdering::SeqCst)
    }

    /// A conveyor on a new journal at `path` whose file may not grow: its commits fail as on a
    /// full disk until `limit_pages(&c, 1 << 30)` makes room.
    fn on_a_full_disk(path: &std::path::Path, durability: crate::Durability) -> Conveyor<String> {
        let c = Conveyor::builder()
            .journal(path)
            .durability(durability)
            .build(|_d| Ok(()))
            .unwrap();
        limit_pages(&c, 1);
        c
    }

    /// Caps the journal file's size in pages, so that writes fail as on a full disk.
    fn limit_pages<T: Send + Sync + 'static, R: Send + 'static>(c: &Conveyor<T, R>, pages: i64) {
        c.shared
            .durable
            .as_ref()
            .unwrap()
            .with_journal(|j| {
                j.limit_pages(pages);
                Ok(())
            })
            .unwrap();
    }

    /// Leaves `items` pending in a journal at `path`, for a replay to load.
    fn journal_with_pending<T>(path: &std::path::Path, items: impl IntoIterator<Item = T>)
    where
        T: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
    {
        let (_hold, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let c: Conveyor<T> = Conveyor::builder()
            .journal(path)
            .capacity(10_000)
            .build(move |_d| {
                let _ = gate.lock().unwrap().recv();
                Err(crate::SinkError::permanent("stopped"))
            })
            .unwrap();
        for item in items {
            assert!(c.send(item).is_ok());
        }
        c.close_timeout(Duration::ZERO);
    }

    /// How many items `gated_replay`'s journal holds: more than the replay's page of 1,024
    /// items, so a second page is read after the first.
    const REPLAYED: u64 = 1_500;

    /// A conveyor replaying a journal in `dir` that holds the items `0..REPLAYED`, whose sink
    /// delivers nothing until the flag is set, then logs the items it delivers. The build
    /// reads the first page; the replay loads 100 items, then waits for room until the sink
    /// runs.
    #[allow(clippy::type_complexity)]
    fn gated_replay(
        dir: &std::path::Path,
    ) -> (
        Conveyor<u64>,
        Arc<Mutex<Vec<u64>>>,
        Arc<std::sync::atomic::AtomicBool>,
    ) {
        let path = dir.join("j");
        journal_with_pending(&path, 0..REPLAYED);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (log, gate) = (seen.clone(), open.clone());
        let c = Conveyor::builder()
            .journal(&path)
            .capacity(100)
            .build(move |d: crate::Delivery<u64>| {
                while !gate.load(AtomicOrdering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                log.lock().unwrap().push(*d.item());
                Ok(())
            })
            .unwrap();
        (c, seen, open)
    }

    /// Makes the next `n` reads of the journal's items fail (`u32::MAX`: until told
    /// otherwise); returns how many failures were still to come.
    fn fail_reads(c: &Conveyor<u64>, n: u32) -> u32 {
        let durable = c.shared.durable.as_ref().unwrap();
        durable.with_journal(|j| Ok(j.fail_reads(n))).unwrap()
    }

    /// Waits until `done` holds; fails the test, saying `what`, if it still does not after 30 s.
    fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A bug that panics the journal's writer (here, a commit that panics) fails the journal
    /// for good, where it left everything waiting for commits that never came, with nothing
    /// to say why: sends are refused, `journal_error` says what happened and what to do,
    /// flush returns at once, close counts the item that was never committed as left, and the
    /// journal file is released for the next conveyor.
    #[test]
    fn a_journal_writer_that_panics_fails_the_journal_for_good_instead_of_stalling() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let c: Conveyor<String> = Conveyor::builder()
            .journal(&path)
            .build(|_d| Ok(()))
            .unwrap();
        c.send("first".to_owned()).unwrap().wait().unwrap();
        assert!(c.flush_timeout(Duration::from_secs(30)));
        let durable = c.shared.durable.as_ref().unwrap();
        durable
            .with_journal(|j| {
                j.panicking_write = true;
                Ok(())
            })
            .unwrap();
        let lost = c.send("second".to_owned()).unwrap();
        until("the writer's panic was never reported", || {
            c.journal_error().is_some()
        });
        let error = c.journal_error().unwrap();
        assert!(
            matches!(&*error, JournalError::WriterStopped { path: p, reason }
                if *p == path && reason.contains("a bug in the journal's commit")),
            "{error:?}"
        );
        assert!(error.to_string().contains("report this bug"), "{error}");
        assert!(matches!(
            c.send("third".to_owned()),
            Err(SendError::Journal(_))
        ));
        assert!(!c.flush_timeout(Duration::from_secs(30)));
        // The item that can never be committed keeps the close until its deadline.
        let report = c.close_timeout(Duration::from_millis(500));
        assert_eq!(report.left, 1, "{report:?}");
        assert!(matches!(lost.wait(), Err(DeliveryError::Closed)));
        drop(c);
        let journal = Journal::open(&path).expect("released");
        assert_eq!(
            journal.status().unwrap().pending,
            0,
            "'second' was never committed"
        );
    }

    /// A replay whose journal read fails part way (an I/O error) reads again rather than
    /// stopping: stopping let new sends in ahead of the items not loaded yet, which the next
    /// start then delivered after them.
    #[test]
    fn a_replay_read_that_fails_is_tried_again_and_nothing_overtakes_it() {
        let dir = tempfile::tempdir().unwrap();
        let (c, seen, open) = gated_replay(dir.path());
        let c = Arc::new(c);
        // The next two reads fail.
        fail_reads(&c, 2);
        // As a caller would: a send refused while the journal cannot be read is made again.
        let sender = std::thread::spawn({
            let c = c.clone();
            move || {
                let mut item = REPLAYED;
                loop {
                    match c.send(item) {
                        Err(SendError::Journal(back)) => item = back,
                        sent => return sent.map(|_| ()),
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        // The send waits behind the replay before a read fails. When one fails, it is woken and
        // refused (see the tests below), unless the next read has succeeded by then.
        until("the send and the replay never waited", || {
            c.shared.lock().waiters.blocked_senders >= 2
        });
        open.store(true, AtomicOrdering::SeqCst);
        assert!(c.flush_timeout(Duration::from_secs(30)), "flushed");
        sender.join().unwrap().unwrap();
        assert!(c.flush_timeout(Duration::from_secs(30)), "flushed");
        assert_eq!(fail_reads(&c, 0), 0, "both reads failed");
        let items = seen.lock().unwrap().clone();
        assert!(
            items == (0..=REPLAYED).collect::<Vec<_>>(),
            "{} items delivered, the last ones {:?}",
            items.len(),
            &items[items.len().saturating_sub(3)..]
        );
    }

    /// A failure in the middle of a strict worker's lease ends the lease and makes the failed
    /// item a job: a sender waiting for the room this leaves is woken. It was not, and waited
    /// out the failed item's backoff (or, had it paused its lane, a resume).
    #[test]
    fn a_failure_that_ends_a_lease_wakes_the_senders_waiting_for_room() {
        use crate::{Retry, SinkError};
        let (entered, calls) = mpsc::channel::<u64>();
        let (release, gate) = mpsc::channel::<()>();
        let (entered, gate) = (Mutex::new(entered), Mutex::new(gate));
        let c: Arc<Conveyor<u64>> = Arc::new(
            Conveyor::builder()
                .capacity(4)
                .backpressure(Backpressure::Block)
                // Longer than the test: only the end of the lease can make room meanwhile.
                .retry(
                    Retry::fixed(Duration::from_secs(3600))
                        .max_delay(Duration::from_secs(3600))
                        .max_attempts(2),
                )
                .build(move |d| {
                    let item = *d.item();
                    let _ = entered.lock().unwrap().send(item);
                    match item {
                        0 | 2 => gate.lock().unwrap().recv().unwrap(),
                        3 => return Err(SinkError::retryable("retried in an hour")),
                        _ => {}
                    }
                    Ok(())
                })
                .unwrap(),
        );
        let next_call = || calls.recv_timeout(Duration::from_secs(30)).unwrap();
        c.send(0).unwrap();
        assert_eq!(next_call(), 0);
        // Queued behind item 0: the worker's next lease holds all four.
        for i in 1..=4 {
            c.send(i).unwrap();
        }
        release.send(()).unwrap();
        assert_eq!((next_call(), next_call()), (1, 2));
        // Item 2 in its call: items 3 to 6 fill the queue, and item 7 waits for room.
        let sender = std::thread::spawn({
            let c = c.clone();
            move || {
                for i in 5..=7 {
                    c.send(i).unwrap();
                }
            }
        });
        until("the sender never waited for room", || {
            c.shared.lock().waiters.blocked_senders >= 1
        });
        release.send(()).unwrap();
        assert_eq!(next_call(), 3);
        until("the sender waited on with room in the queue", || {
            sender.is_finished()
        });
        sender.join().unwrap();
        let s = c.stats();
        let counts = (s.accepted, s.delivered, s.queued, s.in_flight);
        assert_eq!(counts, (8, 3, 4, 1), "{s:?}");
        let report = c.close_timeout(Duration::from_millis(1));
        assert_eq!(report.left, 5, "{report:?}");
    }

    /// A journal that stays unreadable holds the replay for good. That used to show nowhere but
    /// the log: `journal_error()` said nothing, a `send` waited (or was refused as `Full`), and
    /// `flush()` never returned. It now shows as while the journal cannot be written.
    #[test]
    fn a_replay_held_by_an_unreadable_journal_shows_as_a_journal_error() {
        let dir = tempfile::tempdir().unwrap();
        let (c, seen, open) = gated_replay(dir.path());
        // Every read after the build's fails.
        fail_reads(&c, u32::MAX);
        open.store(true, AtomicOrdering::SeqCst);
        until("the read error never showed", || {
            c.journal_error().is_some()
        });
        assert!(
            c.journal_error()
                .unwrap()
                .to_string()
                .contains("injected by a test"),
            "{:?}",
            c.journal_error()
        );
        assert!(
            matches!(c.try_send(REPLAYED), Err(SendError::Journal(_))),
            "refused as while the journal cannot be written"
        );
        // Lets the reads succeed if `flush` waits on, so that a failure does not hang.
        let by_watchdog = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let (done, finished) = mpsc::channel::<()>();
            let (c, by_watchdog) = (&c, &by_watchdog);
            scope.spawn(move || {
                if finished.recv_timeout(Duration::from_secs(30))
                    == Err(mpsc::RecvTimeoutError::Timeout)
                {
                    by_watchdog.store(true, AtomicOrdering::SeqCst);
                    fail_reads(c, 0);
                }
            });
            c.flush();
            drop(done);
        });
        assert!(
            !by_watchdog.load(AtomicOrdering::SeqCst),
            "flush waited for a journal that cannot be read"
        );
        // Once it can be read again, the replay goes on, and sends are taken after it.
        fail_reads(&c, 0);
        until("the journal error never cleared", || {
            c.journal_error().is_none()
        });
        c.send(REPLAYED).unwrap();
        assert!(c.flush_timeout(Duration::from_secs(30)), "flushed");
        assert!(*seen.lock().unwrap() == (0..=REPLAYED).collect::<Vec<_>>());
    }

    /// Sends already waiting behind the replay when its read fails are woken and refused, as a
    /// send made then is: they used to wait on for as long as the journal stayed unreadable,
    /// with nothing to tell their callers why. Sent again once it reads, they come after it.
    #[test]
    fn sends_waiting_behind_a_replay_are_refused_when_its_read_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (c, seen, open) = gated_replay(dir.path());
        // Every read after the build's fails.
        fail_reads(&c, u32::MAX);
        let (tx, refusals) = mpsc::channel();
        std::thread::scope(|scope| {
            let (c, blocking, awaiting) = (&c, tx.clone(), tx);
            scope.spawn(move || blocking.send(c.send(REPLAYED).map(|_| ())));
            scope.spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                awaiting.send(runtime.block_on(c.send_async(REPLAYED + 1)).map(|_| ()))
            });
            // Both wait behind the replay (itself waiting for room) before any read fails.
            until("the sends never waited", || {
                let st = c.shared.lock();
                st.waiters.blocked_senders >= 2 && st.waiters.async_senders >= 1
            });
            open.store(true, AtomicOrdering::SeqCst);
            let mut refused = Vec::new();
            for _ in 0..2 {
                match refusals.recv_timeout(Duration::from_secs(20)) {
                    Ok(Err(SendError::Journal(item))) => refused.push(item),
                    Ok(other) => panic!("expected a journal refusal, got {other:?}"),
                    Err(_) => {
                        // Lets the waiting sends through, so that the failure does not hang.
                        fail_reads(c, 0);
                        panic!("a send waiting behind the replay was not refused: {refused:?}");
                    }
                }
            }
            refused.sort_unstable();
            assert_eq!(refused, [REPLAYED, REPLAYED + 1], "each item handed back");
        });
        assert!(
            c.journal_error().is_some(),
            "the journal is still unreadable"
        );
        fail_reads(&c, 0);
        until("the journal error never cleared", || {
            c.journal_error().is_none()
        });
        c.send(REPLAYED).unwrap();
        c.send(REPLAYED + 1).unwrap();
        assert!(c.flush_timeout(Duration::from_secs(30)), "flushed");
        assert!(*seen.lock().unwrap() == (0..=REPLAYED + 1).collect::<Vec<_>>());
    }

    /// Under Pause, items that no longer decode take room like any replayed item: the replay
    /// waits for room before holding one, so the queue never goes past its capacity.
    #[test]
    fn replayed_items_that_no_longer_decode_wait_for_room_under_pause() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        journal_with_pending(
            &path,
            std::iter::once(serde_json::json!("a")).chain((0..100).map(|n| serde_json::json!(n))),
        );
        let (release, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let c: Conveyor<String> = Conveyor::builder()
            .journal(&path)
            .capacity(1)
            .on_failure(crate::OnFailure::Pause)
            .drain_timeout(Duration::from_millis(100))
            .build(move |_d| {
                let _ = gate.lock().unwrap().recv();
                Ok(())
            })
            .unwrap();
        // "a" is in the sink until released: the replay holds one undecodable item, then waits
        // for room (or, wrongly, takes them all and ends).
        until("the replay neither waited nor ended", || {
            let st = c.shared.lock();
            st.waiters.blocked_senders > 0 || !st.replaying
        });
        let stats = c.stats();
        assert!(stats.queued <= 1, "past the capacity of 1: {stats:?}");
        drop(release);
    }

    /// `flush_async`, as `flush`, stops waiting while the journal cannot be written: the items
    /// not committed cannot be delivered until it can, which may be never.
    #[test]
    fn flush_async_returns_while_the_journal_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let c = on_a_full_disk(&dir.path().join("j"), crate::Durability::default());
        let limit = |pages| limit_pages(&c, pages);
        c.send("x".repeat(100_000)).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let flushed = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), c.flush_async()).await
        });
        let error = c.journal_error();
        limit(1 << 30);
        assert!(
            flushed.is_ok(),
            "flush_async waited on a journal that cannot be written"
        );
        assert!(
            error.is_some(),
            "the journal could not be written meanwhile"
        );
        // The writer retries; flush waits again once the journal can be written.
        until("the journal stayed unwritable", || {
            c.journal_error().is_none()
        });
        assert!(
            c.flush_timeout(Duration::from_secs(30)),
            "delivered once it can"
        );
        assert_eq!(c.stats().delivered, 1);
    }

    /// `flush_timeout` said the journal held what was stored although its commit had not
    /// finished by the deadline: the writer's answer was waited for until then, and a missing
    /// answer counted as a success.
    #[test]
    fn flush_timeout_is_false_while_the_journal_has_not_committed_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (c, release, slow_disk) = cursor_for_a_hung_disk(&path);
        assert!(
            !c.flush_timeout(Duration::from_millis(200)),
            "the cursor is not committed yet"
        );
        drop(release);
        slow_disk.join().unwrap();
        assert!(c.flush_timeout(Duration::from_secs(30)));
        drop(c);
        assert_eq!(Journal::open(&path).unwrap().cursor().unwrap(), Some(7));
    }

    /// A dead letter retried on a running conveyor left the dead letters in a settlement
    /// recorded after its new append, which a commit could separate from it: here a full disk
    /// part way through a large group, then a close (a crash between two groups does the same).
    /// The item was then both pending and dead, and retrying it again delivered it twice, under
    /// two idempotency keys.
    #[test]
    fn a_retried_dead_letter_leaves_the_dead_letters_in_the_commit_of_its_new_append() {
        use crate::durable::{CHUNK, ROOM_FOR_ABOUT_ONE_CHUNK};
        use crate::SinkError;
        use std::sync::atomic::{AtomicBool, Ordering as O};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let down = Arc::new(AtomicBool::new(true));
        let (entered, in_sink) = mpsc::channel::<()>();
        let (release, gate) = mpsc::channel::<()>();
        let (entered, gate) = (Mutex::new(entered), Mutex::new(gate));
        let sink_down = down.clone();
        let c: Conveyor<String> = Conveyor::builder()
            .journal(&path)
            // One group for everything sent below, unless a worker asks for a commit.
            .durability(crate::Durability::Batched(Duration::from_secs(2)))
            .capacity(1 << 16)
            .build(move |d: crate::Delivery<String>| {
                if d.item() == "gate" {
                    entered.lock().unwrap().send(()).unwrap();
                    let _ = gate.lock().unwrap().recv();
                }
                if sink_down.load(O::SeqCst) {
                    return Err(SinkError::permanent("down"));
                }
                Ok(())
            })
            .unwrap();
        c.send("failed once".to_owned())
            .unwrap()
            .wait()
            .unwrap_err();
        down.store(false, O::SeqCst);
        let seq = c.dead_letters().unwrap()[0].seq;
        // The only worker waits in the sink: none asks for what follows to be committed early.
        c.send("gate".to_owned()).unwrap();
        in_sink.recv().unwrap();
        // Room for about one chunk of the group below.
        let durable = c.shared.durable.as_ref().unwrap();
        durable
            .with_journal(|j| {
                j.limit_pages(j.page_count() + ROOM_FOR_ABOUT_ONE_CHUNK);
                Ok(())
            })
            .unwrap();
        let again = c.retry_dead(seq).unwrap();
        for _ in 0..3 * CHUNK {
            c.send("x".repeat(100)).unwrap();
        }
        until("the group never failed", || c.journal_error().is_some());
        c.stop_timeout(Duration::from_millis(100));
        drop(release);
        drop(c);

        let journal = Journal::open(&path).unwrap();
        let pending: Vec<u64> = journal
            .pending_after(0, 1 << 20)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        let dead: Vec<u64> = journal
            .dead_letters()
            .unwrap()
            .iter()
            .map(|d| d.seq)
            .collect();
        assert!(
            pending.contains(&again.seq()),
            "the retried item's append went in"
        );
        assert!(
            !dead.contains(&seq),
            "so did the dead letter's removal: it is pending as {} and dead as {seq}",
            again.seq()
        );
    }

    /// Lets a [`hung_disk`] answer: at [`Release::now`] or when dropped. Shared by reference,
    /// so a test and the watchdog of [`bounded`] can both let it go, whichever comes first.
    struct Release(Mutex<Option<mpsc::Sender<()>>>);

    impl Release {
        fn now(&self) {
            drop(self.0.lock().unwrap().take());
        }
    }

    /// A disk that hangs (an `fsync` that does not return): the journal's writer cannot commit
    /// while a thread holds the journal, until the returned [`Release`] lets go. Join the handle
    /// after that.
    fn hung_disk<T: Send + Sync + 'static, R: Send + 'static>(
        c: &Conveyor<T, R>,
    ) -> (Release, std::thread::JoinHandle<()>) {
        let (holding, held) = mpsc::channel::<()>();
        let (release, wait) = mpsc::channel::<()>();
        let shared = c.shared.clone();
        let disk = std::thread::spawn(move || {
            let durable = shared.durable.as_ref().unwrap();
            durable
                .with_journal(|_j| {
                    holding.send(()).unwrap();
                    let _ = wait.recv();
                    Ok(())
                })
                .unwrap();
        });
        held.recv().unwrap();
        (Release(Mutex::new(Some(release))), disk)
    }

    /// The journal at `path`, opened once the writer of the conveyor on it has let it go (it
    /// commits what it had once a hung disk answers).
    fn once_let_go(path: &std::path::Path) -> Journal {
        let mut reopened = None;
        until("the journal was never let go", || {
            reopened = Journal::open(path).ok();
            reopened.is_some()
        });
        reopened.unwrap()
    }

    /// A conveyor on a new journal at `path` whose disk hangs (see `hung_disk`), with cursor 7
    /// set and waiting for it.
    fn cursor_for_a_hung_disk(
        path: &std::path::Path,
    ) -> (Conveyor<String>, Release, std::thread::JoinHandle<()>) {
        let c: Conveyor<String> = Conveyor::builder()
            .journal(path)
            .build(|_d| Ok(()))
            .unwrap();
        let (release, disk) = hung_disk(&c);
        c.set_cursor(7).unwrap();
        (c, release, disk)
    }

    /// Runs `f` on a thread of its own and returns what it returned, unless it has not returned
    /// within 20 s: then the hung `disk` answers (so that the test can end) and the test fails,
    /// saying `what` hung.
    fn bounded<O: Send + 'static>(
        what: &str,
        disk: &Release,
        f: impl FnOnce() -> O + Send + 'static,
    ) -> O {
        let limit = Duration::from_secs(20);
        let (done, result) = mpsc::channel();
        let call = std::thread::spawn(move || {
            let _ = done.send(f());
        });
        match result.recv_timeout(limit) {
            Ok(out) => {
                call.join().unwrap();
                out
            }
            Err(_) => {
                disk.now();
                call.join().unwrap();
                panic!("{what} did not return within {limit:?}");
            }
        }
    }

    /// Journal ops were queued for the writer on a bounded channel, under the state lock. With
    /// the writer stuck on a hung disk, `set_cursor` (which takes no room in the queue) filled
    /// the channel and then blocked in its push holding the state lock: `flush_timeout`,
    /// `stats` and every other call that needs the state lock waited for the disk, past their
    /// deadlines.
    #[test]
    fn deadlines_hold_while_the_journal_writer_is_stuck_on_a_hung_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let c: Arc<Conveyor<String>> = Arc::new(
            Conveyor::builder()
                .journal(&path)
                .capacity(1)
                .build(|_d| Ok(()))
                .unwrap(),
        );
        let (release, disk) = hung_disk(&c);
        // The writer takes the first op, gathers for its window (5 ms) and blocks on the disk:
        // the ops after that wait for it. (Were it slower, it would gather them all in its
        // group and nothing would wait: the test would prove nothing, but would not fail.)
        c.set_cursor(0).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // Well past what the writer may queue: the queue's capacity, within 1,024 and 65,536.
        const CURSORS: u64 = 4 * 1024;
        let setter = c.clone();
        let (set, all_set) = mpsc::channel();
        std::thread::spawn(move || {
            for cursor in 1..=CURSORS {
                setter.set_cursor(cursor).unwrap();
            }
            let _ = set.send(());
        });
        // Long enough for the cursors to be queued, or for the queue to be full.
        let setter_returned = all_set.recv_timeout(Duration::from_secs(2)).is_ok();
        let checked = c.clone();
        let (flushed, stats) = bounded(
            "flush_timeout(200 ms) or stats() with the disk hung",
            &release,
            move || {
                let flushed = checked.flush_timeout(Duration::from_millis(200));
                (flushed, checked.stats())
            },
        );
        assert!(!flushed, "nothing could be committed");
        assert_eq!(stats.delivered, 0);
        assert!(setter_returned, "set_cursor waited for the hung disk");
        release.now();
        disk.join().unwrap();
        assert!(c.flush_timeout(Duration::from_secs(30)));
        assert_eq!(c.cursor().unwrap(), Some(CURSORS));
    }

    /// `close_timeout` waited for the journal's writer until its deadline, then took the
    /// journal to close it: with the writer stuck inside a commit on a hung disk, that wait
    /// had no end, and neither had a drop of the conveyor.
    #[test]
    fn close_timeout_returns_while_the_journal_writer_is_stuck_on_a_hung_disk() {
        let report = closed_on_a_hung_disk("close_timeout(100 ms) with the disk hung", |c| {
            let report = c.close_timeout(Duration::from_millis(100));
            drop(c);
            report
        });
        assert!(report.drained, "nothing was sent");
    }

    /// Runs `close` on a conveyor whose journal's disk hangs, with cursor 7 waiting for it (see
    /// `cursor_for_a_hung_disk`), on a thread of its own: the test fails if it has not returned
    /// in 20 s (its deadline, and the 2 s of grace the journal's last commit is given). Then the
    /// disk answers: the writer commits the cursor and lets the journal go.
    fn closed_on_a_hung_disk<O: Send + 'static>(
        what: &str,
        close: impl FnOnce(Conveyor<String>) -> O + Send + 'static,
    ) -> O {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (c, release, disk) = cursor_for_a_hung_disk(&path);
        let closed = bounded(what, &release, move || close(c));
        release.now();
        disk.join().unwrap();
        assert_eq!(once_let_go(&path).cursor().unwrap(), Some(7));
        closed
    }

    /// Under `Durability::Sync`, a send waits for its item's commit, or for the conveyor to
    /// close. On a hung disk the writer never exits, and `close_timeout`, which gives up on it
    /// at its deadline, left such a send (blocking or async) waiting for ever.
    #[test]
    fn a_sync_send_waiting_for_a_hung_disk_returns_once_close_gives_up_on_the_writer() {
        use crate::Durability;
        let dir = tempfile::tempdir().unwrap();
        let c: Arc<Conveyor<String>> = Arc::new(
            Conveyor::builder()
                .journal(dir.path().join("j"))
                .durability(Durability::Sync)
                .build(|_d| Ok(()))
                .unwrap(),
        );
        let (release, disk) = hung_disk(&c);
        let blocking = std::thread::spawn({
            let c = c.clone();
            move || c.send("blocking".to_owned()).map(|_| ())
        });
        let awaiting = std::thread::spawn({
            let c = c.clone();
            move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                runtime
                    .block_on(c.send_async("awaiting".to_owned()))
                    .map(|_| ())
            }
        });
        until("both sends wait for their commit", || {
            c.stats().accepted == 2
        });
        let (blocking, awaiting) = bounded(
            "close_timeout(100 ms), then the Sync sends, with the disk hung",
            &release,
            move || {
                let report = c.close_timeout(Duration::from_millis(100));
                assert_eq!(report.left, 2, "both items are reported as left");
                (blocking.join().unwrap(), awaiting.join().unwrap())
            },
        );
        assert!(blocking.is_ok() && awaiting.is_ok(), "accepted, and left");
        release.now();
        disk.join().unwrap();
    }

    /// Once `close_timeout` has given up on a writer stuck in a commit, a later `flush`
    /// (blocking or async) waited for the disk's answer all the same.
    #[test]
    fn flush_after_close_gave_up_on_a_hung_disk_returns() {
        let dir = tempfile::tempdir().unwrap();
        let (c, release, disk) = cursor_for_a_hung_disk(&dir.path().join("j"));
        bounded(
            "flush and flush_async after close_timeout gave up on the hung disk",
            &release,
            move || {
                c.close_timeout(Duration::from_millis(100));
                c.flush();
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap()
                    .block_on(c.flush_async());
            },
        );
        release.now();
        disk.join().unwrap();
    }

    /// `flush_async` waited for the journal's last commit with a blocking receive: a task's
    /// thread stood still for the commit (for ever on a hung disk), and with it every other
    /// task of a current-thread runtime.
    #[test]
    fn flush_async_awaits_the_journal_without_blocking_its_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (c, release, disk) = cursor_for_a_hung_disk(&path);
        let c = Arc::new(c);
        let first = bounded(
            "a current-thread runtime running flush_async with the disk hung",
            &release,
            {
                let c = c.clone();
                move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .unwrap();
                    runtime.block_on(async {
                        tokio::select! {
                            () = c.flush_async() => "flushed",
                            () = tokio::time::sleep(Duration::from_millis(50)) => "ticked",
                        }
                    })
                }
            },
        );
        assert_eq!(
            first, "ticked",
            "the cursor cannot be committed while the disk hangs"
        );
        release.now();
        disk.join().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(c.flush_async());
        assert_eq!(c.cursor().unwrap(), Some(7));
    }

    /// `close_async` gives the journal's last commit its grace, then gives up on a writer stuck
    /// on a hung disk, as `close_timeout` does, without blocking its thread meanwhile: here a
    /// current-thread runtime without a timer, whose other task runs while it waits.
    #[test]
    fn close_async_returns_while_the_journal_writer_is_stuck_on_a_hung_disk() {
        let (report, other_task_ran) =
            closed_on_a_hung_disk("close_async(100 ms) with the disk hung", |c| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let other_task = tokio::spawn(async {});
                    let report = c.close_async(Duration::from_millis(100)).await;
                    (report, other_task.is_finished())
                })
            });
        assert!(report.drained, "nothing was sent");
        assert!(other_task_ran, "close_async blocked its thread");
    }

    /// A `close_async` dropped once it has given up on the items left (here while it awaits the
    /// journal's last commit on a hung disk) settles their receipts as closed, and a later close
    /// finishes the shutdown: it gives up on the writer, and the journal keeps the items.
    #[test]
    fn a_close_async_dropped_after_its_deadline_settles_what_it_left_for_a_later_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (c, release, disk) = cursor_for_a_hung_disk(&path);
        let receipts: Vec<_> = (0..3).map(|i| c.send(i.to_string()).unwrap()).collect();
        let c = Arc::new(c);
        let closing = c.clone();
        let (receipts, refused) = bounded(
            "close_async dropped past its deadline",
            &release,
            move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let abandoned = async {
                        while !closing.shared.lock().abandoned {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    };
                    tokio::select! {
                        _ = closing.close_async(Duration::from_millis(20)) => {
                            panic!("returned while the journal's last commit hung, within its grace")
                        }
                        () = abandoned => {}
                    }
                    let outcomes: Vec<_> = receipts
                        .into_iter()
                        .map(|mut r| r.wait_timeout(Duration::ZERO))
                        .collect();
                    (outcomes, closing.send("late".to_owned()).is_err())
                })
            },
        );
        assert!(
            receipts
                .iter()
                .all(|r| matches!(r, Some(Err(DeliveryError::Closed)))),
            "{receipts:?}"
        );
        assert!(refused, "a send after the close was accepted");
        let later = c.clone();
        let report = bounded(
            "a close after a dropped close_async, with the disk hung",
            &release,
            move || later.close_timeout(Duration::from_millis(20)),
        );
        assert_eq!((report.drained, report.left), (false, 3));
        release.now();
        disk.join().unwrap();
        assert_eq!(once_let_go(&path).status().unwrap().pending, 3);
    }

    /// While the journal's writer is behind (a hung disk), new items wait for it as for room
    /// in a full queue, outside the state lock: a blocking send waits and goes on once the
    /// disk answers, `try_send` and the drop policies return at once, and the ops waiting for
    /// the disk stay bounded whatever the policy.
    #[test]
    fn new_items_wait_for_a_writer_stuck_on_a_hung_disk_as_for_room() {
        use crate::{Backpressure, Durability};
        for policy in [Backpressure::Block, Backpressure::DropOldest] {
            let dir = tempfile::tempdir().unwrap();
            let c: Arc<Conveyor<u64>> = Arc::new(
                Conveyor::builder()
                    .journal(dir.path().join("j"))
                    .capacity(1 << 14)
                    .backpressure(policy)
                    // A short window, so that the writer soon commits what it took (see below).
                    .durability(Durability::Batched(Duration::from_micros(1)))
                    .build(|_d| Ok(()))
                    .unwrap(),
            );
            // The writer done with its start and idle: hung now, the disk could otherwise hold
            // it up before it takes the first item below (it did once in a loaded full run).
            c.send(u64::MAX - 2).unwrap();
            assert!(c.flush_timeout(Duration::from_secs(30)));
            let (release, disk) = hung_disk(&c);
            let durable = c.shared.durable.as_ref().unwrap();
            // The writer takes every op queued before it commits: with ops coming in faster than
            // it takes them, it took all of them until the queue was full, and was never behind
            // (3 runs in 12 on a 2-core machine). One item first, whose commit hangs the writer
            // on the disk before the others come. The worker that takes it asks for its commit
            // (a barrier) once the writer may have taken it already: that barrier then waits
            // behind the hung commit, so the queue need not be empty at any moment.
            let first = c.send(u64::MAX - 1).unwrap();
            until("the writer never took the first item", || {
                durable.appends_waiting() == 0
            });
            std::thread::sleep(Duration::from_millis(20));
            // Two ops an item: the ops reach their bound (the capacity) before the queue is
            // full. Short of the seqs reserved at start, which the writer would have to extend.
            const SENT: u64 = 3 << 14;
            let sender = c.clone();
            let sending = std::thread::spawn(move || {
                (0..SENT)
                    .filter(|i| {
                        let receipt = sender.send(*i).unwrap();
                        sender.set_cursor(i + 1).unwrap();
                        receipt.is_settled()
                    })
                    .count()
            });
            // Behind, the writer may still take what is queued once before its commit reaches
            // the disk (if it was not scheduled meanwhile): a `try_send` then goes in, and the
            // check is made again once it is behind for good. Counted in `extra`.
            let mut extra = 0;
            let refused = loop {
                until("the writer never fell behind", || durable.behind());
                let checked = c.clone();
                let refused = bounded(
                    "try_send, flush_timeout or stats with the writer behind",
                    &release,
                    move || {
                        let refused = checked.try_send(u64::MAX);
                        assert!(!checked.flush_timeout(Duration::from_millis(100)));
                        checked.stats();
                        refused
                    },
                );
                if policy == Backpressure::Block && refused.is_ok() && extra < 3 {
                    extra += 1;
                    continue;
                }
                break refused;
            };
            let dropped = match policy {
                Backpressure::Block => {
                    assert!(matches!(refused, Err(SendError::Full(_))), "{refused:?}");
                    assert!(!sending.is_finished(), "the sender waits for the writer");
                    release.now();
                    sending.join().unwrap()
                }
                _ => {
                    assert!(refused.is_ok(), "dropped, not refused");
                    let dropped = sending.join().unwrap();
                    assert!(dropped > 0, "new items dropped while the writer is behind");
                    let waiting = durable.ops_waiting();
                    assert!(waiting <= 1 << 16, "{waiting} ops wait for the disk");
                    release.now();
                    dropped
                }
            };
            disk.join().unwrap();
            assert!(c.flush_timeout(Duration::from_secs(60)), "{policy:?}");
            let stats = c.stats();
            // The first item may be the oldest one dropped under `DropOldest`.
            let first_dropped = matches!(first.wait(), Err(DeliveryError::Dropped));
            let dropped = dropped + usize::from(first_dropped);
            // Under `DropOldest`, the `try_send` above was accepted, and dropped.
            // With the warm-up item and the first.
            let accepted = SENT + 2 + extra + u64::from(policy == Backpressure::DropOldest);
            assert_eq!(
                (stats.delivered + stats.dropped, stats.dropped),
                (
                    accepted,
                    dropped as u64 + u64::from(policy == Backpressure::DropOldest)
                ),
                "{policy:?}: {stats:?}"
            );
            assert_eq!(c.cursor().unwrap(), Some(SENT), "{policy:?}");
        }
    }

    /// Calls that ask the writer for a commit (`flush_timeout`, `wait_committed`, a worker
    /// taking an item) each queued a barrier, and barriers never merged: with the writer stuck
    /// on a hung disk, a caller polling with a short timeout (the CLI's end-of-input loop,
    /// Python's `flush`, which waits in slices) grew the op queue by one barrier per call, for
    /// as long as the disk hung.
    #[test]
    fn polling_for_commits_while_the_disk_hangs_does_not_grow_the_op_queue() {
        let dir = tempfile::tempdir().unwrap();
        let (c, release, disk) = cursor_for_a_hung_disk(&dir.path().join("j"));
        let durable = c.shared.durable.as_ref().unwrap();
        // Nothing to deliver: each call goes on to ask the journal for a commit.
        const POLLS: usize = 1000;
        for _ in 0..POLLS {
            assert!(
                !c.flush_timeout(Duration::ZERO),
                "the cursor waits for the disk"
            );
        }
        let receipt = c.send("x".to_owned()).unwrap();
        for _ in 0..POLLS {
            assert!(!c.wait_committed(&receipt, Duration::ZERO));
        }
        let waiting = durable.ops_waiting();
        // The cursor, the append, a barrier or two around the append.
        assert!(waiting <= 4, "{waiting} ops queued for {} polls", 2 * POLLS);
        drop(release);
        disk.join().unwrap();
        assert!(c.flush_timeout(Duration::from_secs(30)));
        assert_eq!(c.stats().delivered, 1);
        assert_eq!(c.cursor().unwrap(), Some(7));
    }
}
