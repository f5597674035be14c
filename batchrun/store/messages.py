"""The SQL of messages mode (see batchrun/messages.py): rows claimed before they are sent, replies recorded."""
from __future__ import annotations

from .batches import taken_elsewhere
from .files import now_iso


class MessageQueries:
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
                # (another job's row in flight counts only while a run moves that job: see taken_elsewhere)
                taken, args = taken_elsewhere(self.live_others(job_id))
                page = self.conn.execute(sql.format(taken=f"AND NOT {taken} "), (job_id, after, *args, limit)).fetchall()
            else:   # alone: still claimed, for a job planned a moment later to see
                page = self.conn.execute(sql.format(taken=""), (job_id, after, limit)).fetchall()
            now = now_iso()
            self.conn.executemany("UPDATE requests SET claimed_at = ? WHERE job_id = ? AND custom_id = ?",
                                  [(now, job_id, row[1]) for row in page])
        return page

    def release_claims(self, job_id: str) -> None:
        """A messages-mode run is over: its rows are no longer being sent (the ones still pending wait for
        the next run)."""
        with self.transaction():
            self.conn.execute("UPDATE requests SET claimed_at = NULL WHERE job_id = ? AND claimed_at IS NOT NULL",
                              (job_id,))
