//! `Conveyor.http(url, ...)`: the engine's HTTP sink, so the whole delivery path runs in Rust
//! and never takes the GIL.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor::{Delivery, HttpBuildError, HttpReply, HttpSink, SinkError};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyString};

use serde_json::value::RawValue;

use crate::sink::{Item, Reply, SinkState};

/// A built HTTP sink on its way into `Conveyor(...)`; only `Conveyor.http` makes one.
#[pyclass(frozen, module = "conveyor._conveyor")]
pub(crate) struct PyHttpSink {
    /// Taken by the conveyor that uses it: one sink, one conveyor.
    sink: Mutex<Option<HttpSink>>,
}

impl PyHttpSink {
    pub(crate) fn new(
        url: &str,
        headers: BTreeMap<String, String>,
        method: &str,
        timeout: Duration,
        cafile: Option<&Path>,
        max_reply_body: Option<usize>,
    ) -> PyResult<Self> {
        let mut builder = HttpSink::builder(url)
            .method(method)
            .timeout(timeout)
            .max_reply_body(max_reply_body.unwrap_or(usize::MAX));
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        if let Some(path) = cafile {
            let pem = std::fs::read(path).map_err(|err| {
                // PyO3 picks the OSError subclass of the kind (FileNotFoundError, ...).
                let message = format!("cannot read cafile={}: {err}", path.display());
                PyErr::from(std::io::Error::new(err.kind(), message))
            })?;
            builder = builder.root_certificates(pem);
        }
        let sink = builder.build().map_err(|err| match (err, cafile) {
            (err @ HttpBuildError::InvalidRootCertificates(_), Some(path)) => {
                PyValueError::new_err(format!("cafile={}: {err}", path.display()))
            }
            (err, _) => PyValueError::new_err(err.to_string()),
        })?;
        Ok(PyHttpSink {
            sink: Mutex::new(Some(sink)),
        })
    }

    pub(crate) fn take(&self) -> PyResult<HttpSink> {
        self.sink
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("this HTTP sink already belongs to a conveyor"))
    }
}

/// The engine sink: one request per item, no Python involved, except to log an item's final
/// failure (see `failure_log.rs`).
pub(crate) fn sink(
    http: HttpSink,
    state: Arc<SinkState>,
) -> impl Fn(Delivery<Item>) -> Result<Reply, SinkError> + Send + Sync + 'static {
    move |delivery| {
        http.send(&delivery)
            .map(Reply::Http)
            .inspect_err(|error| state.report_http_failure(&delivery, error))
    }
}

/// The request body for a sent object: bytes-like as is, `str` as UTF-8, else JSON.
pub(crate) fn body(object: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(bytes) = object.cast::<PyBytes>() {
        return Ok(bytes.as_bytes().to_vec());
    }
    if let Ok(text) = object.cast::<PyString>() {
        return Ok(text.to_string().into_bytes());
    }
    if let Ok(array) = object.cast::<PyByteArray>() {
        return Ok(array.to_vec());
    }
    static DUMPS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let dumps = DUMPS.import(object.py(), "json", "dumps")?;
    let text = dumps.call1((object,)).map_err(|err| {
        let message = format!(
            "Conveyor.http sends bytes, str, or JSON-serialisable objects; this {} is none of them: {err}",
            object.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        );
        PyValueError::new_err(message)
    })?;
    Ok(text.cast_into::<PyString>()?.to_string().into_bytes())
}

/// The body of an item for a journaled `Conveyor.http`: the same bytes [`body`] makes, kept as
/// JSON text, which is what the journal stores. A body that is not JSON (raw text or bytes) is
/// refused rather than posted differently after a restart.
pub(crate) fn json_body(object: &Bound<'_, PyAny>) -> PyResult<Box<RawValue>> {
    let body = body(object)?;
    let not_json = |why: String| {
        PyValueError::new_err(format!(
            "a journaled Conveyor.http stores each request body as JSON, and this body is not \
             JSON ({why}): send a JSON-serialisable object, or str/bytes holding JSON text"
        ))
    };
    let text = String::from_utf8(body).map_err(|e| not_json(e.to_string()))?;
    let length = text.len();
    let json = RawValue::from_string(text).map_err(|e| not_json(e.to_string()))?;
    // The journal keeps the JSON value, not whitespace around it.
    if json.get().len() != length {
        return Err(not_json(
            "it has whitespace around the JSON value".to_owned(),
        ));
    }
    Ok(json)
}

/// The response to an item sent by `Conveyor.http`: `status` (2xx), `body` (bytes) and
/// `truncated` (whether the server sent more than `max_reply_body`, so that `body` holds only
/// the start).
#[pyclass(frozen, get_all, module = "conveyor", name = "HttpReply")]
pub(crate) struct PyHttpReply {
    status: u16,
    body: Py<PyBytes>,
    truncated: bool,
}

impl PyHttpReply {
    pub(crate) fn new(py: Python<'_>, reply: &HttpReply) -> Self {
        PyHttpReply {
            status: reply.status,
            body: PyBytes::new(py, &reply.body).unbind(),
            truncated: reply.truncated,
        }
    }
}

#[pymethods]
impl PyHttpReply {
    /// The body decoded as UTF-8 (invalid bytes replaced).
    fn text(&self, py: Python<'_>) -> String {
        String::from_utf8_lossy(self.body.as_bytes(py)).into_owned()
    }

    /// The body parsed as JSON.
    fn json(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        static LOADS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        Ok(LOADS
            .import(py, "json", "loads")?
            .call1((self.body.bind(py),))?
            .unbind())
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let truncated = if self.truncated { ", truncated" } else { "" };
        format!(
            "HttpReply(status={}, body=<{} bytes{truncated}>)",
            self.status,
            self.body.as_bytes(py).len()
        )
    }
}
