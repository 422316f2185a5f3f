"""The exception classes: they keep their attributes through pickle and copy."""

from __future__ import annotations

import copy
import pickle

import pytest

import conveyor

# One instance of every exception class conveyor exports, with every attribute it carries.
EXAMPLES = [
    conveyor.ConveyorError("base"),
    conveyor.QueueFull("full"),
    conveyor.Closed("closed"),
    conveyor.Dropped("dropped"),
    conveyor.JournalError("journal"),
    conveyor.DeliveryFailed(
        "item 7 failed", attempts=3, last_exception=ValueError("bad payload"), seq=7, status=503
    ),
    conveyor.PermanentError("HTTP 400"),
    conveyor.RetryAfter(2.5),
    conveyor.RetryAfter(0, "HTTP 429"),
]

CLONES = {
    "pickle": lambda exc: pickle.loads(pickle.dumps(exc)),
    "copy": copy.copy,
    "deepcopy": copy.deepcopy,
}


def assert_same(twin, exc):
    assert type(twin) is type(exc)
    assert twin.args == exc.args and str(twin) == str(exc)
    # repr: exceptions compare by identity, so compare what they show.
    assert repr(vars(twin)) == repr(vars(exc))
    assert repr(twin.__cause__) == repr(exc.__cause__)


def test_the_examples_cover_every_exported_exception():
    exported = {
        obj
        for obj in (getattr(conveyor, name) for name in conveyor.__all__)
        if isinstance(obj, type) and issubclass(obj, BaseException)
    }
    assert exported == {type(exc) for exc in EXAMPLES}


@pytest.mark.parametrize("clone", CLONES.values(), ids=CLONES.keys())
@pytest.mark.parametrize("exc", EXAMPLES, ids=repr)
def test_every_exception_survives_pickle_and_copy(exc, clone):
    assert_same(clone(exc), exc)


def test_retry_after_keeps_its_seconds():
    twin = pickle.loads(pickle.dumps(conveyor.RetryAfter(2.5, "HTTP 429")))
    assert twin.seconds == 2.5 and str(twin) == "HTTP 429"


def test_a_delivery_failure_from_a_receipt_survives_pickle(make):
    def sink(item):
        raise ValueError(f"bad payload {item}")

    c = make(sink, retries=1, backoff=0.001)
    failure = c.send(1).exception(timeout=10)
    assert isinstance(failure, conveyor.DeliveryFailed)
    twin = pickle.loads(pickle.dumps(failure))
    assert_same(twin, failure)
    assert (twin.attempts, twin.seq) == (2, 1)
    assert isinstance(twin.__cause__, ValueError) and twin.__cause__ is twin.last_exception


def count_option(options):
    """The count option a case is about: `ordering` only comes along to make it apply."""
    return next(name for name in options if name != "ordering")


@pytest.mark.parametrize(
    "options",
    [
        {"capacity": -1},
        {"retries": -1},
        {"retries": 2**40},
        {"rate_limit": -5},
        {"ordering": "pipelined", "in_flight": -1},
        {"ordering": "keyed", "concurrency": -2},
    ],
)
def test_out_of_range_counts_are_value_errors_naming_the_option(options):
    # An OverflowError without the option's name ("out of range integral type conversion
    # attempted") left users guessing which of a dozen options was wrong.
    name = count_option(options)
    with pytest.raises(ValueError, match=f"{name}={options[name]}"):
        conveyor.Conveyor(print, **options)


@pytest.mark.parametrize(
    "options",
    [
        {"capacity": 2**70},
        {"retries": 2**64},
        {"rate_limit": -(2**70)},
        {"ordering": "pipelined", "in_flight": 2**100},
    ],
)
def test_counts_beyond_any_c_integer_are_value_errors_naming_the_option(options):
    # PyO3 raised "OverflowError: Python int too large to convert to C long", naming nothing.
    name = count_option(options)
    with pytest.raises(ValueError, match=f"^{name}={options[name]}: ") as info:
        conveyor.Conveyor(print, **options)
    assert not isinstance(info.value, OverflowError)


@pytest.mark.parametrize(
    "options",
    [
        {"retries": True},
        {"capacity": True},
        {"rate_limit": False},
        {"ordering": "keyed", "concurrency": True},
        {"capacity": 2.5},
        {"retries": "3"},
    ],
)
def test_counts_take_no_bools_or_other_types(options):
    # A bool is an int subclass, so retries=True passed as retries=1; durability=True is refused.
    name = count_option(options)
    with pytest.raises(TypeError, match=f"'{name}': expected a whole number, got {options[name]!r}"):
        conveyor.Conveyor(print, **options)


@pytest.mark.parametrize(
    "options, name, expected",
    [
        ({"ordering": 1}, "ordering", '"strict", "pipelined" or "keyed"'),
        ({"backpressure": None}, "backpressure", '"block", "reject", "drop_newest" or "drop_oldest"'),
        ({"on_failure": True}, "on_failure", '"skip" or "pause"'),
        ({"name": 3}, "name", "a str or None"),
        ({"journal": "j", "durability": [1]}, "durability", 'seconds (e.g. 0.005) or "sync"'),
    ],
)
def test_wrong_type_options_are_type_errors_saying_what_they_take(options, name, expected, tmp_path):
    # PyO3's own message named a Rust type: "'int' object cannot be converted to 'PyString'".
    if "journal" in options:
        options = {**options, "journal": tmp_path / "j"}
    with pytest.raises(TypeError) as info:
        conveyor.Conveyor(print, **options)
    message = str(info.value)
    assert name in message and expected in message and "PyString" not in message, message


@pytest.mark.parametrize("options, name", [({"url": 1}, "url"), ({"url": "http://x", "method": 1}, "method")])
def test_wrong_type_http_options_are_type_errors_saying_what_they_take(options, name):
    with pytest.raises(TypeError, match=f"'{name}': expected a str") as info:
        conveyor.Conveyor.http(**options)
    assert "PyString" not in str(info.value)
