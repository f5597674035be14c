"""The SQL of messages mode (see batchrun/messages.py): rows claimed before they are sent, replies recorded."""
from __future__ import annotations

from typing import Iterable

from ..states import PENDING
from .batches import taken_elsewhere
from .bodies import PLANNED_FROM, PLANNED_ROW
from .files import RESULT_FIELDS, now_iso

# what a reply (or an error that ends a row) fills in: a result's fields, less the batch it came in
REPLY_FIELDS = tuple(f for f in RESULT_FIELDS if f != "api_batch_id")
_RECORD = (f"UPDATE requests SET state = ?, {', '.join(f'{f} = ?' for f in REPLY_FIELDS)}, "
           f"attempts = attempts + ?, finished_at = ? WHERE job_id = ? AND custom_id = ? AND state = '{PENDING}'")


class MessageQueries:
    def claim_for_messages(self, job_id: str, after: int, limit: int) -> list:
        """Messages mode: the next pending rows of the job (row_index > after, in order), each claimed
        for this run before it is sent, in one write-locked transaction with the check that no other job
        of the state file has the same request answered or being sent now (a run holds that job's lock).
        Rows so taken are left pending: the other job's answer is reused, or they are sent once no run
        moves it. Returns planned rows (store/bodies.py: PLANNED_ROW; their bodies from a BodySource)."""
        sql = (f"SELECT {PLANNED_ROW} FROM {PLANNED_FROM} "
               f"WHERE r.job_id = ? AND r.state = '{PENDING}' AND r.row_index > ? {{taken}}ORDER BY r.row_index "
               "LIMIT ?")
        with self.transaction():
            if not self.alone(job_id):
                # (another job's row in flight counts only while a run moves that job: see taken_elsewhere)
                taken, args = taken_elsewhere(self.live_others(job_id))
                page = self.conn.execute(sql.format(taken=f"AND NOT {taken} "),
                                         (job_id, after, *args, limit)).fetchall()
            else:   # alone: still claimed, for a job planned a moment later to see
                page = self.conn.execute(sql.format(taken=""), (job_id, after, limit)).fetchall()
            now = now_iso()
            self.conn.executemany("UPDATE requests SET claimed_at = ? WHERE job_id = ? AND custom_id = ?",
                                  [(now, job_id, row[1]) for row in page])
        return page

    def record_replies(self, job_id: str, replies: Iterable[tuple]) -> int:
        """Messages mode: rows that got their result — `(custom_id, fields, sends)`, the fields of a
        reply or of the error that ended the row (`state` and REPLY_FIELDS), and how many sends it
        took (added to its attempts) — leave `pending` for their final state, in one transaction. A
        row no longer pending (recorded already) is left as it is. Returns how many rows were recorded."""
        now = now_iso()
        rows = [(fields["state"], *(fields.get(f) for f in REPLY_FIELDS), sends, now, job_id, custom_id)
                for custom_id, fields, sends in replies]
        if not rows:
            return 0
        with self.transaction():
            return self.conn.executemany(_RECORD, rows).rowcount

    def release_claims(self, job_id: str) -> None:
        """A messages-mode run is over: its rows are no longer being sent (the ones still pending wait for
        the next run)."""
        with self.transaction():
            self.conn.execute("UPDATE requests SET claimed_at = NULL WHERE job_id = ? AND claimed_at IS NOT NULL",
                              (job_id,))
