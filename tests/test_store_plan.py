"""The store's planning transitions, alone (store/plan.py): a job's rows stored in one plan, the one reading
of stored bodies, answers reused from another job, and the run's options (--resend-lost, --retry-errored,
--resume-canceled)."""
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
        store.insert_plan_chunk([(job_id, f"row-{i}", i, f"h{i}") for i in range(rows)],
                                [f'{{"n":{i}}}' for i in range(rows)])
        store.mark_planned(job_id, rows, {"body": "string"}, '{"model":"m"}')


def _set(store, job_id: str, row: int, state: str, error_type=None, batch=None) -> None:
    store.conn.execute("UPDATE requests SET state = ?, error_type = ?, batch_id = ? WHERE job_id = ? AND row_index = ?",
                       (state, error_type, batch, job_id, row))


def test_a_plan_stores_every_row_and_refuses_a_custom_id_twice(store):
    _plan(store, "a")
    job = store.job("a")
    assert job["planned_at"] and job["rows"] == 4 and job["shared_params"] == '{"model":"m"}'
    assert list(store.bodies("a")) == ['{"n":0}', '{"n":1}', '{"n":2}', '{"n":3}']
    assert store.row_index_of("a", "row-2") == 2 and store.row_index_of("a", "row-9") is None
    with pytest.raises(sqlite3.IntegrityError):
        with store.transaction():
            store.insert_plan_chunk([("a", "row-1", 4, "h4")], ['{"n":4}'])
    assert list(store.bodies("a", limit=2)) == ['{"n":0}', '{"n":1}']   # (rolled back: nothing added)


def test_bodies_of_a_job_or_a_batch_by_state(store):
    _plan(store, "a")
    _set(store, "a", 0, IN_FLIGHT, batch=7)
    _set(store, "a", 1, ERRORED, "batch_not_found")   # lost: only --resend-lost sends it again
    _set(store, "a", 2, ERRORED, "overloaded_error")
    assert list(store.bodies("a", state=PENDING)) == ['{"n":3}']
    assert list(store.bodies(batch=7, state=IN_FLIGHT)) == ['{"n":0}']
    assert list(store.bodies("a", retryable=True)) == ['{"n":2}']
    figures = store.job_figures("a")
    assert figures.first == '{"n":0}' and figures.counts == {IN_FLIGHT: 1, ERRORED: 2, PENDING: 1}
    assert list(figures.pending) == ['{"n":3}']


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
