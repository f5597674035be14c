"""Whose answer is it: a job is keyed by its endpoint, and a lost create adopts only its own batch."""
from __future__ import annotations

import threading
import time

import httpx
import pyarrow.parquet as pq
import pytest

import batchrun
from batchrun.api import endpoint_key
from batchrun.errors import ExitCode, InputError

from tests.conftest import PROMPT

MODEL = "claude-haiku-4-5"


def test_endpoint_key():
    assert endpoint_key(None) is None
    assert endpoint_key("https://api.anthropic.com") is None
    assert endpoint_key("https://api.anthropic.com/") is None
    assert endpoint_key("https://API.anthropic.com:443") is None
    # loopback URLs are keyed like any other: scheme, host, port and path (two local servers are two services)
    assert endpoint_key("http://127.0.0.1:41234") == "http://127.0.0.1:41234"
    assert endpoint_key("http://127.0.0.1:41234") != endpoint_key("http://127.0.0.1:41235")
    assert endpoint_key("http://LOCALHOST:8765/gw/") == "http://localhost:8765/gw"
    assert endpoint_key("http://[::1]:8765") == "http://[::1]:8765"
    assert endpoint_key("https://gw.example/anthropic/") == "https://gw.example/anthropic"
    assert endpoint_key("https://gw.example:8443/a") == "https://gw.example:8443/a"
    assert endpoint_key("https://gw.example/a") != endpoint_key("https://gw.example/b")


def _job(tmp_path, csv, out):
    return {"input": str(csv), "output": str(tmp_path / out), "id_column": "ticket_id", "prompt": PROMPT,
            "model": MODEL, "max_tokens": 100, "batch_size": 500, "poll_interval": 0.05,
            "state": str(tmp_path / "state.sqlite")}


def test_answers_from_one_endpoint_are_not_reused_for_another(fresh_emulator, tmp_path, tickets_csv,
                                                              monkeypatch):
    """A job answered by one service (say the emulator) is sent again, and paid, on another (the real
    API, a second gateway): never answered from the first one's replies."""
    emulator = fresh_emulator
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    transport = emulator.sync_transport()
    first = batchrun.run(_job(tmp_path, tickets_csv, "a.parquet"), api_key="k",
                         base_url="https://gateway-a.example", transport=transport)
    assert first.exit_code == 0 and emulator.stats.batches_created == 1

    # the same job, the same state file, another service: a new job that sends every row
    second = batchrun.run(_job(tmp_path, tickets_csv, "b.parquet"), api_key="k",
                          base_url="https://gateway-b.example", transport=transport)
    assert second.exit_code == 0 and second.job_id != first.job_id
    assert emulator.stats.batches_created == 2
    rows = pq.read_table(tmp_path / "b.parquet").to_pylist()
    assert all(r["cost_usd"] > 0 for r in rows)          # paid here, not reused at cost 0

    # and the first service again: its job is finished, nothing is sent
    again = batchrun.run(_job(tmp_path, tickets_csv, "a.parquet"), api_key="k",
                         base_url="https://gateway-a.example/", transport=transport)
    assert again.job_id == first.job_id and emulator.stats.batches_created == 2


# ---- adopting the batch of a lost create: only ours --------------------------------------------------
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402


CLI = [sys.executable, "-c", "from batchrun.cli import main; main()"]


def _run(emu, prompt, tmp_path, name, failpoint=None, clock_skew=0.0):
    """`batchrun run` in a subprocess against the emulator, whose clock runs `clock_skew` s off ours."""
    out, state = tmp_path / f"{name}.parquet", tmp_path / f"{name}.sqlite"
    env = {**os.environ, "ANTHROPIC_API_KEY": "sk-ant-test-0123456789", "ANTHROPIC_BASE_URL": emu.base_url,
           "BATCHRUN_CREATE_GRACE": "1"}   # a killed run's create is waited for 1 s, not 60
    env.pop("BATCHRUN_FAILPOINT", None)
    if failpoint:
        env["BATCHRUN_FAILPOINT"] = failpoint
    emu.clock = lambda: time.time() + clock_skew
    p = subprocess.run(CLI + ["run", "--input", str(tmp_path / "in.csv"), "--output", str(out), "--state", str(state),
                              "--id-column", "id", "--prompt", prompt, "--model", MODEL, "--max-tokens", "50",
                              "--batch-size", "10", "--poll-interval", "0.05"],
                       env=env, capture_output=True, text=True, timeout=60)
    return p, out


@pytest.mark.parametrize("skew", [-300.0, 0.0, 420.0])
def test_lost_create_is_adopted_whatever_the_apis_clock_says(emu, tmp_path, skew):
    """The create's reply is lost (the emulator creates the batch, then drops the connection); the batch
    is found by the API's clock, even when that clock is minutes off ours."""
    (tmp_path / "in.csv").write_text("id,body\n" + "".join(f"r{i},row {i}\n" for i in range(30)))
    emu.config.drop_after_create = 1
    p, out = _run(emu, "A: {{ body }}", tmp_path, "a", clock_skew=skew)
    assert p.returncode == 0, p.stderr
    assert "adopted batch" in p.stderr
    assert emu.stats.batches_created == 3 and max(emu.stats.submitted_custom_ids.values()) == 1


@pytest.mark.parametrize("when", ["before", "after"])
def test_another_jobs_batch_of_the_same_size_is_not_adopted(emu, tmp_path, when):
    """Job B dies between committing a batch intent and sending it (no batch was made). Job A — same
    rows and custom_ids, another prompt, another state file — created batches of the same size a minute
    before B's intent, or long after it (before B's next run). B's next run must not take A's batch
    for its own: it sends its rows, and every row gets B's own reply."""
    (tmp_path / "in.csv").write_text("id,body\n" + "".join(f"r{i},row {i}\n" for i in range(30)))
    if when == "before":
        p, _ = _run(emu, "A: {{ body }}", tmp_path, "a", clock_skew=-60.0)
        assert p.returncode == 0, p.stderr
    p, _ = _run(emu, "B: {{ body }}", tmp_path, "b", failpoint="after_intent:2")
    assert p.returncode == -signal.SIGKILL
    if when == "after":   # A's batches are stamped two hours after B's intent (B runs again later still)
        p, _ = _run(emu, "A: {{ body }}", tmp_path, "a", clock_skew=7200.0)
        assert p.returncode == 0, p.stderr
    p, out = _run(emu, "B: {{ body }}", tmp_path, "b")
    assert p.returncode == 0, p.stderr
    assert "adopted" not in p.stderr
    import pyarrow.parquet as pq
    texts = [r["text"] for r in pq.read_table(out).to_pylist()]
    assert len(texts) == 30 and all(t.startswith("Reply to: B: row") for t in texts), texts[:3]


# ---- jobs planned before the endpoint was part of a job's identity ----------------------------------
def test_a_job_planned_before_endpoints_were_kept_is_continued_not_paid_again(fresh_emulator, tmp_path,
                                                                            tickets_csv, monkeypatch):
    """A gateway job left with batches in flight by a version that did not key jobs by endpoint: the
    new version finds that job (same spec and input, its endpoint not recorded) and continues it."""
    import batchrun.runner as runner_mod
    from batchrun.store import Store
    emulator = fresh_emulator
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    emulator.config.processing_seconds = 0.5
    transport = emulator.sync_transport()
    job = _job(tmp_path, tickets_csv, "a.parquet")
    with monkeypatch.context() as old:   # the old version: no endpoint in the identity, none recorded
        old.setattr(runner_mod, "endpoint_key", lambda base: None)
        first = batchrun.run(job, wait=False, api_key="k", base_url="https://gw.example", transport=transport)
    with Store(job["state"]) as store:
        store.conn.execute("UPDATE jobs SET endpoint = NULL")
    assert first.exit_code == ExitCode.IN_PROGRESS and emulator.stats.requests_created == 450
    again = batchrun.run(job, api_key="k", base_url="https://gw.example", transport=transport)
    assert again.job_id == first.job_id and again.exit_code == 0
    assert emulator.stats.requests_created == 450                # nothing sent twice


def test_cancel_by_id_refuses_another_endpoint(fresh_emulator, tmp_path, tickets_csv, monkeypatch):
    """Cancelling (or collecting) a job through another endpoint would find none of its batches there
    (404: "lost"), so it is refused, naming the endpoint the job was sent to."""
    from batchrun.runner import Runner
    emulator = fresh_emulator
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    transport = emulator.sync_transport()
    job = _job(tmp_path, tickets_csv, "a.parquet")
    first = batchrun.run(job, api_key="k", base_url="https://gw-a.example", transport=transport)
    with pytest.raises(InputError) as refused_:
        Runner.for_stored_job(job["state"], first.job_id[:12], api_key="k", base_url="https://gw-b.example",
                              transport=transport)
    assert "was sent to https://gw-a.example" in str(refused_.value) and "ANTHROPIC_BASE_URL" in str(refused_.value)
    Runner.for_stored_job(job["state"], first.job_id[:12], api_key="k", base_url="https://gw-a.example",
                          transport=transport).close()


# ---- a create that fails ambiguously while the API goes on creating ----------------------------------
class LateCreates(httpx.BaseTransport):
    """A gateway that times out (504) on every batch create while the API behind it goes on: the batch
    is created `delay` seconds later, after the client was told the create failed."""

    def __init__(self, inner: httpx.BaseTransport, delay: float):
        self.inner, self.delay, self.threads = inner, delay, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/v1/messages/batches"):
            body = request.read()
            late = httpx.Request("POST", request.url, headers=request.headers, content=body)

            def create_later():
                time.sleep(self.delay)
                self.inner.handle_request(late).read()

            thread = threading.Thread(target=create_later)
            thread.start()
            self.threads.append(thread)
            return httpx.Response(504, text="gateway timeout", request=request)
        return self.inner.handle_request(request)


def test_a_batch_that_shows_after_its_create_failed_is_adopted_not_sent_again(fresh_emulator, tmp_path,
                                                                             tickets_csv, monkeypatch):
    emulator = fresh_emulator
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    transport = LateCreates(emulator.sync_transport(), delay=1.0)
    job = {**_job(tmp_path, tickets_csv, "a.parquet"), "batch_size": 225}
    result = batchrun.run(job, api_key="k", base_url="https://gw.example", transport=transport)
    for thread in transport.threads:
        thread.join()
    assert result.exit_code == 0 and result.counts == {"succeeded": 450}
    assert emulator.stats.batches_created == 2                      # each create reached the API once
    assert max(emulator.stats.submitted_custom_ids.values()) == 1   # nothing sent twice


def test_one_outsized_row_does_not_make_every_later_batch_one_request(emu, tmp_path):
    csv = tmp_path / "in.csv"
    csv.write_text("id,body\nbig," + "x" * 6000 + "\n" + "".join(f"r{i},short row {i}\n" for i in range(20)))
    emu.config.max_body_bytes = 4000
    job = batchrun.JobSpec.from_mapping({"input": str(csv), "output": str(tmp_path / "o.parquet"), "id_column": "id",
                                         "prompt": "{{ body }}", "model": MODEL, "max_tokens": 50,
                                         "batch_size": 10, "poll_interval": 0.05})
    result = batchrun.run(job, api_key="k", base_url=emu.base_url)
    assert result.exit_code == ExitCode.FAILED_ROWS and result.counts == {"succeeded": 20, "errored": 1}
    assert emu.stats.batches_created == 2                           # the 20 short rows, 10 a batch


def test_cancel_stops_when_the_api_stays_down(emu, tmp_path, tickets_csv):
    """A cancel whose calls give up (503 after every retry) fails with exit 4; it does not say it canceled."""
    from batchrun.api import RetryPolicy
    from batchrun.errors import GaveUpError
    from batchrun.runner import Runner
    emu.config.processing_seconds = 30
    job = _job(tmp_path, tickets_csv, "a.parquet")
    first = batchrun.run(job, wait=False, api_key="k", base_url=emu.base_url)
    assert first.exit_code == ExitCode.IN_PROGRESS

    class Down(httpx.HTTPTransport):
        def handle_request(self, request):
            if request.url.path.endswith("/cancel"):
                return httpx.Response(503, json={"type": "error", "error": {"type": "api_error", "message": "down"}})
            return super().handle_request(request)

    runner = Runner.for_stored_job(job["state"], first.job_id, api_key="k", base_url=emu.base_url, transport=Down(),
                                   retry=RetryPolicy(max_retries=1, max_elapsed=1))
    try:
        with pytest.raises(GaveUpError):
            runner.cancel(wait=0)
    finally:
        runner.close()
