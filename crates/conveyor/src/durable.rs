//! The engine's side of the journal: encoding items, the writer thread that group-commits
//! what the engine accepts and settles, and the wait of [`Durability::Sync`].
//!
//! The engine pushes one [`Op`] per event while it holds its state lock, so the writer sees
//! appends in seq order and every settlement after the append it settles. The writer blocks
//! for the first op, gathers the rest of its commit window, and commits them in one
//! transaction (one fsync for the group).
//!
//! An item reaches the sink only once its append is committed (the workers wait for it, see
//! `Durable::is_committed`): delivered before, it could be lost in a crash after its delivery,
//! and come back from the producer's input as a new item with a new seq, which no receiver could
//! tell from a new one.
//!
//! Seqs are reserved in the journal ahead of use (`Durable::seq_limit`): after a crash, a seq
//! that was handed out but not committed must not be handed to another item, or receivers that
//! drop seqs they have seen would drop new items.
//!
//! This is why a journaled conveyor has no fast path: sends that skip the state lock (the
//! intake, `intake.rs`) are turned off with a journal. Turning them on would mean moving the
//! `Append` push to where the intake assigns seqs, keeping both orders above.

use std::collections::{HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::alarm::Alarm;
use crate::error::{panic_message, BuildError};
use crate::journal::{Journal, JournalError, WriteBatch};
pub(crate) use crate::ops::Op;
use crate::ops::{Answer, OpQueue, Until};

/// When an item accepted by `send` is on disk. Only used with a journal
/// ([`Builder::journal`](crate::Builder::journal)).
///
/// # Examples
///
/// ```
/// use conveyor::{Conveyor, Durability};
/// use std::time::Duration;
///
/// let dir = tempfile::tempdir()?;
/// let c: Conveyor<String> = Conveyor::builder()
///     .journal(dir.path().join("events.journal"))
///     .durability(Durability::Batched(Duration::from_millis(20)))
///     .build(|d| { println!("{}", d.item()); Ok(()) })?;
/// c.send("kept across a crash".to_owned()).unwrap();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// `send` returns at once; a writer thread commits accepted items in groups, gathering
    /// each group for this long. A crash loses the items accepted since the last commit, none
    /// of which has reached the sink: an item is delivered only once it is committed (a worker
    /// that takes one sooner has the writer commit at once). That is about one window on a
    /// healthy disk, and more while the disk is slow, as each commit waits for its `fsync`
    /// first; the writes waiting for the disk are bounded (by the capacity, within 1,024 and
    /// 65,536), and past that new items wait for the writer as for room in a full queue:
    /// under [`Backpressure::Block`](crate::Backpressure::Block) `send` waits, `try_send` and
    /// `Reject` refuse them as full, and the drop policies drop them. `flush_timeout`,
    /// `close_timeout` and the other calls with a deadline keep to it however slow the disk.
    /// The default, with 5 ms.
    Batched(Duration),
    /// `send` returns once the item is committed (`send_async` awaits the commit, leaving its
    /// thread free for other tasks). Concurrent sends share one commit, so many
    /// producers still reach a high rate. If that commit fails (disk full), the send waits
    /// while the writer retries, like a send blocked on a full queue, until the commit succeeds
    /// or the conveyor closes; other sends are refused meanwhile.
    Sync,
}

impl Default for Durability {
    fn default() -> Self {
        Durability::Batched(Duration::from_millis(5))
    }
}

/// How items become journal payloads and back: serde_json, instantiated for `T` where the
/// builder still knows `T: Serialize + DeserializeOwned` (the engine itself does not).
pub(crate) struct Codec<T> {
    pub(crate) encode: fn(&T) -> Result<Vec<u8>, String>,
    pub(crate) decode: fn(&[u8]) -> Result<T, String>,
}

impl<T> Clone for Codec<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Codec<T> {}

impl<T: Serialize + DeserializeOwned> Codec<T> {
    pub(crate) fn json() -> Self {
        Codec {
            encode: |item| serde_json::to_vec(item).map_err(|e| e.to_string()),
            decode: |bytes| serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        }
    }
}

/// What the builder collects for a journal.
pub(crate) struct JournalSettings<T> {
    pub(crate) path: PathBuf,
    pub(crate) codec: Codec<T>,
}

impl<T> Clone for JournalSettings<T> {
    fn clone(&self) -> Self {
        JournalSettings {
            path: self.path.clone(),
            codec: self.codec,
        }
    }
}

/// What the writer has achieved, for `Sync` senders and for `send`'s error check (how far it
/// committed is `Durable::committed`, stored under this lock so that its waiters see it).
struct Progress {
    /// The last commit's error, until a commit succeeds again.
    error: Option<Arc<JournalError>>,
    /// The writer has exited: nobody waits for it any more.
    stopped: bool,
    /// `shut_down` gave up on a writer stuck in a commit (a hung disk): nobody waits for it
    /// either, though it may still commit once the disk answers.
    given_up: bool,
}

impl Progress {
    /// Whether waiting for the writer is over: what it has not committed, nobody waits for.
    fn over(&self) -> bool {
        self.stopped || self.given_up
    }
}

/// A journal attached to a running conveyor.
pub(crate) struct Durable<T> {
    pub(crate) codec: Codec<T>,
    pub(crate) sync: bool,
    pub(crate) path: PathBuf,
    /// Mutex-wrapped so it can be moved out and closed on `close`, releasing the file lock while
    /// abandoned workers may still hold the engine's state. Shared with the writer thread;
    /// operator calls (dead letters, cursor) take it between commits.
    journal: Arc<Mutex<Option<Journal>>>,
    /// Shared with the writer; never waits (see `ops.rs`).
    ops: Arc<OpQueue>,
    progress: Arc<(Mutex<Progress>, Condvar)>,
    /// The highest seq whose append is committed. Appends arrive in seq order, so every lower
    /// seq is committed too. Atomic, for the workers' check before each delivery; stored
    /// under the progress lock, for `wait_committed`.
    committed: Arc<AtomicU64>,
    /// Told after every successful commit, and when the writer exits, for async workers and
    /// `Sync` async senders waiting for one; and when a write or the replay's read fails, for
    /// `flush_async`, which does not wait on then.
    pub(crate) commits: Arc<tokio::sync::Notify>,
    /// Set while commits fail, so `send` refuses new items with one atomic load.
    failed: Arc<AtomicBool>,
    /// The replay's last read error, while it reads the journal again (see `set_unreadable`).
    read_error: Mutex<Option<Arc<JournalError>>>,
    /// Set while `read_error` is, so `send` looks at it with one atomic load.
    unreadable: AtomicBool,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// The highest seq the engine may hand out: reserved in the journal ahead of use, because a
    /// seq handed out but not committed before a crash must not be given to another item.
    pub(crate) seq_limit: Arc<AtomicU64>,
    /// Called after the writer raised `seq_limit`, or took enough ops to be no longer
    /// `behind`, to wake senders that waited for it.
    on_room: Arc<OnceLock<Box<dyn Fn() + Send + Sync>>>,
    /// The dead letters operator calls have retried or discarded. Held by such a call from
    /// reading the dead letter until it is recorded here, so two calls on the same one (two
    /// retries, a retry and a discard) cannot both act. The set, not the file, says what is
    /// gone: a removal may wait for a commit (a full disk), and seqs are never reused.
    operator: Mutex<HashSet<u64>>,
    /// The most bytes an item's payload and key may take in the journal
    /// (`Journal::max_entry_bytes`), checked at `send`: a longer one could never be committed.
    pub(crate) max_entry: usize,
}

/// Ops the engine may queue ahead of the writer before new items wait for it: the conveyor's
/// capacity, within these bounds, so encoded copies waiting for the disk stay in proportion to
/// the queue.
const OPS_BOUND: (usize, usize) = (1024, 64 * 1024);

/// How often a wait for the writer's answer looks whether `shut_down` gave up on it.
const GIVEN_UP_CHECK: Duration = Duration::from_millis(100);

/// Seqs reserved at a time; the writer reserves more once half of a block is used.
const SEQ_BLOCK: u64 = 1 << 16;

/// How long the writer waits before retrying a failed commit (disk full, I/O error).
const RETRY_AFTER_ERROR: Duration = Duration::from_millis(100);
/// A cap on one group, so a writer that fell behind does not gather without end.
const MAX_GROUP: usize = 64 * 1024;
/// Appends per transaction when a group is large (see `commit`).
pub(crate) const CHUNK: usize = 8 * 1024;
/// Pages a journal may grow by for one `CHUNK` of 100-byte items to fit, but not two: a group
/// of several chunks then fails part way, as on a disk filling up.
#[cfg(test)]
pub(crate) const ROOM_FOR_ABOUT_ONE_CHUNK: i64 = 2 * (CHUNK as i64 * 130 / 4096) + 16;

fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T> Durable<T> {
    /// Starts the writer for an opened journal whose items have seqs up to `last_seq`.
    pub(crate) fn start(
        mut journal: Journal,
        settings: &JournalSettings<T>,
        durability: Durability,
        last_seq: u64,
        capacity: usize,
    ) -> Result<Durable<T>, BuildError> {
        let reserved = last_seq + SEQ_BLOCK;
        journal.write(&WriteBatch {
            reserve: Some(reserved),
            ..WriteBatch::default()
        })?;
        let seq_limit = Arc::new(AtomicU64::new(reserved));
        let max_entry = journal.max_entry_bytes();
        let on_room: Arc<OnceLock<Box<dyn Fn() + Send + Sync>>> = Arc::default();
        // Bounded by the engine, not by the queue: if the disk cannot keep up, new items wait
        // for the writer (see `behind`) instead of growing a backlog without limit, and a push
        // under the state lock never waits for a disk that may hang. The writer never takes
        // the state lock.
        let ops = Arc::new(OpQueue::new(capacity.clamp(OPS_BOUND.0, OPS_BOUND.1)));
        let journal = Arc::new(Mutex::new(Some(journal)));
        let progress = Arc::new((
            Mutex::new(Progress {
                error: None,
                stopped: false,
                given_up: false,
            }),
            Condvar::new(),
        ));
        // Every item the journal holds now is on disk.
        let committed = Arc::new(AtomicU64::new(last_seq));
        let commits = Arc::new(tokio::sync::Notify::new());
        let failed = Arc::new(AtomicBool::new(false));
        let window = match durability {
            Durability::Batched(window) => Some(window),
            Durability::Sync => None,
        };
        let writer = Writer {
            taken: VecDeque::new(),
            ops: ops.clone(),
            journal: journal.clone(),
            progress: progress.clone(),
            committed: committed.clone(),
            commits: commits.clone(),
            failed: failed.clone(),
            window,
            reserved,
            seq_limit: seq_limit.clone(),
            on_room: on_room.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("conveyor-journal".to_owned())
            .spawn(move || writer.run())?;
        Ok(Durable {
            codec: settings.codec,
            sync: durability == Durability::Sync,
            path: settings.path.clone(),
            journal,
            ops,
            progress,
            committed,
            commits,
            failed,
            read_error: Mutex::new(None),
            unreadable: AtomicBool::new(false),
            writer: Mutex::new(Some(handle)),
            seq_limit,
            on_room,
            operator: Mutex::new(HashSet::new()),
            max_entry,
        })
    }

    /// Serialises operator calls on dead letters and says which ones they removed (see
    /// `operator`).
    pub(crate) fn operator(&self) -> MutexGuard<'_, HashSet<u64>> {
        lock(&self.operator)
    }

    /// How many ops wait for the writer to take them.
    #[cfg(test)]
    pub(crate) fn ops_waiting(&self) -> usize {
        self.ops.len()
    }

    /// How many items wait for the writer to take them (barriers and other ops aside).
    #[cfg(test)]
    pub(crate) fn appends_waiting(&self) -> usize {
        self.ops.appends()
    }

    /// Sets what the writer calls after raising the seq limit, and once it is no longer
    /// `behind` (once, at start).
    pub(crate) fn on_room(&self, wake: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_room.set(wake);
    }

    /// The error that makes `send` refuse items: while commits fail, or while the replay
    /// cannot read the items it has not loaded yet.
    pub(crate) fn failure(&self) -> Option<Arc<JournalError>> {
        if self.failed.load(AtomicOrdering::Acquire) {
            if let Some(error) = lock(&self.progress.0).error.clone() {
                return Some(error);
            }
        }
        if self.unreadable.load(AtomicOrdering::Acquire) {
            return lock(&self.read_error).clone();
        }
        None
    }

    /// Records that the replay cannot read the journal (`Some`), or can again (`None`). Sends
    /// are refused meanwhile, as while commits fail, those already waiting behind the replay
    /// too (the replay wakes them): they could only wait, for as long as the disk stays
    /// unreadable, with nothing to tell their caller why.
    pub(crate) fn set_unreadable(&self, error: Option<JournalError>) {
        let mut slot = lock(&self.read_error);
        self.unreadable
            .store(error.is_some(), AtomicOrdering::Release);
        *slot = error.map(Arc::new);
        drop(slot);
        // As for a write error: `flush_async` stops waiting on.
        self.commits.notify_waiters();
    }

    /// Queues an op for the writer; never waits. Called under the engine's state lock (see the
    /// module doc). A stopped writer (after `close`) drops it: what it would have settled stays
    /// pending in the journal and is delivered again after a restart, which at-least-once
    /// allows.
    pub(crate) fn push(&self, op: Op) {
        self.ops.push(op);
    }

    /// Whether the writer has so many ops still to take (the disk is slow, or hangs) that new
    /// items must wait for it, as for room in a full queue: what bounds the ops waiting for
    /// the disk. The writer wakes senders (see `on_room`) once it is no longer behind.
    pub(crate) fn behind(&self) -> bool {
        self.ops.behind()
    }

    /// Records that `seq` was handed out without an append (a dropped item), asking for a
    /// larger reservation once half of the current one is used.
    pub(crate) fn used_without_append(&self, seq: u64) {
        if seq + SEQ_BLOCK / 2 > self.seq_limit.load(AtomicOrdering::Acquire) {
            self.push(Op::Used(seq));
        }
    }

    /// Blocks until the append of `seq` is committed (`Durability::Sync`). While commits fail
    /// the writer keeps retrying and this keeps waiting, like a send blocked on a full queue;
    /// it returns at once if the writer stopped (what it did not commit is reported as left
    /// by `close`).
    /// Waits at most until `deadline`; returns whether the wait is over (false: time ran out).
    pub(crate) fn wait_committed(&self, seq: u64, deadline: Option<Instant>) -> bool {
        let (m, cv) = &*self.progress;
        let mut p = lock(m);
        while !self.is_committed(seq) && !p.over() {
            p = match deadline {
                None => cv.wait(p).unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    cv.wait_timeout(p, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
        true
    }

    /// `wait_committed` without a deadline, for a task: awaits the commit without blocking
    /// its thread, and ends as that does (never while commits fail; at once once the writer
    /// stopped). No timer, so the future may be polled outside Tokio.
    pub(crate) async fn committed(&self, seq: u64) {
        loop {
            // Enabled before the check: a commit (or the writer's exit) right after it still
            // wakes this task.
            let commit = self.commits.notified();
            tokio::pin!(commit);
            commit.as_mut().enable();
            if self.is_committed(seq) || self.stopped() {
                return;
            }
            commit.await;
        }
    }

    /// Whether the append of `seq` is committed.
    pub(crate) fn is_committed(&self, seq: u64) -> bool {
        self.committed.load(AtomicOrdering::Acquire) >= seq
    }

    /// Whether the writer has exited, or `shut_down` gave up on it: what it did not commit by
    /// then, nobody waits for.
    pub(crate) fn stopped(&self) -> bool {
        lock(&self.progress.0).over()
    }

    /// Asks the writer to commit what was pushed so far now rather than when its window ends.
    pub(crate) fn commit_soon(&self) {
        // Nobody waits for the answer: `wait_committed` watches the progress instead, which
        // keeps waiting through failed commits.
        self.ops.push(Op::Barrier(Vec::new()));
    }

    /// Commits everything pushed so far and waits for it, at most until `deadline`. Returns
    /// whether it is committed: `false` if the commit failed or time ran out first; if the
    /// writer is gone, whether it was without a failure (what it did not commit is then
    /// reported as left by `close`).
    pub(crate) fn sync(&self, deadline: Option<Instant>) -> bool {
        // A writer that stopped committed what it could: all of it unless it failed (a disk
        // error, or a bug: `JournalError::WriterStopped`).
        let committed_all = || self.failure().is_none();
        if self.stopped() {
            return committed_all();
        }
        let (tx, rx) = mpsc::sync_channel(1);
        // Held while this thread waits: once it gave up, a barrier queued behind this one
        // drops the answer (see `ops::merge`).
        let waiting = Arc::new(());
        let answer = Answer::Thread {
            tx,
            waits: Arc::downgrade(&waiting),
        };
        if !self.ops.push(Op::Barrier(vec![answer])) {
            return committed_all();
        }
        loop {
            // In slices: `shut_down` may give up on a writer stuck in a commit meanwhile.
            let slice = deadline.map_or(GIVEN_UP_CHECK, |d| {
                d.saturating_duration_since(Instant::now())
                    .min(GIVEN_UP_CHECK)
            });
            match rx.recv_timeout(slice) {
                Ok(result) => return result.is_ok(),
                // The writer exited before it read the barrier.
                Err(RecvTimeoutError::Disconnected) => return committed_all(),
                Err(RecvTimeoutError::Timeout) if self.stopped() => return committed_all(),
                Err(RecvTimeoutError::Timeout) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return false;
                    }
                }
            }
        }
    }

    /// `sync` without a deadline, for a task: it awaits the commit without blocking its
    /// thread (a current-thread runtime's other tasks go on meanwhile).
    pub(crate) async fn sync_async(&self) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.stopped() || !self.ops.push(Op::Barrier(vec![Answer::Task(tx)])) {
            return true;
        }
        tokio::pin!(rx);
        loop {
            // Enabled before the check: `shut_down` giving up on a writer stuck in a commit
            // right after it still wakes this task.
            let given_up = self.commits.notified();
            tokio::pin!(given_up);
            given_up.as_mut().enable();
            if self.stopped() {
                return true;
            }
            tokio::select! {
                // A writer that exited before it read the barrier drops it unanswered.
                answer = &mut rx => return answer.map_or(true, |result| result.is_ok()),
                () = given_up => {}
            }
        }
    }

    /// Commits what is queued, stops the writer and closes the journal file (releasing its
    /// lock for the next process). Waits at most until `deadline` for the last commit; a writer
    /// still in a commit then (a hung disk) closes the file itself once that commit ends.
    pub(crate) fn shut_down(&self, deadline: Option<Instant>) {
        self.ops.push(Op::Stop);
        if let Some(handle) = lock(&self.writer).take() {
            let (m, cv) = &*self.progress;
            let mut p = lock(m);
            while !p.stopped {
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                if left == Some(Duration::ZERO) {
                    break;
                }
                p = match left {
                    None => cv.wait(p).unwrap_or_else(PoisonError::into_inner),
                    Some(left) => {
                        cv.wait_timeout(p, left)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0
                    }
                };
            }
            drop(p);
            if let Some(stopped) = self.let_go(handle) {
                let _ = stopped.join();
            }
        }
    }

    /// `shut_down` for a task: awaits the writer's exit instead of blocking its thread.
    /// Dropped while it awaits, it leaves the writer stopping on its own, for a later
    /// `shut_down` to wait for.
    pub(crate) async fn shut_down_async(&self, deadline: Option<Instant>) {
        self.ops.push(Op::Stop);
        // Taken once the wait is over, not before: a later `shut_down` must find the writer
        // to wait for if this future is dropped meanwhile.
        if lock(&self.writer).is_none() {
            return;
        }
        let mut alarm = Alarm::at(deadline);
        loop {
            // Enabled before the check: the writer tells `commits` as it exits.
            let exited = self.commits.notified();
            tokio::pin!(exited);
            exited.as_mut().enable();
            if lock(&self.progress.0).stopped || alarm.passed() {
                break;
            }
            tokio::select! {
                () = exited => {}
                () = alarm.rung() => {}
            }
        }
        let Some(handle) = lock(&self.writer).take() else {
            return;
        };
        // The writer set `stopped` last, once the file was closed: joining it waits at most
        // for its thread to end. Not finished yet, it is left to end on its own (it has
        // nothing left to do that anybody waits for) rather than block this thread.
        if let Some(stopped) = self.let_go(handle).filter(JoinHandle::is_finished) {
            let _ = stopped.join();
        }
    }

    /// Once a shutdown waited for the writer: the writer's handle to join if it stopped, or
    /// else nobody waits for it any more.
    fn let_go(&self, handle: JoinHandle<()>) -> Option<JoinHandle<()>> {
        let (m, cv) = &*self.progress;
        let mut p = lock(m);
        if p.stopped {
            return Some(handle);
        }
        // Sends waiting for their commit (`Durability::Sync`) and workers waiting to
        // deliver stop waiting: the conveyor reports their items as left.
        p.given_up = true;
        cv.notify_all();
        self.commits.notify_waiters();
        drop(p);
        // Taking the journal to close it would wait for that commit: for ever, on a
        // disk that hangs.
        tracing::warn!(journal = %self.path.display(), "journal writer did not finish its last commit in time; it closes the journal when it does");
        None
    }

    /// Runs `f` on the open journal, between two commits of the writer.
    pub(crate) fn with_journal<O>(
        &self,
        f: impl FnOnce(&mut Journal) -> Result<O, JournalError>,
    ) -> Result<O, JournalError> {
        match lock(&self.journal).as_mut() {
            Some(journal) => f(journal),
            None => Err(JournalError::Closed {
                path: self.path.clone(),
            }),
        }
    }
}

impl<T> Drop for Durable<T> {
    fn drop(&mut self) {
        // The writer commits what is queued, and exits.
        self.ops.engine_gone();
    }
}

/// The writer thread's state.
struct Writer {
    ops: Arc<OpQueue>,
    /// Ops taken from `ops` all at once, not handled yet.
    taken: VecDeque<Op>,
    journal: Arc<Mutex<Option<Journal>>>,
    progress: Arc<(Mutex<Progress>, Condvar)>,
    committed: Arc<AtomicU64>,
    commits: Arc<tokio::sync::Notify>,
    failed: Arc<AtomicBool>,
    /// `Batched`: how long to gather after the first op. `Sync`: `None`, commit what is there.
    window: Option<Duration>,
    /// The committed seq reservation (see `Durable::seq_limit`).
    reserved: u64,
    seq_limit: Arc<AtomicU64>,
    on_room: Arc<OnceLock<Box<dyn Fn() + Send + Sync>>>,
}

impl Writer {
    fn run(mut self) {
        // A bug that panics the writer must not leave the conveyor waiting for commits that
        // never come, with nothing to say why: it fails as a disk that cannot be written
        // does, for good (see `stopped_by`).
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| self.commit_until_stopped())) {
            self.stopped_by(&*panic);
        }
        self.exit();
    }

    /// Records that the writer stopped on a panic: sends are refused with
    /// [`JournalError::WriterStopped`], which `journal_error()` shows, and nobody waits for a
    /// commit any more (`exit` follows).
    fn stopped_by(&self, panic: &(dyn std::any::Any + Send)) {
        let reason = panic_message(panic);
        let path = lock(&self.journal)
            .as_ref()
            .map(|journal| journal.path().to_owned())
            .unwrap_or_default();
        tracing::error!(journal = %path.display(), panic = %reason, "the journal writer stopped on a panic");
        lock(&self.progress.0).error = Some(Arc::new(JournalError::WriterStopped { path, reason }));
        self.failed.store(true, AtomicOrdering::Release);
    }

    /// Gathers ops into groups and commits them until the engine is gone or closes.
    fn commit_until_stopped(&mut self) {
        let mut batch = WriteBatch::default();
        let mut barriers = Vec::new();
        let mut stop = false;
        let mut retry_at: Option<Instant> = None;
        while !stop {
            // Block for the first op (unless a failed group is waiting to be retried).
            if batch.is_empty() && barriers.is_empty() {
                match self.pop(Until::Forever) {
                    Ok(op) => stop |= take(op, &mut batch, &mut barriers),
                    Err(_) => break,
                }
            }
            // Gather the rest: until the window closes (Batched), or what is already queued
            // (Sync, or a flush/close waiting). A failed group waits for its retry time.
            let deadline = retry_at.or_else(|| self.window.map(crate::worker::later));
            while !stop && batch.appends.len() < MAX_GROUP {
                let urgent = !barriers.is_empty() && retry_at.is_none();
                let next = match deadline {
                    Some(d) if !urgent => self.pop(Until::At(d)),
                    _ => self.pop(Until::Now),
                };
                match next {
                    Ok(op) => stop |= take(op, &mut batch, &mut barriers),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        stop = true;
                    }
                }
            }
            let last_append = batch.appends.iter().map(|r| r.seq).max();
            if let Some(last) = last_append.filter(|last| last + SEQ_BLOCK / 2 > self.reserved) {
                batch.reserve = batch.reserve.max(Some(last + SEQ_BLOCK));
            }
            batch.reserve = batch.reserve.filter(|r| *r > self.reserved);
            let (went_in, result) = match lock(&self.journal).as_mut() {
                Some(journal) => commit(journal, &mut batch),
                None => (Committed::of(&batch), Ok(())),
            };
            let result = result.map_err(Arc::new);
            // Whatever went in counts, even when the rest of the group failed: it is on disk.
            let extended = match went_in.reserve {
                Some(reserved) => {
                    self.reserved = reserved;
                    self.seq_limit.store(reserved, AtomicOrdering::Release);
                    true
                }
                None => false,
            };
            let (m, cv) = &*self.progress;
            let mut p = lock(m);
            // Under the progress lock, for `wait_committed`.
            if let Some(seq) = went_in.last_append {
                self.committed.fetch_max(seq, AtomicOrdering::Release);
                self.commits.notify_waiters();
            }
            match &result {
                Ok(()) => {
                    if p.error.take().is_some() {
                        tracing::info!("journal writes succeed again");
                    }
                    self.failed.store(false, AtomicOrdering::Release);
                    batch.clear();
                    retry_at = None;
                }
                Err(e) => {
                    if p.error.is_none() {
                        tracing::error!(error = %e, "journal write failed; retrying, new items are refused meanwhile");
                    }
                    p.error = Some(e.clone());
                    self.failed.store(true, AtomicOrdering::Release);
                    // `flush_async` stops waiting on while the journal cannot be written.
                    self.commits.notify_waiters();
                    retry_at = Some(Instant::now() + RETRY_AFTER_ERROR);
                    // Keep the group (it holds accepted items): it is retried with what comes next.
                    // A stop still exits: what was not committed stays in memory only and is
                    // reported as left by `close`.
                }
            }
            cv.notify_all();
            drop(p);
            for answer in barriers.drain(..).flatten() {
                answer.send(result.clone());
            }
            if let Some(wake) = self.on_room.get().filter(|_| extended) {
                wake();
            }
        }
    }

    /// The writer's last steps: later ops are dropped, the journal is closed, and whoever
    /// waits for a commit stops waiting.
    fn exit(self) {
        self.ops.writer_gone();
        // Here rather than in `Durable::shut_down`, which does not wait for a commit that
        // hangs; before `stopped`, so that the file is free once `close` saw the writer stop.
        if let Some(journal) = lock(&self.journal).take() {
            if let Err(e) = journal.close() {
                tracing::warn!(error = %e, "closing the journal failed; its content is intact");
            }
        }
        let (m, cv) = &*self.progress;
        lock(m).stopped = true;
        cv.notify_all();
        // `send_async` under `Sync` awaits this too: nothing will commit its item any more.
        self.commits.notify_waiters();
    }

    /// The next op, from the ops taken from the queue or else from the queue; wakes the
    /// senders waiting while the writer was `Durable::behind`.
    fn pop(&mut self, until: Until) -> Result<Op, RecvTimeoutError> {
        if let Some(op) = self.taken.pop_front() {
            return Ok(op);
        }
        let (taken, caught_up) = self.ops.take_all(until, &mut self.taken);
        if let Some(wake) = self.on_room.get().filter(|_| caught_up) {
            wake();
        }
        taken.map(|()| {
            self.taken
                .pop_front()
                .expect("take_all took at least one op")
        })
    }
}

/// What a `commit` put on disk: the whole group, or the chunks that went in before an error.
#[derive(Debug, Default, PartialEq, Eq)]
struct Committed {
    /// The highest seq appended (every lower one of the group went in too).
    last_append: Option<u64>,
    /// The seq reservation committed.
    reserve: Option<u64>,
}

impl Committed {
    /// What committing `batch` in one transaction puts on disk.
    fn of(batch: &WriteBatch) -> Committed {
        Committed {
            last_append: batch.appends.iter().map(|r| r.seq).max(),
            reserve: batch.reserve,
        }
    }
}

/// Commits a group. A large one (the writer fell behind, or the group grew while the disk was
/// full) goes in transactions of at most `CHUNK` appends, in order, then one with the rest, so
/// it can be committed as space comes back. On error, what was committed has left `batch`, and
/// is reported all the same: its items may be delivered, and its reservation handed out.
fn commit(journal: &mut Journal, batch: &mut WriteBatch) -> (Committed, Result<(), JournalError>) {
    let mut went_in = Committed::default();
    while batch.appends.len() > CHUNK {
        let rest = batch.appends.split_off(CHUNK);
        let appends = std::mem::replace(&mut batch.appends, rest);
        // A cursor sent with an item is committed with that item, never in a later chunk: a
        // crash between the two would leave the item journaled and the cursor before it.
        let cursor = appends.iter().rev().find_map(|r| r.cursor);
        let chunk = WriteBatch {
            appends,
            reserve: batch.reserve,
            cursor,
            ..WriteBatch::default()
        };
        if let Err(e) = journal.write(&chunk) {
            let mut appends = chunk.appends;
            appends.append(&mut batch.appends);
            batch.appends = appends;
            return (went_in, Err(e));
        }
        went_in = Committed::of(&chunk);
    }
    // Once a chunk went in, what is left holds the group's last appends: it alone says what
    // the whole group put on disk.
    let result = journal.write(batch);
    if result.is_ok() {
        went_in = Committed::of(batch);
    }
    (went_in, result)
}

/// Adds `op` to the group; returns whether it asks the writer to stop.
fn take(op: Op, batch: &mut WriteBatch, barriers: &mut Vec<Vec<Answer>>) -> bool {
    match op {
        Op::Append(record) => {
            // In op order with `Op::Cursor`: the later one wins.
            if record.cursor.is_some() {
                batch.cursor = record.cursor;
            }
            batch.appends.push(record);
        }
        Op::Settle(settlement) => batch.settlements.push(settlement),
        Op::Cursor(cursor) => batch.cursor = Some(cursor),
        Op::Used(seq) => batch.reserve = batch.reserve.max(Some(seq + SEQ_BLOCK)),
        // Kept even without answers: it asks for a commit now.
        Op::Barrier(answers) => barriers.push(answers),
        Op::Stop => return true,
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Record, Settlement};

    fn record(seq: u64) -> Record {
        Record {
            seq,
            lane: Arc::from(""),
            key: None,
            payload: vec![7; 100],
            cursor: None,
            replaces_dead: None,
        }
    }

    fn pending(journal: &Journal) -> Vec<u64> {
        let (mut seqs, mut after) = (Vec::new(), 0);
        loop {
            let page = journal.pending_after(after, 4096).unwrap();
            match page.last() {
                Some(last) => after = last.seq,
                None => return seqs,
            }
            seqs.extend(page.iter().map(|r| r.seq));
        }
    }

    #[test]
    fn a_large_group_commits_in_chunks_and_keeps_what_failed_for_the_retry() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path().join("j")).unwrap();
        let total = 3 * CHUNK as u64 + 10;
        // Each item carries the input position after it, as `send_and_set_cursor` does.
        let mut batch = WriteBatch::default();
        let mut barriers = Vec::new();
        for seq in 1..=total {
            let with_cursor = Record {
                cursor: Some(seq),
                ..record(seq)
            };
            take(Op::Append(with_cursor), &mut batch, &mut barriers);
        }
        take(
            Op::Settle(Settlement::Delivered(1)),
            &mut batch,
            &mut barriers,
        );
        // Room for about one chunk: the first goes in, the second fails as on a full disk.
        journal.limit_pages(ROOM_FOR_ABOUT_ONE_CHUNK);
        let (went_in, result) = commit(&mut journal, &mut batch);
        let err = result.unwrap_err();
        assert!(matches!(err, JournalError::DiskFull { .. }), "{err:?}");
        // Whole chunks went in, in order; the rest stays in the group.
        let committed = pending(&journal);
        let n = committed.len() as u64;
        assert!(
            n >= CHUNK as u64 && n < total && n % CHUNK as u64 == 0,
            "{n} committed"
        );
        assert!(committed.iter().copied().eq(1..=n), "a prefix, in order");
        assert_eq!(went_in.last_append, Some(n), "what went in is reported");
        assert_eq!(
            journal.cursor().unwrap(),
            Some(n),
            "each chunk commits the cursor its items carried, never one past them"
        );
        assert_eq!(batch.appends.first().map(|r| r.seq), Some(n + 1));
        assert_eq!(batch.appends.len() as u64, total - n);
        assert_eq!(
            batch.settlements,
            vec![Settlement::Delivered(1)],
            "kept for the retry"
        );

        journal.limit_pages(1 << 30); // space comes back
        let (went_in, result) = commit(&mut journal, &mut batch);
        result.unwrap();
        assert_eq!(went_in.last_append, Some(total));
        let all = pending(&journal);
        assert!(
            all.iter().copied().eq(2..=total),
            "{} pending after the retry",
            all.len()
        );
        assert_eq!(journal.cursor().unwrap(), Some(total));
    }

    /// A group that fails after some of its chunks went in: those chunks are on disk, with the
    /// seq reservation they carried. The writer reported none of it, so their items waited
    /// (workers, `Sync` senders, `wait_committed`) for the rest of the group, for as long as the
    /// disk stayed full, and the reservation on disk was not handed out.
    #[test]
    fn the_chunks_of_a_group_that_went_in_before_a_failure_count_as_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let settings = JournalSettings::<u64> {
            path: path.clone(),
            codec: Codec::json(),
        };
        // A long window: every append below lands in one group.
        let window = Durability::Batched(Duration::from_secs(2));
        let durable =
            Durable::start(Journal::open(&path).unwrap(), &settings, window, 0, 1 << 16).unwrap();
        let reserved = durable.seq_limit.load(AtomicOrdering::SeqCst);
        let limit = |durable: &Durable<u64>, pages| {
            durable
                .with_journal(|j| {
                    j.limit_pages(pages);
                    Ok(())
                })
                .unwrap();
        };
        limit(&durable, ROOM_FOR_ABOUT_ONE_CHUNK);
        // Seqs high enough in the reservation for the group to extend it.
        let first = reserved - SEQ_BLOCK / 2 + 1;
        let last = first + 3 * CHUNK as u64;
        for seq in first..=last {
            durable.push(Op::Append(record(seq)));
        }
        let soon = || Some(Instant::now() + Duration::from_secs(10));
        assert!(
            durable.wait_committed(first + CHUNK as u64 - 1, soon()),
            "the first chunk is on disk, and its items wait for nothing"
        );
        assert!(durable.failure().is_some(), "the rest of the group failed");
        // Whole chunks went in, and exactly those count as committed.
        let went_in = durable.with_journal(|j| Ok(pending(j))).unwrap();
        let n = went_in.len() as u64;
        assert!(n % CHUNK as u64 == 0 && n <= last - first, "{n} went in");
        assert!(durable.is_committed(first + n - 1));
        assert!(!durable.is_committed(first + n));
        let on_disk = durable.with_journal(|j| j.max_seq()).unwrap();
        assert_eq!(on_disk, last + SEQ_BLOCK, "the chunk carried the extension");
        assert_eq!(
            durable.seq_limit.load(AtomicOrdering::SeqCst),
            on_disk,
            "an extension on disk is handed out"
        );

        limit(&durable, 1 << 30); // space comes back
        assert!(durable.wait_committed(last, soon()));
        assert!(durable.failure().is_none());
        durable.shut_down(soon());
        let journal = Journal::open(&path).unwrap();
        assert!(pending(&journal).into_iter().eq(first..=last));
    }
}
