"""The API client's retry rules, through httpx.MockTransport (and a real socket where httpx itself matters).

Every test runs on a fake clock: `sleep` advances it, so no test waits.
"""
from __future__ import annotations

import email.utils
import socket
import threading
import time

import httpx
import pytest

from batchrun.api import ApiClient, RetryPolicy
from batchrun.errors import (AmbiguousCreateError, ApiError, AuthError, GaveUpError, NotFoundError,
                             RequestTooLargeError, TransientApiError)

KEY = "sk-ant-retry-test-0123456789"
BATCH = {"id": "msgbatch_1", "type": "message_batch", "processing_status": "in_progress"}
BODY = b'{"requests": []}'


class Clock:
    """A fake monotonic clock; `sleep` records the wait and moves the clock on."""

    def __init__(self):
        self.now = 1000.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


class Server:
    """Answers requests with the given replies in turn (the last one forever): an httpx.Response,
    a (status, headers) pair, or an exception to raise (a transport failure)."""

    def __init__(self, *replies):
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, tuple):
            status, headers = reply
            error_type = {429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
            return httpx.Response(status, headers=headers,
                                  json={"type": "error", "error": {"type": error_type, "message": "no"}})
        return reply


def ok(body=None) -> httpx.Response:
    return httpx.Response(200, json=body if body is not None else BATCH)


def client(server: Server, clock: Clock, **policy) -> ApiClient:
    return ApiClient(api_key=KEY, base_url="https://api.example", transport=httpx.MockTransport(server),
                     retry=RetryPolicy(**policy) if policy else None, sleep=clock.sleep, clock=clock)


def fails(status: int, **headers) -> tuple:
    return (status, headers)


# ---- waits ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers, wait", [
    ({"retry-after-ms": "1500", "retry-after": "7"}, 1.5),      # milliseconds win over seconds
    ({"retry-after": "3"}, 3.0),
    ({"retry-after": "2.5"}, 2.5),
    ({"retry-after": "600"}, 60.0),                             # capped at max_wait
    ({"retry-after-ms": "junk", "retry-after": "4"}, 4.0),      # a bad value falls back to the next header
])
def test_retry_after_headers_set_the_wait(headers, wait):
    server, clock = Server(fails(429, **headers), ok()), Clock()
    assert client(server, clock).retrieve_batch("msgbatch_1") == BATCH
    assert clock.waits == [wait]
    assert len(server.requests) == 2


def test_retry_after_as_an_http_date():
    when = email.utils.formatdate(time.time() + 20, usegmt=True)
    server, clock = Server(fails(429, **{"retry-after": when}), ok()), Clock()
    client(server, clock).retrieve_batch("msgbatch_1")
    assert len(clock.waits) == 1 and 17.0 <= clock.waits[0] <= 20.5


def test_without_retry_after_the_wait_backs_off_with_jitter_like_the_sdk():
    server, clock = Server(*[fails(500)] * 8, ok()), Clock()
    client(server, clock).retrieve_batch("msgbatch_1")
    assert len(clock.waits) == 8
    for n, wait in enumerate(clock.waits):
        base = min(0.5 * 2 ** n, 8.0)                            # 0.5, 1, 2, 4, 8, 8, ...
        assert 0.75 * base <= wait <= base, (n, wait)


def test_a_zero_retry_after_does_not_hammer():
    server, clock = Server(fails(429, **{"retry-after": "0"}), ok()), Clock()
    client(server, clock).retrieve_batch("msgbatch_1")
    assert 0.375 <= clock.waits[0] <= 0.5                        # the backoff, not an immediate retry


# ---- what is retried -------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 529])
def test_transient_statuses_are_retried(status):
    server, clock = Server(fails(status), fails(status), ok()), Clock()
    assert client(server, clock).retrieve_batch("msgbatch_1") == BATCH
    assert len(server.requests) == 3


@pytest.mark.parametrize("status, kind", [(400, ApiError), (401, AuthError), (403, AuthError), (404, NotFoundError),
                                          (413, RequestTooLargeError), (422, ApiError)])
def test_final_statuses_are_not_retried(status, kind):
    server, clock = Server(fails(status), ok()), Clock()
    with pytest.raises(kind) as failure:
        client(server, clock).retrieve_batch("msgbatch_1")
    assert not isinstance(failure.value, TransientApiError)
    assert len(server.requests) == 1 and clock.waits == []


def test_x_should_retry_true_retries_a_final_status():
    server, clock = Server(fails(400, **{"x-should-retry": "true"}), ok()), Clock()
    assert client(server, clock).retrieve_batch("msgbatch_1") == BATCH
    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [429, 500, 529])
def test_x_should_retry_false_stops_a_retry(status):
    server, clock = Server(fails(status, **{"x-should-retry": "false"}), ok()), Clock()
    with pytest.raises(ApiError) as failure:
        client(server, clock).retrieve_batch("msgbatch_1")
    assert not isinstance(failure.value, TransientApiError) and failure.value.status == status
    assert len(server.requests) == 1


@pytest.mark.parametrize("error", [
    httpx.ConnectError("[Errno 111] Connection refused"),
    httpx.ConnectTimeout("timed out"),
    httpx.ReadTimeout("timed out"),
    httpx.ReadError("[Errno 104] Connection reset by peer"),
    httpx.RemoteProtocolError("Server disconnected without sending a response."),
    httpx.WriteError("[Errno 32] Broken pipe"),
], ids=lambda e: type(e).__name__)
def test_connection_failures_and_timeouts_are_retried(error):
    server, clock = Server(error, error, ok()), Clock()
    assert client(server, clock).retrieve_batch("msgbatch_1") == BATCH
    assert len(server.requests) == 3 and len(clock.waits) == 2


def test_every_call_retries_not_only_retrieve():
    listing = {"data": [BATCH], "has_more": False, "first_id": "msgbatch_1", "last_id": "msgbatch_1"}
    server, clock = Server(fails(529), ok(listing)), Clock()
    assert list(client(server, clock).list_batches()) == [BATCH]
    server, clock = Server(httpx.ReadError("reset"), ok({**BATCH, "processing_status": "canceling"})), Clock()
    assert client(server, clock).cancel_batch("msgbatch_1")["processing_status"] == "canceling"
    server, clock = Server(fails(429, **{"retry-after": "1"}), ok({"input_tokens": 12})), Clock()
    assert client(server, clock).count_tokens({"model": "m", "messages": []}) == 12
    lines = b'{"custom_id": "a", "result": {"type": "succeeded"}}\n'
    server, clock = Server(fails(503), httpx.Response(200, content=lines)), Clock()
    assert [r["custom_id"] for r in client(server, clock).iter_results("https://api.example/results")] == ["a"]


# ---- giving up -------------------------------------------------------------------------------------
def test_give_up_after_max_retries_with_a_clear_message():
    server, clock = Server(fails(529)), Clock()
    with pytest.raises(GaveUpError) as failure:
        client(server, clock, max_retries=3).retrieve_batch("msgbatch_1")
    assert len(server.requests) == 4
    assert not isinstance(failure.value, TransientApiError)       # no caller retries it again
    message = str(failure.value)
    assert "529 overloaded_error" in message and "gave up after 4 attempts" in message
    assert failure.value.status == 529


def test_give_up_before_a_wait_would_pass_max_elapsed():
    server, clock = Server(fails(429, **{"retry-after": "30"})), Clock()
    started = clock.now
    with pytest.raises(GaveUpError):
        client(server, clock, max_retries=100, max_elapsed=100.0).retrieve_batch("msgbatch_1")
    assert clock.waits == [30.0, 30.0, 30.0]                        # a fourth wait would end past 100 s
    assert clock.now - started <= 100.0


def test_a_create_gives_up_in_bounded_time_too():
    server, clock = Server(httpx.ConnectError("refused")), Clock()
    with pytest.raises(GaveUpError) as failure:
        client(server, clock, max_retries=100, max_elapsed=20.0).create_batch(BODY)
    assert clock.now - 1000.0 <= 20.0 and len(server.requests) == len(clock.waits) + 1
    assert "connection failed" in str(failure.value) and "gave up" in str(failure.value)


# ---- creating a batch: sent again only when it certainly was not created ------------------------------
@pytest.mark.parametrize("first", [
    fails(429, **{"retry-after-ms": "250"}), fails(529), fails(408), fails(409),
    httpx.ConnectError("[Errno 111] Connection refused"), httpx.ConnectTimeout("timed out"),
    httpx.PoolTimeout("no connection free"),
], ids=lambda f: str(f[0]) if isinstance(f, tuple) else type(f).__name__)
def test_create_is_retried_when_not_created(first):
    server, clock = Server(first, ok()), Clock()
    assert client(server, clock).create_batch(BODY) == BATCH
    assert len(server.requests) == 2
    assert all(r.method == "POST" and r.content == BODY for r in server.requests)


@pytest.mark.parametrize("failure", [
    httpx.ReadTimeout("timed out"),
    httpx.ReadError("[Errno 104] Connection reset by peer"),
    httpx.RemoteProtocolError("Server disconnected without sending a response."),
    httpx.WriteError("[Errno 32] Broken pipe"),
    httpx.WriteTimeout("timed out"),
    fails(500), fails(502), fails(503), fails(504),
    fails(500, **{"x-should-retry": "false"}),
    fails(500, **{"x-should-retry": "true"}),
    httpx.Response(200, content=b"<html>gateway says hi</html>"),
], ids=lambda f: (f"{f[0]}-{f[1].get('x-should-retry', '')}" if isinstance(f, tuple)
                  else f"{f.status_code}-html" if isinstance(f, httpx.Response) else type(f).__name__))
def test_an_ambiguous_create_is_sent_exactly_once(failure):
    server, clock = Server(failure, ok()), Clock()
    with pytest.raises(AmbiguousCreateError) as raised:
        client(server, clock).create_batch(BODY)
    assert "may exist" in str(raised.value)
    assert len(server.requests) == 1 and clock.waits == []


@pytest.mark.parametrize("status, kind", [(400, ApiError), (401, AuthError), (413, RequestTooLargeError)])
def test_a_refused_create_is_final(status, kind):
    server, clock = Server(fails(status), ok()), Clock()
    with pytest.raises(kind) as raised:
        client(server, clock).create_batch(BODY)
    assert not isinstance(raised.value, (TransientApiError, AmbiguousCreateError))
    assert len(server.requests) == 1


def test_a_create_told_not_to_retry_is_final_not_ambiguous():
    server, clock = Server(fails(529, **{"x-should-retry": "false"}), ok()), Clock()
    with pytest.raises(ApiError) as raised:
        client(server, clock).create_batch(BODY)
    assert not isinstance(raised.value, (TransientApiError, AmbiguousCreateError))
    assert len(server.requests) == 1


def test_a_create_whose_reply_the_emulator_drops_is_not_sent_again():
    """In process: the emulator creates the batch, then drops the connection."""
    from batchrun.emulator import Emulator, EmulatorConfig
    emu = Emulator(EmulatorConfig(processing_seconds=0.05, drop_after_create=1))
    clock = Clock()
    api = ApiClient(api_key=KEY, base_url="http://emulator.invalid", transport=emu.sync_transport(),
                    sleep=clock.sleep, clock=clock)
    body = (b'{"requests": [{"custom_id": "a", "params": {"model": "claude-haiku-4-5", "max_tokens": 10, '
            b'"messages": [{"role": "user", "content": "hi"}]}}]}')
    with pytest.raises(AmbiguousCreateError):
        api.create_batch(body)
    assert emu.stats.create_calls == 1 and emu.stats.batches_created == 1
    assert [b["id"] for b in api.list_batches()] != []           # the runner finds it through the list
    api.create_batch(body)                                       # the fault is spent: a plain create works
    assert emu.stats.create_calls == 2


# ---- httpx itself, over a real socket ------------------------------------------------------------------
def _serve_once(handle) -> tuple[str, list, threading.Thread]:
    """A loopback server that accepts connections and passes each to `handle(conn, seen)`."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    seen: list = []

    def loop():
        try:
            while True:
                conn, _ = listener.accept()
                with conn:
                    handle(conn, seen)
        except (socket.timeout, OSError):
            pass
        finally:
            listener.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", seen, thread


def test_httpx_does_not_resend_a_create_whose_connection_drops():
    def read_then_hang_up(conn, seen):
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(BODY):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        seen.append(data)                                         # the request arrived whole; no reply

    url, seen, thread = _serve_once(read_then_hang_up)
    clock = Clock()
    api = ApiClient(api_key=KEY, base_url=url, sleep=clock.sleep, clock=clock)
    with pytest.raises(AmbiguousCreateError):
        api.create_batch(BODY)
    time.sleep(0.2)                                               # room for a (wrong) second attempt
    assert len(seen) == 1 and seen[0].startswith(b"POST /v1/messages/batches")
    api.close()


def test_a_refused_connection_is_a_connect_error_and_retried():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()                                                  # nothing listens there now
    clock = Clock()
    api = ApiClient(api_key=KEY, base_url=url, sleep=clock.sleep, clock=clock,
                    retry=RetryPolicy(max_retries=2))
    with pytest.raises(GaveUpError) as raised:
        api.create_batch(BODY)
    assert len(clock.waits) == 2 and "ConnectError" in str(raised.value)
