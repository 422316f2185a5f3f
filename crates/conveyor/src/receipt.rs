//! One node per accepted item: the item, its identity, and the slot its result settles
//! into. [`Delivery`] and [`Receipt`] are two typed views of that node, each naming only
//! its own half of the node's type; the node lives in a chunk of the intake's slab
//! (`slab.rs`).

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::mem::{ManuallyDrop, MaybeUninit};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicU8, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::error::DeliveryError;
use crate::slab::{Counted, Erased, Head, Headed};

type Callback<R> = Box<dyn FnOnce(Result<R, DeliveryError>) + Send + 'static>;

/// An accepted item: what the sink sees and what the receipt waits on.
///
/// The item and its result share one node so that a send costs one slot of a chunk, not
/// an item box plus a channel (a fresh channel per item costs microseconds).
///
/// `#[repr(C)]` with [`About`] first: a [`Delivery`] (which does not name `R`) and a
/// [`Receipt`] (which does not name `T`) reach the identity through the node's start.
#[repr(C)]
pub(crate) struct Node<T, R> {
    about: About,
    slot: LazySlot<R>,
    item: T,
}

/// What every node starts with, whatever its item and reply types.
#[repr(C)]
struct About {
    /// First: see [`Headed`].
    head: Head,
    /// Assigned under the intake lock, after the node was made; the lock's release/acquire
    /// (or the state lock's, for replayed items) makes the store visible to every reader.
    seq: AtomicU64,
    key: Option<Arc<str>>,
    /// Where the lent delivery of this node stands (see [`Delivery::lend`]): [`LENT_OUT`] while
    /// it owns no count, [`LENT_OWNED`] once its worker gave it one, [`LENT_BACK`] otherwise.
    /// A node is made `LENT_OUT`, so that its loan (one at most) writes nothing into it.
    lent: AtomicU8,
}

/// See [`About::lent`].
const LENT_BACK: u8 = 0;
const LENT_OUT: u8 = 1;
const LENT_OWNED: u8 = 2;

thread_local! {
    /// The node whose delivery this thread's worker lent to the sink call it runs, until that
    /// delivery drops here or the call returns (see [`Delivery::lend`]).
    static LENT: Cell<*const Head> = const { Cell::new(std::ptr::null()) };
}

/// What every node of a conveyor can reach, shared rather than copied into each node.
pub(crate) struct NodeContext {
    /// Prefix of every `Delivery::idempotency_key`.
    pub(crate) id_prefix: Arc<str>,
    /// The conveyor whose workers deliver these nodes: a receipt waited for from inside one of
    /// them asks it whether another worker can still settle the item. Weak: the nodes, and this
    /// context with them, may outlive the conveyor, which owns the slab they come from.
    pub(crate) conveyor: Weak<dyn OwnWorkers>,
}

/// What a receipt waited for from code that one of its own conveyor's workers runs (its sink
/// call, or a receipt callback it settles) needs of that conveyor: that worker delivers nothing
/// while it waits, so it must not wait for what only it could do.
pub(crate) trait OwnWorkers: Send + Sync {
    /// Whether the calling thread runs code for one of this conveyor's live workers, and if so,
    /// whether it may wait for `item`: marked as waiting inside (see
    /// `State::others_can_progress`), `item` is not held up by the calling worker's own job,
    /// and anything else can still settle an item. Checked and marked under one lock, so that
    /// the others never see a mark that is about to be undone.
    fn start_waiting_inside(&self, item: Awaited<'_>) -> Inside;

    /// Whether the marked `worker` may go on waiting for `item`; if not, it is unmarked under
    /// the same lock.
    fn keep_waiting_inside(&self, worker: usize, item: Awaited<'_>) -> bool;

    /// Unmarks `worker`: its wait ended.
    fn stop_waiting_inside(&self, worker: usize);
}

/// The item a wait from inside is for: its lane and its place in it.
#[derive(Clone, Copy)]
pub(crate) struct Awaited<'a> {
    pub(crate) seq: u64,
    pub(crate) key: Option<&'a Arc<str>>,
}

/// What [`OwnWorkers::start_waiting_inside`] found.
pub(crate) enum Inside {
    /// The calling thread runs code for none of the conveyor's live workers: it waits as any
    /// thread does.
    Elsewhere,
    /// Nothing but the calling worker could settle an item: it must not wait.
    Hopeless,
    /// Marked as waiting inside: it waits, asking again now and then.
    Waiting(usize),
}

/// Stands for a conveyor in contexts that have none (unit tests).
#[cfg(test)]
struct NoConveyor;

#[cfg(test)]
impl OwnWorkers for NoConveyor {
    fn start_waiting_inside(&self, _item: Awaited<'_>) -> Inside {
        Inside::Elsewhere
    }

    fn keep_waiting_inside(&self, _worker: usize, _item: Awaited<'_>) -> bool {
        true
    }

    fn stop_waiting_inside(&self, _worker: usize) {}
}

#[cfg(test)]
impl NodeContext {
    /// A context for nodes made by unit tests.
    pub(crate) fn for_tests() -> Self {
        Self {
            id_prefix: Arc::from("test"),
            conveyor: Weak::<NoConveyor>::new(),
        }
    }
}

// SAFETY: `#[repr(C)]`, and `About`, itself `#[repr(C)]` with its `Head` first, comes first.
unsafe impl<T, R> Headed for Node<T, R> {
    type Context = NodeContext;
}

/// A counted reference to a node.
pub(crate) type NodeRef<T, R> = Counted<Node<T, R>>;

/// The identity of the node that starts at `node`.
///
/// # Safety
///
/// `node` starts a live [`Node`] (of any item and reply types).
unsafe fn about<'a>(node: NonNull<Head>) -> &'a About {
    node.cast::<About>().as_ref()
}

/// The context of the node that starts at `node`.
///
/// # Safety
///
/// As for [`about`].
unsafe fn context<'a>(node: NonNull<Head>) -> &'a NodeContext {
    about(node).head.context::<NodeContext>()
}

impl<T, R> Node<T, R> {
    /// A node made by the slab from `head` (see `Intake::alloc`).
    pub(crate) fn new(head: Head, key: Option<Arc<str>>, item: T) -> Self {
        Self {
            about: About {
                head,
                seq: AtomicU64::new(0),
                key,
                lent: AtomicU8::new(LENT_OUT),
            },
            slot: LazySlot::new(),
            item,
        }
    }

    pub(crate) fn set_seq(&self, seq: u64) {
        self.about.seq.store(seq, AtomicOrdering::Relaxed);
    }

    pub(crate) fn seq(&self) -> u64 {
        self.about.seq.load(AtomicOrdering::Relaxed)
    }

    pub(crate) fn into_item(self) -> T {
        self.item
    }

    pub(crate) fn key(&self) -> Option<&Arc<str>> {
        self.about.key.as_ref()
    }

    pub(crate) fn settle(&self, result: Result<R, DeliveryError>) {
        self.slot.settle(result);
    }

    /// Whether settling this node would tell nobody anything, so that it may be skipped: its
    /// receipt is gone (`node` is the only reference left), it left no callback, and the reply
    /// has nothing to drop. A receipt can no longer be made for it, nor a callback given, so the
    /// answer stays. A shutdown may still settle it (as closed) meanwhile: nobody sees that either.
    ///
    /// Skipping saves the slot's lock, two atomic operations per item on a line the producer
    /// wrote last, and a third of a strict worker's time with an instant sink.
    pub(crate) fn unheeded(node: &NodeRef<T, R>) -> bool {
        // The flag was set before the receipt's reference dropped, which the count's
        // Acquire load synchronizes with.
        !std::mem::needs_drop::<R>() && node.only_reference() && !node.slot.has_callback()
    }
}

/// A panic caught in user code.
pub(crate) type Panic = Box<dyn Any + Send>;

/// Settles the receipt of `node` with `result` and gives up this reference to it.
///
/// Both steps run user code (the receipt's callback or waker; the item's and the reply's
/// drops), so each one's panic is caught and returned, apart: a drop that panicked while a
/// callback's panic unwound would abort the process.
pub(crate) fn settle_and_release<T, R>(
    node: NodeRef<T, R>,
    result: Result<R, DeliveryError>,
) -> [Result<(), Panic>; 2] {
    match node.into_unique() {
        // The last reference, as for a receipt its sender dropped: nobody can look at the
        // slot any more, so it settles without its lock.
        Ok(mut node) => [
            catch_unwind(AssertUnwindSafe(|| node.slot.settle_unshared(result))),
            catch_unwind(AssertUnwindSafe(move || drop(node))),
        ],
        Err(node) => [
            catch_unwind(AssertUnwindSafe(|| node.settle(result))),
            catch_unwind(AssertUnwindSafe(move || drop(node))),
        ],
    }
}

enum SlotState<R> {
    Pending {
        waker: Option<Waker>,
        callback: Option<Callback<R>>,
        /// Lets `settle` skip the condvar syscall when no thread is blocked in `wait`.
        thread_waiting: bool,
    },
    Ready(Result<R, DeliveryError>),
    Taken,
}

impl<R> SlotState<R> {
    /// The outcome, taken out (the state becomes `Taken`), if the item has settled.
    ///
    /// # Panics
    ///
    /// If it was taken already, with the message `taken`.
    fn take_ready(&mut self, taken: &str) -> Option<Result<R, DeliveryError>> {
        match self {
            SlotState::Pending { .. } => None,
            SlotState::Taken => panic!("{taken}"),
            SlotState::Ready(_) => match std::mem::replace(self, SlotState::Taken) {
                SlotState::Ready(result) => Some(result),
                _ => unreachable!("matched Ready"),
            },
        }
    }
}

/// A node's [`Slot`], made only once somebody needs it: a receipt that waits, polls or leaves
/// a callback before its item settles, or a failure settled while the node is shared (its
/// receipt held, a shutdown's `Closed`, a drop policy's `Dropped`). A delivered item whose
/// receipt nobody asked yet keeps its reply here, inline, and a receipt dropped unasked never
/// needs a slot at all: a node is then one word and its reply instead of a whole slot (a mutex,
/// a condvar, room for a result, a waker and a callback: 64 bytes), which makes the node of a
/// `u64` item with `()` replies one cache line that the worker reads after the producer wrote
/// it.
///
/// `state` moves only forward: [`EMPTY`](Self::EMPTY) → [`WRITING`](Self::WRITING) →
/// [`SETTLED`](Self::SETTLED) → [`TAKEN`](Self::TAKEN), or → [`MOVING`](Self::MOVING) → a
/// slot; or from `EMPTY` to one of the failures that carry nothing ([`DROPPED`](Self::DROPPED),
/// [`CLOSED`](Self::CLOSED), [`UNCONFIRMED`](Self::UNCONFIRMED)), and on to `TAKEN`; or from
/// `EMPTY`, `TAKEN` or such a failure straight to a slot. The passing states, `WRITING` and
/// `MOVING`, last a copy of the reply (and its store into a slot allocated before, not yet
/// shared): they run no user code and wait for nothing, so whoever meets one waits it out.
struct LazySlot<R> {
    state: AtomicPtr<Slot<R>>,
    /// Written by the settler in `WRITING`, read by the thread that leaves `SETTLED` (the
    /// receipt's, or one settling a failure: see `MOVING`).
    reply: UnsafeCell<MaybeUninit<R>>,
}

// SAFETY: the reply is written once, by the one thread that moved `state` to `WRITING`, and
// read once, by the one that moved it from `SETTLED`, which the Release store of `SETTLED` and
// the Acquire exchange that leaves it order; it crosses threads as any `R: Send` does.
unsafe impl<R: Send> Sync for LazySlot<R> {}

/// What [`LazySlot::settle`] found: whether the result went in.
enum Settled<R> {
    Done,
    /// A slot is made: it takes the result (or ignores it, if it settled already).
    Slot(Result<R, DeliveryError>),
}

impl<R> LazySlot<R> {
    /// No slot and no reply yet.
    const EMPTY: *mut Slot<R> = std::ptr::null_mut();
    /// A settler is writing the reply.
    const WRITING: *mut Slot<R> = Self::sentinel(1);
    /// Delivered, with the reply in `reply`.
    const SETTLED: *mut Slot<R> = Self::sentinel(2);
    /// A thread that needs the slot (the receipt's, or one settling a failure) is moving the
    /// reply into a slot it made.
    const MOVING: *mut Slot<R> = Self::sentinel(3);
    /// Settled, and the receipt took the result.
    const TAKEN: *mut Slot<R> = Self::sentinel(4);
    /// Settled as [`DeliveryError::Dropped`], [`Closed`](DeliveryError::Closed) or
    /// [`Unconfirmed`](DeliveryError::Unconfirmed), which carry nothing: a drop policy under
    /// overload and a shutdown settle many at once, receipts held, and a slot for each doubled
    /// their cost.
    const DROPPED: *mut Slot<R> = Self::sentinel(5);
    const CLOSED: *mut Slot<R> = Self::sentinel(6);
    const UNCONFIRMED: *mut Slot<R> = Self::sentinel(7);
    /// The highest sentinel: anything above is a slot.
    const LAST_SENTINEL: *mut Slot<R> = Self::UNCONFIRMED;

    /// The state that records `error`, if it carries nothing.
    fn bare_failure(error: &DeliveryError) -> Option<*mut Slot<R>> {
        match error {
            DeliveryError::Dropped => Some(Self::DROPPED),
            DeliveryError::Closed => Some(Self::CLOSED),
            DeliveryError::Unconfirmed => Some(Self::UNCONFIRMED),
            DeliveryError::Failed { .. } => None,
        }
    }

    /// The failure `state` records, if it is one of those that carry nothing.
    fn failure_in(state: *mut Slot<R>) -> Option<DeliveryError> {
        match state {
            state if state == Self::DROPPED => Some(DeliveryError::Dropped),
            state if state == Self::CLOSED => Some(DeliveryError::Closed),
            state if state == Self::UNCONFIRMED => Some(DeliveryError::Unconfirmed),
            _ => None,
        }
    }

    /// Never the address of a slot: a slot's address is a non-zero multiple of its alignment,
    /// at least 8 (see `Slot`), and `n` is below that. Not `n` times the alignment: a reply
    /// aligned to a page made that several pages, where nothing but the allocator's habits
    /// kept a slot from being placed. Without provenance: never dereferenced.
    const fn sentinel(n: usize) -> *mut Slot<R> {
        std::ptr::null_mut::<Slot<R>>().wrapping_byte_add(n)
    }

    fn new() -> Self {
        Self {
            state: AtomicPtr::new(Self::EMPTY),
            reply: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    fn is_slot(state: *mut Slot<R>) -> bool {
        state > Self::LAST_SENTINEL
    }

    /// Waits out a passing state, and returns the next.
    #[cold]
    fn pass(&self, mut state: *mut Slot<R>) -> *mut Slot<R> {
        let mut spins = 0_u32;
        while state == Self::WRITING || state == Self::MOVING {
            if spins < 64 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
            state = self.state.load(AtomicOrdering::Acquire);
        }
        state
    }

    /// The slot, if made. Acquire: whatever its maker wrote into it is seen.
    fn made(&self) -> Option<&Slot<R>> {
        let state = self.state.load(AtomicOrdering::Acquire);
        // SAFETY: a slot made by `get`, which lives as long as this.
        Self::is_slot(state).then(|| unsafe { &*state })
    }

    /// The slot, made now if it was not: empty, holding the reply that was kept inline, or
    /// marked as taken.
    fn get(&self) -> &Slot<R> {
        let mut state = self.pass(self.state.load(AtomicOrdering::Acquire));
        loop {
            if Self::is_slot(state) {
                // SAFETY: made here, and lives as long as this.
                return unsafe { &*state };
            }
            let fresh = Slot::new();
            let to = Box::into_raw(Box::new(fresh));
            if state == Self::SETTLED {
                // The reply moves into the slot: one thread only, the one that leaves
                // `SETTLED`.
                match self.state.compare_exchange(
                    Self::SETTLED,
                    Self::MOVING,
                    AtomicOrdering::Acquire,
                    AtomicOrdering::Acquire,
                ) {
                    Ok(_) => {
                        // SAFETY: written before `SETTLED` was stored (Release), seen through
                        // the Acquire above, and read only here, once.
                        let reply = unsafe { (*self.reply.get()).assume_init_read() };
                        // SAFETY: `to` is not shared yet.
                        *unsafe { &*to }.lock() = SlotState::Ready(Ok(reply));
                        self.state.store(to, AtomicOrdering::Release);
                        // SAFETY: published, and lives as long as this.
                        return unsafe { &*to };
                    }
                    Err(now) => {
                        // SAFETY: from `Box::into_raw` above, never published.
                        drop(unsafe { Box::from_raw(to) });
                        state = self.pass(now);
                        continue;
                    }
                }
            }
            if state == Self::TAKEN {
                // SAFETY: `to` is not shared yet.
                *unsafe { &*to }.lock() = SlotState::Taken;
            } else if let Some(error) = Self::failure_in(state) {
                // SAFETY: `to` is not shared yet.
                *unsafe { &*to }.lock() = SlotState::Ready(Err(error));
            }
            // Release: the slot's contents are seen by whoever loads it (see `made`).
            match self.state.compare_exchange(
                state,
                to,
                AtomicOrdering::AcqRel,
                AtomicOrdering::Acquire,
            ) {
                // SAFETY: published, and lives as long as this.
                Ok(_) => return unsafe { &*to },
                Err(now) => {
                    // SAFETY: from `Box::into_raw` above, never published.
                    drop(unsafe { Box::from_raw(to) });
                    state = self.pass(now);
                }
            }
        }
    }

    /// Whether the item has settled; `None` if that takes the slot's lock.
    fn settled_without_lock(&self) -> Option<bool> {
        match self.state.load(AtomicOrdering::Acquire) {
            state if Self::is_slot(state) => None,
            state => Some(state != Self::EMPTY && state != Self::WRITING),
        }
    }

    /// The result, taken, if the item settled without a slot (delivered, its reply kept inline,
    /// or failed with nothing to keep); panics with `taken` if it was taken so. `None`
    /// otherwise: not settled, or settled into a slot.
    fn take_inline(&self, taken: &str) -> Option<Result<R, DeliveryError>> {
        let state = self.state.load(AtomicOrdering::Acquire);
        if state == Self::TAKEN {
            panic!("{taken}");
        }
        let failure = Self::failure_in(state);
        if state != Self::SETTLED && failure.is_none() {
            return None;
        }
        self.state
            .compare_exchange(
                state,
                Self::TAKEN,
                AtomicOrdering::Acquire,
                AtomicOrdering::Relaxed,
            )
            .ok()?;
        Some(match failure {
            Some(error) => Err(error),
            // SAFETY: written before `SETTLED` was stored, seen through the Acquire exchange
            // that left it, and read only here, once.
            None => Ok(unsafe { (*self.reply.get()).assume_init_read() }),
        })
    }

    fn has_callback(&self) -> bool {
        self.made()
            .is_some_and(|slot| slot.has_callback.load(AtomicOrdering::Relaxed))
    }

    /// Settles with `result` unless the item settled already (a later result, after a shutdown
    /// reported the item as closed, is ignored, as in `Slot::settle`). A reply is kept inline
    /// unless a slot was made: then nobody waits for it yet.
    fn settle(&self, result: Result<R, DeliveryError>) {
        if let Settled::Slot(result) = self.settle_inline(result) {
            self.get().settle(result);
        }
    }

    fn settle_inline(&self, result: Result<R, DeliveryError>) -> Settled<R> {
        let state = self.state.load(AtomicOrdering::Acquire);
        if Self::is_slot(state) {
            return Settled::Slot(result);
        }
        if state != Self::EMPTY {
            return Settled::Done; // settled already
        }
        // A reply is written in `WRITING`; a failure that carries nothing is its own mark; one
        // that carries something takes a slot: rare, and it keeps the inline room a reply's size.
        let mark = match &result {
            Ok(_) => Self::WRITING,
            Err(error) => match Self::bare_failure(error) {
                Some(mark) => mark,
                None => return Settled::Slot(result),
            },
        };
        // Release for a failure's mark, as a slot's lock would: what happened before the
        // settlement is seen by whoever sees it (a reply's is `SETTLED`, stored below).
        match self.state.compare_exchange(
            Self::EMPTY,
            mark,
            AtomicOrdering::AcqRel,
            AtomicOrdering::Acquire,
        ) {
            Ok(_) => {
                if let Ok(reply) = result {
                    // SAFETY: this thread moved the state to `WRITING`: nobody else writes or
                    // reads the reply until `SETTLED` is stored.
                    unsafe { (*self.reply.get()).write(reply) };
                    self.state.store(Self::SETTLED, AtomicOrdering::Release);
                }
                Settled::Done
            }
            Err(now) if Self::is_slot(now) => Settled::Slot(result),
            Err(_) => Settled::Done, // settled meanwhile
        }
    }

    /// As `settle`, for a node nobody else can reach.
    fn settle_unshared(&mut self, result: Result<R, DeliveryError>) {
        let state = *self.state.get_mut();
        if Self::is_slot(state) {
            // SAFETY: made by `get`, owned by this, which nobody else reaches.
            unsafe { &mut *state }.settle_unshared(result);
        }
        // Without a slot nobody can learn of it; settled already, it is ignored.
    }
}

impl<R> Drop for LazySlot<R> {
    fn drop(&mut self) {
        let state = *self.state.get_mut();
        if state == Self::SETTLED {
            // SAFETY: written before `SETTLED`, never read out.
            unsafe { self.reply.get_mut().assume_init_drop() };
        } else if Self::is_slot(state) {
            // SAFETY: made by `get` with `Box::into_raw`, owned by this.
            drop(unsafe { Box::from_raw(state) });
        }
    }
}

/// The panic of a receipt whose result was taken already.
const ALREADY_TAKEN: &str = "the receipt's result was already taken";

/// Settles exactly once; later settlements (a late sink result after a shutdown
/// deadline already reported the item as closed) are ignored.
///
/// Aligned to 8 at least, so that no address of one is a [`LazySlot`] sentinel (already so on
/// 64-bit targets, through the waker's pointers).
#[repr(align(8))]
struct Slot<R> {
    state: Mutex<SlotState<R>>,
    ready: Condvar,
    /// Set (under the lock) once a callback was given: the only thing a settlement must still
    /// do after the receipt is gone (see `Node::unheeded`).
    has_callback: AtomicBool,
}

impl<R> Slot<R> {
    fn new() -> Self {
        Self {
            state: Mutex::new(SlotState::Pending {
                waker: None,
                callback: None,
                thread_waiting: false,
            }),
            ready: Condvar::new(),
            has_callback: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlotState<R>> {
        // A panic while holding this lock cannot leave the state half-written (every
        // transition is a single assignment), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn settle(&self, result: Result<R, DeliveryError>) {
        let mut state = self.lock();
        let SlotState::Pending { .. } = &*state else {
            return;
        };
        let SlotState::Pending {
            waker,
            callback,
            thread_waiting,
        } = std::mem::replace(&mut *state, SlotState::Taken)
        else {
            unreachable!("checked above");
        };
        match callback {
            Some(callback) => {
                drop(state);
                callback(result);
            }
            None => {
                *state = SlotState::Ready(result);
                drop(state);
                if thread_waiting {
                    self.ready.notify_all();
                }
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
        }
    }

    /// As `settle`, for a slot nobody else can reach: no lock, and no waiting thread to tell.
    fn settle_unshared(&mut self, result: Result<R, DeliveryError>) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        // Settled already (a shutdown reported it closed): a late result is ignored, as in
        // `settle`. What is left in the slot drops with the node.
        if let SlotState::Pending {
            waker, callback, ..
        } = state
        {
            match callback.take() {
                Some(callback) => callback(result),
                None => {
                    // A future that polled the receipt and was dropped since: waking it is
                    // harmless, and what `settle` does.
                    drop(result);
                    if let Some(waker) = waker.take() {
                        waker.wake();
                    }
                }
            }
        }
    }
}

/// How long a wait from inside one of the conveyor's own workers sleeps before it asks again
/// whether another worker can still settle the item (see `Receipt::wait_inside`): it only
/// delays giving up, never a result.
const INSIDE_CHECK: Duration = Duration::from_millis(10);

/// A worker marked as waiting inside its own conveyor, unmarked when this drops (also when user
/// code around the wait unwinds).
struct WaitingInside<'a> {
    conveyor: &'a dyn OwnWorkers,
    worker: usize,
    item: Awaited<'a>,
    /// Still marked (`keep_waiting` unmarks as it says no).
    marked: bool,
}

impl WaitingInside<'_> {
    fn keep_waiting(&mut self) -> bool {
        self.marked = self.conveyor.keep_waiting_inside(self.worker, self.item);
        self.marked
    }
}

impl Drop for WaitingInside<'_> {
    fn drop(&mut self) {
        if self.marked {
            self.conveyor.stop_waiting_inside(self.worker);
        }
    }
}

#[cold]
fn wait_refused_inside() -> ! {
    panic!(
        "Receipt::wait would wait forever: it was called inside the conveyor's own sink call or \
         receipt callback, and no other worker can settle the item (only this worker could, \
         after this call returns); wait outside the sink, or use Receipt::on_settled or \
         Receipt::wait_timeout there instead"
    )
}

/// One item as handed to the sink, with its identity.
///
/// A `Delivery` is owned and `'static`, so an async sink can move it into its future.
/// Each attempt gets a fresh `Delivery` for the same item; [`Delivery::attempt`] tells
/// which one this is.
///
/// # Examples
///
/// ```
/// use conveyor::{Conveyor, Delivery};
///
/// let c: Conveyor<&'static str, String> = Conveyor::builder().build(|d: Delivery<&'static str>| {
///     Ok(format!("#{} {} (attempt {}, key {:?})", d.seq(), d.item(), d.attempt(), d.key()))
/// })?;
/// let receipt = c.send_keyed("user-42", "hello").unwrap();
/// assert_eq!(receipt.wait().unwrap(), "#1 hello (attempt 1, key Some(\"user-42\"))");
/// # Ok::<(), conveyor::BuildError>(())
/// ```
pub struct Delivery<T> {
    /// Owns a count of the node, unless `lent`.
    node: ManuallyDrop<Erased>,
    /// The item inside `node`, which `node` keeps alive.
    item: NonNull<T>,
    attempt: u32,
    /// The attempt after which a retryable failure fails the item for good (or pauses its lane).
    attempt_limit: u32,
    /// Made by [`Delivery::lend`]: owns a count only once its worker gave it one.
    lent: bool,
    /// Invariant in `T`, as the trait object it replaced was: no promise made by accident.
    _item: PhantomData<fn(T) -> T>,
}

// SAFETY: a delivery shares its item and may drop the node on another thread. Its
// constructors (`new`, `lend`) require an item that is `Send + Sync` and a reply that is `Send`, so
// every delivery that exists may go anywhere, as with the `Arc<dyn .. + Send + Sync>` it
// replaced (which kept these impls unconditional).
unsafe impl<T> Send for Delivery<T> {}
unsafe impl<T> Sync for Delivery<T> {}

impl<T: Send + Sync + 'static> Delivery<T> {
    pub(crate) fn new<R: Send + 'static>(
        node: &NodeRef<T, R>,
        attempt: u32,
        attempt_limit: u32,
    ) -> Self {
        Self::of(node, node.clone().erase(), false, attempt, attempt_limit)
    }

    /// A delivery of `node`'s item through `counted`, a reference to the same node that owns a
    /// count unless `lent`.
    fn of<R>(
        node: &NodeRef<T, R>,
        counted: Erased,
        lent: bool,
        attempt: u32,
        attempt_limit: u32,
    ) -> Self {
        Self {
            // Stays put while the node lives, which `counted` (or the lender) keeps it doing.
            item: NonNull::from(&node.item),
            node: ManuallyDrop::new(counted),
            attempt,
            attempt_limit,
            lent,
            _item: PhantomData,
        }
    }

    /// A delivery for one sink call on this thread that owns no count of the node: the two
    /// atomic operations of a count, on a line the producer wrote last, were a fifth of a
    /// strict worker's time with an instant sink. One dropped during the call on this thread
    /// (nearly all) costs nothing; one kept past the call gets a count from
    /// [`Delivery::take_back`], which the caller must call when the call returns, even by a
    /// panic. One dropped on another thread tells through the node, with one atomic operation.
    ///
    /// # Safety
    ///
    /// `node` stays alive until `take_back` returns, and was never lent before: its state is
    /// as it was made (see `About::lent`). A store there would be the worker's first write to a
    /// line the producer wrote last, which every locked instruction after it (the next item's
    /// claim) would wait for; and a second loan while a delivery kept from the first still
    /// lived would leave the two sharing one state.
    pub(crate) unsafe fn lend<R: Send + 'static>(
        node: &NodeRef<T, R>,
        attempt: u32,
        attempt_limit: u32,
    ) -> Self {
        let head = node.as_ptr().cast::<Head>();
        LENT.with(|lent| lent.set(head.as_ptr()));
        // SAFETY: counted by nobody; see `Drop` and `take_back`.
        let counted = unsafe { Erased::from_raw(head) };
        Self::of(node, counted, true, attempt, attempt_limit)
    }

    /// Ends the loan of [`Delivery::lend`] as its sink call returned: gives a delivery still
    /// alive a count of its own.
    pub(crate) fn take_back<R>(node: &NodeRef<T, R>) {
        let head = node.as_ptr().cast::<Head>().as_ptr().cast_const();
        if LENT.with(|lent| lent.replace(std::ptr::null())) != head {
            return; // dropped here during the call
        }
        // Kept, or dropped on another thread: a count for it, taken back if it dropped first.
        let count = node.clone();
        let kept = node.about.lent.compare_exchange(
            LENT_OUT,
            LENT_OWNED,
            AtomicOrdering::AcqRel,
            AtomicOrdering::Acquire,
        );
        if kept.is_ok() {
            std::mem::forget(count);
        }
    }
}

impl<T> Drop for Delivery<T> {
    fn drop(&mut self) {
        if self.lent {
            let head = self.node.as_ptr();
            if LENT.with(|lent| lent.get()) == head.as_ptr().cast_const() {
                // On the lending worker's thread, during the call: it sees this at once.
                LENT.with(|lent| lent.set(std::ptr::null()));
                return;
            }
            // Release: this delivery's uses happen before the worker lets the node go.
            if self.about().lent.swap(LENT_BACK, AtomicOrdering::AcqRel) != LENT_OWNED {
                return;
            }
        }
        // SAFETY: owned (see `lent`), and dropped once.
        unsafe { ManuallyDrop::drop(&mut self.node) }
    }
}

impl<T> Delivery<T> {
    fn about(&self) -> &About {
        // SAFETY: `node` is a live node, kept alive by this delivery.
        unsafe { about(self.node.as_ptr()) }
    }

    /// The item to deliver.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, Delivery};
    ///
    /// let c: Conveyor<String, usize> = Conveyor::builder().build(|d: Delivery<String>| {
    ///     let body: &String = d.item(); // borrowed: the item stays for a retry
    ///     Ok(body.len())
    /// })?;
    /// assert_eq!(c.send("hello".to_owned()).unwrap().wait().unwrap(), 5);
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn item(&self) -> &T {
        // SAFETY: the item lives as long as the node, which this delivery keeps alive, and
        // nobody mutates an accepted item.
        unsafe { self.item.as_ref() }
    }

    /// The item's sequence number: assigned when the item was accepted, increasing in
    /// submission order, starting at 1. With a journal they continue after the seqs it handed
    /// out or reserved before, so they never repeat within a journal (see
    /// [`Builder::journal`](crate::Builder::journal)).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    ///
    /// let c: Conveyor<&'static str, u64> = Conveyor::builder().build(|d| Ok(d.seq()))?;
    /// let first = c.send("a").unwrap();
    /// let second = c.send("b").unwrap();
    /// assert_eq!((first.wait().unwrap(), second.wait().unwrap()), (1, 2));
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn seq(&self) -> u64 {
        self.about().seq.load(AtomicOrdering::Relaxed)
    }

    /// The key the item was sent with ([`Conveyor::send_keyed`](crate::Conveyor::send_keyed)),
    /// if any.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    ///
    /// let c: Conveyor<u32, String> =
    ///     Conveyor::builder().build(|d| Ok(d.key().unwrap_or("no key").to_owned()))?;
    /// assert_eq!(c.send_keyed("eu-west", 1).unwrap().wait().unwrap(), "eu-west");
    /// assert_eq!(c.send(2).unwrap().wait().unwrap(), "no key");
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn key(&self) -> Option<&str> {
        self.about().key.as_deref()
    }

    /// Which attempt this is: 1 on the first try. Attempts are counted within one run of the
    /// process: an item a journal replays after a restart starts again at 1, with a fresh
    /// retry budget (its [`seq`](Delivery::seq) and
    /// [`idempotency_key`](Delivery::idempotency_key) stay the same, so a receiver can still
    /// tell a repeat).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, Retry, SinkError};
    /// use std::time::Duration;
    ///
    /// let c: Conveyor<u32, u32> = Conveyor::builder()
    ///     .retry(Retry::fixed(Duration::from_millis(1)).max_attempts(3))
    ///     .build(|d| match d.attempt() {
    ///         1 | 2 => Err(SinkError::retryable("timed out")),
    ///         n => Ok(n),
    ///     })?;
    /// assert_eq!(c.send(7).unwrap().wait().unwrap(), 3, "delivered on the third attempt");
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether this is the item's last attempt: if it fails, even with a retryable error, the
    /// item fails for good (or, under [`OnFailure::Pause`](crate::OnFailure::Pause), pauses its
    /// lane) instead of being tried again. Usually `attempt() == retry.attempts()`, but not after
    /// [`Conveyor::resume`](crate::Conveyor::resume): the item that paused the lane gets a
    /// fresh budget of attempts on top of those it used, so this is the way to tell, say to log
    /// only the failures that stay failures.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, Retry, SinkError};
    /// use std::sync::{Arc, Mutex};
    /// use std::time::Duration;
    ///
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let log = seen.clone();
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .retry(Retry::fixed(Duration::from_millis(1)).max_attempts(3))
    ///     .build(move |d| {
    ///         log.lock().unwrap().push((d.attempt(), d.is_last_attempt()));
    ///         Err(SinkError::retryable("service down"))
    ///     })?;
    /// assert!(c.send(1).unwrap().wait().is_err());
    /// assert_eq!(*seen.lock().unwrap(), [(1, false), (2, false), (3, true)]);
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.attempt_limit
    }

    /// A key that is the same on every attempt of this item and differs between items
    /// (and between conveyors), for receivers that drop duplicates: send it as an
    /// `Idempotency-Key` header, for example.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, Retry, SinkError};
    /// use std::sync::Mutex;
    /// use std::time::Duration;
    ///
    /// let first_try = Mutex::new(None);
    /// let c: Conveyor<u32, bool> = Conveyor::builder()
    ///     .retry(Retry::fixed(Duration::from_millis(1)).max_attempts(2))
    ///     .build(move |d| {
    ///         let key = d.idempotency_key(); // sent as an `Idempotency-Key` header, say
    ///         match first_try.lock().unwrap().replace(key.clone()) {
    ///             // The receiver may have taken it all the same.
    ///             None => Err(SinkError::retryable("timed out")),
    ///             Some(before) => Ok(before == key),
    ///         }
    ///     })?;
    /// assert!(c.send(1).unwrap().wait().unwrap(), "the retry carries the same key");
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn idempotency_key(&self) -> String {
        // SAFETY: `node` is a live node, kept alive by this delivery.
        let context = unsafe { context(self.node.as_ptr()) };
        format!("{}-{}", context.id_prefix, self.seq())
    }
}

impl<T: fmt::Debug> fmt::Debug for Delivery<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("seq", &self.seq())
            .field("key", &self.key())
            .field("attempt", &self.attempt)
            .field("last_attempt", &self.is_last_attempt())
            .field("item", self.item())
            .finish()
    }
}

/// The outcome of one sent item: delivered with the sink's reply, or why not.
///
/// Wait for it with [`Receipt::wait`], poll it with [`Receipt::wait_timeout`], get a
/// callback with [`Receipt::on_settled`], or `.await` it. Dropping a receipt never
/// cancels the delivery.
///
/// # Waiting from inside its own conveyor
///
/// While the conveyor's own sink, or a receipt callback that one of its workers runs, waits for
/// an item, that worker delivers nothing. [`Receipt::wait`] and [`Receipt::wait_timeout`] wait
/// there only while another worker can still settle the item, and panic or return `None` once
/// none can. Awaiting does not give up: inside an async sink, `.await` on the receipt of an item
/// that only that sink's worker could deliver (under strict ordering any later item, under
/// keyed ordering a later item of the same key) never completes. A future cannot tell whether
/// it is all its sink awaits (under `tokio::time::timeout` or in a `select!`, failing the sink
/// would be wrong), so there, bound the await with a timeout, or send without awaiting and use
/// [`Receipt::on_settled`].
///
/// Items are stored in blocks of a few KiB, and a block is reused once none of its items is
/// referenced any more: keeping one receipt (or one [`Delivery`]) for a long time keeps its
/// block allocated, so keep outcomes rather than receipts when you need them for long.
///
/// # Examples
///
/// ```
/// use conveyor::Conveyor;
///
/// let c: Conveyor<u32, u32> = Conveyor::builder().build(|d| Ok(d.item() * 2))?;
/// let receipt = c.send(21).unwrap();
/// assert_eq!(receipt.seq(), 1);
/// assert_eq!(receipt.wait().unwrap(), 42);
/// # Ok::<(), conveyor::BuildError>(())
/// ```
pub struct Receipt<R> {
    node: Erased,
    /// The reply type of the node's slot, found at [`slot_offset`] from the node's start.
    /// One word in all: a receipt of two words came back from `send` in two stores that the
    /// caller read back in one load, which then waited for every store before it (the
    /// node's) to reach the cache.
    _slot: PhantomData<NonNull<Slot<R>>>,
}

/// Where the slot starts in a node of any item type with replies of type `R`: `Node` is
/// `#[repr(C)]` with the item last, so the fields before it sit where they would without it.
const fn slot_offset<R>() -> usize {
    std::mem::offset_of!(Node<(), R>, slot)
}

// SAFETY: a receipt takes the reply out on its own thread and may drop the node there. Its
// only constructor (`new`) requires a reply that is `Send` and an item that is `Send + Sync`,
// so every receipt that exists may go anywhere, as with the `Arc<dyn .. + Send + Sync>` it
// replaced.
unsafe impl<R> Send for Receipt<R> {}
unsafe impl<R> Sync for Receipt<R> {}

impl<R: Send + 'static> Receipt<R> {
    pub(crate) fn new<T: Send + Sync + 'static>(node: NodeRef<T, R>) -> Self {
        const { assert!(std::mem::offset_of!(Node<T, R>, slot) == slot_offset::<R>()) };
        Self {
            node: node.erase(),
            _slot: PhantomData,
        }
    }
}

impl<R> Receipt<R> {
    fn about(&self) -> &About {
        // SAFETY: `node` is a live node, kept alive by this receipt.
        unsafe { about(self.node.as_ptr()) }
    }

    fn lazy_slot(&self) -> &LazySlot<R> {
        // SAFETY: the node is a `Node<_, R>` (see `new`), kept alive by this receipt, and its
        // slot is at `slot_offset::<R>()` whatever its item type.
        unsafe {
            self.node
                .as_ptr()
                .cast::<u8>()
                .add(slot_offset::<R>())
                .cast::<LazySlot<R>>()
                .as_ref()
        }
    }

    /// The slot, made now if nobody needed it yet.
    fn slot(&self) -> &Slot<R> {
        self.lazy_slot().get()
    }

    /// The item's sequence number (see [`Delivery::seq`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    ///
    /// let c: Conveyor<u32, u64> = Conveyor::builder().build(|d| Ok(d.seq()))?;
    /// let receipt = c.send(10).unwrap();
    /// let seq = receipt.seq(); // known at once: log it, to match the sink's logs later
    /// assert_eq!(receipt.wait().unwrap(), seq);
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn seq(&self) -> u64 {
        self.about().seq.load(AtomicOrdering::Relaxed)
    }

    /// Whether the item has settled (delivered, failed, dropped or closed).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    /// use std::sync::{mpsc, Mutex};
    ///
    /// let (release, gate) = mpsc::channel::<()>();
    /// let gate = Mutex::new(gate);
    /// let c: Conveyor<u32> = Conveyor::builder().build(move |_d| {
    ///     gate.lock().unwrap().recv().ok(); // a slow call, until released
    ///     Ok(())
    /// })?;
    /// let receipt = c.send(1).unwrap();
    /// assert!(!receipt.is_settled(), "the sink is still at it");
    /// release.send(()).unwrap();
    /// c.flush();
    /// assert!(receipt.is_settled());
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn is_settled(&self) -> bool {
        self.lazy_slot()
            .settled_without_lock()
            .unwrap_or_else(|| !matches!(*self.slot().lock(), SlotState::Pending { .. }))
    }

    /// Blocks until the item settles and returns its outcome.
    ///
    /// Waiting ends when the item is delivered, fails for good, is dropped, or is
    /// reported as closed by a conveyor shutdown, so it does not outlive the
    /// conveyor's drain deadline.
    ///
    /// Called from the conveyor's own sink, or from a receipt callback that one of its workers
    /// runs, it waits only while another worker can still settle the item: the calling worker
    /// delivers nothing until the call returns.
    ///
    /// # Errors
    ///
    /// The [`DeliveryError`] that says how the item ended if it was not delivered.
    ///
    /// # Panics
    ///
    /// If the item has not settled and waiting would never end: inside the conveyor's own sink
    /// call or a receipt callback run by one of its workers, once no other worker can settle the
    /// item. Only the calling worker could, after the call returns (under strict ordering, any
    /// later item; under keyed ordering, a later item of the same key). Wait outside the sink, or
    /// use [`Receipt::on_settled`] or [`Receipt::wait_timeout`] there. The panic fails the sink's
    /// item (without retries) and the worker goes on, as for any panic in a sink.
    ///
    /// In async code, `.await` the receipt instead: this blocks the task's thread. On a worker
    /// thread of a multi-threaded Tokio runtime the runtime is told first and moves its other
    /// tasks to another thread meanwhile (as [`tokio::task::block_in_place`] does), so a wait
    /// for an item that an async sink on the same runtime delivers still ends. Elsewhere (a
    /// `block_on` thread, a `LocalSet`) it simply blocks.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, DeliveryError, SinkError};
    ///
    /// let c: Conveyor<u32, u32> = Conveyor::builder().build(|d| match d.item() {
    ///     0 => Err(SinkError::permanent("zero is not a valid amount")),
    ///     n => Ok(n * 10),
    /// })?;
    /// assert_eq!(c.send(4).unwrap().wait()?, 40);
    /// match c.send(0).unwrap().wait() {
    ///     Err(DeliveryError::Failed { attempts, error }) => {
    ///         assert_eq!(attempts, 1);
    ///         assert_eq!(error.to_string(), "zero is not a valid amount");
    ///     }
    ///     other => panic!("expected a failure, got {other:?}"),
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn wait(mut self) -> Result<R, DeliveryError> {
        self.wait_until(None)
            .expect("waiting without a deadline always yields a result")
    }

    /// Blocks for at most `timeout`; `None` if the item has not settled by then.
    ///
    /// Where [`Receipt::wait`] would panic, it returns `None` at once instead: inside the
    /// conveyor's own sink call or a receipt callback run by one of its workers, once no other
    /// worker can settle the item (nothing could settle it meanwhile).
    ///
    /// # Panics
    ///
    /// If the result was already taken by an earlier call that returned `Some`, or by
    /// polling the receipt as a future to completion.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    /// use std::sync::{mpsc, Mutex};
    /// use std::time::Duration;
    ///
    /// let (release, gate) = mpsc::channel::<()>();
    /// let gate = Mutex::new(gate);
    /// let c: Conveyor<u32, u32> = Conveyor::builder().build(move |d| {
    ///     gate.lock().unwrap().recv().ok(); // a slow call, until released
    ///     Ok(*d.item())
    /// })?;
    /// let mut receipt = c.send(7).unwrap();
    /// assert!(receipt.wait_timeout(Duration::from_millis(5)).is_none(), "not settled yet");
    /// release.send(()).unwrap();
    /// assert_eq!(receipt.wait_timeout(Duration::from_secs(30)).unwrap().unwrap(), 7);
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<Result<R, DeliveryError>> {
        // Saturated, as `Duration::MAX` cannot be added to the clock; and not "forever": where
        // `wait` would panic, this must not block.
        self.wait_until(Some(crate::worker::later(timeout)))
    }

    /// The receipt's conveyor, if the calling thread may be running code for one of its
    /// workers. On any other thread this costs a thread-local read.
    fn own_conveyor(&self) -> Option<Arc<dyn OwnWorkers>> {
        let here = crate::worker::conveyor_here()?;
        // SAFETY: `node` is a live node, kept alive by this receipt.
        let conveyor = &unsafe { context(self.node.as_ptr()) }.conveyor;
        // The address alone: the weak reference keeps it from being reused by another conveyor.
        if conveyor.as_ptr().cast::<()>() as usize == here {
            conveyor.upgrade()
        } else {
            None
        }
    }

    fn wait_until(&mut self, deadline: Option<Instant>) -> Option<Result<R, DeliveryError>> {
        // Settled already, or not to wait for: no need to tell a runtime that this blocks.
        if let Some(result) = self.take_settled() {
            return Some(result);
        }
        if deadline.is_some_and(|deadline| deadline <= Instant::now()) {
            return None;
        }
        // In an async sink or task, the item may be delivered by a task on this very thread.
        crate::conveyor::blocking_section(|| match self.own_conveyor() {
            Some(conveyor) => self.wait_inside(&*conveyor, deadline),
            None => self.wait_slot(deadline),
        })
    }

    /// `wait_slot` from code run by one of the conveyor's own workers, which settles nothing
    /// while it waits: it waits only while the others can still settle the item.
    ///
    /// It sleeps on the slot in slices of `INSIDE_CHECK` and asks the conveyor between them.
    /// The slot's condvar wakes it as soon as the item settles, whoever settles it (a worker, a
    /// send dropping it, a shutdown); what the others can still do is only known under the
    /// state lock, and waking this thread on every change there would need the slot registered
    /// in the state. Slices cost one state lock per slice on this rare path and nothing on the
    /// usual one, and only ever delay giving up, never a result.
    fn wait_inside(
        &mut self,
        conveyor: &dyn OwnWorkers,
        deadline: Option<Instant>,
    ) -> Option<Result<R, DeliveryError>> {
        // Its own reference, as the receipt is borrowed mutably while it waits.
        let key = self.about().key.clone();
        let item = Awaited {
            seq: self.seq(),
            key: key.as_ref(),
        };
        let mut inside = match conveyor.start_waiting_inside(item) {
            // Not for a live worker: one that is exiting takes no item any more, so it holds
            // none up.
            Inside::Elsewhere => return self.wait_slot(deadline),
            Inside::Hopeless => return self.nobody_else_settles(deadline),
            Inside::Waiting(worker) => WaitingInside {
                conveyor,
                worker,
                item,
                marked: true,
            },
        };
        loop {
            let slice = crate::worker::later(INSIDE_CHECK);
            let until = deadline.map_or(slice, |deadline| deadline.min(slice));
            if let Some(result) = self.wait_slot(Some(until)) {
                return Some(result);
            }
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return None;
            }
            if !inside.keep_waiting() {
                return self.nobody_else_settles(deadline);
            }
        }
    }

    /// How a wait from inside ends once nothing but the waiting worker could settle the item.
    fn nobody_else_settles(
        &mut self,
        deadline: Option<Instant>,
    ) -> Option<Result<R, DeliveryError>> {
        // A worker settles the receipts of its items before it stops counting as able to
        // progress (see `State::settling_by`): what another worker settled is in the slot now.
        match self.take_settled() {
            Some(result) => Some(result),
            None if deadline.is_none() => wait_refused_inside(),
            None => None,
        }
    }

    /// The outcome, taken, if the item has settled.
    fn take_settled(&mut self) -> Option<Result<R, DeliveryError>> {
        let lazy = self.lazy_slot();
        if let Some(result) = lazy.take_inline(ALREADY_TAKEN) {
            return Some(result);
        }
        if lazy.settled_without_lock() == Some(false) {
            return None; // no need for a slot to say so
        }
        self.slot().lock().take_ready(ALREADY_TAKEN)
    }

    fn wait_slot(&mut self, deadline: Option<Instant>) -> Option<Result<R, DeliveryError>> {
        let slot = self.slot();
        let mut state = slot.lock();
        loop {
            if let Some(result) = state.take_ready(ALREADY_TAKEN) {
                return Some(result);
            }
            if let SlotState::Pending { thread_waiting, .. } = &mut *state {
                *thread_waiting = true;
            }
            state = match deadline {
                None => slot
                    .ready
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return None;
                    }
                    slot.ready
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// Calls `callback` with the outcome once the item settles: on the thread that
    /// settles it, or right away on this thread if it already has. Keep the callback
    /// short: it usually runs on a delivery worker, before that worker's next sink call
    /// (a panic there is logged, and the worker goes on), or on the thread that drops or
    /// closes out the item.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    /// use std::sync::mpsc;
    ///
    /// let c: Conveyor<u32> = Conveyor::builder().build(|_d| Ok(()))?;
    /// let (tx, rx) = mpsc::channel();
    /// c.send(1).unwrap().on_settled(move |outcome| tx.send(outcome.is_ok()).unwrap());
    /// assert!(rx.recv().unwrap());
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn on_settled(self, callback: impl FnOnce(Result<R, DeliveryError>) + Send + 'static) {
        // Settled already without a slot (a reply kept inline, or a failure's mark): no slot to
        // make only to empty it.
        if let Some(result) = self.lazy_slot().take_inline(ALREADY_TAKEN) {
            return callback(result);
        }
        let slot = self.slot();
        let mut state = slot.lock();
        match std::mem::replace(&mut *state, SlotState::Taken) {
            SlotState::Ready(result) => {
                drop(state);
                callback(result);
            }
            SlotState::Pending {
                waker,
                thread_waiting,
                ..
            } => {
                *state = SlotState::Pending {
                    waker,
                    callback: Some(Box::new(callback)),
                    thread_waiting,
                };
                // Before the receipt's reference drops, which publishes it (see `unheeded`).
                slot.has_callback.store(true, AtomicOrdering::Relaxed);
            }
            SlotState::Taken => panic!("{ALREADY_TAKEN}"),
        }
    }
}

/// Awaiting inside the conveyor's own async sink may never complete: see
/// [Waiting from inside its own conveyor](Receipt#waiting-from-inside-its-own-conveyor).
impl<R> Future for Receipt<R> {
    type Output = Result<R, DeliveryError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        const POLLED_AFTER: &str = "the receipt was polled after it completed";
        if let Some(result) = self.lazy_slot().take_inline(POLLED_AFTER) {
            return Poll::Ready(result);
        }
        let mut state = self.slot().lock();
        if let Some(result) = state.take_ready(POLLED_AFTER) {
            return Poll::Ready(result);
        }
        if let SlotState::Pending { waker, .. } = &mut *state {
            match waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
        }
        Poll::Pending
    }
}

impl<R> fmt::Debug for Receipt<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receipt")
            .field("seq", &self.seq())
            .field("settled", &self.is_settled())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slab::Slab;
    use std::sync::mpsc;

    /// Panics when dropped, as a user's item may.
    struct Explosive;

    impl Drop for Explosive {
        fn drop(&mut self) {
            panic!("item drop");
        }
    }

    fn node<T>(slab: &mut Slab<Node<T, u32>>, item: T) -> NodeRef<T, u32> {
        slab.alloc(|head| Node::new(head, None, item))
    }

    #[test]
    fn a_receipt_still_held_gets_the_result() {
        let mut slab = Slab::new(NodeContext::for_tests());
        let node = node(&mut slab, 1_u8);
        let receipt = Receipt::new(node.clone());
        let [settled, dropped] = settle_and_release(node, Ok(7));
        assert!(settled.is_ok() && dropped.is_ok());
        assert_eq!(receipt.wait().unwrap(), 7);
    }

    #[test]
    fn the_last_reference_runs_the_callback_of_a_dropped_receipt() {
        let mut slab = Slab::new(NodeContext::for_tests());
        let node = node(&mut slab, 1_u8);
        let (tx, rx) = mpsc::channel();
        Receipt::new(node.clone()).on_settled(move |result| tx.send(result).unwrap());
        let [settled, dropped] = settle_and_release(node, Ok(7));
        assert!(settled.is_ok() && dropped.is_ok());
        assert_eq!(rx.try_recv().unwrap().unwrap(), 7);
    }

    #[test]
    fn panics_of_the_callback_and_of_the_drop_come_back_apart() {
        let mut slab = Slab::new(NodeContext::for_tests());
        for shared in [false, true] {
            let node = node(&mut slab, Explosive);
            let receipt = Receipt::new(node.clone());
            let kept = shared.then(|| node.clone());
            receipt.on_settled(|_| panic!("callback"));
            let [settled, dropped] = settle_and_release(node, Ok(7));
            assert_eq!(panic_text(settled), Some("callback"), "shared: {shared}");
            match kept {
                // The last reference is elsewhere: this one's drop does not drop the item.
                Some(kept) => {
                    assert!(dropped.is_ok());
                    let late = std::panic::catch_unwind(AssertUnwindSafe(move || drop(kept)));
                    assert_eq!(panic_text(late), Some("item drop"));
                }
                None => assert_eq!(panic_text(dropped), Some("item drop")),
            }
        }
    }

    /// `send` hands it back in one store, which the caller reads back in one load (see the
    /// `Receipt` fields).
    #[test]
    fn a_receipt_is_one_word() {
        assert_eq!(
            std::mem::size_of::<Receipt<()>>(),
            std::mem::size_of::<usize>()
        );
        assert_eq!(
            std::mem::size_of::<Receipt<String>>(),
            std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn a_receipt_finds_its_slot_whatever_the_item_type() {
        let mut slab = Slab::<Node<[u8; 3], u32>>::new(NodeContext::for_tests());
        let node = slab.alloc(|head| Node::new(head, None, [1, 2, 3]));
        let receipt = Receipt::new(node.clone());
        node.settle(Ok(9));
        assert_eq!(node.item, [1, 2, 3]);
        assert_eq!(receipt.wait().unwrap(), 9);
    }

    /// The worker reads every node the producer wrote moments earlier: one line each, for
    /// the commonest node, when the slot is made only on demand (see `LazySlot`).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_node_of_a_u64_with_unit_replies_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Node<u64, ()>>(), 64);
    }

    fn slot_made<T, R>(node: &Node<T, R>) -> bool {
        node.slot.made().is_some()
    }

    fn node_of<R>(slab: &mut Slab<Node<u8, R>>) -> NodeRef<u8, R> {
        slab.alloc(|head| Node::new(head, None, 1))
    }

    #[test]
    fn a_reply_settles_inline_and_is_taken_without_a_slot() {
        let mut slab = Slab::new(NodeContext::for_tests());
        let node = node_of::<()>(&mut slab);
        let receipt = Receipt::new(node.clone());
        node.settle(Ok(()));
        assert!(receipt.is_settled());
        assert!(matches!(receipt.wait(), Ok(())));
        assert!(!slot_made(&node));
        let mut slab = Slab::new(NodeContext::for_tests());
        let node = node_of::<u32>(&mut slab);
        let mut receipt = Receipt::new(node.clone());
        node.settle(Ok(5));
        assert!(receipt.is_settled());
        assert!(matches!(receipt.wait_timeout(Duration::ZERO), Some(Ok(5))));
        assert!(
            !slot_made(&node),
            "the reply was taken from where it was kept"
        );
        assert!(receipt.is_settled());
        let again =
            std::panic::catch_unwind(AssertUnwindSafe(|| receipt.wait_timeout(Duration::ZERO)));
        assert_eq!(
            again.err().map(|p| *p.downcast::<String>().unwrap()),
            Some(ALREADY_TAKEN.to_string())
        );
    }

    /// A reply kept inline is dropped once: with the node if nobody took it, by its taker
    /// otherwise (a receipt's waiter or its callback).
    #[test]
    fn a_reply_kept_inline_is_dropped_once() {
        let reply = Arc::new(());
        let mut slab = Slab::new(NodeContext::for_tests());
        for how in ["untaken", "taken", "callback"] {
            let node = node_of::<Arc<()>>(&mut slab);
            let receipt = Receipt::new(node.clone());
            node.settle(Ok(reply.clone()));
            assert_eq!(Arc::strong_count(&reply), 2, "{how}");
            match how {
                "untaken" => drop(receipt),
                "taken" => drop(receipt.wait().unwrap()),
                _ => receipt.on_settled(drop),
            }
            assert_eq!(Arc::strong_count(&reply), 1 + usize::from(how == "untaken"));
            drop(node);
            assert_eq!(Arc::strong_count(&reply), 1, "{how}");
        }
    }

    /// A callback left once the item was delivered gets the reply from where it was kept: a
    /// slot made for it, only to be emptied at once, doubled the call's cost (Python's
    /// `Receipt.result()` on a settled item comes this way).
    #[test]
    fn a_late_callback_takes_a_reply_kept_inline_without_a_slot() {
        let mut slab = Slab::new(NodeContext::for_tests());
        let node = node_of::<u32>(&mut slab);
        let (tx, rx) = mpsc::channel();
        let receipt = Receipt::new(node.clone());
        node.settle(Ok(4));
        receipt.on_settled(move |outcome| tx.send(outcome).unwrap());
        assert!(matches!(rx.try_recv(), Ok(Ok(4))));
        assert!(!slot_made(&node));
    }

    #[test]
    fn a_receipt_that_looks_first_gets_the_result_through_its_slot() {
        let mut slab = Slab::new(NodeContext::for_tests());
        let node = node_of::<u32>(&mut slab);
        let mut receipt = Receipt::new(node.clone());
        assert!(!receipt.is_settled());
        assert!(receipt.wait_timeout(Duration::ZERO).is_none());
        assert!(!slot_made(&node), "asking whether it settled needs no slot");
        let waiter = std::thread::spawn(move || receipt.wait());
        while !slot_made(&node) {
            std::thread::yield_now();
        }
        node.settle(Ok(11));
        assert!(matches!(waiter.join().unwrap(), Ok(11)));
    }

    #[test]
    fn the_first_settlement_wins_with_or_without_a_slot() {
        let mut slab = Slab::new(NodeContext::for_tests());
        // A reply first: a late failure is ignored.
        let node = node_of::<u32>(&mut slab);
        let receipt = Receipt::new(node.clone());
        node.settle(Ok(1));
        node.settle(Err(DeliveryError::Closed));
        node.settle(Ok(2));
        assert!(matches!(receipt.wait(), Ok(1)));
        // A failure first, with or without a slot: a late reply is ignored.
        let node = node_of::<u32>(&mut slab);
        let receipt = Receipt::new(node.clone());
        node.settle(Err(DeliveryError::Closed));
        assert!(
            !slot_made(&node),
            "a failure that carries nothing is a mark"
        );
        node.settle(Ok(2));
        node.settle(Err(DeliveryError::Dropped));
        assert!(matches!(receipt.wait(), Err(DeliveryError::Closed)));
        let node = node_of::<u32>(&mut slab);
        let receipt = Receipt::new(node.clone());
        node.settle(Err(DeliveryError::Failed {
            attempts: 1,
            error: crate::SinkError::permanent("no"),
        }));
        assert!(slot_made(&node), "a sink's error is kept in a slot");
        node.settle(Ok(2));
        assert!(matches!(
            receipt.wait(),
            Err(DeliveryError::Failed { attempts: 1, .. })
        ));
    }

    /// Drop policies and shutdowns settle many items at once with failures that carry nothing:
    /// each is a mark, read by every way of asking, and taken once.
    #[test]
    fn failures_that_carry_nothing_settle_without_a_slot() {
        let mut slab = Slab::new(NodeContext::for_tests());
        for (i, error) in [
            DeliveryError::Dropped,
            DeliveryError::Closed,
            DeliveryError::Unconfirmed,
        ]
        .into_iter()
        .enumerate()
        {
            let what = error.to_string();
            let same = |outcome: Result<u32, DeliveryError>| {
                outcome.err().map(|e| e.to_string()) == Some(what.clone())
            };
            let node = node_of::<u32>(&mut slab);
            let mut receipt = Receipt::new(node.clone());
            node.settle(Err(error));
            assert!(!slot_made(&node) && receipt.is_settled(), "{what}");
            match i {
                0 => assert!(same(receipt.wait_timeout(Duration::ZERO).unwrap())),
                1 => {
                    let (tx, rx) = mpsc::channel();
                    receipt.on_settled(move |outcome| tx.send(outcome).unwrap());
                    assert!(same(rx.try_recv().unwrap()), "{what}");
                    continue;
                }
                _ => {
                    struct Nobody;
                    impl std::task::Wake for Nobody {
                        fn wake(self: Arc<Self>) {}
                    }
                    let waker = Waker::from(Arc::new(Nobody));
                    let mut cx = Context::from_waker(&waker);
                    let Poll::Ready(outcome) = Pin::new(&mut receipt).poll(&mut cx) else {
                        panic!("{what}: settled");
                    };
                    assert!(same(outcome));
                }
            }
            assert!(!slot_made(&node), "{what}: taken without a slot");
            assert!(receipt.is_settled());
            let again =
                std::panic::catch_unwind(AssertUnwindSafe(|| receipt.wait_timeout(Duration::ZERO)));
            assert!(again.is_err(), "{what}: taken once");
        }
    }

    #[test]
    fn a_reply_kept_inline_completes_a_future_once() {
        let mut slab = Slab::new(NodeContext::for_tests());
        let node = node_of::<u32>(&mut slab);
        let mut receipt = Receipt::new(node.clone());
        node.settle(Ok(3));
        struct Nobody;
        impl std::task::Wake for Nobody {
            fn wake(self: Arc<Self>) {}
        }
        let waker = Waker::from(Arc::new(Nobody));
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(
            Pin::new(&mut receipt).poll(&mut cx),
            Poll::Ready(Ok(3))
        ));
        let again = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let _ = Pin::new(&mut receipt).poll(&mut cx);
        }));
        assert!(again.is_err(), "polled after it completed");
    }

    /// Threads asking one receipt at once while its item settles: each may make a slot, or
    /// move the reply into one; one slot is kept, and the reply is neither lost nor doubled.
    #[test]
    fn threads_asking_at_once_share_one_slot_and_one_reply() {
        let reply = Arc::new(());
        for round in 0..200 {
            let mut slab = Slab::new(NodeContext::for_tests());
            let node = node_of::<Arc<()>>(&mut slab);
            let receipt = Arc::new(Receipt::new(node.clone()));
            let start = Arc::new(std::sync::Barrier::new(4));
            let askers: Vec<_> = (0..3)
                .map(|_| {
                    let receipt = receipt.clone();
                    let start = start.clone();
                    std::thread::spawn(move || {
                        start.wait();
                        while !receipt.is_settled() {
                            std::hint::spin_loop();
                        }
                        let _ = receipt.slot();
                    })
                })
                .collect();
            if round % 2 == 0 {
                node.settle(Ok(reply.clone()));
                start.wait();
            } else {
                start.wait();
                node.settle(Ok(reply.clone()));
            }
            for asker in askers {
                asker.join().unwrap();
            }
            assert!(slot_made(&node));
            let receipt = Arc::into_inner(receipt).unwrap();
            drop(receipt.wait().unwrap());
            drop(node);
            assert_eq!(Arc::strong_count(&reply), 1, "round {round}");
        }
    }

    /// A reply whose drop panics, kept inline or moved into a slot, panics once where the
    /// node drops, and the item drops all the same.
    #[test]
    fn a_reply_whose_drop_panics_panics_once_and_lets_the_item_drop() {
        let item = Arc::new(());
        let mut slab = Slab::new(NodeContext::for_tests());
        for moved in [false, true] {
            let node = slab.alloc(|head| Node::new(head, None, item.clone()));
            let receipt = Receipt::new(node.clone());
            node.settle(Ok(Explosive));
            if moved {
                // The reply moves into the slot a waiter makes, and is left there.
                let _ = receipt.lazy_slot().get();
                assert!(slot_made(&node));
            }
            drop(receipt);
            let dropped = std::panic::catch_unwind(AssertUnwindSafe(move || drop(node)));
            assert_eq!(panic_text(dropped), Some("item drop"), "moved: {moved}");
            assert_eq!(Arc::strong_count(&item), 1, "moved: {moved}");
        }
    }

    /// How a receipt's holder asks for the outcome in
    /// `every_way_of_asking_sees_one_outcome_and_drops_the_reply_once`.
    #[derive(Clone, Copy, Debug)]
    enum Asking {
        /// `wait`, on a thread of its own.
        Wait,
        /// `wait_timeout`, at once and then for long.
        WaitTimeout,
        /// Polled as a future, again only once woken.
        Poll,
        /// `on_settled`.
        Callback,
        /// Dropped unasked.
        Drop,
        /// `is_settled` from two other threads, then taken at once.
        Shared,
    }

    /// Far longer than any of these waits takes: reached only when a wake-up is lost.
    const LOST: Duration = Duration::from_secs(30);

    /// The outcome, asked for as `asking` says while the item settles on other threads.
    fn ask(
        receipt: Receipt<Arc<()>>,
        asking: Asking,
        start: &Arc<std::sync::Barrier>,
    ) -> Option<Result<Arc<()>, DeliveryError>> {
        let deadline = Instant::now() + LOST;
        match asking {
            Asking::Wait => {
                let (tx, rx) = mpsc::channel();
                let start = start.clone();
                // Not scoped: a wait never woken fails the test, instead of hanging it.
                std::thread::spawn(move || {
                    start.wait();
                    tx.send(receipt.wait()).unwrap();
                });
                Some(
                    rx.recv_timeout(LOST)
                        .expect("a blocked wait was never woken"),
                )
            }
            Asking::WaitTimeout => {
                let mut receipt = receipt;
                start.wait();
                let now = receipt.wait_timeout(Duration::ZERO);
                Some(
                    now.or_else(|| receipt.wait_timeout(LOST))
                        .expect("a timed wait was never woken"),
                )
            }
            Asking::Poll => {
                struct Flag(AtomicBool, std::thread::Thread);
                impl std::task::Wake for Flag {
                    fn wake(self: Arc<Self>) {
                        self.0.store(true, AtomicOrdering::Release);
                        self.1.unpark();
                    }
                }
                let flag = Arc::new(Flag(AtomicBool::new(false), std::thread::current()));
                let waker = Waker::from(flag.clone());
                let mut cx = Context::from_waker(&waker);
                let mut receipt = receipt;
                start.wait();
                loop {
                    if let Poll::Ready(outcome) = Pin::new(&mut receipt).poll(&mut cx) {
                        return Some(outcome);
                    }
                    while !flag.0.swap(false, AtomicOrdering::Acquire) {
                        let left = deadline.checked_duration_since(Instant::now());
                        std::thread::park_timeout(left.expect("a pending future was never woken"));
                    }
                }
            }
            Asking::Callback => {
                let (tx, rx) = mpsc::channel();
                start.wait();
                receipt.on_settled(move |outcome| tx.send(outcome).unwrap());
                Some(rx.recv_timeout(LOST).expect("a callback never ran"))
            }
            Asking::Drop => {
                start.wait();
                drop(receipt);
                None
            }
            Asking::Shared => {
                let receipt = Arc::new(receipt);
                std::thread::scope(|scope| {
                    for _ in 0..2 {
                        scope.spawn(|| {
                            while !receipt.is_settled() {
                                assert!(Instant::now() < deadline, "never seen settled");
                                // Not a spin: on two cores it would hold up the settlers.
                                std::thread::yield_now();
                            }
                        });
                    }
                    start.wait();
                });
                let mut receipt = Arc::into_inner(receipt).unwrap();
                assert!(receipt.is_settled());
                Some(
                    receipt
                        .wait_timeout(Duration::ZERO)
                        .expect("settled, so there to take"),
                )
            }
        }
    }

    /// Every way of asking a receipt, racing its item's settlement by a worker (through
    /// `settle_and_release`, as workers do), and in half the rounds a shutdown's `Closed` as
    /// well: one outcome, the first settlement's, is seen once; nobody waits for good; and the
    /// reply, counted through its `Arc`, is dropped once, wherever it was kept.
    #[test]
    fn every_way_of_asking_sees_one_outcome_and_drops_the_reply_once() {
        const ROUNDS: usize = if cfg!(miri) { 1 } else { 40 };
        let reply = Arc::new(());
        let mut slab = Slab::new(NodeContext::for_tests());
        let ways = [
            Asking::Wait,
            Asking::WaitTimeout,
            Asking::Poll,
            Asking::Callback,
            Asking::Drop,
            Asking::Shared,
        ];
        for round in 0..ROUNDS {
            for asking in ways {
                for closing in [false, true] {
                    let what = format!("round {round}, {asking:?}, closing: {closing}");
                    let node = node_of::<Arc<()>>(&mut slab);
                    let receipt = Receipt::new(node.clone());
                    let start = Arc::new(std::sync::Barrier::new(2 + usize::from(closing)));
                    let outcome = std::thread::scope(|scope| {
                        let closer = closing.then(|| node.clone());
                        let ok = reply.clone();
                        let start = &start;
                        let worker = scope.spawn(move || {
                            start.wait();
                            let [settled, dropped] = settle_and_release(node, Ok(ok));
                            assert!(settled.is_ok() && dropped.is_ok());
                        });
                        if let Some(closer) = closer {
                            scope.spawn(move || {
                                start.wait();
                                closer.settle(Err(DeliveryError::Closed));
                            });
                        }
                        let outcome = ask(receipt, asking, start);
                        worker.join().unwrap();
                        outcome
                    });
                    match &outcome {
                        Some(Ok(got)) => assert!(Arc::ptr_eq(got, &reply), "{what}"),
                        Some(Err(DeliveryError::Closed)) if closing => {}
                        Some(Err(other)) => panic!("{what}: {other:?}"),
                        None => {}
                    }
                    let held = matches!(outcome, Some(Ok(_)));
                    assert_eq!(Arc::strong_count(&reply), 1 + usize::from(held), "{what}");
                    drop(outcome);
                    assert_eq!(Arc::strong_count(&reply), 1, "{what}");
                }
            }
        }
    }

    /// A state that is not a slot is never taken for one, nor a slot for such a state, whatever
    /// the reply's alignment (a reply padded to a cache line, say): a slot's address is a
    /// non-zero multiple of its alignment, and every sentinel is below it.
    #[test]
    fn no_sentinel_is_the_address_of_a_slot() {
        fn check<R>(what: &str) {
            let align = std::mem::align_of::<Slot<R>>();
            let sentinels = [
                LazySlot::<R>::WRITING,
                LazySlot::<R>::SETTLED,
                LazySlot::<R>::MOVING,
                LazySlot::<R>::TAKEN,
                LazySlot::<R>::DROPPED,
                LazySlot::<R>::CLOSED,
                LazySlot::<R>::UNCONFIRMED,
            ];
            for state in sentinels {
                assert!(!LazySlot::<R>::is_slot(state), "{what}");
                assert!(
                    (state as usize) < align,
                    "{what}: sentinel {state:p} could be the address of a slot aligned to {align}"
                );
            }
            let slot = Box::into_raw(Box::new(Slot::<R>::new()));
            assert!(LazySlot::<R>::is_slot(slot), "{what}");
            // SAFETY: from `Box::into_raw` above.
            drop(unsafe { Box::from_raw(slot) });
        }
        #[repr(align(64))]
        struct Line(#[allow(dead_code)] u8);
        #[repr(align(4096))]
        struct Page(#[allow(dead_code)] u8);
        check::<()>("()");
        check::<u64>("u64");
        check::<String>("String");
        check::<Line>("64-byte aligned");
        check::<Page>("4096-byte aligned");
    }

    fn panic_text(caught: Result<(), Panic>) -> Option<&'static str> {
        caught.err().map(|p| *p.downcast::<&'static str>().unwrap())
    }
}
