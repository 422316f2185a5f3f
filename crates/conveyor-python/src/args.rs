//! Readers for arguments whose type PyO3 would check itself (for `#[pyo3(from_py_with = ...)]`).
//!
//! Since PyO3 0.29 a failed conversion names the argument only in an exception note
//! (`while processing 'timeout'`): `str(error)` leaves it out, and Python 3.9 and 3.10 (which
//! have no notes) lose it entirely. These readers accept exactly what PyO3 accepted and raise a
//! `TypeError` that names the argument and says what it takes. `from_py_with` takes a bare
//! function path, so each argument name gets a one-line function over a shared reader. Every
//! reader takes the value first, then the argument's name.

use std::collections::BTreeMap;

use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyString};

/// The `TypeError` for argument `name` given a value of the wrong type. PyO3's own names a Rust
/// type ("'int' object cannot be converted to 'PyString'"), not what the argument takes, and
/// names the argument only in a note that `str(error)` leaves out.
pub(crate) fn wrong_type(value: &Bound<'_, PyAny>, name: &str, expected: &str) -> PyErr {
    let shown = value
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "a value".to_owned());
    PyTypeError::new_err(format!(
        "argument '{name}': expected {expected}, got {shown}"
    ))
}

/// Reads a number of seconds as PyO3's `f64` did: a float, an int, a bool, or anything with
/// `__float__` or `__index__` (a `Fraction`, a `Decimal`, a numpy scalar). Range checks are the
/// caller's, whose `ValueError` names the argument and says what else it takes.
///
/// # Errors
/// `TypeError` naming the argument for anything that is not a number; whatever the value's own
/// `__float__` raises.
fn seconds(value: &Bound<'_, PyAny>, name: &str, expected: &str) -> PyResult<f64> {
    match value.extract::<f64>() {
        Ok(seconds) => Ok(seconds),
        // An int too large for a float: as good as infinite, which the caller's range check
        // refuses with the argument's name (or, for a receipt, a negative one means no time
        // left), where Python's `OverflowError` named nothing.
        Err(err) => match overflow_sign(value, &err)? {
            Some(positive) => Ok(if positive {
                f64::INFINITY
            } else {
                f64::NEG_INFINITY
            }),
            None if err.is_instance_of::<PyTypeError>(value.py()) => {
                Err(wrong_type(value, name, expected))
            }
            None => Err(err),
        },
    }
}

/// If `err` is the `OverflowError` of extracting `value`, an int too large for the Rust type
/// asked for: whether that int is positive. The callers turn it into an error that names the
/// argument, where Python's `OverflowError` named nothing.
fn overflow_sign(value: &Bound<'_, PyAny>, err: &PyErr) -> PyResult<Option<bool>> {
    if err.is_instance_of::<PyOverflowError>(value.py()) {
        value.gt(0).map(Some)
    } else {
        Ok(None)
    }
}

/// Reads a count option (`capacity`, `retries`, ...). Any Python int is read, however large,
/// so that a value out of range gets a `ValueError` naming the option.
///
/// # Errors
/// `TypeError` for a bool (an int subclass, but `retries=True` is a mistake) or a non-integer;
/// `ValueError` for a value below `min` or too large for `T`.
pub(crate) fn count<T: TryFrom<i64>>(
    value: &Bound<'_, PyAny>,
    name: &str,
    min: i64,
) -> PyResult<T> {
    if value.is_instance_of::<PyBool>() {
        return Err(wrong_type(value, name, "a whole number"));
    }
    let too_large = || PyValueError::new_err(format!("{name}={value}: too large"));
    let too_small =
        || PyValueError::new_err(format!("{name}={value}: expected a whole number >= {min}"));
    let n: i64 = match value.extract() {
        Ok(n) => n,
        Err(err) => {
            return Err(match overflow_sign(value, &err)? {
                Some(true) => too_large(),
                Some(false) => too_small(),
                None => wrong_type(value, name, "a whole number"),
            })
        }
    };
    if n < min {
        return Err(too_small());
    }
    T::try_from(n).map_err(|_| too_large())
}

/// [`count`] for an option that also takes `None`.
pub(crate) fn optional_count<T: TryFrom<i64>>(
    value: &Bound<'_, PyAny>,
    name: &str,
    min: i64,
) -> PyResult<Option<T>> {
    optional(value, |v| count(v, name, min))
}

/// `"a", "b" or "c"`.
fn one_of(choices: &[&str]) -> String {
    let quoted: Vec<String> = choices.iter().map(|c| format!("{c:?}")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// The `ValueError` for option `name` given a string that is none of `choices`.
pub(crate) fn unknown_choice(name: &str, value: &str, choices: &[&str]) -> PyErr {
    PyValueError::new_err(format!("{name}={value:?}: expected {}", one_of(choices)))
}

/// Reads a string option that takes one of `choices`. Returns the matching choice itself, so
/// the option's default stays a literal that `help()` shows.
pub(crate) fn choice(
    value: &Bound<'_, PyAny>,
    name: &str,
    choices: &[&'static str],
) -> PyResult<&'static str> {
    let text: String = value
        .extract()
        .map_err(|_| wrong_type(value, name, &one_of(choices)))?;
    choices
        .iter()
        .copied()
        .find(|choice| *choice == text)
        .ok_or_else(|| unknown_choice(name, &text, choices))
}

/// `None` for `None`, else what `read` makes of the value: for arguments that also take `None`.
pub(crate) fn optional<'py, T>(
    value: &Bound<'py, PyAny>,
    read: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<T>,
) -> PyResult<Option<T>> {
    if value.is_none() {
        return Ok(None);
    }
    read(value).map(Some)
}

/// [`seconds`] for an argument that also takes `None`.
fn optional_seconds(value: &Bound<'_, PyAny>, name: &str) -> PyResult<Option<f64>> {
    optional(value, |v| seconds(v, name, "a number of seconds or None"))
}

fn required_seconds(value: &Bound<'_, PyAny>, name: &str) -> PyResult<f64> {
    seconds(value, name, "a number of seconds")
}

/// `timeout` of the waits (`flush`, `close`, `Receipt.result`, ...): `None` waits forever.
pub(crate) fn timeout(value: &Bound<'_, PyAny>) -> PyResult<Option<f64>> {
    optional_seconds(value, "timeout")
}

/// `timeout` where `None` is not an option (a send's wait for room, an HTTP request).
pub(crate) fn bounded_timeout(value: &Bound<'_, PyAny>) -> PyResult<f64> {
    required_seconds(value, "timeout")
}

pub(crate) fn backoff(value: &Bound<'_, PyAny>) -> PyResult<f64> {
    required_seconds(value, "backoff")
}

pub(crate) fn max_backoff(value: &Bound<'_, PyAny>) -> PyResult<Option<f64>> {
    optional_seconds(value, "max_backoff")
}

pub(crate) fn drain_timeout(value: &Bound<'_, PyAny>) -> PyResult<f64> {
    required_seconds(value, "drain_timeout")
}

/// `key` of the sends: a `str` (exactly what PyO3's `String` took), or `None` for no key.
pub(crate) fn key(value: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
    optional(value, |v| str_arg(v, "key", "a str or None"))
}

/// `key` of `resume`: a lane's key, `""` for the single lane of a strict or pipelined conveyor.
pub(crate) fn lane_key(value: &Bound<'_, PyAny>) -> PyResult<String> {
    str_arg(
        value,
        "key",
        "a str (\"\" for the single lane of a strict or pipelined conveyor)",
    )
}

/// `seq` of a dead letter (`retry_dead`, `discard_dead`): seqs start at 1.
pub(crate) fn seq(value: &Bound<'_, PyAny>) -> PyResult<u64> {
    count(value, "seq", 1)
}

/// `headers` of `Conveyor.http`: any mapping of `str` names to `str` values, as the stub's
/// `Mapping[str, str]` promises (a `dict`, but also requests' `CaseInsensitiveDict` or a
/// `MappingProxyType`), or `None`. Header values are secrets (an `Authorization` token): an
/// error names the header and the type, never a value.
///
/// # Errors
/// `TypeError` naming the argument for anything else; whatever the mapping's `items()` raises.
pub(crate) fn headers(value: &Bound<'_, PyAny>) -> PyResult<Option<BTreeMap<String, String>>> {
    const EXPECTED: &str = "a mapping of str header names to str values (a dict), or None";
    let type_name = |value: &Bound<'_, PyAny>| {
        value
            .get_type()
            .name()
            .map(|name| name.to_string())
            .unwrap_or_default()
    };
    optional(value, |mapping| {
        let Ok(items) = mapping.getattr(intern!(mapping.py(), "items")) else {
            return Err(PyTypeError::new_err(format!(
                "argument 'headers': expected {EXPECTED}, got a {}",
                type_name(mapping)
            )));
        };
        let mut headers = BTreeMap::new();
        for pair in items.call0()?.try_iter()? {
            let (name, header) = pair?.extract::<(Bound<'_, PyAny>, Bound<'_, PyAny>)>()?;
            let name: String = name
                .extract()
                .map_err(|_| wrong_type(&name, "headers", "str header names"))?;
            let header: String = header.extract().map_err(|_| {
                PyTypeError::new_err(format!(
                    "argument 'headers': expected str header values, got a {} for {name:?} \
                     (values are never shown: they may be secrets)",
                    type_name(&header)
                ))
            })?;
            headers.insert(name, header);
        }
        Ok(headers)
    })
}

/// Reads a `str` argument, with a `TypeError` that names it and says what it takes.
///
/// # Errors
/// `TypeError` for anything but a `str`; `ValueError` for a `str` with no UTF-8 form (a lone
/// surrogate, as `surrogateescape` decoding leaves), which "expected a str" would misname.
pub(crate) fn str_arg(value: &Bound<'_, PyAny>, name: &str, expected: &str) -> PyResult<String> {
    value.extract::<String>().map_err(|err| {
        if value.is_instance_of::<PyString>() {
            PyValueError::new_err(format!(
                "argument '{name}': {} has no UTF-8 form ({}): pass text without lone surrogates",
                value
                    .repr()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|_| "the str".to_owned()),
                err.value(value.py())
            ))
        } else {
            wrong_type(value, name, expected)
        }
    })
}
