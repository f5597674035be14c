"""The state file's schema: older state files open, migrate and resume their jobs."""
from __future__ import annotations

import sqlite3
import time
from collections import Counter

import pyarrow.parquet as pq

from batchrun.errors import ExitCode
from batchrun.store import MIGRATIONS, Store
from tests.test_bodies import store_bodies_as_before
from tests.test_pipeline import check_output, run_args, source_rows


def downgrade_to_v2(path: str) -> None:
    """Rewrite a current state file as the first two migrations left it: bodies inside `requests`."""
    store_bodies_as_before(path)          # (a plan since issue #17 stores none: they are rendered again)
    c = sqlite3.connect(path, isolation_level=None)
    # columns of later migrations (m003, m007, m010, m011) that rebuild or alter requests
    later = ("body_id", "free_sends", "cache_creation_5m_input_tokens", "cache_creation_1h_input_tokens", "chars",
             "max_tokens")
    cols = [r[1] for r in c.execute("PRAGMA table_info(requests)") if r[1] not in later]
    c.execute("BEGIN")
    c.execute("CREATE TABLE old AS SELECT r.*, b.body FROM requests r JOIN bodies b ON b.id = r.body_id")
    c.execute("DROP TABLE requests")
    c.execute("DROP TABLE bodies")
    ddl = ", ".join(f"{col} {'INTEGER' if col in ('row_index', 'attempts', 'batch_id') else 'TEXT'}"
                    for col in cols)
    c.execute(f"CREATE TABLE requests ({ddl}, body TEXT NOT NULL, PRIMARY KEY (job_id, custom_id)) WITHOUT ROWID")
    c.execute(f"INSERT INTO requests ({', '.join(cols)}, body) SELECT {', '.join(cols)}, body FROM old")
    c.execute("DROP TABLE old")
    c.execute("CREATE UNIQUE INDEX requests_row ON requests(job_id, row_index)")
    c.execute("DELETE FROM _batchrun_migrations WHERE name IN ('m003_bodies_apart', 'm007_free_sends', "
              "'m010_cache_write_split', 'm011_bodies_rendered')")
    c.execute("COMMIT")
    c.close()


def test_a_v2_state_file_with_batches_in_flight_migrates_and_finishes(emu, cli, tmp_path, tickets_csv):
    emu.config.processing_seconds = 1.0
    out, state = tmp_path / "out.parquet", tmp_path / "state.sqlite"
    r = cli(*run_args(tickets_csv, out, "--state", state, "--no-wait"))
    assert r.exit_code == ExitCode.IN_PROGRESS, r.output
    assert emu.stats.batches_created == 2
    downgrade_to_v2(str(state))
    with sqlite3.connect(state) as c:
        assert "body" in [r[1] for r in c.execute("PRAGMA table_info(requests)")]
        before = dict(c.execute("SELECT custom_id, body FROM requests"))
    time.sleep(1.0)
    r = cli(*run_args(tickets_csv, out, "--state", state))     # the same job, after the upgrade
    assert r.exit_code == 0, r.output
    assert emu.stats.batches_created == 2                        # nothing sent again
    check_output(out, source_rows(tickets_csv))
    with Store(str(state)) as s:
        done = {r["name"] for r in s.q("SELECT name FROM _batchrun_migrations")}
        assert done == {fn.__name__ for fn in MIGRATIONS}
        after = dict(s.conn.execute("SELECT r.custom_id, b.body FROM requests r JOIN bodies b ON b.id = r.body_id"))
        assert after == before                                    # every body kept, with its own row
        assert "body" not in [r[1] for r in s.conn.execute("PRAGMA table_info(requests)")]


def test_two_jobs_in_one_state_keep_their_own_bodies(emu, cli, tmp_path, tickets_csv):
    state = tmp_path / "state.sqlite"
    for n, name in ((120, "a"), (80, "b")):
        r = cli(*run_args(tickets_csv, tmp_path / f"{name}.parquet", "--state", state, "--limit", n,
                          "--max-tokens", 100 + n))
        assert r.exit_code == 0, r.output
    with Store(str(state)) as s:   # (their bodies are rendered again from the input since issue #17)
        sent = [(jid, cid, params["max_tokens"]) for jid, cid, params in s.params()]
        assert len(sent) == 200 and len({(jid, cid) for jid, cid, _ in sent}) == 200
        assert sorted(Counter((jid, m) for jid, _, m in sent).values()) == [80, 120]
        assert {m for _, _, m in sent} == {180, 220}
    for n, name in ((120, "a"), (80, "b")):
        rows = pq.read_table(tmp_path / f"{name}.parquet").to_pylist()
        assert len(rows) == n and all(r["status"] == "succeeded" for r in rows)


def test_a_fresh_state_file_is_created_whole(tmp_path):
    path = str(tmp_path / "new.sqlite")
    with Store(path) as s:
        tables = {r["name"] for r in s.q("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"jobs", "requests", "bodies", "batches", "events", "_batchrun_migrations"} <= tables
    with Store(path) as s:                                        # opening again applies nothing twice
        assert s.one("SELECT count(*) AS n FROM _batchrun_migrations")["n"] == len(MIGRATIONS)


def _open_at_once(path, barrier, results):
    from batchrun.store import Store
    barrier.wait()
    try:
        with Store(path) as store:
            with store.transaction():
                store.conn.execute("SELECT count(*) FROM jobs").fetchone()
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(f"{type(exc).__name__}: {exc}")


def test_runs_opening_a_new_state_file_at_the_same_moment_all_get_it(tmp_path):
    """Two cron lines firing together on a state file that does not exist yet: switching it to WAL mode
    needs the file to itself, and SQLite's busy timeout does not wait for that ("database is locked" in
    about one open in thirty, before the switch was retried)."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    outcomes = []
    for round_ in range(25):
        path = str(tmp_path / f"s{round_}.sqlite")
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_at_once, args=(path, barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes += [results.get(timeout=5) for _ in procs]
    assert outcomes == ["ok"] * 100, [o for o in outcomes if o != "ok"][:3]


def test_a_state_file_another_process_keeps_locked_is_one_line_not_an_internal_error(emu, cli, tmp_path, tickets_csv,
                                                                                    monkeypatch):
    from tests.conftest import refused
    state = tmp_path / "s.sqlite"
    args = run_args(tickets_csv, tmp_path / "out.parquet", "--state", state)
    assert cli(*args).exit_code == ExitCode.OK
    import batchrun.store.core
    import batchrun.store.files
    monkeypatch.setattr(batchrun.store.core, "BUSY_TIMEOUT", 0.3)   # (where the state file is opened)
    monkeypatch.setattr(batchrun.store.files, "BUSY_TIMEOUT", 0.3)  # (where its error line is written)
    other = sqlite3.connect(state, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")          # another process writing to it, for longer than the busy timeout
    try:
        line = refused(cli(*args, "--limit", "10"), ExitCode.LOCKED, "is busy", str(state))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert "run again" in line
    assert cli(*args, "--limit", "10").exit_code == ExitCode.OK      # and once it is free, the run goes on
