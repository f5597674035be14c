"""Issue 14 (4, 5, 6, 8) tried as a hostile user: what a lost create waits for and how a user sees it,
a candidate whose results cannot be read any more, two messages-mode jobs sharing requests."""
from __future__ import annotations

import json
import time

import httpx
import pytest

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


class DiesInCreate(httpx.BaseTransport):
    """A run that dies inside its first create (the process killed): the create is passed on first when
    `lands`, then the run stops at once (nothing after it runs, as after a kill -9)."""

    def __init__(self, inner: httpx.BaseTransport, lands: bool):
        self.inner, self.lands, self.creates = inner, lands, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/v1/messages/batches"):
            self.creates += 1
            if self.creates == 1:
                if self.lands:
                    self.inner.handle_request(request).read()
                raise _Killed()
        return self.inner.handle_request(request)


class _Killed(BaseException):
    pass


def _old_intent(tmp_path, csv, emu, monkeypatch, lands: bool, name: str) -> dict:
    """A state file of a batchrun from before tags, with an intent in flight (its run died in its create)."""
    import batchrun.batches as batches_mod   # (submit builds the custom_ids sent)
    from batchrun.store import Store
    job = _job(tmp_path, csv, output=str(tmp_path / f"{name}.parquet"), state=str(tmp_path / f"{name}.sqlite"))
    with monkeypatch.context() as old:
        old.setattr(batches_mod, "wire_id", lambda tag, cid: cid)
        with pytest.raises(_Killed):
            batchrun.run(job, api_key="k", base_url="https://gw.example",
                         transport=DiesInCreate(emu.sync_transport(), lands))
    with Store(job["state"]) as store:
        store.conn.execute("UPDATE jobs SET tag = NULL")
        store.conn.execute("UPDATE batches SET tag = NULL")
        assert store.conn.execute("SELECT state FROM batches").fetchall() == [("intent",)]
    return job


def _own_answers(job, n=10):
    return [r["text"].split(" #")[0] for r in pq.read_table(job["output"]).to_pylist()] == \
        [f"Reply to: row {i}" for i in range(n)]


@pytest.mark.parametrize("lands", [True, False], ids=["its-own-batch-landed", "another-jobs-batch-only"])
def test_an_old_state_files_intent_in_flight_never_takes_a_batch_its_ids_cannot_prove(emu, tmp_path, monkeypatch,
                                                                                      lands):
    """A state file of a batchrun from before tags, its run killed inside a create. Meanwhile another
    job (another state file: a shard) sent a batch of the same size and the same row-N ids. Untagged,
    those ids prove nothing: no batch is adopted, no row shows another job's answer, nothing is sent
    again blindly (the rows end errored `batch_unproven`, exit 3), and `--resend-lost` sends them."""
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.setenv("BATCHRUN_CREATE_GRACE", "0.2")
    csv = _table(tmp_path, n=10)
    job = _old_intent(tmp_path, csv, emu, monkeypatch, lands=lands, name="a")
    emu.sync_transport().handle_request(httpx.Request(
        "POST", "https://gw.example/v1/messages/batches", headers={"x-api-key": "k", "anthropic-version": "2023-06-01",
                                                                    "content-type": "application/json"},
        content=_foreign(10))).read()
    before = emu.stats.requests_created
    time.sleep(0.2)
    result = batchrun.run(job, api_key="k", base_url="https://gw.example", transport=emu.sync_transport())
    rows = pq.read_table(job["output"]).to_pylist()
    assert not any("OTHER" in (r["text"] or "") for r in rows), [r["text"] for r in rows]
    assert result.exit_code == ExitCode.FAILED_ROWS and emu.stats.requests_created == before
    assert {(r["status"], r["error_type"]) for r in rows} == {("errored", "batch_unproven")}
    assert "--resend-lost" in rows[0]["error_message"]
    again = batchrun.run(job, api_key="k", base_url="https://gw.example", transport=emu.sync_transport(),
                         resend_lost=True)
    assert again.exit_code == 0 and _own_answers(job)
    assert emu.stats.requests_created == before + 10


# ---- messages mode: two jobs sharing requests, started together on one state file ---------------------------
def test_two_messages_mode_jobs_sharing_requests_started_together_buy_each_request_once(emu, tmp_path, tickets_csv):
    """A full run and a --limit 200 run in messages mode, one state file, started at the same moment,
    three times over: each shared request is bought once by each pair (the other job takes its
    answer), and each output has every row once, with its own reply."""
    from tests.sharing import bought_once_per_pair, started_together
    from tests.test_messages_mode import cli_args
    emu.config.latency = 0.01
    dirs = started_together(emu, tmp_path,
                            lambda d, state: cli_args(tickets_csv, d / "full.parquet", state, "--poll-interval", "0.1"),
                            lambda d, state: cli_args(tickets_csv, d / "part.parquet", state, "--poll-interval", "0.1",
                                                      "--limit", "200"), times=3, at_once=False)
    bought_once_per_pair(emu.stats.billed, 450, 3)
    for d in dirs:
        whole = pq.read_table(d / "full.parquet").to_pylist()
        some = pq.read_table(d / "part.parquet").to_pylist()
        assert len(whole) == 450 and [r["text"] for r in some] == [r["text"] for r in whole[:200]]
        assert {r["status"] for r in whole + some} == {"succeeded"}


def test_a_messages_job_and_a_batch_job_sharing_requests_started_together_buy_each_once(emu, tmp_path, tickets_csv):
    """The same, one job in each mode: a messages-mode full run and a batch-mode --limit 200 run."""
    from tests.sharing import bought_once_per_pair, started_together
    from tests.test_messages_mode import cli_args
    from tests.test_reliability import args
    emu.config.latency = 0.01
    dirs = started_together(emu, tmp_path,
                            lambda d, state: cli_args(tickets_csv, d / "full.parquet", state, "--poll-interval", "0.1"),
                            lambda d, state: args(tickets_csv, d / "part.parquet", state, "--limit", "200",
                                                  "--max-tokens", "100"), times=2, at_once=False)
    bought_once_per_pair(emu.stats.billed, 450, 2)
    for d in dirs:
        whole = pq.read_table(d / "full.parquet").to_pylist()
        some = pq.read_table(d / "part.parquet").to_pylist()
        assert [r["text"] for r in some] == [r["text"] for r in whole[:200]]


def test_a_killed_messages_runs_claims_hold_back_no_other_job(emu, tmp_path, tickets_csv):
    """A messages-mode run killed mid-way leaves its rows claimed; another job sharing them, started
    after, sends them (no run moves the killed job) rather than waiting for it forever."""
    import signal
    import sqlite3
    from tests.test_reliability import spawn
    from tests.test_messages_mode import cli_args
    from tests.test_paid_once import wait_for
    emu.config.latency = 0.05
    state = tmp_path / "s.sqlite"

    def answered():
        try:
            with sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=5) as db:
                return db.execute("SELECT count(*) FROM requests WHERE state = 'succeeded'").fetchone()[0] >= 20
        except sqlite3.Error:
            return False
    full = spawn(emu, cli_args(tickets_csv, tmp_path / "full.parquet", state, "--concurrency", "2"))
    wait_for(answered)
    full.send_signal(signal.SIGKILL)
    full.wait(timeout=30)
    emu.config.latency = 0.0
    part = spawn(emu, cli_args(tickets_csv, tmp_path / "part.parquet", state, "--limit", "200",
                               "--poll-interval", "0.1"))
    _, err = part.communicate(timeout=60)
    assert part.returncode == 0, err
    assert len(pq.read_table(tmp_path / "part.parquet")) == 200


# ---- results files that are not what they should be -------------------------------------------------------------
class OddResults(httpx.BaseTransport):
    """Results files rewritten on their way: `how` adds lines that are not the batch's own."""

    def __init__(self, inner: httpx.BaseTransport, how: str):
        self.inner, self.how, self.seen = inner, how, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method != "GET" or not request.url.path.endswith("/results"):
            return response
        lines = [json.loads(x) for x in response.read().decode().splitlines() if x.strip()]
        self.seen.append(lines)
        extra = []
        first = lines[0]
        tag, _, cid = first["custom_id"].partition("-")
        other_reply = json.loads(json.dumps(first))
        other_reply["result"]["message"]["content"][0]["text"] = "FOREIGN"
        if self.how == "duplicates":
            extra = [dict(x) for x in lines]
        elif self.how == "foreign_tag":     # another job's tag, one of our ids
            extra = [dict(other_reply, custom_id="0123456789-" + cid)]
        elif self.how == "no_tag":          # our row's id without any tag
            extra = [dict(other_reply, custom_id=cid)]
        elif self.how == "other_batch":     # our tag, a row of this job sent in another batch
            prior = [x["custom_id"] for batch in self.seen[:-1] for x in batch]
            extra = [dict(other_reply, custom_id=c) for c in prior]
        if self.how == "foreign_first":
            lines = [dict(other_reply, custom_id="0123456789-" + cid)] + lines
        body = "".join(json.dumps(x) + "\n" for x in lines + extra).encode()
        return httpx.Response(200, headers={"content-type": "application/binary"}, content=body, request=request)


@pytest.mark.parametrize("how", ["duplicates", "foreign_tag", "no_tag", "other_batch", "foreign_first"])
def test_results_with_lines_that_are_not_the_batchs_own_never_answer_a_row(emu, tmp_path, monkeypatch, how):
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    csv = _table(tmp_path, n=20)
    transport = OddResults(emu.sync_transport(), how)
    job = _job(tmp_path, csv)
    result = batchrun.run(job, api_key="k", base_url="https://gw.example", transport=transport)
    assert result.exit_code == 0 and result.counts == {"succeeded": 20}
    assert _own_answers(job, 20)
    assert emu.stats.requests_created == 20


def test_a_lost_creates_candidate_whose_results_file_is_empty_does_not_hold_the_job_forever(emu, cli, tmp_path,
                                                                                            monkeypatch):
    """A one-row batch whose create reply was lost, and whose results file, once ended, lacks its only
    line: nothing in it can prove it ours or not. The job ends (the row errored, not sent again blindly;
    `--resend-lost` sends it) instead of waiting for a proof that never comes."""
    monkeypatch.setenv("BATCHRUN_CREATE_GRACE", "0.2")
    emu.config.drop_after_create = 1
    emu.config.missing_result_lines = 1
    csv = _table(tmp_path, n=1)
    argv = ["run", "--input", str(csv), "--output", str(tmp_path / "o.parquet"), "--state", str(tmp_path / "s.sqlite"),
            "--prompt", "{{ body }}", "--model", MODEL, "--max-tokens", "50", "--poll-interval", "0.05", "--no-wait"]
    codes = []
    for _ in range(8):
        r = cli(*argv)
        codes.append(r.exit_code)
        if r.exit_code != ExitCode.IN_PROGRESS:
            break
        time.sleep(0.1)
    assert codes[-1] == ExitCode.FAILED_ROWS, (codes, r.output)
    assert emu.stats.requests_created == 1
    (row,) = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert row["status"] == "errored" and "--resend-lost" in row["error_message"]


def test_a_run_is_not_refused_for_a_moment_another_jobs_run_looks_at_its_lock(emu, tmp_path):
    """A run that chooses what to send looks whether the other jobs of its state file are being run (it
    takes each free lock for an instant). A run of such a job starting at that instant waits that
    instant out, rather than exiting 6 as if another run held its job."""
    import threading
    from batchrun.store import JobLock
    csv = _table(tmp_path, n=5)
    job = _job(tmp_path, csv)
    first = batchrun.run(job, wait=False)
    probe = JobLock(job["state"], first.job_id)
    probe.acquire(probe=True)
    threading.Timer(0.2, probe.release).start()
    result = batchrun.run(job)
    assert result.exit_code == 0 and result.counts == {"succeeded": 5}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_missing_result_line_amid_downloads_cut_short_still_ends_result_missing(emu, cli, tmp_path, seed):
    """A results file that always lacks one line and is also often cut short (a flaky file server): the
    run still ends that row result_missing, every other row answered, nothing sent twice."""
    emu.config.seed = seed
    emu.config.missing_result_lines = 1
    emu.config.truncate_rate = 0.3
    csv = _table(tmp_path, n=30)
    argv = ["run", "--input", str(csv), "--output", str(tmp_path / "o.parquet"), "--state", str(tmp_path / "s.sqlite"),
            "--prompt", "{{ body }}", "--model", MODEL, "--max-tokens", "50", "--poll-interval", "0.05"]
    r = cli(*argv)
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [x["error_type"] for x in rows if x["status"] != "succeeded"] == ["result_missing"]
    assert emu.stats.requests_created == 30
