"""Errors that are the service's, not the request's, never end a row (issue #14 items 9, 10; issue #19).

One rule for both modes (`errors.error_class`): only an error about the request itself
(`invalid_request_error`, `request_too_large`) ends a row. An unreachable API, 429 / 529, upstream
5xx, authentication, billing, a gateway's own error types: the run stops with exit 4 (at once, or
once its patience is over), the rows stay pending, and the next run sends them. All against the
emulator over loopback; an unreachable API is a closed port.
"""
from __future__ import annotations

import json
import socket

import pyarrow.parquet as pq
import pytest

import batchrun
from batchrun.api import RetryPolicy
from batchrun.emulator import Emulator, EmulatorConfig, serve_in_thread
from batchrun.errors import ApiError, ExitCode
from batchrun.store import Store
from tests.conftest import FAST, PROMPT, make_tickets, refused, render
from tests.test_messages_mode import write_csv

KEY = "sk-ant-test-service-0123456789"
MODEL = "claude-haiku-4-5"
QUICK = RetryPolicy(max_retries=2, max_wait=0.05, max_elapsed=1.0)   # gives up within a second or two


def job(inp, tmp_path, mode="messages", **extra) -> dict:
    return {"input": str(inp), "output": str(tmp_path / "o.parquet"), "state": str(tmp_path / "s.sqlite"),
            "id_column": "ticket_id", "prompt": PROMPT, "model": MODEL, "max_tokens": 100, "mode": mode,
            "poll_interval": 0.1, **extra}


def cli_args(inp, tmp_path, mode="messages", *extra):
    return ["run", "--mode", mode, "--input", inp, "--output", tmp_path / "o.parquet", "--state",
            tmp_path / "s.sqlite", "--id-column", "ticket_id", "--prompt", PROMPT, "--model", MODEL,
            "--max-tokens", "100", "--poll-interval", "0.1", *extra]


def counts(tmp_path) -> dict:
    with Store(str(tmp_path / "s.sqlite")) as store:
        (row,) = store.q("SELECT id FROM jobs")
        return {k: v for k, v in store.counts(row["id"]).items() if v}


def assert_all_answered(tmp_path, rows) -> list:
    got = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [g["ticket_id"] for g in got] == [r["ticket_id"] for r in rows]
    for g, r in zip(got, rows):
        assert g["status"] == "succeeded", (g["ticket_id"], g["error_type"], g["error_message"])
        assert g["text"].startswith("Reply to: " + render(r)[:80]), g["ticket_id"]
    return got


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- #14 item 9: an unreachable API is not a failed row ------------------------------------------------
def test_messages_mode_with_the_api_unreachable_stops_with_rows_pending_then_the_next_run_sends_them(tmp_path):
    rows = make_tickets(12)
    inp = write_csv(tmp_path / "t.csv", rows)
    port = free_port()                              # nothing listens there: every connection is refused
    base = f"http://127.0.0.1:{port}"
    with pytest.raises(ApiError) as stopped:
        batchrun.run(job(inp, tmp_path, max_attempts=1), api_key=KEY, base_url=base, retry=QUICK)
    assert stopped.value.exit_code == ExitCode.API_ERROR
    message = str(stopped.value)
    assert "connection failed before anything was sent" in message and "stay pending" in message
    assert counts(tmp_path) == {"pending": 12}      # no row errored, no attempt used up
    assert not (tmp_path / "o.parquet").exists()

    emu = Emulator(EmulatorConfig(**FAST))          # the API is back, at the same address
    handle = serve_in_thread(emu, host="127.0.0.1", port=port)
    try:
        result = batchrun.run(job(inp, tmp_path, max_attempts=1), api_key=KEY, base_url=base, retry=QUICK)
    finally:
        handle.stop()
    assert result.exit_code == ExitCode.OK
    assert emu.stats.messages_calls == 12           # every row sent, once
    got = assert_all_answered(tmp_path, rows)
    assert {g["attempts"] for g in got} == {1}      # the refused connections were not attempts


# ---- #14 item 10: 429 / 529 never end a row --------------------------------------------------------
@pytest.mark.parametrize("status,error_type", [(429, "rate_limit_error"), (529, "overloaded_error")])
def test_messages_mode_refused_for_longer_than_the_patience_stops_with_rows_pending(emu, tmp_path, status,
                                                                                    error_type):
    rows = make_tickets(10)
    inp = write_csv(tmp_path / "t.csv", rows)
    emu.config.error_status, emu.config.error_type = status, error_type
    with pytest.raises(ApiError) as stopped:
        batchrun.run(job(inp, tmp_path, max_attempts=1), retry=QUICK)
    assert stopped.value.exit_code == ExitCode.API_ERROR
    assert f"{status} {error_type}" in str(stopped.value) and "stay pending" in str(stopped.value)
    assert counts(tmp_path) == {"pending": 10}
    assert emu.stats.faults[f"error_{status}"] > 10        # it kept trying for its patience, no row ended
    emu.config.error_status = None
    assert batchrun.run(job(inp, tmp_path, max_attempts=1), retry=QUICK).exit_code == ExitCode.OK
    assert_all_answered(tmp_path, rows)


def test_messages_mode_rows_refused_many_times_each_still_succeed_with_one_attempt(emu, tmp_path):
    rows = make_tickets(6)
    inp = write_csv(tmp_path / "t.csv", rows)
    emu.config.error_status, emu.config.error_type, emu.config.error_calls = 529, "overloaded_error", 60
    r = batchrun.run(job(inp, tmp_path, max_attempts=1, concurrency=2), retry=RetryPolicy(max_wait=0.02))
    assert r.exit_code == ExitCode.OK
    assert emu.stats.faults["error_529"] == 60              # ten refusals a row on average, then answers
    assert_all_answered(tmp_path, rows)


@pytest.mark.parametrize("error_type", ["rate_limit_error", "overloaded_error"])
def test_batch_results_rate_limited_or_overloaded_never_use_an_attempt(emu, cli, tmp_path, error_type):
    rows = make_tickets(60)
    inp = write_csv(tmp_path / "t.csv", rows)
    emu.config.errored_rate, emu.config.errored_types = 0.4, (error_type,)
    r = cli(*cli_args(inp, tmp_path, "batch", "--max-attempts", "1", "--batch-size", "20"))
    assert r.exit_code == ExitCode.OK, r.output
    got = assert_all_answered(tmp_path, rows)
    assert max(g["attempts"] for g in got) > 1               # sent again, past --max-attempts 1
    sent = sum(n for n in emu.stats.submitted_custom_ids.values())
    assert sum(g["attempts"] for g in got) == sent           # attempts still counts every send


def test_batch_results_that_keep_failing_for_the_service_stop_the_run_with_rows_pending(emu, cli, tmp_path):
    rows = make_tickets(20)
    inp = write_csv(tmp_path / "t.csv", rows)
    emu.config.errored_rate, emu.config.errored_types = 1.0, ("rate_limit_error",)
    r = cli(*cli_args(inp, tmp_path, "batch", "--max-attempts", "1"))
    line = refused(r, ExitCode.API_ERROR, "rate_limit_error", "stay pending")
    assert "3 rounds in a row" in line
    assert counts(tmp_path) == {"pending": 20}
    assert emu.stats.batches_created == 3                    # the patience: three rounds, then it stops
    emu.config.errored_rate = 0.0
    r = cli(*cli_args(inp, tmp_path, "batch", "--max-attempts", "1"))
    assert r.exit_code == ExitCode.OK, r.output
    assert_all_answered(tmp_path, rows)


# ---- #19: the gateway's (and the account's) errors never end a row ----------------------------------
@pytest.mark.parametrize("status,error_type", [(400, "no_db_connection"), (401, "authentication_error"),
                                               (403, "permission_error"), (402, "billing_error")])
def test_messages_mode_gateway_and_account_errors_stop_at_once_then_the_right_key_sends(emu, cli, tmp_path,
                                                                                      status, error_type):
    rows = make_tickets(15)
    inp = write_csv(tmp_path / "t.csv", rows)
    emu.config.error_status, emu.config.error_type = status, error_type
    r = cli(*cli_args(inp, tmp_path, "messages", "--concurrency", "4"))
    refused(r, ExitCode.API_ERROR, str(status), error_type)
    assert emu.stats.faults[f"error_{status}"] <= 4          # no retry: at most the requests already on the wire
    assert counts(tmp_path) == {"pending": 15}
    emu.config.error_status = None                           # e.g. the right key now
    r = cli(*cli_args(inp, tmp_path, "messages", "--concurrency", "4"))
    assert r.exit_code == ExitCode.OK, r.output
    assert emu.stats.messages_calls == 15                     # (the refused calls are counted as faults)
    assert_all_answered(tmp_path, rows)


def test_messages_mode_upstream_5xx_never_ends_a_row(emu, tmp_path):
    rows = make_tickets(8)
    inp = write_csv(tmp_path / "t.csv", rows)
    emu.config.error_status, emu.config.error_type = 502, "api_error"
    with pytest.raises(ApiError) as stopped:
        batchrun.run(job(inp, tmp_path, max_attempts=5), retry=QUICK)
    assert stopped.value.exit_code == ExitCode.API_ERROR and "502 api_error" in str(stopped.value)
    assert counts(tmp_path) == {"pending": 8}
    emu.config.error_status = None
    assert batchrun.run(job(inp, tmp_path, max_attempts=5), retry=QUICK).exit_code == ExitCode.OK
    assert_all_answered(tmp_path, rows)


@pytest.mark.parametrize("error_type", ["no_db_connection", "authentication_error"])
def test_batch_results_with_gateway_or_account_errors_stop_the_run_with_rows_pending(emu, cli, tmp_path,
                                                                                     error_type):
    rows = make_tickets(20)
    inp = write_csv(tmp_path / "t.csv", rows)
    emu.config.errored_rate, emu.config.errored_types = 1.0, (error_type,)
    r = cli(*cli_args(inp, tmp_path, "batch"))
    refused(r, ExitCode.API_ERROR, error_type, "stay pending")
    # an account error stops the run after the first round; a gateway's own type after three
    assert emu.stats.batches_created == (1 if error_type == "authentication_error" else 3)
    assert counts(tmp_path) == {"pending": 20}
    emu.config.errored_rate = 0.0
    r = cli(*cli_args(inp, tmp_path, "batch"))
    assert r.exit_code == ExitCode.OK, r.output
    assert_all_answered(tmp_path, rows)


def test_invalid_request_still_ends_only_its_row(emu, cli, tmp_path):
    """The one error about the request: its row ends errored at once, the others succeed (both modes)."""
    rows = make_tickets(10)
    emu.config.refuse_text = rows[3]["body"][:40]
    inp = write_csv(tmp_path / "t.csv", rows)
    for mode in ("messages", "batch"):
        (tmp_path / mode).mkdir()
        r = cli(*cli_args(inp, tmp_path / mode, mode))
        assert r.exit_code == ExitCode.FAILED_ROWS, r.output
        got = pq.read_table(tmp_path / mode / "o.parquet").to_pylist()
        assert [(g["status"], g["error_type"]) for g in got if g["status"] != "succeeded"] == [
            ("errored", "invalid_request_error")]
        assert got[3]["status"] == "errored" and got[3]["attempts"] == 1


def test_emulator_gateway_error_flags(emu):
    import httpx
    emu.config.error_status, emu.config.error_type, emu.config.error_calls = 400, "no_db_connection", 1
    body = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    first = httpx.post(emu.base_url + "/v1/messages", json=body, headers=headers)
    assert first.status_code == 400 and first.json()["error"]["type"] == "no_db_connection"
    assert httpx.post(emu.base_url + "/v1/messages", json=body, headers=headers).status_code == 200
    emu.config.openai_ratelimit_headers = True
    reply = httpx.post(emu.base_url + "/v1/messages", json=body, headers=headers)
    assert not any(k.startswith("anthropic-ratelimit-") for k in reply.headers)
    assert {k for k in reply.headers if k.startswith("x-ratelimit-")} == {
        f"x-ratelimit-{w}-{n}" for w in ("limit", "remaining", "reset") for n in ("requests", "tokens")}
    assert json.loads(json.dumps(dict(reply.headers)))["x-ratelimit-reset-requests"].endswith("s")
