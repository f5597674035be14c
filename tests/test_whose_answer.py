"""Whose answer is it: a job is keyed by its endpoint, and a lost create adopts only its own batch."""
from __future__ import annotations

import pyarrow.parquet as pq

import batchrun
from batchrun.api import endpoint_key

from tests.conftest import PROMPT

MODEL = "claude-haiku-4-5"


def test_endpoint_key():
    assert endpoint_key(None) is None
    assert endpoint_key("https://api.anthropic.com") is None
    assert endpoint_key("https://api.anthropic.com/") is None
    assert endpoint_key("https://API.anthropic.com:443") is None
    # every loopback URL is one service (the emulator starts on a free port each time)
    assert endpoint_key("http://127.0.0.1:41234") == endpoint_key("http://localhost:8765") == "http://loopback"
    assert endpoint_key("https://gw.example/anthropic/") == "https://gw.example/anthropic"
    assert endpoint_key("https://gw.example:8443/a") == "https://gw.example:8443/a"
    assert endpoint_key("https://gw.example/a") != endpoint_key("https://gw.example/b")


def _job(tmp_path, csv, out):
    return {"input": str(csv), "output": str(tmp_path / out), "id_column": "ticket_id", "prompt": PROMPT,
            "model": MODEL, "max_tokens": 100, "batch_size": 500, "poll_interval": 0.05,
            "state": str(tmp_path / "state.sqlite")}


def test_answers_from_one_endpoint_are_not_reused_for_another(emulator_server, tmp_path, tickets_csv,
                                                              monkeypatch):
    """A job answered by one service (say the emulator) is sent again, and paid, on another (the real
    API, a second gateway): never answered from the first one's replies."""
    emulator, _ = emulator_server
    emulator.reset()
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
import time  # noqa: E402

import pytest  # noqa: E402

CLI = [sys.executable, "-c", "from batchrun.cli import main; main()"]


def _run(emu, prompt, tmp_path, name, failpoint=None, clock_skew=0.0):
    """`batchrun run` in a subprocess against the emulator, whose clock runs `clock_skew` s off ours."""
    out, state = tmp_path / f"{name}.parquet", tmp_path / f"{name}.sqlite"
    env = {**os.environ, "ANTHROPIC_API_KEY": "sk-ant-test-0123456789", "ANTHROPIC_BASE_URL": emu.base_url}
    env.pop("BATCHRUN_FAILPOINT", None)
    if failpoint:
        env["BATCHRUN_FAILPOINT"] = failpoint
    emu.clock = lambda: time.time() + clock_skew
    p = subprocess.run(CLI + ["run", "--input", str(tmp_path / "in.csv"), "--output", str(out), "--state", str(state),
                              "--id-column", "id", "--prompt", prompt, "--model", MODEL, "--max-tokens", "50",
                              "--batch-size", "10", "--poll-interval", "0.05"],
                       env=env, capture_output=True, text=True, timeout=60)
    return p, out


@pytest.fixture
def skewable(emu):
    yield emu
    emu.clock = time.time


@pytest.mark.parametrize("skew", [-300.0, 0.0, 420.0])
def test_lost_create_is_adopted_whatever_the_apis_clock_says(skewable, tmp_path, skew):
    """The create's reply is lost (the emulator creates the batch, then drops the connection); the batch
    is found by the API's clock, even when that clock is minutes off ours."""
    emu = skewable
    (tmp_path / "in.csv").write_text("id,body\n" + "".join(f"r{i},row {i}\n" for i in range(30)))
    emu.config.drop_after_create = 1
    p, out = _run(emu, "A: {{ body }}", tmp_path, "a", clock_skew=skew)
    assert p.returncode == 0, p.stderr
    assert "adopted batch" in p.stderr
    assert emu.stats.batches_created == 3 and max(emu.stats.submitted_custom_ids.values()) == 1


@pytest.mark.parametrize("when", ["before", "after"])
def test_another_jobs_batch_of_the_same_size_is_not_adopted(skewable, tmp_path, when):
    """Job B dies between committing a batch intent and sending it (no batch was made). Job A — same
    rows and custom_ids, another prompt, another state file — created batches of the same size a minute
    before B's intent, or long after it (before B's next run). B's next run must not take A's batch
    for its own: it sends its rows, and every row gets B's own reply."""
    emu = skewable
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
