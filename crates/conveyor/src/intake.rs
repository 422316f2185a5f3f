//! The producers' side of the engine: items accepted (with their seqs) that the workers
//! have not moved into the lanes yet.
//!
//! A send that needs nothing special (the conveyor is open, without a journal, and not
//! full) only takes this small lock: it takes the item's node from the slab every node
//! comes from (`slab.rs`), numbers it and appends it. The workers
//! take the whole batch under the state lock when they run out of work ("block for the
//! first, drain the rest"; a paced worker at most every `worker::LEASE_DRAIN`), when they
//! wake, and when they give up the lookout while another worker is idle (see
//! `conveyor.rs`), so producers and workers meet once per batch instead of once per item.
//! No worker sleeps while the intake holds items (see `Shared::register_idle`).
//! Every other send (full queue, closed, journaled) takes the state lock, drains this buffer
//! first and proceeds as before, so the lanes always hold the older items.
//!
//! In keyed mode the intake also counts runs of consecutive items of one lane, as sends
//! append them: the sender has its key at hand, while the worker would have to read each
//! item's node (written on the sender's core) to sort the batch into lanes.
//!
//! The buffers a batch was taken in come back to the intake once the worker has moved their
//! items into the lanes, and sends fill them again only after [`COOL_BYTES`] of other
//! buffers came back, as the slab reuses its chunks (see `slab.rs`): a buffer the worker
//! has just read is still in its cache, and a send writing into it waited for those lines
//! at every locked operation. Swapping two buffers back and forth, that was a third of a
//! send (see BENCHMARKS.md).
//!
//! Lock order: the state lock, then this one; never the other way round.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::queue::same_lane;
use crate::receipt::{Node, NodeContext, NodeRef};
use crate::slab::{Slab, COOL_BYTES};

/// Which idle workers a send should wake once it has released the intake lock, and whether
/// its producer should then give its CPU up for a moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wake {
    pub(crate) thread: bool,
    pub(crate) task: bool,
    /// A worker was woken for the intake's items, or holds the lookout for them, yet
    /// [`GIVE_WAY_EVERY`] items came in since the last take (see `Intake::try_accept`).
    pub(crate) give_way: bool,
}

/// How many items may pile up in the intake, while a worker is expected to take them, before
/// a send gives its CPU up (see `Intake::try_accept`); again after as many more. A few
/// hundred microseconds of back-to-back sends: a worker that runs takes its batch long
/// before, and a yield with nothing else to run costs a send about a tenth of a nanosecond.
const GIVE_WAY_EVERY: usize = 8192;

/// Items taken from the intake (see `Intake::take`), with their runs of one lane in keyed
/// mode. Its buffers go back to the intake at the next take, to be filled again once cool
/// (see the module doc), so that they are not allocated again.
pub(crate) struct Batch<T, R> {
    /// Accepted items in seq order.
    pub(crate) items: Vec<NodeRef<T, R>>,
    /// Keyed mode: `items` as runs of one lane, in order (their lengths add up to
    /// `items.len()`). Empty otherwise: all items go to the one lane.
    pub(crate) runs: Vec<usize>,
}

impl<T, R> Default for Batch<T, R> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            runs: Vec::new(),
        }
    }
}

/// What a cooling buffer counts as at least (see `Batch::bytes`): a page.
const MIN_COOLING_BYTES: usize = 4096;

impl<T, R> Batch<T, R> {
    /// The memory it holds while it cools: its buffers, and its slot in the queue, larger
    /// than a trickle's buffers (uncounted, a trickle filled 3 MiB of slots). A page at
    /// least: a trickle's buffers, an item or a few each, then number a few hundred rather
    /// than thousands, which bursts after the trickle would free all in one take, under the
    /// intake and state locks.
    fn bytes(&self) -> usize {
        let held = std::mem::size_of::<Self>()
            + self.items.capacity() * std::mem::size_of::<NodeRef<T, R>>()
            + self.runs.capacity() * std::mem::size_of::<usize>();
        held.max(MIN_COOLING_BYTES)
    }
}

/// Buffers of batches already taken and emptied, oldest first, for sends to fill again
/// once [`COOL_BYTES`] of others came back after them (see the module doc). They hold at
/// most twice that: a buffer larger than it is not kept, and each take lets every buffer
/// that has cooled go.
struct Cooling<T, R> {
    buffers: VecDeque<Batch<T, R>>,
    /// What `buffers` hold, in all.
    bytes: usize,
}

impl<T, R> Cooling<T, R> {
    fn new() -> Self {
        Self {
            buffers: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Keeps the emptied `batch`, unless it is larger than the cooling distance itself (a
    /// burst's: allocated again, if ever needed, rather than held), and returns the oldest
    /// buffers once enough came back after them, or new ones.
    ///
    /// Every other buffer that has cooled too is freed: giving back one a take, a queue of
    /// a trickle's small buffers kept its length as a burst's large ones took their place,
    /// and grew by each of those.
    fn swap(&mut self, batch: Batch<T, R>) -> Batch<T, R> {
        debug_assert!(batch.items.is_empty() && batch.runs.is_empty());
        let bytes = batch.bytes();
        // Without an allocation there is nothing to keep (`runs` has none without `items`).
        if batch.items.capacity() > 0 && bytes <= COOL_BYTES {
            self.bytes += bytes;
            self.buffers.push_back(batch);
        }
        let mut cool = None;
        while let Some(oldest) = self.buffers.front() {
            if self.bytes - oldest.bytes() < COOL_BYTES {
                break;
            }
            self.bytes -= oldest.bytes();
            let oldest = self.buffers.pop_front().expect("just seen");
            // The oldest is filled again; the others go, freed here.
            if cool.is_none() {
                cool = Some(oldest);
            }
        }
        cool.unwrap_or_default()
    }
}

/// What the intake lock guards (see the module doc).
pub(crate) struct Intake<T, R> {
    /// Accepted items, not yet in their lanes: the batch the next take hands over.
    filling: Batch<T, R>,
    /// Buffers for `filling` after the next take.
    cooling: Cooling<T, R>,
    keyed: bool,
    /// Where every node is made, under this lock (see `slab.rs`).
    slab: Slab<Node<T, R>>,
    /// The seq the next accepted item gets.
    next_seq: u64,
    /// Whether a send may take the fast path at all: not after close, never with a journal
    /// (whose appends must be queued in seq order under the state lock).
    open: bool,
    /// Items in the lanes, as of the last time a holder of the state lock looked. Between
    /// such looks the lanes only shrink (`next_job`, `drop_oldest`) without this copy being
    /// updated, so it never undercounts: the fast path can trust it to stay within the
    /// capacity, and a send that finds it full re-checks under the state lock.
    lanes_queued: u64,
    capacity: u64,
    /// Workers waiting for items, and how many of them were woken and have not run yet
    /// (so that a burst of sends costs one wake-up, not one per item).
    pub(crate) idle_threads: usize,
    pub(crate) woken_threads: usize,
    pub(crate) idle_tasks: usize,
    pub(crate) woken_tasks: usize,
}

impl<T, R> Intake<T, R> {
    pub(crate) fn new(
        first_seq: u64,
        capacity: usize,
        open: bool,
        keyed: bool,
        context: NodeContext,
    ) -> Self {
        Self {
            filling: Batch::default(),
            cooling: Cooling::new(),
            keyed,
            // A burst as large as the queue takes its chunks back from the spares (see
            // `slab.rs`).
            slab: Slab::with_backlog(context, capacity),
            next_seq: first_seq,
            open,
            lanes_queued: 0,
            capacity: capacity as u64,
            idle_threads: 0,
            woken_threads: 0,
            idle_tasks: 0,
            woken_tasks: 0,
        }
    }

    /// A node for a new item, not numbered yet.
    pub(crate) fn alloc(&mut self, key: Option<Arc<str>>, item: T) -> NodeRef<T, R> {
        self.slab.alloc(|head| Node::new(head, key, item))
    }

    /// The fast path: makes a node for the item and accepts it if that needs no decision of
    /// the state lock's holder; returns a second reference to it, for the receipt, and whom
    /// to wake (nobody unless `wake`). Gives the node back unshared otherwise. Inlined into
    /// every send (see `Conveyor::send_with`).
    #[inline(always)]
    pub(crate) fn try_accept(
        &mut self,
        key: Option<Arc<str>>,
        item: T,
        wake: bool,
    ) -> Result<(NodeRef<T, R>, Wake), NodeRef<T, R>> {
        if !self.open || self.lanes_queued + self.filling.items.len() as u64 >= self.capacity {
            return Err(self.alloc(key, item));
        }
        if self.keyed {
            let filling = &mut self.filling;
            match filling.runs.last_mut() {
                Some(run)
                    if same_lane(filling.items.last().and_then(|n| n.key()), key.as_ref()) =>
                {
                    *run += 1;
                }
                _ => filling.runs.push(1),
            }
        }
        let (node, receipt) = self.slab.alloc_pair(|head| Node::new(head, key, item));
        self.number(&node);
        self.filling.items.push(node);
        // One wake-up, unless one is pending already: a woken worker drains every item and
        // wakes others if it cannot run them all (`Shared::pass_work_on`). So a burst of
        // sends costs one wake-up, and items for a single busy lane wake nobody else.
        let mut wake_up = if wake {
            self.wake_for(1)
        } else {
            Wake::default()
        };
        // The worker woken for these items (or the lookout, when `wake` is false) has not
        // taken any for thousands of sends: most likely the scheduler put it on this
        // producer's CPU, and it waits there for the producer's time slice to end (a few
        // milliseconds) while the other CPU idles. Seen in up to one burst in eight on the
        // 2-CPU virtual machines of BENCHMARKS.md (scheduler traces): everything was
        // delivered only after the burst. Yielding lets it run, and the scheduler then
        // spreads the two.
        if self.filling.items.len() % GIVE_WAY_EVERY == 0
            && (!wake || self.woken_threads > 0 || self.woken_tasks > 0)
        {
            wake_up.give_way = true;
        }
        Ok((receipt, wake_up))
    }

    /// Gives `node` the next seq.
    pub(crate) fn number(&mut self, node: &Node<T, R>) {
        node.set_seq(self.next_seq);
        self.next_seq += 1;
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.filling.items.is_empty()
    }

    /// Moves the buffered items into `into`, and in keyed mode their runs of one lane into
    /// `runs`; `into`'s own buffers, emptied, cool off until sends fill them again.
    /// `lanes_queued` is what the lanes hold now; the count kept for the fast path adds the
    /// items taken, which the caller enqueues before it releases the state lock.
    pub(crate) fn take(&mut self, into: &mut Batch<T, R>, lanes_queued: u64) {
        let mut emptied = std::mem::take(into);
        emptied.items.clear();
        emptied.runs.clear();
        *into = std::mem::replace(&mut self.filling, self.cooling.swap(emptied));
        self.lanes_queued = lanes_queued + into.items.len() as u64;
    }

    /// Refreshes the lanes' count (by a holder of the state lock; the intake's own items are
    /// counted apart).
    pub(crate) fn set_lanes_queued(&mut self, queued: u64) {
        self.lanes_queued = queued;
    }

    /// From now on every send takes the state lock (close).
    pub(crate) fn shut(&mut self) {
        self.open = false;
    }

    /// One more idle worker not woken yet, if there is one.
    pub(crate) fn wake_another(&mut self) -> Wake {
        self.wake_for(u64::MAX)
    }

    /// Idle workers to wake when `runnable` items may be waiting for them: one more per
    /// item, up to the number idle.
    pub(crate) fn wake_for(&mut self, runnable: u64) -> Wake {
        let mut wake = Wake::default();
        if self.idle_threads > self.woken_threads && runnable > self.woken_threads as u64 {
            self.woken_threads += 1;
            wake.thread = true;
        }
        if self.idle_tasks > self.woken_tasks && runnable > self.woken_tasks as u64 {
            self.woken_tasks += 1;
            wake.task = true;
        }
        wake
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(ik: &mut Intake<u32, ()>, item: u32) -> Result<Wake, NodeRef<u32, ()>> {
        ik.try_accept(None, item, true).map(|(_, wake)| wake)
    }

    /// Sends `len` items and takes them into `taken`, as a worker's drain does.
    fn send_and_take(ik: &mut Intake<u32, ()>, taken: &mut Batch<u32, ()>, len: u32) {
        for i in 0..len {
            assert!(push(ik, i).is_ok());
        }
        ik.take(taken, 0);
    }

    /// An intake after a trickle: one item a take, as when every send wakes an idle worker,
    /// for longer than its small buffers take to cool. Returns it with the batch taken last.
    fn trickled() -> (Intake<u32, ()>, Batch<u32, ()>) {
        let mut ik = Intake::<u32, ()>::new(1, 1 << 20, true, false, NodeContext::for_tests());
        let mut taken = Batch::default();
        for _ in 0..40_000 {
            send_and_take(&mut ik, &mut taken, 1);
        }
        (ik, taken)
    }

    #[test]
    fn numbers_in_order_and_refuses_past_capacity() {
        let mut ik = Intake::<u32, ()>::new(7, 3, true, false, NodeContext::for_tests());
        for i in 0..3 {
            assert!(push(&mut ik, i).is_ok());
        }
        assert!(push(&mut ik, 3).is_err(), "capacity 3 reached");
        let mut taken = Batch::default();
        ik.take(&mut taken, 0);
        let seqs: Vec<u64> = taken.items.iter().map(|n| n.seq()).collect();
        assert_eq!(seqs, vec![7, 8, 9]);
        // The three now sit in the lanes: still no room until the lanes shrink.
        assert!(push(&mut ik, 3).is_err());
        ik.set_lanes_queued(2);
        assert_eq!(push(&mut ik, 3).map(|_| ()).ok(), Some(()));
        assert_eq!(ik.next_seq(), 11);
    }

    #[test]
    fn a_burst_as_large_as_the_capacity_keeps_its_chunks_for_the_next() {
        const CAPACITY: usize = 5_000;
        let mut ik = Intake::<u32, ()>::new(1, CAPACITY, true, false, NodeContext::for_tests());
        for i in 0..CAPACITY as u32 {
            assert!(push(&mut ik, i).is_ok());
        }
        let mut taken = Batch::default();
        ik.take(&mut taken, 0);
        drop(taken);
        // Every chunk but the one the slab still hands nodes out from is empty now. Freed
        // instead, the next burst would fault their memory in again (see `slab.rs`).
        let (spares, per_chunk) = ik.slab.spares();
        assert_eq!(spares, CAPACITY.div_ceil(per_chunk) - 1);
    }

    /// Sends fill a buffer the worker emptied only once [`COOL_BYTES`] of others came back
    /// after it, and it does come back.
    #[test]
    fn a_taken_buffer_is_filled_again_only_once_cool() {
        let mut ik = Intake::<u32, ()>::new(1, 1 << 20, true, false, NodeContext::for_tests());
        let mut taken = Batch::default();
        let take = |ik: &mut Intake<u32, ()>, taken: &mut Batch<u32, ()>| {
            send_and_take(ik, taken, 1_000);
            (taken.items.as_ptr(), taken.bytes())
        };
        let (first, _) = take(&mut ik, &mut taken);
        let mut cooled_by = 0;
        for _ in 0..1_000 {
            let (buffer, bytes) = take(&mut ik, &mut taken);
            if buffer == first {
                assert!(
                    cooled_by >= COOL_BYTES,
                    "filled again after only {cooled_by} bytes of other buffers"
                );
                return;
            }
            cooled_by += bytes;
        }
        panic!("the first buffer never came back");
    }

    /// What the cooling buffers are counted as holding is what they hold, and it stays
    /// within twice the cooling distance when a trickle's small buffers give way to a
    /// burst's large ones. Each take once gave back the oldest buffer alone, so every large
    /// one stayed on top of the small one it took the place of: nearly 4 MiB after 24 takes
    /// of 16k items, and growing by 128 KiB a take until the trickle's 32768 buffers ran
    /// out.
    #[test]
    fn cooling_buffers_stay_bounded_when_batches_grow() {
        let (mut ik, mut taken) = trickled();
        for len in std::iter::once(1).chain(std::iter::repeat(16_384).take(24)) {
            send_and_take(&mut ik, &mut taken, len);
            let held: usize = ik.cooling.buffers.iter().map(Batch::bytes).sum();
            assert_eq!(ik.cooling.bytes, held, "counted as held");
            assert!(
                held <= 2 * COOL_BYTES,
                "{held} bytes cooling after a batch of {len}"
            );
        }
    }

    /// A trickle's buffers (an item or a few each) are smaller than their slots in the
    /// cooling queue. Counted without their slots, 32768 of them were kept before the first
    /// came back, in a queue of 3 MiB: 4 MiB a conveyor, for buffers counted as 1 MiB.
    #[test]
    fn a_trickle_keeps_its_cooling_buffers_and_their_slots_within_the_bound() {
        let (ik, _) = trickled();
        let buffers = &ik.cooling.buffers;
        let slots = buffers.capacity() * std::mem::size_of::<Batch<u32, ()>>();
        let held: usize = buffers
            .iter()
            .map(|b| b.items.capacity() * std::mem::size_of::<NodeRef<u32, ()>>())
            .sum();
        assert!(
            slots + held <= 2 * COOL_BYTES,
            "{} buffers of {held} bytes in {slots} bytes of slots",
            buffers.len()
        );
    }

    #[test]
    fn a_trickle_keeps_a_few_hundred_cooling_buffers_not_thousands() {
        let (ik, _) = trickled();
        let most = COOL_BYTES / MIN_COOLING_BYTES + 1;
        let kept = ik.cooling.buffers.len();
        assert!(
            kept <= most,
            "{kept} buffers cooling, at most {most} expected"
        );
    }

    #[test]
    fn a_buffer_larger_than_the_cooling_distance_is_not_kept() {
        let mut cooling = Cooling::<u32, ()>::new();
        let huge = Batch {
            items: Vec::with_capacity(COOL_BYTES),
            runs: Vec::new(),
        };
        assert_eq!(
            cooling.swap(huge).items.capacity(),
            0,
            "nothing cool yet: new buffers"
        );
        assert_eq!(cooling.bytes, 0);
        assert!(cooling.buffers.is_empty());
    }

    #[test]
    fn keyed_sends_are_taken_as_runs_of_one_lane() {
        let mut ik = Intake::<u32, ()>::new(1, 100, true, true, NodeContext::for_tests());
        let a: Arc<str> = Arc::from("a");
        // No key and the key "" share a lane; an equal key in another allocation is the same
        // key.
        let keys = [
            None,
            Some(""),
            Some("a"),
            Some("a"),
            None,
            Some("b"),
            Some("a"),
        ];
        for (i, key) in keys.into_iter().enumerate() {
            let key = key.map(|k| {
                if k == "a" && i == 2 {
                    a.clone()
                } else {
                    Arc::from(k)
                }
            });
            assert!(ik.try_accept(key, i as u32, true).is_ok());
        }
        let mut taken = Batch::default();
        ik.take(&mut taken, 0);
        assert_eq!(taken.runs, vec![2, 2, 1, 1, 1]);
        assert_eq!(taken.items.len(), keys.len());
        assert!(ik.try_accept(Some(a), 7, true).is_ok());
        ik.take(&mut taken, 0);
        assert_eq!(taken.runs, vec![1], "a new batch starts a new run");
    }

    #[test]
    fn closed_intake_sends_everything_to_the_slow_path() {
        let mut ik = Intake::<u32, ()>::new(1, 10, true, false, NodeContext::for_tests());
        ik.shut();
        assert!(push(&mut ik, 0).is_err());
        assert!(ik.is_empty());
    }

    #[test]
    fn a_burst_wakes_one_worker_and_workers_wake_the_rest() {
        let mut ik = Intake::<u32, ()>::new(1, 100, true, false, NodeContext::for_tests());
        ik.idle_threads = 2;
        let wakes: Vec<bool> = (0..3)
            .map(|i| push(&mut ik, i).ok().unwrap().thread)
            .collect();
        assert_eq!(wakes, vec![true, false, false], "one wake-up until it runs");
        assert!(ik.wake_another().thread, "a running worker passes work on");
        assert!(!ik.wake_another().thread, "both idle workers are woken");
    }

    /// Sends whose woken worker does not come for the items give way every
    /// [`GIVE_WAY_EVERY`] of them, as do sends the lookout was to see (also a lookout kept
    /// through a lease, whose worker is in its sink calls: a yield then costs little); while
    /// every worker is busy and nobody looks out, none does.
    #[test]
    fn a_burst_its_worker_does_not_take_gives_way_now_and_then() {
        let give_ways = |idle: usize, lookout: bool| {
            let mut ik = Intake::<u32, ()>::new(1, 1 << 20, true, false, NodeContext::for_tests());
            ik.idle_threads = idle;
            (1..=3 * GIVE_WAY_EVERY)
                .filter(|&i| {
                    let (_, wake) = ik.try_accept(None, i as u32, !lookout).ok().unwrap();
                    wake.give_way
                })
                .collect::<Vec<_>>()
        };
        let every = vec![GIVE_WAY_EVERY, 2 * GIVE_WAY_EVERY, 3 * GIVE_WAY_EVERY];
        assert_eq!(give_ways(1, false), every, "woken, never came");
        assert_eq!(give_ways(0, true), every, "the lookout never looked");
        assert_eq!(
            give_ways(0, false),
            Vec::<usize>::new(),
            "every worker busy"
        );

        // A take starts the count again.
        let mut ik = Intake::<u32, ()>::new(1, 1 << 20, true, false, NodeContext::for_tests());
        ik.idle_threads = 1;
        let mut taken = Batch::default();
        send_and_take(&mut ik, &mut taken, GIVE_WAY_EVERY as u32 - 1);
        assert!(!push(&mut ik, 0).ok().unwrap().give_way);
    }

    #[test]
    fn a_send_the_lookout_will_see_wakes_nobody() {
        let mut ik = Intake::<u32, ()>::new(1, 100, true, false, NodeContext::for_tests());
        ik.idle_threads = 3;
        let (_, wake) = ik.try_accept(None, 0, false).ok().unwrap();
        assert_eq!(wake, Wake::default());
        assert_eq!(ik.woken_threads, 0, "no wake-up is counted as pending");
        assert!(
            push(&mut ik, 1).ok().unwrap().thread,
            "the next send wakes one"
        );
    }
}
