//! The scheduling state: lanes of queued items, what may start next, and the counters.
//!
//! Everything here runs under the engine's one state lock and never blocks or calls
//! user code: receipts to settle are handed back to the caller, who settles them
//! after releasing the lock (a receipt callback may take other locks, the GIL...).

use std::collections::{HashMap, VecDeque};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering as AtomicOrdering};

use crossbeam_utils::CachePadded;
use std::sync::Arc;
use std::time::Instant;

use crate::builder::Ordering;
use crate::error::{DeliveryError, SinkError};
use crate::intake::Batch;
use crate::receipt::{Node, NodeRef};
use crate::retry::RateLimiter;
use crate::stats::Stats;

/// Whether [`State::room`] lets a new item in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    Free,
    /// The queue holds `capacity` items: the backpressure policy decides.
    Full,
    /// The journal is being replayed, or its seq reservation is being extended: new items
    /// wait (or are refused or dropped when they may not wait), but nothing queued is
    /// evicted for them.
    Later,
}

/// A receipt to settle once the state lock is released.
pub(crate) type Settlement<T, R> = (NodeRef<T, R>, Result<R, DeliveryError>);

/// An item waiting in its lane, with its attempt budget: a [`Job`] without a start time,
/// which only the worker holding it needs. Half a `Job`'s size, so that the passes over a
/// lane's items (a drain moving a batch in, a lease copying its items out, its end taking
/// them off) move 16 bytes an item, and a backlog takes that much memory per item.
pub(crate) struct Queued<T, R> {
    node: NodeRef<T, R>,
    attempts: u32,
    attempt_limit: u32,
}

impl<T, R> From<Job<T, R>> for Queued<T, R> {
    fn from(job: Job<T, R>) -> Self {
        Self {
            node: job.node,
            attempts: job.attempts,
            attempt_limit: job.attempt_limit,
        }
    }
}

impl<T, R> From<Queued<T, R>> for Job<T, R> {
    fn from(queued: Queued<T, R>) -> Self {
        Self {
            node: queued.node,
            attempts: queued.attempts,
            attempt_limit: queued.attempt_limit,
            start_at: None,
        }
    }
}

/// An item on its way through a worker, with its attempt budget.
pub(crate) struct Job<T, R> {
    pub(crate) node: NodeRef<T, R>,
    /// Attempts made so far (kept across a pause, so `Delivery::attempt` keeps counting).
    pub(crate) attempts: u32,
    /// Attempts allowed in total; a `resume` grants a fresh retry budget.
    pub(crate) attempt_limit: u32,
    /// When the next attempt may start: a first attempt's rate-limit slot (if a limit is set),
    /// or the end of a retry's backoff.
    pub(crate) start_at: Option<Instant>,
}

/// How a job left the worker.
pub(crate) enum Outcome<R> {
    Delivered(R),
    Failed(SinkError),
    /// The last attempt failed under `OnFailure::Pause`: the item goes back to the head of its
    /// lane, unsettled, and the lane pauses. Its error was logged and dropped before the state
    /// lock (see `Shared::finished`): both run user code.
    Paused,
    /// The conveyor was abandoned at its drain deadline between attempts: the item
    /// goes back to its lane unsettled.
    Interrupted,
}

/// An item the journal holds that cannot be decoded as the item type, standing in its lane
/// under `OnFailure::Pause` (see `State::hold_undecodable`): it has no `T` to queue, so the lane
/// keeps its place instead.
pub(crate) struct Undecodable {
    pub(crate) seq: u64,
    /// Why it cannot be decoded, for its dead letter.
    pub(crate) error: String,
}

struct Lane<T, R> {
    /// In sequence order: new items at the back, items put back are inserted by seq.
    queue: VecDeque<Queued<T, R>>,
    /// Undecodable items of this lane, in sequence order: nothing after the first starts, and
    /// the lane pauses once nothing before it is left (see `reach_undecodable`).
    undecodable: VecDeque<Undecodable>,
    in_flight: usize,
    /// Items of this lane waiting out a retry's backoff, or whose failed first attempt in a
    /// pipelined lease is not recorded yet (see `InFlight::holding`). Nothing behind them
    /// may start meanwhile; only the main lane counts them (a keyed lane has its one item in
    /// flight).
    retrying: usize,
    paused: bool,
    /// Whether this lane has an entry in `State::ready` (keyed mode only).
    in_ready: bool,
    /// A worker holds a lease of its head items (see `Lease`): nobody else starts any of it.
    leased: bool,
    /// The head item is the one a cut lease's worker claimed (see `State::cut_lease`): in
    /// flight, it stays at the head until that lease ends, and items start after it.
    cut_head: bool,
}

/// Whether items with these keys go to the same lane in keyed mode: no key is the key `""`.
pub(crate) fn same_lane(a: Option<&Arc<str>>, b: Option<&Arc<str>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
        (Some(key), None) | (None, Some(key)) => key.is_empty(),
        (None, None) => true,
    }
}

/// What a keyed lane needs once an item left it or settled (see `Lane::keyed_next`).
enum KeyedNext {
    /// It may run: an entry in `State::ready`.
    Ready,
    /// Nothing is left in it.
    Remove,
    Stay,
}

impl<T, R> Lane<T, R> {
    fn new() -> Self {
        Self::with_queue(VecDeque::new())
    }

    /// A lane whose queue starts from `queue`'s allocation (see `State::spare_queue`).
    fn with_queue(queue: VecDeque<Queued<T, R>>) -> Self {
        Self {
            queue,
            undecodable: VecDeque::new(),
            in_flight: 0,
            retrying: 0,
            paused: false,
            in_ready: false,
            leased: false,
            cut_head: false,
        }
    }

    /// The claimed item of a cut lease (see `cut_head`) is no longer in flight at the head.
    fn cut_head_ended(&mut self) {
        self.in_flight -= 1;
        self.cut_head = false;
    }

    /// Where the next item to start stands in `queue` (see `cut_head`).
    fn next_index(&self) -> usize {
        usize::from(self.cut_head)
    }

    /// Keyed mode: what this lane needs after an item left it or settled, so that every lane
    /// that may run is in `ready` and no empty lane is kept.
    fn keyed_next(&mut self) -> KeyedNext {
        if self.runnable_keyed() && !self.in_ready {
            self.in_ready = true;
            KeyedNext::Ready
        } else if self.is_done() {
            KeyedNext::Remove
        } else {
            KeyedNext::Stay
        }
    }

    /// Keyed lanes are strict: one item in flight per lane.
    fn runnable_keyed(&self) -> bool {
        !self.paused && self.in_flight == 0 && self.head_may_start()
    }

    /// The head item exists and comes before any undecodable item of the lane.
    fn head_may_start(&self) -> bool {
        self.queue.get(self.next_index()).is_some_and(|job| {
            self.undecodable
                .front()
                .map_or(true, |held| job.node.seq() < held.seq)
        })
    }

    /// Pauses the lane if its next item is an undecodable one and nothing before it is left in
    /// flight or queued; returns how many items the pause now holds (with the undecodable ones).
    fn reach_undecodable(&mut self) -> Option<u64> {
        if self.paused || self.in_flight > 0 || self.undecodable.is_empty() || self.head_may_start()
        {
            return None;
        }
        self.paused = true;
        Some(self.held())
    }

    /// What the lane holds while it is paused: its queued items, undecodable ones too.
    fn held(&self) -> u64 {
        (self.queue.len() - self.next_index() + self.undecodable.len()) as u64
    }

    /// Nothing left in it: a keyed lane is then removed, so memory follows the queue.
    fn is_done(&self) -> bool {
        self.queue.is_empty() && self.in_flight == 0 && self.undecodable.is_empty() && !self.paused
    }

    fn put_back(&mut self, job: Job<T, R>) {
        let seq = job.node.seq();
        let at = self.queue.partition_point(|j| j.node.seq() < seq);
        self.queue.insert(at, job.into());
    }
}

/// An item at the head of a lane lent to a worker (see `State::lease`). The lane keeps the
/// item, and the reference that keeps its node alive, until the lease ends.
pub(crate) struct Leased<T, R> {
    pub(crate) node: NonNull<Node<T, R>>,
    pub(crate) attempts: u32,
    pub(crate) attempt_limit: u32,
}

/// Set in a worker's claim counter (`Shared::lease_claims`) once a shutdown closed its lease:
/// no item after those claimed starts.
pub(crate) const LEASE_CLOSED: usize = 1 << (usize::BITS - 1);

/// What a lease's claim counter (`Shared::lease_claims`, without `LEASE_CLOSED`) says: the
/// worker moves it to `2 i + 1` as it claims item `i` (its sink call may begin), then to
/// `2 i + 2` once that call returned `Ok`, before it settles the item's receipt (straight to
/// `2 i + 3` as it claims the next item when there is nothing to settle: see
/// `Node::unheeded`). Returns how many items were delivered (the last of them possibly still
/// settling its receipt), and whether the item after those was claimed.
fn lease_progress(claim: usize) -> (usize, bool) {
    (claim / 2, claim % 2 == 1)
}

/// A lane's head items lent to one worker, which runs them one after another without taking
/// the state lock between them: each item's sink call, then its receipt, then the next item's
/// call. Nobody else starts an item of that lane meanwhile, which a strict or keyed lane
/// does not allow anyway; a pipelined lane is leased only with nothing else of it in flight,
/// and a worker standing by cuts a lease that stalls (see `State::lease`, `cut_lease`). The
/// items stay at the head of the lane meanwhile, where shutdown finds them; the first counts
/// as in flight, the others as queued, until the worker reports them
/// done at its next turn of the lock, at the end of the lease, at most `worker::LEASE` items
/// later. `stats()` and `room` count an item delivered as soon as its call returned (see
/// `lease_progress`), before its receipt settles, as every item was before leases: once every
/// receipt sent so far has settled, `stats()` counts them all, and a sink's own sends find the
/// room its earlier items left.
///
/// Before each sink call the worker claims the item, and it marks it delivered once the call
/// returned (see `lease_progress`); a shutdown that closes the lease (`State::close_lease`)
/// learns how far it got, and every item after those never starts.
struct Lease<T, R> {
    /// The leased lane: a key's in keyed mode, else the main lane.
    lane: Option<Arc<str>>,
    /// Items of the lease still at the head of the lane.
    len: usize,
    /// Items of the lease `close_lease` took off the lane.
    taken: usize,
    /// Set by `close_lease`: whether the head item was claimed by then (its sink call may have
    /// begun), all the claimed items before it having been delivered and taken off the lane.
    closed: Option<bool>,
    /// Set by `close_lease` when the worker may be settling the receipt of the last item it
    /// delivered: counted delivered and off the lane, its node stays here, alive for the
    /// worker's settling, until the lease ends.
    settling: Option<NodeRef<T, R>>,
    /// Set by `cut_lease`: the lane's items after the claimed one are no longer the lease's.
    cut: bool,
}

/// A worker's job as shutdown sees it.
struct InFlight<T, R> {
    node: NodeRef<T, R>,
    /// Its sink call may have begun: it is past any wait for a rate-limit slot or a backoff,
    /// after which a worker checks for shutdown before calling.
    called: bool,
    /// Its first attempt failed in a pipelined lease (see `State::job_after_lease`), and its
    /// worker has not recorded yet whether it is retried: it counts in the main lane's
    /// `retrying` meanwhile, so that no other worker starts an item after it, which its
    /// retry would not have been in flight with.
    holding: bool,
}

/// The lane `id` names in `main` or `lanes` (see `Lease::lane`), there while leased.
fn lane_mut<'a, T, R>(
    main: &'a mut Lane<T, R>,
    lanes: &'a mut HashMap<Arc<str>, Lane<T, R>>,
    id: &Option<Arc<str>>,
) -> &'a mut Lane<T, R> {
    match id {
        None => main,
        Some(id) => lanes.get_mut(id).expect("a leased lane is kept"),
    }
}

/// Keyed mode: the lane `id` in `lanes`, made if there is none, from the `spare` queue
/// allocation (see `State::spare_queue`). Apart from `State`, so that its other fields stay
/// free while the lane is borrowed.
fn keyed_lane<'a, T, R>(
    lanes: &'a mut HashMap<Arc<str>, Lane<T, R>>,
    spare: &mut VecDeque<Queued<T, R>>,
    id: Arc<str>,
) -> &'a mut Lane<T, R> {
    lanes
        .entry(id)
        .or_insert_with(|| Lane::with_queue(std::mem::take(spare)))
}

/// A lane found by `State::lane_of`, with its id in keyed mode.
type LaneOf<'a, T, R> = (&'a mut Lane<T, R>, Option<Arc<str>>);

/// Counters that satisfy `accepted = delivered + failed + dropped + queued + in_flight`
/// whenever the lock is released.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    accepted: u64,
    delivered: u64,
    failed: u64,
    retried: u64,
    dropped: u64,
    queued: u64,
    in_flight: u64,
    paused_lanes: u64,
    /// Queued items that sit in paused lanes: `flush` does not wait for them.
    paused_items: u64,
}

/// Who is waiting for what, so that a state change only pays for a wake-up (a
/// syscall) when somebody is actually waiting.
/// (Idle workers are counted in the intake, where sends look for them.)
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    pub(crate) blocked_senders: usize,
    pub(crate) async_senders: usize,
    pub(crate) flushers: usize,
}

pub(crate) struct State<T, R> {
    keyed: bool,
    capacity: u64,
    /// The only lane in strict and pipelined mode (named `""`).
    main: Lane<T, R>,
    /// Keyed mode: one lane per key, removed when empty so memory follows the queue.
    lanes: HashMap<Arc<str>, Lane<T, R>>,
    /// Keyed mode: the largest queue allocation of a lane removed so far, empty, for the next
    /// lane made. A burst into one key grows its lane's queue to the burst's size, and the
    /// lane is removed once it drained: without this, every burst would allocate (and fault
    /// in) that memory again, which the only lane of strict and pipelined mode keeps.
    spare_queue: VecDeque<Queued<T, R>>,
    /// Keyed mode: lanes that may have a runnable item, oldest first (entries may be
    /// stale; `next_job` re-checks each one).
    ready: VecDeque<Arc<str>>,
    /// The lane of keyless items in keyed mode, allocated once.
    empty_key: Arc<str>,
    /// What each worker is delivering, so shutdown can settle those receipts too.
    in_flight_nodes: Vec<Option<InFlight<T, R>>>,
    /// Workers whose thread waits, from inside their sink call or a receipt callback, in a
    /// call to this conveyor (a blocking send, a flush, a close): they deliver nothing
    /// meanwhile (see `others_can_progress`).
    waiting_inside: Vec<bool>,
    waiting_inside_count: usize,
    /// Settlements each worker took out of the state whose receipts it has not settled yet
    /// (outside the lock); `flush` waits for them too.
    pub(crate) settling_by: Vec<u64>,
    limiter: Option<RateLimiter>,
    counters: Counters,
    pub(crate) waiters: Waiters,
    /// No more items are accepted; workers exit once nothing is runnable.
    pub(crate) closed: bool,
    /// `stop_timeout`: workers finish their current item and take no other.
    pub(crate) stopping: bool,
    /// The drain deadline passed: workers exit after their current call.
    pub(crate) abandoned: bool,
    pub(crate) live_workers: usize,
    /// Workers registered idle in the intake (a copy, so that a worker holding this lock
    /// knows whether to look there).
    pub(crate) idle_workers: usize,
    /// A journal's unsettled items are being loaded (in seq order, as room frees up): new
    /// items wait, so that nothing new overtakes an old item of its lane.
    pub(crate) replaying: bool,
    /// With a journal: the highest seq reserved in it (see `Durable::seq_limit`); accepting
    /// beyond it waits as if the queue were full.
    pub(crate) seq_limit: Option<Arc<AtomicU64>>,
    /// The buffers `Shared::drain` moves the intake's items through, kept between drains.
    pub(crate) drained: Batch<T, R>,
    /// Per worker, the lane's head items it runs without taking this lock between them.
    leases: Vec<Option<Lease<T, R>>>,
    /// Per worker, how many leases it took: with its claim counter, tells a worker standing
    /// by whether the lease it watches moved on (see `watched_lease`).
    lease_serials: Vec<u64>,
    /// A worker thread stands by, watching the watched lease (see `watched_lease`: the
    /// pipelined lane's, or a keyed one that keeps the lookout; `Shared::stand_by`).
    pub(crate) standby: bool,
    /// Where the watched lease stood when a worker standing by last saw it move.
    pub(crate) watch: Option<Watch>,
    /// The worker that keeps the lookout through its lease (see `IntakeLine::lookout` in
    /// `conveyor.rs`).
    pub(crate) lookout_leaser: Option<usize>,
    /// Most items a worker thread's lease may take (see `lease`): as many as the sink's last
    /// calls, on whichever worker, say fit in `worker::LEASE_TIME`. At 1 a worker takes one
    /// job per turn instead; it starts there, so a slow sink never holds a lease. One for all
    /// workers: each measuring its own, a worker woken for a quick sink's items started at 1
    /// and took them as jobs beside the others' in flight, which no lease may start beside
    /// (see `lease`), and the workers could go on that way for a whole burst, one job at a
    /// time each (one round of 100k items in ten on pipelined:16, 5-10x slower).
    pub(crate) lease_size: usize,
    /// How far each worker got through its lease (see `Shared::lease_claims`, the same
    /// counters), for `stats` and `room` to count the items it delivered since.
    pub(crate) lease_claims: LeaseClaims,
}

/// Where the watched lease stood (see `State::watched_lease`), and since when.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Watch {
    /// The lease's worker, and how many leases it took.
    pub(crate) lease: (usize, u64),
    /// Its claim counter (see `lease_progress`).
    pub(crate) claim: usize,
    pub(crate) since: Instant,
}

/// Each worker's claim counter for its lease (see `lease_progress`), apart from the state
/// lock: the worker moves it between the items of a lease, without the lock.
pub(crate) type LeaseClaims = Arc<[CachePadded<AtomicUsize>]>;

impl<T, R> State<T, R> {
    pub(crate) fn new(ordering: Ordering, capacity: usize, rate_limit: Option<u32>) -> Self {
        let workers = ordering.workers();
        Self {
            keyed: ordering.is_keyed(),
            capacity: capacity as u64,
            main: Lane::new(),
            lanes: HashMap::new(),
            spare_queue: VecDeque::new(),
            ready: VecDeque::new(),
            empty_key: Arc::from(""),
            in_flight_nodes: (0..workers).map(|_| None).collect(),
            waiting_inside: vec![false; workers],
            waiting_inside_count: 0,
            settling_by: vec![0; workers],
            limiter: rate_limit.map(RateLimiter::per_second),
            counters: Counters::default(),
            waiters: Waiters::default(),
            closed: false,
            stopping: false,
            abandoned: false,
            live_workers: workers,
            idle_workers: 0,
            replaying: false,
            seq_limit: None,
            drained: Batch::default(),
            leases: (0..workers).map(|_| None).collect(),
            lease_serials: vec![0; workers],
            standby: false,
            watch: None,
            lookout_leaser: None,
            lease_size: 1,
            lease_claims: (0..workers).map(|_| CachePadded::default()).collect(),
        }
    }

    /// Whether a new item, which would get seq `next_seq`, can be accepted now, and if
    /// not, why.
    pub(crate) fn room(&self, next_seq: u64) -> Room {
        let reservation_used_up = self
            .seq_limit
            .as_ref()
            .is_some_and(|limit| next_seq > limit.load(AtomicOrdering::Acquire));
        // Not the items of a lease delivered so far (see `Lease`).
        let queued = self.counters.queued - self.lease_delivered().0;
        if self.replaying || reservation_used_up {
            Room::Later
        } else if queued >= self.capacity {
            Room::Full
        } else {
            Room::Free
        }
    }

    /// Whether replay may load another item: items held in paused lanes do not count, or a
    /// paused lane's backlog would stop every other lane from being replayed.
    pub(crate) fn room_for_replay(&self) -> bool {
        self.counters.queued - self.counters.paused_items < self.capacity
    }

    /// Items not yet settled that `flush` waits for (not those held in paused lanes).
    /// While a journal is replayed, items not loaded yet count as one, so `flush` and `close`
    /// wait for the replay too.
    pub(crate) fn unsettled_unpaused(&self) -> u64 {
        self.counters.queued + self.counters.in_flight - self.counters.paused_items
            + u64::from(self.replaying)
    }

    /// Whether an item may start now (for another worker than the one asking).
    pub(crate) fn startable(&self) -> bool {
        if self.keyed {
            // Entries may be stale: at worst an idle worker wakes for nothing.
            !self.ready.is_empty()
        } else {
            self.main_runnable() && self.main.head_may_start()
        }
    }

    /// Records that `worker`'s thread starts (`true`) or stops waiting inside one of its
    /// own calls into this conveyor (see `others_can_progress`).
    pub(crate) fn set_waiting_inside(&mut self, worker: usize, waiting: bool) {
        if std::mem::replace(&mut self.waiting_inside[worker], waiting) != waiting {
            if waiting {
                self.waiting_inside_count += 1;
            } else {
                self.waiting_inside_count -= 1;
            }
        }
    }

    /// Whether a worker waits inside a call to this conveyor (whose answer may change with
    /// every step of the others).
    pub(crate) fn any_waiting_inside(&self) -> bool {
        self.waiting_inside_count > 0
    }

    /// Whether the workers that are not waiting inside a call to this conveyor can still
    /// settle an item or take one off the queue: one of them is in the middle of a job, or
    /// is free and an item may start. When none can, a worker waiting inside (for room, or
    /// for items to settle) would wait for itself, or for another waiting likewise.
    pub(crate) fn others_can_progress(&self) -> bool {
        let free = self.live_workers.saturating_sub(self.waiting_inside_count);
        let busy = self
            .in_flight_nodes
            .iter()
            .zip(&self.leases)
            .zip(&self.waiting_inside)
            .zip(&self.settling_by)
            .any(|(((job, lease), &waiting), &settling)| {
                (job.is_some() || lease.is_some() || settling > 0) && !waiting
            });
        free > 0 && (busy || self.startable_exactly())
    }

    /// Whether the item `seq` (of `key`), not settled yet, can neither start nor end before
    /// `worker` is done with the job it holds: it is that job, or it is behind it in a lane
    /// that runs one item at a time (the strict lane, a keyed lane). A lease of the pipelined
    /// lane holds only the items its worker reached (see `cut_when_waiting`).
    pub(crate) fn held_by(&self, worker: usize, seq: u64, key: Option<&Arc<str>>) -> bool {
        if let Some(reached) = self.cut_when_waiting(worker) {
            return reached
                .checked_sub(1)
                .and_then(|last| self.main.queue.get(last))
                .is_some_and(|last| seq <= last.node.seq());
        }
        // A lease's items wait for the item its worker runs, the first of them left, and so
        // does the rest of its lane.
        let lease = self.leases[worker].as_ref();
        let held = match (&self.in_flight_nodes[worker], lease) {
            (Some(held), _) => &held.node,
            // (Not a lease closed past all its items: the lane's head is another's.)
            (None, Some(lease)) if lease.len > 0 => {
                match self.lane_ref(&lease.lane).queue.front() {
                    Some(head) => &head.node,
                    None => return false,
                }
            }
            _ => return false,
        };
        let held_seq = held.seq();
        let one_at_a_time =
            self.keyed || self.in_flight_nodes.len() == 1 || lease.is_some_and(|l| !l.cut);
        seq == held_seq
            || (one_at_a_time && seq > held_seq && self.lane_id(key) == self.lane_id(held.key()))
    }

    /// As `startable`, without trusting stale entries of `ready`; and, in the pipelined lane,
    /// items that start once the lease ahead of them is cut (see `cut_when_waiting`).
    fn startable_exactly(&self) -> bool {
        if self.keyed {
            self.ready
                .iter()
                .any(|id| self.lanes.get(id).is_some_and(Lane::runnable_keyed))
        } else {
            self.startable()
                || self
                    .watched_lease()
                    .and_then(|(worker, _)| self.cut_when_waiting(worker))
                    .is_some_and(|reached| self.main.queue.len() > reached)
        }
    }

    /// For `worker`'s lease of the pipelined lane while the worker waits inside (in its sink
    /// call, or a receipt callback: see `others_can_progress`): how many of the lane's head
    /// items wait for it, those it claimed (the call or the receipt of the last may be
    /// running). It makes no move meanwhile, so the worker standing by cuts the lease after
    /// `conveyor::STANDBY` (see `Shared::stand_by`), and the other workers start the items
    /// after those. Counted as held, they made a quick sink that waited for an item it had
    /// just sent give up at once (or panic), where the same wait from a job got the outcome:
    /// since the lane leases even one item, that was any item of a quick sink sent alone.
    fn cut_when_waiting(&self, worker: usize) -> Option<usize> {
        let lease = self.leases[worker].as_ref()?;
        // Not cut or closed yet: the lease's items still head the lane, none taken off.
        if !self.pipelined() || lease.cut || lease.closed.is_some() || !self.waiting_inside[worker]
        {
            return None;
        }
        let claim = self.lease_claims[worker].load(AtomicOrdering::Acquire) & !LEASE_CLOSED;
        let (delivered, claimed) = lease_progress(claim);
        Some(delivered + usize::from(claimed))
    }

    /// Whether the main lane may hand out its head item: not paused, no retry pending, not
    /// leased.
    fn main_runnable(&self) -> bool {
        !self.main.paused && self.main.retrying == 0 && !self.main.leased
    }

    /// A retry's backoff holds items behind it that a worker could otherwise start.
    pub(crate) fn retry_pending(&self) -> bool {
        self.main.retrying > 0
    }

    /// Queued items not held in paused lanes (an upper bound on what may start now).
    pub(crate) fn runnable(&self) -> u64 {
        self.counters.queued - self.counters.paused_items
    }

    /// Nothing left for `flush` to wait for: every item settled (but those held in
    /// paused lanes) and every receipt told, but the `own` receipts the asking thread is
    /// settling itself (a callback that flushes cannot wait for its own return).
    pub(crate) fn quiescent(&self, own: u64) -> bool {
        self.unsettled_unpaused() == 0 && self.settling() <= own
    }

    /// What a shutdown waits for: `quiescent`, or under `stop_timeout` only the items in
    /// flight.
    pub(crate) fn shutdown_ready(&self, own: u64) -> bool {
        if self.stopping {
            self.counters.in_flight == 0 && self.settling() <= own
        } else {
            self.quiescent(own)
        }
    }

    /// Receipts taken out of the state and not settled yet, by all workers.
    fn settling(&self) -> u64 {
        self.settling_by.iter().sum()
    }

    /// Whether a waiting `flush` or shutdown should look again: the items are done, and only
    /// receipts may be left, which the waiter may be settling itself (it checks).
    pub(crate) fn flushers_may_go(&self) -> bool {
        if self.stopping {
            self.counters.in_flight == 0
        } else {
            self.unsettled_unpaused() == 0
        }
    }

    /// `flush` cannot make progress any more: shutdown abandoned the workers, or all left.
    pub(crate) fn stalled(&self) -> bool {
        self.abandoned || self.live_workers == 0
    }

    pub(crate) fn unsettled(&self) -> u64 {
        self.counters.queued + self.counters.in_flight + u64::from(self.replaying)
    }

    /// The items of leases their workers delivered so far (see `Lease`), though still in the
    /// lanes: counted as such by `stats` and `room`. Returns how many of them count as queued
    /// (an open lease's), and how many as in flight (the item a cut lease's worker claimed,
    /// once its call returned `Ok`: see `cut_lease`).
    fn lease_delivered(&self) -> (u64, u64) {
        let (mut queued, mut in_flight) = (0, 0);
        for (lease, claim) in self.leases.iter().zip(self.lease_claims.iter()) {
            let Some(lease) = lease else { continue };
            let claim = claim.load(AtomicOrdering::Acquire) & !LEASE_CLOSED;
            let delivered = lease_progress(claim).0;
            match lease.closed {
                // Never the item counted as in flight: the worker ends the lease when its
                // last item's call returns, without marking it delivered.
                None => queued += delivered.min(lease.len.saturating_sub(1)) as u64,
                Some(true) if lease.cut => in_flight += u64::from(delivered > lease.taken),
                // A shutdown reported what was left when it closed the lease.
                Some(_) => {}
            }
        }
        (queued, in_flight)
    }

    pub(crate) fn stats(&self) -> Stats {
        let mut c = self.counters;
        let (queued, in_flight) = self.lease_delivered();
        c.delivered += queued + in_flight;
        c.queued -= queued;
        c.in_flight -= in_flight;
        Stats {
            accepted: c.accepted,
            delivered: c.delivered,
            failed: c.failed,
            retried: c.retried,
            dropped: c.dropped,
            queued: c.queued,
            in_flight: c.in_flight,
            paused: c.paused_lanes,
        }
    }

    /// Items in the lanes (the fast path's capacity check keeps a copy, see `Intake`).
    pub(crate) fn queued(&self) -> u64 {
        self.counters.queued
    }

    /// Accepts an item, numbered already (by the intake, or by the journal for a replayed
    /// one), into its lane. Returns whether a worker may now have work.
    pub(crate) fn accept(&mut self, node: NodeRef<T, R>, attempt_limit: u32) -> bool {
        self.accept_all(std::iter::once(node), &[1], attempt_limit)
    }

    /// Accepts numbered items, in seq order, as `accept` does each, given as `runs` of items
    /// of one lane (their lengths, adding up to the items'; see `intake::Batch`): each run
    /// finds its lane once, from its first item. Returns whether a worker may now have work.
    pub(crate) fn accept_all(
        &mut self,
        nodes: impl IntoIterator<Item = NodeRef<T, R>>,
        runs: &[usize],
        attempt_limit: u32,
    ) -> bool {
        let mut nodes = nodes.into_iter();
        let mut runnable = false;
        for &len in runs {
            let first = nodes.next().expect("runs add up to the items");
            runnable |= self.enqueue_run(first, nodes.by_ref().take(len - 1), attempt_limit);
        }
        debug_assert!(nodes.next().is_none(), "runs add up to the items");
        runnable
    }

    /// The lane an item goes to: its key in keyed mode, `""` otherwise.
    pub(crate) fn lane_id(&self, key: Option<&Arc<str>>) -> Arc<str> {
        match key {
            Some(key) if self.keyed => key.clone(),
            _ => self.empty_key.clone(),
        }
    }

    /// Marks a lane paused before anything is accepted (a pause the journal remembers).
    ///
    /// A journal refuses to be reopened with the other kind of ordering while a lane is paused
    /// (`Journal::claim`), so a key's pause never reaches a strict or pipelined conveyor. Were
    /// it to, the one lane holding that key's items is paused: holding everything until a
    /// resume is better than sending the held item again unasked.
    pub(crate) fn restore_pause(&mut self, lane: &str) {
        let target = if !self.keyed {
            &mut self.main
        } else {
            keyed_lane(&mut self.lanes, &mut self.spare_queue, Arc::from(lane))
        };
        if !target.paused {
            target.paused = true;
            self.counters.paused_lanes += 1;
        }
    }

    /// Queues `first` and `more`, which go to the same lane, finding that lane once. Returns
    /// whether a worker may now have work.
    fn enqueue_run(
        &mut self,
        first: NodeRef<T, R>,
        more: impl Iterator<Item = NodeRef<T, R>>,
        attempt_limit: u32,
    ) -> bool {
        let job = |node| Queued {
            node,
            attempts: 0,
            attempt_limit,
        };
        let (lane, id) = if !self.keyed {
            (&mut self.main, None)
        } else {
            let id = self.lane_id(first.key());
            let lane = keyed_lane(&mut self.lanes, &mut self.spare_queue, id.clone());
            (lane, Some(id))
        };
        let before = lane.queue.len();
        lane.queue.push_back(job(first));
        // One reservation for the run, whose items are not read (see `intake.rs`) but in
        // tests.
        lane.queue.extend(more.map(|node| {
            debug_assert!(id.is_none() || same_lane(node.key(), id.as_ref()));
            job(node)
        }));
        let added = (lane.queue.len() - before) as u64;
        self.counters.accepted += added;
        self.counters.queued += added;
        if lane.paused {
            self.counters.paused_items += added;
        }
        let Some(id) = id else {
            return self.main_runnable();
        };
        if lane.runnable_keyed() && !lane.in_ready {
            lane.in_ready = true;
            self.ready.push_back(id);
            return true;
        }
        false
    }

    /// Counts a numbered item as accepted and dropped at once (the drop policies): it has
    /// a sequence number and a receipt like any other item, so the loss is visible.
    pub(crate) fn accept_dropped(&mut self) {
        self.counters.accepted += 1;
        self.counters.dropped += 1;
    }

    /// Counts an item taken over from the journal that failed before reaching a lane (it
    /// cannot be decoded as the item type, and became a dead letter).
    pub(crate) fn accept_failed(&mut self) {
        self.counters.accepted += 1;
        self.counters.failed += 1;
    }

    /// Removes the oldest queued item that is not held in a paused lane, counting it
    /// as dropped.
    pub(crate) fn drop_oldest(&mut self) -> Option<NodeRef<T, R>> {
        // A head behind an undecodable item is not the oldest: that item is, and it has no
        // receipt to drop it through.
        let job = if !self.keyed {
            // Never an item lent to the worker (no lease is made under `DropOldest`).
            if self.main.paused || self.main.leased || !self.main.head_may_start() {
                return None;
            }
            let job = self.main.queue.remove(self.main.next_index())?;
            let reached = self.main.reach_undecodable();
            self.count_reached(reached);
            job
        } else {
            // Only reached when full under DropOldest, so a scan over lane heads is fine.
            let oldest = self
                .lanes
                .iter()
                .filter(|(_, l)| !l.paused && !l.leased && l.head_may_start())
                .filter_map(|(id, l)| l.queue.front().map(|j| (j.node.seq(), id.clone())))
                .min_by_key(|(seq, _)| *seq)?
                .1;
            let lane = self.lanes.get_mut(&oldest)?;
            let job = lane.queue.pop_front()?;
            let reached = lane.reach_undecodable();
            if lane.is_done() {
                self.remove_lane(&oldest);
            }
            self.count_reached(reached);
            job
        };
        self.counters.queued -= 1;
        self.counters.dropped += 1;
        Some(job.node)
    }

    /// Takes the next item that may start, for `worker`, and marks it in flight.
    pub(crate) fn next_job(&mut self, worker: usize) -> Option<Job<T, R>> {
        let job = if !self.keyed {
            if !self.main_runnable() || !self.main.head_may_start() {
                return None;
            }
            let job = self.main.queue.remove(self.main.next_index())?;
            self.main.in_flight += 1;
            job.into()
        } else {
            self.take_from_next_keyed_lane(
                |_| true,
                |_, lane| {
                    lane.in_flight += 1;
                    lane.queue
                        .pop_front()
                        .expect("runnable lanes are not empty")
                        .into()
                },
            )?
        };
        Some(self.start(worker, job))
    }

    /// Keyed mode: `take`s from the oldest lane of `ready` that may run, dropping stale
    /// entries on the way, unless `may` does not let the caller take that lane: it then stays
    /// in `ready`, first.
    fn take_from_next_keyed_lane<X>(
        &mut self,
        may: impl Fn(&Lane<T, R>) -> bool,
        take: impl FnOnce(Arc<str>, &mut Lane<T, R>) -> X,
    ) -> Option<X> {
        loop {
            let id = self.ready.pop_front()?;
            let Some(lane) = self.lanes.get_mut(&id) else {
                continue;
            };
            lane.in_ready = false;
            if !lane.runnable_keyed() {
                continue;
            }
            if !may(lane) {
                lane.in_ready = true;
                self.ready.push_front(id);
                return None;
            }
            return Some(take(id, lane));
        }
    }

    /// Marks `job`, just taken off its lane, as `worker`'s job in flight.
    fn start(&mut self, worker: usize, mut job: Job<T, R>) -> Job<T, R> {
        self.counters.queued -= 1;
        self.counters.in_flight += 1;
        job.start_at = self.reserve_start();
        self.in_flight_nodes[worker] = Some(InFlight {
            node: job.node.clone(),
            // A worker first waits for a rate-limit slot, or for the item's journal append to
            // be committed (`seq_limit` is set with a journal), and checks for shutdown after.
            called: job.start_at.is_none() && self.seq_limit.is_none(),
            holding: false,
        });
        job
    }

    /// Lends `worker` up to `max` items from the head of the lane it would take its next job
    /// from (into `into`), if that lane may be leased (see `Lease`): not with a rate limit
    /// (each item would need its slot), nor past an undecodable item, nor a pipelined lane
    /// with an item in flight: that item could fail and be retried, and the lease overtake
    /// it.
    pub(crate) fn lease(
        &mut self,
        worker: usize,
        max: usize,
        into: &mut Vec<Leased<T, R>>,
    ) -> bool {
        into.clear();
        if self.limiter.is_some() || self.leases[worker].is_some() {
            return false;
        }
        let leasable = |lane: &Lane<T, R>| lane.undecodable.is_empty() && !lane.queue.is_empty();
        let mut lend = |lane: &mut Lane<T, R>| {
            let len = lane.queue.len().min(max);
            into.extend(lane.queue.iter().take(len).map(|job| Leased {
                node: job.node.as_ptr(),
                attempts: job.attempts,
                attempt_limit: job.attempt_limit,
            }));
            lane.in_flight += 1;
            lane.leased = true;
            len
        };
        let (id, len) = if !self.keyed {
            // Even one item: a pipelined lease wants a worker standing by (see
            // `watched_lease`), which may have to be woken, but one item taken as a job lets
            // other workers take the next ones as jobs beside it, and no lease may start
            // beside a job. A quick sink's workers then went on one job at a time each for
            // whole bursts (see `lease_size`).
            if self.main.in_flight > 0 || !leasable(&self.main) || !self.main_runnable() {
                return false;
            }
            (None, lend(&mut self.main))
        } else {
            match self.take_from_next_keyed_lane(leasable, |id, lane| (Some(id), lend(lane))) {
                Some(lent) => lent,
                None => return false,
            }
        };
        self.counters.queued -= 1;
        self.counters.in_flight += 1;
        self.leases[worker] = Some(Lease {
            lane: id,
            len,
            taken: 0,
            closed: None,
            settling: None,
            cut: false,
        });
        self.lease_serials[worker] += 1;
        true
    }

    /// Whether `worker` holds a lease (see `Lease`).
    pub(crate) fn leased(&self, worker: usize) -> bool {
        self.leases[worker].is_some()
    }

    /// The lane `id` names (see `Lease::lane`).
    fn lane_ref(&self, id: &Option<Arc<str>>) -> &Lane<T, R> {
        match id {
            None => &self.main,
            Some(id) => self.lanes.get(id).expect("a leased lane is kept"),
        }
    }

    /// Takes the first `done` items of `worker`'s lease off its lane, delivered, into
    /// `release` (their nodes drop outside the lock: an item's drop is user code). The lease's
    /// first item left, if any, now counts as in flight.
    fn take_delivered(&mut self, worker: usize, done: usize, release: &mut Vec<NodeRef<T, R>>) {
        let lease = self.leases[worker].as_mut().expect("a lease");
        assert!(done <= lease.len, "{done} of a lease of {}", lease.len);
        lease.len -= done;
        let lane = lane_mut(&mut self.main, &mut self.lanes, &lease.lane);
        release.extend(lane.queue.drain(..done).map(|job| job.node));
        self.counters.delivered += done as u64;
        if done > 0 && lease.len == 0 {
            // The one counted as in flight, and the others.
            self.counters.in_flight -= 1;
            self.counters.queued -= done as u64 - 1;
        } else {
            self.counters.queued -= done as u64;
        }
    }

    /// Ends `worker`'s lease: its first `done` items were delivered, and go into `release`
    /// (but those `close_lease` took already), in order; the others stay queued. Returns the
    /// lane's id in keyed mode.
    pub(crate) fn end_lease(
        &mut self,
        worker: usize,
        done: usize,
        release: &mut Vec<NodeRef<T, R>>,
    ) -> Option<Arc<str>> {
        let lease = self.leases[worker].as_mut().expect("a lease");
        let taken = lease.taken;
        if let Some(node) = lease.settling.take() {
            release.push(node);
            // Counted below with the others (see `Shared::after_lease`).
            self.settling_by[worker] -= 1;
        }
        self.take_delivered(worker, done - taken, release);
        let lease = self.leases[worker].take().expect("a lease");
        let lane = lane_mut(&mut self.main, &mut self.lanes, &lease.lane);
        if !lease.cut {
            lane.in_flight -= 1;
            lane.leased = false;
        } else if lease.closed == Some(true) {
            // The claimed item, which `take_delivered` took off the lane if it was delivered.
            lane.cut_head_ended();
            if lease.len > 0 && lane.paused {
                // Not delivered: held with the rest.
                self.counters.paused_items += 1;
            }
        }
        // As after a job (see `finish`), though leases are not made with a journal, which
        // alone brings undecodable items.
        let reached = lane.reach_undecodable();
        let next = lane.keyed_next();
        if lease.len > 0 {
            self.counters.queued += 1;
            self.counters.in_flight -= 1;
        }
        self.count_reached(reached);
        if let Some(id) = &lease.lane {
            self.apply_keyed(id.clone(), next);
        }
        lease.lane
    }

    /// After `worker`'s lease, ended by the failed first attempt of the item after its `done`
    /// delivered ones (see `end_lease`): takes that item as the worker's job, so that it is
    /// retried, fails or pauses its lane as any job does.
    pub(crate) fn job_after_lease(
        &mut self,
        worker: usize,
        done: usize,
        release: &mut Vec<NodeRef<T, R>>,
    ) -> Job<T, R> {
        let id = self.end_lease(worker, done, release);
        // Nothing else took the lane's head meanwhile: this holds the lock since the lease.
        let lane = lane_mut(&mut self.main, &mut self.lanes, &id);
        lane.in_flight += 1;
        let mut job: Job<T, R> = lane
            .queue
            .pop_front()
            .expect("the failed item heads its lane")
            .into();
        if lane.paused {
            // Paused while its cut lease ran (see `end_lease`): no longer held.
            self.counters.paused_items -= 1;
        }
        // The attempt that failed.
        job.attempts += 1;
        // Its lane's entry in `ready`, if `end_lease` made one, is stale now.
        let job = self.start(worker, job);
        if id.is_none() && self.pipelined() {
            // Until `schedule_retry` or `finish`: the lease held the items after it so far.
            self.main.retrying += 1;
            if let Some(job) = &mut self.in_flight_nodes[worker] {
                job.holding = true;
            }
        }
        job
    }

    /// For a shutdown that stops `worker` between the items of its lease: `claim` is how far
    /// it got when the lease was closed (see `lease_progress`). The items it delivered leave
    /// the lane, so that the shutdown's report and `unsettled_nodes` count only what is left:
    /// into `release` those whose receipts settled; the last one, if the worker may still be
    /// settling its receipt (with the reply: a close from that receipt's callback must not
    /// count it left), stays with the lease, its node alive for the worker, and counts as a
    /// receipt the worker settles (`settling_by`), which `flush` waits for.
    ///
    /// A lease cut while its worker was in the call of the item it claimed (see `cut_lease`)
    /// is closed again: that item too leaves the lane if its call has returned `Ok` since.
    pub(crate) fn close_lease(
        &mut self,
        worker: usize,
        claim: usize,
        release: &mut Vec<NodeRef<T, R>>,
    ) {
        let Some(lease) = &self.leases[worker] else {
            return;
        };
        let (delivered, claimed) = lease_progress(claim);
        let cut_head_delivered = lease.cut && lease.closed == Some(true) && delivered > lease.taken;
        if lease.closed.is_some() && !cut_head_delivered {
            return;
        }
        let before = release.len();
        let taken = lease.taken;
        self.take_delivered(worker, delivered - taken, release);
        let settling = if claimed || release.len() == before {
            None
        } else {
            release.pop()
        };
        let lease = self.leases[worker].as_mut().expect("checked above");
        if cut_head_delivered {
            // See `cut_lease`: the claimed item no longer heads the lane.
            lane_mut(&mut self.main, &mut self.lanes, &lease.lane).cut_head_ended();
        }
        lease.taken = delivered;
        lease.closed = Some(claimed && lease.len > 0);
        self.settling_by[worker] += u64::from(settling.is_some());
        lease.settling = settling;
    }

    /// The lease a worker stands by (see `Shared::stand_by`), as a call stuck in it would hold
    /// up more than its own item: its worker, and how many leases that worker took. In
    /// pipelined mode the lane's lease, which holds up every item behind it (see `cut_lease`);
    /// in keyed mode the lease that keeps the lookout (see `lease_may_keep_lookout`), which
    /// leaves the items sent meanwhile, other keys' too, in the intake, unseen.
    pub(crate) fn watched_lease(&self) -> Option<(usize, u64)> {
        let worker = if self.keyed {
            self.lookout_leaser?
        } else if self.pipelined() && self.main.leased {
            self.leases
                .iter()
                .position(|l| l.as_ref().is_some_and(|l| l.lane.is_none()))?
        } else {
            return None;
        };
        // A shutdown that closed it reports its items itself.
        self.leases[worker]
            .as_ref()?
            .closed
            .is_none()
            .then_some(())?;
        Some((worker, self.lease_serials[worker]))
    }

    /// Ends `worker`'s keeping of the lookout through its lease (see `lookout_leaser`), if
    /// it kept it; returns whether it did.
    pub(crate) fn lookout_lease_over(&mut self, worker: usize) -> bool {
        let kept = self.lookout_leaser == Some(worker);
        if kept {
            self.lookout_leaser = None;
        }
        kept
    }

    /// Whether `worker`'s lease, just made, may keep the lookout through its run (see
    /// `IntakeLine::lookout` in `conveyor.rs`): with other workers, one of which stands by it
    /// (see `watched_lease`), in pipelined and keyed mode; and not a lease of one item (see
    /// `wants_standby`), except in keyed mode in two cases: its worker runs the other ready
    /// lanes next (see `runs_ready_lanes_alone`; a worker is woken to stand by it unless one
    /// does), or a worker stands by already (which watches it with no wake-up). A producer
    /// pacing its sends to 16 keys (~2 us apart) made its worker take mostly leases of one
    /// item, each with no other lane ready once the worker had caught up: giving the lookout
    /// up for them, its next send woke an idle worker, whose wake-up cost it ~0.45 us a send
    /// (see BENCHMARKS.md).
    pub(crate) fn lease_may_keep_lookout(&self, worker: usize) -> bool {
        (self.leases_several(worker)
            || (self.keyed && (self.standby || self.runs_ready_lanes_alone())))
            && if self.keyed {
                self.leases.len() > 1
            } else {
                self.watched_lease().is_some()
            }
    }

    /// Whether a worker should be woken to stand by the watched lease (see `watched_lease`)
    /// if none does: outside keyed mode, not for a lease of one item, which keeps no lookout
    /// there. A call stuck
    /// in it holds up no item of its own lease, and the items sent meanwhile wake a worker
    /// (nobody holds the lookout for them), which then stands by it. A quick sink's items
    /// sent one at a time run as such leases (see `lease`): a worker woken to stand by each
    /// made a trickle of them cost a third more context switches. In keyed mode every lease
    /// that keeps the lookout is watched, and wants one: of one item, it keeps the lookout
    /// only while one stands by already, or while its worker leaves the other ready lanes to
    /// itself (see `runs_ready_lanes_alone`), which nobody else would start if a call in it
    /// got stuck.
    pub(crate) fn wants_standby(&self) -> bool {
        self.watched_lease()
            .is_some_and(|(worker, _)| self.keyed || self.leases_several(worker))
    }

    /// Whether the worker that just took a keyed lease runs the other ready lanes' items
    /// itself, one lease after another, rather than waking idle workers for them (see
    /// `Shared::pass_work_on`): the sink is quick enough for leases of several items (see
    /// `lease_size`), and every item queued (those of the lease but its first among them)
    /// fits in one lease, so the worker gets to them all within about twice
    /// `worker::LEASE_TIME`, plus a turn of the state lock for each lane. A producer sending
    /// to 16 keys in turn, ~2 us apart, made its worker wake another for 30-40% of the items
    /// that way: each woken worker ran an item or two, and its wake-up and sleep cost
    /// more than the items and took CPU from the producer (a send cost ~1.1 us, ~0.13 with
    /// this and the lookout kept through single-item leases, see `lease_may_keep_lookout`
    /// and BENCHMARKS.md). The price is the bound when a call in the lease gets stuck: the
    /// other lanes wait for the worker standing by (see `wants_standby`) to notice, one
    /// `conveyor::STANDBY` or two (if it watched an earlier lease when this one began),
    /// rather than for an idle worker to wake.
    pub(crate) fn runs_ready_lanes_alone(&self) -> bool {
        self.keyed
            && self.lease_size > 1
            && self.idle_workers > 0
            && self.startable()
            && self.counters.queued - self.counters.paused_items <= self.lease_size as u64
    }

    /// Whether `worker` holds a lease of more than one item.
    fn leases_several(&self, worker: usize) -> bool {
        self.leases[worker].as_ref().is_some_and(|l| l.len > 1)
    }

    /// One worker runs every lane (strict ordering, or a concurrency or `in_flight` of 1).
    pub(crate) fn lone_worker(&self) -> bool {
        self.leases.len() == 1
    }

    /// Several workers share the main lane.
    pub(crate) fn pipelined(&self) -> bool {
        !self.keyed && self.leases.len() > 1
    }

    /// Cuts `worker`'s lease, whose worker has not moved on for long (a call or a receipt
    /// callback stuck, see `Shared::stand_by`): it is closed, as by a shutdown (`claim` is how
    /// far the worker got, see `close_lease`), so the worker starts nothing after the item it
    /// claimed, and the lane's items after that one are no longer the lease's: other workers
    /// start them. The claimed item stays at the head of the lane, in flight, until the lease
    /// ends.
    pub(crate) fn cut_lease(
        &mut self,
        worker: usize,
        claim: usize,
        release: &mut Vec<NodeRef<T, R>>,
    ) {
        self.close_lease(worker, claim, release);
        let lease = self.leases[worker].as_mut().expect("a lease");
        let lane = lane_mut(&mut self.main, &mut self.lanes, &lease.lane);
        lease.cut = true;
        lane.leased = false;
        if lease.closed == Some(true) {
            // The others were counted as queued already.
            lease.len = 1;
            lane.cut_head = true;
        } else {
            lane.in_flight -= 1;
            let reached = lane.reach_undecodable();
            if lease.len > 0 {
                self.counters.in_flight -= 1;
                self.counters.queued += 1;
            }
            lease.len = 0;
            self.count_reached(reached);
        }
    }

    /// Reserves the next rate-limit slot from now, if a limit is set, and returns when it
    /// begins.
    pub(crate) fn reserve_start(&mut self) -> Option<Instant> {
        self.limiter
            .as_mut()
            .map(|limiter| limiter.reserve(Instant::now()))
    }

    /// Records that `worker`'s job will be retried after its backoff. Until `attempt_begins`,
    /// no item behind it starts: in pipelined mode other workers would otherwise overtake it.
    ///
    /// Its rate-limit slot is reserved only once the backoff is over (`reserve_start`): a
    /// slot reserved now for an hour away would push every later slot past it, and hold up
    /// the other keys for as long.
    pub(crate) fn schedule_retry(&mut self, worker: usize) {
        let mut counted = false;
        if let Some(job) = &mut self.in_flight_nodes[worker] {
            job.called = false;
            // Held since its lease ended (see `InFlight::holding`).
            counted = std::mem::take(&mut job.holding);
        }
        if !self.keyed && !counted {
            self.main.retrying += 1;
        }
    }

    /// The worker's job is past its wait for a rate-limit slot or (`retry`) a backoff:
    /// returns whether to hand it to the sink. Not once a shutdown abandoned it (it was
    /// reported closed), nor under `stop_timeout` after a wait for a slot (it never started;
    /// retries of calls in progress go on). A retry ends the hold on the items behind it
    /// (see `schedule_retry`), and is counted if it is made.
    pub(crate) fn attempt_begins(&mut self, worker: usize, retry: bool) -> bool {
        if retry && !self.keyed {
            self.main.retrying -= 1;
        }
        let go = !self.start_refused(retry);
        if go {
            if let Some(job) = &mut self.in_flight_nodes[worker] {
                job.called = true;
            }
            if retry {
                self.counters.retried += 1;
            }
        }
        go
    }

    /// Whether a job waiting for a rate-limit slot or (`retry`) a backoff may no longer
    /// start (see `attempt_begins`).
    pub(crate) fn start_refused(&self, retry: bool) -> bool {
        self.abandoned || (!retry && self.stopping)
    }

    /// Keyed mode: gives the lane `id` what `Lane::keyed_next` says it needs.
    fn apply_keyed(&mut self, id: Arc<str>, next: KeyedNext) {
        match next {
            KeyedNext::Ready => self.ready.push_back(id),
            KeyedNext::Remove => self.remove_lane(&id),
            KeyedNext::Stay => {}
        }
    }

    /// Removes a keyed lane that is done (see `Lane::is_done`), keeping its queue's
    /// allocation if it is the largest yet (see `spare_queue`).
    fn remove_lane(&mut self, id: &Arc<str>) {
        if let Some(lane) = self.lanes.remove(id) {
            if lane.queue.capacity() > self.spare_queue.capacity() {
                debug_assert!(lane.queue.is_empty());
                self.spare_queue = lane.queue;
            }
        }
    }

    /// The lane of `node`, with its id in keyed mode (the only lane needs none).
    fn lane_of(&mut self, node: &Node<T, R>) -> Option<LaneOf<'_, T, R>> {
        if !self.keyed {
            return Some((&mut self.main, None));
        }
        let id = node
            .key()
            .cloned()
            .unwrap_or_else(|| self.empty_key.clone());
        self.lanes.get_mut(&id).map(|lane| (lane, Some(id)))
    }

    /// Records how a job ended; returns the receipt to settle, if it settled.
    pub(crate) fn finish(
        &mut self,
        worker: usize,
        mut job: Job<T, R>,
        outcome: Outcome<R>,
    ) -> Option<Settlement<T, R>> {
        // The job's own node, put here by `next_job`: taking it back (rather than cloning
        // `job.node`) saves atomic operations on a cache line the producer may still use.
        let InFlight { node, holding, .. } = self.in_flight_nodes[worker]
            .take()
            .expect("a finished job is in flight");
        if holding {
            // Not retried: the items after it may start (see `InFlight::holding`).
            self.main.retrying -= 1;
        }
        self.counters.in_flight -= 1;
        let pause = matches!(outcome, Outcome::Paused);
        let result = match outcome {
            Outcome::Delivered(reply) => {
                self.counters.delivered += 1;
                Some(Ok(reply))
            }
            Outcome::Failed(error) => {
                self.counters.failed += 1;
                Some(Err(DeliveryError::Failed {
                    attempts: job.attempts,
                    error,
                }))
            }
            Outcome::Paused | Outcome::Interrupted => None,
        };
        let Some((lane, id)) = self.lane_of(&node) else {
            unreachable!("a lane with an item in flight is never removed");
        };
        lane.in_flight -= 1;
        let mut newly_held = 0;
        let requeued = result.is_none();
        if requeued {
            // Back at the head of its lane, unsettled: paused, or interrupted by shutdown.
            job.start_at = None;
            lane.put_back(job);
            if pause && !lane.paused {
                lane.paused = true;
                newly_held = lane.held();
            } else if lane.paused {
                newly_held = 1;
            }
        }
        let reached = lane.reach_undecodable();
        let next = lane.keyed_next();
        if let Some(id) = id {
            self.apply_keyed(id, next);
        }
        if requeued {
            self.counters.queued += 1;
        }
        self.counters.paused_items += newly_held;
        if pause {
            self.counters.paused_lanes = self.count_paused();
        }
        self.count_reached(reached);
        result.map(|result| (node, result))
    }

    /// Counts a lane that paused at an undecodable item (see `Lane::reach_undecodable`).
    fn count_reached(&mut self, held: Option<u64>) {
        if let Some(held) = held {
            self.counters.paused_items += held;
            self.counters.paused_lanes += 1;
        }
    }

    /// Takes over from the journal an item that cannot be decoded as the item type, under
    /// `OnFailure::Pause`: it keeps its place in its lane (the lane of `key`), counted as
    /// queued, and the lane pauses once nothing before it is left, as for an item that failed.
    /// Resuming the lane then makes it a dead letter (see `resume`).
    pub(crate) fn hold_undecodable(&mut self, key: Option<&Arc<str>>, seq: u64, error: String) {
        self.counters.accepted += 1;
        self.counters.queued += 1;
        let lane = if !self.keyed {
            &mut self.main
        } else {
            let id = self.lane_id(key);
            keyed_lane(&mut self.lanes, &mut self.spare_queue, id)
        };
        lane.undecodable.push_back(Undecodable { seq, error });
        let held_already = lane.paused;
        let reached = lane.reach_undecodable();
        if held_already {
            self.counters.paused_items += 1;
        }
        self.count_reached(reached);
    }

    fn count_paused(&self) -> u64 {
        if self.keyed {
            self.lanes.values().filter(|l| l.paused).count() as u64
        } else {
            u64::from(self.main.paused)
        }
    }

    /// Unpauses `lane` and gives its head item a fresh retry budget of `attempts`; `None` if the
    /// lane was not paused. A lane paused at an undecodable item gives that item up: it is
    /// returned, to become a dead letter, and counted as failed.
    pub(crate) fn resume(&mut self, lane: &str, attempts: u32) -> Option<Option<Undecodable>> {
        let (target, id) = if !self.keyed {
            if !lane.is_empty() {
                return None;
            }
            (&mut self.main, self.empty_key.clone())
        } else {
            match self.lanes.get_key_value(lane) {
                Some((id, _)) => {
                    let id = id.clone();
                    (self.lanes.get_mut(&id).expect("just found"), id)
                }
                None => return None,
            }
        };
        if !target.paused {
            return None;
        }
        target.paused = false;
        let held = target.held();
        // Paused where an undecodable item stands (not by a failure before it): the operator
        // lets it go.
        let given_up = if target.in_flight == 0 && !target.head_may_start() {
            target.undecodable.pop_front()
        } else {
            None
        };
        // The items that failed: the head, and in pipelined mode the others that were in
        // flight with it (items never tried still have their whole budget). Not a cut
        // lease's claimed item, in flight at the head (see `Lane::cut_head`), whose
        // attempts, here as the lease found them, would end the search before them.
        let next = target.next_index();
        for job in target
            .queue
            .iter_mut()
            .skip(next)
            .take_while(|job| job.attempts > 0)
        {
            job.attempt_limit = job.attempts.saturating_add(attempts);
        }
        let reached = target.reach_undecodable();
        let next = target.keyed_next();
        if self.keyed {
            self.apply_keyed(id, next);
        }
        if given_up.is_some() {
            self.counters.queued -= 1;
            self.counters.failed += 1;
        }
        self.counters.paused_items -= held;
        self.counters.paused_lanes -= 1;
        self.count_reached(reached);
        Some(given_up)
    }

    pub(crate) fn paused_lanes(&self) -> Vec<String> {
        if !self.keyed {
            return if self.main.paused {
                vec![String::new()]
            } else {
                Vec::new()
            };
        }
        let mut names: Vec<String> = self
            .lanes
            .iter()
            .filter(|(_, l)| l.paused)
            .map(|(id, _)| id.to_string())
            .collect();
        names.sort();
        names
    }

    /// Every item not settled yet (queued, held, or in flight), with whether its sink call
    /// may have begun, for shutdown to report. The items stay where they are.
    pub(crate) fn unsettled_nodes(&self) -> Vec<(NodeRef<T, R>, bool)> {
        // The item a closed lease's worker had claimed, at the head of its lane: its call may
        // have begun.
        let claimed = |lane: Option<&Arc<str>>| {
            self.leases
                .iter()
                .flatten()
                .any(|l| l.closed == Some(true) && l.lane.as_ref() == lane)
        };
        let lanes = self.lanes.iter().map(|(id, lane)| (lane, Some(id)));
        let queued = lanes.chain([(&self.main, None)]).flat_map(|(lane, id)| {
            let claimed = claimed(id);
            lane.queue
                .iter()
                .enumerate()
                .map(move |(i, j)| (j.node.clone(), claimed && i == 0))
        });
        let in_flight = self
            .in_flight_nodes
            .iter()
            .flatten()
            .map(|job| (job.node.clone(), job.called));
        queued.chain(in_flight).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type S = State<u32, ()>;

    /// An item numbered as the intake would: the tests send 1, 2, 3... in order.
    fn node(key: Option<&str>, seq: u32) -> NodeRef<u32, ()> {
        let node = crate::slab::Slab::new(crate::receipt::NodeContext::for_tests())
            .alloc(|head| Node::new(head, key.map(Arc::from), seq));
        node.set_seq(u64::from(seq));
        node
    }

    fn check_invariant(s: &S) {
        let st = s.stats();
        assert_eq!(
            st.accepted,
            st.delivered + st.failed + st.dropped + st.queued + st.in_flight,
            "{st:?}"
        );
    }

    /// A lane, with its id in keyed mode.
    type LaneRef<'a> = (&'a Lane<u32, ()>, Option<&'a Arc<str>>);

    fn lanes(s: &S) -> Vec<LaneRef<'_>> {
        if s.keyed {
            s.lanes.iter().map(|(id, l)| (l, Some(id))).collect()
        } else {
            vec![(&s.main, None)]
        }
    }

    /// The pause counters agree with the lanes: `paused_items` is what the paused lanes hold
    /// (undecodable items too), `paused_lanes` how many there are.
    fn check_pauses(s: &S) {
        let lanes = lanes(s);
        let paused = lanes.iter().map(|(l, _)| l).filter(|l| l.paused);
        let held: usize = paused
            .clone()
            // Not a cut lease's claimed item, in flight at the head.
            .map(|l| l.queue.len() - usize::from(l.cut_head) + l.undecodable.len())
            .sum();
        assert_eq!(
            (s.counters.paused_items, s.counters.paused_lanes),
            (held as u64, paused.count() as u64),
            "{:?}",
            s.counters
        );
    }

    /// A real failure before an undecodable item pauses the lane for that failure: the
    /// undecodable item is held with it (`flush` does not wait for it), the resume retries
    /// the failed item rather than giving the undecodable one up, and the lane pauses again
    /// when it reaches the undecodable one.
    #[test]
    fn a_failure_before_an_undecodable_item_pauses_for_the_failure() {
        for ordering in [Ordering::Strict, Ordering::Pipelined { in_flight: 2 }] {
            let mut s = S::new(ordering, 10, None);
            s.accept(node(None, 1), 1);
            s.hold_undecodable(None, 2, "bad".into());
            s.accept(node(None, 3), 1);
            let mut job = s.next_job(0).expect("the first item starts");
            assert!(
                s.next_job(1).is_none(),
                "{ordering:?}: not past the undecodable"
            );
            job.attempts = 1;
            assert!(s.finish(0, job, Outcome::Paused).is_none());
            check_invariant(&s);
            check_pauses(&s);
            assert_eq!(s.unsettled_unpaused(), 0, "{ordering:?}");
            let resumed = s.resume("", 1).expect("was paused");
            assert!(
                resumed.is_none(),
                "{ordering:?}: the failed item is retried"
            );
            check_pauses(&s);
            let job = s.next_job(0).expect("the failed item again");
            assert_eq!(job.node.seq(), 1);
            assert!(s.finish(0, job, Outcome::Delivered(())).is_some());
            check_invariant(&s);
            check_pauses(&s);
            assert_eq!(
                s.paused_lanes(),
                [""],
                "{ordering:?}: held at the undecodable"
            );
            assert_eq!(s.resume("", 1).unwrap().unwrap().seq, 2);
            check_pauses(&s);
            assert_eq!(s.next_job(0).map(|job| job.node.seq()), Some(3));
        }
    }

    /// A step of `undecodable_items_hold_their_place`, on lane `lane` (of `LANES`) or worker
    /// `worker` (modulo the workers there are).
    #[derive(Debug, Clone)]
    enum Step {
        Accept {
            lane: usize,
        },
        HoldUndecodable {
            lane: usize,
        },
        Start {
            worker: usize,
        },
        Finish {
            worker: usize,
            outcome: u8,
        },
        ScheduleRetry {
            worker: usize,
        },
        RetryBegins {
            worker: usize,
        },
        Resume {
            lane: usize,
        },
        DropOldest,
        Lease {
            worker: usize,
            max: usize,
        },
        /// The worker delivers `done` more items of its lease (see `lease_progress`).
        Progress {
            worker: usize,
            done: usize,
        },
        /// A shutdown closes the lease, the worker having claimed its next item or not.
        CloseLease {
            worker: usize,
            claimed: bool,
        },
        /// The lease ends, after the items delivered, or with a failure of the next one.
        EndLease {
            worker: usize,
            fail: bool,
        },
        /// A worker standing by cuts the pipelined lane's lease, whose worker claimed its next
        /// item or not.
        Cut {
            claimed: bool,
        },
    }

    const LANES: [Option<&str>; 3] = [None, Some("a"), Some("b")];

    fn ordering() -> impl proptest::strategy::Strategy<Value = Ordering> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Ordering::Strict),
            (1usize..4).prop_map(|n| Ordering::Pipelined { in_flight: n }),
            (1usize..4).prop_map(|n| Ordering::Keyed { concurrency: n }),
        ]
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0..LANES.len()).prop_map(|lane| Step::Accept { lane }),
            2 => (0..LANES.len()).prop_map(|lane| Step::HoldUndecodable { lane }),
            4 => (0..4usize).prop_map(|worker| Step::Start { worker }),
            4 => (0..4usize, 0..4u8).prop_map(|(worker, outcome)| Step::Finish { worker, outcome }),
            1 => (0..4usize).prop_map(|worker| Step::ScheduleRetry { worker }),
            1 => (0..4usize).prop_map(|worker| Step::RetryBegins { worker }),
            2 => (0..LANES.len()).prop_map(|lane| Step::Resume { lane }),
            1 => Just(Step::DropOldest),
            3 => (0..4usize, 1..5usize).prop_map(|(worker, max)| Step::Lease { worker, max }),
            2 => (0..4usize, 0..3usize).prop_map(|(worker, done)| Step::Progress { worker, done }),
            1 => (0..4usize, proptest::bool::ANY)
                .prop_map(|(worker, claimed)| Step::CloseLease { worker, claimed }),
            2 => (0..4usize, proptest::bool::ANY)
                .prop_map(|(worker, fail)| Step::EndLease { worker, fail }),
            1 => proptest::bool::ANY.prop_map(|claimed| Step::Cut { claimed }),
        ]
    }

    /// What must hold between two steps, beyond the counters: no lane is left unpaused with an
    /// undecodable item next and nothing running to pause it later, every keyed lane that may
    /// run is in `ready`, and no empty keyed lane is kept.
    fn check_lanes(s: &S) {
        check_invariant(s);
        check_pauses(s);
        for (lane, id) in lanes(s) {
            assert!(
                lane.paused
                    || lane.in_flight > 0
                    || lane.undecodable.is_empty()
                    || lane.head_may_start(),
                "lane {id:?} stands unpaused at an undecodable item"
            );
            let leases = s.leases.iter().flatten().filter(|l| l.lane.as_ref() == id);
            assert_eq!(
                usize::from(lane.leased),
                leases.filter(|l| !l.cut).count(),
                "lane {id:?}"
            );
            if let Some(id) = id {
                assert!(!lane.is_done(), "empty lane {id:?} kept");
                if lane.runnable_keyed() {
                    assert!(
                        lane.in_ready && s.ready.contains(id),
                        "lane {id:?} not ready"
                    );
                }
            }
        }
    }

    /// A lease as `undecodable_items_hold_their_place` sees it.
    #[derive(Default)]
    struct LeaseModel {
        lane: String,
        seqs: Vec<u64>,
        /// Items delivered so far.
        delivered: usize,
        /// Set once a shutdown closed the lease: whether the item after those delivered was
        /// claimed.
        closed: Option<bool>,
        /// Items taken off the lane by the close.
        released: Vec<u64>,
        /// Cut by a worker standing by.
        cut: bool,
    }

    /// The name of the lane of `node`.
    fn lane_name_of(keyed: bool, node: &Node<u32, ()>) -> &str {
        match node.key() {
            Some(key) if keyed => key,
            _ => "",
        }
    }

    proptest::proptest! {
        /// Random steps on the state with undecodable items among the others: the counters
        /// agree with the lanes, no item starts (or is dropped) past an undecodable item of its
        /// lane, a resume gives up only the undecodable item its lane stands at, and resuming
        /// every pause at the end settles everything. Lanes may start paused, as the journal
        /// restores them.
        #[test]
        fn undecodable_items_hold_their_place(
            ordering in ordering(),
            paused_at_start in proptest::collection::vec(proptest::bool::ANY, LANES.len()),
            steps in proptest::collection::vec(step(), 0..80),
        ) {
            let keyed = ordering.is_keyed();
            let workers = ordering.workers();
            let lane_name = |lane: usize| if keyed { LANES[lane].unwrap_or("") } else { "" };
            let mut s = S::new(ordering, 1000, None);
            // Pauses the journal remembers: each holds its lane at the lane's first item.
            for (lane, _) in paused_at_start.iter().enumerate().filter(|(_, &paused)| paused) {
                s.restore_pause(lane_name(lane));
            }
            let mut seq = 0u32;
            // Per lane name: the undecodable items not given up yet.
            let mut held: HashMap<&str, Vec<u64>> = HashMap::new();
            // Per worker: its job, and whether it waits out a retry's backoff.
            let mut jobs: Vec<Option<(Job<u32, ()>, bool)>> = (0..workers).map(|_| None).collect();
            // Per worker: its lease.
            let mut leases: Vec<Option<LeaseModel>> = (0..workers).map(|_| None).collect();
            let leased_lane = |leases: &[Option<LeaseModel>], lane: &str| {
                leases.iter().flatten().any(|l| l.lane == lane && !l.cut)
            };
            // The seq a job or lease of the main lane last started with: they start in order.
            let mut last_start = 0;
            let before_held = |held: &HashMap<&str, Vec<u64>>, lane: &str, seq: u64| {
                held.get(lane).and_then(|seqs| seqs.first()).is_some_and(|&first| first < seq)
            };
            for step in steps {
                match step {
                    Step::Accept { lane } => {
                        seq += 1;
                        s.accept(node(LANES[lane], seq), 1);
                    }
                    Step::HoldUndecodable { lane } => {
                        seq += 1;
                        let key = LANES[lane].map(Arc::from);
                        s.hold_undecodable(key.as_ref(), u64::from(seq), String::new());
                        held.entry(lane_name(lane)).or_default().push(u64::from(seq));
                    }
                    Step::Start { worker } => {
                        let worker = worker % workers;
                        if jobs[worker].is_none() && leases[worker].is_none() {
                            if let Some(job) = s.next_job(worker) {
                                let name = lane_name_of(keyed, &job.node);
                                proptest::prop_assert!(!leased_lane(&leases, name), "{name:?} is leased");
                                let claimed = leases.iter().flatten().any(|l| l.seqs.get(l.delivered) == Some(&job.node.seq()));
                                proptest::prop_assert!(!claimed, "{} is a lease's", job.node.seq());
                                if !keyed && job.attempts == 0 {
                                    proptest::prop_assert!(job.node.seq() > last_start, "{} after {last_start}", job.node.seq());
                                    last_start = job.node.seq();
                                }
                                proptest::prop_assert!(
                                    !before_held(&held, name, job.node.seq()),
                                    "seq {} of lane {name:?} started past an undecodable item", job.node.seq()
                                );
                                jobs[worker] = Some((job, false));
                            }
                        }
                    }
                    Step::ScheduleRetry { worker } => {
                        let worker = worker % workers;
                        if let Some((_, retrying @ false)) = &mut jobs[worker] {
                            *retrying = true;
                            s.schedule_retry(worker);
                        }
                    }
                    Step::RetryBegins { worker } => {
                        let worker = worker % workers;
                        if let Some((_, retrying @ true)) = &mut jobs[worker] {
                            *retrying = false;
                            proptest::prop_assert!(s.attempt_begins(worker, true));
                        }
                    }
                    Step::Finish { worker, outcome } => {
                        let worker = worker % workers;
                        if matches!(jobs[worker], Some((_, false))) {
                            let (mut job, _) = jobs[worker].take().unwrap();
                            job.attempts += 1;
                            let outcome = match outcome {
                                0 => Outcome::Delivered(()),
                                1 => Outcome::Failed(SinkError::permanent("no")),
                                2 => Outcome::Paused,
                                _ => Outcome::Interrupted,
                            };
                            s.finish(worker, job, outcome);
                        }
                    }
                    Step::Resume { lane } => {
                        let name = lane_name(lane);
                        if let Some(Some(given_up)) = s.resume(name, 1) {
                            let seqs = held.get_mut(name).expect("a held item was given up");
                            proptest::prop_assert_eq!(given_up.seq, seqs.remove(0));
                            let before = s.unsettled_nodes().into_iter().any(|(node, _)| {
                                lane_name_of(keyed, &node) == name && node.seq() < given_up.seq
                            });
                            proptest::prop_assert!(!before, "gave up {} with items before it", given_up.seq);
                        }
                    }
                    Step::DropOldest => {
                        if let Some(node) = s.drop_oldest() {
                            proptest::prop_assert!(!before_held(&held, lane_name_of(keyed, &node), node.seq()));
                            let lent = leases.iter().flatten().any(|l| l.seqs.contains(&node.seq()));
                            proptest::prop_assert!(!lent, "dropped {}, which is leased", node.seq());
                        }
                    }
                    Step::Lease { worker, max } => {
                        let worker = worker % workers;
                        let mut lent = Vec::new();
                        if jobs[worker].is_none() && leases[worker].is_none() && s.lease(worker, max, &mut lent) {
                            s.lease_claims[worker].store(0, AtomicOrdering::Relaxed);
                            // SAFETY: the lane keeps the leased items until the lease ends.
                            let nodes: Vec<&Node<u32, ()>> = lent.iter().map(|l| unsafe { l.node.as_ref() }).collect();
                            let name = lane_name_of(keyed, nodes[0]);
                            proptest::prop_assert!(nodes.len() <= max);
                            let in_flight = jobs.iter().flatten().any(|(job, _)| lane_name_of(keyed, &job.node) == name);
                            proptest::prop_assert!(!in_flight, "{name:?} leased with an item in flight");
                            let mut seqs = Vec::new();
                            if !keyed && lent[0].attempts == 0 {
                                proptest::prop_assert!(nodes[0].seq() > last_start);
                            }
                            for node in nodes {
                                proptest::prop_assert_eq!(lane_name_of(keyed, node), name);
                                proptest::prop_assert!(!before_held(&held, name, node.seq()));
                                proptest::prop_assert!(seqs.last().map_or(true, |&last| last < node.seq()));
                                seqs.push(node.seq());
                            }
                            leases[worker] = Some(LeaseModel { lane: name.to_owned(), seqs, ..LeaseModel::default() });
                        }
                    }
                    Step::Progress { worker, done } => {
                        if let Some(lease) = leases[worker % workers].as_mut().filter(|l| l.closed.is_none()) {
                            // The last item's call ends the lease instead (see `run_lease`).
                            lease.delivered = (lease.delivered + done).min(lease.seqs.len() - 1);
                            if let Some(&seq) = lease.seqs[..lease.delivered].last().filter(|_| !keyed) {
                                last_start = last_start.max(seq);
                            }
                            s.lease_claims[worker % workers].store(2 * lease.delivered, AtomicOrdering::Relaxed);
                        }
                    }
                    Step::CloseLease { worker, claimed } => {
                        let worker = worker % workers;
                        if let Some(lease) = leases[worker].as_mut().filter(|l| l.closed.is_none()) {
                            let claimed = claimed && lease.delivered < lease.seqs.len();
                            if claimed && !keyed {
                                last_start = last_start.max(lease.seqs[lease.delivered]);
                            }
                            lease.closed = Some(claimed);
                            let mut release = Vec::new();
                            s.close_lease(worker, 2 * lease.delivered + usize::from(claimed), &mut release);
                            lease.released.extend(release.iter().map(|n| n.seq()));
                        }
                    }
                    Step::Cut { claimed } => {
                        if let Some((worker, _)) = s.watched_lease() {
                            let lease = leases[worker].as_mut().expect("the watched lease is modelled");
                            proptest::prop_assert!(!keyed && workers > 1 && lease.closed.is_none() && !lease.cut);
                            let claimed = claimed && lease.delivered < lease.seqs.len();
                            if claimed {
                                last_start = last_start.max(lease.seqs[lease.delivered]);
                            }
                            lease.closed = Some(claimed);
                            lease.cut = true;
                            let mut release = Vec::new();
                            s.cut_lease(worker, 2 * lease.delivered + usize::from(claimed), &mut release);
                            lease.released.extend(release.iter().map(|n| n.seq()));
                            // Only the claimed item stays the lease's: the others may start.
                            lease.seqs.truncate(lease.delivered + usize::from(claimed));
                        }
                    }
                    Step::EndLease { worker, fail } => {
                        let worker = worker % workers;
                        if let Some(lease) = leases[worker].take() {
                            // Only a claimed item can fail; a close lets the worker claim no more.
                            let next = lease.closed.unwrap_or(lease.delivered < lease.seqs.len());
                            let mut release = Vec::new();
                            let done = if fail && next {
                                let job = s.job_after_lease(worker, lease.delivered, &mut release);
                                proptest::prop_assert_eq!(job.node.seq(), lease.seqs[lease.delivered]);
                                if !keyed {
                                    last_start = last_start.max(job.node.seq());
                                }
                                jobs[worker] = Some((job, false));
                                lease.delivered
                            } else {
                                // Unclosed, the worker runs the lease to its end.
                                let done = match lease.closed {
                                    Some(claimed) => lease.delivered + usize::from(claimed),
                                    None => lease.seqs.len(),
                                };
                                s.end_lease(worker, done, &mut release);
                                if let Some(&seq) = lease.seqs[..done].last().filter(|_| !keyed) {
                                    last_start = last_start.max(seq);
                                }
                                done
                            };
                            let mut released = lease.released;
                            released.extend(release.iter().map(|n| n.seq()));
                            proptest::prop_assert_eq!(&released[..], &lease.seqs[..done]);
                        }
                    }
                }
                check_lanes(&s);
            }
            // Every lease ends with what its worker delivered.
            for (worker, lease) in leases.iter_mut().enumerate() {
                if let Some(lease) = lease.take() {
                    s.end_lease(worker, lease.delivered, &mut Vec::new());
                }
            }
            // Everything settles once every job ends and every pause is resumed.
            for (worker, job) in jobs.iter_mut().enumerate() {
                if let Some((job, retrying)) = job.take() {
                    if retrying {
                        s.attempt_begins(worker, true);
                    }
                    s.finish(worker, job, Outcome::Delivered(()));
                }
            }
            for _ in 0..1000 {
                for name in s.paused_lanes() {
                    s.resume(&name, 1);
                }
                while let Some(job) = s.next_job(0) {
                    s.finish(0, job, Outcome::Delivered(()));
                }
                check_lanes(&s);
                if s.unsettled() == 0 {
                    break;
                }
            }
            proptest::prop_assert_eq!(s.unsettled(), 0);
            proptest::prop_assert_eq!(s.stats().paused, 0);
        }
    }

    /// A state of `ordering` with one item (of `key`) leased to worker 0.
    fn one_leased(ordering: Ordering, key: Option<&str>) -> S {
        let mut s = S::new(ordering, 10, None);
        s.accept(node(key, 1), 1);
        let mut items = Vec::new();
        assert!(s.lease(0, 8, &mut items));
        assert_eq!(items.len(), 1);
        s
    }

    /// Ends worker 0's lease of one item (see `one_leased`), delivered, and accepts two more.
    fn then_two_more(s: &mut S, key: Option<&str>) {
        s.end_lease(0, 1, &mut Vec::new());
        s.accept(node(key, 2), 1);
        s.accept(node(key, 3), 1);
    }

    /// One item in the pipelined lane is leased rather than taken as a job: other workers
    /// would take the items sent next as jobs beside it, and no lease may start beside a job.
    #[test]
    fn a_pipelined_lane_leases_even_one_item_but_not_beside_a_job() {
        let mut s = one_leased(Ordering::Pipelined { in_flight: 2 }, None);
        then_two_more(&mut s, None);
        let job = s.next_job(1).expect("a job");
        let mut items = Vec::new();
        assert!(!s.lease(0, 8, &mut items), "beside a job in flight");
        s.finish(1, job, Outcome::Delivered(()));
        assert!(s.lease(0, 8, &mut items));
        assert_eq!(items.len(), 1);
    }

    /// A lease of one item keeps no lookout and wants nobody woken to stand by it (the items
    /// sent meanwhile wake a worker, which stands by it: it is still watched); a lease of
    /// several does both.
    #[test]
    fn a_lease_of_one_item_keeps_no_lookout_and_wakes_nobody_to_stand_by() {
        let mut items = Vec::new();
        let mut s = one_leased(Ordering::Pipelined { in_flight: 2 }, None);
        assert!(
            s.watched_lease().is_some(),
            "watched: a worker that wakes stands by it"
        );
        assert!(!s.lease_may_keep_lookout(0));
        assert!(!s.wants_standby());
        then_two_more(&mut s, None);
        assert!(s.lease(0, 8, &mut items));
        assert!(s.lease_may_keep_lookout(0));
        assert!(s.wants_standby());

        let mut k = one_leased(Ordering::Keyed { concurrency: 2 }, Some("a"));
        assert!(!k.lease_may_keep_lookout(0));
        then_two_more(&mut k, Some("a"));
        assert!(k.lease(0, 8, &mut items));
        assert!(k.lease_may_keep_lookout(0));
    }

    /// A keyed state, with a quick sink's lease size of 4 and a worker idle, in which worker 0
    /// leased key `a`'s item 1 while keys `b` to `e` have one item each, and `extra` more
    /// items are queued for `b`.
    fn keyed_lease_beside(extra: u32) -> S {
        let mut s = S::new(Ordering::Keyed { concurrency: 3 }, 100, None);
        s.lease_size = 4;
        s.idle_workers = 1;
        for (seq, key) in (1..).zip(["a", "b", "c", "d", "e"]) {
            s.accept(node(Some(key), seq), 1);
        }
        for seq in 0..extra {
            s.accept(node(Some("b"), 10 + seq), 1);
        }
        let mut items = Vec::new();
        assert!(s.lease(0, 4, &mut items));
        assert_eq!(items.len(), 1);
        s
    }

    /// A worker that leased one key's item runs the other ready lanes itself when they hold
    /// no more than a lease's worth of a quick sink's items, keeping the lookout through the
    /// lease (of one item) and wanting a worker to stand by it; not when more are queued, the
    /// sink is slow, or nobody idle could be woken anyway. A keyed lease of one item also
    /// keeps the lookout while a worker stands by already.
    #[test]
    fn a_keyed_lease_runs_the_ready_lanes_alone_while_they_fit_in_a_lease() {
        let mut s = keyed_lease_beside(0);
        assert!(s.runs_ready_lanes_alone());
        assert!(s.lease_may_keep_lookout(0));
        s.lookout_leaser = Some(0);
        assert!(s.wants_standby(), "watched, though of one item");

        assert!(!keyed_lease_beside(1).runs_ready_lanes_alone(), "5 queued");
        let mut slow = keyed_lease_beside(0);
        slow.lease_size = 1;
        assert!(!slow.runs_ready_lanes_alone());
        assert!(!slow.lease_may_keep_lookout(0));
        let mut busy = keyed_lease_beside(0);
        busy.idle_workers = 0;
        assert!(!busy.runs_ready_lanes_alone());
        // With no other lane ready, a lease of one item keeps no lookout, as before, unless a
        // worker stands by already.
        let mut only = one_leased(Ordering::Keyed { concurrency: 3 }, Some("a"));
        only.lease_size = 4;
        only.idle_workers = 1;
        assert!(!only.runs_ready_lanes_alone());
        assert!(!only.lease_may_keep_lookout(0));
        only.standby = true;
        assert!(only.lease_may_keep_lookout(0));
        let mut pipelined = one_leased(Ordering::Pipelined { in_flight: 2 }, None);
        pipelined.standby = true;
        assert!(!pipelined.lease_may_keep_lookout(0), "keyed only");
    }

    /// A pipelined state with items 1 to 3 leased to worker 0.
    fn leased_pipelined() -> S {
        let mut s = S::new(Ordering::Pipelined { in_flight: 2 }, 10, None);
        for i in 1..=3 {
            s.accept(node(None, i), 1);
        }
        assert!(s.lease(0, 3, &mut Vec::new()));
        s
    }

    /// A lease cut while its worker settles the receipt of the item it delivered last (its
    /// callback stalled): `flush` waits for that receipt, as for any other, until the lease
    /// ends and hands the item's node to the worker to let go of.
    #[test]
    fn flush_waits_for_the_receipt_a_cut_leases_worker_settles() {
        let mut s = leased_pipelined();
        let mut release = Vec::new();
        // Item 1 delivered, its receipt settling (see `lease_progress`).
        s.cut_lease(0, 2, &mut release);
        assert!(release.is_empty(), "its node stays for the worker");
        while let Some(job) = s.next_job(1) {
            assert!(s.finish(1, job, Outcome::Delivered(())).is_some());
        }
        check_invariant(&s);
        assert_eq!(s.unsettled(), 0);
        assert!(!s.quiescent(0), "item 1's receipt has not settled");
        s.end_lease(0, 1, &mut release);
        assert_eq!(release.len(), 1);
        check_invariant(&s);
        assert!(s.quiescent(0));
    }

    /// A lease cut while its worker was in the call of the item it claimed: once that call
    /// returned `Ok`, `stats` counts the item delivered, and a shutdown that closes the lease
    /// (from that item's receipt callback, say) takes it off the lane as delivered, not left.
    #[test]
    fn a_cut_leases_claimed_item_counts_delivered_once_its_call_returned() {
        let mut s = leased_pipelined();
        let mut release = Vec::new();
        s.lease_claims[0].store(1 | LEASE_CLOSED, AtomicOrdering::Relaxed);
        s.cut_lease(0, 1, &mut release);
        let st = s.stats();
        assert_eq!((st.delivered, st.in_flight, st.queued), (0, 1, 2), "{st:?}");
        // Its call returned `Ok`: marked delivered before its receipt settles.
        s.lease_claims[0].store(2 | LEASE_CLOSED, AtomicOrdering::Relaxed);
        let st = s.stats();
        assert_eq!((st.delivered, st.in_flight, st.queued), (1, 0, 2), "{st:?}");
        s.close_lease(0, 2, &mut release);
        assert!(release.is_empty(), "its node stays for the worker");
        check_invariant(&s);
        check_lanes(&s);
        let left: Vec<_> = s
            .unsettled_nodes()
            .iter()
            .map(|(n, c)| (n.seq(), *c))
            .collect();
        assert_eq!(left, [(2, false), (3, false)]);
        assert_eq!(s.stats().delivered, 1);
        s.end_lease(0, 1, &mut release);
        assert_eq!(release.len(), 1);
        check_lanes(&s);
        assert_eq!(s.next_job(1).map(|job| job.node.seq()), Some(2));
    }

    /// The item that a pipelined lease's failed first attempt leaves to its worker as a job
    /// holds the items after it until its worker recorded the failure: no other worker starts
    /// one before its retry begins, or before it finished.
    #[test]
    fn a_failed_item_out_of_a_pipelined_lease_holds_the_items_after_it() {
        for retried in [true, false] {
            let mut s = leased_pipelined();
            let job = s.job_after_lease(0, 1, &mut Vec::new());
            assert_eq!(job.node.seq(), 2);
            assert!(
                s.next_job(1).is_none(),
                "item 3 before item 2's failure is recorded"
            );
            if retried {
                s.schedule_retry(0);
                assert!(s.next_job(1).is_none(), "item 3 before item 2's retry");
                assert!(s.attempt_begins(0, true));
            } else {
                s.finish(0, job, Outcome::Failed(SinkError::permanent("no")));
            }
            assert_eq!(s.next_job(1).map(|job| job.node.seq()), Some(3));
            check_invariant(&s);
        }
    }

    /// A resume while a cut lease's claimed item is still in flight at the head of the lane
    /// gives the item that failed behind it a fresh retry budget.
    #[test]
    fn a_resume_behind_a_cut_leases_claimed_item_renews_the_failed_items_budget() {
        let mut s = S::new(Ordering::Pipelined { in_flight: 2 }, 10, None);
        for i in 1..=3 {
            s.accept(node(None, i), 2);
        }
        assert!(s.lease(0, 3, &mut Vec::new()));
        // Stuck in the call of item 1, which it claimed.
        s.cut_lease(0, 1, &mut Vec::new());
        let mut job = s.next_job(1).expect("item 2 starts after the cut");
        assert_eq!(job.node.seq(), 2);
        job.attempts = 2;
        assert!(s.finish(1, job, Outcome::Paused).is_none());
        check_pauses(&s);
        assert!(s.resume("", 2).is_some());
        let job = s.next_job(1).expect("item 2 again");
        assert_eq!((job.node.seq(), job.attempts, job.attempt_limit), (2, 2, 4));
        check_invariant(&s);
    }

    #[test]
    fn strict_lane_is_fifo_with_seqs_from_one() {
        let mut s = S::new(Ordering::Strict, 10, None);
        for i in 0..3 {
            s.accept(node(None, i + 1), 1);
        }
        let mut seqs = Vec::new();
        while let Some(job) = s.next_job(0) {
            seqs.push(job.node.seq());
            assert!(s.finish(0, job, Outcome::Delivered(())).is_some());
            check_invariant(&s);
        }
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(s.stats().delivered, 3);
    }

    /// An undecodable item holds its place: what is before it runs, its lane pauses when it
    /// is next (and `flush` stops counting it), and a resume gives it up as failed.
    #[test]
    fn an_undecodable_item_pauses_its_lane_where_it_stands() {
        for ordering in [Ordering::Strict, Ordering::Pipelined { in_flight: 2 }] {
            let mut s = S::new(ordering, 10, None);
            s.accept(node(None, 1), 1);
            s.accept(node(None, 2), 1);
            s.hold_undecodable(None, 3, "bad".into());
            s.accept(node(None, 4), 1);
            check_invariant(&s);
            let mut seqs = Vec::new();
            while let Some(job) = s.next_job(0) {
                seqs.push(job.node.seq());
                assert!(s.finish(0, job, Outcome::Delivered(())).is_some());
                check_invariant(&s);
            }
            assert_eq!(seqs, [1, 2], "{ordering:?}");
            assert_eq!(s.paused_lanes(), [""], "{ordering:?}");
            assert_eq!(
                (s.stats().queued, s.unsettled_unpaused()),
                (2, 0),
                "{ordering:?}"
            );
            let given_up = s
                .resume("", 1)
                .expect("was paused")
                .expect("gave the item up");
            assert_eq!((given_up.seq, given_up.error.as_str()), (3, "bad"));
            check_invariant(&s);
            assert_eq!(s.stats().failed, 1);
            assert_eq!(
                s.next_job(0).map(|job| job.node.seq()),
                Some(4),
                "{ordering:?}"
            );
        }
    }

    /// Keyed: the lane of the undecodable item pauses at once when nothing is before it, the
    /// others go on, and a second undecodable item of the lane pauses it again after a resume.
    #[test]
    fn an_undecodable_item_holds_only_its_key() {
        let mut s = S::new(Ordering::Keyed { concurrency: 2 }, 10, None);
        let bad: Arc<str> = Arc::from("bad");
        s.hold_undecodable(Some(&bad), 1, "first".into());
        s.hold_undecodable(Some(&bad), 2, "second".into());
        s.accept(node(Some("bad"), 3), 1);
        s.accept(node(Some("ok"), 4), 1);
        check_invariant(&s);
        assert_eq!(s.paused_lanes(), ["bad"]);
        let job = s.next_job(0).expect("the other key runs");
        assert_eq!(job.node.seq(), 4);
        assert!(s.finish(0, job, Outcome::Delivered(())).is_some());
        assert!(s.next_job(0).is_none());
        let first = s.resume("bad", 1).unwrap().unwrap();
        assert_eq!(first.seq, 1);
        assert_eq!(s.paused_lanes(), ["bad"], "held again by the second");
        assert!(s.next_job(0).is_none());
        assert_eq!(s.resume("bad", 1).unwrap().unwrap().seq, 2);
        assert_eq!(s.next_job(0).map(|job| job.node.seq()), Some(3));
        check_invariant(&s);
        assert_eq!((s.stats().failed, s.stats().paused), (2, 0));
    }

    #[test]
    fn keyed_lane_runs_one_at_a_time_and_lanes_interleave() {
        let mut s = S::new(Ordering::Keyed { concurrency: 4 }, 10, None);
        s.accept(node(Some("a"), 1), 1);
        s.accept(node(Some("a"), 2), 1);
        s.accept(node(Some("b"), 3), 1);
        let a1 = s.next_job(0).unwrap();
        let b1 = s.next_job(1).unwrap();
        assert_eq!(
            (&**a1.node.key().unwrap(), &**b1.node.key().unwrap()),
            ("a", "b")
        );
        // a's second item waits for the first.
        assert!(s.next_job(2).is_none());
        s.finish(0, a1, Outcome::Delivered(()));
        let a2 = s.next_job(0).unwrap();
        assert_eq!(a2.node.seq(), 2);
        check_invariant(&s);
        s.finish(0, a2, Outcome::Delivered(()));
        s.finish(1, b1, Outcome::Delivered(()));
        assert!(s.lanes.is_empty(), "empty lanes are removed");
        check_invariant(&s);
    }

    #[test]
    fn a_removed_keyed_lane_leaves_its_queue_memory_to_the_next_lane() {
        const BURST: u32 = 100;
        let mut s = S::new(Ordering::Keyed { concurrency: 4 }, 1_000, None);
        let nodes = (1..=BURST).map(|seq| node(Some("a"), seq));
        s.accept_all(nodes, &[BURST as usize], 1);
        let grown = s.lanes[&Arc::from("a")].queue.capacity();
        assert!(grown >= BURST as usize);
        while let Some(job) = s.next_job(0) {
            s.finish(0, job, Outcome::Delivered(()));
        }
        assert!(s.lanes.is_empty(), "empty lanes are removed");
        s.accept(node(Some("b"), BURST + 1), 1);
        assert_eq!(
            s.lanes[&Arc::from("b")].queue.capacity(),
            grown,
            "the next burst does not allocate again"
        );
        check_invariant(&s);
        // A smaller queue does not replace the larger one kept.
        s.accept(node(Some("c"), BURST + 2), 1);
        for worker in [0, 1] {
            let job = s.next_job(worker).unwrap();
            s.finish(worker, job, Outcome::Delivered(()));
        }
        assert_eq!(s.spare_queue.capacity(), grown);
    }

    #[test]
    fn pause_holds_the_lane_and_resume_releases_it_in_order() {
        let mut s = S::new(Ordering::Keyed { concurrency: 2 }, 10, None);
        s.accept(node(Some("a"), 1), 1);
        s.accept(node(Some("a"), 2), 1);
        let mut job = s.next_job(0).unwrap();
        job.attempts = 1; // as the worker counts them
        assert!(s.finish(0, job, Outcome::Paused).is_none());
        assert_eq!(s.paused_lanes(), vec!["a".to_owned()]);
        assert_eq!(s.unsettled_unpaused(), 0);
        assert_eq!(s.stats().paused, 1);
        assert!(s.next_job(0).is_none());
        // Items sent to a paused lane are held too.
        s.accept(node(Some("a"), 3), 1);
        assert_eq!(s.unsettled_unpaused(), 0);
        assert!(s.resume("a", 3).is_some());
        assert!(s.resume("a", 3).is_none());
        let again = s.next_job(0).unwrap();
        assert_eq!(
            (again.node.seq(), again.attempts, again.attempt_limit),
            (1, 1, 4)
        );
        assert_eq!(s.unsettled_unpaused(), 3);
        check_invariant(&s);
    }

    #[test]
    fn drop_oldest_skips_paused_lanes_and_counts() {
        let mut s = S::new(Ordering::Keyed { concurrency: 2 }, 10, None);
        s.accept(node(Some("p"), 1), 1);
        let job = s.next_job(0).unwrap();
        s.finish(0, job, Outcome::Paused);
        s.accept(node(Some("q"), 2), 1);
        s.accept(node(Some("r"), 3), 1);
        let dropped = s.drop_oldest().unwrap();
        assert_eq!(dropped.seq(), 2);
        assert_eq!(s.stats().dropped, 1);
        check_invariant(&s);
    }

    #[test]
    fn put_back_keeps_sequence_order() {
        let mut s = S::new(Ordering::Pipelined { in_flight: 3 }, 10, None);
        for i in 0..4 {
            s.accept(node(None, i + 1), 1);
        }
        let j1 = s.next_job(0).unwrap();
        let j2 = s.next_job(1).unwrap();
        let j3 = s.next_job(2).unwrap();
        s.finish(2, j3, Outcome::Paused);
        s.finish(0, j1, Outcome::Paused);
        s.finish(1, j2, Outcome::Delivered(()));
        let order: Vec<u64> = s.main.queue.iter().map(|j| j.node.seq()).collect();
        assert_eq!(order, vec![1, 3, 4]);
        assert_eq!(s.unsettled_unpaused(), 0);
        check_invariant(&s);
    }
}
