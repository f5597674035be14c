"""Issue 4: faults, crashes, locks, cancel and secrets — every row once, nothing paid twice."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchrun.errors import ExitCode
from tests.conftest import PROMPT, render

KEY = "sk-ant-test-0123456789"
CLI = [sys.executable, "-c", "from batchrun.cli import main; main()"]


def args(inp, out, state, *extra):
    return ["run", "--input", str(inp), "--output", str(out), "--state", str(state), "--id-column", "ticket_id",
            "--prompt", PROMPT, "--model", "claude-haiku-4-5", "--max-tokens", "200", "--batch-size", "100",
            "--poll-interval", "0.1", *extra]


def spawn(emu, argv, failpoint=None):
    env = {**os.environ, "ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": emu.base_url}
    env.pop("BATCHRUN_FAILPOINT", None)
    if failpoint:
        env["BATCHRUN_FAILPOINT"] = failpoint
    return subprocess.Popen(CLI + argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_complete(out, source_csv, emu):
    import pyarrow.csv as pacsv
    src = pacsv.read_csv(source_csv, parse_options=pacsv.ParseOptions(newlines_in_values=True)).to_pylist()
    rows = pq.read_table(out).to_pylist()
    assert [r["ticket_id"] for r in rows] == [s["ticket_id"] for s in src]       # every row, once, in order
    for r, s in zip(rows, src):
        assert r["status"] == "succeeded", (r["ticket_id"], r["status"], r["error_message"])
        assert r["text"].startswith("Reply to: " + render(s)[:120])
    # nothing paid twice: no request got more than one billed (succeeded) result from the API
    assert max(emu.stats.billed.values()) == 1


def test_transient_faults_errored_expired_and_cut_downloads(emu, cli, tmp_path, tickets_csv):
    emu.config.fault_rate = 0.2
    emu.config.errored_rate = 0.1
    emu.config.expired_rate = 0.05
    emu.config.truncate_rate = 0.5
    out = tmp_path / "o.parquet"
    r = cli(*args(tickets_csv, out, tmp_path / "s.sqlite", "--max-attempts", "6"))
    assert r.exit_code == 0, r.output
    assert emu.stats.batches_created >= 5                                    # 450 rows / 100, plus retries
    assert_complete(out, tickets_csv, emu)
    rows = pq.read_table(out).to_pylist()
    assert any(row["attempts"] > 1 for row in rows)                         # some rows were retried


def test_lost_create_reply_is_adopted_not_resent(emu, cli, tmp_path, tickets_csv):
    emu.config.drop_after_create = 1
    out = tmp_path / "o.parquet"
    r = cli(*args(tickets_csv, out, tmp_path / "s.sqlite"))
    assert r.exit_code == 0, r.output
    assert emu.stats.batches_created == 5                                    # not 6: the lost one was adopted
    assert max(emu.stats.submitted_custom_ids.values()) == 1
    assert_complete(out, tickets_csv, emu)


@pytest.mark.parametrize("failpoint", ["plan", "after_intent", "after_create", "after_create:3",
                                       "result_line:50", "before_rename"])
def test_kill_at_each_window_then_rerun(emu, tmp_path, tickets_csv, failpoint):
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    p = spawn(emu, args(tickets_csv, out, state), failpoint=failpoint)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    p = spawn(emu, args(tickets_csv, out, state))
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert_complete(out, tickets_csv, emu)
    assert max(emu.stats.submitted_custom_ids.values()) == 1                # no fault injected: sent once
    assert pq.read_table(out).num_rows == 450                                  # the output is whole
    assert not list(tmp_path.glob("*.tmp-*"))                                 # no temp file left behind


def test_six_random_kills_then_one_run(emu, tmp_path, tickets_csv):
    emu.config.processing_seconds = 0.3
    emu.config.fault_rate = 0.05
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    rnd = random.Random(1234)
    for _ in range(6):
        p = spawn(emu, args(tickets_csv, out, state))
        time.sleep(rnd.uniform(0.2, 1.5))
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
    p = spawn(emu, args(tickets_csv, out, state, "--max-attempts", "6"))
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert_complete(out, tickets_csv, emu)


def test_two_runs_of_one_job_at_once(emu, tmp_path, tickets_csv):
    emu.config.processing_seconds = 1.5
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    first = spawn(emu, args(tickets_csv, out, state))
    time.sleep(0.8)
    second = spawn(emu, args(tickets_csv, out, state))
    _, err2 = second.communicate(timeout=30)
    assert second.returncode == ExitCode.LOCKED, err2
    assert "another batchrun run holds this job" in err2 and "Traceback" not in err2
    _, err1 = first.communicate(timeout=60)
    assert first.returncode == 0, err1
    assert_complete(out, tickets_csv, emu)


def test_cancel_then_resume(emu, cli, tmp_path, tickets_csv):
    emu.config.processing_seconds = 30
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    r = cli(*args(tickets_csv, out, state, "--no-wait"))
    assert r.exit_code == ExitCode.IN_PROGRESS
    r = cli("cancel", "--input", tickets_csv, "--output", out, "--state", state, "--prompt", PROMPT,
            "--model", "claude-haiku-4-5", "--id-column", "ticket_id", "--max-tokens", "200")
    assert r.exit_code == 0, r.output
    r = cli(*args(tickets_csv, out, state))
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 450 and {row["status"] for row in rows} == {"canceled"}
    emu.config.processing_seconds = 0.05
    r = cli(*args(tickets_csv, out, state, "--resume-canceled"))
    assert r.exit_code == 0, r.output
    assert {row["status"] for row in pq.read_table(out).to_pylist()} == {"succeeded"}


def test_key_is_written_nowhere_and_state_is_private(emu, cli, tmp_path, tickets_csv):
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    r = cli(*args(tickets_csv, out, state, "-v"))
    assert r.exit_code == 0
    assert KEY not in r.output
    assert (state.stat().st_mode & 0o777) == 0o600
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_batch_the_api_forgot_is_sent_again(emu, cli, tmp_path, tickets_csv):
    emu.config.processing_seconds = 30
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    assert cli(*args(tickets_csv, out, state, "--no-wait")).exit_code == ExitCode.IN_PROGRESS
    emu.reset()                                   # the API no longer knows those batches (404)
    emu.config.processing_seconds = 0.05
    r = cli(*args(tickets_csv, out, state))
    assert r.exit_code == 0, r.output
    assert "no longer exists" in r.output
    assert len(pq.read_table(out)) == 450


def test_results_gone_are_told_apart(emu, cli, tmp_path, tickets_csv):
    emu.config.processing_seconds = 0.3
    emu.config.archive_after_seconds = 0.5
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    assert cli(*args(tickets_csv, out, state, "--no-wait")).exit_code == ExitCode.IN_PROGRESS
    time.sleep(0.8)
    r = cli(*args(tickets_csv, out, state))
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    rows = pq.read_table(out).to_pylist()
    assert {row["error_type"] for row in rows} == {"results_gone"}
    assert "29 days" in rows[0]["error_message"]


def _bigger(tickets_csv, tmp_path):
    import csv
    rows = list(csv.DictReader(open(tickets_csv, encoding="utf-8", newline="")))
    rows += [{"ticket_id": f"N-{i}", "customer": "Zoë", "priority": "2", "body": f"new ticket {i}"} for i in range(20)]
    path = tmp_path / "bigger.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_a_second_job_waits_for_a_running_job_that_has_its_rows_in_flight(emu, cli, tmp_path, tickets_csv):
    emu.config.processing_seconds = 1.5
    state = tmp_path / "s.sqlite"
    first = spawn(emu, args(tickets_csv, tmp_path / "a.parquet", state))
    deadline = time.time() + 20
    while emu.stats.batches_created < 5 and time.time() < deadline:
        time.sleep(0.05)
    r = cli(*args(_bigger(tickets_csv, tmp_path), tmp_path / "b.parquet", state))
    assert r.exit_code == 0, r.output
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert emu.stats.requests_created == 470                  # the 450 shared rows were sent once
    assert len(pq.read_table(tmp_path / "b.parquet")) == 470


def test_rows_in_flight_in_a_dead_job_do_not_make_another_job_hang(emu, cli, tmp_path, tickets_csv):
    emu.config.processing_seconds = 30
    state = tmp_path / "s.sqlite"
    assert cli(*args(tickets_csv, tmp_path / "a.parquet", state, "--no-wait")).exit_code == ExitCode.IN_PROGRESS
    emu.config.processing_seconds = 0.05
    r = cli(*args(_bigger(tickets_csv, tmp_path), tmp_path / "b.parquet", state))   # nobody runs the first job
    assert r.exit_code == 0, r.output
    assert len(pq.read_table(tmp_path / "b.parquet")) == 470


def test_an_api_that_stays_down_gives_up_in_bounded_time_and_resumes(emu, tmp_path, tickets_csv):
    import batchrun
    from batchrun.api import RetryPolicy
    from batchrun.errors import GaveUpError
    from batchrun.runner import Runner
    spec = batchrun.JobSpec.from_mapping({"input": str(tickets_csv), "output": str(tmp_path / "o.parquet"),
                                          "id_column": "ticket_id", "prompt": PROMPT, "model": "claude-haiku-4-5",
                                          "max_tokens": 100, "poll_interval": 0.1})
    emu.config.fault_rate = 1.0
    runner = Runner(spec, api_key=KEY, base_url=emu.base_url, retry=RetryPolicy(max_retries=2, max_elapsed=3))
    started = time.monotonic()
    with pytest.raises(GaveUpError) as failure:
        runner.run()
    runner.close()
    assert time.monotonic() - started < 20
    assert "v1/messages/batches" in str(failure.value) and KEY not in str(failure.value)
    emu.config.fault_rate = 0.0
    result = batchrun.run(spec, api_key=KEY, base_url=emu.base_url)
    assert result.exit_code == 0 and result.counts == {"succeeded": 450}


def test_probing_another_jobs_lock_keeps_our_own(tmp_path):
    from batchrun.errors import LockedError
    from batchrun.store import JobLock
    state = str(tmp_path / "s.sqlite")
    ours = JobLock(state, "a" * 64)
    ours.acquire()
    assert not JobLock(state, "b" * 64).held_elsewhere()      # probe (open + close) another job's lock
    with pytest.raises(LockedError):                          # ours is still held
        JobLock(state, "a" * 64).acquire()
    ours.release()
    JobLock(state, "a" * 64).acquire()
