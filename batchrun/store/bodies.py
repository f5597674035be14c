"""The SQL of planned rows as a BodySource takes them (see batchrun/bodies.py).

A row planned since issue #17 has no stored body (`requests.body_id` is NOT_STORED): its body is
rendered again from the job's input. A row of a state file planned before keeps its body in `bodies`.
Every reading of planned rows selects the same columns, the stored body or NULL (`PLANNED_ROW`), so
that one BodySource gives the bodies of both kinds.
"""
from __future__ import annotations

import functools
import json
import sqlite3
from typing import Iterator, Optional

from ..states import PENDING
from .plan import RETRYABLE

NOT_STORED = 0   # requests.body_id of a row whose body is not stored (bodies' ids start at 1)

# a planned row: (row_index, custom_id, params_hash, its stored body or NULL), from requests `r`
PLANNED_ROW = "r.row_index, r.custom_id, r.params_hash, b.body"
PLANNED_FROM = "requests r LEFT JOIN bodies b ON b.id = r.body_id"


@functools.lru_cache(maxsize=16)
def _insert_planned(rows: int) -> str:
    """INSERT of `rows` planned rows. A block's rows go in statements of 2**j rows (1400: 1024 + 256 + 64 +
    ...): at most a dozen statements a block and a dozen texts in all, for sqlite3's cache of prepared
    statements, which keeps each one it runs (a statement of 1,400 rows is ~0.7 MB prepared: one for each
    count of rows a block happens to have grew the plan's memory by ~55 MiB at 100k rows)."""
    return ("INSERT INTO requests (job_id, custom_id, row_index, params_hash, chars, max_tokens, body_id) VALUES "
            + ",".join(["(?,?,?,?,?,?,?)"] * rows))


def _rows_per_insert(conn: sqlite3.Connection) -> int:
    """Rows in one INSERT: within SQLite's limit on a statement's parameters (32,766 since 3.32; 999 before,
    and where Python cannot ask: before 3.11)."""
    limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if hasattr(conn, "getlimit") else 999
    return 1 << min(10, (limit // 7).bit_length() - 1)   # (a power of two: 1024, or 128 with 999)


class BodyQueries:
    def planned_rows(self, job_id: Optional[str] = None, *, state: Optional[str] = None,
                     batch: Optional[int] = None, retryable: bool = False, limit: Optional[int] = None
                     ) -> Iterator[tuple]:
        """The planned rows (PLANNED_ROW) of a job or of a batch, in row order: those in `state`, or
        (`retryable`) those that ended errored for another reason than a lost batch or result; at most
        `limit`. Read as iterated (a BodySource gives their bodies)."""
        where, args = [], []
        for column, value in (("r.job_id", job_id), ("r.batch_id", batch), ("r.state", state)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if retryable:
            where.append(RETRYABLE)   # (bodies has no column of its names: unambiguous)
        sql = (f"SELECT {PLANNED_ROW} FROM {PLANNED_FROM}" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY r.row_index" + (f" LIMIT {int(limit)}" if limit is not None else ""))
        yield from self.conn.execute(sql, args)

    def pending_sizes(self, job_id: str) -> Iterator[tuple]:
        """(row_index, chars, max_tokens or None) of the job's pending rows, in row order, as iterated: what
        an estimate reads of each row (a stored body's own length and max_tokens where the row has none)."""
        yield from self.conn.execute(
            "SELECT r.row_index, coalesce(r.chars, length(b.body)), "
            f"coalesce(r.max_tokens, json_extract(b.body, '$.max_tokens')) FROM {PLANNED_FROM} "
            f"WHERE r.job_id = ? AND r.state = '{PENDING}' ORDER BY r.row_index", (job_id,))

    def planned_rows_at(self, job_id: str, rows: list) -> list:
        """The planned rows (PLANNED_ROW) of the job at these row indexes, in row order."""
        found = []
        for k in range(0, len(rows), 500):
            marks = ",".join("?" * len(rows[k:k + 500]))
            found += self.conn.execute(f"SELECT {PLANNED_ROW} FROM {PLANNED_FROM} WHERE r.job_id = ? AND "
                                       f"r.row_index IN ({marks})", (job_id, *rows[k:k + 500])).fetchall()
        return sorted(found)

    def insert_planned(self, records: list) -> None:
        """One block of planned rows, in the plan's transaction: (job_id, custom_id, row_index, params_hash,
        chars, max_tokens[, body]) each, `body` None or left out (not stored: rendered again) or the body the
        plan keeps (RequestBuilder.keeps_body). Raises sqlite3.IntegrityError on a custom_id the job already
        has (and stores none of the statement's rows). Many rows a statement: SQLite inserts them in one step,
        without the GIL (the plan renders the next block meanwhile, see Planner._plan_rows)."""
        kept = [r[6] for r in records if len(r) > 6 and r[6] is not None]
        if kept:
            base = self.conn.execute("SELECT coalesce(max(id), 0) + 1 FROM bodies").fetchone()[0]
            self.conn.executemany("INSERT INTO bodies (id, body) VALUES (?, ?)",
                                  ((base + k, body) for k, body in enumerate(kept)))
            ids = iter(range(base, base + len(kept)))
            records = [(*r[:6], NOT_STORED if len(r) < 7 or r[6] is None else next(ids)) for r in records]
        k, most = 0, _rows_per_insert(self.conn)
        while k < len(records):
            n = min(most, 1 << (len(records) - k).bit_length() - 1)   # 2**j rows (see _insert_planned)
            self.conn.execute(_insert_planned(n), [v for r in records[k:k + n]
                                                   for v in (*r[:6], r[6] if kept else NOT_STORED)])
            k += n

    def params(self, job_id: Optional[str] = None) -> Iterator[tuple[str, str, dict]]:
        """(job_id, custom_id, full params) of planned requests (of one job, or of every job), in row order:
        stored bodies as stored, the others rendered again from their job's input (see bodies.BodySource)."""
        from ..bodies import BodySource
        from ..requests import full_body, splice_prefix
        jobs = self.q("SELECT * FROM jobs" + (" WHERE id = ?" if job_id else "") + " ORDER BY id",
                      (job_id,) if job_id else ())
        for job in jobs:
            if not job["planned_at"]:
                continue
            prefix = splice_prefix(json.loads(job["shared_params"])) if job["shared_params"] else None
            source = BodySource.of_stored_job(job)
            try:
                for _, cid, body in source.bodies(self.planned_rows(job["id"])):
                    yield job["id"], cid, json.loads(full_body(prefix, body))
            finally:
                source.close()
