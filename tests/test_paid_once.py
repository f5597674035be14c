"""Issue 14 (4, 5, 6, 8): a create cut off by a kill, another job's batch of the same size, two jobs
sharing requests started together, a result line that never arrives — nothing paid twice, no row
answered from another job's batch, nothing stuck."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import threading
import time

import httpx
import pyarrow.parquet as pq

import batchrun
from batchrun.errors import ExitCode
from tests.conftest import row_id
from tests.test_reliability import args, assert_complete, sent_copies, spawn

MODEL = "claude-haiku-4-5"


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


# ---- 4. kill -9 inside a slow create, then an immediate restart ---------------------------------------
# the grace these runs give a killed run's create: longer than the emulator's create_delay below, so
# that a create cut off by a kill lands within it even on a busy machine
SLOW_CREATE_GRACE = "3"


def queued(emu, argv):
    """A run of the job queued on its lock (--wait-lock): it goes on the moment the run holding the lock
    dies, an immediate restart with nothing left to start up."""
    p = spawn(emu, argv + ["--wait-lock"], grace=SLOW_CREATE_GRACE)
    waiting = ""
    while "waiting for it to finish" not in waiting:
        line = p.stderr.readline()
        assert line, f"the queued run ended without waiting: {waiting}"
        waiting += line
    return p


def planned(state) -> bool:
    try:
        db = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=5)
        try:
            return bool(db.execute("SELECT count(*) FROM jobs WHERE planned_at IS NOT NULL").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return False


def test_a_run_killed_inside_a_create_restarts_at_once_and_adopts_the_batch(emu, tmp_path, tickets_csv):
    """The create's body is in and the API takes a second to accept it; the run is killed meanwhile
    and the next run goes on at once. The batch shows only after that run first looked: it is waited
    for and adopted, never sent again."""
    emu.config.create_delay = 1.0
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    run = args(tickets_csv, out, state)
    p = spawn(emu, run, grace=SLOW_CREATE_GRACE)
    wait_for(lambda: planned(state))
    q = queued(emu, run)
    calls = emu.stats.create_calls
    wait_for(lambda: emu.stats.create_calls > calls)         # a create's body is in
    time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    landed = emu.stats.batches_created
    emu.config.create_delay = 0.05   # the cut-off create still takes its second; the next run's own creates need not
    _, err = q.communicate(timeout=60)
    assert q.returncode == 0, err
    assert "died while creating" in err and "adopted batch" in err
    assert landed == calls                                   # the cut-off create had not landed at the kill
    assert emu.stats.requests_created == 450                # it counted once, not sent again
    assert_complete(out, tickets_csv, emu)


def test_random_kills_inside_slow_creates_each_restarted_at_once(emu, tmp_path, tickets_csv):
    """Three runs in a row are each killed at a random moment inside one of their creates (every create
    takes 0.4 s once its body is in), another run queued on the job's lock going on at once; the last
    one finishes. Every row comes back once, and the API accepted each request once."""
    emu.config.create_delay = 0.4
    emu.config.truncate_rate = 0.2
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    run = args(tickets_csv, out, state, "--batch-size", "50")
    rnd = random.Random(2026)
    gate = tmp_path / "gate"
    holder = spawn(emu, run, pause=f"after_intent={gate}", grace=SLOW_CREATE_GRACE)   # holds the lock until
    wait_for(lambda: os.path.exists(f"{gate}.paused"))                                 # the others queue on it
    waiters = [spawn(emu, run + ["--wait-lock"], grace=SLOW_CREATE_GRACE) for _ in range(3)]
    logs: dict = {p: [] for p in [holder, *waiters]}

    def read(p):
        for line in p.stderr:
            logs[p].append(line)
    threads = [threading.Thread(target=read, args=(p,), daemon=True) for p in logs]
    for t in threads:
        t.start()
    waiting = lambda p: any("waiting for it to finish" in line for line in logs[p])  # noqa: E731
    wait_for(lambda: all(waiting(p) for p in waiters))
    marks = {p: len(logs[p]) for p in waiters}                # each has logged that it waits, and no more
    gate.touch()
    for kill in range(3):
        calls = emu.stats.create_calls
        wait_for(lambda: emu.stats.create_calls > calls or holder.poll() is not None)   # inside a create
        time.sleep(0.4 * rnd.random())
        assert holder.poll() is None, "the run ended before its kill: " + "".join(logs[holder])
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        waiters = [p for p in waiters if p is not holder]
        wait_for(lambda: any(len(logs[p]) > marks[p] for p in waiters))   # the one that took the lock at once
        holder = next(p for p in waiters if len(logs[p]) > marks[p])
    emu.config.create_delay = 0.05   # the third cut-off create still takes its 0.4 s; the last run's own need not
    assert holder.wait(timeout=120) == 0, "".join(logs[holder])
    for t in threads:
        t.join(timeout=10)
    assert_complete(out, tickets_csv, emu)
    assert max(emu.stats.params_submitted.values()) == 1
    assert sum("died while creating" in "".join(lines) for lines in logs.values()) == 3


# ---- 5. adoption only when the batch is provably this job's ---------------------------------------------
def _table(tmp_path, n=30, id_len=None):
    csv = tmp_path / "in.csv"
    if id_len is None:
        csv.write_text("body\n" + "".join(f"row {i}\n" for i in range(n)))
    else:
        csv.write_text("id,body\n" + "".join(f"{str(i).rjust(id_len, 'x')},row {i}\n" for i in range(n)))
    return csv


def _cli_run(csv, tmp_path, name, prompt, *extra):
    return ["run", "--input", str(csv), "--output", str(tmp_path / f"{name}.parquet"),
            "--state", str(tmp_path / f"{name}.sqlite"), "--prompt", prompt, "--model", MODEL, "--max-tokens", "50",
            "--batch-size", "30", "--poll-interval", "0.05", *extra]


def test_two_jobs_of_one_size_both_losing_their_create_replies_each_get_their_own_answers(emu, tmp_path):
    """Two jobs over one table (ids row-0 … row-29 in both), one state file each, started together; both
    creates reach the API and both replies are lost. Each finds two batches of its size created while
    its create was in flight, and adopts only the one its results prove its own."""
    csv = _table(tmp_path)
    emu.config.drop_after_create = 2
    emu.config.processing_seconds = 0.3
    x = spawn(emu, _cli_run(csv, tmp_path, "x", "X: {{ body }}"))
    y = spawn(emu, _cli_run(csv, tmp_path, "y", "Y: {{ body }}"))
    for p, name in ((x, "X"), (y, "Y")):
        _, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
        texts = [r["text"].split(" #")[0] for r in pq.read_table(tmp_path / f"{name.lower()}.parquet").to_pylist()]
        assert texts == [f"Reply to: {name}: row {i}" for i in range(30)], texts[:3]
        assert "adopted batch" in err
    assert emu.stats.faults["drop_after_create"] == 2
    assert emu.stats.batches_created == 2 and emu.stats.requests_created == 60   # each job's own, once


def test_long_ids_carry_the_tag_within_64_characters_and_come_back_to_their_rows(emu, cli, tmp_path):
    """Ids of 53, 54 and 64 characters (the API's limit): sent with the job's tag, within 64
    characters, and a lost reply adopted by them; the output shows the row's own id."""
    csv = tmp_path / "in.csv"
    ids = ["a" * 53, "b" * 54, "c" * 64, "short"] + [f"id-{i}" for i in range(6)]
    csv.write_text("id,body\n" + "".join(f"{v},row {i}\n" for i, v in enumerate(ids)))
    emu.config.drop_after_create = 1
    r = cli(*_cli_run(csv, tmp_path, "a", "{{ body }}", "--id-column", "id"))
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert [row["custom_id"] for row in rows] == ids
    assert [row["text"].split(" #")[0] for row in rows] == [f"Reply to: row {i}" for i in range(len(ids))]
    sent = list(emu.stats.submitted_custom_ids)
    assert len(sent) == len(ids) and all(len(c) <= 64 for c in sent)
    assert len({c[:10] for c in sent}) == 1                    # one tag, the job's
    assert {row_id(c) for c in sent if c[10] == "-"} == {"a" * 53, "short"} | set(ids[4:])


def test_ids_are_the_same_across_runs_of_a_job(emu, cli, tmp_path):
    """The tag is the job's: a later run of the job sends its retries with the same one."""
    csv = _table(tmp_path, n=20)
    emu.config.processing_seconds = 0.3
    r = cli(*_cli_run(csv, tmp_path, "a", "{{ body }}", "--batch-size", "10", "--no-wait"))
    assert r.exit_code == ExitCode.IN_PROGRESS, r.output
    first = set(emu.stats.submitted_custom_ids)
    emu.config.errored_rate = 0.5                           # half of the rows are sent again, by the next run
    r = cli(*_cli_run(csv, tmp_path, "a", "{{ body }}", "--batch-size", "10", "--max-attempts", "20"))
    assert r.exit_code == 0, r.output
    assert len(first) == 20 and emu.stats.requests_created > 20
    assert set(emu.stats.submitted_custom_ids) == first      # the same ids, the same tag
    assert len({c[:10] for c in first}) == 1


def test_a_job_sent_before_tags_is_collected_and_continued(emu, tmp_path, tickets_csv, monkeypatch):
    """A state file of an older batchrun: a job planned and its batches sent with plain custom_ids, no
    tag. The new version collects them by those ids, and sends the rows that failed again with a tag."""
    import batchrun.batches as batches_mod   # (submit builds the custom_ids sent)
    from batchrun.store import Store
    emulator = emu
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    transport = emulator.sync_transport()
    job = {"input": str(tickets_csv), "output": str(tmp_path / "o.parquet"), "id_column": "ticket_id",
           "prompt": "{{ body }}", "model": MODEL, "max_tokens": 50, "batch_size": 100, "poll_interval": 0.05,
           "state": str(tmp_path / "s.sqlite"), "limit": 200, "max_attempts": 10}
    with monkeypatch.context() as old:   # the old version: custom_ids as planned
        old.setattr(batches_mod, "wire_id", lambda tag, cid: cid)
        first = batchrun.run(job, wait=False, api_key="k", base_url="https://gw.example", transport=transport)
    with Store(job["state"]) as store:
        store.conn.execute("UPDATE jobs SET tag = NULL")
        store.conn.execute("UPDATE batches SET tag = NULL")
        ids = [r[0] for r in store.conn.execute("SELECT custom_id FROM requests ORDER BY row_index")]
    assert first.exit_code == ExitCode.IN_PROGRESS and set(emulator.stats.submitted_custom_ids) == set(ids)
    emulator.config.errored_rate = 0.3                      # some rows of the old batches fail: sent again
    again = batchrun.run(job, api_key="k", base_url="https://gw.example", transport=transport)
    assert again.job_id == first.job_id and again.counts == {"succeeded": 200}
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert all(r["text"].startswith("Reply to: " + r["body"][:100]) for r in rows)
    retried = [c for c in emulator.stats.submitted_custom_ids if c not in ids]
    assert retried and {row_id(c) for c in retried} <= set(ids)           # sent again with the job's tag
    assert emulator.stats.requests_created == sum(r["attempts"] for r in rows)   # each attempt bought once


class LostCreate(httpx.BaseTransport):
    """A gateway that answers the first batch create with a 504 without passing it on (no batch is
    made), while another job's batch of the same size is created at the API at that very moment."""

    def __init__(self, inner: httpx.BaseTransport, foreign: bytes):
        self.inner, self.foreign, self.creates = inner, foreign, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/v1/messages/batches"):
            self.creates.append(time.time())
            if len(self.creates) == 1:
                other = httpx.Request("POST", request.url, headers=request.headers, content=self.foreign)
                self.inner.handle_request(other).read()
                return httpx.Response(504, text="gateway timeout", request=request)
        return self.inner.handle_request(request)


def test_a_running_batch_of_the_same_size_is_waited_for_and_never_adopted(emu, tmp_path, monkeypatch):
    """Our create failed ambiguously and made nothing; another job's batch of our size (the same
    row-N ids, another prompt) was created while ours was in flight and is still running. It is not
    adopted, and our rows are not sent again while it might be ours: once it ends its custom_ids show
    it is not, and after the grace our rows are sent — each row gets its own reply."""
    emulator = emu
    emulator.config.processing_seconds = 1.0
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.setenv("BATCHRUN_CREATE_GRACE", "0.3")
    csv = _table(tmp_path, n=10)
    foreign = json.dumps({"requests": [{"custom_id": f"row-{i}", "params": {
        "model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": f"OTHER: row {i}"}]}}
        for i in range(10)]}).encode()
    transport = LostCreate(emulator.sync_transport(), foreign)
    job = {"input": str(csv), "output": str(tmp_path / "o.parquet"), "prompt": "{{ body }}", "model": MODEL,
           "max_tokens": 50, "batch_size": 10, "poll_interval": 0.05, "state": str(tmp_path / "s.sqlite")}
    result = batchrun.run(job, api_key="k", base_url="https://gw.example", transport=transport)
    assert result.exit_code == 0 and result.counts == {"succeeded": 10}
    texts = [r["text"].split(" #")[0] for r in pq.read_table(tmp_path / "o.parquet").to_pylist()]
    assert texts == [f"Reply to: row {i}" for i in range(10)]
    assert len(transport.creates) == 2 and emulator.stats.batches_created == 2   # the other job's, then ours
    assert transport.creates[1] - transport.creates[0] >= 1.0   # sent again only once the other had ended


# ---- 6. two jobs sharing requests, started at the same moment on one state file -------------------------
def test_two_jobs_sharing_requests_started_together_buy_each_request_once(emu, tmp_path, tickets_csv):
    """A full run and a --limit 200 run of the same prompt over one input and one state file, started
    at the same moment, three pairs at once: each shared request is accepted by the API once per pair."""
    from tests.sharing import bought_once_per_pair, started_together
    dirs = started_together(emu, tmp_path, lambda d, state: args(tickets_csv, d / "full.parquet", state, "--batch-size", "50"),
                            lambda d, state: args(tickets_csv, d / "part.parquet", state, "--batch-size", "50",
                                                  "--limit", "200"), times=3)
    assert emu.stats.requests_created == 3 * 450                # the 200 shared ones bought once by each pair
    bought_once_per_pair(emu.stats.params_submitted, 450, 3)
    for d in dirs:
        whole = pq.read_table(d / "full.parquet").to_pylist()
        some = pq.read_table(d / "part.parquet").to_pylist()
        assert [r["text"] for r in some] == [r["text"] for r in whole[:200]]
        assert {r["status"] for r in whole + some} == {"succeeded"}


# ---- 8. a result line that never arrives -------------------------------------------------------------------
def _missing_rows(rows):
    return [r for r in rows if r["status"] != "succeeded"]


def test_a_result_line_that_never_arrives_ends_result_missing_and_the_output_is_written(emu, cli, tmp_path):
    csv = _table(tmp_path, n=20)
    emu.config.missing_result_lines = 1
    r = cli(*_cli_run(csv, tmp_path, "a", "{{ body }}"))
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    rows = pq.read_table(tmp_path / "a.parquet").to_pylist()
    missing = _missing_rows(rows)
    assert len(rows) == 20 and len(missing) == 1
    (row,) = missing
    assert (row["status"], row["error_type"], row["attempts"]) == ("errored", "result_missing", 1)
    assert "may have been paid for" in row["error_message"] and "run --resend-lost" in row["error_message"]
    assert emu.stats.results_downloads == 4                    # the first download, then 3 more that were the same
    assert emu.stats.requests_created == 20                    # not sent again on its own
    assert "result never came" in r.output                     # the failures by cause

    r = cli(*_cli_run(csv, tmp_path, "a", "{{ body }}", "--retry-errored"))   # not one of the rows it resends
    assert r.exit_code == ExitCode.FAILED_ROWS and emu.stats.requests_created == 20

    emu.config.missing_result_lines = 0                        # sent again only when asked
    r = cli(*_cli_run(csv, tmp_path, "a", "{{ body }}"))
    assert r.exit_code == ExitCode.FAILED_ROWS and emu.stats.requests_created == 20
    r = cli(*_cli_run(csv, tmp_path, "a", "{{ body }}", "--resend-lost"))
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert [x["text"].split(" #")[0] for x in rows] == [f"Reply to: row {i}" for i in range(20)]
    resent = [c for c, sent in sent_copies(emu).items() if len(sent) == 2]
    assert resent == [row["custom_id"]] and emu.stats.requests_created == 21


def test_no_wait_runs_end_a_missing_result_line_too(emu, cli, tmp_path):
    csv = _table(tmp_path, n=20)
    emu.config.missing_result_lines = 1
    codes = []
    for _ in range(6):
        r = cli(*_cli_run(csv, tmp_path, "a", "{{ body }}", "--no-wait"))
        codes.append(r.exit_code)
        if r.exit_code != ExitCode.IN_PROGRESS:
            break
        time.sleep(0.1)
    assert codes[-1] == ExitCode.FAILED_ROWS and len(codes) <= 3, codes
    rows = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert [r["error_type"] for r in _missing_rows(rows)] == ["result_missing"]
    db = sqlite3.connect(tmp_path / "a.sqlite")
    assert db.execute("SELECT count(*) FROM requests WHERE state = 'in_flight'").fetchone()[0] == 0
    db.close()
