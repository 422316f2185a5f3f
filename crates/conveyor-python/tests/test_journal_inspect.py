"""conveyor.Journal: a journal looked at and repaired without a Conveyor delivering from it."""

from __future__ import annotations

import os
import threading
import time

import pytest

import conveyor

from conftest import Recorder, in_forked_child


def leave_a_journal_to_repair(path):
    """A keyed journal as a stopped service leaves it: two dead letters in lane "a" (from a run
    under on_failure="skip"), then lane "b" paused by its first item with a second one held
    behind it (from a run under on_failure="pause"), and an input cursor."""

    def failing(item):
        raise conveyor.PermanentError(f"{item[0]}{item[1]} rejected")

    skipping = conveyor.Conveyor(failing, journal=path, ordering="keyed")
    skipping.send(["a", 1], key="a", cursor=1)
    skipping.send(["a", 2], key="a", cursor=2)
    assert skipping.flush(timeout=10)
    assert skipping.close(timeout=10).left == 0

    pausing = conveyor.Conveyor(failing, journal=path, ordering="keyed", on_failure="pause")
    pausing.send(["b", 1], key="b", cursor=3)
    pausing.send(["b", 2], key="b", cursor=4)
    assert pausing.flush(timeout=10)
    assert pausing.paused() == ["b"]
    assert pausing.close(timeout=10).left == 2


def test_a_stopped_services_journal_is_inspected_and_repaired_offline(tmp_path):
    path = tmp_path / "events.journal"
    leave_a_journal_to_repair(path)

    with conveyor.Journal(path) as journal:
        assert journal.path == str(path) and not journal.read_only
        status = journal.status()
        assert isinstance(status, conveyor.JournalStatus)
        assert (status.pending, status.dead_letters, status.cursor) == (2, 2, 4)
        assert status.keyed is True and status.id == journal.id
        assert status.last_seq >= 4 and status.file_bytes > 0
        [lane] = status.lanes
        assert isinstance(lane, conveyor.LaneStatus)
        assert (lane.lane, lane.pending) == ("b", 2) and "b1 rejected" in lane.paused
        assert "LaneStatus(lane='b', pending=2, paused='" in repr(status)
        assert status == journal.status(), "the same figures make equal snapshots"

        dead = journal.dead_letters()
        assert all(isinstance(d, conveyor.DeadLetter) for d in dead)
        assert [(d.item, d.key) for d in dead] == [(["a", 1], "a"), (["a", 2], "a")]
        assert "a1 rejected" in dead[0].error and "a2 rejected" in dead[1].error
        assert repr(dead[0]) == (
            f"DeadLetter(seq={dead[0].seq}, key='a', item=['a', 1], attempts=1, "
            f"error={dead[0].error!r})"
        ), "reads like Python"
        assert journal.resume(key="b") is True and journal.resume(key="b") is False
        assert journal.status().lanes[0].paused is None
        new_seq = journal.retry_dead(dead[0].seq)
        assert new_seq > status.last_seq
        journal.discard_dead(dead[1].seq)
        journal.set_cursor(7)
        with pytest.raises(conveyor.JournalError, match=f"no dead letter with seq {dead[1].seq}"):
            journal.discard_dead(dead[1].seq)

        after = journal.status()
        assert (after.pending, after.dead_letters, after.cursor) == (3, 0, 7)
        assert [(l.lane, l.pending, l.paused) for l in after.lanes] == [("a", 1, None), ("b", 2, None)]

    seen = []
    c = conveyor.Conveyor(seen.append, journal=path, ordering="keyed")
    try:
        assert c.flush(timeout=10)
        assert c.paused() == [] and c.cursor() == 7
        # Per key in order; the discarded item never comes.
        assert [item for item in seen if item[0] == "b"] == [["b", 1], ["b", 2]]
        assert [item for item in seen if item[0] == "a"] == [["a", 1]]
        assert len(seen) == 3
    finally:
        assert c.close(timeout=10).left == 0


def test_read_only_shows_a_running_conveyors_commits_and_changes_nothing(tmp_path):
    path = tmp_path / "events.journal"
    gate = threading.Event()

    def sink(item):
        if item == "bad":
            raise conveyor.PermanentError("bad is rejected")
        if item == "hold":
            gate.wait(30)

    # "sync": each send returns once the journal holds its item.
    c = conveyor.Conveyor(sink, journal=path, durability="sync")
    try:
        for n, item in enumerate(["bad", "hold", "next-1", "next-2"], 1):
            c.send(item, cursor=n)
        journal = conveyor.Journal(path, read_only=True)
        assert journal.read_only and "read_only=True" in repr(journal)
        # The dead letter is committed with the settlement of "bad", a moment after its send.
        deadline = time.monotonic() + 10
        while journal.status().dead_letters == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        status = journal.status()
        assert (status.pending, status.dead_letters, status.cursor) == (3, 1, 4), status
        [dead] = journal.dead_letters()
        assert dead.item == "bad" and "bad is rejected" in dead.error

        for change in (
            lambda: journal.retry_dead(dead.seq),
            lambda: journal.discard_dead(dead.seq),
            lambda: journal.resume(),
            lambda: journal.set_cursor(5),
        ):
            with pytest.raises(conveyor.JournalError, match="read_only=True") as caught:
                change()
            assert "::" not in str(caught.value), "no Rust API in a Python message"
        assert journal.status() == status, "nothing changed"

        with pytest.raises(conveyor.JournalError, match=f"process {os.getpid()}") as caught:
            conveyor.Journal(path)
        assert "read_only=True" in str(caught.value)
    finally:
        gate.set()
    assert c.close(timeout=10).left == 0
    # Still readable after its owner let go, and now with everything settled.
    assert journal.status().pending == 0
    journal.close()


@pytest.mark.parametrize("read_only", [False, True])
def test_a_path_with_no_journal_is_refused_and_nothing_is_created(tmp_path, read_only):
    missing = tmp_path / "typo.journal"
    with pytest.raises(conveyor.JournalError, match="no journal at .*typo.journal") as caught:
        conveyor.Journal(missing, read_only=read_only)
    assert "never creates" in str(caught.value) or read_only
    assert "::" not in str(caught.value)

    empty = tmp_path / "empty.journal"
    empty.touch()
    with pytest.raises(conveyor.JournalError, match="no journal at .*empty.journal"):
        conveyor.Journal(empty, read_only=read_only)
    assert empty.read_bytes() == b""

    with pytest.raises(conveyor.JournalError, match="is a directory") as caught:
        conveyor.Journal(tmp_path, read_only=read_only)
    assert "created if it does not exist" not in str(caught.value)

    text = tmp_path / "notes.txt"
    text.write_text("not a journal\n")
    with pytest.raises(conveyor.JournalError, match="not a Conveyor journal") as caught:
        conveyor.Journal(text, read_only=read_only)
    assert "does not exist yet" not in str(caught.value)
    assert text.read_text() == "not a journal\n"

    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.journal", "notes.txt"]


def test_after_close_every_method_raises_and_the_file_is_released(tmp_path):
    path = tmp_path / "events.journal"
    conveyor.Conveyor(Recorder(), journal=path).close(timeout=10)

    with conveyor.Journal(path) as journal:
        assert not journal.closed
        # While it is open, no Conveyor can take the file.
        with pytest.raises(conveyor.JournalError, match="in use"):
            conveyor.Conveyor(Recorder(), journal=path)
    assert journal.closed and "closed" in repr(journal)
    for method in (
        journal.status,
        journal.dead_letters,
        lambda: journal.retry_dead(1),
        lambda: journal.discard_dead(1),
        journal.resume,
        journal.cursor,
        lambda: journal.set_cursor(1),
        journal.__enter__,
    ):
        with pytest.raises(conveyor.JournalError, match="was closed"):
            method()
    journal.close()  # a second close does nothing
    assert journal.path == str(path) and journal.id, "still tells which journal it was"

    # Closed means released: a Conveyor takes the file again.
    conveyor.Conveyor(Recorder(), journal=path).close(timeout=10)


def test_a_conveyor_refused_for_a_journal_open_in_this_process_says_to_close_it(tmp_path):
    # It used to say "in use by process N: stop that process first", N being this very process.
    path = tmp_path / "events.journal"
    conveyor.Conveyor(Recorder(), journal=path).close(timeout=10)
    with conveyor.Journal(path):
        with pytest.raises(conveyor.JournalError, match="in use by this process") as caught:
            conveyor.Conveyor(Recorder(), journal=path)
    message = str(caught.value)
    assert "conveyor.Journal" in message and "close()" in message, message
    assert "stop that process" not in message, message


def test_calls_from_several_threads_share_one_journal(tmp_path):
    path = tmp_path / "events.journal"
    leave_a_journal_to_repair(path)
    errors = []
    with conveyor.Journal(path) as journal:

        def read():
            try:
                for _ in range(50):
                    assert journal.status().pending == 2
                    assert len(journal.dead_letters()) == 2
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=read) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert errors == [] and not any(t.is_alive() for t in threads)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
@pytest.mark.parametrize("read_only", [False, True], ids=["owner", "read_only"])
def test_a_journal_inherited_through_fork_is_refused_in_the_child(tmp_path, read_only):
    # The child used to share the parent's SQLite connection (and its lock on the file), which
    # SQLite forbids, and hung for ever on its first call if a parent thread was inside one
    # when it forked.
    path = tmp_path / "events.journal"
    leave_a_journal_to_repair(path)
    held = [conveyor.Journal(path, read_only=read_only)]
    before = [d.seq for d in held[0].dead_letters()]

    def child() -> list[str]:
        journal = held.pop()
        lines = []
        for name, method in (
            ("status", journal.status),
            ("discard_dead", lambda: journal.discard_dead(before[0])),
        ):
            try:
                method()
                lines.append(f"{name}: no error")
            except conveyor.JournalError as exc:
                lines.append(f"{name}: refused" + ("os.fork()" in str(exc)) * ", names fork")
        lines.append("repr: " + ("fork" in repr(journal)) * "says fork")
        journal.close()
        lines.append("close: does nothing")
        # Dropped in the child: the parent's file is left alone.
        del journal, method
        return lines

    assert in_forked_child(child) == [
        "status: refused, names fork",
        "discard_dead: refused, names fork",
        "repr: says fork",
        "close: does nothing",
    ]
    # The parent's journal is untouched and still works; closed, it releases the file.
    journal = held[0]
    assert [d.seq for d in journal.dead_letters()] == before
    journal.close()
    conveyor.Conveyor(Recorder(), journal=path, ordering="keyed").close(timeout=10)
