//! The least a PyO3 `send(item)` that hands back a receipt object can cost (the method call,
//! the argument, and a fresh object returned: no queue, no thread, no engine), and the least a
//! delivery thread's sink calls can cost (called from Rust, the GIL held throughout). `run.sh`
//! times them beside `queue.SimpleQueue` and the real `Conveyor`.

use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::prelude::*;
use pyo3::types::PyList;

/// Stands for `conveyor.Receipt`: one fresh object per send.
#[pyclass(frozen)]
struct Receipt {
    #[pyo3(get)]
    seq: u64,
}

/// Stands for `conveyor.Conveyor`, with a `send` that only numbers the item and drops it.
#[pyclass(frozen)]
struct Floor {
    next: AtomicU64,
}

#[pymethods]
impl Floor {
    #[new]
    fn new() -> Self {
        Floor {
            next: AtomicU64::new(0),
        }
    }

    /// Takes the item and returns a fresh receipt, as `Conveyor.send` must.
    fn send(&self, item: Py<PyAny>) -> Receipt {
        drop(item);
        Receipt {
            seq: self.next.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Calls `sink(item)` for each item from Rust with the GIL held throughout, as a delivery
    /// thread would at best (no GIL hand-over between calls); returns how many calls failed.
    #[staticmethod]
    fn deliver(sink: &Bound<'_, PyAny>, items: &Bound<'_, PyList>) -> usize {
        items
            .iter()
            .filter(|item| sink.call1((item,)).is_err())
            .count()
    }
}

#[pymodule(gil_used = true)]
fn _floor(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Floor>()?;
    m.add_class::<Receipt>()?;
    Ok(())
}
