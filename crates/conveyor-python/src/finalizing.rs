//! Calls into Python from the engine's threads that survive the interpreter's exit.
//!
//! CPython before 3.14 ends a thread that takes the GIL back while the interpreter finalizes
//! with `pthread_exit` (python/cpython#87135): a forced unwind through every frame of the thread.
//! A delivery thread meets it whenever a sink call (or a receipt's callback) is still running
//! when the exit drain gives up, as soon as that call wakes up and takes the GIL back: the
//! unwind reaches a Rust frame that called Python through an `extern "C"` declaration, which
//! may not unwind, and the process aborts (or PyO3's guard releases a GIL the thread no longer
//! holds, "PyGILState_Release: thread state ... must be current"), right after the exit warning
//! said that everything went as planned.
//!
//! PyO3 (0.24 for taking the GIL, 0.29 for taking it back after `Python::detach`) declares the
//! functions that wait for the GIL `extern "C-unwind"` and hangs the thread there itself, as
//! CPython 3.14 does: [`attach`], and every PyO3 wait that releases the GIL (a sink calling
//! `other.send()` into a full conveyor, `flush()`, `Receipt.result()`), park instead of
//! aborting.
//!
//! The unwind can still start inside a call that runs Python code, when that code releases the
//! GIL and takes it back in CPython's own frames (a sink's `time.sleep`, an item's `__del__`),
//! and pyo3-ffi declares those calls plain `"C"`. So the ones where a delivery thread runs
//! Python code for long (the sink call, a receipt's completion, a failure's log record, the
//! release of the references it dropped) go through `extern "C-unwind"` declarations here, and
//! the first Rust frame the unwind reaches parks the thread for good ([`ParkOnUnwind`]): the
//! process is exiting, and ends it with its other threads. A Rust panic still unwinds as
//! before, to the engine's `catch_unwind`.
//!
//! Python code also runs inside shorter calls made through PyO3 (an exception's `__str__`, a
//! garbage collection that an allocation starts): an unwind from there crosses PyO3's frames
//! and would reach PyO3's attach guard, which releases a GIL the thread no longer holds. So
//! [`attach`] parks the thread there too, before that guard, and code that Python calls on
//! a thread of its own (an `async def` sink's completion, on the event-loop thread) runs inside
//! [`park_on_exit`].

use std::ptr;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use pyo3::BoundObject;

// The same functions as PyO3 declares, with the ABI that lets `pthread_exit`'s unwind reach our
// frames (PyO3's `extern "C"` ones abort it). Not `PyGILState_Ensure` nor
// `PyEval_RestoreThread`: PyO3 hangs the thread in those itself (see the module's docs).
#[allow(clashing_extern_declarations)]
extern "C-unwind" {
    #[link_name = "Py_DecRef"]
    fn dec_ref(object: *mut ffi::PyObject);
    #[link_name = "PyObject_Call"]
    fn object_call(
        callable: *mut ffi::PyObject,
        args: *mut ffi::PyObject,
        kwargs: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject;
    // In the stable ABI since 3.2; from 3.9 on CPython passes the arguments on the C stack
    // (vectorcall), where `PyObject_Call` needs a tuple made and freed around every call.
    #[link_name = "PyObject_CallFunctionObjArgs"]
    fn object_call_obj_args(callable: *mut ffi::PyObject, ...) -> *mut ffi::PyObject;
}

/// Parks the thread for good if it is dropped by an unwind that is not a Rust panic: the forced
/// unwind of a thread the finalizing interpreter ends. Disarmed (forgotten) on the normal path.
struct ParkOnUnwind;

impl Drop for ParkOnUnwind {
    fn drop(&mut self) {
        // A Rust panic counts itself; `pthread_exit` does not.
        if std::thread::panicking() {
            return;
        }
        loop {
            std::thread::park();
        }
    }
}

/// Runs `f`, which calls into Python, parking the thread should the finalizing interpreter end
/// it there. Only calls through `extern "C-unwind"` declarations (this module's) are sure to let
/// the unwind reach this frame; others (PyO3's) have so far, as nothing in the C frames between
/// stops it.
pub(crate) fn park_on_exit<R>(f: impl FnOnce() -> R) -> R {
    let armed = ParkOnUnwind;
    let result = f();
    std::mem::forget(armed);
    result
}

/// `Python::attach` for the engine's threads (delivery workers, the threads that settle
/// receipts), which may wait for the GIL while the interpreter finalizes.
///
/// PyO3 parks the thread itself should it wait for the GIL as the interpreter finalizes. `f`
/// runs parked on exit, inside PyO3's attach guard: an unwind from Python code it runs through
/// PyO3 stops before that guard's release.
pub(crate) fn attach<F, R>(f: F) -> R
where
    F: for<'py> FnOnce(Python<'py>) -> R,
{
    Python::attach(|py| park_on_exit(|| f(py)))
}

/// Releases one reference (`Py_DECREF`), whose object's `__del__` may run Python code for
/// long: a delivery thread releases the items and replies it dropped before each sink call.
///
/// # Safety
///
/// The GIL must be held, and `object` must own a reference, which this gives up.
pub(crate) unsafe fn decref(object: *mut ffi::PyObject) {
    // SAFETY: as the caller promised.
    park_on_exit(|| unsafe { dec_ref(object) });
}

/// `callable(*args)`, with nothing between the call and the thread's parking should the
/// finalizing interpreter end it there: PyO3's own call would abort the process.
pub(crate) fn call<'py, A>(callable: &Bound<'py, PyAny>, args: A) -> PyResult<Bound<'py, PyAny>>
where
    A: IntoPyObject<'py, Target = PyTuple>,
{
    call_kw(callable, args, None)
}

/// `callable(arg)`, as [`call`], for the sink call made once per item: `arg` is borrowed, and no
/// argument tuple is made (nor its reference to `arg` taken and released).
pub(crate) fn call1<'py>(
    callable: &Bound<'py, PyAny>,
    arg: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: both pointers are valid for the whole call (borrowed from `Bound`s, which also
    // prove the GIL is held), and the null pointer ends the argument list, as the function
    // requires.
    let raw = park_on_exit(|| unsafe {
        object_call_obj_args(
            callable.as_ptr(),
            arg.as_ptr(),
            ptr::null_mut::<ffi::PyObject>(),
        )
    });
    // SAFETY: it returns a new reference, or null with an exception set.
    unsafe { Bound::from_owned_ptr_or_err(callable.py(), raw) }
}

/// `callable(*args, **kwargs)`, as [`call`].
pub(crate) fn call_kw<'py, A>(
    callable: &Bound<'py, PyAny>,
    args: A,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>>
where
    A: IntoPyObject<'py, Target = PyTuple>,
{
    let py = callable.py();
    let args = args.into_pyobject(py).map_err(Into::into)?.into_bound();
    let kwargs = kwargs.map_or(ptr::null_mut(), |kwargs| kwargs.as_ptr());
    // SAFETY: the pointers are valid (or null for no keywords), owned by `callable`, `args`
    // and `kwargs` for the whole call, and holding a `Bound` means holding the GIL.
    let raw = park_on_exit(|| unsafe { object_call(callable.as_ptr(), args.as_ptr(), kwargs) });
    // SAFETY: PyObject_Call returns a new reference, or null with an exception set.
    unsafe { Bound::from_owned_ptr_or_err(py, raw) }
}

/// `object.name(*args)`, as [`call`].
pub(crate) fn call_method<'py, A>(
    object: &Bound<'py, PyAny>,
    name: &str,
    args: A,
) -> PyResult<Bound<'py, PyAny>>
where
    A: IntoPyObject<'py, Target = PyTuple>,
{
    call_method_kw(object, name, args, None)
}

/// `object.name(*args, **kwargs)`, as [`call`].
pub(crate) fn call_method_kw<'py, A>(
    object: &Bound<'py, PyAny>,
    name: &str,
    args: A,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>>
where
    A: IntoPyObject<'py, Target = PyTuple>,
{
    call_kw(&object.getattr(name)?, args, kwargs)
}
