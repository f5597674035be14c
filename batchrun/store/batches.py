"""The SQL of batch mode (see batchrun/batches.py): chunks chosen, intents, batches created, adopted,
abandoned, and the prompt cache's primers."""
from __future__ import annotations


class BatchQueries:
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
