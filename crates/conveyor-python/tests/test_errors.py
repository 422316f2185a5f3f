"""The exception classes: they keep their attributes through pickle and copy."""

from __future__ import annotations

import copy
import decimal
import fractions
import pickle
import sys

import pytest

import conveyor

from conftest import run_python

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


def discard(item):
    return None


# Arguments PyO3 converted itself: since PyO3 0.29 it names the argument only in an exception
# note ("while processing 'timeout'"), which str(error) leaves out and Python 3.9/3.10 lose.
# Each case calls with a wrong type on a keyed conveyor `c` or one of its receipts `r`:
# (call, argument, what it takes, the value as shown).
SECONDS = "a number of seconds"
SECONDS_OR_NONE = "a number of seconds or None"
LANE_KEY = 'a str ("" for the single lane of a strict or pipelined conveyor)'
WRONG_TYPE_CALLS = {
    "flush": (lambda c, r: c.flush("x"), "timeout", SECONDS_OR_NONE, "'x'"),
    "aflush": (lambda c, r: c.aflush(timeout="x"), "timeout", SECONDS_OR_NONE, "'x'"),
    "close": (lambda c, r: c.close("x"), "timeout", SECONDS_OR_NONE, "'x'"),
    "aclose": (lambda c, r: c.aclose(timeout="x"), "timeout", SECONDS_OR_NONE, "'x'"),
    "Receipt.result": (lambda c, r: r.result("x"), "timeout", SECONDS_OR_NONE, "'x'"),
    "Receipt.exception": (lambda c, r: r.exception(timeout=[]), "timeout", SECONDS_OR_NONE, "[]"),
    "_send_wait timeout": (lambda c, r: c._send_wait(1, "k", None, None), "timeout", SECONDS, "None"),
    "send": (lambda c, r: c.send(1, key=1), "key", "a str or None", "1"),
    "try_send": (lambda c, r: c.try_send(1, key=b"k"), "key", "a str or None", "b'k'"),
    "asend": (lambda c, r: c.asend(1, key=1), "key", "a str or None", "1"),
    "_send_wait key": (lambda c, r: c._send_wait(1, 1, None, 0.0), "key", "a str or None", "1"),
    "resume": (lambda c, r: c.resume(1), "key", LANE_KEY, "1"),
    "retry_dead": (lambda c, r: c.retry_dead("1"), "seq", "a whole number", "'1'"),
    "discard_dead": (lambda c, r: c.discard_dead(1.0), "seq", "a whole number", "1.0"),
    "backoff": (lambda c, r: conveyor.Conveyor(discard, backoff=None), "backoff", SECONDS, "None"),
    "max_backoff": (
        lambda c, r: conveyor.Conveyor(discard, max_backoff="1"), "max_backoff", SECONDS_OR_NONE, "'1'"
    ),
    "drain_timeout": (
        lambda c, r: conveyor.Conveyor(discard, drain_timeout="x"), "drain_timeout", SECONDS, "'x'"
    ),
    "http timeout": (lambda c, r: conveyor.Conveyor.http("http://x", timeout="x"), "timeout", SECONDS, "'x'"),
    "SerialExecutor": (lambda c, r: conveyor.SerialExecutor(drain_timeout="x"), "drain_timeout", SECONDS, "'x'"),
}


@pytest.mark.parametrize("call, name, expected, shown", WRONG_TYPE_CALLS.values(), ids=WRONG_TYPE_CALLS.keys())
def test_wrong_type_arguments_are_type_errors_naming_the_argument(make, call, name, expected, shown):
    c = make(discard, ordering="keyed")
    r = c.send(1, key="k")
    with pytest.raises(TypeError) as info:
        call(c, r)
    assert str(info.value) == f"argument '{name}': expected {expected}, got {shown}"


class Seconds:
    """Not a float, but says how to be one, as numpy scalars do."""

    def __float__(self) -> float:
        return 0.5

    def __repr__(self) -> str:
        return "Seconds()"


class Index:
    """Not an int, but says how to be one."""

    def __index__(self) -> int:
        return 1

    def __repr__(self) -> str:
        return "Index()"


@pytest.mark.parametrize(
    "seconds",
    [None, 0, 1, 0.5, True, fractions.Fraction(1, 2), decimal.Decimal("0.5"), Seconds(), Index()],
    ids=repr,
)
def test_seconds_take_what_float_takes(make, seconds):
    # What PyO3's own float conversion took, bools included, still works.
    options = {} if seconds is None else {"drain_timeout": seconds, "backoff": seconds}
    c = make(discard, ordering="keyed", max_backoff=seconds, **options)
    r = c.send(1, key="k")
    wait = 10 if seconds is None else seconds
    assert c._send_wait(2, "k", None, wait) is not None
    assert c.flush(10) is True
    # Everything is settled now, so a zero timeout cannot time out.
    assert c.flush(seconds) is True
    assert r.result(seconds) is None and r.exception(timeout=seconds) is None
    assert c.close(seconds).left == 0


def test_an_int_too_large_for_a_float_is_a_value_error_naming_the_argument(make):
    # Was "OverflowError: int too large to convert to float", naming nothing.
    c = make(discard)
    with pytest.raises(ValueError, match=r"^timeout=inf: expected a finite number of seconds >= 0"):
        c.flush(2**2000)
    with pytest.raises(ValueError, match=r"^drain_timeout=inf: "):
        conveyor.Conveyor(discard, drain_timeout=2**2000)
    # A negative timeout means no time left, however large.
    r = c.send(1)
    assert c.flush(10) is True
    assert r.result(timeout=-(2**2000)) is None


# `sys.maxsize` is a common spelling of "forever"; it and anything up to ~1.8e19 s were a
# `PanicException` ("overflow when adding duration to instant") instead of a wait.
FOREVERS = [sys.maxsize, 1e19]


@pytest.mark.parametrize("forever", FOREVERS, ids=repr)
def test_a_timeout_too_long_for_the_clock_waits_like_none(make, forever):
    c = make(discard, ordering="keyed")
    r = c.send(1, key="k")
    assert c._send_wait(2, "k", None, forever) is not None
    assert c.flush(forever) is True
    assert r.result(forever) is None and r.exception(timeout=forever) is None
    assert c.close(forever).left == 0


@pytest.mark.parametrize("forever", FOREVERS, ids=repr)
def test_a_drain_timeout_too_long_for_the_clock_still_drains(forever):
    proc = run_python(
        f"""
import conveyor
delivered = []
dropped = conveyor.Conveyor(delivered.append, drain_timeout={forever!r})
dropped.send("collected")
del dropped
print(delivered)
left = conveyor.Conveyor(print, drain_timeout={forever!r})
left.send("at exit")
"""
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["['collected']", "at exit"]
    assert proc.stderr == ""


def journal_with_a_dead_letter(path):
    def reject(item):
        raise conveyor.PermanentError("rejected")

    with conveyor.Conveyor(reject, journal=path) as c:
        c.send("dead")


# Dead letters and lanes: these said "'str' object cannot be interpreted as an integer",
# "can't convert negative int to unsigned" (an OverflowError) or "'int' object is not an
# instance of 'str'", naming no argument.
LANE_AND_SEQ_CALLS = {
    "resume": (lambda j: j.resume(None), TypeError, f"argument 'key': expected {LANE_KEY}, got None"),
    "retry_dead": (lambda j: j.retry_dead("1"), TypeError, "argument 'seq': expected a whole number, got '1'"),
    "discard_dead": (lambda j: j.discard_dead(True), TypeError, "argument 'seq': expected a whole number, got True"),
    "retry_dead -1": (lambda j: j.retry_dead(-1), ValueError, "seq=-1: expected a whole number >= 1"),
    "discard_dead 2**64": (lambda j: j.discard_dead(2**64), ValueError, f"seq={2**64}: too large"),
}


@pytest.mark.parametrize("owner", ["Conveyor", "Journal"])
@pytest.mark.parametrize("call, error, message", LANE_AND_SEQ_CALLS.values(), ids=LANE_AND_SEQ_CALLS.keys())
def test_dead_letter_and_lane_arguments_are_named_in_errors(tmp_path, owner, call, error, message):
    path = tmp_path / "events.journal"
    journal_with_a_dead_letter(path)
    opened = conveyor.Conveyor(discard, journal=path) if owner == "Conveyor" else conveyor.Journal(path)
    try:
        with pytest.raises(error) as info:
            call(opened)
        assert str(info.value) == message
        assert [dead.item for dead in opened.dead_letters()] == ["dead"]
    finally:
        opened.close()


@pytest.mark.parametrize("send", ["send", "try_send", "asend"])
def test_a_key_with_no_utf8_form_is_named_as_such(make, send):
    # Said "expected a str or None, got '\\udcff'" of what is a str: one holding a lone
    # surrogate, as os.fsdecode() leaves for a byte that is not UTF-8.
    c = make(discard, ordering="keyed")
    with pytest.raises(ValueError) as info:
        getattr(c, send)(1, key="user-\udcff")
    assert str(info.value).startswith("argument 'key': 'user-\\udcff' has no UTF-8 form (")
    assert str(info.value).endswith("): pass text without lone surrogates")
    assert c.stats.accepted == 0


def test_a_finite_number_of_seconds_too_long_to_hold_says_so(make):
    # Said "timeout=1000…(301 digits): expected a finite number of seconds >= 0" of a finite one.
    c = make(discard)
    with pytest.raises(ValueError) as info:
        c.flush(1e300)
    assert str(info.value) == (
        "timeout=1e300: too long, expected at most 1.8446744073709552e19 seconds, or None to wait forever"
    )
    with pytest.raises(ValueError, match=r"^drain_timeout=1e20: too long, expected at most [0-9.e]+ seconds$"):
        conveyor.Conveyor(discard, drain_timeout=1e20)
