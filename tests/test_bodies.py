"""Issue #17: a plan stores no request bodies; they are rendered again from the input (batchrun/bodies.py),
checked against the hash the plan stored, and sent; state files that hold bodies keep sending them."""
from __future__ import annotations

import csv
import os
import signal
import sqlite3

import pyarrow.parquet as pq
import pytest

import batchrun
from batchrun.bodies import BodySource
from batchrun.errors import ExitCode, InputError
from batchrun.runner import Runner
from batchrun.store import Store
from tests.conftest import make_tickets
from tests.test_reliability import args, assert_complete, spawn

KEY = "sk-ant-test-0123456789"


def store_bodies_as_before(path, edit=lambda body: body) -> int:
    """Make a state file's planned rows as a plan before issue #17 left them: each row's body stored in
    `bodies` (`edit`ed), `requests.body_id` pointing at it, the figures kept since unset. Returns the rows."""
    with Store(str(path)) as s:
        stored = []
        for job in s.q("SELECT * FROM jobs WHERE planned_at IS NOT NULL"):
            source = BodySource.of_stored_job(job)
            stored += [(job["id"], cid, edit(body)) for _, cid, body in source.bodies(s.planned_rows(job["id"]))]
            source.close()
        with s.transaction() as c:
            base = c.execute("SELECT coalesce(max(id), 0) + 1 FROM bodies").fetchone()[0]
            c.executemany("INSERT INTO bodies (id, body) VALUES (?, ?)",
                          [(base + i, body) for i, (_, _, body) in enumerate(stored)])
            c.executemany("UPDATE requests SET body_id = ?, chars = NULL, max_tokens = NULL "
                          "WHERE job_id = ? AND custom_id = ?",
                          [(base + i, jid, cid) for i, (jid, cid, _) in enumerate(stored)])
    return len(stored)


def write_tickets(path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def spec_for(tickets_csv, tmp_path, **keys):
    from tests.conftest import PROMPT
    return batchrun.JobSpec.from_mapping({
        "input": str(tickets_csv), "output": str(tmp_path / "o.parquet"), "state": str(tmp_path / "s.sqlite"),
        "id_column": "ticket_id", "prompt": PROMPT, "model": "claude-haiku-4-5", "max_tokens": 200,
        "batch_size": 100, "poll_interval": 0.05, **keys})


def planned(spec, emu) -> Runner:
    runner = Runner(spec, api_key=KEY, base_url=emu.base_url)
    with runner.locked():
        runner.start()
    return runner


def table_rows(state, sql):
    db = sqlite3.connect(state)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


# ---- the plan keeps no body ------------------------------------------------------------------------
def test_a_plan_stores_no_body_and_the_run_sends_each_row_as_planned(emu, tmp_path, tickets_csv):
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    p = spawn(emu, args(tickets_csv, out, state))
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert_complete(out, tickets_csv, emu)                       # every row's own reply, each sent once
    assert table_rows(state, "SELECT count(*) FROM bodies") == [(0,)]
    assert table_rows(state, "SELECT DISTINCT body_id FROM requests") == [(0,)]
    # what the estimate reads of a body is kept instead: its length (max_tokens: the job's, not per row)
    with Store(str(state)) as s:
        job = s.job(s.q("SELECT id FROM jobs")[0]["id"])
        source = BodySource.of_stored_job(job)
        lengths = [len(body) for _, _, body in source.bodies(s.planned_rows(job["id"]))]
        source.close()
    assert table_rows(state, "SELECT chars FROM requests ORDER BY row_index") == [(n,) for n in lengths]
    assert table_rows(state, "SELECT count(*) FROM requests WHERE max_tokens IS NULL") == [(450,)]


def test_rows_asked_in_any_order_are_rendered_as_planned(emu, tmp_path, tickets_csv):
    """One pass for rows asked in row order; a row before the last one read starts a pass again; scattered
    rows are picked from their blocks. Every render is checked against its stored hash."""
    runner = planned(spec_for(tickets_csv, tmp_path, max_tokens_column="priority"), emu)
    try:
        store, job = runner.store, runner.store.job(runner.job.id)
        rows = list(store.planned_rows(job["id"]))
        assert len(rows) == 450 and all(r[3] is None for r in rows)
        source = BodySource.of_stored_job(job)
        source.how.source.block_size = 4096   # (the input in a dozen blocks: 1 MiB holds it whole)
        in_order = source.body_list(rows)
        assert source.passes == 1 and source.rendered == 450
        assert [max_tokens for (max_tokens,) in store.conn.execute(
            "SELECT max_tokens FROM requests ORDER BY row_index")] == [int(p["priority"]) for p in make_tickets(450)]
        chunks = {k: source.body_list(rows[k:k + 50]) for k in range(400, -1, -50)}   # the last chunk first
        scattered = source.body_list(rows[::7])
        source.close()
        assert source.passes > 2
        assert [body for k in range(0, 450, 50) for body in chunks[k]] == in_order
        assert scattered == in_order[::7]
    finally:
        runner.close()


def test_chunks_rendered_while_the_batch_before_uploads_are_each_rendered_once(emu, tmp_path, tickets_csv,
                                                                                 monkeypatch):
    """Batch mode renders the next chunk while a batch uploads (BatchDriver._render_ahead): every row is
    rendered once, in one pass over the input, and sent once, as planned."""
    import batchrun.batches
    from batchrun.prefetch import Ahead
    made = []
    monkeypatch.setattr(batchrun.batches, "Ahead", lambda make: made.append(Ahead(make)) or made[-1])
    runner = planned(spec_for(tickets_csv, tmp_path), emu)
    try:
        with runner.locked():
            assert runner.submit() == 5
        assert len(made) == 4   # chunks 2-5, each while the one before uploaded
        source = runner.planner.body_source
        assert source.passes == 1 and source.rendered == 450
        assert emu.stats.batches_created == 5 and max(emu.stats.submitted_custom_ids.values()) == 1
        assert runner.store.counts(runner.job.id) == {"in_flight": 450}
    finally:
        runner.close()


# ---- an input edited after its plan -------------------------------------------------------------------
def test_an_input_edited_after_the_plan_is_refused_before_anything_is_sent(emu, tmp_path, tickets_csv):
    runner = planned(spec_for(tickets_csv, tmp_path), emu)
    try:
        rows = make_tickets(450)
        rows[230]["body"] = "an edited ticket"
        write_tickets(tickets_csv, rows)
        with runner.locked(), pytest.raises(InputError) as exc:
            runner.submit()
        message = str(exc.value)
        assert "changed since job" in message and "row 231 " in message and "nothing sent" in message
        assert "\n" not in message
        assert exc.value.exit_code == ExitCode.BAD_INPUT
        # the first two batches' rows are before the edit: sent; the third's chunk holds the edited row
        assert emu.stats.batches_created == 2
        counts = runner.store.counts(runner.job.id)
        assert counts == {"in_flight": 200, "pending": 250}
    finally:
        runner.close()


@pytest.mark.parametrize("mode", ["batch", "messages"])
def test_an_input_edited_before_the_first_send_sends_nothing(emu, tmp_path, tickets_csv, mode):
    runner = planned(spec_for(tickets_csv, tmp_path, mode=mode), emu)
    try:
        rows = make_tickets(450)
        rows[3]["customer"] = "someone else"
        write_tickets(tickets_csv, rows)
        with runner.locked(), pytest.raises(InputError, match="row 4 no longer makes the request"):
            runner.step()
        assert emu.stats.batches_created == 0 and emu.stats.messages_calls == 0
        assert runner.store.counts(runner.job.id) == {"pending": 450}
    finally:
        runner.close()


# ---- crash safety ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("failpoint", ["after_intent:2", "after_create:2"])
def test_killed_while_sending_then_run_again_sends_each_row_once(emu, tmp_path, tickets_csv, failpoint):
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    p = spawn(emu, args(tickets_csv, out, state), failpoint=failpoint)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    p = spawn(emu, args(tickets_csv, out, state))
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert_complete(out, tickets_csv, emu)
    assert max(emu.stats.submitted_custom_ids.values()) == 1
    assert table_rows(state, "SELECT count(*) FROM bodies") == [(0,)]


# ---- state files that hold bodies --------------------------------------------------------------------
def test_a_job_whose_bodies_are_stored_sends_them_as_stored(emu, cli, tmp_path, tickets_csv):
    """A state file planned before issue #17 holds every row's body: they are sent as stored (the input is
    not rendered again), half before a kill, the rest by the next run."""
    spec = spec_for(tickets_csv, tmp_path)
    planned(spec, emu).close()
    mark = "Summarise this support ticket from"
    n = store_bodies_as_before(tmp_path / "s.sqlite", edit=lambda body: body.replace(mark, "STORED from"))
    assert n == 450
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    p = spawn(emu, args(tickets_csv, out, state), failpoint="after_create:2")
    p.communicate(timeout=60)
    p = spawn(emu, args(tickets_csv, out, state))
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    texts = [row["text"] for row in pq.read_table(out).to_pylist()]
    assert len(texts) == 450 and all(t.startswith("Reply to: STORED from") for t in texts)
    assert max(emu.stats.submitted_custom_ids.values()) == 1
    assert table_rows(state, "SELECT count(*) FROM bodies") == [(450,)]
    os.remove(out)


# ---- the estimate ---------------------------------------------------------------------------------------
def test_the_sampled_estimate_renders_its_sample_alone_and_prices_as_every_body_would(emu, tmp_path, tickets_csv):
    """Each pending row's size and max_tokens are read from the state file; only the sample's bodies are
    rendered. The estimate is the one its bodies give, for a plan that stores none and for one that does."""
    from batchrun.estimator import Estimator
    from batchrun.store import JobFigures
    spec = spec_for(tickets_csv, tmp_path, max_tokens_column="priority")
    runner = planned(spec, emu)
    try:
        est = runner.estimator.estimate()
        assert est.method == "sampled" and est.requests == 450
        assert runner.planner.body_source.rendered <= 1 + 60           # the first row and the sample
        bodies = [body for _, _, body in runner.bodies(runner.store.planned_rows(runner.job.id))]
        alone = Estimator(spec, runner.job.catalog, runner.job.model,
                          count_tokens=lambda params, retry: runner.client.count_tokens(params, retry=retry),
                          figures=lambda: JobFigures(counts={"pending": 450}, first=bodies[0], pending=bodies),
                          sample=lambda: bodies, prefix=lambda: runner.planner.prefix)
        assert alone.estimate() == est
    finally:
        runner.close()
    store_bodies_as_before(tmp_path / "s.sqlite")
    runner = planned(spec, emu)
    try:
        assert runner.estimator.estimate() == est
        assert runner.planner.body_source.passes == 0                   # the stored bodies: no input read
    finally:
        runner.close()


def test_a_job_taken_over_from_the_other_mode_sends_the_rows_it_planned(emu, tmp_path, tickets_csv):
    """A cached job with few-shot turns, planned in batch mode (its default cache TTL, 1h, in the last turn of
    every row) at a gateway without batches, continues in messages mode as the same job: its rows are
    rendered again as they were planned (with the stored TTL), not as messages mode would plan them."""
    emu.config.no_batches = True
    job = {"input": str(tickets_csv), "output": str(tmp_path / "o.parquet"), "state": str(tmp_path / "s.sqlite"),
           "id_column": "ticket_id", "prompt": "Tag: {{ body }}", "model": "claude-haiku-4-5", "max_tokens": 50,
           "limit": 12, "system": "You tag tickets.", "cache_system": True, "poll_interval": 0.05,
           "few_shot": [{"user": "Tag: my card was charged twice", "assistant": "billing"}]}
    from batchrun.errors import NoBatchApiError
    with pytest.raises(NoBatchApiError):
        batchrun.run(job, api_key=KEY, base_url=emu.base_url)
    with Store(job["state"]) as s:
        (planned,) = s.q("SELECT id, mode FROM jobs")
        sent = [params for _, _, params in s.params()]
    assert planned["mode"] == "batch"
    assert sent[0]["messages"][1]["content"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    result = batchrun.run({**job, "mode": "messages"}, api_key=KEY, base_url=emu.base_url)
    assert result.exit_code == 0 and result.counts == {"succeeded": 12}
    assert emu.stats.messages_calls == 12
    with Store(job["state"]) as s:   # the same job, under its new id and mode
        assert [(j["id"], j["mode"]) for j in s.find_jobs()] == [(result.job_id, "messages")]
        assert [params for _, _, params in s.params()] == sent


# ---- the first rows' bodies, as the plan of the same run rendered them -----------------------------------
def test_the_run_that_plans_sends_its_first_chunk_as_the_plan_rendered_it(emu, tmp_path, tickets_csv):
    """The plan keeps the bodies of the first batch_size rows: the first chunk is not rendered again (the
    input is read again only for the next chunk), and each row is sent as planned."""
    runner = planned(spec_for(tickets_csv, tmp_path), emu)
    try:
        with runner.locked():
            assert runner.submit() == 5
        source = runner.planner.body_source
        assert source.from_plan == 100 and source.rendered == 450 and source.passes == 1
        assert source._first is None   # dropped once the rows past them were asked for
        assert emu.stats.batches_created == 5 and max(emu.stats.submitted_custom_ids.values()) == 1
    finally:
        runner.close()
    fresh = planned(spec_for(tickets_csv, tmp_path), emu)   # a run that did not plan it renders every row
    try:
        assert fresh.planner.sample(3) and fresh.planner.body_source.from_plan == 0
    finally:
        fresh.close()


def test_the_plans_bodies_are_not_used_once_the_input_or_the_stored_hash_changed(emu, tmp_path, tickets_csv):
    runner = planned(spec_for(tickets_csv, tmp_path), emu)
    try:
        os.utime(tickets_csv, ns=(1, 1))   # the same bytes, written again: read and checked again
        assert len(runner.planner.sample(5)) == 5 and runner.planner.body_source.from_plan == 0
    finally:
        runner.close()
    os.remove(tmp_path / "s.sqlite")
    runner = planned(spec_for(tickets_csv, tmp_path), emu)
    try:
        with runner.store.transaction() as c:   # a stored hash that is not the one the plan made of its body
            c.execute("UPDATE requests SET params_hash = 'x' WHERE row_index = 2")
        with runner.locked(), pytest.raises(InputError, match="row 3 no longer makes the request"):
            runner.submit()
        assert runner.planner.body_source.from_plan == 99 and emu.stats.batches_created == 0   # (all but row 3)
    finally:
        runner.close()


def test_an_input_rewritten_with_its_size_and_mtime_kept_is_rendered_again(emu, tmp_path, tickets_csv):
    """The plan's own bodies are used only while the input is the file the plan read: an edit of the same size
    whose writer puts the modification time back (as `cp -p`, rsync or an editor can) is still seen (the
    inode's change time moves), and the first chunk is rendered again and refused, nothing sent."""
    runner = planned(spec_for(tickets_csv, tmp_path), emu)
    try:
        st = os.stat(tickets_csv)
        data = tickets_csv.read_bytes()
        i = data.index(b"billing")
        tickets_csv.write_bytes(data[:i] + b"BILLING" + data[i + 7:])   # the same size
        os.utime(tickets_csv, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(tickets_csv).st_size == st.st_size and os.stat(tickets_csv).st_mtime_ns == st.st_mtime_ns
        with runner.locked(), pytest.raises(InputError, match="no longer makes the request"):
            runner.submit()
        assert runner.planner.body_source.from_plan == 0 and emu.stats.batches_created == 0
    finally:
        runner.close()
