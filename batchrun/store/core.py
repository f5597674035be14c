"""The SQLite state: jobs, requests, batches and events, through the standard library's sqlite3.

Every step of a job is a transaction here, committed before the next step starts; a killed run
resumes from what was committed. The schema evolves by migrations (a plain list of functions,
applied once each and recorded in `_batchrun_migrations`), so any older state file still opens;
one written by a newer batchrun (a migration this one does not know) is refused.
The file is created private to its owner (0600); it never holds an API key.

A state file carries batchrun's own mark (`PRAGMA application_id`, see APPLICATION_ID); one made by
an older version is known by its migrations table and gets the mark. Any other file — another
program's SQLite database, a symbolic link — is refused before anything in it changes (see
`recognise`). A damaged file and a full disk end the command with one line (`state_error`).
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from typing import Iterable, Iterator, Optional

from .. import __version__
from ..errors import InputError, StateFileError
from ..spec import DEFAULT_API_VERSION
from ..states import ABANDONED

from .files import (APPLICATION_ID, BUSY_TIMEOUT, META_TABLE, MIGRATIONS_TABLE, _CURRENT, JobLock, _create,
                    _make_private, _refuse_links, _use_wal, now_iso, recognise, state_error, state_errors)
from .migrations import MIGRATIONS, _rehash


class Reads:
    """Reads over a connection (`conn`): the Store's own, or a StoreReader's."""

    conn: sqlite3.Connection

    def q(self, sql: str, params: Iterable = ()) -> list[sqlite3.Row]:
        cur = self.conn.execute(sql, tuple(params))
        cols = [d[0] for d in cur.description] if cur.description else []
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def one(self, sql: str, params: Iterable = ()):
        rows = self.q(sql, params)
        return rows[0] if rows else None

    def job(self, job_id: str) -> Optional[dict]:
        return self.one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def counts(self, job_id: str) -> dict:
        return {r["state"]: r["n"] for r in
                self.q("SELECT state, count(*) AS n FROM requests WHERE job_id = ? GROUP BY state", (job_id,))}


class StoreCore(Reads):
    """One state file: its connection, migrations and transactions, and the job rows. The SQL of each
    part of the pipeline is in its own mixin (see store/__init__.py); Store is all of them."""

    def __init__(self, path: str):
        self.path = path
        _refuse_links(path)
        try:
            if not _create(path):
                recognise(path)
                fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
                try:
                    _make_private(fd, path)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise InputError(f"state file {path}: cannot open it ({exc.strerror or exc})") from None
        _CURRENT.set(path)
        with state_errors(path):
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            try:
                _use_wal(conn)
                # NORMAL in WAL mode: every commit survives the process being killed; the few commits that
                # must also survive a power cut (around creating a batch) use transaction(durable=True)
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA cache_size=-16384")        # 16 MiB of page cache (the default is 2 MiB)
                conn.execute("PRAGMA wal_autocheckpoint=8192")  # checkpoint every 32 MiB of WAL, not every 4 MiB
                conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
                self.conn = conn
                self._migrate()
            except BaseException:
                conn.close()
                raise

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "StoreCore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        error = exc[1]
        if isinstance(error, (sqlite3.DatabaseError, OSError)):
            translated = state_error(error, self.path)
            if translated is not None:
                raise translated from None

    # ---- migrations ----------------------------------------------------------------------------
    def _migrate(self) -> None:
        with self.transaction():
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if MIGRATIONS_TABLE in tables:
                done = {r[0] for r in self.conn.execute(f"SELECT name FROM {MIGRATIONS_TABLE}")}
                unknown = sorted(done - {fn.__name__ for fn in MIGRATIONS})
                if unknown:
                    raise self._newer(unknown, tables)
            else:
                done = set()
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (name TEXT PRIMARY KEY, applied_at TEXT)")
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS {META_TABLE} (key TEXT PRIMARY KEY, value TEXT)")
            applied = False
            for fn in MIGRATIONS:
                if fn.__name__ not in done:
                    fn(self.conn)
                    self.conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} VALUES (?, ?)", (fn.__name__, now_iso()))
                    applied = True
            if applied:
                self.conn.execute(f"INSERT OR REPLACE INTO {META_TABLE} VALUES ('batchrun_version', ?)",
                                  (__version__,))
            if self.conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                self.conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    def _newer(self, unknown: list, tables: set) -> StateFileError:
        """A state file whose schema a newer batchrun changed: using it as if it were current could lose
        what the newer version keeps there."""
        by = None
        if META_TABLE in tables:
            row = self.conn.execute(f"SELECT value FROM {META_TABLE} WHERE key = 'batchrun_version'").fetchone()
            by = row[0] if row else None
        newest = MIGRATIONS[-1].__name__
        return StateFileError(
            f"state file {self.path} was written by a newer batchrun{f' ({by})' if by else ''}: its schema has "
            f"{', '.join(unknown)}, which batchrun {__version__} does not know (it knows up to {newest}); "
            "upgrade batchrun to use it (pip install -U batchrun), or pass another --state")

    @contextlib.contextmanager
    def transaction(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction; `durable` also fsyncs it (synchronous=FULL) before returning."""
        if durable:
            self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            if self.conn.in_transaction:   # SQLite has rolled it back itself after some errors (a full disk)
                self.conn.execute("ROLLBACK")
            raise
        else:
            try:
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        finally:
            if durable:
                self.conn.execute("PRAGMA synchronous=NORMAL")

    # ---- jobs ----------------------------------------------------------------------------------
    def move_job(self, job_id: str, endpoint: str) -> None:
        """Record that a job is sent to `endpoint` (the key its planning did not yet record in full),
        its requests hashed again for it, in one transaction."""
        job = self.job(job_id)
        with self.transaction():
            self.conn.execute("UPDATE jobs SET endpoint = ? WHERE id = ?", (endpoint, job_id))
            if job["shared_params"] is not None:
                _rehash(self.conn, job_id, job["shared_params"], endpoint,
                        json.loads(job["spec"]).get("api_version") or DEFAULT_API_VERSION)
            self.event(job_id, "info", f"endpoint recorded as {endpoint}")

    def find_jobs(self, ref: Optional[str] = None) -> list[dict]:
        """Jobs by id prefix or name; all jobs when ref is None. Newest first."""
        if ref is None:
            return self.q("SELECT * FROM jobs ORDER BY created_at DESC")
        return self.q("SELECT * FROM jobs WHERE id LIKE ? OR name = ? ORDER BY created_at DESC",
                      (ref + "%", ref))

    def event(self, job_id: Optional[str], level: str, message: str) -> None:
        self.conn.execute("INSERT INTO events (job_id, at, level, message) VALUES (?, ?, ?, ?)",
                          (job_id, now_iso(), level, message))

    def unsent(self, job_id: str) -> bool:
        """True when nothing of the job was ever sent: no batch made nor intent open (an intent abandoned
        because its create certainly made no batch does not count), no row sent."""
        return not self.one("SELECT EXISTS (SELECT 1 FROM batches WHERE job_id = ? AND "
                            f"(api_id IS NOT NULL OR state != '{ABANDONED}')) OR "
                            "EXISTS (SELECT 1 FROM requests WHERE job_id = ? AND attempts > 0) AS sent",
                            (job_id, job_id))["sent"]

    def rekey_job(self, old: str, new: str, mode: str) -> bool:
        """Give a planned job that was never sent a new id and mode (a job moving to the other mode);
        False (nothing changed) if it does not exist, was sent, or `new` is taken."""
        with self.transaction():
            row = self.job(old)
            if row is None or not row["planned_at"] or self.job(new) is not None or not self.unsent(old):
                return False
            spec = json.loads(row["spec"])
            spec["mode"] = mode
            self.conn.execute("UPDATE jobs SET id = ?, mode = ?, spec = ? WHERE id = ?",
                              (new, mode, json.dumps(spec, sort_keys=True), old))
            self.conn.execute("UPDATE requests SET job_id = ? WHERE job_id = ?", (new, old))
            self.conn.execute("UPDATE events SET job_id = ? WHERE job_id = ?", (new, old))
            self.conn.execute("UPDATE batches SET job_id = ? WHERE job_id = ?", (new, old))   # (abandoned intents)
            self.event(new, "info", f"continued in {mode} mode (it was job {old[:12]}, never sent)")
        return True

    def live_others(self, job_id: str) -> list:
        """The other jobs of the state file that a run (another process) is moving now: it holds their
        lock. Asked inside the write transaction that chooses what to send, so that a job found not
        live cannot claim or send anything before that transaction ends."""
        return [r[0] for r in self.conn.execute("SELECT id FROM jobs WHERE id != ?", (job_id,))
                if JobLock(self.path, r[0]).held_elsewhere()]

