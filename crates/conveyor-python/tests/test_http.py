"""Conveyor.http: the engine's HTTP sink, against a local server on 127.0.0.1."""

from __future__ import annotations

import collections.abc
import inspect
import json
import pathlib
import ssl
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, List, Optional, Tuple

import pytest

import conveyor

TLS = pathlib.Path(__file__).resolve().parents[2] / "conveyor" / "tests" / "fixtures" / "tls"


class Server:
    """Records request bodies; answers with the next scripted status (200 when none is left)."""

    def __init__(self, tls: bool = False) -> None:
        self.bodies: List[bytes] = []
        self.authorization: List[object] = []
        self.script: List[Tuple[int, dict]] = []
        # The body of every 2xx reply, instead of the default {"got": <request body length>}.
        self.reply: Optional[bytes] = None
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server.lock:
                    status, extra = server.script.pop(0) if server.script else (200, {})
                    if status == 200:
                        server.bodies.append(body)
                    server.authorization.append(self.headers.get("Authorization"))
                reply = server.reply or json.dumps({"got": len(body)}).encode()
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls:
            # A certificate that only the engine tests' private CA vouches for.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(TLS / "server.pem", TLS / "server.key")
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}/events"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def test_items_are_posted_in_order_as_bodies(server):
    with conveyor.Conveyor.http(server.url, headers={"Authorization": "Bearer s3cret"}) as c:
        receipts = [c.send(b"raw"), c.send("text \u00e9"), c.send({"n": 1}), c.send([1, 2])]
        replies = [r.result(timeout=10) for r in receipts]
    assert server.bodies == [b"raw", "text \u00e9".encode(), b'{"n": 1}', b"[1, 2]"]
    assert all(isinstance(r, conveyor.HttpReply) and r.status == 200 for r in replies)
    assert replies[0].json() == {"got": 3}
    assert replies[0].text() == '{"got": 3}'
    assert server.authorization == ["Bearer s3cret"] * 4


class CaseInsensitiveHeaders(collections.abc.Mapping):
    """A mapping that is no dict, as requests' `CaseInsensitiveDict` is."""

    def __init__(self, **headers: str) -> None:
        self.headers = headers

    def __getitem__(self, name: str) -> str:
        return self.headers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.headers)

    def __len__(self) -> int:
        return len(self.headers)


@pytest.mark.parametrize(
    "headers",
    [
        CaseInsensitiveHeaders(Authorization="Bearer s3cret"),
        types.MappingProxyType({"Authorization": "Bearer s3cret"}),
    ],
    ids=lambda headers: type(headers).__name__,
)
def test_headers_may_be_any_mapping(server, headers):
    # The stub says Mapping[str, str]; anything but a dict was "TypeError: 'mappingproxy'
    # object is not an instance of 'dict'".
    with conveyor.Conveyor.http(server.url, headers=headers) as c:
        assert c.send("x").result(timeout=10).status == 200
    assert server.authorization == ["Bearer s3cret"]


@pytest.mark.parametrize(
    "headers, message",
    [
        ([("Authorization", "Bearer s3cret")], "a mapping of str header names to str values (a dict), or None, got a list"),
        ({1: "Bearer s3cret"}, "str header names, got 1"),
        ({"Authorization": b"Bearer s3cret"}, 'str header values, got a bytes for "Authorization"'),
    ],
    ids=["list", "name", "value"],
)
def test_wrong_headers_are_named_without_showing_a_value(headers, message):
    # Was "'bytes' object is not an instance of 'str'", naming neither the argument nor the
    # header.
    with pytest.raises(TypeError) as info:
        conveyor.Conveyor.http("http://127.0.0.1:9/", headers=headers)
    assert str(info.value).startswith(f"argument 'headers': expected {message}")
    assert "s3cret" not in str(info.value)


def test_server_errors_are_retried_in_order(server):
    server.script = [(503, {}), (429, {"Retry-After": "0"}), (200, {})]
    with conveyor.Conveyor.http(server.url, retries=3, backoff=0.01) as c:
        first = c.send("first")
        second = c.send("second")
        assert first.result(timeout=10).status == 200
        assert second.result(timeout=10).status == 200
    assert server.bodies == [b"first", b"second"]
    assert c.stats.retried == 2


def test_client_errors_fail_at_once(server):
    server.script = [(400, {})]
    with conveyor.Conveyor.http(server.url, retries=5, backoff=0.01) as c:
        bad = c.send("bad")
        good = c.send("good")
        with pytest.raises(conveyor.DeliveryFailed) as info:
            bad.result(timeout=10)
        assert good.result(timeout=10).status == 200
    assert info.value.attempts == 1
    assert info.value.status == 400
    assert "400" in str(info.value)
    assert server.bodies == [b"good"]


DEFAULT_MAX_REPLY_BODY = 16 * 1024 * 1024


def test_a_reply_body_is_kept_up_to_max_reply_body(server):
    server.reply = b"0123456789"
    kept = {}
    for limit in (DEFAULT_MAX_REPLY_BODY, None, 10, 4, 0):
        with conveyor.Conveyor.http(server.url, max_reply_body=limit) as c:
            reply = c.send("x").result(timeout=10)
        kept[limit] = (reply.body, reply.truncated)
    with conveyor.Conveyor.http(server.url) as c:
        assert c.send("x").result(timeout=10).truncated is False
    assert kept == {
        DEFAULT_MAX_REPLY_BODY: (b"0123456789", False),
        None: (b"0123456789", False),
        10: (b"0123456789", False),
        4: (b"0123", True),
        0: (b"", True),
    }
    assert repr(reply) == "HttpReply(status=200, body=<0 bytes, truncated>)"


@pytest.fixture
def huge_reply_url() -> Iterator[str]:
    """A server whose 200 carries 1 MiB more than the default limit keeps."""
    size = DEFAULT_MAX_REPLY_BODY + (1 << 20)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"x" * (1 << 20)
            try:
                for _ in range(size // len(chunk)):
                    self.wfile.write(chunk)
            except OSError:
                pass  # the sink stopped reading at its limit and closed the connection

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/events"
    httpd.shutdown()
    httpd.server_close()


def test_a_huge_reply_body_is_cut_at_16_mib_by_default(huge_reply_url):
    # The memory a reply may take is bounded unless the caller asks for everything.
    with conveyor.Conveyor.http(huge_reply_url) as c:
        reply = c.send("x").result(timeout=30)
    assert (len(reply.body), reply.truncated) == (DEFAULT_MAX_REPLY_BODY, True)
    # help() and the stub show the default as a literal: it must be the one in force.
    shown = inspect.signature(conveyor.Conveyor.http).parameters["max_reply_body"].default
    assert shown == DEFAULT_MAX_REPLY_BODY


@pytest.mark.parametrize(
    "limit, error, message",
    [
        (-1, ValueError, r"max_reply_body=-1: expected a whole number >= 0"),
        (2**80, ValueError, r"max_reply_body=\d+: too large"),
        ("1MB", TypeError, r"max_reply_body.*expected a whole number, got '1MB'"),
        (1.5, TypeError, r"max_reply_body.*expected a whole number, got 1\.5"),
        (True, TypeError, r"max_reply_body.*expected a whole number, got True"),
    ],
)
def test_a_bad_max_reply_body_is_refused(server, limit, error, message):
    with pytest.raises(error, match=message):
        conveyor.Conveyor.http(server.url, max_reply_body=limit)


@pytest.mark.parametrize("status", [501, 505])
def test_statuses_no_retry_changes_fail_at_once(server, status):
    # Not Implemented and HTTP Version Not Supported describe the server: a retry gets the same.
    server.script = [(status, {})]
    with conveyor.Conveyor.http(server.url, retries=5, backoff=0.01) as c:
        with pytest.raises(conveyor.DeliveryFailed) as info:
            c.send("x").result(timeout=10)
    assert (info.value.attempts, info.value.status) == (1, status)
    assert c.stats.retried == 0


def test_a_failure_without_a_response_has_no_status():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nobody listens on the port any more: the connection is refused.
    with conveyor.Conveyor.http(f"http://127.0.0.1:{port}/") as c:
        with pytest.raises(conveyor.DeliveryFailed) as info:
            c.send("x").result(timeout=10)
    assert info.value.status is None
    assert info.value.last_exception is None


def test_a_private_ca_is_trusted_with_cafile():
    server = Server(tls=True)
    try:
        with conveyor.Conveyor.http(server.url) as c:
            with pytest.raises(conveyor.DeliveryFailed, match="UnknownIssuer.*cafile="):
                c.send("refused").result(timeout=10)
        with conveyor.Conveyor.http(server.url, cafile=TLS / "ca.pem") as c:
            assert c.send("trusted").result(timeout=10).status == 200
    finally:
        server.close()
    assert server.bodies == [b"trusted"]


def test_a_cafile_that_cannot_be_used_is_a_clear_error(tmp_path):
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate")
    with pytest.raises(ValueError, match="cafile=.*BEGIN CERTIFICATE"):
        conveyor.Conveyor.http("https://127.0.0.1:9/", cafile=not_pem)
    with pytest.raises(FileNotFoundError, match="cannot read cafile="):
        conveyor.Conveyor.http("https://127.0.0.1:9/", cafile=str(tmp_path / "missing.pem"))


def test_unserialisable_items_are_refused_at_send(server):
    with conveyor.Conveyor.http(server.url) as c:
        with pytest.raises(ValueError, match="JSON"):
            c.send(object())
    assert c.stats.accepted == 0


def test_bad_url_is_a_clear_error():
    with pytest.raises(ValueError, match="not-a-url"):
        conveyor.Conveyor.http("not-a-url")


@pytest.mark.parametrize("timeout", [0, 0.0, 1e-12])
def test_a_zero_timeout_is_refused(server, timeout):
    # Every request would time out at once, so each item would fail after its retries.
    with pytest.raises(ValueError, match="timeout"):
        conveyor.Conveyor.http(server.url, timeout=timeout)


def test_a_journal_keeps_request_bodies_until_delivered_across_a_restart(server, tmp_path):
    path = tmp_path / "events.journal"
    with server.lock:
        server.script = [(503, {})] * 10_000  # down: nothing gets through
    c = conveyor.Conveyor.http(server.url, journal=path, retries=10_000, backoff=0.01)
    for body in ({"n": 1}, "[2]", b'{"n": 3}'):
        c.send(body)
    report = c.close(timeout=0.3)
    assert report.left == 3 and server.bodies == []
    with server.lock:
        server.script = []  # back up
    with conveyor.Conveyor.http(server.url, journal=path) as again:
        assert again.flush(timeout=10)
    # The bytes posted after the restart are the bytes the first process would have posted.
    assert server.bodies == [b'{"n": 1}', b"[2]", b'{"n": 3}']


def test_a_journaled_http_conveyor_refuses_bodies_that_are_not_json(server, tmp_path):
    with conveyor.Conveyor.http(server.url, journal=tmp_path / "events.journal") as c:
        with pytest.raises(ValueError, match="not JSON"):
            c.send("plain text")
        with pytest.raises(ValueError, match="not JSON"):
            c.send(b"\xff")
        with pytest.raises(ValueError, match="whitespace"):
            c.send(b'{"a": 1}\r\n')  # would be posted without its line end after a restart
        assert c.send("[1]").result(timeout=10).status == 200
    assert c.stats.accepted == 1
    assert server.bodies == [b"[1]"]
