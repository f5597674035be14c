"""The SQL of the budget ledger (see batchrun/budget.py): what batches in flight reserved, the rows
still to send, and the budget the job's latest run had."""
from __future__ import annotations

import json
from typing import Optional

from ..states import IN_FLIGHT, LIVE_BATCHES, PENDING, sql_list


class BudgetQueries:
    def reservations(self, job_id: str) -> list:
        """(batch, its reservation) of each batch of the job that may still cost something (an intent,
        submitted, ended); a reservation of None: the batch was sent before the job had a budget."""
        return [(r[0], r[1]) for r in self.conn.execute(
            f"SELECT id, max_cost FROM batches WHERE job_id = ? AND state IN {sql_list(LIVE_BATCHES)}", (job_id,))]

    def rows_in_flight(self, batch: int) -> int:
        """Rows of a batch still in flight (no result recorded yet)."""
        return self.one(f"SELECT count(*) AS n FROM requests WHERE batch_id = ? AND state = '{IN_FLIGHT}'",
                        (batch,))["n"]

    def pending_key(self, job_id: str) -> tuple[int, int]:
        """(rows still to send, the sum of their row numbers): the same key, the same rows."""
        row = self.one(f"SELECT count(*) AS n, coalesce(sum(row_index), 0) AS s FROM requests "
                       f"WHERE job_id = ? AND state = '{PENDING}'", (job_id,))
        return row["n"], row["s"]

    def record_max_cost(self, job_id: str, max_cost: Optional[float]) -> None:
        """The stored spec keeps the budget of the job's latest run (status and report show that one)."""
        stored = json.loads(self.job(job_id)["spec"])
        if stored.get("max_cost") != max_cost:
            stored["max_cost"] = max_cost
            with self.transaction():
                self.conn.execute("UPDATE jobs SET spec = ? WHERE id = ?", (json.dumps(stored, sort_keys=True), job_id))
