"""The SQL of what status, report, the summary, the budget and the output read: named reads, no writes.

What `batchrun status` and `jobs` read goes through the standard library's sqlite3 (they must start in
well under 0.25 s). The report's own reads go through sqlite-utils (`db`: its `Database` over the same
connection, `rows_where` / `count_where`): sqlite-utils imports pandas (~0.3 s), which the report's
command loads anyway, and which status never needs.
"""
from __future__ import annotations

import json
from typing import Iterator, Optional, Sequence

from ..states import ABANDONED, ANSWERED, FINAL_STATES, INVALID_OUTPUT, SUCCEEDED, sql_list

# rows whose reply this job paid for (a reply that did not fit the schema was paid for too; a row that reused
# another job's answer was paid for there)
PAID = f"state IN {sql_list(ANSWERED)} AND reused_from IS NULL"
FAILED = tuple(s for s in FINAL_STATES if s != SUCCEEDED)   # errored, expired, canceled, invalid_output

# what the output joins to each input row, by name (see output.OutputWriter)
OUTPUT_FIELDS = ("custom_id", "state", "text", "stop_reason", "model", "input_tokens", "output_tokens",
                 "cache_creation_input_tokens", "cache_read_input_tokens", "cost_usd", "error_type",
                 "error_message", "api_batch_id", "attempts", "parsed", "row_index")
_OUTPUT_SQL = (f"SELECT {', '.join(OUTPUT_FIELDS)} FROM requests WHERE job_id = ? AND row_index >= ? "
               "AND row_index < ? ORDER BY row_index")

# a row's cache writes by lifetime: the split its reply reported, and writes it did not account for (priced at
# the job's cache_ttl: see models.Catalog.cost_by_kind)
_W5 = "coalesce(cache_creation_5m_input_tokens, 0)"
_W1 = "coalesce(cache_creation_1h_input_tokens, 0)"
_WRITTEN = f"max(coalesce(cache_creation_input_tokens, 0), {_W5} + {_W1})"
_PROMPT = f"(coalesce(input_tokens, 0) + {_WRITTEN} + coalesce(cache_read_input_tokens, 0))"


class ViewQueries:
    @property
    def db(self):
        """The state file as a sqlite-utils `Database` (over this connection; no plugins, no pragma changed),
        for the report's reads. Imported on first use: it imports pandas."""
        db = self.__dict__.get("_views_db")
        if db is None:
            from sqlite_utils import Database
            db = self._views_db = Database(self.conn, recursive_triggers=False, execute_plugins=False)
        return db

    # ---- status and jobs -----------------------------------------------------------------------
    def job_cost(self, job_id: str) -> Optional[float]:
        """What the job has spent, from the usage of every reply it paid for; None if any is unpriced."""
        row = self.one(f"SELECT sum(cost_usd) AS c, count(*) FILTER (WHERE cost_usd IS NULL) AS unknown "
                       f"FROM requests WHERE job_id = ? AND {PAID}", (job_id,))
        if row["unknown"]:
            return None
        return round(row["c"] or 0.0, 10)

    def paid_rows(self, job_id: str) -> int:
        """Rows whose reply this job paid for."""
        return self.one(f"SELECT count(*) AS n FROM requests WHERE job_id = ? AND {PAID}", (job_id,))["n"]

    def paid_tokens(self, job_id: str) -> dict:
        """Tokens of the replies this job paid for, by kind: {input, output, cache_write, cache_read}."""
        return self.one(
            "SELECT coalesce(sum(input_tokens),0) AS input, coalesce(sum(output_tokens),0) AS output, "
            "coalesce(sum(cache_creation_input_tokens),0) AS cache_write, "
            "coalesce(sum(cache_read_input_tokens),0) AS cache_read "
            f"FROM requests WHERE job_id = ? AND {PAID}", (job_id,))

    def reused_rows(self, job_id: str) -> int:
        """Rows of the job answered by another job's reply (not sent, not paid here)."""
        return self.one("SELECT count(*) AS n FROM requests WHERE job_id = ? AND reused_from IS NOT NULL",
                        (job_id,))["n"]

    def batches_of(self, job_id: str) -> list[dict]:
        """The job's batches in the order they were made; an abandoned intent (its create made no batch, its
        rows went back to pending) is left out."""
        return self.q(f"SELECT * FROM batches WHERE job_id = ? AND state != '{ABANDONED}' ORDER BY id", (job_id,))

    def cache_use(self, job_id: str) -> dict:
        """Rows this job paid for that read the cache, that wrote it, and that could have read it (every row
        whose prefix was cached: it wrote or read): {read, wrote, could}."""
        return self.one("SELECT count(*) FILTER (WHERE coalesce(cache_read_input_tokens, 0) > 0) AS read, "
                        "count(*) FILTER (WHERE coalesce(cache_creation_input_tokens, 0) > 0) AS wrote, "
                        "count(*) FILTER (WHERE coalesce(cache_creation_input_tokens, 0) + "
                        "coalesce(cache_read_input_tokens, 0) > 0) AS could "
                        f"FROM requests WHERE job_id = ? AND {PAID}", (job_id,))

    def paid_usage_by_tier(self, job_id: str, tiers: Sequence[int]) -> list[tuple[int, dict]]:
        """The usage of the replies this job paid for, summed per price tier of their prompts: (tier, usage)
        pairs, tier 0 the base prices and tier k the prompts of more than tiers[k - 1] tokens (`tiers`: the
        model's ascending `above_prompt_tokens`). Each usage is as a reply reports it, its cache writes split
        by lifetime (what the split does not account for stays unsplit), so that the catalog prices the sum
        exactly as it priced each row (pricing is linear within a tier)."""
        tier = "CASE " + " ".join(f"WHEN {_PROMPT} > ? THEN {k}" for k in range(len(tiers), 0, -1)) + " ELSE 0 END" \
            if tiers else "0"
        rows = self.q(
            f"SELECT {tier} AS tier, coalesce(sum(input_tokens), 0) AS i, coalesce(sum(output_tokens), 0) AS o, "
            f"coalesce(sum({_WRITTEN}), 0) AS w, coalesce(sum({_W5}), 0) AS w5, coalesce(sum({_W1}), 0) AS w1, "
            f"coalesce(sum(cache_read_input_tokens), 0) AS r FROM requests WHERE job_id = ? AND {PAID} GROUP BY 1",
            (*reversed(tiers), job_id))
        return [(r["tier"], {"input_tokens": r["i"], "output_tokens": r["o"], "cache_creation_input_tokens": r["w"],
                             "cache_read_input_tokens": r["r"],
                             "cache_creation": {"ephemeral_5m_input_tokens": r["w5"],
                                                "ephemeral_1h_input_tokens": r["w1"]}})
                for r in rows]

    # ---- what failed, and usage that cannot be right -----------------------------------------------
    def failures_by_type(self, job_id: str) -> list[tuple[str, int]]:
        """(error type, or the row's state when it has none; rows) of the job's failed rows, most first."""
        return [(r["t"], r["n"]) for r in self.q(
            "SELECT coalesce(error_type, state) AS t, count(*) AS n FROM requests WHERE job_id = ? "
            f"AND state IN {sql_list(FAILED)} GROUP BY t ORDER BY n DESC, t", (job_id,))]

    def invalid_output_reasons(self, job_id: str) -> list[tuple[str, int]]:
        """(reason, rows) of the job's rows whose reply did not fit its schema, most frequent first."""
        return [(r["m"], r["n"]) for r in self.q(
            "SELECT coalesce(error_message, '(no reason recorded)') AS m, count(*) AS n FROM requests "
            f"WHERE job_id = ? AND state = '{INVALID_OUTPUT}' GROUP BY m ORDER BY n DESC, m", (job_id,))]

    def usage_problems(self, job_id: str) -> dict:
        """Replies this job paid for whose usage cannot be right: `over`, more output tokens than the
        request's max_tokens allow; `missing`, no usage, or input or output tokens that cannot be read
        (results.clean_usage drops counts that cannot be right)."""
        job = self.job(job_id)
        shared = json.loads(job["shared_params"] or "{}") if job else {}
        paid = f"SELECT body_id, max_tokens, input_tokens, output_tokens FROM requests WHERE job_id = ? AND {PAID}"
        missing = "count(*) FILTER (WHERE r.output_tokens IS NULL OR r.input_tokens IS NULL) AS missing"
        if shared.get("max_tokens") is not None:   # one max_tokens for every row: no need to read the bodies
            row = self.one(f"SELECT count(*) FILTER (WHERE r.output_tokens > ?) AS over, {missing} FROM ({paid}) r",
                           (shared["max_tokens"], job_id))
        else:   # each row's own (max_tokens_column): kept with the row (or in its body, stored before issue #17)
            row = self.one("SELECT count(*) FILTER (WHERE r.output_tokens > "
                           "coalesce(r.max_tokens, json_extract(b.body, '$.max_tokens'))) "
                           f"AS over, {missing} FROM ({paid}) r LEFT JOIN bodies b ON b.id = r.body_id", (job_id,))
        return {"over": row["over"] or 0, "missing": row["missing"] or 0}

    # ---- the report (through sqlite-utils) ---------------------------------------------------------
    def stop_reasons(self, job_id: str) -> dict:
        """{stop reason ("(none)" when not given): rows} over the job's answered rows, most frequent first."""
        return {r["s"]: r["n"] for r in self.db.query(
            "SELECT coalesce(stop_reason, '(none)') AS s, count(*) AS n FROM requests WHERE job_id = ? "
            f"AND state IN {sql_list(ANSWERED)} GROUP BY s ORDER BY n DESC, s", [job_id])}

    def output_token_counts(self, job_id: str) -> list[int]:
        """The output tokens of every answered row of the job (that reported them), smallest first."""
        return [r["output_tokens"] for r in self.db["requests"].rows_where(
            f"job_id = ? AND state IN {sql_list(ANSWERED)} AND output_tokens IS NOT NULL", [job_id],
            select="output_tokens", order_by="output_tokens")]

    def parsed_replies(self, job_id: str) -> Iterator[str]:
        """The `parsed` JSON of every row of the job whose reply fit its output schema."""
        for r in self.db["requests"].rows_where(f"job_id = ? AND state = '{SUCCEEDED}' AND parsed IS NOT NULL",
                                                [job_id], select="parsed"):
            yield r["parsed"]

    def failed_rows(self, job_id: str, limit: int) -> dict:
        """The job's failed rows, the first `limit` of them in row order: {"total", "rows"}."""
        where, args = f"job_id = ? AND state IN {sql_list(FAILED)}", [job_id]
        requests = self.db["requests"]
        rows = list(requests.rows_where(where, args, order_by="row_index", limit=max(0, limit), select=(
            "custom_id, row_index, state, error_type, error_message, attempts, api_batch_id, finished_at")))
        return {"total": requests.count_where(where, args), "rows": rows}

    # ---- the output --------------------------------------------------------------------------------
    def rows_for_output(self, job_id: str, start: int, count: int) -> dict[str, list]:
        """The results of rows start .. start + count - 1 of the job, in row order, as columns: a list per
        name of OUTPUT_FIELDS (rows the state lacks are missing: compare `row_index`)."""
        rows = self.conn.execute(_OUTPUT_SQL, (job_id, start, start + count)).fetchall()
        columns = list(zip(*rows)) if rows else [() for _ in OUTPUT_FIELDS]
        return dict(zip(OUTPUT_FIELDS, columns))
