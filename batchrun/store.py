"""The SQLite state: jobs, requests, batches and events, through sqlite-utils.

Every step of a job is a transaction here, committed before the next step starts; a killed run
resumes from what was committed. The schema evolves by migrations (a plain list of functions,
applied once each and recorded in `_batchrun_migrations`), so any older state file still opens.
The file is created private to its owner (0600); it never holds an API key.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import sqlite_utils

from .errors import InputError, LockedError
from .spec import DEFAULT_API_VERSION

MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = []


def migration(fn: Callable[[sqlite_utils.Database], None]) -> Callable[[sqlite_utils.Database], None]:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    _script(db, """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        name TEXT,
        spec TEXT NOT NULL,
        input TEXT NOT NULL,
        output TEXT NOT NULL,
        input_fingerprint TEXT NOT NULL,
        column_types TEXT,
        mode TEXT NOT NULL,
        model TEXT NOT NULL,
        rows INTEGER,
        created_at TEXT NOT NULL,
        planned_at TEXT,
        finished_at TEXT,
        output_written_at TEXT,
        canceled_at TEXT
    );
    CREATE TABLE requests (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        custom_id TEXT NOT NULL,
        row_index INTEGER NOT NULL,
        params_hash TEXT NOT NULL,
        body TEXT NOT NULL,
        max_cost REAL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        batch_id INTEGER,
        result_type TEXT,
        text TEXT,
        parsed TEXT,
        stop_reason TEXT,
        model TEXT,
        input_tokens INTEGER,
        output_tokens INTEGER,
        cache_creation_input_tokens INTEGER,
        cache_read_input_tokens INTEGER,
        cost_usd REAL,
        error_type TEXT,
        error_message TEXT,
        api_batch_id TEXT,
        reused_from TEXT,
        finished_at TEXT,
        PRIMARY KEY (job_id, custom_id)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX requests_row ON requests(job_id, row_index);
    CREATE INDEX requests_batch ON requests(batch_id);
    CREATE INDEX requests_params ON requests(params_hash);
    CREATE TABLE batches (
        id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id),
        api_id TEXT UNIQUE,
        state TEXT NOT NULL,
        api_status TEXT,
        request_count INTEGER NOT NULL,
        body_bytes INTEGER,
        max_cost REAL,
        intent_at TEXT NOT NULL,
        created_at TEXT,
        ended_at TEXT,
        collected_at TEXT,
        adopted INTEGER NOT NULL DEFAULT 0,
        request_counts TEXT,
        results_url TEXT,
        downloads INTEGER NOT NULL DEFAULT 0,
        note TEXT
    );
    CREATE INDEX batches_job ON batches(job_id, state);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        job_id TEXT,
        at TEXT NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL
    );
    """)


@migration
def m002_shared_params(db: sqlite_utils.Database) -> None:
    """Requests store only their own part; the part every request shares is kept once per job."""
    db.execute("ALTER TABLE jobs ADD COLUMN shared_params TEXT")


_REQUEST_COLUMNS = (
    "job_id, custom_id, row_index, params_hash, max_cost, state, attempts, batch_id, result_type, text, parsed, "
    "stop_reason, model, input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens, "
    "cost_usd, error_type, error_message, api_batch_id, reused_from, finished_at")


@migration
def m003_bodies_apart(db: sqlite_utils.Database) -> None:
    """Request bodies move to their own table, written once and never rewritten.

    In one table with the request's state, every state change and every recorded result rewrote the
    whole record, body included (a 100k-row job wrote its bodies to disk six times over). Now the
    requests table holds small rows that change; `bodies` holds the large ones that do not.
    """
    order = "row_number() OVER (ORDER BY job_id, row_index)"
    script = f"""
    CREATE TABLE bodies (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
    INSERT INTO bodies (id, body) SELECT {order}, body FROM requests;
    CREATE TABLE requests_v3 (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        custom_id TEXT NOT NULL,
        row_index INTEGER NOT NULL,
        params_hash TEXT NOT NULL,
        body_id INTEGER NOT NULL,
        max_cost REAL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        batch_id INTEGER,
        result_type TEXT,
        text TEXT,
        parsed TEXT,
        stop_reason TEXT,
        model TEXT,
        input_tokens INTEGER,
        output_tokens INTEGER,
        cache_creation_input_tokens INTEGER,
        cache_read_input_tokens INTEGER,
        cost_usd REAL,
        error_type TEXT,
        error_message TEXT,
        api_batch_id TEXT,
        reused_from TEXT,
        finished_at TEXT,
        PRIMARY KEY (job_id, custom_id)
    ) WITHOUT ROWID;
    INSERT INTO requests_v3 (body_id, {_REQUEST_COLUMNS}) SELECT {order}, {_REQUEST_COLUMNS} FROM requests;
    DROP TABLE requests;
    ALTER TABLE requests_v3 RENAME TO requests;
    CREATE UNIQUE INDEX requests_row ON requests(job_id, row_index);
    CREATE INDEX requests_batch ON requests(batch_id);
    CREATE INDEX requests_params ON requests(params_hash);
    """
    _script(db, script)


def _script(db: sqlite_utils.Database, script: str) -> None:
    """Run statements one by one inside the migration's transaction (executescript would commit it
    half-way, and a second process creating the same state file could then see half a schema)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


@migration
def m004_endpoints(db: sqlite_utils.Database) -> None:
    """The endpoint a job is sent to ("" for the Anthropic API; NULL: planned before this was kept), and
    when a batch's create failed ambiguously in a run (its batch may still appear in the list)."""
    db.execute("ALTER TABLE jobs ADD COLUMN endpoint TEXT")
    db.execute("ALTER TABLE batches ADD COLUMN ambiguous_at TEXT")


@migration
def m005_answer_scope(db: sqlite_utils.Database) -> None:
    """The API version became part of a request's identity (`requests.answer_scope`): the requests of
    jobs planned under another version than the default are hashed again, so that one is never
    answered from another version's replies while the jobs of one version still share theirs."""
    for job_id, spec, endpoint, shared in db.execute(
            "SELECT id, spec, endpoint, shared_params FROM jobs WHERE shared_params IS NOT NULL").fetchall():
        version = json.loads(spec).get("api_version") or DEFAULT_API_VERSION
        if version != DEFAULT_API_VERSION:
            _rehash(db.conn, job_id, shared, endpoint or None, version)


def _rehash(conn: sqlite3.Connection, job_id: str, shared_params: str, endpoint: Optional[str],
            api_version: str) -> None:
    """Hash a job's requests again within (endpoint, API version), as planning would hash them now."""
    from .requests import params_hash, shared_params_hash
    conn.create_function("batchrun_params_hash", 2, params_hash, deterministic=True)
    conn.execute("UPDATE requests SET params_hash = batchrun_params_hash((SELECT body FROM bodies WHERE "
                 "bodies.id = requests.body_id), ?) WHERE job_id = ?",
                 (shared_params_hash(shared_params, endpoint, api_version), job_id))


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


# what a parsed result sets on its row (results.ResultParser gives these keys)
PARSED_FIELDS = ("text", "parsed", "stop_reason", "model", "input_tokens", "output_tokens",
                 "cache_creation_input_tokens", "cache_read_input_tokens", "cost_usd", "error_type", "error_message")
RESULT_FIELDS = ("result_type",) + PARSED_FIELDS + ("api_batch_id",)
FINAL_STATES = ("succeeded", "errored", "expired", "canceled", "invalid_output")


def _make_private(fd: int, path: str) -> None:
    """Mode 0600 for a state file made by an older version or another tool, and for its WAL files
    (SQLite gives new ones the database's mode). Only the owner can change the mode: a shared file
    owned by someone else is left as it is."""
    if os.fstat(fd).st_mode & 0o077:
        try:
            os.fchmod(fd, 0o600)
        except PermissionError:
            return
    for extra in (path + "-wal", path + "-shm"):
        try:
            if os.stat(extra).st_mode & 0o077:
                os.chmod(extra, 0o600)
        except (FileNotFoundError, PermissionError):
            pass


class Store:
    """One state file. Use as a context manager or call close()."""

    def __init__(self, path: str):
        self.path = path
        p = Path(path)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                _make_private(fd, path)
            finally:
                os.close(fd)
        except OSError as exc:
            raise InputError(f"state file {path}: cannot create it ({exc.strerror or exc})") from None
        try:
            conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as exc:
            raise InputError(f"state file {path}: not a batchrun state file ({exc})") from None
        # NORMAL in WAL mode: every commit survives the process being killed; the few commits that
        # must also survive a power cut (around creating a batch) use transaction(durable=True)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA cache_size=-16384")        # 16 MiB of page cache (the default is 2 MiB)
        conn.execute("PRAGMA wal_autocheckpoint=8192")  # checkpoint every 32 MiB of WAL, not every 4 MiB
        conn.execute("PRAGMA busy_timeout=30000")
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        self._migrate()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- migrations ----------------------------------------------------------------------------
    def _migrate(self) -> None:
        with self.transaction():
            self.conn.execute("CREATE TABLE IF NOT EXISTS _batchrun_migrations (name TEXT PRIMARY KEY, applied_at TEXT)")
            done = {r[0] for r in self.conn.execute("SELECT name FROM _batchrun_migrations")}
            for fn in MIGRATIONS:
                if fn.__name__ not in done:
                    fn(self.db)
                    self.conn.execute("INSERT INTO _batchrun_migrations VALUES (?, ?)", (fn.__name__, now_iso()))

    @contextlib.contextmanager
    def transaction(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction; `durable` also fsyncs it (synchronous=FULL) before returning."""
        if durable:
            self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")
        finally:
            if durable:
                self.conn.execute("PRAGMA synchronous=NORMAL")

    def q(self, sql: str, params: Iterable = ()) -> list[sqlite3.Row]:
        cur = self.conn.execute(sql, tuple(params))
        cols = [d[0] for d in cur.description] if cur.description else []
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def one(self, sql: str, params: Iterable = ()):
        rows = self.q(sql, params)
        return rows[0] if rows else None

    # ---- jobs ----------------------------------------------------------------------------------
    def job(self, job_id: str) -> Optional[dict]:
        return self.one("SELECT * FROM jobs WHERE id = ?", (job_id,))

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

    # ---- requests ------------------------------------------------------------------------------
    def params(self, job_id: Optional[str] = None) -> Iterator[tuple[str, str, dict]]:
        """(job_id, custom_id, full params) of stored requests, in row order."""
        from .requests import full_body, splice_prefix
        prefixes = {j["id"]: (splice_prefix(json.loads(j["shared_params"])) if j["shared_params"] else None)
                    for j in self.q("SELECT id, shared_params FROM jobs")}
        sql = "SELECT r.job_id, r.custom_id, b.body FROM requests r JOIN bodies b ON b.id = r.body_id"
        args: tuple = ()
        if job_id:
            sql, args = sql + " WHERE r.job_id = ?", (job_id,)
        for jid, cid, body in self.conn.execute(sql + " ORDER BY r.job_id, r.row_index", args):
            yield jid, cid, json.loads(full_body(prefixes.get(jid), body))

    def counts(self, job_id: str) -> dict:
        return {r["state"]: r["n"] for r in
                self.q("SELECT state, count(*) AS n FROM requests WHERE job_id = ? GROUP BY state", (job_id,))}


class JobLock:
    """An advisory lock on one job in one state file, released by the OS if the process dies.

    One small file per job under `<state>.locks/`, locked with flock: the lock belongs to the open
    file, so probing another job's lock (see `held_elsewhere`) never drops one this process holds,
    as POSIX record locks would.
    """

    def __init__(self, state_path: str, job_id: str):
        self.dir = state_path + ".locks"
        self.path = os.path.join(self.dir, job_id[:32] + ".lock")
        self.fd: Optional[int] = None

    def acquire(self, wait: bool = False) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise LockedError("another batchrun run holds this job (same state file); "
                              "wait for it to finish, or pass --wait-lock to queue behind it") from None

    def held_elsewhere(self) -> bool:
        """True while another process holds this job's lock (a run is moving it now)."""
        try:
            self.acquire(wait=False)
        except LockedError:
            return True
        self.release()
        return False

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "JobLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
