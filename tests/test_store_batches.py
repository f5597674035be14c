"""The store's batch-mode transitions, alone: the paid-once rule both modes share (taken_elsewhere), and an
intent recorded, abandoned and dropped."""
from __future__ import annotations

import pytest

from batchrun.states import ABANDONED, IN_FLIGHT, INTENT, PENDING, SUCCEEDED
from batchrun.store import JobLock, Store


@pytest.fixture
def store(tmp_path):
    with Store(str(tmp_path / "s.sqlite")) as s:
        yield s


def _job(store, job_id: str, rows: int = 3, state: str = PENDING, claimed: bool = False) -> None:
    """A job whose rows have requests `h0`, `h1`, ... (the same params_hash in every job)."""
    store.conn.execute("INSERT INTO jobs (id, spec, input, output, input_fingerprint, mode, model, created_at) "
                       "VALUES (?, '{}', 'in', 'out', 'f', 'batch', 'm', 't')", (job_id,))
    for i in range(rows):
        body = store.conn.execute("INSERT INTO bodies (body) VALUES ('{}')").lastrowid
        store.conn.execute("INSERT INTO requests (job_id, custom_id, row_index, params_hash, body_id, state, "
                           "claimed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (job_id, f"row-{i}", i, f"h{i}", body, state, "t" if claimed else None))


def _chunk(store, job_id, silent):
    with store.transaction():
        # (planned rows: row_index, custom_id, ...)
        return [r[1] for r in store.pending_chunk(job_id, -1, 100, silent)]


def _claim(store, job_id):
    return [r[1] for r in store.claim_for_messages(job_id, -1, 100)]


def test_rows_answered_elsewhere_are_taken_in_both_modes(store):
    _job(store, "a")
    _job(store, "b", rows=1, state=SUCCEEDED)
    assert _chunk(store, "a", silent=[]) == ["row-1", "row-2"]
    assert _claim(store, "a") == ["row-1", "row-2"]


def test_rows_in_flight_in_a_job_nobody_runs_wait_in_batch_mode_only(store):
    """Batch mode moves a job nobody runs forward itself (its answers are coming), unless its batches cannot
    be moved from here (silent); messages mode waits only for a job a run is moving now."""
    _job(store, "a")
    _job(store, "b", rows=1, state=IN_FLIGHT)
    assert _chunk(store, "a", silent=[]) == ["row-1", "row-2"]
    assert _chunk(store, "a", silent=["b"]) == ["row-0", "row-1", "row-2"]
    store.release_claims("a")
    assert _claim(store, "a") == ["row-0", "row-1", "row-2"]


def test_rows_in_flight_or_claimed_by_a_live_job_wait_in_both_modes(store, tmp_path):
    _job(store, "a")
    _job(store, "b", rows=1, state=IN_FLIGHT)
    _job(store, "c", rows=2, claimed=True)
    lock = JobLock(store.path, "b")
    lock.acquire()
    other = JobLock(store.path, "c")
    other.acquire()
    try:
        assert _chunk(store, "a", silent=["b"]) == ["row-2"]   # (b: in flight, and a run moves it)
        assert _claim(store, "a") == ["row-2"]
    finally:
        lock.release()
        other.release()


def test_an_alone_job_takes_every_pending_row(store):
    _job(store, "a")
    assert store.alone("a")
    assert _chunk(store, "a", silent=None) == ["row-0", "row-1", "row-2"]


def test_an_intent_marks_its_rows_and_gives_them_back_when_abandoned(store):
    _job(store, "a")
    with store.transaction(durable=True):
        local = store.record_intent("a", ["row-0", "row-1"], 100, None, (0, 1), "tag1")
    assert store.batch(local).state == INTENT and store.member_ids(local) == ["row-0", "row-1"]
    assert store.counts("a") == {IN_FLIGHT: 2, PENDING: 1}
    store.abandon(local, "made nothing")
    assert store.batch(local).state == ABANDONED and store.counts("a") == {PENDING: 3}
    assert store.one("SELECT max(attempts) AS n FROM requests")["n"] == 0
    with store.transaction(durable=True):
        local = store.record_intent("a", ["row-2"], 10, None, None, "tag1")
    store.drop_intent(local)
    assert store.one("SELECT count(*) AS n FROM batches WHERE id = ?", (local,))["n"] == 0
    assert store.counts("a") == {PENDING: 3}


def test_an_intent_whose_span_is_not_all_pending_rolls_back(store):
    _job(store, "a")
    store.conn.execute("UPDATE requests SET state = 'succeeded' WHERE custom_id = 'row-1'")
    with pytest.raises(RuntimeError):
        with store.transaction(durable=True):
            store.record_intent("a", ["row-0", "row-1", "row-2"], 100, None, (0, 2), "tag1")
    assert store.one("SELECT count(*) AS n FROM batches")["n"] == 0 and store.counts("a")[PENDING] == 2
