"""Answers belong to the service that gave them: a job is keyed by its endpoint as well."""
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
