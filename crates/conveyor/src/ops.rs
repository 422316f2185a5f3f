//! The queue of journal ops between the engine and the journal's writer.
//!
//! The engine pushes ops under its state lock, so a push must never wait for the writer: a
//! writer stuck on a hung disk would then hold the state lock through that push, and with it
//! every call with a deadline (`flush_timeout`, `close_timeout`, `stats`). So the queue has no
//! bound of its own. What bounds it is the engine: new items wait (or are refused, or dropped,
//! as the backpressure policy says) while the writer is `behind`, before any op is pushed for
//! them; and the ops that take no room in the engine's queue (input positions, and seqs handed
//! out to dropped items) are merged while they wait, so a producer setting its cursor on every
//! line cannot grow the queue either. So are barriers queued one right behind the other, and
//! the answers in them that nobody waits for any more: a caller asking for a commit again and
//! again with a short timeout while the disk hangs cannot grow it either.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use crate::journal::{JournalError, Record, Settlement};

/// One event for the writer, in the order the engine produced them.
pub(crate) enum Op {
    Append(Record),
    Settle(Settlement),
    Cursor(u64),
    /// A seq handed out without an append (an item dropped by policy): the reservation must
    /// still grow past it, or senders would wait for a reservation no append ever extends.
    Used(u64),
    /// Commit everything before this op at once, then answer each of these (none: the op only
    /// asks for a commit now, as `Durable::commit_soon` does).
    Barrier(Vec<Answer>),
    /// Commit everything before this op, then exit.
    Stop,
}

/// Whom the writer tells whether what came before a barrier is committed.
pub(crate) enum Answer {
    /// A thread, blocked on the receiver for as long as it holds what `waits` points to. A
    /// std receiver cannot be asked whether it is still there; this can, without sending.
    Thread {
        tx: mpsc::SyncSender<Result<(), Arc<JournalError>>>,
        waits: Weak<()>,
    },
    /// A task, awaiting the receiver without blocking its thread.
    Task(tokio::sync::oneshot::Sender<Result<(), Arc<JournalError>>>),
}

impl Answer {
    /// Tells it; a receiver that gave up is not an error.
    pub(crate) fn send(self, result: Result<(), Arc<JournalError>>) {
        match self {
            Answer::Thread { tx, .. } => {
                let _ = tx.send(result);
            }
            Answer::Task(tx) => {
                let _ = tx.send(result);
            }
        }
    }

    /// Whether anyone still waits for it: one whose deadline passed (`flush_timeout`) or whose
    /// task was dropped (`flush_async`) no longer does, and needs no place in the queue.
    fn awaited(&self) -> bool {
        match self {
            Answer::Thread { waits, .. } => waits.strong_count() > 0,
            Answer::Task(tx) => !tx.is_closed(),
        }
    }
}

/// How long `OpQueue::take_all` may wait for an op.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Until {
    /// Until one comes, or the engine is gone.
    Forever,
    /// Until then at most.
    At(Instant),
    /// Not at all.
    Now,
}

/// The ops waiting for the writer, in push order.
pub(crate) struct OpQueue {
    queued: Mutex<Queued>,
    /// The writer waits here for ops (see `Queued::writer_waits`).
    ready: Condvar,
    /// `queued.ops.len()`, for `behind` without the lock: a send looks at it on every item.
    len: AtomicUsize,
    /// Past this many ops, the writer is `behind`.
    bound: usize,
}

struct Queued {
    ops: VecDeque<Op>,
    /// The writer sleeps on `ready`: only then does a push pay for the wake-up syscall.
    writer_waits: bool,
    /// The engine let go of the queue: once it is empty, the writer exits.
    engine_gone: bool,
    /// The writer exited: what is pushed now would never be read, and is dropped.
    writer_gone: bool,
}

impl OpQueue {
    pub(crate) fn new(bound: usize) -> OpQueue {
        OpQueue {
            queued: Mutex::new(Queued {
                ops: VecDeque::new(),
                writer_waits: false,
                engine_gone: false,
                writer_gone: false,
            }),
            ready: Condvar::new(),
            len: AtomicUsize::new(0),
            bound,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queued> {
        self.queued.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `op` behind the others; never waits. Returns `false` if the writer has exited
    /// (the op is dropped).
    pub(crate) fn push(&self, op: Op) -> bool {
        let mut q = self.lock();
        if q.writer_gone {
            return false;
        }
        if let Some(op) = merge(&mut q.ops, op) {
            q.ops.push_back(op);
            self.len.store(q.ops.len(), AtomicOrdering::Relaxed);
        }
        if std::mem::take(&mut q.writer_waits) {
            self.ready.notify_one();
        }
        true
    }

    /// Whether the writer has this queue's bound of ops or more still to take: new items wait
    /// until it has fewer.
    pub(crate) fn behind(&self) -> bool {
        self.len.load(AtomicOrdering::Relaxed) >= self.bound
    }

    /// Moves every queued op, in push order, to the back of `taken` (the writer's own buffer),
    /// waiting for one if there is none. `Err(Timeout)` if none came in time;
    /// `Err(Disconnected)` once the queue is empty and the engine gone. The second value says
    /// whether this took the writer from `behind` to not behind, so that new items waiting may
    /// go on. Taking all at once spares the writer a lock turn per op, each of which a sender
    /// (holding the engine's state lock) could wait for.
    pub(crate) fn take_all(
        &self,
        until: Until,
        taken: &mut VecDeque<Op>,
    ) -> (Result<(), RecvTimeoutError>, bool) {
        let mut q = self.lock();
        loop {
            if !q.ops.is_empty() {
                let was_behind = q.ops.len() >= self.bound;
                taken.append(&mut q.ops);
                self.len.store(0, AtomicOrdering::Relaxed);
                return (Ok(()), was_behind);
            }
            if q.engine_gone {
                return (Err(RecvTimeoutError::Disconnected), false);
            }
            let left = match until {
                Until::Now => None,
                Until::Forever => Some(None),
                Until::At(deadline) => {
                    Some(Some(deadline.saturating_duration_since(Instant::now())))
                        .filter(|left| left != &Some(Duration::ZERO))
                }
            };
            let Some(left) = left else {
                return (Err(RecvTimeoutError::Timeout), false);
            };
            q.writer_waits = true;
            q = match left {
                None => self.ready.wait(q).unwrap_or_else(PoisonError::into_inner),
                Some(left) => {
                    self.ready
                        .wait_timeout(q, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// The engine lets go (its journal handle is dropped): the writer exits once it has taken
    /// what is queued.
    pub(crate) fn engine_gone(&self) {
        self.lock().engine_gone = true;
        self.ready.notify_one();
    }

    /// The writer exited: later pushes are dropped, and what is queued is freed.
    pub(crate) fn writer_gone(&self) {
        let mut q = self.lock();
        q.writer_gone = true;
        q.ops.clear();
        self.len.store(0, AtomicOrdering::Relaxed);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().ops.len()
    }

    #[cfg(test)]
    pub(crate) fn appends(&self) -> usize {
        let q = self.lock();
        q.ops
            .iter()
            .filter(|op| matches!(op, Op::Append(_)))
            .count()
    }
}

/// Merges `op` into the ops at the back of `ops` if it can (returning `None`), else gives it
/// back. A barrier right behind another asks for the commit of the same ops: the one already
/// queued answers for both, keeping only the answers still awaited. A cursor and a used seq
/// only set the group's cursor and raise its reservation, and neither cares about the other: in
/// a run of them behind the last other op, only the last cursor and the highest seq count, so
/// the run never holds more than one of each. Nothing moves past an append, whose item the
/// cursor must not get ahead of.
fn merge(ops: &mut VecDeque<Op>, mut op: Op) -> Option<Op> {
    if let (Some(Op::Barrier(queued)), Op::Barrier(new)) = (ops.back_mut(), &mut op) {
        queued.retain(Answer::awaited);
        queued.append(new);
        return None;
    }
    for queued in ops.iter_mut().rev().take(2) {
        match (queued, &op) {
            (Op::Cursor(cursor), Op::Cursor(new)) => {
                *cursor = *new;
                return None;
            }
            (Op::Used(seq), Op::Used(new)) => {
                *seq = (*seq).max(*new);
                return None;
            }
            (Op::Cursor(_) | Op::Used(_), Op::Cursor(_) | Op::Used(_)) => {}
            _ => break,
        }
    }
    Some(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(q: &OpQueue) -> Vec<String> {
        let mut taken = VecDeque::new();
        let _ = q.take_all(Until::Now, &mut taken);
        let mut seen = Vec::new();
        for op in taken {
            seen.push(match op {
                Op::Append(r) => format!("append {}", r.seq),
                Op::Cursor(c) => format!("cursor {c}"),
                Op::Used(s) => format!("used {s}"),
                Op::Settle(_) => "settle".to_owned(),
                Op::Barrier(_) => "barrier".to_owned(),
                Op::Stop => "stop".to_owned(),
            });
        }
        seen
    }

    fn append(seq: u64) -> Op {
        Op::Append(Record {
            seq,
            lane: Arc::from(""),
            key: None,
            payload: Vec::new(),
            cursor: None,
            replaces_dead: None,
        })
    }

    #[test]
    fn cursors_and_used_seqs_merge_behind_the_last_append_but_never_past_it() {
        let q = OpQueue::new(1024);
        for n in 1..=1000 {
            q.push(Op::Cursor(n));
            q.push(Op::Used(n));
        }
        assert_eq!(q.len(), 2, "a thousand of each take two ops");
        q.push(append(7));
        q.push(Op::Used(3));
        q.push(Op::Cursor(1001));
        q.push(Op::Used(2));
        assert_eq!(
            kinds(&q),
            [
                "cursor 1000",
                "used 1000",
                "append 7",
                "used 3",
                "cursor 1001"
            ]
        );
    }

    #[test]
    fn a_barrier_right_behind_another_merges_into_it_keeping_only_the_answers_awaited() {
        let q = OpQueue::new(1024);
        let (given_up, _) = tokio::sync::oneshot::channel();
        let (awaited, answer) = tokio::sync::oneshot::channel();
        let (tx, rx) = mpsc::sync_channel(1);
        let waiting = Arc::new(());
        let thread = Answer::Thread {
            tx,
            waits: Arc::downgrade(&waiting),
        };
        q.push(Op::Barrier(vec![Answer::Task(given_up)]));
        q.push(Op::Barrier(Vec::new()));
        q.push(Op::Barrier(vec![Answer::Task(awaited), thread]));
        q.push(Op::Barrier(Vec::new()));
        q.push(Op::Cursor(1));
        q.push(Op::Barrier(Vec::new()));
        let mut taken = VecDeque::new();
        let _ = q.take_all(Until::Now, &mut taken);
        let answers: Vec<usize> = taken
            .into_iter()
            .map(|op| match op {
                Op::Barrier(answers) => {
                    let n = answers.len();
                    for answer in answers {
                        answer.send(Ok(()));
                    }
                    n
                }
                Op::Cursor(_) => usize::MAX,
                _ => unreachable!("only barriers and a cursor were pushed"),
            })
            .collect();
        assert_eq!(
            answers,
            [2, usize::MAX, 0],
            "one barrier before the cursor, with the two answers awaited; none merged past it"
        );
        assert!(matches!(answer.blocking_recv(), Ok(Ok(()))));
        assert!(matches!(rx.try_recv(), Ok(Ok(()))));
        drop(waiting);
    }

    #[test]
    fn the_writer_is_behind_from_its_bound_on_and_told_when_it_no_longer_is() {
        let q = OpQueue::new(2);
        q.push(append(1));
        assert!(!q.behind());
        q.push(append(2));
        assert!(q.behind());
        let mut taken = VecDeque::new();
        assert!(q.take_all(Until::Now, &mut taken).1, "back under the bound");
        assert!(!q.behind());
        assert_eq!(taken.len(), 2, "both taken at once");
        q.push(append(3));
        assert!(!q.take_all(Until::Now, &mut taken).1, "it was not behind");
        assert_eq!(taken.len(), 3, "added behind the others");
        assert!(matches!(
            q.take_all(Until::Now, &mut taken).0,
            Err(RecvTimeoutError::Timeout)
        ));
        q.engine_gone();
        assert!(matches!(
            q.take_all(Until::Forever, &mut taken).0,
            Err(RecvTimeoutError::Disconnected)
        ));
        q.writer_gone();
        assert!(!q.push(append(4)), "nobody reads it any more");
        assert_eq!(q.len(), 0);
    }
}
