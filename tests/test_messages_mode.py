"""Messages mode: the job over plain POST /v1/messages, concurrently, against the emulator on loopback.

The emulator's rate limits are token buckets, as the API's are: a bucket holds the limit and refills
continuously at limit / rate_window per second, and every reply says what is left and when the bucket
will be full again (the `anthropic-ratelimit-*` headers). Time is scaled: the issue's "100 requests
per minute" runs as 100 requests per 3 seconds (20x faster); the client's own caps (--rpm / --tpm)
likewise run per second instead of per minute (`ratelimit.SPAN`).

Every request goes through `Recorder`, which stands for the network: it notes when each request
arrived, its path and headers, and the reply, so tests check what the server saw.
"""
from __future__ import annotations

import asyncio
import bisect
import csv
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Optional

import httpx
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchrun import ratelimit
from batchrun.cli import main
from batchrun.emulator import Emulator, EmulatorConfig, serve_in_thread
from batchrun.emulator.app import params_hash
from batchrun.errors import ExitCode
from batchrun.messages import FLUSH_ROWS
from batchrun.models import load_catalog
from batchrun.ratelimit import RateLimiter, SlidingWindow
from batchrun.report import build_report_data
from batchrun.runner import Runner
from batchrun.spec import JobSpec
from batchrun.summary import find_job
from batchrun.store import Store
from tests.conftest import PROMPT, make_tickets, render

KEY = "sk-ant-test-messages-0123456789"
MODEL = "claude-haiku-4-5"
CONFIG = dict(processing_seconds=0.05, retry_after=0.01)
JOBS = Path(__file__).resolve().parent.parent / "jobs"


@dataclass
class Seen:
    """One request as the server saw it."""
    at: float                    # time.monotonic() when it arrived
    path: str
    headers: dict
    status: Optional[int] = None
    reply: bytes = b""

    def usage(self) -> dict:
        body = json.loads(self.reply)
        return (body.get("data") or body)["usage"]      # wrapped by a gateway or not


class Recorder:
    """An ASGI app in front of another (the emulator): notes every request, and can drop the
    `anthropic-ratelimit-*` headers from the replies, as some gateways do."""

    def __init__(self, app):
        self.app, self.seen, self.strip_ratelimit = app, [], False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = Seen(time.monotonic(), scope["path"], {k.decode("latin-1"): v.decode("latin-1")
                                                      for k, v in scope["headers"]})
        self.seen.append(seen)
        chunks = []

        async def reply(message):
            if message["type"] == "http.response.start":
                seen.status = message["status"]
                if self.strip_ratelimit:
                    message = {**message, "headers": [(k, v) for k, v in message["headers"]
                                                      if not k.lower().startswith(b"anthropic-ratelimit-")]}
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    seen.reply = b"".join(chunks)
            await send(message)

        await self.app(scope, receive, reply)

    def messages(self) -> list:
        """The POST /v1/messages requests, in the order they arrived."""
        return [s for s in self.seen if s.path.endswith("/v1/messages")]


@pytest.fixture(scope="module")
def server():
    emu = Emulator(EmulatorConfig(**CONFIG))
    wire = Recorder(emu)
    handle = serve_in_thread(wire, host="127.0.0.1", port=0)
    yield emu, wire, handle
    handle.stop()


@pytest.fixture
def emu(server, monkeypatch):
    emulator, wire, handle = server
    emulator.reset()
    emulator.config = EmulatorConfig(**CONFIG)
    wire.seen.clear()
    wire.strip_ratelimit = False
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", handle.base_url)
    monkeypatch.delenv("BATCHRUN_MODELS", raising=False)
    emulator.base_url = handle.base_url
    return emulator


@pytest.fixture
def wire(server, emu):
    return server[1]


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def cli_args(inp, out, state, *extra):
    return ["run", "--mode", "messages", "--input", str(inp), "--output", str(out), "--id-column", "ticket_id",
            "--prompt", PROMPT, "--model", MODEL, "--max-tokens", "100", "--concurrency", "8",
            "--state", str(state), *extra]


def cli(*argv):
    return CliRunner().invoke(main, [str(a) for a in argv], catch_exceptions=False)


def assert_joined(out, rows):
    """Every input row once, in order, succeeded, with its own reply and its cost at standard prices."""
    prices = load_catalog().resolve(MODEL).prices
    got = pq.read_table(out).to_pylist()
    assert [g["ticket_id"] for g in got] == [r["ticket_id"] for r in rows]
    for g, r in zip(got, rows):
        assert g["status"] == "succeeded", (g["ticket_id"], g["error_message"])
        assert g["text"].startswith("Reply to: " + render(r)[:120] + " #"), g["ticket_id"]
        standard = (g["input_tokens"] * prices.input + g["output_tokens"] * prices.output) / Decimal(10**6)
        assert g["cost_usd"] == pytest.approx(float(standard), rel=1e-9)     # no batch discount
        assert g["batch_id"] is None
    return got


def most_in_any_window(events, span: float) -> float:
    """The most weight that arrived within any `span` seconds; `events` are (time, weight) pairs."""
    events = sorted(events)
    times = [t for t, _ in events]
    totals = [0.0]
    for _, weight in events:
        totals.append(totals[-1] + weight)
    return max((totals[bisect.bisect_left(times, t + span)] - totals[i] for i, t in enumerate(times)), default=0)


# ---- (1) a rate-limited run -------------------------------------------------------------------------
def test_150_rows_under_a_100_rpm_limit(emu, wire, tmp_path):
    """150 rows, limit 100 requests per (scaled) minute: every row joined at standard prices, no batch,
    and the limit is met by slowing down before it, not by running into it: the replies' rate-limit
    headers say what is left, and the client holds back once it runs low. Measured: no 429 in any of
    23 runs (20 of them with two busy loops loading the 2 CPUs), 1.0-1.9 s waiting on the limit.
    With the headers ignored (RateLimiter._observe disabled): 60-85 429s, loaded or not (the trial
    script of the same run saw 0-65 under a heavier load); and a client that meets 3 or fewer waits
    only for their cooldowns, ~0.03 s each, not 0.3 s: it fails either way."""
    emu.config.rpm = 100
    emu.config.rate_window = 3.0
    rows = make_tickets(150)
    inp = write_csv(tmp_path / "t.csv", rows)
    out = tmp_path / "o.parquet"
    started = time.monotonic()
    r = cli(*cli_args(inp, out, tmp_path / "s.sqlite"))
    wall = time.monotonic() - started
    assert r.exit_code == 0, r.output
    assert_joined(out, rows)
    assert emu.stats.messages_429 <= 3, emu.stats.messages_429         # issue #7 allows 15
    # It held back before the limit, not only after 429s: the run says how long it waited on rate
    # limits (the 70-odd requests beyond the bucket's first 80 go at its refill rate, ~2 s).
    waited = float(re.search(r"([0-9.]+)s waiting on rate limits", r.output).group(1))
    assert waited >= 0.3, r.output
    assert emu.stats.batches_created == 0
    assert emu.stats.messages_calls == 150 + emu.stats.messages_429 == len(wire.messages())
    assert wall >= 1.5          # the limit was in force: the 50 requests beyond a full bucket take 1.5 s to refill

    # a finished job sends nothing again and rewrites the same output
    calls = emu.stats.messages_calls
    r = cli(*cli_args(inp, out, tmp_path / "s.sqlite"))
    assert r.exit_code == 0, r.output
    assert emu.stats.messages_calls == calls


def test_150_rows_under_a_100_rpm_limit_told_by_openai_style_headers(emu, wire, tmp_path):
    """The same through a gateway that sends the OpenAI-style x-ratelimit-* headers (as LiteLLM does)
    instead of anthropic-ratelimit-* (issue #19 item 5): read as the same token bucket, so the limit is
    met by waiting for it, not by running into it. Before they were read: 54 429s in real time."""
    emu.config.rpm = 100
    emu.config.rate_window = 3.0
    emu.config.openai_ratelimit_headers = True
    rows = make_tickets(150)
    inp = write_csv(tmp_path / "t.csv", rows)
    out = tmp_path / "o.parquet"
    r = cli(*cli_args(inp, out, tmp_path / "s.sqlite"))
    assert r.exit_code == 0, r.output
    assert_joined(out, rows)
    seen = wire.messages()
    assert emu.stats.messages_429 <= 3, emu.stats.messages_429
    assert emu.stats.messages_calls == 150 + emu.stats.messages_429 == len(seen)
    waited = float(re.search(r"([0-9.]+)s waiting on rate limits", r.output).group(1))
    assert waited >= 0.3, r.output            # it held back (the 50 rows beyond the bucket refill in 1.5 s)


def test_without_rate_limit_headers_429s_slow_every_worker_down(emu, wire, tmp_path):
    """A gateway that drops the rate-limit headers: the client learns of the limit only from 429s.
    Each holds every worker back for its retry-after, and the refused request goes first after it:
    every row succeeds, and the client runs into the limit less than once per row. Measured: 50-95
    429s for 150 rows, every row joined, in 14 runs (10 with the CPU loaded); with the 429 backoff
    disabled (no cooldown, no halving), 6-25 rows ended errored after 9 refusals in each of 6 runs."""
    wire.strip_ratelimit = True
    emu.config.rpm = 100
    emu.config.rate_window = 3.0
    rows = make_tickets(150)
    inp = write_csv(tmp_path / "t.csv", rows)
    out = tmp_path / "o.parquet"
    r = cli(*cli_args(inp, out, tmp_path / "s.sqlite"))
    assert r.exit_code == 0, r.output
    assert_joined(out, rows)
    assert 0 < emu.stats.messages_429 < len(rows), emu.stats.messages_429


# ---- (2) the user's caps, end to end: no limit at the server, the client's cap is what limits --------
@pytest.mark.parametrize("cap", ["--rpm", "--tpm"])
def test_user_caps_hold_at_the_server(emu, wire, tmp_path, monkeypatch, cap):
    monkeypatch.setattr(ratelimit, "SPAN", 1.0)             # "per minute" scaled to per second
    rows = make_tickets(40)
    inp = write_csv(tmp_path / "t.csv", rows)
    out = tmp_path / "o.parquet"
    limit = 15 if cap == "--rpm" else 1200
    started = time.monotonic()
    r = cli(*cli_args(inp, out, tmp_path / "s.sqlite", cap, limit))
    wall = time.monotonic() - started
    assert r.exit_code == 0, r.output
    assert_joined(out, rows)
    seen = wire.messages()
    assert len(seen) == len(rows) and emu.stats.messages_429 == 0
    if cap == "--rpm":
        events = [(s.at, 1) for s in seen]
    else:      # what a tokens-per-minute cap counts: input, cache writes and output (cache reads are free)
        events = [(s.at, sum(s.usage().get(k) or 0 for k in ("input_tokens", "cache_creation_input_tokens",
                                                              "output_tokens"))) for s in seen]
    total = sum(w for _, w in events)
    # never more than the cap in any span (less 0.25 s for the time between sending and arriving, which a
    # loaded machine stretches) ...
    assert most_in_any_window(events, ratelimit.SPAN - 0.25) <= limit
    # ... and the cap is what limited: the job needs more than two spans' worth
    assert total > 2 * limit and wall >= 2 * ratelimit.SPAN


# ---- (3) a gateway: wrapped replies, a path prefix, bearer auth; the same output ---------------------
def test_same_job_through_a_wrapping_gateway_under_a_limit_gives_the_same_output(emu, wire, tmp_path, monkeypatch):
    """The same job, plain, then through a gateway that wraps replies as {code, data}, under a path
    prefix, with bearer auth and a rate limit of 40 a (scaled) minute: the same output."""
    rows = make_tickets(60)
    inp = write_csv(tmp_path / "t.csv", rows)
    r = cli(*cli_args(inp, tmp_path / "plain.parquet", tmp_path / "plain.sqlite"))
    assert r.exit_code == 0, r.output
    assert all(s.path == "/v1/messages" and s.headers.get("x-api-key") == KEY for s in wire.messages())

    wire.seen.clear()
    emu.reset()                                  # the rate-limit buckets full again
    emu.config.wrap_messages = True              # {"code": 200, "data": <Message>}
    emu.config.api_key = KEY
    emu.config.rpm, emu.config.rate_window = 40, 1.0
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emu.base_url + "/gw/anthropic")
    started = time.monotonic()
    r = cli(*cli_args(inp, tmp_path / "gw.parquet", tmp_path / "gw.sqlite", "--auth-header", "bearer"))
    assert r.exit_code == 0, r.output
    assert time.monotonic() - started >= 0.5      # the limit was in force: 20 beyond the bucket refill in 0.5 s
    seen = wire.messages()
    assert len(seen) >= len(rows) and emu.stats.batches_created == 0
    assert all(s.path == "/gw/anthropic/v1/messages" and s.headers.get("authorization") == f"Bearer {KEY}"
               and "x-api-key" not in s.headers for s in seen)
    assert all(json.loads(s.reply)["code"] == 200 for s in seen if s.status == 200)
    assert emu.stats.messages_429 <= 3

    plain = pq.read_table(tmp_path / "plain.parquet")
    gateway = pq.read_table(tmp_path / "gw.parquet")
    assert gateway.schema == plain.schema
    timing = ["attempts"]          # how often a row was sent depends on the 429s met on the way
    assert gateway.drop(timing).to_pylist() == plain.drop(timing).to_pylist()
    assert_joined(tmp_path / "gw.parquet", rows)


def test_in_process_async_transport(emu, tmp_path):
    """An async transport (httpx.ASGITransport) runs the job against the emulator in process, no sockets."""
    rows = make_tickets(12)
    inp = write_csv(tmp_path / "t.csv", rows)
    out = tmp_path / "o.parquet"
    spec = JobSpec.from_mapping({"input": str(inp), "output": str(out), "id_column": "ticket_id", "prompt": PROMPT,
                                 "model": MODEL, "max_tokens": 100, "mode": "messages",
                                 "state": str(tmp_path / "s.sqlite")})
    runner = Runner(spec, api_key=KEY, base_url="http://localhost", async_transport=httpx.ASGITransport(app=emu))
    calls = emu.stats.messages_calls
    try:
        assert runner.run().exit_code == 0
    finally:
        runner.close()
    assert_joined(out, rows)
    assert emu.stats.messages_calls == calls + 12


class RefusedLocally(httpx.AsyncBaseTransport):
    """Our own client refuses to send the request (httpx.LocalProtocolError: a header h11 will not write)."""

    def __init__(self):
        self.calls = 0

    async def handle_async_request(self, request):
        self.calls += 1
        raise httpx.LocalProtocolError("Illegal header value")


def test_a_request_our_client_refused_to_send_is_not_a_send(emu, tmp_path):
    """A LocalProtocolError is raised before anything leaves (as batch mode's create treats it): not a send
    that may have run. The run stops (exit 4, the row pending), and the request counts neither as sent nor,
    with a budget, as spent: its reservation is given back."""
    rows = make_tickets(3)
    inp = write_csv(tmp_path / "t.csv", rows)
    spec = JobSpec.from_mapping({"input": str(inp), "output": str(tmp_path / "o.parquet"), "id_column": "ticket_id",
                                 "prompt": PROMPT, "model": MODEL, "max_tokens": 100, "mode": "messages",
                                 "concurrency": 1, "max_cost": 10.0, "state": str(tmp_path / "s.sqlite")})
    refuse = RefusedLocally()
    runner = Runner(spec, api_key=KEY, base_url=emu.base_url, async_transport=refuse)
    try:
        with pytest.raises(Exception) as raised:
            runner.run()
        assert getattr(raised.value, "exit_code", None) == ExitCode.API_ERROR, raised.value
        assert "could not be sent" in str(raised.value)
        assert refuse.calls == 1
        assert runner.requests_sent == 0
        assert runner.ledger.unreplied == 0
        assert runner.store.counts(runner.job.id) == {"pending": 3}
    finally:
        runner.close()


# ---- (3) killed mid-run, run again -------------------------------------------------------------------
def test_kill_mid_run_then_rerun_sends_no_recorded_row_again(emu, tmp_path):
    emu.config.latency = 0.05
    rows = make_tickets(300)
    inp = write_csv(tmp_path / "t.csv", rows)
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    env = {**os.environ, "ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": emu.base_url}
    p = subprocess.Popen([sys.executable, "-c", "from batchrun.cli import main; main()",
                          *cli_args(inp, out, state)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    recorded = 0
    while recorded < 60 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
        recorded = done_rows(state)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=10)
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    before = done_ids(state)
    assert 60 <= len(before) < len(rows)

    r = cli(*cli_args(inp, out, state))
    assert r.exit_code == 0, r.output
    assert_joined(out, rows)
    billed = emu.stats.billed
    with Store(str(state)) as store:
        sent = {cid: params_hash(params) for _, cid, params in store.params()}
    # a row whose reply was recorded was never sent again ...
    assert [billed[sent[cid]] for cid in before] == [1] * len(before)
    # ... and at most the replies in flight or not yet committed at the kill were paid twice
    assert sum(billed.values()) - len(rows) <= FLUSH_ROWS + 8


def done_rows(state) -> int:
    try:
        with sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=5) as conn:   # never create it
            return conn.execute("SELECT count(*) FROM requests WHERE state != 'pending'").fetchone()[0]
    except sqlite3.Error:
        return 0


def done_ids(state) -> list:
    with sqlite3.connect(f"file:{state}?mode=ro", uri=True) as conn:
        return [cid for (cid,) in conn.execute("SELECT custom_id FROM requests WHERE state = 'succeeded'")]


# ---- (4) errors --------------------------------------------------------------------------------------
def test_a_400_ends_one_row_the_others_succeed(emu, tmp_path):
    rows = make_tickets(20)
    rows[5]["body"] = "REFUSE ME " + rows[5]["body"]   # the emulator answers 400 to this one row
    emu.config.refuse_text = "REFUSE ME"
    inp = write_csv(tmp_path / "t.csv", rows)
    out = tmp_path / "o.parquet"
    r = cli("run", "--mode", "messages", "--input", inp, "--output", out, "--id-column", "ticket_id",
            "--prompt", "{{ customer }}{{ body }}", "--model", MODEL, "--max-tokens", "100",
            "--state", tmp_path / "s.sqlite")
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    got = {g["ticket_id"]: g for g in pq.read_table(out).to_pylist()}
    bad = got.pop(rows[5]["ticket_id"])
    assert bad["status"] == "errored" and bad["error_type"] == "invalid_request_error"
    assert "REFUSE ME" in bad["error_message"] and bad["attempts"] == 1      # final: not retried
    assert {g["status"] for g in got.values()} == {"succeeded"}
    assert emu.stats.messages_calls == 20


def test_wrong_key_stops_with_exit_4_and_is_not_printed(emu, tmp_path, monkeypatch):
    emu.config.api_key = "sk-ant-the-right-one"
    rows = make_tickets(30)
    inp = write_csv(tmp_path / "t.csv", rows)
    r = cli(*cli_args(inp, tmp_path / "o.parquet", tmp_path / "s.sqlite"))
    assert r.exit_code == ExitCode.API_ERROR, r.output
    assert "authentication failed" in r.output and "ANTHROPIC_API_KEY" in r.output
    assert KEY not in r.output and "Traceback" not in r.output
    assert 1 <= emu.stats.status_counts[401] <= 8      # stopped at once, not one 401 per row
    assert not (tmp_path / "o.parquet").exists()


def test_transient_faults_are_retried(emu, tmp_path):
    emu.config.fault_rate = 0.25          # 429 / 500 / 529 / dropped connections
    rows = make_tickets(60)
    inp = write_csv(tmp_path / "t.csv", rows)
    out = tmp_path / "o.parquet"
    r = cli(*cli_args(inp, out, tmp_path / "s.sqlite", "--max-attempts", "8"))
    assert r.exit_code == 0, r.output
    got = assert_joined(out, rows)
    assert any(g["attempts"] > 1 for g in got)
    assert max(emu.stats.billed.values()) == 1


class OddGateway:
    """A gateway with its own error shapes: 'busy' replies `200 {"code": 529, "msg": ...}` to the next few
    requests, then forwards to the emulator; 'login' answers every request with an HTML page."""

    def __init__(self, app, mode, busy=0):
        self.app, self.mode, self.busy = app, mode, busy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        if self.mode == "busy" and self.busy <= 0:
            return await self.app(scope, receive, send)
        self.busy -= 1
        body, kind = ((b'{"code": 529, "msg": "upstream busy, try again"}', b"application/json")
                      if self.mode == "busy" else (b"<html><body>Please log in</body></html>", b"text/html"))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
        await send({"type": "http.response.body", "body": body})


def test_gateway_error_shapes(emu, tmp_path, monkeypatch):
    rows = make_tickets(10)
    inp = write_csv(tmp_path / "t.csv", rows)
    out = tmp_path / "o.parquet"
    gateway = OddGateway(emu, "busy", busy=3)
    handle = serve_in_thread(gateway, host="127.0.0.1", port=0)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", handle.base_url)
    try:
        r = cli(*cli_args(inp, out, tmp_path / "s.sqlite"))            # an error inside a 200: retried
        assert r.exit_code == 0, r.output
        assert sum(g["attempts"] for g in assert_joined(out, rows)) == len(rows) + 3
        gateway.mode = "login"                                          # not a Message at all: stop, say why
        r = cli(*cli_args(inp, tmp_path / "o2.parquet", tmp_path / "s2.sqlite"))
    finally:
        handle.stop()
    assert r.exit_code == ExitCode.API_ERROR, r.output
    assert "the reply is not a Message (<html><body>Please log in" in r.output
    assert "an Anthropic Messages endpoint?" in r.output and "Traceback" not in r.output


# ---- (5) the rest of a job works the same in messages mode ------------------------------------------
def test_job_file_headers_reach_the_server_and_stay_out_of_the_state(emu, wire, tmp_path):
    rows = make_tickets(10)
    inp = write_csv(tmp_path / "t.csv", rows)
    job = tmp_path / "job.toml"
    job.write_text(f"""
input = "{inp.name}"
output = "o.parquet"
id_column = "ticket_id"
model = "{MODEL}"
max_tokens = 100
mode = "messages"
prompt = "Summarise: {{{{ body }}}}"
[headers]
x-gateway-team = "data-eng"
x-gateway-token = "gw-token-5f1e9a"
""", encoding="utf-8")
    state = tmp_path / "s.sqlite"
    r = cli("run", job, "--state", state, "--auth-header", "x-api-key")
    assert r.exit_code == 0, r.output
    seen = wire.messages()
    assert len(seen) == 10 and emu.stats.batches_created == 0
    for s in seen:
        assert s.headers["x-gateway-team"] == "data-eng" and s.headers["x-gateway-token"] == "gw-token-5f1e9a"
        assert s.headers["x-api-key"] == KEY and "authorization" not in s.headers
    assert b"x-gateway-token" in state.read_bytes()         # the state keeps the names ...
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != job]    # state, its -wal, locks, output
    for p in written:                                      # ... no file keeps the values, nor the key
        data = p.read_bytes()
        assert b"gw-token-5f1e9a" not in data and b"data-eng" not in data and KEY.encode() not in data, p


def test_cache_writes_and_reads_at_standard_prices_then_status_and_report(emu, tmp_path):
    """label-tickets caches its long system prompt: in messages mode the first request writes the
    cache, the others read it, and each is costed at standard prices (no batch discount); status
    shows the mode and report works on the job."""
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    r = cli("run", JOBS / "label-tickets.toml", "--mode", "messages", "--limit", "24", "--output", out,
            "--state", state)
    assert r.exit_code == 0, r.output
    assert emu.stats.batches_created == 0 and emu.stats.messages_calls == 24
    rows = pq.read_table(out).to_pylist()
    assert {row["status"] for row in rows} == {"succeeded"}
    assert sum(1 for row in rows if row["cache_creation_input_tokens"]) >= 1
    assert sum(1 for row in rows if row["cache_read_input_tokens"]) >= 16
    p = load_catalog().resolve("claude-haiku-4-5").prices
    for row in rows:
        standard = (Decimal(row["input_tokens"]) * p.input + Decimal(row["output_tokens"]) * p.output
                    + Decimal(row["cache_creation_input_tokens"] or 0) * p.cache_write_5m
                    + Decimal(row["cache_read_input_tokens"] or 0) * p.cache_read) / Decimal(1_000_000)
        assert row["cost_usd"] == pytest.approx(float(standard), rel=1e-12)
    total = sum(row["cost_usd"] for row in rows)

    status = cli("status", "--state", state)
    assert status.exit_code == 0 and "mode messages" in status.output and "24 succeeded" in status.output
    data = json.loads(cli("status", "--state", state, "--json").output)[0]
    assert data["mode"] == "messages" and data["batches"] == []
    assert data["cost_usd"] == pytest.approx(total, rel=1e-9)

    page = tmp_path / "r.html"
    report = cli("report", "--state", state, "--html", page)
    assert report.exit_code == 0, report.output
    assert "label-tickets" in page.read_text(encoding="utf-8")
    with Store(str(state)) as store:
        numbers = build_report_data(store, find_job(store, None))
    assert numbers["job"]["mode"] == "messages"
    assert sum(numbers["cost_by_kind"].values()) == pytest.approx(total, rel=1e-9)    # standard, not halved
    assert numbers["cost_by_kind"]["cache_write"] > 0 and numbers["cost_by_kind"]["cache_read"] > 0


def test_estimate_is_twice_the_batch_figure_and_the_budget_holds_before_sending(emu, tmp_path):
    rows = make_tickets(40)
    inp = write_csv(tmp_path / "t.csv", rows)
    job = ["--input", inp, "--id-column", "ticket_id", "--prompt", PROMPT, "--model", MODEL, "--max-tokens", "100",
           "--output", tmp_path / "o.parquet"]
    batch = json.loads(cli("estimate", *job, "--state", tmp_path / "b.sqlite", "--json").output)
    messages = json.loads(cli("estimate", *job, "--mode", "messages", "--state", tmp_path / "m.sqlite",
                              "--json").output)
    assert batch["batch"] is True and messages["batch"] is False
    assert messages["requests"] == batch["requests"] == 40 and messages["input_tokens"] == batch["input_tokens"]
    assert batch["cost_usd_min"] > 0
    assert messages["cost_usd_min"] == pytest.approx(2 * batch["cost_usd_min"], rel=1e-9)
    assert messages["cost_usd_max"] == pytest.approx(2 * batch["cost_usd_max"], rel=1e-9)
    assert emu.stats.messages_calls == 0 and emu.stats.create_calls == 0

    # a budget between the batch figure and the standard one: refused in messages mode, before sending
    budget = (batch["cost_usd_max"] + messages["cost_usd_max"]) / 2
    r = cli("run", *job, "--mode", "messages", "--state", tmp_path / "m.sqlite", "--max-cost", budget)
    assert r.exit_code == ExitCode.BUDGET, r.output
    assert "max_cost" in r.output and "Traceback" not in r.output
    assert emu.stats.messages_calls == 0 and not (tmp_path / "o.parquet").exists()


# ---- (6) the emulator's limits by hand ---------------------------------------------------------------
def test_emulator_command_takes_the_rate_limits(tmp_path):
    """`batchrun emulator` serves the three Messages limits, per a --rate-window shorter than a minute."""
    p = subprocess.Popen([sys.executable, "-c", "from batchrun.cli import main; main()", "emulator", "--port", "0",
                          "--rpm", "2", "--input-tpm", "5000", "--output-tpm", "900", "--rate-window", "10"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = p.stdout.readline()
        base = re.search(r"listening on (http://\S+)", line)
        assert base, line + p.stderr.read() if p.poll() is not None else line
        params = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(base_url=base.group(1), headers={"x-api-key": "k", "anthropic-version": "2023-06-01"}) as http:
            replies = [http.post("/v1/messages", json=params) for _ in range(3)]
    finally:
        p.terminate()
        p.wait(timeout=10)
    assert [r.status_code for r in replies] == [200, 200, 429]
    limits = {k: replies[0].headers[f"anthropic-ratelimit-{k}-limit"] for k in ("requests", "input-tokens", "output-tokens")}
    assert limits == {"requests": "2", "input-tokens": "5000", "output-tokens": "900"}
    assert replies[1].headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert 4.0 < float(replies[2].headers["retry-after"]) <= 5.0      # one request refills in 10 s / 2


# ---- the limiter alone, on a fake clock ---------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_user_caps_hold_over_any_minute():
    window = SlidingWindow(3)
    for t in (0.0, 1.0, 2.0):
        assert window.delay(1, t) == 0
        window.take(1, t)
    assert window.delay(1, 2.5) == pytest.approx(57.5)          # until the first one is a minute old
    assert window.delay(1, 60.0) == 0
    tokens = SlidingWindow(1000)
    entry = tokens.take(900, 0.0)                               # a reservation (max_tokens) ...
    assert tokens.delay(200, 1.0) == pytest.approx(59.0)
    tokens.settle(entry, 150, 2.0)                              # ... settled to the reply's usage
    assert tokens.delay(200, 2.0) == 0
    assert SlidingWindow(10).delay(50, 0.0) == 0                # larger than the cap: fits an empty window


def test_limiter_slows_down_before_the_server_limit_and_backs_off_on_429():
    clock, wall = Clock(), Clock()

    async def scenario():
        limiter = RateLimiter(8, clock=clock, wall=wall)
        ticket = await limiter.acquire(10, 100)
        reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall.now + 10))
        headers = {"anthropic-ratelimit-requests-limit": "100", "anthropic-ratelimit-requests-remaining": "50",
                   "anthropic-ratelimit-requests-reset": reset}
        limiter.release(ticket, headers=headers, usage={"input_tokens": 10, "output_tokens": 5})
        assert limiter._delay(ticket.costs, clock.now) == 0          # plenty left: full speed
        headers["anthropic-ratelimit-requests-remaining"] = "10"
        ticket = await limiter.acquire(10, 100)
        limiter.release(ticket, headers=headers, usage={"input_tokens": 10, "output_tokens": 5})
        assert limiter._delay(ticket.costs, clock.now) == 0          # 10 left: used at once (issue #17)
        headers["anthropic-ratelimit-requests-remaining"] = "1"
        ticket = await limiter.acquire(10, 100)
        limiter.release(ticket, headers=headers, usage={"input_tokens": 10, "output_tokens": 5})
        # 1 left, less one request kept back (SLACK), full again (100) in 10 s: it refills 9.9 a second,
        # so no faster than that
        assert limiter._delay(ticket.costs, clock.now) == pytest.approx(1 / 9.9)
        clock.now += 1.0
        wall.now += 1.0
        assert limiter._delay(ticket.costs, clock.now) == 0          # 10.9 left by now
        headers["anthropic-ratelimit-requests-remaining"] = "0"
        limiter.server.clear()
        tickets = [await limiter.acquire(1, 1) for _ in range(4)]    # in flight together ...
        clock.now += 0.1
        wall.now += 0.1
        for t in tickets:                                            # ... and all refused (429):
            limiter.release(t, headers=headers, refused_for=2.0)
        assert limiter.window == 4                                   # one congestion event, halved once
        assert limiter._delay(ticket.costs, clock.now) == pytest.approx(2.0)   # the cooldown (retry-after)
        limiter.cooldown_until = 0
        # nothing left, full in 8.9 s: one request's worth (and one kept back) refills in 2 x 0.089 s
        assert limiter._delay(ticket.costs, clock.now) == pytest.approx(2 * 8.9 / 100)
        clock.now += 11
        wall.now += 11
        for _ in range(4):
            t = await limiter.acquire(1, 1)
            limiter.release(t, usage={"input_tokens": 1, "output_tokens": 1})
        assert 4 < limiter.window < 6                                # ramps back up gradually

    asyncio.run(scenario())


def test_a_refused_request_goes_before_the_ones_not_sent_yet():
    async def scenario():
        limiter = RateLimiter(1)
        order = []

        async def send(name, again=False):
            ticket = await limiter.acquire(1, 1, again=again)
            order.append(name)
            await asyncio.sleep(0)
            limiter.release(ticket, usage={"input_tokens": 1, "output_tokens": 1})

        first = await limiter.acquire(1, 1)                          # holds the only slot
        waiting = [asyncio.create_task(send(n)) for n in ("b", "c")]
        await asyncio.sleep(0.01)
        waiting.append(asyncio.create_task(send("refused", again=True)))
        await asyncio.sleep(0.01)
        limiter.release(first, usage={"input_tokens": 1, "output_tokens": 1})
        await asyncio.gather(*waiting)
        assert order == ["refused", "b", "c"]

    asyncio.run(scenario())
