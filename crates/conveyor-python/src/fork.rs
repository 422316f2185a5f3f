//! Python references released off the GIL, without a lock that `os.fork()` could copy locked.
//!
//! PyO3 defers the release of a reference dropped without the GIL to a global list guarded by a
//! mutex. Our delivery threads drop items, replies and exceptions that way all the time, so a
//! fork could copy that mutex while one of them held it, and the child's first call into this
//! module would hang. [`Held`] instead collects the reference in a thread-local batch, handed
//! over in batches on a lock-free stack (one atomic pointer: there is no lock to inherit), and
//! [`release_pending`] drops them for real whenever we hold the GIL anyway: before each sink
//! call, in `send`, and in every wait.

use std::cell::RefCell;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::ptr::NonNull;

use pyo3::prelude::*;

use crate::stack::Stack;

type Object = NonNull<pyo3::ffi::PyObject>;

/// A batch of references handed from one thread to whoever next holds the GIL.
struct Batch(Vec<Object>);

// SAFETY: the references are only released (`release_pending`) with the GIL held, on whichever
// thread; moving the pointers between threads does nothing to the objects.
unsafe impl Send for Batch {}

/// Batches waiting for the GIL.
static PENDING: Stack<Batch> = Stack::new();

/// How many references a thread collects before it hands them over as one batch.
const BATCH: usize = 64;

/// This thread's references not handed over yet. A delivery thread releases its own at its
/// next sink call (it holds the GIL then), so most never reach the shared stack.
struct Local(RefCell<Vec<Object>>);

impl Drop for Local {
    fn drop(&mut self) {
        // The thread is ending: whatever it still holds goes to the shared stack.
        publish(std::mem::take(self.0.get_mut()));
    }
}

thread_local! {
    static LOCAL: Local = const { Local(RefCell::new(Vec::new())) };
}

fn publish(objects: Vec<Object>) {
    if !objects.is_empty() {
        PENDING.push(Batch(objects));
    }
}

fn defer(object: Object) {
    let full = LOCAL.try_with(|local| {
        let mut objects = local.0.borrow_mut();
        objects.push(object);
        (objects.len() >= BATCH).then(|| std::mem::take(&mut *objects))
    });
    match full {
        Ok(Some(batch)) => publish(batch),
        Ok(None) => {}
        // The thread's storage is already gone (a drop during thread exit).
        Err(_) => publish(vec![object]),
    }
}

/// A Python reference that may be dropped on any thread, with or without the GIL.
pub(crate) struct Held(ManuallyDrop<Py<PyAny>>);

impl Held {
    pub(crate) fn new(object: Py<PyAny>) -> Self {
        Held(ManuallyDrop::new(object))
    }

    pub(crate) fn clone_ref(&self, py: Python<'_>) -> Held {
        Held::new(self.0.clone_ref(py))
    }
}

impl Deref for Held {
    type Target = Py<PyAny>;

    fn deref(&self) -> &Py<PyAny> {
        &self.0
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: `self.0` is never used again; the reference is handed over, and
        // `release_pending` gives it back to Python.
        let object = unsafe { ManuallyDrop::take(&mut self.0) }.into_ptr();
        defer(NonNull::new(object).expect("a Py is never null"));
    }
}

/// Releases every reference dropped off the GIL so far. Cheap (one atomic load) when there are
/// none, so it can sit on hot paths.
#[inline]
pub(crate) fn release_pending(_py: Python<'_>) {
    // Taken out before any decref: a decref can run code that drops more `Held`s.
    let local = LOCAL
        .try_with(|local| std::mem::take(&mut *local.0.borrow_mut()))
        .unwrap_or_default();
    for object in local {
        // SAFETY: we hold the GIL (`_py`), and each pointer owns one reference.
        unsafe { crate::finalizing::decref(object.as_ptr()) };
    }
    if PENDING.is_empty() {
        return;
    }
    for batch in PENDING.take_all() {
        for object in batch.0 {
            // SAFETY: as above.
            unsafe { crate::finalizing::decref(object.as_ptr()) };
        }
    }
}
