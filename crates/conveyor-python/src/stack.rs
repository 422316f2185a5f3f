//! A lock-free stack: hands values from any thread to whichever thread takes them next.
//!
//! Used where a value must cross threads with neither side able to wait: Python references
//! dropped off the GIL (`fork.rs`) and woken `asend` calls (`asend.rs`). One atomic pointer, so
//! pushing never blocks and never takes a lock, and `os.fork()` has no lock to copy locked: a
//! push cut short by a fork either published its node or did not.

use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

struct Node<T> {
    value: T,
    next: *mut Node<T>,
}

/// Values pushed by any thread, taken all at once.
pub(crate) struct Stack<T> {
    /// The newest node, linked to older ones; null when empty.
    head: AtomicPtr<Node<T>>,
    /// The stack owns its nodes (and so their values) for drop checking and auto traits.
    owns: PhantomData<Box<Node<T>>>,
}

// SAFETY: the nodes are only reached through `head`, and each value is moved out by exactly one
// thread (`take_all` swaps the whole list out), so sharing the stack only moves values across
// threads, which `T: Send` allows.
unsafe impl<T: Send> Sync for Stack<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Stack<T> {}

impl<T> std::fmt::Debug for Stack<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("empty", &self.is_empty())
            .finish()
    }
}

impl<T> Stack<T> {
    pub(crate) const fn new() -> Self {
        Stack {
            head: AtomicPtr::new(ptr::null_mut()),
            owns: PhantomData,
        }
    }

    pub(crate) fn push(&self, value: T) {
        let node = Box::into_raw(Box::new(Node {
            value,
            next: ptr::null_mut(),
        }));
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: `node` is ours until the exchange publishes it.
            unsafe { (*node).next = head };
            match self
                .head
                .compare_exchange_weak(head, node, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(current) => head = current,
            }
        }
    }

    /// Cheap (one atomic load), for hot paths that usually find nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.head.load(Ordering::Relaxed).is_null()
    }

    /// Everything pushed so far, oldest first.
    pub(crate) fn take_all(&self) -> Vec<T> {
        let mut node = self.head.swap(ptr::null_mut(), Ordering::Acquire);
        let mut values = Vec::new();
        while !node.is_null() {
            // SAFETY: the swap made this list ours alone; each node was made by `Box::into_raw`.
            let taken = unsafe { Box::from_raw(node) };
            node = taken.next;
            values.push(taken.value);
        }
        values.reverse();
        values
    }
}

impl<T> Drop for Stack<T> {
    fn drop(&mut self) {
        drop(self.take_all());
    }
}
