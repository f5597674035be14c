"""Issue 14 (4, 5, 6, 8) tried as a hostile user: what a lost create waits for and how a user sees it,
a candidate whose results cannot be read any more, two messages-mode jobs sharing requests."""
from __future__ import annotations

import json

import pyarrow.parquet as pq

import batchrun
from batchrun.errors import ExitCode
from tests.test_paid_once import MODEL, LostCreate, _table


def _foreign(n: int, prompt: str = "OTHER") -> bytes:
    """Another job's batch: the same row-N ids as ours, another prompt."""
    return json.dumps({"requests": [{"custom_id": f"row-{i}", "params": {
        "model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": f"{prompt}: row {i}"}]}}
        for i in range(n)]}).encode()


def _job(tmp_path, csv, **kw):
    return {"input": str(csv), "output": str(tmp_path / "o.parquet"), "prompt": "{{ body }}", "model": MODEL,
            "max_tokens": 50, "batch_size": 10, "poll_interval": 0.05, "state": str(tmp_path / "s.sqlite"), **kw}


def test_a_lost_create_waiting_for_a_running_candidate_says_what_it_waits_for(emu, cli, tmp_path, monkeypatch):
    """Our create failed ambiguously while another job's batch of our size was created; that batch
    runs for long (up to 24 h at the API). A --no-wait run exits 5 (still running), sends nothing more,
    and `status` names the batch the job waits for instead of an endless '(creating)'."""
    emu.config.processing_seconds = 3600.0
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.setenv("BATCHRUN_CREATE_GRACE", "0")
    csv = _table(tmp_path, n=10)
    transport = LostCreate(emu.sync_transport(), _foreign(10))
    job = _job(tmp_path, csv)
    for _ in range(2):
        result = batchrun.run(job, wait=False, api_key="k", base_url="https://gw.example", transport=transport)
        assert result.exit_code == ExitCode.IN_PROGRESS and result.counts == {"in_flight": 10}
    assert len(transport.creates) == 1 and emu.stats.batches_created == 1   # ours never sent blindly
    r = cli("status", "--state", job["state"])
    assert r.exit_code == 0, r.output
    assert "(creating)" not in r.output, r.output
    line = next(x for x in r.output.splitlines() if "waiting for batch" in x)
    assert "msgbatch_" in line and "create reply was lost" in line, r.output
    r = cli("status", "--state", job["state"], "--json")
    (batch,) = json.loads(r.output)[0]["batches"]
    assert "waiting for batch msgbatch_" in batch["note"]


def test_a_candidate_whose_results_are_gone_is_not_paid_for_again_blindly(emu, cli, tmp_path, monkeypatch):
    """Our create's reply was lost but the batch was made; by the time it ended its results were gone
    (archived: a restart weeks later). It cannot be proved ours — nor another job's: its rows are not
    sent again blindly, they end errored saying so, and `run --resend-lost` sends them."""
    monkeypatch.setenv("BATCHRUN_CREATE_GRACE", "0.2")
    emu.config.drop_after_create = 1
    emu.config.archive_after_seconds = 0.0
    csv = _table(tmp_path, n=10)
    argv = ["run", "--input", str(csv), "--output", str(tmp_path / "o.parquet"), "--state", str(tmp_path / "s.sqlite"),
            "--prompt", "{{ body }}", "--model", MODEL, "--max-tokens", "50", "--poll-interval", "0.05"]
    r = cli(*argv)
    assert emu.stats.requests_created == 10, r.output          # sent once
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert {(x["status"], x["error_type"]) for x in rows} == {("errored", "results_gone")}
    assert "may have been paid for" in rows[0]["error_message"] and "--resend-lost" in rows[0]["error_message"]
    emu.config.archive_after_seconds = None
    r = cli(*argv, "--resend-lost")
    assert r.exit_code == 0, r.output
    assert emu.stats.requests_created == 20
