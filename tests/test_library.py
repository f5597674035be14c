"""Issue 16: the library does all the CLI does — validate, estimate, run, status, cancel, a step-by-step
Job for orchestrators, and run_table over any Arrow-compatible table — against the emulator over loopback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batchrun
from batchrun.errors import BatchrunError, ExitCode
from batchrun.emulator import EmulatorConfig
from tests.conftest import FAST, PROMPT, make_tickets, render

MODEL = "claude-haiku-4-5"


def job_keys(tickets_csv, tmp_path, **extra):
    return {"input": str(tickets_csv), "output": str(tmp_path / "out.parquet"), "id_column": "ticket_id",
            "prompt": PROMPT, "model": MODEL, "max_tokens": 100, "batch_size": 200, "poll_interval": 0.05,
            "state": str(tmp_path / "state.sqlite"), **extra}


def wait_until_polled(job, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not job.poll():
        assert time.monotonic() < deadline, "batches never ended"
        time.sleep(0.05)


def test_validate_estimate_and_refusals(emu, tickets_csv, tmp_path):
    keys = job_keys(tickets_csv, tmp_path)
    report = batchrun.validate(keys, show=1)
    assert report["rows"] == 450 and len(report["requests"]) == 1
    first = make_tickets(450)[0]
    assert report["requests"][0]["params"]["messages"][0]["content"] == render(first)
    assert not os.path.exists(keys["state"])                    # validate keeps nothing
    est = batchrun.estimate(keys)
    assert est.requests == 450 and est.cost_usd_min <= est.cost_usd_max
    assert emu.stats.create_calls == 0                          # estimate creates no batch
    with pytest.raises(BatchrunError) as refused:
        batchrun.validate(keys, prompt="{{ no_such_column }}")
    assert refused.value.exit_code == ExitCode.BAD_INPUT and "no_such_column" in str(refused.value)


def test_job_step_by_step_across_processes_pays_once(emu, tickets_csv, tmp_path):
    keys = job_keys(tickets_csv, tmp_path)
    with batchrun.Job(keys) as job:
        assert job.status()["state"] == "not started"
        assert job.submit() == 3                                 # 450 rows in batches of 200
        handle = job.handle
    assert json.loads(json.dumps(handle)) == handle and "key" not in json.dumps(handle).lower()
    # the next task, in another process: it picks the job up by its handle, polls and collects
    code = """
import json, sys, time, batchrun
job = batchrun.Job.from_handle(json.loads(sys.argv[1]))
assert job.submit() == 0, "a second submit sends nothing"
deadline = time.monotonic() + 30
while not job.poll():
    assert time.monotonic() < deadline
    time.sleep(0.05)
r = job.collect()
print(json.dumps({"finished": r.finished, "exit": r.exit_code, "counts": r.counts, "id": job.id}))
"""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(handle)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"finished": True, "exit": 0, "counts": {"succeeded": 450}, "id": handle["job_id"]}
    assert emu.stats.batches_created == 3 and emu.stats.requests_created == 450
    rows = pq.read_table(keys["output"]).to_pylist()
    assert [r["ticket_id"] for r in rows] == [t["ticket_id"] for t in make_tickets(450)]
    assert all(r["text"].startswith("Reply to: " + render(t)[:40]) for r, t in zip(rows, make_tickets(450)))
    st = batchrun.status(keys["state"])                         # a state file: every job in it
    assert [s["state"] for s in st] == ["finished"] and st[0]["job_id"] == handle["job_id"]
    assert batchrun.status(keys)["counts"]["succeeded"] == 450   # a job: its own status


def test_job_collect_before_the_end_and_retries_through_submit(emu, tickets_csv, tmp_path):
    emu.config = EmulatorConfig(**FAST, errored_rate=0.2, errored_types=("overloaded_error",), seed=3)
    keys = job_keys(tickets_csv, tmp_path, max_attempts=5)
    job = batchrun.Job(keys)
    job.submit()
    first = job.collect()                                       # nothing has ended yet, or only some
    assert not first.finished and first.exit_code == ExitCode.IN_PROGRESS and not os.path.exists(keys["output"])
    rounds = 0
    while True:
        wait_until_polled(job)
        result = job.collect()
        if result.finished:
            break
        assert job.submit() >= 1                                # the transient failures go out again
        rounds += 1
        assert rounds < 10
    job.close()
    assert rounds >= 1 and result.exit_code == 0 and result.counts == {"succeeded": 450}
    assert emu.stats.requests_created > 450                     # retried: only the failed rows
    assert pq.read_table(keys["output"]).num_rows == 450


def test_job_from_handle_refuses_a_changed_input(emu, tickets_csv, tmp_path):
    keys = job_keys(tickets_csv, tmp_path)
    with batchrun.Job(keys) as job:
        job.submit()
        handle = job.handle
    tickets_csv.write_text(tickets_csv.read_text().replace("ticket 3:", "ticket three:"))
    with pytest.raises(BatchrunError) as refused:
        batchrun.Job.from_handle(handle)
    assert "has changed" in str(refused.value) and refused.value.exit_code == ExitCode.BAD_INPUT


def test_cancel_and_status_by_id(emu, tickets_csv, tmp_path):
    emu.config = EmulatorConfig(**{**FAST, "processing_seconds": 60.0})
    keys = job_keys(tickets_csv, tmp_path)
    with batchrun.Job(keys) as job:
        job.submit()
        assert job.poll() is False                             # in flight for a minute
        job_id = job.id
    result = batchrun.cancel(job_id[:10], state=keys["state"], wait=10.0)
    # a row may have run in the moment before its batch's cancel landed (a slow machine): it stays succeeded
    assert result.batches_canceled == 3 and set(result.counts) <= {"canceled", "succeeded"}
    assert sum(result.counts.values()) == 450 and result.counts["canceled"] >= 400
    assert batchrun.status(keys["state"], job=job_id[:10])["state"] == "canceled"


# ---- run_table: Arrow-compatible tables in, the same kind out ----------------------------------------

def _table():
    return pa.table({"review": ["good", "bad", "meh", "fine"], "n": [1, 2, 3, 4]})


def _check(rows):
    assert [r["n"] for r in rows] == [1, 2, 3, 4]
    assert [r["text"].startswith(f"Reply to: Sentiment of: {r['review']}") for r in rows] == [True] * 4
    assert {r["status"] for r in rows} == {"succeeded"}


def test_run_table_pyarrow_and_arrow_c_stream(emu, tmp_path):
    kw = dict(prompt="Sentiment of: {{ review }}", model=MODEL, max_tokens=50, poll_interval=0.05,
              state=str(tmp_path / "s.sqlite"))
    out = batchrun.run_table(_table(), **kw)
    assert isinstance(out, pa.Table)
    _check(out.to_pylist())
    assert out.schema.metadata[b"batchrun.job_id"]

    class Stream:   # anything that speaks the Arrow C stream interface (a DuckDB relation, say)
        def __init__(self, table):
            self.table = table

        def __arrow_c_stream__(self, requested_schema=None):
            return self.table.__arrow_c_stream__(requested_schema)

    again = batchrun.run_table(Stream(_table()), **kw)
    assert isinstance(again, pa.Table) and again.column("text") == out.column("text")
    assert emu.stats.batches_created == 1                       # the same rows: answers reused, nothing sent


def test_run_table_polars(emu, tmp_path):
    pl = pytest.importorskip("polars")
    frame = pl.from_arrow(_table())
    out = batchrun.run_table(frame, prompt="Sentiment of: {{ review }}", model=MODEL, max_tokens=50,
                             poll_interval=0.05, state=str(tmp_path / "s.sqlite"))
    assert isinstance(out, pl.DataFrame)
    _check(out.to_dicts())


def test_run_table_refuses_what_is_not_a_table(emu, tmp_path):
    with pytest.raises(BatchrunError) as refused:
        batchrun.run_table([1, 2, 3], prompt="x {{ a }}", model=MODEL, max_tokens=5, state=str(tmp_path / "s"))
    assert "is not a table" in str(refused.value)
    assert emu.stats.create_calls == 0
