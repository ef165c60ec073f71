"""What aiohttp answers on its own, before or around the middlewares
(blobd/http/protocolerrors.py): requests its HTTP parser cannot read, an
``Expect`` on a path no route has, an exception that escapes the
middlewares. Each gets the JSON error body of API.md, over a raw socket
against a real server; the answers that were JSON already are pinned too."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from blobd.http import protocolerrors
from blobd.http.app import create_app
from conftest import blob_files, make_config, tmp_files
from serverproc import BlobdServer

COOKIE = "session=" + "a" * 9000  # a browser's cookies for the home server, too many
TLS_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\r\n\r\n"


@dataclass
class Answer:
    status_line: bytes
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after it

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])

    def json(self):
        assert self.headers["content-type"] == "application/json; charset=utf-8", self
        return json.loads(self.body)


async def exchange(port: int, raw: bytes, *, then: bytes = b"", pause: float = 0.0,
                   answers: int = 1, see_close: bool = True) -> list[Answer]:
    """Send ``raw`` (and ``then`` after ``pause`` s) on one connection and
    read ``answers`` answers, and (unless not ``see_close``: a second's
    wait) whether the server closed it afterwards."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        if then:
            await asyncio.sleep(pause)
            writer.write(then)
        got = [await asyncio.wait_for(_answer(reader), 10) for _ in range(answers)]
        if not see_close:
            return got
        try:
            got[-1].closed = await asyncio.wait_for(reader.read(1), 1) == b""
        except (asyncio.TimeoutError, ConnectionError):
            pass
        return got
    finally:
        writer.close()


async def _answer(reader: asyncio.StreamReader) -> Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].split(b"\r\n")
    headers = {}
    for line in lines:
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(status_line, headers, body, closed=False)


def request(head: str, body: bytes = b"") -> bytes:
    """A request head as sent: the request line, Host, the rest."""
    line, _, rest = head.partition("\r\n")
    return ((line + "\r\nHost: test" + ("\r\n" + rest if rest else "") + "\r\n\r\n").encode()
            + body)


# id -> (the bytes sent, words of the answer's message)
PARSER_ERRORS = {
    "request-line-too-long": (request("GET /" + "a" * 9000 + " HTTP/1.1"), "over 8190 bytes"),
    "header-line-too-long": (request("GET /healthz HTTP/1.1\r\nCookie: " + COOKIE),
                             "over 8190 bytes"),
    # aiohttp limits a head by its lines, and their count: no total size.
    "too-many-headers": (request("GET /healthz HTTP/1.1\r\n"
                                 + "\r\n".join(f"X-{i}: v" for i in range(200))),
                         "too many headers"),
    "invalid-method": (request("G@T /healthz HTTP/1.1"), "malformed method"),
    "invalid-header-name": (request("GET /healthz HTTP/1.1\r\nBad Name: v"),
                            "invalid header token"),
    "invalid-header-value": (request("GET /healthz HTTP/1.1\r\nX-Ctl: a\x01b"),
                             "invalid header value"),
    "bad-content-length": (request("POST /blobs HTTP/1.1\r\nContent-Length: 12abc", b"x" * 12),
                           "Content-Length"),
    "content-length-and-chunked": (request("POST /blobs HTTP/1.1\r\nContent-Length: 3\r\n"
                                           "Transfer-Encoding: chunked", b"abc"),
                                   "Transfer-Encoding can't be present with Content-Length"),
    "chunk-size-with-the-head": (request("POST /blobs HTTP/1.1\r\nTransfer-Encoding: chunked",
                                         b"zz\r\nabc\r\n0\r\n\r\n"), "chunk size"),
    "http-1.2": (request("GET /healthz HTTP/1.2"), "invalid HTTP version"),
    "not-http": (b"\x00\x01\x02 hello\r\n\r\n", "not an HTTP request"),
    "tls-to-the-plain-port": (TLS_HELLO, "TLS (https) sent to a plain-HTTP port"),
    # Codings the parser knows but has no decoder for here.
    "br-body": (request("POST /blobs HTTP/1.1\r\nContent-Encoding: br\r\nContent-Length: 3",
                        b"abc"), "cannot decode"),
    "zstd-body": (request("POST /blobs HTTP/1.1\r\nContent-Encoding: zstd\r\nContent-Length: 3",
                          b"abc"), "cannot decode"),
}


@pytest.mark.parametrize("raw,words", PARSER_ERRORS.values(), ids=PARSER_ERRORS.keys())
async def test_what_the_parser_cannot_read_gets_the_json_400_and_the_connection_closes(
        server, raw, words):
    alice = await (await server(server={"cors_origins": ["*"]}))()
    raw = raw.replace(b"Host: test", b"Host: test\r\nOrigin: http://x.example\r\n"
                      b"Authorization: Bearer " + alice.token.encode(), 1)
    [answer] = await exchange(alice.client.port, raw)
    # aiohttp's status line (it answers as HTTP/1.0) and its closing.
    assert answer.status_line == b"HTTP/1.0 400 Bad Request" and answer.closed
    body = answer.json()
    assert body["error"] == "bad_request" and words in body["message"], body
    assert set(body) == {"error", "message"}
    # Short, printable, and none of what the client sent.
    assert len(body["message"]) < 100 and body["message"].isprintable()
    assert not re.search(r"aaaa|hello|12abc|Bad Name|X-Ctl|G@T", body["message"]), body
    # No CORS headers: the parser never got to the Origin (docs/api.md).
    assert not any(k.startswith("access-control") for k in answer.headers)
    assert blob_files(alice.data_dir) == [] and tmp_files(alice.data_dir) == []


async def test_a_malformed_request_after_a_good_one_on_the_connection_gets_json_too(alice):
    good, bad = await exchange(alice.client.port, request("GET /healthz HTTP/1.1"),
                               then=request("G@T /healthz HTTP/1.1"), pause=0.2, answers=2)
    assert good.status == 200
    assert bad.status == 400 and bad.json()["error"] == "bad_request" and bad.closed


async def test_a_chunk_broken_mid_body_ends_the_body_with_the_json_400(server):
    """The parser's error on a body already being read: the body stops
    (the parser hands nothing more), and the upload ends as a stalled one."""
    alice = await (await server(uploads={"idle_timeout_seconds": 0.5}))()
    head = request("PUT /blobs/" + "0" * 64 + " HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                   "Authorization: Bearer " + alice.token, b"5\r\nhello\r\n")
    [answer] = await exchange(alice.client.port, head, then=b"zz\r\nabc\r\n0\r\n\r\n",
                              pause=0.2)
    assert answer.status == 400 and answer.json()["error"] == "bad_request"
    assert blob_files(alice.data_dir) == [] and tmp_files(alice.data_dir) == []


@pytest.mark.parametrize("head,status,code", [
    ("GET /nope HTTP/1.1", 404, "not_found"),
    ("PATCH /healthz HTTP/1.1", 405, "method_not_allowed"),
    ("GET /nope HTTP/1.1\r\nExpect: something-else", 417, "expectation_failed"),
    ("PATCH /healthz HTTP/1.1\r\nExpect: something-else", 417, "expectation_failed"),
    ("GET /healthz HTTP/1.1\r\nExpect: something-else", 417, "expectation_failed"),
], ids=["unknown-path", "wrong-method", "expect-on-unknown-path", "expect-on-wrong-method",
        "expect-on-a-route"])
async def test_what_the_router_answers_is_json_and_keeps_the_connection(server, head, status,
                                                                       code):
    """An Expect on a path no route has met aiohttp's default Expect
    handler, before any middleware: it was a plain-text 417."""
    alice = await (await server(server={"cors_origins": ["*"]}))()
    # The next request answered on the same connection proves it was kept
    # (waiting to see it stay open would cost a second per case).
    answer, after = await exchange(
        alice.client.port, request(head + "\r\nOrigin: http://x.example")
        + request("GET /healthz HTTP/1.1"), answers=2, see_close=False)
    assert answer.status == status and answer.json()["error"] == code
    assert answer.headers["access-control-allow-origin"] == "http://x.example"
    assert after.status == 200 and after.json() == {"status": "ok"}


async def test_http_0_9_gets_json(alice):
    [answer] = await exchange(alice.client.port, b"GET /\r\n\r\n")
    assert answer.status == 404 and answer.json()["error"] == "not_found" and answer.closed


@web.middleware
async def _broken(request: web.Request, handler):
    """A bug outside the error middleware (none is known: this one is made)."""
    if request.path == "/healthz" and "X-Break" in request.headers:
        raise RuntimeError("a bug outside the error middleware")
    return await handler(request)


async def test_an_exception_that_escapes_the_middlewares_is_a_json_500_with_its_traceback(
        aiohttp_client, tmp_path: Path, caplog):
    app = create_app(make_config(tmp_path))
    app.middlewares.insert(0, _broken)
    client = await aiohttp_client(app)
    with caplog.at_level(logging.INFO):
        [answer] = await exchange(client.port, request("GET /healthz HTTP/1.1\r\nX-Break: 1"))
    assert answer.status == 500 and answer.json() == {"error": "internal",
                                                      "message": "internal server error"}
    assert answer.closed
    [failed] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert failed.exc_info and "a bug outside" in str(failed.exc_info[1])


async def _a_bug(request: web.Request) -> web.Response:
    raise RuntimeError("a bug inside the error middleware")


async def test_a_500_logs_the_path_as_sent_so_a_client_cannot_forge_log_lines(
        aiohttp_client, tmp_path: Path, caplog):
    """A decoded %0A in the logged path would start a line of the client's
    choosing in the journal."""
    app = create_app(make_config(tmp_path))
    app.router.add_get("/made-up-bug/{rest:[^/]*}", _a_bug)
    client = await aiohttp_client(app)
    with caplog.at_level(logging.INFO):
        [answer] = await exchange(client.port, request(
            "GET /made-up-bug/x%0A2026-01-01%20INFO%20forged HTTP/1.1"))
    assert answer.status == 500 and answer.json()["error"] == "internal"
    [failed] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "\n" not in failed.getMessage() and "%0A" in failed.getMessage()


def test_aiohttp_still_has_what_protocolerrors_overrides():
    """Fails when an aiohttp upgrade removes or changes one of the private
    hooks: the server then still serves, with aiohttp's plain-text answers
    (next test), and blobd.http.protocolerrors needs a new way in."""
    assert protocolerrors.missing_hooks() == []


async def test_without_the_hooks_the_server_still_starts_and_answers_as_aiohttp(
        server, monkeypatch, caplog):
    """As a later aiohttp that changed handle_error would: no JSON, but a
    server that starts, serves and says why in its log."""
    original = RequestHandler.handle_error

    def changed(self, request, status=500, exc=None, message=None, *, extra=None):
        return original(self, request, status, exc, message)

    monkeypatch.setattr(RequestHandler, "handle_error", changed)
    with caplog.at_level(logging.WARNING, logger="blobd.http"):
        alice = await (await server())()
    assert "RequestHandler.handle_error" in caplog.text
    assert (await alice.request("GET", "/healthz")).status == 200
    [answer] = await exchange(alice.client.port, PARSER_ERRORS["invalid-method"][0])
    assert answer.status == 400 and answer.headers["content-type"].startswith("text/plain")


# ------------------------------------------------------- blobd serve itself


async def test_blobd_serve_logs_a_malformed_request_in_one_line_without_a_traceback(
        tmp_path: Path):
    with BlobdServer(tmp_path) as served:
        for name in ("header-line-too-long", "tls-to-the-plain-port", "invalid-method"):
            [answer] = await exchange(served.port, PARSER_ERRORS[name][0])
            assert answer.json()["error"] == "bad_request"
        await asyncio.sleep(0.2)
        log = Path(served.stderr_path).read_text()
    lines = [line for line in log.splitlines() if "bad_request from" in line]
    assert len(lines) == 3, log
    assert all(" INFO blobd.http: 400 bad_request from 127.0.0.1: " in line for line in lines)
    assert "over 8190 bytes" in lines[0] and "TLS" in lines[1]
    # No traceback, no request-log line of its own, none of the client's bytes.
    assert "Traceback" not in log and "UNKNOWN" not in log and "aaaa" not in log
    assert "ERROR" not in log


async def test_each_of_two_workers_answers_json(tmp_path: Path):
    with BlobdServer(tmp_path, {"server": {"workers": 2}}) as served:
        raw = PARSER_ERRORS["header-line-too-long"][0]
        # New connections spread over both workers (SO_REUSEPORT).
        answers = await asyncio.gather(*(exchange(served.port, raw) for _ in range(16)))
    for [answer] in answers:
        assert answer.status == 400 and answer.json()["error"] == "bad_request"
        assert answer.closed


async def test_with_aiohttp_s_pure_python_parser_too(tmp_path: Path):
    """Its messages quote the request line (a token in a query string
    with it): none of that gets into the answer or the log."""
    secret = "s3cr3t-t0ken-value"
    cases = [raw for raw, _ in PARSER_ERRORS.values()]
    cases.append(request(f"GET /blobs?token={secret} HTTP/x.y"))
    cases.append(request(f"GET /blobs?token={secret}\x01 HTTP/1.1"))
    refused = 0
    with BlobdServer(tmp_path, env={"AIOHTTP_NO_EXTENSIONS": "1"}) as served:
        for raw in cases:
            [answer] = await exchange(served.port, raw)
            body = answer.json()
            if answer.status < 400:
                continue  # HTTP/1.2, which this parser reads as 1.1
            refused += 1
            assert answer.status == 400 and body["error"] == "bad_request", (raw[:40], body)
            assert len(body["message"]) < 100 and secret not in body["message"], body
            assert not re.search(r"aaaa|hello|12abc|Bad Name|X-Ctl|G@T", body["message"]), body
        await asyncio.sleep(0.2)
        log = Path(served.stderr_path).read_text()
    assert refused == len(cases) - 1
    assert "Traceback" not in log and secret not in log and "aaaa" not in log
