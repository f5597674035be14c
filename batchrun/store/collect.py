"""The SQL of polling and collecting (see batchrun/collector.py): batches that ended, results recorded,
batches collected.

Each result makes its row final at once — or pending again when it failed in a way worth another attempt
(a transient error type, or expired) and attempts remain, or when the error was the service's (sent again
without using an attempt). Rows of a batch still in flight are the ones whose result has not come back yet.
"""
from __future__ import annotations

import json
from typing import Iterable, Optional

from ..states import COLLECTED, ENDED, IN_FLIGHT, LIVE_BATCHES, PENDING, SUBMITTED, sql_list
from .batches import Batch
from .files import PARSED_FIELDS, now_iso

# (Final rows keep their batch_id: leaving it out of the SET spares an index update per row.)
# (the batch's API id stored on the row, which may leave the batch: see files.api_batch_of)
_FIELDS_SQL = ("UPDATE requests SET result_type = ?, " + ", ".join(f"{f} = ?" for f in PARSED_FIELDS)
               + ", api_batch_id = ?")
_WHERE_SQL = f" WHERE job_id = ? AND custom_id = ? AND batch_id = ? AND state = '{IN_FLIGHT}'"
_FINAL = _FIELDS_SQL + ", state = ?, finished_at = ?" + _WHERE_SQL
_RETRY = (_FIELDS_SQL + f", state = CASE WHEN attempts - free_sends < ? THEN '{PENDING}' ELSE ? END, "
          "batch_id = CASE WHEN attempts - free_sends < ? THEN NULL ELSE batch_id END, finished_at = ?" + _WHERE_SQL)
_FREE = (_FIELDS_SQL + f", state = '{PENDING}', batch_id = NULL, free_sends = free_sends + 1, finished_at = ?"
         + _WHERE_SQL)


class CollectQueries:
    def batches_to_poll(self, job_id: str) -> list[Batch]:
        """The job's batches the API has and that are not collected yet (submitted or ended), oldest first."""
        return [Batch.of(b) for b in self.q(f"SELECT * FROM batches WHERE job_id = ? AND state IN "
                                            f"{sql_list((SUBMITTED, ENDED))} ORDER BY id", (job_id,))]

    def record_status(self, local: int, info: dict) -> bool:
        """What a retrieve told of the batch (status, counts, results URL, end); it is `ended` once the
        API says so. Returns whether it has ended."""
        ended = info.get("processing_status") == "ended"
        with self.transaction():
            self.conn.execute(
                "UPDATE batches SET api_status = ?, request_counts = ?, results_url = ?, ended_at = ?, "
                "state = ? WHERE id = ?",
                (info.get("processing_status"), json.dumps(info.get("request_counts")),
                 info.get("results_url"), info.get("ended_at"), ENDED if ended else SUBMITTED, local))
        return ended

    def set_results_url(self, local: int, url: str) -> None:
        """An ended batch's results URL, given late."""
        self.conn.execute("UPDATE batches SET results_url = ? WHERE id = ?", (url, local))

    def members(self, local: int) -> int:
        """How many rows batch `local` carries (answered or not)."""
        return self.one("SELECT count(*) AS n FROM requests WHERE batch_id = ?", (local,))["n"]

    def count_download(self, local: int) -> None:
        """One more download of batch `local`'s results begins."""
        self.conn.execute("UPDATE batches SET downloads = downloads + 1 WHERE id = ?", (local,))

    def set_short_downloads(self, local: int, n: int) -> None:
        """Whole downloads in a row of batch `local` that came back the same without the rows still missing."""
        self.conn.execute("UPDATE batches SET short_downloads = ? WHERE id = ?", (n, local))

    def mark_proven(self, local: int, adopted: int) -> None:
        """A batch adopted without proof is proved the intent's by its results."""
        self.conn.execute("UPDATE batches SET adopted = ? WHERE id = ?", (adopted, local))

    def record_results(self, job_id: str, local: int, max_attempts: int, final: Iterable, retry: Iterable,
                       free: Iterable, now: Optional[str] = None) -> int:
        """Record results of batch `local`, each (custom_id, fields) with the fields a ResultParser gives, in
        one transaction: `final` make their row final (its state the result's); `retry` failed in a way worth
        another attempt: pending again while the row's attempts (not counting free sends) are below
        `max_attempts`, else final; `free` met the service's error, not the request's: pending again, no
        attempt used. A row no longer in flight in this batch is left as it is (recorded twice: no change).
        Returns how many rows it recorded: each is out of flight now."""
        now = now or now_iso()
        api_id = (self.one("SELECT api_id FROM batches WHERE id = ?", (local,)) or {}).get("api_id")
        # (the parameters made before the transaction, in lists: one pass in C per statement)
        fields = ("state", *PARSED_FIELDS)
        finals = [(*map(f.get, fields), api_id, f["state"], now, job_id, cid, local) for cid, f in final]
        retries = [(*map(f.get, fields), api_id, max_attempts, f["state"], max_attempts, now, job_id, cid, local)
                   for cid, f in retry]
        frees = [(*map(f.get, fields), api_id, now, job_id, cid, local) for cid, f in free]
        recorded = 0
        with self.transaction():
            for sql, rows in ((_FINAL, finals), (_RETRY, retries), (_FREE, frees)):
                if rows:
                    recorded += self.conn.executemany(sql, rows).rowcount
        return recorded

    def finalize_batch(self, local: int) -> None:
        """Close the batch once every member has its result."""
        with self.transaction():
            self.conn.execute(f"UPDATE batches SET state = '{COLLECTED}', collected_at = ? WHERE id = ?",
                              (now_iso(), local))

    def batch_totals(self, job_id: str) -> dict:
        """The job's batches: `total` made at the API, `live` not collected yet (intents included)."""
        return self.one(f"SELECT count(api_id) AS total, count(*) FILTER (WHERE state IN {sql_list(LIVE_BATCHES)}) "
                        "AS live FROM batches WHERE job_id = ?", (job_id,))
