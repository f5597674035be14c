"""The SQL of planning (see batchrun/planner.py): the job's requests stored, answers reused, the run's
options (resend, retry, resume), the output written. (Planned rows and their bodies: store/bodies.py.)"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

from ..states import (ANSWERED, CANCELED, ERRORED, LOST_ERRORS, PENDING, sql_list)
from .files import api_batch_of, connect_existing, now_iso, passive_checkpoint

# what a reused answer copies from the row that was paid for
_COPIED = ("state", "text", "parsed", "stop_reason", "model", "input_tokens", "output_tokens",
           "cache_creation_input_tokens", "cache_read_input_tokens", "api_batch_id", "error_type", "error_message")
# a row that ended errored for a reason other than a lost batch or result (those only with --resend-lost)
RETRYABLE = f"state = '{ERRORED}' AND coalesce(error_type, '') NOT IN {sql_list(LOST_ERRORS)}"


def _checkpoint(path: str, started: threading.Event) -> None:
    """A PASSIVE checkpoint of the state file's WAL (see PlanQueries.checkpoint_behind); its failure (a full
    disk, say) is left to the run's own next checkpoint to meet."""
    try:
        conn = connect_existing(path)
    except sqlite3.Error:
        started.set()
        return
    try:
        started.set()
        passive_checkpoint(conn)
    finally:
        conn.close()


@dataclass
class JobFigures:
    """What an estimate of a job is made of (Planner.figures): each part read when it is used."""
    counts: dict                   # rows by state
    first: Optional[str]           # the first row's body (the job's shared parts are read from it); None: no rows
    pending: Iterable[str]         # the bodies of the rows still to send, in row order (read once, as priced)
    sizes: Optional[Iterable[tuple]] = None   # the same rows' (row_index, chars, max_tokens or None)
    bodies_of: Optional[Callable[[list], dict]] = None   # row_index -> body, of the rows asked for

    def __post_init__(self) -> None:
        if self.sizes is None:   # figures given as bodies alone: their sizes read from them
            bodies = self.pending = list(self.pending)
            self.sizes = [(i, len(body), json.loads(body).get("max_tokens")) for i, body in enumerate(bodies)]
            self.bodies_of = lambda rows: {i: bodies[i] for i in rows}


class PlanQueries:
    # ---- plan ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def checkpoint_behind(self) -> Iterator[None]:
        """Around the plan's transaction: its commit leaves the plan in the WAL rather than copying it into
        the database file and syncing both before it returns (SQLite's automatic checkpoint: ~0.1 s at 100k
        rows, between the plan and the first send). Once the plan is committed a thread does that
        checkpoint, with a connection of its own (SQLite works without the GIL) while the run goes on; this
        connection checkpoints as before after that. A checkpoint moves committed pages only: a kill at any
        point loses nothing (SQLite finishes it when the file is next opened)."""
        every = self.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        try:
            yield
            started = threading.Event()
            threading.Thread(target=_checkpoint, args=(self.path, started), name="batchrun-checkpoint",
                             daemon=True).start()
            started.wait(5)   # (its checkpoint under way: a commit here meanwhile leaves it to that one)
        finally:
            self.conn.execute(f"PRAGMA wal_autocheckpoint={int(every)}")

    def record_job(self, job_id: str, spec, fingerprint: str, endpoint: str) -> None:
        """The job's row, in the plan's transaction (the caller's), before its requests."""
        self.conn.execute(
            "INSERT OR REPLACE INTO jobs (id, name, spec, input, output, input_fingerprint, mode, model, "
            "endpoint, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, spec.name, spec.to_json(), spec.input, spec.output, fingerprint, spec.mode, spec.model,
             endpoint, now_iso()))

    def row_index_of(self, job_id: str, custom_id: str) -> Optional[int]:
        """The row of the job that has this custom_id (None: none has)."""
        row = self.conn.execute("SELECT row_index FROM requests WHERE job_id = ? AND custom_id = ?",
                                (job_id, custom_id)).fetchone()
        return row[0] if row is not None else None

    def mark_planned(self, job_id: str, rows: int, column_types: dict, shared_params: str) -> None:
        """Every row is stored: the job is planned (in the plan's transaction), with the input's column
        types pinned and the params every request shares."""
        self.conn.execute("UPDATE jobs SET planned_at = ?, rows = ?, column_types = ?, shared_params = ? "
                          "WHERE id = ?", (now_iso(), rows, json.dumps(column_types), shared_params, job_id))
        self.event(job_id, "info", f"planned {rows} requests")

    # ---- answers already paid for --------------------------------------------------------------------
    def reuse_answers(self, job_id: str) -> int:
        """Pending rows whose exact request (params_hash) another job of this state file has had answered
        and paid for take that answer, at no cost, in one transaction: not sent again. Returns how many."""
        rows = self.conn.execute(
            "SELECT r.custom_id, o.job_id, " + ", ".join(api_batch_of("o.") if c == "api_batch_id" else f"o.{c}"
                                                         for c in _COPIED) + " "
            "FROM requests r JOIN requests o ON o.params_hash = r.params_hash "
            f"AND o.state IN {sql_list(ANSWERED)} AND o.job_id != r.job_id AND o.reused_from IS NULL "
            f"WHERE r.job_id = ? AND r.state = '{PENDING}' GROUP BY r.custom_id", (job_id,)).fetchall()
        if not rows:
            return 0
        with self.transaction():
            self.conn.executemany(
                "UPDATE requests SET reused_from = ?, " + ", ".join(f"{c} = ?" for c in _COPIED) +
                ", result_type = state, cost_usd = 0.0, finished_at = ? WHERE job_id = ? AND custom_id = ?",
                [(r[1], *r[2:], now_iso(), job_id, r[0]) for r in rows])
            self.event(job_id, "info", f"{len(rows)} rows answered by earlier jobs: not sent again")
        return len(rows)

    # ---- the run's options ---------------------------------------------------------------------------
    def resend_lost(self, job_id: str) -> int:
        """--resend-lost: rows whose batch or results the API no longer has (or whose result line never
        came) go back to pending, and the job is unfinished again. Returns how many."""
        with self.transaction():
            n = self.conn.execute(
                f"UPDATE requests SET state = '{PENDING}', batch_id = NULL, api_batch_id = NULL, result_type = NULL "
                f"WHERE job_id = ? AND state = '{ERRORED}' AND error_type IN {sql_list(LOST_ERRORS)}",
                (job_id,)).rowcount
            if n:
                self.conn.execute("UPDATE jobs SET finished_at = NULL WHERE id = ?", (job_id,))
        return n

    def retry_errored(self, job_id: str) -> int:
        """--retry-errored: rows that ended errored (not lost: see RETRYABLE) go back to
        pending, their attempts afresh and their errors cleared; the job is unfinished and uncanceled
        again (its canceled rows stay canceled). Returns how many."""
        with self.transaction():
            n = self.conn.execute(
                f"UPDATE requests SET state = '{PENDING}', attempts = 0, free_sends = 0, batch_id = NULL, "
                "api_batch_id = NULL, result_type = NULL, error_type = NULL, error_message = NULL, finished_at = NULL "
                f"WHERE job_id = ? AND {RETRYABLE}", (job_id,)).rowcount
            self.conn.execute("UPDATE jobs SET finished_at = NULL, canceled_at = NULL WHERE id = ?", (job_id,))
            self.event(job_id, "info", f"--retry-errored: {n} errored rows sent again")
        return n

    def resume_canceled(self, job_id: str) -> int:
        """--resume-canceled: the job is no longer canceled, and its canceled rows go back to pending."""
        with self.transaction():
            n = self.conn.execute(f"UPDATE requests SET state = '{PENDING}', batch_id = NULL, result_type = NULL "
                                  f"WHERE job_id = ? AND state = '{CANCELED}'", (job_id,)).rowcount
            self.conn.execute("UPDATE jobs SET canceled_at = NULL, finished_at = NULL WHERE id = ?", (job_id,))
        return n

    # ---- the output ------------------------------------------------------------------------------------
    def mark_written(self, job_id: str) -> None:
        """The output is written: the job is finished (when it first was, kept) and written now."""
        with self.transaction():
            self.conn.execute("UPDATE jobs SET finished_at = coalesce(finished_at, ?), output_written_at = ? "
                              "WHERE id = ?", (now_iso(), now_iso(), job_id))

    def record_event(self, job_id: Optional[str], level: str, message: str) -> None:
        """An event of the job, committed on its own."""
        with self.transaction():
            self.event(job_id, level, message)
