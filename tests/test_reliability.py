"""Issue 4: faults, crashes, locks, cancel and secrets — every row once, nothing paid twice."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict

import pyarrow.parquet as pq
import pytest

from batchrun.errors import ExitCode
from tests.conftest import PROMPT, render, row_id

KEY = "sk-ant-test-0123456789"
CLI = [sys.executable, "-c", "from batchrun.cli import main; main()"]


def args(inp, out, state, *extra):
    return ["run", "--input", str(inp), "--output", str(out), "--state", str(state), "--id-column", "ticket_id",
            "--prompt", PROMPT, "--model", "claude-haiku-4-5", "--max-tokens", "200", "--batch-size", "100",
            "--poll-interval", "0.1", *extra]


_spawned: list = []


@pytest.fixture(autouse=True)
def no_stray_runs():
    """A run left behind by a failed test is killed, not left to poll an emulator that has gone."""
    yield
    while _spawned:
        p = _spawned.pop()
        if p.poll() is None:
            p.kill()
            p.communicate()


# how long a run waits for the batch of a create that a killed run left behind before sending its rows
# again (60 s by default): the emulator creates a batch the moment its body is in, and the next run is
# started after the kill, so the create of a killed run has landed before that run starts looking. (A test
# whose emulator takes its time over a create, create_delay, passes a grace longer than that delay.)
GRACE = "1"


def spawn(emu, argv, failpoint=None, pause=None, grace=GRACE):
    env = {**os.environ, "ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": emu.base_url, "BATCHRUN_CREATE_GRACE": grace}
    env.pop("BATCHRUN_FAILPOINT", None)
    env.pop("BATCHRUN_PAUSE", None)
    if failpoint:
        env["BATCHRUN_FAILPOINT"] = failpoint
    if pause:
        env["BATCHRUN_PAUSE"] = pause
    p = subprocess.Popen(CLI + argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _spawned.append(p)
    return p


def assert_complete(out, source_csv, emu):
    import pyarrow.csv as pacsv
    src = pacsv.read_csv(source_csv, parse_options=pacsv.ParseOptions(newlines_in_values=True)).to_pylist()
    rows = pq.read_table(out).to_pylist()
    assert [r["ticket_id"] for r in rows] == [s["ticket_id"] for s in src]       # every row, once, in order
    for r, s in zip(rows, src):
        assert r["status"] == "succeeded", (r["ticket_id"], r["status"], r["error_message"])
        assert r["text"].startswith("Reply to: " + render(s)[:120])
    assert_sent_as_attempts(emu, rows)


def sent_copies(emu) -> dict:
    """custom_id -> [(params hash, result type or None while its batch has not ended)], one per time the
    emulator accepted the request in a batch, oldest first: every batch, read by anyone or not."""
    copies: dict = defaultdict(list)
    for batch_id, items in emu.stats.accepted.items():
        ends = emu.stats.outcomes.get(batch_id) or [None] * len(items)
        for (custom_id, params_hash), end in zip(items, ends):
            copies[row_id(custom_id)].append((params_hash, end))
    return copies


def assert_sent_as_attempts(emu, rows):
    """Nothing paid twice: each row's request was accepted by the API exactly as many times as the row's
    attempts, and each copy but the last ended failed (a retry follows a failed result, never a lost one)."""
    copies = sent_copies(emu)
    assert set(copies) == {r["custom_id"] for r in rows if r["attempts"]}
    for r in rows:
        sent = copies.get(r["custom_id"], [])
        assert len(sent) == r["attempts"], (r["custom_id"], r["attempts"], sent)
        if not sent:
            continue
        assert len({h for h, _ in sent}) == 1, (r["custom_id"], sent)           # one request per row
        assert all(end not in (None, "succeeded") for _, end in sent[:-1]), (r["custom_id"], sent)
        if r["status"] == "succeeded":
            assert sent[-1][1] == "succeeded", (r["custom_id"], sent)


def test_transient_faults_errored_expired_and_cut_downloads(emu, cli, tmp_path, tickets_csv, quick_backoff):
    emu.config.fault_rate = 0.3   # (~40 API calls: a dozen faults, their kinds in turn, so every kind is met)
    emu.config.errored_rate = 0.1
    emu.config.expired_rate = 0.05
    emu.config.truncate_rate = 0.5
    out = tmp_path / "o.parquet"
    r = cli(*args(tickets_csv, out, tmp_path / "s.sqlite", "--max-attempts", "6"))
    assert r.exit_code == 0, r.output
    assert emu.stats.batches_created >= 5                                    # 450 rows / 100, plus retries
    faults = emu.stats.faults
    assert all(faults[k] for k in ("429", "500", "529", "drop")) and faults["truncate_drop"] + faults["truncate_short"]
    assert_complete(out, tickets_csv, emu)
    # the attempts column tells the faults: each row was sent once more for every failed result it got
    rows = pq.read_table(out).to_pylist()
    failed = [end for sent in sent_copies(emu).values() for _, end in sent if end != "succeeded"]
    assert set(failed) == {"errored", "expired"}
    assert sum(row["attempts"] - 1 for row in rows) == len(failed)
    assert 1 < max(row["attempts"] for row in rows) <= 6


def test_invalid_request_results_are_final(emu, cli, tmp_path, tickets_csv):
    emu.config.errored_rate = 0.2
    emu.config.errored_types = ("invalid_request_error",)
    out = tmp_path / "o.parquet"
    r = cli(*args(tickets_csv, out, tmp_path / "s.sqlite"))
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    rows = pq.read_table(out).to_pylist()
    failed = [row for row in rows if row["status"] != "succeeded"]
    assert 40 < len(failed) < 140
    assert {(row["status"], row["error_type"], row["attempts"]) for row in failed} == {
        ("errored", "invalid_request_error", 1)}                       # never sent again
    assert {row["attempts"] for row in rows} == {1}
    assert_sent_as_attempts(emu, rows)
    assert "invalid request" in r.output                                # the failures by cause


def test_default_max_attempts_caps_retries(emu, cli, tmp_path, tickets_csv):
    # every result fails, transiently (expired: errored results of the service's own errors, such as
    # overloaded_error and api_error, never use an attempt since issue #14 item 10 / #19)
    emu.config.expired_rate = 1.0
    out = tmp_path / "o.parquet"
    r = cli(*args(tickets_csv, out, tmp_path / "s.sqlite", "--limit", "60", "--batch-size", "20"))
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 60 and {row["attempts"] for row in rows} == {3}
    assert {row["status"] for row in rows} <= {"errored", "expired"}
    assert {row["error_type"] for row in rows if row["status"] == "errored"} <= {"overloaded_error", "api_error"}
    assert_sent_as_attempts(emu, rows)                                  # each request accepted 3 times, no more
    assert emu.stats.requests_created == 180


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


def progress(state) -> int:
    """How far the job in a state file has come: rows sent at least once plus rows final (0 … 2 × rows)."""
    if not os.path.exists(state):
        return 0
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("SELECT count(*) FILTER (WHERE attempts > 0) + count(*) FILTER (WHERE state NOT IN "
                          "('pending', 'in_flight')) FROM requests").fetchone()[0]
    except sqlite3.OperationalError:   # no tables yet
        return 0
    finally:
        db.close()


def test_six_random_kills_then_one_run(emu, tmp_path, tickets_csv):
    # 15 batches of 30 rows, each in progress for 0.4 s, under faults and cut downloads. While the six runs
    # are killed, most results fail (errored or expired) and go back for another attempt, so each run has
    # work left whatever it got done: a run can end only after a round with no failed result, and every
    # round takes 0.4 s, more than the longest delay before a kill. Each run is killed at a random moment
    # (seeded) once it has moved the job on (state file): while it creates, polls, downloads and records.
    emu.config.processing_seconds = 0.4
    emu.config.fault_rate = 0.05
    emu.config.errored_rate = 0.4
    emu.config.expired_rate = 0.2
    emu.config.truncate_rate = 0.2
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    run = args(tickets_csv, out, state, "--batch-size", "30", "--max-attempts", "20")
    rnd = random.Random(1234)
    for _ in range(6):
        before = progress(state)
        p = spawn(emu, run)
        deadline = time.monotonic() + 60
        while progress(state) <= before and p.poll() is None:   # wait until this run is at work
            assert time.monotonic() < deadline, "the run made no progress in 60 s"
            time.sleep(0.01)
        time.sleep(0.3 * rnd.random() ** 2)                     # most of a run's work is early on
        assert p.poll() is None, f"the run ended before its kill: {p.communicate()[1]}"
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
        assert p.returncode == -signal.SIGKILL
        assert progress(state) < 900                             # work remained (of 450 sends + 450 final rows)
    emu.config.errored_rate = emu.config.expired_rate = emu.config.truncate_rate = 0.0   # then let it finish
    p = spawn(emu, run)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert_complete(out, tickets_csv, emu)


def paused(emu, argv, gate, point="after_create"):
    """A run spawned to stop at `point` (holding the job's lock) until the file `gate` exists."""
    p = spawn(emu, argv, pause=f"{point}={gate}")
    deadline = time.monotonic() + 60
    while not os.path.exists(f"{gate}.paused"):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1]
        time.sleep(0.01)
    return p


def test_two_runs_of_one_job_at_once(emu, tmp_path, tickets_csv):
    out, state, gate = tmp_path / "o.parquet", tmp_path / "s.sqlite", tmp_path / "gate"
    first = paused(emu, args(tickets_csv, out, state), gate)       # holds the lock, one batch created
    second = spawn(emu, args(tickets_csv, out, state))
    _, err2 = second.communicate(timeout=60)
    assert second.returncode == ExitCode.LOCKED, err2
    assert "another batchrun run holds this job" in err2 and "Traceback" not in err2
    assert emu.stats.batches_created == 1                          # the second sent nothing
    gate.touch()
    _, err1 = first.communicate(timeout=60)
    assert first.returncode == 0, err1
    assert_complete(out, tickets_csv, emu)


def test_wait_lock_queues_behind_the_run_then_finds_the_job_done(emu, tmp_path, tickets_csv):
    out, state, gate = tmp_path / "o.parquet", tmp_path / "s.sqlite", tmp_path / "gate"
    first = paused(emu, args(tickets_csv, out, state), gate)
    second = spawn(emu, args(tickets_csv, out, state, "--wait-lock"))
    waiting = ""
    while "waiting for it to finish" not in waiting:                 # it logs that it waits, then blocks
        line = second.stderr.readline()
        assert line, f"the second run ended without waiting: {waiting}"
        waiting += line
    assert second.poll() is None and emu.stats.batches_created == 1
    gate.touch()
    _, err1 = first.communicate(timeout=60)
    assert first.returncode == 0, err1
    accepted = dict(emu.stats.accepted)
    _, err2 = second.communicate(timeout=60)
    assert second.returncode == 0, waiting + err2
    assert "450 succeeded" in err2
    assert emu.stats.accepted == accepted                          # the second sent nothing again
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
    assert len(rows) == 450 and {row["status"] for row in rows} <= {"canceled", "succeeded"}
    assert sum(row["status"] == "canceled" for row in rows) > 400         # 1 s of a batch's 30 s had run
    emu.config.processing_seconds = 0.05
    r = cli(*args(tickets_csv, out, state, "--resume-canceled"))
    assert r.exit_code == 0, r.output
    assert_complete(out, tickets_csv, emu)


def job_status(cli, state, job=None) -> dict:
    r = cli("status", *([job] if job else []), "--state", state, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.output) if job else json.loads(r.output)[0]


def test_cancel_by_job_id_needs_no_input_and_records_what_ended(emu, cli, tmp_path, tickets_csv):
    emu.config.processing_seconds = 30
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    assert cli(*args(tickets_csv, out, state, "--no-wait")).exit_code == ExitCode.IN_PROGRESS
    job = job_status(cli, state)["job_id"]
    moved = tickets_csv.rename(tmp_path / "elsewhere.csv")             # cancel by id reads no input
    r = cli("cancel", job[:12], "--state", state)
    assert r.exit_code == 0, r.output
    assert f"job {job[:12]}: canceled 5 batch(es) in flight" in r.output
    st = job_status(cli, state, job[:12])
    ran = sum(end == "succeeded" for ends in emu.stats.outcomes.values() for end in ends)
    assert len(emu.stats.outcomes) == 5                                 # every batch ended, its results read
    assert st["canceled"] and st["counts"]["in_flight"] == st["counts"]["pending"] == 0
    assert st["counts"]["canceled"] == 450 - ran and st["counts"]["succeeded"] == ran
    assert {b["api_status"] for b in st["batches"]} == {"ended"}
    text = cli("status", "--state", state).output
    assert "canceled" in text and "in flight" not in text
    moved.rename(tickets_csv)
    accepted = dict(emu.stats.accepted)
    r = cli(*args(tickets_csv, out, state))                             # writes the output, sends nothing
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    assert emu.stats.accepted == accepted
    rows = pq.read_table(out).to_pylist()
    assert sum(row["status"] == "canceled" for row in rows) == 450 - ran
    assert_sent_as_attempts(emu, rows)
    emu.config.processing_seconds = 0.05
    assert cli(*args(tickets_csv, out, state, "--resume-canceled")).exit_code == 0
    assert_complete(out, tickets_csv, emu)


def test_cancel_no_wait_then_rows_that_would_be_retried_end_canceled(emu, cli, tmp_path, tickets_csv):
    emu.config.processing_seconds = 1.0
    emu.config.errored_rate = 1.0                                       # every request that runs fails
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    assert cli(*args(tickets_csv, out, state, "--no-wait")).exit_code == ExitCode.IN_PROGRESS
    time.sleep(0.5)                                                     # half of each batch has run
    r = cli("cancel", job_status(cli, state)["job_id"][:12], "--state", state, "--no-wait")
    assert r.exit_code == 0, r.output
    assert "have not ended yet" in r.output
    assert job_status(cli, state)["counts"]["in_flight"] == 450
    p = spawn(emu, args(tickets_csv, out, state))                       # collects; sends nothing more
    _, err = p.communicate(timeout=60)
    assert p.returncode == ExitCode.FAILED_ROWS, err
    rows = pq.read_table(out).to_pylist()
    assert {row["status"] for row in rows} == {"canceled"} and {row["attempts"] for row in rows} == {1}
    again = [row for row in rows if "before it was sent again" in row["error_message"]]
    assert 100 < len(again) < 350                                       # the half that ran and failed
    assert_sent_as_attempts(emu, rows)


def test_cancel_by_id_records_structured_replies_as_a_run_would(emu, cli, tmp_path, tickets_csv):
    emu.config.processing_seconds = 0.2
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    labeled = args(tickets_csv, out, state, "--labels", "billing,bug,other", "--limit", "40")
    assert cli(*labeled, "--no-wait").exit_code == ExitCode.IN_PROGRESS
    time.sleep(0.4)                                                     # the batch ended before the cancel
    r = cli("cancel", job_status(cli, state)["job_id"][:12], "--state", state)
    assert r.exit_code == 0 and "rows: 40 succeeded" in r.output, r.output
    assert cli(*labeled).exit_code == 0
    assert {row["label"] in ("billing", "bug", "other") for row in pq.read_table(out).to_pylist()} == {True}


def test_cancel_refuses_while_a_run_holds_the_job(emu, cli, tmp_path, tickets_csv):
    out, state, gate = tmp_path / "o.parquet", tmp_path / "s.sqlite", tmp_path / "gate"
    first = paused(emu, args(tickets_csv, out, state), gate)
    r = cli("cancel", job_status(cli, state)["job_id"][:12], "--state", state)
    assert r.exit_code == ExitCode.LOCKED and "stop that run" in r.output, r.output
    gate.touch()
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert_complete(out, tickets_csv, emu)


def test_cancel_refusals_are_one_line(emu, cli, tmp_path, tickets_csv):
    state = tmp_path / "s.sqlite"
    assert cli(*args(tickets_csv, tmp_path / "o.parquet", state)).exit_code == 0
    job = job_status(cli, state)["job_id"]
    for argv, message in [
        ((job[:8], "--state", state, "--model", "claude-opus-4-5"), "--model: '" + job[:8] + "' names a stored job"),
        (("nosuchjob", "--state", state), "no job 'nosuchjob'"),
        ((job[:8], "--state", tmp_path / "none.sqlite"), "no state file"),
        (("missing.toml", "--state", state), "missing.toml: job file not found"),
        ((job[:8], "--state", state, "--emulator"), "No such option"),
    ]:
        r = cli("cancel", *argv)
        assert r.exit_code == ExitCode.BAD_INPUT and message in r.output, (argv, r.output)
        assert "Traceback" not in r.output
    assert not (tmp_path / "none.sqlite").exists()


def test_key_is_written_nowhere_and_state_is_private(emu, cli, tmp_path, tickets_csv):
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    r = cli(*args(tickets_csv, out, state, "-v"))
    assert r.exit_code == 0
    assert KEY not in r.output
    assert (state.stat().st_mode & 0o777) == 0o600
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_batch_the_api_forgot_is_sent_again_only_when_asked(emu, cli, tmp_path, tickets_csv):
    """A batch the API answers 404 for (deleted, or a key of another workspace) may have run and been
    paid: its rows end errored, saying so, and are sent again only with --resend-lost."""
    emu.config.processing_seconds = 30
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    assert cli(*args(tickets_csv, out, state, "--no-wait")).exit_code == ExitCode.IN_PROGRESS
    emu.reset()                                   # the API no longer knows those batches (404)
    emu.config.processing_seconds = 0.05
    r = cli(*args(tickets_csv, out, state))
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    assert "not found at the API (404)" in r.output and emu.stats.batches_created == 0
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 450 and {row["error_type"] for row in rows} == {"batch_not_found"}
    assert "--resend-lost" in rows[0]["error_message"]
    r = cli(*args(tickets_csv, out, state, "--resend-lost"))
    assert r.exit_code == 0, r.output
    assert emu.stats.requests_created == 450
    assert {row["status"] for row in pq.read_table(out).to_pylist()} == {"succeeded"}


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


def test_rows_in_flight_in_a_job_nobody_runs_are_collected_not_paid_twice(emu, cli, tmp_path, tickets_csv):
    """The first job was advanced by a --no-wait run that exited with its batches in flight; a second job
    sharing its 450 requests moves the first job's batches forward itself (under that job's lock) and
    reuses their answers: it sends only its 20 own rows, and never hangs on a job nobody runs."""
    emu.config.processing_seconds = 1.0
    state = tmp_path / "s.sqlite"
    assert cli(*args(tickets_csv, tmp_path / "a.parquet", state, "--no-wait")).exit_code == ExitCode.IN_PROGRESS
    assert emu.stats.requests_created == 450
    r = cli(*args(_bigger(tickets_csv, tmp_path), tmp_path / "b.parquet", state))   # nobody runs the first job
    assert r.exit_code == 0, r.output
    assert emu.stats.requests_created == 470                  # the 450 shared rows were sent once
    rows = pq.read_table(tmp_path / "b.parquet").to_pylist()
    assert len(rows) == 470 and {r["status"] for r in rows} == {"succeeded"}
    assert sum(1 for r in rows if r["cost_usd"] == 0.0) == 450   # answered by the first job's batches
    # the first job's batches were collected on its behalf: its next run sends nothing and finishes
    r = cli(*args(tickets_csv, tmp_path / "a.parquet", state))
    assert r.exit_code == 0, r.output
    assert emu.stats.requests_created == 470 and len(pq.read_table(tmp_path / "a.parquet")) == 450


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
