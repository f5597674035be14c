"""The store's planning transitions, alone (store/plan.py, store/bodies.py): a job's rows stored in one plan,
the one reading of planned rows (their bodies are not stored since issue #17: bodies.py renders them), answers
reused from another job, and the run's options (--resend-lost, --retry-errored, --resume-canceled)."""
from __future__ import annotations

import sqlite3

import pytest

from batchrun.spec import JobSpec
from batchrun.states import CANCELED, ERRORED, IN_FLIGHT, PENDING, SUCCEEDED
from batchrun.store import Store


@pytest.fixture
def store(tmp_path):
    with Store(str(tmp_path / "s.sqlite")) as s:
        yield s


def _plan(store, job_id: str, rows: int = 4) -> None:
    """A job planned as the planner plans it: its row, its requests (`h0`, `h1`, ... in every job), planned."""
    spec = JobSpec.from_mapping({"input": "in.csv", "output": "o.parquet", "prompt": "{{ body }}"})
    with store.transaction():
        store.record_job(job_id, spec, "fingerprint", "")
        store.insert_planned([(job_id, f"row-{i}", i, f"h{i}", 10 + i, None) for i in range(rows)])
        store.mark_planned(job_id, rows, {"body": "string"}, '{"model":"m"}')


def hashes(rows) -> list:
    """The request hashes of planned rows (store.planned_rows: row_index, custom_id, params_hash, stored body)."""
    return [row[2] for row in rows]


def _set(store, job_id: str, row: int, state: str, error_type=None, batch=None) -> None:
    store.conn.execute("UPDATE requests SET state = ?, error_type = ?, batch_id = ? WHERE job_id = ? AND row_index = ?",
                       (state, error_type, batch, job_id, row))


def test_a_plan_stores_every_row_and_refuses_a_custom_id_twice(store):
    _plan(store, "a")
    job = store.job("a")
    assert job["planned_at"] and job["rows"] == 4 and job["shared_params"] == '{"model":"m"}'
    assert list(store.planned_rows("a")) == [(i, f"row-{i}", f"h{i}", None) for i in range(4)]   # (no body)
    assert store.row_index_of("a", "row-2") == 2 and store.row_index_of("a", "row-9") is None
    with pytest.raises(sqlite3.IntegrityError):
        with store.transaction():
            store.insert_planned([("a", "row-1", 4, "h4", 14, None)])
    assert hashes(store.planned_rows("a", limit=2)) == ["h0", "h1"]   # (rolled back: nothing added)
    assert len(list(store.planned_rows("a"))) == 4


def test_many_rows_an_insert_and_a_store_kept_body(store, monkeypatch):
    """insert_planned puts many rows in one INSERT (within SQLite's limit on parameters): every row stored as
    given, a kept body in `bodies`; a duplicate custom_id stores none of its statement's rows."""
    import batchrun.store.bodies
    monkeypatch.setattr(batchrun.store.bodies, "_rows_per_insert", lambda conn: 7)
    spec = JobSpec.from_mapping({"input": "in.csv", "output": "o.parquet", "prompt": "{{ body }}"})
    with store.transaction():
        store.record_job("a", spec, "fingerprint", "")
        store.insert_planned([("a", f"row-{i}", i, f"h{i}", 10 + i, i if i % 3 else None,
                               "kept" if i == 5 else None) for i in range(20)])
    assert store.conn.execute("SELECT count(*), sum(chars), sum(max_tokens) FROM requests").fetchone() == \
        (20, sum(range(10, 30)), sum(i for i in range(20) if i % 3))
    assert [row[3] for row in store.planned_rows("a")] == [None] * 5 + ["kept"] + [None] * 14
    with pytest.raises(sqlite3.IntegrityError):
        store.insert_planned([("a", f"row-{i}", i, "h", 1, None) for i in range(30, 40)] +
                             [("a", "row-3", 40, "h", 1, None)])
    assert store.conn.execute("SELECT count(*) FROM requests").fetchone() == (27,)   # the first statement's 7 rows


def test_the_plans_commit_leaves_its_checkpoint_to_a_thread(store, monkeypatch):
    """checkpoint_behind: the commit inside it does not copy the WAL into the file (no automatic checkpoint);
    a thread with a connection of its own does, after; this connection checkpoints as before once it is left."""
    import os
    import threading

    import batchrun.store.plan
    done, checkpoint = threading.Event(), batchrun.store.plan._checkpoint

    def recorded(path, started):
        assert threading.current_thread().name == "batchrun-checkpoint" and path == store.path
        checkpoint(path, started)
        done.set()

    monkeypatch.setattr(batchrun.store.plan, "_checkpoint", recorded)
    store.conn.execute("PRAGMA wal_autocheckpoint=10")   # (a checkpoint after any commit of more than 10 pages)
    size = os.path.getsize(store.path)
    with store.checkpoint_behind():
        assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        _plan(store, "a", rows=3000)
        assert os.path.getsize(store.path) == size and not done.is_set()   # committed: in the WAL alone
    assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (10,)
    assert done.wait(10) and os.path.getsize(store.path) > size + 100_000
    assert len(list(store.planned_rows("a"))) == 3000
    with pytest.raises(KeyError):   # a plan that fails: nothing to copy, the setting back as it was
        with store.checkpoint_behind():
            raise KeyError
    assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (10,)


def test_planned_rows_of_a_job_or_a_batch_by_state(store):
    _plan(store, "a")
    _set(store, "a", 0, IN_FLIGHT, batch=7)
    _set(store, "a", 1, ERRORED, "batch_not_found")   # lost: only --resend-lost sends it again
    _set(store, "a", 2, ERRORED, "overloaded_error")
    assert hashes(store.planned_rows("a", state=PENDING)) == ["h3"]
    assert hashes(store.planned_rows(batch=7, state=IN_FLIGHT)) == ["h0"]
    assert hashes(store.planned_rows("a", retryable=True)) == ["h2"]
    assert store.counts("a") == {IN_FLIGHT: 1, ERRORED: 2, PENDING: 1}
    assert list(store.pending_sizes("a")) == [(3, 13, None)]   # what an estimate reads of a pending row
    assert hashes(store.planned_rows_at("a", [3, 0])) == ["h0", "h3"]


def test_answers_are_reused_from_another_job_once_paid_for(store):
    _plan(store, "a")
    _plan(store, "b", rows=2)
    _set(store, "b", 0, SUCCEEDED)
    store.conn.execute("UPDATE requests SET text = 'yes', cost_usd = 0.5 WHERE job_id = 'b' AND row_index = 0")
    assert store.reuse_answers("a") == 1
    row = store.one("SELECT state, text, cost_usd, reused_from FROM requests WHERE job_id = 'a' AND row_index = 0")
    assert row == {"state": SUCCEEDED, "text": "yes", "cost_usd": 0.0, "reused_from": "b"}
    assert store.reuse_answers("a") == 0   # (taken: no longer pending)


def test_the_run_options_move_only_their_rows(store):
    _plan(store, "a")
    _set(store, "a", 0, ERRORED, "results_gone")
    _set(store, "a", 1, ERRORED, "invalid_request_error")
    _set(store, "a", 2, CANCELED)
    store.conn.execute("UPDATE jobs SET canceled_at = 't', finished_at = 't' WHERE id = 'a'")
    assert store.retry_errored("a") == 1            # not the lost row
    assert store.job("a")["canceled_at"] is None and store.job("a")["finished_at"] is None
    assert store.resend_lost("a") == 1
    assert store.resume_canceled("a") == 1
    assert store.counts("a") == {PENDING: 4}


def test_an_output_written_finishes_the_job_once(store):
    _plan(store, "a")
    store.mark_written("a")
    first = store.job("a")
    store.mark_written("a")
    assert first["finished_at"] and store.job("a")["finished_at"] == first["finished_at"]
    assert store.job("a")["output_written_at"] >= first["output_written_at"]
