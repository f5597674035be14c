"""Hostile probes of the promises of issues #14 (items 9, 10) and #19 (service errors never end a row):
refusals that ask for no wait or for a day, a proxy that refuses the tunnel, a connection reset after the
request was read. Against the emulator over loopback (a bare socket server where the fault is below HTTP).
"""
from __future__ import annotations

import re
import socket
import struct
import threading
import time

import pytest

import batchrun
from batchrun.api import RetryPolicy
from batchrun.errors import ApiError, ExitCode
from tests.conftest import make_tickets, refused
from tests.test_messages_mode import write_csv
from tests.test_service_errors import KEY, QUICK, assert_all_answered, cli_args, counts, job


def socket_server(reply):
    """A TCP server on loopback: `reply(conn)` for each connection. Returns (socket, first lines received)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(50)
    seen: list = []

    def loop():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                seen.append(conn.recv(65536).split(b"\r\n")[0])
                reply(conn)
            except OSError:
                pass
            finally:
                conn.close()

    threading.Thread(target=loop, daemon=True).start()
    return server, seen


# ---- 429 with `retry-after: 0` forever: not a loop of refusals as fast as they come ------------------
def test_messages_mode_429_with_retry_after_zero_backs_off_instead_of_hammering(emu, tmp_path):
    rows = make_tickets(3)
    inp = write_csv(tmp_path / "t.csv", rows)
    emu.config.error_status, emu.config.error_type, emu.config.retry_after = 429, "rate_limit_error", 0.0
    with pytest.raises(ApiError) as stopped:
        batchrun.run(job(inp, tmp_path, max_attempts=1), retry=RetryPolicy(max_retries=2, max_wait=60, max_elapsed=2.0))
    assert stopped.value.exit_code == ExitCode.API_ERROR and "stay pending" in str(stopped.value)
    assert counts(tmp_path) == {"pending": 3}
    # before: ~560 refused sends in those 2 s (a retry-after of 0 taken at its word, every time)
    assert emu.stats.faults["error_429"] <= 12, emu.stats.faults
    emu.config.error_status = None
    assert batchrun.run(job(inp, tmp_path, max_attempts=1), retry=QUICK).exit_code == ExitCode.OK
    assert_all_answered(tmp_path, rows)


# ---- 429 / 529 asking to wait longer than the patience: stop now, saying when to run again -------------
@pytest.mark.parametrize("mode", ["messages", "batch"])
def test_refused_with_a_retry_after_past_the_patience_stops_at_once_saying_when(emu, cli, tmp_path, mode,
                                                                                monkeypatch):
    rows = make_tickets(4)
    inp = write_csv(tmp_path / "t.csv", rows)
    emu.config.error_status, emu.config.error_type, emu.config.retry_after = 429, "rate_limit_error", 86400.0
    # the CLI's own policy (max_wait 60 s, patience 600 s): before, the run sent again every minute for 10 minutes
    started = time.monotonic()
    r = cli(*cli_args(inp, tmp_path, mode))
    line = refused(r, ExitCode.API_ERROR, "429 rate_limit_error", "asks to wait 86400 s", "run again after")
    assert time.monotonic() - started < 30
    when = re.search(r"run again after (\S+ \S+) UTC", line).group(1)
    assert time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400)) in when
    assert emu.stats.faults["error_429"] <= (4 if mode == "messages" else 1)   # the requests on the wire
    assert counts(tmp_path) == {"pending": 4}
    assert emu.stats.batches_created == 0
    emu.config.error_status = None
    r = cli(*cli_args(inp, tmp_path, mode))
    assert r.exit_code == ExitCode.OK, r.output
    assert_all_answered(tmp_path, rows)


# ---- a proxy that refuses the tunnel: nothing reached the API, so no attempt is used up ----------------
def test_messages_mode_proxy_refusing_the_tunnel_leaves_rows_pending_not_errored(tmp_path, monkeypatch):
    rows = make_tickets(3)
    inp = write_csv(tmp_path / "t.csv", rows)
    proxy, seen = socket_server(lambda c: c.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n"
                                                    b"Connection: close\r\n\r\n"))
    try:
        for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        with pytest.raises(ApiError) as stopped:
            batchrun.run(job(inp, tmp_path, max_attempts=1, concurrency=1), api_key=KEY,
                         base_url="https://api.example.invalid", retry=QUICK)
        # before: every row ended errored (exit 3), its cost unknown ("may have been paid for")
        assert stopped.value.exit_code == ExitCode.API_ERROR
        assert "before anything was sent" in str(stopped.value) and "stay pending" in str(stopped.value)
        assert counts(tmp_path) == {"pending": 3}
        assert seen and all(line.startswith(b"CONNECT api.example.invalid:443") for line in seen)
    finally:
        proxy.close()


# ---- a connection reset after the request was read: it may have run, so it is an attempt (held) --------
def test_messages_mode_reset_after_the_request_was_read_uses_attempts_and_says_it_may_be_paid(tmp_path):
    rows = make_tickets(2)
    inp = write_csv(tmp_path / "t.csv", rows)

    def reset(conn):      # read the request, then RST (SO_LINGER 0) without a reply
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    server, seen = socket_server(reset)
    try:
        r = batchrun.run(job(inp, tmp_path, max_attempts=2, concurrency=1), api_key=KEY,
                         base_url=f"http://127.0.0.1:{server.getsockname()[1]}", retry=QUICK)
    finally:
        server.close()
    assert r.exit_code == ExitCode.FAILED_ROWS
    assert counts(tmp_path) == {"errored": 2}
    assert len(seen) == 4                          # max_attempts bounds how often a row may be paid for


# ---- a 400 invalid_request_error with `x-should-retry: true`: retried, then it still ends its row ----------
def test_messages_mode_invalid_request_marked_retryable_still_ends_its_row_not_the_run(tmp_path):
    rows = make_tickets(2)
    inp = write_csv(tmp_path / "t.csv", rows)
    body = b'{"type":"error","error":{"type":"invalid_request_error","message":"messages: bad"}}'
    server, seen = socket_server(lambda c: c.sendall(
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nx-should-retry: true\r\n"
        b"Connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)))
    try:
        r = batchrun.run(job(inp, tmp_path, max_attempts=2, concurrency=1), api_key=KEY,
                         base_url=f"http://127.0.0.1:{server.getsockname()[1]}", retry=QUICK)
    finally:
        server.close()
    # before: exit 4 with the rows pending, and the same again on every run, for good
    assert r.exit_code == ExitCode.FAILED_ROWS
    assert counts(tmp_path) == {"errored": 2}
    assert len(seen) <= 2 * (QUICK.max_retries + 1)
