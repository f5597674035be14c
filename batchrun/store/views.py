"""The SQL of what status, report, the summary, the budget and the output read: named reads, no writes.

What `batchrun status` and `jobs` read goes through the standard library's sqlite3 (they must start in
well under 0.25 s). The report's own reads go through sqlite-utils (`db`: its `Database` over the same
connection, `rows_where` / `count_where`): sqlite-utils imports pandas (~0.3 s), which the report's
command loads anyway, and which status never needs.
"""
from __future__ import annotations

import json
from typing import Iterator, Optional, Sequence

from ..states import ABANDONED, ANSWERED, FINAL_STATES, INVALID_OUTPUT, ROW_STATES, SUCCEEDED, sql_list
from .files import api_batch_of

# rows whose reply this job paid for (a reply that did not fit the schema was paid for too; a row that reused
# another job's answer was paid for there)
PAID = f"state IN {sql_list(ANSWERED)} AND reused_from IS NULL"
FAILED = tuple(s for s in FINAL_STATES if s != SUCCEEDED)   # errored, expired, canceled, invalid_output

# what the output joins to each input row, by name (see output.OutputWriter)
OUTPUT_FIELDS = ("custom_id", "state", "text", "stop_reason", "model", "input_tokens", "output_tokens",
                 "cache_creation_input_tokens", "cache_read_input_tokens", "cost_usd", "error_type",
                 "error_message", "api_batch_id", "attempts", "parsed", "row_index")
_OUTPUT_SQL = (f"SELECT {', '.join(api_batch_of() if f == 'api_batch_id' else f for f in OUTPUT_FIELDS)} FROM requests WHERE job_id = ? AND row_index >= ? "
               "AND row_index < ? ORDER BY row_index")

# a row's cache writes by lifetime: the split its reply reported, and writes it did not account for (priced at
# the job's cache_ttl: see models.Catalog.cost_by_kind)
_W5 = "coalesce(cache_creation_5m_input_tokens, 0)"
_W1 = "coalesce(cache_creation_1h_input_tokens, 0)"
_WRITTEN = f"max(coalesce(cache_creation_input_tokens, 0), {_W5} + {_W1})"
_PROMPT = f"(coalesce(input_tokens, 0) + {_WRITTEN} + coalesce(cache_read_input_tokens, 0))"


# The figures of a job's rows (`requests WHERE job_id = ?`), each an aggregate defined here once: status,
# jobs, the run's result and its summary read them together, in one scan (ViewQueries.figures), or alone.
_TOKEN_KINDS = ("input", "output", "cache_write", "cache_read")
_PAID_FIGURES = ("paid", "cost", "unpriced", *_TOKEN_KINDS)
_CACHE_FIGURES = ("read", "wrote", "could")
_USAGE_FIGURES = ("over", "missing")
_FIGURES = {
    "rows": "count(*)",
    **{state: f"count(*) FILTER (WHERE state = '{state}')" for state in ROW_STATES},
    "paid": f"count(*) FILTER (WHERE {PAID})",
    "cost": f"sum(cost_usd) FILTER (WHERE {PAID})",
    "unpriced": f"count(*) FILTER (WHERE {PAID} AND cost_usd IS NULL)",
    "input": f"coalesce(sum(input_tokens) FILTER (WHERE {PAID}), 0)",
    "output": f"coalesce(sum(output_tokens) FILTER (WHERE {PAID}), 0)",
    "cache_write": f"coalesce(sum(cache_creation_input_tokens) FILTER (WHERE {PAID}), 0)",
    "cache_read": f"coalesce(sum(cache_read_input_tokens) FILTER (WHERE {PAID}), 0)",
    "reused": "count(*) FILTER (WHERE reused_from IS NOT NULL)",
    "read": f"count(*) FILTER (WHERE {PAID} AND coalesce(cache_read_input_tokens, 0) > 0)",
    "wrote": f"count(*) FILTER (WHERE {PAID} AND coalesce(cache_creation_input_tokens, 0) > 0)",
    "could": f"count(*) FILTER (WHERE {PAID} AND coalesce(cache_creation_input_tokens, 0) + "
             "coalesce(cache_read_input_tokens, 0) > 0)",
    "missing": f"count(*) FILTER (WHERE {PAID} AND (output_tokens IS NULL OR input_tokens IS NULL))",
}
# the usage of paid replies summed as the catalog prices it (see paid_usage_by_tier): {i, o, w, w5, w1, r}
_USAGE_SUMS = {"i": "input_tokens", "o": "output_tokens", "w": _WRITTEN, "w5": _W5, "w1": _W1,
               "r": "cache_read_input_tokens"}
_UNTIERED = ("w", "w5", "w1")   # a model without price tiers: its one tier's sums beside the tokens (the rest are)
_FIGURES.update({part: f"coalesce(sum({_USAGE_SUMS[part]}) FILTER (WHERE {PAID}), 0)" for part in _UNTIERED})


def _figure(name: str, max_tokens: Optional[int]) -> str:
    """The SQL aggregate of a named figure (the job's shared max_tokens, if it has one, bound as :max_tokens)."""
    if name == "over":   # more output tokens than the request's max_tokens allow
        if max_tokens is not None:   # one max_tokens for every row: no need to read the bodies
            limit = ":max_tokens"
        else:   # each row's own (max_tokens_column): kept with the row (or in its body, stored before issue #17)
            limit = "coalesce(max_tokens, (SELECT json_extract(b.body, '$.max_tokens') FROM bodies b WHERE b.id = body_id))"
        return f"count(*) FILTER (WHERE {PAID} AND output_tokens > {limit})"
    return _FIGURES[name]


def _cost(row: dict) -> Optional[float]:
    return None if row["unpriced"] else round(row["cost"] or 0.0, 10)


def _tokens(row: dict) -> dict:
    return {kind: row[kind] for kind in _TOKEN_KINDS}


def _cache(row: dict) -> dict:
    return {kind: row[kind] for kind in _CACHE_FIGURES}


def _usage(row: dict) -> dict:
    return {"over": row["over"] or 0, "missing": row["missing"] or 0}


def _usage_of(sums: dict) -> dict:
    """A usage as a reply reports it, from sums {i, o, w, w5, w1, r} (see _USAGE_SUMS)."""
    return {"input_tokens": sums["i"], "output_tokens": sums["o"], "cache_creation_input_tokens": sums["w"],
            "cache_read_input_tokens": sums["r"],
            "cache_creation": {"ephemeral_5m_input_tokens": sums["w5"], "ephemeral_1h_input_tokens": sums["w1"]}}


def _untiered(row: dict) -> list[tuple[int, dict]]:
    """paid_usage_by_tier of a model without tiers, from the figures: its one tier (none when nothing is paid)."""
    return [(0, _usage_of({"i": row["input"], "o": row["output"], "r": row["cache_read"],
                           **{part: row[part] for part in _UNTIERED}}))] if row["paid"] else []


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

    # ---- status and jobs: the figures of a job's rows ----------------------------------------------
    def figures(self, job_id: str, tiers: Sequence[int] = ()) -> dict:
        """Every figure of the job's rows that status, jobs, a run's result and its summary show, in ONE scan
        of them: {counts (rows by state, the states it has), paid (rows whose reply this job paid for), cost
        (None if any is unpriced), tokens, reused, cache, usage (see usage_problems), tiers, by_tier (the paid
        usage per price tier of `tiers`: see paid_usage_by_tier)}."""
        # (a model with price tiers: its sums per tier in a query of their own, which groups the rows by tier)
        row = self._tally(job_id, ("rows", *ROW_STATES, *_PAID_FIGURES, "reused", *_CACHE_FIGURES, *_USAGE_FIGURES,
                                   *(() if tiers else _UNTIERED)))
        counts = {s: row[s] for s in ROW_STATES if row[s]}
        if sum(counts.values()) != row["rows"]:   # a state this batchrun does not know (a newer one's): as stored
            counts = self.counts(job_id)
        return {"counts": counts, "paid": row["paid"], "cost": _cost(row), "tokens": _tokens(row),
                "reused": row["reused"], "cache": _cache(row), "usage": _usage(row), "tiers": tuple(tiers),
                "by_tier": self.paid_usage_by_tier(job_id, tiers) if tiers else _untiered(row)}

    def job_cost(self, job_id: str) -> Optional[float]:
        """What the job has spent, from the usage of every reply it paid for; None if any is unpriced."""
        return _cost(self._tally(job_id, ("cost", "unpriced")))

    def paid(self, job_id: str) -> tuple[int, Optional[float]]:
        """(rows whose reply this job paid for, what they cost: see job_cost), in one scan."""
        row = self._tally(job_id, _PAID_FIGURES[:3])
        return row["paid"], _cost(row)

    def paid_rows(self, job_id: str) -> int:
        """Rows whose reply this job paid for."""
        return self._tally(job_id, ("paid",))["paid"]

    def paid_tokens(self, job_id: str) -> dict:
        """Tokens of the replies this job paid for, by kind: {input, output, cache_write, cache_read}."""
        return _tokens(self._tally(job_id, _TOKEN_KINDS))

    def reused_rows(self, job_id: str) -> int:
        """Rows of the job answered by another job's reply (not sent, not paid here)."""
        return self._tally(job_id, ("reused",))["reused"]

    def batches_of(self, job_id: str) -> list[dict]:
        """The job's batches in the order they were made; an abandoned intent (its create made no batch, its
        rows went back to pending) is left out."""
        return self.q(f"SELECT * FROM batches WHERE job_id = ? AND state != '{ABANDONED}' ORDER BY id", (job_id,))

    def cache_use(self, job_id: str) -> dict:
        """Rows this job paid for that read the cache, that wrote it, and that could have read it (every row
        whose prefix was cached: it wrote or read): {read, wrote, could}."""
        return _cache(self._tally(job_id, _CACHE_FIGURES))

    def paid_usage_by_tier(self, job_id: str, tiers: Sequence[int]) -> list[tuple[int, dict]]:
        """The usage of the replies this job paid for, summed per price tier of their prompts: (tier, usage)
        pairs of the tiers that have rows, in tier order, tier 0 the base prices and tier k the prompts of more
        than tiers[k - 1] tokens (`tiers`: the model's ascending `above_prompt_tokens`). Each usage is as a
        reply reports it, its cache writes split by lifetime (what the split does not account for stays
        unsplit), so that the catalog prices the sum exactly as it priced each row (pricing is linear within a
        tier)."""
        tier = "CASE " + " ".join(f"WHEN {_PROMPT} > ? THEN {k}" for k in range(len(tiers), 0, -1)) + " ELSE 0 END" \
            if tiers else "0"
        sums = ", ".join(f"coalesce(sum({_USAGE_SUMS[part]}), 0) AS {part}" for part in _USAGE_SUMS)
        rows = self.q(f"SELECT {tier} AS tier, {sums} FROM requests WHERE job_id = ? AND {PAID} GROUP BY 1",
                      (*reversed(tiers), job_id))
        return [(r["tier"], _usage_of(r)) for r in rows]

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
        return _usage(self._tally(job_id, _USAGE_FIGURES))

    def _tally(self, job_id: str, names: Sequence[str]) -> dict:
        """The named figures (see _figure) of the job's rows, in one scan of them."""
        params: dict = {"job": job_id}
        if "over" in names:   # one max_tokens for every row (the job's shared params), or each row's own
            job = self.job(job_id)
            params["max_tokens"] = json.loads(job["shared_params"] or "{}").get("max_tokens") if job else None
        sql = ", ".join(f"{_figure(name, params.get('max_tokens'))} AS {name}" for name in names)
        cur = self.conn.execute(f"SELECT {sql} FROM requests WHERE job_id = :job", params)
        return dict(zip(names, cur.fetchone()))

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
            "custom_id, row_index, state, error_type, error_message, attempts, "
            f"{api_batch_of()} AS api_batch_id, finished_at")))
        return {"total": requests.count_where(where, args), "rows": rows}

    # ---- the output --------------------------------------------------------------------------------
    def rows_for_output(self, job_id: str, start: int, count: int) -> dict[str, list]:
        """The results of rows start .. start + count - 1 of the job, in row order, as columns: a list per
        name of OUTPUT_FIELDS (rows the state lacks are missing: compare `row_index`)."""
        rows = self.conn.execute(_OUTPUT_SQL, (job_id, start, start + count)).fetchall()
        columns = list(zip(*rows)) if rows else [() for _ in OUTPUT_FIELDS]
        return dict(zip(OUTPUT_FIELDS, columns))
