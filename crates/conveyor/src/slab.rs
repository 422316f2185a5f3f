//! Where accepted items live: reference-counted nodes carved in order out of chunks, so that
//! a send does not call the allocator.
//!
//! Every accepted item has one node, shared by its lane, its receipt and the sink's
//! `Delivery`. With one `Arc` per node, `malloc` took about half of a send: the last
//! reference usually dies on a worker thread, and glibc is slow when memory is freed on
//! another thread than the one that allocated it. Here the intake (under its lock) hands
//! out nodes one after another from a chunk of a few KiB; a chunk goes back to the
//! allocator once every node in it has died. One allocation serves dozens of items, and
//! consecutive items sit side by side, in the order the worker reads them.
//!
//! A chunk whose nodes all died goes back to its slab's spares rather than to the
//! allocator: freeing it on the worker while the producer allocates the next one made the
//! two threads fight over glibc's arena lock, a syscall every few dozen items. Spares are
//! reused oldest first, and only once [`COOL_BYTES`] of other chunks emptied after them: the
//! lines of a chunk the worker just emptied are still in its cache (see `Spares::take`).
//!
//! Every node can also reach its slab's *context*, a value shared by all its nodes (the
//! conveyor's settings a receipt or a delivery needs), without a copy or a count per node.
//!
//! A slab keeps as many spare chunks as its owner's backlog may fill (the conveyor's
//! capacity), within [`SPARE_BYTES`] and [`MAX_SPARE_BYTES`], plus the [`COOL_BYTES`] that
//! wait to be reused. With fewer, a producer that ran a few thousand items ahead of its
//! worker allocated fresh chunks for every burst while the worker freed the last one's: glibc
//! gave the freed memory back to the kernel, and the producer paid a page fault every few
//! hundred sends (a quarter of a send in `send_cost`).
//!
//! The price: one long-lived node (a receipt kept for hours, an item held in a paused
//! lane) keeps its whole chunk allocated, and the memory of the largest backlog since the
//! slab was made stays with it, up to [`MAX_SPARE_BYTES`] plus [`COOL_BYTES`]. A chunk is at
//! most [`CHUNK_BYTES`] plus one node.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// About how many bytes of nodes a chunk holds (at least one node, at most [`MAX_NODES`]).
const CHUNK_BYTES: usize = 8 * 1024;
/// Beyond this a bigger chunk saves nothing measurable, and pins more memory.
const MAX_NODES: usize = 64;
/// Spare chunks every slab may keep (one at least): enough for a producer running a few
/// chunks ahead of its workers.
const SPARE_BYTES: usize = 64 * 1024;
/// Spare chunks no slab keeps more of, whatever its backlog: a burst bigger than this
/// allocates (and its end frees) the rest, as every burst did before spares followed the
/// backlog.
const MAX_SPARE_BYTES: usize = 16 * 1024 * 1024;
/// Chunks that must empty after a spare before it is reused (see `Spares::take`), and the
/// intake's buffers likewise (see `intake.rs`): about a core's L2 cache, so that the lines
/// the worker read have mostly left it by then. Chosen where cores had 512 KiB of it; with
/// 1 MiB, 4 MiB measured no better, and with 2 MiB (the machine of BENCHMARKS.md's latest
/// section) it made sends about 10% slower.
pub(crate) const COOL_BYTES: usize = 1024 * 1024;

/// At the start of every chunk; `C` is its slab's context type.
///
/// Aligned to a cache line, as the nodes after it then are: a node of 64 bytes (an engine
/// node of a `u64` item with `()` replies) takes one line, not parts of two, and the worker
/// fetches one line per item from the producer's core.
#[repr(C, align(64))]
struct ChunkHead<C> {
    /// Drops a node of this chunk and gives its count back. First, so that a reference that
    /// does not know the node's type can find it.
    destroy: unsafe fn(NonNull<Head>),
    /// Nodes of this chunk not dropped yet, counting those not handed out, plus one while
    /// the slab may still hand out nodes from it. Whoever takes it to zero retires the chunk.
    live: AtomicUsize,
    /// Where the chunk goes when it is empty. Taken out then, so that spare chunks do not
    /// keep their own list alive.
    home: ManuallyDrop<Arc<Spares<C>>>,
}

/// Empty chunks of one layout, kept for their slab to reuse, and the slab's context.
struct Spares<C> {
    /// Oldest first (see `take`).
    chunks: Mutex<VecDeque<NonNull<ChunkHead<C>>>>,
    layout: Layout,
    /// How many chunks the backlog may fill (see [`Slab::with_backlog`]; one at least, for
    /// huge nodes).
    max: usize,
    /// How many chunks must empty after a spare before it is reused: [`COOL_BYTES`] of them.
    /// Kept on top of `max`.
    cool: usize,
    context: C,
}

// The chunks listed are empty memory, owned by the list.
unsafe impl<C: Send> Send for Spares<C> {}
unsafe impl<C: Sync> Sync for Spares<C> {}

impl<C> Spares<C> {
    /// Keeps an empty chunk for reuse, or frees it if enough are kept.
    ///
    /// # Safety
    ///
    /// `chunk` has this layout, holds no live node, and nobody else uses it.
    unsafe fn put(&self, chunk: NonNull<ChunkHead<C>>) {
        let mut chunks = self.chunks.lock().unwrap_or_else(PoisonError::into_inner);
        if chunks.len() < self.max + self.cool {
            chunks.push_back(chunk);
        } else {
            drop(chunks);
            dealloc(chunk.as_ptr().cast(), self.layout);
        }
    }

    /// How many empty chunks are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.chunks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The empty chunk that emptied first, once `cool` others emptied after it. Not the last:
    /// a worker that keeps pace with its producer empties a chunk moments before the producer
    /// needs one, and that chunk's lines are still in the worker's cache. Writing nodes into
    /// them, the producer waited for a line from the other core at every locked operation of
    /// a send (its intake lock, its receipt's count): a send cost twice what it did with the
    /// worker further behind. Nor the first alone: with the worker that close behind, a few
    /// chunks went round between the two threads, and the oldest had emptied microseconds
    /// before. The producer, slowed down, then never got ahead of the worker again: end to end
    /// took 5-7 ms per 100k items instead of 2.7 in a quarter of the conveyors (see
    /// BENCHMARKS.md, bench `steady`).
    fn take(&self) -> Option<NonNull<ChunkHead<C>>> {
        let mut chunks = self.chunks.lock().unwrap_or_else(PoisonError::into_inner);
        if chunks.len() > self.cool {
            chunks.pop_front()
        } else {
            None
        }
    }
}

impl<C> Drop for Spares<C> {
    fn drop(&mut self) {
        let chunks = self
            .chunks
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for chunk in chunks.drain(..) {
            // SAFETY: listed chunks are empty and owned by the list.
            unsafe { dealloc(chunk.as_ptr().cast(), self.layout) };
        }
    }
}

/// Gives up `n` of a chunk's `live` counts, retiring it with the last one.
///
/// # Safety
///
/// `chunk` is a live chunk and the caller owns `n` of its counts.
unsafe fn release_chunk<C>(chunk: NonNull<ChunkHead<C>>, n: usize) {
    // Release: the node drops before this happen before the reuse (Acquire below).
    if chunk.as_ref().live.fetch_sub(n, Ordering::Release) == n {
        fence(Ordering::Acquire);
        let home = ManuallyDrop::take(&mut (*chunk.as_ptr()).home);
        home.put(chunk);
    }
}

/// The first field of every node: its reference count and its chunk, through which it is
/// dropped without its type (receipts and deliveries name only half of a node's type
/// parameters) and reaches its slab's context.
#[repr(C)]
pub(crate) struct Head {
    refs: AtomicUsize,
    /// A `ChunkHead<C>` of the node's context type `C`.
    chunk: NonNull<u8>,
}

// The chunk is only used through its atomic count and its shared, `Sync` context.
unsafe impl Send for Head {}
unsafe impl Sync for Head {}

impl Head {
    /// The context of the slab this node came from.
    ///
    /// # Safety
    ///
    /// `C` is that slab's context type, and the node is alive.
    pub(crate) unsafe fn context<C>(&self) -> &C {
        &self.chunk.cast::<ChunkHead<C>>().as_ref().home.context
    }
}

/// A node type whose first field, at offset 0, is its [`Head`].
///
/// # Safety
///
/// The implementor is `#[repr(C)]` with a `Head` as its first field, so that a pointer to
/// the node is a pointer to its head.
pub(crate) unsafe trait Headed: Sized {
    /// What every node of a slab can reach (see [`Head::context`]).
    type Context: Send + Sync;
}

/// Drops the node of type `N` that starts at `head`, then its chunk count.
///
/// # Safety
///
/// `head` starts a live `N` whose last reference is gone.
unsafe fn destroy<N: Headed>(head: NonNull<Head>) {
    /// Gives the node's chunk count back even if the node's drop panics: the drop glue has
    /// dropped every field by the time the unwind leaves `drop_in_place`. Without it one
    /// panicking item would leak its chunk, and through it the spares and the context.
    struct GiveBack<C>(NonNull<ChunkHead<C>>);
    impl<C> Drop for GiveBack<C> {
        fn drop(&mut self) {
            // SAFETY: the node owned one count of this live chunk, and is gone.
            unsafe { release_chunk(self.0, 1) }
        }
    }
    let _give_back = GiveBack(head.as_ref().chunk.cast::<ChunkHead<N::Context>>());
    std::ptr::drop_in_place(head.cast::<N>().as_ptr());
}

/// Gives up one reference to the node of `head`; returns whether it was the last, whose
/// owner must then drop the node.
///
/// # Safety
///
/// The caller owns one of the node's references.
unsafe fn let_go(head: NonNull<Head>) -> bool {
    // As `Arc`: Release so that every use through this reference happens before the drop,
    // which the last one's Acquire fence orders after them. Through a pointer, not a `&Head`
    // argument: the node must not stay borrowed until this returns, as once the count went
    // down another thread may drop it (the `Arc` bug rust-lang/rust#55005; Miri reports it).
    let last = head.as_ref().refs.fetch_sub(1, Ordering::Release) == 1;
    if last {
        fence(Ordering::Acquire);
    }
    last
}

/// Drops one reference to the node at `head`, destroying it with the last one.
///
/// # Safety
///
/// The caller owns one of the node's references.
unsafe fn release(head: NonNull<Head>) {
    if let_go(head) {
        // `ChunkHead::destroy` comes first in every chunk.
        let destroy = head
            .as_ref()
            .chunk
            .cast::<unsafe fn(NonNull<Head>)>()
            .read();
        destroy(head);
    }
}

/// Hands out nodes of type `N` in order from its current chunk.
pub(crate) struct Slab<N: Headed> {
    /// The chunk nodes come from, with the slab's own count on it.
    chunk: Option<NonNull<ChunkHead<N::Context>>>,
    /// Empty chunks to reuse before allocating, and the context.
    spares: Arc<Spares<N::Context>>,
    /// The chunk's first node.
    nodes: NonNull<N>,
    next: usize,
    len: usize,
    _owns: PhantomData<N>,
}

// The slab owns its chunk's count; the nodes it makes are `Node`s, `Send` on their own terms.
unsafe impl<N: Headed + Send> Send for Slab<N> {}

impl<N: Headed> Slab<N> {
    /// A slab that keeps [`SPARE_BYTES`] of spare chunks, and reuses one as soon as it
    /// empties (cooling is tested apart, see [`Slab::cooling`]).
    #[cfg(test)]
    pub(crate) fn new(context: N::Context) -> Self {
        Self::cooling(context, 0)
    }

    /// A slab that keeps [`SPARE_BYTES`] of spare chunks, and reuses one once `cool` others
    /// emptied after it.
    #[cfg(test)]
    fn cooling(context: N::Context, cool: usize) -> Self {
        let size = Self::layout().0.size();
        Self::with_spares(context, (SPARE_BYTES / size).max(1), cool)
    }

    /// A slab that keeps enough spare chunks for `backlog` nodes, within [`SPARE_BYTES`] and
    /// [`MAX_SPARE_BYTES`], and [`COOL_BYTES`] more (see the module doc).
    pub(crate) fn with_backlog(context: N::Context, backlog: usize) -> Self {
        let (layout, _, len) = Self::layout();
        let size = layout.size();
        let max = backlog
            .div_ceil(len)
            .clamp(SPARE_BYTES / size, MAX_SPARE_BYTES / size)
            .max(1);
        Self::with_spares(context, max, COOL_BYTES / size)
    }

    fn with_spares(context: N::Context, max: usize, cool: usize) -> Self {
        let layout = Self::layout().0;
        Self {
            chunk: None,
            spares: Arc::new(Spares {
                chunks: Mutex::new(VecDeque::new()),
                layout,
                max,
                cool,
                context,
            }),
            nodes: NonNull::dangling(),
            next: 0,
            len: 0,
            _owns: PhantomData,
        }
    }

    /// How many empty chunks the slab keeps for reuse now, and how many nodes a chunk holds.
    #[cfg(test)]
    pub(crate) fn spares(&self) -> (usize, usize) {
        (self.spares.len(), Self::layout().2)
    }

    /// The layout of a chunk of `len` nodes, and where its first node starts.
    fn layout() -> (Layout, usize, usize) {
        let len = (CHUNK_BYTES / std::mem::size_of::<N>().max(1)).clamp(1, MAX_NODES);
        let nodes = Layout::array::<N>(len).expect("a chunk of nodes fits in memory");
        let (layout, offset) = Layout::new::<ChunkHead<N::Context>>()
            .extend(nodes)
            .expect("a chunk of nodes fits in memory");
        (layout.pad_to_align(), offset, len)
    }

    /// Moves on to a fresh chunk, letting go of the current one.
    fn refill(&mut self) {
        self.retire();
        let (layout, offset, len) = Self::layout();
        let chunk = self.spares.take().unwrap_or_else(|| {
            // SAFETY: the layout has a non-zero size (a `ChunkHead` at least).
            let raw = unsafe { alloc(layout) };
            NonNull::new(raw.cast()).unwrap_or_else(|| handle_alloc_error(layout))
        });
        // SAFETY: memory of this layout (fresh, or a spare nobody else holds) for a head
        // followed by `len` nodes; a spare's old head was moved out when it emptied.
        unsafe {
            chunk.as_ptr().write(ChunkHead {
                destroy: destroy::<N>,
                live: AtomicUsize::new(len + 1),
                home: ManuallyDrop::new(self.spares.clone()),
            });
            self.nodes =
                NonNull::new_unchecked(chunk.as_ptr().cast::<u8>().add(offset).cast::<N>());
        }
        self.chunk = Some(chunk);
        self.next = 0;
        self.len = len;
    }

    /// A new node, made by `make` from its head, with one reference: the one returned.
    pub(crate) fn alloc(&mut self, make: impl FnOnce(Head) -> N) -> Counted<N> {
        self.alloc_counted(1, make)
    }

    /// A new node with two references, both returned: one atomic operation fewer than
    /// cloning the first.
    #[inline]
    pub(crate) fn alloc_pair(&mut self, make: impl FnOnce(Head) -> N) -> (Counted<N>, Counted<N>) {
        let node = self.alloc_counted(2, make);
        let twin = Counted {
            node: node.node,
            _owns: PhantomData,
        };
        (node, twin)
    }

    // Inlined (with `alloc_pair`), so that `make` writes the key and item from the caller's
    // registers into the node. Called, it read them back from the stack in loads wider
    // than the stores that put them there, which then waited for every store before them
    // (the last node's, to lines the worker had) to reach the cache.
    #[inline]
    fn alloc_counted(&mut self, refs: usize, make: impl FnOnce(Head) -> N) -> Counted<N> {
        if self.next == self.len {
            self.refill();
        }
        let chunk = self.chunk.expect("refilled above");
        let head = Head {
            refs: AtomicUsize::new(refs),
            chunk: chunk.cast(),
        };
        // SAFETY: `next < len`, so this slot is in the chunk and was never handed out.
        let node = unsafe {
            let slot = self.nodes.add(self.next);
            slot.as_ptr().write(make(head));
            slot
        };
        self.next += 1;
        Counted {
            node,
            _owns: PhantomData,
        }
    }
}

impl<N: Headed> Slab<N> {
    /// Gives up the slab's hold on its chunk, and the counts of the nodes never handed out.
    fn retire(&mut self) {
        if let Some(chunk) = self.chunk.take() {
            // SAFETY: the slab owns one count plus one per node not handed out.
            unsafe { release_chunk(chunk, self.len - self.next + 1) };
        }
    }
}

impl<N: Headed> Drop for Slab<N> {
    fn drop(&mut self) {
        self.retire();
    }
}

/// One counted reference to a node, as `Arc<N>` is to its value.
pub(crate) struct Counted<N: Headed> {
    node: NonNull<N>,
    _owns: PhantomData<N>,
}

// As `Arc<N>`: sharing the node across threads needs `N: Send + Sync`.
unsafe impl<N: Headed + Send + Sync> Send for Counted<N> {}
unsafe impl<N: Headed + Send + Sync> Sync for Counted<N> {}

impl<N: Headed> Counted<N> {
    /// Where the node lives, for [`Counted::borrow_raw`].
    pub(crate) fn as_ptr(&self) -> NonNull<N> {
        self.node
    }

    /// A reference to the node at `node` that does not own a count: it gives nothing back
    /// when dropped.
    ///
    /// # Safety
    ///
    /// `node` came from [`Counted::as_ptr`], and another reference keeps the node alive for as
    /// long as the one returned is used.
    pub(crate) unsafe fn borrow_raw(node: NonNull<N>) -> ManuallyDrop<Self> {
        ManuallyDrop::new(Self {
            node,
            _owns: PhantomData,
        })
    }

    fn head(&self) -> &Head {
        // SAFETY: `Headed` puts the head at the start of the node, which is alive while
        // this reference is.
        unsafe { self.node.cast::<Head>().as_ref() }
    }

    /// Whether this is the node's only reference (as `Arc::strong_count(..) == 1`), with the
    /// uses through the references dropped before happening before whatever follows.
    pub(crate) fn only_reference(&self) -> bool {
        self.head().refs.load(Ordering::Acquire) == 1
    }

    /// The node itself, if this is its only reference (as `Arc::try_unwrap`).
    pub(crate) fn try_unwrap(self) -> Result<N, Self> {
        self.into_unique().map(Unique::into_inner)
    }

    /// This reference as the node's owner, if it is the only one: the node can then be used
    /// mutably and dropped in place without an atomic operation on its count.
    pub(crate) fn into_unique(self) -> Result<Unique<N>, Self> {
        // A load is enough: with the only reference held here, nobody can make another.
        if !self.only_reference() {
            return Err(self);
        }
        let this = ManuallyDrop::new(self);
        Ok(Unique { node: this.node })
    }

    /// Turns this reference into one that does not name the node's type.
    pub(crate) fn erase(self) -> Erased
    where
        N: Send + Sync,
    {
        let this = std::mem::ManuallyDrop::new(self);
        Erased {
            head: this.node.cast(),
        }
    }
}

impl<N: Headed> Counted<N> {
    /// Drops this reference as `drop` does, but the chunk count of a node that dies here goes
    /// to `returns`, to be given back with its neighbours'. The only reference takes no atomic
    /// operation on the node's count.
    pub(crate) fn drop_into(self, returns: &mut Returns<N::Context>) {
        let this = ManuallyDrop::new(self);
        // SAFETY: this reference is owned and given up once.
        if this.only_reference() || unsafe { let_go(this.node.cast()) } {
            // Counted before the node drops, which may panic (see `destroy`).
            returns.add(this.head().chunk.cast());
            // SAFETY: the last reference, given up once.
            unsafe { std::ptr::drop_in_place(this.node.as_ptr()) };
        }
    }
}

/// Chunk counts of dropped nodes, given back together: nodes dropped one after another mostly
/// come from one chunk, and one atomic operation then gives back all of theirs (see
/// [`Counted::drop_into`]). The counts go back when the next node is of another chunk, and
/// when this drops.
pub(crate) struct Returns<C> {
    chunk: Option<NonNull<ChunkHead<C>>>,
    count: usize,
}

impl<C> Returns<C> {
    pub(crate) fn new() -> Self {
        Self {
            chunk: None,
            count: 0,
        }
    }

    fn add(&mut self, chunk: NonNull<ChunkHead<C>>) {
        if self.chunk != Some(chunk) {
            self.give_back();
            self.chunk = Some(chunk);
        }
        self.count += 1;
    }

    fn give_back(&mut self) {
        if let Some(chunk) = self.chunk.take() {
            // SAFETY: each count added was a dead node's, owned here since.
            unsafe { release_chunk(chunk, std::mem::take(&mut self.count)) };
        }
    }
}

impl<C> Drop for Returns<C> {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl<N: Headed> Clone for Counted<N> {
    fn clone(&self) -> Self {
        // Relaxed as in `Arc::clone`: a new reference comes from an existing one.
        self.head().refs.fetch_add(1, Ordering::Relaxed);
        Self {
            node: self.node,
            _owns: PhantomData,
        }
    }
}

impl<N: Headed> Deref for Counted<N> {
    type Target = N;

    fn deref(&self) -> &N {
        // SAFETY: the node lives at least as long as this reference.
        unsafe { self.node.as_ref() }
    }
}

impl<N: Headed> Drop for Counted<N> {
    fn drop(&mut self) {
        // SAFETY: this reference is owned and given up once.
        unsafe { release(self.node.cast()) }
    }
}

/// The only reference to a node, which it owns as a `Box` owns its value (see
/// [`Counted::into_unique`]).
pub(crate) struct Unique<N: Headed> {
    node: NonNull<N>,
}

impl<N: Headed> Unique<N> {
    /// Moves the node out, giving its memory back to its chunk.
    pub(crate) fn into_inner(self) -> N {
        let this = ManuallyDrop::new(self);
        // SAFETY: the node is live and owned here alone; it is moved out exactly once, then
        // its memory is given back.
        unsafe {
            let chunk = this
                .node
                .cast::<Head>()
                .as_ref()
                .chunk
                .cast::<ChunkHead<N::Context>>();
            let node = this.node.as_ptr().read();
            release_chunk(chunk, 1);
            node
        }
    }
}

impl<N: Headed> Deref for Unique<N> {
    type Target = N;

    fn deref(&self) -> &N {
        // SAFETY: the node lives as long as this owner.
        unsafe { self.node.as_ref() }
    }
}

impl<N: Headed> DerefMut for Unique<N> {
    fn deref_mut(&mut self) -> &mut N {
        // SAFETY: as in `deref`, and no other reference exists.
        unsafe { self.node.as_mut() }
    }
}

impl<N: Headed> Drop for Unique<N> {
    fn drop(&mut self) {
        // SAFETY: the last reference, given up once. Dropped in place: moving the node out
        // first made the worker copy the whole node for nothing.
        unsafe { destroy::<N>(self.node.cast()) }
    }
}

/// A counted reference to a node whose type it does not name.
///
/// Whoever makes one from a [`Counted`] decides where it may go: it is `Send` and `Sync`
/// because the only ones made are of nodes that are (see `receipt.rs`).
pub(crate) struct Erased {
    head: NonNull<Head>,
}

// See the type's doc: the constructors of its users require `Send + Sync` nodes.
unsafe impl Send for Erased {}
unsafe impl Sync for Erased {}

impl Erased {
    /// The start of the node, to be cast back by one who knows a prefix of its layout.
    pub(crate) fn as_ptr(&self) -> NonNull<Head> {
        self.head
    }

    /// A reference to the node at `head` as if it owned a count; whoever makes one decides
    /// whether it does (dropping one that does not would give back a count it never had).
    ///
    /// # Safety
    ///
    /// `head` starts a live node, and the reference is not dropped unless it owns a count.
    pub(crate) unsafe fn from_raw(head: NonNull<Head>) -> Self {
        Self { head }
    }
}

impl Clone for Erased {
    fn clone(&self) -> Self {
        // SAFETY: the head is alive while this reference is.
        unsafe { self.head.as_ref() }
            .refs
            .fetch_add(1, Ordering::Relaxed);
        Self { head: self.head }
    }
}

impl Drop for Erased {
    fn drop(&mut self) {
        // SAFETY: this reference is owned and given up once.
        unsafe { release(self.head) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize as Count;
    use std::sync::Arc;

    /// A node that counts its drops.
    #[repr(C)]
    struct Probe {
        head: Head,
        value: u64,
        drops: Arc<Count>,
    }
    unsafe impl Headed for Probe {
        type Context = &'static str;
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            self.drops.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn probe(slab: &mut Slab<Probe>, value: u64, drops: &Arc<Count>) -> Counted<Probe> {
        slab.alloc(|head| Probe {
            head,
            value,
            drops: drops.clone(),
        })
    }

    #[test]
    fn every_node_drops_once_across_chunks_and_threads() {
        let drops = Arc::new(Count::new(0));
        let mut slab = Slab::new("probes");
        let n = 3 * MAX_NODES as u64 + 5;
        let nodes: Vec<_> = (0..n).map(|i| probe(&mut slab, i, &drops)).collect();
        assert!(nodes.iter().enumerate().all(|(i, r)| r.value == i as u64));
        // SAFETY: the probes' context is a `&str`.
        assert_eq!(
            unsafe { *nodes[n as usize - 1].head.context::<&str>() },
            "probes"
        );
        let erased: Vec<_> = nodes.iter().map(|r| r.clone().erase()).collect();
        drop(slab);
        let handle = std::thread::spawn(move || drop(nodes));
        handle.join().unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 0, "erased copies keep them");
        let copies: Vec<_> = erased.to_vec();
        drop(erased);
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        drop(copies);
        assert_eq!(drops.load(Ordering::SeqCst), n as usize);
    }

    #[test]
    fn an_emptied_chunk_is_reused_instead_of_freed() {
        let drops = Arc::new(Count::new(0));
        let mut slab = Slab::new("probes");
        let len = Slab::<Probe>::layout().2;
        let first: Vec<_> = (0..len as u64)
            .map(|i| probe(&mut slab, i, &drops))
            .collect();
        let address = |r: &Counted<Probe>| &**r as *const Probe as usize;
        let start = address(&first[0]);
        drop(first);
        // The full chunk is retired by the next allocation and, empty, taken right back.
        let again = probe(&mut slab, 99, &drops);
        assert_eq!(address(&again), start);
        assert_eq!(again.value, 99);
        assert_eq!(drops.load(Ordering::SeqCst), len);
    }

    /// Spare chunks are reused oldest first: the one that emptied last may still be in the
    /// cache of the worker that emptied it (see `Spares::take`).
    #[test]
    fn spare_chunks_are_reused_in_the_order_they_emptied() {
        let drops = Arc::new(Count::new(0));
        let mut slab = Slab::new("probes");
        let len = Slab::<Probe>::layout().2;
        let address = |r: &Counted<Probe>| &**r as *const Probe as usize;
        // Three full chunks (the slab moves on from each at the next allocation).
        let fill = |slab: &mut Slab<Probe>| -> Vec<Vec<_>> {
            (0..3)
                .map(|_| (0..len as u64).map(|i| probe(slab, i, &drops)).collect())
                .collect()
        };
        let mut chunks = fill(&mut slab);
        let starts: Vec<usize> = chunks.iter().map(|c| address(&c[0])).collect();
        // They empty in the order 1, 0, 2.
        for c in [1, 0, 2] {
            chunks[c].clear();
        }
        let again = fill(&mut slab);
        let reused: Vec<usize> = again.iter().map(|c| address(&c[0])).collect();
        assert_eq!(reused, vec![starts[1], starts[0], starts[2]]);
        drop(again);
        assert_eq!(drops.load(Ordering::SeqCst), 6 * len);
    }

    /// Nor is the oldest spare reused before `cool` other chunks emptied after it: a worker
    /// close behind its producer emptied it moments ago (see `Spares::take`).
    #[test]
    fn a_spare_waits_for_others_to_empty_before_it_is_reused() {
        let drops = Arc::new(Count::new(0));
        let mut slab = Slab::cooling("probes", 3);
        let len = Slab::<Probe>::layout().2;
        let address = |r: &Counted<Probe>| &**r as *const Probe as usize;
        let fill = |slab: &mut Slab<Probe>| -> Vec<_> {
            (0..len as u64).map(|i| probe(slab, i, &drops)).collect()
        };
        let first: Vec<Vec<_>> = (0..3).map(|_| fill(&mut slab)).collect();
        let starts: Vec<usize> = first.iter().map(|c| address(&c[0])).collect();
        drop(first);
        // Three spares (the third retired by this allocation): none has three behind it.
        let fourth = fill(&mut slab);
        assert!(!starts.contains(&address(&fourth[0])), "a fresh chunk");
        drop(fourth);
        // The fourth emptied as well: the first has three behind it now.
        let again = probe(&mut slab, 99, &drops);
        assert_eq!(address(&again), starts[0]);
        drop(again);
        assert_eq!(drops.load(Ordering::SeqCst), 4 * len + 1);
    }

    #[test]
    fn try_unwrap_moves_a_node_out_only_when_unshared() {
        let drops = Arc::new(Count::new(0));
        let mut slab = Slab::new("probes");
        let (node, copy) = slab.alloc_pair(|head| Probe {
            head,
            value: 7,
            drops: drops.clone(),
        });
        let node = node.try_unwrap().err().expect("shared");
        drop(copy);
        let probe = node.try_unwrap().ok().expect("unshared");
        assert_eq!(probe.value, 7);
        assert_eq!(drops.load(Ordering::SeqCst), 0, "moved out, not dropped");
        drop(probe);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_unique_owner_changes_the_node_in_place_and_drops_it_once() {
        let drops = Arc::new(Count::new(0));
        let mut slab = Slab::new("probes");
        let len = Slab::<Probe>::layout().2;
        let mut nodes: Vec<_> = (0..len as u64)
            .map(|i| probe(&mut slab, i, &drops))
            .collect();
        let start = &*nodes[0] as *const Probe as usize;
        let copy = nodes[0].clone();
        let first = nodes.remove(0).into_unique().err().expect("shared");
        drop(copy);
        let mut first = first.into_unique().ok().expect("unshared");
        first.value = 42;
        assert_eq!((&*first as *const Probe as usize, first.value), (start, 42));
        drop(first);
        assert_eq!(drops.load(Ordering::SeqCst), 1, "dropped in place");
        let uniques: Vec<_> = nodes
            .into_iter()
            .map(|n| n.into_unique().ok().unwrap())
            .collect();
        drop(uniques);
        assert_eq!(drops.load(Ordering::SeqCst), len);
        // Every node gave its chunk count back: the chunk is taken back for the next node.
        let again = probe(&mut slab, 7, &drops);
        assert_eq!(&*again as *const Probe as usize, start);
    }

    /// An over-aligned node with a payload that checks itself.
    #[repr(C)]
    struct Wide {
        head: Head,
        payload: Aligned,
        drops: Arc<Count>,
    }
    #[repr(C, align(256))]
    struct Aligned([u64; 40]);
    unsafe impl Headed for Wide {
        type Context = String;
    }
    impl Drop for Wide {
        fn drop(&mut self) {
            let first = self.payload.0[0];
            assert!(self.payload.0.iter().all(|&x| x == first), "torn node");
            self.payload.0 = [u64::MAX; 40];
            self.drops.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn reused_chunks_under_cross_thread_drops_keep_every_node_intact() {
        use std::sync::mpsc;
        let drops = Arc::new(Count::new(0));
        let n: u64 = if std::env::var_os("VALGRIND").is_some() {
            3_000
        } else {
            100_000
        };
        let mut slab = Slab::<Wide>::new("wide".to_owned());
        let (txs, handles): (Vec<_>, Vec<_>) = (0..3)
            .map(|t| {
                let (tx, rx) = mpsc::channel::<(Counted<Wide>, Erased)>();
                let handle = std::thread::spawn(move || {
                    let mut held = std::collections::VecDeque::new();
                    let mut state = 0x2545_f491_u64 + t;
                    for (node, erased) in rx {
                        assert_eq!(node.payload.0[0], node.payload.0[39]);
                        assert_eq!(node.payload.0.as_ptr() as usize % 256, 0);
                        // SAFETY: the context of these nodes is a `String`.
                        assert_eq!(
                            unsafe { erased.as_ptr().as_ref().context::<String>() },
                            "wide"
                        );
                        held.push_back((node, erased));
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        // Hold a random number of nodes; drop the two references in a random order.
                        while held.len() > (state % 200) as usize {
                            let (node, erased) = held.pop_front().unwrap();
                            if state & 1 == 0 {
                                drop(node);
                                drop(erased);
                            } else {
                                drop(erased);
                                drop(node);
                            }
                        }
                    }
                });
                (tx, handle)
            })
            .unzip();
        for i in 0..n {
            let (node, twin) = slab.alloc_pair(|head| Wide {
                head,
                payload: Aligned([i; 40]),
                drops: drops.clone(),
            });
            let erased = twin.erase();
            if i % 11 == 0 {
                // Some never leave this thread, some are unwrapped here.
                drop(erased);
                match node.try_unwrap() {
                    Ok(wide) => assert_eq!(wide.payload.0[7], i),
                    Err(_) => unreachable!("unshared"),
                }
                continue;
            }
            txs[(i % 3) as usize].send((node, erased)).unwrap();
            if i == n / 2 {
                // A new slab mid-way: the old one's spares and context must live on.
                slab = Slab::new("wide".to_owned());
            }
        }
        drop(slab);
        drop(txs);
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(drops.load(Ordering::SeqCst), n as usize);
    }

    /// A context that says when its slab's spares list is gone.
    struct Flagged(Arc<Count>);
    impl Drop for Flagged {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[repr(C)]
    struct Grenade {
        head: Head,
        live: bool,
    }
    unsafe impl Headed for Grenade {
        type Context = Flagged;
    }
    impl Drop for Grenade {
        fn drop(&mut self) {
            if self.live {
                panic!("grenade");
            }
        }
    }

    #[test]
    fn a_node_whose_drop_panics_still_gives_its_chunk_back() {
        let gone = Arc::new(Count::new(0));
        let mut slab = Slab::new(Flagged(gone.clone()));
        let calm = slab.alloc(|head| Grenade { head, live: false });
        let live = slab.alloc(|head| Grenade { head, live: true });
        let erased = live.erase();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(erased)));
        assert!(unwound.is_err(), "the drop panicked");
        drop(slab);
        assert_eq!(gone.load(Ordering::SeqCst), 0, "a node is still alive");
        drop(calm);
        // Every node died: the chunk went back to its spares, and the spares (with the
        // context) went away with the last reference to them.
        assert_eq!(
            gone.load(Ordering::SeqCst),
            1,
            "the panicking node leaked its chunk"
        );
    }

    /// The two references of each node dropped on two threads at once, each way a reference
    /// drops (`Counted`, `Erased`, `drop_into`): whichever is last drops the node while the
    /// other may still be inside its own release. Meant for Miri (`cargo +nightly miri test
    /// -p conveyor --lib slab::`), which caught a release that kept the node borrowed past its
    /// count's decrement; natively it checks that every node drops once.
    #[test]
    fn references_released_on_two_threads_at_once_drop_the_node_once() {
        const ROUNDS: u64 = if cfg!(miri) { 30 } else { 300 };
        let drops = Arc::new(Count::new(0));
        let mut slab = Slab::new("probes");
        for round in 0..ROUNDS {
            let (node, twin) = slab.alloc_pair(|head| Probe {
                head,
                value: round,
                drops: drops.clone(),
            });
            let start = std::sync::Barrier::new(2);
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    start.wait();
                    match round % 3 {
                        0 => drop(twin),
                        1 => drop(twin.erase()),
                        _ => twin.drop_into(&mut Returns::new()),
                    }
                });
                start.wait();
                drop(node);
            });
            assert_eq!(drops.load(Ordering::SeqCst), round as usize + 1);
        }
    }
}
