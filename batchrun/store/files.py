"""The state file on disk: made private, recognised as batchrun's, its errors told in one line, and the
per-job locks beside it."""
from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import errno
import os
import sqlite3
import stat
import time
import urllib.parse
from pathlib import Path
from typing import Iterator, Optional

from ..errors import BatchrunError, DiskError, InputError, LockedError, NoSpaceError, StateFileError


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


# what a parsed result sets on its row (results.ResultParser gives these keys)
PARSED_FIELDS = ("text", "parsed", "stop_reason", "model", "input_tokens", "output_tokens",
                 "cache_creation_input_tokens", "cache_read_input_tokens", "cache_creation_5m_input_tokens",
                 "cache_creation_1h_input_tokens", "cost_usd", "error_type", "error_message")
RESULT_FIELDS = ("result_type",) + PARSED_FIELDS + ("api_batch_id",)


def api_batch_of(alias: str = "") -> str:
    """SQL of the id the API gave the batch a row was last sent in (`alias`: the requests table's, with its
    dot). A row keeps its batch (batch_id) when it ends, and its batch's id is read from there; the id is
    stored on the row itself (requests.api_batch_id) when its result is recorded (a row may leave its batch
    to be sent again), when it reuses another job's answer, and by earlier versions when the batch was
    created (which rewrote every row of every batch once more: ~0.17 s at 100k rows); an intent clears it."""
    return (f"coalesce({alias}api_batch_id, (SELECT api_id FROM batches WHERE batches.id = {alias}batch_id))")


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


def connect_existing(path: str) -> sqlite3.Connection:
    """A connection of its own to a state file a Store has open (for a thread beside the Store's): read-write,
    never created — a state file gone meanwhile is not made again, empty."""
    return sqlite3.connect("file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=rw", uri=True,
                           timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)


def passive_checkpoint(conn: sqlite3.Connection) -> None:
    """Copy what the WAL holds into the file, without waiting for anyone (PASSIVE); not done (a full disk,
    say): the Store's own next checkpoint, or its close, does it, as it always did."""
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.Error:
        pass


# 16 KiB pages, not SQLite's 4 KiB: a request's row is ~450 bytes once its result is in, and the job's rows
# are read and written in long runs (issue #17, 100k rows: the plan's inserts, the results' updates and a
# full scan 8-25% cheaper than with 4 KiB; 32 and 64 KiB gain little more and make every small commit write
# more)
PAGE_SIZE = 16384


def _use_wal(conn: sqlite3.Connection, patience: float = BUSY_TIMEOUT) -> None:
    """Put the state file in WAL mode (it stays so). Switching needs the file to itself, and SQLite does
    not wait for that with the busy timeout: two runs opening a new state file at the same moment (two
    cron lines) would see "database is locked". So the switch is tried again, for up to `patience`."""
    deadline = time.monotonic() + patience
    delay = 0.005
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                # a new state file gets pages of PAGE_SIZE (a file with anything in it keeps its own)
                conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
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
