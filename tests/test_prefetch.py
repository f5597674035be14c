"""Overlapping stages (issue #17): the next input block is read while one is planned, results download
while they are recorded — with the source's order, items and errors, and a bad row still stopping the
job before anything is sent."""
from __future__ import annotations

import threading
import time

import pyarrow.parquet as pq
import pytest

import batchrun.inputs
from batchrun.errors import ExitCode
from batchrun.prefetch import prefetched

from conftest import refused


def test_items_and_order_are_the_sources():
    assert list(prefetched(range(1000), depth=3, chunk=7)) == list(range(1000))
    assert list(prefetched([])) == []


def test_an_error_comes_after_every_item_before_it():
    def source():
        yield from range(10)
        raise ValueError("line 11 is cut short")

    got = []
    with pytest.raises(ValueError, match="line 11"):
        for item in prefetched(source(), chunk=3):
            got.append(item)
    assert got == list(range(10))


def test_the_producer_runs_ahead_of_the_consumer():
    produced = []

    def source():
        for i in range(4):
            produced.append(i)
            yield i

    it = prefetched(source(), depth=2)
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 3 and time.monotonic() < deadline:   # items 1 and 2 made while 0 is being used
        time.sleep(0.01)
    assert produced[:3] == [0, 1, 2]
    assert list(it) == [1, 2, 3]


def test_a_consumer_that_stops_stops_the_producer_and_closes_the_source():
    closed = threading.Event()

    def source():
        try:
            for i in range(10**9):
                yield i
        finally:
            closed.set()

    it = prefetched(source(), depth=2)
    assert next(it) == 0
    it.close()
    assert closed.wait(5), "the source was not closed"


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(batchrun.inputs, "BATCH_ROWS", 16)   # many blocks, so the reading runs ahead


def write_rows(path, n, bad_at=None):
    lines = ["id,msg"]
    for i in range(n):
        lines.append(f"{'' if i == bad_at else f'r{i}'},text {i}")
    path.write_text("\n".join(lines) + "\n")


def test_a_bad_row_in_a_later_block_stops_the_job_before_anything_is_sent(emu, cli, tmp_path, small_blocks):
    data = tmp_path / "in.csv"
    write_rows(data, 200, bad_at=170)
    r = cli("run", "--input", data, "--output", tmp_path / "out.parquet", "--state", tmp_path / "s.sqlite",
            "--id-column", "id", "--prompt", "Say {{ msg }}", "--poll-interval", "0.05", "-q")
    refused(r, 2, "row 171", "id")
    assert emu.stats.create_calls == 0


def test_every_row_once_in_order_across_blocks_and_batches(emu, cli, tmp_path, small_blocks):
    data = tmp_path / "in.csv"
    write_rows(data, 200)
    emu.config.truncate_rate = 0.5   # downloads cut short: recorded as far as they went, downloaded again
    r = cli("run", "--input", data, "--output", tmp_path / "out.parquet", "--state", tmp_path / "s.sqlite",
            "--id-column", "id", "--prompt", "Say {{ msg }}", "--batch-size", "60", "--poll-interval", "0.05", "-q")
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [row["id"] for row in rows] == [f"r{i}" for i in range(200)]
    for i, row in enumerate(rows):
        assert (row["status"], row["text"][:22]) == ("succeeded", f"Reply to: Say text {i} #"[:22]), row
    assert sorted(emu.stats.submitted_custom_ids.values()) == [1] * 200


# ---- the plan's writer: a block is stored while the next one is rendered (prefetch.Behind) ------------------
from batchrun.prefetch import Behind  # noqa: E402


def test_behind_consumes_every_item_in_order():
    got = []
    with Behind(got.append, depth=2) as behind:
        for i in range(500):
            behind.put(i)
    assert got == list(range(500))


def test_behinds_error_is_raised_at_the_next_put_or_at_close_and_nothing_after_it_is_consumed():
    got = []

    def consume(item):
        if item == 3:
            raise ValueError("block 3 failed")
        got.append(item)

    with pytest.raises(ValueError, match="block 3"):
        with Behind(consume) as behind:
            for i in range(100):
                behind.put(i)
    assert got == [0, 1, 2]
    with pytest.raises(ValueError, match="block 3"):   # the last item's error: raised at close
        with Behind(consume) as behind:
            for i in range(4):
                behind.put(i)


def test_leaving_behind_with_an_error_waits_for_the_item_in_hand_and_drops_the_rest():
    started, release, got = threading.Event(), threading.Event(), []

    def consume(item):
        started.set()
        release.wait(5)
        got.append(item)

    with pytest.raises(KeyError):
        with Behind(consume, depth=3) as behind:
            for i in range(4):
                behind.put(i)
            assert started.wait(5)
            threading.Timer(0.2, release.set).start()
            raise KeyError("the caller's own error")
    assert got == [0]   # finished before the error left the block; 1..3 dropped


def run_args(data, tmp_path):
    return ("run", "--input", data, "--output", tmp_path / "out.parquet", "--state", tmp_path / "s.sqlite",
            "--id-column", "id", "--prompt", "Say {{ msg }}", "--poll-interval", "0.05", "-q")


def nothing_planned(state):
    import sqlite3
    with sqlite3.connect(state) as db:
        return db.execute("SELECT count(*) FROM jobs").fetchone() == (0,) and \
            db.execute("SELECT count(*) FROM requests").fetchone() == (0,)


def test_a_duplicate_id_found_by_the_store_in_a_later_block_is_named_as_before(emu, cli, tmp_path, small_blocks):
    data = tmp_path / "in.csv"
    write_rows(data, 200)
    data.write_text(data.read_text().replace("r150,", "r5,"))   # the same id in another block
    refused(cli(*run_args(data, tmp_path)), ExitCode.BAD_INPUT, "duplicate id 'r5' in column 'id'", "rows 6 and 151")
    assert emu.stats.create_calls == 0 and nothing_planned(tmp_path / "s.sqlite")


def test_a_store_that_fails_in_the_plans_writer_fails_the_plan_as_before(emu, cli, tmp_path, small_blocks,
                                                                          monkeypatch):
    import sqlite3

    from batchrun.store import Store
    data = tmp_path / "in.csv"
    write_rows(data, 200)
    calls, insert = [], Store.insert_planned

    def failing(self, records):
        calls.append(threading.current_thread().name)
        if len(calls) == 4:
            raise sqlite3.OperationalError("database or disk is full")
        insert(self, records)

    monkeypatch.setattr(Store, "insert_planned", failing)
    refused(cli(*run_args(data, tmp_path)), ExitCode.API_ERROR, "no space left on", "nothing was lost, run again once there is room")
    assert set(calls) == {"batchrun-behind"} and len(calls) < 200 // 16
    assert emu.stats.create_calls == 0 and nothing_planned(tmp_path / "s.sqlite")
    monkeypatch.setattr(Store, "insert_planned", insert)
    r = cli(*run_args(data, tmp_path))
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [row["id"] for row in rows] == [f"r{i}" for i in range(200)]


def test_a_second_interrupt_while_behind_waits_is_raised_once_the_item_in_hand_is_done():
    """Ctrl-C (or SIGTERM) again while leaving: the caller still waits for the statement in hand, so that its
    rollback never runs under it; then the interrupt is raised."""
    started, release, got = threading.Event(), threading.Event(), []

    def consume(item):
        started.set()
        release.wait(5)
        got.append(item)

    behind = Behind(consume)
    behind.put(0)
    assert started.wait(5)
    joins = []
    original_join = behind._thread.join

    def join(timeout=None):
        joins.append(timeout)
        if len(joins) == 2:
            threading.Timer(0.1, release.set).start()
            raise KeyboardInterrupt   # (the second Ctrl-C, while waiting)
        original_join(timeout)

    behind._thread.join = join
    with pytest.raises(KeyboardInterrupt):
        behind.__exit__(ValueError, ValueError("a bad row"), None)
    assert got == [0] and not behind._thread.is_alive()
