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
import contextvars
import datetime as dt
import errno
import json
import os
import sqlite3
import stat
import time
import urllib.parse
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from . import __version__
from .errors import BatchrunError, DiskError, InputError, LockedError, NoSpaceError, StateFileError
from .spec import DEFAULT_API_VERSION

# (each migration gets the connection, inside the transaction that records it; not sqlite-utils,
# which imports pandas: ~0.3 s of start-up for `batchrun status`)
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = []


def migration(fn: Callable[[sqlite3.Connection], None]) -> Callable[[sqlite3.Connection], None]:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite3.Connection) -> None:
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
def m002_shared_params(db: sqlite3.Connection) -> None:
    """Requests store only their own part; the part every request shares is kept once per job."""
    db.execute("ALTER TABLE jobs ADD COLUMN shared_params TEXT")


_REQUEST_COLUMNS = (
    "job_id, custom_id, row_index, params_hash, max_cost, state, attempts, batch_id, result_type, text, parsed, "
    "stop_reason, model, input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens, "
    "cost_usd, error_type, error_message, api_batch_id, reused_from, finished_at")


@migration
def m003_bodies_apart(db: sqlite3.Connection) -> None:
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


def _script(db: sqlite3.Connection, script: str) -> None:
    """Run statements one by one inside the migration's transaction (executescript would commit it
    half-way, and a second process creating the same state file could then see half a schema)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


@migration
def m004_endpoints(db: sqlite3.Connection) -> None:
    """The endpoint a job is sent to ("" for the Anthropic API; NULL: planned before this was kept), and
    when a batch's create failed ambiguously in a run (its batch may still appear in the list)."""
    db.execute("ALTER TABLE jobs ADD COLUMN endpoint TEXT")
    db.execute("ALTER TABLE batches ADD COLUMN ambiguous_at TEXT")


@migration
def m005_answer_scope(db: sqlite3.Connection) -> None:
    """The API version became part of a request's identity (`requests.answer_scope`): the requests of
    jobs planned under another version than the default are hashed again, so that one is never
    answered from another version's replies while the jobs of one version still share theirs."""
    for job_id, spec, endpoint, shared in db.execute(
            "SELECT id, spec, endpoint, shared_params FROM jobs WHERE shared_params IS NOT NULL").fetchall():
        version = json.loads(spec).get("api_version") or DEFAULT_API_VERSION
        if version != DEFAULT_API_VERSION:
            _rehash(db, job_id, shared, endpoint or None, version)


def _rehash(conn: sqlite3.Connection, job_id: str, shared_params: str, endpoint: Optional[str],
            api_version: str) -> None:
    """Hash a job's requests again within (endpoint, API version), as planning would hash them now."""
    from .requests import params_hash, shared_params_hash
    conn.create_function("batchrun_params_hash", 2, params_hash, deterministic=True)
    conn.execute("UPDATE requests SET params_hash = batchrun_params_hash((SELECT body FROM bodies WHERE "
                 "bodies.id = requests.body_id), ?) WHERE job_id = ?",
                 (shared_params_hash(shared_params, endpoint, api_version), job_id))


@migration
def m006_job_tags(db: sqlite3.Connection) -> None:
    """Never pay twice, never take another job's batch:
    - `jobs.tag`: a short random tag of the job, sent in every custom_id of its batches (`<tag>-<id>`), so
      a batch whose create reply was lost is proved to be this job's by its results (NULL: planned
      before tags; one is given at its next submit);
    - `batches.tag`: the tag the batch's custom_ids were sent with (NULL: sent as planned, untagged);
    - `batches.short_downloads`: whole downloads of its results in a row that lacked rows and brought
      none of them (a result line that never arrives ends `result_missing` after a few);
    - `foreign_batches`: batches a lost create's search found and proved not to be that intent's
      (another job's, or another batch of this job), never looked at again for it."""
    db.execute("ALTER TABLE jobs ADD COLUMN tag TEXT")
    db.execute("ALTER TABLE batches ADD COLUMN tag TEXT")
    db.execute("ALTER TABLE batches ADD COLUMN short_downloads INTEGER NOT NULL DEFAULT 0")
    db.execute("CREATE TABLE foreign_batches (api_id TEXT NOT NULL, batch_id INTEGER NOT NULL, "
               "noted_at TEXT NOT NULL, PRIMARY KEY (api_id, batch_id))")


@migration
def m007_free_sends(db: sqlite3.Connection) -> None:
    """Per request, how many of its sends came back with an error that was the service's, not the
    request's (errors.error_class): those never count against max_attempts."""
    db.execute("ALTER TABLE requests ADD COLUMN free_sends INTEGER NOT NULL DEFAULT 0")


@migration
def m008_cache_primers(db: sqlite3.Connection) -> None:
    """Which batches were sent alone to prime the prompt cache before the rest of their job."""
    db.execute("ALTER TABLE batches ADD COLUMN primer INTEGER NOT NULL DEFAULT 0")


@migration
def m009_message_claims(db: sqlite3.Connection) -> None:
    """`requests.claimed_at`: when a messages-mode run claimed the pending row to send it (NULL once that
    run is over). Chosen and claimed in one write-locked transaction, so that another job of the state
    file sharing the request, started at the same moment, sees it taken and waits for its answer
    instead of buying it too (see Store.claim_for_messages)."""
    db.execute("ALTER TABLE requests ADD COLUMN claimed_at TEXT")
    db.execute("CREATE INDEX requests_claimed ON requests(job_id) WHERE claimed_at IS NOT NULL")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


# what a parsed result sets on its row (results.ResultParser gives these keys)
PARSED_FIELDS = ("text", "parsed", "stop_reason", "model", "input_tokens", "output_tokens",
                 "cache_creation_input_tokens", "cache_read_input_tokens", "cost_usd", "error_type", "error_message")
RESULT_FIELDS = ("result_type",) + PARSED_FIELDS + ("api_batch_id",)
FINAL_STATES = ("succeeded", "errored", "expired", "canceled", "invalid_output")
# error types of rows that ended errored without their result (batch 404, results gone, a result line that never
# came, a lost create's candidate that cannot be proved the job's): they may have been paid for, so they are
# sent again only with --resend-lost
LOST_ERRORS = ("batch_not_found", "results_gone", "result_missing", "batch_unproven")
LOST_ERRORS_SQL = "(" + ", ".join(f"'{e}'" for e in LOST_ERRORS) + ")"


def _make_private(fd: int, path: str) -> None:
    """Mode 0600 for a state file made by an older version, and for its WAL files (SQLite gives new ones
    the database's mode). Only the owner can change the mode: a shared file owned by someone else is
    left as it is. Called only once the file is known to be batchrun's (see `recognise`); the WAL files
    are never symbolic links by then (see `_refuse_links`)."""
    if os.fstat(fd).st_mode & 0o077:
        try:
            os.fchmod(fd, 0o600)
        except PermissionError:
            return
    for extra in (path + "-wal", path + "-shm"):
        try:
            if os.stat(extra, follow_symlinks=False).st_mode & 0o077:
                os.chmod(extra, 0o600)
        except (FileNotFoundError, PermissionError):
            pass


# The mark of a batchrun state file in its SQLite header (PRAGMA application_id): "btrn".
APPLICATION_ID = int.from_bytes(b"btrn", "big")
SQLITE_MAGIC = b"SQLite format 3\x00"
MIGRATIONS_TABLE = "_batchrun_migrations"
BUSY_TIMEOUT = 30.0                # seconds a statement waits for another process's write to the state file
META_TABLE = "_batchrun_meta"      # key/value: the batchrun version that last changed the schema
# the state file the current command uses (set when it is opened), named by `state_error`
_CURRENT: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("batchrun_state", default=None)


def _refuse_links(path: str) -> None:
    """A state file (or its WAL, shared-memory or journal file) that is a symbolic link, or not a regular
    file, is refused: following it would create, chmod or write the file it points to."""
    for name in (path, path + "-wal", path + "-shm", path + "-journal"):
        try:
            mode = os.lstat(name).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StateFileError(f"state file {path}: cannot read it ({exc.strerror or exc})") from None
        if stat.S_ISLNK(mode):
            raise StateFileError(f"state file {name} is a symbolic link (to {os.readlink(name)}): batchrun does not "
                                 "follow links for its state file and left it as it is; pass the file's own path "
                                 "as --state")
        if not stat.S_ISREG(mode):
            raise StateFileError(f"state file {name} is not a regular file; pass a file path as --state")


def recognise(path: str) -> None:
    """Refuse an existing file that is not a batchrun state file, before anything in it changes.

    A batchrun state file bears APPLICATION_ID; one made before the mark was kept is known by its
    migrations table. An empty file (0 bytes, or a SQLite database with no tables at all) holds nothing
    to lose: it becomes a new state file (a first run stopped before it wrote anything leaves one).
    Everything else — another program's database, a file that is not SQLite — is refused as it is.
    """
    with open(path, "rb") as f:
        head = f.read(100)
    if not head:
        return
    if not (head.startswith(SQLITE_MAGIC) or SQLITE_MAGIC.startswith(head)):
        raise StateFileError(f"{path} is not a batchrun state file (not a SQLite database; if it was a state "
                             "file, it is damaged: restore it from a backup); it was left as it is: pass another "
                             "--state")
    if len(head) < 100:   # its first page is being written by another batchrun process: SQLite's locks decide
        return
    app_id = int.from_bytes(head[68:72], "big", signed=True)
    if app_id == APPLICATION_ID:
        return
    if app_id == 0:
        tables = _tables_read_only(path)
        if MIGRATIONS_TABLE in tables:            # made by a batchrun older than the mark
            return
        if not tables and int.from_bytes(head[60:64], "big") == 0:
            return                                # an empty database (user_version 0): nothing in it to lose
        what = f"tables {', '.join(sorted(tables)[:4])}{', …' if len(tables) > 4 else ''}" if tables \
            else "no batchrun tables"
    else:
        what = f"application_id {app_id:#010x}"
    raise StateFileError(f"{path} is not a batchrun state file (a SQLite database of another program: {what}); "
                         "batchrun left it as it is: pass another --state")


def _tables_read_only(path: str) -> set:
    """The table names of a SQLite file, read without changing it (read-only; immutable when it has no
    WAL file beside it, so that SQLite creates none)."""
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    if not os.path.lexists(path + "-wal"):
        uri += "&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=30.0)
        try:
            return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise state_error(exc, path) or StateFileError(
            f"{path}: cannot be read as a batchrun state file ({exc}); it was left as it is") from None


def state_error(exc: BaseException, path: Optional[str] = None) -> Optional[BatchrunError]:
    """The one line for a failure of the state file (`path`, by default the current command's): damaged,
    no space left on the disk, a disk I/O error. None for any other error."""
    path = path or _CURRENT.get() or "the state file"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return NoSpaceError(exc.filename if isinstance(exc.filename, str) else path)
    if not isinstance(exc, sqlite3.DatabaseError):
        return None
    name = getattr(exc, "sqlite_errorname", None) or ""
    text = str(exc)
    if name == "SQLITE_FULL" or "database or disk is full" in text:
        return NoSpaceError(path)
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text or "not a database" in text:
        return StateFileError(f"state file {path} is damaged ({text}); it was not changed any further. Restore it "
                              f"from a backup (`sqlite3 {path} .recover` may rescue what it holds); with a new "
                              "state file, rows not yet finished would be sent, and paid for, again")
    if name.startswith("SQLITE_BUSY") or "database is locked" in text:
        return LockedError(f"state file {path} is busy: another process kept it locked for more than "
                           f"{BUSY_TIMEOUT:.0f} s; what was committed is kept: run again")
    if name.startswith("SQLITE_IOERR") or "disk I/O error" in text:
        if _nearly_full(path):
            return NoSpaceError(path)
        return DiskError(f"state file {path}: the disk failed a read or write ({text}); what was committed is "
                         "kept: check the disk, then run again")
    return None


def _nearly_full(path: str) -> bool:
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)) or ".")
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1024 * 1024


@contextlib.contextmanager
def state_errors(path: Optional[str] = None) -> Iterator[None]:
    """Turn a damaged state file, a full disk or a disk I/O error met inside into its one line (see
    `state_error`); every other error passes through unchanged."""
    try:
        yield
    except (sqlite3.DatabaseError, OSError) as exc:
        translated = state_error(exc, path)
        if translated is None:
            raise
        raise translated from None


def _create(path: str) -> bool:
    """Create the state file (mode 0600) unless it exists; True when it was created here."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise NoSpaceError(path) from None
        raise InputError(f"state file {path}: cannot create it ({exc.strerror or exc})") from None
    os.close(fd)
    return True


def _use_wal(conn: sqlite3.Connection, patience: float = BUSY_TIMEOUT) -> None:
    """Put the state file in WAL mode (it stays so). Switching needs the file to itself, and SQLite does
    not wait for that with the busy timeout: two runs opening a new state file at the same moment (two
    cron lines) would see "database is locked". So the switch is tried again, for up to `patience`."""
    deadline = time.monotonic() + patience
    delay = 0.005
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def existing_state(path: str) -> None:
    """Refuse, for a command that only reads a state file (status, jobs, report, a job by id), a path with
    no state in it: none there, or an empty file (which opening as a Store would make a state file of)."""
    if not os.path.lexists(path):   # (a symbolic link, even a dangling one, is refused by Store)
        raise InputError(f"state file {path} does not exist (pass --state PATH)")
    if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) == 0:
        raise InputError(f"state file {path} is empty: it holds no job (batchrun left it as it is; pass the "
                         "state file of a job as --state)")


class Store:
    """One state file. Use as a context manager or call close()."""

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

    def __enter__(self) -> "Store":
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

    def unsent(self, job_id: str) -> bool:
        """True when nothing of the job was ever sent: no batch made nor intent open (an intent abandoned
        because its create certainly made no batch does not count), no row sent."""
        return not self.one("SELECT EXISTS (SELECT 1 FROM batches WHERE job_id = ? AND "
                            "(api_id IS NOT NULL OR state != 'abandoned')) OR "
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

    def drop_intent(self, local: int) -> None:
        """A batch intent whose create certainly made no batch, dropped as if never made: its rows pending."""
        with self.transaction():
            self.conn.execute("UPDATE requests SET state = 'pending', batch_id = NULL, api_batch_id = NULL, "
                              "attempts = max(attempts - 1, 0) WHERE batch_id = ? AND state = 'in_flight'", (local,))
            self.conn.execute("DELETE FROM batches WHERE id = ?", (local,))

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

    # ---- the prompt cache --------------------------------------------------------------------------
    def mark_primer(self, batch: int) -> None:
        """Record that this batch (an intent) primes its job's cache (in the intent's own transaction)."""
        self.conn.execute("UPDATE batches SET primer = 1 WHERE id = ?", (batch,))

    def primer_requests(self, job_id: str) -> int:
        """Requests of the job's primer batches not collected yet (the rest of the job waits for them)."""
        return self.one("SELECT coalesce(sum(request_count), 0) AS n FROM batches WHERE job_id = ? AND primer = 1 "
                        "AND state IN ('intent', 'submitted', 'ended')", (job_id,))["n"]

    def cache_history(self, job_id: str) -> dict:
        """What the job's batches tell about its prompt cache (see Runner._priming):
        touched_at: the latest intent of a collected batch whose replies wrote or read the cache;
        recent: its latest batches (not abandoned), newest first, as (primer, collected, answered, touched)."""
        touched = ("EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.id AND "
                   "coalesce(r.cache_creation_input_tokens, 0) + coalesce(r.cache_read_input_tokens, 0) > 0)")
        answered = ("EXISTS (SELECT 1 FROM requests r WHERE r.batch_id = b.id "
                    "AND r.state IN ('succeeded', 'invalid_output'))")
        at = self.one(f"SELECT max(b.intent_at) AS at FROM batches b WHERE b.job_id = ? AND b.state = 'collected' "
                      f"AND {touched}", (job_id,))["at"]
        recent = [(bool(r[0]), r[1] == "collected", bool(r[2]), bool(r[3])) for r in self.conn.execute(
            f"SELECT b.primer, b.state, {answered}, {touched} FROM batches b WHERE b.job_id = ? "
            "AND b.state NOT IN ('abandoned', 'foreign') ORDER BY b.id DESC LIMIT 5", (job_id,))]
        return {"touched_at": at, "recent": recent}

    # Another job's row whose exact request (params_hash) is ours: answered (reused instead of sent), or
    # being sent by a run that moves that job now (in flight in a batch, or claimed in messages mode).
    _TAKEN = ("EXISTS (SELECT 1 FROM requests o WHERE o.params_hash = r.params_hash AND o.job_id != r.job_id "
              "AND o.reused_from IS NULL AND (o.state IN ('succeeded', 'invalid_output') OR ((o.state = 'in_flight' "
              "OR o.claimed_at IS NOT NULL) AND o.job_id IN ({live}))))")

    def claim_for_messages(self, job_id: str, after: int, limit: int) -> list:
        """Messages mode: the next pending rows of the job (row_index > after, in order), each claimed
        for this run before it is sent, in one write-locked transaction with the check that no other job
        of the state file has the same request answered or being sent now (a run holds that job's lock).
        Rows so taken are left pending: the other job's answer is reused, or they are sent once no run
        moves it. Returns (row_index, custom_id, body) rows."""
        sql = ("SELECT r.row_index, r.custom_id, b.body FROM requests r JOIN bodies b ON b.id = r.body_id "
               "WHERE r.job_id = ? AND r.state = 'pending' AND r.row_index > ? {taken}ORDER BY r.row_index LIMIT ?")
        with self.transaction():
            if self.one("SELECT EXISTS (SELECT 1 FROM jobs WHERE id != ?) AS n", (job_id,))["n"]:
                live = self.live_others(job_id)
                taken = "AND NOT " + self._TAKEN.format(live=",".join("?" * len(live))) + " "
                page = self.conn.execute(sql.format(taken=taken), (job_id, after, *live, limit)).fetchall()
            else:   # alone: still claimed, for a job planned a moment later to see
                page = self.conn.execute(sql.format(taken=""), (job_id, after, limit)).fetchall()
            now = now_iso()
            self.conn.executemany("UPDATE requests SET claimed_at = ? WHERE job_id = ? AND custom_id = ?",
                                  [(now, job_id, row[1]) for row in page])
        return page

    def live_others(self, job_id: str) -> list:
        """The other jobs of the state file that a run (another process) is moving now: it holds their
        lock. Asked inside the write transaction that chooses what to send, so that a job found not
        live cannot claim or send anything before that transaction ends."""
        return [r[0] for r in self.conn.execute("SELECT id FROM jobs WHERE id != ?", (job_id,))
                if JobLock(self.path, r[0]).held_elsewhere()]

    def release_claims(self, job_id: str) -> None:
        """A messages-mode run is over: its rows are no longer being sent (the ones still pending wait for
        the next run)."""
        with self.transaction():
            self.conn.execute("UPDATE requests SET claimed_at = NULL WHERE job_id = ? AND claimed_at IS NOT NULL",
                              (job_id,))

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

    PROBE_GRACE = 0.25   # seconds a run keeps trying a lock that another job's run may be probing

    def acquire(self, wait: bool = False, probe: bool = False) -> None:
        """Take the lock (`wait`: until it is free). `probe`: another job's lock, taken only if free now."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        if not os.path.islink(self.dir):
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
        if os.path.islink(self.dir) or not os.path.isdir(self.dir):
            raise StateFileError(f"{self.dir} is not a directory of batchrun's own (a symbolic link or a file): "
                                 "batchrun keeps its job locks there and does not follow links; move it aside")
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise StateFileError(f"{self.path} is a symbolic link: batchrun does not follow links for its job "
                                 "locks and left it as it is; remove it") from None
        # another job's run may be probing this lock (held_elsewhere) for a moment: a run is refused only
        # once the lock stays taken a little while, so a probe never makes it exit as if another run held it
        deadline = time.monotonic() + (0.0 if probe else self.PROBE_GRACE)
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                return
            except OSError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
            os.close(self.fd)
            self.fd = None
            raise LockedError("another batchrun run holds this job (same state file); "
                              "wait for it to finish, or pass --wait-lock to queue behind it") from None

    def held_elsewhere(self) -> bool:
        """True while another process holds this job's lock (a run is moving it now)."""
        try:
            self.acquire(wait=False, probe=True)
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
